"""Per-instance circuit breakers and a retry budget for the sidecar's outbound client.

Pure logic: no gRPC, no I/O, time from an injected clock. The caller classifies each
outcome, following DESIGN.md: only infrastructure faults (``UNAVAILABLE``,
``DEADLINE_EXCEEDED``, ``INTERNAL``, ``RESOURCE_EXHAUSTED``, ``UNKNOWN``) are failures;
a business rejection or a cancellation is *ignored* and never counts.

One call through a breaker::

    permit = breaker.acquire()
    if permit is None:
        ...  # open (or half-open and busy): pick another instance or fail fast
    with permit:  # leaving the block unresolved calls permit.ignore()
        try:
            reply = await invoke(...)
        except grpc.aio.AioRpcError as exc:
            permit.failure() if is_infrastructure(exc.code()) else permit.ignore()
            raise
        permit.success()

States, as in resilience4j: CLOSED (calls flow, outcomes counted) -> OPEN (calls are
refused for the open duration) -> HALF_OPEN (a few trial calls) -> CLOSED after enough
trial successes, or OPEN again, for twice as long, on a trial failure.

Which breaker a fault counts against (:class:`BreakerBoard`, :class:`CallPermit`): a
connection-level fault (UNAVAILABLE: refused, reset, draining; INTERNAL, UNKNOWN,
RESOURCE_EXHAUSTED) counts against the instance, whose breaker guards every call to it;
a deadline that the caller set for one operation (a policy's operation timeout, a
call's own timeout, what is left of the inbound call's deadline) counts against that
operation on that instance, whose breaker guards only that operation's calls there.
A slow operation thus stops being called on an instance without taking the
instance's other operations down.

None of these classes is thread-safe: use each from one thread (the sidecar's event
loop).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

__all__ = [
    "BreakerBoard",
    "BreakerSettings",
    "BreakerSnapshot",
    "BreakerState",
    "CallPermit",
    "CircuitBreaker",
    "InstanceBreakers",
    "Permit",
    "RetryBudget",
    "TransitionCallback",
]

_log = logging.getLogger("sidecar.breaker")

Clock = Callable[[], float]


class BreakerState(enum.Enum):
    """The state of one circuit breaker."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


#: Called with ``(old, new)`` after every state change, for logs and metrics.
TransitionCallback = Callable[[BreakerState, BreakerState], None]


def _check_int(name: str, value: object, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


def _check_float(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    # Written so that NaN fails too.
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low:g} and {high:g}, got {value!r}")


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerSettings:
    """Settings of one circuit breaker; defaults and limits are those of the
    ``CircuitBreakerPolicy`` message in ``protos/flext_mesh/v1/registry.proto``.

    Durations are in seconds. Limits, from the proto: consecutive_failures 1 to 1000,
    failure_rate_threshold_percent 1 to 100, sliding_window_size 1 to 10000, minimum_calls
    1 to sliding_window_size, open_duration 0.1 to 600, max_open_duration open_duration to
    3600, half_open_max_calls 1 to 100. A value outside them raises ``ValueError`` naming
    the field.
    """

    consecutive_failures: int = 5
    """Trip after this many failures in a row; default 5, as Envoy's consecutive_5xx."""
    failure_rate_threshold_percent: float = 50.0
    """Trip at this failure rate over the window, in percent; default 50, as resilience4j."""
    sliding_window_size: int = 100
    """Outcomes in the count-based sliding window; default 100, as resilience4j."""
    minimum_calls: int = 20
    """Outcomes before the rate counts; default 20 (resilience4j: 100) so small services trip."""
    open_duration: float = 5.0
    """Seconds open after a first trip; default 5 s, from the proto."""
    max_open_duration: float = 60.0
    """Cap of the open time, which doubles per consecutive trip; default 60 s, from the proto."""
    half_open_max_calls: int = 3
    """Trial calls while half-open, and successes to close; default 3, from the proto."""

    def __post_init__(self) -> None:
        _check_int("consecutive_failures", self.consecutive_failures, 1, 1000)
        _check_float(
            "failure_rate_threshold_percent", self.failure_rate_threshold_percent, 1.0, 100.0
        )
        _check_int("sliding_window_size", self.sliding_window_size, 1, 10_000)
        _check_int("minimum_calls", self.minimum_calls, 1, self.sliding_window_size)
        _check_float("open_duration", self.open_duration, 0.1, 600.0)
        _check_float("max_open_duration", self.max_open_duration, self.open_duration, 3600.0)
        _check_int("half_open_max_calls", self.half_open_max_calls, 1, 100)

    def with_overrides(self, **changes: Any) -> BreakerSettings:
        """A copy with the given fields replaced, validated again (``TypeError`` on an
        unknown field name)."""
        return dataclasses.replace(self, **changes)

    def open_duration_for(self, trips: int) -> float:
        """Seconds a breaker stays open on its ``trips``-th consecutive trip (1 = first)."""
        # 2**32 x 0.1 s is far past the 1 h cap; the bound keeps the float finite.
        doublings = min(max(trips - 1, 0), 32)
        return min(self.open_duration * 2.0**doublings, self.max_open_duration)


@dataclass(frozen=True, kw_only=True, slots=True)
class BreakerSnapshot:
    """A point-in-time view of one breaker, for logs, metrics and tests."""

    state: BreakerState
    """Current state (an OPEN breaker whose open period ended reads HALF_OPEN)."""
    failure_rate_percent: float
    """Failures over outcomes in the sliding window, in percent; 0 when it is empty."""
    calls_in_window: int
    """Outcomes (successes and failures) in the sliding window."""
    failures_in_window: int
    """Failures in the sliding window."""
    consecutive_failures: int
    """Failures since the last success."""
    trips: int
    """Consecutive trips since the last recovery to CLOSED; 0 when recovered."""
    open_until: float | None
    """Clock time at which the open period ends; None unless OPEN."""
    trial_calls_in_flight: int
    """Trial permits handed out while HALF_OPEN and not resolved yet."""


class Permit:
    """Leave to make one call through a :class:`CircuitBreaker`.

    Resolve it exactly once: :meth:`success`, :meth:`failure` (an infrastructure
    fault) or :meth:`ignore` (a business rejection, a cancellation, or anything that
    says nothing about the instance's health; frees a half-open slot without counting).
    Later calls are no-ops, so a second resolution never changes the counts. Used as a
    context manager, a permit still unresolved when the block exits is ignored, so a
    half-open slot cannot leak. A permit whose breaker changed state since it was
    handed out resolves without effect: stale outcomes never count.
    """

    __slots__ = ("_breaker", "_generation", "_resolved")

    def __init__(self, breaker: CircuitBreaker, generation: int) -> None:
        self._breaker = breaker
        self._generation = generation
        self._resolved = False

    @property
    def resolved(self) -> bool:
        """Whether an outcome was already given."""
        return self._resolved

    def success(self) -> None:
        """The call succeeded (or failed for a business reason the caller counts as healthy)."""
        self._resolve(_Outcome.SUCCESS)

    def failure(self) -> None:
        """The call failed with an infrastructure fault."""
        self._resolve(_Outcome.FAILURE)

    def ignore(self) -> None:
        """The call says nothing about health (business rejection, cancellation)."""
        self._resolve(_Outcome.IGNORED)

    def _resolve(self, outcome: _Outcome) -> None:
        if self._resolved:
            return
        self._resolved = True
        self._breaker._record(self._generation, outcome)

    def __enter__(self) -> Permit:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.ignore()


class _Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    IGNORED = "ignored"


class CircuitBreaker:
    """The circuit breaker of one instance: counts its outcomes, refuses calls while open.

    CLOSED -> OPEN after ``consecutive_failures`` failures in a row, or when at least
    ``minimum_calls`` outcomes are in the window and the failure rate over the last
    ``sliding_window_size`` of them reaches ``failure_rate_threshold_percent``.
    OPEN -> HALF_OPEN once the open period ends (read lazily, from the clock).
    HALF_OPEN admits a trial call while trial successes plus trials in flight are below
    ``half_open_max_calls``: never more trials than the decision needs. That many
    successes -> CLOSED (window, counters and trips reset); any trial failure -> OPEN
    for ``min(open_duration * 2**(trips - 1), max_open_duration)``.
    """

    def __init__(
        self,
        settings: BreakerSettings | None = None,
        *,
        clock: Clock = time.monotonic,
        on_transition: TransitionCallback | None = None,
    ) -> None:
        self._settings = settings if settings is not None else BreakerSettings()
        self._clock = clock
        self._on_transition = on_transition
        self._state = BreakerState.CLOSED
        # Bumped on every transition; permits from an older generation are stale.
        self._generation = 0
        self._window: deque[bool] = deque(maxlen=self._settings.sliding_window_size)
        self._window_failures = 0
        self._consecutive_failures = 0
        self._trips = 0
        self._open_until = 0.0
        self._trial_in_flight = 0
        self._trial_successes = 0

    @property
    def settings(self) -> BreakerSettings:
        """The settings this breaker follows."""
        return self._settings

    @property
    def state(self) -> BreakerState:
        """The current state; an OPEN breaker whose open period ended is HALF_OPEN."""
        self._refresh()
        return self._state

    def reconfigure(self, settings: BreakerSettings) -> None:
        """Follow ``settings`` from now on, keeping the state (for a pushed policy).

        An open period already running ends when it was due to; the window keeps its
        newest ``sliding_window_size`` outcomes; the thresholds apply from the next
        outcome. A half-open breaker that already has the trial successes the new
        ``half_open_max_calls`` asks for closes at once.
        """
        if settings == self._settings:
            return
        self._settings = settings
        if self._window.maxlen != settings.sliding_window_size:
            self._window = deque(self._window, maxlen=settings.sliding_window_size)
            self._window_failures = sum(self._window)
        self._refresh()
        if (
            self._state is BreakerState.HALF_OPEN
            and self._trial_successes >= settings.half_open_max_calls
        ):
            self._recover()

    def can_acquire(self) -> bool:
        """Whether :meth:`acquire` would admit a call now, without taking a permit."""
        self._refresh()
        if self._state is BreakerState.CLOSED:
            return True
        if self._state is BreakerState.OPEN:
            return False
        return self._trial_successes + self._trial_in_flight < self._settings.half_open_max_calls

    def acquire(self) -> Permit | None:
        """A permit to start one call now, or None when the breaker refuses it."""
        generation = self._admit()
        return None if generation is None else Permit(self, generation)

    def _admit(self) -> int | None:
        """Admit one call: the generation its permit belongs to, or None (refused)."""
        if not self.can_acquire():
            return None
        if self._state is BreakerState.HALF_OPEN:
            self._trial_in_flight += 1
        return self._generation

    def snapshot(self) -> BreakerSnapshot:
        """State and counters as they are now."""
        self._refresh()
        calls = len(self._window)
        return BreakerSnapshot(
            state=self._state,
            failure_rate_percent=100.0 * self._window_failures / calls if calls else 0.0,
            calls_in_window=calls,
            failures_in_window=self._window_failures,
            consecutive_failures=self._consecutive_failures,
            trips=self._trips,
            open_until=self._open_until if self._state is BreakerState.OPEN else None,
            trial_calls_in_flight=self._trial_in_flight,
        )

    def _refresh(self) -> None:
        if self._state is BreakerState.OPEN and self._clock() >= self._open_until:
            self._transition(BreakerState.HALF_OPEN)

    def _record(self, generation: int, outcome: _Outcome) -> None:
        if generation != self._generation:
            return  # handed out before the last transition: stale
        if self._state is BreakerState.HALF_OPEN:
            self._trial_in_flight -= 1
        if outcome is _Outcome.IGNORED:
            return
        failed = outcome is _Outcome.FAILURE
        self._consecutive_failures = self._consecutive_failures + 1 if failed else 0
        if self._state is BreakerState.HALF_OPEN:
            if failed:
                self._trip()
            else:
                self._trial_successes += 1
                if self._trial_successes >= self._settings.half_open_max_calls:
                    self._recover()
            return
        # CLOSED: the only other state that hands out permits.
        if len(self._window) == self._window.maxlen and self._window[0]:
            self._window_failures -= 1
        self._window.append(failed)
        self._window_failures += failed
        if self._should_trip():
            self._trip()

    def _should_trip(self) -> bool:
        settings = self._settings
        if self._consecutive_failures >= settings.consecutive_failures:
            return True
        calls = len(self._window)
        return (
            calls >= settings.minimum_calls
            and 100.0 * self._window_failures >= settings.failure_rate_threshold_percent * calls
        )

    def _trip(self) -> None:
        self._trips += 1
        self._open_until = self._clock() + self._settings.open_duration_for(self._trips)
        self._transition(BreakerState.OPEN)

    def _recover(self) -> None:
        self._trips = 0
        self._consecutive_failures = 0
        self._window.clear()
        self._window_failures = 0
        self._transition(BreakerState.CLOSED)

    def _transition(self, new: BreakerState) -> None:
        old, self._state = self._state, new
        self._generation += 1
        self._trial_in_flight = 0
        self._trial_successes = 0
        if self._on_transition is not None:
            try:
                self._on_transition(old, new)
            except Exception:
                # A metrics or logging hook must not corrupt or block the breaker.
                _log.exception("circuit breaker transition callback failed")


class CallPermit(Permit):
    """Leave to make one call to one instance: a permit of the instance's breaker that
    holds, when the operation has a breaker there, that one's permit too.

    Resolve it once, by what the outcome says: :meth:`success`, :meth:`failure` (a
    connection-level fault: the instance's), :meth:`operation_failure` (the deadline
    set for this operation expired: the operation's, on this instance) or
    :meth:`ignore` (a business rejection, a cancellation). Later calls are no-ops.
    """

    __slots__ = ("_name", "_operation", "_owner")

    def __init__(
        self,
        owner: InstanceBreakers,
        generation: int,
        operation: Permit | None,
        name: str,
    ) -> None:
        # Permit.__init__ inlined: one permit per call, on the hot path.
        self._breaker = owner.instance
        self._generation = generation
        self._resolved = False
        self._operation = operation
        self._owner = owner
        self._name = name

    def success(self) -> None:
        """The call succeeded."""
        super().success()
        if self._operation is not None:
            self._operation.success()

    def failure(self) -> None:
        """A connection-level fault: counts against the whole instance."""
        super().failure()
        if self._operation is not None:
            self._operation.ignore()

    def operation_failure(self) -> None:
        """The operation's own deadline expired: counts against the operation on this
        instance only (its breaker is made on the first such failure)."""
        if self.resolved:
            return
        super().ignore()
        permit = self._operation
        if permit is None:
            permit = self._owner.operation(self._name).acquire()
        if permit is not None:
            permit.failure()

    def ignore(self) -> None:
        """The outcome says nothing about health."""
        super().ignore()
        if self._operation is not None:
            self._operation.ignore()


class InstanceBreakers:
    """The breakers of one instance: the instance's own, and one per operation whose
    own deadline expired there (made on the first such expiry)."""

    __slots__ = ("_make", "instance", "operations")

    def __init__(self, make: Callable[[str], CircuitBreaker]) -> None:
        """``make(operation)`` makes a breaker ("" for the instance's)."""
        self._make = make
        self.instance = make("")
        self.operations: dict[str, CircuitBreaker] = {}

    def operation(self, name: str) -> CircuitBreaker:
        """The breaker of operation ``name`` on this instance (made when missing)."""
        breaker = self.operations.get(name)
        if breaker is None:
            breaker = self.operations[name] = self._make(name)
        return breaker

    def acquire(self, operation: str) -> CallPermit | None:
        """A permit for one call of ``operation``, or None when the instance's breaker
        or the operation's refuses it."""
        generation = self.instance._admit()
        if generation is None:
            return None
        breaker = self.operations.get(operation)
        if breaker is None:
            return CallPermit(self, generation, None, operation)
        allowed = breaker.acquire()
        if allowed is None:
            Permit(self.instance, generation).ignore()  # free a half-open trial slot
            return None
        return CallPermit(self, generation, allowed, operation)

    def can_acquire(self) -> bool:
        """Whether the instance's breaker would admit a call now."""
        return self.instance.can_acquire()

    def reconfigure(self, settings: BreakerSettings) -> None:
        """Follow ``settings`` from now on, in every breaker of the instance."""
        self.instance.reconfigure(settings)
        for breaker in self.operations.values():
            breaker.reconfigure(settings)


#: Called with (service, instance id, operation or "" for the instance, old, new).
BoardTransition = Callable[[str, str, str, BreakerState, BreakerState], None]


class BreakerBoard:
    """Every breaker of a client, by (service, instance id), made on first use with the
    settings ``settings_of(service)`` gives then."""

    def __init__(
        self,
        settings_of: Callable[[str], BreakerSettings],
        *,
        on_transition: BoardTransition | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._settings_of = settings_of
        self._on_transition = on_transition
        self._clock = clock
        self._instances: dict[tuple[str, str], InstanceBreakers] = {}

    def of(self, service: str, instance_id: str) -> InstanceBreakers:
        """The breakers of one instance."""
        key = (service, instance_id)
        found = self._instances.get(key)
        if found is None:
            found = self._instances[key] = InstanceBreakers(
                lambda operation: self._make(service, instance_id, operation)
            )
        return found

    def _make(self, service: str, instance_id: str, operation: str) -> CircuitBreaker:
        hook = self._on_transition
        callback: TransitionCallback | None = None
        if hook is not None:

            def callback(old: BreakerState, new: BreakerState) -> None:
                hook(service, instance_id, operation, old, new)

        return CircuitBreaker(self._settings_of(service), clock=self._clock, on_transition=callback)

    def reconfigure(self, service: str, settings: BreakerSettings) -> None:
        """New settings for every breaker of ``service``, keeping their state."""
        for (name, _), breakers in self._instances.items():
            if name == service:
                breakers.reconfigure(settings)

    def census(self) -> dict[tuple[str, str], int]:
        """Instance breakers by (service, state name), every state of a service listed
        (0 when none is in it): what is open right now."""
        counts: dict[tuple[str, str], int] = {}
        for (service, _), breakers in self._instances.items():
            for state in BreakerState:
                counts.setdefault((service, state.name), 0)
            counts[service, breakers.instance.state.name] += 1
        return counts

    def state(self, service: str, instance_id: str, operation: str = "") -> BreakerState:
        """The state of an instance's breaker, or of one operation's there (CLOSED
        when that operation never had one)."""
        breakers = self.of(service, instance_id)
        if not operation:
            return breakers.instance.state
        breaker = breakers.operations.get(operation)
        return BreakerState.CLOSED if breaker is None else breaker.state


@dataclass(slots=True)
class _Bucket:
    epoch: int = -1
    calls: int = 0
    retries: int = 0


class RetryBudget:
    """Caps retries at a share of recent calls (Envoy's and Finagle's retry budgets).

    A retry may start while retries in the last ``window`` seconds stay at most
    ``max(ratio * calls, min_retries_per_second * window)`` counting it, so a busy
    service retries at most ``ratio`` of its calls and a quiet one still gets the floor.
    The floor is a floor (like Envoy's ``min_retry_concurrency``), not added to the
    share. Only first attempts are calls (:meth:`record_call`); retries do not earn
    more retries. Time is kept in a ring of ``ceil(window)`` equal buckets, so memory is
    bounded and the window slides one bucket (about a second) at a time.
    """

    def __init__(
        self,
        ratio: float = 0.2,
        *,
        min_retries_per_second: float = 10.0,
        window: float = 10.0,
        clock: Clock = time.monotonic,
    ) -> None:
        _check_float("ratio", ratio, 0.0, 1.0)
        _check_float("min_retries_per_second", min_retries_per_second, 0.0, 1e6)
        _check_float("window", window, 1.0, 3600.0)
        self._ratio = float(ratio)
        self._floor = float(min_retries_per_second) * float(window)
        self._clock = clock
        count = math.ceil(window)
        self._bucket_width = float(window) / count
        self._buckets = [_Bucket() for _ in range(count)]

    @property
    def calls(self) -> int:
        """First attempts recorded in the current window."""
        return sum(bucket.calls for bucket in self._live())

    @property
    def retries(self) -> int:
        """Retries admitted in the current window."""
        return sum(bucket.retries for bucket in self._live())

    def record_call(self) -> None:
        """Count one first attempt of a call."""
        self._current().calls += 1

    def try_retry(self) -> bool:
        """Whether a retry may start now; an admitted retry is counted."""
        bucket = self._current()
        calls = retries = 0
        for live in self._live():
            calls += live.calls
            retries += live.retries
        if retries + 1 > max(self._ratio * calls, self._floor):
            return False
        bucket.retries += 1
        return True

    def _epoch(self) -> int:
        return math.floor(self._clock() / self._bucket_width)

    def _current(self) -> _Bucket:
        epoch = self._epoch()
        bucket = self._buckets[epoch % len(self._buckets)]
        if bucket.epoch != epoch:
            bucket.epoch, bucket.calls, bucket.retries = epoch, 0, 0
        return bucket

    def _live(self) -> list[_Bucket]:
        oldest = self._epoch() - len(self._buckets)
        return [bucket for bucket in self._buckets if bucket.epoch > oldest]
