"""Call records in, time-bucketed mergeable statistics out.

A *series* is (service, operation, instance id, version). Each series keeps time
buckets holding a call count, failure counts and a :class:`LatencySketch` (1% relative
error). Memory is bounded by series x buckets, never by the number of calls:

- records land in 10 s buckets; buckets older than 10 minutes are rolled up into 1 min
  buckets, those older than 1 hour into 10 min buckets, and buckets older than the
  retention (default 24 h) are dropped;
- a service may have at most ``max_series_per_service`` series (default 1,000); a
  record that would open one more is rejected with a reason, never stored silently.

Durability: every ``checkpoint_interval`` (0.5 s) the buckets changed since the last
checkpoint are written to the store in one transaction, and only then are the reports
that fed them acknowledged. A crash (even ``kill -9``) loses no acknowledged record.

Exactly once: a batch that carries its reporter's id and sequence number is counted
once however often it arrives (:mod:`flext_mesh.metrics.dedup`). The sequence is noted
in memory together with the records it brings, and written in the same checkpoint
transaction, so a re-sent batch is recognized after a failed write (the retry of a
batch answered UNAVAILABLE is acknowledged once the first copy is durable, not counted
again) and after a restart. The ledger is per replica.

Several replicas (on etcd): each writes its own buckets under
``/metrics/replicas/<replica>/`` and follows the others' through a store listener, so
reports on any replica merge every replica's sketches (they are mergeable; counts
add). A peer's calls appear within its checkpoint interval. The buckets of a replica
that is gone stay visible until the retention drops them.

Only server-side records (``CALL_SIDE_SERVER`` or unset) count in reports; client-side
records describe the same calls from the caller and feed only outlier ejection (a dead
instance reports nothing itself: its callers see UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from flext_mesh import errors
from flext_mesh.errors import FieldViolation, InvalidArgument, ResourceExhausted
from flext_mesh.metrics.dedup import MAX_REPORTER_ID, REPORTERS, BatchLedger, shard_key
from flext_mesh.metrics.sketch import LatencySketch
from flext_mesh.store import Compare, Delete, Event, EventType, KeyValue, Put, Store, follow
from flext_mesh.v1 import metrics_pb2

__all__ = [
    "BUCKETS",
    "INFRASTRUCTURE_CODES",
    "Aggregator",
    "AggregatorSettings",
    "BucketStats",
    "Ingested",
    "SeriesKey",
]

_log = logging.getLogger("flext_mesh.metrics")

#: Store prefix of persisted buckets: /metrics/buckets/<service>/<width>/<start>.
BUCKETS = "/metrics/buckets/"
#: Per-replica buckets on a shared store: /metrics/replicas/<replica>/<service>/<width>/<start>.
REPLICA_BUCKETS = "/metrics/replicas/"
#: Numbers of the gRPC codes that are infrastructure faults (``errors.INFRASTRUCTURE_CODES``),
#: as call records carry them.
INFRASTRUCTURE_CODES = frozenset(code.value[0] for code in errors.INFRASTRUCTURE_CODES)
_MAX_DURATION_MS = 86_400_000.0
_FUTURE_SLACK_NS = 300 * 1_000_000_000
_MAX_NAME = 63
_OUTCOMES = ("success", "business_error", "infrastructure_error")
_MAX_BATCH = 10_000
# CallSide numbers of metrics.proto (UNSPECIFIED, SERVER, CLIENT).
_SIDES = frozenset(metrics_pb2.CallSide.values())
# Longest correlation id a record may carry (as on the wire: rpc.metadata).
_MAX_CORRELATION_ID = 128

#: (bucket width s, how long buckets of that width are kept before rolling up, s).
_TIERS: tuple[tuple[int, int], ...] = ((10, 600), (60, 3600), (600, 0))


@dataclass(frozen=True, slots=True)
class SeriesKey:
    """What a series is about."""

    operation: str
    instance_id: str
    version: str


@dataclass(slots=True)
class BucketStats:
    """Calls of one series in one time bucket. Treated as immutable once closed."""

    sketch: LatencySketch = field(default_factory=LatencySketch)
    failures: int = 0
    infrastructure_failures: int = 0

    @property
    def count(self) -> int:
        """Calls in the bucket."""
        return self.sketch.count

    def merged(self, other: BucketStats) -> BucketStats:
        """A new BucketStats holding both (neither input changes)."""
        sketch = self.sketch.copy()
        sketch.merge(other.sketch)
        return BucketStats(
            sketch,
            self.failures + other.failures,
            self.infrastructure_failures + other.infrastructure_failures,
        )


@dataclass(frozen=True, kw_only=True)
class AggregatorSettings:
    """Limits and intervals of the metrics service."""

    #: How long history is kept, seconds (default 24 h).
    retention: float = 86_400.0
    #: Series a service may have at most.
    max_series_per_service: int = 1_000
    #: Seconds between durable checkpoints (acknowledgements wait for the next one).
    checkpoint_interval: float = 0.5
    #: This replica's name when several share the store (etcd); "" when it is alone.
    replica: str = ""
    #: Seconds after which a reporter that sent nothing is forgotten by the
    #: deduplication of batches (a batch of it sent again later counts again).
    reporter_idle_ttl: float = 3600.0
    #: Reporters whose batch sequences are remembered, at most (least recently
    #: active forgotten first).
    max_reporters: int = 10_000


@dataclass(frozen=True, slots=True)
class Ingested:
    """Outcome of one batch: how many records were kept, and why others were not.

    For a duplicate batch (counted when it first came) the same figures, not counted
    again: what the control plane accepts of it now.
    """

    accepted: int
    rejected: tuple[metrics_pb2.RejectedRecord, ...]
    duplicate: bool = False


# (service, bucket width, bucket start) -> series -> stats
_BucketKey = tuple[str, int, int]


class Aggregator:
    """Folds call records into bucketed statistics, persists them, answers queries."""

    def __init__(
        self,
        store: Store,
        settings: AggregatorSettings | None = None,
        *,
        on_outcomes: Callable[[str, str, list[bool]], Coroutine[Any, Any, None]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings or AggregatorSettings()
        self._on_outcomes = on_outcomes
        self._clock = clock
        self._buckets: dict[_BucketKey, dict[SeriesKey, BucketStats]] = {}
        self._series: dict[str, dict[SeriesKey, float]] = defaultdict(dict)  # -> last seen
        self._dirty: set[_BucketKey] = set()
        self._pending_acks: list[asyncio.Future[None]] = []
        # Held for a whole checkpoint: an ack waits for a write that began after it.
        self._checkpoint_lock = asyncio.Lock()
        #: Batches counted, per reporter (exactly-once ingest).
        self.ledger = BatchLedger(
            idle_ttl=self.settings.reporter_idle_ttl, max_reporters=self.settings.max_reporters
        )
        # A roll-up whose transaction failed: its deletes and merged targets are
        # written by the next one (both in one transaction, or a restart counts twice).
        self._unsaved_deletes: dict[str, None] = {}
        self._unsaved_targets: set[_BucketKey] = set()
        self._next_sweep = 0.0
        self._known_names: set[str] = set()
        self._series_keys: dict[tuple[str, str, str], SeriesKey] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._feedback: set[asyncio.Task[None]] = set()
        #: Per (service, instance): [calls, infrastructure failures, latency sum ms,
        #: timed calls] since the last drain, for the registry's performance multiplier.
        self.instance_window: dict[tuple[str, str], list[float]] = defaultdict(
            lambda: [0, 0, 0.0, 0]
        )
        #: Cumulative Prometheus histogram state per (service, operation, outcome).
        self.prometheus: dict[tuple[str, str, str], list[np.ndarray | float]] = {}
        self.prometheus_bounds_ms: np.ndarray = np.array(
            [0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000], dtype=float
        )
        replica = self.settings.replica
        #: Where this replica's buckets live in the store.
        self._prefix = f"{REPLICA_BUCKETS}{replica}/" if replica else BUCKETS
        #: Other replicas' buckets, by replica, fed by a store listener.
        self._peers: dict[str, dict[_BucketKey, dict[SeriesKey, BucketStats]]] = {}
        self._unlisten: Callable[[], None] | None = None
        #: Where this replica's ledger of counted batches lives in the store.
        self._ledger_prefix = f"{REPORTERS}{replica}/"

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Load persisted buckets within the retention and start checkpointing."""
        cutoff = self._clock() - self.settings.retention
        loaded = 0
        for kv in await self.store.range(self._prefix):
            service, width, start = _parse_bucket_key(kv.key[len(self._prefix) :])
            if start + width < cutoff:
                continue
            series = _decode_bucket(kv.value)
            self._buckets[(service, width, start)] = series
            for key in series:
                self._series[service][key] = float(start)
            loaded += 1
        ledger = await self.store.range(self._ledger_prefix)
        if unreadable := self.ledger.load((kv.value for kv in ledger), self._clock()):
            _log.warning("ignoring %d unreadable reporter ledger shards", unreadable)
        if self.settings.replica:
            try:
                await self.sweep_ledgers()
            except Exception:  # housekeeping: the roll-up tries again
                _log.exception("sweeping other replicas' reporter ledgers failed")

            def load(kvs: list[KeyValue]) -> None:
                for kv in kvs:
                    self._peer_bucket(kv.key, kv.value)

            _, self._unlisten = await follow(
                self.store, REPLICA_BUCKETS, load, self._on_peer_buckets
            )
        self._tasks = [
            asyncio.create_task(self._checkpoint_forever(), name="metrics-checkpoint"),
            asyncio.create_task(self._rollup_forever(), name="metrics-rollup"),
        ]
        _log.info(
            "metrics loaded buckets=%d services=%d reporters=%d",
            loaded,
            len(self._series),
            len(self.ledger),
        )

    async def stop(self) -> None:
        """Write the last checkpoint and stop background work."""
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._feedback, return_exceptions=True)
        self._tasks.clear()
        await self.checkpoint()

    # -- ingest ----------------------------------------------------------------------

    def ingest(
        self,
        records: Sequence[metrics_pb2.CallRecord],
        *,
        reporter_id: str = "",
        sequence: int = 0,
    ) -> Ingested:
        """Validate and fold one batch; good records of a mixed batch are kept.

        A batch with a ``sequence`` (> 0) that its reporter already had counted is
        validated again but not folded (``Ingested.duplicate``). Sequence 0 is never
        deduplicated.
        """
        if not records:
            raise InvalidArgument.from_violations(
                [FieldViolation("records", "must hold 1 to 10000 records")]
            )
        if len(records) > _MAX_BATCH:
            raise InvalidArgument.from_violations(
                [FieldViolation("records", f"{len(records)} records; at most {_MAX_BATCH}")]
            )
        if sequence and not (0 < len(reporter_id) <= MAX_REPORTER_ID and reporter_id.isprintable()):
            raise InvalidArgument.from_violations(
                [
                    FieldViolation(
                        "reporter_id",
                        f"must be 1-{MAX_REPORTER_ID} printable characters "
                        "when batch_sequence is set",
                    )
                ]
            )
        duplicate = sequence > 0 and self.ledger.counted(reporter_id, sequence)
        now = self._clock()
        now_ns = int(now * 1e9)
        cutoff_ns = int((now - self.settings.retention) * 1e9)
        future_ns = now_ns + _FUTURE_SLACK_NS
        rejected: list[metrics_pb2.RejectedRecord] = []
        # (service, operation, instance, version, 10 s bucket) -> (indexes, durations, outcomes)
        groups: dict[tuple[str, str, str, str, int], tuple[list[int], list[float], list[int]]]
        groups = {}
        outcomes: dict[tuple[str, str], list[bool]] = {}
        known = self._known_names
        infra_codes = INFRASTRUCTURE_CODES
        for index, record in enumerate(records):
            service = record.service_name
            operation = record.operation
            duration = record.duration_ms
            code = record.status_code
            stamp = record.time_unix_nano or now_ns
            problem = None
            if service not in known and not _valid_name(service, known):
                problem = ("service_name", "must be 1-63 printable characters")
            elif operation not in known and not _valid_name(operation, known):
                problem = ("operation", "must be 1-63 printable characters")
            elif not (0.0 <= duration <= _MAX_DURATION_MS):  # also NaN
                problem = (
                    "duration_ms",
                    f"must be finite, at least 0 and at most 1 day, got {duration}",
                )
            elif not 0 <= code <= 16:
                problem = ("status_code", f"{code} is not a gRPC status code")
            elif record.side not in _SIDES:
                problem = ("side", f"{record.side} is not a CallSide")
            elif (
                len(record.instance_id) > _MAX_NAME
                or len(record.version) > _MAX_NAME
                or len(record.caller_service) > _MAX_NAME
                or len(record.correlation_id) > _MAX_CORRELATION_ID
            ):
                problem = _too_long(record)
            elif stamp > future_ns:
                problem = ("time_unix_nano", "is more than 5 minutes in the future")
            elif stamp < cutoff_ns:
                problem = ("time_unix_nano", "is older than the retention")
            if problem is not None:
                rejected.append(
                    metrics_pb2.RejectedRecord(index=index, field=problem[0], reason=problem[1])
                )
                continue
            failed = not record.success
            kind = (2 if code in infra_codes else 1) if failed else 0
            instance = record.instance_id
            if instance and not duplicate:
                flags = outcomes.get((service, instance))
                if flags is None:
                    flags = outcomes[(service, instance)] = []
                flags.append(kind != 2)
            if record.side > 1:  # CALL_SIDE_CLIENT: feeds outlier ejection only
                continue
            key = (service, operation, instance, record.version, stamp // 10_000_000_000)
            group = groups.get(key)
            if group is None:
                group = groups[key] = ([], [], [])
            group[0].append(index)
            group[1].append(duration)
            group[2].append(kind)
        capped: set[int] = set()
        for (service, operation, instance, version, tens), (indexes, values, kinds) in list(
            groups.items()
        ):
            series_key = self._series_key(operation, instance, version)
            series = self._series[service] if service in self._series or not duplicate else {}
            if series_key not in series and len(series) >= self.settings.max_series_per_service:
                reason = (
                    f"service {service!r} has {len(series)} series, the most allowed; "
                    "this record would open another"
                )
                rejected.extend(
                    metrics_pb2.RejectedRecord(index=i, field="operation", reason=reason)
                    for i in indexes
                )
                capped.update(indexes)
                continue
            if duplicate:
                continue  # counted when it first came
            series[series_key] = now
            if instance:
                window = self.instance_window[(service, instance)]
                window[2] += sum(values)
                window[3] += len(values)
            self._fold(
                service,
                tens * 10,
                series_key,
                np.array(values, dtype=np.float64),
                np.array(kinds, dtype=np.int8),
            )
        if capped:
            rejected.sort(key=lambda r: r.index)
        for (service, instance), flags in outcomes.items():
            self._note_instance(service, instance, flags)
        accepted = len(records) - len(rejected)
        if accepted == 0 and any(r.field == "operation" and "series" in r.reason for r in rejected):
            # Not noted as counted: a later retry may fit once series expire.
            raise ResourceExhausted(rejected[0].reason)
        if duplicate:
            self.ledger.touch(reporter_id, now)
        elif sequence:
            # With the records, in memory now and in the same checkpoint: a retry of
            # this batch after a failed write is known as counted.
            self.ledger.record(reporter_id, sequence, now)
        if accepted == 0:
            raise InvalidArgument.from_violations(
                [FieldViolation(f"records[{r.index}].{r.field}", r.reason) for r in rejected]
            )
        return Ingested(accepted, tuple(rejected), duplicate)

    def _series_key(self, operation: str, instance: str, version: str) -> SeriesKey:
        key = self._series_keys.get((operation, instance, version))
        if key is None:
            key = SeriesKey(operation, instance, version)
            if len(self._series_keys) < 1_000_000:
                self._series_keys[(operation, instance, version)] = key
        return key

    def _fold(
        self, service: str, start: int, key: SeriesKey, durations: np.ndarray, outcome: np.ndarray
    ) -> None:
        bucket_key = (service, 10, start)
        bucket = self._buckets.get(bucket_key)
        if bucket is None:
            bucket = self._buckets[bucket_key] = {}
        stats = bucket.get(key)
        if stats is None:
            stats = bucket[key] = BucketStats()
        stats.sketch.add_many(durations)
        counts = np.bincount(outcome, minlength=3)
        stats.failures += int(counts[1] + counts[2])
        stats.infrastructure_failures += int(counts[2])
        self._dirty.add(bucket_key)
        self._prometheus_fold(service, key.operation, durations, outcome)

    def _prometheus_fold(
        self, service: str, operation: str, durations: np.ndarray, outcome: np.ndarray
    ) -> None:
        # One searchsorted and two bincounts for all three outcomes of the group.
        width = len(self.prometheus_bounds_ms) + 1
        slots = outcome.astype(np.int64) * width + np.searchsorted(
            self.prometheus_bounds_ms, durations
        )
        counts = np.bincount(slots, minlength=3 * width).reshape(3, width)
        sums = np.bincount(outcome, weights=durations, minlength=3)
        for code in np.flatnonzero(counts.sum(axis=1)):
            name = _OUTCOMES[code]
            state = self.prometheus.get((service, operation, name))
            if state is None:
                state = [np.zeros(width, dtype=np.int64), 0.0]
                self.prometheus[(service, operation, name)] = state
            cumulative = state[0]
            assert isinstance(cumulative, np.ndarray)
            cumulative += counts[code]
            state[1] = float(state[1]) + float(sums[code])

    def _note_instance(self, service: str, instance: str, flags: list[bool]) -> None:
        window = self.instance_window[(service, instance)]
        window[0] += len(flags)
        window[1] += flags.count(False)
        if self._on_outcomes is not None:
            # Outlier detection only needs the order of outcomes; all-success batches
            # collapse to one success (a success resets the consecutive count anyway).
            task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
                self._on_outcomes(service, instance, flags if False in flags else [True])
            )
            task.add_done_callback(_log_failure)
            # The loop keeps only weak references to tasks: hold one until it is done.
            self._feedback.add(task)
            task.add_done_callback(self._feedback.discard)

    # -- durability ------------------------------------------------------------------

    async def durable(self) -> None:
        """Wait until everything ingested so far is in the store.

        Also when nothing is left to write but a checkpoint is under way: a duplicate
        batch is acknowledged only once its first copy is durable, and that copy may
        be in the write in progress (or in one that is failing).
        """
        if not self._dirty and not self.ledger.dirty and not self._checkpoint_lock.locked():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending_acks.append(future)
        await future

    async def checkpoint(self) -> None:
        """Write every changed bucket, and the ledger of counted batches, in one
        transaction; then release the acks that waited for it."""
        async with self._checkpoint_lock:
            acks, self._pending_acks = self._pending_acks, []
            dirty, self._dirty = self._dirty, set()
            shards = self.ledger.take_dirty()
            try:
                groups: list[list[Put | Delete]] = [
                    [Put(self._key(*key), _encode_bucket(self._buckets[key]))]
                    for key in sorted(dirty)
                    if key in self._buckets
                ]
                ledger: list[Put | Delete] = []
                for shard in sorted(shards):
                    key = shard_key(self.settings.replica, shard)
                    value = self.ledger.encode(shard)
                    ledger.append(Delete(key) if value is None else Put(key, value))
                if ledger:
                    # Last: if the store needs several transactions (etcd's op limit), a
                    # crash between them re-counts a re-sent batch, never loses one.
                    groups.append(ledger)
                for ops in self._transactions(groups):
                    await self.store.txn((), ops)
            except BaseException as exc:
                # Written again next time (a Put of a whole bucket is idempotent).
                self._dirty |= dirty
                self.ledger.dirty |= shards
                if isinstance(exc, Exception):
                    for ack in acks:
                        if not ack.done():
                            ack.set_exception(exc)
                else:  # cancelled (stopping): the last checkpoint answers them
                    self._pending_acks[:0] = acks
                raise
            for ack in acks:
                if not ack.done():
                    ack.set_result(None)

    async def _checkpoint_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.checkpoint_interval)
            try:
                await self.checkpoint()
            except Exception:
                _log.exception("metrics checkpoint failed; retrying")

    # -- roll-up and retention ---------------------------------------------------------

    async def _rollup_forever(self) -> None:
        while True:
            await asyncio.sleep(30)
            try:
                await self.rollup()
            except Exception:
                _log.exception("metrics roll-up failed; retrying")

    async def rollup(self) -> int:
        """Merge old fine buckets into coarser ones, drop expired ones; returns changes.

        A bucket with records not checkpointed yet waits for the next roll-up: the
        roll-up's transaction does not carry the ledger of counted batches, so it
        must not be the first to make records durable.
        """
        now = self._clock()
        changes = 0
        deletes, self._unsaved_deletes = self._unsaved_deletes, {}
        targets, self._unsaved_targets = self._unsaved_targets, set()
        for (width, keep), (next_width, _) in itertools.pairwise(_TIERS):
            for key in [
                k
                for k in self._buckets
                if k[1] == width and k[2] + width < now - keep and k not in self._dirty
            ]:
                service, _, start = key
                target = (service, next_width, start - start % next_width)
                merged = dict(self._buckets.get(target, {}))
                for series, stats in self._buckets.pop(key).items():
                    old = merged.get(series)
                    merged[series] = stats if old is None else old.merged(stats)
                self._buckets[target] = merged
                deletes[self._key(*key)] = None
                targets.add(target)
                changes += 1
        cutoff = now - self.settings.retention
        for key in [k for k in self._buckets if k[2] + k[1] < cutoff]:
            del self._buckets[key]
            self._dirty.discard(key)
            targets.discard(key)
            deletes[self._key(*key)] = None
            changes += 1
        for replica, buckets in self._peers.items():  # a gone replica's, too
            for service, width, start in [k for k in buckets if k[2] + k[1] < cutoff]:
                deletes[f"{REPLICA_BUCKETS}{replica}/{service}/{width:06d}/{start:012d}"] = None
                changes += 1
        for service, seen_by_key in list(self._series.items()):
            for series_key, seen in list(seen_by_key.items()):
                if seen < cutoff:
                    del seen_by_key[series_key]
            if not seen_by_key:
                del self._series[service]
        changes += self.ledger.expire(now)  # written by the next checkpoint
        # A coarse bucket is written with the deletes of the fine buckets merged into it,
        # in one transaction, so that the store never holds both (or neither).
        grouped: dict[_BucketKey, list[Put | Delete]] = {
            key: [Put(self._key(*key), _encode_bucket(self._buckets[key]))]
            for key in sorted(targets)
            if key in self._buckets
        }
        alone: list[list[Put | Delete]] = []
        for stored in deletes:
            into = self._rollup_target(stored)
            if into is not None and into in grouped:
                grouped[into].append(Delete(stored))
            else:
                alone.append([Delete(stored)])
        groups = [*grouped.values(), *alone]
        if groups:
            try:
                for ops in self._transactions(groups):
                    await self.store.txn((), ops)
            except BaseException:
                # Memory is rolled up already: the store follows with the next try.
                self._unsaved_deletes = {**deletes, **self._unsaved_deletes}
                self._unsaved_targets |= targets
                raise
        if self.settings.replica and now >= self._next_sweep:
            await self.sweep_ledgers()
        return changes

    async def sweep_ledgers(self) -> int:
        """Delete the ledgers of replicas gone for longer than the reporter idle time
        (a replica named after its process leaves one behind at every restart).

        A shard is deleted only when its newest reporter is idle beyond the limit (its
        owner would have forgotten them all) and only if it did not change since it
        was read. Returns the shards deleted.
        """
        now = self._clock()
        self._next_sweep = now + self.settings.reporter_idle_ttl / 4
        cutoff = now - self.settings.reporter_idle_ttl
        deleted = 0
        for kv in await self.store.range(REPORTERS):
            if kv.key.startswith(self._ledger_prefix):
                continue
            try:
                newest = BatchLedger.newest(kv.value)
            except (ValueError, KeyError, TypeError, IndexError):
                newest = 0.0  # unreadable: nobody can use it
            if newest < cutoff:
                result = await self.store.txn([Compare(kv.key, kv.mod_revision)], [Delete(kv.key)])
                deleted += result.succeeded
        if deleted:
            _log.info("metrics deleted %d idle reporter ledger shards of other replicas", deleted)
        return deleted

    # -- queries -----------------------------------------------------------------------

    def services(self) -> list[str]:
        """Services with any series (on any replica)."""
        names = set(self._series)
        for buckets in self._peers.values():
            names.update(service for service, _, _ in buckets)
        return sorted(names)

    def window(
        self, service: str, seconds: float
    ) -> list[tuple[int, int, dict[SeriesKey, BucketStats]]]:
        """(start, width, series stats) of the service's buckets starting within the window.

        The window is [now - seconds, now], aligned down to bucket starts: it may be
        shorter than asked by up to one bucket width at its old end (10 s in the last
        10 minutes, 1 min up to an hour, 10 min beyond).
        """
        cutoff = self._clock() - seconds
        found: dict[tuple[int, int], dict[SeriesKey, BucketStats]] = {
            (start, width): series
            for (name, width, start), series in self._buckets.items()
            if name == service and start >= cutoff
        }
        for buckets in self._peers.values():
            for (name, width, start), series in buckets.items():
                if name != service or start < cutoff:
                    continue
                mine = found.get((start, width))
                found[(start, width)] = series if mine is None else _merge_series(mine, series)
        out = [(start, width, series) for (start, width), series in found.items()]
        out.sort(key=lambda item: item[0])
        return out

    # -- other replicas ------------------------------------------------------------------

    def _key(self, service: str, width: int, start: int) -> str:
        return f"{self._prefix}{service}/{width:06d}/{start:012d}"

    def _rollup_target(self, key: str) -> _BucketKey | None:
        """The coarser bucket a stored bucket of this replica rolls up into, if any."""
        if not key.startswith(self._prefix):
            return None
        try:
            service, width, start = _parse_bucket_key(key[len(self._prefix) :])
        except ValueError:
            return None
        for (tier, _), (next_width, _) in itertools.pairwise(_TIERS):
            if tier == width:
                return (service, next_width, start - start % next_width)
        return None

    def _transactions(self, groups: list[list[Put | Delete]]) -> list[list[Put | Delete]]:
        """Pack groups of operations (each must commit together) into as few
        transactions as the store allows: one unless it limits their size (etcd's
        ``--max-txn-ops``), in order."""
        limit = self.store.max_txn_ops
        total = sum(len(group) for group in groups)
        if not limit or total <= limit:
            return [[op for group in groups for op in group]] if total else []
        transactions: list[list[Put | Delete]] = []
        current: list[Put | Delete] = []
        for group in groups:
            if current and len(current) + len(group) > limit:
                transactions.append(current)
                current = []
            current.extend(group)
        if current:
            transactions.append(current)
        return transactions

    def _on_peer_buckets(self, events: list[Event]) -> None:
        for event in events:
            if event.type == EventType.DELETE:
                self._peer_bucket(event.key, None)
            else:
                self._peer_bucket(event.key, event.value)

    def _peer_bucket(self, key: str, value: bytes | None) -> None:
        """Follow one stored bucket of another replica (None: it was deleted)."""
        replica, _, rest = key[len(REPLICA_BUCKETS) :].partition("/")
        if replica == self.settings.replica or not rest:
            return
        try:
            bucket = _parse_bucket_key(rest)
        except ValueError:
            return
        if value is None:
            self._peers.get(replica, {}).pop(bucket, None)
            return
        try:
            series = _decode_bucket(value)
        except (ValueError, KeyError) as exc:
            _log.warning("ignoring an unreadable bucket %s: %s", key, exc)
            return
        self._peers.setdefault(replica, {})[bucket] = series

    def drain_instance_window(self) -> dict[tuple[str, str], tuple[int, int, float | None]]:
        """(calls, infrastructure failures, mean latency ms or None) per instance since
        the last drain (latency from server-side records only)."""
        out = {
            key: (int(v[0]), int(v[1]), v[2] / v[3] if v[3] else None)
            for key, v in self.instance_window.items()
            if v[0]
        }
        self.instance_window.clear()
        return out


# -- helpers ---------------------------------------------------------------------------


def _valid_name(name: str, known: set[str]) -> bool:
    if 0 < len(name) <= _MAX_NAME and name.isprintable() and not name.isspace():
        if len(known) < 100_000:
            known.add(name)
        return True
    return False


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        _log.error("outcome feedback failed: %s", task.exception())


def _parse_bucket_key(key: str) -> tuple[str, int, int]:
    """(service, width, start) of a bucket key without its prefix."""
    service, width, start = key.rsplit("/", 2)
    return service, int(width), int(start)


def _merge_series(
    one: dict[SeriesKey, BucketStats], other: dict[SeriesKey, BucketStats]
) -> dict[SeriesKey, BucketStats]:
    merged = dict(one)
    for key, stats in other.items():
        mine = merged.get(key)
        merged[key] = stats if mine is None else mine.merged(stats)
    return merged


def _encode_bucket(series: dict[SeriesKey, BucketStats]) -> bytes:
    rows = [
        [
            k.operation,
            k.instance_id,
            k.version,
            s.failures,
            s.infrastructure_failures,
            base64.b64encode(s.sketch.to_bytes()).decode(),
        ]
        for k, s in series.items()
    ]
    return json.dumps({"v": 1, "series": rows}, separators=(",", ":")).encode()


def _decode_bucket(data: bytes) -> dict[SeriesKey, BucketStats]:
    doc = json.loads(data)
    out: dict[SeriesKey, BucketStats] = {}
    for operation, instance_id, version, failures, infra, sketch in doc["series"]:
        out[SeriesKey(operation, instance_id, version)] = BucketStats(
            LatencySketch.from_bytes(base64.b64decode(sketch)), failures, infra
        )
    return out


def merge_stats(stats: Iterable[BucketStats]) -> BucketStats:
    """One BucketStats holding all of ``stats`` (inputs unchanged)."""
    total = BucketStats()
    for item in stats:
        total.sketch.merge(item.sketch)
        total.failures += item.failures
        total.infrastructure_failures += item.infrastructure_failures
    return total


def _too_long(record: metrics_pb2.CallRecord) -> tuple[str, str]:
    """The first over-long identifying field of a record, and how long it is."""
    for name, limit in (
        ("instance_id", _MAX_NAME),
        ("version", _MAX_NAME),
        ("caller_service", _MAX_NAME),
        ("correlation_id", _MAX_CORRELATION_ID),
    ):
        value: str = getattr(record, name)
        if len(value) > limit:
            return (name, f"is {len(value)} characters long; at most {limit}")
    return ("record", "a field is too long")
