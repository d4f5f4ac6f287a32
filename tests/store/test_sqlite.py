"""What only the SQLite Store does: its own compaction, coalesced lease sweeps, restart
grace, durability across kill -9, the schema and start-up errors. The contract both
backends share is in test_store.py."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flext_mesh.store import Compacted, EventType, LeaseNotFound, StoreOpenError
from flext_mesh.store.sqlite import _MIGRATIONS, SCHEMA_VERSION, SqliteStore


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    s = SqliteStore(tmp_path / "state.db", sweep_interval=0.05)
    await s.open()
    try:
        yield s
    finally:
        await s.close()


async def test_history_resumes_from_a_revision_and_reports_compaction(tmp_path: Path) -> None:
    s = SqliteStore(tmp_path / "h.db", history_revisions=5)
    await s.open()
    try:
        start = await s.current_revision()
        for i in range(10):
            await s.put(f"/k/{i}", str(i).encode())
        events = await s.events_since(start + 7, "/k/")
        assert [e.key for e in events] == ["/k/7", "/k/8", "/k/9"]
        # Compaction runs every 1000 writes: force one round.
        for i in range(1000):
            await s.put("/churn", str(i).encode())
        with pytest.raises(Compacted):
            await s.events_since(start, "/k/")
    finally:
        await s.close()


async def test_leases_renew_in_memory_and_expire_in_one_coalesced_revision(
    store: SqliteStore,
) -> None:
    lease_a = await store.grant_lease(0.3)
    lease_b = await store.grant_lease(0.3)
    keep = await store.grant_lease(0.3)
    await store.put("/inst/a", b"a", lease=lease_a.lease_id)
    await store.put("/inst/b", b"b", lease=lease_b.lease_id)
    await store.put("/inst/keep", b"k", lease=keep.lease_id)
    sub = store.subscribe("/inst/")
    # Grants were a commit apart; renew both now so they fall due in the same sweep.
    store.keep_alive_now(lease_a.lease_id)
    store.keep_alive_now(lease_b.lease_id)
    deadline = time.monotonic() + 0.9
    while time.monotonic() < deadline:
        await store.keep_alive(keep.lease_id)
        await asyncio.sleep(0.05)
    assert [k.key for k in await store.range("/inst/")] == ["/inst/keep"]
    async with asyncio.timeout(2):
        batch = await anext(aiter(sub))
    assert {e.key for e in batch} == {"/inst/a", "/inst/b"}
    assert all(e.type is EventType.DELETE and e.expired for e in batch)
    assert len({e.revision for e in batch}) == 1, "expiries of one sweep share one revision"
    with pytest.raises(LeaseNotFound):
        await store.keep_alive(lease_a.lease_id)
    with pytest.raises(LeaseNotFound):
        await store.put("/inst/late", b"x", lease=lease_a.lease_id)


async def test_restart_keeps_keys_revision_and_gives_leases_one_ttl_of_grace(
    tmp_path: Path,
) -> None:
    path = tmp_path / "restart.db"
    s = SqliteStore(path, sweep_interval=0.05)
    await s.open()
    lease = await s.grant_lease(1.5)
    rev = await s.put("/inst/a", b"a", lease=lease.lease_id)
    await s.close()
    await asyncio.sleep(1.6)  # longer than the TTL while the store was down

    s2 = SqliteStore(path, sweep_interval=0.05)
    await s2.open()
    try:
        assert await s2.current_revision() == rev
        assert await s2.get("/inst/a") is not None, "a restart must not evict at once"
        await s2.keep_alive(lease.lease_id)
        await asyncio.sleep(2.5)
        assert await s2.get("/inst/a") is None, "an unrenewed lease expires after the grace"
    finally:
        await s2.close()


_CRASH_WRITER = textwrap.dedent(
    """
    import asyncio, sys
    from flext_mesh.store.sqlite import SqliteStore

    async def main() -> None:
        store = SqliteStore(sys.argv[1])
        await store.open()
        lease = await store.grant_lease(3600)
        print("lease", lease.lease_id, flush=True)
        i = 0
        while True:
            await store.put(f"/k/{i:06d}", b"v", lease=lease.lease_id if i % 2 else None)
            print("acked", i, flush=True)
            i += 1

    asyncio.run(main())
    """
)


async def test_kill_9_loses_no_acknowledged_write(tmp_path: Path) -> None:
    path = tmp_path / "crash.db"
    # A blocking subprocess on purpose: the writer must be a separate process to crash.
    proc = subprocess.Popen(  # noqa: ASYNC220
        [sys.executable, "-c", _CRASH_WRITER, str(path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    acked = -1
    lease_id = ""
    for line in proc.stdout:
        word, value = line.split()
        if word == "lease":
            lease_id = value
        else:
            acked = int(value)
        if acked >= 300:
            break
    proc.kill()  # SIGKILL: no shutdown code runs
    proc.wait(10)
    # The writer may have acknowledged more after our last read; it can't have fewer.
    store = SqliteStore(path)
    await store.open()
    try:
        keys = {kv.key for kv in await store.range("/k/")}
        missing = [i for i in range(acked + 1) if f"/k/{i:06d}" not in keys]
        assert missing == []
        assert lease_id in {lease.lease_id for lease in await store.leases()}
        assert await store.current_revision() >= acked + 1
    finally:
        await store.close()


async def test_schema_is_versioned_and_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    s = SqliteStore(path)
    await s.open()
    await s.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreOpenError, match="newer than this flext-mesh"):
        await SqliteStore(path).open()


async def test_corrupted_file_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "bad.db"
    path.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(StoreOpenError, match="not a usable SQLite database"):
        await SqliteStore(path).open()


async def test_unwritable_location_is_refused(tmp_path: Path) -> None:
    # /sys is read-only even for root, so this holds in CI (which runs as root).
    with pytest.raises(StoreOpenError, match=r"/sys"):
        await SqliteStore(Path("/sys/flext-mesh-test.db")).open()


async def test_path_under_a_file_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(StoreOpenError, match="cannot create store directory"):
        await SqliteStore(blocker / "sub" / "x.db").open()


async def test_a_version_1_file_is_migrated_and_keeps_its_data(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    for statement in _MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("INSERT INTO kv VALUES ('/old', x'6f6c64', 1, 1, 1, NULL)")
    conn.execute("INSERT INTO events VALUES (1, 0, 0, '/old', x'6f6c64', 0)")
    conn.execute("UPDATE meta SET value=1 WHERE name='revision'")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()

    s = SqliteStore(path)
    await s.open()
    try:
        old = await s.get("/old")
        assert old is not None
        assert old.value == b"old"
        assert await s.current_revision() == 1
        rev = await s.put("/old", b"new")
        assert rev == 2
        history = await s.events_since(0)
        assert [(e.revision, e.prev_value) for e in history] == [(1, None), (2, b"old")]
    finally:
        await s.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    conn.close()


async def test_a_stall_of_the_loop_expires_no_lease_renewed_on_time(tmp_path: Path) -> None:
    # Leases of 1 s renewed right before the loop stalls for 2.5 s: their deadlines pass
    # during the stall, the renewals come after it. "first" is renewed before anything
    # else runs, "later" after the sweeper has had its turns; "lapsed" never again.
    grace = 0.25
    s = SqliteStore(tmp_path / "stall.db", sweep_interval=0.05, stall_grace=grace)
    await s.open()
    try:
        leases = {name: (await s.grant_lease(1)).lease_id for name in ("first", "later", "lapsed")}
        for name, lease_id in leases.items():
            await s.put(f"/inst/{name}", b"x", lease=lease_id)
        sub = s.subscribe("/inst/")
        await asyncio.sleep(0.12)  # the sweeper and the stall monitor are running
        for lease_id in leases.values():
            s.keep_alive_now(lease_id)

        _stall_the_loop(2.5)
        stall_ended = time.monotonic()
        s.keep_alive_now(leases["first"])  # LeaseNotFound here was the bug
        await asyncio.sleep(0.15)  # three sweeps
        await s.keep_alive(leases["later"])

        while await s.get("/inst/lapsed") is not None:
            assert time.monotonic() - stall_ended < 1 + grace + 0.75, "lapsed never expired"
            await s.keep_alive(leases["first"])
            await s.keep_alive(leases["later"])
            await asyncio.sleep(0.05)
        expired_after = time.monotonic() - stall_ended
        # Its deadline went by during the stall; the stall did not count.
        assert expired_after > 0.5
        assert [k.key for k in await s.range("/inst/")] == ["/inst/first", "/inst/later"]
        async with asyncio.timeout(2):
            batch = await anext(aiter(sub))
        assert [(e.key, e.expired) for e in batch] == [("/inst/lapsed", True)]
        assert {lease.lease_id for lease in await s.leases()} == {
            leases["first"],
            leases["later"],
        }
    finally:
        await s.close()


def _stall_the_loop(seconds: float) -> None:
    """Hold the event loop, as a blocking call in a handler would: nothing else runs."""
    time.sleep(seconds)
