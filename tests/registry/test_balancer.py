"""Unit tests of the balancer: strategies, effective weights, performance and panic mode."""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flext_mesh.routing import balancer
from flext_mesh.routing.balancer import (
    Candidate,
    Picker,
    Strategy,
    effective_weight,
    in_panic,
    performance_multiplier,
)
from flext_mesh.v1 import registry_pb2

UNKNOWN, SERVING, NOT_SERVING, DRAINING = 1, 2, 3, 4
PICKS = 20_000

candidate_lists = st.lists(
    st.builds(
        Candidate,
        key=st.text("abcdef", min_size=1, max_size=3),
        weight=st.one_of(st.just(0.0), st.floats(0.01, 10_000)),
        response_time_ms=st.one_of(st.just(0.0), st.floats(0.1, 5_000)),
        uptime_percentage=st.floats(0, 100),
    ),
    min_size=1,
    max_size=20,
)
int_weights = st.lists(st.integers(1, 1000), min_size=1, max_size=20)


def make(
    weights: Sequence[float],
    strategy: Strategy = Strategy.WEIGHTED_ROUND_ROBIN,
    *,
    rts: Sequence[float] | None = None,
    seed: int = 0,
) -> Picker:
    """A picker over candidates c0, c1, ... with these weights (and response times)."""
    rts = rts if rts is not None else [0.0] * len(weights)
    cands = [
        Candidate(f"c{i}", weight=w, response_time_ms=rt)
        for i, (w, rt) in enumerate(zip(weights, rts, strict=True))
    ]
    return Picker(cands, strategy, rng=random.Random(seed))


def shares(picker: Picker, picks: int = PICKS) -> list[float]:
    counts = Counter(picker.pick() for _ in range(picks))
    return [counts[i] / picks for i in range(len(picker.candidates))]


# --- the contract with the proto ---------------------------------------------------


def test_strategy_numbers_match_the_proto_enum() -> None:
    for strategy in Strategy:
        name = f"LOAD_BALANCING_STRATEGY_{strategy.name}"
        assert registry_pb2.LoadBalancingStrategy.Value(name) == strategy
    assert len(Strategy) == len(registry_pb2.LoadBalancingStrategy.keys()) - 1


def test_health_numbers_match_the_proto_enum() -> None:
    for name, number in [
        ("UNKNOWN", UNKNOWN),
        ("SERVING", SERVING),
        ("NOT_SERVING", NOT_SERVING),
        ("DRAINING", DRAINING),
    ]:
        assert registry_pb2.HealthStatus.Value(f"HEALTH_STATUS_{name}") == number


def test_all_is_complete() -> None:
    public = {
        name
        for name, value in vars(balancer).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == balancer.__name__
    }
    assert public == set(balancer.__all__)


# --- candidates and pickers: common rules -------------------------------------------


@pytest.mark.parametrize(
    ("weight", "rt", "uptime"),
    [
        (-1.0, 0.0, 100.0),
        (math.nan, 0.0, 100.0),
        (math.inf, 0.0, 100.0),
        (1.0, -1.0, 100.0),
        (1.0, math.nan, 100.0),
        (1.0, math.inf, 100.0),
        (1.0, 0.0, 100.5),
        (1.0, 0.0, -0.1),
        (1.0, 0.0, math.nan),
    ],
)
def test_candidate_rejects_values_the_balancer_cannot_order(
    weight: float, rt: float, uptime: float
) -> None:
    with pytest.raises(ValueError, match="candidate 'x'"):
        Candidate("x", weight=weight, response_time_ms=rt, uptime_percentage=uptime)


@pytest.mark.parametrize("strategy", list(Strategy))
def test_picker_rejects_an_empty_candidate_list(strategy: Strategy) -> None:
    with pytest.raises(ValueError, match="at least one candidate"):
        Picker([], strategy)


@pytest.mark.parametrize("strategy", list(Strategy))
def test_single_candidate_is_always_first(strategy: Strategy) -> None:
    picker = make([3.0], strategy)
    assert {picker.pick() for _ in range(50)} == {0}
    assert picker.order(0) == [0]


@settings(max_examples=60, deadline=None)
@given(cands=candidate_lists, strategy=st.sampled_from(Strategy), seed=st.integers(0, 2**32))
def test_every_strategy_picks_a_valid_index_and_orders_a_permutation(
    cands: list[Candidate], strategy: Strategy, seed: int
) -> None:
    picker = Picker(cands, strategy, rng=random.Random(seed))
    positive = {i for i, c in enumerate(cands) if c.weight > 0}
    for _ in range(50):
        first = picker.pick()
        assert 0 <= first < len(cands)
        # A candidate of weight 0 comes first only when every candidate has weight 0.
        assert first in positive or not positive
    for first in range(len(cands)):
        order = picker.order(first)
        assert order[0] == first
        assert sorted(order) == list(range(len(cands)))
        rest = [(-cands[i].weight, cands[i].key) for i in order[1:]]
        assert rest == sorted(rest)


def test_order_puts_the_rest_by_weight_descending_then_key() -> None:
    cands = [Candidate("b", 1.0), Candidate("a", 5.0), Candidate("c", 5.0), Candidate("a0", 2.0)]
    picker = Picker(cands, Strategy.RANDOM)
    assert picker.order(0) == [0, 1, 2, 3]
    assert picker.order(2) == [2, 1, 3, 0]
    with pytest.raises(IndexError):
        picker.order(4)
    with pytest.raises(IndexError):
        picker.order(-1)


# --- weighted round robin -------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(weights=int_weights)
def test_wrr_is_within_one_of_the_weight_share_after_any_number_of_picks(
    weights: list[int],
) -> None:
    picker = make([float(w) for w in weights])
    total = sum(weights)
    counts = [0] * len(weights)
    for n in range(1, min(total, 400) + 1):
        counts[picker.pick()] += 1
        for count, weight in zip(counts, weights, strict=True):
            # Exact in integers: |count - n * w / W| < 1.
            assert abs(count * total - n * weight) < total


@settings(max_examples=30, deadline=None)
@given(weights=st.lists(st.floats(0.001, 1000), min_size=1, max_size=20))
def test_wrr_holds_the_share_bound_for_float_weights(weights: list[float]) -> None:
    picker = make(weights)
    total = math.fsum(weights)
    counts = [0] * len(weights)
    for n in range(1, 301):
        counts[picker.pick()] += 1
        for count, weight in zip(counts, weights, strict=True):
            assert abs(count - n * weight / total) <= 1 + 1e-9


@settings(max_examples=30, deadline=None)
@given(weights=st.lists(st.integers(1, 12), min_size=1, max_size=8))
def test_wrr_repeats_with_a_period_of_the_weight_sum(weights: list[int]) -> None:
    picker = make([float(w) for w in weights])
    period = sum(weights)
    first = [picker.pick() for _ in range(period)]
    assert Counter(first) == dict(enumerate(weights))
    assert [picker.pick() for _ in range(period)] == first


def test_wrr_interleaves_rather_than_bursts() -> None:
    picker = make([5.0, 1.0, 1.0])
    sequence = "".join("abc"[picker.pick()] for _ in range(7 * 4))
    assert sequence[:7] == "aabaaca"
    assert "aaaa" not in sequence


def test_wrr_gives_equal_weights_plain_round_robin() -> None:
    picker = make([2.0, 2.0, 2.0])
    assert [picker.pick() for _ in range(6)] == [0, 1, 2, 0, 1, 2]


def test_wrr_treats_all_zero_weights_as_equal_and_skips_zero_weights_otherwise() -> None:
    assert [make([0.0, 0.0]).pick() for _ in range(1)] == [0]
    picker = make([0.0, 0.0, 0.0])
    assert Counter(picker.pick() for _ in range(30)) == {0: 10, 1: 10, 2: 10}
    picker = make([0.0, 3.0, 0.0, 1.0])
    assert Counter(picker.pick() for _ in range(40)) == {1: 30, 3: 10}


# --- least response time and highest uptime ---------------------------------------------


def test_lrt_puts_the_fastest_first_every_time() -> None:
    picker = make([1.0, 1.0, 1.0], Strategy.LEAST_RESPONSE_TIME, rts=[30.0, 10.0, 20.0])
    assert {picker.pick() for _ in range(20)} == {1}


def test_lrt_counts_unknown_response_time_as_the_median_of_the_known() -> None:
    # Known 40, 20: median 30, so the unknown one is not faster than 20.
    picker = make([1.0, 1.0, 2.0], Strategy.LEAST_RESPONSE_TIME, rts=[40.0, 20.0, 0.0])
    assert picker.pick() == 1
    # Known 20, 20, 40: median 20, a tie that the unknown one's weight wins.
    picker = make([1.0, 1.0, 1.0, 2.0], Strategy.LEAST_RESPONSE_TIME, rts=[20.0, 20.0, 40.0, 0.0])
    assert picker.pick() == 3
    # A lone known time is the median: the unknown one ties with it, weight decides...
    picker = make([1.0, 3.0], Strategy.LEAST_RESPONSE_TIME, rts=[5.0, 0.0])
    assert picker.pick() == 1
    # ...then the key.
    picker = make([1.0, 1.0], Strategy.LEAST_RESPONSE_TIME, rts=[0.0, 5.0])
    assert picker.pick() == 0


def test_lrt_with_nothing_measured_goes_by_weight_then_key() -> None:
    cands = [Candidate("b", 2.0), Candidate("a", 2.0), Candidate("c", 1.0)]
    assert Picker(cands, Strategy.LEAST_RESPONSE_TIME).pick() == 1
    cands = [Candidate("b", 2.0), Candidate("a", 1.0), Candidate("c", 3.0)]
    assert Picker(cands, Strategy.LEAST_RESPONSE_TIME).pick() == 2


def test_lrt_ties_go_to_weight_then_key() -> None:
    cands = [
        Candidate("z", 1.0, response_time_ms=5.0),
        Candidate("y", 4.0, response_time_ms=5.0),
        Candidate("x", 4.0, response_time_ms=5.0),
        Candidate("w", 9.0, response_time_ms=6.0),
    ]
    assert Picker(cands, Strategy.LEAST_RESPONSE_TIME).pick() == 2


def test_lrt_never_puts_a_zero_weight_candidate_first() -> None:
    picker = make([0.0, 1.0], Strategy.LEAST_RESPONSE_TIME, rts=[1.0, 100.0])
    assert picker.pick() == 1


def test_highest_uptime_first_ties_by_weight_then_key() -> None:
    cands = [
        Candidate("a", 1.0, uptime_percentage=99.0),
        Candidate("c", 2.0, uptime_percentage=99.9),
        Candidate("b", 2.0, uptime_percentage=99.9),
        Candidate("d", 1.0, uptime_percentage=99.9),
        Candidate("e", 0.0, uptime_percentage=100.0),
    ]
    picker = Picker(cands, Strategy.HIGHEST_UPTIME)
    assert {picker.pick() for _ in range(10)} == {2}


@settings(max_examples=40, deadline=None)
@given(cands=candidate_lists, seed=st.integers(0, 2**32))
def test_deterministic_strategies_do_not_depend_on_the_rng_or_the_input_order(
    cands: list[Candidate], seed: int
) -> None:
    unique = list({c.key: c for c in cands}.values())  # keys are the last tie-break
    for strategy in (Strategy.LEAST_RESPONSE_TIME, Strategy.HIGHEST_UPTIME):
        reordered = list(reversed(unique))
        first = unique[Picker(unique, strategy, rng=random.Random(seed)).pick()]
        assert reordered[Picker(reordered, strategy).pick()] == first


# --- random and power of two choices ---------------------------------------------------


@pytest.mark.parametrize(
    "weights", [[1.0, 1.0], [5.0, 1.0, 1.0], [100.0, 10.0, 1.0, 0.0], [0.3, 0.7, 2.5, 1.5]]
)
def test_random_draws_in_proportion_to_weight(weights: list[float]) -> None:
    got = shares(make(weights, Strategy.RANDOM, seed=7))
    total = sum(weights)
    for share, weight in zip(got, weights, strict=True):
        assert share == pytest.approx(weight / total, abs=0.015)
        if weight == 0:
            assert share == 0


def p2c_expected(weights: Sequence[float], rts: Sequence[float]) -> list[float]:
    """Exact P2C shares: pairs drawn without replacement by weight, the faster wins."""
    total = sum(weights)
    expected = [0.0] * len(weights)
    for i, j in itertools.permutations(range(len(weights)), 2):
        p = weights[i] / total * weights[j] / (total - weights[i])
        winner = i if (rts[i], -weights[i], i) < (rts[j], -weights[j], j) else j
        expected[winner] += p
    return expected


@pytest.mark.parametrize(
    ("weights", "rts"),
    [
        ([1.0, 1.0, 1.0, 1.0], [10.0, 20.0, 30.0, 40.0]),
        ([1.0, 1.0, 1.0, 1.0], [40.0, 30.0, 20.0, 10.0]),
        ([10.0, 1.0, 1.0], [50.0, 10.0, 20.0]),
        ([1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 4.0, 3.0, 2.0, 1.0]),
        ([100.0, 1.0], [1.0, 2.0]),
    ],
)
def test_p2c_matches_the_exact_pair_distribution(weights: list[float], rts: list[float]) -> None:
    got = shares(make(weights, Strategy.POWER_OF_TWO_CHOICES, rts=rts, seed=11))
    for share, expected in zip(got, p2c_expected(weights, rts), strict=True):
        assert share == pytest.approx(expected, abs=0.015)


def test_p2c_never_picks_the_slower_of_its_pair_and_prefers_the_fastest() -> None:
    # Equal weights: the fastest wins every pair it is in (1/2 of the picks with four
    # candidates), the slowest never wins.
    got = shares(make([1.0] * 4, Strategy.POWER_OF_TWO_CHOICES, rts=[7.0, 3.0, 9.0, 5.0]))
    assert got[2] == 0
    assert got[1] == pytest.approx(0.5, abs=0.015)
    assert got[1] > got[3] > got[0] > got[2]
    # With two candidates the pair is always both: always the faster.
    picker = make([9.0, 1.0], Strategy.POWER_OF_TWO_CHOICES, rts=[20.0, 10.0])
    assert {picker.pick() for _ in range(200)} == {1}


def test_p2c_breaks_response_time_ties_by_weight_and_treats_unknown_as_median() -> None:
    picker = make([1.0, 2.0], Strategy.POWER_OF_TWO_CHOICES, rts=[5.0, 5.0])
    assert {picker.pick() for _ in range(100)} == {1}
    # Median of 10 and 30 is 20: the unknown one beats 30 and loses to 10.
    got = shares(make([1.0, 1.0, 1.0], Strategy.POWER_OF_TWO_CHOICES, rts=[30.0, 0.0, 10.0]))
    assert got[0] == 0
    assert got[1] == pytest.approx(1 / 3, abs=0.015)
    assert got[2] == pytest.approx(2 / 3, abs=0.015)


@settings(max_examples=25, deadline=None)
@given(
    weights=st.lists(st.floats(0.01, 100), min_size=2, max_size=6),
    rts=st.lists(st.floats(1, 100), min_size=6, max_size=6, unique=True),
    seed=st.integers(0, 2**32),
)
def test_p2c_slowest_candidate_never_comes_first(
    weights: list[float], rts: list[float], seed: int
) -> None:
    rts = rts[: len(weights)]
    picker = make(weights, Strategy.POWER_OF_TWO_CHOICES, rts=rts, seed=seed)
    slowest = rts.index(max(rts))
    assert slowest not in {picker.pick() for _ in range(300)}


def test_seeded_rng_makes_random_strategies_reproducible() -> None:
    for strategy in (Strategy.RANDOM, Strategy.POWER_OF_TWO_CHOICES):
        a = make([1.0, 2.0, 3.0], strategy, rts=[3.0, 2.0, 1.0], seed=5)
        b = make([1.0, 2.0, 3.0], strategy, rts=[3.0, 2.0, 1.0], seed=5)
        assert [a.pick() for _ in range(100)] == [b.pick() for _ in range(100)]


# --- effective weight, performance multiplier, panic --------------------------------------


@pytest.mark.parametrize(
    ("health", "ejected", "expected"),
    [
        (SERVING, False, 150.0),
        (UNKNOWN, False, 150.0),
        (NOT_SERVING, False, 0.0),
        (DRAINING, False, 0.0),
        (0, False, 0.0),  # UNSPECIFIED
        (99, False, 0.0),  # a number this version does not know
        (SERVING, True, 0.0),
        (UNKNOWN, True, 0.0),
    ],
)
def test_effective_weight_table(health: int, ejected: bool, expected: float) -> None:
    assert effective_weight(100, health, ejected, 1.5) == expected


def test_effective_weight_multiplies_base_by_performance() -> None:
    assert effective_weight(10_000, SERVING, False, 0.05) == pytest.approx(500.0)
    assert effective_weight(0, SERVING, False, 1.0) == 0.0


@pytest.mark.parametrize(
    ("base", "multiplier"), [(-1, 1.0), (100, -0.5), (100, math.nan), (100, math.inf)]
)
def test_effective_weight_rejects_impossible_inputs(base: int, multiplier: float) -> None:
    with pytest.raises(ValueError, match=r"negative|not >= 0"):
        effective_weight(base, SERVING, False, multiplier)


@pytest.mark.parametrize(
    ("rt", "median", "error_rate", "expected"),
    [
        (10.0, 10.0, 0.0, 1.0),
        (40.0, 10.0, 0.0, 0.5),  # 4x slower: sqrt(1/4)
        (1000.0, 10.0, 0.0, 0.5),  # clamped below
        (10.0, 40.0, 0.0, 1.5),  # clamped above (sqrt(4) = 2)
        (20.0, 40.0, 0.0, math.sqrt(2)),
        (10.0, 10.0, 0.1, 0.8),
        (10.0, 10.0, 0.45, 0.1),  # clamped at 0.1
        (10.0, 10.0, 1.0, 0.1),
        (10.0, 10.0, -0.5, 1.0),  # clamped at 1
        (1000.0, 10.0, 1.0, 0.05),  # the floor of the product
        (10.0, 40.0, 0.25, 0.75),
    ],
)
def test_performance_multiplier_factors_and_clamps(
    rt: float, median: float, error_rate: float, expected: float
) -> None:
    assert performance_multiplier(rt, median, error_rate) == pytest.approx(expected)


@pytest.mark.parametrize("unknown", [0.0, -3.0, math.nan, math.inf, -math.inf])
def test_performance_multiplier_treats_unmeasured_and_non_finite_as_unknown(
    unknown: float,
) -> None:
    assert performance_multiplier(unknown, 10.0, 0.0) == 1.0
    assert performance_multiplier(10.0, unknown, 0.0) == 1.0
    if not math.isfinite(unknown):
        assert performance_multiplier(40.0, 10.0, unknown) == pytest.approx(0.5)


@settings(max_examples=200, deadline=None)
@given(
    rt=st.floats(allow_nan=True, allow_infinity=True),
    median=st.floats(allow_nan=True, allow_infinity=True),
    error_rate=st.floats(allow_nan=True, allow_infinity=True),
)
def test_performance_multiplier_is_always_a_usable_multiplier(
    rt: float, median: float, error_rate: float
) -> None:
    multiplier = performance_multiplier(rt, median, error_rate)
    assert 0.05 - 1e-12 <= multiplier <= 1.5 + 1e-12
    assert effective_weight(10_000, SERVING, False, multiplier) >= 0


@pytest.mark.parametrize(
    ("total", "healthy", "threshold", "expected"),
    [
        (0, 0, 50.0, False),  # nothing registered is not panic
        (10, 0, 50.0, True),
        (10, 4, 50.0, True),
        (10, 5, 50.0, False),  # exactly at the threshold is not panic
        (10, 10, 50.0, False),
        (3, 1, 33.4, True),
        (3, 1, 33.3, False),
        (10, 0, 0.0, False),  # threshold 0 disables
        (10, 9, 100.0, True),
        (10, 10, 100.0, False),
    ],
)
def test_in_panic_edges(total: int, healthy: int, threshold: float, expected: bool) -> None:
    assert in_panic(total, healthy, threshold) is expected


@pytest.mark.parametrize("strategy", list(Strategy))
def test_a_picker_from_columns_picks_as_one_from_candidates(strategy: Strategy) -> None:
    cands = [
        Candidate(f"k{i}", float(1 + i % 4), float(5 + i % 7), float(90 + i % 10))
        for i in range(40)
    ]
    columns = Picker.from_columns(
        [c.key for c in cands],
        [c.weight for c in cands],
        [c.response_time_ms for c in cands],
        [c.uptime_percentage for c in cands],
        strategy,
        rng=random.Random(7),
    )
    objects = Picker(cands, strategy, rng=random.Random(7))
    assert [columns.pick() for _ in range(200)] == [objects.pick() for _ in range(200)]
    assert columns.order(3) == objects.order(3)
    assert columns.order(3, 5) == objects.order(3, 5) == objects.order(3)[:5]
    assert columns.candidates == objects.candidates


@pytest.mark.parametrize(
    ("weights", "rts", "uptimes"),
    [
        ([1.0, -1.0], [0.0, 0.0], [100.0, 100.0]),
        ([1.0, math.nan], [0.0, 0.0], [100.0, 100.0]),
        ([1.0, 1.0], [0.0, math.inf], [100.0, 100.0]),
        ([1.0, 1.0], [0.0, 0.0], [100.0, 101.0]),
    ],
)
def test_columns_are_checked_like_candidates(
    weights: list[float], rts: list[float], uptimes: list[float]
) -> None:
    with pytest.raises(ValueError, match="not"):
        Picker.from_columns(["a", "b"], weights, rts, uptimes, Strategy.RANDOM)
