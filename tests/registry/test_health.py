"""Active health checks against real grpc.aio servers on loopback: damping, hung and
stopped endpoints, scheduling spread, channel cache and shutdown."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from flext_mesh.registry import health as health_module
from flext_mesh.registry.health import (
    CheckStats,
    HealthChecker,
    HealthCheckSettings,
    HealthStatus,
    HealthTransition,
)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# Checks driven by check_now() only: a generous timeout so a loaded machine never fails one.
MANUAL = {"interval": 2.0, "timeout": 2.0}
# Checks driven by the scheduler: fast enough to keep the file short.
FAST = {"interval": 0.2, "timeout": 0.2}


# -- servers ---------------------------------------------------------------------------


class CountingHealth(HealthServicer):
    """grpc's reference asyncio servicer, remembering when each Check came."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[float] = []

    async def Check(self, request: Any, context: Any) -> Any:
        self.calls.append(time.monotonic())
        return await super().Check(request, context)

    async def serve(self, serving: bool) -> None:
        """Answer SERVING or NOT_SERVING for the overall health from now on."""
        await self.set("", SERVING if serving else NOT_SERVING)


class HangingHealth(health_pb2_grpc.HealthServicer):
    """A hung process: its port accepts, its Check never answers."""

    async def Check(self, request: Any, context: Any) -> Any:
        await asyncio.sleep(60)
        return health_pb2.HealthCheckResponse(status=SERVING)


class SlowHealth(health_pb2_grpc.HealthServicer):
    """Answers SERVING after a short delay, counting the Checks it handles at once."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.in_flight = 0
        self.max_in_flight = 0

    async def Check(self, request: Any, context: Any) -> Any:
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        return health_pb2.HealthCheckResponse(status=SERVING)


@dataclass
class HealthServer:
    """A grpc.aio server on 127.0.0.1 serving grpc.health.v1 with ``servicer``."""

    servicer: Any
    port: int = 0
    server: grpc.aio.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> HealthServer:
        """Start on self.port (a free one the first time); the same port on a restart."""
        server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)
        self.port = server.add_insecure_port(f"127.0.0.1:{self.port}")
        await server.start()
        self.server = server
        return self

    async def stop(self) -> None:
        """Stop now: the port is closed."""
        if self.server is not None:
            await self.server.stop(None)
            self.server = None


@pytest.fixture
async def servers() -> AsyncIterator[Callable[[Any], Awaitable[HealthServer]]]:
    """Start health servers on demand; all are stopped after the test."""
    started: list[HealthServer] = []

    async def start(servicer: Any) -> HealthServer:
        server = await HealthServer(servicer).start()
        started.append(server)
        return server

    yield start
    for server in started:
        await server.stop()


@pytest.fixture
async def closed_endpoint() -> str:
    """An endpoint nobody listens on (a port that was free a moment ago)."""
    server = await HealthServer(CountingHealth()).start()
    await server.stop()
    return server.endpoint


@dataclass
class Recorder:
    """An on_transition callback remembering every call and when it came."""

    calls: list[tuple[str, HealthTransition, float]] = field(default_factory=list)

    async def __call__(self, key: str, transition: HealthTransition) -> None:
        self.calls.append((key, transition, time.monotonic()))

    def of(self, key: str) -> list[tuple[HealthStatus, HealthStatus]]:
        """The (old, new) transitions of ``key`` in order."""
        return [(t.old, t.new) for k, t, _ in self.calls if k == key]


@dataclass
class Checkers:
    """Makes HealthCheckers recording into one Recorder; closes them after the test."""

    recorder: Recorder = field(default_factory=Recorder)
    made: list[HealthChecker] = field(default_factory=list)

    def __call__(self, **settings: Any) -> HealthChecker:
        checker = HealthChecker(HealthCheckSettings(**settings), self.recorder)
        self.made.append(checker)
        return checker


@pytest.fixture
async def checkers() -> AsyncIterator[Checkers]:
    made = Checkers()
    yield made
    for checker in made.made:
        await checker.aclose()


async def eventually(predicate: Callable[[], bool], what: str, *, within: float = 8.0) -> None:
    """Poll ``predicate`` until it holds; fail naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


def status_of(checker: HealthChecker, key: str) -> HealthStatus | None:
    stats = checker.stats(key)
    return None if stats is None else stats.status


async def check(checker: HealthChecker, key: str) -> CheckStats:
    stats = await checker.check_now(key)
    assert stats is not None
    return stats


# -- settings --------------------------------------------------------------------------


def test_settings_defaults_are_envoy_like() -> None:
    settings = HealthCheckSettings()
    assert (settings.interval, settings.timeout) == (5.0, 1.0)
    assert (settings.unhealthy_threshold, settings.healthy_threshold) == (3, 2)
    assert (settings.jitter, settings.max_channels, settings.max_concurrent_checks) == (
        0.1,
        256,
        64,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("interval", 0.0),
        ("interval", float("inf")),
        ("timeout", -1.0),
        ("timeout", 6.0),  # longer than the default interval
        ("unhealthy_threshold", 0),
        ("healthy_threshold", 0),
        ("jitter", 1.0),
        ("jitter", -0.1),
        ("max_channels", 0),
        ("max_concurrent_checks", 0),
    ],
)
def test_settings_reject_bad_values_naming_the_field(name: str, value: float) -> None:
    with pytest.raises(ValueError, match=name):
        HealthCheckSettings(**{name: value})


# -- thresholds ------------------------------------------------------------------------


async def test_new_endpoint_is_serving_after_one_pass_and_reported_once(
    servers: Callable[[Any], Awaitable[HealthServer]], checkers: Checkers
) -> None:
    server = await servers(CountingHealth())
    checker = checkers(**MANUAL)
    checker.track("payment/i-1", server.endpoint)
    assert status_of(checker, "payment/i-1") is HealthStatus.UNKNOWN

    stats = await check(checker, "payment/i-1")
    assert stats.status is HealthStatus.SERVING
    assert (stats.total_checks, stats.passed_checks, stats.last_error) == (1, 1, "")
    await check(checker, "payment/i-1")
    await check(checker, "payment/i-1")

    assert checkers.recorder.of("payment/i-1") == [(HealthStatus.UNKNOWN, HealthStatus.SERVING)]
    transition = checkers.recorder.calls[0][1]
    assert transition.stats.status is HealthStatus.SERVING
    assert transition.stats.total_checks == 1
    assert "1 consecutive passes" in transition.reason


async def test_serving_endpoint_needs_unhealthy_threshold_failures(
    servers: Callable[[Any], Awaitable[HealthServer]], checkers: Checkers
) -> None:
    servicer = CountingHealth()
    server = await servers(servicer)
    checker = checkers(**MANUAL, unhealthy_threshold=3)
    checker.track("k", server.endpoint)
    await check(checker, "k")

    await servicer.serve(False)
    for failures in (1, 2):
        stats = await check(checker, "k")
        assert stats.status is HealthStatus.SERVING, "damped: too few failures to flip"
        assert stats.consecutive_failures == failures
        assert stats.last_error == "answered NOT_SERVING"
    await servicer.serve(True)
    stats = await check(checker, "k")
    assert (stats.consecutive_failures, stats.consecutive_passes) == (0, 1)

    await servicer.serve(False)
    await check(checker, "k")
    await check(checker, "k")
    assert status_of(checker, "k") is HealthStatus.SERVING
    stats = await check(checker, "k")
    assert stats.status is HealthStatus.NOT_SERVING
    assert checkers.recorder.of("k") == [
        (HealthStatus.UNKNOWN, HealthStatus.SERVING),
        (HealthStatus.SERVING, HealthStatus.NOT_SERVING),
    ]
    assert "3 consecutive failures" in checkers.recorder.calls[-1][1].reason


async def test_not_serving_endpoint_needs_healthy_threshold_passes_and_flapping_stays_out(
    servers: Callable[[Any], Awaitable[HealthServer]], checkers: Checkers
) -> None:
    servicer = CountingHealth()
    server = await servers(servicer)
    checker = checkers(**MANUAL, healthy_threshold=2)
    checker.track("k", server.endpoint, initial=HealthStatus.NOT_SERVING)

    for _ in range(3):  # flapping: pass, fail, pass, fail, ...
        assert (await check(checker, "k")).status is HealthStatus.NOT_SERVING
        await servicer.serve(False)
        assert (await check(checker, "k")).status is HealthStatus.NOT_SERVING
        await servicer.serve(True)
    assert checkers.recorder.calls == []

    assert (await check(checker, "k")).status is HealthStatus.NOT_SERVING
    assert (await check(checker, "k")).status is HealthStatus.SERVING
    assert checkers.recorder.of("k") == [(HealthStatus.NOT_SERVING, HealthStatus.SERVING)]


async def test_new_endpoint_on_a_closed_port_is_not_serving_after_unhealthy_threshold(
    closed_endpoint: str, checkers: Checkers
) -> None:
    checker = checkers(**MANUAL, unhealthy_threshold=3)
    checker.track("k", closed_endpoint)
    for _ in range(2):
        stats = await check(checker, "k")
        assert stats.status is HealthStatus.UNKNOWN
        assert stats.last_error.startswith("UNAVAILABLE")
    assert (await check(checker, "k")).status is HealthStatus.NOT_SERVING
    assert checkers.recorder.of("k") == [(HealthStatus.UNKNOWN, HealthStatus.NOT_SERVING)]


async def test_track_accepts_proto_numbers_and_rejects_others(checkers: Checkers) -> None:
    checker = checkers(**MANUAL)
    checker.track("k", "127.0.0.1:1", initial=2)
    assert status_of(checker, "k") is HealthStatus.SERVING
    with pytest.raises(ValueError, match="4"):
        checker.track("draining", "127.0.0.1:1", initial=4)


# -- scheduled checks against hung and stopped endpoints -------------------------------


async def test_hung_endpoint_is_marked_not_serving_without_delaying_others(
    servers: Callable[[Any], Awaitable[HealthServer]], checkers: Checkers
) -> None:
    hung = await servers(HangingHealth())
    healthy = await servers(CountingHealth())
    checker = checkers(**FAST, unhealthy_threshold=3)
    checker.track("hung", hung.endpoint, initial=HealthStatus.SERVING)
    checker.track("healthy", healthy.endpoint)
    checker.start()

    await eventually(
        lambda: status_of(checker, "hung") is HealthStatus.NOT_SERVING, "hung NOT_SERVING"
    )
    stats = checker.stats("hung")
    assert stats is not None
    assert stats.last_error == "no answer within 0.2s"
    assert stats.ewma_latency_ms == 0.0, "no answer, no latency sample"
    # The healthy endpoint kept its own pace while the hung checks waited for deadlines.
    await eventually(
        lambda: (s := checker.stats("healthy")) is not None and s.passed_checks >= 4,
        "healthy endpoint checked repeatedly",
    )
    assert status_of(checker, "healthy") is HealthStatus.SERVING


async def test_stopped_endpoint_is_not_serving_and_comes_back_on_restart(
    servers: Callable[[Any], Awaitable[HealthServer]], checkers: Checkers
) -> None:
    server = await servers(CountingHealth())
    checker = checkers(**FAST, unhealthy_threshold=2, healthy_threshold=2)
    checker.track("k", server.endpoint)
    checker.start()
    await eventually(lambda: status_of(checker, "k") is HealthStatus.SERVING, "first pass")

    await server.stop()
    await eventually(lambda: status_of(checker, "k") is HealthStatus.NOT_SERVING, "stop noticed")
    stats = checker.stats("k")
    assert stats is not None
    assert stats.last_error.startswith("UNAVAILABLE")

    await server.start()  # the same port again
    await eventually(lambda: status_of(checker, "k") is HealthStatus.SERVING, "restart noticed")
    assert checkers.recorder.of("k") == [
        (HealthStatus.UNKNOWN, HealthStatus.SERVING),
        (HealthStatus.SERVING, HealthStatus.NOT_SERVING),
        (HealthStatus.NOT_SERVING, HealthStatus.SERVING),
    ]


async def test_first_checks_of_many_keys_are_spread_over_the_interval(
    servers: Callable[[Any], Awaitable[HealthServer]], checkers: Checkers
) -> None:
    server = await servers(CountingHealth())
    checker = checkers(interval=1.0, timeout=1.0)
    keys = [f"svc/i-{n}" for n in range(50)]
    for key in keys:
        checker.track(key, server.endpoint)
    started = time.monotonic()
    checker.start()

    await eventually(lambda: len(checkers.recorder.calls) == 50, "a first check of every key")
    first = sorted(at - started for _, _, at in checkers.recorder.calls)
    assert {key for key, _, _ in checkers.recorder.calls} == set(keys)
    assert first[-1] - first[0] >= 0.25, f"first checks bunched: {first}"
    assert len({int(at / 0.05) for at in first}) >= 5, f"first checks bunched: {first}"


async def test_uptime_and_latency_follow_the_checks(
    servers: Callable[[Any], Awaitable[HealthServer]], checkers: Checkers
) -> None:
    servicer = CountingHealth()
    server = await servers(servicer)
    checker = checkers(**MANUAL)
    checker.track("k", server.endpoint)
    before = checker.stats("k")
    assert before is not None
    assert (before.uptime_percentage, before.ewma_latency_ms, before.last_check_at) == (
        100.0,
        0.0,
        None,
    )

    await check(checker, "k")
    await check(checker, "k")
    await servicer.serve(False)
    await check(checker, "k")
    stats = await check(checker, "k")

    assert (stats.total_checks, stats.passed_checks) == (4, 2)
    assert stats.uptime_percentage == pytest.approx(50.0)
    assert 0.0 < stats.ewma_latency_ms < 2000.0  # answered checks count, within the timeout
    assert stats.last_check_at is not None
    assert abs(stats.last_check_at - time.time()) < 5.0


# -- tracking --------------------------------------------------------------------------


async def test_untrack_stops_checks_and_closes_the_unused_channel(
    servers: Callable[[Any], Awaitable[HealthServer]], checkers: Checkers
) -> None:
    servicer = CountingHealth()
    server = await servers(servicer)
    checker = checkers(interval=0.1, timeout=0.1)
    checker.track("k", server.endpoint)
    checker.start()
    await eventually(lambda: len(servicer.calls) >= 3, "a few scheduled checks")

    checker.untrack("k")
    assert checker.stats("k") is None
    assert checker.tracked() == 0
    assert await checker.check_now("k") is None
    await eventually(lambda: checker.open_channels() == 0, "the channel closed")
    await asyncio.sleep(0.1)  # a check already on the wire may still land
    seen = len(servicer.calls)
    await asyncio.sleep(0.5)
    assert len(servicer.calls) == seen


async def test_tracking_a_key_with_a_new_endpoint_starts_afresh(
    servers: Callable[[Any], Awaitable[HealthServer]], closed_endpoint: str, checkers: Checkers
) -> None:
    server = await servers(CountingHealth())
    checker = checkers(**MANUAL)
    checker.track("k", server.endpoint)
    await check(checker, "k")
    checker.track("k", server.endpoint)  # same endpoint: nothing changes
    assert (await check(checker, "k")).total_checks == 2

    checker.track("k", closed_endpoint)
    assert checker.tracked() == 1
    fresh = checker.stats("k")
    assert fresh is not None
    assert (fresh.status, fresh.total_checks) == (HealthStatus.UNKNOWN, 0)
    stats = await check(checker, "k")
    assert (stats.total_checks, stats.passed_checks) == (1, 0)


async def test_a_failing_callback_is_logged_and_checking_goes_on(
    servers: Callable[[Any], Awaitable[HealthServer]], caplog: pytest.LogCaptureFixture
) -> None:
    server = await servers(CountingHealth())

    async def broken(key: str, transition: HealthTransition) -> None:
        raise RuntimeError("boom")

    async with HealthChecker(HealthCheckSettings(**MANUAL), broken) as checker:
        checker.track("k", server.endpoint)
        with caplog.at_level(logging.ERROR, logger="flext_mesh.registry.health"):
            stats = await check(checker, "k")
        assert stats.status is HealthStatus.SERVING
        assert "on_transition failed key=k" in caplog.text
        assert (await check(checker, "k")).total_checks == 2


async def test_checks_in_flight_are_bounded(
    servers: Callable[[Any], Awaitable[HealthServer]], checkers: Checkers
) -> None:
    servicer = SlowHealth(delay=0.1)
    server = await servers(servicer)
    checker = checkers(**MANUAL, max_concurrent_checks=2)
    keys = [f"k{n}" for n in range(6)]
    for key in keys:
        checker.track(key, server.endpoint)

    results = await asyncio.gather(*(check(checker, key) for key in keys))

    assert all(stats.status is HealthStatus.SERVING for stats in results)
    assert servicer.max_in_flight == 2


async def test_channel_cache_closes_the_least_recently_used_channel(
    servers: Callable[[Any], Awaitable[HealthServer]], checkers: Checkers
) -> None:
    a, b, c = [await servers(CountingHealth()) for _ in range(3)]
    checker = checkers(**MANUAL, max_channels=2)
    for key, server in (("a", a), ("b", b), ("c", c)):
        checker.track(key, server.endpoint)
    await check(checker, "a")
    await check(checker, "b")
    assert checker.open_channels() == 2
    channel_a = checker._channels[a.endpoint].channel

    await check(checker, "c")
    await eventually(lambda: checker.open_channels() == 2, "two channels left")
    assert channel_a.get_state() is grpc.ChannelConnectivity.SHUTDOWN
    # The evicted endpoint is still checked, on a new channel (evicting b's).
    assert (await check(checker, "a")).passed_checks == 2
    assert checker.open_channels() <= 2 + 1  # b's may be closing


# -- shutdown --------------------------------------------------------------------------


async def test_aclose_cancels_every_task_and_closes_every_channel(
    closed_endpoint: str,
) -> None:
    before = asyncio.all_tasks()
    hung = await HealthServer(HangingHealth()).start()
    healthy = await HealthServer(CountingHealth()).start()
    checker = HealthChecker(HealthCheckSettings(**FAST), Recorder())
    for n in range(5):
        checker.track(f"hung-{n}", hung.endpoint)
    checker.track("healthy", healthy.endpoint)
    checker.track("closed", closed_endpoint)
    checker.start()
    await eventually(
        lambda: (s := checker.stats("healthy")) is not None and s.total_checks >= 2,
        "checks under way",
    )
    pending = asyncio.create_task(checker.check_now("hung-0"))
    await asyncio.sleep(0.05)

    await checker.aclose()
    await checker.aclose()  # idempotent

    assert await pending is None, "a check cut short by aclose is discarded"
    assert checker.open_channels() == 0
    assert checker.tracked() == 0
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("flext-mesh-health")]
    with pytest.raises(RuntimeError, match="closed"):
        checker.track("late", healthy.endpoint)
    await hung.stop()
    await healthy.stop()
    await eventually(lambda: asyncio.all_tasks() <= before, "no task left behind")


def test_all_is_complete() -> None:
    public = {
        name
        for name, value in vars(health_module).items()
        if not name.startswith("_") and getattr(value, "__module__", None) == health_module.__name__
    }
    assert public <= set(health_module.__all__)
    assert all(hasattr(health_module, name) for name in health_module.__all__)
