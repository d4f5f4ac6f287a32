"""Which instance a Discover answer puts first: strategies, effective weights, panic mode.

Pure Python, no gRPC and no I/O. The Discover server builds one :class:`Picker` per
candidate set (a service's instances at one registry revision), pre-serializes one
response per possible first instance using :meth:`Picker.order`, and calls
:meth:`Picker.pick` once per request to choose among them.

Effective weight (what the strategies balance on)::

    effective = base weight x health multiplier x performance multiplier

    health multiplier       SERVING 1, UNKNOWN 1, NOT_SERVING 0, DRAINING 0; 0 when ejected
    performance multiplier  latency factor x error factor
    latency factor          clamp(sqrt(service median / response time), 0.5, 1.5);
                            1 when either is unknown, or when the response time is
                            within 1 ms or 25% of the median (noise, not a difference)
    error factor            clamp(1 - 2 x infrastructure error rate, 0.1, 1)
"""

from __future__ import annotations

import enum
import math
import random
import statistics
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from heapq import heapify, heappop, heappush
from itertools import accumulate

__all__ = [
    "Candidate",
    "Picker",
    "Strategy",
    "effective_weight",
    "health_factor",
    "in_panic",
    "performance_factors",
    "performance_multiplier",
]

# HealthStatus numbers of protos/flext_mesh/v1/registry.proto.
_HEALTH_UNKNOWN = 1
_HEALTH_SERVING = 2
_HEALTH_NOT_SERVING = 3
_HEALTH_DRAINING = 4
_HEALTH_MULTIPLIER = {
    _HEALTH_UNKNOWN: 1.0,
    _HEALTH_SERVING: 1.0,
    _HEALTH_NOT_SERVING: 0.0,
    _HEALTH_DRAINING: 0.0,
}

_LATENCY_FACTOR_MIN = 0.5
_LATENCY_FACTOR_MAX = 1.5
# Response times this close to the service median count as equal to it: equal
# instances measured a few tenths of a millisecond apart (a GC pause, a busy loop) kept
# 40/60 weights until the next refresh.
_LATENCY_NOISE_MS = 1.0
_LATENCY_NOISE_SHARE = 0.25
_ERROR_FACTOR_MIN = 0.1


class Strategy(enum.IntEnum):
    """Load-balancing strategy; numbers match ``flext_mesh.v1.LoadBalancingStrategy``."""

    WEIGHTED_ROUND_ROBIN = 1
    """Smooth weighted round robin: each instance first in its weight share, within +-1."""
    LEAST_RESPONSE_TIME = 2
    """Lowest EWMA response time first (deterministic)."""
    HIGHEST_UPTIME = 3
    """Highest uptime percentage first (deterministic)."""
    POWER_OF_TWO_CHOICES = 4
    """Two instances drawn by weight; the faster one first."""
    RANDOM = 5
    """One instance drawn by weight."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """One instance as the balancer sees it.

    Raises ``ValueError`` for a negative or non-finite weight or response time, or an
    uptime outside 0..100.
    """

    key: str
    """Instance id; breaks ties so that orders are deterministic."""
    weight: float
    """Effective weight (see :func:`effective_weight`). Candidates of weight 0 never come
    first unless every candidate has weight 0, when all count as equal."""
    response_time_ms: float = 0.0
    """EWMA response time in milliseconds; 0 when unknown."""
    uptime_percentage: float = 100.0
    """Share of health checks passed, 0 to 100."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ValueError(f"candidate {self.key!r}: weight {self.weight!r} is not >= 0")
        if not (math.isfinite(self.response_time_ms) and self.response_time_ms >= 0):
            raise ValueError(
                f"candidate {self.key!r}: response_time_ms {self.response_time_ms!r} is not >= 0"
            )
        if not 0 <= self.uptime_percentage <= 100:  # also rejects NaN
            raise ValueError(
                f"candidate {self.key!r}: uptime_percentage {self.uptime_percentage!r}"
                " is not in 0..100"
            )


class Picker:
    """Chooses which candidate comes first in each Discover answer of one candidate set.

    ``pick()`` is the per-request call: O(1) for the deterministic strategies, O(log N)
    for the others. Weighted round robin is smooth (shares interleave) and exact: after
    any N picks each candidate was first within 1 - 1/(2n - 2) of N x its weight share
    (Tijdeman's chairman assignment; nginx's algorithm can stray past 1). With integer
    weights its sequence repeats with a period of the sum of the weights. It keeps
    state, so a picker serves one event loop (it is not thread-safe). Raises
    ``ValueError`` when there is no candidate.
    """

    __slots__ = (
        "_by_weight",
        "_candidates",
        "_cumulative",
        "_d",
        "_denominators",
        "_eligible",
        "_first",
        "_keys",
        "_pending",
        "_pick",
        "_random",
        "_rank",
        "_ready",
        "_rts",
        "_served",
        "_step",
        "_total",
        "_uptimes",
        "_weights",
        "_weights_of_all",
        "strategy",
    )

    def __init__(
        self,
        candidates: Sequence[Candidate],
        strategy: Strategy,
        *,
        rng: random.Random | None = None,
        rotate: bool = False,
        start: int | None = None,
    ) -> None:
        """``rotate``: weighted round robin starts at a random candidate instead of the
        first of equal standing, so pickers rebuilt often (a registry change each) do
        not all hand their first picks to the same candidate. ``start``: it starts at
        candidate ``start`` instead (or the next one of positive weight after it), so
        a picker that replaces another can carry on its rotation: pass the index of
        the candidate after the last one the old picker chose."""
        if not candidates:
            raise ValueError("a picker needs at least one candidate")
        self._candidates: tuple[Candidate, ...] | None = tuple(candidates)
        self._setup(
            [c.key for c in candidates],
            [c.weight for c in candidates],
            [c.response_time_ms for c in candidates],
            [c.uptime_percentage for c in candidates],
            strategy=strategy,
            rng=rng,
            rotate=rotate,
            start=start,
        )

    @classmethod
    def from_columns(
        cls,
        keys: list[str],
        weights: list[float],
        response_times_ms: list[float],
        uptime_percentages: list[float],
        strategy: Strategy,
        *,
        rng: random.Random | None = None,
        rotate: bool = False,
    ) -> Picker:
        """A picker over candidates given as columns (candidate i is ``keys[i]``,
        ``weights[i]``, ...): no object per candidate, for thousands of them. The lists
        are kept, not copied. Same checks as :class:`Candidate`, made on whole columns."""
        n = len(keys)
        if not n:
            raise ValueError("a picker needs at least one candidate")
        if not len(weights) == len(response_times_ms) == len(uptime_percentages) == n:
            raise ValueError("the columns have different lengths")
        if not (math.isfinite(math.fsum(weights)) and min(weights) >= 0):
            raise ValueError("a weight is negative or not finite")
        if not (math.isfinite(math.fsum(response_times_ms)) and min(response_times_ms) >= 0):
            raise ValueError("a response time is negative or not finite")
        if not (math.isfinite(math.fsum(uptime_percentages)) and min(uptime_percentages) >= 0):
            raise ValueError("an uptime percentage is not in 0..100")
        if max(uptime_percentages) > 100:
            raise ValueError("an uptime percentage is not in 0..100")
        picker = cls.__new__(cls)
        picker._candidates = None
        picker._setup(
            keys,
            weights,
            response_times_ms,
            uptime_percentages,
            strategy=strategy,
            rng=rng,
            rotate=rotate,
        )
        return picker

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        """The candidates; ``pick()`` and ``order()`` return indexes into this tuple."""
        if self._candidates is None:
            self._candidates = tuple(
                Candidate(key, w, rt, up)
                for key, w, rt, up in zip(
                    self._keys, self._weights_of_all, self._rts, self._uptimes, strict=True
                )
            )
        return self._candidates

    def _setup(
        self,
        keys: list[str],
        all_weights: list[float],
        rts: list[float],
        uptimes: list[float],
        *,
        strategy: Strategy,
        rng: random.Random | None,
        rotate: bool = False,
        start: int | None = None,
    ) -> None:
        self.strategy = Strategy(strategy)
        """The strategy applied."""
        self._random = (rng if rng is not None else random.Random()).random
        self._keys = keys
        self._weights_of_all = all_weights
        self._rts = rts
        self._uptimes = uptimes
        n = len(keys)
        negated = [-w for w in all_weights]
        # Fallback order of every answer: weight descending, then key, then index (two
        # stable sorts keyed in C: quick for thousands, linear when already in order).
        by_weight = sorted(range(n), key=keys.__getitem__)
        by_weight.sort(key=negated.__getitem__)
        self._by_weight = by_weight
        # Only candidates of positive weight come first; if none has, all do, equally.
        eligible = [i for i, w in enumerate(all_weights) if w > 0]
        if eligible:
            weights = [all_weights[i] for i in eligible]
        else:
            eligible = list(range(n))
            weights = [1.0] * n
        if (
            (rotate or start is not None)
            and self.strategy is Strategy.WEIGHTED_ROUND_ROBIN
            and len(eligible) > 1
        ):
            # Ties go to the lowest position: start the positions at a random one, or
            # at the first eligible candidate from ``start`` on.
            if start is None:
                offset = int(self._random() * len(eligible)) % len(eligible)
            else:
                offset = bisect_left(eligible, start % n) % len(eligible)
            eligible = eligible[offset:] + eligible[:offset]
            weights = weights[offset:] + weights[:offset]
        self._eligible = eligible
        self._weights = weights
        self._total = total = math.fsum(weights)
        self._cumulative: list[float] = []
        self._rank: list[int] = []
        self._first = -1
        # Weighted round robin state (see _pick_wrr), built only for that strategy.
        self._d = d = max(2 * len(weights) - 2, 1)
        self._denominators: list[float] = []
        self._step = 0
        self._served: list[int] = []
        self._ready: list[tuple[float, int]] = []
        self._pending: list[tuple[float, float, int]] = []
        strategy = self.strategy
        if strategy is Strategy.WEIGHTED_ROUND_ROBIN and len(eligible) > 1:
            self._denominators = denominators = [d * w for w in weights]
            self._served = [0] * len(weights)
            # Inlined _window(pos, 0) for every position; those already released at the
            # first step start in the ready heap (with equal weights, all of them), so
            # no pick moves more than its share between the heaps.
            windows = [
                (total / den, (d - 1) * total / den, pos) for pos, den in enumerate(denominators)
            ]
            self._ready = [(deadline, pos) for release, deadline, pos in windows if release <= 1]
            if len(self._ready) < len(windows):
                self._pending = [w for w in windows if w[0] > 1]
                heapify(self._pending)
            heapify(self._ready)
        if strategy in (Strategy.RANDOM, Strategy.POWER_OF_TWO_CHOICES):
            self._cumulative = list(accumulate(weights))
        if strategy is Strategy.HIGHEST_UPTIME:
            first_pos = min(
                range(len(eligible)),
                key=lambda p: (
                    -uptimes[eligible[p]],
                    -weights[p],
                    keys[eligible[p]],
                    eligible[p],
                ),
            )
            self._first = eligible[first_pos]
        elif strategy in (Strategy.LEAST_RESPONSE_TIME, Strategy.POWER_OF_TWO_CHOICES):
            # Rank of each eligible position in least-response-time order (0 = fastest).
            rt_order = _by_response_time(keys, rts, eligible, weights)
            self._rank = [0] * len(eligible)
            for rank, pos in enumerate(rt_order):
                self._rank[pos] = rank
            self._first = eligible[rt_order[0]]
        else:
            self._first = eligible[0]
        self._pick: Callable[[], int] = {
            Strategy.WEIGHTED_ROUND_ROBIN: self._pick_wrr,
            Strategy.LEAST_RESPONSE_TIME: self._pick_first,
            Strategy.HIGHEST_UPTIME: self._pick_first,
            Strategy.POWER_OF_TWO_CHOICES: self._pick_p2c,
            Strategy.RANDOM: self._pick_random,
        }[strategy]
        if len(eligible) == 1:
            self._pick = self._pick_first

    def pick(self) -> int:
        """Index of the candidate to put first in the next answer."""
        return self._pick()

    def order(self, first: int, limit: int = 0) -> list[int]:
        """Order of an answer led by ``first``: then the rest by weight descending, key;
        at most ``limit`` indexes when ``limit`` > 0."""
        if not 0 <= first < len(self._keys):
            raise IndexError(f"candidate index {first} out of range")
        rest = self._by_weight
        if limit > 0:
            head = rest[:limit]
            if first in head:
                head.remove(first)
            else:
                head = head[: limit - 1]
            return [first, *head]
        out = [first, *rest]
        del out[rest.index(first) + 1]
        return out

    def _pick_first(self) -> int:
        return self._first

    def _pick_wrr(self) -> int:
        # Tijdeman's chairman assignment as earliest-deadline-first over two heaps: a
        # candidate is released once it is owed 1/D of a pick and its deadline is when
        # it would be owed 1 - 1/D, D = 2n - 2; so |picks - step x share| <= 1 - 1/D.
        step = self._step + 1
        self._step = step
        pending = self._pending
        ready = self._ready
        while pending and pending[0][0] <= step:
            _, deadline, pos = heappop(pending)
            heappush(ready, (deadline, pos))
        if ready:
            _, pos = heappop(ready)
        else:  # only through float rounding of non-integer weights
            _, _, pos = heappop(pending)
        served = self._served[pos] + 1
        self._served[pos] = served
        # Inlined _window(pos, served).
        d = self._d
        total = self._total
        denominator = self._denominators[pos]
        release = (d * served + 1) * total / denominator
        heappush(pending, (release, (d * served + d - 1) * total / denominator, pos))
        return self._eligible[pos]

    def _window(self, pos: int, served: int) -> tuple[float, float, int]:
        """(release step, deadline, pos) of the pick after ``served`` picks of ``pos``."""
        # One rounding per value, so integer weights give exact releases and deadlines.
        d = self._d
        total = self._total
        denominator = self._denominators[pos]
        release = (d * served + 1) * total / denominator
        return (release, (d * served + d - 1) * total / denominator, pos)

    def _pick_random(self) -> int:
        cumulative = self._cumulative
        pos = bisect_right(cumulative, self._random() * self._total)
        if pos == len(cumulative):  # random() * total rounded up to total
            pos -= 1
        return self._eligible[pos]

    def _pick_p2c(self) -> int:
        cumulative = self._cumulative
        last = len(cumulative) - 1
        total = self._total
        a = bisect_right(cumulative, self._random() * total)
        if a > last:  # random() * total rounded up to total
            a -= 1
        # Second draw by weight among the others: skip a's interval of the cumulative line.
        weight_a = self._weights[a]
        x = self._random() * (total - weight_a)
        if x >= cumulative[a] - weight_a:
            x += weight_a
        b = bisect_right(cumulative, x)
        if b > last:
            b -= 1
        if b == a:  # only through float rounding at the edge of a's interval
            b = a + 1 if a < last else a - 1
        rank = self._rank
        return self._eligible[a if rank[a] < rank[b] else b]


def _by_response_time(
    keys: Sequence[str], rts: Sequence[float], eligible: Sequence[int], weights: Sequence[float]
) -> list[int]:
    """Positions in ``eligible`` by response time (unknown = median of known), weight, key."""
    known = [rts[i] for i in eligible if rts[i] > 0]
    median = statistics.median(known) if known else 0.0

    def sort_key(pos: int) -> tuple[float, float, str, int]:
        i = eligible[pos]
        rt = rts[i] if rts[i] > 0 else median
        return (rt, -weights[pos], keys[i], i)

    return sorted(range(len(eligible)), key=sort_key)


def effective_weight(
    base_weight: int, health: int, ejected: bool, performance_multiplier: float
) -> float:
    """Weight the strategies balance on: base x health multiplier x performance multiplier.

    ``health`` is a ``flext_mesh.v1.HealthStatus`` number. Health multiplier: SERVING 1,
    UNKNOWN 1 (not checked yet counts as healthy), NOT_SERVING 0, DRAINING 0, and 0 for
    UNSPECIFIED, unrecognised numbers, or whenever ``ejected``. ``base_weight`` is the
    instance's weight after registration defaults; ``performance_multiplier`` comes from
    :func:`performance_multiplier`. Raises ``ValueError`` for a negative base weight or a
    negative or non-finite multiplier.
    """
    if base_weight < 0:
        raise ValueError(f"base weight {base_weight} is negative")
    if not (math.isfinite(performance_multiplier) and performance_multiplier >= 0):
        raise ValueError(f"performance multiplier {performance_multiplier!r} is not >= 0")
    if ejected:
        return 0.0
    return base_weight * _HEALTH_MULTIPLIER.get(health, 0.0) * performance_multiplier


def health_factor(health: int, ejected: bool) -> float:
    """The health multiplier of :func:`effective_weight` (0 whenever ``ejected``)."""
    return 0.0 if ejected else _HEALTH_MULTIPLIER.get(health, 0.0)


def performance_factors(
    response_time_ms: float, service_median_ms: float, infrastructure_error_rate: float
) -> tuple[float, float]:
    """(latency factor, error factor): their product is :func:`performance_multiplier`.

    Latency factor: ``clamp(sqrt(service_median_ms / response_time_ms), 0.5, 1.5)`` when
    both are known (finite and > 0), else 1: an instance 4x slower than the service median
    gets half the weight, one 4x faster 1.5x at most. A response time within 1 ms or 25%
    of the median is measurement noise, not a difference: its factor is 1. Error factor:
    ``clamp(1 - 2 x infrastructure_error_rate, 0.1, 1)``, 1 when the rate is not finite:
    each 10% of infrastructure errors costs 20% of the weight, never below 10%.
    """
    latency = 1.0
    if (
        _known(response_time_ms)
        and _known(service_median_ms)
        and abs(response_time_ms - service_median_ms)
        > max(_LATENCY_NOISE_MS, _LATENCY_NOISE_SHARE * service_median_ms)
    ):
        latency = math.sqrt(service_median_ms / response_time_ms)
        latency = min(max(latency, _LATENCY_FACTOR_MIN), _LATENCY_FACTOR_MAX)
    errors = 1.0
    if math.isfinite(infrastructure_error_rate):
        errors = min(max(1.0 - 2.0 * infrastructure_error_rate, _ERROR_FACTOR_MIN), 1.0)
    return latency, errors


def performance_multiplier(
    response_time_ms: float, service_median_ms: float, infrastructure_error_rate: float
) -> float:
    """Latency factor x error factor (:func:`performance_factors`), in 0.05..1.5; 1 when
    nothing is known."""
    latency, errors = performance_factors(
        response_time_ms, service_median_ms, infrastructure_error_rate
    )
    return latency * errors


def _known(value: float) -> bool:
    return math.isfinite(value) and value > 0


def in_panic(total: int, healthy: int, threshold_percent: float) -> bool:
    """True when fewer than ``threshold_percent`` of ``total`` instances are healthy.

    Panic mode answers with every instance rather than overload the few healthy ones.
    A threshold of 0 (or below) disables it; no instances is never panic.
    """
    return total > 0 and threshold_percent > 0 and healthy * 100 < threshold_percent * total
