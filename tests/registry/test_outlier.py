"""Outlier detection: consecutive failures eject, for a time that grows and decays."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from flext_mesh.registry import outlier
from flext_mesh.registry.outlier import Ejection, OutlierDetector, OutlierSettings

SERVICE = "payment"


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def detector(clock: FakeClock) -> OutlierDetector:
    return OutlierDetector(OutlierSettings(), clock=clock)


def fail(
    detector: OutlierDetector,
    instance: str,
    times: int = 1,
    *,
    service: str = SERVICE,
    size: int = 10,
    settings: OutlierSettings | None = None,
) -> Ejection | None:
    """Report `times` infrastructure failures; the last outcome of record()."""
    result = None
    for _ in range(times):
        result = detector.record(service, instance, ok=False, service_size=size, settings=settings)
    return result


def succeed(detector: OutlierDetector, instance: str, *, size: int = 10) -> None:
    assert detector.record(SERVICE, instance, ok=True, service_size=size) is None


def eject_and_release(detector: OutlierDetector, clock: FakeClock, instance: str) -> Ejection:
    """Eject the instance with 5 failures, wait its ejection out and release it."""
    ejection = fail(detector, instance, 5)
    assert ejection is not None
    clock.now = ejection.until
    assert detector.release_due() == [(SERVICE, instance)]
    return ejection


# --- settings ---------------------------------------------------------------------


def test_defaults_are_envoys() -> None:
    settings = OutlierSettings()
    assert settings.consecutive_failures == 5
    assert settings.base_ejection_time == 30.0
    assert settings.max_ejection_time == 300.0
    assert settings.max_ejection_percent == 10.0


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("consecutive_failures", 0),
        ("consecutive_failures", 1001),
        ("base_ejection_time", 0.5),
        ("base_ejection_time", 3601.0),
        ("base_ejection_time", math.nan),
        ("max_ejection_time", 29.0),
        ("max_ejection_time", 86401.0),
        ("max_ejection_percent", -1.0),
        ("max_ejection_percent", 100.5),
    ],
)
def test_settings_out_of_range_name_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=field):
        OutlierSettings(**{field: value})


def test_settings_at_the_limits_are_accepted() -> None:
    OutlierSettings(consecutive_failures=1, base_ejection_time=1.0, max_ejection_time=1.0)
    OutlierSettings(
        consecutive_failures=1000,
        base_ejection_time=3600.0,
        max_ejection_time=86400.0,
        max_ejection_percent=0.0,
    )
    OutlierSettings(max_ejection_percent=100.0)


def test_settings_are_keyword_only_and_frozen() -> None:
    with pytest.raises(TypeError):
        OutlierSettings(5)  # type: ignore[call-arg]
    settings = OutlierSettings()
    with pytest.raises(AttributeError):
        settings.consecutive_failures = 3  # type: ignore[misc]


# --- ejection ---------------------------------------------------------------------


def test_five_consecutive_failures_eject(detector: OutlierDetector, clock: FakeClock) -> None:
    assert fail(detector, "i-1", 4) is None
    ejection = fail(detector, "i-1")
    assert ejection == Ejection(
        service=SERVICE, instance="i-1", until=clock.now + 30.0, times_ejected=1, duration=30.0
    )
    assert detector.is_ejected(SERVICE, "i-1")
    assert detector.ejected_until(SERVICE, "i-1") == clock.now + 30.0
    assert detector.ejected_count(SERVICE) == 1


def test_four_failures_do_not_eject(detector: OutlierDetector) -> None:
    assert fail(detector, "i-1", 4) is None
    assert not detector.is_ejected(SERVICE, "i-1")
    assert detector.ejected_until(SERVICE, "i-1") is None
    assert detector.ejected_count(SERVICE) == 0


def test_a_success_resets_the_count(detector: OutlierDetector) -> None:
    fail(detector, "i-1", 4)
    succeed(detector, "i-1")
    assert fail(detector, "i-1", 4) is None
    assert fail(detector, "i-1") is not None


def test_a_success_resets_the_count_of_a_previously_ejected_instance(
    detector: OutlierDetector, clock: FakeClock
) -> None:
    eject_and_release(detector, clock, "i-1")
    fail(detector, "i-1", 4)
    succeed(detector, "i-1")
    assert fail(detector, "i-1", 4) is None
    assert fail(detector, "i-1") is not None


def test_failures_of_other_instances_and_services_do_not_add_up(
    detector: OutlierDetector,
) -> None:
    fail(detector, "i-1", 3)
    fail(detector, "i-2", 3)
    fail(detector, "i-1", 3, service="checkout")
    assert fail(detector, "i-1") is None
    assert detector.ejected_count(SERVICE) == 0


def test_ejection_time_grows_with_each_ejection_and_is_capped(
    detector: OutlierDetector, clock: FakeClock
) -> None:
    durations = [eject_and_release(detector, clock, "i-1").duration for _ in range(12)]
    assert durations == [30.0 * n for n in range(1, 11)] + [300.0, 300.0]


def test_good_behaviour_decays_the_ejection_time_back_to_base(
    detector: OutlierDetector, clock: FakeClock
) -> None:
    for _ in range(3):
        eject_and_release(detector, clock, "i-1")  # 30, 60, 90
    clock.advance(3 * 30.0)
    assert eject_and_release(detector, clock, "i-1").duration == 30.0


def test_decay_forgives_one_ejection_per_base_ejection_time(
    detector: OutlierDetector, clock: FakeClock
) -> None:
    for _ in range(3):
        eject_and_release(detector, clock, "i-1")  # 30, 60, 90
    clock.advance(30.0 + 29.0)  # one base time and a bit: one ejection forgiven
    ejection = eject_and_release(detector, clock, "i-1")
    assert (ejection.times_ejected, ejection.duration) == (3, 90.0)


def test_decay_counts_whole_periods_however_often_the_instance_is_seen(
    detector: OutlierDetector, clock: FakeClock
) -> None:
    for _ in range(3):
        eject_and_release(detector, clock, "i-1")  # 30, 60, 90
    released = clock.now
    clock.now = released + 59.0
    succeed(detector, "i-1")  # one period forgiven; the next one started at +30
    clock.now = released + 61.0  # two periods since the release
    ejection = fail(detector, "i-1", 5)
    assert ejection is not None
    assert (ejection.times_ejected, ejection.duration) == (2, 60.0)


def test_a_host_ejected_many_times_recovers_within_max_over_base_periods(
    detector: OutlierDetector, clock: FakeClock
) -> None:
    for _ in range(50):
        eject_and_release(detector, clock, "i-1")
    clock.advance(300.0)  # 300 / 30 = 10 base periods, the multiplier's ceiling
    assert eject_and_release(detector, clock, "i-1").duration == 30.0


def test_time_spent_ejected_does_not_count_as_good_behaviour(
    detector: OutlierDetector, clock: FakeClock
) -> None:
    eject_and_release(detector, clock, "i-1")
    assert eject_and_release(detector, clock, "i-1").duration == 60.0  # waited 30 s ejected


# --- max_ejection_percent ---------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "percent", "allowed"),
    [(10, 10.0, 1), (30, 10.0, 3), (1, 10.0, 1), (19, 10.0, 1), (4, 50.0, 2), (10, 0.0, 1)],
)
def test_max_ejection_percent_caps_ejections_but_one_is_always_allowed(
    clock: FakeClock, size: int, percent: float, allowed: int
) -> None:
    detector = OutlierDetector(OutlierSettings(max_ejection_percent=percent), clock=clock)
    ejections = [fail(detector, f"i-{n}", 5, size=size) for n in range(size)]
    assert sum(e is not None for e in ejections) == allowed
    assert detector.ejected_count(SERVICE) == allowed


def test_a_refused_ejection_keeps_counting_and_the_next_failure_tries_again(
    detector: OutlierDetector, clock: FakeClock
) -> None:
    first = fail(detector, "i-1", 5)
    assert first is not None
    assert fail(detector, "i-2", 7) is None  # the cap (1 of 10) is taken
    clock.now = first.until
    detector.release_due()
    assert fail(detector, "i-2") is not None


def test_the_cap_is_per_service(detector: OutlierDetector) -> None:
    assert fail(detector, "i-1", 5) is not None
    assert fail(detector, "i-1", 5, service="checkout") is not None


def test_service_size_must_be_positive(detector: OutlierDetector) -> None:
    with pytest.raises(ValueError, match="service_size"):
        detector.record(SERVICE, "i-1", ok=False, service_size=0)


# --- release ----------------------------------------------------------------------


def test_release_due_returns_exactly_the_ended_ejections(
    clock: FakeClock,
) -> None:
    detector = OutlierDetector(OutlierSettings(max_ejection_percent=100.0), clock=clock)
    fail(detector, "i-1", 5)
    clock.advance(10.0)
    fail(detector, "i-2", 5)
    fail(detector, "i-3", 5, service="checkout")
    assert detector.release_due() == []
    clock.advance(19.0)  # i-1 ends at +30, the others at +40
    assert detector.release_due() == []
    clock.advance(1.0)
    assert detector.release_due() == [(SERVICE, "i-1")]
    assert not detector.is_ejected(SERVICE, "i-1")
    assert detector.is_ejected(SERVICE, "i-2")
    assert detector.release_due() == []  # reported once
    clock.advance(100.0)
    assert detector.release_due() == [("checkout", "i-3"), (SERVICE, "i-2")]
    assert detector.next_release_at() is None


def test_an_ejection_lasts_until_release_due_reports_it(
    detector: OutlierDetector, clock: FakeClock
) -> None:
    ejection = fail(detector, "i-1", 5)
    assert ejection is not None
    clock.advance(45.0)
    assert detector.is_ejected(SERVICE, "i-1")
    assert detector.release_due() == [(SERVICE, "i-1")]
    assert not detector.is_ejected(SERVICE, "i-1")


def test_a_released_instance_counts_failures_from_zero(
    detector: OutlierDetector, clock: FakeClock
) -> None:
    eject_and_release(detector, clock, "i-1")
    assert fail(detector, "i-1", 4) is None
    assert fail(detector, "i-1") is not None


def test_next_release_at_is_the_earliest_end(clock: FakeClock) -> None:
    detector = OutlierDetector(OutlierSettings(max_ejection_percent=100.0), clock=clock)
    assert detector.next_release_at() is None
    start = clock.now
    fail(detector, "i-1", 5)
    clock.advance(5.0)
    fail(detector, "i-2", 5)
    assert detector.next_release_at() == start + 30.0
    clock.now = start + 30.0
    detector.release_due()
    assert detector.next_release_at() == start + 35.0


def test_records_for_an_ejected_instance_do_not_extend_it(
    detector: OutlierDetector, clock: FakeClock
) -> None:
    ejection = fail(detector, "i-1", 5)
    assert ejection is not None
    clock.advance(10.0)
    assert fail(detector, "i-1", 20) is None
    succeed(detector, "i-1")
    assert detector.ejected_until(SERVICE, "i-1") == ejection.until
    assert detector.next_release_at() == ejection.until
    clock.now = ejection.until
    assert detector.release_due() == [(SERVICE, "i-1")]
    assert fail(detector, "i-1", 4) is None  # the failures while ejected were not counted


# --- per-service settings ---------------------------------------------------------


def test_per_service_settings_override_the_defaults(
    detector: OutlierDetector, clock: FakeClock
) -> None:
    strict = OutlierSettings(
        consecutive_failures=2, base_ejection_time=10.0, max_ejection_percent=50.0
    )
    assert fail(detector, "i-1", 1, service="checkout", settings=strict) is None
    ejection = fail(detector, "i-1", 1, service="checkout", settings=strict)
    assert ejection is not None
    assert ejection.duration == 10.0
    assert fail(detector, "i-2", 2, service="checkout", size=3, settings=strict) is None
    assert fail(detector, "i-2", 1, service="checkout", size=4, settings=strict) is not None
    # the defaults still hold elsewhere
    assert fail(detector, "i-1", 4) is None
    assert fail(detector, "i-1").duration == 30.0  # type: ignore[union-attr]


def test_the_detector_defaults_to_envoys_settings(clock: FakeClock) -> None:
    detector = OutlierDetector(clock=clock)
    assert detector.settings == OutlierSettings()


# --- forgetting -------------------------------------------------------------------


def test_forget_an_ejected_instance_frees_its_slot_and_its_history(
    detector: OutlierDetector, clock: FakeClock
) -> None:
    for _ in range(3):
        eject_and_release(detector, clock, "i-1")
    assert fail(detector, "i-1", 5) is not None
    detector.forget(SERVICE, "i-1")
    assert not detector.is_ejected(SERVICE, "i-1")
    assert detector.ejected_count(SERVICE) == 0
    assert detector.next_release_at() is None
    assert fail(detector, "i-2", 5) is not None  # the cap's slot is free
    assert fail(detector, "i-1", 4, size=20) is None  # count restarted
    assert fail(detector, "i-1", size=20).duration == 30.0  # type: ignore[union-attr]


def test_forget_service_drops_all_its_instances(
    detector: OutlierDetector, clock: FakeClock
) -> None:
    fail(detector, "i-1", 5)
    fail(detector, "i-2", 4)
    fail(detector, "i-1", 5, service="checkout")
    detector.forget_service(SERVICE)
    assert detector.ejected_count(SERVICE) == 0
    assert fail(detector, "i-2") is None
    assert detector.is_ejected("checkout", "i-1")
    detector.forget_service("unknown")
    detector.forget("unknown", "i-9")


def test_memory_is_kept_only_for_troubled_instances(
    detector: OutlierDetector, clock: FakeClock
) -> None:
    # A control plane sees millions of successes: they must not leave state behind.
    for n in range(100):
        succeed(detector, f"i-{n}")
    fail(detector, "i-1", 2)
    succeed(detector, "i-1")
    assert detector._health == {}
    eject_and_release(detector, clock, "i-2")
    succeed(detector, "i-2")
    assert set(detector._health[SERVICE]) == {"i-2"}  # its history still counts
    clock.advance(30.0)
    succeed(detector, "i-2")  # forgiven: nothing left to remember
    assert detector._health == {}
    fail(detector, "i-3", 5)
    detector.forget(SERVICE, "i-3")
    assert detector._health == {}
    assert detector._ejected == {}


def test_all_is_complete() -> None:
    public = {
        name
        for name, value in vars(outlier).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == outlier.__name__
    }
    assert public == set(outlier.__all__)


# --- properties -------------------------------------------------------------------

_settings_strategy = st.builds(
    lambda failures, base, factor, percent: OutlierSettings(
        consecutive_failures=failures,
        base_ejection_time=base,
        max_ejection_time=base * factor,
        max_ejection_percent=percent,
    ),
    st.integers(1, 4),
    st.sampled_from([1.0, 2.0, 5.0]),
    st.sampled_from([1.0, 1.5, 3.0]),
    st.sampled_from([0.0, 10.0, 25.0, 33.3, 50.0, 100.0]),
)


class Model:
    """A detector under test beside a plain model of what must and must not happen.

    Service "a" uses the detector's settings, "b" its own, passed on every record. The
    model forgives ejections eagerly as the clock moves; the detector does it lazily.
    """

    def __init__(self, default: OutlierSettings, own: OutlierSettings, sizes: list[int]) -> None:
        self.clock = FakeClock()
        self.detector = OutlierDetector(default, clock=self.clock)
        self.policy = {"a": default, "b": own}
        self.size = dict(zip(["a", "b"], sizes, strict=True))
        # Per (service, instance): failures since the last success or release, the end
        # of its current ejection, ejections not yet forgiven, time calm since then.
        self.failures: dict[tuple[str, str], int] = {}
        self.until: dict[tuple[str, str], float] = {}
        self.times: dict[tuple[str, str], int] = {}
        self.calm: dict[tuple[str, str], float] = {}

    def allowed(self, service: str) -> int:
        percent = self.policy[service].max_ejection_percent
        return max(1, math.floor(self.size[service] * percent / 100))

    def key(self, service: str, index: int) -> tuple[str, str]:
        return service, f"i-{index % self.size[service]}"

    def record(self, service: str, index: int, ok: bool) -> None:
        key = self.key(service, index)
        policy = self.policy[service]
        ejected_before = self.detector.ejected_count(service)
        result = self.detector.record(
            *key,
            ok=ok,
            service_size=self.size[service],
            settings=policy if service == "b" else None,
        )
        if key in self.until:  # already ejected: ignored
            assert result is None
            assert self.detector.ejected_until(*key) == self.until[key]
            return
        self.failures[key] = 0 if ok else self.failures.get(key, 0) + 1
        due = self.failures[key] >= policy.consecutive_failures
        if due and ejected_before < self.allowed(service):
            assert result is not None, "a due ejection within the cap must happen"
        if result is None:
            return
        assert not ok
        assert due, "ejected without consecutive_failures failures since success/release"
        assert ejected_before < self.allowed(service)
        ceiling = math.ceil(policy.max_ejection_time / policy.base_ejection_time)
        assert result.times_ejected == min(self.times.get(key, 0) + 1, ceiling)
        assert result.duration == min(
            policy.base_ejection_time * result.times_ejected, policy.max_ejection_time
        )
        assert result.until == self.clock.now + result.duration
        self.until[key] = result.until
        self.times[key] = result.times_ejected

    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)
        for key, times in self.times.items():
            if key in self.until or times == 0:
                continue
            base = self.policy[key[0]].base_ejection_time
            self.calm[key] += seconds
            while self.times[key] > 0 and self.calm[key] >= base:
                self.times[key] -= 1
                self.calm[key] -= base

    def release(self) -> None:
        released = self.detector.release_due()
        expected = {key for key, until in self.until.items() if until <= self.clock.now}
        assert len(released) == len(set(released))
        assert set(released) == expected
        assert released == sorted(released, key=lambda key: (self.until[key], key))
        for key in expected:
            del self.until[key]
            self.failures[key] = 0
            self.calm[key] = 0.0

    def forget(self, service: str, index: int) -> None:
        key = self.key(service, index)
        self.detector.forget(*key)
        for table in (self.failures, self.until, self.times, self.calm):
            table.pop(key, None)

    def check(self) -> None:
        for service in self.size:
            count = self.detector.ejected_count(service)
            assert count <= self.allowed(service)
            assert count == sum(key[0] == service for key in self.until)
        assert self.detector.next_release_at() == min(self.until.values(), default=None)


# Mostly records, few instances, mostly failures and rare forgets: so that ejections,
# refusals by the cap, releases and repeated ejections abound.
_KINDS = ["record"] * 8 + ["advance"] * 3 + ["release"] * 2 + ["forget"]


@st.composite
def _event(draw: st.DrawFn) -> tuple[Any, ...]:
    kind = draw(st.sampled_from(_KINDS))
    if kind == "advance":
        return (kind, draw(st.sampled_from([0.0, 0.5, 1.0, 2.5, 5.0, 30.0])))
    if kind == "release":
        return (kind,)
    service = draw(st.sampled_from(["a", "b"]))
    index = draw(st.integers(0, 2))
    if kind == "forget":
        return (kind, service, index)
    return (kind, service, index, draw(st.sampled_from([False, False, True])))


@hypothesis_settings(max_examples=50, deadline=None)
@given(
    default=_settings_strategy,
    own=_settings_strategy,
    sizes=st.lists(st.integers(1, 12), min_size=2, max_size=2),
    events=st.lists(_event(), min_size=20, max_size=120),
)
def test_any_sequence_keeps_the_cap_and_ejects_only_after_enough_failures(
    default: OutlierSettings,
    own: OutlierSettings,
    sizes: list[int],
    events: list[tuple[Any, ...]],
) -> None:
    model = Model(default, own, sizes)
    for kind, *args in events:
        getattr(model, kind)(*args)
        model.check()
