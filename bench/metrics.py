"""Metrics benchmark: ingest rate, report latency, memory against calls recorded.

- call records ingested per second end to end through ``StreamCalls`` in batches of
  500 (target >= 500,000/s), beside the raw echo stream's messages/s of the same run;
- the same through ``DeliverCalls`` (numbered batches, each acknowledged once durable,
  as sidecars deliver), with as many batches unacknowledged as the control plane reads
  ahead (``MAX_UNACKNOWLEDGED_BATCHES``): acknowledged records per second beside the
  StreamCalls figure of the same run, and how long a batch waits for its
  acknowledgement (p50, p99);
- ``GetServiceReport`` latency for a service with 20 operations and 1,000,000 recorded
  calls (target p50 <= 20 ms), beside the echo unary p50 of the same run;
- control-plane RSS as records accumulate up to 10,000,000 (target: flat).

The client sends pre-serialized batches, so the figures measure the control plane,
not the benchmark's own protobuf encoding. The control plane runs in a subprocess.
"""

from __future__ import annotations

import asyncio
import math
import os
import secrets
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from bench.harness import (
    ECHO_SERVER_FACTORY,
    BenchSettings,
    Comparison,
    EchoClient,
    bench_parser,
    closed_loop,
    connect,
    emit_json,
    format_number,
    machine_facts,
    measure_rate,
    percentile,
    print_header,
    repeat_interleaved,
    start_server_process,
)
from bench.registry import CONTROL_PLANE_FACTORY, rss_mb
from flext_mesh.metrics.service import MAX_UNACKNOWLEDGED_BATCHES
from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc

BATCH = 500
OPERATIONS = 20
REPORT_CALLS = 1_000_000
RSS_CALLS = 10_000_000
INGEST_TARGET = 500_000
STREAM_METHOD = "/flext_mesh.v1.MetricsService/StreamCalls"
DELIVER_METHOD = "/flext_mesh.v1.MetricsService/DeliverCalls"


@dataclass(frozen=True, kw_only=True)
class DeliverResult:
    """One DeliverCalls measurement: acknowledged records per second, and how long a
    batch waited between being written and being acknowledged."""

    items: int
    """Records acknowledged (every batch written was acknowledged before the end)."""
    duration_s: float
    """Wall time of the measured call, taken around it (the last acknowledgements
    included)."""
    rate: float
    """``items / duration_s``."""
    ack_p50_ms: float
    """Median time from writing a batch to reading its acknowledgement, ms."""
    ack_p99_ms: float
    """99th percentile of the same, ms."""


def make_batches(count: int, seed: int = 1) -> list[bytes]:
    """``count`` serialized StreamCallsRequests of 500 records over 20 operations, 4
    instances and 3 callers."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        durations = rng.lognormal(math.log(20), 0.7, BATCH)
        failed = rng.random(BATCH) < 0.02
        request = metrics_pb2.StreamCallsRequest(reporter_id="bench")
        for i in range(BATCH):
            request.records.add(
                service_name="bench",
                operation=f"op{i % OPERATIONS:02d}",
                instance_id=f"i{i % 4}",
                caller_service=f"caller{i % 3}",
                duration_ms=float(durations[i]),
                success=not failed[i],
                status_code=14 if failed[i] else 0,
            )
        out.append(request.SerializeToString())
    return out


async def stream_batches(
    channel: grpc.aio.Channel, batches: list[bytes], *, seconds: float = 0, total: int = 0
) -> int:
    """Send batches on one StreamCalls stream for ``seconds`` or ``total`` records."""
    call = channel.stream_unary(STREAM_METHOD)  # bytes in, bytes out: no client encoding
    deadline = time.perf_counter() + seconds

    async def requests() -> AsyncIterator[bytes]:
        sent = 0
        while True:
            for payload in batches:
                yield payload
                sent += BATCH
                if (seconds and time.perf_counter() >= deadline) or (total and sent >= total):
                    return

    reply = metrics_pb2.StreamCallsResponse.FromString(await call(requests()))
    return int(reply.accepted)


def records_only(batches: list[bytes]) -> list[bytes]:
    """The records of each serialized batch, alone (field 1 of every ingest request)."""
    return [
        metrics_pb2.DeliverCallsRequest(
            records=metrics_pb2.StreamCallsRequest.FromString(batch).records
        ).SerializeToString()
        for batch in batches
    ]


async def deliver_batches(
    channel: grpc.aio.Channel,
    payloads: list[bytes],
    *,
    seconds: float,
    window: int = MAX_UNACKNOWLEDGED_BATCHES,
) -> tuple[int, list[float]]:
    """Send numbered batches on one DeliverCalls stream for ``seconds``, keeping at most
    ``window`` unacknowledged, then wait for the last acknowledgements. Returns the
    records acknowledged and each batch's wait for its acknowledgement (s)."""
    call = channel.stream_stream(DELIVER_METHOD)  # bytes in, bytes out
    reporter = f"bench~{secrets.token_hex(6)}"  # a new reporter: no batch is a copy
    room = asyncio.Semaphore(window)
    written: dict[int, float] = {}
    deadline = time.perf_counter() + seconds

    async def requests() -> AsyncIterator[bytes]:
        sequence = 0
        while time.perf_counter() < deadline:
            await room.acquire()
            sequence += 1
            # Fields of one message concatenated are the message: the records are
            # encoded once, the reporter and the sequence per batch.
            numbered = metrics_pb2.DeliverCallsRequest(
                reporter_id=reporter, batch_sequence=sequence
            ).SerializeToString()
            written[sequence] = time.perf_counter()
            yield payloads[sequence % len(payloads)] + numbered

    acknowledged = 0
    waits: list[float] = []
    async for reply in call(requests()):
        ack = metrics_pb2.DeliverCallsResponse.FromString(reply)
        waits.append(time.perf_counter() - written.pop(ack.batch_sequence))
        acknowledged += ack.accepted
        room.release()
    if written:
        raise RuntimeError(f"{len(written)} batches were never acknowledged")
    return acknowledged, waits


async def measure_deliver(
    channel: grpc.aio.Channel, payloads: list[bytes], *, warmup: float, duration: float
) -> DeliverResult:
    """Like ``measure_rate`` for DeliverCalls, with the acknowledgement waits."""
    if warmup > 0:
        await deliver_batches(channel, payloads, seconds=warmup)
    started = time.perf_counter()
    items, waits = await deliver_batches(channel, payloads, seconds=duration)
    elapsed = time.perf_counter() - started
    waits.sort()
    return DeliverResult(
        items=items,
        duration_s=elapsed,
        rate=items / elapsed if elapsed else 0.0,
        ack_p50_ms=percentile(waits, 50) * 1000,
        ack_p99_ms=percentile(waits, 99) * 1000,
    )


async def main_async(settings: BenchSettings, report_calls: int, rss_calls: int) -> dict[str, Any]:
    out = settings.out
    batches = make_batches(40)
    payloads = records_only(batches)
    timing = {"warmup": settings.warmup, "duration": settings.duration}
    with tempfile.TemporaryDirectory(prefix="flext-bench-") as tmp:
        echo = await asyncio.to_thread(start_server_process, ECHO_SERVER_FACTORY)
        plane = await asyncio.to_thread(
            start_server_process,
            CONTROL_PLANE_FACTORY,
            kwargs={"store_path": os.path.join(tmp, "bench.db")},
        )
        assert plane.pid is not None
        try:
            async with connect(echo.port) as echo_channel, connect(plane.port) as channel:
                echo_client = EchoClient(echo_channel)

                def progress(index: int, name: str, result: Any) -> None:
                    extra = (
                        f" (ack p50 {result.ack_p50_ms:,.1f} ms, p99 {result.ack_p99_ms:,.1f} ms)"
                        if isinstance(result, DeliverResult)
                        else ""
                    )
                    print(
                        f"run {index + 1}/{settings.runs} {name:>11}: "
                        f"{format_number(result.rate)}/s{extra}",
                        file=out,
                        flush=True,
                    )

                rates: dict[str, Any] = await repeat_interleaved(
                    {
                        "echo_stream": lambda: measure_rate(echo_client.read_stream_for, **timing),
                        "ingest": lambda: measure_rate(
                            lambda s: stream_batches(channel, batches, seconds=s), **timing
                        ),
                        "deliver": lambda: measure_deliver(channel, payloads, **timing),
                    },
                    settings.runs,
                    on_run=progress,
                )
                stub = metrics_pb2_grpc.MetricsServiceStub(channel)
                recorded = await _recorded(stub)
                if recorded < report_calls:
                    await stream_batches(channel, batches, total=report_calls - recorded)
                recorded = await _recorded(stub)
                report_at = recorded
                request = metrics_pb2.GetServiceReportRequest(service_name="bench")

                async def report() -> object:
                    return await stub.GetServiceReport(request)

                async def echo_call() -> object:
                    return await echo_client.unary(b"x" * 64)

                loads = await repeat_interleaved(
                    {
                        "echo": lambda: closed_loop(echo_call, concurrency=1, **timing),
                        "report": lambda: closed_loop(report, concurrency=1, **timing),
                    },
                    settings.runs,
                )
                rss = [(recorded, rss_mb(plane.pid))]
                step = max(rss_calls // 5, BATCH)
                while recorded < rss_calls:
                    await stream_batches(channel, batches, total=min(step, rss_calls - recorded))
                    recorded = await _recorded(stub)
                    rss.append((recorded, rss_mb(plane.pid)))
                    print(
                        f"rss after {recorded:,} records: {rss[-1][1]:.0f} MB", file=out, flush=True
                    )
        finally:
            await asyncio.to_thread(plane.stop)
            await asyncio.to_thread(echo.stop)

    ingest = rates["ingest"].median.rate
    deliver = rates["deliver"].median
    report_p50_ms = loads["report"].median.p50_us / 1000
    comparisons = [
        Comparison(
            label="ingest records/s (StreamCalls, batches of 500)",
            candidate=ingest,
            baseline=rates["echo_stream"].median.rate,
            baseline_label="echo stream msg/s",
        ),
        Comparison(
            label=(
                f"ingest records/s (DeliverCalls, batches of 500, "
                f"{MAX_UNACKNOWLEDGED_BATCHES} unacknowledged at most)"
            ),
            candidate=deliver.rate,
            baseline=ingest,
            baseline_label="StreamCalls records/s",
        ),
        Comparison(
            label=f"GetServiceReport p50 ({OPERATIONS} ops, {report_at:,} calls recorded)",
            candidate=loads["report"].median.p50_us,
            baseline=loads["echo"].median.p50_us,
            baseline_label="echo unary p50",
            unit="µs",
            higher_is_better=False,
        ),
    ]
    growth = rss[-1][1] - rss[0][1]
    print(file=out)
    for comparison in comparisons:
        print(comparison, file=out)
    print(
        f"ingest: {ingest:,.0f} records/s (target >= {INGEST_TARGET:,}: "
        f"{'met' if ingest >= INGEST_TARGET else 'MISSED'})",
        file=out,
    )
    print(
        f"deliver: {deliver.rate:,.0f} records/s acknowledged, acknowledgement "
        f"p50 {deliver.ack_p50_ms:,.1f} ms, p99 {deliver.ack_p99_ms:,.1f} ms",
        file=out,
    )
    print(
        f"report p50: {report_p50_ms:.1f} ms (target <= 20 ms: "
        f"{'met' if report_p50_ms <= 20 else 'MISSED'})",
        file=out,
    )
    print(
        "rss: "
        + ", ".join(f"{n / 1e6:.1f}M calls {mb:.0f} MB" for n, mb in rss)
        + f" (growth {growth:+.0f} MB from {rss[0][0] / 1e6:.1f}M"
        + f" to {rss[-1][0] / 1e6:.1f}M calls)",
        file=out,
        flush=True,
    )
    return {
        "benchmark": "metrics",
        "machine": machine_facts(),
        "settings": settings.to_dict(),
        "rates": rates,
        "loads": loads,
        "comparisons": comparisons,
        "rss_mb": rss,
    }


async def _recorded(stub: Any) -> int:
    try:
        reply = await stub.GetServiceReport(
            metrics_pb2.GetServiceReportRequest(service_name="bench")
        )
    except grpc.aio.AioRpcError:
        return 0
    return int(reply.report.summary.total_calls)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.metrics [--quick] [--json]``."""
    parser = bench_parser("metrics benchmark")
    args = parser.parse_args(argv)
    settings = BenchSettings.from_args(args)
    report_calls = 50_000 if settings.quick else REPORT_CALLS
    rss_calls = 200_000 if settings.quick else RSS_CALLS
    print_header("flext-mesh bench: metrics (control plane and echo in subprocesses)", settings)
    result = asyncio.run(main_async(settings, report_calls, rss_calls))
    if settings.json:
        emit_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
