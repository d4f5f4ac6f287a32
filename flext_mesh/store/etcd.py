"""etcd backend of the Store: several control-plane replicas share one etcd cluster.

The Store model is etcd's, so most of it maps one to one: revisions are etcd's
(store-wide, the same on every replica), a Store transaction is one etcd Txn, leases
are etcd leases (ids as 16 hex digits, like ``etcdctl`` prints them) and history is
etcd's MVCC history, read with a watch from a start revision. Keys live under a
prefix (``/flext-mesh`` by default), so one etcd can hold other data; Store keys must
start with ``/``.

What etcd does not give directly, and how this module bridges it:

- *Read-your-writes for listeners.* SQLite calls listeners before a write returns
  (the registry's cache relies on it). Here one watch on the whole prefix feeds
  listeners and subscriptions, and a write to a key some listener covers returns
  only once that watch has delivered its revision (bounded by ``sync_timeout``;
  skipped while the watch is down, so an etcd outage never stalls writers on top of
  failing them). Subscribers read a queue, so writes do not wait for them.
- *Expiry versus deletion.* etcd reports a key deleted by an expired lease exactly
  like an explicit delete. Every delete made through this store (``delete``, a Txn
  with deletes, ``revoke_lease``) also writes the reserved key ``/.store/sync`` in
  the same transaction; a DELETE in a revision without that write is an expiry.
  The same key serves as a barrier (``_sync``): writing it and waiting for the watch
  to see it proves every earlier revision was delivered, which is how ``snapshot``
  and ``events_since`` line up with live events without relying on watch progress
  notifications (out of order in etcd 3.4).
- *Several endpoints.* One endpoint is used at a time; UNAVAILABLE moves to the next.
  Reads and lease renewals are retried there; writes only when etcd cannot have
  applied them (the connection failed, or there was no leader), otherwise the caller
  gets StoreUnavailable and decides.

Differences from SQLite that callers may notice: lease TTLs are whole seconds
(rounded up, and at least etcd's minimum, 1.5 x its election timeout); revisions
have gaps (barrier writes, other users of the cluster); an expiry is noticed within
about 0.5 s of its deadline; a transaction is limited to etcd's ``--max-txn-ops``
(128 by default) operations; history is kept until etcd compacts it (configure
``--auto-compaction-*`` on etcd). A lease cannot change its TTL while it lives, so
``grant_lease`` with the id of a live lease renews it only when the TTL is the same.
Stalls of this process count against leases: etcd times them on its own clock, so a
renewal held up while this process's event loop is stalled reaches etcd late, and a
stall longer than what is left of a lease's TTL lets etcd expire it (the SQLite store
stops lease time during stalls; etcd extends leases only when its leader changes).
The control plane's ``flext_mesh_event_loop_lag_seconds`` shows such stalls.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import grpc
from aetcd import rpc  # type: ignore[import-untyped]

from flext_mesh.errors import StoreUnavailable
from flext_mesh.logs import log_failure
from flext_mesh.retry import Backoff, RetrySpec
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

__all__ = ["SYNC_KEY", "EtcdStore", "format_lease", "parse_endpoints", "parse_lease"]

_log = logging.getLogger("flext_mesh.store.etcd")
#: KV methods that write (timed into ``commit_times``).
_WRITES = frozenset({"Put", "DeleteRange", "Txn"})

#: Reserved Store key: written with every delete and as a barrier (module docstring).
SYNC_KEY = "/.store/sync"

_PUT = 0  # mvccpb.Event.EventType
_DELETE = 1
_MAX_LEASE_ID = 2**63 - 1
_CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    # Reconnect within seconds once etcd is back, not after gRPC's default 2 min cap.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 2_000),
)
#: Waits between attempts to open the namespace watch again: 50 ms doubling up to 2 s.
_WATCH_RETRY = RetrySpec(initial_backoff=0.05, max_backoff=2.0)


def parse_endpoints(text: str) -> list[tuple[str, int]]:
    """``host:port[,host:port...]`` (the part of an ``etcd://`` URL after the scheme)."""
    endpoints: list[tuple[str, int]] = []
    for raw in text.split(","):
        item = raw.strip()
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise StoreOpenError(
                f"etcd endpoint {item!r} is not host:port (in etcd://{text}); "
                "use etcd://host:port[,host:port...]"
            )
        endpoints.append((host.strip("[]"), int(port)))
    return endpoints


def format_lease(lease_id: int) -> str:
    """The Store's string id of an etcd lease (16 hex digits, as etcdctl prints it)."""
    return f"{lease_id:016x}"


def parse_lease(lease_id: str) -> int:
    """The etcd id of a Store lease id; LeaseNotFound when it cannot be one."""
    try:
        value = int(lease_id, 16) if 0 < len(lease_id) <= 16 else 0
    except ValueError:
        value = 0
    if not 0 < value <= _MAX_LEASE_ID:
        raise LeaseNotFound(f"lease {lease_id} not found (not an etcd lease id)")
    return value


def _prefix_end(prefix: bytes) -> bytes:
    """The first key after every key starting with ``prefix`` (etcd's range_end)."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\0"  # every key


def _not_applied(exc: grpc.aio.AioRpcError) -> bool:
    """True when a failed write certainly did not reach etcd's log (safe to resend)."""
    details = (exc.details() or "").lower()
    return exc.code() == grpc.StatusCode.UNAVAILABLE and (
        "failed to connect" in details or "connection refused" in details or "no leader" in details
    )


class _WatchCompacted(Exception):
    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"etcd compacted history up to {compact_revision}")
        self.compact_revision = compact_revision


class EtcdStore:
    """The distributed Store (see the module docstring)."""

    #: Most operations a caller should put in one transaction: etcd's default
    #: ``--max-txn-ops`` (128) less the reserved key a delete adds. Callers that may
    #: write more (the metrics checkpoint) split their writes to fit.
    max_txn_ops: int | None = 126

    def __init__(
        self,
        endpoints: Sequence[tuple[str, int]],
        prefix: str = "/flext-mesh",
        *,
        timeout: float = 5.0,
        sync_timeout: float = 5.0,
    ) -> None:
        if not endpoints:
            raise StoreOpenError("the etcd store needs at least one host:port endpoint")
        self.endpoints = [(host, int(port)) for host, port in endpoints]
        self.url = "etcd://" + ",".join(f"{host}:{port}" for host, port in self.endpoints)
        self.commit_times = CommitTimes()
        self._root = prefix.rstrip("/")
        self._ns = (self._root + "/").encode()
        self._ns_end = _prefix_end(self._ns)
        self._sync_key = self._key(SYNC_KEY)
        self._timeout = timeout
        self._sync_timeout = sync_timeout
        self._channels: list[grpc.aio.Channel | None] = [None] * len(self.endpoints)
        self._stubs: list[tuple[Any, Any, Any] | None] = [None] * len(self.endpoints)
        self._active = 0
        self._closed = True
        # The namespace watch: what it delivered, who waits for a revision.
        self._watch_task: asyncio.Task[None] | None = None
        self._watch_call: Any = None
        self._watch_up = False
        self._dispatched = 0
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._waiter_seq = itertools.count()
        self._subs = Subscriptions()
        self._listeners: dict[int, tuple[str, Listener]] = {}
        self._next_listener = 0
        # One lease keep-alive stream, answers matched to callers per lease id in order.
        self._ka_call: Any = None
        self._ka_reader: asyncio.Task[None] | None = None
        self._ka_pending: dict[int, deque[asyncio.Future[int]]] = {}
        self._ka_lock = asyncio.Lock()

    # -- lifecycle ---------------------------------------------------------------

    async def open(self) -> None:
        """Reach an endpoint, then start the namespace watch; StoreOpenError if none answers."""
        self._closed = False
        errors: list[str] = []
        revision = None
        for index, (host, port) in enumerate(self.endpoints):
            try:
                reply = await self._channel_stubs(index)[0].Range(
                    rpc.RangeRequest(key=self._sync_key, count_only=True), timeout=self._timeout
                )
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{host}:{port}: {exc.code().name} {exc.details()}")
                continue
            self._active = index
            revision = int(reply.header.revision)
            break
        if revision is None:
            await self._close_channels()
            self._closed = True
            raise StoreOpenError(
                f"cannot reach etcd at {', '.join(f'{h}:{p}' for h, p in self.endpoints)} "
                f"({'; '.join(errors)})"
            )
        self._dispatched = revision
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._watch_task = asyncio.create_task(self._watch_forever(started), name="etcd-watch")
        try:
            async with asyncio.timeout(self._timeout):
                await asyncio.shield(started)
        except TimeoutError:
            await self.close()
            raise StoreOpenError(f"etcd at {self.url} did not start a watch in time") from None
        _log.info("store opened url=%s prefix=%s revision=%d", self.url, self._root, revision)

    async def close(self) -> None:
        """Stop the watch and keep-alive streams, end subscriptions, close channels."""
        if self._closed:
            return
        self._closed = True
        for task in (self._watch_task, self._ka_reader):
            if task is not None:
                task.cancel()
        for call in (self._watch_call, self._ka_call):
            if call is not None:
                call.cancel()
        await asyncio.gather(
            *(t for t in (self._watch_task, self._ka_reader) if t is not None),
            return_exceptions=True,
        )
        self._watch_task = self._ka_reader = None
        self._fail_keepalives(StoreUnavailable("store is closed"))
        self._release_waiters(everyone=True)
        for sub in self._subs.all():
            sub.close()
        self._subs.clear()
        await self._close_channels()

    async def _close_channels(self) -> None:
        channels = [c for c in self._channels if c is not None]
        self._channels = [None] * len(self.endpoints)
        self._stubs = [None] * len(self.endpoints)
        for channel in channels:
            await channel.close()

    # -- endpoints and calls -------------------------------------------------------

    def _channel_stubs(self, index: int) -> tuple[Any, Any, Any]:
        """The KV, Lease and Watch stubs of endpoint ``index`` (channel made on first use)."""
        stubs = self._stubs[index]
        if stubs is None:
            host, port = self.endpoints[index]
            target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            channel = grpc.aio.insecure_channel(target, options=_CHANNEL_OPTIONS)
            self._channels[index] = channel
            stubs = rpc.KVStub(channel), rpc.LeaseStub(channel), rpc.WatchStub(channel)
            self._stubs[index] = stubs
        return stubs

    def _failed_over(self, index: int, exc: BaseException) -> None:
        """Move to the next endpoint after ``index`` failed (once per failure)."""
        if len(self.endpoints) > 1 and self._active == index:
            self._active = (index + 1) % len(self.endpoints)
            host, port = self.endpoints[self._active]
            _log.warning(
                "etcd endpoint failed, using %s:%d next: %s",
                host,
                port,
                exc,
                extra={"cause": f"etcd endpoint {index} failed"},
            )

    async def _call(self, service: int, method: str, request: Any, *, retry: bool) -> Any:
        """One unary etcd call; UNAVAILABLE moves on to the next endpoint.

        ``retry``: the call may be sent again (a read, a renewal); otherwise it is
        resent only when it certainly was not applied.
        """
        if self._closed:
            raise StoreUnavailable("store is closed")
        last: grpc.aio.AioRpcError | None = None
        for _ in range(len(self.endpoints)):
            index = self._active
            stub = self._channel_stubs(index)[service]
            try:
                return await getattr(stub, method)(request, timeout=self._timeout)
            except grpc.aio.AioRpcError as exc:
                last = exc
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise _translate(exc, method) from exc
                self._failed_over(index, exc)
                if not (retry or _not_applied(exc)):
                    break
        assert last is not None
        raise StoreUnavailable(
            f"etcd {method} failed at {self.url}: {last.code().name} {last.details()}"
        ) from last

    async def _kv(self, method: str, request: Any, *, retry: bool) -> Any:
        if method not in _WRITES:
            return await self._call(0, method, request, retry=retry)
        started = time.perf_counter()
        reply = await self._call(0, method, request, retry=retry)
        self.commit_times.observe(time.perf_counter() - started)
        return reply

    async def _lease(self, method: str, request: Any, *, retry: bool) -> Any:
        return await self._call(1, method, request, retry=retry)

    # -- keys ----------------------------------------------------------------------

    def _key(self, key: str) -> bytes:
        if not key.startswith("/"):
            raise ValueError(f"store keys start with '/': {key!r}")
        return self._root.encode() + key.encode()

    def _store_key(self, raw: bytes) -> str:
        return raw[len(self._root.encode()) :].decode()

    def _kv_of(self, kv: Any) -> KeyValue:
        return KeyValue(
            self._store_key(kv.key),
            bytes(kv.value),
            int(kv.create_revision),
            int(kv.mod_revision),
            int(kv.version),
            format_lease(kv.lease) if kv.lease else None,
        )

    def _prefix_range(self, prefix: str) -> tuple[bytes, bytes] | None:
        """The etcd key range of a Store prefix (None: no Store key can match)."""
        if not prefix:
            return self._ns, self._ns_end
        if not prefix.startswith("/"):
            return None
        start = self._root.encode() + prefix.encode()
        return start, _prefix_end(start)

    # -- reads -------------------------------------------------------------------

    async def get(self, key: str) -> KeyValue | None:
        """The key, or None."""
        if key == SYNC_KEY or not key.startswith("/"):
            return None
        reply = await self._kv("Range", rpc.RangeRequest(key=self._key(key)), retry=True)
        return self._kv_of(reply.kvs[0]) if reply.kvs else None

    async def range(
        self, prefix: str, *, start_after: str = "", limit: int = 0, reverse: bool = False
    ) -> list[KeyValue]:
        """Keys under ``prefix`` in key order (descending when ``reverse``), strictly past
        ``start_after`` in that order, at most ``limit``."""
        _, kvs = await self._range(prefix, start_after=start_after, limit=limit, reverse=reverse)
        return kvs

    async def _range(
        self, prefix: str, *, start_after: str = "", limit: int = 0, reverse: bool = False
    ) -> tuple[int, list[KeyValue]]:
        bounds = self._prefix_range(prefix)
        if bounds is None:
            return await self.current_revision(), []
        start, end = bounds
        if start_after and start_after.startswith("/"):
            after = self._key(start_after)
            if reverse:
                end = min(end, after)
            else:
                start = max(start, after + b"\0")
        if start >= end:
            return await self.current_revision(), []
        # The reserved key may sit in the range: ask for one more and drop it.
        sync_inside = start <= self._sync_key < end
        request = rpc.RangeRequest(
            key=start, range_end=end, limit=limit + 1 if limit and sync_inside else limit
        )
        if reverse:
            request.sort_order = rpc.RangeRequest.DESCEND
            request.sort_target = rpc.RangeRequest.KEY
        reply = await self._kv("Range", request, retry=True)
        kvs = [self._kv_of(kv) for kv in reply.kvs if kv.key != self._sync_key]
        return int(reply.header.revision), kvs[:limit] if limit else kvs

    async def snapshot(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` and the revision they were read at (one etcd read).

        Returns once listeners have received every event up to that revision, so a
        cache loaded from the snapshot and fed by a listener neither misses nor
        replays a change.
        """
        revision, kvs = await self._range(prefix)
        if revision > self._dispatched:
            await self._sync()
        return revision, kvs

    async def current_revision(self) -> int:
        """etcd's current revision (store-wide, the same on every replica)."""
        request = rpc.RangeRequest(key=self._sync_key, count_only=True)
        reply = await self._kv("Range", request, retry=True)
        return int(reply.header.revision)

    async def events_since(self, revision: int, prefix: str = "") -> list[Event]:
        """Events after ``revision`` under ``prefix``; Compacted when etcd dropped them.

        Reads etcd's history with a watch from ``revision + 1`` up to a barrier written
        first, so the answer ends exactly where live events (``subscribe``) begin.
        """
        barrier = await self._sync()
        if revision + 1 >= barrier:
            return []
        out: list[Event] = []
        stub = self._channel_stubs(self._active)[2]
        call = stub.Watch(timeout=max(self._timeout, self._sync_timeout) * 2)
        try:
            await call.write(
                rpc.WatchRequest(
                    create_request=rpc.WatchCreateRequest(
                        key=self._ns,
                        range_end=self._ns_end,
                        start_revision=revision + 1,
                        prev_kv=True,
                    )
                )
            )
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise StoreUnavailable("etcd ended the history watch early")
                if reply.compact_revision:
                    raise Compacted(revision, int(reply.compact_revision) - 1)
                if reply.canceled:
                    raise StoreUnavailable(
                        f"etcd cancelled the history watch: {reply.cancel_reason}"
                    )
                for batch_revision, batch in self._batches(reply.events):
                    if batch_revision >= barrier:
                        return out
                    out.extend(e for e in batch if e.key.startswith(prefix))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                self._failed_over(self._active, exc)
            raise StoreUnavailable(
                f"etcd history read failed: {exc.code().name} {exc.details()}"
            ) from exc
        finally:
            call.cancel()

    def subscribe(self, prefix: str = "") -> Subscription:
        """Live events under ``prefix`` from now on."""
        sub = Subscription(prefix)
        self._subs.add(sub)
        return sub

    def listen(self, prefix: str, callback: Listener) -> Callable[[], None]:
        """Call ``callback(events)`` on the loop for each batch under ``prefix``.

        Writes through this store return after their listeners ran (read-your-writes);
        writes by other replicas arrive as etcd delivers them.
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
        request = rpc.PutRequest(
            key=self._key(key), value=value, lease=parse_lease(lease) if lease else 0
        )
        reply = await self._kv("Put", request, retry=False)
        revision = int(reply.header.revision)
        if self._listened(key):
            await self._delivered(revision)
        return revision

    async def delete(self, key: str) -> int | None:
        """Delete a key; the revision, or None when it did not exist."""
        raw = self._key(key)
        request = rpc.TxnRequest(
            compare=[
                rpc.Compare(
                    key=raw, target=rpc.Compare.VERSION, result=rpc.Compare.GREATER, version=0
                )
            ],
            success=[
                rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=raw)),
                self._mark(),
            ],
        )
        reply = await self._kv("Txn", request, retry=False)
        if not reply.succeeded:
            return None
        revision = int(reply.header.revision)
        if self._listened(key):
            await self._delivered(revision)
        return revision

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Put | Delete],
        failure: Sequence[Put | Delete] = (),
    ) -> TxnResult:
        """Apply ``success`` if every compare holds, else ``failure``, in one etcd Txn."""
        request = rpc.TxnRequest(
            compare=[
                rpc.Compare(
                    key=self._key(c.key),
                    target=rpc.Compare.MOD,
                    result=rpc.Compare.EQUAL,
                    mod_revision=c.mod_revision,
                )
                for c in compares
            ],
            success=self._ops(success),
            failure=self._ops(failure),
        )
        reply = await self._kv("Txn", request, retry=False)
        revision = int(reply.header.revision)
        ops = success if reply.succeeded else failure
        events: list[Event] = []
        for op, response in zip(ops, reply.responses, strict=False):
            if isinstance(op, Put):
                prev = response.response_put.prev_kv
                events.append(
                    Event(
                        revision,
                        EventType.PUT,
                        op.key,
                        op.value,
                        prev_value=bytes(prev.value) if prev.key else None,
                    )
                )
            else:
                for kv in response.response_delete_range.prev_kvs:
                    if kv.key != self._sync_key:
                        value = bytes(kv.value)
                        key = self._store_key(kv.key)
                        events.append(
                            Event(revision, EventType.DELETE, key, value, prev_value=value)
                        )
        if any(self._listened(op.key, prefix=isinstance(op, Delete) and op.prefix) for op in ops):
            await self._delivered(revision)
        return TxnResult(bool(reply.succeeded), revision, tuple(events))

    def _ops(self, ops: Sequence[Put | Delete]) -> list[Any]:
        out: list[Any] = []
        for op in ops:
            if isinstance(op, Put):
                request = rpc.PutRequest(
                    key=self._key(op.key),
                    value=op.value,
                    lease=parse_lease(op.lease) if op.lease else 0,
                    prev_kv=True,
                )
                out.append(rpc.RequestOp(request_put=request))
            else:
                key = self._key(op.key)
                delete = rpc.DeleteRangeRequest(key=key, prev_kv=True)
                if op.prefix:
                    delete.range_end = _prefix_end(key)
                out.append(rpc.RequestOp(request_delete_range=delete))
        if any(isinstance(op, Delete) for op in ops):
            out.append(self._mark())
        return out

    def _mark(self) -> Any:
        """The write of the reserved key that marks a revision's deletes as explicit."""
        return rpc.RequestOp(request_put=rpc.PutRequest(key=self._sync_key, value=b""))

    async def _sync(self) -> int:
        """Write the barrier; returns its revision once the watch delivered it."""
        request = rpc.PutRequest(key=self._sync_key, value=b"")
        reply = await self._kv("Put", request, retry=True)  # idempotent in effect
        revision = int(reply.header.revision)
        await self._delivered(revision)
        return revision

    # -- leases ------------------------------------------------------------------

    async def put_with_lease(
        self, key: str, value: Callable[[LeaseInfo], bytes], ttl: float
    ) -> tuple[LeaseInfo, TxnResult]:
        """Grant a lease, then put ``key`` under it (etcd has no grant inside a Txn);
        the lease is revoked again if the put fails."""
        lease = await self.grant_lease(ttl)
        try:
            result = await self.txn((), (Put(key, value(lease), lease.lease_id),))
        except BaseException:
            with contextlib.suppress(Exception):
                await self.revoke_lease(lease.lease_id)
            raise
        return lease, result

    async def grant_lease(self, ttl: float, *, lease_id: str | None = None) -> LeaseInfo:
        """Create a lease of ``ttl`` seconds, rounded up to whole seconds by etcd.

        A chosen ``lease_id`` must be an etcd id (1 to 16 hex digits). With the id of a
        live lease of the same TTL, renews it (etcd cannot change the TTL of a live
        lease: ValueError when asked to).
        """
        if ttl <= 0:
            raise ValueError("lease ttl must be positive")
        try:
            wanted = parse_lease(lease_id) if lease_id else 0
        except LeaseNotFound:
            raise ValueError(f"etcd lease ids are 1 to 16 hex digits, not {lease_id!r}") from None
        request = rpc.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)), ID=wanted)
        try:
            # Resending is harmless: a lease granted twice leaves an empty one to expire,
            # and a chosen id granted twice is renewed below.
            reply = await self._lease("LeaseGrant", request, retry=True)
        except _DuplicateLease:
            current = await self._lease(
                "LeaseTimeToLive", rpc.LeaseTimeToLiveRequest(ID=wanted), retry=True
            )
            if int(current.grantedTTL) != request.TTL:
                raise ValueError(
                    f"lease {lease_id} is live with a TTL of {current.grantedTTL} s; etcd "
                    f"cannot change it to {request.TTL} s"
                ) from None
            assert lease_id is not None
            return await self.keep_alive(lease_id)
        if reply.error:
            raise StoreUnavailable(f"etcd refused the lease: {reply.error}")
        granted = int(reply.TTL)
        return LeaseInfo(format_lease(int(reply.ID)), float(granted), time.time() + granted)

    async def keep_alive(self, lease_id: str) -> LeaseInfo:
        """Renew a lease for its TTL over one shared keep-alive stream; LeaseNotFound
        when it expired or never existed."""
        lid = parse_lease(lease_id)
        for _ in range(len(self.endpoints)):
            index = self._active
            try:
                ttl = await self._keep_alive_once(index, lid)
            except grpc.aio.AioRpcError as exc:
                self._failed_over(index, exc)
                error: Exception = exc
                continue
            except StoreUnavailable as exc:
                self._failed_over(index, exc)
                error = exc
                continue
            if ttl <= 0:
                raise LeaseNotFound(f"lease {lease_id} not found or expired")
            return LeaseInfo(lease_id, float(ttl), time.time() + ttl)
        raise StoreUnavailable(f"etcd lease renewal failed at {self.url}: {error}")

    async def _keep_alive_once(self, index: int, lid: int) -> int:
        if self._closed:
            raise StoreUnavailable("store is closed")
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        async with self._ka_lock:
            if self._ka_call is None:
                self._ka_call = self._channel_stubs(index)[1].LeaseKeepAlive()
                self._ka_reader = asyncio.create_task(
                    self._read_keepalives(self._ka_call), name="etcd-lease-keepalive"
                )
            self._ka_pending.setdefault(lid, deque()).append(fut)
            try:
                await self._ka_call.write(rpc.LeaseKeepAliveRequest(ID=lid))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
                self._reset_keepalive(StoreUnavailable(f"etcd keep-alive stream broke: {exc}"))
        try:
            async with asyncio.timeout(self._timeout):
                return await fut
        except TimeoutError:
            self._reset_keepalive(StoreUnavailable("etcd keep-alive timed out"))
            raise StoreUnavailable(
                f"etcd did not answer a lease renewal within {self._timeout} s"
            ) from None

    async def _read_keepalives(self, call: Any) -> None:
        try:
            while True:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    raise StoreUnavailable("etcd closed the keep-alive stream")
                waiting = self._ka_pending.get(int(reply.ID))
                if waiting:
                    fut = waiting.popleft()
                    if not waiting:
                        del self._ka_pending[int(reply.ID)]
                    if not fut.done():
                        fut.set_result(int(reply.TTL))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._ka_call is call:
                self._ka_call = None
                self._ka_reader = None
                self._fail_keepalives(StoreUnavailable(f"etcd keep-alive stream failed: {exc}"))

    def _reset_keepalive(self, error: Exception) -> None:
        call, self._ka_call = self._ka_call, None
        if call is not None:
            call.cancel()
        if self._ka_reader is not None:
            self._ka_reader.cancel()
            self._ka_reader = None
        self._fail_keepalives(error)

    def _fail_keepalives(self, error: Exception) -> None:
        pending, self._ka_pending = self._ka_pending, {}
        for futures in pending.values():
            for fut in futures:
                if not fut.done():
                    fut.set_exception(error)

    async def revoke_lease(self, lease_id: str) -> int:
        """Delete a lease's keys (as deletions, not expiries), then the lease.

        LeaseNotFound when it expired or never existed; returns the revision.
        """
        lid = parse_lease(lease_id)
        info = await self._lease(
            "LeaseTimeToLive", rpc.LeaseTimeToLiveRequest(ID=lid, keys=True), retry=True
        )
        if int(info.TTL) < 0:
            raise LeaseNotFound(f"lease {lease_id} not found or expired")
        revision = 0
        # In key order, as SQLite deletes them (etcd lists a lease's keys unordered).
        keys = sorted(k for k in info.keys if self._ns <= k < self._ns_end)
        for start in range(0, len(keys), 64):
            chunk = keys[start : start + 64]
            # Only keys still on this lease: another writer may have moved one.
            request = rpc.TxnRequest(
                success=[
                    rpc.RequestOp(
                        request_txn=rpc.TxnRequest(
                            compare=[
                                rpc.Compare(
                                    key=key,
                                    target=rpc.Compare.LEASE,
                                    result=rpc.Compare.EQUAL,
                                    lease=lid,
                                )
                            ],
                            success=[
                                rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key))
                            ],
                        )
                    )
                    for key in chunk
                ]
                + [self._mark()]
            )
            reply = await self._kv("Txn", request, retry=False)
            revision = int(reply.header.revision)
        try:
            reply = await self._lease("LeaseRevoke", rpc.LeaseRevokeRequest(ID=lid), retry=False)
        except LeaseNotFound:
            if not revision:
                raise
        else:
            revision = max(revision, int(reply.header.revision))
        if any(self._listened(self._store_key(key)) for key in keys):
            await self._delivered(revision)
        return revision

    async def leases(self) -> list[LeaseInfo]:
        """Every live lease of the etcd cluster with its current expiry."""
        reply = await self._lease("LeaseLeases", rpc.LeaseLeasesRequest(), retry=True)
        ids = [int(lease.ID) for lease in reply.leases]
        out: list[LeaseInfo] = []
        for start in range(0, len(ids), 64):
            infos = await asyncio.gather(
                *(
                    self._lease("LeaseTimeToLive", rpc.LeaseTimeToLiveRequest(ID=lid), retry=True)
                    for lid in ids[start : start + 64]
                )
            )
            now = time.time()
            out.extend(
                LeaseInfo(format_lease(int(i.ID)), float(i.grantedTTL), now + int(i.TTL))
                for i in infos
                if int(i.TTL) >= 0  # whole seconds left, rounded down; -1: gone
            )
        return out

    # -- the namespace watch -------------------------------------------------------

    async def _watch_forever(self, started: asyncio.Future[None]) -> None:
        backoff = Backoff(_WATCH_RETRY)
        while not self._closed:
            index = self._active
            try:
                await self._watch_once(index, started)
            except asyncio.CancelledError:
                raise
            except _WatchCompacted as exc:
                self._resume_after_compaction(exc.compact_revision)
                continue
            except Exception as exc:
                if self._closed:
                    return
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    self._failed_over(index, exc)
                _log.warning(
                    "etcd watch failed, resuming from %d: %s",
                    self._dispatched + 1,
                    exc,
                    extra={"cause": "etcd watch failed"},
                )
            finally:
                if self._watch_up:  # it was up: a failure from now on is a first one
                    backoff.reset()
                self._watch_up = False
                self._watch_call = None
                self._release_waiters(everyone=True)
            await asyncio.sleep(next(backoff))

    async def _watch_once(self, index: int, started: asyncio.Future[None]) -> None:
        call = self._channel_stubs(index)[2].Watch()
        self._watch_call = call
        await call.write(
            rpc.WatchRequest(
                create_request=rpc.WatchCreateRequest(
                    key=self._ns,
                    range_end=self._ns_end,
                    start_revision=self._dispatched + 1,
                    prev_kv=True,
                )
            )
        )
        while True:
            reply = await call.read()
            if reply is grpc.aio.EOF:
                raise StoreUnavailable("etcd ended the watch stream")
            if reply.compact_revision:
                raise _WatchCompacted(int(reply.compact_revision))
            if reply.canceled:
                raise StoreUnavailable(f"etcd cancelled the watch: {reply.cancel_reason}")
            if reply.created:
                self._watch_up = True
                if not started.done():
                    started.set_result(None)
            for revision, batch in self._batches(reply.events):
                self._publish(batch)
                self._dispatched = max(self._dispatched, revision)
            self._release_waiters()

    def _resume_after_compaction(self, compact_revision: int) -> None:
        """The watch was down longer than etcd keeps history: what happened in the gap
        is lost. Subscribers are cut off (they resync from a snapshot); listeners
        cannot be told, so it is logged loudly."""
        _log.error(
            "etcd compacted revisions %d..%d while the watch was down; listeners missed "
            "them (restart this replica to reload its caches)",
            self._dispatched + 1,
            compact_revision - 1,
        )
        for sub in self._subs.all():
            sub.lagged = True
            sub.close()
        self._subs.clear()
        self._dispatched = max(self._dispatched, compact_revision - 1)

    def _batches(self, raw_events: Iterable[Any]) -> Iterable[tuple[int, list[Event]]]:
        """Store events grouped by revision (one group per etcd transaction)."""
        for revision, group in itertools.groupby(raw_events, key=lambda e: int(e.kv.mod_revision)):
            raw = list(group)
            explicit = any(e.kv.key == self._sync_key for e in raw)
            events: list[Event] = []
            for e in raw:
                if e.kv.key == self._sync_key:
                    continue
                prev = bytes(e.prev_kv.value) if e.prev_kv.key else None
                key = self._store_key(e.kv.key)
                if e.type == _DELETE:
                    events.append(
                        Event(revision, EventType.DELETE, key, prev or b"", not explicit, prev)
                    )
                else:
                    events.append(
                        Event(revision, EventType.PUT, key, bytes(e.kv.value), prev_value=prev)
                    )
            yield revision, events

    def _publish(self, events: list[Event]) -> None:
        if not events:
            return
        for prefix, callback in list(self._listeners.values()):
            mine = events if not prefix else [e for e in events if e.key.startswith(prefix)]
            if mine:
                try:
                    callback(mine)
                except Exception as exc:
                    log_failure(_log, f"store listener failed prefix={prefix}", exc)
        self._subs.deliver(events)

    # -- waiting for the watch -----------------------------------------------------

    def _listened(self, key: str, *, prefix: bool = False) -> bool:
        """Whether a listener's prefix covers ``key`` (or, for a prefix, overlaps it):
        only then must a write wait for the watch; subscribers read a queue anyway."""
        for listened, _ in self._listeners.values():
            if key.startswith(listened) or (prefix and listened.startswith(key)):
                return True
        return False

    async def _delivered(self, revision: int) -> None:
        """Wait until the namespace watch delivered ``revision`` (read-your-writes)."""
        if revision <= self._dispatched or not self._watch_up:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (revision, next(self._waiter_seq), fut))
        try:
            async with asyncio.timeout(self._sync_timeout):
                await fut
        except TimeoutError:
            _log.warning(
                "etcd watch has not delivered revision %d after %.1f s (at %d)",
                revision,
                self._sync_timeout,
                self._dispatched,
            )

    def _release_waiters(self, *, everyone: bool = False) -> None:
        while self._waiters and (everyone or self._waiters[0][0] <= self._dispatched):
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)


class _DuplicateLease(Exception):
    """etcd refused a lease id that is in use."""


def _translate(exc: grpc.aio.AioRpcError, method: str) -> Exception:
    """The Store error for an etcd status other than UNAVAILABLE."""
    details = exc.details() or ""
    code = exc.code()
    if code == grpc.StatusCode.NOT_FOUND and "lease not found" in details:
        return LeaseNotFound(f"lease not found or expired ({details})")
    if code == grpc.StatusCode.FAILED_PRECONDITION and "lease already exists" in details:
        return _DuplicateLease(details)
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        # A request etcd refuses by its limits (too many operations, too large): a
        # programming or configuration error, not a fault worth retrying.
        if "too many operations" in details:
            return ValueError(
                f"etcd refused {method}: {details}; start etcd with a higher --max-txn-ops "
                "(default 128; the metrics checkpoint writes every changed bucket at once, "
                "see the replica set-up in docs/operations.md)"
            )
        return ValueError(f"etcd refused {method}: {details}")
    return StoreUnavailable(f"etcd {method} failed: {code.name} {details}")
