"""xDS benchmark: proxyless gRPC calls, push latency to 1,000 ADS clients, their cost.

One real control plane (``flext-mesh serve``, as ``bench.registry`` starts it) and one
real ``flext-sidecar`` hosting ``bench.apps:PROCESSORS`` under service ``bench``.

Calls (interleaved run by run, the same ``charge`` with the same dict payload):

- **direct**: a plain ``grpc.aio`` stub on a channel to the sidecar's address (the
  baseline: no discovery at all);
- **mesh**: ``MeshClient.call`` (Watch-fed discovery, weighted round robin, breaker,
  call reports);
- **xds**: a plain ``grpc.aio`` stub on ``xds:///bench``, in its own subprocess (gRPC
  reads GRPC_XDS_BOOTSTRAP once per process), one subprocess per run.

Push latency: ``--clients`` ADS streams (default 1,000) subscribe LDS -> RDS -> CDS ->
EDS to service ``bench-push`` and ACK every response: simulated streams
(``grpc.aio``, raw ADS, spread over a few subprocesses and channels) plus
:data:`REAL_CLIENTS` real grpcio xDS clients (``xds:///bench-push``, calling in a slow
loop). Each change registers a new instance of ``bench-push`` (a tiny server in this
process) through ``RegistryService.Register``; a simulated stream's latency is from
just before the Register call to the arrival of the EDS response carrying the new
endpoint, a real client's to the reply of its first call answered by the new instance
(an upper bound: it includes connecting to it). Target: p99 <= 1 s for 1,000 clients.

Also: the control plane's RSS with 0 and with ``--clients`` connected clients, its CPU
seconds (``/proc/PID/stat``) to connect them, idle with them connected, and per change.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

import grpc
import grpc.aio
from envoy.config.core.v3 import base_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from bench.apps import PAYLOAD
from bench.harness import (
    BenchSettings,
    Comparison,
    LoadResult,
    Repeated,
    bench_parser,
    closed_loop,
    emit_json,
    format_number,
    format_table,
    machine_facts,
    percentile,
    print_header,
    repeat_interleaved,
)
from bench.registry import ServeProcess
from bench.sidecar import SERVICE, _cpu_seconds, start_sidecar
from flext_mesh.rpc.payloads import dict_to_struct, struct_to_dict
from flext_mesh.v1 import processor_pb2, processor_pb2_grpc, registry_pb2, registry_pb2_grpc
from flext_mesh.xds.resources import CDS, EDS, LDS, RDS
from sidecar.client import MeshClient

__all__ = ["main"]

OPERATION = "charge"
PUSH_SERVICE = "bench-push"
CLIENTS = 1_000
"""ADS clients connected during the push measurement (the issue's figure)."""
REAL_CLIENTS = 2
"""Real grpcio xDS clients among them."""
SIM_PROCESSES = 2
"""Subprocesses the simulated ADS streams are spread over."""
STREAMS_PER_CHANNEL = 100
CHANGES = 10
QUICK_CHANGES = 4
PUSH_P99_TARGET_S = 1.0
DELIVERY_TIMEOUT_S = 20.0
LEASE_TTL_S = 600.0
_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
_TYPES_IN_ORDER = (LDS, RDS, CDS, EDS)


# --------------------------------------------------------------------------- children


def _child_env(bootstrap: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": _REPO_ROOT}
    if bootstrap is not None:
        env["GRPC_XDS_BOOTSTRAP"] = str(bootstrap)
    return env


def _child(*args: str, bootstrap: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.xds", "child", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=_child_env(bootstrap),
        cwd=_REPO_ROOT,
    )


def _invoke_request() -> processor_pb2.InvokeRequest:
    return processor_pb2.InvokeRequest(operation=OPERATION, payload=dict_to_struct(PAYLOAD))


async def _child_load(target: str, concurrency: int, warmup: float, duration: float) -> None:
    """A closed loop calling ``charge``; prints its LoadResult as JSON.

    ``target``: ``mesh:CONTROL_PLANE`` (a MeshClient calling service ``bench``), or a
    gRPC target for a plain stub (``xds:///bench``, or the sidecar's address).
    """
    call: Callable[[], Awaitable[object]]
    async with contextlib.AsyncExitStack() as stack:
        if target.startswith("mesh:"):
            client = MeshClient(target.removeprefix("mesh:"), caller_service="bench-client")
            await client.start()
            stack.push_async_callback(client.aclose)
            await _until(lambda: bool(client.instances(SERVICE)), 15, "sidecar discovered")

            async def call() -> object:
                return await client.call(SERVICE, OPERATION, PAYLOAD)

        else:
            channel = await stack.enter_async_context(grpc.aio.insecure_channel(target))
            stub = processor_pb2_grpc.ProcessorServiceStub(channel)
            await stub.Invoke(_invoke_request(), timeout=20, wait_for_ready=True)

            async def call() -> object:
                reply = await stub.Invoke(_invoke_request(), timeout=10)
                return struct_to_dict(reply.result)

        await call()
        result = await closed_loop(call, concurrency=concurrency, warmup=warmup, duration=duration)
    print(json.dumps(asdict(result)), flush=True)


def _child_watch(target: str) -> None:
    """A real grpcio xDS client calling every 5 ms; ``seen ID EPOCH`` per new instance."""
    stub = processor_pb2_grpc.ProcessorServiceStub(grpc.insecure_channel(target))
    request = processor_pb2.InvokeRequest(operation="ping")
    seen: set[str] = set()
    stop = threading.Event()

    def wait_for_eof() -> None:
        sys.stdin.read()
        stop.set()

    threading.Thread(target=wait_for_eof, daemon=True).start()
    first = True
    while not stop.is_set():
        try:
            reply = stub.Invoke(request, timeout=20 if first else 2, wait_for_ready=first)
        except grpc.RpcError:
            time.sleep(0.005)
            continue
        now = time.time()
        if first:
            first = False
            seen.add(reply.instance_id)
            print("ready", flush=True)
        elif reply.instance_id not in seen:
            seen.add(reply.instance_id)
            print(f"seen {reply.instance_id} {now:.6f}", flush=True)
        time.sleep(0.005)


async def _child_ads(address: str, service: str, count: int, tag: str) -> None:
    """``count`` raw ADS streams subscribing LDS -> RDS -> CDS -> EDS to ``service``.

    Prints ``ready`` once every stream has its first assignment, ``at N`` whenever
    every stream has seen an assignment of at least N endpoints; on stdin's end, one
    JSON line: per stream, the (epoch, endpoints) of each assignment received.
    """
    channels = [
        grpc.aio.insecure_channel(address) for _ in range(math.ceil(count / STREAMS_PER_CHANNEL))
    ]
    events: list[list[tuple[float, int]]] = [[] for _ in range(count)]
    latest = [0] * count
    changed = asyncio.Event()

    async def stream(index: int) -> None:
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channels[index // STREAMS_PER_CHANNEL])
        node = base_pb2.Node(
            id=f"{tag}-{index}",
            locality=base_pb2.Locality(zone="bench"),
            user_agent_name="bench.xds",
        )
        outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()

        async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
            while True:
                yield await outbox.get()

        outbox.put_nowait(
            discovery_pb2.DiscoveryRequest(node=node, type_url=LDS, resource_names=[service])
        )
        call = stub.StreamAggregatedResources(requests())
        asked = {LDS}
        async for response in call:
            now = time.time()
            outbox.put_nowait(
                discovery_pb2.DiscoveryRequest(
                    type_url=response.type_url,
                    version_info=response.version_info,
                    response_nonce=response.nonce,
                    resource_names=[service],
                )
            )
            if response.type_url == EDS:
                endpoints = 0
                for packed in response.resources:
                    assignment = endpoint_pb2.ClusterLoadAssignment()
                    packed.Unpack(assignment)
                    endpoints += sum(len(g.lb_endpoints) for g in assignment.endpoints)
                events[index].append((now, endpoints))
                latest[index] = endpoints
                changed.set()
                continue
            # The first response of a type subscribes the next one, as gRPC clients do.
            following = _TYPES_IN_ORDER[_TYPES_IN_ORDER.index(response.type_url) + 1]
            if following not in asked:
                asked.add(following)
                outbox.put_nowait(
                    discovery_pb2.DiscoveryRequest(type_url=following, resource_names=[service])
                )

    tasks = [asyncio.create_task(stream(i)) for i in range(count)]
    loop = asyncio.get_running_loop()
    eof = loop.run_in_executor(None, sys.stdin.read)
    reported = 0
    while not eof.done():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(changed.wait(), 0.05)
        changed.clear()
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        low = min(latest)
        if low > reported:
            print("ready" if reported == 0 else f"at {low}", flush=True)
            reported = low
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    print(json.dumps(events), flush=True)
    for channel in channels:
        await channel.close()


def _run_child(argv: Sequence[str]) -> int:
    mode, *rest = argv
    if mode == "load":
        target, concurrency, warmup, duration = rest
        asyncio.run(_child_load(target, int(concurrency), float(warmup), float(duration)))
    elif mode == "watch":
        _child_watch(rest[0])
    elif mode == "ads":
        address, service, count, tag = rest
        asyncio.run(_child_ads(address, service, int(count), tag))
    else:
        raise SystemExit(f"unknown child mode {mode!r}")
    return 0


# --------------------------------------------------------------------------- helpers


def _bootstrap(directory: Path, control_plane: str, node_id: str) -> Path:
    """A bootstrap file written by ``flext-mesh xds bootstrap``, as a user writes one."""
    command = Path(sys.executable).parent / "flext-mesh"
    out = subprocess.run(
        [str(command), "xds", "bootstrap", "--node-id", node_id, "--control-plane", control_plane],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout
    path = directory / f"bootstrap-{node_id}.json"
    path.write_text(out)
    return path


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class _Lines:
    """A child's stdout lines, read by a thread (its pipe never fills)."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.process = process
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        stdout: IO[str] | None = self.process.stdout
        assert stdout is not None
        for line in stdout:
            self.lines.append(line.rstrip("\n"))

    def finish(self, timeout: float = 30.0) -> list[str]:
        """Close its stdin (the child's cue to report and exit); every line it printed."""
        stdin = self.process.stdin
        if stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)
        self._thread.join(5)
        return self.lines


class _Answer(processor_pb2_grpc.ProcessorServiceServicer):
    """An instance of the push service: answers every Invoke with its id."""

    def __init__(self, instance_id: str) -> None:
        self.instance_id = instance_id

    async def Invoke(  # noqa: N802 - the RPC's name
        self, request: processor_pb2.InvokeRequest, context: Any
    ) -> processor_pb2.InvokeResponse:
        return processor_pb2.InvokeResponse(instance_id=self.instance_id)

    async def ListOperations(  # noqa: N802 - the RPC's name
        self, request: processor_pb2.ListOperationsRequest, context: Any
    ) -> processor_pb2.ListOperationsResponse:
        return processor_pb2.ListOperationsResponse()


async def _instance(instance_id: str) -> tuple[grpc.aio.Server, registry_pb2.RegisterRequest]:
    server = grpc.aio.server()
    processor_pb2_grpc.add_ProcessorServiceServicer_to_server(_Answer(instance_id), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    request = registry_pb2.RegisterRequest(
        instance=registry_pb2.ServiceInstance(
            service_name=PUSH_SERVICE,
            instance_id=instance_id,
            endpoint=f"127.0.0.1:{port}",
            health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
        )
    )
    request.ttl.FromSeconds(int(LEASE_TTL_S))
    return server, request


async def _until(done: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {within:g} s")
        await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- push


@dataclass(frozen=True, kw_only=True)
class PushFigures:
    """The push measurement: latencies (seconds) and the control plane's cost."""

    clients: int
    simulated: int
    real: int
    changes: int
    latencies_s: list[float]
    """Per simulated stream and change: Register sent -> the EDS response received."""
    real_latencies_s: list[float]
    """Per real client and change: Register sent -> first reply of the new instance."""
    connect_s: float
    """Wall time until every client had its first assignment."""
    rss_idle_mb: float
    rss_connected_mb: float
    cpu_connect_s: float
    """Control-plane CPU seconds spent connecting every client."""
    cpu_idle_per_s: float
    """Control-plane CPU seconds per second, every client connected, nothing changing."""
    cpu_per_change_s: list[float]
    """Control-plane CPU seconds from a Register to the last client's EDS, per change."""

    def summary(self, values: Sequence[float]) -> dict[str, float]:
        ordered = sorted(values)
        if not ordered:
            return {"p50": 0.0, "p99": 0.0, "max": 0.0}
        return {
            "p50": percentile(ordered, 50),
            "p99": percentile(ordered, 99),
            "max": ordered[-1],
        }


async def measure_push(
    plane: ServeProcess, directory: Path, clients: int, changes: int
) -> PushFigures:
    """Connect ``clients`` ADS clients to ``PUSH_SERVICE``, then register ``changes``
    instances one after another, timing each push."""
    servers: list[grpc.aio.Server] = []
    real = min(REAL_CLIENTS, clients)
    simulated = clients - real
    async with grpc.aio.insecure_channel(plane.address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        server, request = await _instance("push-0")
        servers.append(server)
        await stub.Register(request, timeout=10)
        await asyncio.sleep(1.0)
        rss_idle = _rss_mb(plane.pid)
        cpu = _cpu_seconds(plane.pid)
        started = time.perf_counter()
        watchers = [
            _Lines(
                _child(
                    "watch",
                    f"xds:///{PUSH_SERVICE}",
                    bootstrap=_bootstrap(directory, plane.address, f"bench-real-{i}"),
                )
            )
            for i in range(real)
        ]
        shares = [
            simulated // SIM_PROCESSES + (i < simulated % SIM_PROCESSES)
            for i in range(SIM_PROCESSES)
        ]
        sims = [
            _Lines(_child("ads", plane.address, PUSH_SERVICE, str(n), f"bench-sim-{i}"))
            for i, n in enumerate(shares)
            if n
        ]

        def level(lines: _Lines) -> int:
            for line in reversed(lines.lines):
                if line == "ready":
                    return 1
                if line.startswith("at "):
                    return int(line.split()[1])
            return 0

        def seen(lines: _Lines) -> set[str]:
            return {line.split()[1] for line in lines.lines if line.startswith("seen ")}

        children = [*watchers, *sims]
        try:
            await _until(
                lambda: (
                    all(level(s) >= 1 for s in sims) and all("ready" in w.lines for w in watchers)
                ),
                120,
                f"{clients} xDS clients connected",
            )
            connect_s = time.perf_counter() - started
            cpu_connect = _cpu_seconds(plane.pid) - cpu
            await asyncio.sleep(1.0)
            rss_connected = _rss_mb(plane.pid)
            cpu = _cpu_seconds(plane.pid)
            await asyncio.sleep(2.0)
            cpu_idle = (_cpu_seconds(plane.pid) - cpu) / 2.0
            sent: list[float] = []
            cpu_per_change: list[float] = []
            for k in range(1, changes + 1):
                server, request = await _instance(f"push-{k}")
                servers.append(server)
                cpu = _cpu_seconds(plane.pid)
                sent.append(time.time())
                await stub.Register(request, timeout=10)
                await _until(
                    lambda k=k: (
                        all(level(s) >= k + 1 for s in sims)  # type: ignore[misc]
                        and all(f"push-{k}" in seen(w) for w in watchers)
                    ),
                    DELIVERY_TIMEOUT_S,
                    f"change {k} delivered to every client",
                )
                cpu_per_change.append(_cpu_seconds(plane.pid) - cpu)
                await asyncio.sleep(0.3)
        finally:
            outputs = [await asyncio.to_thread(child.finish) for child in children]
            for server in servers:
                await server.stop(0)
    latencies: list[float] = []
    for lines in outputs[real:]:
        streams: list[list[list[float]]] = json.loads(lines[-1])
        for events in streams:
            for k, moment in enumerate(sent, start=1):
                arrived = next((t for t, n in events if n >= k + 1), None)
                if arrived is not None:
                    latencies.append(arrived - moment)
    real_latencies: list[float] = []
    for lines in outputs[:real]:
        first_seen = {
            line.split()[1]: float(line.split()[2]) for line in lines if line.startswith("seen ")
        }
        for k, moment in enumerate(sent, start=1):
            if f"push-{k}" in first_seen:
                real_latencies.append(first_seen[f"push-{k}"] - moment)
    return PushFigures(
        clients=clients,
        simulated=simulated,
        real=real,
        changes=changes,
        latencies_s=latencies,
        real_latencies_s=real_latencies,
        connect_s=connect_s,
        rss_idle_mb=rss_idle,
        rss_connected_mb=rss_connected,
        cpu_connect_s=cpu_connect,
        cpu_idle_per_s=cpu_idle,
        cpu_per_change_s=cpu_per_change,
    )


# --------------------------------------------------------------------------- calls


async def _child_loop(
    target: str, concurrency: int, warmup: float, duration: float, bootstrap: Path
) -> LoadResult:
    """:func:`_child_load` in a fresh subprocess (each client pays the same process)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "bench.xds",
        "child",
        "load",
        target,
        str(concurrency),
        str(warmup),
        str(duration),
        stdout=asyncio.subprocess.PIPE,
        env=_child_env(bootstrap),
        cwd=_REPO_ROOT,
    )
    out, _ = await process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"the client for {target} exited with {process.returncode}")
    return LoadResult(**json.loads(out.decode().splitlines()[-1]))


async def measure_calls(
    settings: BenchSettings, plane: ServeProcess, directory: Path
) -> dict[str, Repeated[LoadResult]]:
    """direct, mesh and xds calls to one sidecar, at 1 and 64 in flight, interleaved;
    every client in its own subprocess."""
    sidecar = await asyncio.to_thread(start_sidecar, plane.address)
    bootstrap = _bootstrap(directory, plane.address, "bench-calls")
    targets = {
        "direct": f"127.0.0.1:{sidecar.port}",
        "mesh": f"mesh:{plane.address}",
        "xds": f"xds:///{SERVICE}",
    }

    def load(name: str, concurrency: int) -> Callable[[], Awaitable[LoadResult]]:
        async def run() -> LoadResult:
            return await _child_loop(
                targets[name], concurrency, settings.warmup, settings.duration, bootstrap
            )

        return run

    try:
        return await repeat_interleaved(
            {f"{name} @{n}": load(name, n) for n in (1, 64) for name in targets},
            settings.runs,
            on_run=lambda i, name, r: print(
                f"run {i + 1}/{settings.runs} {name:>10}: {format_number(r.qps)} qps "
                f"p50 {format_number(r.p50_us)} us errors {r.errors}"
                + (f" ({r.error_sample})" if r.error_sample else ""),
                file=settings.out,
                flush=True,
            ),
        )
    finally:
        await asyncio.to_thread(sidecar.stop)


# --------------------------------------------------------------------------- main


async def main_async(settings: BenchSettings, clients: int, changes: int) -> dict[str, Any]:
    """Start the control plane, measure the push, then the calls; print and return."""
    out = settings.out
    with tempfile.TemporaryDirectory(prefix="flext-bench-xds-") as tmp:
        directory = Path(tmp)
        plane = await asyncio.to_thread(ServeProcess, directory)
        try:
            push = await measure_push(plane, directory, clients, changes)
            calls = await measure_calls(settings, plane, directory)
        finally:
            await asyncio.to_thread(plane.stop)

    m = {name: repeated.median for name, repeated in calls.items()}
    rows = [
        [
            name,
            format_number(r.qps),
            format_number(r.p50_us),
            format_number(r.p90_us),
            format_number(r.p99_us),
            str(r.errors),
        ]
        for name, r in m.items()
    ]
    print(file=out)
    print(
        format_table(["load (median)", "qps", "p50 µs", "p90 µs", "p99 µs", "errors"], rows),
        file=out,
    )
    comparisons = [
        Comparison(
            label=f"{name} p50 @1",
            candidate=m[f"{name} @1"].p50_us,
            baseline=m["direct @1"].p50_us,
            baseline_label="direct",
            higher_is_better=False,
            unit="µs",
        )
        for name in ("xds", "mesh")
    ] + [
        Comparison(
            label=f"{name} qps @64",
            candidate=m[f"{name} @64"].qps,
            baseline=m["direct @64"].qps,
            baseline_label="direct",
        )
        for name in ("xds", "mesh")
    ]
    comparisons.append(
        Comparison(
            label="xds qps @64",
            candidate=m["xds @64"].qps,
            baseline=m["mesh @64"].qps,
            baseline_label="mesh",
        )
    )
    print(file=out)
    for comparison in comparisons:
        print(comparison, file=out)
    sim = push.summary(push.latencies_s)
    real = push.summary(push.real_latencies_s)
    verdict = "met" if sim["p99"] <= PUSH_P99_TARGET_S else "MISSED"
    print(
        f"push latency, {push.clients:,} ADS clients ({push.simulated:,} simulated streams, "
        f"{push.real} real grpcio clients), {push.changes} changes (a new instance each): "
        f"simulated p50 {sim['p50'] * 1000:.0f} ms, p99 {sim['p99'] * 1000:.0f} ms, "
        f"max {sim['max'] * 1000:.0f} ms over {len(push.latencies_s):,} deliveries "
        f"(target p99 <= {PUSH_P99_TARGET_S:g} s: {verdict}); real clients' first call to "
        f"the new instance p50 {real['p50'] * 1000:.0f} ms, max {real['max'] * 1000:.0f} ms",
        file=out,
    )
    per_change = statistics.median(push.cpu_per_change_s) if push.cpu_per_change_s else 0.0
    print(
        f"control plane with {push.clients:,} xDS clients: RSS {push.rss_idle_mb:.1f} MB "
        f"with none -> {push.rss_connected_mb:.1f} MB "
        f"(+{push.rss_connected_mb - push.rss_idle_mb:.1f} MB); CPU {push.cpu_connect_s:.2f} s "
        f"to connect them ({push.connect_s:.1f} s wall), {push.cpu_idle_per_s * 1000:.0f} ms/s "
        f"idle, {per_change * 1000:.0f} ms per change (median)",
        file=out,
        flush=True,
    )
    return {
        "benchmark": "xds",
        "machine": machine_facts(),
        "settings": settings.to_dict(),
        "figures": calls,
        "comparisons": comparisons,
        "push": {
            **asdict(push),
            "simulated_summary_s": sim,
            "real_summary_s": real,
            "p99_target_s": PUSH_P99_TARGET_S,
        },
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m bench.xds [--quick] [--json] [--clients N] [--changes N]``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["child"]:
        return _run_child(argv[1:])
    parser = bench_parser(
        "xDS benchmark: xds:/// calls vs MeshClient vs direct; push latency and cost "
        "with many ADS clients"
    )
    parser.add_argument(
        "--clients", type=int, default=CLIENTS, help=f"ADS clients connected (default {CLIENTS})"
    )
    parser.add_argument(
        "--changes",
        type=int,
        default=None,
        help=f"instances registered one by one (default {CHANGES}, --quick {QUICK_CHANGES})",
    )
    args = parser.parse_args(argv)
    settings = BenchSettings.from_args(args)
    changes = args.changes or (QUICK_CHANGES if settings.quick else CHANGES)
    if args.clients < 1 or changes < 1:
        raise SystemExit("--clients and --changes must be >= 1")
    print_header(
        "flext-mesh bench: xds (xds:/// vs MeshClient vs direct; push to many ADS clients)",
        settings,
    )
    result = asyncio.run(main_async(settings, args.clients, changes))
    if settings.json:
        emit_json(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
