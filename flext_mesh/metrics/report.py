"""Building a ServiceReport from a window of buckets (CPU work: run it in a thread).

Per operation, per version and per instance the sketches of the window's buckets are
merged; trends and anomalies look at the window bucket by bucket; the health score,
grade, alerts and recommendations follow :mod:`flext_mesh.metrics.analysis`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence

from google.protobuf import duration_pb2, timestamp_pb2

from flext_mesh.metrics import analysis
from flext_mesh.metrics.aggregator import BucketStats, SeriesKey, merge_stats
from flext_mesh.v1 import metrics_pb2

__all__ = ["MIN_OBSERVED_SECONDS", "Window", "alert_message", "build_report", "evaluate_alerts"]

#: (bucket start, bucket width, series stats) in time order.
Window = Sequence[tuple[int, int, dict[SeriesKey, BucketStats]]]
_QUANTILES = (0.5, 0.95, 0.99)
#: The shortest span a throughput is computed over (one 10 s bucket): a service seen
#: for the first time a second ago did not serve 50 calls a second.
MIN_OBSERVED_SECONDS = 10.0
#: Status codes listed per CallStats, at most.
_MAX_CODES = 5


def _figures(stats: BucketStats, seconds: float, observed: float | None = None) -> analysis.Figures:
    sketch = stats.sketch
    count = sketch.count
    p50, p95, p99 = sketch.quantiles(_QUANTILES) if count else (0.0, 0.0, 0.0)
    codes = sorted(stats.codes.items(), key=lambda item: (-item[1], item[0]))
    return analysis.Figures(
        total=count,
        successes=count - stats.failures,
        failures=stats.failures,
        infrastructure_failures=stats.infrastructure_failures,
        min_ms=sketch.min if count else 0.0,
        avg_ms=sketch.total / count if count else 0.0,
        max_ms=sketch.max if count else 0.0,
        p50_ms=p50,
        p95_ms=p95,
        p99_ms=p99,
        window_seconds=seconds,
        observed_seconds=observed,
        failure_codes=tuple(codes),
    )


def _first_seen(history: Window) -> dict[SeriesKey, float]:
    """When each series had its first call, as far as ``history`` tells (its bucket's
    start)."""
    out: dict[SeriesKey, float] = {}
    for start, _, series in history:
        for key in series:
            if key not in out or start < out[key]:
                out[key] = float(start)
    return out


def _observed(
    keys: Iterable[SeriesKey], first_seen: Mapping[SeriesKey, float], seconds: float, now: float
) -> float | None:
    """Seconds from the first call of ``keys`` to now when that is within the window
    (at least MIN_OBSERVED_SECONDS); None when they were seen before it (or unknown)."""
    since = min((first_seen.get(key, -math.inf) for key in keys), default=-math.inf)
    if since <= now - seconds:
        return None
    return min(seconds, max(MIN_OBSERVED_SECONDS, now - since))


def _buckets(window: Window, select: Callable[[SeriesKey], bool]) -> list[analysis.Bucket]:
    out = []
    for start, _, series in window:
        stats = merge_stats(s for k, s in series.items() if select(k))
        if not stats.count:
            continue
        p50, p99 = stats.sketch.quantiles((0.5, 0.99))
        out.append(
            analysis.Bucket(
                start=start,
                count=stats.count,
                failures=stats.failures,
                infrastructure_failures=stats.infrastructure_failures,
                p50_ms=p50,
                p99_ms=p99,
            )
        )
    return out


def _call_stats(
    stats: BucketStats,
    buckets: list[analysis.Bucket],
    seconds: float,
    thresholds: analysis.Thresholds,
    *,
    observed: float | None = None,
    operation: str = "",
    version: str = "",
    instance_id: str = "",
) -> tuple[metrics_pb2.CallStats, analysis.Figures, list[analysis.Found], object]:
    figures = _figures(stats, seconds, observed)
    trend, change = analysis.trend(buckets, min_calls=thresholds.min_calls)
    found = analysis.anomalies(buckets)
    score = analysis.health_score(figures, len(found), thresholds)
    out = metrics_pb2.CallStats(
        operation=operation,
        version=version,
        instance_id=instance_id,
        total_calls=figures.total,
        successful_calls=figures.successes,
        failed_calls=figures.failures,
        infrastructure_failures=figures.infrastructure_failures,
        success_rate=figures.successes / figures.total if figures.total else 0.0,
        error_rate=figures.failures / figures.total if figures.total else 0.0,
        min_ms=figures.min_ms,
        avg_ms=figures.avg_ms,
        max_ms=figures.max_ms,
        p50_ms=figures.p50_ms,
        p95_ms=figures.p95_ms,
        p99_ms=figures.p99_ms,
        throughput_per_second=figures.throughput_per_second,
        throughput_per_hour=figures.throughput_per_hour,
        trend=int(trend),  # type: ignore[arg-type]
        trend_change_percent=change,
        health_score=score,
        grade=analysis.grade(score),
        business_failures=figures.business_failures,
        infrastructure_error_rate=figures.infrastructure_error_rate,
        business_error_rate=figures.business_error_rate,
    )
    out.observed.FromNanoseconds(int(figures.span_seconds * 1e9))
    for code, calls in figures.failure_codes[:_MAX_CODES]:
        out.failure_codes.add(
            code=code,
            code_name=analysis.code_name(code),
            calls=calls,
            infrastructure=analysis.is_infrastructure(code),
        )
    for item in found:
        anomaly = out.anomalies.add(
            kind=int(item.kind),
            operation=operation,
            observed=item.observed,
            baseline=item.baseline,
            score=item.score,
            description=item.description,
        )
        anomaly.time.FromSeconds(int(item.bucket_start))
    return out, figures, found, trend


def build_report(
    service: str,
    window: Window,
    seconds: float,
    thresholds: analysis.Thresholds,
    *,
    now: float,
    operation: str = "",
    by_version: bool = False,
    by_instance: bool = False,
    fire_times: dict[str, float] | None = None,
    history: Window = (),
) -> metrics_pb2.ServiceReport:
    """The ServiceReport of ``service`` over ``window`` (see metrics.proto).

    ``history``: the service's buckets over the whole retention (those of the window
    included), to tell how long each series has been seen: a set of calls whose first
    call is within the window has its throughput computed from then, not over the
    whole window. Empty: every series counts as older than the window.
    """
    first_seen = _first_seen(history)

    def observed(keys: Iterable[SeriesKey]) -> float | None:
        return _observed(keys, first_seen, seconds, now)

    report = metrics_pb2.ServiceReport(
        service_name=service, business_error_alert_rate=thresholds.business_error_alert_rate
    )
    report.window.CopyFrom(duration_pb2.Duration(seconds=int(seconds)))
    report.generate_time.CopyFrom(_timestamp(now))
    report.window_start.CopyFrom(_timestamp(now - seconds))

    def wanted(key: SeriesKey) -> bool:
        return not operation or key.operation == operation

    per_operation: dict[str, list[BucketStats]] = defaultdict(list)
    per_version: dict[tuple[str, str], list[BucketStats]] = defaultdict(list)
    per_instance: dict[str, list[BucketStats]] = defaultdict(list)
    keys: set[SeriesKey] = set()
    for _, _, series in window:
        for key, stats in series.items():
            if not wanted(key):
                continue
            keys.add(key)
            per_operation[key.operation].append(stats)
            per_version[(key.operation, key.version)].append(stats)
            per_instance[key.instance_id].append(stats)

    all_stats = merge_stats(s for group in per_operation.values() for s in group)
    summary, figures, found, trend = _call_stats(
        all_stats, _buckets(window, wanted), seconds, thresholds, observed=observed(keys)
    )
    report.summary.CopyFrom(summary)
    alerts = analysis.alerts(service, "", figures, thresholds, now=now)
    for name in sorted(per_operation):
        op_stats, op_figures, _, _ = _call_stats(
            merge_stats(per_operation[name]),
            _buckets(window, _operation_is(name)),
            seconds,
            thresholds,
            observed=observed(k for k in keys if k.operation == name),
            operation=name,
        )
        report.operations.append(op_stats)
        alerts += analysis.alerts(service, name, op_figures, thresholds, now=now)
    if by_version:
        for (name, version), group in sorted(per_version.items()):
            version_stats, _, _, _ = _call_stats(
                merge_stats(group),
                _buckets(window, _version_is(name, version)),
                seconds,
                thresholds,
                observed=observed(k for k in keys if (k.operation, k.version) == (name, version)),
                operation=name,
                version=version,
            )
            report.versions.append(version_stats)
    if by_instance:
        for instance_id, group in sorted(per_instance.items()):
            instance_stats, _, _, _ = _call_stats(
                merge_stats(group),
                _buckets(window, _instance_is(instance_id, wanted)),
                seconds,
                thresholds,
                observed=observed(k for k in keys if k.instance_id == instance_id),
                instance_id=instance_id,
            )
            report.instances.append(instance_stats)
    report.recommendations.extend(
        analysis.recommendations(figures, trend, found, thresholds)  # type: ignore[arg-type]
    )
    report.alerts.extend(alert_message(a, fire_times) for a in alerts)
    return report


def _operation_is(name: str) -> Callable[[SeriesKey], bool]:
    return lambda key: key.operation == name


def _version_is(name: str, version: str) -> Callable[[SeriesKey], bool]:
    return lambda key: key.operation == name and key.version == version


def _instance_is(
    instance_id: str, wanted: Callable[[SeriesKey], bool]
) -> Callable[[SeriesKey], bool]:
    return lambda key: wanted(key) and key.instance_id == instance_id


def evaluate_alerts(
    service: str, window: Window, seconds: float, thresholds: analysis.Thresholds, *, now: float
) -> list[analysis.AlertFound]:
    """Alerts firing for ``service`` over the window: service-wide and per operation."""
    per_operation: dict[str, list[BucketStats]] = defaultdict(list)
    for _, _, series in window:
        for key, stats in series.items():
            per_operation[key.operation].append(stats)
    everything = merge_stats(s for group in per_operation.values() for s in group)
    out = analysis.alerts(service, "", _figures(everything, seconds), thresholds, now=now)
    for name, group in sorted(per_operation.items()):
        out += analysis.alerts(
            service, name, _figures(merge_stats(group), seconds), thresholds, now=now
        )
    return out


def alert_message(
    found: analysis.AlertFound, fire_times: dict[str, float] | None
) -> metrics_pb2.Alert:
    """The Alert message of a finding, with its first fire time when known."""
    alert = metrics_pb2.Alert(
        alert_id=found.alert_id,
        service_name=found.service,
        operation=found.operation,
        severity=int(found.severity),  # type: ignore[arg-type]
        rule=found.rule,
        threshold=found.threshold,
        observed=found.observed,
        message=found.message,
    )
    if fire_times and found.alert_id in fire_times:
        alert.fire_time.CopyFrom(_timestamp(fire_times[found.alert_id]))
    return alert


def _timestamp(seconds: float) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(int(seconds * 1e9))
    return ts
