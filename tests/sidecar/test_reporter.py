"""CallReporter against real control planes: batching, interval flushes, outages, close."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.hosting.reporter import CallReporter, ReporterSettings, ReporterStats
from flext_mesh.server import ControlPlane, create_server
from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc
from tests.registry.conftest import eventually, fast_config

# Reconnect promptly after an outage, as the sidecar's channel does.
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
]


def fast_settings(**overrides: Any) -> ReporterSettings:
    """Short intervals for tests."""
    values: dict[str, Any] = {
        "batch_size": 500,
        "flush_interval": 0.2,
        "stream_max_age": 0.5,
        "connect_timeout": 0.3,
        "backoff_initial": 0.05,
        "backoff_max": 0.3,
        "ack_timeout": 5.0,
    }
    values.update(overrides)
    return ReporterSettings(**values)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def accounted(stats: ReporterStats) -> bool:
    """Every record is sent, dropped, buffered or in flight."""
    return stats.recorded == stats.sent + stats.dropped + stats.buffered + stats.in_flight


@dataclass
class Rig:
    """A control plane (started on demand, on a fixed port) and a reporter pointed at it."""

    tmp_path: Path
    port: int
    channel: grpc.aio.Channel
    planes: list[ControlPlane] = field(default_factory=list)
    reporters: list[CallReporter] = field(default_factory=list)

    async def start_plane(self, name: str = "a") -> None:
        store = self.tmp_path / name
        store.mkdir()
        plane, _ = await create_server(
            fast_config(store, listen=f"127.0.0.1:{self.port}", grace_period=0.2)
        )
        self.planes.append(plane)

    async def stop_plane(self) -> None:
        await self.planes.pop().stop(0)

    def reporter(self, **settings: Any) -> CallReporter:
        reporter = CallReporter(
            lambda: self.channel, reporter_id="test-sidecar", settings=fast_settings(**settings)
        )
        reporter.start()
        self.reporters.append(reporter)
        return reporter

    async def calls(self, service: str = "payment") -> dict[str, int]:
        """Calls the control plane reports per operation (``{}`` when none)."""
        stub = metrics_pb2_grpc.MetricsServiceStub(self.channel)
        try:
            reply = await stub.GetServiceReport(
                metrics_pb2.GetServiceReportRequest(service_name=service), timeout=5
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE):
                return {}
            raise
        return {op.operation: op.total_calls for op in reply.report.operations}

    async def total(self, service: str = "payment") -> int:
        return sum((await self.calls(service)).values())


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    port = free_port()
    rig = Rig(tmp_path, port, grpc.aio.insecure_channel(f"127.0.0.1:{port}", CHANNEL_OPTIONS))
    try:
        yield rig
    finally:
        for reporter in rig.reporters:
            await reporter.aclose(flush=False, within=1.0)
        await rig.channel.close()
        while rig.planes:
            await rig.stop_plane()


def record_calls(reporter: CallReporter, count: int, operation: str = "charge") -> None:
    for i in range(count):
        reporter.record_call(
            "payment",
            operation,
            float(i % 50),
            i % 10 != 0,
            0 if i % 10 else 13,
            instance_id="payment-1",
            version="1.0.0",
            correlation_id=f"c-{i}",
            caller_service="checkout",
        )


async def until(check: Callable[[], bool], *, within: float) -> None:
    """Poll a plain condition until it holds (fails after ``within`` seconds)."""

    async def holds() -> bool:
        return check()

    await eventually(holds, within=within)


def reporter_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if t.get_name() == "sidecar-call-reporter"]


async def test_records_reach_the_control_plane_in_batches(rig: Rig) -> None:
    await rig.start_plane()
    reporter = rig.reporter(batch_size=500, flush_interval=0.2)

    record_calls(reporter, 1_200)

    async def arrived() -> bool:
        return await rig.total() == 1_200

    await eventually(arrived, within=8)
    await until(lambda: reporter.stats().sent == 1_200, within=5)
    stats = reporter.stats()
    # 1,200 records in batches of at most 500: at least 3 batches, far fewer than records.
    assert 3 <= stats.batches <= 12, stats
    assert stats.dropped == 0
    assert stats.rejected == 0
    assert stats.buffered == stats.in_flight == 0
    assert accounted(stats)


async def test_a_partial_batch_is_flushed_by_the_interval(rig: Rig) -> None:
    await rig.start_plane()
    reporter = rig.reporter(batch_size=500, flush_interval=0.2, stream_max_age=0.5)

    record_calls(reporter, 3)

    async def arrived() -> bool:
        return await rig.total() == 3

    await eventually(arrived, within=5)
    # The stream is rotated without more traffic, which acknowledges the records.
    await until(lambda: reporter.stats().sent == 3, within=5)
    assert reporter.stats().batches == 1


async def test_a_record_after_an_idle_spell_is_flushed_by_the_interval(rig: Rig) -> None:
    # A sidecar's first call usually comes long after start: the flusher is idle then.
    await rig.start_plane()
    reporter = rig.reporter(batch_size=500, flush_interval=0.2)
    await asyncio.sleep(0.5)

    record_calls(reporter, 1)

    async def arrived() -> bool:
        return await rig.total() == 1

    await eventually(arrived, within=5)


async def test_outage_keeps_newest_records_within_bound_then_drains(rig: Rig) -> None:
    reporter = rig.reporter(max_buffer=1_000, batch_size=100, flush_interval=0.1)

    start = time.perf_counter()
    record_calls(reporter, 1_000, operation="old")
    record_calls(reporter, 1_000, operation="new")
    elapsed = time.perf_counter() - start
    assert elapsed < 1.0, f"2,000 record_call() took {elapsed:.3f}s"

    stats = reporter.stats()
    assert (stats.buffered, stats.dropped, stats.in_flight) == (1_000, 1_000, 0)
    await until(lambda: reporter.stats().failed_flushes >= 2, within=5)
    stats = reporter.stats()
    assert (stats.buffered, stats.dropped, stats.sent) == (1_000, 1_000, 0)

    await rig.start_plane()

    async def drained() -> bool:
        return await rig.calls() == {"new": 1_000}

    await eventually(drained, within=8)
    await until(lambda: reporter.stats().sent == 1_000, within=5)
    stats = reporter.stats()
    assert (stats.buffered, stats.in_flight, stats.dropped) == (0, 0, 1_000)
    assert accounted(stats)


async def test_acknowledged_batches_are_not_sent_again(rig: Rig) -> None:
    """Each batch is acknowledged once counted, on a stream still open: a stream that
    fails later has nothing to send again (a new control plane sees only new calls)."""
    await rig.start_plane("first")
    reporter = rig.reporter(flush_interval=0.1, stream_max_age=60.0)

    record_calls(reporter, 10)
    await until(lambda: reporter.stats().sent == 10, within=5)
    assert (reporter.stats().in_flight, reporter.stats().buffered) == (0, 0)
    assert await rig.total() == 10

    await rig.stop_plane()  # the open stream fails
    await rig.start_plane("second")
    record_calls(reporter, 5)

    async def on_second() -> bool:
        return await rig.total() == 5

    await eventually(on_second, within=8)
    await reporter.aclose(within=5)
    stats = reporter.stats()
    assert (stats.sent, stats.buffered, stats.in_flight, stats.dropped) == (15, 0, 0, 0)
    assert await rig.total() == 5, "the second control plane got only the new calls"


async def test_aclose_flushes_what_remains_and_is_idempotent(rig: Rig) -> None:
    await rig.start_plane()
    # Neither the batch size nor the interval would send these records.
    reporter = rig.reporter(batch_size=500, flush_interval=30.0, stream_max_age=30.0)
    record_calls(reporter, 50)
    assert len(reporter_tasks()) == 1

    await reporter.aclose(within=5)

    stats = reporter.stats()
    assert (stats.sent, stats.buffered, stats.in_flight) == (50, 0, 0)
    assert await rig.total() == 50
    assert reporter_tasks() == []

    await reporter.aclose()  # twice is fine
    reporter.record_call("payment", "charge", 1.0, True)  # after close: counted, dropped
    stats = reporter.stats()
    assert (stats.recorded, stats.dropped, stats.buffered) == (51, 1, 0)
    with pytest.raises(RuntimeError):
        reporter.start()


async def test_aclose_gives_up_within_its_time_when_unreachable(rig: Rig) -> None:
    reporter = rig.reporter(flush_interval=0.1)
    record_calls(reporter, 20)

    start = time.monotonic()
    await reporter.aclose(within=0.5)

    assert time.monotonic() - start < 3.0
    assert reporter_tasks() == []
    stats = reporter.stats()
    assert (stats.buffered, stats.sent) == (20, 0)
    assert accounted(stats)


async def test_context_manager_owns_the_task(rig: Rig) -> None:
    await rig.start_plane()
    settings = fast_settings(flush_interval=30.0)
    async with CallReporter(lambda: rig.channel, reporter_id="x", settings=settings) as reporter:
        record_calls(reporter, 5)
    assert reporter_tasks() == []
    assert reporter.stats().sent == 5


def test_record_drops_the_oldest_when_full_and_never_raises() -> None:
    channel: Callable[[], grpc.aio.Channel] = lambda: pytest.fail("no flusher running")  # noqa: E731
    reporter = CallReporter(
        channel, reporter_id="x", settings=ReporterSettings(batch_size=2, max_buffer=3)
    )
    for i in range(5):
        reporter.record(metrics_pb2.CallRecord(service_name="s", operation=f"op{i}"))
    reporter.record_call("s", "op", "slow", True)  # type: ignore[arg-type]

    stats = reporter.stats()
    assert (stats.recorded, stats.buffered, stats.dropped) == (6, 3, 3)


@pytest.mark.parametrize(
    "bad",
    [
        {"batch_size": 0},
        {"batch_size": 10_001, "max_buffer": 20_000},
        {"batch_size": 100, "max_buffer": 99},
        {"flush_interval": 0.0},
        {"backoff_max": float("nan")},
        {"stream_max_records": 0},
        {"max_unacknowledged": 499},
    ],
)
def test_settings_are_validated(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(bad))):
        ReporterSettings(**bad)


async def test_a_restarted_reporter_with_the_same_id_is_not_taken_for_the_old_one(
    rig: Rig,
) -> None:
    """Sequences start again at 1 in a new process: its batches must count all the same."""
    await rig.start_plane()
    first = rig.reporter(flush_interval=0.05)
    record_calls(first, 10)
    await first.aclose(within=5)
    second = rig.reporter(flush_interval=0.05)
    assert second.reporter_id == first.reporter_id
    assert second.batch_reporter_id != first.batch_reporter_id
    record_calls(second, 15)
    await second.aclose(within=5)

    assert (first.stats().sent, second.stats().sent) == (10, 15)
    assert await rig.total() == 25


async def test_the_reporter_waits_as_long_as_retry_info_says(tmp_path: Path) -> None:
    """A control plane limited to 100 records/s (burst 100) ends the stream of two
    batches of 110 RESOURCE_EXHAUSTED with a RetryInfo of 1.1 s, then refuses one of
    the two batches sent again the same way. The reporter retries no sooner than told
    (its own backoff is 10-20 ms), and each record is counted once."""
    plane, port = await create_server(
        fast_config(tmp_path, rate_limit_reports=100, rate_limit_reports_burst=100)
    )
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", CHANNEL_OPTIONS)
    settings = fast_settings(
        batch_size=110,
        flush_interval=0.02,
        stream_max_age=5.0,
        backoff_initial=0.01,
        backoff_max=0.02,
    )
    try:
        reporter = CallReporter(lambda: channel, reporter_id="limited", settings=settings)
        started = time.monotonic()
        async with reporter:
            record_calls(reporter, 220)
            await until(lambda: reporter.stats().sent == 220, within=10)
        elapsed = time.monotonic() - started

        stats = reporter.stats()
        # Two waits of about 1.1 s; ignoring RetryInfo would mean ~100 refused attempts.
        assert stats.failed_flushes <= 3, stats
        assert elapsed >= 2.0, elapsed
        assert (stats.sent, stats.dropped, stats.buffered, stats.in_flight) == (220, 0, 0, 0)
        assert stats.duplicate_batches >= 1, "the first batch was counted before the cut"
        reply = await metrics_pb2_grpc.MetricsServiceStub(channel).GetServiceReport(
            metrics_pb2.GetServiceReportRequest(service_name="payment"), timeout=5
        )
        assert reply.report.summary.total_calls == 220
    finally:
        await channel.close()
        await plane.stop(0.2)


async def test_a_batch_refused_as_a_whole_does_not_block_the_rest(rig: Rig) -> None:
    """A batch the control plane refuses whole (every record invalid) is acknowledged
    with every record rejected, not retried for ever in front of the others."""
    await rig.start_plane()
    reporter = rig.reporter(batch_size=5, flush_interval=0.05)
    for i in range(5):
        reporter.record_call("payment", "charge", -1.0, True, correlation_id=f"bad-{i}")
    record_calls(reporter, 5)
    await until(lambda: reporter.stats().sent == 10, within=8)
    stats = reporter.stats()
    assert (stats.rejected, stats.buffered, stats.in_flight, stats.batches) == (5, 0, 0, 2)
    assert await rig.total() == 5
