"""A small, reusable benchmark harness for flext-mesh.

Every benchmark in ``bench/`` is built from the same pieces:

- **Load**: :func:`closed_loop` drives ``concurrency`` workers that each await an
  ``async`` call back to back (a closed loop), discards a warm-up, and measures QPS and
  p50/p90/p99 latency over a fixed period. :func:`measure_rate` measures items per
  second for streams and bulk work.
- **Repetition**: :func:`repeat` / :func:`repeat_interleaved` run a measurement several
  times and keep the per-figure median (:class:`Repeated`); interleaving alternates the
  baseline and the candidate so that drift on a shared machine hits both alike.
- **Reporting**: :class:`Comparison` prints a candidate beside the baseline measured in
  the same run, the ratio, and whether a target ratio was met; :func:`format_table`,
  :func:`print_header` and :func:`emit_json` give every benchmark the same output.
- **CLI**: :func:`bench_parser` + :meth:`BenchSettings.from_args` give every benchmark
  ``--runs``, ``--warmup``, ``--duration``, ``--json`` and ``--quick``.
- **Baseline**: a raw-bytes ``grpc.aio`` echo server (``/bench.Echo/Unary`` and
  ``/bench.Echo/Stream``, no protobuf) started in-process with :func:`start_echo_server`
  or in a child process with :func:`start_server_process` and
  :data:`ECHO_SERVER_FACTORY`; :class:`EchoClient` calls it.
- **Server processes**: :func:`start_server_process` starts any importable async server
  factory (``"package.module:function"``) in a spawned child process and returns a
  :class:`ServerProcess` handle carrying the port. The child stops when the handle is
  stopped and also when the parent process dies (it watches a pipe to the parent).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib
import inspect
import json
import math
import multiprocessing
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TextIO, TypeVar

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2

if TYPE_CHECKING:
    from multiprocessing.process import BaseProcess

    from _typeshed import DataclassInstance

__all__ = [
    "CAVEAT",
    "DEFAULT_DURATION",
    "DEFAULT_RUNS",
    "DEFAULT_WARMUP",
    "ECHO_SERVER_FACTORY",
    "ECHO_SERVICE",
    "QUICK_DURATION",
    "QUICK_RUNS",
    "QUICK_WARMUP",
    "STREAM_FOREVER",
    "STREAM_METHOD",
    "UNARY_METHOD",
    "UNLIMITED",
    "BenchSettings",
    "CommandProcess",
    "Comparison",
    "EchoClient",
    "LoadResult",
    "RateResult",
    "Repeated",
    "ServerProcess",
    "bench_parser",
    "closed_loop",
    "connect",
    "decode_stream_request",
    "emit_json",
    "encode_stream_request",
    "format_number",
    "format_table",
    "free_port",
    "load_factory",
    "load_result_from_samples",
    "machine_facts",
    "measure_rate",
    "median_of",
    "percentile",
    "print_header",
    "repeat",
    "repeat_interleaved",
    "start_command_process",
    "start_echo_server",
    "start_server_process",
    "to_jsonable",
]

DEFAULT_RUNS = 3
"""Runs per figure; the reported figure is the median of these."""
DEFAULT_WARMUP = 1.5
"""Seconds of load discarded before measuring (connection set-up, caches, allocator)."""
DEFAULT_DURATION = 5.0
"""Seconds of measured load per run."""
QUICK_RUNS = 1
"""``--quick``: one run, for smoke tests; its figures are not worth quoting."""
QUICK_WARMUP = 0.2
"""``--quick``: warm-up seconds."""
QUICK_DURATION = 0.5
"""``--quick``: measured seconds."""
UNLIMITED: dict[str, Any] = {
    "rate_limit_writes": 0,
    "rate_limit_reports": 0,
    "max_instances_per_service": 1_000_000,
    "max_watchers_per_client": 100_000,
}
"""ServerConfig settings that lift the per-client limits for a load generator, which
stands for many clients (or their limit is what the benchmark would measure)."""

CAVEAT = (
    "Figures are medians of runs on a shared, noisy 2-core machine where client and server "
    "share the cores; runs vary by +/-10-20%. Only ratios taken within one run are "
    "comparable: never compare absolute figures across runs or machines."
)
"""Printed under every benchmark's header."""

_NS_PER_S = 1_000_000_000
_NS_PER_US = 1_000

R = TypeVar("R", bound="DataclassInstance")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, kw_only=True)
class LoadResult:
    """One closed-loop measurement: throughput and latency of successful calls."""

    concurrency: int
    """Calls kept in flight (one per worker)."""
    duration_s: float
    """Length of the measured window in seconds (warm-up excluded)."""
    count: int
    """Successful calls that completed inside the measured window."""
    errors: int
    """Calls that raised and completed inside the measured window."""
    qps: float
    """``count / duration_s``."""
    p50_us: float
    """Median latency of the successful calls, in microseconds."""
    p90_us: float
    """90th percentile latency, in microseconds."""
    p99_us: float
    """99th percentile latency, in microseconds."""
    mean_us: float
    """Mean latency, in microseconds."""
    error_sample: str | None = None
    """``repr`` of the first error seen in the window, for diagnosis."""


@dataclass(frozen=True, kw_only=True)
class RateResult:
    """One rate measurement: items processed per second over the measured window."""

    items: int
    """Items counted in the measured call (messages, records, ...)."""
    duration_s: float
    """Wall time of the measured call in seconds, taken by the harness."""
    rate: float
    """``items / duration_s``."""


@dataclass(frozen=True)
class Repeated(Generic[R]):
    """The runs of one measurement and their per-figure median."""

    runs: tuple[R, ...]
    """Every run, in order."""
    median: R
    """Per-field median of :attr:`runs` (see :func:`median_of`)."""

    @classmethod
    def from_runs(cls, runs: Sequence[R]) -> Repeated[R]:
        """Bundle ``runs`` with their median."""
        return cls(tuple(runs), median_of(runs))

    def spread(self, name: str) -> tuple[float, float]:
        """Lowest and highest value of the numeric field ``name`` across the runs."""
        values = [float(getattr(run, name)) for run in self.runs]
        return min(values), max(values)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: ``{"median": {...}, "runs": [{...}, ...]}``."""
        return {
            "median": dataclasses.asdict(self.median),
            "runs": [dataclasses.asdict(run) for run in self.runs],
        }


# --------------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of already sorted values, linearly interpolated.

    Matches numpy's default (``linear``) method. Raises ``ValueError`` when empty.
    """
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be within [0, 100], got {q}")
    rank = (len(sorted_values) - 1) * q / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    fraction = rank - low
    return (
        float(sorted_values[low])
        + (float(sorted_values[high]) - float(sorted_values[low])) * fraction
    )


def load_result_from_samples(
    latencies_ns: Sequence[int],
    *,
    concurrency: int,
    duration_s: float,
    errors: int = 0,
    error_sample: str | None = None,
) -> LoadResult:
    """Summarize per-call latencies (nanoseconds) measured over ``duration_s`` seconds.

    Latency figures are 0.0 when there is no successful call (e.g. every call failed).
    """
    if duration_s <= 0:
        raise ValueError(f"duration_s must be positive, got {duration_s}")
    ordered = sorted(latencies_ns)
    count = len(ordered)
    if count:
        p50, p90, p99 = (percentile(ordered, q) / _NS_PER_US for q in (50, 90, 99))
        mean = sum(ordered) / count / _NS_PER_US
    else:
        p50 = p90 = p99 = mean = 0.0
    return LoadResult(
        concurrency=concurrency,
        duration_s=duration_s,
        count=count,
        errors=errors,
        qps=count / duration_s,
        p50_us=p50,
        p90_us=p90,
        p99_us=p99,
        mean_us=mean,
        error_sample=error_sample,
    )


def median_of(results: Sequence[R]) -> R:
    """Per-field median of dataclass results of one type.

    ``int`` fields take the median rounded to an int, ``float`` fields the median;
    other fields (``str``, ``None``, ``bool``) take the first non-``None`` value.
    """
    if not results:
        raise ValueError("median of no results")
    first = results[0]
    changes: dict[str, Any] = {}
    for f in dataclasses.fields(first):
        values = [getattr(result, f.name) for result in results]
        numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        if numeric and all(isinstance(v, int) for v in values):
            changes[f.name] = round(statistics.median(values))
        elif numeric:
            changes[f.name] = float(statistics.median(values))
        else:
            changes[f.name] = next((v for v in values if v is not None), None)
    return dataclasses.replace(first, **changes)


# --------------------------------------------------------------------------- load


async def closed_loop(
    call: Callable[[], Awaitable[object]],
    *,
    concurrency: int = 1,
    warmup: float = DEFAULT_WARMUP,
    duration: float = DEFAULT_DURATION,
    grace: float = 5.0,
) -> LoadResult:
    """Run a closed-loop load and measure it.

    ``concurrency`` workers each await ``call()`` back to back. The first ``warmup``
    seconds are discarded; calls completing within the next ``duration`` seconds are
    measured (latency from ``perf_counter_ns`` around each call). Workers start no call
    after the window ends; calls still running ``grace`` seconds later are cancelled,
    so the load always stops by itself. An exception from ``call()`` counts as an error
    and the worker goes on; it is never re-raised.
    """
    if concurrency < 1:
        raise ValueError(f"concurrency must be >= 1, got {concurrency}")
    if duration <= 0 or warmup < 0 or grace < 0:
        raise ValueError("duration must be > 0, warmup and grace >= 0")
    clock = time.perf_counter_ns
    window_start = clock() + int(warmup * _NS_PER_S)
    window_end = window_start + int(duration * _NS_PER_S)
    latencies: list[int] = []
    errors = 0
    error_sample: str | None = None

    async def worker() -> None:
        nonlocal errors, error_sample
        while True:
            started = clock()
            if started >= window_end:
                return
            try:
                await call()
            except Exception as exc:
                finished = clock()
                if window_start <= finished < window_end:
                    errors += 1
                    if error_sample is None:
                        error_sample = repr(exc)
                await asyncio.sleep(0)  # a call failing without suspending must not starve others
                continue
            finished = clock()
            if window_start <= finished < window_end:
                latencies.append(finished - started)

    tasks = [asyncio.create_task(worker()) for _ in range(concurrency)]
    try:
        await asyncio.wait(tasks, timeout=max(0, window_end - clock()) / _NS_PER_S + grace)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return load_result_from_samples(
        latencies,
        concurrency=concurrency,
        duration_s=duration,
        errors=errors,
        error_sample=error_sample,
    )


async def measure_rate(
    run_for: Callable[[float], Awaitable[int]],
    *,
    warmup: float = DEFAULT_WARMUP,
    duration: float = DEFAULT_DURATION,
) -> RateResult:
    """Measure items per second of ``run_for(seconds) -> items``.

    ``run_for(warmup)`` is awaited first and discarded; then ``run_for(duration)`` is
    timed by the harness (its own set-up included, so the figure never flatters it).
    ``run_for`` is expected to stop by itself after about ``seconds``.
    """
    if duration <= 0 or warmup < 0:
        raise ValueError("duration must be > 0 and warmup >= 0")
    if warmup > 0:
        await run_for(warmup)
    started = time.perf_counter()
    items = await run_for(duration)
    elapsed = time.perf_counter() - started
    return RateResult(items=items, duration_s=elapsed, rate=items / elapsed if elapsed else 0.0)


async def repeat(
    measure: Callable[[], Awaitable[R]],
    n_runs: int = DEFAULT_RUNS,
    *,
    on_run: Callable[[int, R], None] | None = None,
) -> Repeated[R]:
    """Await ``measure()`` ``n_runs`` times; keep every run and the per-figure median.

    ``on_run(index, result)`` is called after each run (e.g. to print progress).
    """
    if n_runs < 1:
        raise ValueError(f"n_runs must be >= 1, got {n_runs}")
    runs: list[R] = []
    for index in range(n_runs):
        result = await measure()
        runs.append(result)
        if on_run is not None:
            on_run(index, result)
    return Repeated.from_runs(runs)


async def repeat_interleaved(
    measures: Mapping[str, Callable[[], Awaitable[R]]],
    n_runs: int = DEFAULT_RUNS,
    *,
    on_run: Callable[[int, str, R], None] | None = None,
) -> dict[str, Repeated[R]]:
    """Like :func:`repeat` for several measurements, alternating them run by run.

    Run 1 measures every entry in order, then run 2, and so on, so that a slow spell
    on a shared machine affects the baseline and the candidate alike.
    """
    if n_runs < 1:
        raise ValueError(f"n_runs must be >= 1, got {n_runs}")
    runs: dict[str, list[R]] = {name: [] for name in measures}
    for index in range(n_runs):
        for name, measure in measures.items():
            result = await measure()
            runs[name].append(result)
            if on_run is not None:
                on_run(index, name, result)
    return {name: Repeated.from_runs(results) for name, results in runs.items()}


# --------------------------------------------------------------------------- reporting


def format_number(value: float) -> str:
    """Thousands separators; no decimals from 100 up, two below (ratios, small rates)."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:,.2f}"


@dataclass(frozen=True, kw_only=True)
class Comparison:
    """A candidate figure beside its baseline measured in the same run, and the ratio.

    ``str()`` gives e.g.
    ``discover qps @64: 4,812 vs echo 5,301 -> 0.91x (target >= 0.80x: met)``.
    """

    label: str
    """What is compared, e.g. ``"discover qps @64"``."""
    candidate: float
    """The figure under test."""
    baseline: float
    """The baseline figure, measured in the same run."""
    baseline_label: str = "echo"
    """Name of the baseline, e.g. ``"echo"`` or ``"direct call"``."""
    target: float | None = None
    """Target ratio ``candidate / baseline``; ``None`` for an informational ratio."""
    higher_is_better: bool = True
    """True for throughput (target is a floor), False for latency (target is a ceiling)."""
    unit: str = ""
    """Unit appended to both figures, e.g. ``"µs"``."""

    @property
    def ratio(self) -> float:
        """``candidate / baseline`` (``inf`` when the baseline is 0)."""
        return self.candidate / self.baseline if self.baseline else math.inf

    @property
    def met(self) -> bool | None:
        """Whether the target is met; ``None`` without a target."""
        if self.target is None:
            return None
        if self.higher_is_better:
            return self.ratio >= self.target
        return self.ratio <= self.target

    def __str__(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        text = (
            f"{self.label}: {format_number(self.candidate)}{unit} vs {self.baseline_label} "
            f"{format_number(self.baseline)}{unit} -> {self.ratio:.2f}x"
        )
        if self.target is None:
            return text
        sign = ">=" if self.higher_is_better else "<="
        verdict = "met" if self.met else "MISSED"
        return f"{text} (target {sign} {self.target:.2f}x: {verdict})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form, with the ratio and verdict."""
        return {
            **dataclasses.asdict(self),
            "ratio": self.ratio,
            "met": self.met,
            "text": str(self),
        }


def format_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    width = len(headers)
    if any(len(row) != width for row in rows):
        raise ValueError("every row must have as many cells as there are headers")
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]

    def line(cells: Sequence[str]) -> str:
        parts = [
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def machine_facts() -> dict[str, Any]:
    """Facts that explain a figure: cores, Python, grpcio, platform, load at the start."""
    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "grpcio": grpc.__version__,
        "platform": platform.platform(terse=True),
        "machine": platform.machine(),
        "loadavg": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
    }


def print_header(title: str, settings: BenchSettings, *, file: TextIO | None = None) -> None:
    """Print the benchmark's title, the machine facts, the settings and :data:`CAVEAT`."""
    out = file if file is not None else settings.out
    facts = machine_facts()
    print(title, file=out)
    print(
        f"machine: {facts['cores']} cores (os.cpu_count), {facts['implementation']} "
        f"{facts['python']}, grpcio {facts['grpcio']}, {facts['platform']}",
        file=out,
    )
    if facts["loadavg"] is not None:
        load = ", ".join(f"{x:.2f}" for x in facts["loadavg"])
        print(f"load average (1, 5, 15 min) before the run: {load}", file=out)
    print(
        f"method: median of {settings.runs} run(s) of {settings.duration:g} s "
        f"after {settings.warmup:g} s warm-up" + (" [--quick]" if settings.quick else ""),
        file=out,
    )
    print(f"caveat: {CAVEAT}", file=out)
    print(file=out, flush=True)


def to_jsonable(value: Any) -> Any:
    """Convert results (dataclasses, :class:`Repeated`, :class:`Comparison`) to JSON types."""
    if isinstance(value, Repeated | Comparison):
        return value.to_dict()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: to_jsonable(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def emit_json(payload: Mapping[str, Any], *, file: TextIO | None = None) -> None:
    """Print ``payload`` as one JSON object on one line (stdout by default)."""
    print(json.dumps(to_jsonable(payload), sort_keys=False), file=file or sys.stdout, flush=True)


# --------------------------------------------------------------------------- CLI


@dataclass(frozen=True, kw_only=True)
class BenchSettings:
    """The settings every benchmark shares, from :func:`bench_parser`'s flags."""

    runs: int = DEFAULT_RUNS
    """Runs per figure (``--runs``); figures are medians of these."""
    warmup: float = DEFAULT_WARMUP
    """Warm-up seconds discarded before each measurement (``--warmup``)."""
    duration: float = DEFAULT_DURATION
    """Measured seconds per run (``--duration``)."""
    json: bool = False
    """``--json``: stdout gets only one JSON object at the end; human output -> stderr."""
    quick: bool = False
    """``--quick``: short settings for smoke tests (explicit flags still win)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> BenchSettings:
        """Resolve the parsed flags: explicit values win, then ``--quick``, then defaults."""
        quick = bool(args.quick)

        def pick(value: Any, quick_value: Any, default: Any) -> Any:
            if value is not None:
                return value
            return quick_value if quick else default

        settings = cls(
            runs=int(pick(args.runs, QUICK_RUNS, DEFAULT_RUNS)),
            warmup=float(pick(args.warmup, QUICK_WARMUP, DEFAULT_WARMUP)),
            duration=float(pick(args.duration, QUICK_DURATION, DEFAULT_DURATION)),
            json=bool(args.json),
            quick=quick,
        )
        if settings.runs < 1 or settings.duration <= 0 or settings.warmup < 0:
            raise SystemExit("--runs must be >= 1, --duration > 0, --warmup >= 0")
        return settings

    @property
    def out(self) -> TextIO:
        """Where human-readable output goes: stderr under ``--json``, else stdout."""
        return sys.stderr if self.json else sys.stdout

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return dataclasses.asdict(self)


def bench_parser(description: str) -> argparse.ArgumentParser:
    """An ``ArgumentParser`` with the shared flags; add a benchmark's own flags to it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--runs", type=int, default=None, help=f"runs per figure (default {DEFAULT_RUNS})"
    )
    parser.add_argument(
        "--warmup",
        type=float,
        default=None,
        help=f"warm-up seconds discarded per run (default {DEFAULT_WARMUP})",
    )
    parser.add_argument(
        "--duration",
        type=float,
        default=None,
        help=f"measured seconds per run (default {DEFAULT_DURATION})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object with all results on stdout at the end "
        "(human-readable output goes to stderr)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke-test settings: {QUICK_RUNS} run of {QUICK_DURATION} s "
        f"after {QUICK_WARMUP} s warm-up",
    )
    return parser


# --------------------------------------------------------------------------- echo baseline

ECHO_SERVICE = "bench.Echo"
"""Service name of the raw-bytes echo baseline."""
UNARY_METHOD = f"/{ECHO_SERVICE}/Unary"
"""Unary echo: responds with the request bytes."""
STREAM_METHOD = f"/{ECHO_SERVICE}/Stream"
"""Server stream: request is :func:`encode_stream_request`; sends ``count`` messages."""
CHAT_METHOD = f"/{ECHO_SERVICE}/Chat"
"""Bidirectional stream: answers each request message with its bytes (read, write)."""
STREAM_FOREVER = 0
"""``count`` meaning: stream until the client cancels."""
ECHO_SERVER_FACTORY = "bench.harness:start_echo_server"
"""Factory path of the echo server, for :func:`start_server_process`."""

_STREAM_REQUEST = struct.Struct("!QI")


def encode_stream_request(count: int, size: int) -> bytes:
    """Request bytes for ``/bench.Echo/Stream``: ``count`` messages of ``size`` bytes."""
    return _STREAM_REQUEST.pack(count, size)


def decode_stream_request(request: bytes) -> tuple[int, int]:
    """Inverse of :func:`encode_stream_request`: ``(count, size)``."""
    count, size = _STREAM_REQUEST.unpack(request)
    return int(count), int(size)


async def _echo_unary(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    return request


async def _echo_stream(
    request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    count, size = decode_stream_request(request)
    payload = b"x" * size
    if count == STREAM_FOREVER:
        while True:
            yield payload
    for _ in range(count):
        yield payload


async def _echo_chat(
    request_iterator: Any, context: grpc.aio.ServicerContext[bytes, bytes]
) -> None:
    # context.read / context.write, as the control plane's KeepAlive does.
    while True:
        request: Any = await context.read()
        if request is grpc.aio.EOF:
            return
        await context.write(request)


def _echo_handler() -> grpc.GenericRpcHandler:
    # request_deserializer / response_serializer left None: handlers see raw bytes.
    return grpc.method_handlers_generic_handler(
        ECHO_SERVICE,
        {
            "Unary": grpc.unary_unary_rpc_method_handler(_echo_unary),
            "Stream": grpc.unary_stream_rpc_method_handler(_echo_stream),
            "Chat": grpc.stream_stream_rpc_method_handler(_echo_chat),
        },
    )


async def start_echo_server(
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    options: Sequence[tuple[str, Any]] | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start the raw-bytes echo server in the running loop; return it and its port.

    Stop it with ``await server.stop(grace)``. Also usable as a subprocess factory via
    :data:`ECHO_SERVER_FACTORY`.
    """
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((_echo_handler(),))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


@contextlib.asynccontextmanager
async def connect(
    port: int,
    *,
    host: str = "127.0.0.1",
    ready_timeout: float = 10.0,
    options: Sequence[tuple[str, Any]] | None = None,
) -> AsyncIterator[grpc.aio.Channel]:
    """An insecure ``grpc.aio`` channel to ``host:port``, ready before it is yielded."""
    channel = grpc.aio.insecure_channel(f"{host}:{port}", options=options)
    try:
        await asyncio.wait_for(channel.channel_ready(), ready_timeout)
        yield channel
    finally:
        await channel.close(grace=None)


class EchoClient:
    """Raw-bytes client of the echo baseline over an existing channel."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        """Bind the echo methods on ``channel`` (no serializers: bytes in, bytes out)."""
        self.unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            UNARY_METHOD
        )
        """``await client.unary(payload)`` returns ``payload``."""
        self._stream: grpc.aio.UnaryStreamMultiCallable[bytes, bytes] = channel.unary_stream(
            STREAM_METHOD
        )

        self._chat: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = channel.stream_stream(
            CHAT_METHOD
        )

    async def chat_for(self, seconds: float, *, size: int = 40, window: int = 32) -> int:
        """Request/response messages on one bidirectional stream in ``seconds``, up to
        ``window`` requests in flight (how a KeepAlive client pipelines renewals)."""
        call = self._chat()
        request = b"x" * size
        slots = asyncio.Semaphore(window)
        deadline = time.perf_counter() + seconds

        async def writer() -> None:
            while time.perf_counter() < deadline:
                await slots.acquire()
                await call.write(request)
            await call.done_writing()

        answered = 0
        task = asyncio.create_task(writer())
        try:
            while time.perf_counter() < deadline:
                reply = await call.read()
                if reply is grpc.aio.EOF:
                    break
                answered += 1
                slots.release()
        finally:
            call.cancel()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return answered

    def stream(self, count: int, size: int) -> grpc.aio.UnaryStreamCall[bytes, bytes]:
        """Open a server stream of ``count`` messages of ``size`` bytes (0: until cancel)."""
        return self._stream(encode_stream_request(count, size))

    async def read_stream_for(self, seconds: float, *, size: int = 64) -> int:
        """Read one endless server stream for ``seconds``; return the messages received."""
        call = self.stream(STREAM_FOREVER, size)
        deadline = time.perf_counter() + seconds
        received = 0
        try:
            while True:
                message = await call.read()
                if message is grpc.aio.EOF:
                    break
                received += 1
                if time.perf_counter() >= deadline:
                    break
        finally:
            call.cancel()
        return received


# --------------------------------------------------------------------------- server processes


def load_factory(path: str) -> Callable[..., Any]:
    """Import ``"package.module:attribute"`` and return the attribute (a callable)."""
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ValueError(f"factory path must look like 'package.module:function', got {path!r}")
    target: Any = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{path!r} is not callable")
    return target  # type: ignore[no-any-return]


class ServerProcess:
    """Handle on a server running in a child process (see :func:`start_server_process`).

    Use as ``with`` / ``async with`` or call :meth:`stop`. The child also stops by
    itself when this process dies, because it watches the pipe to us for EOF.
    """

    def __init__(self, process: BaseProcess, conn: Connection, port: int) -> None:
        """Wrap a started child ``process``, our end of its pipe, and its port."""
        self.process = process
        """The ``multiprocessing`` process object."""
        self.port = port
        """The port the child's server listens on (127.0.0.1 unless the factory says so)."""
        self._conn = conn

    @property
    def pid(self) -> int | None:
        """The child's process id."""
        return self.process.pid

    def stop(self, timeout: float = 5.0) -> None:
        """Ask the child to stop its server and exit; terminate, then kill, if it lingers."""
        if not self._conn.closed:
            with contextlib.suppress(OSError, ValueError):
                self._conn.send("stop")
            self._conn.close()
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(2.0)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2.0)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> ServerProcess:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)


class CommandProcess:
    """Handle on a real command (``flext-sidecar ...``) serving gRPC on ``port``.

    What a user runs, measured as they would run it: its memory and CPU are its own,
    not those of a benchmark module imported into a child. Stopped with SIGTERM (the
    command's own graceful shutdown), then killed if it lingers.
    """

    def __init__(self, process: subprocess.Popen[bytes], port: int) -> None:
        """Wrap a started ``process`` and the port it serves on (127.0.0.1)."""
        self.process = process
        self.port = port

    @property
    def pid(self) -> int | None:
        """The command's process id."""
        return self.process.pid

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, wait up to ``timeout`` s, then kill."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5.0)


def free_port() -> int:
    """A loopback port nothing listens on right now (for a command's ``--listen``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_command_process(
    argv: Sequence[str],
    port: int,
    *,
    cwd: str | None = None,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 30.0,
) -> CommandProcess:
    """Run ``argv`` (which serves gRPC on 127.0.0.1:``port``) until it is SERVING.

    Readiness is the standard ``grpc.health.v1.Health/Check`` (overall status) answering
    SERVING; blocks, so call it through ``asyncio.to_thread`` from async code. Raises
    ``RuntimeError`` if it exits or is not ready in time.
    """
    # Its log lines (warnings and worse, on stderr) stay in the benchmark's output.
    process = subprocess.Popen(
        list(argv),
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        env=None if env is None else {**os.environ, **env},
    )
    handle = CommandProcess(process, port)
    request = health_pb2.HealthCheckRequest()
    deadline = time.monotonic() + startup_timeout
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            check = channel.unary_unary(
                "/grpc.health.v1.Health/Check",
                request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
                response_deserializer=health_pb2.HealthCheckResponse.FromString,
            )
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{argv[0]} exited with {process.returncode}")
                with contextlib.suppress(grpc.RpcError):
                    if check(request, timeout=1.0).status == health_pb2.HealthCheckResponse.SERVING:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{argv[0]} was not SERVING within {startup_timeout} s")
                time.sleep(0.1)
    except BaseException:
        handle.stop(timeout=2.0)
        raise
    return handle


def start_server_process(
    factory: str,
    *,
    kwargs: Mapping[str, Any] | None = None,
    startup_timeout: float = 30.0,
    grace: float = 1.0,
) -> ServerProcess:
    """Start ``factory`` (``"package.module:function"``) in a spawned child process.

    The factory is called in the child as ``factory(**kwargs)`` inside a fresh asyncio
    loop and must return (or be a coroutine returning) a *started*
    ``(grpc.aio.Server, port)``, like :func:`start_echo_server`. ``kwargs`` must be
    picklable. Blocks until the child reports its port (raising ``RuntimeError`` with
    the child's traceback if it fails); from async code, call it via
    ``asyncio.to_thread``. On stop the child calls ``server.stop(grace)``.
    """
    ctx = multiprocessing.get_context("spawn")
    parent_conn, child_conn = ctx.Pipe(duplex=True)
    process = ctx.Process(
        target=_server_process_main,
        args=(factory, dict(kwargs or {}), child_conn, grace),
        name=f"bench-server[{factory}]",
        daemon=True,  # multiprocessing's atexit also terminates it
    )
    process.start()
    child_conn.close()  # only the child holds it now: its EOF tells us the child died
    handle = ServerProcess(process, parent_conn, port=0)
    try:
        deadline = time.monotonic() + startup_timeout
        while not parent_conn.poll(0.05):
            if not process.is_alive():
                raise RuntimeError(
                    f"server process for {factory!r} exited with code {process.exitcode}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"server process for {factory!r} did not start in time")
        try:
            kind, value = parent_conn.recv()
        except EOFError:
            process.join(1.0)
            raise RuntimeError(
                f"server process for {factory!r} exited with code {process.exitcode}"
            ) from None
        if kind != "port":
            raise RuntimeError(f"server process for {factory!r} failed:\n{value}")
    except BaseException:
        handle.stop(timeout=1.0)
        raise
    handle.port = int(value)
    return handle


def _server_process_main(
    factory: str, kwargs: dict[str, Any], conn: Connection, grace: float
) -> None:
    """Child entry point: serve until told to stop or until the parent goes away."""
    # Ctrl-C in a terminal reaches the whole process group; the parent owns shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        asyncio.run(_serve_in_child(factory, kwargs, conn, grace))
    finally:
        conn.close()


async def _serve_in_child(
    factory: str, kwargs: dict[str, Any], conn: Connection, grace: float
) -> None:
    try:
        result = load_factory(factory)(**kwargs)
        if inspect.isawaitable(result):
            result = await result
        server, port = result
    except Exception:
        conn.send(("error", traceback.format_exc()))
        return
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    # Readable on a "stop" message and on EOF, i.e. when the parent closes or dies.
    loop.add_reader(conn.fileno(), stop.set)
    try:
        conn.send(("port", int(port)))
        await stop.wait()
    finally:
        loop.remove_reader(conn.fileno())
        await server.stop(grace)
