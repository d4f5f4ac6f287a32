"""What only the etcd Store does: replicas sharing one etcd, endpoint failover, the
reserved key, etcd's compaction, and clear errors when etcd is unreachable or down."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from aetcd import rpc  # type: ignore[import-untyped]

from flext_mesh.errors import StoreUnavailable
from flext_mesh.store import Compacted, Event, EventType, Put, StoreOpenError, open_store
from flext_mesh.store.etcd import SYNC_KEY, EtcdStore, parse_endpoints
from tests.etcd_server import EtcdServer
from tests.store.conftest import etcd_store


def _dead_port() -> int:
    """A loopback port nothing listens on (bound then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
async def replicas(etcd_server: EtcdServer) -> AsyncIterator[tuple[EtcdStore, EtcdStore]]:
    """Two stores on one prefix: two control-plane replicas sharing an etcd."""
    prefix = f"/test-{uuid.uuid4().hex[:12]}"
    a, b = etcd_store(etcd_server, prefix), etcd_store(etcd_server, prefix)
    await a.open()
    await b.open()
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def test_replicas_see_each_others_writes_deletions_and_expiries(
    replicas: tuple[EtcdStore, EtcdStore],
) -> None:
    a, b = replicas
    seen_by_b: list[Event] = []
    expired = asyncio.Event()

    def on_events(events: list[Event]) -> None:
        seen_by_b.extend(events)
        if any(e.key == "/registry/i-1" and e.type is EventType.DELETE for e in events):
            expired.set()

    b.listen("/registry/", on_events)
    lease = await a.grant_lease(1)
    put_rev = await a.put("/registry/i-1", b"one", lease=lease.lease_id)
    gone = await a.grant_lease(30)
    await a.put("/registry/i-2", b"two", lease=gone.lease_id)
    revoke_rev = await a.revoke_lease(gone.lease_id)

    async with asyncio.timeout(6):
        await expired.wait()
    assert [(e.type, e.key, e.expired) for e in seen_by_b] == [
        (EventType.PUT, "/registry/i-1", False),
        (EventType.PUT, "/registry/i-2", False),
        (EventType.DELETE, "/registry/i-2", False),  # deregistered on replica a
        (EventType.DELETE, "/registry/i-1", True),  # expired in etcd
    ]
    assert seen_by_b[0].revision == put_rev
    assert seen_by_b[2].revision == revoke_rev
    # Both replicas read the same revisions and the same state.
    assert await a.current_revision() == await b.current_revision()
    assert await b.range("/registry/") == []


async def test_a_lease_renewed_on_one_replica_keeps_keys_written_by_another(
    replicas: tuple[EtcdStore, EtcdStore],
) -> None:
    a, b = replicas
    lease = await a.grant_lease(1)
    await a.put("/inst/x", b"x", lease=lease.lease_id)
    for _ in range(12):  # 1.8 s: past the TTL, renewed by the other replica
        await b.keep_alive(lease.lease_id)
        await asyncio.sleep(0.15)
    kv = await a.get("/inst/x")
    assert kv is not None
    assert kv.lease == lease.lease_id


async def test_the_reserved_key_never_shows(etcd_server: EtcdServer) -> None:
    store = etcd_store(etcd_server, f"/test-{uuid.uuid4().hex[:12]}")
    await store.open()
    try:
        await store.put("/a", b"1")
        await store.delete("/a")  # writes the reserved key
        await store.put("/b", b"2")
        assert await store.get(SYNC_KEY) is None
        assert [kv.key for kv in await store.range("/", limit=1)] == ["/b"]
        assert [kv.key for kv in await store.range("")] == ["/b"]
        _, snapshot = await store.snapshot("/")
        assert [kv.key for kv in snapshot] == ["/b"]
        history = await store.events_since(0)
        assert [(e.type, e.key) for e in history] == [
            (EventType.PUT, "/a"),
            (EventType.DELETE, "/a"),
            (EventType.PUT, "/b"),
        ]
        with pytest.raises(ValueError, match="start with '/'"):
            await store.put("relative", b"x")
    finally:
        await store.close()


async def test_history_older_than_etcds_compaction_is_reported(etcd_server: EtcdServer) -> None:
    store = etcd_store(etcd_server, f"/test-{uuid.uuid4().hex[:12]}")
    await store.open()
    try:
        start = await store.put("/k/0", b"0")
        for i in range(1, 5):
            await store.put(f"/k/{i}", b"v")
        floor = await store.current_revision()
        async with grpc.aio.insecure_channel(etcd_server.endpoint) as channel:
            await rpc.KVStub(channel).Compact(
                rpc.CompactionRequest(revision=floor, physical=True), timeout=5
            )
        with pytest.raises(Compacted) as caught:
            await store.events_since(start, "/k/")
        assert caught.value.compact_revision == floor - 1
        # From the compaction revision on, history is whole again.
        later = await store.put("/k/5", b"v")
        assert [e.revision for e in await store.events_since(floor, "/k/")] == [later]
    finally:
        await store.close()


async def test_an_unreachable_etcd_is_a_one_line_open_error() -> None:
    dead = [("127.0.0.1", _dead_port()), ("127.0.0.1", _dead_port())]
    store = EtcdStore(dead, timeout=1.0)
    with pytest.raises(StoreOpenError) as caught:
        await store.open()
    message = str(caught.value)
    assert "\n" not in message
    for host, port in dead:
        assert f"{host}:{port}" in message


async def test_a_dead_endpoint_is_skipped(etcd_server: EtcdServer) -> None:
    store = EtcdStore(
        [("127.0.0.1", _dead_port()), ("127.0.0.1", etcd_server.client_port)],
        f"/test-{uuid.uuid4().hex[:12]}",
        timeout=2.0,
    )
    await store.open()
    try:
        seen: list[Event] = []
        store.listen("/", seen.extend)
        revision = await store.put("/x", b"1")
        assert [e.revision for e in seen] == [revision]
    finally:
        await store.close()


async def test_open_store_parses_etcd_urls(etcd_server: EtcdServer) -> None:
    assert parse_endpoints("a:1,b:2") == [("a", 1), ("b", 2)]
    for bad in ("etcd://", "etcd://host", "etcd://host:port", "etcd://h:1,h"):
        with pytest.raises(StoreOpenError, match="etcd"):
            open_store(bad)
    store = open_store(f"{etcd_server.url}/test-{uuid.uuid4().hex[:12]}")
    assert isinstance(store, EtcdStore)
    await store.open()
    try:
        result = await store.txn([], [Put("/u", b"1")])
        assert result.succeeded
    finally:
        await store.close()


async def test_an_etcd_outage_fails_writes_cleanly_and_the_watch_resumes(
    tmp_path: Path,
) -> None:
    """A private etcd, stopped and started again on the same port and data."""
    server = EtcdServer.start(tmp_path)
    store = etcd_store(server, "/outage", timeout=1.0)
    await store.open()
    try:
        seen: list[Event] = []
        after = asyncio.Event()

        def on_events(events: list[Event]) -> None:
            seen.extend(events)
            if any(e.key == "/after" for e in events):
                after.set()

        store.listen("/", on_events)
        await store.put("/before", b"1")
        server.stop()
        with pytest.raises(StoreUnavailable):
            await store.put("/during", b"2")
        server = server.restart()
        async with asyncio.timeout(10):
            while True:
                try:
                    revision = await store.put("/after", b"3")
                    break
                except StoreUnavailable:
                    await asyncio.sleep(0.1)
        # The watch came back too and resumed where it stopped.
        async with asyncio.timeout(5):
            await after.wait()
        assert seen[-1].revision == revision
        assert [e.key for e in seen] == ["/before", "/after"]
    finally:
        await store.close()
        server.stop()


async def test_granting_a_live_lease_id_again_renews_it_or_refuses_a_new_ttl(
    etcd_server: EtcdServer,
) -> None:
    store = etcd_store(etcd_server, f"/test-{uuid.uuid4().hex[:12]}")
    await store.open()
    try:
        chosen = f"{uuid.uuid4().int % 2**62 + 1:016x}"
        await store.grant_lease(5, lease_id=chosen)
        await store.put("/k", b"v", lease=chosen)
        again = await store.grant_lease(5, lease_id=chosen)
        assert (again.lease_id, again.ttl) == (chosen, 5.0)
        assert await store.get("/k") is not None, "the lease kept its keys"
        with pytest.raises(ValueError, match="cannot change"):
            await store.grant_lease(9, lease_id=chosen)
        with pytest.raises(ValueError, match="hex digits"):
            await store.grant_lease(5, lease_id="not-hex")
    finally:
        await store.close()
