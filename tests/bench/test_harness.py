"""Unit tests of the benchmark harness, and a short smoke run of the ceiling benchmark.

No timing assertions: the machine is shared and noisy. The tests check statistics on
known inputs, the shape of results, that measured figures are positive, and that
server processes start, answer, stop, and die with their parent.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from bench import ceiling
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
    decode_stream_request,
    encode_stream_request,
    format_table,
    load_factory,
    load_result_from_samples,
    measure_rate,
    median_of,
    percentile,
    repeat,
    repeat_interleaved,
    start_echo_server,
    start_server_process,
    to_jsonable,
)

REPO = Path(__file__).resolve().parents[2]
# Shrunk settings for smoke runs: a few hundred milliseconds in all.
WARMUP, DURATION = 0.01, 0.05


def _load(qps: float, p50: float, *, count: int = 10, error: str | None = None) -> LoadResult:
    return LoadResult(
        concurrency=1,
        duration_s=1.0,
        count=count,
        errors=0,
        qps=qps,
        p50_us=p50,
        p90_us=p50,
        p99_us=p50,
        mean_us=p50,
        error_sample=error,
    )


# --------------------------------------------------------------------------- statistics


def test_percentile_interpolates_linearly_like_numpy() -> None:
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 25) == pytest.approx(1.75)
    assert percentile([7.0], 99) == 7.0


@pytest.mark.parametrize("q", [-1.0, 100.5])
def test_percentile_rejects_out_of_range_q(q: float) -> None:
    with pytest.raises(ValueError, match="within"):
        percentile([1.0], q)


def test_percentile_of_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)


def test_load_result_converts_ns_to_us_and_counts_qps() -> None:
    latencies_ns = [(i + 1) * 1_000 for i in range(100)]  # 1..100 µs, shuffled below
    latencies_ns.reverse()
    result = load_result_from_samples(latencies_ns, concurrency=4, duration_s=2.0, errors=3)
    assert result.count == 100
    assert result.qps == 50.0
    assert result.errors == 3
    assert result.concurrency == 4
    assert result.p50_us == pytest.approx(50.5)
    assert result.p90_us == pytest.approx(90.1)
    assert result.p99_us == pytest.approx(99.01)
    assert result.mean_us == pytest.approx(50.5)


def test_load_result_without_successes_has_zero_latency() -> None:
    result = load_result_from_samples([], concurrency=1, duration_s=1.0, errors=5, error_sample="x")
    assert (result.count, result.qps, result.p50_us, result.p99_us) == (0, 0.0, 0.0, 0.0)
    assert result.error_sample == "x"


def test_median_of_takes_each_figure_separately() -> None:
    runs = [_load(100.0, 9.0, count=1), _load(300.0, 1.0, count=3), _load(200.0, 5.0, count=2)]
    median = median_of(runs)
    assert median.qps == 200.0
    assert median.p50_us == 5.0
    assert median.count == 2
    assert isinstance(median.count, int)


def test_median_of_even_runs_rounds_ints_and_keeps_first_error() -> None:
    runs = [_load(1.0, 1.0, count=1), _load(2.0, 2.0, count=2, error="boom")]
    median = median_of(runs)
    assert median.qps == 1.5
    assert isinstance(median.count, int)
    assert median.error_sample == "boom"


def test_repeated_keeps_runs_median_and_spread() -> None:
    repeated = Repeated.from_runs([RateResult(items=n, duration_s=1.0, rate=n) for n in (5, 1, 3)])
    assert repeated.median.rate == 3
    assert repeated.spread("rate") == (1.0, 5.0)
    assert len(repeated.to_dict()["runs"]) == 3


# --------------------------------------------------------------------------- reporting


def test_comparison_prints_both_figures_ratio_and_verdict() -> None:
    comparison = Comparison(label="discover qps @64", candidate=4812, baseline=5301, target=0.80)
    assert str(comparison) == (
        "discover qps @64: 4,812 vs echo 5,301 -> 0.91x (target >= 0.80x: met)"
    )
    assert comparison.met is True


def test_comparison_for_latency_uses_target_as_ceiling() -> None:
    comparison = Comparison(
        label="mesh call p50",
        candidate=700,
        baseline=590,
        baseline_label="direct",
        target=1.10,
        higher_is_better=False,
        unit="µs",
    )
    assert comparison.met is False
    assert str(comparison).endswith("-> 1.19x (target <= 1.10x: MISSED)")
    assert "590 µs" in str(comparison)
    assert to_jsonable([comparison])[0]["met"] is False


def test_comparison_without_target_is_informational() -> None:
    comparison = Comparison(label="x", candidate=1.0, baseline=2.0)
    assert comparison.met is None
    assert str(comparison) == "x: 1.00 vs echo 2.00 -> 0.50x"


def test_format_table_aligns_columns() -> None:
    table = format_table(["figure", "value"], [["qps", "1,234"], ["p50 long", "5"]])
    lines = table.splitlines()
    assert lines[0] == "figure    value"
    assert lines[2] == "qps       1,234"
    assert lines[3] == "p50 long      5"
    with pytest.raises(ValueError, match="cells"):
        format_table(["a", "b"], [["only one"]])


def test_to_jsonable_handles_results_and_non_finite_floats() -> None:
    payload = {"run": Repeated.from_runs([_load(1.0, 2.0)]), "bad": float("inf")}
    encoded = json.loads(json.dumps(to_jsonable(payload)))
    assert encoded["run"]["median"]["qps"] == 1.0
    assert encoded["bad"] is None


# --------------------------------------------------------------------------- CLI


def test_settings_default_to_the_documented_method() -> None:
    settings = BenchSettings.from_args(bench_parser("t").parse_args([]))
    assert (settings.runs, settings.warmup, settings.duration) == (3, 1.5, 5.0)
    assert settings.out is sys.stdout


def test_quick_shrinks_settings_but_explicit_flags_win() -> None:
    args = bench_parser("t").parse_args(["--quick", "--duration", "2", "--json"])
    settings = BenchSettings.from_args(args)
    assert settings.quick
    assert settings.runs == 1
    assert settings.duration == 2.0
    assert settings.warmup < 1.5
    assert settings.out is sys.stderr  # stdout is kept for the JSON object


def test_settings_reject_nonsense() -> None:
    with pytest.raises(SystemExit):
        BenchSettings.from_args(bench_parser("t").parse_args(["--runs", "0"]))


# --------------------------------------------------------------------------- load


async def test_closed_loop_measures_calls_after_warmup() -> None:
    calls = 0

    async def call() -> None:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)

    result = await closed_loop(call, concurrency=3, warmup=WARMUP, duration=DURATION)
    assert result.concurrency == 3
    assert result.count > 0
    assert result.errors == 0
    assert calls > result.count  # warm-up calls were made but not measured
    assert result.qps > 0
    assert 0 < result.p50_us <= result.p90_us <= result.p99_us


async def test_closed_loop_counts_errors_without_raising() -> None:
    async def call() -> None:
        await asyncio.sleep(0)
        raise RuntimeError("down")

    result = await closed_loop(call, concurrency=2, warmup=WARMUP, duration=DURATION)
    assert result.count == 0
    assert result.errors > 0
    assert result.error_sample == "RuntimeError('down')"


async def test_closed_loop_stops_by_itself_when_calls_hang() -> None:
    never = asyncio.Event()

    async def call() -> None:
        await never.wait()

    result = await asyncio.wait_for(
        closed_loop(call, concurrency=4, warmup=0.0, duration=0.05, grace=0.05), timeout=5
    )
    assert result.count == 0


async def test_measure_rate_discards_warmup_and_times_the_run() -> None:
    asked: list[float] = []

    async def run_for(seconds: float) -> int:
        asked.append(seconds)
        await asyncio.sleep(seconds)
        return 100

    result = await measure_rate(run_for, warmup=0.01, duration=0.03)
    assert asked == [0.01, 0.03]
    assert result.items == 100
    assert result.duration_s > 0
    assert result.rate == pytest.approx(100 / result.duration_s)


async def test_repeat_interleaved_alternates_measurements() -> None:
    order: list[str] = []

    def measure(name: str, value: float) -> Callable[[], Awaitable[RateResult]]:
        async def run() -> RateResult:
            order.append(name)
            return RateResult(items=1, duration_s=1.0, rate=value)

        return run

    results = await repeat_interleaved({"base": measure("base", 1), "cand": measure("cand", 2)}, 2)
    assert order == ["base", "cand", "base", "cand"]
    assert results["cand"].median.rate == 2
    single = await repeat(measure("one", 3), n_runs=3)
    assert len(single.runs) == 3


# --------------------------------------------------------------------------- echo baseline


def test_stream_request_round_trips() -> None:
    assert decode_stream_request(encode_stream_request(0, 64)) == (0, 64)
    assert decode_stream_request(encode_stream_request(10**9, 1)) == (10**9, 1)


async def test_echo_server_echoes_and_streams_raw_bytes() -> None:
    server, port = await start_echo_server()
    try:
        async with connect(port) as channel:
            client = EchoClient(channel)
            assert await client.unary(b"hello") == b"hello"
            messages = [m async for m in client.stream(3, 5)]
            assert messages == [b"xxxxx"] * 3
            assert await client.read_stream_for(0.02, size=8) > 0
    finally:
        await server.stop(None)


async def test_ceiling_measurements_return_positive_figures() -> None:
    server, port = await start_echo_server()
    try:
        for concurrency in (1, 4):
            unary = await ceiling.measure_unary(
                port, concurrency=concurrency, warmup=WARMUP, duration=DURATION
            )
            assert unary.concurrency == concurrency
            assert unary.errors == 0
            assert unary.count > 0
            assert unary.qps > 0
            assert 0 < unary.p50_us <= unary.p99_us
        stream = await ceiling.measure_stream(port, warmup=WARMUP, duration=DURATION)
        assert stream.items > 0
        assert stream.rate > 0
    finally:
        await server.stop(None)


async def test_run_ceiling_reports_every_figure() -> None:
    settings = BenchSettings(runs=1, warmup=WARMUP, duration=DURATION)
    results = await ceiling.run_ceiling(settings, modes=(ceiling.IN_PROCESS,))
    figures = results[ceiling.IN_PROCESS]
    assert figures.unary_low.median.qps > 0
    assert figures.unary_high.median.concurrency == ceiling.HIGH_CONCURRENCY
    assert figures.stream.median.rate > 0
    table = ceiling.render_table(results)
    assert "unary @64 QPS" in table
    assert "one stream msg/s" in table
    assert ceiling.comparisons(results) == []  # one mode: nothing to compare with


def test_ceiling_cli_prints_one_json_object_on_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--quick", "--json", "--mode", ceiling.IN_PROCESS, "--warmup", "0.02"]
    assert ceiling.main([*argv, "--duration", "0.05"]) == 0
    captured = capsys.readouterr()
    payload = json.loads(captured.out)
    assert payload["benchmark"] == "ceiling"
    assert payload["machine"]["cores"] == os.cpu_count()
    low = payload["results"][ceiling.IN_PROCESS]["unary_low"]["median"]
    assert low["qps"] > 0
    assert "caveat" in captured.err
    assert "unary @1 QPS" in captured.err


# --------------------------------------------------------------------------- server processes


def test_load_factory_resolves_paths_and_rejects_bad_ones() -> None:
    assert load_factory(ECHO_SERVER_FACTORY) is start_echo_server
    with pytest.raises(ValueError, match=r"package\.module:function"):
        load_factory("bench.harness")
    with pytest.raises(AttributeError):
        load_factory("bench.harness:no_such_factory")
    with pytest.raises(TypeError, match="not callable"):
        load_factory("bench.harness:ECHO_SERVICE")


async def test_server_process_serves_then_stops() -> None:
    handle = await asyncio.to_thread(start_server_process, ECHO_SERVER_FACTORY)
    async with handle:
        assert handle.port > 0
        assert handle.process.is_alive()
        async with connect(handle.port) as channel:
            assert await EchoClient(channel).unary(b"ping") == b"ping"
    assert not handle.process.is_alive()
    assert handle.process.exitcode == 0


def test_server_process_reports_a_failing_factory() -> None:
    with pytest.raises(RuntimeError, match="AttributeError"):
        start_server_process("bench.harness:no_such_factory")


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (exited, or a zombie awaiting its reaper)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_server_process_dies_with_its_parent() -> None:
    script = (
        "import sys, time\n"
        "from bench.harness import ECHO_SERVER_FACTORY, start_server_process\n"
        "if __name__ == '__main__':\n"
        "    handle = start_server_process(ECHO_SERVER_FACTORY)\n"
        "    print(handle.pid, flush=True)\n"
        "    time.sleep(60)\n"
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        assert not _gone(child)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    orphaned = not _gone(child)
    if orphaned:
        os.kill(child, signal.SIGKILL)
    assert not orphaned, f"server process {child} outlived its parent"
