"""A mergeable quantile sketch of latencies in milliseconds, with a relative-error guarantee.

`LatencySketch` uses DDSketch's logarithmic mapping. With relative accuracy ``alpha``
(0.01 by default) and ``gamma = (1 + alpha) / (1 - alpha)``, a value ``v`` goes to
bucket ``i = ceil(log(v) / log(gamma))``, which covers ``(gamma**(i-1), gamma**i]``,
and bucket ``i`` reports ``2 * gamma**i / (gamma + 1)``: within ``alpha`` relative error
of every value in the bucket. So ``quantile(q)`` is within ``alpha`` of the sample whose
rank is ``floor(q * (count - 1))`` (0-based, ascending), the convention of
``numpy.quantile(..., method="lower")``.

Values ``<= ZERO_THRESHOLD`` (1e-6 ms, i.e. 1 ns, and exactly 0) are counted in a zero
bucket that reports 0. Ingest is vectorised: `LatencySketch.add_many` maps a whole batch
with numpy and folds it with one ``np.bincount``, and `grouped` does the same for values
of many series at once (one log and one ``np.bincount`` over all of them).

Storage is compact and bounded: the bins cover only the indices between the lowest and
highest seen (at most ``ceil(log(1e8 / 1e-6) / log(gamma)) + 1`` = 1,613 bins for values
from 1 ns to ~28 hours at alpha 0.01), as ``uint32`` until the count could overflow one
bin, ``uint64`` after.
"""

from __future__ import annotations

import functools
import math
import struct
import sys
import zlib
from collections.abc import Iterable, Sequence
from typing import Any, Final

import numpy as np
import numpy.typing as npt

__all__ = ["DEFAULT_RELATIVE_ACCURACY", "ZERO_THRESHOLD", "LatencySketch", "grouped", "merged"]

DEFAULT_RELATIVE_ACCURACY: Final = 0.01
"""Relative accuracy of a sketch unless told otherwise (1%)."""

ZERO_THRESHOLD: Final = 1e-6
"""Values at or below this (in ms) are counted in the zero bucket and reported as 0."""

_U32_MAX: Final = 2**32 - 1
# Header of to_bytes(): magic, version, flags, alpha, count, zero count, total, min, max,
# offset (lowest bin index), number of bins. Little-endian, no padding: 60 bytes.
_HEADER: Final = struct.Struct("<2sBBdQQdddiI")
_MAGIC: Final = b"LS"
_VERSION: Final = 1
_WIDTH_MASK: Final = 0x03  # flags bits 0-1: bytes per count, 1 << code
_ZLIB_FLAG: Final = 0x80  # flags bit 7: counts are zlib-compressed
_WIDTHS: Final = (np.dtype("<u1"), np.dtype("<u2"), np.dtype("<u4"), np.dtype("<u8"))

_Bins = npt.NDArray[np.unsignedinteger[Any]]
# Cells of the dense (group x bucket) count matrix `grouped` may use (32 MB of int64);
# beyond it, it sorts the (group, bucket) pairs instead.
_DENSE_CELLS: Final = 1 << 22


class _LogMapping:
    """The value <-> bucket index mapping of one relative accuracy (shared by sketches)."""

    __slots__ = (
        "gamma",
        "inv_log_gamma",
        "max_index",
        "min_index",
        "relative_accuracy",
        "value_factor",
    )

    def __init__(self, relative_accuracy: float) -> None:
        if not 0.0 < relative_accuracy < 1.0:
            raise ValueError(f"relative_accuracy must be in (0, 1), got {relative_accuracy!r}")
        gamma = (1.0 + relative_accuracy) / (1.0 - relative_accuracy)
        log_gamma = math.log(gamma)
        if not log_gamma > 0.0:
            raise ValueError(f"relative_accuracy {relative_accuracy!r} is too small to use")
        self.relative_accuracy = relative_accuracy
        self.gamma = gamma
        self.inv_log_gamma = 1.0 / log_gamma
        self.value_factor = 2.0 / (gamma + 1.0)  # bucket i reports value_factor * gamma**i
        self.min_index = self.index(math.nextafter(ZERO_THRESHOLD, math.inf))
        self.max_index = self.index(sys.float_info.max)

    def indices(self, positive: npt.NDArray[np.float64]) -> npt.NDArray[np.int64]:
        """Bucket indices of values all > ZERO_THRESHOLD (the one place the mapping lives)."""
        scaled = np.log(positive)
        scaled *= self.inv_log_gamma
        np.ceil(scaled, out=scaled)
        return scaled.astype(np.int64)

    def index(self, value: float) -> int:
        """Bucket index of one value > ZERO_THRESHOLD, bit-for-bit as `indices` computes it
        (same numpy log; a float64 multiply and ceil are the same in Python)."""
        return math.ceil(float(np.log(np.array([value], dtype=np.float64))[0]) * self.inv_log_gamma)


@functools.lru_cache(maxsize=64)
def _mapping(relative_accuracy: float) -> _LogMapping:
    return _LogMapping(relative_accuracy)


class LatencySketch:
    """Mergeable quantile sketch of latencies (ms) within a stated relative accuracy.

    Quantiles use the rank ``floor(q * (count - 1))`` (``numpy.quantile``'s "lower") and
    are within ``relative_accuracy`` of the sample at that rank (0 for the zero bucket).
    `count`, `min` and `max` are exact; `total` is a float sum (the mean's numerator).
    """

    __slots__ = ("_bins", "_count", "_mapping", "_max", "_min", "_offset", "_total", "_zero")

    def __init__(self, relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY) -> None:
        """An empty sketch; `relative_accuracy` must be in (0, 1) (ValueError otherwise)."""
        self._mapping = _mapping(float(relative_accuracy))
        # Invariant: when _bins is non-empty its first and last counts are non-zero, and
        # _bins[k] counts the values of bucket _offset + k.
        self._bins: _Bins = np.zeros(0, dtype=np.uint32)
        self._offset = 0
        self._count = 0
        self._zero = 0
        self._total = 0.0
        self._min = math.inf
        self._max = -math.inf

    # ----------------------------------------------------------------- properties

    @property
    def relative_accuracy(self) -> float:
        """The guaranteed relative error of every quantile (alpha)."""
        return self._mapping.relative_accuracy

    @property
    def count(self) -> int:
        """Number of values added."""
        return self._count

    @property
    def zero_count(self) -> int:
        """Number of values at or below `ZERO_THRESHOLD` (reported as 0)."""
        return self._zero

    @property
    def total(self) -> float:
        """Sum of the values added (``total / count`` is the mean)."""
        return self._total

    @property
    def min(self) -> float:
        """Smallest value added, exactly; NaN when the sketch is empty."""
        return self._min if self._count else math.nan

    @property
    def max(self) -> float:
        """Largest value added, exactly; NaN when the sketch is empty."""
        return self._max if self._count else math.nan

    def buckets(self) -> tuple[int, npt.NDArray[np.int64]]:
        """``(offset, counts)``: ``counts[k]`` values fell in ``(gamma**(i-1), gamma**i]``,
        ``i = offset + k``; the zero bucket is `zero_count`. ``counts`` is a copy."""
        return self._offset, self._bins.astype(np.int64)

    # -------------------------------------------------------------------- ingest

    def add(self, value: float) -> None:
        """Add one latency; ValueError unless it is finite and >= 0."""
        value = float(value)
        if not 0.0 <= value < math.inf:
            raise ValueError(f"latency must be finite and >= 0, got {value!r}")
        if value > ZERO_THRESHOLD:
            index = self._mapping.index(value)
            self._reserve(index, index, self._count + 1)
            self._bins[index - self._offset] += 1
        else:
            self._zero += 1
        self._count += 1
        self._total += value
        self._min = min(self._min, value)
        self._max = max(self._max, value)

    def add_many(self, values: npt.ArrayLike) -> None:
        """Add a batch of latencies (ideally a float64 numpy array; any sequence or shape
        is accepted and flattened) in one vectorised fold: the ingest hot path.

        Callers are expected to validate, but a batch holding NaN, an infinity or a
        negative value is rejected whole with ValueError and the sketch is left unchanged.
        The bins come out exactly as with `add` one by one; `total` may differ in the
        last bits (numpy sums pairwise).
        """
        batch = np.asarray(values, dtype=np.float64)
        if batch.ndim != 1:
            batch = batch.ravel()
        n = batch.size
        if n == 0:
            return
        low = float(batch.min())
        high = float(batch.max())
        if not (low >= 0.0 and high < math.inf):  # NaN fails both comparisons
            raise ValueError("latencies must be finite and >= 0; batch rejected")
        positive = batch if low > ZERO_THRESHOLD else batch[batch > ZERO_THRESHOLD]
        if positive.size:
            indices = self._mapping.indices(positive)
            lo = int(indices.min())
            hi = int(indices.max())
            self._reserve(lo, hi, self._count + n)
            indices -= lo
            folded = np.bincount(indices)  # length hi - lo + 1
            start = lo - self._offset
            window = self._bins[start : start + folded.size]
            np.add(window, folded, out=window, casting="unsafe")  # safe: see _reserve
        self._zero += n - positive.size
        self._count += n
        self._total += float(batch.sum())
        self._min = min(self._min, low)
        self._max = max(self._max, high)

    def merge(self, other: LatencySketch) -> None:
        """Add every value of `other` to this sketch (in place); ValueError if their
        relative accuracies differ."""
        if other.relative_accuracy != self.relative_accuracy:
            raise ValueError(
                f"cannot merge sketches of relative accuracy {other.relative_accuracy} "
                f"into {self.relative_accuracy}"
            )
        if not other._count:
            return
        bins = other._bins.copy() if other is self else other._bins
        if bins.size:
            lo = other._offset
            self._reserve(lo, lo + bins.size - 1, self._count + other._count)
            start = lo - self._offset
            window = self._bins[start : start + bins.size]
            np.add(window, bins, out=window, casting="unsafe")
        self._zero += other._zero
        self._count += other._count
        self._total += other._total
        self._min = min(self._min, other._min)
        self._max = max(self._max, other._max)

    def copy(self) -> LatencySketch:
        """An independent copy."""
        clone = LatencySketch.__new__(LatencySketch)
        clone._mapping = self._mapping
        clone._bins = self._bins.copy()
        clone._offset = self._offset
        clone._count = self._count
        clone._zero = self._zero
        clone._total = self._total
        clone._min = self._min
        clone._max = self._max
        return clone

    def _reserve(self, lo: int, hi: int, new_count: int) -> None:
        """Make the bins cover indices [lo, hi], wide enough for `new_count` values.

        A bin never holds more than `count`, so uint32 bins cannot overflow while the
        count stays <= 2**32 - 1; past that they are widened to uint64 once.
        """
        bins = self._bins
        dtype = bins.dtype if new_count <= _U32_MAX else np.dtype(np.uint64)
        if not bins.size:
            self._bins = np.zeros(hi - lo + 1, dtype=dtype)
            self._offset = lo
            return
        first = self._offset
        last = first + bins.size - 1
        if first <= lo and hi <= last and dtype == bins.dtype:
            return
        new_first = min(lo, first)
        grown = np.zeros(max(hi, last) - new_first + 1, dtype=dtype)
        grown[first - new_first : first - new_first + bins.size] = bins
        self._bins = grown
        self._offset = new_first

    # ------------------------------------------------------------------ queries

    def quantile(self, q: float) -> float:
        """The q-quantile (q in [0, 1]) within `relative_accuracy`; NaN if empty.

        The sample of rank ``floor(q * (count - 1))`` is reported as its bucket's value
        clamped to [min, max] (0 for the zero bucket); ranks 0 and ``count - 1`` report
        the exact `min` and `max`.
        """
        return self.quantiles((q,))[0]

    def quantiles(self, qs: Sequence[float]) -> list[float]:
        """Several quantiles from one cumulative sum (see `quantile`)."""
        qs = [float(q) for q in qs]
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantile must be in [0, 1], got {q!r}")
        n = self._count
        if not n:
            return [math.nan] * len(qs)
        zero = self._zero
        # 0-based rank of the reported sample, as numpy.quantile(method="lower") takes it.
        ranks = [math.floor(q * (n - 1)) - zero for q in qs]
        cumulative = np.cumsum(self._bins, dtype=np.int64)
        positions: list[int] = np.searchsorted(cumulative, ranks, side="right").tolist()
        gamma = self._mapping.gamma
        factor = self._mapping.value_factor
        low = self._min
        high = self._max
        result = []
        last = n - 1 - zero
        for rank, position in zip(ranks, positions, strict=True):
            if rank == -zero:  # rank 0: the smallest sample, known exactly
                result.append(low)
                continue
            if rank == last:  # the largest sample, known exactly
                result.append(high)
                continue
            if rank < 0:  # in the zero bucket
                result.append(0.0)
                continue
            try:
                value = factor * gamma ** (self._offset + position)
            except OverflowError:  # a bucket near the largest float: clamped to max
                value = math.inf
            # The sample is in [min, max], so clamping can only bring the value closer.
            result.append(min(max(value, low), high))
        return result

    def __repr__(self) -> str:
        return (
            f"LatencySketch(relative_accuracy={self.relative_accuracy}, count={self._count}, "
            f"min={self.min:.6g}, max={self.max:.6g}, bins={self._bins.size})"
        )

    # ------------------------------------------------------------ serialisation

    def to_bytes(self) -> bytes:
        """A compact versioned encoding: a 60-byte header, then the counts in the narrowest
        unsigned width that holds them, byte planes apart (all low bytes, then the next...)
        and zlib-compressed when that is smaller. 100k lognormal samples: ~500 bytes."""
        bins = self._bins
        peak = int(bins.max()) if bins.size else 0
        code = 0 if peak <= 0xFF else 1 if peak <= 0xFFFF else 2 if peak <= _U32_MAX else 3
        width = _WIDTHS[code]
        # Byte planes: the high bytes of smooth counts are long runs zlib packs well.
        raw = bins.astype(width).view(np.uint8).reshape(-1, width.itemsize).T.tobytes()
        packed = zlib.compress(raw)
        flags = code
        if len(packed) < len(raw):
            raw = packed
            flags |= _ZLIB_FLAG
        header = _HEADER.pack(
            _MAGIC,
            _VERSION,
            flags,
            self.relative_accuracy,
            self._count,
            self._zero,
            self._total,
            self._min,
            self._max,
            self._offset,
            bins.size,
        )
        return header + raw

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> LatencySketch:
        """Decode `to_bytes` output; ValueError on garbage, truncation or inconsistency."""
        buf = bytes(data)
        if len(buf) < _HEADER.size:
            raise ValueError(f"sketch data truncated: {len(buf)} bytes < {_HEADER.size}")
        magic, version, flags, alpha, count, zero, total, low, high, offset, n_bins = (
            _HEADER.unpack_from(buf)
        )
        if magic != _MAGIC:
            raise ValueError("not a latency sketch (bad magic)")
        if version != _VERSION:
            raise ValueError(f"unsupported sketch version {version}")
        if flags & ~(_WIDTH_MASK | _ZLIB_FLAG):
            raise ValueError(f"unknown sketch flags {flags:#x}")
        mapping = _mapping(alpha)  # ValueError on a bad alpha
        if n_bins and not (
            mapping.min_index <= offset and offset + n_bins - 1 <= mapping.max_index
        ):
            raise ValueError("sketch bins out of the mapping's range")
        width = _WIDTHS[flags & _WIDTH_MASK]
        expected = n_bins * width.itemsize
        payload = buf[_HEADER.size :]
        if flags & _ZLIB_FLAG:
            inflater = zlib.decompressobj()
            try:
                # max_length 0 would mean "unbounded": ask for one byte more than due.
                raw = inflater.decompress(payload, expected + 1)
            except zlib.error as exc:
                raise ValueError(f"corrupt sketch counts: {exc}") from exc
            if not inflater.eof or inflater.unconsumed_tail or inflater.unused_data:
                raise ValueError("corrupt sketch counts: bad compressed length")
        else:
            raw = payload
        if len(raw) != expected:
            raise ValueError(f"sketch counts are {len(raw)} bytes, expected {expected}")
        planes = np.frombuffer(raw, dtype=np.uint8).reshape(width.itemsize, n_bins)
        counts = np.ascontiguousarray(planes.T).view(width).reshape(n_bins)
        binned = int(counts.sum(dtype=np.uint64))
        if n_bins and (
            not counts[0]
            or not counts[-1]
            or abs(float(counts.sum(dtype=np.float64)) - binned) > 1e-6 * binned + 1
        ):
            raise ValueError("sketch counts are not trimmed or overflow")
        if zero + binned != count:
            raise ValueError("sketch counts do not add up to its count")
        if count:
            finite = math.isfinite(total) and math.isfinite(low) and math.isfinite(high)
            if not (finite and 0.0 <= low <= high and total >= 0.0):
                raise ValueError("sketch min/max/total are inconsistent")
            if (zero > 0) != (low <= ZERO_THRESHOLD) or (n_bins > 0) != (high > ZERO_THRESHOLD):
                raise ValueError("sketch min/max disagree with its buckets")
        elif total != 0.0 or low != math.inf or high != -math.inf:
            raise ValueError("empty sketch with non-empty summary")
        sketch = cls.__new__(cls)
        sketch._mapping = mapping
        sketch._bins = counts.astype(np.uint32 if count <= _U32_MAX else np.uint64)
        sketch._offset = offset if n_bins else 0
        sketch._count = count
        sketch._zero = zero
        sketch._total = total
        sketch._min = low
        sketch._max = high
        return sketch


def merged(sketches: Iterable[LatencySketch]) -> LatencySketch:
    """One new sketch holding every value of `sketches` (an empty default one if none);
    ValueError if their relative accuracies differ. The bins are allocated once."""
    parts = list(sketches)
    if not parts:
        return LatencySketch()
    result = LatencySketch(parts[0].relative_accuracy)
    binned = [part for part in parts if part._bins.size]
    if binned:
        lo = min(part._offset for part in binned)
        hi = max(part._offset + part._bins.size - 1 for part in binned)
        result._reserve(lo, hi, sum(part._count for part in parts))
    for part in parts:
        result.merge(part)
    return result


def grouped(
    values: npt.ArrayLike,
    groups: npt.ArrayLike,
    count: int,
    relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY,
) -> list[LatencySketch]:
    """``count`` new sketches, the ``g``-th holding the values whose group is ``g``.

    The same sketches as ``add_many`` on each group's values (bins exactly; `total` up
    to the last bits), from one log and one ``np.bincount`` over all the values: the
    cost per value does not depend on how many groups there are. ``groups`` holds one
    number in ``[0, count)`` per value; ValueError otherwise, or when a value is NaN,
    infinite or negative.
    """
    batch = np.asarray(values, dtype=np.float64).ravel()
    group = np.asarray(groups, dtype=np.int64).ravel()
    if batch.size != group.size:
        raise ValueError(f"{batch.size} values but {group.size} group numbers")
    sketches = [LatencySketch(relative_accuracy) for _ in range(count)]
    if not batch.size:
        return sketches
    if not (group.min() >= 0 and group.max() < count):
        raise ValueError(f"group numbers must be in [0, {count})")
    if not (batch.min() >= 0.0 and batch.max() < math.inf):  # NaN fails both comparisons
        raise ValueError("latencies must be finite and >= 0; batch rejected")
    mapping = sketches[0]._mapping
    counts = np.bincount(group, minlength=count)
    totals = np.bincount(group, weights=batch, minlength=count)
    lows = np.full(count, math.inf)
    np.minimum.at(lows, group, batch)
    highs = np.full(count, -math.inf)
    np.maximum.at(highs, group, batch)
    positive = batch > ZERO_THRESHOLD
    binned_group = group[positive]
    indices = mapping.indices(batch[positive])
    binned = np.bincount(binned_group, minlength=count)
    rows = _group_rows(binned_group, indices, count) if indices.size else {}
    for number, sketch in enumerate(sketches):
        n = int(counts[number])
        if not n:
            continue
        row = rows.get(number)
        if row is not None:
            offset, bins = row
            sketch._bins = bins.astype(np.uint32 if n <= _U32_MAX else np.uint64)
            sketch._offset = offset
        sketch._count = n
        sketch._zero = n - int(binned[number])
        sketch._total = float(totals[number])
        sketch._min = float(lows[number])
        sketch._max = float(highs[number])
    return sketches


def _group_rows(
    group: npt.NDArray[np.int64], indices: npt.NDArray[np.int64], count: int
) -> dict[int, tuple[int, npt.NDArray[np.int64]]]:
    """Per group with values: (lowest bucket index, counts from it to its highest)."""
    lo = int(indices.min())
    span = int(indices.max()) - lo + 1
    cells = group * span + (indices - lo)
    rows: dict[int, tuple[int, npt.NDArray[np.int64]]] = {}
    if count * span <= _DENSE_CELLS:
        matrix = np.bincount(cells, minlength=count * span).reshape(count, span)
        for number in np.flatnonzero(matrix.any(axis=1)).tolist():
            line = matrix[number]
            used = np.flatnonzero(line)
            first, last = int(used[0]), int(used[-1])
            rows[number] = (lo + first, line[first : last + 1])
        return rows
    # Many groups and a wide range: only the cells that occur, sorted by group then bucket.
    occupied, tally = np.unique(cells, return_counts=True)
    owners = occupied // span
    places = occupied % span
    bounds = np.flatnonzero(np.diff(owners)) + 1
    starts = [0, *bounds.tolist()]
    ends = [*bounds.tolist(), occupied.size]
    for start, end in zip(starts, ends, strict=True):
        first, last = int(places[start]), int(places[end - 1])
        line = np.zeros(last - first + 1, dtype=np.int64)
        line[places[start:end] - first] = tally[start:end]
        rows[int(owners[start])] = (lo + first, line)
    return rows
