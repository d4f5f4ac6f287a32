"""The orchestrator end to end in process: a real control plane calling real step servers.

Each test drives OrchestratorService over gRPC and checks what a user would see: the
execution's state, each step's state and attempts, the event history, and the side
effects the step servers really performed (their ledger).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import pytest

from flext_mesh.orchestrator.formats import workflow_from_dict
from flext_mesh.rpc.payloads import struct_to_dict
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.server import create_server
from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc, orchestrator_pb2
from tests.orchestrator.conftest import Flow, kinds, state, states
from tests.registry.conftest import eventually, fast_config

ORDER_FULFILLMENT = {
    "workflow_id": "order_fulfillment",
    "steps": [
        {"step": "validate_payment", "service": "payment", "required": True},
        {
            "step": "reserve_inventory",
            "service": "inventory",
            "required": True,
            "depends_on": ["validate_payment"],
            "input": {
                "key": "${input.key}",
                "behaviour": "${input.behaviour}",
                "payment": "${steps.validate_payment.output.validate_payment_id}",
            },
            "compensation": {"operation": "release_inventory"},
        },
    ],
}


async def rpc_error(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_guide_order_fulfillment_runs_steps_in_order_with_references(flow: Flow) -> None:
    await flow.serve("payment", "validate_payment")
    await flow.serve("inventory", "reserve_inventory", "release_inventory")
    stored = await flow.put(ORDER_FULFILLMENT)
    assert (stored.name, stored.version) == ("order_fulfillment", 1)

    started = await flow.start(
        "order_fulfillment", {"key": "o-1", "behaviour": {}}, correlation_id="cid-o-1"
    )
    assert state(started) in {"PENDING", "RUNNING"}
    done = await flow.wait(started.execution_id)

    assert state(done) == "SUCCEEDED"
    assert states(done) == {"validate_payment": "SUCCEEDED", "reserve_inventory": "SUCCEEDED"}
    assert struct_to_dict(done.output)["reserve_inventory"]["reserve_inventory_id"] == (
        "reserve_inventory-o-1"
    )
    # The reference reached the second step with the first step's output.
    [reservation] = [e for e in flow.ledger.of("o-1") if e["operation"] == "reserve_inventory"]
    assert reservation["request"]["payment"] == "validate_payment-o-1"
    assert done.correlation_id == "cid-o-1"
    assert all(s.attempts == 1 and s.duration.ToNanoseconds() > 0 for s in done.steps)
    assert {s.idempotency_key for s in done.steps} == {
        f"{done.execution_id}/validate_payment",
        f"{done.execution_id}/reserve_inventory",
    }
    assert done.duration.ToNanoseconds() > 0

    history = await flow.get(done.execution_id, events=True)
    assert kinds(history.events) == [
        "EXECUTION_CREATED",
        "EXECUTION_STARTED",
        "STEP_STARTED validate_payment",
        "STEP_SUCCEEDED validate_payment",
        "STEP_STARTED reserve_inventory",
        "STEP_SUCCEEDED reserve_inventory",
        "EXECUTION_ENDED",
    ]
    assert [e.index for e in history.events] == list(range(1, 8))
    assert history.execution.event_count == 7


async def test_start_execution_with_wait_answers_the_ended_execution(flow: Flow) -> None:
    await flow.serve("payment", "validate_payment")
    await flow.serve("inventory", "reserve_inventory", "release_inventory")
    await flow.put(ORDER_FULFILLMENT)
    request = orchestrator_pb2.StartExecutionRequest(
        workflow_name="order_fulfillment", idempotency_key="wait-1", wait=True
    )
    request.input.update({"key": "w-1", "behaviour": {}})
    reply = await flow.stub.StartExecution(request)
    assert (state(reply.execution), reply.existing) == ("SUCCEEDED", False)
    assert struct_to_dict(reply.execution.output)["reserve_inventory"]["reserve_inventory_id"] == (
        "reserve_inventory-w-1"
    )
    again = await flow.stub.StartExecution(request)  # the same key: the ended one
    assert (again.execution.execution_id, again.existing) == (reply.execution.execution_id, True)
    assert state(again.execution) == "SUCCEEDED"

    # Past the call's deadline: DEADLINE_EXCEEDED, and the execution goes on to its end.
    slow = orchestrator_pb2.StartExecutionRequest(
        workflow_name="order_fulfillment", idempotency_key="wait-2", wait=True
    )
    slow.input.update({"key": "w-2", "behaviour": {"reserve_inventory": {"sleep": 0.6}}})
    cut = await rpc_error(flow.stub.StartExecution(slow, timeout=0.3))
    assert cut.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    slow.wait = False
    started = (await flow.stub.StartExecution(slow)).execution
    assert state(await flow.wait(started.execution_id)) == "SUCCEEDED"


async def test_waiters_of_one_execution_do_not_cut_each_other(flow: Flow) -> None:
    # Two StartExecution(wait) of one key while it runs: the first gives up at its
    # deadline, the second still gets the ended execution.
    await flow.serve("payment", "validate_payment")
    await flow.serve("inventory", "reserve_inventory", "release_inventory")
    await flow.put(ORDER_FULFILLMENT)
    request = orchestrator_pb2.StartExecutionRequest(
        workflow_name="order_fulfillment", idempotency_key="wait-3", wait=True
    )
    request.input.update({"key": "w-3", "behaviour": {"reserve_inventory": {"sleep": 0.6}}})
    patient = asyncio.ensure_future(flow.stub.StartExecution(request))
    cut = await rpc_error(flow.stub.StartExecution(request, timeout=0.2))
    assert cut.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    reply = await patient
    assert state(reply.execution) == "SUCCEEDED"
    assert reply.execution.end_time.seconds > 0


async def test_wait_answers_a_failed_execution_after_its_compensation(flow: Flow) -> None:
    await flow.serve("payment", "validate_payment")
    await flow.serve("inventory", "reserve_inventory", "release_inventory")
    workflow = {
        **ORDER_FULFILLMENT,
        "workflow_id": "fails_last",
        "steps": [
            *ORDER_FULFILLMENT["steps"],
            {
                "step": "ship",
                "service": "shipping",
                "required": True,
                "depends_on": ["reserve_inventory"],
                "input": {"key": "${input.key}", "behaviour": "${input.behaviour}"},
            },
        ],
    }
    await flow.serve("shipping", "ship")
    await flow.put(workflow)
    request = orchestrator_pb2.StartExecutionRequest(workflow_name="fails_last", wait=True)
    request.input.update({"key": "w-4", "behaviour": {"ship": {"fail": "FAILED_PRECONDITION"}}})
    reply = await flow.stub.StartExecution(request)
    assert state(reply.execution) == "COMPENSATED"  # failed, its done steps undone
    assert states(reply.execution)["reserve_inventory"] == "COMPENSATED"
    assert reply.execution.failed_step == "ship"


async def test_independent_branches_run_at_the_same_time(flow: Flow) -> None:
    await flow.serve("inventory", "reserve", "release")
    await flow.serve("payment", "charge", "refund")
    await flow.serve("shipping", "ship")
    workflow = {
        "name": "fan_out",
        "steps": [
            {"name": "reserve", "service": "inventory"},
            {"name": "charge", "service": "payment"},
            {"name": "ship", "service": "shipping", "depends_on": ["reserve", "charge"]},
        ],
    }
    behaviour = {"reserve": {"sleep": 0.4}, "charge": {"sleep": 0.4}}
    done = await flow.wait(
        (await flow.start(workflow, {"key": "fan", "behaviour": behaviour})).execution_id
    )
    assert state(done) == "SUCCEEDED"
    entries = {e["operation"]: e for e in flow.ledger.of("fan")}
    reserve, charge, ship = entries["reserve"], entries["charge"], entries["ship"]
    # The two branches overlapped in time; the join started after both ended.
    assert reserve["started"] < charge["ended"]
    assert charge["started"] < reserve["ended"]
    assert ship["started"] >= max(reserve["ended"], charge["ended"])
    assert done.duration.ToNanoseconds() / 1e9 < 0.75


async def test_a_step_timeout_is_retried_then_fails_and_the_work_ran_once(flow: Flow) -> None:
    await flow.serve("inventory", "reserve", "release")
    workflow = {
        "name": "slow_reserve",
        "steps": [
            {
                "name": "reserve",
                "service": "inventory",
                "timeout_ms": 150,
                "retry": {"max_attempts": 3, "initial_backoff_ms": 20, "jitter": 0},
            }
        ],
    }
    done = await flow.wait(
        (
            await flow.start(workflow, {"key": "slow", "behaviour": {"reserve": {"sleep": 0.6}}})
        ).execution_id
    )
    assert state(done) == "FAILED"
    [step] = done.steps
    assert (states(done)["reserve"], step.attempts) == ("FAILED", 3)
    assert step.error.code_name == "DEADLINE_EXCEEDED"
    assert done.failed_step == "reserve"
    assert done.error.code_name == "DEADLINE_EXCEEDED"
    history = await flow.get(done.execution_id, events=True)
    assert kinds(history.events).count("STEP_RETRYING reserve") == 2
    retrying = [
        e for e in history.events if e.type == orchestrator_pb2.EXECUTION_EVENT_TYPE_STEP_RETRYING
    ]
    assert [e.backoff.ToNanoseconds() / 1e9 for e in retrying] == pytest.approx([0.02, 0.04])
    # Every attempt carried the same idempotency key: the server ran the work once.
    await eventually(lambda: _async(len(flow.ledger.of("slow")) == 1), within=3)


async def _async(value: bool) -> bool:
    return value


async def test_infrastructure_faults_are_retried_until_the_step_succeeds(flow: Flow) -> None:
    await flow.serve("shipping", "ship")
    workflow = {
        "name": "flaky_ship",
        "steps": [
            {
                "name": "ship",
                "service": "shipping",
                "retry": {"max_attempts": 4, "initial_backoff_ms": 5},
            }
        ],
    }
    done = await flow.wait(
        (
            await flow.start(
                workflow, {"key": "flaky", "behaviour": {"ship": {"unavailable_first": 2}}}
            )
        ).execution_id
    )
    assert state(done) == "SUCCEEDED"
    assert done.steps[0].attempts == 3
    history = await flow.get(done.execution_id, events=True)
    assert kinds(history.events)[2:-1] == [
        "STEP_STARTED ship",
        "STEP_RETRYING ship",
        "STEP_STARTED ship",
        "STEP_RETRYING ship",
        "STEP_STARTED ship",
        "STEP_SUCCEEDED ship",
    ]
    assert [e.attempt for e in history.events[2:-1]] == [1, 1, 2, 2, 3, 3]
    assert history.events[3].error.code_name == "UNAVAILABLE"


async def test_a_business_rejection_is_not_retried(flow: Flow) -> None:
    await flow.serve("payment", "charge")
    workflow = {"name": "rejected", "steps": [{"name": "charge", "service": "payment"}]}
    done = await flow.wait(
        (
            await flow.start(
                workflow,
                {"key": "rej", "behaviour": {"charge": {"fail": "FAILED_PRECONDITION"}}},
            )
        ).execution_id
    )
    assert state(done) == "FAILED"
    assert done.steps[0].attempts == 1
    assert done.steps[0].error.code_name == "FAILED_PRECONDITION"
    assert "charge refused" in done.error.message


SAGA = {
    "name": "saga",
    "steps": [
        {
            "name": "reserve",
            "service": "inventory",
            "compensation": {"operation": "release"},
        },
        {
            "name": "charge",
            "service": "payment",
            "depends_on": ["reserve"],
            "compensation": {
                "operation": "refund",
                "input": {"key": "${input.key}", "charge": "${steps.charge.output.charge_id}"},
            },
        },
        {"name": "notify", "service": "notification", "depends_on": ["reserve"]},
        {"name": "ship", "service": "shipping", "depends_on": ["charge", "notify"]},
    ],
}


async def test_a_failed_required_step_compensates_completed_steps_newest_first(
    flow: Flow,
) -> None:
    await flow.serve("inventory", "reserve", "release")
    await flow.serve("payment", "charge", "refund")
    await flow.serve("notification", "notify")
    await flow.serve("shipping", "ship")
    behaviour = {"ship": {"fail": "FAILED_PRECONDITION", "message": "no carrier"}}
    done = await flow.wait(
        (await flow.start(SAGA, {"key": "saga-1", "behaviour": behaviour})).execution_id
    )
    assert state(done) == "COMPENSATED"
    assert states(done) == {
        "reserve": "COMPENSATED",
        "charge": "COMPENSATED",
        "notify": "SUCCEEDED",  # no compensation defined
        "ship": "FAILED",
    }
    assert (done.failed_step, done.error.message) == ("ship", "no carrier")
    operations = [e["operation"] for e in flow.ledger.of("saga-1")]
    history = await flow.get(done.execution_id, events=True)
    completed = [
        e.step_name
        for e in history.events
        if e.type == orchestrator_pb2.EXECUTION_EVENT_TYPE_STEP_SUCCEEDED
    ]
    # Compensations ran in reverse order of completion, after the failure.
    expected = [
        f"{'refund' if s == 'charge' else 'release'}" for s in reversed(completed) if s != "notify"
    ]
    assert operations[-2:] == expected
    refund = next(e for e in flow.ledger.of("saga-1") if e["operation"] == "refund")
    assert refund["request"] == {"key": "saga-1", "charge": "charge-saga-1"}
    release = next(e for e in flow.ledger.of("saga-1") if e["operation"] == "release")
    assert release["request"]["reserve_id"] == "reserve-saga-1"  # default input: the output
    assert "COMPENSATION_STARTED charge" in kinds(history.events)


async def test_a_compensation_that_keeps_failing_leaves_it_for_an_operator(flow: Flow) -> None:
    await flow.serve("inventory", "reserve", "release")
    await flow.serve("payment", "charge", "refund")
    await flow.serve("notification", "notify")
    await flow.serve("shipping", "ship")
    saga = {
        **SAGA,
        "name": "saga_stuck",
        "steps": [
            {**SAGA["steps"][0], "compensation": {"operation": "release"}},  # type: ignore[index]
            {
                **SAGA["steps"][1],  # type: ignore[index]
                "compensation": {
                    "operation": "refund",
                    "input": {"key": "${input.key}", "behaviour": "${input.behaviour}"},
                    "retry": {"max_attempts": 2, "initial_backoff_ms": 5},
                },
            },
            *SAGA["steps"][2:],  # type: ignore[index]
        ],
    }
    behaviour = {"ship": {"fail": "ABORTED"}, "refund": {"fail": "UNAVAILABLE"}}
    done = await flow.wait(
        (await flow.start(saga, {"key": "stuck", "behaviour": behaviour})).execution_id
    )
    assert state(done) == "COMPENSATION_FAILED"
    assert states(done)["charge"] == "COMPENSATION_FAILED"
    charge = next(s for s in done.steps if s.step_name == "charge")
    assert charge.compensation_attempts == 2
    assert charge.compensation_error.code_name == "UNAVAILABLE"
    # The other compensation still ran.
    assert states(done)["reserve"] == "COMPENSATED"
    assert [e["operation"] for e in flow.ledger.of("stuck")][-1] == "release"


async def test_an_optional_step_failing_skips_its_dependents_only(flow: Flow) -> None:
    await flow.serve("auth", "authenticate_user")
    await flow.serve("payment", "process_payment")
    await flow.serve("notification", "send_confirmation", "log_confirmation")
    workflow = {
        "workflow_id": "complex_workflow",
        "steps": [
            {"step": "authenticate_user", "service": "auth", "timeout_ms": 5000},
            {
                "step": "process_payment",
                "service": "payment",
                "depends_on": ["authenticate_user"],
                "timeout_ms": 10000,
            },
            {
                "step": "send_confirmation",
                "service": "notification",
                "required": False,
                "depends_on": ["process_payment"],
                "timeout_ms": 3000,
            },
            {
                "step": "log_confirmation",
                "service": "notification",
                "depends_on": ["send_confirmation"],
            },
        ],
    }
    behaviour = {"send_confirmation": {"fail": "FAILED_PRECONDITION"}}
    done = await flow.wait(
        (await flow.start(workflow, {"key": "opt", "behaviour": behaviour})).execution_id
    )
    assert state(done) == "SUCCEEDED"
    assert states(done) == {
        "authenticate_user": "SUCCEEDED",
        "process_payment": "SUCCEEDED",
        "send_confirmation": "FAILED",
        "log_confirmation": "SKIPPED",
    }
    assert not done.HasField("error")
    assert [e["operation"] for e in flow.ledger.of("opt")] == [
        "authenticate_user",
        "process_payment",
    ]


async def test_cancel_stops_running_steps_and_compensates_completed_ones(flow: Flow) -> None:
    """charge and notify are running when the cancel comes: both instances finish their
    work anyway (their caller went away), so charge, which declares a refund, is asked
    what became of it, turns out to have succeeded, and is refunded; notify declares
    no compensation and stays CANCELLED with its outcome unknown."""
    await flow.serve("inventory", "reserve", "release")
    await flow.serve("payment", "charge", "refund")
    await flow.serve("notification", "notify")
    await flow.serve("shipping", "ship")
    behaviour = {"charge": {"sleep": 1.5}, "notify": {"sleep": 1.5}}
    execution = await flow.start(SAGA, {"key": "cancel-1", "behaviour": behaviour})

    async def charging() -> bool:
        return states((await flow.get(execution.execution_id)).execution)["charge"] == "RUNNING"

    await eventually(charging, within=5)
    reply = await flow.stub.CancelExecution(
        orchestrator_pb2.CancelExecutionRequest(
            execution_id=execution.execution_id, reason="customer changed their mind"
        )
    )
    assert state(reply.execution) in {"COMPENSATING", "CANCELLED"}
    done = await flow.wait(execution.execution_id)
    assert state(done) == "CANCELLED"
    assert states(done) == {
        "reserve": "COMPENSATED",
        "charge": "COMPENSATED",
        "notify": "CANCELLED",
        "ship": "SKIPPED",
    }
    steps = {s.step_name: s for s in done.steps}
    assert not steps["charge"].outcome_unknown
    assert steps["notify"].outcome_unknown
    assert done.error.code_name == "CANCELLED"
    assert "customer changed their mind" in done.error.message
    assert not done.failed_step
    # charge finished after the cancel; it is undone first (it completed last). notify
    # finished too: it has nothing to undo it with.
    done_work = [e["operation"] for e in flow.ledger.of("cancel-1")]
    assert done_work.count("notify") == 1
    assert [op for op in done_work if op != "notify"] == [
        "reserve",
        "charge",
        "refund",
        "release",
    ]
    events = (await flow.get(execution.execution_id, events=True)).events
    resolved = [
        e for e in events if e.type == orchestrator_pb2.EXECUTION_EVENT_TYPE_STEP_OUTCOME_RESOLVED
    ]
    assert [(e.step_name, e.step_state) for e in resolved] == [
        ("charge", orchestrator_pb2.STEP_STATE_SUCCEEDED)
    ]
    ended = events[-1]
    assert ended.type == orchestrator_pb2.EXECUTION_EVENT_TYPE_EXECUTION_ENDED
    assert ended.step_name == ""

    again = await rpc_error(
        flow.stub.CancelExecution(
            orchestrator_pb2.CancelExecutionRequest(execution_id=execution.execution_id)
        )
    )
    assert again.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "already ended (CANCELLED)" in (again.details() or "")


async def test_the_execution_timeout_stops_it(flow: Flow) -> None:
    await flow.serve("inventory", "reserve", "release")
    workflow = {
        "name": "bounded",
        "timeout": "300ms",
        "steps": [{"name": "reserve", "service": "inventory"}],
    }
    done = await flow.wait(
        (
            await flow.start(workflow, {"key": "t", "behaviour": {"reserve": {"sleep": 3}}})
        ).execution_id
    )
    assert state(done) in {"FAILED", "CANCELLED"}
    assert state(done) == "FAILED"
    assert done.error.code_name == "DEADLINE_EXCEEDED"
    assert 0.25 < done.duration.ToNanoseconds() / 1e9 < 2.0


async def test_an_unresolvable_reference_fails_the_step_without_calling_it(flow: Flow) -> None:
    await flow.serve("inventory", "reserve", "release")
    workflow = {
        "name": "bad_ref",
        "steps": [
            {"name": "reserve", "service": "inventory", "input": {"order": "${input.order.id}"}}
        ],
    }
    done = await flow.wait((await flow.start(workflow, {"key": "r"})).execution_id)
    assert state(done) == "FAILED"
    assert done.steps[0].error.code_name == "INVALID_ARGUMENT"
    assert "input.order" in done.steps[0].error.message
    assert done.steps[0].attempts == 0
    assert flow.ledger.of("r") == []


async def test_a_service_with_no_instance_fails_after_its_retries(flow: Flow) -> None:
    workflow = {
        "name": "nobody",
        "steps": [
            {
                "name": "ghost",
                "service": "ghost",
                "retry": {"max_attempts": 2, "initial_backoff_ms": 5},
            }
        ],
    }
    done = await flow.wait((await flow.start(workflow, {})).execution_id)
    assert state(done) == "FAILED"
    assert (done.steps[0].attempts, done.steps[0].error.code_name) == (2, "UNAVAILABLE")
    assert "ghost" in done.steps[0].error.message


async def test_start_with_the_same_idempotency_key_returns_the_first_execution(
    flow: Flow,
) -> None:
    await flow.serve("payment", "charge")
    workflow = {"name": "once", "steps": [{"name": "charge", "service": "payment"}]}
    await flow.put(workflow)
    first, second = await asyncio.gather(
        flow.stub.StartExecution(
            orchestrator_pb2.StartExecutionRequest(workflow_name="once", idempotency_key="k-1")
        ),
        flow.stub.StartExecution(
            orchestrator_pb2.StartExecutionRequest(workflow_name="once", idempotency_key="k-1")
        ),
    )
    assert first.execution.execution_id == second.execution.execution_id
    assert sorted([first.existing, second.existing]) == [False, True]
    await flow.wait(first.execution.execution_id)
    third = await flow.stub.StartExecution(
        orchestrator_pb2.StartExecutionRequest(workflow_name="once", idempotency_key="k-1")
    )
    assert third.existing
    assert state(third.execution) == "SUCCEEDED"
    assert len(flow.ledger.of("")) == 1


async def test_invalid_definitions_list_every_violation(flow: Flow) -> None:
    workflow = workflow_from_dict(
        {
            "name": "broken",
            "steps": [
                {"name": "a", "service": "svc", "depends_on": ["c"]},
                {"name": "b", "service": "svc", "depends_on": ["a", "nope"]},
                {"name": "c", "service": "svc", "depends_on": ["b"]},
                {"name": "a", "service": "", "timeout_ms": 0},
            ],
        }
    )
    error = await rpc_error(
        flow.stub.PutWorkflow(orchestrator_pb2.PutWorkflowRequest(workflow=workflow))
    )
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    mesh_error = from_rpc_error(error)
    text = " | ".join(f"{v.field}: {v.description}" for v in mesh_error.violations)  # type: ignore[attr-defined]
    assert "duplicate step name 'a'" in text
    assert "nope" in text
    assert "a -> c -> b -> a" in text or "a -> b -> c -> a" in text or "cycle" in text
    assert "steps[3].service" in text
    assert len(mesh_error.violations) >= 4  # type: ignore[attr-defined]
    missing = await rpc_error(
        flow.stub.GetWorkflow(orchestrator_pb2.GetWorkflowRequest(name="broken"))
    )
    assert missing.code() is grpc.StatusCode.NOT_FOUND


async def test_workflow_versions_list_and_delete(flow: Flow) -> None:
    one = await flow.put({"name": "versions", "steps": [{"name": "a", "service": "svc"}]})
    same = await flow.stub.PutWorkflow(orchestrator_pb2.PutWorkflowRequest(workflow=one))
    assert (same.changed, same.workflow.version) == (False, 1)
    two = await flow.put(
        {
            "name": "versions",
            "description": "now with b",
            "steps": [{"name": "a", "service": "svc"}, {"name": "b", "service": "svc"}],
        }
    )
    assert two.version == 2
    assert two.create_time == one.create_time
    assert two.update_time.ToNanoseconds() > one.update_time.ToNanoseconds()
    old = await flow.stub.GetWorkflow(
        orchestrator_pb2.GetWorkflowRequest(name="versions", version=1)
    )
    assert [s.name for s in old.workflow.steps] == ["a"]
    for name in ("w-c", "w-a", "w-b"):
        await flow.put({"name": name, "steps": [{"name": "a", "service": "svc"}]})
    page = await flow.stub.ListWorkflows(orchestrator_pb2.ListWorkflowsRequest(page_size=2))
    rest = await flow.stub.ListWorkflows(
        orchestrator_pb2.ListWorkflowsRequest(page_size=2, page_token=page.next_page_token)
    )
    assert [w.name for w in [*page.workflows, *rest.workflows]] == ["versions", "w-a", "w-b", "w-c"]
    assert rest.next_page_token == ""
    await flow.stub.DeleteWorkflow(orchestrator_pb2.DeleteWorkflowRequest(name="versions"))
    gone = await rpc_error(
        flow.stub.GetWorkflow(orchestrator_pb2.GetWorkflowRequest(name="versions"))
    )
    assert gone.code() is grpc.StatusCode.NOT_FOUND
    again = await flow.put({"name": "versions", "steps": [{"name": "z", "service": "svc"}]})
    assert again.version == 3  # versions never repeat


async def test_list_executions_newest_first_with_filters_and_pages(flow: Flow) -> None:
    await flow.serve("payment", "charge")
    ok = {"name": "listed", "steps": [{"name": "charge", "service": "payment"}]}
    ids = []
    for n in range(3):
        execution = await flow.start(ok, {"key": f"l{n}"})
        ids.append(execution.execution_id)
        await flow.wait(execution.execution_id)
    failing = await flow.start(
        {"name": "other", "steps": [{"name": "charge", "service": "payment"}]},
        {"key": "x", "behaviour": {"charge": {"fail": "ABORTED"}}},
    )
    await flow.wait(failing.execution_id)
    page = await flow.stub.ListExecutions(
        orchestrator_pb2.ListExecutionsRequest(workflow_name="listed", page_size=2)
    )
    rest = await flow.stub.ListExecutions(
        orchestrator_pb2.ListExecutionsRequest(
            workflow_name="listed", page_size=2, page_token=page.next_page_token
        )
    )
    assert [e.execution_id for e in [*page.executions, *rest.executions]] == ids[::-1]
    failed = await flow.stub.ListExecutions(
        orchestrator_pb2.ListExecutionsRequest(state=orchestrator_pb2.EXECUTION_STATE_FAILED)
    )
    assert [e.execution_id for e in failed.executions] == [failing.execution_id]
    too_big = await rpc_error(
        flow.stub.ListExecutions(orchestrator_pb2.ListExecutionsRequest(page_size=5000))
    )
    assert too_big.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_watch_from_an_index_and_after_the_end(flow: Flow) -> None:
    await flow.serve("payment", "charge")
    execution = await flow.start(
        {"name": "watched", "steps": [{"name": "charge", "service": "payment"}]}, {"key": "w"}
    )
    await flow.wait(execution.execution_id)
    tail = [
        m
        async for m in flow.stub.WatchExecution(
            orchestrator_pb2.WatchExecutionRequest(
                execution_id=execution.execution_id, after_index=3
            )
        )
    ]
    assert [m.event.index for m in tail] == [4, 5]
    assert state(tail[-1].execution) == "SUCCEEDED"
    nothing_left = [
        m
        async for m in flow.stub.WatchExecution(
            orchestrator_pb2.WatchExecutionRequest(
                execution_id=execution.execution_id, after_index=5
            )
        )
    ]
    assert len(nothing_left) == 1
    assert not nothing_left[0].HasField("event")
    missing = await rpc_error(
        _first(
            flow.stub.WatchExecution(orchestrator_pb2.WatchExecutionRequest(execution_id="nope"))
        )
    )
    assert missing.code() is grpc.StatusCode.NOT_FOUND


async def _first(stream: Any) -> Any:
    async for message in stream:
        return message
    return None


async def test_bad_requests_get_field_violations(flow: Flow) -> None:
    empty = await rpc_error(flow.stub.StartExecution(orchestrator_pb2.StartExecutionRequest()))
    assert empty.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "workflow_name" in (empty.details() or "")
    unknown = await rpc_error(
        flow.stub.StartExecution(orchestrator_pb2.StartExecutionRequest(workflow_name="nope"))
    )
    assert unknown.code() is grpc.StatusCode.NOT_FOUND
    long_key = await rpc_error(
        flow.stub.StartExecution(
            orchestrator_pb2.StartExecutionRequest(
                inline_workflow=orchestrator_pb2.Workflow(
                    steps=[orchestrator_pb2.WorkflowStep(name="a", service="svc")]
                ),
                idempotency_key="k" * 300,
            )
        )
    )
    assert long_key.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "idempotency_key" in (long_key.details() or "")
    not_found = await rpc_error(
        flow.stub.GetExecution(orchestrator_pb2.GetExecutionRequest(execution_id="nope"))
    )
    assert not_found.code() is grpc.StatusCode.NOT_FOUND


async def test_execution_and_step_durations_reach_the_metrics_service(flow: Flow) -> None:
    await flow.serve("payment", "validate_payment")
    await flow.serve("inventory", "reserve_inventory", "release_inventory")
    await flow.put(ORDER_FULFILLMENT)
    for n in range(3):
        await flow.wait((await flow.start("order_fulfillment", {"key": f"m{n}"})).execution_id)
    metrics = metrics_pb2_grpc.MetricsServiceStub(flow.channel)

    async def reported() -> bool:
        try:
            report = await metrics.GetServiceReport(
                metrics_pb2.GetServiceReportRequest(service_name="workflow/order_fulfillment")
            )
        except grpc.aio.AioRpcError:
            return False
        operations = {o.operation: o for o in report.report.operations}
        return (
            operations.get("execution") is not None
            and operations["execution"].total_calls == 3
            and operations["reserve_inventory"].total_calls == 3
        )

    await eventually(reported, within=5)


async def test_a_restarted_control_plane_resumes_running_executions(
    flow: Flow, tmp_path: Any
) -> None:
    await flow.serve("inventory", "reserve", "release")
    await flow.serve("payment", "charge", "refund")
    workflow = {
        "name": "resumable",
        "steps": [
            {"name": "reserve", "service": "inventory"},
            {"name": "charge", "service": "payment", "depends_on": ["reserve"]},
            {"name": "refund", "service": "payment", "depends_on": ["charge"]},
        ],
    }
    execution = await flow.start(
        workflow, {"key": "resume", "behaviour": {"charge": {"sleep": 0.8}}}
    )

    async def charging() -> bool:
        got = (await flow.get(execution.execution_id)).execution
        return states(got)["charge"] == "RUNNING"

    await eventually(charging, within=5)
    await flow.channel.close()
    await flow.plane.stop(0)  # charge is in flight: the sidecar keeps working on it

    plane, port = await create_server(fast_config(tmp_path))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        flow.plane, flow.channel = plane, channel
        flow.stub = type(flow.stub)(channel)
        flow.registry = type(flow.registry)(channel)
        done = await flow.wait(execution.execution_id)
        assert state(done) == "SUCCEEDED"
        charge = next(s for s in done.steps if s.step_name == "charge")
        assert charge.attempts == 2  # sent again after the restart...
        # ...with the same idempotency key: the charge happened once.
        assert [e["operation"] for e in flow.ledger.of("resume")] == [
            "reserve",
            "charge",
            "refund",  # the step after the resumed one ran too
        ]
        history = await flow.get(execution.execution_id, events=True)
        assert "EXECUTION_RESUMED" in kinds(history.events)
        assert struct_to_dict(done.output)["charge"]["call"] == 1
    finally:
        pass


async def test_ended_executions_are_deleted_after_the_retention(flow: Flow) -> None:
    await flow.serve("payment", "charge")
    workflow = {"name": "kept", "steps": [{"name": "charge", "service": "payment"}]}
    old = await flow.start(workflow, {"key": "old"}, idempotency_key="old-key")
    await flow.wait(old.execution_id)
    running = await flow.start(workflow, {"key": "slow", "behaviour": {"charge": {"sleep": 5}}})
    retention = flow.plane.orchestrator.settings.retention
    assert retention == 7 * 24 * 3600  # the documented default

    assert await flow.plane.orchestrator.sweep(now=time.time() + retention / 2) == 0
    removed = await flow.plane.orchestrator.sweep(now=time.time() + retention + 1)
    assert removed == 1
    gone = await rpc_error(flow.get(old.execution_id))
    assert gone.code() is grpc.StatusCode.NOT_FOUND
    assert state((await flow.get(running.execution_id)).execution) == "RUNNING"
    # The idempotency key went with it: the same key starts a new execution.
    again = await flow.stub.StartExecution(
        orchestrator_pb2.StartExecutionRequest(
            inline_workflow=workflow_from_dict(workflow), idempotency_key="old-key"
        )
    )
    assert not again.existing
    assert again.execution.execution_id != old.execution_id
