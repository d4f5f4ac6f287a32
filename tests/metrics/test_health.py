"""Health over real gRPC: faults make a service unhealthy, refusals of bad input do not
(up to the business error alert rate), and a young service's throughput counts only
the time it has existed."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from flext_mesh.metrics.aggregator import (
    BUCKETS,
    Aggregator,
    AggregatorSettings,
    BucketStats,
    SeriesKey,
    _encode_row,
)
from flext_mesh.metrics.sketch import LatencySketch
from flext_mesh.store import Put
from flext_mesh.store.sqlite import SqliteStore
from flext_mesh.v1 import metrics_pb2
from tests.metrics.test_metrics_rpc import Plane, _close, _open, record

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]
CRITICAL = metrics_pb2.ALERT_SEVERITY_CRITICAL
WARNING = metrics_pb2.ALERT_SEVERITY_WARNING


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[Plane]:
    p = await _open(tmp_path)
    try:
        yield p
    finally:
        await _close(p)


def traffic(service: str, failed: int, code: int, *, calls: int = 100) -> list[object]:
    """``calls`` calls of ``service``, ``failed`` of them ending with ``code``."""
    return [
        record(
            "signup",
            12.0,
            service=service,
            ok=i >= failed,
            code=code if i < failed else 0,
            instance_id="a",
        )
        for i in range(calls)
    ]


async def report_and_alerts(
    p: Plane, service: str
) -> tuple[metrics_pb2.ServiceReport, list[metrics_pb2.Alert]]:
    await p.plane.metrics.evaluate_alerts()  # the control plane does this every 10 s
    listed = await p.metrics.ListAlerts(metrics_pb2.ListAlertsRequest(service_name=service))
    return await p.service_report(service), list(listed.alerts)


async def test_refused_input_below_the_alert_rate_leaves_the_service_healthy(
    plane: Plane,
) -> None:
    """40% INVALID_ARGUMENT (and a few NOT_FOUND), no fault: grade A, no alert, the
    refusals shown apart with their codes and the advice naming the callers' input."""
    calls = traffic("accounts", 40, INVALID_ARGUMENT)
    calls[40:45] = traffic("accounts", 5, NOT_FOUND, calls=5)
    await plane.report(calls)  # type: ignore[arg-type]
    report, alerts = await report_and_alerts(plane, "accounts")
    summary = report.summary
    assert (summary.health_score, summary.grade) == (100.0, "A")
    assert alerts == []
    assert list(report.alerts) == []
    assert (summary.failed_calls, summary.business_failures) == (45, 45)
    assert summary.infrastructure_failures == 0
    assert summary.business_error_rate == pytest.approx(0.45)
    assert summary.infrastructure_error_rate == 0
    assert report.business_error_alert_rate == 0.5
    assert [(c.code_name, c.code, c.calls, c.infrastructure) for c in summary.failure_codes] == [
        ("INVALID_ARGUMENT", INVALID_ARGUMENT, 40, False),
        ("NOT_FOUND", NOT_FOUND, 5, False),
    ]
    [advice] = report.recommendations
    assert advice.startswith(
        "45.0% of calls (45 of 100 calls; mostly INVALID_ARGUMENT (40), NOT_FOUND (5)) were"
        " refused as business rejections"
    )
    assert "check the callers' input" in advice
    assert "deploys" not in advice


async def test_the_same_share_of_faults_is_critical_with_the_deploy_advice(plane: Plane) -> None:
    await plane.report(traffic("accounts", 60, UNAVAILABLE))  # type: ignore[arg-type]
    report, alerts = await report_and_alerts(plane, "accounts")
    summary = report.summary
    assert (summary.grade, summary.infrastructure_failures, summary.business_failures) == (
        "F",
        60,
        0,
    )
    assert summary.infrastructure_error_rate == pytest.approx(0.6)
    assert [(c.code_name, c.calls, c.infrastructure) for c in summary.failure_codes] == [
        ("UNAVAILABLE", 60, True)
    ]
    assert {(a.rule, a.severity) for a in alerts} >= {("infrastructure_error_rate", CRITICAL)}
    assert all(a.rule != "business_error_rate" for a in alerts)
    advice = report.recommendations[0]
    assert advice.startswith(
        "Infrastructure error rate is 60.0% (60 of 100 calls; mostly UNAVAILABLE (60))"
    )
    assert "check recent deploys" in advice
    assert "dependencies" in advice
    assert "callers' input" not in " ".join(report.recommendations)


async def test_refusals_above_the_default_alert_rate_are_flagged_not_critical(
    plane: Plane,
) -> None:
    await plane.report(traffic("accounts", 60, INVALID_ARGUMENT))  # type: ignore[arg-type]
    report, alerts = await report_and_alerts(plane, "accounts")
    assert (report.summary.health_score, report.summary.grade) == (80.0, "B")
    assert {(a.operation, a.rule, a.severity) for a in alerts} == {
        ("", "business_error_rate", WARNING),
        ("signup", "business_error_rate", WARNING),
    }
    assert report.recommendations[0].startswith("Callers' requests are being refused: 60.0%")


async def test_a_lower_alert_rate_flags_the_same_refusals(tmp_path: Path) -> None:
    """--business-error-alert-rate 0.3: the 40% of refusals that were fine by default
    now cost points, raise the WARNING and say the callers' requests are refused."""
    p = await _open(tmp_path, business_error_alert_rate=0.3)
    try:
        await p.report(traffic("accounts", 40, INVALID_ARGUMENT))  # type: ignore[arg-type]
        report, alerts = await report_and_alerts(p, "accounts")
    finally:
        await _close(p)
    summary = report.summary
    assert report.business_error_alert_rate == pytest.approx(0.3)
    assert summary.health_score == pytest.approx(80.0)  # 10 + 100 x (0.4 - 0.3)
    assert summary.grade == "B"
    [service_wide] = [a for a in alerts if not a.operation]
    assert (service_wide.rule, service_wide.severity) == ("business_error_rate", WARNING)
    assert service_wide.threshold == pytest.approx(0.3)
    assert "check the callers' input" in service_wide.message
    [advice] = report.recommendations
    assert advice.startswith(
        "Callers' requests are being refused: 40.0% of calls (40 of 100 calls; mostly"
        " INVALID_ARGUMENT (40)) ended in business rejections, above the 30.0% alert rate:"
        " check the callers' input"
    )


async def test_a_young_service_has_its_throughput_over_its_lifetime(plane: Plane) -> None:
    """One call a second for the last 60 s, asked over an hour: about 1/s, not 60/3600;
    a service seen two hours ago keeps the whole window."""
    await plane.report([record(service="young", ago=60 - i) for i in range(60)])
    await plane.report(
        [record(service="old", ago=7200.0), *(record(service="old", ago=60 - i) for i in range(60))]
    )
    young = await plane.service_report("young", window={"seconds": 3600})
    observed = young.summary.observed.ToNanoseconds() / 1e9
    assert 60 <= observed <= 72  # from the start of the first call's 10 s bucket
    assert young.summary.throughput_per_second == pytest.approx(60 / observed)
    assert young.summary.throughput_per_second > 0.8
    assert young.summary.throughput_per_hour == pytest.approx(60 * 3600 / observed)
    [operation] = young.operations
    assert operation.observed == young.summary.observed
    old = await plane.service_report("old", window={"seconds": 3600})
    assert old.summary.observed.ToNanoseconds() == 3600 * 10**9
    assert old.summary.throughput_per_second == pytest.approx(60 / 3600)


async def test_a_service_seen_a_second_ago_counts_at_least_ten_seconds(plane: Plane) -> None:
    await plane.report([record(service="newborn") for _ in range(50)])
    report = await plane.service_report("newborn")
    assert report.summary.observed.ToNanoseconds() >= 10 * 10**9
    assert report.summary.throughput_per_second <= 5.0


async def test_buckets_stored_before_codes_were_kept_still_load(tmp_path: Path) -> None:
    """A bucket written by an older control plane (no per-code counts) loads: its
    failures count, no code is listed; new calls in it add their codes."""
    now = 1_800_000_005.0
    store = SqliteStore(tmp_path / "m.db")
    await store.open()
    sketch = LatencySketch()
    for value in (5.0, 6.0, 7.0, 8.0):
        sketch.add(value)
    old = BucketStats(sketch, failures=2, infrastructure_failures=1)
    row = _encode_row(SeriesKey("signup", "a", "v1"), old)
    await store.txn(
        (),
        [Put(f"{BUCKETS}pay/000010/{1_800_000_000:012d}", b'{"v":1,"series":[%s]}' % row.encode())],
    )
    aggregator = Aggregator(store, AggregatorSettings(checkpoint_interval=3600), clock=lambda: now)
    await aggregator.start()
    try:
        [(_, _, series)] = aggregator.window("pay", 600)
        stats = series[SeriesKey("signup", "a", "v1")]
        assert (stats.count, stats.failures, stats.infrastructure_failures, stats.codes) == (
            4,
            2,
            1,
            {},
        )
        batch = metrics_pb2.ReportCallsRequest(
            records=[
                metrics_pb2.CallRecord(
                    service_name="pay",
                    operation="signup",
                    instance_id="a",
                    version="v1",
                    duration_ms=3.0,
                    success=False,
                    status_code=INVALID_ARGUMENT,
                )
            ]
        )
        aggregator.submit(batch)
        await aggregator.checkpoint()
        [(_, _, series)] = aggregator.window("pay", 600)
        stats = series[SeriesKey("signup", "a", "v1")]
        assert (stats.count, stats.failures, stats.codes) == (5, 3, {INVALID_ARGUMENT: 1})
        (kv,) = await store.range(BUCKETS + "pay/")
        stored = json.loads(kv.value)
        assert stored["codes"] == [{str(INVALID_ARGUMENT): 1}]
        assert len(stored["series"][0]) == 6  # the rows older readers know, unchanged
    finally:
        await aggregator.stop()
        await store.close()
