"""What a performance report says about its figures: trend, anomalies, score, alerts.

Pure Python: no RPC, no protobuf, no I/O, no clock (``now`` is passed in). The report
builder computes :class:`Figures` for a set of calls and one :class:`Bucket` per time
bucket of the window, and turns the answers into ``flext_mesh.v1`` messages.

Formulas (``error rate`` = failures / total; percentiles within 1% relative error)::

    trend            weighted median of the bucket p50s (weights: bucket call counts) in
                     the later half of the window against the earlier half:
                     change % = 100 x (later - earlier) / earlier;
                     STABLE within +-10 %, DEGRADING above +10 %, IMPROVING below -10 %,
                     INSUFFICIENT_DATA when either half has fewer than min_calls calls
    anomaly score    per qualifying bucket (>= min_bucket_calls calls; at least 8 such):
                     score = (y - median(y)) / s,  s = max(MAD / 0.6745, 1.253314 x MeanAD)
      latency        y = ln(p99 ms); reported when score >= 3.5 and p99 >= 2 x median p99
      error rate     y = infrastructure failures / count; score = min(that,
                     -Phi^-1(P[X >= failures])) with X ~ Binomial(count, pooled rate);
                     reported when score >= 3.5, y >= median + 0.05 and the bucket has
                     >= 3 infrastructure failures
    health score     100 - error penalty - latency penalty - anomaly penalty, in 0..100
      error          min(60, infrastructure + business)
        infrastructure  600 x infrastructure failures / total
        business        0 up to business_error_alert_rate (default 50 %) of business
                        failures (refusals: INVALID_ARGUMENT, NOT_FOUND, ...), above it
                        min(30, 10 + 100 x (business rate - business_error_alert_rate))
      latency        min(30, 10 x max(0, p95 / latency target - 1))
      anomalies      min(10, 5 x anomalies found)
    grade            A >= 90, B >= 80, C >= 70, D >= 60, else F
    alerts           infrastructure_error_rate and p99_latency: CRITICAL at >= the
                     critical threshold, WARNING at >= the warning threshold;
                     business_error_rate: WARNING above business_error_alert_rate;
                     none below min_calls calls
"""

from __future__ import annotations

import enum
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import NamedTuple

from flext_mesh import errors
from flext_mesh.result import STATUS_CODE_NAMES_BY_NUMBER

__all__ = [
    "AlertFound",
    "AlertSeverity",
    "AnomalyKind",
    "Bucket",
    "Figures",
    "Found",
    "Thresholds",
    "TrendKind",
    "TrendResult",
    "alerts",
    "anomalies",
    "code_name",
    "grade",
    "health_score",
    "is_infrastructure",
    "recommendations",
    "trend",
]

#: The later half is STABLE within this many percent of the earlier half.
_TREND_BAND_PERCENT = 10.0
#: A 0 ms earlier median counts as 1 microsecond, so that the change stays finite.
_TREND_MIN_BASE_MS = 0.001
#: Fewer qualifying buckets than this: no baseline to judge against, no anomaly.
_MIN_ANOMALY_BUCKETS = 8
#: 1 / 0.6745: turns a MAD into a standard deviation (normal data).
_MAD_TO_SIGMA = 1 / 0.6745
#: sqrt(pi / 2): turns a mean absolute deviation into a standard deviation.
_MEAN_AD_TO_SIGMA = 1.253314
#: A latency anomaly is also at least this many times the median p99: the p99 of a
#: small bucket is its slowest call or two, whose noise has a heavy right tail.
_LATENCY_FLOOR_RATIO = 2.0
#: An error-rate anomaly is also at least this far above the median error rate.
_ERROR_RATE_FLOOR = 0.05
#: ... and has at least this many failed calls: one or two failures are not a spike.
_ERROR_MIN_FAILURES = 3
#: p99 latency of 0 ms counts as 1 microsecond on the log scale.
_MIN_LATENCY_MS = 0.001
#: Smallest binomial tail probability told apart (its z is about 37).
_MIN_TAIL = 1e-300
_STANDARD_NORMAL = statistics.NormalDist()
_ERROR_PENALTY_MAX = 60.0
_INFRASTRUCTURE_PENALTY_PER_RATE = 600.0
_BUSINESS_PENALTY_MAX = 30.0
_BUSINESS_PENALTY_BASE = 10.0
_BUSINESS_PENALTY_PER_RATE = 100.0
#: Business rejections from this share of the calls get a recommendation, even below
#: the alert rate (they cost no points there).
_BUSINESS_NOTE_RATE = 0.05
#: Status codes quoted in a recommendation, at most.
_CODES_QUOTED = 3
_LATENCY_PENALTY_MAX = 30.0
_LATENCY_PENALTY_PER_RATIO = 10.0
_ANOMALY_PENALTY_MAX = 10.0
_ANOMALY_PENALTY_EACH = 5.0
_GRADES = ((90.0, "A"), (80.0, "B"), (70.0, "C"), (60.0, "D"))
#: p99 / p50 from which the tail counts as long (with p99 >= the latency target).
_TAIL_RATIO = 5.0

#: Numbers of the status codes that are infrastructure faults (``errors.INFRASTRUCTURE_CODES``).
_INFRASTRUCTURE: frozenset[int] = frozenset(code.value[0] for code in errors.INFRASTRUCTURE_CODES)
#: Names of the gRPC status codes by number (0 to 16).
_CODE_NAMES = STATUS_CODE_NAMES_BY_NUMBER


class TrendKind(enum.IntEnum):
    """Direction of latency; numbers match ``flext_mesh.v1.Trend``."""

    INSUFFICIENT_DATA = 1
    """Either half of the window has fewer than ``min_calls`` calls."""
    STABLE = 2
    """Within +-10% of the earlier half."""
    IMPROVING = 3
    """p50 latency fell by more than 10%."""
    DEGRADING = 4
    """p50 latency rose by more than 10%."""


class AnomalyKind(enum.IntEnum):
    """What deviates; numbers match ``flext_mesh.v1.AnomalyKind``."""

    LATENCY = 1
    """A bucket's p99 latency far above the window's."""
    ERROR_RATE = 2
    """A bucket's error rate far above the window's."""


class AlertSeverity(enum.IntEnum):
    """How bad a breach is; numbers match ``flext_mesh.v1.AlertSeverity``."""

    INFO = 1
    """Worth a look."""
    WARNING = 2
    """Degraded."""
    CRITICAL = 3
    """Failing."""


def _check_count(owner: str, name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{owner}: {name} {value!r} is negative")


def _check_ms(owner: str, name: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{owner}: {name} {value!r} is not a finite number >= 0")


@dataclass(frozen=True, slots=True)
class Figures:
    """Figures of one set of calls over a window (an operation, a version, or all).

    Raises ``ValueError`` for negative counts, ``successes + failures != total``,
    more infrastructure failures than failures, durations that are not finite and
    >= 0, or a window that is not > 0 seconds.
    """

    total: int
    """Calls in the window."""
    successes: int
    """Calls that succeeded."""
    failures: int
    """Calls that failed: business rejections and infrastructure faults."""
    infrastructure_failures: int
    """Failures that were infrastructure faults (UNAVAILABLE, DEADLINE_EXCEEDED, ...)."""
    min_ms: float
    """Fastest call, milliseconds (0 without calls)."""
    avg_ms: float
    """Mean duration, milliseconds."""
    max_ms: float
    """Slowest call, milliseconds."""
    p50_ms: float
    """Median duration, milliseconds."""
    p95_ms: float
    """95th percentile, milliseconds."""
    p99_ms: float
    """99th percentile, milliseconds."""
    window_seconds: float
    """Length of the window, seconds."""
    observed_seconds: float | None = None
    """The part of the window the calls could have come in, seconds: from the first call
    recorded for these calls (when that is within the window) to now. None: the whole
    window. Throughput is computed over it."""
    failure_codes: tuple[tuple[int, int], ...] = ()
    """(gRPC status code, failed calls) of the failures whose code is known, most calls
    first (0: failed without a code)."""

    def __post_init__(self) -> None:
        owner = "figures"
        for name in ("total", "successes", "failures", "infrastructure_failures"):
            _check_count(owner, name, getattr(self, name))
        if self.successes + self.failures != self.total:
            raise ValueError(
                f"{owner}: successes {self.successes} + failures {self.failures}"
                f" != total {self.total}"
            )
        if self.infrastructure_failures > self.failures:
            raise ValueError(
                f"{owner}: infrastructure_failures {self.infrastructure_failures}"
                f" > failures {self.failures}"
            )
        for name in ("min_ms", "avg_ms", "max_ms", "p50_ms", "p95_ms", "p99_ms"):
            _check_ms(owner, name, getattr(self, name))
        if not (math.isfinite(self.window_seconds) and self.window_seconds > 0):
            raise ValueError(f"{owner}: window_seconds {self.window_seconds!r} is not > 0")
        observed = self.observed_seconds
        if observed is not None and not (math.isfinite(observed) and observed > 0):
            raise ValueError(f"{owner}: observed_seconds {observed!r} is not > 0")

    @property
    def error_rate(self) -> float:
        """failures / total, 0 to 1 (0 without calls)."""
        return self.failures / self.total if self.total else 0.0

    @property
    def success_rate(self) -> float:
        """successes / total, 0 to 1 (0 without calls)."""
        return self.successes / self.total if self.total else 0.0

    @property
    def business_failures(self) -> int:
        """failures - infrastructure_failures: calls the service rejected itself."""
        return self.failures - self.infrastructure_failures

    @property
    def infrastructure_error_rate(self) -> float:
        """infrastructure_failures / total, 0 to 1 (0 without calls)."""
        return self.infrastructure_failures / self.total if self.total else 0.0

    @property
    def business_error_rate(self) -> float:
        """business_failures / total, 0 to 1 (0 without calls)."""
        return self.business_failures / self.total if self.total else 0.0

    @property
    def span_seconds(self) -> float:
        """What throughput is computed over: observed_seconds, else window_seconds."""
        return self.window_seconds if self.observed_seconds is None else self.observed_seconds

    @property
    def throughput_per_second(self) -> float:
        """total / span_seconds."""
        return self.total / self.span_seconds

    @property
    def throughput_per_hour(self) -> float:
        """total / span hours = 3600 x total / span_seconds."""
        return self.total * 3600 / self.span_seconds

    def codes_of(self, *, infrastructure: bool) -> list[tuple[int, int]]:
        """(code, failed calls) of the infrastructure faults, or of the business
        rejections, most calls first."""
        return [(c, n) for c, n in self.failure_codes if is_infrastructure(c) == infrastructure]


@dataclass(frozen=True, slots=True)
class Bucket:
    """Calls of one time bucket of the window (figures from the bucket's own sketch).

    Raises ``ValueError`` for negative counts, more failures than calls, more
    infrastructure failures than failures, or latencies that are not finite and >= 0.
    """

    start: float
    """Start of the bucket, seconds since the Unix epoch."""
    count: int
    """Calls in the bucket."""
    failures: int
    """Calls that failed."""
    infrastructure_failures: int
    """Failures that were infrastructure faults."""
    p50_ms: float
    """Median duration in the bucket, milliseconds."""
    p99_ms: float
    """99th percentile in the bucket, milliseconds."""

    def __post_init__(self) -> None:
        owner = f"bucket at {self.start}"
        for name in ("count", "failures", "infrastructure_failures"):
            _check_count(owner, name, getattr(self, name))
        if self.failures > self.count:
            raise ValueError(f"{owner}: failures {self.failures} > count {self.count}")
        if self.infrastructure_failures > self.failures:
            raise ValueError(
                f"{owner}: infrastructure_failures {self.infrastructure_failures}"
                f" > failures {self.failures}"
            )
        _check_ms(owner, "p50_ms", self.p50_ms)
        _check_ms(owner, "p99_ms", self.p99_ms)

    @property
    def error_rate(self) -> float:
        """failures / count, 0 to 1 (0 without calls)."""
        return self.failures / self.count if self.count else 0.0

    @property
    def infrastructure_error_rate(self) -> float:
        """infrastructure_failures / count, 0 to 1 (0 without calls)."""
        return self.infrastructure_failures / self.count if self.count else 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Thresholds:
    """When figures raise alerts and cost health points.

    Raises ``ValueError`` when an error rate is outside 0..1, a latency is not > 0, a
    warning threshold is above its critical one, or ``min_calls`` is below 1.
    """

    infrastructure_error_rate_warning: float = 0.05
    """Infrastructure error rate (0 to 1) from which the ``infrastructure_error_rate``
    alert is a WARNING (the Prometheus rule FlextMeshInfrastructureErrors's 5 % too)."""
    infrastructure_error_rate_critical: float = 0.20
    """Infrastructure error rate (0 to 1) from which that alert is CRITICAL."""
    business_error_alert_rate: float = 0.5
    """Business rejections (0 to 1 of the calls) above which they cost health points and
    raise the ``business_error_rate`` WARNING; up to it they are the callers' business
    and only noted. 1 never flags them."""
    p99_warning_ms: float = 1000.0
    """p99 latency from which the ``p99_latency`` alert is a WARNING."""
    p99_critical_ms: float = 5000.0
    """p99 latency from which the ``p99_latency`` alert is CRITICAL."""
    latency_target_ms: float = 250.0
    """p95 latency the service should stay under; the health score's latency yardstick."""
    min_calls: int = 20
    """Fewer calls than this are too few to judge: no alert, no trend, only a note."""

    def __post_init__(self) -> None:
        for name in (
            "infrastructure_error_rate_warning",
            "infrastructure_error_rate_critical",
            "business_error_alert_rate",
        ):
            value = getattr(self, name)
            if not 0 <= value <= 1:  # also rejects NaN
                raise ValueError(f"thresholds: {name} {value!r} is not in 0..1")
        for name in ("p99_warning_ms", "p99_critical_ms", "latency_target_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"thresholds: {name} {value!r} is not > 0")
        if self.infrastructure_error_rate_warning > self.infrastructure_error_rate_critical:
            raise ValueError(
                "thresholds: infrastructure_error_rate_warning is above"
                " infrastructure_error_rate_critical"
            )
        if self.p99_warning_ms > self.p99_critical_ms:
            raise ValueError("thresholds: p99_warning_ms is above p99_critical_ms")
        if self.min_calls < 1:
            raise ValueError(f"thresholds: min_calls {self.min_calls!r} is not >= 1")


class TrendResult(NamedTuple):
    """Answer of :func:`trend`; unpacks as ``kind, change_percent``."""

    kind: TrendKind
    """Direction."""
    change_percent: float
    """100 x (later - earlier) / earlier of the halves' p50; 0 when INSUFFICIENT_DATA."""


@dataclass(frozen=True, slots=True)
class Found:
    """A bucket that deviates from the window's other buckets."""

    kind: AnomalyKind
    """Latency or error rate."""
    bucket_start: float
    """Start of the bucket, seconds since the Unix epoch."""
    observed: float
    """The bucket's p99 in milliseconds, or its error rate 0 to 1."""
    baseline: float
    """Median of the qualifying buckets, same unit."""
    score: float
    """How far above the baseline, in standard deviations (see :func:`anomalies`)."""
    description: str
    """Human-readable summary."""


@dataclass(frozen=True, slots=True)
class AlertFound:
    """A threshold breach of one service (and operation) at one time."""

    alert_id: str
    """Stable id: ``service/operation/rule``, ``*`` for the service-wide figures."""
    service: str
    """Service."""
    operation: str
    """Operation; empty for service-wide figures."""
    severity: AlertSeverity
    """WARNING or CRITICAL."""
    rule: str
    """``error_rate`` or ``p99_latency``."""
    threshold: float
    """Threshold breached (the critical one when CRITICAL)."""
    observed: float
    """Value observed (0 to 1 for error_rate, milliseconds for p99_latency)."""
    message: str
    """Human-readable message."""
    observed_at: float
    """When the breach was observed (``now``), seconds since the Unix epoch. The caller
    keeps an earlier fire time when the same ``alert_id`` was already firing."""


def trend(buckets: Sequence[Bucket], *, min_calls: int) -> TrendResult:
    """Latency trend: the later half of the window's buckets against the earlier half.

    The halves split at the midpoint between the first and the last bucket start
    (a bucket starting exactly there belongs to neither); time-based, so the split
    is right when bucket widths differ (recent buckets are narrower). Each half's
    latency is the weighted median of its buckets' p50s, weighted by call count (a
    single slow bucket does not move it). ``change % = 100 x (later - earlier) /
    earlier`` (an earlier 0 ms counts as 0.001 ms); STABLE within +-10 %, DEGRADING
    above +10 %, IMPROVING below -10 %. INSUFFICIENT_DATA, change 0, when either half
    has fewer than ``min_calls`` calls.
    """
    used = sorted((b for b in buckets if b.count > 0), key=lambda b: b.start)
    if len(used) < 2:
        return TrendResult(TrendKind.INSUFFICIENT_DATA, 0.0)
    middle = (used[0].start + used[-1].start) / 2
    earlier = [b for b in used if b.start < middle]
    later = [b for b in used if b.start > middle]
    if sum(b.count for b in earlier) < min_calls or sum(b.count for b in later) < min_calls:
        return TrendResult(TrendKind.INSUFFICIENT_DATA, 0.0)
    before = _weighted_median((b.p50_ms, b.count) for b in earlier)
    after = _weighted_median((b.p50_ms, b.count) for b in later)
    change = 100 * (after - before) / max(before, _TREND_MIN_BASE_MS)
    if change > _TREND_BAND_PERCENT:
        return TrendResult(TrendKind.DEGRADING, change)
    if change < -_TREND_BAND_PERCENT:
        return TrendResult(TrendKind.IMPROVING, change)
    return TrendResult(TrendKind.STABLE, change)


def _weighted_median(pairs: Iterable[tuple[float, int]]) -> float:
    """The value where the cumulative weight first reaches half the total weight.

    When it reaches exactly half, the mean of that value and the next one; with equal
    weights this is the ordinary median. Needs a positive total weight.
    """
    ordered = sorted(pairs)
    half = sum(w for _, w in ordered) / 2
    cumulative = 0
    for i, (value, weight) in enumerate(ordered):
        cumulative += weight
        if cumulative > half:
            return value
        if cumulative == half:
            return (value + ordered[i + 1][0]) / 2
    raise ValueError("weighted median of no weight")  # pragma: no cover


def anomalies(
    buckets: Sequence[Bucket], *, threshold: float = 3.5, min_bucket_calls: int = 5
) -> list[Found]:
    """Buckets whose p99 latency or infrastructure error rate is far above the window's,
    oldest first.

    Only buckets with at least ``min_bucket_calls`` calls qualify, as baseline and as
    candidates; with fewer than 8 qualifying buckets there is no baseline: no anomaly.
    For each series ``y`` (one value per qualifying bucket)::

        score = (y - median(y)) / s,   s = max(MAD / 0.6745, 1.253314 x MeanAD)

    MAD is the median and MeanAD the mean of ``|y - median(y)|``. Where the MAD term
    is the larger, the score is the Iglewicz-Hoaglin modified z
    ``0.6745 x (y - median) / MAD``; the mean-deviation term (1.253314 = sqrt(pi/2)
    turns it into a standard deviation) keeps the scale honest when over half the
    values tie (MAD 0: sketch values snap to 1 % bins) or the MAD comes out small by
    chance. When every value equals the median, s is 0 and nothing deviates.

    - Latency (``LATENCY``): ``y = ln(p99 ms)`` (0 ms counts as 0.001 ms). Latency
      noise is multiplicative, so the log scale makes a 10x spike equally unusual at
      5 ms and at 500 ms and keeps the right-skewed tail of steady traffic quiet.
      Reported when score >= threshold and p99 >= 2 x the median p99 (the p99 of a
      small bucket is its slowest call or two, far noisier than a normal tail).
    - Error rate (``ERROR_RATE``): ``y = infrastructure failures / count`` (business
      rejections are the callers' doing, not a fault of the service). The score is the
      smaller of the robust z and the binomial z ``-Phi^-1(P[X >= failures])``, X ~
      Binomial(count, p), p the pooled rate (all infrastructure failures / all calls
      of the qualifying buckets): a small bucket is judged by how unlikely its failure
      count is, not against the calm of large buckets. Reported when score >=
      threshold, the rate is at least 5 percentage points above the median and the
      bucket has at least 3 infrastructure failures.

    Only upward deviations are reported (slower, more errors). ``baseline`` is the
    median p99 (ms) or the median error rate.
    """
    qualifying = sorted(
        (b for b in buckets if b.count >= max(min_bucket_calls, 1)), key=lambda b: b.start
    )
    if len(qualifying) < _MIN_ANOMALY_BUCKETS:
        return []
    found = _latency_anomalies(qualifying, threshold) + _error_anomalies(qualifying, threshold)
    found.sort(key=lambda f: (f.bucket_start, f.kind))
    return found


def _robust_scale(values: Sequence[float], center: float) -> float:
    deviations = [abs(v - center) for v in values]
    return max(
        statistics.median(deviations) * _MAD_TO_SIGMA,
        statistics.fmean(deviations) * _MEAN_AD_TO_SIGMA,
    )


def _latency_anomalies(buckets: Sequence[Bucket], threshold: float) -> list[Found]:
    logs = [math.log(max(b.p99_ms, _MIN_LATENCY_MS)) for b in buckets]
    center = statistics.median(logs)
    scale = _robust_scale(logs, center)
    baseline = statistics.median(b.p99_ms for b in buckets)
    out = []
    for bucket, y in zip(buckets, logs, strict=True):
        if scale == 0 or bucket.p99_ms < _LATENCY_FLOOR_RATIO * baseline:
            continue
        score = (y - center) / scale
        if score >= threshold:
            out.append(
                Found(
                    kind=AnomalyKind.LATENCY,
                    bucket_start=bucket.start,
                    observed=bucket.p99_ms,
                    baseline=baseline,
                    score=score,
                    description=(
                        f"p99 {bucket.p99_ms:.1f} ms is {score:.1f} robust z above"
                        f" the window median {baseline:.1f} ms"
                    ),
                )
            )
    return out


def _error_anomalies(buckets: Sequence[Bucket], threshold: float) -> list[Found]:
    rates = [b.infrastructure_error_rate for b in buckets]
    baseline = statistics.median(rates)
    scale = _robust_scale(rates, baseline)
    pooled = sum(b.infrastructure_failures for b in buckets) / sum(b.count for b in buckets)
    out = []
    for bucket, rate in zip(buckets, rates, strict=True):
        faults = bucket.infrastructure_failures
        if faults < _ERROR_MIN_FAILURES or rate - baseline < _ERROR_RATE_FLOOR:
            continue
        if scale == 0 or (rate - baseline) / scale < threshold:
            continue
        score = min((rate - baseline) / scale, _binomial_z(faults, bucket.count, pooled))
        if score >= threshold:
            out.append(
                Found(
                    kind=AnomalyKind.ERROR_RATE,
                    bucket_start=bucket.start,
                    observed=rate,
                    baseline=baseline,
                    score=score,
                    description=(
                        f"infrastructure error rate {rate:.1%}"
                        f" ({faults} of {_calls(bucket.count)})"
                        f" is {score:.1f} z above the window median {baseline:.1%}"
                    ),
                )
            )
    return out


def _binomial_z(k: int, n: int, p: float) -> float:
    """-Phi^-1(P[X >= k]) for X ~ Binomial(n, p): how many standard deviations of a
    normal variable are as unlikely as k or more successes; 0 when k <= n p."""
    if k <= n * p:
        return 0.0
    if p <= 0:
        return -_STANDARD_NORMAL.inv_cdf(_MIN_TAIL)
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)

    def log_term(j: int) -> float:
        return log_n - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * log_p + (n - j) * log_q

    # Above the mean the terms only shrink: sum until they no longer count.
    first = log_term(k)
    total = 0.0
    for j in range(k, n + 1):
        relative = math.exp(log_term(j) - first)
        total += relative
        if relative < 1e-17 * total:
            break
    log_tail = first + math.log(total)
    tail = math.exp(log_tail) if log_tail > math.log(_MIN_TAIL) else _MIN_TAIL
    return max(0.0, -_STANDARD_NORMAL.inv_cdf(min(tail, 0.5)))


def health_score(figures: Figures, anomalies_count: int, thresholds: Thresholds) -> float:
    """Health of a set of calls, 0 (failing) to 100 (healthy)::

        score     = 100 - error - latency - anomalies, clamped to 0..100
        error     = min(60, infrastructure + business)
        infrastructure = 600 x infrastructure failures / total
        business  = 0 while business failures / total <= business_error_alert_rate,
                    else min(30, 10 + 100 x (business failures / total - that rate))
        latency   = min(30, 10 x max(0, p95 / latency_target_ms - 1))
        anomalies = min(10, 5 x anomalies_count)

    Infrastructure faults (the service or its network broke) are what the score is
    about: 10 % of them cost the full 60. Business rejections (the service refused the
    callers' input on purpose: INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ...)
    cost nothing up to ``business_error_alert_rate`` (default 50 %), and at most 30
    above it. A p95 at 4x the target costs the full 30. The score does not depend on
    ``min_calls``: a quiet service is scored on what it did (10 faults out of 10 calls
    is an F); the report flags too little traffic through the INSUFFICIENT_DATA trend,
    a recommendation and the absence of alerts. Without any call the score is 100
    less the anomaly penalty.
    """
    infrastructure = _INFRASTRUCTURE_PENALTY_PER_RATE * figures.infrastructure_error_rate
    error = min(_ERROR_PENALTY_MAX, infrastructure + _business_penalty(figures, thresholds))
    excess = max(0.0, figures.p95_ms / thresholds.latency_target_ms - 1)
    latency = min(_LATENCY_PENALTY_MAX, _LATENCY_PENALTY_PER_RATIO * excess)
    anomaly = min(_ANOMALY_PENALTY_MAX, _ANOMALY_PENALTY_EACH * max(0, anomalies_count))
    return min(100.0, max(0.0, 100.0 - error - latency - anomaly))


def _business_penalty(figures: Figures, thresholds: Thresholds) -> float:
    over = figures.business_error_rate - thresholds.business_error_alert_rate
    if over <= 0:
        return 0.0
    return min(_BUSINESS_PENALTY_MAX, _BUSINESS_PENALTY_BASE + _BUSINESS_PENALTY_PER_RATE * over)


def grade(score: float) -> str:
    """Letter of a health score: A >= 90, B >= 80, C >= 70, D >= 60, else F."""
    for floor, letter in _GRADES:
        if score >= floor:
            return letter
    return "F"


def alerts(
    service: str, operation: str, figures: Figures, thresholds: Thresholds, *, now: float
) -> list[AlertFound]:
    """Threshold breaches of one service's figures (``operation`` empty: service-wide).

    Rules, in this order, each firing at most once:

    - ``infrastructure_error_rate``: infrastructure failures / total; CRITICAL when
      >= ``infrastructure_error_rate_critical``, else WARNING when >=
      ``infrastructure_error_rate_warning``;
    - ``business_error_rate``: business failures / total; WARNING (never more: the
      service works, its callers' input is refused) when above
      ``business_error_alert_rate``;
    - ``p99_latency``: p99 ms; CRITICAL when >= ``p99_critical_ms``, else WARNING
      when >= ``p99_warning_ms``.

    No alert at all below ``min_calls`` calls: a few calls are no evidence. The id
    ``service/operation/rule`` (``*`` for an empty operation) stays the same while
    the breach lasts, whatever its severity.
    """
    if figures.total < thresholds.min_calls:
        return []
    scope = f"{service}/{operation}" if operation else service
    infrastructure = figures.infrastructure_error_rate
    business = figures.business_error_rate
    found: list[tuple[str, float, AlertSeverity | None, float, str]] = [
        (
            "infrastructure_error_rate",
            infrastructure,
            *_severity(
                infrastructure,
                thresholds.infrastructure_error_rate_warning,
                thresholds.infrastructure_error_rate_critical,
            ),
            f"infrastructure error rate {infrastructure:.1%}"
            f" ({figures.infrastructure_failures} of {_calls(figures.total)})"
            " is at or above the {severity} threshold {limit:.1%}",
        ),
        (
            "business_error_rate",
            business,
            AlertSeverity.WARNING if business > thresholds.business_error_alert_rate else None,
            thresholds.business_error_alert_rate,
            f"{business:.1%} of calls refused ({figures.business_failures} of"
            f" {_calls(figures.total)}{_top_codes(figures, infrastructure=False)}) is above"
            " the business error alert rate {limit:.1%}: check the callers' input",
        ),
        (
            "p99_latency",
            figures.p99_ms,
            *_severity(figures.p99_ms, thresholds.p99_warning_ms, thresholds.p99_critical_ms),
            f"p99 latency {figures.p99_ms:.1f} ms is at or above the {{severity}} threshold"
            " {limit:.1f} ms",
        ),
    ]
    out = []
    for rule, observed, severity, limit, message in found:
        if severity is None:
            continue
        out.append(
            AlertFound(
                alert_id=f"{service}/{operation or '*'}/{rule}",
                service=service,
                operation=operation,
                severity=severity,
                rule=rule,
                threshold=limit,
                observed=observed,
                message=f"{scope}: " + message.format(severity=severity.name.lower(), limit=limit),
                observed_at=now,
            )
        )
    return out


def _severity(
    observed: float, warning: float, critical: float
) -> tuple[AlertSeverity | None, float]:
    """(severity, threshold breached) of a value; (None, warning) below both."""
    if observed >= critical:
        return AlertSeverity.CRITICAL, critical
    if observed >= warning:
        return AlertSeverity.WARNING, warning
    return None, warning


def recommendations(
    figures: Figures,
    trend: TrendKind,
    anomalies: Sequence[Found],
    thresholds: Thresholds,
    *,
    trend_change_percent: float | None = None,
) -> list[str]:
    """Actionable sentences about a set of calls, most important first; [] when fine.

    Below ``min_calls`` calls only one sentence: too little traffic to judge. Else,
    in this order, each when it applies:

    1. infrastructure error rate >= ``infrastructure_error_rate_warning``: check recent
       deploys, capacity, the network and the dependencies (top codes quoted);
    2. business rejections above ``business_error_alert_rate``: the callers' requests
       are being refused, check the callers' input; from 5 % of the calls up to that
       rate, the same as a note that they cost no health points;
    3. p99 >= ``p99_warning_ms``, or p95 above ``latency_target_ms``: the slow path;
    4. p99 >= 5 x p50 and p99 >= ``latency_target_ms``: tail latency, outliers and
       timeouts;
    5. trend DEGRADING (``trend_change_percent`` quoted when given);
    6. latency anomalies; 7. error-rate anomalies (count and the worst bucket, UTC).
    """
    if figures.total < thresholds.min_calls:
        return [
            f"Only {_calls(figures.total)} in the window, fewer than the {thresholds.min_calls}"
            " needed to judge error rate, latency and trend: widen the window or send"
            " more traffic."
        ]
    out: list[str] = []
    infrastructure = figures.infrastructure_error_rate
    if infrastructure >= thresholds.infrastructure_error_rate_warning:
        out.append(
            f"Infrastructure error rate is {infrastructure:.1%}"
            f" ({figures.infrastructure_failures} of {_calls(figures.total)}"
            f"{_top_codes(figures, infrastructure=True)}), above the"
            f" {thresholds.infrastructure_error_rate_warning:.1%} warning threshold: check"
            " recent deploys, capacity, the network and the health of the instances and"
            " of the dependencies."
        )
    business = figures.business_error_rate
    refused = (
        f"{business:.1%} of calls ({figures.business_failures} of {_calls(figures.total)}"
        f"{_top_codes(figures, infrastructure=False)})"
    )
    if business > thresholds.business_error_alert_rate:
        out.append(
            f"Callers' requests are being refused: {refused} ended in business"
            f" rejections, above the {thresholds.business_error_alert_rate:.1%} alert rate:"
            " check the callers' input (a caller's deploy, a changed contract), not this"
            " service's health."
        )
    elif business >= _BUSINESS_NOTE_RATE:
        out.append(
            f"{refused[0].upper()}{refused[1:]} were refused as business rejections:"
            " the callers' input, not a fault, so they cost no health points up to the"
            f" {thresholds.business_error_alert_rate:.1%} alert rate; if unexpected, check"
            " the callers' input."
        )
    if figures.p99_ms >= thresholds.p99_warning_ms:
        out.append(
            f"p99 latency is {figures.p99_ms:.1f} ms, above the {thresholds.p99_warning_ms:.1f}"
            " ms warning threshold: profile the slow path and check the dependencies'"
            " latency."
        )
    elif figures.p95_ms > thresholds.latency_target_ms:
        out.append(
            f"p95 latency is {figures.p95_ms:.1f} ms, above the"
            f" {thresholds.latency_target_ms:.1f} ms target: profile the slow path."
        )
    if (
        figures.p99_ms >= _TAIL_RATIO * figures.p50_ms
        and figures.p99_ms >= thresholds.latency_target_ms
    ):
        out.append(
            f"p99 latency ({figures.p99_ms:.1f} ms) is {_ratio(figures.p99_ms, figures.p50_ms)}"
            f" the median ({figures.p50_ms:.1f} ms): look at tail latency, outlier"
            " instances, retries, lock contention and timeouts."
        )
    if trend is TrendKind.DEGRADING:
        change = (
            f"rose {trend_change_percent:.1f}%"
            if trend_change_percent is not None
            else "rose more than 10%"
        )
        out.append(
            f"Median latency {change} from the earlier to the later half of the window:"
            " look for growing load, a resource leak or a recent deploy."
        )
    for kind, what, cause in (
        (AnomalyKind.LATENCY, "latency", "deploys, GC pauses, traffic bursts"),
        (AnomalyKind.ERROR_RATE, "error-rate", "deploys, dependency outages"),
    ):
        found = [a for a in anomalies if a.kind is kind]
        if found:
            worst = max(found, key=lambda a: (a.score, -a.bucket_start))
            out.append(
                f"{len(found)} {what} {'anomaly' if len(found) == 1 else 'anomalies'}"
                f" in the window (worst at {_utc(worst.bucket_start)}: {worst.description}):"
                f" correlate with {cause} at those times."
            )
    return out


def is_infrastructure(code: int) -> bool:
    """Tell whether a status code number is an infrastructure fault
    (``errors.INFRASTRUCTURE_CODES``)."""
    return code in _INFRASTRUCTURE


def _calls(count: int) -> str:
    """``1 call``, ``2 calls``."""
    return f"{count} call" if count == 1 else f"{count} calls"


def code_name(code: int) -> str:
    """Name of a gRPC status code number (``INVALID_ARGUMENT``); "" for 0 (a failure
    reported without a code) and for numbers past 16."""
    return _CODE_NAMES[code] if 0 < code < len(_CODE_NAMES) else ""


def _code_name(code: int) -> str:
    return code_name(code) or ("no code" if code == 0 else str(code))


def _top_codes(figures: Figures, *, infrastructure: bool) -> str:
    """``; mostly INVALID_ARGUMENT (12), NOT_FOUND (3)``: the most frequent codes of
    one kind, "" when none is known."""
    codes = figures.codes_of(infrastructure=infrastructure)[:_CODES_QUOTED]
    if not codes:
        return ""
    return "; mostly " + ", ".join(f"{_code_name(code)} ({n})" for code, n in codes)


def _ratio(numerator: float, denominator: float) -> str:
    if denominator <= 0:
        return "far above"
    return f"{numerator / denominator:.1f}x"


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
