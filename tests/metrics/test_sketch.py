"""LatencySketch: quantiles within the stated relative error, exact merges, compact bytes.

Rank convention: ``quantile(q)`` reports the sample of 0-based rank ``floor(q * (n - 1))``
in ascending order, which is what ``numpy.quantile(x, q, method="lower")`` returns
exactly (an actual sample, never an interpolation). So the check is
``abs(estimate - exact) / exact <= alpha`` against that sample; a sample at or below
``ZERO_THRESHOLD`` is reported as exactly 0. ("inverted_cdf" picks rank
``ceil(q * n) - 1`` instead, one rank off at some q, so it is not the reference here.)
"""

from __future__ import annotations

import contextlib
import math
import struct
import zlib
from collections.abc import Callable

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flext_mesh.metrics import sketch as sketch_module
from flext_mesh.metrics.sketch import ZERO_THRESHOLD, LatencySketch, merged

ALPHA = 0.01
QS = (0.0, 0.001, 0.01, 0.25, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0)
N = 100_000
Samples = npt.NDArray[np.float64]


def exact(values: Samples, q: float) -> float:
    return float(np.quantile(values, q, method="lower"))


def max_relative_error(sketch: LatencySketch, values: Samples, qs: tuple[float, ...]) -> float:
    """Largest relative error over qs; a zero-bucket sample must be reported as 0."""
    worst = 0.0
    for q, estimate in zip(qs, sketch.quantiles(qs), strict=True):
        truth = exact(values, q)
        if truth <= ZERO_THRESHOLD:
            assert estimate == 0.0 or estimate == truth, (q, estimate, truth)
            continue
        worst = max(worst, abs(estimate - truth) / truth)
    return worst


def sketch_of(values: Samples | list[float], alpha: float = ALPHA) -> LatencySketch:
    sketch = LatencySketch(alpha)
    sketch.add_many(values)
    return sketch


def same_bins(a: LatencySketch, b: LatencySketch) -> bool:
    (offset_a, counts_a), (offset_b, counts_b) = a.buckets(), b.buckets()
    return (
        offset_a == offset_b
        and np.array_equal(counts_a, counts_b)
        and a.zero_count == b.zero_count
        and a.count == b.count
    )


def _lognormal(rng: np.random.Generator) -> Samples:
    sigma = 1.0  # mean = exp(mu + sigma**2 / 2) = 50 ms
    return rng.lognormal(math.log(50.0) - sigma**2 / 2, sigma, N)


def _bimodal(rng: np.random.Generator) -> Samples:
    fast = rng.lognormal(math.log(5.0), 0.2, N * 8 // 10)
    slow = rng.lognormal(math.log(200.0), 0.1, N - fast.size)
    return rng.permutation(np.concatenate([fast, slow]))


def _pareto(rng: np.random.Generator) -> Samples:
    return (rng.pareto(1.2, N) + 1.0) * 2.0  # heavy tail: p99.9 in the hundreds of ms


def _with_zeros(rng: np.random.Generator) -> Samples:
    values = rng.lognormal(0.0, 2.0, N)
    values[: N // 10] = 0.0
    values[N // 10 : N // 10 + 100] = 5e-7
    return rng.permutation(values)


DISTRIBUTIONS: dict[str, Callable[[np.random.Generator], Samples]] = {
    "lognormal": _lognormal,
    "bimodal": _bimodal,
    "pareto": _pareto,
    "uniform": lambda rng: rng.uniform(0.5, 100.0, N),
    "constant": lambda rng: np.full(N, 42.0),
    "log-uniform 1e-5..1e8": lambda rng: 10.0 ** rng.uniform(-5.0, 8.0, N),
    "10% zeros": _with_zeros,
}


# ------------------------------------------------------------------------ accuracy


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_quantiles_are_within_relative_accuracy_of_the_exact_sample(name: str) -> None:
    values = DISTRIBUTIONS[name](np.random.default_rng(20240611))
    sketch = sketch_of(values)

    assert max_relative_error(sketch, values, QS) <= ALPHA * (1 + 1e-9)
    assert sketch.quantile(0.0) == pytest.approx(values.min(), abs=ZERO_THRESHOLD)
    assert sketch.quantile(1.0) == values.max()
    assert (sketch.count, sketch.min, sketch.max) == (N, values.min(), values.max())
    assert sketch.total == pytest.approx(values.sum(), rel=1e-12)


@pytest.mark.parametrize("alpha", [0.002, 0.02, 0.05])
def test_other_relative_accuracies_hold_their_bound(alpha: float) -> None:
    values = _pareto(np.random.default_rng(7))
    sketch = sketch_of(values, alpha)
    assert sketch.relative_accuracy == alpha
    assert max_relative_error(sketch, values, QS) <= alpha * (1 + 1e-9)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.floats(0.0, 1e9, allow_nan=False), min_size=1, max_size=300),
    st.lists(st.floats(0.0, 1.0), min_size=1, max_size=5),
)
def test_any_sample_any_quantile_is_within_the_bound(values: list[float], qs: list[float]) -> None:
    array = np.array(values)
    sketch = sketch_of(array)
    assert max_relative_error(sketch, array, tuple(qs)) <= ALPHA * (1 + 1e-9)


def test_quantiles_match_quantile_one_by_one() -> None:
    sketch = sketch_of(_bimodal(np.random.default_rng(3)))
    assert sketch.quantiles(QS) == [sketch.quantile(q) for q in QS]


# ---------------------------------------------------------------- add / add_many


def _boundary_values(alpha: float) -> Samples:
    """Exact bucket boundaries gamma**i and their float neighbours: where rounding bites."""
    gamma = (1 + alpha) / (1 - alpha)
    bounds = gamma ** np.arange(-600.0, 1000.0, 7.0)
    return np.concatenate([bounds, np.nextafter(bounds, 0.0), np.nextafter(bounds, np.inf)])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 1e12, allow_nan=False), max_size=200))
def test_add_and_add_many_fold_identically(values: list[float]) -> None:
    one_by_one = LatencySketch()
    for value in values:
        one_by_one.add(value)
    batched = LatencySketch()
    batched.add_many(values)  # a plain sequence is accepted too
    assert same_bins(one_by_one, batched)
    assert (one_by_one.min, one_by_one.max) == (batched.min, batched.max) or not values
    assert one_by_one.total == pytest.approx(batched.total, rel=1e-12)


def test_add_and_add_many_agree_on_bucket_boundaries() -> None:
    values = _boundary_values(ALPHA)
    one_by_one = LatencySketch()
    for value in values.tolist():
        one_by_one.add(value)
    batched = LatencySketch()
    for chunk in np.array_split(values, 7):
        batched.add_many(chunk)
    assert same_bins(one_by_one, batched)


def test_invalid_values_are_rejected_and_leave_the_sketch_unchanged() -> None:
    sketch = sketch_of([1.0, 2.0, 0.0])
    before = sketch.to_bytes()
    for bad in (-1.0, math.nan, math.inf, -math.inf):
        with pytest.raises(ValueError, match="finite"):
            sketch.add(bad)
        with pytest.raises(ValueError, match="finite"):
            sketch.add_many(np.array([5.0, bad, 7.0]))
    assert sketch.to_bytes() == before
    sketch.add_many(np.array([]))
    sketch.add_many([[3.0, 4.0]])  # any shape is flattened
    assert sketch.count == 5


# --------------------------------------------------------------------------- merge

value_lists = st.lists(
    st.one_of(st.floats(0.0, 1e9, allow_nan=False), st.just(0.0), st.floats(1e-3, 1e3)),
    max_size=200,
)


@settings(max_examples=100, deadline=None)
@given(value_lists, value_lists)
def test_merge_equals_the_sketch_of_the_union(a: list[float], b: list[float]) -> None:
    left = sketch_of(a)
    union = sketch_of(a + b)
    left.merge(sketch_of(b))
    assert same_bins(left, union)
    assert left.total == pytest.approx(union.total, rel=1e-12)
    if a or b:
        assert (left.min, left.max) == (min(a + b), max(a + b))
    assert same_bins(merged([sketch_of(a), sketch_of(b), LatencySketch()]), union)


def test_merge_into_self_copy_and_merged() -> None:
    base = sketch_of([0.0, 1.0, 10.0, 100.0])
    copy = base.copy()
    base.merge(base)
    assert base.count == 8
    assert base.total == 222.0
    assert copy.count == 4  # the copy is independent
    assert same_bins(merged([copy, copy]), base)
    assert merged([]).count == 0


def test_merge_rejects_a_different_relative_accuracy() -> None:
    with pytest.raises(ValueError, match="relative accuracy"):
        sketch_of([1.0]).merge(sketch_of([1.0], 0.02))
    with pytest.raises(ValueError, match="relative accuracy"):
        merged([sketch_of([1.0]), sketch_of([1.0], 0.02)])


def test_counts_past_uint32_do_not_overflow() -> None:
    sketch = sketch_of([7.0, 0.0])
    for _ in range(33):  # 2 * 2**33 values, 2**33 of them in one bin
        sketch.merge(sketch)
    sketch.add_many([7.0, 8.0])
    _, counts = sketch.buckets()
    assert sketch.count == 2**34 + 2
    assert counts[0] == 2**33 + 1
    assert counts[-1] == 1
    assert sketch.quantile(0.75) == pytest.approx(7.0, rel=ALPHA)
    again = LatencySketch.from_bytes(sketch.to_bytes())
    assert same_bins(again, sketch)


# --------------------------------------------------------------------------- bytes


@settings(max_examples=100, deadline=None)
@given(value_lists, st.sampled_from([0.005, 0.01, 0.05]))
def test_bytes_round_trip(values: list[float], alpha: float) -> None:
    sketch = sketch_of(values, alpha)
    data = sketch.to_bytes()
    again = LatencySketch.from_bytes(data)
    assert same_bins(again, sketch)
    assert again.relative_accuracy == alpha
    assert again.total == sketch.total
    assert [again.min, again.max] == [sketch.min, sketch.max] or not values
    assert again.quantiles(QS) == sketch.quantiles(QS) or not values
    assert again.to_bytes() == data
    assert LatencySketch.from_bytes(memoryview(bytearray(data))).count == sketch.count


def test_encoding_is_compact() -> None:
    values = _lognormal(np.random.default_rng(1))
    sketch = sketch_of(values)
    _, counts = sketch.buckets()
    assert counts.size < 600  # ~9 natural-log units of spread / log(gamma)
    assert len(sketch.to_bytes()) < 1024  # measured ~510 bytes (60 of them header)
    assert len(LatencySketch().to_bytes()) == 60


def test_bins_span_only_the_seen_range() -> None:
    sketch = sketch_of([1e-5, 1e8])
    _, counts = sketch.buckets()
    gamma = (1 + ALPHA) / (1 - ALPHA)
    assert counts.size <= math.ceil(math.log(1e8 / 1e-5) / math.log(gamma)) + 1
    assert counts.sum() == 2
    assert counts[0] == counts[-1] == 1


def _valid() -> bytes:
    return sketch_of(_lognormal(np.random.default_rng(5))[:2000]).to_bytes()


def test_truncated_data_is_rejected_at_every_length() -> None:
    data = _valid()
    for length in range(len(data)):
        with pytest.raises(ValueError, match=r"."):
            LatencySketch.from_bytes(data[:length])
    with pytest.raises(ValueError, match="compressed"):
        LatencySketch.from_bytes(data + b"\0")


def _header(data: bytes, **changes: object) -> bytes:
    names = [
        "magic",
        "version",
        "flags",
        "alpha",
        "count",
        "zero",
        "total",
        "min",
        "max",
        "offset",
        "n_bins",
    ]
    fields = dict(zip(names, struct.unpack_from("<2sBBdQQdddiI", data), strict=True))
    fields.update(changes)
    return struct.pack("<2sBBdQQdddiI", *fields.values()) + data[60:]


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"magic": b"XX"}, "magic"),
        ({"version": 2}, "version"),
        ({"flags": 0x40}, "flags"),
        ({"alpha": 0.0}, "relative_accuracy"),
        ({"alpha": math.nan}, "relative_accuracy"),
        ({"count": 1999}, "add up"),
        ({"zero": 1}, "add up"),
        ({"min": -1.0}, "inconsistent"),
        ({"total": math.inf}, "inconsistent"),
        ({"max": 1e-9}, "inconsistent"),
        ({"offset": -(10**6)}, "range"),
        ({"n_bins": 2**32 - 1}, "range"),
        ({"n_bins": 3}, "compressed|expected"),
    ],
)
def test_inconsistent_headers_are_rejected(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LatencySketch.from_bytes(_header(_valid(), **changes))


def test_corrupt_or_untrimmed_counts_are_rejected() -> None:
    data = _valid()
    with pytest.raises(ValueError, match="corrupt"):
        LatencySketch.from_bytes(data[:60] + b"\x78\x9c" + bytes(40))
    # Counts with a zero first bin (not trimmed), stored raw and consistent otherwise.
    raw = bytes([0, 1, 1])
    fake = struct.pack("<2sBBdQQdddiI", b"LS", 1, 0, ALPHA, 2, 0, 2.0, 1.0, 1.0, 0, 3) + raw
    with pytest.raises(ValueError, match="trimmed"):
        LatencySketch.from_bytes(fake)
    # A zlib bomb claiming no bins cannot inflate more than one byte.
    bomb = _header(LatencySketch().to_bytes(), flags=0x80) + zlib.compress(bytes(10**6))
    with pytest.raises(ValueError, match=r"."):
        LatencySketch.from_bytes(bomb)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_garbage_raises_value_error_only(data: bytes) -> None:
    for candidate in (data, b"LS\x01" + data):
        with contextlib.suppress(ValueError):
            LatencySketch.from_bytes(candidate)


# ---------------------------------------------------------------------------- edges


def test_empty_sketch() -> None:
    sketch = LatencySketch()
    assert (sketch.count, sketch.zero_count, sketch.total) == (0, 0, 0.0)
    assert math.isnan(sketch.min)
    assert math.isnan(sketch.max)
    assert math.isnan(sketch.quantile(0.5))
    assert all(math.isnan(v) for v in sketch.quantiles([0.0, 1.0]))
    again = LatencySketch.from_bytes(sketch.to_bytes())
    assert again.count == 0
    assert math.isnan(again.quantile(0.99))
    assert "count=0" in repr(sketch)


def test_zeros_and_sub_nanosecond_values_are_reported_as_zero() -> None:
    sketch = sketch_of([0.0, 0.0, 1e-7, ZERO_THRESHOLD])
    assert sketch.zero_count == 4
    assert sketch.buckets()[1].size == 0
    assert sketch.quantiles([0.0, 0.5, 0.7, 1.0]) == [0.0, 0.0, 0.0, ZERO_THRESHOLD]
    assert sketch.max == ZERO_THRESHOLD
    sketch.add(2.0)
    assert sketch.quantile(1.0) == 2.0
    assert sketch.quantile(0.5) == 0.0


def test_tiny_huge_and_extreme_values() -> None:
    values = [1e-5, 1e-5 * 1.5, 1e8, 1.7e308]
    sketch = sketch_of(values)
    for q, truth in zip((0.0, 0.34, 0.67, 1.0), values, strict=True):
        assert sketch.quantile(q) == pytest.approx(truth, rel=ALPHA)
    assert sketch.quantile(1.0) == 1.7e308  # clamped to the exact max, no overflow
    assert LatencySketch.from_bytes(sketch.to_bytes()).quantile(1.0) == 1.7e308


def test_bad_arguments() -> None:
    for alpha in (0.0, 1.0, -0.5, math.nan, 1e-300):
        with pytest.raises(ValueError, match="relative_accuracy"):
            LatencySketch(alpha)
    sketch = sketch_of([1.0])
    for q in (-0.1, 1.1, math.nan):
        with pytest.raises(ValueError, match="quantile"):
            sketch.quantile(q)


def test_module_exports() -> None:
    public = {n for n in vars(sketch_module) if not n.startswith("_")}
    assert set(sketch_module.__all__) <= public
    assert {"LatencySketch", "merged", "ZERO_THRESHOLD"} <= set(sketch_module.__all__)


# ------------------------------------------------------------------------ hot path
