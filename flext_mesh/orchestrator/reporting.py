"""Durations of executions and steps, reported to the metrics service in batches.

Each workflow is a metrics series ``workflow/NAME`` (``workflow/inline`` for inline
definitions): every settled step is a call record whose operation is the step's name,
every ended execution one whose operation is ``execution``. Records are queued and
handed to ``report`` every ``metrics_flush_interval`` seconds, and once more at stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Protocol

import grpc

from flext_mesh.logs import log_failure
from flext_mesh.orchestrator.history import ExecutionState, ExecutionView
from flext_mesh.v1 import metrics_pb2

__all__ = ["METRICS_PREFIX", "Durations", "Reporter", "end_record", "step_record"]

_log = logging.getLogger("flext_mesh.orchestrator")

#: Metrics service name prefix of workflow executions.
METRICS_PREFIX = "workflow/"


class Durations(Protocol):
    """Where settled steps and ended executions are also observed as they happen
    (Prometheus histograms under their own names), beside the metrics service."""

    def step(self, workflow: str, step: str, code: str, seconds: float) -> None:
        """A step settled with gRPC status ``code`` (``OK``) after ``seconds``."""

    def execution(self, workflow: str, state: str, seconds: float) -> None:
        """An execution ended in ``state`` (``SUCCEEDED``) after ``seconds``."""


class Reporter:
    """Queues duration records and hands them to ``report`` in batches."""

    def __init__(
        self,
        report: Callable[[Sequence[metrics_pb2.CallRecord]], object] | None,
        flush_interval: float,
    ) -> None:
        """``report`` receives batches of records (None: nothing is kept)."""
        self._report = report
        self._flush_interval = flush_interval
        self._records: list[metrics_pb2.CallRecord] = []

    def record(self, record: metrics_pb2.CallRecord) -> None:
        """Queue a duration record for the metrics service."""
        if self._report is not None:
            self._records.append(record)

    def flush(self) -> None:
        """Hand the queued records over now."""
        if self._records and self._report is not None:
            records, self._records = self._records, []
            try:
                self._report(records)
            except Exception as exc:
                log_failure(_log, "reporting workflow durations failed", exc)

    async def flush_forever(self) -> None:
        """Flush every ``flush_interval`` seconds."""
        while True:
            await asyncio.sleep(self._flush_interval)
            self.flush()


def _series(view: ExecutionView) -> str:
    return METRICS_PREFIX + (view.execution.workflow_name or "inline")


def step_record(
    view: ExecutionView, name: str, success: bool, code: grpc.StatusCode
) -> metrics_pb2.CallRecord:
    """The record of a settled step."""
    record = view.step(name)
    return metrics_pb2.CallRecord(
        service_name=_series(view),
        operation=name,
        duration_ms=record.duration.ToNanoseconds() / 1e6,
        success=success,
        status_code=code.value[0],
        correlation_id=view.execution.correlation_id,
        time_unix_nano=record.start_time.ToNanoseconds(),
        side=metrics_pb2.CALL_SIDE_SERVER,
    )


def end_record(view: ExecutionView) -> metrics_pb2.CallRecord:
    """The record of an ended execution."""
    execution = view.execution
    success = view.state == ExecutionState.SUCCEEDED
    return metrics_pb2.CallRecord(
        service_name=_series(view),
        operation="execution",
        duration_ms=execution.duration.ToNanoseconds() / 1e6,
        success=success,
        status_code=0 if success else (execution.error.code or 2),
        correlation_id=execution.correlation_id,
        time_unix_nano=execution.start_time.ToNanoseconds(),
        side=metrics_pb2.CALL_SIDE_SERVER,
    )
