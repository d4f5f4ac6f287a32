"""A bounded soak: 200 simulated sidecars against a ``flext-mesh serve`` subprocess.

Each simulated sidecar is an async task, as cheap as the load it makes: it registers
with a short TTL, renews its lease over its own KeepAlive stream every TTL/3, and
reports a few call records per renewal (half of them with ReportCalls, half over a
StreamCalls stream they close, for its acknowledgement, every few seconds). They
share a few channels. Meanwhile a watcher counts removals.

Asserted: no lease expires, no RPC fails, and the control plane's memory (its RSS,
from /proc, after a warm-up) stays flat. ``SOAK_SECONDS`` sets the duration (default
10; ``make soak`` runs 60); the figures are printed.
"""

from __future__ import annotations

import asyncio
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.conftest import start_serve
from tests.robustness.conftest import register_request

pytestmark = pytest.mark.xdist_group("soak")

SOAK_SECONDS = float(os.environ.get("SOAK_SECONDS", "10"))
SIDECARS = 200
CHANNELS = 4
SERVICES = 20
TTL = 3.0
RECORDS_PER_TICK = 5
STREAM_ROTATE_TICKS = 5
#: RSS at the end may exceed RSS after the warm-up by this much, at most.
RSS_GROWTH = 0.15


@dataclass
class Tally:
    """What the simulated sidecars did, and what went wrong."""

    #: When the sidecars stop (monotonic); set once all of them are registered.
    until: float = float("inf")
    registered: int = 0
    heartbeats: int = 0
    expired: int = 0
    report_rpcs: int = 0
    stream_batches: int = 0
    records: int = 0
    acknowledged: int = 0
    errors: list[str] = field(default_factory=list)


def _rss_kib(pid: int) -> int:
    """Resident set size of a process, KiB (VmRSS in /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for pid {pid}")


def _records(service: str, instance_id: str) -> list[metrics_pb2.CallRecord]:
    now = time.time_ns()
    return [
        metrics_pb2.CallRecord(
            service_name=service,
            instance_id=instance_id,
            operation="charge",
            duration_ms=random.uniform(1, 20),
            success=random.random() > 0.01,
            time_unix_nano=now,
        )
        for _ in range(RECORDS_PER_TICK)
    ]


async def _sidecar(
    index: int, channel: grpc.aio.Channel, tally: Tally, started: asyncio.Event
) -> None:
    """One simulated sidecar: register, then renew and report every TTL/3 until
    ``tally.until``."""
    service, instance_id = f"svc-{index % SERVICES:02d}", f"sc-{index:03d}"
    registry = registry_pb2_grpc.RegistryServiceStub(channel)
    metrics = metrics_pb2_grpc.MetricsServiceStub(channel)
    await asyncio.sleep(random.uniform(0, 1.0))  # not all at once
    reply = await registry.Register(register_request(service, instance_id, ttl=TTL), timeout=10)
    lease_id = reply.lease.lease_id
    tally.registered += 1
    if tally.registered == SIDECARS:
        started.set()
    keep_alive = registry.KeepAlive()
    stream: grpc.aio.StreamUnaryCall[Any, Any] | None = None
    streamed = tick = 0
    interval = TTL / 3
    try:
        while time.monotonic() < tally.until:
            tick_started = time.monotonic()
            try:
                await keep_alive.write(registry_pb2.KeepAliveRequest(lease_ids=[lease_id]))
                renewed = await asyncio.wait_for(keep_alive.read(), interval * 2)
                assert isinstance(renewed, registry_pb2.KeepAliveResponse), renewed
                tally.heartbeats += 1
                if renewed.expired_lease_ids:
                    tally.expired += 1
                records = _records(service, instance_id)
                if index % 2 == 0:
                    answer = await metrics.ReportCalls(
                        metrics_pb2.ReportCallsRequest(records=records), timeout=10
                    )
                    tally.report_rpcs += 1
                    tally.acknowledged += answer.accepted
                else:
                    if stream is None:
                        stream = metrics.StreamCalls(timeout=60)
                    await stream.write(
                        metrics_pb2.StreamCallsRequest(records=records, reporter_id=instance_id)
                    )
                    tally.stream_batches += 1
                    streamed += len(records)
                    if (tick + 1) % STREAM_ROTATE_TICKS == 0:
                        await stream.done_writing()
                        acked = await stream  # awaited first: `+=` would read before it
                        tally.acknowledged += acked.accepted
                        stream, streamed = None, 0
                tally.records += len(records)
            except Exception as exc:  # counted, and the sidecar carries on
                tally.errors.append(f"{instance_id}: {exc!r}"[:300])
                keep_alive.cancel()
                keep_alive = registry.KeepAlive()
                if stream is not None:
                    stream.cancel()
                    stream, streamed = None, 0
            tick += 1
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - tick_started)))
        if stream is not None:
            await stream.done_writing()
            acked = await stream
            tally.acknowledged += acked.accepted
    finally:
        keep_alive.cancel()


async def _count_removals(
    channel: grpc.aio.Channel, removals: list[registry_pb2.WatchEvent]
) -> None:
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    async for message in stub.Watch(registry_pb2.WatchRequest()):
        removals.extend(
            e for e in message.events if e.type == registry_pb2.WATCH_EVENT_TYPE_REMOVED
        )


async def test_200_sidecars_soak_without_expiries_errors_or_memory_growth(
    tmp_path: Path,
) -> None:
    server = await asyncio.to_thread(start_serve, tmp_path)
    channels = [grpc.aio.insecure_channel(server.address) for _ in range(CHANNELS)]
    watcher_channel = grpc.aio.insecure_channel(server.address)
    removals: list[registry_pb2.WatchEvent] = []
    watcher = asyncio.create_task(_count_removals(watcher_channel, removals))
    tally = Tally()
    started = asyncio.Event()
    warmup = max(2.0, SOAK_SECONDS * 0.25)
    try:
        sidecars = [
            asyncio.create_task(_sidecar(i, channels[i % CHANNELS], tally, started))
            for i in range(SIDECARS)
        ]
        await asyncio.wait_for(started.wait(), 20)
        # Everyone is registered: the soak runs from now on, for SOAK_SECONDS.
        begin = time.monotonic()
        until = tally.until = begin + SOAK_SECONDS
        await asyncio.sleep(warmup)
        rss_start = _rss_kib(server.proc.pid)
        counts_at_warmup = (tally.heartbeats, tally.report_rpcs + tally.stream_batches)
        samples = [rss_start]
        while time.monotonic() < until - 0.5:
            await asyncio.sleep(min(1.0, until - time.monotonic()))
            samples.append(_rss_kib(server.proc.pid))
        rss_end = _rss_kib(server.proc.pid)
        measured = SOAK_SECONDS - warmup  # the sidecars stop at `until`
        results = await asyncio.wait_for(
            asyncio.gather(*sidecars, return_exceptions=True), TTL * 3 + 10
        )
        crashed = [r for r in results if isinstance(r, BaseException)]
        heartbeats = tally.heartbeats - counts_at_warmup[0]
        reports = tally.report_rpcs + tally.stream_batches - counts_at_warmup[1]
        growth = rss_end / rss_start - 1
        print(
            f"\nsoak: {SIDECARS} sidecars over {CHANNELS} channels, {SOAK_SECONDS:g}s "
            f"(warm-up {warmup:g}s): heartbeats/s={heartbeats / measured:.0f} "
            f"reports/s={reports / measured:.0f} "
            f"(ReportCalls={tally.report_rpcs} stream batches={tally.stream_batches}) "
            f"records={tally.records} acknowledged={tally.acknowledged} "
            f"rss start={rss_start / 1024:.1f}MiB end={rss_end / 1024:.1f}MiB "
            f"({growth:+.1%}) samples={[round(s / 1024, 1) for s in samples]}"
        )
        assert not crashed, crashed[:3]
        assert not tally.errors, f"{len(tally.errors)} failed RPCs, e.g. {tally.errors[:3]}"
        assert tally.expired == 0, "a renewal found its lease expired"
        assert not removals, f"{len(removals)} instances removed, e.g. {removals[0]}"
        assert tally.acknowledged == tally.records, "every record accepted"
        assert heartbeats / measured > 0.8 * SIDECARS / (TTL / 3), "renewals kept their pace"
        assert growth <= RSS_GROWTH, f"control plane RSS grew {growth:.1%} after warm-up"
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        for channel in [*channels, watcher_channel]:
            await channel.close()
        if server.proc.poll() is None:
            code = await asyncio.to_thread(server.terminate)
            assert code == 0, server.log()[-2000:]
