"""The metrics service: ingest, reports, alerts, and feedback to the registry.

Feedback: the call outcomes that name an instance go to the registry's outlier
ejection in order, one task per batch (infrastructure faults count; business
rejections count as successes; a run of successes is told once, since a success only
resets the count of faults in a row), and every 5 s each instance's infrastructure
error rate over that period feeds the registry's performance multiplier.

Alerts are evaluated every 10 s over the last 5 minutes; an alert keeps the time it
first fired for as long as it keeps firing (one episode).

Ingest is exactly once, across replicas, for batches that carry a reporter id and a
batch sequence: a batch sent again (after a cut stream, a lost answer, an UNAVAILABLE
from a failed durable write, or to another replica after a failover) is acknowledged,
with the same accepted and rejected figures, without being counted again; the ledger
of counted batches is in the shared store, written with the records. Batches with
sequence 0 are counted every time they arrive. ``deliver_calls`` acknowledges each
batch of a stream as soon as it is durable, so a reporter holds only the batches
whose acknowledgement it has not had.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from flext_mesh.errors import (
    FieldViolation,
    InvalidArgument,
    MeshError,
    NotFound,
    ResourceExhausted,
)
from flext_mesh.logs import log_failure
from flext_mesh.metrics import analysis
from flext_mesh.metrics.aggregator import (
    Aggregator,
    AggregatorSettings,
    BucketStats,
    Ingested,
    SeriesKey,
)
from flext_mesh.metrics.records import CallBatch
from flext_mesh.metrics.report import alert_message, build_report, evaluate_alerts
from flext_mesh.names import MAX_NAME, check_length, raise_if
from flext_mesh.paging import decode_page_token, encode_page_token
from flext_mesh.store import Store
from flext_mesh.v1 import metrics_pb2

__all__ = ["ALERT_WINDOW", "CallFeedback", "Metrics", "StreamTotals"]

_log = logging.getLogger("flext_mesh.metrics")

#: Window over which alerts are evaluated, seconds.
ALERT_WINDOW = 300.0
_MAX_LISTED_REJECTIONS = 1000
#: Batches of one DeliverCalls stream read and not yet acknowledged, at most: past it
#: the stream is not read until acknowledgements catch up (flow control holds the
#: reporter back).
MAX_UNACKNOWLEDGED_BATCHES = 256


@dataclass(slots=True)
class StreamTotals:
    """What a StreamCalls stream delivered."""

    accepted: int = 0
    rejected_count: int = 0
    batches: int = 0
    rejected: list[metrics_pb2.RejectedRecord] | None = None
    duplicate_batches: int = 0


class CallFeedback(Protocol):
    """Where call outcomes go to move weights and eject outliers (the registry)."""

    async def record_call(
        self, service: str, instance_id: str, *, infrastructure_failure: bool
    ) -> None:
        """One call to an instance ended; ``infrastructure_failure`` when it faulted."""
        ...

    def set_call_stats(
        self, service: str, instance_id: str, error_rate: float, latency_ms: float | None
    ) -> None:
        """An instance's recent infrastructure error rate and latency."""
        ...


class Metrics:
    """The metrics domain service (no gRPC: errors are MeshErrors)."""

    def __init__(
        self,
        store: Store,
        registry: CallFeedback | None = None,
        settings: AggregatorSettings | None = None,
        thresholds: analysis.Thresholds | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.thresholds = thresholds or analysis.Thresholds()
        self._clock = clock
        self.aggregator = Aggregator(
            store, settings, on_outcomes=self._feed_outcomes if registry else None, clock=clock
        )
        self._alerts: dict[str, metrics_pb2.Alert] = {}
        self._fire_times: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Load history and start the background evaluation."""
        await self.aggregator.start()
        self._tasks = [
            asyncio.create_task(self._alerts_forever(), name="metrics-alerts"),
            asyncio.create_task(self._feedback_forever(), name="metrics-feedback"),
        ]

    async def stop(self) -> None:
        """Stop background work and write the last checkpoint."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self.aggregator.stop()

    # -- ingest ----------------------------------------------------------------------

    async def report_calls(
        self,
        records: Sequence[metrics_pb2.CallRecord] | CallBatch,
        *,
        reporter_id: str = "",
        sequence: int = 0,
    ) -> Ingested:
        """Ingest one batch; returns once the accepted records are durable (for a
        duplicate batch: once its first copy is)."""
        return await self.aggregator.ingest(records, reporter_id=reporter_id, sequence=sequence)

    async def stream_calls(
        self, batches: AsyncIterator[metrics_pb2.StreamCallsRequest]
    ) -> StreamTotals:
        """Ingest a stream of batches; a bad batch is counted, not fatal to the stream."""
        totals = StreamTotals(rejected=[])
        assert totals.rejected is not None
        outcomes: list[Ingested | asyncio.Future[Ingested]] = []
        async for batch in batches:
            totals.batches += 1
            try:
                outcomes.append(
                    self.aggregator.submit(
                        batch, reporter_id=batch.reporter_id, sequence=batch.batch_sequence
                    )
                )
            except InvalidArgument as exc:
                outcomes.append(Ingested(0, _rejections(exc, len(batch.records))))
        # Answered once every batch is durable; a failed write fails the stream.
        durable = await asyncio.gather(
            *(o for o in outcomes if isinstance(o, asyncio.Future)), return_exceptions=True
        )
        if error := next((d for d in durable if isinstance(d, BaseException)), None):
            raise error
        written = iter(durable)
        for outcome in outcomes:
            result = next(written) if isinstance(outcome, asyncio.Future) else outcome
            assert isinstance(result, Ingested)
            totals.duplicate_batches += result.duplicate
            totals.accepted += result.accepted
            totals.rejected_count += len(result.rejected)
            room = _MAX_LISTED_REJECTIONS - len(totals.rejected)
            totals.rejected.extend(result.rejected[:room])
        return totals

    async def deliver_calls(
        self, batches: AsyncIterator[metrics_pb2.DeliverCallsRequest]
    ) -> AsyncIterator[tuple[int, Ingested]]:
        """Ingest a stream of numbered batches; yields (batch_sequence, outcome) for each
        as soon as it is durably counted, in that order (not the order they came in).

        A batch with no good record is acknowledged with every record rejected; one
        without a reporter id or sequence ends the stream (InvalidArgument), and so
        does a failed durable write (its error: the reporter sends again what was not
        acknowledged).
        """
        acks: asyncio.Queue[tuple[int, Ingested] | BaseException | None] = asyncio.Queue()
        room = asyncio.Semaphore(MAX_UNACKNOWLEDGED_BATCHES)
        unanswered = 0

        def durable(sequence: int, future: asyncio.Future[Ingested]) -> None:
            room.release()
            if future.cancelled():
                acks.put_nowait(asyncio.CancelledError())
            elif (error := future.exception()) is not None:
                acks.put_nowait(error)
            else:
                acks.put_nowait((sequence, future.result()))

        async def read() -> None:
            nonlocal unanswered
            async for batch in batches:
                sequence = batch.batch_sequence
                if not sequence or not batch.reporter_id:
                    raise InvalidArgument.from_violations(
                        [
                            FieldViolation(
                                "batch_sequence" if not sequence else "reporter_id",
                                "is required on DeliverCalls (every batch is acknowledged by "
                                "its reporter_id and batch_sequence)",
                            )
                        ]
                    )
                await room.acquire()
                unanswered += 1
                try:
                    future = self.aggregator.submit(
                        batch, reporter_id=batch.reporter_id, sequence=sequence
                    )
                except (InvalidArgument, ResourceExhausted) as exc:
                    room.release()
                    acks.put_nowait((sequence, Ingested(0, _refused(exc, len(batch.records)))))
                    continue
                future.add_done_callback(functools.partial(durable, sequence))

        reader = asyncio.create_task(read(), name="metrics-deliver-calls-reader")
        reader.add_done_callback(lambda _: acks.put_nowait(None))
        try:
            reading = True
            while reading or unanswered:
                item = await acks.get()
                if item is None:
                    reading = False
                    if (error := reader.exception()) is not None:
                        raise error
                elif isinstance(item, BaseException):
                    raise item
                else:
                    unanswered -= 1
                    yield item
        finally:
            reader.cancel()

    # -- reports -------------------------------------------------------------------

    async def service_report(
        self,
        service: str,
        window: float,
        *,
        operation: str = "",
        by_version: bool = False,
        by_instance: bool = False,
    ) -> metrics_pb2.ServiceReport:
        """The report of a service; NotFound when it has no call in the window."""
        violations = []
        if not service:
            violations.append(FieldViolation("service_name", "is required"))
        if not 10 <= window <= self.aggregator.settings.retention:
            violations.append(
                FieldViolation(
                    "window",
                    f"must be between 10s and the retention "
                    f"({self.aggregator.settings.retention:g}s), got {window:g}s",
                )
            )
        if violations:
            raise InvalidArgument.from_violations(violations)
        now = self._clock()
        # The whole history tells how long each series has been seen (throughput over
        # the part of the window a young service existed); the window is its tail.
        history = self._snapshot(service, self.aggregator.settings.retention)
        buckets = [item for item in history if item[0] >= now - window]
        if operation:
            buckets = [
                (s, w, {k: v for k, v in series.items() if k.operation == operation})
                for s, w, series in buckets
            ]
        if not any(series for _, _, series in buckets):
            what = f"operation {operation!r} of service" if operation else "service"
            raise NotFound(f"{what} {service!r} has no call recorded in the last {window:g}s")
        return await asyncio.to_thread(
            build_report,
            service,
            buckets,
            window,
            self.thresholds,
            now=now,
            operation=operation,
            by_version=by_version,
            by_instance=by_instance,
            fire_times=dict(self._fire_times),
            history=history,
        )

    def _snapshot(
        self, service: str, window: float
    ) -> list[tuple[int, int, dict[SeriesKey, BucketStats]]]:
        """The window's buckets, with the still-open ones copied (a thread reads them)."""
        now = self._clock()
        out: list[tuple[int, int, dict[SeriesKey, BucketStats]]] = []
        for start, width, series in self.aggregator.window(service, window):
            still_open = start + width > now - 1
            out.append(
                (
                    start,
                    width,
                    {
                        k: BucketStats(
                            v.sketch.copy(), v.failures, v.infrastructure_failures, dict(v.codes)
                        )
                        if still_open
                        else v
                        for k, v in series.items()
                    },
                )
            )
        return out

    # -- alerts ----------------------------------------------------------------------

    async def evaluate_alerts(self) -> list[metrics_pb2.Alert]:
        """Re-evaluate every service's alerts; returns those firing."""
        now = self._clock()
        firing: dict[str, metrics_pb2.Alert] = {}
        for service in self.aggregator.services():
            buckets = self._snapshot(service, ALERT_WINDOW)
            found = await asyncio.to_thread(
                evaluate_alerts, service, buckets, ALERT_WINDOW, self.thresholds, now=now
            )
            for item in found:
                self._fire_times.setdefault(item.alert_id, now)
                firing[item.alert_id] = alert_message(item, self._fire_times)
        for alert_id in list(self._fire_times):
            if alert_id not in firing:
                del self._fire_times[alert_id]
        self._alerts = firing
        return list(firing.values())

    def list_alerts(
        self, service: str, min_severity: int, page_size: int, page_token: str
    ) -> metrics_pb2.ListAlertsResponse:
        """Active alerts, most severe first, then newest first, paged."""
        violations = check_length("service_name", service, MAX_NAME)
        if min_severity not in metrics_pb2.AlertSeverity.values():
            violations.append(
                FieldViolation("min_severity", f"{min_severity} is not a known severity")
            )
        if page_size > 1000:
            violations.append(FieldViolation("page_size", f"{page_size} is over the maximum 1000"))
        raise_if(violations)
        query = ("ListAlerts", service, min_severity)
        cursor = decode_page_token(page_token, query)
        offset = int(cursor) if cursor.isascii() and cursor.isdigit() else 0
        alerts = [
            a
            for a in self._alerts.values()
            if (not service or a.service_name == service) and a.severity >= min_severity
        ]
        alerts.sort(key=lambda a: (-a.severity, -a.fire_time.ToNanoseconds(), a.alert_id))
        size = page_size or 100
        page = alerts[offset : offset + size]
        response = metrics_pb2.ListAlertsResponse(alerts=page)
        if offset + size < len(alerts):
            response.next_page_token = encode_page_token(str(offset + size), query)
        return response

    async def _alerts_forever(self) -> None:
        while True:
            await asyncio.sleep(10)
            try:
                await self.evaluate_alerts()
            except Exception as exc:
                log_failure(_log, "alert evaluation failed", exc, expected=(MeshError,))

    # -- feedback to the registry ---------------------------------------------------------

    async def _feed_outcomes(self, outcomes: list[tuple[str, str, list[bool]]]) -> None:
        """Hand one batch's outcomes to outlier ejection, per instance in order."""
        assert self.registry is not None
        for service, instance, ok in outcomes:
            try:
                for flag in ok:
                    await self.registry.record_call(
                        service, instance, infrastructure_failure=not flag
                    )
            except Exception as exc:  # one instance's failure stops only its own outcomes
                _log.error("outcome feedback failed: %s", exc)

    async def _feedback_forever(self) -> None:
        while True:
            await asyncio.sleep(5)
            self.feed_error_rates()

    def feed_error_rates(self) -> None:
        """Hand each instance's recent error rate and latency to the registry."""
        if self.registry is None:
            return
        for (service, instance), stats in self.aggregator.drain_instance_window().items():
            calls, infra, latency = stats
            self.registry.set_call_stats(service, instance, infra / calls, latency)

    def call_series(self) -> Iterable[tuple[str, str, str, list[int], float]]:
        """Cumulative (service, operation, outcome, bucket counts, sum ms) for Prometheus."""
        for (service, operation, outcome), (counts, total) in self.aggregator.prometheus.items():
            yield service, operation, outcome, [int(c) for c in counts], float(total)  # type: ignore[union-attr]

    def caller_series(self) -> Iterable[tuple[str, str, int, int]]:
        """Cumulative (service, caller, status code, calls) for Prometheus."""
        for (service, caller, code), calls in self.aggregator.prometheus_edges.items():
            yield service, caller, code, calls


def _refused(
    exc: InvalidArgument | ResourceExhausted, size: int
) -> tuple[metrics_pb2.RejectedRecord, ...]:
    """The records of a batch refused as a whole, each with the reason."""
    if isinstance(exc, InvalidArgument):
        return _rejections(exc, size)
    return tuple(
        metrics_pb2.RejectedRecord(index=i, field="operation", reason=exc.message)
        for i in range(size)
    )


def _rejections(exc: InvalidArgument, size: int) -> tuple[metrics_pb2.RejectedRecord, ...]:
    """The records of a refused batch, each with its reason (a fault of the batch as a
    whole, such as its reporter_id, refuses every record)."""
    out: list[metrics_pb2.RejectedRecord] = []
    for v in exc.violations:
        if v.field.startswith("records["):
            out.append(
                metrics_pb2.RejectedRecord(
                    index=_index_of(v.field), field=_field_of(v.field), reason=v.description
                )
            )
        else:
            out.extend(
                metrics_pb2.RejectedRecord(index=i, field=v.field, reason=v.description)
                for i in range(max(size, 1))
            )
    return tuple(out)


def _index_of(path: str) -> int:
    # "records[12].duration_ms" -> 12
    if path.startswith("records[") and "]" in path:
        return int(path[len("records[") : path.index("]")])
    return 0


def _field_of(path: str) -> str:
    return path.split(".", 1)[1] if "." in path else path
