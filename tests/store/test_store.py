"""The Store contract, on every backend (SQLite and a real etcd): revisions,
transactions, leases, history, live events and read-your-writes for listeners."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from flext_mesh.errors import StoreUnavailable
from flext_mesh.store import Compare, Delete, Event, EventType, LeaseNotFound, Put, Store
from flext_mesh.store.sqlite import SqliteStore
from tests.store.conftest import StoreFactory


def exact(store: Store) -> bool:
    """SQLite revisions move only with this test's writes; etcd's also with others'
    (lease expiries of earlier tests, barrier writes), so there they only grow."""
    return isinstance(store, SqliteStore)


async def test_put_get_range_delete_track_revisions(store: Store) -> None:
    r1 = await store.put("/a/1", b"one")
    r2 = await store.put("/a/2", b"two")
    r3 = await store.put("/a/1", b"uno")
    await store.put("/b/1", b"other")
    assert r1 < r2 < r3

    kv = await store.get("/a/1")
    assert kv is not None
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"uno", r1, r3, 2)

    assert [k.key for k in await store.range("/a/")] == ["/a/1", "/a/2"]
    assert [k.key for k in await store.range("/a/", start_after="/a/1")] == ["/a/2"]
    assert [k.key for k in await store.range("/", limit=2)] == ["/a/1", "/a/2"]
    assert [k.key for k in await store.range("")] == ["/a/1", "/a/2", "/b/1"]
    await store.put("/a/3", b"three")
    assert [k.key for k in await store.range("/a/", reverse=True)] == ["/a/3", "/a/2", "/a/1"]
    newest_first = await store.range("/a/", reverse=True, start_after="/a/3", limit=1)
    assert [k.key for k in newest_first] == ["/a/2"]
    assert [k.key for k in await store.range("/b/", reverse=True)] == ["/b/1"]
    assert [k.key for k in await store.range("/", reverse=True, limit=1)] == ["/b/1"]
    await store.delete("/a/3")

    r5 = await store.delete("/a/1")
    assert r5 is not None
    assert r5 > r3
    assert await store.get("/a/1") is None
    assert await store.delete("/a/1") is None
    if exact(store):
        assert await store.current_revision() == r5
    else:
        assert await store.current_revision() >= r5


async def test_txn_applies_success_or_failure_branch_atomically(store: Store) -> None:
    rev = await store.put("/lock", b"owner-a")
    won = await store.txn([Compare("/lock", rev)], [Put("/lock", b"owner-b"), Put("/x", b"1")])
    assert won.succeeded
    lost = await store.txn([Compare("/lock", rev)], [Put("/lock", b"owner-c")], [Put("/y", b"2")])
    assert not lost.succeeded
    assert (await store.get("/lock")).value == b"owner-b"  # type: ignore[union-attr]
    assert await store.get("/y") is not None
    created = await store.txn([Compare("/new", 0)], [Put("/new", b"first")])
    assert created.succeeded
    again = await store.txn([Compare("/new", 0)], [Put("/new", b"second")])
    assert not again.succeeded
    assert (await store.get("/new")).value == b"first"  # type: ignore[union-attr]


async def test_one_revision_per_transaction_and_prefix_delete(store: Store) -> None:
    before = await store.current_revision()
    result = await store.txn([], [Put("/p/1", b"1"), Put("/p/2", b"2"), Put("/p/3", b"3")])
    assert result.revision == before + 1 if exact(store) else result.revision > before
    assert {e.revision for e in result.events} == {result.revision}
    assert [(e.key, e.prev_value) for e in result.events] == [
        ("/p/1", None),
        ("/p/2", None),
        ("/p/3", None),
    ]
    gone = await store.txn([], [Delete("/p/", prefix=True)])
    assert [e.key for e in gone.events] == ["/p/1", "/p/2", "/p/3"]
    assert {e.revision for e in gone.events} == {gone.revision}
    assert all(e.type is EventType.DELETE and not e.expired for e in gone.events)
    assert await store.range("/p/") == []


async def test_history_resumes_from_a_revision(store: Store) -> None:
    revisions = [await store.put(f"/k/{i}", str(i).encode()) for i in range(10)]
    await store.put("/elsewhere", b"x")
    events = await store.events_since(revisions[6], "/k/")
    assert [(e.key, e.revision) for e in events] == [
        ("/k/7", revisions[7]),
        ("/k/8", revisions[8]),
        ("/k/9", revisions[9]),
    ]
    assert await store.events_since(await store.current_revision(), "/k/") == []


async def test_subscription_then_history_misses_nothing(store: Store) -> None:
    rev = await store.put("/w/0", b"0")
    sub = store.subscribe("/w/")
    writer = asyncio.gather(*(store.put(f"/w/{i}", b"x") for i in range(1, 50)))
    history = await store.events_since(rev, "/w/")
    written = set(await writer)
    seen = {e.revision for e in history}
    async with asyncio.timeout(5):
        async for batch in sub:
            seen.update(e.revision for e in batch)
            if seen >= written:
                break
    sub.close()
    assert seen == written
    assert len(written) == 49


async def test_an_unrenewed_lease_expires_and_its_keys_go_as_expired(store: Store) -> None:
    lease = await store.grant_lease(1)
    keep = await store.grant_lease(1)
    assert lease.ttl >= 1
    await store.put("/inst/a", b"a", lease=lease.lease_id)
    await store.put("/inst/keep", b"k", lease=keep.lease_id)
    kv = await store.get("/inst/a")
    assert kv is not None
    assert kv.lease == lease.lease_id
    assert {info.lease_id for info in await store.leases()} >= {lease.lease_id, keep.lease_id}
    sub = store.subscribe("/inst/")
    deadline = time.monotonic() + 6
    while await store.get("/inst/a") is not None:
        assert time.monotonic() < deadline, "the lease never expired"
        renewed = await store.keep_alive(keep.lease_id)
        assert renewed.expires_at > time.time()
        await asyncio.sleep(0.1)
    assert [k.key for k in await store.range("/inst/")] == ["/inst/keep"]
    async with asyncio.timeout(2):
        batch = await anext(aiter(sub))
    assert [(e.type, e.key, e.value, e.expired) for e in batch] == [
        (EventType.DELETE, "/inst/a", b"a", True)
    ]
    with pytest.raises(LeaseNotFound):
        await store.keep_alive(lease.lease_id)
    with pytest.raises(LeaseNotFound):
        await store.put("/inst/late", b"x", lease=lease.lease_id)
    assert lease.lease_id not in {info.lease_id for info in await store.leases()}


async def test_put_with_lease_writes_a_key_that_lives_and_dies_with_its_new_lease(
    store: Store,
) -> None:
    seen: list[Event] = []
    store.listen("/pl/", seen.extend)
    lease, result = await store.put_with_lease("/pl/a", lambda info: info.lease_id.encode(), 1)
    assert result.succeeded
    kv = await store.get("/pl/a")
    assert kv is not None
    assert (kv.value, kv.lease, kv.mod_revision) == (
        lease.lease_id.encode(),
        lease.lease_id,
        result.revision,
    )
    assert [(e.type, e.key) for e in seen] == [(EventType.PUT, "/pl/a")]
    renewed = await store.keep_alive(lease.lease_id)
    assert renewed.lease_id == lease.lease_id
    deadline = time.monotonic() + 6
    while await store.get("/pl/a") is not None:
        assert time.monotonic() < deadline, "the lease never expired"
        await asyncio.sleep(0.1)
    with pytest.raises(LeaseNotFound):
        await store.keep_alive(lease.lease_id)


async def test_revoke_deletes_the_leases_keys_as_a_deregistration(store: Store) -> None:
    lease = await store.grant_lease(30)
    await store.put("/r/1", b"1", lease=lease.lease_id)
    await store.put("/r/2", b"2", lease=lease.lease_id)
    seen: list[Event] = []
    store.listen("/r/", seen.extend)
    revision = await store.revoke_lease(lease.lease_id)
    assert await store.get("/r/1") is None
    assert await store.get("/r/2") is None
    assert [(e.key, e.expired, e.revision) for e in seen] == [
        ("/r/1", False, revision),
        ("/r/2", False, revision),
    ]
    with pytest.raises(LeaseNotFound):
        await store.revoke_lease(lease.lease_id)
    with pytest.raises(LeaseNotFound):
        await store.keep_alive(lease.lease_id)


async def test_unknown_lease_ids_are_not_found(store: Store) -> None:
    for lease_id in ("nope", "0", "ffffffffffffffffff", "7fffffffffffffff"):
        with pytest.raises(LeaseNotFound):
            await store.keep_alive(lease_id)
        with pytest.raises(LeaseNotFound):
            await store.revoke_lease(lease_id)
        with pytest.raises(LeaseNotFound):
            await store.put("/l/x", b"x", lease=lease_id)
    assert await store.get("/l/x") is None


async def test_writes_after_close_fail_cleanly(make_store: StoreFactory) -> None:
    s = await make_store()
    await s.open()
    await s.close()
    with pytest.raises(StoreUnavailable):
        await s.put("/x", b"1")


async def test_listeners_see_a_write_before_its_caller_resumes(store: Store) -> None:
    seen: list[tuple[int, str]] = []
    stop = store.listen("/svc/", lambda events: seen.extend((e.revision, e.key) for e in events))
    rev = await store.put("/svc/a", b"1")
    assert seen == [(rev, "/svc/a")], "the listener ran before put() returned"
    result = await store.txn([], [Put("/svc/b", b"2")])
    assert seen[-1] == (result.revision, "/svc/b")
    deleted = await store.delete("/svc/b")
    assert seen[-1] == (deleted, "/svc/b")
    await store.put("/other", b"x")
    stop()
    await store.put("/svc/c", b"3")
    assert [key for _, key in seen] == ["/svc/a", "/svc/b", "/svc/b"]


async def test_snapshot_reads_keys_and_revision_together(store: Store) -> None:
    await store.put("/s/1", b"1")
    rev = await store.put("/s/2", b"2")
    await store.put("/t/1", b"x")
    revision, kvs = await store.snapshot("/s/")
    assert [kv.key for kv in kvs] == ["/s/1", "/s/2"]
    assert revision >= rev


async def test_a_listener_started_before_a_snapshot_sees_exactly_what_follows(
    store: Store,
) -> None:
    """The registry's start-up: listen, snapshot, then apply only events past it."""
    await store.put("/c/1", b"1")
    seen: list[Event] = []
    store.listen("/c/", seen.extend)
    writes = asyncio.gather(*(store.put(f"/c/{i}", b"v") for i in range(2, 30)))
    revision, kvs = await store.snapshot("/c/")
    revisions = await writes
    in_snapshot = {kv.key for kv in kvs}
    after = [e for e in seen if e.revision > revision]
    assert in_snapshot | {e.key for e in after} == {f"/c/{i}" for i in range(1, 30)}
    assert {e.key for e in after}.isdisjoint(in_snapshot - {"/c/1"})
    assert sorted(e.revision for e in seen) == sorted(revisions)


async def test_events_carry_the_previous_value_live_and_in_history(store: Store) -> None:
    live: list[tuple[str, bytes | None]] = []
    store.listen("/p/", lambda events: live.extend((e.type.name, e.prev_value) for e in events))
    start = await store.put("/p/x", b"v1")
    await store.put("/p/x", b"v2")
    await store.delete("/p/x")
    assert live == [("PUT", None), ("PUT", b"v1"), ("DELETE", b"v2")]
    history = await store.events_since(start - 1, "/p/")
    assert [(e.type.name, e.prev_value) for e in history] == live
    assert [e.expired for e in history] == [False, False, False]


async def test_a_lease_can_be_granted_with_a_chosen_id(store: Store) -> None:
    chosen = f"{uuid.uuid4().int % 2**62 + 1:016x}"  # etcd ids: 16 hex digits
    lease = await store.grant_lease(30, lease_id=chosen)
    assert lease.lease_id == chosen
    await store.put("/chosen/a", b"a", lease=chosen)
    assert (await store.keep_alive(chosen)).lease_id == chosen
    kv = await store.get("/chosen/a")
    assert kv is not None
    assert kv.lease == chosen
    await store.revoke_lease(chosen)
    assert await store.get("/chosen/a") is None
