"""The Store interface: every piece of durable state goes through it.

The model is etcd's, so that the SQLite backend (default) and the etcd backend
(several replicas) are interchangeable and the domain code is written once:

- keys (``/registry/instances/payment/i-1``) hold bytes, with a ``create_revision``,
  a ``mod_revision`` and a ``version`` (writes to that key);
- one store-wide ``revision`` grows by one for every write transaction that changes
  something; all events of a transaction share its revision;
- transactions compare ``mod_revision`` of keys, then apply puts and deletes;
- leases have a TTL; when one expires or is revoked its keys are deleted;
- events (puts and deletes) are kept for a bounded history, so watchers resume from
  a revision; older revisions are *compacted* and a watcher must resync.

Nothing here knows about gRPC. Acknowledged writes are durable when the call returns.
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import itertools
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from flext_mesh.errors import ConfigError, NotFound

__all__ = [
    "COMMIT_BUCKETS_SECONDS",
    "CommitTimes",
    "Compacted",
    "Compare",
    "Delete",
    "Event",
    "EventType",
    "KeyValue",
    "LeaseInfo",
    "LeaseNotFound",
    "Listener",
    "Put",
    "Store",
    "StoreOpenError",
    "Subscription",
    "SubscriptionLagged",
    "Subscriptions",
    "TxnResult",
    "follow",
]


#: A synchronous observer of store events (see Store.listen).
Listener = Callable[[list["Event"]], None]


class StoreOpenError(ConfigError):
    """The store cannot be opened (bad path, no permission, corrupted file, old schema)."""


class LeaseNotFound(NotFound):
    """The lease expired or never existed."""


class Compacted(Exception):
    """The asked revision is older than the history kept; resync from a snapshot."""

    def __init__(self, requested: int, compact_revision: int) -> None:
        super().__init__(
            f"revision {requested} was compacted (history starts after {compact_revision})"
        )
        self.requested = requested
        self.compact_revision = compact_revision


class SubscriptionLagged(Exception):
    """A subscriber fell too far behind and was cut off; resume from its last revision."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    """A stored key with its value and revisions."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: str | None = None


class EventType(enum.IntEnum):
    """Kind of change of a key."""

    PUT = 0
    DELETE = 1


@dataclass(frozen=True, slots=True)
class Event:
    """One change of one key; for a DELETE, ``value`` is the value it had."""

    revision: int
    type: EventType
    key: str
    value: bytes
    #: For deletes: True when the key went because its lease expired.
    expired: bool = False
    #: The value before this change (None when the key was created).
    prev_value: bytes | None = None


@dataclass(frozen=True, slots=True)
class LeaseInfo:
    """A granted lease: its id, TTL in seconds and wall-clock expiry (Unix seconds)."""

    lease_id: str
    ttl: float
    expires_at: float


@dataclass(frozen=True, slots=True)
class Compare:
    """Transaction guard: the key's mod_revision must equal ``mod_revision`` (0: absent)."""

    key: str
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Put:
    """Transaction operation: set a key, optionally attached to a lease."""

    key: str
    value: bytes
    lease: str | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    """Transaction operation: delete a key (``prefix=True``: every key under it)."""

    key: str
    prefix: bool = False


class Subscriptions:
    """The live subscriptions of a store, found per event by prefix.

    A subscription whose prefix ends with ``/`` (every one the control plane opens: an
    execution's events, a registry keyspace) is found through its prefix among the
    ancestors of each event's key: O(depth of the key) per event, however many
    subscriptions there are. Others (``""``, a partial name) are checked one by one.
    Handing every event to every subscription made each commit cost as much as there
    were watchers: with one watcher per running execution, O(n^2) in the executions.
    """

    __slots__ = ("_by_prefix", "_others")

    def __init__(self) -> None:
        self._by_prefix: dict[str, set[Subscription]] = {}
        self._others: set[Subscription] = set()

    def add(self, sub: Subscription) -> None:
        """Start delivering to ``sub`` (until it closes)."""
        sub.on_close = self.discard
        if sub.prefix.endswith("/"):
            self._by_prefix.setdefault(sub.prefix, set()).add(sub)
        else:
            self._others.add(sub)

    def discard(self, sub: Subscription) -> None:
        """Stop delivering to ``sub``."""
        subs = self._by_prefix.get(sub.prefix)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._by_prefix[sub.prefix]
        self._others.discard(sub)

    def __len__(self) -> int:
        return len(self._others) + sum(len(s) for s in self._by_prefix.values())

    def all(self) -> list[Subscription]:
        """Every subscription (to close them)."""
        return [*self._others, *(s for subs in self._by_prefix.values() for s in subs)]

    def clear(self) -> None:
        """Forget every subscription."""
        self._by_prefix.clear()
        self._others.clear()

    def deliver(self, events: list[Event]) -> None:
        """Hand ``events`` (one transaction's) to the subscriptions they concern, in one
        batch each; drop the subscriptions that closed."""
        if self._by_prefix:
            matched: dict[str, list[Event]] = {}
            for event in events:
                key = event.key
                end = key.rfind("/")
                while end >= 0:
                    prefix = key[: end + 1]
                    if prefix in self._by_prefix:
                        matched.setdefault(prefix, []).append(event)
                    end = key.rfind("/", 0, end)
            for prefix, mine in matched.items():
                for sub in list(self._by_prefix.get(prefix, ())):
                    sub.deliver(mine)
                    if sub.closed:
                        self.discard(sub)
        for sub in list(self._others):
            sub.deliver(events)
            if sub.closed:
                self._others.discard(sub)


@dataclass(frozen=True, slots=True)
class TxnResult:
    """Outcome of a transaction: which branch ran, and the store revision after it."""

    succeeded: bool
    revision: int
    events: tuple[Event, ...] = ()


@dataclass(eq=False)
class Subscription:
    """Live events under a prefix, as batches (one batch per write transaction).

    Iterate it with ``async for batch in sub``; close it when done. A subscriber that
    falls ``max_pending`` batches behind is cut off with SubscriptionLagged rather than
    buffering without bound.
    """

    prefix: str
    max_pending: int = 10_000
    _queue: asyncio.Queue[list[Event] | None] = field(default_factory=asyncio.Queue)
    lagged: bool = False
    closed: bool = False
    #: Called once when it closes (the store's registry forgets it then).
    on_close: Callable[[Subscription], None] | None = field(default=None, repr=False)

    def deliver(self, events: list[Event]) -> None:
        """Queue the events under this prefix (called on the event loop)."""
        if self.closed:
            return
        mine = [e for e in events if e.key.startswith(self.prefix)]
        if not mine:
            return
        if self._queue.qsize() >= self.max_pending:
            self.lagged = True
            self.closed = True
            self._queue.put_nowait(None)
            return
        self._queue.put_nowait(mine)

    def close(self) -> None:
        """Stop the subscription; a pending iteration ends."""
        if not self.closed:
            self.closed = True
            self._queue.put_nowait(None)
            if self.on_close is not None:
                self.on_close(self)

    def __aiter__(self) -> AsyncIterator[list[Event]]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[list[Event]]:
        while True:
            batch = await self._queue.get()
            if batch is None:
                if self.lagged:
                    raise SubscriptionLagged(f"subscriber of {self.prefix!r} fell behind")
                return
            yield batch


#: Upper bounds (seconds) of :class:`CommitTimes`' buckets; +Inf implied.
COMMIT_BUCKETS_SECONDS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
)


class CommitTimes:
    """How long a store's durable writes took: a fixed-bucket histogram.

    Written by the one thread or task that commits, read at scrape time; a read taken
    between two updates of one observation may be one count apart, never torn apart.
    """

    def __init__(self) -> None:
        self.counts = [0] * (len(COMMIT_BUCKETS_SECONDS) + 1)
        self.total_seconds = 0.0

    def observe(self, seconds: float) -> None:
        """Count one commit of ``seconds``."""
        self.counts[bisect.bisect_left(COMMIT_BUCKETS_SECONDS, seconds)] += 1
        self.total_seconds += seconds

    def cumulative(self) -> tuple[list[int], float]:
        """Counts at or below each bound then the +Inf count, and the sum of seconds."""
        return list(itertools.accumulate(list(self.counts))), self.total_seconds


class Store(Protocol):
    """Durable, revisioned key-value state with leases and an event history."""

    url: str
    #: Most operations one transaction may hold (None: no limit); callers with more
    #: split them (etcd's ``--max-txn-ops``).
    max_txn_ops: int | None
    #: How long its commits take (SQLite: a group commit; etcd: a write round trip).
    commit_times: CommitTimes

    async def open(self) -> None:
        """Open (creating and migrating as needed); raises StoreOpenError."""

    async def close(self) -> None:
        """Finish pending writes, stop background work and release files."""

    async def get(self, key: str) -> KeyValue | None:
        """The key, or None."""

    async def range(
        self, prefix: str, *, start_after: str = "", limit: int = 0, reverse: bool = False
    ) -> list[KeyValue]:
        """Keys under ``prefix`` in key order, or descending with ``reverse``; only keys
        strictly past ``start_after`` in that order; at most ``limit`` (0: all)."""

    async def snapshot(self, prefix: str) -> tuple[int, list[KeyValue]]:
        """Every key under ``prefix`` and the revision they were read at, atomically."""

    async def put(self, key: str, value: bytes, *, lease: str | None = None) -> int:
        """Set a key; returns the revision of the write."""

    async def delete(self, key: str) -> int | None:
        """Delete a key; returns the revision, or None when it did not exist."""

    async def txn(
        self,
        compares: Sequence[Compare],
        success: Sequence[Put | Delete],
        failure: Sequence[Put | Delete] = (),
    ) -> TxnResult:
        """Apply ``success`` if every compare holds, else ``failure``, atomically."""

    async def current_revision(self) -> int:
        """The revision of the last write."""

    async def grant_lease(self, ttl: float, *, lease_id: str | None = None) -> LeaseInfo:
        """Create (or with a known id, replace) a lease of ``ttl`` seconds."""

    async def put_with_lease(
        self, key: str, value: Callable[[LeaseInfo], bytes], ttl: float
    ) -> tuple[LeaseInfo, TxnResult]:
        """Grant a lease of ``ttl`` seconds and put ``key`` under it, its value made by
        ``value(lease)``. One durable write where the backend can (SQLite); else a
        grant then a put, the lease revoked again if the put fails."""

    async def keep_alive(self, lease_id: str) -> LeaseInfo:
        """Renew a lease for its TTL; LeaseNotFound when it expired or never existed."""

    async def revoke_lease(self, lease_id: str) -> int:
        """Delete a lease and its keys; returns the revision. LeaseNotFound if unknown."""

    async def leases(self) -> list[LeaseInfo]:
        """Every live lease."""

    async def events_since(self, revision: int, prefix: str = "") -> list[Event]:
        """Events with a revision greater than ``revision``; Compacted when too old."""

    def subscribe(self, prefix: str = "") -> Subscription:
        """Live events from now on. Subscribe first, then read events_since, to miss none."""

    def listen(self, prefix: str, callback: Listener) -> Callable[[], None]:
        """Call ``callback(events)`` on the event loop for every batch under ``prefix``.

        Batches arrive in revision order. The callback must be quick and must not raise;
        returns a function that stops the listening.
        """


async def follow(
    store: Store,
    prefix: str,
    load: Callable[[list[KeyValue]], None],
    apply: Listener,
) -> tuple[int, Callable[[], None]]:
    """Load everything under ``prefix``, then follow its changes without missing one.

    Listens first, reads the snapshot, hands it to ``load``, then replays to ``apply``
    the events that arrived meanwhile and are newer than the snapshot; later events go
    to ``apply`` as they come. Returns the snapshot's revision and the function that
    stops following.
    """
    held: list[Event] = []
    loaded = False

    def on_events(events: list[Event]) -> None:
        if loaded:
            apply(events)
        else:
            held.extend(events)

    unlisten = store.listen(prefix, on_events)
    try:
        revision, kvs = await store.snapshot(prefix)
        load(kvs)
    except BaseException:
        unlisten()
        raise
    loaded = True
    apply([event for event in held if event.revision > revision])
    held.clear()
    return revision, unlisten
