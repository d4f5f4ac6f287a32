"""/metrics on the control plane's HTTP port, scraped for real and parsed by Prometheus' parser."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flext_mesh.server import create_server
from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc
from tests.registry.conftest import fast_config


def _scrape(port: int) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = [(s.name, s.labels, s.value) for s in family.samples]
    return out


async def test_scrape_shows_mesh_calls_and_the_control_planes_own_rpcs(tmp_path: Path) -> None:
    plane, port = await create_server(fast_config(tmp_path))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = metrics_pb2_grpc.MetricsServiceStub(channel)
            records = [
                metrics_pb2.CallRecord(
                    service_name="payment",
                    operation="charge",
                    duration_ms=3.0 if i < 90 else 700.0,
                    success=i % 10 != 9,
                    status_code=0 if i % 10 != 9 else 14,
                )
                for i in range(100)
            ]
            await stub.ReportCalls(metrics_pb2.ReportCallsRequest(records=records))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetServiceReport(metrics_pb2.GetServiceReportRequest(service_name="x"))
        families = await asyncio.to_thread(_scrape, plane.http_port)
    finally:
        await plane.stop(0.2)

    calls = {s[1]["outcome"]: s[2] for s in families["flext_mesh_calls"] if s[0].endswith("_total")}
    assert calls == {"success": 90.0, "infrastructure_error": 10.0}
    duration = families["flext_mesh_call_duration_seconds"]
    buckets = {(s[1]["outcome"], s[1]["le"]): s[2] for s in duration if s[0].endswith("_bucket")}
    # Fast (3 ms): i < 90. Failed: i = 9, 19, ..., 99. So 81 fast and 9 slow successes,
    # 9 fast and 1 slow (i = 99) failures.
    assert buckets[("success", "0.005")] == 81.0
    assert buckets[("success", "+Inf")] == 90.0
    assert buckets[("infrastructure_error", "0.005")] == 9.0
    assert buckets[("infrastructure_error", "+Inf")] == 10.0
    sums = {s[1]["outcome"]: s[2] for s in duration if s[0].endswith("_sum")}
    assert abs(sums["success"] - (81 * 0.003 + 9 * 0.7)) < 1e-9

    handled = {
        (s[1]["grpc_method"], s[1]["grpc_code"]): s[2]
        for s in families["flext_mesh_rpc_server_handled"]
        if s[0].endswith("_total")
    }
    assert handled[("ReportCalls", "OK")] == 1.0
    assert handled[("GetServiceReport", "NOT_FOUND")] == 1.0
    assert "flext_mesh_build_info" in families
