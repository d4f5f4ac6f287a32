"""The callee side of a nested call, over real gRPC on 127.0.0.1.

A processor's typed errors (its own, or a nested call's) answer with their own status
and details, the outcome hook counts them as what they are, and while a processor
serves a call the call's context (correlation id, deadline, trace headers) is current
in its task, the tasks it starts and the pool thread of a sync processor.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.errors import (
    FailedPrecondition,
    FieldViolation,
    InfrastructureError,
    InternalError,
    InvalidArgument,
    MeshError,
    NotFound,
    ResourceExhausted,
    StatusError,
    Unavailable,
    from_result,
)
from flext_mesh.hosting.servicer import CallOutcome, ProcessorServicer, add_processor_servicer
from flext_mesh.processor import RunRecorder, ServiceProcessor
from flext_mesh.result import FlextResult
from flext_mesh.rpc import context as rpc_context
from flext_mesh.rpc.payloads import struct_to_dict
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.v1 import processor_pb2, processor_pb2_grpc

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"

# -- processors ------------------------------------------------------------------------------


class Reject(ServiceProcessor[dict[str, Any], None, None]):
    """Raise the error the payload names (as a callee three hops away would)."""

    def process(self, request: dict[str, Any]) -> FlextResult[None]:
        kind = request["kind"]
        if kind == "invalid":
            raise InvalidArgument("order rejected", [FieldViolation("amount", "must be > 0")])
        if kind == "precondition":
            raise FailedPrecondition("card expired")
        if kind == "exhausted":
            raise ResourceExhausted("slow down", retry_after=1.5)
        if kind == "aborted":
            raise StatusError("write conflict", grpc.StatusCode.ABORTED)
        if kind == "unavailable":
            raise Unavailable("ledger has no instance")
        if kind == "returned":
            return FlextResult.fail("no such card", code="NOT_FOUND")
        raise KeyError("secret-detail")

    def build(self, domain: None, *, correlation_id: str) -> None:
        return domain


class RejectInBuild(ServiceProcessor[dict[str, Any], int, int]):
    """Reject from build (a rule only the built result can check)."""

    def process(self, request: dict[str, Any]) -> FlextResult[int]:
        return FlextResult.ok(1)

    def build(self, domain: int, *, correlation_id: str) -> int:
        raise FailedPrecondition("too late to build")


class Relay(ServiceProcessor[dict[str, Any], dict[str, Any], dict[str, Any]]):
    """Call `reject` on the next hop through a plain stub, as the mesh client does:
    its status becomes the MeshError of its code (`from_rpc_error`), raised or returned."""

    def __init__(self) -> None:
        super().__init__(metrics_sink=RunRecorder())
        self.next_hop: processor_pb2_grpc.ProcessorServiceStub | None = None

    async def process(self, request: dict[str, Any]) -> FlextResult[dict[str, Any]]:
        assert self.next_hop is not None
        call = processor_pb2.InvokeRequest(operation="reject")
        call.payload.update({"kind": request["kind"]})
        try:
            reply = await self.next_hop.Invoke(call, timeout=5)
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            if request.get("return"):
                return error.to_result()
            raise error from exc
        return FlextResult.ok(struct_to_dict(reply.result))

    def build(self, domain: dict[str, Any], *, correlation_id: str) -> dict[str, Any]:
        return domain


@dataclass
class Seen:
    """What a processor saw of the call it served."""

    correlation_id: str
    context: rpc_context.CallContext | None
    thread: str


class SyncWitness(ServiceProcessor[dict[str, Any], Seen, dict[str, Any]]):
    """Record the call's context from a pool thread (a sync processor)."""

    def __init__(self) -> None:
        super().__init__(metrics_sink=RunRecorder())
        self.seen: list[Seen] = []

    def process(self, request: dict[str, Any]) -> FlextResult[Seen]:
        seen = Seen(self.correlation_id, rpc_context.current(), threading.current_thread().name)
        self.seen.append(seen)
        return FlextResult.ok(seen)

    def build(self, seen: Seen, *, correlation_id: str) -> dict[str, Any]:
        return {"cid": seen.correlation_id}


class AsyncWitness(ServiceProcessor[dict[str, Any], list[Seen], dict[str, Any]]):
    """Record the call's context from the processor's task and from a task it starts."""

    def __init__(self) -> None:
        super().__init__(metrics_sink=RunRecorder())
        self.seen: list[Seen] = []

    async def process(self, request: dict[str, Any]) -> FlextResult[list[Seen]]:
        def look() -> Seen:
            return Seen(self.correlation_id, rpc_context.current(), "loop")

        await asyncio.sleep(float(request.get("sleep", 0)))
        here = look()
        started = await asyncio.create_task(_later(look))
        self.seen.extend((here, started))
        return FlextResult.ok([here, started])

    def build(self, seen: list[Seen], *, correlation_id: str) -> dict[str, Any]:
        return {"cids": [s.correlation_id for s in seen]}


async def _later(look: Any) -> Seen:
    await asyncio.sleep(0)
    seen: Seen = look()
    return seen


# -- servers ---------------------------------------------------------------------------------


@dataclass
class Hop:
    servicer: ProcessorServicer
    stub: processor_pb2_grpc.ProcessorServiceStub
    outcomes: list[CallOutcome] = field(default_factory=list)


@contextlib.asynccontextmanager
async def _serve(name: str, operations: dict[str, ServiceProcessor[Any, Any, Any]]) -> Any:
    outcomes: list[CallOutcome] = []
    servicer = ProcessorServicer(
        operations, service_name=name, instance_id=f"{name}-1", on_call=outcomes.append
    )
    server = grpc.aio.server()
    add_processor_servicer(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Hop(servicer, processor_pb2_grpc.ProcessorServiceStub(channel), outcomes)
    finally:
        await channel.close()
        await server.stop(0)
        servicer.close()


@dataclass
class Chain:
    first: Hop
    last: Hop
    sync_witness: SyncWitness
    async_witness: AsyncWitness


@pytest.fixture
async def chain() -> AsyncIterator[Chain]:
    """`relay` on the first server calls `reject` on the last one."""
    relay = Relay()
    sync_witness, async_witness = SyncWitness(), AsyncWitness()
    async with (
        _serve(
            "last",
            {
                "reject": Reject(metrics_sink=RunRecorder()),
                "reject_in_build": RejectInBuild(metrics_sink=RunRecorder()),
            },
        ) as last,
        _serve(
            "first",
            {"relay": relay, "sync_witness": sync_witness, "async_witness": async_witness},
        ) as first,
    ):
        relay.next_hop = last.stub
        yield Chain(first, last, sync_witness, async_witness)


async def _failure(hop: Hop, operation: str, payload: dict[str, Any]) -> MeshError:
    request = processor_pb2.InvokeRequest(operation=operation)
    request.payload.update(payload)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hop.stub.Invoke(request, timeout=5)
    return from_rpc_error(caught.value)


async def _settled(hop: Hop, count: int) -> list[CallOutcome]:
    deadline = time.monotonic() + 2
    while len(hop.outcomes) < count:
        assert time.monotonic() < deadline, f"{count} outcomes expected, got {hop.outcomes}"
        await asyncio.sleep(0.01)
    return hop.outcomes


# -- errors keep their kind ----------------------------------------------------------------


@pytest.mark.parametrize("returned", [False, True], ids=["raised", "returned"])
async def test_a_nested_rejection_reaches_the_first_caller_as_itself(
    chain: Chain, returned: bool
) -> None:
    error = await _failure(chain.first, "relay", {"kind": "invalid", "return": returned})
    assert isinstance(error, InvalidArgument)
    assert error.message == "order rejected"
    assert error.violations == (FieldViolation("amount", "must be > 0"),)
    error = await _failure(chain.first, "relay", {"kind": "precondition", "return": returned})
    assert (type(error), error.message) == (FailedPrecondition, "card expired")
    error = await _failure(chain.first, "relay", {"kind": "exhausted", "return": returned})
    assert isinstance(error, ResourceExhausted)
    assert (error.message, error.retry_after) == ("slow down", 1.5)
    error = await _failure(chain.first, "relay", {"kind": "aborted", "return": returned})
    assert (error.code, error.message) == (grpc.StatusCode.ABORTED, "write conflict")
    error = await _failure(chain.first, "relay", {"kind": "returned", "return": returned})
    assert (type(error), error.message) == (NotFound, "no such card")
    # Both hops count them as the business answers they are (what their reporters send).
    codes = [o.code for o in await _settled(chain.first, 5)]
    expected = [
        grpc.StatusCode.INVALID_ARGUMENT.value[0],
        grpc.StatusCode.FAILED_PRECONDITION.value[0],
        grpc.StatusCode.RESOURCE_EXHAUSTED.value[0],
        grpc.StatusCode.ABORTED.value[0],
        grpc.StatusCode.NOT_FOUND.value[0],
    ]
    assert codes == expected
    assert [o.code for o in await _settled(chain.last, 5)] == expected


async def test_an_infrastructure_fault_keeps_its_status_and_a_bug_is_internal(
    chain: Chain,
) -> None:
    error = await _failure(chain.first, "relay", {"kind": "unavailable"})
    assert (type(error), error.message) == (Unavailable, "ledger has no instance")
    # A bug two hops away: INTERNAL naming the exception's type, never its text.
    error = await _failure(chain.first, "relay", {"kind": "bug"})
    assert isinstance(error, InternalError)
    assert error.message.startswith("Reject.process raised KeyError")
    assert "secret-detail" not in error.message


async def test_a_rejection_raised_in_build_answers_its_status(chain: Chain) -> None:
    error = await _failure(chain.last, "reject_in_build", {})
    assert (type(error), error.message) == (FailedPrecondition, "too late to build")


def test_a_processor_run_outside_the_mesh_turns_a_mesh_error_into_its_failure() -> None:
    result = Reject(metrics_sink=RunRecorder()).run_with_metrics("r", {"kind": "invalid"})
    assert (result.code, result.error) == ("INVALID_ARGUMENT", "order rejected")
    assert result.field_violations == (("amount", "must be > 0"),)
    recorder = RunRecorder()
    Reject(metrics_sink=recorder).run_with_metrics("r", {"kind": "exhausted"})
    (run,) = recorder.records()
    assert (run.success, run.code, run.error) == (False, "RESOURCE_EXHAUSTED", "slow down")


def test_mesh_errors_and_failed_results_map_both_ways() -> None:
    for error in (
        InvalidArgument("bad", [FieldViolation("a.b", "required")]),
        ResourceExhausted("later", retry_after=0.25),
        StatusError("gone", grpc.StatusCode.DATA_LOSS),
        NotFound("nobody"),
        Unavailable("down"),
    ):
        back = from_result(error.to_result())
        assert (type(back), back.code, back.message) == (type(error), error.code, error.message)
        assert getattr(back, "violations", ()) == getattr(error, "violations", ())
        assert getattr(back, "retry_after", None) == getattr(error, "retry_after", None)
    unknown = from_result(InfrastructureError("lost").to_result())
    assert unknown.code is grpc.StatusCode.UNKNOWN
    with pytest.raises(ValueError, match="retry_after"):
        FlextResult.fail("x", code="RESOURCE_EXHAUSTED", retry_after=math.nan)
    with pytest.raises(ValueError, match="retry_after"):
        FlextResult.fail("x", retry_after=-1)


# -- the context of the call being served ----------------------------------------------------


async def test_a_sync_processor_sees_the_call_context_in_its_pool_thread(chain: Chain) -> None:
    request = processor_pb2.InvokeRequest(operation="sync_witness", correlation_id="ux-cid-1")
    before = time.monotonic()
    await chain.first.stub.Invoke(
        request,
        timeout=4,
        metadata=(("traceparent", TRACEPARENT), ("tracestate", "vendor=1")),
    )
    (seen,) = chain.sync_witness.seen
    assert seen.thread.startswith("flext-processor")
    assert seen.correlation_id == "ux-cid-1"
    assert seen.context is not None
    assert seen.context.correlation_id == "ux-cid-1"
    assert (seen.context.traceparent, seen.context.tracestate) == (TRACEPARENT, "vendor=1")
    assert seen.context.deadline is not None
    assert before + 3 < seen.context.deadline <= before + 4.05  # gRPC's clock is coarse
    assert rpc_context.current() is None, "nothing leaks into the caller's context"


async def test_concurrent_calls_each_see_their_own_context_in_tasks_they_start(
    chain: Chain,
) -> None:
    async def call(cid: str, sleep: float) -> None:
        request = processor_pb2.InvokeRequest(operation="async_witness", correlation_id=cid)
        request.payload.update({"sleep": sleep})
        await chain.first.stub.Invoke(request, metadata=(("x-correlation-id", "ignored"),))

    await asyncio.gather(call("cid-slow", 0.05), call("cid-fast", 0))
    by_id: dict[str, list[Seen]] = {}
    for seen in chain.async_witness.seen:
        by_id.setdefault(seen.correlation_id, []).append(seen)
    assert sorted(by_id) == ["cid-fast", "cid-slow"]
    for cid, sightings in by_id.items():
        assert len(sightings) == 2  # the processor's task and the task it started
        for one in sightings:
            assert one.context is not None
            assert one.context.correlation_id == cid
            assert one.context.deadline is None  # the caller set none
            assert one.context.traceparent == ""


async def test_the_correlation_id_from_metadata_is_the_context_s(chain: Chain) -> None:
    request = processor_pb2.InvokeRequest(operation="sync_witness")
    await chain.first.stub.Invoke(request, metadata=(("x-correlation-id", "from-header"),))
    (seen,) = chain.sync_witness.seen
    assert seen.correlation_id == "from-header"
    assert seen.context is not None
    assert seen.context.correlation_id == "from-header"


def test_correlation_id_outside_a_run_is_a_clear_error() -> None:
    witness = SyncWitness()
    with pytest.raises(RuntimeError, match="only while"):
        _ = witness.correlation_id
    result = witness.run_with_metrics("w", {}, correlation_id="lib-1")
    assert result.value == {"cid": "lib-1"}
    assert witness.seen[0].context is None  # no served call: nothing for the mesh client


def test_the_readme_s_nested_call_example_rejects_as_it_says() -> None:
    readme = (Path(__file__).resolve().parent.parent / "docs" / "library.md").read_text()
    (block,) = [
        block
        for block in re.findall(r"```python\n(.*?)```", readme, flags=re.S)
        if "class Checkout(" in block
    ]
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(block, "docs/library.md", "exec"), namespace)
    checkout = namespace["Checkout"](metrics_sink=RunRecorder())
    result = asyncio.run(checkout.arun_with_metrics("checkout", {"items": []}))
    assert (result.code, result.error) == ("INVALID_ARGUMENT", "items: at least one item")
    assert result.field_violations == (("items", "at least one item"),)


def test_serving_nests_and_restores_the_outer_context() -> None:
    outer = rpc_context.CallContext("outer", deadline=time.monotonic() + 10)
    inner = rpc_context.CallContext("inner", traceparent=TRACEPARENT)
    with rpc_context.serving(outer) as entered:
        assert entered is outer
        seen: list[rpc_context.CallContext | None] = []

        def serve_inner() -> None:
            with rpc_context.serving(inner):
                seen.append(rpc_context.current())
                raise KeyError("left by an exception")

        with pytest.raises(KeyError):
            serve_inner()
        assert seen == [inner]
        assert rpc_context.current() is outer
        assert outer.metadata() == ()
        assert inner.metadata() == (("traceparent", TRACEPARENT),)
    assert rpc_context.current() is None


def test_a_mesh_error_that_cannot_be_an_answer_is_a_bug() -> None:
    class Odd(ServiceProcessor[dict[str, Any], None, None]):
        def process(self, request: dict[str, Any]) -> FlextResult[None]:
            if request["odd"] == "ok":
                raise StatusError("fine?", grpc.StatusCode.OK)
            raise ResourceExhausted("later", retry_after=-1)

        def build(self, domain: None, *, correlation_id: str) -> None:
            return domain

    for odd in ("ok", "negative"):
        result = Odd(metrics_sink=RunRecorder()).run_with_metrics("odd", {"odd": odd})
        assert result.code == "INTERNAL"
        assert result.error is not None
        assert result.error.startswith("Odd.process raised")
