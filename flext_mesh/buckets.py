"""Histogram bucket bounds shared by every process that exposes Prometheus metrics.

The control plane's call histograms and a sidecar's client call histograms use the same
bounds, so their series can be summed and compared in one query.
"""

from __future__ import annotations

__all__ = ["CALL_BUCKETS_SECONDS"]

#: Upper bounds (seconds, ascending, +Inf implied) of mesh call latency histograms; the
#: metrics service folds durations into them with ``numpy.searchsorted``.
CALL_BUCKETS_SECONDS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
