"""Metrics benchmark: ingest rate, report latency, memory against calls recorded.

- call records ingested per second end to end through ``StreamCalls`` in batches of
  500 (target >= 100,000/s), beside the raw echo stream's messages/s of the same run;
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
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
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
    print_header,
    repeat_interleaved,
    start_server_process,
)
from bench.registry import CONTROL_PLANE_FACTORY, rss_mb
from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc

BATCH = 500
OPERATIONS = 20
REPORT_CALLS = 1_000_000
RSS_CALLS = 10_000_000
STREAM_METHOD = "/flext_mesh.v1.MetricsService/StreamCalls"


def make_batches(count: int, seed: int = 1) -> list[bytes]:
    """``count`` serialized StreamCallsRequests of 500 records over 20 operations."""
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


async def main_async(settings: BenchSettings, report_calls: int, rss_calls: int) -> dict[str, Any]:
    out = settings.out
    batches = make_batches(40)
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
                rates = await repeat_interleaved(
                    {
                        "echo_stream": lambda: measure_rate(echo_client.read_stream_for, **timing),
                        "ingest": lambda: measure_rate(
                            lambda s: stream_batches(channel, batches, seconds=s), **timing
                        ),
                    },
                    settings.runs,
                    on_run=lambda i, name, r: print(
                        f"run {i + 1}/{settings.runs} {name:>11}: {format_number(r.rate)}/s",
                        file=out,
                        flush=True,
                    ),
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
    report_p50_ms = loads["report"].median.p50_us / 1000
    comparisons = [
        Comparison(
            label="ingest records/s (StreamCalls, batches of 500)",
            candidate=ingest,
            baseline=rates["echo_stream"].median.rate,
            baseline_label="echo stream msg/s",
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
        f"ingest: {ingest:,.0f} records/s (target >= 100,000: "
        f"{'met' if ingest >= 100_000 else 'MISSED'})",
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
