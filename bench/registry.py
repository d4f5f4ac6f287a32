"""Registry benchmark: Discover, Heartbeat, KeepAlive, watch fan-out and memory.

Every throughput and latency figure is a ratio to the raw grpc.aio echo ceiling measured
in the same run (echo server and control plane each in their own subprocess, the
client here). Targets are the registry issue's:

- Discover QPS @64 >= 0.80x echo; Discover p50 @1 <= 1.25x echo p50;
- Heartbeat QPS @64 >= 0.80x echo;
- KeepAlive renewals/s over streams >= 0.70x raw stream messages/s;
- 1,000 watchers each receiving one change: p99 delivery <= 250 ms;
- control-plane RSS with 10,000 registered instances <= 200 MB.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from bench.harness import (
    ECHO_SERVER_FACTORY,
    UNLIMITED,
    BenchSettings,
    Comparison,
    EchoClient,
    LoadResult,
    RateResult,
    Repeated,
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
from flext_mesh.config import ServerConfig
from flext_mesh.logs import setup_logging
from flext_mesh.server import create_server
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc

CONTROL_PLANE_FACTORY = "bench.registry:control_plane_factory"
INSTANCES = 10
WATCHERS = 1000
RSS_INSTANCES = 10_000


async def control_plane_factory(store_path: str) -> tuple[grpc.aio.Server, int]:
    """A control plane on a free port with its SQLite store at ``store_path``."""
    setup_logging("WARNING")
    config = ServerConfig(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        store=f"sqlite:///{store_path}",
        log_level="WARNING",
        # One load generator stands for many clients: the per-client limits would
        # measure themselves (they are on by default, see SECURITY.md).
        **UNLIMITED,
    )
    plane, port = await create_server(config)
    return plane.server, port


def _register_request(service: str, instance_id: str, weight: int) -> registry_pb2.RegisterRequest:
    request = registry_pb2.RegisterRequest(
        instance=registry_pb2.ServiceInstance(
            service_name=service,
            instance_id=instance_id,
            endpoint="127.0.0.1:9",
            weight=weight,
            health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
        )
    )
    request.ttl.FromSeconds(3600)
    return request


@dataclass(frozen=True)
class Figures:
    """Medians of the interleaved runs."""

    echo_low: Repeated[LoadResult]
    echo_high: Repeated[LoadResult]
    discover_low: Repeated[LoadResult]
    discover_high: Repeated[LoadResult]
    heartbeat_high: Repeated[LoadResult]
    echo_stream: Repeated[RateResult]
    keepalive: Repeated[RateResult]
    keepalive10: Repeated[RateResult]


async def _keepalive_for(
    stub: registry_pb2_grpc.RegistryServiceAsyncStub, leases: list[str], seconds: float
) -> int:
    """Leases renewed on one KeepAlive stream in ``seconds``, requests pipelined."""
    call: Any = stub.KeepAlive()
    request = registry_pb2.KeepAliveRequest(lease_ids=leases)
    window = asyncio.Semaphore(32)
    deadline = time.perf_counter() + seconds
    done = asyncio.Event()

    async def writer() -> None:
        while not done.is_set() and time.perf_counter() < deadline:
            await window.acquire()
            await call.write(request)
        await call.done_writing()

    renewed = 0
    task = asyncio.create_task(writer())
    try:
        while time.perf_counter() < deadline:
            reply = await call.read()
            if reply is grpc.aio.EOF:
                break
            renewed += len(reply.leases)
            window.release()
    finally:
        done.set()
        call.cancel()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return renewed


async def run_interleaved(settings: BenchSettings, cp_port: int, echo_port: int) -> Figures:
    timing = {"warmup": settings.warmup, "duration": settings.duration}
    async with connect(echo_port) as echo_channel, connect(cp_port) as channel:
        echo = EchoClient(echo_channel)
        stub: registry_pb2_grpc.RegistryServiceAsyncStub = registry_pb2_grpc.RegistryServiceStub(
            channel
        )
        leases = []
        for i in range(INSTANCES):
            reply = await stub.Register(_register_request("bench", f"i{i}", 50 + 10 * i))
            leases.append(reply.lease.lease_id)
        discover = registry_pb2.DiscoverRequest(service_name="bench")
        heartbeat = registry_pb2.HeartbeatRequest(lease_id=leases[0])
        payload = b"x" * 64

        async def echo_call() -> object:
            return await echo.unary(payload)

        async def discover_call() -> object:
            return await stub.Discover(discover)

        async def heartbeat_call() -> object:
            return await stub.Heartbeat(heartbeat)

        loads = await repeat_interleaved(
            {
                "echo_low": lambda: closed_loop(echo_call, concurrency=1, **timing),
                "discover_low": lambda: closed_loop(discover_call, concurrency=1, **timing),
                "echo_high": lambda: closed_loop(echo_call, concurrency=64, **timing),
                "discover_high": lambda: closed_loop(discover_call, concurrency=64, **timing),
                "heartbeat_high": lambda: closed_loop(heartbeat_call, concurrency=64, **timing),
            },
            settings.runs,
            on_run=lambda i, name, r: print(
                f"run {i + 1}/{settings.runs} {name:>15}: {format_number(r.qps)} qps "
                f"p50 {format_number(r.p50_us)} us errors {r.errors}",
                file=settings.out,
                flush=True,
            ),
        )
        rates = await repeat_interleaved(
            {
                "echo_stream": lambda: measure_rate(echo.read_stream_for, **timing),
                "keepalive": lambda: measure_rate(
                    lambda s: _keepalive_for(stub, leases[1:2], s), **timing
                ),
                "keepalive10": lambda: measure_rate(
                    lambda s: _keepalive_for(stub, leases, s), **timing
                ),
            },
            settings.runs,
            on_run=lambda i, name, r: print(
                f"run {i + 1}/{settings.runs} {name:>15}: {format_number(r.rate)} msg/s",
                file=settings.out,
                flush=True,
            ),
        )
    return Figures(
        echo_low=loads["echo_low"],
        echo_high=loads["echo_high"],
        discover_low=loads["discover_low"],
        discover_high=loads["discover_high"],
        heartbeat_high=loads["heartbeat_high"],
        echo_stream=rates["echo_stream"],
        keepalive=rates["keepalive"],
        keepalive10=rates["keepalive10"],
    )


async def watch_fanout(cp_port: int, watchers: int, changes: int = 3) -> list[float]:
    """Delivery latencies (ms) of ``changes`` registrations to ``watchers`` Watch streams."""
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{cp_port}") for _ in range(10)]
    try:
        stubs = [registry_pb2_grpc.RegistryServiceStub(c) for c in channels]
        streams = [
            stubs[i % len(stubs)].Watch(registry_pb2.WatchRequest(service_names=["watched"]))
            for i in range(watchers)
        ]
        await asyncio.gather(*(s.read() for s in streams))  # every snapshot arrived
        latencies: list[float] = []
        for change in range(changes):
            arrived: list[float] = []

            async def receive(stream: Any, arrived: list[float] = arrived) -> None:
                await stream.read()
                arrived.append(time.perf_counter())

            readers = [asyncio.create_task(receive(s)) for s in streams]
            await asyncio.sleep(0.2)  # every reader is waiting
            sent = time.perf_counter()
            await stubs[0].Register(_register_request("watched", f"w{change}", 100))
            await asyncio.wait_for(asyncio.gather(*readers), 60)
            latencies += [(t - sent) * 1000 for t in arrived]
        for stream in streams:
            stream.cancel()
        return latencies
    finally:
        for channel in channels:
            await channel.close()


def rss_mb(pid: int) -> float:
    """Resident set size of a process, MB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def register_many(cp_port: int, count: int) -> float:
    """Register ``count`` instances over 100 services, 64 in flight; returns seconds."""
    async with connect(cp_port) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        queue = list(range(count))
        started = time.perf_counter()

        async def worker() -> None:
            while queue:
                i = queue.pop()
                await stub.Register(_register_request(f"svc-{i % 100}", f"n{i}", 100))

        await asyncio.gather(*(worker() for _ in range(64)))
        return time.perf_counter() - started


async def main_async(settings: BenchSettings, watchers: int, rss_instances: int) -> dict[str, Any]:
    out = settings.out
    with tempfile.TemporaryDirectory(prefix="flext-bench-") as tmp:
        echo = await asyncio.to_thread(start_server_process, ECHO_SERVER_FACTORY)
        plane = await asyncio.to_thread(
            start_server_process,
            CONTROL_PLANE_FACTORY,
            kwargs={"store_path": os.path.join(tmp, "bench.db")},
        )
        try:
            figures = await run_interleaved(settings, plane.port, echo.port)
            latencies = sorted(await watch_fanout(plane.port, watchers))
            assert plane.pid is not None
            idle_rss = rss_mb(plane.pid)
            seconds = await register_many(plane.port, rss_instances)
            await asyncio.sleep(1.0)
            loaded_rss = rss_mb(plane.pid)
        finally:
            await asyncio.to_thread(plane.stop)
            await asyncio.to_thread(echo.stop)

    m = {name: getattr(figures, name).median for name in figures.__dataclass_fields__}
    comparisons = [
        Comparison(
            label="discover qps @64",
            candidate=m["discover_high"].qps,
            baseline=m["echo_high"].qps,
            target=0.80,
        ),
        Comparison(
            label="discover qps @1", candidate=m["discover_low"].qps, baseline=m["echo_low"].qps
        ),
        Comparison(
            label="discover p50 @1",
            candidate=m["discover_low"].p50_us,
            baseline=m["echo_low"].p50_us,
            target=1.25,
            higher_is_better=False,
            unit="µs",
        ),
        Comparison(
            label="heartbeat qps @64",
            candidate=m["heartbeat_high"].qps,
            baseline=m["echo_high"].qps,
            target=0.80,
        ),
        Comparison(
            label="keepalive renewals/s (1 lease per message)",
            candidate=m["keepalive"].rate,
            baseline=m["echo_stream"].rate,
            baseline_label="echo stream msg/s",
            target=0.70,
        ),
        Comparison(
            label=f"keepalive renewals/s ({INSTANCES} leases per message)",
            candidate=m["keepalive10"].rate,
            baseline=m["echo_stream"].rate,
            baseline_label="echo stream msg/s",
        ),
    ]
    p50 = percentile(latencies, 50)
    p99 = percentile(latencies, 99)
    print(file=out)
    for comparison in comparisons:
        print(comparison, file=out)
    print(
        f"watch fan-out: {watchers} watchers x 3 changes: delivery p50 {p50:.1f} ms, "
        f"p99 {p99:.1f} ms (target p99 <= 250 ms: {'met' if p99 <= 250 else 'MISSED'})",
        file=out,
    )
    print(
        f"control-plane RSS: {idle_rss:.0f} MB before, {loaded_rss:.0f} MB with "
        f"{rss_instances:,} instances registered in {seconds:.1f} s "
        f"({rss_instances / seconds:,.0f} registrations/s at 64 in flight) "
        f"(target <= 200 MB: {'met' if loaded_rss <= 200 else 'MISSED'})",
        file=out,
        flush=True,
    )
    return {
        "benchmark": "registry",
        "machine": machine_facts(),
        "settings": settings.to_dict(),
        "figures": figures,
        "comparisons": comparisons,
        "watch": {"watchers": watchers, "p50_ms": p50, "p99_ms": p99},
        "rss_mb": {"idle": idle_rss, "loaded": loaded_rss, "instances": rss_instances},
        "registrations_per_second": rss_instances / seconds,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.registry [--quick] [--json]``."""
    parser = bench_parser("registry benchmark")
    parser.add_argument("--watchers", type=int, default=None, help=f"default {WATCHERS}")
    parser.add_argument("--instances", type=int, default=None, help=f"default {RSS_INSTANCES}")
    args = parser.parse_args(argv)
    settings = BenchSettings.from_args(args)
    watchers = args.watchers or (100 if settings.quick else WATCHERS)
    instances = args.instances or (500 if settings.quick else RSS_INSTANCES)
    print_header("flext-mesh bench: registry (control plane and echo in subprocesses)", settings)
    result = asyncio.run(main_async(settings, watchers, instances))
    if settings.json:
        emit_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
