"""Report analysis: trend, anomalies, health score, grade, alerts, recommendations."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flext_mesh.metrics import analysis
from flext_mesh.metrics.analysis import (
    AlertSeverity,
    AnomalyKind,
    Bucket,
    Figures,
    Found,
    Thresholds,
    TrendKind,
    alerts,
    anomalies,
    grade,
    health_score,
    recommendations,
    trend,
)
from flext_mesh.v1 import metrics_pb2

T0 = 1_700_000_000  # 2023-11-14T22:13:20Z
STEP = 60
DEFAULTS = Thresholds()


def figures(
    total: int = 1000,
    failures: int = 0,
    infra: int = 0,
    *,
    p50: float = 40.0,
    p95: float = 80.0,
    p99: float = 120.0,
    window_seconds: float = 3600.0,
    codes: tuple[tuple[int, int], ...] = (),
) -> Figures:
    return Figures(
        total=total,
        successes=total - failures,
        failures=failures,
        infrastructure_failures=infra,
        min_ms=min(p50, 1.0),
        avg_ms=p50,
        max_ms=p99 * 2,
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        window_seconds=window_seconds,
        failure_codes=codes,
    )


def bucket(
    i: int, *, count: int = 100, failures: int = 0, p50: float = 40.0, p99: float = 50.0
) -> Bucket:
    return Bucket(
        start=T0 + i * STEP,
        count=count,
        failures=failures,
        infrastructure_failures=failures,
        p50_ms=p50,
        p99_ms=p99,
    )


def noisy_p99_buckets(seed: int, n: int = 60, sigma: float = 0.2) -> list[Bucket]:
    """n buckets whose p99 is lognormal noise around 50 ms."""
    rng = np.random.default_rng(seed)
    return [bucket(i, p99=float(v)) for i, v in enumerate(50 * np.exp(rng.normal(0, sigma, n)))]


def per_call_buckets(seed: int, n: int = 60) -> list[Bucket]:
    """n buckets of 20-200 calls (one count per window), call durations lognormal
    around 50 ms with sigma 0.1-0.3; bucket p50 and p99 computed from the calls."""
    rng = np.random.default_rng(seed)
    sigma = rng.uniform(0.1, 0.3)
    calls = int(rng.integers(20, 201))
    durations = 50 * np.exp(rng.normal(0, sigma, (n, calls)))
    p50s, p99s = np.quantile(durations, [0.5, 0.99], axis=1)
    return [
        bucket(i, count=calls, p50=float(p50), p99=float(p99))
        for i, (p50, p99) in enumerate(zip(p50s, p99s, strict=True))
    ]


def error_buckets(
    seed: int, *, n: int = 60, rate: float = 0.01, low: int = 100, high: int = 300
) -> list[Bucket]:
    """n buckets of low-high calls each, failing independently at ``rate``."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(low, high + 1, n)
    return [
        bucket(i, count=int(c), failures=int(f))
        for i, (c, f) in enumerate(zip(counts, rng.binomial(counts, rate), strict=True))
    ]


# --- wire numbers and inputs -------------------------------------------------------


def test_enum_numbers_match_the_proto() -> None:
    assert {k.name: k.value for k in TrendKind} == {
        name.removeprefix("TREND_"): number for name, number in metrics_pb2.Trend.items() if number
    }
    assert {k.name: k.value for k in AnomalyKind} == {
        name.removeprefix("ANOMALY_KIND_"): number
        for name, number in metrics_pb2.AnomalyKind.items()
        if number
    }
    assert {k.name: k.value for k in AlertSeverity} == {
        name.removeprefix("ALERT_SEVERITY_"): number
        for name, number in metrics_pb2.AlertSeverity.items()
        if number
    }


def test_all_is_complete() -> None:
    public = {
        name
        for name, value in vars(analysis).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == analysis.__name__
    }
    assert public == set(analysis.__all__)


def test_figures_derive_rates_and_throughput() -> None:
    f = figures(total=7200, failures=720, infra=180, window_seconds=7200)
    assert f.error_rate == pytest.approx(0.1)
    assert f.success_rate == pytest.approx(0.9)
    assert f.business_failures == 540
    assert (f.infrastructure_error_rate, f.business_error_rate) == pytest.approx((0.025, 0.075))
    assert f.throughput_per_second == pytest.approx(1.0)
    assert f.throughput_per_hour == pytest.approx(3600.0)
    empty = figures(total=0, p50=0, p95=0, p99=0)
    assert (empty.error_rate, empty.success_rate, empty.throughput_per_hour) == (0, 0, 0)
    assert empty.business_error_rate == empty.infrastructure_error_rate == 0


def test_throughput_of_a_service_younger_than_the_window_counts_only_its_lifetime() -> None:
    # 420 calls, all in the last 7 minutes of a 24 h window: 1 call a second, not 0.005.
    young = dataclasses.replace(figures(420, window_seconds=86_400), observed_seconds=420.0)
    assert young.span_seconds == 420.0
    assert young.throughput_per_second == pytest.approx(1.0)
    assert young.throughput_per_hour == pytest.approx(3600.0)
    assert figures(420, window_seconds=86_400).throughput_per_second == pytest.approx(420 / 86_400)


@pytest.mark.parametrize(
    "change",
    [
        {"successes": 5},
        {"failures": -1, "successes": 1001},
        {"infrastructure_failures": 1},
        {"p99_ms": math.nan},
        {"min_ms": -1.0},
        {"window_seconds": 0.0},
        {"observed_seconds": 0.0},
        {"observed_seconds": math.inf},
    ],
)
def test_figures_reject_inconsistent_input(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="figures"):
        dataclasses.replace(figures(), **change)


@pytest.mark.parametrize(
    "change",
    [{"failures": 101}, {"infrastructure_failures": 1}, {"count": -1}, {"p99_ms": math.inf}],
)
def test_bucket_rejects_inconsistent_input(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="bucket"):
        dataclasses.replace(bucket(0), **change)


def test_thresholds_are_keyword_only_with_documented_defaults() -> None:
    documented = Thresholds(
        infrastructure_error_rate_warning=0.05,
        infrastructure_error_rate_critical=0.20,
        business_error_alert_rate=0.5,
        p99_warning_ms=1000,
        p99_critical_ms=5000,
        latency_target_ms=250,
        min_calls=20,
    )
    assert documented == DEFAULTS
    with pytest.raises(TypeError):
        Thresholds(0.1)  # type: ignore[call-arg]


@pytest.mark.parametrize(
    "change",
    [
        {"infrastructure_error_rate_warning": 1.5},
        {"infrastructure_error_rate_warning": 0.3},
        {"business_error_alert_rate": -0.1},
        {"business_error_alert_rate": 1.01},
        {"business_error_alert_rate": math.nan},
        {"p99_warning_ms": 6000.0},
        {"latency_target_ms": 0.0},
        {"min_calls": 0},
    ],
)
def test_thresholds_reject_nonsense(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="thresholds"):
        dataclasses.replace(DEFAULTS, **change)


# --- trend ---------------------------------------------------------------------------


def halves(before: float, after: float, *, n: int = 10, count: int = 100) -> list[Bucket]:
    return [bucket(i, count=count, p50=before) for i in range(n)] + [
        bucket(n + i, count=count, p50=after) for i in range(n)
    ]


@pytest.mark.parametrize(
    ("before", "after", "kind", "change"),
    [
        (40.0, 40.0, TrendKind.STABLE, 0.0),
        (40.0, 44.0, TrendKind.STABLE, 10.0),
        (40.0, 36.0, TrendKind.STABLE, -10.0),
        (40.0, 44.4, TrendKind.DEGRADING, 11.0),
        (40.0, 80.0, TrendKind.DEGRADING, 100.0),
        (40.0, 30.0, TrendKind.IMPROVING, -25.0),
    ],
)
def test_trend_compares_the_later_half_with_the_earlier(
    before: float, after: float, kind: TrendKind, change: float
) -> None:
    result = trend(halves(before, after), min_calls=20)
    assert result.kind is kind
    assert result.change_percent == pytest.approx(change)
    assert tuple(result) == (result.kind, result.change_percent)  # unpacks


def test_trend_needs_min_calls_in_each_half() -> None:
    # Three buckets of six calls per half: 18 calls.
    assert tuple(trend(halves(40, 80, n=3, count=6), min_calls=19)) == (
        TrendKind.INSUFFICIENT_DATA,
        0.0,
    )
    assert tuple(trend(halves(40, 80, n=3, count=6), min_calls=18)) == (
        TrendKind.DEGRADING,
        100.0,
    )
    # Busy earlier half, quiet later half (ten calls).
    quiet_later = [bucket(i, count=100 if i < 10 else 1, p50=40) for i in range(20)]
    assert tuple(trend(quiet_later, min_calls=20)) == (TrendKind.INSUFFICIENT_DATA, 0.0)
    assert trend([bucket(0)], min_calls=1).kind is TrendKind.INSUFFICIENT_DATA
    assert trend([], min_calls=1).kind is TrendKind.INSUFFICIENT_DATA


def test_trend_weights_buckets_by_calls_so_one_quiet_slow_bucket_does_not_move_it() -> None:
    buckets = halves(40, 40)
    buckets[-1] = bucket(19, count=3, p50=4000)  # one slow bucket of three calls
    assert trend(buckets, min_calls=20).kind is TrendKind.STABLE


def test_trend_splits_by_time_not_by_bucket_count() -> None:
    # Six old 10-minute buckets at 40 ms, then sixty recent 10-second ones at 60 ms.
    # Split by count, the later half would be all 60 ms (+50%); split by time (midpoint
    # 2095 s in) the later half is two old buckets (2000 calls at 40) and the narrow
    # ones (600 calls at 60): its weighted median is still 40.
    old = [Bucket(T0 + i * 600, 1000, 0, 0, 40.0, 90.0) for i in range(6)]
    narrow = [Bucket(T0 + 3600 + i * 10, 10, 0, 0, 60.0, 90.0) for i in range(60)]
    result = trend(old + narrow, min_calls=20)
    assert result.kind is TrendKind.STABLE
    assert result.change_percent == 0.0
    shuffled = narrow[::-1] + old  # order of the input does not matter
    assert trend(shuffled, min_calls=20) == result


def test_trend_from_zero_latency_stays_finite() -> None:
    result = trend(halves(0.0, 1.0), min_calls=20)
    assert result.kind is TrendKind.DEGRADING
    assert math.isfinite(result.change_percent)
    assert trend(halves(0.0, 0.0), min_calls=20).kind is TrendKind.STABLE


# --- anomalies ---------------------------------------------------------------------


def test_a_latency_spike_is_found() -> None:
    buckets = noisy_p99_buckets(seed=7)
    buckets[41] = dataclasses.replace(buckets[41], p99_ms=500.0)
    [found] = anomalies(buckets)
    assert found.kind is AnomalyKind.LATENCY
    assert found.bucket_start == T0 + 41 * STEP
    assert found.observed == 500.0
    assert found.baseline == pytest.approx(50, rel=0.1)
    assert found.score >= 3.5
    assert found.description == (
        f"p99 500.0 ms is {found.score:.1f} robust z above the window median"
        f" {found.baseline:.1f} ms"
    )


def test_an_error_rate_spike_is_found() -> None:
    buckets = error_buckets(seed=3)
    spike = buckets[12].count * 3 // 10
    buckets[12] = dataclasses.replace(buckets[12], failures=spike, infrastructure_failures=spike)
    [found] = anomalies(buckets)
    assert found.kind is AnomalyKind.ERROR_RATE
    assert found.bucket_start == T0 + 12 * STEP
    assert found.observed == pytest.approx(0.3, abs=0.01)
    assert found.baseline == pytest.approx(0.01, abs=0.01)
    assert found.score >= 3.5
    assert found.description.startswith(
        f"infrastructure error rate {found.observed:.1%}"
        f" ({buckets[12].failures} of {buckets[12].count} calls)"
    )


def test_a_spike_of_business_rejections_is_no_anomaly() -> None:
    # Callers sending bad input for a minute is their doing, not a fault of the service.
    buckets = error_buckets(seed=3)
    buckets[12] = dataclasses.replace(buckets[12], failures=buckets[12].count // 2)
    assert anomalies(buckets) == []


def test_anomalies_are_ordered_by_time_then_kind() -> None:
    buckets = error_buckets(seed=5)
    for i in (30, 10):
        half = buckets[i].count // 2
        buckets[i] = dataclasses.replace(
            buckets[i], failures=half, infrastructure_failures=half, p99_ms=900.0
        )
    found = anomalies(buckets)
    assert [(f.bucket_start, f.kind) for f in found] == [
        (T0 + 10 * STEP, AnomalyKind.LATENCY),
        (T0 + 10 * STEP, AnomalyKind.ERROR_RATE),
        (T0 + 30 * STEP, AnomalyKind.LATENCY),
        (T0 + 30 * STEP, AnomalyKind.ERROR_RATE),
    ]


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    sigma=st.floats(0.1, 0.3),
    n=st.integers(30, 90),
    where=st.floats(0, 1, exclude_max=True),
)
def test_a_tenfold_spike_is_always_found_in_steady_noise(
    seed: int, sigma: float, n: int, where: float
) -> None:
    buckets = noisy_p99_buckets(seed, n=n, sigma=sigma)
    i = int(where * n)
    buckets[i] = dataclasses.replace(buckets[i], p99_ms=10 * 50.0)
    found = anomalies(buckets)
    assert (AnomalyKind.LATENCY, T0 + i * STEP) in {(f.kind, f.bucket_start) for f in found}


def test_steady_traffic_raises_no_latency_anomaly() -> None:
    # Calls lognormal around 50 ms (sigma 0.1-0.3), bucket p99s computed from them:
    # no false alarm in 2000 windows when measured.
    quiet = sum(not anomalies(per_call_buckets(seed)) for seed in range(200))
    assert quiet >= 0.99 * 200


def test_steady_noise_of_the_bucket_p99s_raises_almost_no_anomaly() -> None:
    # The p99s themselves lognormal: z >= 3.5 alone flags one of 60 normal values in
    # 1.4% of windows; with the 2x floor 0.6% were flagged when measured (3000 windows).
    rng = np.random.default_rng(2024)
    quiet = sum(
        not anomalies(noisy_p99_buckets(seed, sigma=float(rng.uniform(0.1, 0.3))))
        for seed in range(300)
    )
    assert quiet >= 0.98 * 300


@pytest.mark.parametrize(
    ("rate", "low", "high"), [(0.01, 100, 300), (0.05, 5, 10), (0.2, 20, 2000)]
)
def test_steady_error_rates_raise_almost_no_anomaly(rate: float, low: int, high: int) -> None:
    # Binomial noise, tiny buckets included (5-10 calls at 5% fail 3 of 5 now and then):
    # 0.15-0.3% of windows flagged when measured (2000 windows each).
    quiet = sum(
        not anomalies(error_buckets(seed, rate=rate, low=low, high=high)) for seed in range(300)
    )
    assert quiet >= 0.99 * 300


def test_a_perfectly_steady_series_falls_back_to_the_mean_deviation() -> None:
    # Sketch values snap to bins: most buckets report the same p99, so MAD is 0.
    steady = [bucket(i, p99=50.0) for i in range(60)]
    assert anomalies(steady) == []
    wobble = [*steady[:-1], bucket(59, p99=51.0)]  # 2% above: under the 2x floor
    assert anomalies(wobble) == []
    spike = [*steady[:-1], bucket(59, p99=200.0)]
    [found] = anomalies(spike)
    assert math.isfinite(found.score)
    assert found.score >= 3.5
    assert found.baseline == 50.0


def test_a_perfectly_steady_error_rate_falls_back_too() -> None:
    clean = [bucket(i, count=100) for i in range(60)]
    assert anomalies(clean) == []
    [found] = anomalies([*clean[:-1], bucket(59, count=100, failures=10)])
    assert found.kind is AnomalyKind.ERROR_RATE
    assert found.baseline == 0.0
    assert math.isfinite(found.score)


def test_one_or_two_failures_are_not_an_error_rate_anomaly() -> None:
    clean = [bucket(i, count=5) for i in range(60)]
    assert anomalies([*clean[:-1], bucket(59, count=5, failures=2)]) == []
    assert anomalies([*clean[:-1], bucket(59, count=5, failures=3)]) != []


def test_a_few_points_of_error_rate_are_not_an_anomaly() -> None:
    # 4% against a 0% median: below the 5-point floor, however unusual.
    clean = [bucket(i, count=1000) for i in range(60)]
    assert anomalies([*clean[:-1], bucket(59, count=1000, failures=40)]) == []
    assert anomalies([*clean[:-1], bucket(59, count=1000, failures=60)]) != []


def test_only_slower_and_worse_count() -> None:
    buckets = noisy_p99_buckets(seed=11)
    buckets[5] = dataclasses.replace(buckets[5], p99_ms=5.0)
    failing = [bucket(i, count=100, failures=50) for i in range(20)]
    failing[3] = bucket(3, count=100, failures=0)
    assert anomalies(buckets) == []
    assert anomalies(failing) == []


def test_eight_qualifying_buckets_are_needed() -> None:
    few = [bucket(i, p99=50.0 + i) for i in range(7)] + [bucket(7, p99=5000.0)]
    assert [f.bucket_start for f in anomalies(few)] == [T0 + 7 * STEP]
    assert anomalies(few[1:]) == []
    # Buckets of fewer than min_bucket_calls calls neither count nor get flagged.
    tiny = [bucket(100 + i, count=4, p99=50.0) for i in range(30)]
    assert anomalies(few[1:] + tiny) == []
    assert anomalies([*few, bucket(99, count=4, p99=9000.0)]) == anomalies(few)
    assert anomalies(few[1:] + tiny, min_bucket_calls=4) != []


def test_threshold_is_a_parameter() -> None:
    buckets = noisy_p99_buckets(seed=7)
    buckets[41] = dataclasses.replace(buckets[41], p99_ms=500.0)
    [found] = anomalies(buckets)
    assert anomalies(buckets, threshold=found.score + 0.01) == []


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), factor=st.floats(1e-3, 1e3))
def test_latency_anomalies_do_not_depend_on_the_unit(seed: int, factor: float) -> None:
    buckets = noisy_p99_buckets(seed, n=40, sigma=0.5)
    scaled = [dataclasses.replace(b, p99_ms=b.p99_ms * factor) for b in buckets]
    assert [f.bucket_start for f in anomalies(scaled)] == [
        f.bucket_start for f in anomalies(buckets)
    ]


# --- health score and grade ----------------------------------------------------------


@pytest.mark.parametrize(
    ("f", "count", "score"),
    [
        (figures(), 0, 100.0),
        (figures(failures=100), 0, 100.0),  # 10% business: the callers' doing, free
        (figures(failures=500), 0, 100.0),  # 50%: at the alert rate, still free
        (figures(failures=600), 0, 80.0),  # 60%: over it by 10 points, 10 + 100 x 0.1
        (figures(failures=1000), 0, 70.0),  # the business penalty caps at 30
        (figures(failures=100, infra=100), 0, 40.0),  # 10% infrastructure: 600 x 0.1
        (figures(failures=50, infra=50), 0, 70.0),  # 5% infrastructure: 30
        (figures(failures=500, infra=500), 0, 40.0),  # error penalty caps at 60
        (figures(failures=900, infra=50), 0, 40.0),  # 30 + 30, capped at 60
        (figures(p95=500.0), 0, 90.0),  # p95 at 2x the target: 10 x (2 - 1)
        (figures(p95=5000.0), 0, 70.0),  # latency penalty caps at 30
        (figures(p95=250.0), 0, 100.0),  # at the target: no penalty
        (figures(), 1, 95.0),
        (figures(), 5, 90.0),  # anomaly penalty caps at 10
        (figures(failures=1000, infra=1000, p95=9000.0), 9, 0.0),
        (figures(total=0, p50=0, p95=0, p99=0), 0, 100.0),
    ],
)
def test_health_score_formula(f: Figures, count: int, score: float) -> None:
    assert health_score(f, count, DEFAULTS) == pytest.approx(score)


def test_health_score_ignores_min_calls() -> None:
    # Ten calls, all faulted: an F however little traffic there was.
    assert grade(health_score(figures(total=10, failures=10, infra=10), 0, DEFAULTS)) == "F"


def test_business_rejections_cost_points_only_above_the_alert_rate() -> None:
    refused = figures(1000, 600)  # 60% INVALID_ARGUMENT and the like, no fault
    assert grade(health_score(refused, 0, DEFAULTS)) == "B"
    assert health_score(refused, 0, Thresholds(business_error_alert_rate=0.7)) == 100.0
    assert grade(health_score(refused, 0, Thresholds(business_error_alert_rate=0.3))) == "C"
    assert health_score(figures(1000, 1000), 0, Thresholds(business_error_alert_rate=1.0)) == 100
    # The same share of infrastructure faults is an F.
    assert grade(health_score(figures(1000, 600, 600), 0, DEFAULTS)) == "F"


failure_counts = st.integers(0, 10_000)


@given(
    total=st.integers(1, 10_000),
    a=failure_counts,
    b=failure_counts,
    infra=st.floats(0, 1),
    p95=st.floats(0, 100_000),
    count=st.integers(0, 20),
)
def test_more_errors_never_raise_the_score(
    total: int, a: int, b: int, infra: float, p95: float, count: int
) -> None:
    fewer, more = sorted((min(a, total), min(b, total)))
    low = figures(total, fewer, int(fewer * infra), p95=p95)
    high = figures(total, more, int(more * infra), p95=p95)
    assert 0 <= health_score(high, count, DEFAULTS) <= health_score(low, count, DEFAULTS) <= 100


@given(
    total=st.integers(1, 10_000),
    failures=failure_counts,
    infra=st.floats(0, 1),
    p95=st.floats(0, 100_000),
    slower=st.floats(0, 100_000),
    count=st.integers(0, 20),
    more=st.integers(0, 20),
)
def test_infrastructure_faults_slowness_and_anomalies_never_raise_the_score(
    total: int, failures: int, infra: float, p95: float, slower: float, count: int, more: int
) -> None:
    failures = min(failures, total)
    base = figures(total, failures, int(failures * infra), p95=p95)
    all_infrastructure = dataclasses.replace(base, infrastructure_failures=failures)
    slower_p95 = dataclasses.replace(base, p95_ms=p95 + slower)
    score = health_score(base, count, DEFAULTS)
    assert health_score(all_infrastructure, count, DEFAULTS) <= score
    assert health_score(slower_p95, count, DEFAULTS) <= score
    assert health_score(base, count + more, DEFAULTS) <= score
    assert 0 <= score <= 100


@pytest.mark.parametrize(
    ("score", "letter"),
    [
        (100.0, "A"),
        (90.0, "A"),
        (89.99, "B"),
        (80.0, "B"),
        (79.99, "C"),
        (70.0, "C"),
        (69.99, "D"),
        (60.0, "D"),
        (59.99, "F"),
        (0.0, "F"),
    ],
)
def test_grade_boundaries(score: float, letter: str) -> None:
    assert grade(score) == letter


# --- alerts ---------------------------------------------------------------------------

NOW = 1_700_000_123.5


def test_no_alert_below_min_calls() -> None:
    assert alerts("payment", "Charge", figures(19, 19, 19, p99=9000), DEFAULTS, now=NOW) == []
    assert len(alerts("payment", "Charge", figures(20, 20, 20, p99=9000), DEFAULTS, now=NOW)) == 2


@pytest.mark.parametrize(
    ("failures", "severity", "threshold"),
    [
        (49, None, None),
        (50, AlertSeverity.WARNING, 0.05),
        (199, AlertSeverity.WARNING, 0.05),
        (200, AlertSeverity.CRITICAL, 0.20),
        (1000, AlertSeverity.CRITICAL, 0.20),
    ],
)
def test_infrastructure_error_rate_alert(
    failures: int, severity: AlertSeverity | None, threshold: float | None
) -> None:
    found = alerts("payment", "Charge", figures(1000, failures, failures), DEFAULTS, now=NOW)
    if severity is None:
        assert found == []
        return
    [alert] = found
    rule = "infrastructure_error_rate"
    assert alert.alert_id == f"payment/Charge/{rule}"
    assert (alert.service, alert.operation, alert.rule) == ("payment", "Charge", rule)
    assert alert.severity is severity
    assert alert.threshold == threshold
    assert alert.observed == pytest.approx(failures / 1000)
    assert alert.observed_at == NOW
    assert f"{failures / 10:.1f}%" in alert.message
    assert f"{severity.name.lower()} threshold {threshold:.1%}" in alert.message


@pytest.mark.parametrize(
    ("failures", "rate", "fires"),
    [(200, 0.5, False), (500, 0.5, False), (501, 0.5, True), (400, 0.3, True), (999, 1.0, False)],
)
def test_business_error_rate_alert_is_a_warning_above_the_alert_rate(
    failures: int, rate: float, fires: bool
) -> None:
    limits = Thresholds(business_error_alert_rate=rate)
    refused = figures(1000, failures, codes=((3, failures),))
    found = alerts("payment", "Charge", refused, limits, now=NOW)
    if not fires:
        assert found == []
        return
    [alert] = found
    assert (alert.alert_id, alert.severity) == (
        "payment/Charge/business_error_rate",
        AlertSeverity.WARNING,
    )
    assert (alert.threshold, alert.observed) == (rate, pytest.approx(failures / 1000))
    assert alert.message == (
        f"payment/Charge: {failures / 10:.1f}% of calls refused ({failures} of 1000 calls;"
        f" mostly INVALID_ARGUMENT ({failures})) is above the business error alert rate"
        f" {rate:.1%}: check the callers' input"
    )


@pytest.mark.parametrize(
    ("p99", "severity", "threshold"),
    [
        (999.9, None, None),
        (1000.0, AlertSeverity.WARNING, 1000.0),
        (4999.0, AlertSeverity.WARNING, 1000.0),
        (5000.0, AlertSeverity.CRITICAL, 5000.0),
    ],
)
def test_p99_latency_alert(
    p99: float, severity: AlertSeverity | None, threshold: float | None
) -> None:
    found = alerts("payment", "", figures(p99=p99), DEFAULTS, now=NOW)
    assert [(a.alert_id, a.severity, a.threshold) for a in found] == (
        [] if severity is None else [("payment/*/p99_latency", severity, threshold)]
    )
    if found:
        assert found[0].operation == ""
        assert found[0].message.startswith(f"payment: p99 latency {p99:.1f} ms is at or above")


def test_alert_ids_are_stable_across_severities_and_rules_fire_in_order() -> None:
    warning = alerts("a", "Op", figures(1000, 60, 60, p99=1200), DEFAULTS, now=NOW)
    critical = alerts("a", "Op", figures(1000, 600, 600, p99=7000), DEFAULTS, now=NOW + 60)
    assert [a.alert_id for a in warning] == ["a/Op/infrastructure_error_rate", "a/Op/p99_latency"]
    assert [a.alert_id for a in critical] == [a.alert_id for a in warning]
    assert {a.severity for a in critical} == {AlertSeverity.CRITICAL}


def test_custom_thresholds_apply() -> None:
    strict = Thresholds(
        infrastructure_error_rate_warning=0.001,
        business_error_alert_rate=0.1,
        p99_warning_ms=100,
        min_calls=1,
    )
    found = alerts("a", "Op", figures(5, 2, 1, p99=150.0), strict, now=NOW)
    assert [(a.rule, a.severity) for a in found] == [
        ("infrastructure_error_rate", AlertSeverity.CRITICAL),
        ("business_error_rate", AlertSeverity.WARNING),
        ("p99_latency", AlertSeverity.WARNING),
    ]


# --- recommendations -------------------------------------------------------------------


def latency_anomaly(start: float, score: float = 6.0) -> Found:
    return Found(
        AnomalyKind.LATENCY, start, 800.0, 50.0, score, f"p99 800.0 ms is {score} robust z ..."
    )


def test_healthy_figures_need_no_recommendation() -> None:
    assert recommendations(figures(), TrendKind.STABLE, [], DEFAULTS) == []


def test_low_traffic_gets_one_note_only() -> None:
    [note] = recommendations(
        figures(5, 5, p99=9000), TrendKind.INSUFFICIENT_DATA, [latency_anomaly(T0)], DEFAULTS
    )
    assert note.startswith("Only 5 calls in the window, fewer than the 20 needed")
    [one] = recommendations(figures(1), TrendKind.INSUFFICIENT_DATA, [], DEFAULTS)
    assert one.startswith("Only 1 call in the window, fewer than the 20 needed")


def test_infrastructure_faults_point_at_deploys_and_dependencies() -> None:
    [only] = recommendations(
        figures(1000, 290, 250, codes=((14, 200), (4, 50), (3, 40))),
        TrendKind.STABLE,
        [],
        DEFAULTS,
    )
    assert only.startswith(
        "Infrastructure error rate is 25.0% (250 of 1000 calls; mostly UNAVAILABLE (200),"
        " DEADLINE_EXCEEDED (50)), above the 5.0% warning threshold"
    )
    for advice in ("recent deploys", "capacity", "network", "dependencies"):
        assert advice in only
    assert "callers' input" not in only


def test_business_rejections_point_at_the_callers_input() -> None:
    refused = figures(1000, 600, codes=((3, 500), (5, 100)))
    [above] = recommendations(refused, TrendKind.STABLE, [], DEFAULTS)
    assert above.startswith(
        "Callers' requests are being refused: 60.0% of calls (600 of 1000 calls; mostly"
        " INVALID_ARGUMENT (500), NOT_FOUND (100)) ended in business rejections, above the"
        " 50.0% alert rate: check the callers' input"
    )
    assert "deploys" not in above.replace("a caller's deploy", "")
    [below] = recommendations(figures(1000, 400, codes=((3, 400),)), TrendKind.STABLE, [], DEFAULTS)
    assert below.startswith(
        "40.0% of calls (400 of 1000 calls; mostly INVALID_ARGUMENT (400)) were refused as"
        " business rejections"
    )
    assert "cost no health points up to the 50.0% alert rate" in below
    assert "check the callers' input" in below
    # A few refusals are no news.
    assert recommendations(figures(1000, 49), TrendKind.STABLE, [], DEFAULTS) == []


def test_tail_latency() -> None:
    [slow, tail] = recommendations(
        figures(p50=20.0, p95=200.0, p99=1500.0), TrendKind.STABLE, [], DEFAULTS
    )
    assert slow.startswith("p99 latency is 1500.0 ms, above the 1000.0 ms warning threshold")
    assert tail.startswith("p99 latency (1500.0 ms) is 75.0x the median (20.0 ms)")
    assert "timeouts" in tail
    # A long tail under the latency target is no worry.
    assert recommendations(figures(p50=2.0, p95=10, p99=40.0), TrendKind.STABLE, [], DEFAULTS) == []


def test_p95_above_target() -> None:
    [only] = recommendations(figures(p50=200, p95=400, p99=600), TrendKind.STABLE, [], DEFAULTS)
    assert only.startswith("p95 latency is 400.0 ms, above the 250.0 ms target")


def test_degrading_trend() -> None:
    [quoted] = recommendations(
        figures(), TrendKind.DEGRADING, [], DEFAULTS, trend_change_percent=34.56
    )
    assert quoted.startswith("Median latency rose 34.6% from the earlier to the later half")
    [plain] = recommendations(figures(), TrendKind.DEGRADING, [], DEFAULTS)
    assert "rose more than 10%" in plain
    assert recommendations(figures(), TrendKind.IMPROVING, [], DEFAULTS) == []


def test_anomalies_are_summarised_with_the_worst_one() -> None:
    found = [
        latency_anomaly(T0, score=4.0),
        latency_anomaly(T0 + 60, score=9.0),
        Found(AnomalyKind.ERROR_RATE, T0 + 120, 0.5, 0.01, 12.0, "error rate 50.0% ..."),
    ]
    latency, errors = recommendations(figures(), TrendKind.STABLE, found, DEFAULTS)
    assert latency.startswith(
        "2 latency anomalies in the window (worst at 2023-11-14T22:14:20Z: p99 800.0 ms is 9.0"
    )
    assert errors.startswith("1 error-rate anomaly in the window (worst at 2023-11-14T22:15:20Z")


def test_recommendation_order_is_fixed() -> None:
    everything = recommendations(
        figures(1000, 900, 300, p50=20, p95=900, p99=6000),
        TrendKind.DEGRADING,
        [
            Found(AnomalyKind.ERROR_RATE, T0, 0.5, 0.01, 12.0, "e"),
            latency_anomaly(T0),
        ],
        DEFAULTS,
    )
    assert [s.split(" ")[0] for s in everything] == [
        "Infrastructure",
        "Callers'",
        "p99",
        "p99",
        "Median",
        "1",
        "1",
    ]
    assert "latency anomaly" in everything[5]
    assert "error-rate anomaly" in everything[6]
