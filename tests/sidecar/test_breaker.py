"""Unit tests of the sidecar's circuit breaker and retry budget, on a fake clock."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import sidecar.breaker
from sidecar.breaker import (
    BreakerSettings,
    BreakerState,
    CircuitBreaker,
    Permit,
    RetryBudget,
)

CLOSED, OPEN, HALF_OPEN = BreakerState.CLOSED, BreakerState.OPEN, BreakerState.HALF_OPEN


class FakeClock:
    """A monotonic clock that moves only when told."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(
    clock: FakeClock | None = None, **overrides: float
) -> tuple[CircuitBreaker, FakeClock, list[tuple[BreakerState, BreakerState]]]:
    """A breaker with the given settings, its clock, and the transitions it reports."""
    clock = clock or FakeClock()
    transitions: list[tuple[BreakerState, BreakerState]] = []
    breaker = CircuitBreaker(
        BreakerSettings().with_overrides(**overrides),
        clock=clock,
        on_transition=lambda old, new: transitions.append((old, new)),
    )
    return breaker, clock, transitions


def call(breaker: CircuitBreaker, outcome: str) -> None:
    """Make one call through the breaker, which must admit it, with the given outcome."""
    permit = breaker.acquire()
    assert permit is not None, f"breaker refused a call while {breaker.state}"
    getattr(permit, outcome)()


def trip(breaker: CircuitBreaker) -> None:
    """Fail calls until the breaker opens."""
    while breaker.state is CLOSED:
        call(breaker, "failure")


def take(breaker: CircuitBreaker) -> Permit:
    permit = breaker.acquire()
    assert permit is not None
    return permit


# --- settings ---------------------------------------------------------------------------


def test_settings_defaults_are_those_of_the_proto() -> None:
    s = BreakerSettings()
    assert (
        s.consecutive_failures,
        s.failure_rate_threshold_percent,
        s.sliding_window_size,
        s.minimum_calls,
        s.open_duration,
        s.max_open_duration,
        s.half_open_max_calls,
    ) == (5, 50.0, 100, 20, 5.0, 60.0, 3)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("consecutive_failures", 0),
        ("consecutive_failures", 1001),
        ("consecutive_failures", 2.0),
        ("consecutive_failures", True),
        ("failure_rate_threshold_percent", 0.5),
        ("failure_rate_threshold_percent", 100.1),
        ("failure_rate_threshold_percent", math.nan),
        ("failure_rate_threshold_percent", "50"),
        ("sliding_window_size", 0),
        ("sliding_window_size", 10_001),
        ("minimum_calls", 0),
        ("minimum_calls", 101),  # more than sliding_window_size
        ("open_duration", 0.09),
        ("open_duration", 601.0),
        ("open_duration", math.inf),
        ("max_open_duration", 4.9),  # below open_duration
        ("max_open_duration", 3600.5),
        ("half_open_max_calls", 0),
        ("half_open_max_calls", 101),
    ],
)
def test_settings_outside_the_proto_limits_name_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        BreakerSettings(**{field: value})  # type: ignore[arg-type]


def test_settings_accept_the_limits_themselves() -> None:
    low = BreakerSettings(
        consecutive_failures=1,
        failure_rate_threshold_percent=1,
        sliding_window_size=1,
        minimum_calls=1,
        open_duration=0.1,
        max_open_duration=0.1,
        half_open_max_calls=1,
    )
    high = BreakerSettings(
        consecutive_failures=1000,
        failure_rate_threshold_percent=100,
        sliding_window_size=10_000,
        minimum_calls=10_000,
        open_duration=600,
        max_open_duration=3600,
        half_open_max_calls=100,
    )
    assert low.open_duration_for(5) == 0.1
    assert high.open_duration_for(2) == 1200


def test_with_overrides_returns_a_validated_copy() -> None:
    base = BreakerSettings()
    changed = base.with_overrides(consecutive_failures=2, open_duration=1.0)
    assert (changed.consecutive_failures, changed.open_duration) == (2, 1.0)
    assert changed.sliding_window_size == base.sliding_window_size
    assert base.consecutive_failures == 5
    with pytest.raises(ValueError, match="minimum_calls"):
        base.with_overrides(sliding_window_size=10)
    with pytest.raises(TypeError):
        base.with_overrides(no_such_field=1)


def test_settings_are_frozen_and_keyword_only() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        BreakerSettings().open_duration = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        BreakerSettings(5)  # type: ignore[call-arg]


def test_open_duration_doubles_per_trip_and_is_capped() -> None:
    s = BreakerSettings(open_duration=5.0, max_open_duration=60.0)
    assert [s.open_duration_for(n) for n in range(1, 7)] == [5, 10, 20, 40, 60, 60]
    assert s.open_duration_for(10**6) == 60.0


# --- closed -> open ---------------------------------------------------------------------


def test_trips_on_consecutive_failures() -> None:
    breaker, _, transitions = make(consecutive_failures=5)
    for _ in range(4):
        call(breaker, "failure")
    assert breaker.state is CLOSED
    call(breaker, "success")  # a success ends the streak
    for _ in range(4):
        call(breaker, "failure")
    assert breaker.state is CLOSED
    call(breaker, "failure")
    assert breaker.state is OPEN
    assert transitions == [(CLOSED, OPEN)]
    assert breaker.snapshot().consecutive_failures == 5


def test_trips_on_failure_rate_only_once_minimum_calls_are_in_the_window() -> None:
    breaker, _, _ = make(consecutive_failures=1000, minimum_calls=20, sliding_window_size=100)
    for i in range(19):
        call(breaker, "failure" if i % 2 == 0 else "success")  # 10 of 19 fail: 52 %
    assert breaker.state is CLOSED
    assert breaker.snapshot().failure_rate_percent > 50
    call(breaker, "success")  # 10 of 20: exactly the threshold
    assert breaker.state is OPEN
    snap = breaker.snapshot()
    assert (snap.calls_in_window, snap.failures_in_window) == (20, 10)
    assert snap.failure_rate_percent == 50.0


def test_failure_rate_below_threshold_never_trips() -> None:
    breaker, _, _ = make(consecutive_failures=1000, minimum_calls=20, sliding_window_size=100)
    for i in range(1000):
        call(breaker, "failure" if i % 3 == 0 else "success")  # 33 %
    assert breaker.state is CLOSED
    assert breaker.snapshot().calls_in_window == 100


def test_window_slides_so_old_failures_stop_counting() -> None:
    breaker, _, _ = make(consecutive_failures=1000, sliding_window_size=10, minimum_calls=10)
    for _ in range(4):
        call(breaker, "failure")
    for _ in range(10):
        call(breaker, "success")  # the four failures fall out of the window
    assert breaker.snapshot().failures_in_window == 0
    for _ in range(4):
        call(breaker, "failure")
    assert breaker.state is CLOSED  # 4 of 10, not 8 of 18
    call(breaker, "failure")
    assert breaker.state is OPEN  # 5 of 10


def test_business_outcomes_never_trip_and_never_count() -> None:
    breaker, _, transitions = make(consecutive_failures=5, minimum_calls=1)
    for _ in range(500):
        call(breaker, "ignore")
    snap = breaker.snapshot()
    assert snap.state is CLOSED
    assert (snap.calls_in_window, snap.consecutive_failures) == (0, 0)
    assert transitions == []


def test_business_outcomes_neither_count_nor_break_a_failure_streak() -> None:
    breaker, _, _ = make(consecutive_failures=5)
    for _ in range(4):
        call(breaker, "failure")
        call(breaker, "ignore")
    snap = breaker.snapshot()
    assert (snap.state, snap.consecutive_failures, snap.calls_in_window) == (CLOSED, 4, 4)
    call(breaker, "failure")
    assert breaker.state is OPEN


# --- open -------------------------------------------------------------------------------


def test_open_refuses_calls_until_the_open_period_ends() -> None:
    breaker, clock, transitions = make(open_duration=5.0)
    trip(breaker)
    assert breaker.snapshot().open_until == clock.now + 5.0
    for _ in range(10):
        clock.advance(0.49)
        assert breaker.acquire() is None
        assert not breaker.can_acquire()
    assert breaker.state is OPEN
    clock.advance(0.1)  # 5.0 s after the trip
    assert breaker.state is HALF_OPEN
    assert breaker.snapshot().open_until is None
    assert breaker.acquire() is not None
    assert transitions == [(CLOSED, OPEN), (OPEN, HALF_OPEN)]


# --- half-open --------------------------------------------------------------------------


def test_half_open_admits_max_trial_calls_and_closes_after_that_many_successes() -> None:
    breaker, clock, transitions = make(half_open_max_calls=3)
    trip(breaker)
    clock.advance(5.0)
    trials = [breaker.acquire() for _ in range(5)]
    assert [p is not None for p in trials] == [True, True, True, False, False]
    assert breaker.snapshot().trial_calls_in_flight == 3
    first, second, third = (p for p in trials if p is not None)
    first.success()
    second.success()
    assert breaker.state is HALF_OPEN
    third.success()
    assert breaker.state is CLOSED
    assert transitions[-1] == (HALF_OPEN, CLOSED)
    assert all(breaker.acquire() is not None for _ in range(10))


def test_half_open_admits_no_more_trials_than_the_decision_needs() -> None:
    breaker, clock, _ = make(half_open_max_calls=3)
    trip(breaker)
    clock.advance(5.0)
    first, second, third = take(breaker), take(breaker), take(breaker)
    first.success()  # one success, two trials pending: they can close the breaker
    assert breaker.acquire() is None
    second.ignore()  # a business outcome frees its slot without counting
    fourth = take(breaker)
    assert breaker.acquire() is None
    third.success()
    assert breaker.state is HALF_OPEN
    fourth.success()
    assert breaker.state is CLOSED


def test_trial_failure_reopens_with_doubled_open_time_capped_at_max() -> None:
    breaker, clock, _ = make(open_duration=5.0, max_open_duration=30.0, half_open_max_calls=2)
    trip(breaker)
    opened = []
    for _ in range(5):
        snap = breaker.snapshot()
        assert snap.open_until is not None
        opened.append(snap.open_until - clock.now)
        clock.advance(snap.open_until - clock.now - 0.01)
        assert breaker.acquire() is None
        clock.advance(0.01)
        pending = take(breaker)
        call(breaker, "success")  # one trial success is not enough ...
        pending.failure()  # ... and any trial failure opens again
        assert breaker.state is OPEN
    assert opened == [5.0, 10.0, 20.0, 30.0, 30.0]
    assert breaker.snapshot().trips == 6


def test_recovery_resets_trips_window_and_counters() -> None:
    breaker, clock, _ = make(open_duration=5.0, half_open_max_calls=1)
    trip(breaker)
    clock.advance(5.0)
    call(breaker, "failure")  # second trip: 10 s
    clock.advance(10.0)
    call(breaker, "success")
    snap = breaker.snapshot()
    assert snap.state is CLOSED
    assert (snap.trips, snap.calls_in_window, snap.failures_in_window) == (0, 0, 0)
    assert snap.consecutive_failures == 0
    for _ in range(4):
        call(breaker, "failure")
    assert breaker.state is CLOSED  # the streak before the trip is forgotten
    call(breaker, "failure")
    snap = breaker.snapshot()
    assert snap.open_until == clock.now + 5.0  # back to the first open duration
    assert snap.trips == 1


# --- permits ----------------------------------------------------------------------------


def test_a_permit_resolves_once_and_later_resolutions_are_no_ops() -> None:
    breaker, _, _ = make(consecutive_failures=1)
    permit = take(breaker)
    assert not permit.resolved
    permit.success()
    assert permit.resolved
    permit.failure()
    permit.ignore()
    assert breaker.state is CLOSED
    assert breaker.snapshot().calls_in_window == 1


def test_resolving_a_trial_twice_frees_one_slot_only() -> None:
    breaker, clock, _ = make(half_open_max_calls=2)
    trip(breaker)
    clock.advance(5.0)
    first, _second = take(breaker), take(breaker)
    first.ignore()
    first.ignore()
    first.success()
    assert breaker.snapshot().trial_calls_in_flight == 1
    take(breaker)
    assert breaker.acquire() is None


def test_outcomes_of_permits_from_before_a_transition_do_not_count() -> None:
    breaker, clock, _ = make(half_open_max_calls=1, consecutive_failures=2)
    late = [take(breaker) for _ in range(3)]
    trip(breaker)
    clock.advance(5.0)
    trial = take(breaker)
    late[0].success()  # a success from the closed period does not close the breaker
    assert breaker.state is HALF_OPEN
    assert breaker.acquire() is None  # nor frees the trial slot
    trial.success()
    assert breaker.state is CLOSED
    late[1].failure()
    late[2].failure()  # two stale failures: would trip a fresh breaker
    assert breaker.state is CLOSED
    assert breaker.snapshot().calls_in_window == 0


def test_a_permit_left_unresolved_in_a_with_block_is_ignored() -> None:
    breaker, clock, _ = make(half_open_max_calls=1)
    trip(breaker)
    clock.advance(5.0)

    def cancelled_call() -> None:
        with take(breaker):
            assert breaker.acquire() is None  # the one trial slot is taken
            raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError):
        cancelled_call()
    assert breaker.state is HALF_OPEN
    with take(breaker) as permit:
        permit.success()
    assert breaker.state is CLOSED


def test_can_acquire_takes_no_slot() -> None:
    breaker, clock, _ = make(half_open_max_calls=1)
    trip(breaker)
    clock.advance(5.0)
    assert all(breaker.can_acquire() for _ in range(5))
    take(breaker)
    assert not breaker.can_acquire()


def test_a_failing_transition_callback_is_logged_and_changes_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def explode(old: BreakerState, new: BreakerState) -> None:
        raise RuntimeError("metrics down")

    clock = FakeClock()
    breaker = CircuitBreaker(
        BreakerSettings(consecutive_failures=1), clock=clock, on_transition=explode
    )
    with caplog.at_level(logging.ERROR, logger="sidecar.breaker"):
        call(breaker, "failure")
    assert breaker.state is OPEN
    assert "transition callback failed" in caplog.text


def test_default_settings_and_clock() -> None:
    breaker = CircuitBreaker()
    assert breaker.settings == BreakerSettings()
    assert breaker.state is CLOSED
    snap = breaker.snapshot()
    assert (snap.failure_rate_percent, snap.trips, snap.open_until) == (0.0, 0, None)


# --- properties -------------------------------------------------------------------------

small_settings = st.builds(
    BreakerSettings,
    consecutive_failures=st.integers(1, 6),
    failure_rate_threshold_percent=st.sampled_from([1.0, 33.3, 50.0, 100.0]),
    sliding_window_size=st.just(8),
    minimum_calls=st.integers(1, 8),
    open_duration=st.sampled_from([0.1, 1.0, 5.0]),
    max_open_duration=st.sampled_from([5.0, 12.0]),
    half_open_max_calls=st.integers(1, 4),
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("acquire"), st.just(0), st.just("")),
        st.tuples(
            st.just("resolve"),
            st.integers(0, 40),
            st.sampled_from(["success", "failure", "ignore"]),
        ),
        st.tuples(st.just("advance"), st.integers(0, 7000), st.just("")),
    ),
    max_size=80,
)
LEGAL = {(CLOSED, OPEN), (OPEN, HALF_OPEN), (HALF_OPEN, OPEN), (HALF_OPEN, CLOSED)}


@settings(max_examples=150, deadline=None)
@given(config=small_settings, ops=operations)
def test_breaker_never_admits_while_open_nor_too_many_trials(
    config: BreakerSettings, ops: list[tuple[str, int, str]]
) -> None:
    clock = FakeClock()
    episode = 0  # counts half-open periods
    trips = 0
    permits: list[tuple[Permit, int | None]] = []  # (permit, half-open episode or None)

    def on_transition(old: BreakerState, new: BreakerState) -> None:
        nonlocal episode, trips
        assert (old, new) in LEGAL
        if new is HALF_OPEN:
            episode += 1
        elif new is OPEN:
            trips += 1
            expected = min(config.open_duration * 2 ** (trips - 1), config.max_open_duration)
            assert breaker.snapshot().open_until == pytest.approx(clock.now + expected)
        else:
            trips = 0

    breaker = CircuitBreaker(config, clock=clock, on_transition=on_transition)
    for op, arg, outcome in ops:
        if op == "acquire":
            snap = breaker.snapshot()
            permit = breaker.acquire()
            if snap.state is OPEN:
                assert snap.open_until is not None
                assert clock.now < snap.open_until
                assert permit is None
            if snap.state is CLOSED:
                assert permit is not None
            if permit is not None:
                permits.append((permit, episode if snap.state is HALF_OPEN else None))
        elif op == "resolve" and permits:
            permit, _ = permits[arg % len(permits)]
            getattr(permit, outcome)()
        elif op == "advance":
            clock.advance(arg / 1000)
        snap = breaker.snapshot()
        assert snap.trips == trips
        outstanding = sum(
            1 for p, ep in permits if ep == episode and ep is not None and not p.resolved
        )
        if snap.state is HALF_OPEN:
            assert outstanding == snap.trial_calls_in_flight <= config.half_open_max_calls
        else:
            assert snap.trial_calls_in_flight == 0


@settings(max_examples=200, deadline=None)
@given(
    config=small_settings,
    outcomes=st.lists(st.sampled_from(["success", "failure", "ignore"]), max_size=60),
)
def test_closed_breaker_trips_exactly_when_a_reference_count_says_so(
    config: BreakerSettings, outcomes: list[str]
) -> None:
    expected_trip: int | None = None
    streak = 0
    window: list[bool] = []
    for i, outcome in enumerate(outcomes):
        if outcome == "ignore":
            continue
        failed = outcome == "failure"
        streak = streak + 1 if failed else 0
        window = [*window, failed][-config.sliding_window_size :]
        rate = 100 * sum(window) / len(window)
        if streak >= config.consecutive_failures or (
            len(window) >= config.minimum_calls
            and rate >= config.failure_rate_threshold_percent - 1e-9
        ):
            expected_trip = i
            break

    breaker = CircuitBreaker(config, clock=FakeClock())
    actual_trip: int | None = None
    for i, outcome in enumerate(outcomes):
        call(breaker, outcome)
        if breaker.state is OPEN:
            actual_trip = i
            break
    assert actual_trip == expected_trip


# --- retry budget -----------------------------------------------------------------------


def test_retry_budget_caps_retries_near_the_ratio_under_load() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.2, min_retries_per_second=10.0, window=10.0, clock=clock)
    admitted_per_second = []
    for _ in range(60):
        admitted = 0
        for _ in range(100):  # 100 calls/s, every one of them failing and asking to retry
            budget.record_call()
            admitted += budget.try_retry()
            clock.advance(0.01)
        admitted_per_second.append(admitted)
    steady = admitted_per_second[20:]
    assert 19 <= sum(steady) / len(steady) <= 21  # 20 % of 100 calls/s
    assert budget.retries <= 0.2 * budget.calls + 1


def test_retry_budget_floor_lets_a_quiet_service_retry() -> None:
    clock = FakeClock()
    budget = RetryBudget(0.2, min_retries_per_second=2.0, window=10.0, clock=clock)
    budget.record_call()  # one call: 20 % of it is not a whole retry
    assert sum(budget.try_retry() for _ in range(30)) == 20  # floor: 2/s over 10 s
    strict = RetryBudget(0.2, min_retries_per_second=0.0, clock=clock)
    strict.record_call()
    assert not strict.try_retry()
    for _ in range(4):
        strict.record_call()
    assert strict.try_retry()  # 20 % of 5 calls is one retry
    assert not strict.try_retry()


def test_retry_budget_window_slides() -> None:
    clock = FakeClock(start=0.0)
    budget = RetryBudget(0.5, min_retries_per_second=0.0, window=10.0, clock=clock)
    for _ in range(10):
        budget.record_call()
    assert sum(budget.try_retry() for _ in range(10)) == 5
    clock.advance(5.0)
    for _ in range(10):
        budget.record_call()
    assert sum(budget.try_retry() for _ in range(10)) == 5  # 20 calls: 10 retries in all
    clock.advance(5.0)  # the first second's calls and retries have left the window
    assert (budget.calls, budget.retries) == (10, 5)
    assert not budget.try_retry()
    for _ in range(2):
        budget.record_call()
    assert budget.try_retry()
    clock.advance(100.0)
    assert (budget.calls, budget.retries) == (0, 0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": 1.5}, "ratio"),
        ({"min_retries_per_second": -1.0}, "min_retries_per_second"),
        ({"window": 0.5}, "window"),
        ({"window": math.nan}, "window"),
    ],
)
def test_retry_budget_rejects_bad_parameters(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        RetryBudget(**kwargs)  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(
    ratio=st.sampled_from([0.0, 0.1, 0.2, 1.0]),
    floor=st.sampled_from([0.0, 0.5, 1.0]),
    window=st.sampled_from([1.0, 2.5, 10.0]),
    ops=st.lists(
        st.one_of(
            st.just(("call", 0)),
            st.just(("retry", 0)),
            st.tuples(st.just("wait"), st.integers(0, 4000)),
        ),
        max_size=120,
    ),
)
def test_retry_budget_matches_a_list_of_timestamps(
    ratio: float, floor: float, window: float, ops: list[tuple[str, int]]
) -> None:
    clock = FakeClock(start=0.0)
    budget = RetryBudget(ratio, min_retries_per_second=floor, window=window, clock=clock)
    buckets = math.ceil(window)
    width = window / buckets
    calls: list[float] = []
    retries: list[float] = []

    def live(times: list[float]) -> int:
        now = math.floor(clock.now / width)
        return sum(1 for t in times if math.floor(t / width) > now - buckets)

    for op, arg in ops:
        if op == "call":
            budget.record_call()
            calls.append(clock.now)
        elif op == "retry":
            allowed = live(retries) + 1 <= max(ratio * live(calls), floor * window)
            assert budget.try_retry() is allowed
            if allowed:
                retries.append(clock.now)
        else:
            clock.advance(arg / 1000)
        assert (budget.calls, budget.retries) == (live(calls), live(retries))


def test_all_is_complete() -> None:
    public = {
        name
        for name, value in vars(sidecar.breaker).items()
        if not name.startswith("_")
        and getattr(value, "__module__", None) == "sidecar.breaker"
        and isinstance(value, type)
    }
    assert public <= set(sidecar.breaker.__all__)
    for name in sidecar.breaker.__all__:
        assert hasattr(sidecar.breaker, name)
