"""ProcessorService.Invoke over real gRPC, and the domain pieces in flext_mesh.hosting.operations.

Guide-style processors served by a `ProcessorServicer` on 127.0.0.1:0, called through
the generated stub: validation, correlation ids, deadlines, business rejections,
exceptions, idempotency, draining, ListOperations and the `on_call` hook.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Generic, TypeVar

import grpc
import pydantic
import pytest
from google.protobuf import json_format, struct_pb2

from flext_mesh import logs
from flext_mesh.errors import (
    DeadlineExceeded,
    FieldViolation,
    InternalError,
    InvalidArgument,
    MeshError,
    NotFound,
    Unavailable,
)
from flext_mesh.hosting.operations import (
    QUICK_RUN,
    QUICK_RUNS_TO_MOVE,
    QUICK_WAIT,
    SLOW_ON_LOOP,
    IdempotencyCache,
    Operation,
    RunClock,
    SyncPlacement,
    request_model_of,
    result_to_json,
)
from flext_mesh.hosting.servicer import CallOutcome, ProcessorServicer, add_processor_servicer
from flext_mesh.processor import RunRecorder, ServiceProcessor
from flext_mesh.result import FlextResult
from flext_mesh.rpc.payloads import struct_to_dict
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.v1 import processor_pb2, processor_pb2_grpc

OK = grpc.StatusCode.OK.value[0]
NOT_FOUND = grpc.StatusCode.NOT_FOUND.value[0]
DEADLINE_EXCEEDED = grpc.StatusCode.DEADLINE_EXCEEDED.value[0]

# -- guide-style processors ----------------------------------------------------------------


class OrderItem(pydantic.BaseModel):
    sku: str
    qty: int = pydantic.Field(gt=0)


class OrderRequest(pydantic.BaseModel):
    customer_id: str
    amount: float
    items: list[OrderItem] = []


class Order(pydantic.BaseModel):
    customer_id: str
    amount: float
    units: int


class OrderResponse(pydantic.BaseModel):
    customer_id: str
    amount: float
    units: int
    correlation_id: str
    created_at: datetime


SEEN_CORRELATION_IDS: list[str] = []


class OrderProcessingService(ServiceProcessor[OrderRequest, Order, OrderResponse]):
    """Take an order (sync, pydantic request model)."""

    def process(self, request: OrderRequest) -> FlextResult[Order]:
        SEEN_CORRELATION_IDS.append(logs.correlation_id.get())
        if request.amount <= 0:
            return FlextResult.fail("amount must be positive", code="FAILED_PRECONDITION")
        units = sum(item.qty for item in request.items)
        return FlextResult.ok(
            Order(customer_id=request.customer_id, amount=request.amount, units=units)
        )

    def build(self, order: Order, *, correlation_id: str) -> OrderResponse:
        return OrderResponse(
            **order.model_dump(),
            correlation_id=correlation_id,
            created_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
        )


class Greeting(pydantic.BaseModel):
    name: str


@dataclass
class Greeted:
    text: str
    at: datetime


class GreetService(ServiceProcessor[Greeting, str, Greeted]):
    """Greet someone (async process)."""

    async def process(self, request: Greeting) -> FlextResult[str]:
        await asyncio.sleep(0)
        return FlextResult.ok(f"hello {request.name}")

    def build(self, text: str, *, correlation_id: str) -> Greeted:
        return Greeted(text=text, at=datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC))


class LookupCustomer(ServiceProcessor[dict[str, Any], str, str]):
    """Find a customer (always a business rejection)."""

    def process(self, request: dict[str, Any]) -> FlextResult[str]:
        return FlextResult.fail(f"no customer {request.get('id')}", code="NOT_FOUND")

    def build(self, name: str, *, correlation_id: str) -> str:
        return name


class Explode(ServiceProcessor[dict[str, Any], str, str]):
    """Raise inside process."""

    def process(self, request: dict[str, Any]) -> FlextResult[str]:
        raise RuntimeError("password=hunter2 leaked")

    def build(self, name: str, *, correlation_id: str) -> str:
        return name


class Counter:
    """A thread-safe count of how often a processor really ran."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.value = 0

    def bump(self) -> int:
        with self._lock:
            self.value += 1
            return self.value


class SlowService(ServiceProcessor[dict[str, Any], int, dict[str, Any]]):
    """Sleep for payload `seconds` (sync), then answer how many runs so far."""

    def __init__(self) -> None:
        super().__init__(metrics_sink=RunRecorder())
        self.runs = Counter()

    def process(self, request: dict[str, Any]) -> FlextResult[int]:
        time.sleep(request.get("seconds", 0))
        return FlextResult.ok(self.runs.bump())

    def build(self, runs: int, *, correlation_id: str) -> dict[str, Any]:
        return {"runs": runs}


class FlakyService(ServiceProcessor[dict[str, Any], int, int]):
    """Fail the first call, succeed afterwards."""

    def __init__(self) -> None:
        super().__init__(metrics_sink=RunRecorder())
        self.runs = Counter()

    def process(self, request: dict[str, Any]) -> FlextResult[int]:
        runs = self.runs.bump()
        if runs == 1:
            return FlextResult.fail("not yet", code="FAILED_PRECONDITION")
        return FlextResult.ok(runs)

    def build(self, runs: int, *, correlation_id: str) -> int:
        return runs


class EchoDict(ServiceProcessor[dict[str, Any], dict[str, Any], dict[str, Any]]):
    """Return the payload as received (plain dict, no model)."""

    def process(self, request: dict[str, Any]) -> FlextResult[dict[str, Any]]:
        types = {key: type(value).__name__ for key, value in request.items()}
        return FlextResult.ok({"payload": request, "types": types})

    def build(self, domain: dict[str, Any], *, correlation_id: str) -> dict[str, Any]:
        return domain


class StrictCount(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(strict=True)
    n: int
    ratio: float


class StrictService(ServiceProcessor[StrictCount, int, int]):
    """Strict pydantic model: ints must be ints."""

    def process(self, request: StrictCount) -> FlextResult[int]:
        return FlextResult.ok(request.n * 2)

    def build(self, n: int, *, correlation_id: str) -> int:
        return n


# -- the server ------------------------------------------------------------------------------


@dataclass
class Served:
    servicer: ProcessorServicer
    stub: processor_pb2_grpc.ProcessorServiceStub
    outcomes: list[CallOutcome] = field(default_factory=list)
    slow: SlowService = field(default_factory=SlowService)
    flaky: FlakyService = field(default_factory=FlakyService)

    async def invoke(
        self, operation: str, payload: dict[str, Any] | None = None, **fields: Any
    ) -> processor_pb2.InvokeResponse:
        request = processor_pb2.InvokeRequest(operation=operation, **fields)
        if payload is not None:
            request.payload.update(payload)
        return await self.stub.Invoke(request)

    async def failure(
        self, operation: str, payload: dict[str, Any] | None = None, **fields: Any
    ) -> MeshError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await self.invoke(operation, payload, **fields)
        return from_rpc_error(caught.value)


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    outcomes: list[CallOutcome] = []
    slow, flaky = SlowService(), FlakyService()
    servicer = ProcessorServicer(
        {
            "order": OrderProcessingService(metrics_sink=RunRecorder()),
            "greet": GreetService(metrics_sink=RunRecorder()),
            "lookup": LookupCustomer(metrics_sink=RunRecorder()),
            "explode": Explode(metrics_sink=RunRecorder()),
            "slow": slow,
            "flaky": flaky,
            "echo": EchoDict(metrics_sink=RunRecorder()),
            "strict": StrictService(metrics_sink=RunRecorder()),
        },
        service_name="shop",
        instance_id="shop-1",
        version="1.2.3",
        on_call=outcomes.append,
        max_workers=4,
    )
    async with _serve(servicer) as stub:
        yield Served(servicer, stub, outcomes, slow=slow, flaky=flaky)


ORDER = {
    "customer_id": "c-7",
    "amount": 12.5,
    "items": [{"sku": "a", "qty": 2}, {"sku": "b", "qty": 3}],
}


# -- success, results, validation ------------------------------------------------------------


async def test_sync_processor_with_model_answers_its_result_as_a_struct(served: Served) -> None:
    reply = await served.invoke("order", ORDER, correlation_id="cid-1")
    assert json_format.MessageToDict(reply.result) == {
        "customer_id": "c-7",
        "amount": 12.5,
        "units": 5.0,  # Struct numbers are doubles
        "correlation_id": "cid-1",
        "created_at": "2024-05-01T12:00:00Z",
    }
    assert reply.correlation_id == "cid-1"
    assert reply.instance_id == "shop-1"
    assert reply.replayed is False
    assert reply.duration_ms > 0


async def test_async_processor_dataclass_result_is_json_safe(served: Served) -> None:
    reply = await served.invoke("greet", {"name": "ada"})
    assert json_format.MessageToDict(reply.result) == {
        "text": "hello ada",
        "at": "2024-01-02T03:04:05Z",
    }


async def test_whole_numbers_arrive_as_ints_even_for_strict_models(served: Served) -> None:
    reply = await served.invoke("echo", {"n": 5, "x": 2.5, "nested": {"k": [1, 2.0]}})
    result = struct_to_dict(reply.result)
    assert result["types"] == {"n": "int", "x": "float", "nested": "dict"}
    assert result["payload"] == {"n": 5, "x": 2.5, "nested": {"k": [1, 2]}}
    reply = await served.invoke("strict", {"n": 21, "ratio": 3})
    assert struct_to_dict(reply.result) == {"value": 42}
    error = await served.failure("strict", {"n": 2.5, "ratio": 1})
    assert isinstance(error, InvalidArgument)
    assert [v.field for v in error.violations] == ["n"]


async def test_invalid_payload_answers_invalid_argument_naming_each_field(served: Served) -> None:
    error = await served.failure("order", {"amount": "lots", "items": [{"sku": "a", "qty": 0}]})
    assert isinstance(error, InvalidArgument)
    fields = {v.field for v in error.violations}
    assert fields == {"customer_id", "amount", "items.0.qty"}
    assert "items.0.qty" in error.message
    await _until(lambda: bool(served.outcomes))  # recorded once the answer is sent
    assert served.outcomes[-1].code == InvalidArgument.grpc_status_code.value[0]


async def test_business_rejection_keeps_its_precise_status_and_message(served: Served) -> None:
    error = await served.failure("lookup", {"id": 42})
    assert isinstance(error, NotFound)
    assert error.message == "no customer 42"
    error = await served.failure("order", {**ORDER, "amount": 0})
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    assert error.message == "amount must be positive"


async def test_exception_answers_internal_without_its_text(served: Served) -> None:
    error = await served.failure("explode", {})
    assert isinstance(error, InternalError)
    assert "Explode.process raised RuntimeError" in error.message
    assert "hunter2" not in error.message


async def test_unknown_operation_lists_the_known_ones(served: Served) -> None:
    error = await served.failure("refund", {})
    assert isinstance(error, NotFound)
    assert "'refund'" in error.message
    assert "echo, explode, flaky, greet, lookup, order, slow, strict" in error.message
    error = await served.failure("")
    assert isinstance(error, InvalidArgument)
    assert error.violations == (FieldViolation("operation", "required"),)


# -- correlation ids --------------------------------------------------------------------------


async def test_correlation_id_from_field_metadata_or_generated(served: Served) -> None:
    call = served.stub.Invoke(
        processor_pb2.InvokeRequest(operation="greet", payload=_struct({"name": "x"})),
        metadata=(("x-correlation-id", "from-metadata"),),
    )
    reply = await call
    assert reply.correlation_id == "from-metadata"
    assert ("x-correlation-id", "from-metadata") in tuple(await call.trailing_metadata() or ())

    call = served.stub.Invoke(
        processor_pb2.InvokeRequest(
            operation="greet", payload=_struct({"name": "x"}), correlation_id="from-field"
        ),
        metadata=(("x-correlation-id", "from-metadata"),),
    )
    assert (await call).correlation_id == "from-field"

    call = served.stub.Invoke(
        processor_pb2.InvokeRequest(operation="greet", payload=_struct({"name": "x"}))
    )
    generated = (await call).correlation_id
    assert len(generated) == 32
    assert ("x-correlation-id", generated) in tuple(await call.trailing_metadata() or ())


async def test_correlation_id_reaches_sync_processor_thread_and_error_trailers(
    served: Served,
) -> None:
    SEEN_CORRELATION_IDS.clear()
    await served.invoke("order", ORDER, correlation_id="thread-cid")
    assert SEEN_CORRELATION_IDS == ["thread-cid"]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.invoke("order", {"amount": 1}, correlation_id="bad-cid")
    trailers = tuple(caught.value.trailing_metadata() or ())
    assert ("x-correlation-id", "bad-cid") in trailers
    error = from_rpc_error(caught.value)
    assert isinstance(error, InvalidArgument)
    assert error.violations


async def test_overlong_correlation_id_is_rejected(served: Served) -> None:
    error = await served.failure("greet", {"name": "x"}, correlation_id="c" * 129)
    assert isinstance(error, InvalidArgument)
    assert error.violations[0].field == "correlation_id"


async def test_a_correlation_id_that_cannot_be_metadata_is_rejected(served: Served) -> None:
    """It is echoed in trailing metadata, which only carries printable ASCII (found by
    tests/fuzz: gRPC refused the header and the call failed INTERNAL)."""
    for bad in ("café", "a\nb", "\x1f"):
        error = await served.failure("greet", {"name": "x"}, correlation_id=bad)
        assert isinstance(error, InvalidArgument), bad
        assert error.violations[0].field == "correlation_id"
        assert "printable ASCII" in error.violations[0].description


# -- deadlines ------------------------------------------------------------------------------


async def test_deadline_bounds_a_slow_sync_processor(served: Served) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await served.stub.Invoke(
            processor_pb2.InvokeRequest(
                operation="slow", payload=_struct({"seconds": 1}), correlation_id="late"
            ),
            timeout=0.2,
        )
    assert time.monotonic() - started < 0.8
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert isinstance(from_rpc_error(caught.value), DeadlineExceeded)
    await _until(lambda: any(o.correlation_id == "late" for o in served.outcomes))
    late = next(o for o in served.outcomes if o.correlation_id == "late")
    assert (late.operation, late.success, late.code) == ("slow", False, DEADLINE_EXCEEDED)
    await _until(lambda: served.servicer.in_flight == 0)


# -- idempotency ----------------------------------------------------------------------------


async def test_idempotency_key_replays_the_first_response(served: Served) -> None:
    first = await served.invoke("slow", {}, idempotency_key="k1", correlation_id="one")
    again = await served.invoke("slow", {}, idempotency_key="k1", correlation_id="two")
    assert served.slow.runs.value == 1
    assert (first.replayed, again.replayed) == (False, True)
    assert again.result == first.result
    assert again.correlation_id == "one"
    other = await served.invoke("slow", {}, idempotency_key="k2")
    assert other.replayed is False
    assert served.slow.runs.value == 2
    assert served.outcomes[-2].replayed is True


async def test_concurrent_duplicates_run_once(served: Served) -> None:
    replies = await asyncio.gather(
        *(served.invoke("slow", {"seconds": 0.2}, idempotency_key="same") for _ in range(3))
    )
    assert served.slow.runs.value == 1
    assert sorted(r.replayed for r in replies) == [False, True, True]
    assert len({r.result.SerializeToString() for r in replies}) == 1


async def test_a_caller_that_goes_away_does_not_make_the_work_run_twice(
    served: Served,
) -> None:
    """The orchestrator's crash case: the first caller dies mid-call and its retry
    arrives with the same key while the work still runs, then after it finished."""
    first = asyncio.create_task(
        served.invoke("slow", {"seconds": 0.4}, idempotency_key="crash", correlation_id="a")
    )
    await _until(lambda: served.servicer.in_flight == 1)
    first.cancel()  # the caller is gone: its RPC is cancelled
    with pytest.raises(asyncio.CancelledError):
        await first
    retry = await served.invoke("slow", {"seconds": 0.4}, idempotency_key="crash")
    late = await served.invoke("slow", {"seconds": 0.4}, idempotency_key="crash")
    assert served.slow.runs.value == 1
    assert (retry.replayed, late.replayed) == (True, True)
    assert struct_to_dict(retry.result) == {"runs": 1}
    assert retry.correlation_id == "a"


async def test_work_whose_caller_went_away_is_awaited_by_wait_idle(served: Served) -> None:
    first = asyncio.create_task(
        served.invoke("slow", {"seconds": 0.3}, idempotency_key="bg", correlation_id="b")
    )
    await _until(lambda: served.servicer.in_flight == 1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    await _until(lambda: served.servicer.in_flight == 0)
    assert served.slow.runs.value == 0
    assert await served.servicer.wait_idle(timeout=5) is True
    assert served.slow.runs.value == 1


async def test_failures_are_not_cached(served: Served) -> None:
    error = await served.failure("flaky", {}, idempotency_key="f")
    assert error.code is grpc.StatusCode.FAILED_PRECONDITION
    second = await served.invoke("flaky", {}, idempotency_key="f")
    third = await served.invoke("flaky", {}, idempotency_key="f")
    assert served.flaky.runs.value == 2
    assert (second.replayed, third.replayed) == (False, True)
    assert struct_to_dict(third.result) == {"value": 2}


async def test_lookup_only_reports_a_key_without_ever_running_the_operation(
    served: Served,
) -> None:
    """How the orchestrator settles an attempt whose answer it lost: no record ->
    NOT_FOUND (nothing ran); a call still running -> its result once it ends; a call
    done -> its result replayed."""
    missing = await served.failure("slow", {"seconds": 0.1}, idempotency_key="q", lookup_only=True)
    assert missing.code is grpc.StatusCode.NOT_FOUND
    assert "no call of 'slow' with idempotency key 'q'" in missing.message
    assert served.slow.runs.value == 0

    first = asyncio.create_task(
        served.invoke("slow", {"seconds": 0.3}, idempotency_key="q", correlation_id="one")
    )
    await _until(lambda: served.servicer.in_flight == 1)
    first.cancel()  # its caller went away; the work goes on
    with pytest.raises(asyncio.CancelledError):
        await first
    joined = await served.invoke("slow", {}, idempotency_key="q", lookup_only=True)
    again = await served.invoke("slow", {}, idempotency_key="q", lookup_only=True)
    assert served.slow.runs.value == 1
    assert (joined.replayed, again.replayed) == (True, True)
    assert struct_to_dict(joined.result) == {"runs": 1}
    assert joined.correlation_id == "one"

    keyless = await served.failure("slow", {}, lookup_only=True)
    assert keyless.code is grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in keyless.message


async def test_a_draining_instance_still_answers_the_keys_it_holds(served: Served) -> None:
    running = asyncio.create_task(served.invoke("slow", {"seconds": 0.3}, idempotency_key="d"))
    await _until(lambda: served.servicer.in_flight == 1)
    served.servicer.drain()
    resend = await served.invoke("slow", {"seconds": 0.3}, idempotency_key="d")
    assert resend.replayed
    assert served.slow.runs.value == 1
    other = await served.failure("slow", {"seconds": 0.3}, idempotency_key="e")
    assert isinstance(other, Unavailable)
    await running


async def test_on_lost_answer_gets_the_result_of_a_call_whose_caller_went_away() -> None:
    lost: list[tuple[str, str, dict[str, Any]]] = []
    slow = SlowService()
    servicer = ProcessorServicer(
        {"slow": slow},
        service_name="shop",
        instance_id="shop-1",
        on_lost_answer=lambda op, key, response: lost.append(
            (op, key, struct_to_dict(response.result))
        ),
    )
    async with _serve(servicer) as stub:
        answered = processor_pb2.InvokeRequest(operation="slow", idempotency_key="kept")
        await stub.Invoke(answered)
        assert lost == []  # the caller got it: nothing to hand over

        request = processor_pb2.InvokeRequest(operation="slow", idempotency_key="gone")
        request.payload.update({"seconds": 0.3})
        with pytest.raises(grpc.aio.AioRpcError) as timed_out:
            await stub.Invoke(request, timeout=0.1)
        assert timed_out.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        await _until(lambda: bool(lost))
        assert lost == [("slow", "gone", {"runs": 2})]


# -- draining --------------------------------------------------------------------------------


async def test_drain_refuses_new_calls_and_wait_idle_waits_for_in_flight(
    served: Served,
) -> None:
    running = asyncio.create_task(served.invoke("slow", {"seconds": 0.3}))
    await _until(lambda: served.servicer.in_flight == 1)
    served.servicer.drain()
    error = await served.failure("greet", {"name": "x"})
    assert isinstance(error, Unavailable)
    assert "draining" in error.message
    assert await served.servicer.wait_idle(0.05) is False
    assert served.slow.runs.value == 0
    assert await served.servicer.wait_idle(2.0) is True
    assert served.slow.runs.value == 1  # idle only once the in-flight call finished
    assert served.servicer.in_flight == 0
    assert struct_to_dict((await running).result)["runs"] == 1


# -- ListOperations and on_call --------------------------------------------------------------


async def test_list_operations_gives_schemas_and_descriptions(served: Served) -> None:
    reply = await served.stub.ListOperations(processor_pb2.ListOperationsRequest())
    assert (reply.service_name, reply.instance_id, reply.version) == ("shop", "shop-1", "1.2.3")
    ops = {op.name: op for op in reply.operations}
    assert [op.name for op in reply.operations] == sorted(ops)
    order = json_format.MessageToDict(ops["order"].request_schema)
    assert order["title"] == "OrderRequest"
    assert set(order["properties"]) == {"customer_id", "amount", "items"}
    assert set(order["required"]) == {"customer_id", "amount"}
    assert ops["order"].description == "Take an order (sync, pydantic request model)."
    assert json_format.MessageToDict(ops["echo"].request_schema) == {}


async def test_on_call_reports_every_outcome(served: Served) -> None:
    await served.invoke("greet", {"name": "x"}, correlation_id="c-ok")
    await served.failure("lookup", {"id": 1}, correlation_id="c-nf")
    await served.failure("nope", {}, correlation_id="c-unknown")
    by_cid = {o.correlation_id: o for o in served.outcomes}
    ok, rejected, unknown = by_cid["c-ok"], by_cid["c-nf"], by_cid["c-unknown"]
    assert (ok.operation, ok.success, ok.code, ok.replayed) == ("greet", True, OK, False)
    assert ok.duration_ms > 0
    assert (rejected.operation, rejected.success, rejected.code) == ("lookup", False, NOT_FOUND)
    assert (unknown.operation, unknown.code) == ("nope", NOT_FOUND)


async def test_on_call_names_the_caller_its_header_gives_and_ignores_a_bad_one(
    served: Served,
) -> None:
    """The caller's name (x-flext-caller) reaches the outcome, for metrics by caller; a
    name no metric label could carry is dropped, the call itself answered all the same."""
    for cid, caller in (("c-shop", "checkout"), ("c-long", "x" * 64), ("c-none", None)):
        request = processor_pb2.InvokeRequest(operation="greet", correlation_id=cid)
        request.payload.update({"name": "x"})
        metadata = (("x-flext-caller", caller),) if caller is not None else ()
        await served.stub.Invoke(request, metadata=metadata)
    by_cid = {o.correlation_id: o.caller for o in served.outcomes}
    assert by_cid == {"c-shop": "checkout", "c-long": "", "c-none": ""}


async def test_a_raising_on_call_hook_does_not_break_calls() -> None:
    def broken(outcome: CallOutcome) -> None:
        raise ValueError("hook bug")

    servicer = ProcessorServicer(
        {"greet": GreetService(metrics_sink=RunRecorder())}, service_name="s", on_call=broken
    )
    async with _serve(servicer) as stub:
        for _ in range(2):
            reply = await stub.Invoke(
                processor_pb2.InvokeRequest(operation="greet", payload=_struct({"name": "a"}))
            )
            assert struct_to_dict(reply.result)["text"] == "hello a"


async def test_control_plane_servicer_lists_nothing_and_answers_not_found() -> None:
    servicer = ProcessorServicer({}, service_name="flext-mesh")
    async with _serve(servicer) as stub:
        reply = await stub.ListOperations(processor_pb2.ListOperationsRequest())
        assert json_format.MessageToDict(reply) == {"serviceName": "flext-mesh"}
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Invoke(processor_pb2.InvokeRequest(operation="x"))
        assert caught.value.code() is grpc.StatusCode.NOT_FOUND
        assert "'x'" in (caught.value.details() or "")
        assert "known: none" in (caught.value.details() or "")


# -- where sync processors run ---------------------------------------------------------------


class WhereService(ServiceProcessor[dict[str, Any], dict[str, Any], dict[str, Any]]):
    """Answer the thread it ran on; sleep for payload `seconds` first."""

    def process(self, request: dict[str, Any]) -> FlextResult[dict[str, Any]]:
        if request.get("seconds"):
            time.sleep(request["seconds"])
        return FlextResult.ok(
            {"thread": threading.current_thread().name, "cid": self.correlation_id}
        )

    def build(self, domain: dict[str, Any], *, correlation_id: str) -> dict[str, Any]:
        return domain


class PinnedToPool(WhereService):
    """Quick, but told to stay in the pool."""

    run_on_loop = False


class PinnedToLoop(WhereService):
    """Runs on the loop from its first call."""

    run_on_loop = True


LOOP_THREAD = threading.current_thread().name  # pytest-asyncio runs the loop here


async def _threads_of(
    stub: processor_pb2_grpc.ProcessorServiceStub,
    operation: str,
    calls: int,
    *,
    until_loop: bool = False,
    **payload: Any,
) -> list[str]:
    """The threads `calls` calls ran on (fewer: until one ran on the loop)."""
    threads = []
    for i in range(calls):
        reply = await stub.Invoke(
            processor_pb2.InvokeRequest(
                operation=operation, payload=_struct(payload), correlation_id=f"c{i}"
            )
        )
        result = struct_to_dict(reply.result)
        assert result["cid"] == f"c{i}"  # the call's own id, wherever it ran
        threads.append(result["thread"])
        if until_loop and threads[-1] == LOOP_THREAD:
            break
    return threads


# A busy machine preempts some runs (not counted) and slows some past QUICK_RUN (the
# count starts again): moving may take more than QUICK_RUNS_TO_MOVE calls.
ENOUGH_TO_MOVE = 20 * QUICK_RUNS_TO_MOVE


async def test_a_quick_sync_processor_moves_to_the_event_loop() -> None:
    servicer = ProcessorServicer(
        {"where": WhereService(metrics_sink=RunRecorder())},
        service_name="s",
        quick_sync_on_loop=True,
    )
    async with _serve(servicer) as stub:
        threads = await _threads_of(stub, "where", ENOUGH_TO_MOVE, until_loop=True)
        assert threads[-1] == LOOP_THREAD
        assert await _threads_of(stub, "where", 3) == [LOOP_THREAD] * 3
    assert all(t.startswith("flext-processor") for t in threads[:QUICK_RUNS_TO_MOVE])


async def test_sync_processors_stay_in_the_pool_unless_the_host_allows_the_loop() -> None:
    servicer = ProcessorServicer(
        {"where": WhereService(metrics_sink=RunRecorder())}, service_name="s"
    )
    async with _serve(servicer) as stub:
        threads = await _threads_of(stub, "where", QUICK_RUNS_TO_MOVE + 8)
    assert all(t.startswith("flext-processor") for t in threads)


async def test_a_processor_that_waits_on_every_run_never_moves_to_the_loop() -> None:
    servicer = ProcessorServicer(
        {"where": WhereService(metrics_sink=RunRecorder())},
        service_name="s",
        quick_sync_on_loop=True,
    )
    async with _serve(servicer) as stub:
        threads = await _threads_of(stub, "where", QUICK_RUNS_TO_MOVE + 8, seconds=0.0001)
    assert all(t.startswith("flext-processor") for t in threads)


async def test_run_on_loop_fixes_where_a_sync_processor_runs() -> None:
    servicer = ProcessorServicer(
        {
            "pool": PinnedToPool(metrics_sink=RunRecorder()),
            "loop": PinnedToLoop(metrics_sink=RunRecorder()),
        },
        service_name="s",
        quick_sync_on_loop=True,
    )
    async with _serve(servicer) as stub:
        pooled = await _threads_of(stub, "pool", QUICK_RUNS_TO_MOVE + 8)
        looped = await _threads_of(stub, "loop", 3)
    assert all(t.startswith("flext-processor") for t in pooled)
    assert looped == [LOOP_THREAD] * 3

    class Bad(WhereService):
        run_on_loop = "yes"

    with pytest.raises(TypeError, match="run_on_loop"):
        Operation.of("bad", Bad())


async def test_a_run_that_blocks_on_the_loop_sends_its_operation_back_to_the_pool() -> None:
    """Once on the loop, a run cannot be cut at its deadline: it is answered
    DEADLINE_EXCEEDED when it ends, and the next slow run is in the pool again, where
    the deadline cuts it on time."""
    outcomes: list[CallOutcome] = []
    servicer = ProcessorServicer(
        {"where": WhereService(metrics_sink=RunRecorder())},
        service_name="s",
        quick_sync_on_loop=True,
        on_call=outcomes.append,
    )
    async with _serve(servicer) as stub:
        threads = await _threads_of(stub, "where", ENOUGH_TO_MOVE, until_loop=True)
        assert threads[-1] == LOOP_THREAD
        slow = processor_pb2.InvokeRequest(
            operation="where", payload=_struct({"seconds": 0.3}), correlation_id="late"
        )
        for cut_on_time in (False, True):
            started = time.monotonic()
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stub.Invoke(slow, timeout=0.1)
            assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
            await _until(lambda: servicer.in_flight == 0)
            took = time.monotonic() - started
            assert took < 0.25 if cut_on_time else took >= 0.3
        placement = servicer._operations["where"].placement
        assert placement is not None
        assert (placement.on_loop, placement.moved_back) == (False, 1)
        assert placement.runs_to_move == 2 * QUICK_RUNS_TO_MOVE
    late = [o for o in outcomes if o.correlation_id == "late"]
    assert [o.code for o in late] == [DEADLINE_EXCEEDED, DEADLINE_EXCEEDED]


def test_sync_placement_counts_quick_runs_in_a_row() -> None:
    placement = SyncPlacement()
    quick = (QUICK_RUN / 2, 0.0, False)
    for _ in range(QUICK_RUNS_TO_MOVE - 1):
        assert placement.pool_run(quick) is False
    placement.pool_run((QUICK_RUN * 2, 0.0, True))  # too much CPU: start again
    for _ in range(QUICK_RUNS_TO_MOVE - 1):
        placement.pool_run(quick)
    placement.pool_run((QUICK_RUN / 2, 0.005, False))  # waited 5 ms: start again
    for _ in range(QUICK_RUNS_TO_MOVE - 1):
        placement.pool_run(quick)
    placement.pool_run((QUICK_RUN / 2, QUICK_WAIT * 2, False))  # a short wait says nothing
    placement.pool_run((QUICK_RUN / 2, 0.005, True))  # nor a preempted run
    placement.pool_run(None)  # nor one a garbage collection interrupted
    assert placement.on_loop is False
    assert placement.pool_run(quick) is True
    assert placement.on_loop is True

    long_wait = (QUICK_RUN / 2, SLOW_ON_LOOP * 2, False)
    preempted = (QUICK_RUN / 2, SLOW_ON_LOOP * 2, True)
    assert placement.loop_run(long_wait) is False  # once: maybe the GIL's doing
    assert placement.loop_run(quick) is False
    assert placement.loop_run(long_wait) is False
    assert placement.loop_run(preempted) is False  # the system's doing
    assert placement.loop_run(long_wait) is False
    assert placement.loop_run(long_wait) is True  # twice in a row: it waits
    assert (placement.on_loop, placement.moved_back) == (False, 1)
    assert placement.runs_to_move == 2 * QUICK_RUNS_TO_MOVE
    for _ in range(2 * QUICK_RUNS_TO_MOVE):
        placement.pool_run(quick)
    assert placement.on_loop is True
    assert placement.loop_run((SLOW_ON_LOOP * 2, 0.0, True)) is True  # too much CPU
    assert placement.runs_to_move == 4 * QUICK_RUNS_TO_MOVE
    for _ in range(4 * QUICK_RUNS_TO_MOVE):
        placement.pool_run(quick)
    assert placement.loop_run((QUICK_RUN / 2, 0.05, True)) is True  # a 50 ms stall

    pinned = SyncPlacement(fixed=False)
    for _ in range(QUICK_RUNS_TO_MOVE * 2):
        pinned.pool_run(quick)
    assert pinned.on_loop is False


def _measured(run: Any) -> tuple[float, float]:
    """RunClock's figures for `run()`, tried again while the system preempts it."""
    for _ in range(50):
        clock = RunClock()
        run()
        usage = clock.stop()
        if usage is not None and not usage[2]:
            return usage[0], usage[1]
    raise AssertionError("every run was preempted")


def test_run_clock_tells_waiting_from_working() -> None:
    cpu, waited = _measured(lambda: time.sleep(0.002))
    assert waited >= 0.0015
    assert cpu < 0.001

    def spin() -> None:
        end = time.perf_counter() + 0.0003
        while time.perf_counter() < end:
            pass

    cpu, waited = _measured(spin)
    assert cpu >= 0.0002
    assert waited < 0.0001
    interrupted = RunClock()
    gc.collect()
    assert interrupted.stop() is None


# -- flext_mesh.hosting.operations, without a server -----------------------------------------

TReq = TypeVar("TReq")


class Base(ServiceProcessor[TReq, int, int], Generic[TReq]):
    """A generic intermediate base."""

    def process(self, request: TReq) -> FlextResult[int]:
        return FlextResult.ok(1)

    def build(self, domain: int, *, correlation_id: str) -> int:
        return domain


class ViaIntermediate(Base[Greeting]):
    """TRequest bound through a generic base."""


class Subclass(OrderProcessingService):
    """Inherits its model from a plain parent."""


class Overridden(EchoDict):
    """Explicit model on a dict processor."""

    request_model = Greeting


class NoModel(OrderProcessingService):
    """Explicitly no model."""

    request_model = None


def test_request_model_discovery() -> None:
    assert request_model_of(OrderProcessingService) is OrderRequest
    assert request_model_of(Subclass()) is OrderRequest
    assert request_model_of(ViaIntermediate) is Greeting
    assert request_model_of(Base) is None  # unbound TypeVar
    assert request_model_of(EchoDict) is None
    assert request_model_of(Overridden) is Greeting
    assert request_model_of(NoModel) is None

    class Bad(EchoDict):
        request_model = dict

    with pytest.raises(TypeError, match="request_model"):
        request_model_of(Bad)


class Color(Enum):
    RED = "red"


@dataclass
class Shipment:
    at: datetime
    color: Color
    tags: tuple[str, ...]


def test_result_to_json_rule() -> None:
    at = datetime(2024, 1, 1, tzinfo=UTC)
    assert result_to_json(Greeting(name="a")) == {"name": "a"}
    assert result_to_json(Shipment(at, Color.RED, ("x",))) == {
        "at": "2024-01-01T00:00:00Z",
        "color": "red",
        "tags": ["x"],
    }
    assert result_to_json({"at": at, 1: "one"}) == {"at": "2024-01-01T00:00:00Z", "1": "one"}
    assert result_to_json("done") == {"value": "done"}
    assert result_to_json([1, 2]) == {"value": [1, 2]}
    assert result_to_json(None) == {"value": None}
    assert result_to_json(pydantic.RootModel[list[int]]([1])) == {"value": [1]}


def test_unserializable_result_is_an_internal_failure() -> None:
    class Opaque(EchoDict):
        def build(self, domain: dict[str, Any], *, correlation_id: str) -> Any:
            return {"obj": object()}

    result = Operation.of("o", Opaque(metrics_sink=RunRecorder())).run({}, correlation_id="c")
    assert result.code == "INTERNAL"
    assert "no JSON form" in (result.error or "")


def test_idempotency_cache_window_and_lru_bound() -> None:
    now = [0.0]
    cache: IdempotencyCache[str] = IdempotencyCache(window=10, max_keys=2, clock=lambda: now[0])

    async def scenario() -> None:
        async def value(v: str) -> str:
            return v

        assert await cache.run("a", lambda: value("A")) == ("A", False)
        assert await cache.run("a", lambda: value("other")) == ("A", True)
        now[0] = 10.0
        assert await cache.run("a", lambda: value("A2")) == ("A2", False)
        await cache.run("b", lambda: value("B"))
        await cache.run("a", lambda: value("ignored"))  # touch: b is now least recent
        await cache.run("c", lambda: value("C"))
        assert len(cache) == 2
        assert "b" not in cache
        assert "a" in cache
        assert "c" in cache

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="window"):
        IdempotencyCache(window=0)


# -- helpers ------------------------------------------------------------------------------------


def _struct(data: dict[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(data)
    return struct


async def _until(check: Any, within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _serve(
    servicer: ProcessorServicer,
) -> AsyncIterator[processor_pb2_grpc.ProcessorServiceStub]:
    """A grpc.aio server on 127.0.0.1:0 serving `servicer`, and a stub to it."""
    server = grpc.aio.server()
    add_processor_servicer(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield processor_pb2_grpc.ProcessorServiceStub(channel)
    finally:
        await channel.close()
        await server.stop(0)
        servicer.close()
