"""MetricsService over real gRPC: ingest, reports, windows, alerts, restart, feedback."""

from __future__ import annotations

import math
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from flext_mesh.errors import InvalidArgument
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.server import ControlPlane, create_server
from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.registry.conftest import eventually, fast_config

UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


@dataclass
class Plane:
    plane: ControlPlane
    channel: grpc.aio.Channel
    metrics: metrics_pb2_grpc.MetricsServiceStub
    registry: registry_pb2_grpc.RegistryServiceStub

    async def report(
        self, records: list[metrics_pb2.CallRecord]
    ) -> metrics_pb2.ReportCallsResponse:
        return await self.metrics.ReportCalls(metrics_pb2.ReportCallsRequest(records=records))

    async def service_report(self, service: str, **fields: object) -> metrics_pb2.ServiceReport:
        reply = await self.metrics.GetServiceReport(
            metrics_pb2.GetServiceReportRequest(service_name=service, **fields)  # type: ignore[arg-type]
        )
        return reply.report


async def _open(tmp_path: Path, **overrides: object) -> Plane:
    plane, port = await create_server(fast_config(tmp_path, **overrides))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    return Plane(
        plane,
        channel,
        metrics_pb2_grpc.MetricsServiceStub(channel),
        registry_pb2_grpc.RegistryServiceStub(channel),
    )


async def _close(p: Plane) -> None:
    await p.channel.close()
    await p.plane.stop(0.2)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Plane]:
    p = await _open(tmp_path)
    try:
        yield p
    finally:
        await _close(p)


def record(
    operation: str = "charge",
    duration: float = 10.0,
    *,
    service: str = "payment",
    ok: bool = True,
    code: int = 0,
    ago: float = 0.0,
    **fields: object,
) -> metrics_pb2.CallRecord:
    stamp = int((time.time() - ago) * 1e9) if ago else 0
    return metrics_pb2.CallRecord(
        service_name=service,
        operation=operation,
        duration_ms=duration,
        success=ok,
        status_code=code,
        time_unix_nano=stamp,
        **fields,  # type: ignore[arg-type]
    )


def batches(
    records: list[metrics_pb2.CallRecord], size: int = 500
) -> Iterator[list[metrics_pb2.CallRecord]]:
    for start in range(0, len(records), size):
        yield records[start : start + size]


async def test_a_mixed_batch_keeps_the_good_records_and_names_the_bad(mesh: Plane) -> None:
    reply = await mesh.report(
        [
            record(duration=5),
            record(duration=-1),
            record(duration=math.nan),
            record(duration=math.inf),
            record(service=""),
            record(operation=""),
            record(ago=-3600),  # an hour in the future
            record(duration=7),
        ]
    )
    assert reply.accepted == 2
    assert [(r.index, r.field) for r in reply.rejected] == [
        (1, "duration_ms"),
        (2, "duration_ms"),
        (3, "duration_ms"),
        (4, "service_name"),
        (5, "operation"),
        (6, "time_unix_nano"),
    ]
    report = await mesh.service_report("payment")
    assert report.summary.total_calls == 2


async def test_an_all_bad_batch_is_invalid_argument_naming_index_and_field(mesh: Plane) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.report([record(duration=-5), record(service="")])
    err = from_rpc_error(info.value)
    assert isinstance(err, InvalidArgument)
    assert [v.field for v in err.violations] == [
        "records[0].duration_ms",
        "records[1].service_name",
    ]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.report([record()] * 10_001)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.report([])
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_report_figures_match_what_was_recorded(mesh: Plane) -> None:
    rng = np.random.default_rng(7)
    charge = rng.lognormal(mean=math.log(40), sigma=0.6, size=20_000)
    refund = rng.uniform(1, 3, size=5_000)
    records = [record("charge", float(d)) for d in charge]
    records += [
        record("refund", float(d), ok=i % 10 != 0, code=INVALID_ARGUMENT if i % 10 == 0 else 0)
        for i, d in enumerate(refund)
    ]
    stream = mesh.metrics.StreamCalls(
        metrics_pb2.StreamCallsRequest(records=chunk, reporter_id="test")
        for chunk in batches(records)
    )
    totals = await stream
    assert (totals.accepted, totals.batches, totals.rejected_count) == (25_000, 50, 0)

    report = await mesh.service_report("payment")
    assert report.summary.total_calls == 25_000
    assert report.summary.failed_calls == 500
    by_name = {op.operation: op for op in report.operations}
    assert set(by_name) == {"charge", "refund"}
    charge_stats = by_name["charge"]
    assert charge_stats.total_calls == 20_000
    assert charge_stats.success_rate == 1.0
    assert charge_stats.min_ms == pytest.approx(charge.min())
    assert charge_stats.max_ms == pytest.approx(charge.max())
    assert charge_stats.avg_ms == pytest.approx(charge.mean())
    for q, got in ((50, charge_stats.p50_ms), (95, charge_stats.p95_ms), (99, charge_stats.p99_ms)):
        exact = float(np.percentile(charge, q))
        assert abs(got - exact) / exact <= 0.02, (q, got, exact)
    assert by_name["refund"].error_rate == pytest.approx(0.1)
    assert by_name["refund"].infrastructure_failures == 0
    assert 0 <= report.summary.health_score <= 100
    assert report.summary.grade in {"A", "B", "C", "D", "F"}


async def test_the_window_counts_only_calls_inside_it(mesh: Plane) -> None:
    await mesh.report([record(ago=600) for _ in range(30)])  # ten minutes ago
    await mesh.report([record() for _ in range(20)])
    recent = await mesh.service_report("payment", window={"seconds": 60})
    assert recent.summary.total_calls == 20
    hour = await mesh.service_report("payment", window={"seconds": 3600})
    assert hour.summary.total_calls == 50


async def test_report_errors(mesh: Plane) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.service_report("ghost")
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.service_report("payment", window={"seconds": 1})
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.service_report("")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_breakdown_by_version_for_a_canary(mesh: Plane) -> None:
    await mesh.report([record(duration=10, version="v1", instance_id="a") for _ in range(100)])
    await mesh.report(
        [
            record(
                duration=80,
                version="v2",
                instance_id="b",
                ok=i % 4 != 0,
                code=UNAVAILABLE if i % 4 == 0 else 0,
            )
            for i in range(100)
        ]
    )
    report = await mesh.service_report("payment", by_version=True, by_instance=True)
    versions = {v.version: v for v in report.versions}
    assert versions["v1"].error_rate == 0
    assert versions["v2"].error_rate == pytest.approx(0.25)
    assert versions["v2"].p99_ms > versions["v1"].p99_ms
    assert {i.instance_id for i in report.instances} == {"a", "b"}


async def test_the_anomaly_detector_fires_on_a_spike_and_not_on_noise(mesh: Plane) -> None:
    rng = np.random.default_rng(3)
    records = []
    for bucket in range(60):  # ten minutes of 10 s buckets, 30 calls each
        ago = 600 - bucket * 10 - 5
        slow = bucket == 45
        for d in rng.lognormal(math.log(500 if slow else 50), 0.15, size=30):
            records.append(record("spiky", float(d), ago=ago))
            records.append(record("steady", float(d) if not slow else 50.0, ago=ago))
    for chunk in batches(records):
        await mesh.report(chunk)
    report = await mesh.service_report("payment", window={"seconds": 900})
    ops = {op.operation: op for op in report.operations}
    assert ops["spiky"].anomalies, "a 10x latency spike is an anomaly"
    assert ops["spiky"].anomalies[0].kind == metrics_pb2.ANOMALY_KIND_LATENCY
    assert not ops["steady"].anomalies


async def test_alerts_fire_on_threshold_breaches(mesh: Plane) -> None:
    await mesh.report(
        [record("pay", ok=i % 2 == 0, code=0 if i % 2 == 0 else UNAVAILABLE) for i in range(100)]
    )
    await mesh.report([record("fine") for _ in range(100)])
    await mesh.plane.metrics.evaluate_alerts()  # the control plane does this every 10 s
    reply = await mesh.metrics.ListAlerts(metrics_pb2.ListAlertsRequest())
    assert reply.alerts
    worst = reply.alerts[0]
    assert worst.severity == metrics_pb2.ALERT_SEVERITY_CRITICAL
    assert worst.rule == "infrastructure_error_rate"
    assert worst.HasField("fire_time")
    assert all(a.operation != "fine" for a in reply.alerts)
    filtered = await mesh.metrics.ListAlerts(metrics_pb2.ListAlertsRequest(service_name="nobody"))
    assert not filtered.alerts


async def test_a_restart_keeps_the_history(tmp_path: Path) -> None:
    p = await _open(tmp_path)
    try:
        await p.report([record(duration=float(i)) for i in range(1, 101)])
        before = await p.service_report("payment")
    finally:
        await _close(p)
    p = await _open(tmp_path)
    try:
        after = await p.service_report("payment")
        assert after.summary.total_calls == before.summary.total_calls == 100
        assert after.summary.p50_ms == before.summary.p50_ms
        assert after.summary.max_ms == 100
    finally:
        await _close(p)


async def test_series_are_capped_per_service(tmp_path: Path) -> None:
    p = await _open(tmp_path, metrics_max_series_per_service=3)
    try:
        reply = await p.report([record(f"op{i}") for i in range(5)])
        assert reply.accepted == 3
        assert [(r.index, r.field) for r in reply.rejected] == [(3, "operation"), (4, "operation")]
        assert "most allowed" in reply.rejected[0].reason
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await p.report([record("op9")])
        assert info.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        ok = await p.report([record("op0")])  # existing series still take records
        assert ok.accepted == 1
    finally:
        await _close(p)


async def test_infrastructure_failures_eject_an_instance_business_rejections_do_not(
    mesh: Plane,
) -> None:
    for name in ("a", "b", "c"):
        request = registry_pb2.RegisterRequest(
            instance=registry_pb2.ServiceInstance(
                service_name="payment",
                instance_id=name,
                endpoint="127.0.0.1:9",
                health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
            )
        )
        await mesh.registry.Register(request)
    client = metrics_pb2.CALL_SIDE_CLIENT
    await mesh.report(
        [record(ok=False, code=UNAVAILABLE, instance_id="a", side=client) for _ in range(5)]
        + [record(ok=False, code=INVALID_ARGUMENT, instance_id="b") for _ in range(30)]
    )

    async def ejected() -> dict[str, bool]:
        reply = await mesh.registry.Discover(
            registry_pb2.DiscoverRequest(service_name="payment", healthy_only=False)
        )
        return {i.instance_id: i.ejected for i in reply.instances}

    async def a_ejected() -> bool:
        return (await ejected())["a"]

    await eventually(a_ejected, within=5)
    assert await ejected() == {"a": True, "b": False, "c": False}


async def test_call_latency_and_errors_feed_the_instances_weights(mesh: Plane) -> None:
    for name in ("slow", "fast", "flaky"):
        await mesh.registry.Register(
            registry_pb2.RegisterRequest(
                instance=registry_pb2.ServiceInstance(
                    service_name="payment",
                    instance_id=name,
                    endpoint="127.0.0.1:9",
                    health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
                )
            )
        )
    await mesh.report(
        [record(duration=80.0, instance_id="slow") for _ in range(50)]
        + [record(duration=5.0, instance_id="fast") for _ in range(50)]
        + [
            record(duration=20.0, instance_id="flaky", ok=i % 3 != 0, code=0 if i % 3 else 14)
            for i in range(50)
        ]
    )
    mesh.plane.metrics.feed_error_rates()  # the control plane does this every 5 s
    await mesh.plane.registry.refresh()  # and this
    reply = await mesh.registry.Discover(
        registry_pb2.DiscoverRequest(service_name="payment", healthy_only=False)
    )
    found = {i.instance_id: i for i in reply.instances}
    assert found["slow"].response_time_ms == pytest.approx(80.0)
    assert found["fast"].response_time_ms == pytest.approx(5.0)
    assert found["slow"].effective_weight < found["fast"].effective_weight
    assert found["flaky"].effective_weight < 100 * 0.5  # a third of its calls failed
