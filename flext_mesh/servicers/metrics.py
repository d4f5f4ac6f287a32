"""MetricsService: protobuf in, Metrics calls, protobuf out (status codes only here)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, TypeVar

import grpc

from flext_mesh.metrics.service import Metrics
from flext_mesh.names import MAX_NAME, check_length, raise_if
from flext_mesh.rpc.handlers import LongStreams, add_servicer, checked
from flext_mesh.rpc.status import rpc_errors
from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc

__all__ = ["MetricsServicer", "add_metrics_servicer"]

_Context = grpc.aio.ServicerContext[Any, Any]
_Batch = TypeVar("_Batch", metrics_pb2.StreamCallsRequest, metrics_pb2.DeliverCallsRequest)
_DEFAULT_WINDOW = 24 * 3600.0


class MetricsServicer(metrics_pb2_grpc.MetricsServiceServicer):
    """Serves call reporting, reports and alerts."""

    def __init__(self, metrics: Metrics, streams: LongStreams | None = None) -> None:
        self.metrics = metrics
        self.streams = streams if streams is not None else LongStreams()

    @rpc_errors
    async def ReportCalls(
        self, request: metrics_pb2.ReportCallsRequest, context: _Context
    ) -> metrics_pb2.ReportCallsResponse:
        """Ingest one batch (acknowledged once durable; counted once per sequence)."""
        result = await self.metrics.report_calls(
            request, reporter_id=request.reporter_id, sequence=request.batch_sequence
        )
        return metrics_pb2.ReportCallsResponse(
            accepted=result.accepted, rejected=result.rejected, duplicate=result.duplicate
        )

    @rpc_errors
    async def StreamCalls(
        self, request_iterator: AsyncIterator[metrics_pb2.StreamCallsRequest], context: _Context
    ) -> metrics_pb2.StreamCallsResponse:
        """Ingest a stream of batches."""
        with self.streams.track():
            totals = await self.metrics.stream_calls(_decoded(request_iterator))
        return metrics_pb2.StreamCallsResponse(
            accepted=totals.accepted,
            rejected=totals.rejected,
            rejected_count=totals.rejected_count,
            batches=totals.batches,
            duplicate_batches=totals.duplicate_batches,
        )

    @rpc_errors
    async def DeliverCalls(
        self, request_iterator: AsyncIterator[metrics_pb2.DeliverCallsRequest], context: _Context
    ) -> AsyncIterator[metrics_pb2.DeliverCallsResponse]:
        """Ingest a stream of numbered batches, acknowledging each once durable."""
        # Acknowledgements are written while the next batches are read (and checked:
        # the rate limit may end the stream from the reading side). Headers sent first
        # keep that end from racing the first acknowledgement to send them.
        await context.send_initial_metadata(())
        with self.streams.track():
            async for sequence, result in self.metrics.deliver_calls(_decoded(request_iterator)):
                yield metrics_pb2.DeliverCallsResponse(
                    batch_sequence=sequence,
                    accepted=result.accepted,
                    rejected=result.rejected,
                    duplicate=result.duplicate,
                )

    @rpc_errors
    async def GetServiceReport(
        self, request: metrics_pb2.GetServiceReportRequest, context: _Context
    ) -> metrics_pb2.GetServiceReportResponse:
        """Performance report of a service over a window."""
        raise_if(
            check_length("service_name", request.service_name, MAX_NAME)
            + check_length("operation", request.operation, MAX_NAME)
        )
        retention = self.metrics.aggregator.settings.retention
        window = (
            request.window.ToNanoseconds() / 1e9
            if request.HasField("window")
            else min(_DEFAULT_WINDOW, retention)
        )
        report = await self.metrics.service_report(
            request.service_name,
            window,
            operation=request.operation,
            by_version=request.by_version,
            by_instance=request.by_instance,
        )
        return metrics_pb2.GetServiceReportResponse(report=report)

    @rpc_errors
    async def ListAlerts(
        self, request: metrics_pb2.ListAlertsRequest, context: _Context
    ) -> metrics_pb2.ListAlertsResponse:
        """Active alerts."""
        return self.metrics.list_alerts(
            request.service_name, request.min_severity, request.page_size, request.page_token
        )


async def _decoded(requests: AsyncIterator[_Batch]) -> AsyncIterator[_Batch]:
    async for request in requests:
        yield checked(request)


def add_metrics_servicer(servicer: MetricsServicer, server: grpc.aio.Server) -> None:
    """Serve the metrics service."""
    add_servicer(server, servicer, metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"])
