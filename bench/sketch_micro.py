"""Micro-benchmark of :class:`~flext_mesh.metrics.sketch.LatencySketch`.

Prints add_many throughput at a few batch sizes beside a baseline measured in the same
run (the bare mapping and fold, ``bincount(ceil(log(v) / log(gamma)) - lo)``, with none
of the validation, min/max/total and bin bookkeeping of add_many), the throughput of
``grouped`` (values of many series folded at once, as a checkpoint folds its staged
records) beside ``add_many`` once per series on the same values, the
cost of add/quantile/to_bytes/from_bytes/merge, the size of a sketch of 100k lognormal
samples, and the worst relative error per distribution. Run
``python -m bench.sketch_micro``; it takes a few seconds.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import numpy as np

from flext_mesh.metrics.sketch import LatencySketch, grouped

RUNS = 5


def best_rate(work: Callable[[], None], items: int) -> float:
    """Items per second of the fastest of RUNS runs."""
    best = math.inf
    for _ in range(RUNS):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return items / best


def per_call_us(work: Callable[[], object], calls: int) -> float:
    """Microseconds per call, the fastest of RUNS runs of `calls` calls."""
    best = math.inf
    for _ in range(RUNS):
        start = time.perf_counter()
        for _ in range(calls):
            work()
        best = min(best, time.perf_counter() - start)
    return best / calls * 1e6


def main() -> None:
    rng = np.random.default_rng(1)
    total = 2_000_000
    print("add_many throughput (values/s, best of 5):")
    for batch in (500, 10_000):
        batches = [rng.lognormal(math.log(50) - 0.5, 1.0, batch) for _ in range(total // batch)]

        def fold(batches: list[np.ndarray] = batches) -> None:
            sketch = LatencySketch()
            for values in batches:
                sketch.add_many(values)

        def baseline(batches: list[np.ndarray] = batches) -> None:
            inv_log_gamma = 1 / math.log(1.01 / 0.99)
            for values in batches:
                idx = np.ceil(np.log(values) * inv_log_gamma).astype(np.int64)
                np.bincount(idx - idx.min())

        rate, floor = best_rate(fold, total), best_rate(baseline, total)
        print(
            f"  batch {batch:>6}: {rate:>14,.0f}  (bare log+bincount: {floor:,.0f}; "
            f"ratio {rate / floor:.2f})"
        )

    print("grouped throughput (values/s, best of 5; 250,000 values, as one checkpoint):")
    for groups in (20, 1_000):
        values = rng.lognormal(math.log(20), 0.7, 250_000)
        numbers = rng.integers(0, groups, values.size)

        def at_once(
            values: np.ndarray = values, numbers: np.ndarray = numbers, count: int = groups
        ) -> None:
            grouped(values, numbers, count)

        def one_by_one(
            values: np.ndarray = values, numbers: np.ndarray = numbers, count: int = groups
        ) -> None:
            order = np.argsort(numbers, kind="stable")
            bounds = np.searchsorted(numbers[order], np.arange(count + 1))
            ordered = values[order]
            for g in range(count):
                LatencySketch().add_many(ordered[bounds[g] : bounds[g + 1]])

        rate, floor = best_rate(at_once, values.size), best_rate(one_by_one, values.size)
        print(
            f"  {groups:>5} series: {rate:>14,.0f}  (add_many per series: {floor:,.0f}; "
            f"ratio {rate / floor:.2f})"
        )

    values = rng.lognormal(math.log(50) - 0.5, 1.0, 100_000)
    sketch = LatencySketch()
    sketch.add_many(values)
    other = sketch.copy()
    data = sketch.to_bytes()
    singles = values[:10_000].tolist()

    def add_singles() -> None:
        s = LatencySketch()
        for v in singles:
            s.add(v)

    print("per call (µs):")
    print(f"  add                 {per_call_us(add_singles, 1) / len(singles):8.2f}")
    print(f"  quantile            {per_call_us(lambda: sketch.quantile(0.99), 2000):8.2f}")
    qs = (0.5, 0.95, 0.99)
    print(f"  quantiles(3)        {per_call_us(lambda: sketch.quantiles(qs), 2000):8.2f}")
    print(f"  merge               {per_call_us(lambda: other.copy().merge(sketch), 2000):8.2f}")
    print(f"  to_bytes            {per_call_us(sketch.to_bytes, 2000):8.2f}")
    print(f"  from_bytes          {per_call_us(lambda: LatencySketch.from_bytes(data), 2000):8.2f}")

    _, counts = sketch.buckets()
    in_memory = sys.getsizeof(sketch) + sys.getsizeof(sketch._bins)  # bins data included
    print(
        f"100k lognormal (mean {values.mean():.1f} ms): {counts.size} bins, "
        f"in memory ~{in_memory} bytes, to_bytes {len(data)} bytes"
    )

    n = 100_000
    distributions = {
        "lognormal": values,
        "bimodal": np.concatenate(
            [rng.lognormal(math.log(5), 0.2, 80_000), rng.lognormal(math.log(200), 0.1, 20_000)]
        ),
        "pareto": (rng.pareto(1.2, n) + 1.0) * 2.0,
        "uniform": rng.uniform(0.5, 100.0, n),
        "constant": np.full(n, 42.0),
    }
    qs = (0.01, 0.5, 0.95, 0.99, 0.999)
    print("relative error vs numpy.quantile(method='lower'):  " + "  ".join(f"{q:>6}" for q in qs))
    for name, sample in distributions.items():
        s = LatencySketch()
        s.add_many(sample)
        errors = [
            abs(est - exact) / exact
            for est, exact in zip(
                s.quantiles(qs), np.quantile(sample, qs, method="lower"), strict=True
            )
        ]
        print(f"  {name:<10}" + " " * 38 + "  ".join(f"{e:6.2%}" for e in errors))


if __name__ == "__main__":
    main()
