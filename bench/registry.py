"""Registry benchmark: how Discover, watch fan-out, memory and Register scale.

The control plane runs as a real ``flext-mesh serve`` subprocess (SQLite in a temporary
directory, per-client limits lifted, ``--max-instances-per-service`` raised so one
service can hold 10,000 instances), the raw grpc.aio echo ceiling in another
subprocess, and the load comes from this process through the public gRPC API only
(``flext_mesh.v1``), so the benchmark measures any version of the registry.

Every figure is printed beside the echo figure measured in the same run (interleaved
run by run, at each size). Targets (the registry issues' and ``shared/PERFORMANCE.md``):

- Discover with 10, 100, 1,000 and 10,000 instances in one service, "unchanged" (the
  same query again) and "after a change" (one instance registered or deregistered
  before each call, so no cached answer is valid): at 10 instances QPS @64 >= 0.80x
  echo (aim 0.95x) and p50 @1 <= 1.25x echo; the time of a Discover growing no faster
  than linearly with the instances (time ratios 1k/100 and 10k/1k <= 10 x 1.5);
- meanwhile the control plane stays responsive: a Health/Check probe every 10 ms from
  another process sees p99 <= 50 ms, and no lease expires (the instances are kept alive
  over KeepAlive streams, up to 1,000 leases per message, renewed every TTL/3);
- 10,000 watchers of one service, one change: delivery p99 <= 250 ms; watchers of
  another service get nothing;
- control-plane RSS with 10,000 instances and 1,000 watchers <= 200 MB;
- Register QPS @64 >= 0.50x echo; Heartbeat QPS @64 >= 0.80x echo; KeepAlive renewals/s
  (1 lease per message) >= 0.70x echo stream messages/s. That baseline is a one-way
  server stream, half the messages of a renewal (a request and its answer); the like
  for like baseline, an echo request/response stream pipelined the same way (32 in
  flight, ``EchoClient.chat_for``), is printed beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TextIO

import grpc
import grpc.aio
from prometheus_client.parser import text_string_to_metric_families

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
    format_table,
    load_result_from_samples,
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
"""An in-process control plane for :func:`start_server_process` (other benchmarks)."""

SIZES = (10, 100, 1_000, 10_000)
"""Instances of the one service Discover is measured on."""
QUICK_SIZES = (10, 100, 1_000)
SCALE_SERVICE = "scale"
LEASE_TTL_S = 10.0
"""TTL of the benchmark's instances (the control plane's default); renewed every TTL/3."""
KEEPALIVE_BLOCK = 1_000
"""Leases per KeepAlive stream and message (the most a message may carry)."""
PROBE_INTERVAL_S = 0.010
"""The Health/Check probe's period."""
PROBE_P99_TARGET_MS = 50.0
GROWTH_SLACK = 1.5
"""A time may grow at most this much faster than the instances (10x per step)."""
SIZE_TIMEOUT_S = 240.0
"""Longest a size's measurements may take before the size is reported as timed out."""
DISCOVER_DEADLINE_S = 60.0
WATCHERS = 10_000
OTHER_WATCHERS = 1_000
RSS_WATCHERS = 1_000
WATCH_PROCESSES = 4
WATCH_CHANGES = 3
WATCH_DELIVERY_TIMEOUT_S = 60.0
STREAMS_PER_CHANNEL = 200
OPEN_BATCH = 250
"""Watch streams a watcher process opens at once (then waits for their snapshots)."""
RSS_INSTANCES = 10_000
RSS_TARGET_MB = 200.0
WATCH_P99_TARGET_MS = 250.0
# This benchmark's defaults when --warmup / --duration are not given: five loads of
# three runs at each of four sizes, then the Register loads, fit in a few minutes.
WARMUP_S = 0.5
DURATION_S = 2.0

_DISCOVER_METHOD = "/flext_mesh.v1.RegistryService/Discover"
_HEALTH_CHECK_METHOD = "/grpc.health.v1.Health/Check"
_LAG_METRIC = "flext_mesh_event_loop_lag_seconds"
_SERVING = re.compile(r"serving grpc=(?P<grpc>\S+) http=(?P<http>\S+) .*pid=(?P<pid>\d+)")
# Separate TCP connections per channel: channels with equal arguments share one.
_OWN_CONNECTION = (("grpc.use_local_subchannel_pool", 1),)
_NS_PER_MS = 1_000_000


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


def rss_mb(pid: int) -> float:
    """Resident set size of a process, MB (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def register_request(
    service: str, instance_id: str, *, weight: int = 100, ttl: float = LEASE_TTL_S
) -> registry_pb2.RegisterRequest:
    """A TTL-only instance (no active health checks) under a lease of ``ttl`` seconds."""
    request = registry_pb2.RegisterRequest(
        instance=registry_pb2.ServiceInstance(
            service_name=service,
            instance_id=instance_id,
            endpoint="127.0.0.1:9",
            weight=weight,
            health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
        )
    )
    request.ttl.FromNanoseconds(int(ttl * 1e9))
    return request


# --------------------------------------------------------------------------- the control plane


class ServeProcess:
    """A ``flext-mesh serve`` subprocess: its gRPC address, /metrics URL and pid."""

    def __init__(self, directory: Path, extra_args: Sequence[str] = ()) -> None:
        """Start it with SQLite in ``directory`` and the per-client limits lifted."""
        self.log_path = directory / "serve.log"
        command = [*_flext_mesh_command(), "serve", "--listen", "127.0.0.1:0"]
        command += ["--http-listen", "127.0.0.1:0", "--store", f"sqlite:///{directory}/mesh.db"]
        for name, value in UNLIMITED.items():
            command += [f"--{name.replace('_', '-')}", str(value)]
        command += list(extra_args)
        with self.log_path.open("w") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            match = _SERVING.search(self.log_path.read_text())
            if match:
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"flext-mesh serve did not start:\n{self.log()[-4000:]}")
            time.sleep(0.05)
        self.address: str = match["grpc"]
        """``host:port`` of its gRPC server."""
        self.metrics_url = f"http://{match['http']}/metrics"
        """Its Prometheus endpoint."""
        self.pid = int(match["pid"])
        """Its process id (the serving process itself)."""

    def log(self) -> str:
        """Everything it logged so far."""
        return self.log_path.read_text(errors="replace")

    def rss_mb(self) -> float:
        """Its resident set size, MB."""
        return rss_mb(self.pid)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def _flext_mesh_command() -> list[str]:
    found = shutil.which("flext-mesh", path=str(Path(sys.executable).parent))
    if found is None:
        found = shutil.which("flext-mesh")
    if found is None:
        raise RuntimeError("flext-mesh is not installed: run 'make install-dev'")
    return [found]


# --------------------------------------------------------------------------- the probe


@dataclass(frozen=True, kw_only=True)
class ProbeStats:
    """Latency of the Health/Check probe over one window: how long the control plane's
    event loop kept a trivial call waiting, seen from another process."""

    calls: int
    errors: int
    p50_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples: Sequence[float], errors: int) -> ProbeStats:
        """Summarize latencies in ms (0.0 figures when there is none)."""
        ordered = sorted(samples)
        if not ordered:
            return cls(calls=0, errors=errors, p50_ms=0.0, p99_ms=0.0, max_ms=0.0)
        return cls(
            calls=len(ordered),
            errors=errors,
            p50_ms=percentile(ordered, 50),
            p99_ms=percentile(ordered, 99),
            max_ms=ordered[-1],
        )

    def __str__(self) -> str:
        text = f"{self.p50_ms:.1f} / {self.p99_ms:.1f} / {self.max_ms:.1f}"
        return text + (f" ({self.errors} errors)" if self.errors else "")


class Probe:
    """A child process calling ``grpc.health.v1.Health/Check`` every ``interval`` s.

    Its own process, so that this process's load (parsing answers, running the load's
    event loop) does not show up as the control plane's latency. :meth:`take` returns
    the samples since the previous take; a call still outstanding counts with its
    elapsed time so far (a stall at the end of a window is not lost).
    """

    def __init__(self, address: str, interval: float = PROBE_INTERVAL_S) -> None:
        """Start probing ``address``; returns once the first call has answered."""
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_probe_main, args=(address, interval, child), name="bench-probe", daemon=True
        )
        self._process.start()
        child.close()
        if not self._conn.poll(30):
            self.stop()
            raise RuntimeError("the Health/Check probe did not start")
        kind, value = self._conn.recv()
        if kind != "ready":
            self.stop()
            raise RuntimeError(f"the Health/Check probe failed:\n{value}")

    def take(self) -> tuple[list[float], int]:
        """Latencies (ms) and errors since the previous take (blocking; use a thread)."""
        self._conn.send("take")
        kind, samples, errors = self._conn.recv()
        assert kind == "samples"
        return list(samples), int(errors)

    def stop(self) -> None:
        """End the child."""
        with contextlib.suppress(OSError):
            self._conn.close()
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(2)


def _probe_main(address: str, interval: float, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_probe_serve(address, interval, conn))
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


async def _probe_serve(address: str, interval: float, conn: Connection) -> None:
    clock = time.monotonic_ns
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str | None] = asyncio.Queue()
    channel = grpc.aio.insecure_channel(address, options=_OWN_CONNECTION)
    # An empty HealthCheckRequest is b""; the answer is not parsed (no protobuf cost).
    check: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
        _HEALTH_CHECK_METHOD
    )
    await check(b"", timeout=30)
    samples: list[float] = []
    errors = 0
    outstanding: int | None = None  # start of the call in flight
    counted_early = False

    async def probe() -> None:
        nonlocal errors, outstanding, counted_early
        while True:
            started = outstanding = clock()
            counted_early = False
            try:
                await check(b"", timeout=60)
            except grpc.aio.AioRpcError:
                errors += 1
            finished = clock()
            outstanding = None
            if not counted_early:
                samples.append((finished - started) / _NS_PER_MS)
            await asyncio.sleep(max(0.0, interval - (finished - started) / 1e9))

    def readable() -> None:
        try:
            commands.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            commands.put_nowait(None)

    task = asyncio.create_task(probe())
    loop.add_reader(conn.fileno(), readable)
    conn.send(("ready", None))
    try:
        while (await commands.get()) == "take":
            taken = samples[:]
            if outstanding is not None and not counted_early:
                elapsed = (clock() - outstanding) / _NS_PER_MS
                if elapsed > interval * 1000:
                    taken.append(elapsed)
                    counted_early = True
            conn.send(("samples", taken, errors))
            samples.clear()
            errors = 0
    finally:
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(conn.fileno())
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await channel.close(grace=None)


# --------------------------------------------------------------------------- the lag metric


_Scrape = tuple[str, float | None, dict[float, float] | None]


class LagMetric:
    """``flext_mesh_event_loop_lag_seconds`` from the control plane's /metrics, if any.

    A gauge (or a ``_max`` series) gives the highest value read in a window: read at
    both ends and every half second in between. A histogram gives the smallest bucket
    bound that holds every observation made in the window (an upper bound of the max).
    """

    def __init__(self, url: str) -> None:
        """Read ``url`` once; :attr:`available` says whether the series is there."""
        self.url = url
        self._polls: list[tuple[float, float]] = []
        self._task: asyncio.Task[None] | None = None
        first = self._scrape()
        self.available = first is not None
        """Whether the control plane exports the series."""
        self.kind = first[0] if first is not None else ""
        """``"gauge"`` or ``"histogram"``."""

    def _scrape(self) -> _Scrape | None:
        try:
            with urllib.request.urlopen(self.url, timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        values: list[float] = []
        buckets: dict[float, float] = {}
        for family in text_string_to_metric_families(text):
            if family.name not in (_LAG_METRIC, f"{_LAG_METRIC}_max"):
                continue
            for sample in family.samples:
                if family.type == "histogram" and sample.name.endswith("_bucket"):
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
                elif sample.name in (_LAG_METRIC, f"{_LAG_METRIC}_max"):
                    values.append(sample.value)
        if values:
            return "gauge", max(values), None
        if buckets:
            return "histogram", None, buckets
        return None

    async def start(self) -> None:
        """Poll a gauge in the background (no-op otherwise)."""
        if self.kind == "gauge":
            self._task = asyncio.create_task(self._poll())

    async def stop(self) -> None:
        """Stop polling."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _poll(self) -> None:
        while True:
            scraped = await asyncio.to_thread(self._scrape)
            if scraped is not None and scraped[1] is not None:
                self._polls.append((time.monotonic(), scraped[1]))
            await asyncio.sleep(0.5)

    async def begin(self) -> tuple[float, _Scrape | None]:
        """Open a window: its start and the series then."""
        scraped = await asyncio.to_thread(self._scrape) if self.available else None
        return time.monotonic(), scraped

    async def end(self, window: tuple[float, _Scrape | None]) -> float | None:
        """Largest lag (ms) in the window opened by :meth:`begin` (None: unknown)."""
        if not self.available:
            return None
        start, first = window
        last = await asyncio.to_thread(self._scrape)
        if self.kind == "gauge":
            values = [v for t, v in self._polls if t >= start]
            values += [s[1] for s in (first, last) if s is not None and s[1] is not None]
            return max(values) * 1000 if values else None
        if first is None or last is None or first[2] is None or last[2] is None:
            return None
        before, after = first[2], last[2]
        delta = {bound: after[bound] - before.get(bound, 0.0) for bound in after}
        total = delta.get(math.inf, 0.0)
        if total <= 0:
            return 0.0
        return min(bound for bound, count in delta.items() if count >= total) * 1000


# --------------------------------------------------------------------------- leases


class LeaseKeeper:
    """Keeps instances registered the way a fleet of sidecars does: every TTL/3 each
    block of up to 1,000 leases is renewed by one message on its own KeepAlive stream.

    A lease reported expired is counted and its instance registered again.
    """

    def __init__(self, stub: registry_pb2_grpc.RegistryServiceAsyncStub, ttl: float) -> None:
        """Renew over ``stub`` every ``ttl / 3`` seconds."""
        self._stub = stub
        self._interval = ttl / 3
        self._blocks: list[dict[str, registry_pb2.RegisterRequest]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self.expired = 0
        """Leases reported expired so far."""
        self.renewed = 0
        """Leases renewed so far."""
        self.slowest_round_ms = 0.0
        """Longest KeepAlive round trip seen (one message of up to 1,000 leases)."""
        self.errors: list[str] = []
        """Failures of the streams, as ``repr``."""

    def __len__(self) -> int:
        return sum(len(block) for block in self._blocks)

    def add(self, lease_id: str, request: registry_pb2.RegisterRequest) -> None:
        """Keep ``lease_id`` alive (``request`` registers its instance again)."""
        if not self._blocks or len(self._blocks[-1]) >= KEEPALIVE_BLOCK:
            block: dict[str, registry_pb2.RegisterRequest] = {}
            self._blocks.append(block)
            self._tasks.append(asyncio.create_task(self._keep(block)))
        self._blocks[-1][lease_id] = request

    async def _keep(self, block: dict[str, registry_pb2.RegisterRequest]) -> None:
        call = self._stub.KeepAlive()
        try:
            while True:
                await asyncio.sleep(self._interval)
                if not block:
                    continue
                started = time.perf_counter()
                await call.write(registry_pb2.KeepAliveRequest(lease_ids=list(block)))
                reply = await call.read()
                if not isinstance(reply, registry_pb2.KeepAliveResponse):
                    raise RuntimeError("the KeepAlive stream ended")
                elapsed_ms = (time.perf_counter() - started) * 1000
                self.slowest_round_ms = max(self.slowest_round_ms, elapsed_ms)
                self.renewed += len(reply.leases)
                for lease_id in reply.expired_lease_ids:
                    self.expired += 1
                    request = block.pop(lease_id, None)
                    if request is not None:
                        again = await self._stub.Register(request, timeout=30)
                        block[again.lease.lease_id] = request
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.errors.append(repr(exc))
        finally:
            call.cancel()

    async def close(self) -> None:
        """Stop renewing."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def register_many(
    stub: registry_pb2_grpc.RegistryServiceAsyncStub,
    keeper: LeaseKeeper | None,
    requests: Sequence[registry_pb2.RegisterRequest],
    *,
    concurrency: int = 64,
) -> float:
    """Register ``requests`` with ``concurrency`` in flight; returns the seconds taken."""
    queue = list(reversed(requests))
    started = time.perf_counter()

    async def worker() -> None:
        while queue:
            request = queue.pop()
            reply = await stub.Register(request, timeout=60)
            if keeper is not None:
                keeper.add(reply.lease.lease_id, request)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.perf_counter() - started


# --------------------------------------------------------------------------- Discover by size


LOADS = ("echo @1", "unchanged @1", "after change @1", "echo @64", "unchanged @64")
"""The loads measured at each size, interleaved run by run in this order."""


@dataclass(kw_only=True)
class SizeFigures:
    """Discover at one size of the service, with the echo measured beside it."""

    size: int
    instances: int = 0
    """Instances a Discover returned before the loads (healthy_only false)."""
    answer_bytes: int = 0
    """Size of that Discover's answer."""
    grow_s: float = 0.0
    """Seconds taken to register the instances added for this size (64 in flight)."""
    loads: dict[str, Repeated[LoadResult]] = field(default_factory=dict)
    probes: dict[str, ProbeStats] = field(default_factory=dict)
    """Probe latency during each load (every run pooled)."""
    lag_ms: dict[str, float | None] = field(default_factory=dict)
    """The control plane's own lag metric, max over each load (when exported)."""
    expired: int = 0
    """Leases reported expired while this size was measured."""
    status: str = "ok"
    """``ok``, ``timed out`` or ``not run``."""

    def p50_ms(self, load: str) -> float | None:
        """Median p50 of a load, ms (None when not measured)."""
        found = self.loads.get(load)
        return found.median.p50_us / 1000 if found is not None else None


async def after_change_loop(
    change: Callable[[], Awaitable[object]],
    discover: Callable[[], Awaitable[object]],
    *,
    warmup: float,
    duration: float,
    grace: float = 5.0,
) -> LoadResult:
    """A closed loop at 1 in flight of ``change()`` then ``discover()``; only the Discover
    is timed. QPS is Discover calls completed per second of the window (the changes'
    time included); see :func:`qps_if_always_after_change` for the Discover alone."""
    clock = time.perf_counter_ns
    window_start = clock() + int(warmup * 1e9)
    window_end = window_start + int(duration * 1e9)
    latencies: list[int] = []
    errors = 0
    error_sample: str | None = None

    async def worker() -> None:
        nonlocal errors, error_sample
        while clock() < window_end:
            try:
                await change()
                started = clock()
                await discover()
            except Exception as exc:
                if window_start <= clock() < window_end:
                    errors += 1
                    error_sample = error_sample or repr(exc)
                await asyncio.sleep(0)
                continue
            finished = clock()
            if window_start <= finished < window_end:
                latencies.append(finished - started)

    task = asyncio.create_task(worker())
    try:
        await asyncio.wait({task}, timeout=max(0, window_end - clock()) / 1e9 + grace)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return load_result_from_samples(
        latencies, concurrency=1, duration_s=duration, errors=errors, error_sample=error_sample
    )


def qps_if_always_after_change(result: LoadResult) -> float:
    """Discover calls per second if every one followed a change: 1 / mean latency."""
    return 1e6 / result.mean_us if result.mean_us else 0.0


@dataclass
class Bench:
    """The processes and clients of one run."""

    settings: BenchSettings
    plane: ServeProcess
    echo: EchoClient
    stub: registry_pb2_grpc.RegistryServiceAsyncStub
    discover_raw: grpc.aio.UnaryUnaryMultiCallable[registry_pb2.DiscoverRequest, bytes]
    probe: Probe
    lag: LagMetric
    keeper: LeaseKeeper

    @property
    def out(self) -> TextIO:
        """Where human-readable output goes."""
        return self.settings.out

    def observed(
        self,
        name: str,
        measure: Callable[[], Awaitable[LoadResult]],
        samples: dict[str, list[float]],
        errors: dict[str, int],
        lags: dict[str, list[float]],
    ) -> Callable[[], Awaitable[LoadResult]]:
        """``measure`` with the probe's samples and the lag metric of its window kept."""

        async def run() -> LoadResult:
            await asyncio.to_thread(self.probe.take)  # drop what came before
            window = await self.lag.begin()
            result = await measure()
            taken, failed = await asyncio.to_thread(self.probe.take)
            lag = await self.lag.end(window)
            samples.setdefault(name, []).extend(taken)
            errors[name] = errors.get(name, 0) + failed
            if lag is not None:
                lags.setdefault(name, []).append(lag)
            return result

        return run


async def grow_to(bench: Bench, size: int, have: int) -> tuple[int, float]:
    """Register instances ``have``..``size - 1`` of the scale service; (count, seconds)."""
    if size <= have:
        return have, 0.0
    requests = [
        register_request(SCALE_SERVICE, f"i{n:05d}", weight=50 + 10 * (n % 10))
        for n in range(have, size)
    ]
    seconds = await register_many(bench.stub, bench.keeper, requests)
    return size, seconds


async def measure_size(bench: Bench, figures: SizeFigures) -> None:
    """Interleaved runs of :data:`LOADS` at the scale service's current size."""
    settings = bench.settings
    timing = {"warmup": settings.warmup, "duration": settings.duration}
    request = registry_pb2.DiscoverRequest(service_name=SCALE_SERVICE)
    payload = b"x" * 64
    extra = register_request(SCALE_SERVICE, "x-change")
    present = False

    async def echo_call() -> object:
        return await bench.echo.unary(payload)

    async def discover() -> object:
        return await bench.discover_raw(request, timeout=DISCOVER_DEADLINE_S)

    async def change() -> object:
        nonlocal present
        present = not present
        if present:
            return await bench.stub.Register(extra, timeout=30)
        return await bench.stub.Deregister(
            registry_pb2.DeregisterRequest(service_name=SCALE_SERVICE, instance_id="x-change"),
            timeout=30,
        )

    samples: dict[str, list[float]] = {}
    errors: dict[str, int] = {}
    lags: dict[str, list[float]] = {}
    measures: dict[str, Callable[[], Awaitable[LoadResult]]] = {
        "echo @1": lambda: closed_loop(echo_call, concurrency=1, **timing),
        "unchanged @1": lambda: closed_loop(discover, concurrency=1, **timing),
        "after change @1": lambda: after_change_loop(change, discover, **timing),
        "echo @64": lambda: closed_loop(echo_call, concurrency=64, **timing),
        "unchanged @64": lambda: closed_loop(discover, concurrency=64, **timing),
    }
    expired_before = bench.keeper.expired
    try:
        figures.loads = await repeat_interleaved(
            {name: bench.observed(name, m, samples, errors, lags) for name, m in measures.items()},
            settings.runs,
            on_run=lambda i, name, r: print(
                f"  run {i + 1}/{settings.runs} {name:>16}: {format_number(r.qps)} qps "
                f"p50 {format_number(r.p50_us)} us errors {r.errors}",
                file=settings.out,
                flush=True,
            ),
        )
    finally:
        if present:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await change()
        figures.expired = bench.keeper.expired - expired_before
        figures.probes = {
            name: ProbeStats.of(s, errors.get(name, 0)) for name, s in samples.items()
        }
        figures.lag_ms = {name: max(values) for name, values in lags.items()}


async def discover_by_size(
    bench: Bench, sizes: Sequence[int], size_timeout: float
) -> list[SizeFigures]:
    """Grow the scale service through ``sizes`` and measure Discover at each."""
    out = bench.out
    results = [SizeFigures(size=size) for size in sizes]
    have = 0
    for index, figures in enumerate(results):
        print(f"{figures.size:,} instances:", file=out, flush=True)
        have, figures.grow_s = await grow_to(bench, figures.size, have)
        reply = registry_pb2.DiscoverResponse.FromString(
            await bench.discover_raw(
                registry_pb2.DiscoverRequest(service_name=SCALE_SERVICE, healthy_only=False),
                timeout=DISCOVER_DEADLINE_S,
            )
        )
        figures.instances, figures.answer_bytes = len(reply.instances), reply.ByteSize()
        try:
            await asyncio.wait_for(measure_size(bench, figures), size_timeout)
        except TimeoutError:
            figures.status = "timed out"
            print(
                f"  {figures.size:,} instances: timed out after {size_timeout:g} s; "
                "larger sizes not run",
                file=out,
                flush=True,
            )
            for later in results[index + 1 :]:
                later.status = "not run"
            break
    return results


# --------------------------------------------------------------------------- watch fan-out


@dataclass(frozen=True)
class WatchPlan:
    """What one watcher process opens."""

    address: str
    watched: str
    watchers: int
    other: str
    other_watchers: int


class WatcherProcess:
    """A child process holding Watch streams, reporting when each saw a change."""

    def __init__(self, plan: WatchPlan) -> None:
        """Start it; :meth:`wait_ready` returns once every stream had its snapshot."""
        self.plan = plan
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._process = ctx.Process(
            target=_watchers_main, args=(plan, child), name="bench-watchers", daemon=True
        )
        self._process.start()
        child.close()

    def wait_ready(self, timeout: float = 120.0) -> tuple[int, str]:
        """Block until every stream is open; returns how many failed to open, and the
        first failure's ``repr``."""
        if not self._conn.poll(timeout):
            raise RuntimeError("the watcher process did not get its snapshots in time")
        kind, value, *_ = self._conn.recv()
        if kind != "ready":
            raise RuntimeError(f"the watcher process failed:\n{value}")
        failed, first_error = value
        return int(failed), str(first_error)

    def collect(self, revision: int, sent_ns: int, timeout: float) -> tuple[list[float], int, int]:
        """(delivery latencies ms, watched streams that missed the change, other streams
        that got an event) for the change at ``revision`` sent at ``sent_ns``."""
        self._conn.send(("collect", revision, sent_ns, timeout))
        if not self._conn.poll(timeout + 30):
            raise RuntimeError("the watcher process did not report")
        kind, latencies, missing, other_hits = self._conn.recv()
        if kind != "collected":
            raise RuntimeError(f"the watcher process failed:\n{latencies}")
        return list(latencies), int(missing), int(other_hits)

    def stop(self) -> None:
        """End the child and its streams."""
        with contextlib.suppress(OSError):
            self._conn.close()
        self._process.join(10)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(2)


def _watchers_main(plan: WatchPlan, conn: Connection) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_watchers_serve(plan, conn))
    except Exception:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc(), 0, 0))
    finally:
        conn.close()


async def _watchers_serve(plan: WatchPlan, conn: Connection) -> None:
    clock = time.monotonic_ns  # CLOCK_MONOTONIC: one clock for every process here
    loop = asyncio.get_running_loop()
    total = plan.watchers + plan.other_watchers
    channels = [
        grpc.aio.insecure_channel(plan.address, options=_OWN_CONNECTION)
        for _ in range(max(1, math.ceil(total / STREAMS_PER_CHANNEL)))
    ]
    stubs = [registry_pb2_grpc.RegistryServiceStub(channel) for channel in channels]
    calls: list[Any] = []
    failed: set[int] = set()
    first_error = ""
    # In batches: thousands of calls started at once are partly CANCELLED by gRPC.
    for start in range(0, total, OPEN_BATCH):
        batch = range(start, min(total, start + OPEN_BATCH))
        opened = [
            stubs[i % len(stubs)].Watch(
                registry_pb2.WatchRequest(
                    service_names=[plan.watched if i < plan.watchers else plan.other]
                )
            )
            for i in batch
        ]
        calls += opened
        firsts = await asyncio.gather(*(call.read() for call in opened), return_exceptions=True)
        for i, first in zip(batch, firsts, strict=True):
            if isinstance(first, BaseException) or first is grpc.aio.EOF:
                failed.add(i)
                first_error = first_error or repr(first)
    expected = sum(1 for i in range(plan.watchers) if i not in failed)
    latest = [0] * total  # revision of each stream's last message with events
    arrivals: list[list[tuple[int, int]]] = [[] for _ in range(total)]
    target = math.inf
    delivered = 0
    all_delivered = asyncio.Event()

    async def read(index: int) -> None:
        nonlocal delivered
        call = calls[index]
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                return
            if not message.events:
                continue  # progress
            arrivals[index].append((message.revision, clock()))
            before, latest[index] = latest[index], message.revision
            if index < plan.watchers and before < target <= message.revision:
                delivered += 1
                if delivered >= expected:
                    all_delivered.set()

    readers = [asyncio.create_task(read(i)) for i in range(total) if i not in failed]
    commands: asyncio.Queue[Any] = asyncio.Queue()

    def readable() -> None:
        try:
            commands.put_nowait(conn.recv())
        except (EOFError, OSError):
            loop.remove_reader(conn.fileno())
            commands.put_nowait(None)

    loop.add_reader(conn.fileno(), readable)
    conn.send(("ready", (len(failed), first_error)))
    try:
        while (command := await commands.get()) is not None:
            _, revision, sent_ns, timeout = command
            target = revision
            delivered = sum(1 for i in range(plan.watchers) if latest[i] >= revision)
            all_delivered.clear()
            if delivered < expected:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(all_delivered.wait(), timeout)
            await asyncio.sleep(0.2)  # a leak to the other service would arrive by now
            latencies: list[float] = []
            for i in range(plan.watchers):
                found = next((ns for rev, ns in arrivals[i] if rev >= revision), None)
                if found is not None:
                    latencies.append((found - sent_ns) / _NS_PER_MS)
            other_hits = sum(
                1
                for i in range(plan.watchers, total)
                if any(rev >= revision for rev, _ in arrivals[i])
            )
            for arrived in arrivals:
                arrived.clear()
            target = math.inf
            conn.send(("collected", latencies, expected - len(latencies), other_hits))
    finally:
        with contextlib.suppress(OSError, ValueError):
            loop.remove_reader(conn.fileno())
        for task in readers:
            task.cancel()
        for call in calls:
            call.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for channel in channels:
            await channel.close(grace=None)


@dataclass(kw_only=True)
class WatchFigures:
    """Watch fan-out and control-plane memory."""

    watchers: int
    other_watchers: int
    processes: int
    changes: int
    failed_opens: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    missing: int = 0
    """Deliveries of a change to a watcher of its service that did not arrive in time."""
    other_hits: int = 0
    """Watchers of the other service that got an event for a change (should be 0)."""
    open_error: str = ""
    """The first failure to open a stream, as ``repr``."""
    open_s: float = 0.0
    instances: int
    """Instances of the scale service while the RSS was read."""
    rss_watchers: int
    """Watchers open for the RSS figure with a target."""
    rss_mb: dict[str, float] = field(default_factory=dict)
    """Control-plane RSS by watchers open."""
    probe: ProbeStats | None = None
    """The Health/Check probe from each change to its last delivery."""

    def note_opens(self, failed: int, first_error: str) -> None:
        """Count a watcher process's failed opens."""
        self.failed_opens += failed
        self.open_error = self.open_error or first_error

    @property
    def p50_ms(self) -> float:
        """Median delivery latency, ms."""
        return percentile(sorted(self.latencies_ms), 50) if self.latencies_ms else math.nan

    @property
    def p99_ms(self) -> float:
        """99th percentile delivery latency, ms."""
        return percentile(sorted(self.latencies_ms), 99) if self.latencies_ms else math.nan


def split_watchers(watchers: int, other: int, processes: int, first: int) -> list[tuple[int, int]]:
    """(watched, other) streams per process: the first process holds ``first`` watched
    streams (the memory figure's), the others share the rest and the other service's."""
    first = min(first, watchers)
    rest = watchers - first
    if processes <= 1 or (rest == 0 and other == 0):
        return [(watchers, other)]
    share = processes - 1
    return [(first, 0)] + [
        (
            rest // share + (1 if i < rest % share else 0),
            other // share + (1 if i < other % share else 0),
        )
        for i in range(share)
    ]


async def watch_fanout(
    bench: Bench,
    *,
    watchers: int,
    other_watchers: int,
    processes: int,
    changes: int,
    rss_watchers: int,
    instances: int,
) -> WatchFigures:
    """Open the Watch streams from child processes, then time ``changes`` registrations.

    The control plane's RSS is read with ``instances`` registered and no watcher, with
    the first process's ``rss_watchers`` streams, and with every stream open.
    """
    stub, plane = bench.stub, bench.plane
    for name, count in (("watched", 3), ("other", 1)):
        requests = [register_request(name, f"{name}-{i}") for i in range(count)]
        await register_many(stub, bench.keeper, requests, concurrency=count)
    plan = split_watchers(watchers, other_watchers, processes, rss_watchers)
    figures = WatchFigures(
        watchers=watchers,
        other_watchers=other_watchers,
        processes=len(plan),
        changes=changes,
        instances=instances,
        rss_watchers=plan[0][0],
    )
    figures.rss_mb["no watcher"] = plane.rss_mb()
    handles: list[WatcherProcess] = []
    started = time.perf_counter()
    try:
        for index, (watched, other) in enumerate(plan):
            handles.append(
                WatcherProcess(WatchPlan(plane.address, "watched", watched, "other", other))
            )
            if index == 0:
                figures.note_opens(*await asyncio.to_thread(handles[0].wait_ready))
                await asyncio.sleep(1.0)
                figures.rss_mb[f"{watched:,} watchers"] = plane.rss_mb()
        for handle in handles[1:]:
            figures.note_opens(*await asyncio.to_thread(handle.wait_ready))
        figures.open_s = time.perf_counter() - started
        await asyncio.sleep(1.0)
        figures.rss_mb[f"{watchers + other_watchers:,} watchers"] = plane.rss_mb()
        probe_ms: list[float] = []
        probe_errors = 0
        for change in range(changes):
            await asyncio.sleep(0.5)
            await asyncio.to_thread(bench.probe.take)  # from here to the last delivery
            request = register_request("watched", f"change-{change}")
            sent = time.monotonic_ns()
            reply = await stub.Register(request, timeout=30)
            bench.keeper.add(reply.lease.lease_id, request)
            reports = await asyncio.gather(
                *(
                    asyncio.to_thread(h.collect, reply.revision, sent, WATCH_DELIVERY_TIMEOUT_S)
                    for h in handles
                )
            )
            taken, failed = await asyncio.to_thread(bench.probe.take)
            probe_ms += taken
            probe_errors += failed
            for latencies, missing, other_hits in reports:
                figures.latencies_ms += latencies
                figures.missing += missing
                figures.other_hits += other_hits
            print(
                f"  change {change + 1}/{changes}: delivered to "
                f"{sum(len(r[0]) for r in reports):,} watchers",
                file=bench.out,
                flush=True,
            )
        figures.probe = ProbeStats.of(probe_ms, probe_errors)
    finally:
        await asyncio.gather(*(asyncio.to_thread(h.stop) for h in handles))
    return figures


# --------------------------------------------------------------------------- Register QPS


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


@dataclass(kw_only=True)
class WriteFigures:
    """Register and Heartbeat at 64 in flight, KeepAlive renewals, against echo."""

    loads: dict[str, Repeated[LoadResult]]
    rates: dict[str, Repeated[RateResult]]


async def writes(bench: Bench) -> WriteFigures:
    """Register (new instances over 100 services) and Heartbeat @64, KeepAlive @1 lease."""
    settings = bench.settings
    timing = {"warmup": settings.warmup, "duration": settings.duration}
    payload = b"x" * 64
    numbers = itertools.count()
    held = await bench.stub.Register(register_request("beat", "b0", ttl=3600), timeout=30)
    heartbeat = registry_pb2.HeartbeatRequest(lease_id=held.lease.lease_id)

    async def echo_call() -> object:
        return await bench.echo.unary(payload)

    async def register_call() -> object:
        n = next(numbers)
        return await bench.stub.Register(
            register_request(f"reg-{n % 100}", f"r{n}", ttl=3600), timeout=30
        )

    async def heartbeat_call() -> object:
        return await bench.stub.Heartbeat(heartbeat, timeout=30)

    def progress(i: int, name: str, r: LoadResult | RateResult) -> None:
        if isinstance(r, LoadResult):
            figure = f"{format_number(r.qps)} qps, errors {r.errors}"
        else:
            figure = f"{format_number(r.rate)} msg/s"
        print(f"  run {i + 1}/{settings.runs} {name:>16}: {figure}", file=settings.out, flush=True)

    loads = await repeat_interleaved(
        {
            "echo @64": lambda: closed_loop(echo_call, concurrency=64, **timing),
            "register @64": lambda: closed_loop(register_call, concurrency=64, **timing),
            "heartbeat @64": lambda: closed_loop(heartbeat_call, concurrency=64, **timing),
        },
        settings.runs,
        on_run=progress,
    )
    rates = await repeat_interleaved(
        {
            "echo stream": lambda: measure_rate(bench.echo.read_stream_for, **timing),
            "echo chat": lambda: measure_rate(bench.echo.chat_for, **timing),
            "keepalive": lambda: measure_rate(
                lambda s: _keepalive_for(bench.stub, [held.lease.lease_id], s), **timing
            ),
        },
        settings.runs,
        on_run=progress,
    )
    return WriteFigures(loads=loads, rates=rates)


# --------------------------------------------------------------------------- report


def _ms(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    return f"{value:,.1f}" if value >= 10 else f"{value:,.2f}"


def size_table(results: Sequence[SizeFigures], lag: bool) -> str:
    """One row per size and load: the figure, the echo beside it, the probe."""
    headers = ["instances", "load", "p50 ms", "p99 ms", "QPS", "echo p50 ms", "echo QPS"]
    headers += ["p50 x echo", "QPS x echo", "probe p50/p99/max ms"]
    if lag:
        headers.append("lag metric max ms")
    rows: list[list[str]] = []
    for figures in results:
        if figures.status != "ok":
            rows.append([f"{figures.size:,}", figures.status, *["-"] * (len(headers) - 2)])
            continue
        for load, echo_load in (
            ("unchanged @1", "echo @1"),
            ("after change @1", "echo @1"),
            ("unchanged @64", "echo @64"),
        ):
            result, echo = figures.loads[load].median, figures.loads[echo_load].median
            qps = qps_if_always_after_change(result) if load.startswith("after") else result.qps
            row = [
                f"{figures.instances:,}",
                load,
                _ms(result.p50_us / 1000),
                _ms(result.p99_us / 1000),
                format_number(qps) + ("*" if load.startswith("after") else ""),
                _ms(echo.p50_us / 1000),
                format_number(echo.qps),
                f"{result.p50_us / echo.p50_us:.2f}x" if echo.p50_us else "-",
                f"{qps / echo.qps:.2f}x" if echo.qps else "-",
                str(figures.probes.get(load, "-")),
            ]
            if lag:
                row.append(_ms(figures.lag_ms.get(load)))
            rows.append(row)
    return format_table(headers, rows)


def growth_lines(results: Sequence[SizeFigures]) -> list[tuple[str, float, float, bool]]:
    """(label, time ratio, size ratio, within target) between consecutive measured sizes."""
    measured = [f for f in results if f.status == "ok"]
    lines = []
    for small, large in itertools.pairwise(measured):
        for load in ("after change @1", "unchanged @1"):
            t_small, t_large = small.p50_ms(load), large.p50_ms(load)
            if not t_small or t_large is None:
                continue
            grows = large.instances / small.instances
            ratio = t_large / t_small
            label = f"Discover {load} p50 {large.size:,}/{small.size:,}"
            lines.append((label, ratio, grows, ratio <= grows * GROWTH_SLACK))
    return lines


def report(
    bench: Bench,
    sizes: Sequence[SizeFigures],
    watch: WatchFigures,
    write: WriteFigures,
    rss_idle: float,
) -> dict[str, Any]:
    """Print the tables and comparisons; return the JSON payload."""
    out = bench.out
    print(file=out)
    print("Discover by size of the service (medians of the runs; * = 1 / mean latency,", file=out)
    print("the QPS if every call followed a change; probe = Health/Check every", file=out)
    print(f"{PROBE_INTERVAL_S * 1000:g} ms from another process during the load)", file=out)
    print(size_table(sizes, bench.lag.available), file=out)
    print(file=out)
    comparisons: list[Comparison] = []
    ten = next((f for f in sizes if f.size == 10 and f.status == "ok"), None)
    if ten is not None:
        m = {name: r.median for name, r in ten.loads.items()}
        comparisons += [
            Comparison(
                label="discover qps @64 (10 instances, unchanged)",
                candidate=m["unchanged @64"].qps,
                baseline=m["echo @64"].qps,
                target=0.80,
            ),
            Comparison(
                label="discover p50 @1 (10 instances, unchanged)",
                candidate=m["unchanged @1"].p50_us,
                baseline=m["echo @1"].p50_us,
                target=1.25,
                higher_is_better=False,
                unit="µs",
            ),
        ]
    w = {name: r.median for name, r in write.loads.items()}
    r = {name: x.median for name, x in write.rates.items()}
    comparisons += [
        Comparison(
            label="register qps @64",
            candidate=w["register @64"].qps,
            baseline=w["echo @64"].qps,
            target=0.50,
        ),
        Comparison(
            label="heartbeat qps @64",
            candidate=w["heartbeat @64"].qps,
            baseline=w["echo @64"].qps,
            target=0.80,
        ),
        Comparison(
            label="keepalive renewals/s (1 lease per message)",
            candidate=r["keepalive"].rate,
            baseline=r["echo stream"].rate,
            baseline_label="echo stream msg/s",
            target=0.70,
        ),
        # Like for like: the one-way stream above sends half the messages a renewal
        # does (a request and its answer on one bidirectional stream, pipelined).
        Comparison(
            label="keepalive renewals/s (1 lease per message)",
            candidate=r["keepalive"].rate,
            baseline=r["echo chat"].rate,
            baseline_label="echo request/response stream msg/s",
            target=0.70,
        ),
    ]
    for comparison in comparisons:
        print(comparison, file=out)
    growth = growth_lines(sizes)
    for label, ratio, grows, met in growth:
        print(
            f"{label}: {ratio:.2f}x for {grows:.1f}x the instances "
            f"(target <= {grows * GROWTH_SLACK:.1f}x, linear x {GROWTH_SLACK:g}: "
            f"{'met' if met else 'MISSED'})",
            file=out,
        )
    worst = max(
        ((f.size, name, p) for f in sizes for name, p in f.probes.items()),
        key=lambda x: x[2].p99_ms,
        default=None,
    )
    if worst is not None:
        size, name, probe = worst
        verdict = "met" if probe.p99_ms <= PROBE_P99_TARGET_MS else "MISSED"
        print(
            f"worst probe p99: {probe.p99_ms:.1f} ms (max {probe.max_ms:.1f} ms) at "
            f"{size:,} instances, {name} (target p99 <= {PROBE_P99_TARGET_MS:g} ms: {verdict})",
            file=out,
        )
    expired = sum(f.expired for f in sizes)
    print(
        f"leases: {len(bench.keeper):,} kept alive (TTL {LEASE_TTL_S:g} s, renewed every "
        f"{LEASE_TTL_S / 3:.1f} s, {KEEPALIVE_BLOCK:,} per KeepAlive message); expired during "
        f"the Discover loads: {expired} (per size: "
        + ", ".join(f"{f.size:,}: {f.expired}" for f in sizes if f.status == "ok")
        + f"); in the whole run: {bench.keeper.expired}; slowest KeepAlive round "
        f"{bench.keeper.slowest_round_ms:.0f} ms"
        + (f"; stream errors: {bench.keeper.errors[:3]}" if bench.keeper.errors else ""),
        file=out,
    )
    for f in sizes:
        if f.status == "ok":
            print(
                f"  {f.size:,} instances registered in {f.grow_s:.1f} s; "
                f"Discover answer {f.answer_bytes:,} bytes",
                file=out,
            )
    p99 = watch.p99_ms
    print(
        f"watch fan-out: {watch.watchers:,} watchers of one service over {watch.processes} "
        f"client processes (+{watch.other_watchers:,} of another service), {watch.changes} "
        f"change(s), opened in {watch.open_s:.1f} s: delivery p50 {_ms(watch.p50_ms)} ms, "
        f"p99 {_ms(p99)} ms (target p99 <= {WATCH_P99_TARGET_MS:g} ms: "
        f"{'met' if p99 <= WATCH_P99_TARGET_MS and not watch.missing else 'MISSED'}); "
        f"missed deliveries {watch.missing}, failed opens {watch.failed_opens}"
        + (f" (first: {watch.open_error})" if watch.open_error else "")
        + "; "
        f"watchers of the other service notified: {watch.other_hits} (expected 0: "
        f"{'met' if watch.other_hits == 0 else 'MISSED'}); probe p50/p99/max during the "
        f"deliveries: {watch.probe or '-'} ms",
        file=out,
    )
    rss = watch.rss_mb.get(f"{watch.rss_watchers:,} watchers", math.nan)
    print(
        f"control-plane RSS: {rss_idle:.0f} MB idle; with {watch.instances:,} instances: "
        + ", ".join(f"{v:.0f} MB with {k}" for k, v in watch.rss_mb.items())
        + f" (with {watch.rss_watchers:,} watchers: target <= {RSS_TARGET_MB:g} MB: "
        f"{'met' if rss <= RSS_TARGET_MB else 'MISSED'})",
        file=out,
    )
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"load average (1, 5, 15 min) after the run: {load}", file=out, flush=True)
    return {
        "benchmark": "registry",
        "machine": machine_facts(),
        "settings": bench.settings.to_dict(),
        "sizes": [
            {
                "size": f.size,
                "instances": f.instances,
                "answer_bytes": f.answer_bytes,
                "status": f.status,
                "grow_s": f.grow_s,
                "expired": f.expired,
                "loads": f.loads,
                "after_change_qps_1_over_mean": (
                    qps_if_always_after_change(f.loads["after change @1"].median)
                    if "after change @1" in f.loads
                    else None
                ),
                "probes": f.probes,
                "lag_metric_max_ms": f.lag_ms if bench.lag.available else None,
            }
            for f in sizes
        ],
        "growth": [
            {"label": label, "ratio": ratio, "instances_ratio": grows, "met": met}
            for label, ratio, grows, met in growth
        ],
        "comparisons": comparisons,
        "leases": {
            "kept": len(bench.keeper),
            "expired_total": bench.keeper.expired,
            "slowest_round_ms": bench.keeper.slowest_round_ms,
            "errors": bench.keeper.errors,
        },
        "watch": {
            "watchers": watch.watchers,
            "other_watchers": watch.other_watchers,
            "processes": watch.processes,
            "changes": watch.changes,
            "p50_ms": watch.p50_ms,
            "p99_ms": watch.p99_ms,
            "missing": watch.missing,
            "other_hits": watch.other_hits,
            "failed_opens": watch.failed_opens,
            "open_error": watch.open_error,
            "open_s": watch.open_s,
            "probe": watch.probe,
        },
        "rss_mb": {"idle": rss_idle, "instances": watch.instances, "by_watchers": watch.rss_mb},
        "writes": {"loads": write.loads, "rates": write.rates},
    }


# --------------------------------------------------------------------------- main


@dataclass(frozen=True, kw_only=True)
class Options:
    """This benchmark's own flags."""

    sizes: tuple[int, ...]
    size_timeout: float
    watchers: int
    other_watchers: int
    watch_processes: int
    watch_changes: int
    rss_watchers: int
    rss_instances: int


async def main_async(settings: BenchSettings, options: Options) -> dict[str, Any]:
    """Start the processes, run every part, print the report."""
    out = settings.out
    with tempfile.TemporaryDirectory(prefix="flext-bench-") as tmp:
        echo_server = await asyncio.to_thread(start_server_process, ECHO_SERVER_FACTORY)
        plane: ServeProcess | None = None
        probe: Probe | None = None
        try:
            plane = await asyncio.to_thread(ServeProcess, Path(tmp))
            probe = await asyncio.to_thread(Probe, plane.address)
            lag = await asyncio.to_thread(LagMetric, plane.metrics_url)
            await asyncio.sleep(1.0)
            rss_idle = plane.rss_mb()
            async with (
                connect(echo_server.port) as echo_channel,
                connect(int(plane.address.rsplit(":", 1)[1])) as channel,
            ):
                stub = registry_pb2_grpc.RegistryServiceStub(channel)
                bench = Bench(
                    settings=settings,
                    plane=plane,
                    echo=EchoClient(echo_channel),
                    stub=stub,
                    discover_raw=channel.unary_unary(
                        _DISCOVER_METHOD,
                        request_serializer=registry_pb2.DiscoverRequest.SerializeToString,
                    ),
                    probe=probe,
                    lag=lag,
                    keeper=LeaseKeeper(stub, LEASE_TTL_S),
                )
                await lag.start()
                try:
                    sizes = await discover_by_size(bench, options.sizes, options.size_timeout)
                    have = max((f.size for f in sizes if f.status == "ok"), default=0)
                    if options.rss_instances > have:
                        print(f"growing to {options.rss_instances:,} instances", file=out)
                        have, _ = await grow_to(bench, options.rss_instances, have)
                    print("watch fan-out:", file=out, flush=True)
                    watch = await watch_fanout(
                        bench,
                        watchers=options.watchers,
                        other_watchers=options.other_watchers,
                        processes=options.watch_processes,
                        changes=options.watch_changes,
                        rss_watchers=options.rss_watchers,
                        instances=have,
                    )
                    print("register, heartbeat and keepalive against echo:", file=out, flush=True)
                    write = await writes(bench)
                    return report(bench, sizes, watch, write, rss_idle)
                finally:
                    await lag.stop()
                    await bench.keeper.close()
        except BaseException:
            if plane is not None:
                print(f"control-plane log (tail):\n{plane.log()[-3000:]}", file=out)
            raise
        finally:
            if probe is not None:
                await asyncio.to_thread(probe.stop)
            if plane is not None:
                await asyncio.to_thread(plane.stop)
            await asyncio.to_thread(echo_server.stop)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.registry [--quick] [--json] [--sizes 10 100 1000 10000] ...``."""
    parser = bench_parser("registry benchmark")
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=None,
        help="instances of the service Discover is measured on (default 10 100 1000 10000; "
        "--quick: 10 100 1000)",
    )
    parser.add_argument(
        "--size-timeout",
        type=float,
        default=SIZE_TIMEOUT_S,
        help=f"seconds a size's loads may take before it is reported as timed out "
        f"(default {SIZE_TIMEOUT_S:g}); larger sizes are then skipped",
    )
    parser.add_argument("--watchers", type=int, default=None, help=f"default {WATCHERS}")
    parser.add_argument(
        "--other-watchers",
        type=int,
        default=None,
        help=f"watchers of another service, which must get nothing (default {OTHER_WATCHERS})",
    )
    parser.add_argument(
        "--watch-processes",
        type=int,
        default=None,
        help=f"client processes holding the Watch streams (default {WATCH_PROCESSES})",
    )
    parser.add_argument("--watch-changes", type=int, default=None, help=f"default {WATCH_CHANGES}")
    parser.add_argument(
        "--rss-instances",
        type=int,
        default=None,
        help=f"instances held when the RSS is read (default {RSS_INSTANCES}; --quick: the "
        "largest size)",
    )
    args = parser.parse_args(argv)
    if not args.quick:
        args.warmup = WARMUP_S if args.warmup is None else args.warmup
        args.duration = DURATION_S if args.duration is None else args.duration
    settings = BenchSettings.from_args(args)
    quick = settings.quick
    sizes = tuple(args.sizes or (QUICK_SIZES if quick else SIZES))
    watchers = args.watchers if args.watchers is not None else (1_000 if quick else WATCHERS)
    options = Options(
        sizes=sizes,
        size_timeout=args.size_timeout,
        watchers=watchers,
        other_watchers=(
            args.other_watchers
            if args.other_watchers is not None
            else (100 if quick else OTHER_WATCHERS)
        ),
        watch_processes=args.watch_processes or (2 if quick else WATCH_PROCESSES),
        watch_changes=args.watch_changes or (1 if quick else WATCH_CHANGES),
        rss_watchers=min(RSS_WATCHERS, watchers),
        rss_instances=(
            args.rss_instances
            if args.rss_instances is not None
            else (max(sizes) if quick else RSS_INSTANCES)
        ),
    )
    print_header("flext-mesh bench: registry (flext-mesh serve and echo in subprocesses)", settings)
    print(
        f"sizes {', '.join(f'{s:,}' for s in sizes)}; {options.watchers:,} watchers "
        f"(+{options.other_watchers:,}) over {options.watch_processes} processes; RSS at "
        f"{options.rss_instances:,} instances and {options.rss_watchers:,} watchers",
        file=settings.out,
        flush=True,
    )
    result = asyncio.run(main_async(settings, options))
    if settings.json:
        emit_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
