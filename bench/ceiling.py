"""The ceiling: what raw ``grpc.aio`` does on this machine, the baseline of every ratio.

Measures the raw-bytes echo server of :mod:`bench.harness` on 127.0.0.1:

- unary echo QPS, p50 and p99 with 1 call in flight and with 64 in flight;
- messages per second on one server stream.

Each figure is measured with the server in a child process (the baseline: see
:data:`BASELINE_MODE`) and in the client's own event loop, interleaved run by run, and
reported as the median of the runs. Run ``python -m bench.ceiling --help``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from bench.harness import (
    ECHO_SERVER_FACTORY,
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
    machine_facts,
    measure_rate,
    print_header,
    start_echo_server,
    start_server_process,
)

__all__ = [
    "BASELINE_MODE",
    "HIGH_CONCURRENCY",
    "IN_PROCESS",
    "LOW_CONCURRENCY",
    "MESSAGE_SIZE",
    "MODES",
    "PAYLOAD_SIZE",
    "SUBPROCESS",
    "CeilingFigures",
    "comparisons",
    "main",
    "measure_stream",
    "measure_unary",
    "render_table",
    "run_ceiling",
]

SUBPROCESS = "subprocess"
"""Mode: echo server in a spawned child process, client in this process."""
IN_PROCESS = "in-process"
"""Mode: echo server and client share this process's event loop."""
MODES = (SUBPROCESS, IN_PROCESS)
"""Both modes, baseline first."""
BASELINE_MODE = SUBPROCESS
"""The baseline for every later ratio: every later benchmark runs its server under test
in a child process, so the echo must cross the same process boundary; it is also how the
mesh runs. Server and client each get a core and a GIL, where in one loop their Python
work serializes on one core. See bench/README.md for the measured difference."""

LOW_CONCURRENCY = 1
"""Calls in flight for the latency-bound figure."""
HIGH_CONCURRENCY = 64
"""Calls in flight for the throughput-bound figure."""
PAYLOAD_SIZE = 64
"""Bytes per unary request (echoed back)."""
MESSAGE_SIZE = 64
"""Bytes per server-stream message."""


async def measure_unary(
    port: int,
    *,
    concurrency: int,
    warmup: float,
    duration: float,
    payload_size: int = PAYLOAD_SIZE,
) -> LoadResult:
    """Closed-loop unary echo over one fresh channel with ``concurrency`` calls in flight."""
    async with connect(port) as channel:
        client = EchoClient(channel)
        call = functools.partial(client.unary, b"x" * payload_size)
        return await closed_loop(call, concurrency=concurrency, warmup=warmup, duration=duration)


async def measure_stream(
    port: int,
    *,
    warmup: float,
    duration: float,
    message_size: int = MESSAGE_SIZE,
) -> RateResult:
    """Messages per second read from one server stream (a separate stream warms up)."""
    async with connect(port) as channel:
        client = EchoClient(channel)
        read_for = functools.partial(client.read_stream_for, size=message_size)
        return await measure_rate(read_for, warmup=warmup, duration=duration)


@dataclass(frozen=True, kw_only=True)
class CeilingFigures:
    """The ceiling figures for one server mode, each with its runs and median."""

    unary_low: Repeated[LoadResult]
    """Unary echo with :data:`LOW_CONCURRENCY` in flight."""
    unary_high: Repeated[LoadResult]
    """Unary echo with :data:`HIGH_CONCURRENCY` in flight."""
    stream: Repeated[RateResult]
    """One server stream."""


async def run_ceiling(
    settings: BenchSettings,
    *,
    modes: Sequence[str] = MODES,
    payload_size: int = PAYLOAD_SIZE,
    message_size: int = MESSAGE_SIZE,
    progress: TextIO | None = None,
) -> dict[str, CeilingFigures]:
    """Measure every figure in every mode, interleaving modes and figures run by run."""
    unknown = set(modes) - set(MODES)
    if unknown:
        raise ValueError(f"unknown modes: {sorted(unknown)}")
    lows: dict[str, list[LoadResult]] = {mode: [] for mode in modes}
    highs: dict[str, list[LoadResult]] = {mode: [] for mode in modes}
    streams: dict[str, list[RateResult]] = {mode: [] for mode in modes}
    timing = {"warmup": settings.warmup, "duration": settings.duration}

    async with contextlib.AsyncExitStack() as stack:
        ports: dict[str, int] = {}
        if SUBPROCESS in modes:
            child = await asyncio.to_thread(start_server_process, ECHO_SERVER_FACTORY)
            await stack.enter_async_context(child)
            ports[SUBPROCESS] = child.port
        if IN_PROCESS in modes:
            server, ports[IN_PROCESS] = await start_echo_server()
            stack.push_async_callback(server.stop, None)

        for run in range(settings.runs):
            for mode in modes:
                port = ports[mode]
                low = await measure_unary(
                    port, concurrency=LOW_CONCURRENCY, payload_size=payload_size, **timing
                )
                high = await measure_unary(
                    port, concurrency=HIGH_CONCURRENCY, payload_size=payload_size, **timing
                )
                stream = await measure_stream(port, message_size=message_size, **timing)
                lows[mode].append(low)
                highs[mode].append(high)
                streams[mode].append(stream)
                if progress is not None:
                    print(
                        f"run {run + 1}/{settings.runs} {mode:>10}: "
                        f"@{LOW_CONCURRENCY} {format_number(low.qps)} qps "
                        f"p50 {format_number(low.p50_us)} us | "
                        f"@{HIGH_CONCURRENCY} {format_number(high.qps)} qps "
                        f"p50 {format_number(high.p50_us)} us | "
                        f"stream {format_number(stream.rate)} msg/s",
                        file=progress,
                        flush=True,
                    )
    return {
        mode: CeilingFigures(
            unary_low=Repeated.from_runs(lows[mode]),
            unary_high=Repeated.from_runs(highs[mode]),
            stream=Repeated.from_runs(streams[mode]),
        )
        for mode in modes
    }


_ROWS: tuple[tuple[str, str, str, str], ...] = (
    (f"unary @{LOW_CONCURRENCY} QPS", "unary_low", "qps", ""),
    (f"unary @{LOW_CONCURRENCY} p50", "unary_low", "p50_us", "µs"),
    (f"unary @{LOW_CONCURRENCY} p99", "unary_low", "p99_us", "µs"),
    (f"unary @{HIGH_CONCURRENCY} QPS", "unary_high", "qps", ""),
    (f"unary @{HIGH_CONCURRENCY} p50", "unary_high", "p50_us", "µs"),
    (f"unary @{HIGH_CONCURRENCY} p99", "unary_high", "p99_us", "µs"),
    ("one stream msg/s", "stream", "rate", ""),
)


def _cell(repeated: Repeated[Any], name: str, unit: str) -> str:
    median = float(getattr(repeated.median, name))
    low, high = repeated.spread(name)
    suffix = f" {unit}" if unit else ""
    if len(repeated.runs) == 1:
        return f"{format_number(median)}{suffix}"
    return f"{format_number(median)}{suffix} [{format_number(low)}-{format_number(high)}]"


def render_table(results: dict[str, CeilingFigures]) -> str:
    """Median per figure and mode, with the [min-max] of the runs."""
    modes = list(results)
    headers = ["figure", *(f"{mode} server" for mode in modes)]
    rows = [
        [label, *(_cell(getattr(results[mode], attr), name, unit) for mode in modes)]
        for label, attr, name, unit in _ROWS
    ]
    return format_table(headers, rows)


def comparisons(results: dict[str, CeilingFigures]) -> list[Comparison]:
    """In-process figures against the subprocess baseline of the same run (no targets)."""
    if BASELINE_MODE not in results or IN_PROCESS not in results:
        return []
    base, other = results[BASELINE_MODE], results[IN_PROCESS]
    out: list[Comparison] = []
    for label, attr, name, unit in _ROWS:
        out.append(
            Comparison(
                label=f"in-process {label}",
                candidate=float(getattr(getattr(other, attr).median, name)),
                baseline=float(getattr(getattr(base, attr).median, name)),
                baseline_label=BASELINE_MODE,
                higher_is_better=name not in ("p50_us", "p99_us"),
                unit=unit,
            )
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line entry point: ``python -m bench.ceiling [--quick] [--json] ...``."""
    parser = bench_parser(__doc__.splitlines()[0] if __doc__ else "ceiling")
    parser.add_argument(
        "--mode",
        choices=("both", SUBPROCESS, IN_PROCESS),
        default="both",
        help="where the echo server runs (default: both, interleaved)",
    )
    parser.add_argument(
        "--payload-size",
        type=int,
        default=PAYLOAD_SIZE,
        help=f"unary request bytes (default {PAYLOAD_SIZE})",
    )
    parser.add_argument(
        "--message-size",
        type=int,
        default=MESSAGE_SIZE,
        help=f"stream message bytes (default {MESSAGE_SIZE})",
    )
    args = parser.parse_args(argv)
    settings = BenchSettings.from_args(args)
    modes = MODES if args.mode == "both" else (args.mode,)
    out = settings.out

    print_header("flext-mesh bench: ceiling (raw grpc.aio echo, 127.0.0.1)", settings)
    print(
        f"unary payload {args.payload_size} B, stream message {args.message_size} B; "
        f"baseline for later ratios: the {BASELINE_MODE} server",
        file=out,
        flush=True,
    )
    results = asyncio.run(
        run_ceiling(
            settings,
            modes=modes,
            payload_size=args.payload_size,
            message_size=args.message_size,
            progress=out,
        )
    )
    print(file=out)
    print(render_table(results), file=out)
    compared = comparisons(results)
    if compared:
        print(file=out)
        for comparison in compared:
            print(comparison, file=out)
    for mode, figures in results.items():
        for attr in ("unary_low", "unary_high"):
            errors = sum(run.errors for run in getattr(figures, attr).runs)
            if errors:
                print(f"WARNING: {mode} {attr}: {errors} failed calls", file=out)
    out.flush()
    if settings.json:
        emit_json(
            {
                "benchmark": "ceiling",
                "machine": machine_facts(),
                "settings": settings.to_dict(),
                "params": {
                    "payload_size": args.payload_size,
                    "message_size": args.message_size,
                    "low_concurrency": LOW_CONCURRENCY,
                    "high_concurrency": HIGH_CONCURRENCY,
                },
                "baseline_mode": BASELINE_MODE,
                "results": results,
                "comparisons": compared,
            }
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
