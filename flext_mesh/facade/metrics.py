"""``FlextServices.ServiceMetrics``: the guide's call tracking, backed by MetricsService.

``track_service_call`` checks its arguments and queues a call record without blocking;
a :class:`flext_mesh.hosting.reporter.CallReporter` on the bridge loop streams the records to the
control plane in batches (about once a second), and ``flush()`` / ``close()`` send what
is still queued. ``report(service)`` answers from ``MetricsService.GetServiceReport``
in the shape of the guide's performance report, so percentiles, health score and
grade come from every process that reports calls for the service, not just this one.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from collections.abc import Mapping
from datetime import UTC, datetime

from google.protobuf import timestamp_pb2

from flext_mesh.facade.registry import ControlPlaneClient, enum_name
from flext_mesh.hosting.reporter import CallReporter, ReporterSettings
from flext_mesh.result import FlextResult
from flext_mesh.rpc.channels import ClientSecurity
from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc

__all__ = ["ServiceMetrics"]

# What the control plane accepts in a call record (see metrics.proto).
_MAX_NAME = 63
_MAX_DURATION_MS = 86_400_000.0
_MAX_METADATA_BYTES = 4096


class ServiceMetrics(ControlPlaneClient):
    """Tracks service calls and reports on them (the guide's API).

    Records are sent in the background; ``report`` flushes first, so it includes the
    calls tracked here. ``settings`` tunes the reporter's buffering and batching.
    """

    def __init__(
        self,
        control_plane: str | None = None,
        *,
        timeout: float = 10.0,
        reporter_id: str | None = None,
        settings: ReporterSettings | None = None,
        security: ClientSecurity | None = None,
    ) -> None:
        super().__init__(control_plane, timeout=timeout, security=security)
        self.reporter_id = reporter_id or f"flext-services-{socket.gethostname()}-{os.getpid()}"
        """Who the records come from, for the control plane's diagnostics."""
        self._settings = settings
        self._reporter: CallReporter | None = None  # bridge loop only

    # -- tracking ----------------------------------------------------------------------

    def track_service_call(
        self,
        service: str,
        operation: str,
        duration_ms: float,
        success: bool = True,
        metadata: Mapping[str, object] | None = None,
    ) -> FlextResult[None]:
        """Record one call of ``service.operation`` that took ``duration_ms``.

        Never blocks: the record is queued and sent in the background. Fails
        (INVALID_ARGUMENT) on an empty or over-long name, a duration that is not a
        finite number from 0 to one day, or metadata over 4 KiB as JSON.
        """
        built = _record(service, operation, duration_ms, success, metadata)
        if built.is_failure:
            return FlextResult.fail(
                built.error, code=built.code, field_violations=built.field_violations
            )
        if self._closed:
            return FlextResult.fail(
                "track_service_call: this ServiceMetrics is closed", code="FAILED_PRECONDITION"
            )
        try:
            self._loop_bridge().loop.call_soon_threadsafe(self._queue, built.value)
        except RuntimeError as exc:  # the bridge's loop was closed (interpreter exit)
            return FlextResult.fail(f"track_service_call: {exc}", code="FAILED_PRECONDITION")
        return FlextResult.ok(None)

    async def atrack_service_call(
        self,
        service: str,
        operation: str,
        duration_ms: float,
        success: bool = True,
        metadata: Mapping[str, object] | None = None,
    ) -> FlextResult[None]:
        """Async twin of :meth:`track_service_call` (which never blocks either)."""
        return self.track_service_call(service, operation, duration_ms, success, metadata)

    def _queue(self, record: metrics_pb2.CallRecord) -> None:
        """Hand ``record`` to the reporter (bridge loop; starts the reporter if needed)."""
        if self._closed:
            return
        if self._reporter is None:
            self._reporter = CallReporter(
                self._get_channel, reporter_id=self.reporter_id, settings=self._settings
            )
            self._reporter.start()
        self._reporter.record(record)

    # -- flushing ----------------------------------------------------------------------

    def flush(self) -> FlextResult[int]:
        """Send every queued record now; returns how many the control plane took.

        UNAVAILABLE when the control plane could not be reached within ``timeout``:
        the records not delivered are then dropped (and counted in the message).
        """
        return self._call("flush", self._flush())

    async def aflush(self) -> FlextResult[int]:
        """Async twin of :meth:`flush`."""
        return await self._acall("flush", self._flush())

    async def _flush(self) -> FlextResult[int]:
        # CallReporter sends a partial batch only on its interval or when closing:
        # close this one (which flushes and waits for the acknowledgement) and let the
        # next tracked call start a new one.
        reporter, self._reporter = self._reporter, None
        if reporter is None:
            return FlextResult.ok(0)
        await reporter.aclose(flush=True, within=max(self.timeout - 0.5, self.timeout / 2))
        stats = reporter.stats()
        undelivered = stats.buffered + stats.in_flight
        if undelivered:
            return FlextResult.fail(
                f"flush: {undelivered} tracked call(s) could not be delivered to the control "
                f"plane at {self.control_plane} within {self.timeout:g}s and were dropped",
                code="UNAVAILABLE",
            )
        if stats.rejected:
            return FlextResult.fail(
                f"flush: the control plane refused {stats.rejected} of {stats.sent} tracked calls",
                code="INVALID_ARGUMENT",
            )
        return FlextResult.ok(stats.sent)

    # -- reports -----------------------------------------------------------------------

    def report(self, service: str, window_hours: float = 24) -> FlextResult[dict[str, object]]:
        """The performance report of ``service`` over the last ``window_hours`` hours.

        Shape (the guide's): ``service`` / ``service_name``, ``time_window_hours``,
        ``report_generated_at``, ``summary`` (``total_calls``, ``success_rate``,
        ``error_rate``, ``average_duration_ms``, ``throughput_per_hour``,
        ``health_score``, ``performance_grade``, percentiles), ``operations`` (per
        operation: ``calls``, ``success_rate``, ``min_ms``, ``max_ms``, ``median_ms``,
        ``p95_ms``, ``p99_ms``, ..., also under the guide's ``*_duration_ms`` names),
        ``recommendations`` (strings) and ``alerts`` (dicts). Percentiles are within 1%.
        NOT_FOUND when the service has no call in the window.
        """
        return self._call("report", self._report(service, window_hours))

    async def areport(
        self, service: str, window_hours: float = 24
    ) -> FlextResult[dict[str, object]]:
        """Async twin of :meth:`report`."""
        return await self._acall("report", self._report(service, window_hours))

    async def _report(self, service: str, window_hours: float) -> FlextResult[dict[str, object]]:
        if (
            isinstance(window_hours, bool)
            or not isinstance(window_hours, int | float)
            or not (math.isfinite(window_hours) and window_hours > 0)
        ):
            return FlextResult.fail(
                f"report: window_hours must be a positive number, got {window_hours!r}",
                code="INVALID_ARGUMENT",
                field_violations=[("window_hours", "must be a positive number")],
            )
        flushed = await self._flush()
        if flushed.is_failure and flushed.code == "UNAVAILABLE":
            return FlextResult.fail(f"report: {flushed.error}", code="UNAVAILABLE")
        request = metrics_pb2.GetServiceReportRequest(service_name=service)
        request.window.FromNanoseconds(int(window_hours * 3600e9))
        stub = metrics_pb2_grpc.MetricsServiceStub(self._get_channel())
        reply = await stub.GetServiceReport(request, timeout=self.timeout)
        return FlextResult.ok(report_to_dict(reply.report, window_hours))

    # -- lifecycle ---------------------------------------------------------------------

    async def _shutdown(self) -> FlextResult[None]:
        """Flush what is queued, then stop the reporter."""
        flushed = await self._flush()
        if flushed.is_failure:
            return FlextResult.fail(f"close: {flushed.error}", code=flushed.code)
        return FlextResult.ok(None)


def _record(
    service: object,
    operation: object,
    duration_ms: object,
    success: object,
    metadata: Mapping[str, object] | None,
) -> FlextResult[metrics_pb2.CallRecord]:
    """The call record of a tracked call, or the violations of its arguments."""
    violations: list[tuple[str, str]] = []
    for field, value in (("service", service), ("operation", operation)):
        if not (
            isinstance(value, str)
            and 0 < len(value) <= _MAX_NAME
            and value.isprintable()
            and not value.isspace()
        ):
            violations.append((field, f"must be 1 to {_MAX_NAME} printable characters"))
    if (
        isinstance(duration_ms, bool)
        or not isinstance(duration_ms, int | float)
        or not (0.0 <= duration_ms <= _MAX_DURATION_MS)  # also NaN
    ):
        violations.append(
            ("duration_ms", f"must be a finite number from 0 to 1 day, got {duration_ms!r}")
        )
    if not isinstance(success, bool):
        violations.append(("success", f"must be a bool, got {success!r}"))
    record = metrics_pb2.CallRecord(side=metrics_pb2.CALL_SIDE_SERVER)
    if metadata is not None:
        if not isinstance(metadata, Mapping):
            violations.append(("metadata", "must be a dict"))
        else:
            safe = json.loads(json.dumps({str(k): v for k, v in metadata.items()}, default=str))
            record.metadata.update(safe)
            if record.metadata.ByteSize() > _MAX_METADATA_BYTES:
                violations.append(("metadata", f"must be at most {_MAX_METADATA_BYTES} bytes"))
    if violations:
        return FlextResult.fail(
            "track_service_call: " + "; ".join(f"{f}: {d}" for f, d in violations),
            code="INVALID_ARGUMENT",
            field_violations=violations,
        )
    record.service_name = str(service)
    record.operation = str(operation)
    record.duration_ms = float(duration_ms)  # type: ignore[arg-type]
    record.success = bool(success)
    record.time_unix_nano = time.time_ns()
    return FlextResult.ok(record)


def _iso(ts: timestamp_pb2.Timestamp) -> str | None:
    if not ts.seconds and not ts.nanos:
        return None
    return datetime.fromtimestamp(ts.ToNanoseconds() / 1e9, UTC).isoformat()


def _stats(stats: metrics_pb2.CallStats, hours: float) -> dict[str, object]:
    """One CallStats as the guide's operation statistics (its key names and ours)."""
    trend = enum_name("TREND_", metrics_pb2.Trend.Name(stats.trend))
    return {
        "calls": stats.total_calls,
        "total_calls": stats.total_calls,
        "successful_calls": stats.successful_calls,
        "failed_calls": stats.failed_calls,
        "infrastructure_failures": stats.infrastructure_failures,
        "success_rate": stats.success_rate,
        "error_rate": stats.error_rate,
        "average_duration_ms": stats.avg_ms,
        "min_ms": stats.min_ms,
        "max_ms": stats.max_ms,
        "median_ms": stats.p50_ms,
        "p95_ms": stats.p95_ms,
        "p99_ms": stats.p99_ms,
        "min_duration_ms": stats.min_ms,
        "max_duration_ms": stats.max_ms,
        "median_duration_ms": stats.p50_ms,
        "p95_duration_ms": stats.p95_ms,
        "p99_duration_ms": stats.p99_ms,
        "throughput_per_hour": stats.total_calls / hours,
        "throughput_per_second": stats.total_calls / (hours * 3600),
        "health_score": stats.health_score,
        "performance_grade": stats.grade,
        "performance_trend": trend,
        "trend_change_percent": stats.trend_change_percent,
        "anomalies_detected": [
            {
                "kind": enum_name("ANOMALY_KIND_", metrics_pb2.AnomalyKind.Name(a.kind)),
                "operation": a.operation,
                "time": _iso(a.time),
                "observed": a.observed,
                "baseline": a.baseline,
                "score": a.score,
                "description": a.description,
            }
            for a in stats.anomalies
        ],
    }


def report_to_dict(report: metrics_pb2.ServiceReport, hours: float) -> dict[str, object]:
    """A ServiceReport in the guide's report shape (see ``ServiceMetrics.report``)."""
    operations = {
        op.operation: {"operation_name": op.operation, **_stats(op, hours)}
        for op in report.operations
    }
    summary = {"total_operations": len(operations), **_stats(report.summary, hours)}
    return {
        "service": report.service_name,
        "service_name": report.service_name,
        "time_window_hours": hours,
        "report_generated_at": _iso(report.generate_time),
        "window_start": _iso(report.window_start),
        "summary": summary,
        "operations": operations,
        "recommendations": list(report.recommendations),
        "alerts": [
            {
                "alert_id": a.alert_id,
                "service": a.service_name,
                "operation": a.operation,
                "severity": enum_name(
                    "ALERT_SEVERITY_", metrics_pb2.AlertSeverity.Name(a.severity)
                ),
                "rule": a.rule,
                "threshold": a.threshold,
                "observed": a.observed,
                "message": a.message,
                "fire_time": _iso(a.fire_time),
            }
            for a in report.alerts
        ],
    }
