"""Unit tests of ServiceProcessor: the template methods, run records and sinks."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import textwrap
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pydantic
import pytest

from flext_mesh.processor import (
    CategoryStats,
    MetricsSink,
    RunRecord,
    RunRecorder,
    ServiceProcessor,
    default_recorder,
    new_correlation_id,
)
from flext_mesh.result import FlextResult

# -- a small domain ---------------------------------------------------------------------


@dataclass(frozen=True)
class Req:
    n: int
    sleep_s: float = 0.0


@dataclass(frozen=True)
class Dom:
    n: int


@dataclass(frozen=True)
class Res:
    doubled: int
    correlation_id: str


class Doubler(ServiceProcessor[Req, Dom, Res]):
    """Doubles a number.

    Negative numbers are rejected; 13 is unlucky and crashes.
    """

    def process(self, request: Req) -> FlextResult[Dom]:
        if request.sleep_s:
            time.sleep(request.sleep_s)
        if request.n == 13:
            raise RuntimeError("unlucky")
        if request.n < 0:
            return FlextResult[Dom].fail("n must not be negative", code="INVALID_ARGUMENT")
        return FlextResult[Dom].ok(Dom(request.n))

    def build(self, dom: Dom, *, correlation_id: str) -> Res:
        return Res(doubled=dom.n * 2, correlation_id=correlation_id)


class AsyncDoubler(ServiceProcessor[Req, Dom, Res]):
    """Doubles a number, asynchronously."""

    async def process(self, request: Req) -> FlextResult[Dom]:
        await asyncio.sleep(request.sleep_s)
        if request.n == 13:
            raise RuntimeError("unlucky")
        if request.n < 0:
            return FlextResult[Dom].fail("n must not be negative", code="INVALID_ARGUMENT")
        return FlextResult[Dom].ok(Dom(request.n))

    def build(self, dom: Dom, *, correlation_id: str) -> Res:
        return Res(doubled=dom.n * 2, correlation_id=correlation_id)


@pytest.fixture
def recorder() -> RunRecorder:
    return RunRecorder(maxlen=100)


@pytest.fixture
def doubler(recorder: RunRecorder) -> Doubler:
    return Doubler(metrics_sink=recorder)


@pytest.fixture
def async_doubler(recorder: RunRecorder) -> AsyncDoubler:
    return AsyncDoubler(metrics_sink=recorder)


HEX32 = re.compile(r"^[0-9a-f]{32}$")


# -- run_with_metrics -------------------------------------------------------------------


def test_success_builds_with_given_correlation_id(doubler: Doubler, recorder: RunRecorder) -> None:
    result = doubler.run_with_metrics("double", Req(21), correlation_id="corr-1")

    assert result.success
    assert result.value == Res(doubled=42, correlation_id="corr-1")
    [run] = recorder.records()
    assert run.processor == "Doubler"
    assert run.category == "double"
    assert run.correlation_id == "corr-1"
    assert run.success is True
    assert run.error is None
    assert run.code is None


def test_correlation_id_generated_when_absent(doubler: Doubler, recorder: RunRecorder) -> None:
    first = doubler.run_with_metrics("double", Req(1)).value.correlation_id
    second = doubler.run_with_metrics("double", Req(1), correlation_id="").value.correlation_id

    assert HEX32.match(first)
    assert HEX32.match(second)
    assert first != second
    assert [r.correlation_id for r in recorder.records()] == [first, second]
    assert HEX32.match(new_correlation_id())


def test_timing_and_start_time_recorded(doubler: Doubler, recorder: RunRecorder) -> None:
    before = time.time()
    doubler.run_with_metrics("double", Req(1, sleep_s=0.02))
    [run] = recorder.records()

    assert run.duration_ms >= 20.0
    assert run.duration_ms < 2_000
    assert before <= run.started_at <= time.time()


def test_business_failure_is_recorded_as_failure(doubler: Doubler, recorder: RunRecorder) -> None:
    result = doubler.run_with_metrics("double", Req(-1), correlation_id="c")

    assert result.is_failure
    assert result.error == "n must not be negative"
    assert result.code == "INVALID_ARGUMENT"
    [run] = recorder.records()
    assert run.success is False
    assert run.error == "n must not be negative"
    assert run.code == "INVALID_ARGUMENT"


def test_exception_in_process_becomes_internal_failure(
    doubler: Doubler, recorder: RunRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="flext_mesh.processor"):
        result = doubler.run_with_metrics("double", Req(13), correlation_id="corr-13")

    assert result.is_failure
    assert result.code == "INTERNAL"
    assert result.error == "Doubler.process raised RuntimeError: unlucky"
    [run] = recorder.records()
    assert (run.success, run.code) == (False, "INTERNAL")
    [log] = caplog.records
    assert "corr-13" in log.getMessage()
    assert log.exc_info is not None


def test_exception_in_build_becomes_internal_failure(recorder: RunRecorder) -> None:
    class BadBuild(Doubler):
        def build(self, dom: Dom, *, correlation_id: str) -> Res:
            raise KeyError("missing")

    result = BadBuild(metrics_sink=recorder).run_with_metrics("double", Req(1))

    assert result.code == "INTERNAL"
    assert result.error is not None
    assert result.error.startswith("BadBuild.build raised KeyError")
    assert recorder.records()[0].success is False


def test_process_returning_non_result_is_internal_failure(recorder: RunRecorder) -> None:
    class Forgetful(ServiceProcessor[Req, Dom, Res]):
        def process(self, request: Req) -> FlextResult[Dom]:  # type: ignore[empty-body]
            pass  # the guide's placeholder body

        def build(self, dom: Dom, *, correlation_id: str) -> Res:
            raise AssertionError("not reached")

    result = Forgetful(metrics_sink=recorder).run_with_metrics("x", Req(1))

    assert result.code == "INTERNAL"
    assert "must return a FlextResult, got NoneType" in (result.error or "")


def test_no_info_logging_on_hot_path(doubler: Doubler, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="flext_mesh"):
        doubler.run_with_metrics("double", Req(1))
        doubler.run_with_metrics("double", Req(-1))
    assert caplog.records == []


# -- async ------------------------------------------------------------------------------


async def test_arun_awaits_async_process(
    async_doubler: AsyncDoubler, recorder: RunRecorder
) -> None:
    result = await async_doubler.arun_with_metrics(
        "double", Req(5, sleep_s=0.01), correlation_id="a"
    )

    assert result.value == Res(doubled=10, correlation_id="a")
    [run] = recorder.records()
    assert run.success
    assert run.duration_ms >= 10.0


async def test_arun_failures_and_exceptions(
    async_doubler: AsyncDoubler, recorder: RunRecorder
) -> None:
    failed = await async_doubler.arun_with_metrics("double", Req(-1))
    crashed = await async_doubler.arun_with_metrics("double", Req(13))

    assert (failed.code, failed.error) == ("INVALID_ARGUMENT", "n must not be negative")
    assert crashed.code == "INTERNAL"
    assert crashed.error == "AsyncDoubler.process raised RuntimeError: unlucky"
    assert [r.success for r in recorder.records()] == [False, False]


async def test_arun_runs_sync_process_inline(doubler: Doubler) -> None:
    result = await doubler.arun_with_metrics("double", Req(4), correlation_id="s")
    assert result.value == Res(doubled=8, correlation_id="s")


def test_run_with_metrics_on_async_process_outside_loop(
    async_doubler: AsyncDoubler, recorder: RunRecorder
) -> None:
    result = async_doubler.run_with_metrics("double", Req(3), correlation_id="sync-caller")

    assert result.value == Res(doubled=6, correlation_id="sync-caller")
    assert [r.correlation_id for r in recorder.records()] == ["sync-caller"]


def test_run_with_metrics_on_async_process_in_worker_thread(async_doubler: AsyncDoubler) -> None:
    results: list[FlextResult[Res]] = []
    worker = threading.Thread(
        target=lambda: results.append(async_doubler.run_with_metrics("double", Req(2)))
    )
    worker.start()
    worker.join()
    assert results[0].value.doubled == 4


async def test_run_with_metrics_on_async_process_inside_loop_raises(
    async_doubler: AsyncDoubler, recorder: RunRecorder
) -> None:
    with pytest.raises(TypeError, match="arun_with_metrics"):
        async_doubler.run_with_metrics("double", Req(1))
    assert recorder.records() == []


async def test_cancellation_is_recorded_and_propagates(
    async_doubler: AsyncDoubler, recorder: RunRecorder
) -> None:
    task = asyncio.create_task(async_doubler.arun_with_metrics("double", Req(1, sleep_s=10)))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    [run] = recorder.records()
    assert (run.success, run.code) == (False, "CANCELLED")


def test_sync_process_returning_coroutine_is_internal_failure(recorder: RunRecorder) -> None:
    class Sneaky(ServiceProcessor[Req, Dom, Res]):
        def process(self, request: Req) -> FlextResult[Dom]:
            return self._later(request)  # type: ignore[return-value]

        async def _later(self, request: Req) -> FlextResult[Dom]:
            return FlextResult.ok(Dom(request.n))

        def build(self, dom: Dom, *, correlation_id: str) -> Res:
            return Res(dom.n, correlation_id)

    result = Sneaky(metrics_sink=recorder).run_with_metrics("x", Req(1))
    assert result.code == "INTERNAL"
    assert "arun_with_metrics" in (result.error or "")


# -- process_json / process_dict --------------------------------------------------------


class Item(pydantic.BaseModel):
    sku: str
    qty: int = pydantic.Field(gt=0)


class OrderIn(pydantic.BaseModel):
    customer_id: str
    items: list[Item]


def _count_items(order: OrderIn) -> FlextResult[int]:
    return FlextResult.ok(sum(i.qty for i in order.items))


def test_process_json_valid(doubler: Doubler) -> None:
    text = '{"customer_id": "c1", "items": [{"sku": "a", "qty": 2}, {"sku": "b", "qty": 3}]}'
    assert doubler.process_json(text, OrderIn, _count_items).value == 5
    assert doubler.process_json(text.encode(), OrderIn, _count_items).value == 5


def test_process_json_invalid_json(doubler: Doubler) -> None:
    called: list[OrderIn] = []

    def handler(order: OrderIn) -> FlextResult[int]:
        called.append(order)
        return FlextResult.ok(0)

    result = doubler.process_json("{not json", OrderIn, handler)

    assert called == []
    assert result.is_failure
    assert result.code == "INVALID_ARGUMENT"
    assert "Invalid JSON" in (result.error or "")
    assert len(result.field_violations) == 1


def test_process_json_names_each_bad_field(doubler: Doubler) -> None:
    text = '{"items": [{"sku": "a", "qty": 0}, {"qty": "many"}]}'
    result = doubler.process_json(text, OrderIn, _count_items)

    assert result.code == "INVALID_ARGUMENT"
    fields = [field for field, _ in result.field_violations]
    assert sorted(fields) == ["customer_id", "items.0.qty", "items.1.qty", "items.1.sku"]
    error = result.error or ""
    assert error.startswith("invalid OrderIn: ")
    for field in fields:
        assert f"{field}: " in error
    assert dict(result.field_violations)["items.0.qty"] == "Input should be greater than 0"


def test_process_json_with_run_with_metrics_handler(
    doubler: Doubler, recorder: RunRecorder
) -> None:
    class DoubleIn(pydantic.BaseModel):
        n: int

    result = doubler.process_json(
        '{"n": 7}',
        DoubleIn,
        lambda m: doubler.run_with_metrics("json", Req(m.n), correlation_id="j"),
    )
    assert result.value == Res(14, "j")
    assert [r.category for r in recorder.records()] == ["json"]


def test_process_dict_shares_validation(doubler: Doubler) -> None:
    good = {"customer_id": "c1", "items": [{"sku": "a", "qty": 4}]}
    bad = {"customer_id": "c1", "items": [{"sku": "a", "qty": -4}]}

    class ReadOnly(Mapping[str, object]):
        def __init__(self, data: Mapping[str, object]) -> None:
            self._data = data

        def __getitem__(self, key: str) -> object:
            return self._data[key]

        def __iter__(self) -> Iterator[str]:
            return iter(self._data)

        def __len__(self) -> int:
            return len(self._data)

    assert doubler.process_dict(good, OrderIn, _count_items).value == 4
    assert doubler.process_dict(ReadOnly(good), OrderIn, _count_items).value == 4
    failed = doubler.process_dict(bad, OrderIn, _count_items)
    assert failed.code == "INVALID_ARGUMENT"
    assert [f for f, _ in failed.field_violations] == ["items.0.qty"]
    assert failed.error == "invalid OrderIn: items.0.qty: Input should be greater than 0"


def test_process_json_handler_exception_becomes_internal(doubler: Doubler) -> None:
    def explode(_: OrderIn) -> FlextResult[int]:
        raise ZeroDivisionError("oops")

    text = '{"customer_id": "c1", "items": []}'
    result = doubler.process_json(text, OrderIn, explode)
    assert result.code == "INTERNAL"
    assert "ZeroDivisionError: oops" in (result.error or "")


# -- run_batch --------------------------------------------------------------------------


def test_run_batch_collects_successes_failures_and_exceptions(
    doubler: Doubler, recorder: RunRecorder
) -> None:
    requests = (Req(n) for n in [1, -1, 13, 2])
    successes, errors = doubler.run_batch(
        requests, lambda r: doubler.run_with_metrics("batch", r, correlation_id=f"b{r.n}")
    )

    assert successes == [Res(2, "b1"), Res(4, "b2")]
    assert errors == ["n must not be negative", "Doubler.process raised RuntimeError: unlucky"]
    assert [r.success for r in recorder.records()] == [True, False, False, True]


def test_run_batch_handler_exception_does_not_abort(doubler: Doubler) -> None:
    def handler(n: int) -> FlextResult[int]:
        if n == 2:
            raise ValueError("two is not allowed")
        return FlextResult.ok(n)

    successes, errors = doubler.run_batch([1, 2, 3], handler)
    assert successes == [1, 3]
    assert errors == ["ValueError: two is not allowed"]


# -- sinks ------------------------------------------------------------------------------


def test_default_sink_is_the_process_wide_recorder() -> None:
    processor = Doubler()
    assert processor.metrics_sink is default_recorder
    assert processor.sinks == (default_recorder,)
    cid = new_correlation_id()
    processor.run_with_metrics("default-sink-test", Req(1), correlation_id=cid)
    assert [r.correlation_id for r in default_recorder.records("default-sink-test")][-1] == cid


def test_added_sinks_receive_records_alongside_default(
    doubler: Doubler, recorder: RunRecorder
) -> None:
    extra = RunRecorder()
    doubler.add_sink(extra)
    doubler.run_with_metrics("double", Req(1))
    doubler.remove_sink(extra)
    doubler.run_with_metrics("double", Req(2))

    assert len(recorder) == 2
    assert len(extra) == 1
    assert isinstance(extra, MetricsSink)


def test_raising_sink_does_not_break_the_call(
    doubler: Doubler, recorder: RunRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def record(self, run: RunRecord) -> None:
            raise OSError("disk full")

    after = RunRecorder()
    doubler.add_sink(Broken())
    doubler.add_sink(after)
    with caplog.at_level(logging.ERROR, logger="flext_mesh.processor"):
        first = doubler.run_with_metrics("double", Req(1))
        second = doubler.run_with_metrics("double", Req(2))

    assert first.value.doubled == 2
    assert second.value.doubled == 4
    assert len(recorder) == 2
    assert len(after) == 2
    assert len([r for r in caplog.records if "sink" in r.getMessage()]) == 1


def test_run_record_is_frozen() -> None:
    run = RunRecord(
        processor="P",
        category="c",
        correlation_id="x",
        duration_ms=1.0,
        success=True,
        error=None,
        code=None,
        started_at=0.0,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.success = False  # type: ignore[misc]


def test_recorder_is_bounded_and_aggregates(doubler: Doubler) -> None:
    small = RunRecorder(maxlen=3)
    doubler.metrics_sink = small
    for n in [1, 2, -1, 3]:
        doubler.run_with_metrics("double", Req(n))
    doubler.run_with_metrics("other", Req(-5))

    assert small.maxlen == 3
    assert [r.category for r in small.records()] == ["double", "double", "other"]
    assert len(small.records("double")) == 2
    stats = small.snapshot()
    assert set(stats) == {"double", "other"}
    assert (stats["double"].count, stats["double"].failures) == (2, 1)
    assert (stats["other"].count, stats["other"].failures) == (1, 1)
    assert isinstance(stats["double"], CategoryStats)
    durations = [r.duration_ms for r in small.records("double")]
    assert stats["double"].mean_ms == pytest.approx(sum(durations) / 2)
    assert stats["double"].max_ms == max(durations)

    small.clear()
    assert small.records() == []
    assert small.snapshot() == {}


def test_recorder_rejects_bad_maxlen() -> None:
    with pytest.raises(ValueError, match="maxlen"):
        RunRecorder(maxlen=0)


def test_recorder_is_thread_safe(doubler: Doubler) -> None:
    shared = RunRecorder(maxlen=100_000)
    doubler.metrics_sink = shared

    def work() -> None:
        for i in range(500):
            doubler.run_with_metrics("t", Req(i % 5))

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert shared.snapshot()["t"].count == 4_000


# -- construction, description, typing --------------------------------------------------


def test_subclass_with_own_init_calling_super(recorder: RunRecorder) -> None:
    class WithInit(Doubler):
        def __init__(self, factor: int) -> None:
            super().__init__(metrics_sink=recorder)
            self.factor = factor

    processor = WithInit(3)
    assert processor.run_with_metrics("double", Req(1)).value.doubled == 2
    assert len(recorder) == 1


def test_subclass_forgetting_super_init_still_works() -> None:
    class NoSuper(Doubler):
        def __init__(self) -> None:
            self.extra = True

    sink = RunRecorder()
    processor = NoSuper()
    processor.add_sink(sink)
    assert processor.run_with_metrics("double", Req(1)).success
    assert len(sink) == 1
    assert Doubler().sinks == (default_recorder,)


def test_abstract_methods_are_required() -> None:
    class OnlyProcess(ServiceProcessor[Req, Dom, Res]):
        def process(self, request: Req) -> FlextResult[Dom]:
            return FlextResult.ok(Dom(1))

    with pytest.raises(TypeError, match="build"):
        OnlyProcess()  # type: ignore[abstract]


def test_describe_is_first_docstring_line() -> None:
    class Undocumented(Doubler):
        pass

    assert Doubler.describe() == "Doubles a number."
    assert Doubler().operation_description == "Doubles a number."
    assert AsyncDoubler.describe() == "Doubles a number, asynchronously."
    assert Undocumented.describe() == ""


def test_mypy_rejects_wrong_process_type(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    api = pytest.importorskip("mypy.api")
    source = textwrap.dedent(
        """
        from flext_mesh.processor import ServiceProcessor
        from flext_mesh.result import FlextResult

        class Good(ServiceProcessor[int, str, bytes]):
            async def process(self, request: int) -> FlextResult[str]:
                return FlextResult[str].ok(str(request))

            def build(self, dom: str, *, correlation_id: str) -> bytes:
                return dom.encode()

        class Bad(ServiceProcessor[int, str, bytes]):
            def process(self, request: int) -> FlextResult[int]:
                return FlextResult[int].ok(request)

            def build(self, dom: str, *, correlation_id: str) -> bytes:
                return dom.encode()

        value: bytes = Good().run_with_metrics("c", 1).value
        wrong: str = Good().run_with_metrics("c", 1).value
        """
    )
    module = tmp_path / "user_code.py"
    module.write_text(source)
    monkeypatch.setenv("MYPYPATH", str(Path(__file__).resolve().parents[2]))
    stdout, _, status = api.run(["--strict", "--cache-dir", str(tmp_path / "cache"), str(module)])

    errors = [line for line in stdout.splitlines() if ": error:" in line]
    assert status == 1, stdout
    assert len(errors) == 2, stdout
    assert 'Return type "FlextResult[int]" of "process" incompatible' in errors[0]
    assert "user_code.py:20:" in errors[1]
