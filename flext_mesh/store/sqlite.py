"""SQLite backend of the Store: embedded, zero set-up, durable on acknowledgement.

Threads: one writer thread owns the only write connection and applies queued writes
in *group commits* (everything queued goes into one SQLite transaction, each write in
its own savepoint, so one bad write does not undo the others); a caller's future is
resolved only after the COMMIT, with ``synchronous=FULL`` by default. Reads run on a
small pool of read-only connections (WAL lets them proceed while the writer writes).
Nothing blocks the event loop.

Leases: their TTLs are durable, their deadlines are not. Renewals touch memory only;
after a restart every lease gets one full TTL of grace, so a restart never evicts the
whole mesh. A sweeper task revokes expired leases in one batch per tick, so watchers
see one coalesced revision instead of a stampede.

Stalls: a lease renewed on time does not expire because this process stopped running
for a while (a long callback, CPU starvation). Deadlines are kept in *lease time*: the
monotonic clock minus the time the event loop lost to stalls, as the store's own
LoopLagMonitor measures it (a stall: consecutive 0.1 s ticks each more than 0.25 s
late; its length: their lateness added up), minus ``stall_grace`` (0.5 s) per stall.
Lease time never runs backwards: after a stall it stands still until the clock has
made up the grace. So a stall of S seconds pushes every deadline about S + 0.5 s later
(the ~0.1 s before the monitor's tick came due is not counted), as etcd's lessor
extends every lease by an election timeout when it takes over (``Promote``). The grace
is for the renewals gRPC queued during the stall: they are served after it, one read
at a time, so yielding to the loop once would not let them through. A stall counts as
soon as the loop runs again, before the monitor itself does, so the first renewal
served after it, or the sweeper if it runs first, already sees the pushed deadlines;
stalls that began while the sweeper waited on a write count the same. Lags under
0.25 s do not count: they hold a renewal up by no more than that. A lease nobody
renews still expires, later by what stalls took plus their grace. A store given its
own ``clock`` (a test's fake) does not do this: stalls happen in real time, not in
that clock's.

Faults: a write that SQLite refuses (disk full, I/O error) fails with StoreUnavailable
and changes nothing, neither on disk nor in memory (revision, lease deadlines,
listeners); once the disk has room again, writes succeed without a restart. A file
whose structure is damaged is refused at open (``PRAGMA quick_check``).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import math
import os
import queue
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from flext_mesh.errors import StoreUnavailable
from flext_mesh.logs import log_failure
from flext_mesh.loop import LoopLagMonitor
from flext_mesh.store.base import (
    CommitTimes,
    Compacted,
    Compare,
    Delete,
    Event,
    EventType,
    KeyValue,
    LeaseInfo,
    LeaseNotFound,
    Listener,
    Put,
    StoreOpenError,
    Subscription,
    Subscriptions,
    TxnResult,
)

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

_log = logging.getLogger("flext_mesh.store.sqlite")
_T = TypeVar("_T")

#: Each entry migrates the schema from version N-1 to N (the list index + 1).
#: Never edit a released entry: append a new one.
_MIGRATIONS: list[list[str]] = [
    [
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
        "INSERT INTO meta VALUES ('revision', 0), ('compact_revision', 0)",
        """CREATE TABLE kv (
            key TEXT PRIMARY KEY,
            value BLOB NOT NULL,
            create_revision INTEGER NOT NULL,
            mod_revision INTEGER NOT NULL,
            version INTEGER NOT NULL,
            lease TEXT
        ) WITHOUT ROWID""",
        "CREATE INDEX kv_lease ON kv(lease) WHERE lease IS NOT NULL",
        "CREATE TABLE leases (lease_id TEXT PRIMARY KEY, ttl_ms INTEGER NOT NULL) WITHOUT ROWID",
        """CREATE TABLE events (
            revision INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            type INTEGER NOT NULL,
            key TEXT NOT NULL,
            value BLOB NOT NULL,
            expired INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (revision, seq)
        ) WITHOUT ROWID""",
    ],
    # 2: events remember the value before the change (etcd's prev_kv), so a watcher
    # resuming from history can tell an update from a creation.
    ["ALTER TABLE events ADD COLUMN prev_value BLOB"],
]
SCHEMA_VERSION = len(_MIGRATIONS)

Synchronous = Literal["FULL", "NORMAL"]


@dataclass(slots=True)
class _WriteCtx:
    """What one write sees inside the writer thread."""

    conn: sqlite3.Connection
    revision: int
    events: list[Event]

    def next_revision(self) -> int:
        """The revision this write commits at (allocated on first change)."""
        if not self.events:
            self.revision += 1
        return self.revision


_Write = Callable[[_WriteCtx], Any]


class SqliteStore:
    """The embedded Store (see the module docstring)."""

    #: One SQLite transaction holds any number of operations.
    max_txn_ops: int | None = None

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "FULL",
        history_revisions: int = 100_000,
        sweep_interval: float = 0.25,
        read_threads: int = 2,
        clock: Callable[[], float] = time.monotonic,
        stall_grace: float = 0.5,
    ) -> None:
        """``clock`` (monotonic seconds) times lease deadlines; tests pass a fake one.
        ``stall_grace``: seconds every lease gets on top of what a stall of the event
        loop took (see the module docstring)."""
        self.path = Path(path)
        self._clock = clock
        self._stall_grace = stall_grace
        self._lag: LoopLagMonitor | None = None  # measures stalls; None with a fake clock
        self._lease_time = -math.inf  # the latest lease time handed out (it never falls)
        self.url = f"sqlite:///{self.path}"
        self._synchronous = synchronous
        self.commit_times = CommitTimes()
        self._history = history_revisions
        self._sweep_interval = sweep_interval
        self._read_threads = read_threads
        self._queue: queue.SimpleQueue[tuple[_Write, asyncio.Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._writer: threading.Thread | None = None
        self._readers: ThreadPoolExecutor | None = None
        self._local = threading.local()
        self._reader_conns: list[sqlite3.Connection] = []
        self._reader_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._subs = Subscriptions()
        self._listeners: dict[int, tuple[str, Listener]] = {}
        self._next_listener = 0
        self._deadlines: dict[str, tuple[float, float]] = {}  # lease -> (ttl s, lease time)
        self._sweeper: asyncio.Task[None] | None = None
        self._revision = 0
        self._compact_revision = 0
        self._writes_since_compact = 0
        self._lock_fd: int | None = None
        self._max_pages = 0  # SQLite's own cap of the file, read at open
        self._failed_writes = 0  # in a row; the writer thread's alone
        self._closed = True

    # -- lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        """Create or migrate the database, load leases, start the writer and sweeper."""
        self._loop = asyncio.get_running_loop()
        conn = await asyncio.to_thread(self._open_writer_connection)
        self._revision = _meta(conn, "revision")
        self._compact_revision = _meta(conn, "compact_revision")
        self._max_pages = int(conn.execute("PRAGMA max_page_count").fetchone()[0])
        # Lease time starts again from the clock: every lease is reloaded below.
        self._lag, self._lease_time = None, -math.inf
        now = self._lease_now()
        for lease_id, ttl_ms in conn.execute("SELECT lease_id, ttl_ms FROM leases"):
            # One full TTL of grace after a restart (see the module docstring).
            self._deadlines[lease_id] = (ttl_ms / 1000.0, now + ttl_ms / 1000.0)
        self._readers = ThreadPoolExecutor(self._read_threads, thread_name_prefix="store-read")
        self._writer = threading.Thread(
            target=self._writer_main, args=(conn,), name="store-writer", daemon=True
        )
        self._writer.start()
        self._closed = False
        if self._clock is time.monotonic:
            # Its stalls start at none, so lease time goes on from the clock. No
            # warnings: the process's own monitor logs stalls.
            self._lag = LoopLagMonitor(log_stalls=False)
            self._lag.start()
        self._sweeper = asyncio.create_task(self._sweep_forever(), name="store-lease-sweeper")
        _log.info(
            "store opened path=%s schema=%d revision=%d leases=%d",
            self.path,
            SCHEMA_VERSION,
            self._revision,
            len(self._deadlines),
        )

    async def close(self) -> None:
        """Stop the sweeper, drain the writer, close every connection."""
        if self._closed:
            return
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._lag is not None:
            await self._lag.aclose()
        # Readers first: the writer's connection, closed last, then checkpoints the WAL
        # into the file and removes it (a read-only connection cannot), so a cleanly
        # stopped store is one file.
        if self._readers is not None:
            await asyncio.to_thread(self._readers.shutdown, wait=True)
        with self._reader_lock:
            for conn in self._reader_conns:
                conn.close()
            self._reader_conns.clear()
        self._queue.put(None)
        if self._writer is not None:
            await asyncio.to_thread(self._writer.join)
        for sub in self._subs.all():
            sub.close()
        self._subs.clear()
        self._release_lock()

    def _open_writer_connection(self) -> sqlite3.Connection:
        parent = self.path.parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreOpenError(f"cannot create store directory {parent}: {exc.strerror}") from exc
        if self.path.exists() and not os.access(self.path, os.R_OK | os.W_OK):
            raise StoreOpenError(f"store file {self.path} is not readable and writable")
        if not os.access(parent, os.W_OK):
            raise StoreOpenError(f"store directory {parent} is not writable")
        self._take_lock()
        try:
            conn = self._connect()
        except BaseException:
            self._release_lock()
            raise
        return conn

    def _take_lock(self) -> None:
        """One process per store file: a second control plane on it would drive the same
        executions and sweep the same leases. An advisory lock on ``PATH.lock``, released
        by the kernel if the process dies (kill -9 included)."""
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreOpenError(
                f"cannot open store file {self.path}: its lock file {lock_path}: {exc.strerror}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise StoreOpenError(
                f"store file {self.path} is in use by another flext-mesh process (pid "
                f"{holder}); one control plane per SQLite store (use etcd for several)"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the flock
            self._lock_fd = None

    def _connect(self) -> sqlite3.Connection:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
            conn.execute("PRAGMA busy_timeout=5000")
        except sqlite3.Error as exc:
            raise StoreOpenError(f"cannot open store file {self.path}: {exc}") from exc
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self._synchronous}")
            problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check(5)")]
            if problems != ["ok"]:
                conn.close()
                first = " ".join(" ".join(problems).split())  # one line, whatever SQLite says
                raise StoreOpenError(
                    f"store file {self.path} is corrupted ({first[:300]}); restore it from "
                    "a backup or move it away to start empty"
                )
            _migrate(conn, self.path)
        except sqlite3.OperationalError as exc:
            conn.close()
            raise StoreOpenError(f"cannot open store file {self.path}: {exc}") from exc
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise StoreOpenError(
                f"store file {self.path} is not a usable SQLite database ({exc}); "
                "restore it from a backup or move it away to start empty"
            ) from exc
        return conn

    # -- the writer thread -------------------------------------------------------

    def _writer_main(self, conn: sqlite3.Connection) -> None:
        try:
            while True:
                item = self._queue.get()
                if item is None:
                    return
                batch = [item]
                stop = False
                while len(batch) < 512:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                started = time.perf_counter()
                self._commit_batch(conn, batch)
                self.commit_times.observe(time.perf_counter() - started)
                if stop:
                    return
        finally:
            conn.close()

    def _commit_batch(
        self, conn: sqlite3.Connection, batch: list[tuple[_Write, asyncio.Future[Any]]]
    ) -> None:
        outcomes: list[tuple[asyncio.Future[Any], bool, Any]] = []
        published: list[Event] = []
        start_revision = self._revision
        start_compact = self._compact_revision, self._writes_since_compact
        refused = False  # a write of the batch refused by SQLite (the rest went on)
        try:
            conn.execute("BEGIN IMMEDIATE")
            for write, fut in batch:
                ctx = _WriteCtx(conn, self._revision, [])
                conn.execute("SAVEPOINT w")
                try:
                    result = write(ctx)
                except sqlite3.Error as exc:
                    # SQLITE_FULL and I/O errors may roll back the whole transaction:
                    # then the batch fails as one (below); else only this write does.
                    if not conn.in_transaction:
                        raise
                    conn.execute("ROLLBACK TO w")
                    conn.execute("RELEASE w")
                    outcomes.append((fut, False, self._write_error(exc)))
                    refused = True
                    continue
                except Exception as exc:
                    conn.execute("ROLLBACK TO w")
                    conn.execute("RELEASE w")
                    outcomes.append((fut, False, exc))
                    continue
                if ctx.events:
                    _store_events(conn, ctx.events)
                    conn.execute("UPDATE meta SET value=? WHERE name='revision'", (ctx.revision,))
                    self._revision = ctx.revision
                    published.extend(ctx.events)
                conn.execute("RELEASE w")
                outcomes.append((fut, True, result))
            self._writes_since_compact += len(batch)
            if self._writes_since_compact >= min(1000, max(1, self._history // 2)):
                self._compact(conn)
            conn.execute("COMMIT")
            if self._failed_writes and not refused:
                _log.info("store writes succeed again after %d failed", self._failed_writes)
                self._failed_writes = 0
        except sqlite3.Error as exc:
            with contextlib.suppress(sqlite3.Error):
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            # Nothing of the batch happened: memory goes back to what the disk holds.
            self._revision = start_revision
            self._compact_revision, self._writes_since_compact = start_compact
            error = self._write_error(exc)
            outcomes = [(fut, False, error) for _, fut in batch]
            published = []
        loop = self._loop
        assert loop is not None
        loop.call_soon_threadsafe(self._resolve, outcomes, published)

    def _write_error(self, exc: sqlite3.Error) -> StoreUnavailable:
        """The error a caller sees for a write SQLite refused. Logged at ERROR once per
        run of failures (a full disk fails every write, the lease sweeps included)."""
        name = getattr(exc, "sqlite_errorname", "") or type(exc).__name__
        level = logging.DEBUG if self._failed_writes else logging.ERROR
        self._failed_writes += 1
        _log.log(level, "store write failed path=%s: %s (%s)", self.path, exc, name)
        if name == "SQLITE_FULL":
            return StoreUnavailable(
                "store write failed: the control plane's disk is full (SQLITE_FULL); "
                "nothing was changed, retry once space is freed"
            )
        return StoreUnavailable(f"store write failed: {exc} ({name}); nothing was changed")

    def _compact(self, conn: sqlite3.Connection) -> None:
        self._writes_since_compact = 0
        floor = self._revision - self._history
        if floor <= self._compact_revision:
            return
        conn.execute("DELETE FROM events WHERE revision <= ?", (floor,))
        conn.execute("UPDATE meta SET value=? WHERE name='compact_revision'", (floor,))
        self._compact_revision = floor

    def _resolve(
        self, outcomes: list[tuple[asyncio.Future[Any], bool, Any]], events: list[Event]
    ) -> None:
        # On the event loop: publish first, so a caller that saw its write acknowledged
        # and then subscribes cannot miss it (it reads events_since from its revision).
        if events:
            for prefix, callback in list(self._listeners.values()):
                mine = events if not prefix else [e for e in events if e.key.startswith(prefix)]
                if mine:
                    try:
                        callback(mine)
                    except Exception as exc:
                        log_failure(_log, f"store listener failed prefix={prefix}", exc)
            self._subs.deliver(events)
        for fut, ok, value in outcomes:
            if fut.done():  # its caller was cancelled; the write happened all the same
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    async def _write(self, write: Callable[[_WriteCtx], _T]) -> _T:
        if self._closed:
            raise StoreUnavailable("store is closed")
        # An asyncio future: only the loop touches it (the writer thread hands it back
        # through _resolve), so acknowledging costs no second thread-safe wake-up.
        fut: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        self._queue.put((write, fut))
        return await fut

    async def limit_size(self, max_bytes: int | None) -> int:
        """Cap the database file at ``max_bytes`` (None lifts the cap); returns the cap in
        force, in bytes, never below the current size.

        Writes that need more room then fail exactly as on a full disk (SQLITE_FULL): a
        quota for operators, and how tests fill the disk for real. Not persistent.
        """

        def write(ctx: _WriteCtx) -> int:
            page_size = int(ctx.conn.execute("PRAGMA page_size").fetchone()[0])
            pages = self._max_pages if max_bytes is None else max(1, max_bytes // page_size)
            row = ctx.conn.execute(f"PRAGMA max_page_count={int(pages)}").fetchone()
            return int(row[0]) * page_size

        return await self._write(write)

    # -- reads -------------------------------------------------------------------

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                f"file:{self.path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA busy_timeout=5000")
            self._local.conn = conn
            with self._reader_lock:
                self._reader_conns.append(conn)
        return conn

    async def _read(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed or self._readers is None:
            raise StoreUnavailable("store is closed")
        loop = asyncio.get_running_loop()

        def run() -> _T:
            try:
                return fn(self._reader())
            except sqlite3.Error as exc:
                raise StoreUnavailable(f"store read failed: {exc}") from exc

        return await loop.run_in_executor(self._readers, run)

    async def get(self, key: str) -> KeyValue | None:
        """The key, or None."""

        def read(conn: sqlite3.Connection) -> KeyValue | None:
            row = conn.execute(f"SELECT {_KV_COLUMNS} FROM kv WHERE key=?", (key,)).fetchone()
            return _kv(row) if row else None

        return await self._read(read)

    async def range(
        self, prefix: str, *, start_after: str = "", limit: int = 0, reverse: bool = False
    ) -> list[KeyValue]:
        """Keys under ``prefix`` in key order (descending when ``reverse``), strictly past
        ``start_after`` in that order, at most ``limit``."""
        sql = f"SELECT {_KV_COLUMNS} FROM kv WHERE key >= ? AND key < ?"
        args: list[Any] = [prefix, _prefix_end(prefix)]
        if start_after:
            sql += " AND key < ?" if reverse else " AND key > ?"
            args.append(start_after)
        sql += " ORDER BY key DESC" if reverse else " ORDER BY key"
        if limit > 0:
            sql += " LIMIT ?"
            args.append(limit)

        def read(conn: sqlite3.Connection) -> list[KeyValue]:
            return [_kv(row) for row in conn.execute(sql, args)]

        return await self._read(read)

    async def snapshot(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` with the revision they were read at, in one read txn."""

        def read(conn: sqlite3.Connection) -> tuple[int, list[KeyValue]]:
            conn.execute("BEGIN")
            try:
                revision = _meta(conn, "revision")
                rows = conn.execute(
                    f"SELECT {_KV_COLUMNS} FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                    (prefix, _prefix_end(prefix)),
                ).fetchall()
            finally:
                conn.execute("COMMIT")
            return revision, [_kv(row) for row in rows]

        return await self._read(read)

    async def current_revision(self) -> int:
        """The revision of the last acknowledged write."""
        return self._revision

    async def events_since(self, revision: int, prefix: str = "") -> list[Event]:
        """Events after ``revision`` under ``prefix``; Compacted when history is gone."""

        def read(conn: sqlite3.Connection) -> list[Event]:
            compact = _meta(conn, "compact_revision")
            if revision < compact:
                raise Compacted(revision, compact)
            rows = conn.execute(
                "SELECT revision, type, key, value, expired, prev_value FROM events "
                "WHERE revision > ? AND key >= ? AND key < ? ORDER BY revision, seq",
                (revision, prefix, _prefix_end(prefix)),
            )
            return [Event(r, EventType(t), k, v, bool(x), p) for r, t, k, v, x, p in rows]

        return await self._read(read)

    def subscribe(self, prefix: str = "") -> Subscription:
        """Live events under ``prefix`` from now on."""
        sub = Subscription(prefix)
        self._subs.add(sub)
        return sub

    def listen(self, prefix: str, callback: Listener) -> Callable[[], None]:
        """Call ``callback(events)`` on the loop for each batch under ``prefix``.

        Listeners run before the writer's call returns, so a cache fed by a listener
        already holds a write when its caller resumes (read-your-writes).
        """
        token = self._next_listener
        self._next_listener += 1
        self._listeners[token] = (prefix, callback)

        def stop() -> None:
            self._listeners.pop(token, None)

        return stop

    # -- writes ------------------------------------------------------------------

    async def put(self, key: str, value: bytes, *, lease: str | None = None) -> int:
        """Set a key; returns the revision of the write."""
        return (await self.txn((), (Put(key, value, lease),))).revision

    async def delete(self, key: str) -> int | None:
        """Delete a key; the revision, or None when it did not exist."""
        result = await self.txn((), (Delete(key),))
        return result.revision if result.events else None

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Put | Delete],
        failure: Sequence[Put | Delete] = (),
    ) -> TxnResult:
        """Apply ``success`` if every compare holds, else ``failure``, atomically."""
        for op in (*success, *failure):
            if isinstance(op, Put) and op.lease is not None and op.lease not in self._deadlines:
                raise LeaseNotFound(f"lease {op.lease} not found")

        def write(ctx: _WriteCtx) -> TxnResult:
            ok = all(_mod_revision(ctx.conn, c.key) == c.mod_revision for c in compares)
            for op in success if ok else failure:
                _apply(ctx, op)
            return TxnResult(ok, ctx.revision, tuple(ctx.events))

        return await self._write(write)

    # -- leases ------------------------------------------------------------------

    async def grant_lease(self, ttl: float, *, lease_id: str | None = None) -> LeaseInfo:
        """Create or replace a lease of ``ttl`` seconds (durably)."""
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        lease = lease_id or uuid.uuid4().hex
        ttl_ms = round(ttl * 1000)

        def write(ctx: _WriteCtx) -> None:
            ctx.conn.execute("INSERT OR REPLACE INTO leases VALUES (?, ?)", (lease, ttl_ms))

        await self._write(write)
        self._deadlines[lease] = (ttl, self._lease_now() + ttl)
        return LeaseInfo(lease, ttl, time.time() + ttl)

    async def put_with_lease(
        self, key: str, value: Callable[[LeaseInfo], bytes], ttl: float
    ) -> tuple[LeaseInfo, TxnResult]:
        """Grant a lease and put ``key`` under it in one transaction (one commit)."""
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        lease = uuid.uuid4().hex
        ttl_ms = round(ttl * 1000)
        info = LeaseInfo(lease, ttl, time.time() + ttl)
        data = value(info)

        def write(ctx: _WriteCtx) -> TxnResult:
            ctx.conn.execute("INSERT OR REPLACE INTO leases VALUES (?, ?)", (lease, ttl_ms))
            _apply(ctx, Put(key, data, lease))
            return TxnResult(True, ctx.revision, tuple(ctx.events))

        # Known before the write: a caller cancelled while it commits still leaves a
        # lease the sweeper times out (revoking one that never committed is harmless).
        self._deadlines[lease] = (ttl, self._lease_now() + ttl)
        try:
            result = await self._write(write)
        except Exception:
            self._deadlines.pop(lease, None)
            raise
        return info, result

    async def keep_alive(self, lease_id: str) -> LeaseInfo:
        """Renew a lease in memory (no disk write); LeaseNotFound when gone."""
        return self.keep_alive_now(lease_id)

    def keep_alive_now(self, lease_id: str) -> LeaseInfo:
        """Synchronous renewal for hot paths on the event loop (it touches only memory)."""
        entry = self._deadlines.get(lease_id)
        now = self._lease_now()
        if entry is None or entry[1] <= now:
            raise LeaseNotFound(f"lease {lease_id} not found or expired")
        ttl = entry[0]
        self._deadlines[lease_id] = (ttl, now + ttl)
        return LeaseInfo(lease_id, ttl, time.time() + ttl)

    async def revoke_lease(self, lease_id: str) -> int:
        """Delete a lease and its keys; LeaseNotFound if unknown."""
        if lease_id not in self._deadlines:
            raise LeaseNotFound(f"lease {lease_id} not found or expired")
        revision = await self._write(lambda ctx: _revoke(ctx, [lease_id], expired=False))
        self._deadlines.pop(lease_id, None)
        return revision

    async def leases(self) -> list[LeaseInfo]:
        """Every live lease with its current expiry."""
        now_m, now_w = self._lease_now(), time.time()
        return [
            LeaseInfo(lease, ttl, now_w + (deadline - now_m))
            for lease, (ttl, deadline) in self._deadlines.items()
            if deadline > now_m
        ]

    def _lease_now(self) -> float:
        """Now in lease time: the clock minus what stalls of the loop took and their
        grace, never below a value already handed out (see the module docstring)."""
        now = self._clock()
        if self._lag is not None:
            stalled, stalls = self._lag.stall_totals()
            now -= stalled + stalls * self._stall_grace
        self._lease_time = max(self._lease_time, now)
        return self._lease_time

    async def _sweep_forever(self) -> None:
        failing = 0
        while True:
            await asyncio.sleep(self._sweep_interval)
            try:
                await self.expire_due()
            except StoreUnavailable as exc:
                # Once per outage (a full disk would repeat it every tick); due leases
                # stay due and are swept when writes succeed again.
                if not failing:
                    _log.warning("lease sweep failed, retrying every tick: %s", exc)
                failing += 1
                continue
            if failing:
                _log.info("lease sweep works again after %d failed ticks", failing)
                failing = 0

    async def expire_due(self) -> int:
        """Revoke every lease past its deadline (in lease time) in one write; returns
        how many."""
        now = self._lease_now()
        due = [lease for lease, (_, deadline) in self._deadlines.items() if deadline <= now]
        if not due:
            return 0
        await self._write(lambda ctx: _revoke(ctx, due, expired=True))
        now = self._lease_now()
        for lease in due:
            entry = self._deadlines.get(lease)
            if entry is not None and entry[1] <= now:
                del self._deadlines[lease]
        _log.info("leases expired count=%d", len(due))
        return len(due)


# -- helpers run in the writer or reader threads ---------------------------------

_KV_COLUMNS = "key, value, create_revision, mod_revision, version, lease"


def _kv(row: tuple[Any, ...]) -> KeyValue:
    return KeyValue(row[0], row[1], row[2], row[3], row[4], row[5])


def _prefix_end(prefix: str) -> str:
    # Every key starting with prefix sorts below prefix + U+10FFFF.
    return prefix + "\U0010ffff"


def _meta(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
    return int(row[0]) if row else 0


def _mod_revision(conn: sqlite3.Connection, key: str) -> int:
    row = conn.execute("SELECT mod_revision FROM kv WHERE key=?", (key,)).fetchone()
    return int(row[0]) if row else 0


def _apply(ctx: _WriteCtx, op: Put | Delete) -> None:
    conn = ctx.conn
    if isinstance(op, Put):
        if (
            op.lease is not None
            and not conn.execute("SELECT 1 FROM leases WHERE lease_id=?", (op.lease,)).fetchone()
        ):
            raise LeaseNotFound(f"lease {op.lease} not found or expired")
        row = conn.execute(
            "SELECT create_revision, version, value FROM kv WHERE key=?", (op.key,)
        ).fetchone()
        rev = ctx.next_revision()
        create, version, prev = (row[0], row[1] + 1, row[2]) if row else (rev, 1, None)
        conn.execute(
            "INSERT OR REPLACE INTO kv VALUES (?, ?, ?, ?, ?, ?)",
            (op.key, op.value, create, rev, version, op.lease),
        )
        ctx.events.append(Event(rev, EventType.PUT, op.key, op.value, prev_value=prev))
        return
    if op.prefix:
        rows = conn.execute(
            "SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key",
            (op.key, _prefix_end(op.key)),
        ).fetchall()
    else:
        rows = conn.execute("SELECT key, value FROM kv WHERE key=?", (op.key,)).fetchall()
    for key, value in rows:
        rev = ctx.next_revision()
        conn.execute("DELETE FROM kv WHERE key=?", (key,))
        ctx.events.append(Event(rev, EventType.DELETE, key, value, prev_value=value))


def _revoke(ctx: _WriteCtx, lease_ids: list[str], *, expired: bool) -> int:
    conn = ctx.conn
    for lease in lease_ids:
        conn.execute("DELETE FROM leases WHERE lease_id=?", (lease,))
        rows = conn.execute(
            "SELECT key, value FROM kv WHERE lease=? ORDER BY key", (lease,)
        ).fetchall()
        for key, value in rows:
            rev = ctx.next_revision()
            conn.execute("DELETE FROM kv WHERE key=?", (key,))
            ctx.events.append(Event(rev, EventType.DELETE, key, value, expired, value))
    return ctx.revision


def _store_events(conn: sqlite3.Connection, events: list[Event]) -> None:
    conn.executemany(
        "INSERT INTO events (revision, seq, type, key, value, expired, prev_value) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        [
            (e.revision, seq, int(e.type), e.key, e.value, int(e.expired), e.prev_value)
            for seq, e in enumerate(events)
        ],
    )


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    current = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if current > SCHEMA_VERSION:
        raise StoreOpenError(
            f"store file {path} has schema version {current}, newer than this flext-mesh "
            f"understands ({SCHEMA_VERSION}); upgrade flext-mesh"
        )
    for version in range(current + 1, SCHEMA_VERSION + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in _MIGRATIONS[version - 1]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={version}")
            conn.execute("COMMIT")
        except sqlite3.Error:
            conn.execute("ROLLBACK")
            raise
        _log.info("store schema migrated path=%s version=%d", path, version)
