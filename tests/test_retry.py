"""retry_async and Backoff: when a call is tried again, how long it waits, when it stops.

Most tests run on a fake clock (``retry.time.monotonic`` and ``retry.asyncio.sleep``
replaced in the module only), so waits are exact and instant; one checks the deadline
against the real clock.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import grpc
import pytest

from flext_mesh import retry
from flext_mesh.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    MeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    StatusError,
    Unauthenticated,
    Unavailable,
)
from flext_mesh.retry import UNLIMITED_ATTEMPTS, Backoff, RetrySpec, retry_async, status_of
from flext_mesh.routing.policy import retry_spec
from flext_mesh.v1 import common_pb2
from sidecar.breaker import RetryBudget

#: No jitter: every wait is exactly initial_backoff * 2**(n - 1), capped.
EXACT = RetrySpec(max_attempts=4, initial_backoff=0.1, max_backoff=0.5, jitter=0.0)


class FakeClock:
    """time.monotonic and asyncio.sleep of the retry module: sleeping moves time on."""

    def __init__(self) -> None:
        self.now = 1_000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(retry, "time", SimpleNamespace(monotonic=fake.monotonic))
    monkeypatch.setattr(retry, "asyncio", SimpleNamespace(sleep=fake.sleep))
    return fake


def failing(*errors: Exception, result: str = "ok") -> Callable[[], Awaitable[str]]:
    """A call that raises ``errors`` one per attempt, then returns ``result``; it counts
    its attempts in ``.calls``."""
    pending = list(errors)

    async def call() -> str:
        call.calls += 1  # type: ignore[attr-defined]
        if pending:
            raise pending.pop(0)
        return result

    call.calls = 0  # type: ignore[attr-defined]
    return call


def calls(call: Callable[[], Awaitable[str]]) -> int:
    return int(call.calls)  # type: ignore[attr-defined]


class Recorder:
    """An on_attempt hook that remembers what it was told."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, Exception, float]] = []

    async def __call__(self, attempt: int, error: Exception, wait: float) -> None:
        self.seen.append((attempt, error, wait))


class CountingBudget:
    """Admits ``admits`` retries, then refuses; counts the questions."""

    def __init__(self, admits: int) -> None:
        self.admits = admits
        self.asked = 0

    def try_retry(self) -> bool:
        self.asked += 1
        return self.asked <= self.admits


# -- the fast path -------------------------------------------------------------------------


async def test_a_first_attempt_that_succeeds_touches_no_retry_machinery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def untouched(*_: object) -> Any:
        raise AssertionError("retry machinery used on a call that succeeded")

    async def no_sleep(_: float) -> None:
        raise AssertionError("slept on a call that succeeded")

    monkeypatch.setattr(retry, "asyncio", SimpleNamespace(sleep=no_sleep))
    monkeypatch.setattr(RetrySpec, "backoff", untouched)
    budget = SimpleNamespace(try_retry=untouched)

    async def on_attempt(*_: object) -> None:
        untouched()

    call = failing()
    result = await retry_async(
        call,
        EXACT,
        deadline=time.monotonic() + 10,
        budget=budget,
        on_attempt=on_attempt,
        status=untouched,
        retry_after=untouched,
        rand=untouched,
    )
    assert result == "ok"
    assert calls(call) == 1


# -- retrying ------------------------------------------------------------------------------


async def test_a_transient_fault_is_retried_with_the_spec_backoff(clock: FakeClock) -> None:
    first, second = Unavailable("down"), Unavailable("still down")
    call = failing(first, second)
    recorder = Recorder()
    assert await retry_async(call, EXACT, on_attempt=recorder) == "ok"
    assert calls(call) == 3
    assert clock.sleeps == [pytest.approx(0.1), pytest.approx(0.2)]
    assert recorder.seen == [
        (1, first, pytest.approx(0.1)),
        (2, second, pytest.approx(0.2)),
    ], "on_attempt hears of each failed attempt with the wait that follows it"


async def test_waits_are_jittered_and_capped_after_the_jitter(clock: FakeClock) -> None:
    spec = RetrySpec(max_attempts=6, initial_backoff=0.1, max_backoff=0.5, jitter=0.5)
    call = failing(*(Unavailable("down") for _ in range(5)))
    await retry_async(call, spec, rand=lambda: 0.5)
    # 0.1, 0.2, 0.4, 0.8, 1.6 times (1 - 0.5 * 0.5), then capped at 0.5
    assert clock.sleeps == pytest.approx([0.075, 0.15, 0.3, 0.5, 0.5])


async def test_it_stops_at_max_attempts_and_raises_the_last_failure(clock: FakeClock) -> None:
    errors = [Unavailable(f"down {i}") for i in range(10)]
    call = failing(*errors)
    with pytest.raises(Unavailable) as caught:
        await retry_async(call, EXACT)
    assert calls(call) == EXACT.max_attempts == 4
    assert caught.value is errors[3]
    assert len(clock.sleeps) == 3, "no wait after the last attempt"


async def test_one_attempt_means_no_retry(clock: FakeClock) -> None:
    call = failing(Unavailable("down"))
    with pytest.raises(Unavailable):
        await retry_async(call, RetrySpec(max_attempts=1))
    assert calls(call) == 1
    assert clock.sleeps == []


async def test_attempts_resumed_after_a_restart_count_against_max_attempts(
    clock: FakeClock,
) -> None:
    recorder = Recorder()
    call = failing(*(Unavailable("down") for _ in range(10)))
    with pytest.raises(Unavailable):
        await retry_async(call, EXACT, first_attempt=3, on_attempt=recorder)
    assert calls(call) == 2, "attempts 3 and 4 of 4"
    assert [attempt for attempt, _, _ in recorder.seen] == [3]
    assert clock.sleeps == [pytest.approx(0.4)], "the wait after attempt 3 is the third wait"

    beyond = failing(Unavailable("down"))
    with pytest.raises(Unavailable):
        await retry_async(beyond, EXACT, first_attempt=9)
    assert calls(beyond) == 1, "past max_attempts, one attempt is still made"


# -- what is never retried -----------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        InvalidArgument("bad field"),
        FailedPrecondition("not now"),
        NotFound("no such thing"),
        AlreadyExists("there already"),
        PermissionDenied("not yours"),
        Unauthenticated("who are you"),
        StatusError("conflict", grpc.StatusCode.ABORTED),  # retryable only when listed
    ],
    ids=lambda e: e.code.name,
)
async def test_a_business_rejection_is_raised_at_once(clock: FakeClock, error: MeshError) -> None:
    call = failing(error)
    with pytest.raises(type(error)) as caught:
        await retry_async(call, EXACT)
    assert caught.value is error
    assert calls(call) == 1
    assert clock.sleeps == []


async def test_an_exception_without_a_status_is_raised_at_once(clock: FakeClock) -> None:
    call = failing(ValueError("a bug"))
    with pytest.raises(ValueError, match="a bug"):
        await retry_async(call, EXACT)
    assert calls(call) == 1


async def test_the_status_function_decides_what_is_retried(clock: FakeClock) -> None:
    class Wrapped(Exception):
        def __init__(self, error: MeshError) -> None:
            self.error = error

    def status(error: Exception) -> grpc.StatusCode | None:
        return error.error.code if isinstance(error, Wrapped) else None

    call = failing(Wrapped(Unavailable("down")))
    assert await retry_async(call, EXACT, status=status) == "ok"
    assert calls(call) == 2

    aborted = StatusError("conflict", grpc.StatusCode.ABORTED)
    listed = RetrySpec(retryable=frozenset({grpc.StatusCode.ABORTED}))
    call = failing(aborted)
    assert await retry_async(call, listed) == "ok", "a spec may list ABORTED"


def test_status_of_reads_mesh_errors_and_rpc_errors() -> None:
    rpc_error = grpc.aio.AioRpcError(
        grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "down"
    )
    assert status_of(rpc_error) is grpc.StatusCode.UNAVAILABLE
    assert status_of(NotFound("x")) is grpc.StatusCode.NOT_FOUND
    assert status_of(RuntimeError("x")) is None


async def test_cancellation_is_never_retried(clock: FakeClock) -> None:
    async def cancelled() -> str:
        raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await retry_async(cancelled, EXACT)
    assert clock.sleeps == []


# -- deadline, budget, server hints --------------------------------------------------------


async def test_it_stops_before_a_wait_that_would_reach_the_deadline(clock: FakeClock) -> None:
    call = failing(*(Unavailable("down") for _ in range(10)))
    # Waits 0.1 and 0.2 fit in 0.35 s; the third (0.4) would pass the deadline.
    with pytest.raises(Unavailable):
        await retry_async(call, EXACT, deadline=clock.now + 0.35)
    assert calls(call) == 3
    assert clock.sleeps == pytest.approx([0.1, 0.2])


async def test_it_never_sleeps_past_the_deadline_on_the_real_clock() -> None:
    spec = RetrySpec(max_attempts=UNLIMITED_ATTEMPTS, initial_backoff=0.02, jitter=0.0)
    call = failing(*(Unavailable("down") for _ in range(100)))
    started = time.monotonic()
    deadline = started + 0.25
    with pytest.raises(Unavailable):
        await retry_async(call, spec, deadline=deadline)
    assert time.monotonic() < deadline
    # 0.02 + 0.04 + 0.08 = 0.14 s slept; the next wait (0.16) would end past 0.25 s.
    assert calls(call) == 4


async def test_a_refusing_budget_stops_the_retries(clock: FakeClock) -> None:
    budget = CountingBudget(admits=1)
    call = failing(*(Unavailable("down") for _ in range(10)))
    with pytest.raises(Unavailable):
        await retry_async(call, EXACT, budget=budget)
    assert calls(call) == 2, "one retry admitted, the next refused"
    assert budget.asked == 2


async def test_the_budget_is_asked_only_for_a_retry_that_would_happen(clock: FakeClock) -> None:
    budget = CountingBudget(admits=10)
    for error, spec in (
        (InvalidArgument("bad"), EXACT),
        (Unavailable("down"), RetrySpec(max_attempts=1)),
    ):
        with pytest.raises(MeshError):
            await retry_async(failing(error), spec, budget=budget)
    with pytest.raises(Unavailable):
        await retry_async(failing(Unavailable("down")), EXACT, budget=budget, deadline=clock.now)
    assert budget.asked == 0, "an admitted retry counts: none may be counted for nothing"


async def test_the_sidecar_retry_budget_fits(clock: FakeClock) -> None:
    refusing = RetryBudget(0.0, min_retries_per_second=0.0)
    call = failing(Unavailable("down"))
    with pytest.raises(Unavailable):
        await retry_async(call, EXACT, budget=refusing)
    assert calls(call) == 1


def _hint(error: Exception) -> float | None:
    return error.retry_after if isinstance(error, ResourceExhausted) else None


async def test_a_retry_info_hint_lengthens_the_wait_never_shortens_it(clock: FakeClock) -> None:
    recorder = Recorder()
    call = failing(
        ResourceExhausted("rate limited", retry_after=1.5),
        ResourceExhausted("rate limited", retry_after=0.01),
        ResourceExhausted("rate limited"),
    )
    assert await retry_async(call, EXACT, retry_after=_hint, on_attempt=recorder) == "ok"
    assert clock.sleeps == pytest.approx([1.5, 0.2, 0.4])
    assert [wait for _, _, wait in recorder.seen] == pytest.approx([1.5, 0.2, 0.4])


async def test_a_hint_past_the_deadline_ends_the_retries_without_waiting(
    clock: FakeClock,
) -> None:
    call = failing(ResourceExhausted("rate limited", retry_after=5.0))
    with pytest.raises(ResourceExhausted):
        await retry_async(call, EXACT, retry_after=_hint, deadline=clock.now + 2.0)
    assert calls(call) == 1
    assert clock.sleeps == []


async def test_hints_are_ignored_unless_asked_for(clock: FakeClock) -> None:
    call = failing(ResourceExhausted("rate limited", retry_after=1.5))
    assert await retry_async(call, EXACT) == "ok"
    assert clock.sleeps == [pytest.approx(0.1)]


# -- Backoff and the protobuf policy -------------------------------------------------------


def test_backoff_follows_the_spec_and_starts_again_after_a_reset() -> None:
    backoff = Backoff(EXACT)
    assert [next(backoff) for _ in range(5)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])
    assert backoff.failures == 5
    backoff.reset()
    assert backoff.failures == 0
    assert next(backoff) == pytest.approx(0.1)


def test_backoff_never_overflows_in_a_long_outage() -> None:
    backoff = Backoff(RetrySpec(initial_backoff=0.1, max_backoff=2.0), rand=lambda: 0.0)
    waits = [next(backoff) for _ in range(5_000)]
    assert waits[-1] == 2.0


def test_retry_spec_applies_common_proto_defaults() -> None:
    assert retry_spec(common_pb2.RetryPolicy()) == RetrySpec()
    policy = common_pb2.RetryPolicy(
        max_attempts=5, backoff_multiplier=3.0, jitter=0.0, retryable_codes=["ABORTED", "NOPE"]
    )
    policy.initial_backoff.FromMilliseconds(250)
    policy.max_backoff.FromSeconds(2)
    assert retry_spec(policy) == RetrySpec(
        max_attempts=5,
        initial_backoff=0.25,
        multiplier=3.0,
        max_backoff=2.0,
        jitter=0.0,
        retryable=frozenset({grpc.StatusCode.ABORTED}),
    )
    long_first = common_pb2.RetryPolicy()
    long_first.initial_backoff.FromSeconds(8)
    assert retry_spec(long_first).max_backoff == 8.0, "the default cap is never below the first"
