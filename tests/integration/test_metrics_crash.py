"""Acknowledged call reports survive kill -9 of the control plane."""

from __future__ import annotations

from pathlib import Path

import grpc

from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc
from tests.conftest import start_serve


def test_kill_9_loses_no_acknowledged_call_record(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'crash.db'}"
    server = start_serve(tmp_path, "--store", store)
    accepted = 0
    with grpc.insecure_channel(server.address) as channel:
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        for batch in range(5):
            records = [
                metrics_pb2.CallRecord(
                    service_name="payment",
                    operation="charge",
                    duration_ms=float(1 + (batch * 400 + i) % 97),
                    success=True,
                )
                for i in range(400)
            ]
            reply = stub.ReportCalls(metrics_pb2.ReportCallsRequest(records=records), timeout=10)
            accepted += reply.accepted
    server.kill()  # right after the last acknowledgement

    restarted = start_serve(tmp_path, "--store", store)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            stub = metrics_pb2_grpc.MetricsServiceStub(channel)
            report = stub.GetServiceReport(
                metrics_pb2.GetServiceReportRequest(service_name="payment"), timeout=10
            ).report
        assert report.summary.total_calls == accepted == 2000
        assert report.summary.max_ms == 97
    finally:
        restarted.terminate()
