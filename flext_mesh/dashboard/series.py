"""Latency and error time series for the dashboard's plots, bucket by bucket.

A ServiceReport (MetricsService.GetServiceReport) sums a window up; plots need the
window point by point. Each point is one of the metrics service's time buckets (10 s
over the last 10 minutes, 1 min up to an hour, 10 min beyond): its call count, error
rates and p50/p95/p99 from the bucket's merged latency sketches (1% relative error).

Merging sketches and taking quantiles is CPU work: :func:`snapshot` copies what may
still change on the event loop, then :func:`build_series` runs in a worker thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from flext_mesh.metrics.aggregator import Aggregator, BucketStats, SeriesKey, merge_stats

__all__ = ["Window", "build_series", "snapshot"]

#: (bucket start s, bucket width s, series stats) in time order.
Window = Sequence[tuple[int, int, dict[SeriesKey, BucketStats]]]
_QUANTILES = (0.5, 0.95, 0.99)
#: Width of the buckets that calls land in; only these change after they are created.
_OPEN_WIDTH = 10


def snapshot(aggregator: Aggregator, service: str, seconds: float) -> Window:
    """The service's buckets within the window, safe to read from another thread.

    Calls are folded into 10 s buckets only (late records too), so those are copied;
    wider buckets are made by roll-ups and never change once made.
    """
    return [
        (
            start,
            width,
            {
                key: BucketStats(stats.sketch.copy(), stats.failures, stats.infrastructure_failures)
                for key, stats in series.items()
            }
            if width == _OPEN_WIDTH
            else dict(series),
        )
        for start, width, series in aggregator.window(service, seconds)
    ]


def build_series(window: Window, *, operation: str = "") -> list[dict[str, Any]]:
    """One time series per operation (``operation`` "" first: all operations together).

    Each is ``{"operation", "calls", "error_rate", "infrastructure_error_rate", "p50_ms",
    "p95_ms", "p99_ms"}``, lists aligned with the window's buckets; a bucket without
    calls holds ``None`` in every list but ``calls`` (a gap in the plot, not a zero).
    With ``operation``, only that one is returned.
    """
    names = (
        [operation]
        if operation
        else ["", *sorted({key.operation for _, _, series in window for key in series})]
    )
    out = []
    for name in names:
        points: dict[str, list[Any]] = {
            "calls": [],
            "error_rate": [],
            "infrastructure_error_rate": [],
            "p50_ms": [],
            "p95_ms": [],
            "p99_ms": [],
        }
        for _, _, series in window:
            stats = merge_stats(s for k, s in series.items() if not name or k.operation == name)
            count = stats.count
            points["calls"].append(count)
            if not count:
                for values in list(points.values())[1:]:
                    values.append(None)
                continue
            points["error_rate"].append(stats.failures / count)
            points["infrastructure_error_rate"].append(stats.infrastructure_failures / count)
            for label, value in zip(
                ("p50_ms", "p95_ms", "p99_ms"), stats.sketch.quantiles(_QUANTILES), strict=True
            ):
                points[label].append(round(value, 3) if math.isfinite(value) else None)
        out.append({"operation": name, **points})
    return out
