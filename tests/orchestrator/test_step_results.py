"""Shared idempotency: a step result kept by an instance that is gone settles the step.

The step servers here are in-process ProcessorService servers registered with a real
control plane; the instance that keeps its result does so through a real
``LostResults`` over gRPC, as ``flext-sidecar --shared-idempotency`` does."""

from __future__ import annotations

from collections.abc import Callable

import grpc
import pytest

from flext_mesh.hosting.results import LostResults
from flext_mesh.rpc.payloads import dict_to_struct
from flext_mesh.v1 import orchestrator_pb2, processor_pb2, registry_pb2
from tests.orchestrator.conftest import Flow, state, states
from tests.registry.conftest import eventually

RESERVE = {
    "name": "reserve_once",
    "steps": [
        {
            "name": "reserve",
            "service": "inventory",
            "timeout": "300ms",
            "retry": {"max_attempts": 2, "initial_backoff": "1500ms", "jitter": 0},
            "compensation": {"operation": "release"},
        }
    ],
}


async def _until(check: Callable[[], bool], within: float = 10.0) -> None:
    async def holds() -> bool:
        return check()

    await eventually(holds, within=within)


async def test_a_result_kept_by_a_gone_instance_settles_the_step_without_running_it_again(
    flow: Flow,
) -> None:
    """reserve times out on instance X (300 ms for 600 ms of work); X finishes it, keeps
    the result with the control plane, and is gone before the retry: the retry is
    settled from the kept result instead of running on instance Y, so it ran once and
    the execution did not become at-least-once."""
    lost = LostResults(lambda: flow.channel, "inventory")
    first = await flow.serve("inventory", "reserve", "release", on_lost_answer=lost.record)
    execution = await flow.start(
        RESERVE, {"key": "kept-1", "behaviour": {"reserve": {"sleep": 0.6}}}
    )
    try:
        await _until(lambda: lost.sent == 1)
        await flow.serve("inventory", "reserve", "release")  # Y, where a resend would go
        await flow.registry.Deregister(
            registry_pb2.DeregisterRequest(service_name="inventory", instance_id=first)
        )
        await flow.servers[0].stop(0)
        done = await flow.wait(execution.execution_id)
    finally:
        await lost.aclose()
    assert state(done) == "SUCCEEDED"
    assert [e["operation"] for e in flow.ledger.of("kept-1")] == ["reserve"]
    step = done.steps[0]
    assert (step.instance_id, step.at_least_once, step.outcome_unknown) == (first, False, False)
    events = (await flow.get(execution.execution_id, events=True)).events
    started = [e for e in events if e.type == orchestrator_pb2.EXECUTION_EVENT_TYPE_STEP_STARTED]
    assert [(e.attempt, e.instance_id, e.at_least_once) for e in started] == [
        (1, first, False),
        (2, first, False),
    ]
    assert "settled from it, not sent again" in started[1].message


async def test_without_a_kept_result_the_resend_goes_elsewhere_at_least_once(flow: Flow) -> None:
    first = await flow.serve("inventory", "reserve", "release")
    execution = await flow.start(
        RESERVE, {"key": "moved-1", "behaviour": {"reserve": {"sleep_first": 0.6}}}
    )
    await _until(lambda: len(flow.ledger.of("moved-1")) == 1)
    second = await flow.serve("inventory", "reserve", "release")
    await flow.registry.Deregister(
        registry_pb2.DeregisterRequest(service_name="inventory", instance_id=first)
    )
    await flow.servers[0].stop(0)
    done = await flow.wait(execution.execution_id)
    assert state(done) == "SUCCEEDED"
    assert [e["operation"] for e in flow.ledger.of("moved-1")] == ["reserve", "reserve"]
    assert (done.steps[0].instance_id, done.steps[0].at_least_once) == (second, True)


async def _record_error(flow: Flow, **fields: object) -> grpc.aio.AioRpcError:
    request = orchestrator_pb2.RecordStepResultRequest(**fields)  # type: ignore[arg-type]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await flow.stub.RecordStepResult(request)
    return caught.value


async def test_record_step_result_refuses_what_is_no_step_of_the_caller(flow: Flow) -> None:
    await flow.serve("inventory", "reserve", "release")
    execution = await flow.start(RESERVE, {"key": "bad-1"})
    await flow.wait(execution.execution_id)
    key = f"{execution.execution_id}/reserve"

    empty = await _record_error(flow)
    assert empty.code() is grpc.StatusCode.INVALID_ARGUMENT
    for field in ("service_name", "operation", "idempotency_key"):
        assert field in (empty.details() or "")
    too_long = await _record_error(
        flow, service_name="inventory", operation="reserve", idempotency_key="k" * 257
    )
    assert too_long.code() is grpc.StatusCode.INVALID_ARGUMENT

    unknown = await _record_error(
        flow, service_name="inventory", operation="reserve", idempotency_key="nope/reserve"
    )
    assert unknown.code() is grpc.StatusCode.NOT_FOUND
    not_a_step = await _record_error(
        flow, service_name="inventory", operation="reserve", idempotency_key="free-text-key"
    )
    assert not_a_step.code() is grpc.StatusCode.NOT_FOUND
    other_service = await _record_error(
        flow, service_name="payment", operation="reserve", idempotency_key=key
    )
    assert other_service.code() is grpc.StatusCode.PERMISSION_DENIED
    assert "calls inventory.reserve, not payment.reserve" in (other_service.details() or "")

    result = processor_pb2.InvokeResponse(instance_id="inventory-x")
    result.result.CopyFrom(dict_to_struct({"reserve_id": "r-1"}))
    await flow.stub.RecordStepResult(
        orchestrator_pb2.RecordStepResultRequest(
            service_name="inventory", operation="reserve", idempotency_key=key, result=result
        )
    )
    assert states((await flow.get(execution.execution_id)).execution) == {"reserve": "SUCCEEDED"}
