"""Call records in, time-bucketed mergeable statistics out.

A *series* is (service, operation, instance id, version). Each series keeps time
buckets holding a call count, failure counts and a :class:`LatencySketch` (1% relative
error). Memory is bounded by series x buckets, never by the number of calls:

- records land in 10 s buckets; buckets older than 10 minutes are rolled up into 1 min
  buckets, those older than 1 hour into 10 min buckets, and buckets older than the
  retention (default 24 h) are dropped;
- a service may have at most ``max_series_per_service`` series (default 1,000); a
  record that would open one more is rejected with a reason, never stored silently.

Durability: a batch is validated when it arrives and *staged*; every
``checkpoint_interval`` (0.5 s), or as soon as ``checkpoint_records`` (50,000) records
are staged, the staged batches are folded into the buckets they touch and those buckets
are written to the store in one transaction, and only then are the batches
acknowledged and counted in reports. A crash (even ``kill -9``) loses no
acknowledged record, and nothing that was not written is ever shown.

Exactly once, across replicas: a batch that carries its reporter's id and sequence
number is counted once however often, and to whichever replica, it is sent
(:mod:`flext_mesh.metrics.dedup`). The checkpoint writes, in the same transaction as
the buckets, each reporter's ledger key in the shared store, guarded by its
``mod_revision``: when another replica counted one of those reporters' batches
meanwhile, the guard fails, the keys are read again, and the batches now known as
counted are dropped (acknowledged as copies) before writing again. Every transaction
also writes this replica's checkpoint marker (``/metrics/checkpoints/<replica>``,
guarded the same way), so a write whose outcome is unknown (a lost answer, a timeout)
is settled before the next one: either it is found in the store and taken as done, or
the marker is moved past it and it can never apply. A batch of a reporter whose ledger
is not cached costs one read of its key; nothing costs a store round trip per record.

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
import contextlib
import itertools
import json
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final

import numpy as np

from flext_mesh.errors import (
    FieldViolation,
    InvalidArgument,
    MeshError,
    ResourceExhausted,
    StoreUnavailable,
)
from flext_mesh.logs import log_failure
from flext_mesh.metrics.dedup import (
    MAX_REPORTER_ID,
    REPORTERS,
    LedgerCache,
    ReporterLedger,
    is_legacy_key,
    newest_legacy,
    read_legacy,
    reporter_key,
)
from flext_mesh.metrics.records import (
    INFRASTRUCTURE_CODES,
    CallBatch,
    Columns,
    caller_numbers,
    group_records,
    outcome_runs,
    records_of,
    refusals,
)
from flext_mesh.metrics.sketch import LatencySketch, grouped
from flext_mesh.store import (
    Compare,
    Delete,
    Event,
    EventType,
    KeyValue,
    LeaseNotFound,
    Put,
    Store,
    follow,
)
from flext_mesh.v1 import metrics_pb2

__all__ = [
    "BUCKETS",
    "CHECKPOINTS",
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
#: Per-replica checkpoint markers: /metrics/checkpoints/<replica, "-" when alone>.
CHECKPOINTS = "/metrics/checkpoints/"
_OUTCOMES = ("success", "business_error", "infrastructure_error")
_MAX_BATCH = 10_000
# Writes of one checkpoint transaction tried again after a guard failed (another
# replica counted some of its reporters' batches meanwhile) before giving up until
# the next checkpoint.
_GUARD_ATTEMPTS = 5
# Reporter ledgers read from the store at once.
_LOAD_CONCURRENCY = 64

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
    #: Failed calls per gRPC status code (0: a failure reported without a code). Empty
    #: in buckets stored before codes were kept: their failures have no code known.
    codes: dict[int, int] = field(default_factory=dict)

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
            _add_codes(self.codes, other.codes),
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
    #: Records staged that start a checkpoint before the interval is up: under load,
    #: acknowledgements come sooner (a reporter holding as many unacknowledged is not
    #: kept waiting) and what is staged stays bounded.
    checkpoint_records: int = 50_000
    #: This replica's name when several share the store (etcd); "" when it is alone.
    replica: str = ""
    #: Seconds after which a reporter that sent nothing is forgotten by the
    #: deduplication of batches (its ledger key expires a quarter later at most; a
    #: batch of it sent again after that counts again).
    reporter_idle_ttl: float = 3600.0
    #: Reporters whose ledgers this replica keeps in memory, at most (least recently
    #: active dropped first, and read from the store again when they send again);
    #: also bounds the reporters one checkpoint writes well.
    max_reporters: int = 10_000


@dataclass(frozen=True, slots=True)
class Ingested:
    """Outcome of one batch: how many records were kept, and why others were not.

    For a duplicate batch (counted when it first came, here or on another replica) the
    same figures, not counted again: what the control plane accepts of it now.
    """

    accepted: int
    rejected: tuple[metrics_pb2.RejectedRecord, ...]
    duplicate: bool = False


# (service, bucket width, bucket start) -> series -> stats
_BucketKey = tuple[str, int, int]
# Where a group of records goes: one series in one 10 s bucket.
_Target = tuple[_BucketKey, SeriesKey]
_NO_RECORDS = np.zeros(0, dtype=np.int64)
_NO_DURATIONS = np.zeros(0, dtype=np.float64)
_NO_KINDS = np.zeros(0, dtype=np.int8)
#: Most distinct callers of one service in ``flext_mesh_calls_by_caller_total``; the
#: calls of any further caller are counted under :data:`OTHER_CALLERS`.
MAX_CALLERS_PER_SERVICE: Final = 32
#: The caller label of the calls over :data:`MAX_CALLERS_PER_SERVICE`.
OTHER_CALLERS: Final = "(other)"
#: gRPC status codes: 0 (OK) to 16.
_CODES: Final = 17


@dataclass(eq=False, slots=True)
class _Batch:
    """A validated batch waiting for the checkpoint that makes it durable."""

    reporter_id: str
    #: 0: not deduplicated.
    sequence: int
    #: Where each of its groups of records goes (a group: one series in one bucket).
    targets: list[_Target]
    #: Its records to count, column-wise: the number of each one's group, its
    #: duration (ms) and outcome kind (0 success, 1 business error, 2 infrastructure
    #: fault).
    group: np.ndarray
    durations: np.ndarray
    kinds: np.ndarray
    result: Ingested
    #: Per record to count: its caller (a number in ``caller_names``) and its gRPC
    #: status code (0 for a success).
    callers: np.ndarray = field(default_factory=lambda: _NO_RECORDS)
    caller_names: list[str] = field(default_factory=list)
    codes: np.ndarray = field(default_factory=lambda: _NO_KINDS)
    #: The groups not written yet (a batch too big for one transaction is written in
    #: several).
    unwritten: list[int] = field(default_factory=list)
    #: Who waits for the acknowledgement, and whether each sent a copy.
    waiters: list[tuple[asyncio.Future[Ingested], bool]] = field(default_factory=list)
    #: Durably counted (here, or by another replica before).
    finished: bool = False

    def resolve(self, *, counted_elsewhere: bool = False) -> None:
        """Acknowledge: durable now (or counted by another replica before)."""
        self.finished = True
        for future, copy in self.waiters:
            if not future.done():
                future.set_result(replace(self.result, duplicate=copy or counted_elsewhere))
        self.waiters.clear()

    def fail(self, exc: Exception) -> None:
        """Its write failed: tell who waits (a copy sent again waits anew)."""
        for future, _ in self.waiters:
            if not future.done():
                future.set_exception(exc)
        self.waiters.clear()


@dataclass(slots=True)
class _Part:
    """What one transaction writes of a batch: some of its groups (by number), and
    maybe its sequence (with its last groups)."""

    batch: _Batch
    groups: list[int]
    notes_sequence: bool


# Each series of a bucket with its stats and its encoding as written (its row, and its
# failures per status code).
_Rows = dict[SeriesKey, tuple[BucketStats, str, str]]


@dataclass(slots=True)
class _PrometheusDelta:
    """What a transaction adds to the Prometheus series."""

    #: (service, operation) -> per outcome kind, bucket counts and the sum of
    #: durations (ms).
    histograms: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    #: (service, caller, status code) -> calls.
    edges: dict[tuple[str, str, int], int] = field(default_factory=dict)


@dataclass(slots=True)
class _Attempt:
    """A checkpoint transaction sent, with what it wrote, until its outcome is known."""

    marker: bytes
    parts: list[_Part]
    buckets: dict[_BucketKey, dict[SeriesKey, BucketStats]]
    ledgers: dict[str, ReporterLedger]
    prometheus: _PrometheusDelta
    #: The encoded series of each bucket written (see ``Aggregator._rows``).
    rows: dict[_BucketKey, _Rows] = field(default_factory=dict)


class Aggregator:
    """Folds call records into bucketed statistics, persists them, answers queries."""

    def __init__(
        self,
        store: Store,
        settings: AggregatorSettings | None = None,
        *,
        on_outcomes: Callable[[list[tuple[str, str, list[bool]]]], Coroutine[Any, Any, None]]
        | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.settings = settings or AggregatorSettings()
        self._on_outcomes = on_outcomes
        self._clock = clock
        #: Durable buckets (what the store holds of this replica, or is writing).
        self._buckets: dict[_BucketKey, dict[SeriesKey, BucketStats]] = {}
        # The encoded series of the buckets the last checkpoint wrote: the next one
        # encodes again only the series whose stats changed (stats are replaced, never
        # changed, once durable).
        self._rows: dict[_BucketKey, _Rows] = {}
        self._series: dict[str, dict[SeriesKey, float]] = defaultdict(dict)  # -> last seen
        # Batches waiting for a checkpoint, in arrival order, and by (reporter, sequence).
        self._staged: list[_Batch] = []
        self._staged_records = 0
        # Set when enough is staged to checkpoint before the interval is up.
        self._hurry = asyncio.Event()
        self._staged_by_key: dict[tuple[str, int], _Batch] = {}
        self._pending_acks: list[asyncio.Future[None]] = []
        # Held for a whole checkpoint or roll-up: one writer of this replica's keys.
        self._checkpoint_lock = asyncio.Lock()
        #: Ledgers of recently active reporters (exactly-once ingest).
        self.ledgers = LedgerCache(
            idle_ttl=self.settings.reporter_idle_ttl, max_reporters=self.settings.max_reporters
        )
        # Ledgers of the old per-replica layout, read at start; dropped once idle, and
        # whether their keys are left to sweep.
        self._legacy: dict[str, ReporterLedger] = {}
        self._legacy_until = 0.0
        self._legacy_shards = False
        # The lease the ledger keys and the marker are written under, and when to take
        # a new one (a key expires a reporter idle time or so after its last write).
        self._lease: str | None = None
        self._lease_renew_at = 0.0
        # The checkpoint marker: its key, mod_revision as last seen, this process's tag.
        self._marker_key = f"{CHECKPOINTS}{self.settings.replica or '-'}"
        self._marker_revision = 0
        self._marker_tag = secrets.token_hex(6)
        self._attempts = itertools.count(1)
        # A checkpoint transaction whose outcome is unknown (settled before any other).
        self._unsettled: _Attempt | None = None
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
        #: Cumulative Prometheus histogram state per (service, operation, outcome), of
        #: the calls this replica counted (durably).
        self.prometheus: dict[tuple[str, str, str], list[np.ndarray | float]] = {}
        #: Calls this replica counted (durably) per (service, caller, status code);
        #: at most MAX_CALLERS_PER_SERVICE callers of a service, then OTHER_CALLERS.
        self.prometheus_edges: dict[tuple[str, str, int], int] = {}
        self._callers_of: dict[str, set[str]] = {}
        self.prometheus_bounds_ms: np.ndarray = np.array(
            [0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000], dtype=float
        )
        replica = self.settings.replica
        #: Where this replica's buckets live in the store.
        self._prefix = f"{REPLICA_BUCKETS}{replica}/" if replica else BUCKETS
        #: Other replicas' buckets, by replica, fed by a store listener.
        self._peers: dict[str, dict[_BucketKey, dict[SeriesKey, BucketStats]]] = {}
        self._unlisten: Callable[[], None] | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Load persisted buckets within the retention and start checkpointing."""
        now = self._clock()
        cutoff = now - self.settings.retention
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
        marker = await self.store.get(self._marker_key)
        self._marker_revision = marker.mod_revision if marker is not None else 0
        await self._load_legacy(now)
        if self._legacy:
            try:
                await self.sweep_ledgers()
            except Exception as exc:  # housekeeping: the roll-up tries again
                log_failure(
                    _log,
                    "sweeping idle reporter ledgers of the old layout failed",
                    exc,
                    expected=(MeshError,),
                )
        if self.settings.replica:

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
        _log.info("metrics loaded buckets=%d services=%d", loaded, len(self._series))

    async def _load_legacy(self, now: float) -> None:
        """Read per-replica ledgers of the old layout, if any are left."""
        legacy = [kv for kv in await self.store.range(REPORTERS) if is_legacy_key(kv.key)]
        if not legacy:
            return
        self._legacy, unreadable = read_legacy(kv.value for kv in legacy)
        self._legacy_shards = True
        self._legacy_until = now + self.settings.reporter_idle_ttl
        if unreadable:
            _log.warning("ignoring %d unreadable reporter ledger shards", unreadable)

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

    async def ingest(
        self,
        records: Sequence[metrics_pb2.CallRecord] | CallBatch,
        *,
        reporter_id: str = "",
        sequence: int = 0,
    ) -> Ingested:
        """Validate one batch and return once it is durably counted (see :meth:`submit`)."""
        return await self.submit(records, reporter_id=reporter_id, sequence=sequence)

    def record(self, records: Sequence[metrics_pb2.CallRecord]) -> None:
        """Stage records this control plane made itself (workflow and step durations)
        without waiting: a failed write keeps them staged for the next checkpoint.
        Raises as :meth:`submit` when none is good."""
        self.submit(records).add_done_callback(_consume)

    def submit(
        self,
        records: Sequence[metrics_pb2.CallRecord] | CallBatch,
        *,
        reporter_id: str = "",
        sequence: int = 0,
    ) -> asyncio.Future[Ingested]:
        """Validate one batch and stage it for the next checkpoint; good records of a
        mixed batch are kept. The future is done once the batch is durably counted, or
        fails with the error of the write that failed (send it again).

        ``records``: the records, or the request that holds them (read faster, from
        its encoding: :mod:`flext_mesh.metrics.records`).

        A batch with a ``sequence`` (> 0) that its reporter already had counted, here
        or on another replica, is validated again but not counted
        (``Ingested.duplicate``). Sequence 0 is never deduplicated. Raises
        InvalidArgument when no record is good, ResourceExhausted when none fits the
        series limit.
        """
        size = len(records_of(records))
        if not size:
            raise InvalidArgument.from_violations(
                [FieldViolation("records", "must hold 1 to 10000 records")]
            )
        if size > _MAX_BATCH:
            raise InvalidArgument.from_violations(
                [FieldViolation("records", f"{size} records; at most {_MAX_BATCH}")]
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
        now = self._clock()
        staged = self._staged_by_key.get((reporter_id, sequence)) if sequence else None
        duplicate = staged is not None or (
            sequence > 0 and self.ledgers.counted(reporter_id, sequence)
        )
        now_ns = int(now * 1e9)
        columns = Columns.read(records, now_ns)
        refused = refusals(
            columns,
            known=self._known_names,
            now_ns=now_ns,
            cutoff_ns=int((now - self.settings.retention) * 1e9),
        )
        found = group_records(columns, refused)
        if not duplicate:
            self._note_outcomes(found.keys, found.key_of, found.kinds)
        # Each group of good server-side records goes to its series (unless the
        # series is one too many); a duplicate batch is checked, not counted.
        targets: list[_Target] = []
        target_of = np.full(len(found.keys), -1, dtype=np.int64)
        capped: list[tuple[int, str]] = []
        for number, (service, operation, instance, version, start, client) in enumerate(found.keys):
            if client:  # CALL_SIDE_CLIENT: feeds outlier ejection only
                continue
            series_key = self._series_key(operation, instance, version)
            series = self._series[service] if service in self._series or not duplicate else {}
            if len(series) >= self.settings.max_series_per_service and series_key not in series:
                capped.append(
                    (
                        number,
                        f"service {service!r} has {len(series)} series, the most allowed; "
                        "this record would open another",
                    )
                )
                continue
            if duplicate:
                continue  # counted when it first came
            series[series_key] = now
            target_of[number] = len(targets)
            targets.append(((service, 10, start), series_key))
        if capped:
            reasons = dict(capped)
            is_capped = np.zeros(len(found.keys), dtype=bool)
            is_capped[list(reasons)] = True
            over = is_capped[found.key_of]
            for index, number in zip(
                found.index[over].tolist(), found.key_of[over].tolist(), strict=True
            ):
                refused[index] = ("operation", reasons[number])
        rejected = [
            metrics_pb2.RejectedRecord(index=index, field=field, reason=reason)
            for index, (field, reason) in sorted(refused.items())
        ]
        accepted = size - len(rejected)
        if accepted == 0 and capped:
            # Not noted as counted: a later retry may fit once series expire.
            raise ResourceExhausted(rejected[0].reason)
        if targets:
            batch_group = target_of[found.key_of]
            durations, kinds, at = found.durations, found.kinds, found.index
            if len(targets) < len(found.keys):
                counted = batch_group >= 0
                batch_group = batch_group[counted]
                durations, kinds, at = durations[counted], kinds[counted], at[counted]
            self._note_latency(targets, batch_group, durations)
            caller_names, callers = caller_numbers(columns, at)
            codes = columns.codes[at].astype(np.int8)
            codes[kinds == 0] = 0  # a success is OK whatever code it carries
        else:
            batch_group, durations, kinds = _NO_RECORDS, _NO_DURATIONS, _NO_KINDS
            caller_names, callers, codes = [], _NO_RECORDS, _NO_KINDS
        if sequence:
            self.ledgers.touch(reporter_id, now)
        result = Ingested(accepted, tuple(rejected))
        if accepted == 0:
            if sequence and not duplicate:
                # Noted all the same (its copies are as bad), so that the reporter's
                # high-water mark moves past it.
                batch = _Batch(
                    reporter_id, sequence, [], _NO_RECORDS, _NO_DURATIONS, _NO_KINDS, result
                )
                self._staged.append(batch)
                self._staged_by_key[(reporter_id, sequence)] = batch
            raise InvalidArgument.from_violations(
                [FieldViolation(f"records[{r.index}].{r.field}", r.reason) for r in rejected]
            )
        future: asyncio.Future[Ingested] = asyncio.get_running_loop().create_future()
        if staged is not None:
            staged.waiters.append((future, True))  # acknowledged with its first copy
        elif duplicate:
            future.set_result(replace(result, duplicate=True))  # durable: counted before
        else:
            # Noted as counted with its records, in the same transaction: a retry of
            # this batch after a failed write is known as a copy, here and on every
            # replica.
            batch = _Batch(
                reporter_id,
                sequence,
                targets,
                batch_group,
                durations,
                kinds,
                result,
                callers,
                caller_names,
                codes,
                list(range(len(targets))),
                [(future, False)],
            )
            self._staged.append(batch)
            if sequence:
                self._staged_by_key[(reporter_id, sequence)] = batch
            self._staged_records += batch_group.size
            if self._staged_records >= self.settings.checkpoint_records:
                self._hurry.set()
        return future

    def _series_key(self, operation: str, instance: str, version: str) -> SeriesKey:
        key = self._series_keys.get((operation, instance, version))
        if key is None:
            key = SeriesKey(operation, instance, version)
            if len(self._series_keys) < 1_000_000:
                self._series_keys[(operation, instance, version)] = key
        return key

    def _note_outcomes(
        self,
        keys: list[tuple[str, str, str, str, int, bool]],
        key_of: np.ndarray,
        kinds: np.ndarray,
    ) -> None:
        """Count the calls and faults of each named instance (for the registry's
        performance multiplier) and hand their outcomes, in order, to outlier ejection."""
        pairs: dict[tuple[str, str], int] = {}
        pair_of_key = [
            pairs.setdefault((service, instance), len(pairs)) if instance else -1
            for service, _, instance, _, _, _ in keys
        ]
        if not pairs:
            return
        pair = np.array(pair_of_key, dtype=np.int64)[key_of]
        infrastructure = kinds == 2
        named = pair >= 0
        calls = np.bincount(pair[named], minlength=len(pairs)).tolist()
        faults = np.bincount(pair[named & infrastructure], minlength=len(pairs)).tolist()
        if any(faults):
            # Each instance's outcomes in batch order: the records sorted by instance
            # (stably), then one slice per instance.
            order = np.argsort(pair, kind="stable")
            in_order = infrastructure[order]
            ends = np.cumsum(calls).tolist()
            first = int(np.count_nonzero(~named))  # the unnamed sort first (-1)
        outcomes: list[tuple[str, str, list[bool]]] = []
        for (service, instance), number in pairs.items():
            window = self.instance_window[(service, instance)]
            window[0] += calls[number]
            window[1] += faults[number]
            # Without a fault, one success says it all (it resets the faults in a row).
            flags = [True]
            if faults[number]:
                end = first + ends[number]
                flags = outcome_runs(in_order[end - calls[number] : end])
            outcomes.append((service, instance, flags))
        if self._on_outcomes is not None:
            task: asyncio.Task[None] = asyncio.get_running_loop().create_task(
                self._on_outcomes(outcomes)
            )
            task.add_done_callback(_log_failure)
            # The loop keeps only weak references to tasks: hold one until it is done.
            self._feedback.add(task)
            task.add_done_callback(self._feedback.discard)

    def _note_latency(
        self, targets: list[_Target], group_of: np.ndarray, durations: np.ndarray
    ) -> None:
        """Add the server-side durations of each named instance to its latency window."""
        named = [number for number, (_, key) in enumerate(targets) if key.instance_id]
        if not named:
            return
        sums = np.bincount(group_of, weights=durations, minlength=len(targets)).tolist()
        counts = np.bincount(group_of, minlength=len(targets)).tolist()
        for number in named:
            (service, _, _), key = targets[number]
            window = self.instance_window[(service, key.instance_id)]
            window[2] += sums[number]
            window[3] += counts[number]

    def _folded(
        self, parts: Iterable[_Part]
    ) -> tuple[dict[_BucketKey, dict[SeriesKey, BucketStats]], _PrometheusDelta]:
        """The buckets ``parts`` touch, as they will be with their records (new objects,
        the durable ones left as they are until the write succeeds), and what their
        records add to the Prometheus histograms: one vectorised fold of all of them."""
        number: dict[_Target, int] = {}
        caller_number: dict[str, int] = {}
        picked: list[tuple[np.ndarray, ...]] = []
        for part in parts:
            batch = part.batch
            if not part.groups:
                continue
            to_number = np.full(len(batch.targets), -1, dtype=np.int64)
            for local in part.groups:
                to_number[local] = number.setdefault(batch.targets[local], len(number))
            numbers = to_number[batch.group]
            to_caller = np.array(
                [caller_number.setdefault(name, len(caller_number)) for name in batch.caller_names],
                dtype=np.int64,
            )
            columns = (numbers, batch.durations, batch.kinds, to_caller[batch.callers], batch.codes)
            if len(part.groups) < len(batch.targets):
                chosen = numbers >= 0
                columns = tuple(column[chosen] for column in columns)
            picked.append(columns)
        if not number:
            return {}, _PrometheusDelta()
        if len(picked) == 1:
            numbers, durations, kinds, callers, codes = picked[0]
        else:
            numbers, durations, kinds, callers, codes = (
                np.concatenate(column) for column in zip(*picked, strict=True)
            )
        count = len(number)
        sketches = grouped(durations, numbers, count)
        outcomes = np.bincount(numbers * 3 + kinds, minlength=3 * count).reshape(count, 3)
        failures = (outcomes[:, 1] + outcomes[:, 2]).tolist()
        infrastructure = outcomes[:, 2].tolist()
        failed = kinds > 0
        by_code = np.bincount(
            numbers[failed] * _CODES + codes[failed].astype(np.int64), minlength=_CODES * count
        ).reshape(count, _CODES)
        codes_of = [
            {int(code): int(row[code]) for code in np.flatnonzero(row).tolist()} for row in by_code
        ]
        out: dict[_BucketKey, dict[SeriesKey, BucketStats]] = {}
        for (bucket_key, series_key), n in number.items():
            bucket = out.get(bucket_key)
            if bucket is None:
                bucket = out[bucket_key] = dict(self._buckets.get(bucket_key, {}))
            old = bucket.get(series_key)
            if old is None:
                bucket[series_key] = BucketStats(
                    sketches[n], failures[n], infrastructure[n], codes_of[n]
                )
                continue
            sketch = old.sketch.copy()
            sketch.merge(sketches[n])
            bucket[series_key] = BucketStats(
                sketch,
                old.failures + failures[n],
                old.infrastructure_failures + infrastructure[n],
                _add_codes(old.codes, codes_of[n]),
            )
        delta = self._prometheus_delta(list(number), numbers, durations, kinds)
        delta.edges = _edges(list(number), numbers, list(caller_number), callers, codes)
        return out, delta

    def _prometheus_delta(
        self, targets: list[_Target], numbers: np.ndarray, durations: np.ndarray, kinds: np.ndarray
    ) -> _PrometheusDelta:
        """Per (service, operation): bucket counts and duration sums by outcome kind."""
        names: dict[tuple[str, str], int] = {}
        name_of = np.array(
            [
                names.setdefault((service, key.operation), len(names))
                for (service, _, _), key in targets
            ],
            dtype=np.int64,
        )
        width = len(self.prometheus_bounds_ms) + 1
        row = name_of[numbers] * 3 + kinds
        counts = np.bincount(
            row * width + np.searchsorted(self.prometheus_bounds_ms, durations),
            minlength=3 * width * len(names),
        ).reshape(len(names), 3, width)
        sums = np.bincount(row, weights=durations, minlength=3 * len(names)).reshape(len(names), 3)
        return _PrometheusDelta({name: (counts[n], sums[n]) for name, n in names.items()})

    def _prometheus_add(self, delta: _PrometheusDelta) -> None:
        """Add durably counted calls to the cumulative Prometheus series."""
        for (service, named, code), calls in delta.edges.items():
            known = self._callers_of.setdefault(service, set())
            caller = named
            if named not in known:
                if len(known) >= MAX_CALLERS_PER_SERVICE:
                    caller = OTHER_CALLERS
                else:
                    known.add(named)
            edge = (service, caller, code)
            self.prometheus_edges[edge] = self.prometheus_edges.get(edge, 0) + calls
        width = len(self.prometheus_bounds_ms) + 1
        for (service, operation), (counts, sums) in delta.histograms.items():
            for kind in np.flatnonzero(counts.any(axis=1)).tolist():
                name = _OUTCOMES[kind]
                state = self.prometheus.get((service, operation, name))
                if state is None:
                    state = [np.zeros(width, dtype=np.int64), 0.0]
                    self.prometheus[(service, operation, name)] = state
                cumulative = state[0]
                assert isinstance(cumulative, np.ndarray)
                cumulative += counts[kind]
                state[1] = float(state[1]) + float(sums[kind])

    # -- durability ------------------------------------------------------------------

    async def durable(self) -> None:
        """Wait until everything ingested so far is in the store (or its write failed)."""
        if not self._staged and self._unsettled is None and not self._checkpoint_lock.locked():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending_acks.append(future)
        await future

    async def checkpoint(self) -> None:
        """Write the staged batches with their reporters' ledgers, in as few
        transactions as the store allows; then acknowledge them."""
        async with self._checkpoint_lock:
            acks, self._pending_acks = self._pending_acks, []
            try:
                await self._settle()
                await self._write_staged()
            except BaseException as exc:
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

    async def _write_staged(self) -> None:
        batches, self._staged = self._staged, []
        self._staged_records = 0
        if not batches:
            return
        try:
            await self._load_ledgers({b.reporter_id for b in batches if b.sequence})
            for parts in self._plan(self._drop_counted(batches)):
                await self._commit(parts)
        except BaseException as exc:
            # Written again next time; who waits is told now (and may send it again).
            left = [b for b in batches if not b.finished]
            self._staged[:0] = left
            self._staged_records += sum(b.group.size for b in left)
            if isinstance(exc, Exception):
                for batch in left:
                    batch.fail(exc)
            raise

    async def _load_ledgers(self, reporters: set[str]) -> None:
        """Read the ledgers of reporters not cached (concurrently, a bounded number)."""
        missing = [rid for rid in reporters if rid not in self.ledgers]
        if not missing:
            return
        slots = asyncio.Semaphore(_LOAD_CONCURRENCY)

        async def load(rid: str) -> None:
            async with slots:
                kv = await self.store.get(reporter_key(rid))
            self.ledgers.put(rid, self._ledger_of(rid, kv), self._clock())

        await asyncio.gather(*(load(rid) for rid in missing))

    def _ledger_of(self, reporter_id: str, kv: KeyValue | None) -> ReporterLedger:
        """A reporter's ledger from its stored key (or from the old layout when none)."""
        if kv is None:
            if self._legacy and self._clock() > self._legacy_until:
                self._legacy = {}
            legacy = self._legacy.get(reporter_id)
            if legacy is None:
                return ReporterLedger()
            return ReporterLedger(legacy.high, set(legacy.above))
        try:
            return ReporterLedger.decode(kv.value, kv.mod_revision)
        except ValueError as exc:
            # Overwritten by the next write (its batches may count again, once).
            _log.warning("ignoring an unreadable reporter ledger %s: %s", kv.key, exc)
            return ReporterLedger(revision=kv.mod_revision)

    def _drop_counted(self, batches: list[_Batch]) -> list[_Batch]:
        """Acknowledge, as copies, the batches a ledger shows counted; the others."""
        left: list[_Batch] = []
        for batch in batches:
            if batch.sequence:
                ledger = self.ledgers.get(batch.reporter_id)
                if ledger is not None and ledger.counted(batch.sequence):
                    del self._staged_by_key[(batch.reporter_id, batch.sequence)]
                    batch.resolve(counted_elsewhere=True)
                    continue
            left.append(batch)
        return left

    def _plan(self, batches: list[_Batch]) -> list[list[_Part]]:
        """The transactions that write ``batches``: each holds whole reporters (their
        sequences with their records), within the store's limit of operations. A
        reporter whose records alone touch more buckets than one transaction may hold
        has its buckets spread over several, its sequences written with the last."""
        units: dict[str | int, list[_Batch]] = {}
        for index, batch in enumerate(batches):
            units.setdefault(batch.reporter_id if batch.sequence else index, []).append(batch)
        limit = self.store.max_txn_ops
        if not limit:
            return [[_Part(b, list(b.unwritten), True) for b in batches]]
        room = max(1, limit - 2)  # the marker, and the reporter's ledger key
        plans: list[list[_Part]] = []
        current: list[_Part] = []
        current_keys: set[_BucketKey] = set()
        current_ops = 1  # the marker
        for unit in units.values():
            keys = {batch.targets[g][0] for batch in unit for g in batch.unwritten}
            ledger = 1 if unit[0].sequence else 0
            need = len(keys - current_keys) + ledger
            if current and current_ops + need > limit:
                plans.append(current)
                current, current_keys, current_ops = [], set(), 1
                need = len(keys) + ledger
            if 1 + need <= limit:
                current.extend(_Part(b, list(b.unwritten), True) for b in unit)
                current_keys |= keys
                current_ops += need
                continue
            ordered = sorted(keys)
            chunks = [set(ordered[i : i + room]) for i in range(0, len(ordered), room)]
            for number, chunk in enumerate(chunks):
                last = number == len(chunks) - 1
                parts = [
                    _Part(b, [g for g in b.unwritten if b.targets[g][0] in chunk], last)
                    for b in unit
                ]
                if last:
                    current, current_keys = parts, set(chunk)
                    current_ops = 1 + len(chunk) + ledger
                else:
                    plans.append(parts)
        if current:
            plans.append(current)
        return plans

    async def _commit(self, parts: list[_Part]) -> None:
        """Write one planned transaction (the batches another replica counted meanwhile
        are left out and acknowledged as copies)."""
        for _ in range(_GUARD_ATTEMPTS):
            parts = [p for p in parts if not p.batch.finished]
            if not parts:
                return
            lease = await self._ledger_lease()
            attempt = self._attempt(parts)
            compares = [Compare(self._marker_key, self._marker_revision)]
            ops: list[Put | Delete] = []
            for key, series in sorted(attempt.buckets.items()):
                value, attempt.rows[key] = self._encoded(key, series)
                ops.append(Put(self._key(*key), value))
            seen = self._clock()
            for rid, ledger in attempt.ledgers.items():
                cached = self.ledgers.get(rid)
                compares.append(Compare(reporter_key(rid), cached.revision if cached else 0))
                ops.append(Put(reporter_key(rid), ledger.encode(seen), lease))
            ops.append(Put(self._marker_key, attempt.marker, lease))
            self._unsettled = attempt
            try:
                result = await self.store.txn(compares, ops)
            except LeaseNotFound:
                # Never applied (the store refused the lease): take a new one.
                self._unsettled = None
                self._lease = None
                continue
            self._unsettled = None
            if result.succeeded:
                self._apply(attempt, result.revision)
                return
            # A guard failed: another replica wrote some of these ledgers (or this
            # replica's marker: another process with its name). Read them again.
            await self._reload(set(attempt.ledgers))
            self._drop_counted(list({id(p.batch): p.batch for p in parts}.values()))
        raise StoreUnavailable(
            f"metrics checkpoint: {_GUARD_ATTEMPTS} writes in a row found reporter ledgers "
            "changed by another replica; trying again"
        )

    def _attempt(self, parts: list[_Part]) -> _Attempt:
        """What a transaction of ``parts`` writes: buckets, ledgers and the marker."""
        sequences: dict[str, list[int]] = {}
        for part in parts:
            if part.notes_sequence and part.batch.sequence:
                sequences.setdefault(part.batch.reporter_id, []).append(part.batch.sequence)
        ledgers: dict[str, ReporterLedger] = {}
        for rid, seqs in sequences.items():
            cached = self.ledgers.get(rid)
            ledgers[rid] = (cached or ReporterLedger()).noting(seqs)
        marker = f"{self._marker_tag}:{next(self._attempts)}".encode()
        buckets, prometheus = self._folded(parts)
        return _Attempt(marker, parts, buckets, ledgers, prometheus)

    def _encoded(
        self, key: _BucketKey, series: dict[SeriesKey, BucketStats]
    ) -> tuple[bytes, _Rows]:
        """A bucket's stored value, reusing the encoding of each series whose stats are
        those it last wrote, and every series' encoding."""
        known = self._rows.get(key, {})
        rows: _Rows = {}
        for series_key, stats in series.items():
            row = known.get(series_key)
            if row is None or row[0] is not stats:
                row = (stats, _encode_row(series_key, stats), _encode_codes(stats))
            rows[series_key] = row
        return _join_rows(
            [text for _, text, _ in rows.values()], [codes for _, _, codes in rows.values()]
        ), rows

    def _apply(self, attempt: _Attempt, revision: int) -> None:
        """A transaction was written (at ``revision``): what it wrote is durable."""
        self._buckets.update(attempt.buckets)
        self._rows = attempt.rows  # the buckets written last (the next checkpoint's too)
        now = self._clock()
        for rid, ledger in attempt.ledgers.items():
            ledger.revision = revision
            self.ledgers.put(rid, ledger, now)
        self._marker_revision = revision
        self._prometheus_add(attempt.prometheus)
        for part in attempt.parts:
            batch = part.batch
            written = set(part.groups)
            batch.unwritten = [g for g in batch.unwritten if g not in written]
            if part.notes_sequence:
                if batch.sequence:
                    self._staged_by_key.pop((batch.reporter_id, batch.sequence), None)
                batch.resolve()

    async def _reload(self, reporters: set[str]) -> None:
        """Read again the marker and the ledgers of ``reporters`` (a guard failed)."""
        marker = await self.store.get(self._marker_key)
        revision = marker.mod_revision if marker is not None else 0
        if (
            revision != self._marker_revision
            and marker is not None  # (absent: it expired, this replica idle for an hour)
            and not marker.value.startswith(self._marker_tag.encode())
        ):
            _log.warning(
                "metrics checkpoint marker %s was written by another process: is another "
                "control plane running with this --node-name?",
                self._marker_key,
            )
        self._marker_revision = revision
        kvs = await asyncio.gather(*(self.store.get(reporter_key(rid)) for rid in reporters))
        now = self._clock()
        for rid, kv in zip(reporters, kvs, strict=True):
            self.ledgers.put(rid, self._ledger_of(rid, kv), now)

    async def _settle(self) -> None:
        """Find out whether a transaction whose answer was lost was written.

        Moves the marker past it (guarded by the marker's revision before it): if that
        works, it was not written and never will be (its own guard now fails); if not,
        the marker shows whether it was.
        """
        attempt = self._unsettled
        if attempt is None:
            return
        fence = f"{self._marker_tag}:{next(self._attempts)}".encode()
        try:
            result = await self.store.txn(
                [Compare(self._marker_key, self._marker_revision)],
                [Put(self._marker_key, fence, await self._ledger_lease())],
            )
        except LeaseNotFound:  # not applied: again under a new lease
            self._lease = None
            result = await self.store.txn(
                [Compare(self._marker_key, self._marker_revision)],
                [Put(self._marker_key, fence, await self._ledger_lease())],
            )
        self._unsettled = None
        if result.succeeded:
            self._marker_revision = result.revision
            _log.info("metrics checkpoint of unknown outcome was not written: writing again")
            return
        marker = await self.store.get(self._marker_key)
        if marker is not None and marker.value == attempt.marker:
            self._apply(attempt, marker.mod_revision)
            self._staged = [b for b in self._staged if not b.finished]
            self._staged_records = sum(b.group.size for b in self._staged)
            _log.info("metrics checkpoint of unknown outcome was written")
            return
        await self._reload(set())  # someone else's marker: take its revision

    async def _ledger_lease(self) -> str:
        """The lease for ledger keys and the marker: a new one every quarter of the
        reporter idle time, each lasting that time and a quarter."""
        now = time.monotonic()
        if self._lease is None or now >= self._lease_renew_at:
            ttl = self.settings.reporter_idle_ttl
            self._lease = (await self.store.grant_lease(ttl * 1.25)).lease_id
            self._lease_renew_at = now + ttl / 4
        return self._lease

    async def _checkpoint_forever(self) -> None:
        interval = self.settings.checkpoint_interval
        while True:
            # A checkpoint every interval, sooner when enough is staged (and at once
            # again when that much came in during the last one: group commit).
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._hurry.wait(), interval)
            self._hurry.clear()
            try:
                await self.checkpoint()
            except Exception as exc:  # a full or unreachable store: one line per minute
                log_failure(_log, "metrics checkpoint failed; retrying", exc, expected=(MeshError,))
                await asyncio.sleep(interval)  # not again at once, however much is staged

    # -- roll-up and retention ---------------------------------------------------------

    async def _rollup_forever(self) -> None:
        while True:
            await asyncio.sleep(30)
            try:
                await self.rollup()
            except Exception as exc:
                log_failure(_log, "metrics roll-up failed; retrying", exc, expected=(MeshError,))

    async def rollup(self) -> int:
        """Merge old fine buckets into coarser ones, drop expired ones; returns changes.

        Runs between checkpoints (it holds their lock), on durable buckets only.
        """
        async with self._checkpoint_lock:
            await self._settle()
            return await self._rollup()

    async def _rollup(self) -> int:
        now = self._clock()
        changes = 0
        deletes, self._unsaved_deletes = self._unsaved_deletes, {}
        targets, self._unsaved_targets = self._unsaved_targets, set()
        for (width, keep), (next_width, _) in itertools.pairwise(_TIERS):
            for key in [k for k in self._buckets if k[1] == width and k[2] + width < now - keep]:
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
        self.ledgers.expire(now)  # memory only: the keys expire with their leases
        # A coarse bucket is written with the deletes of the fine buckets merged into it,
        # in one transaction, so that the store never holds both (or neither).
        rewritten: dict[_BucketKey, list[Put | Delete]] = {
            key: [Put(self._key(*key), _encode_bucket(self._buckets[key]))]
            for key in sorted(targets)
            if key in self._buckets
        }
        alone: list[list[Put | Delete]] = []
        for stored in deletes:
            into = self._rollup_target(stored)
            if into is not None and into in rewritten:
                rewritten[into].append(Delete(stored))
            else:
                alone.append([Delete(stored)])
        groups = [*rewritten.values(), *alone]
        if groups:
            try:
                for ops in self._transactions(groups):
                    await self.store.txn((), ops)
            except BaseException:
                # Memory is rolled up already: the store follows with the next try.
                self._unsaved_deletes = {**deletes, **self._unsaved_deletes}
                self._unsaved_targets |= targets
                raise
        if self._legacy_shards and now >= self._next_sweep:
            await self.sweep_ledgers()
        return changes

    async def sweep_ledgers(self) -> int:
        """Delete the per-replica ledger shards of the old layout once every reporter
        in them is idle beyond the reporter idle time (and only if the shard did not
        change since it was read). Returns the shards deleted."""
        now = self._clock()
        self._next_sweep = now + self.settings.reporter_idle_ttl / 4
        cutoff = now - self.settings.reporter_idle_ttl
        deleted = 0
        left = False
        for kv in await self.store.range(REPORTERS):
            if not is_legacy_key(kv.key):
                continue
            left = True
            try:
                newest = newest_legacy(kv.value)
            except (ValueError, KeyError, TypeError, IndexError):
                newest = 0.0  # unreadable: nobody can use it
            if newest < cutoff:
                result = await self.store.txn([Compare(kv.key, kv.mod_revision)], [Delete(kv.key)])
                deleted += result.succeeded
        if deleted:
            _log.info("metrics deleted %d idle reporter ledger shards of the old layout", deleted)
        self._legacy_shards = left
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


def _edges(
    targets: list[_Target],
    numbers: np.ndarray,
    caller_names: list[str],
    callers: np.ndarray,
    codes: np.ndarray,
) -> dict[tuple[str, str, int], int]:
    """Calls per (service, caller, status code): records by their target's number,
    their caller's number in ``caller_names`` and their code."""
    services: dict[str, int] = {}
    service_of = np.array(
        [services.setdefault(service, len(services)) for (service, _, _), _ in targets],
        dtype=np.int64,
    )
    width = len(caller_names) * _CODES
    key = service_of[numbers] * width + callers * _CODES + codes
    space = len(services) * width
    if space <= 4 * key.size + 1024:  # the usual: a few services, callers and codes
        all_counts = np.bincount(key, minlength=space)
        present = np.flatnonzero(all_counts)
        counts = all_counts[present]
    else:
        present, counts = np.unique(key, return_counts=True)
    names = list(services)
    return {
        (names[k // width], caller_names[k % width // _CODES], k % _CODES): n
        for k, n in zip(present.tolist(), counts.tolist(), strict=True)
    }


def _consume(future: asyncio.Future[Ingested]) -> None:
    """Retrieve the outcome nobody waits for (the batch stays staged on failure)."""
    if not future.cancelled():
        future.exception()


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
    return _join_rows(
        [_encode_row(k, s) for k, s in series.items()], [_encode_codes(s) for s in series.values()]
    )


def _encode_row(key: SeriesKey, stats: BucketStats) -> str:
    """One series of a stored bucket (JSON)."""
    return json.dumps(
        [
            key.operation,
            key.instance_id,
            key.version,
            stats.failures,
            stats.infrastructure_failures,
            base64.b64encode(stats.sketch.to_bytes()).decode(),
        ],
        separators=(",", ":"),
    )


def _encode_codes(stats: BucketStats) -> str:
    """A series' failures per status code (JSON object, codes as keys)."""
    return json.dumps(
        {str(code): n for code, n in sorted(stats.codes.items())}, separators=(",", ":")
    )


def _join_rows(rows: list[str], codes: list[str]) -> bytes:
    """A stored bucket: ``{"v":1,"series":[row,...],"codes":[{code:calls},...]}``, as
    ``json.dumps`` writes it. ``codes`` lines up with ``series``; it sits beside it
    (not in the rows) so that a reader that knows only ``series`` reads these buckets,
    and a bucket without it (stored before codes were kept) reads as no code known."""
    return f'{{"v":1,"series":[{",".join(rows)}],"codes":[{",".join(codes)}]}}'.encode()


def _decode_bucket(data: bytes) -> dict[SeriesKey, BucketStats]:
    doc = json.loads(data)
    rows = doc["series"]
    codes = doc.get("codes")
    if not isinstance(codes, list) or len(codes) != len(rows):
        codes = [{}] * len(rows)
    out: dict[SeriesKey, BucketStats] = {}
    for (operation, instance_id, version, failures, infra, sketch), by_code in zip(
        rows, codes, strict=True
    ):
        out[SeriesKey(operation, instance_id, version)] = BucketStats(
            LatencySketch.from_bytes(base64.b64decode(sketch)),
            failures,
            infra,
            {int(code): int(n) for code, n in by_code.items()} if isinstance(by_code, dict) else {},
        )
    return out


def _add_codes(one: dict[int, int], other: dict[int, int]) -> dict[int, int]:
    """Failures per status code of both (a new dict)."""
    if not other:
        return dict(one)
    total = dict(one)
    for code, n in other.items():
        total[code] = total.get(code, 0) + n
    return total


def merge_stats(stats: Iterable[BucketStats]) -> BucketStats:
    """One BucketStats holding all of ``stats`` (inputs unchanged)."""
    total = BucketStats()
    for item in stats:
        total.sketch.merge(item.sketch)
        total.failures += item.failures
        total.infrastructure_failures += item.infrastructure_failures
        for code, n in item.codes.items():
            total.codes[code] = total.codes.get(code, 0) + n
    return total
