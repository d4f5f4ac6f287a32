"""Execution ownership between control-plane replicas sharing one store.

Two orchestrators on the same store stand for two replicas (as on etcd; the
multi-process version with kill -9 lives in tests/integration/test_replicas.py): each
execution is driven by exactly one, a replica that goes away hands its executions to
another, a replica that lost its claim cannot write, and a cancellation reaches the
owner from any replica.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from flext_mesh.orchestrator.engine import Orchestrator, OrchestratorSettings
from flext_mesh.orchestrator.formats import workflow_from_dict
from flext_mesh.orchestrator.invoker import MeshInvoker
from flext_mesh.v1 import orchestrator_pb2
from tests.orchestrator.conftest import Flow, kinds, state, states
from tests.registry.conftest import eventually

WORKFLOW = {
    "name": "handover",
    "steps": [
        {"name": "reserve", "service": "inventory"},
        {"name": "charge", "service": "payment", "depends_on": ["reserve"]},
        {"name": "ship", "service": "shipping", "depends_on": ["charge"]},
    ],
}


@pytest.fixture
async def replica(flow: Flow) -> AsyncIterator[Orchestrator]:
    """A second orchestrator on the first one's store, as a replica on etcd would be."""
    for service, operations in (
        ("inventory", ("reserve", "release")),
        ("payment", ("charge", "refund")),
        ("shipping", ("ship",)),
    ):
        await flow.serve(service, *operations)
    await flow.put(WORKFLOW)
    other = Orchestrator(
        flow.plane.store,
        MeshInvoker(flow.plane.registry),
        OrchestratorSettings(
            owner="replica-b", exclusive_store=False, claim_interval=0.2, ownership_ttl=2.0
        ),
    )
    await other.start()
    try:
        yield other
    finally:
        await other.stop()


async def _running(flow: Flow, execution_id: str, step: str) -> None:
    async def running() -> bool:
        got = (await flow.get(execution_id)).execution
        return states(got)[step] == "RUNNING"

    await eventually(running, within=5)


async def _ended(orchestrator: Orchestrator, execution_id: str) -> orchestrator_pb2.Execution:
    async with asyncio.timeout(15):
        while True:
            execution, _ = await orchestrator.get_execution(execution_id)
            if state(execution) not in ("PENDING", "RUNNING", "COMPENSATING"):
                return execution
            await asyncio.sleep(0.05)


async def test_an_execution_is_driven_by_the_replica_that_started_it_only(
    flow: Flow, replica: Orchestrator
) -> None:
    execution = await flow.start("handover", {"key": "one-owner"})
    done = await flow.wait(execution.execution_id)
    assert state(done) == "SUCCEEDED"
    assert done.owner == flow.plane.orchestrator.settings.owner
    history = await flow.get(execution.execution_id, events=True)
    assert "EXECUTION_RESUMED" not in kinds(history.events)
    assert [e["operation"] for e in flow.ledger.of("one-owner")] == ["reserve", "charge", "ship"]


async def test_a_replica_that_stops_hands_its_running_execution_over(
    flow: Flow, replica: Orchestrator
) -> None:
    execution = await flow.start(
        "handover", {"key": "handover", "behaviour": {"charge": {"sleep": 0.8}}}
    )
    await _running(flow, execution.execution_id, "charge")
    await flow.plane.orchestrator.stop()  # charge is in flight on its step server

    done = await _ended(replica, execution.execution_id)
    assert state(done) == "SUCCEEDED"
    assert done.owner == "replica-b"
    # The re-sent charge carried the same idempotency key: it happened once.
    assert [e["operation"] for e in flow.ledger.of("handover")] == ["reserve", "charge", "ship"]
    _, events = await replica.get_execution(execution.execution_id, include_events=True)
    resumed = [
        e for e in events if e.type == orchestrator_pb2.EXECUTION_EVENT_TYPE_EXECUTION_RESUMED
    ]
    assert [e.message for e in resumed] == ["resumed by replica-b"]


async def test_a_replica_that_lost_its_claim_cannot_write(
    flow: Flow, replica: Orchestrator
) -> None:
    first = flow.plane.orchestrator
    execution = await flow.start(
        "handover", {"key": "fenced", "behaviour": {"charge": {"sleep": 0.6}}}
    )
    await _running(flow, execution.execution_id, "charge")
    # As if the first replica had paused past its lease: the second claims the execution.
    assert await replica._claim(execution.execution_id, force=True)
    await replica._resume(execution.execution_id)

    done = await _ended(replica, execution.execution_id)
    assert state(done) == "SUCCEEDED"
    assert done.owner == "replica-b"
    await asyncio.sleep(0.8)  # the first replica's charge answered meanwhile
    assert execution.execution_id not in first._runs  # it stopped at its first write
    final, events = await replica.get_execution(execution.execution_id, include_events=True)
    assert state(final) == "SUCCEEDED"
    ended = [e for e in events if e.type == orchestrator_pb2.EXECUTION_EVENT_TYPE_EXECUTION_ENDED]
    assert len(ended) == 1
    assert [e["operation"] for e in flow.ledger.of("fenced")] == ["reserve", "charge", "ship"]


async def test_cancel_through_another_replica_reaches_the_owner(
    flow: Flow, replica: Orchestrator
) -> None:
    execution = await flow.start(
        "handover", {"key": "cancel-b", "behaviour": {"charge": {"sleep": 5}}}
    )
    await _running(flow, execution.execution_id, "charge")

    answered = await replica.cancel_execution(execution.execution_id, "customer left")
    assert state(answered) in ("COMPENSATING", "CANCELLED")
    done = await flow.wait(execution.execution_id)
    assert state(done) == "CANCELLED"
    assert done.owner == flow.plane.orchestrator.settings.owner  # the owner acted on it
    assert [e["operation"] for e in flow.ledger.of("cancel-b")][:1] == ["reserve"]


async def test_inline_definitions_resume_on_another_replica(
    flow: Flow, replica: Orchestrator
) -> None:
    inline = workflow_from_dict({**WORKFLOW, "name": ""})
    request = orchestrator_pb2.StartExecutionRequest(inline_workflow=inline)
    request.input.update({"key": "inline", "behaviour": {"reserve": {"sleep": 0.5}}})
    execution = (await flow.stub.StartExecution(request)).execution
    await _running(flow, execution.execution_id, "reserve")
    await flow.plane.orchestrator.stop()
    done = await _ended(replica, execution.execution_id)
    assert state(done) == "SUCCEEDED"


async def test_start_on_a_full_disk_fails_cleanly_and_works_once_space_returns(
    flow: Flow, replica: Orchestrator
) -> None:
    store = flow.plane.store
    await store.limit_size(1)  # type: ignore[attr-defined]  # the file may not grow: SQLITE_FULL
    started: list[str] = []
    failure: grpc.aio.AioRpcError | None = None
    try:
        for i in range(100):  # fill the room left with big inputs until a start fails
            payload = {
                "key": f"full-{i}",
                "pad": "x" * 100_000,
                "behaviour": {"reserve": {"sleep": 30}},
            }
            try:
                started.append((await flow.start("handover", payload)).execution_id)
            except grpc.aio.AioRpcError as exc:
                failure = exc
                break
    finally:
        await store.limit_size(None)  # type: ignore[attr-defined]
    assert failure is not None, "the disk never filled up"
    assert failure.code() is grpc.StatusCode.UNAVAILABLE
    assert "disk is full" in (failure.details() or "")
    listed = await flow.stub.ListExecutions(orchestrator_pb2.ListExecutionsRequest())
    assert sorted(e.execution_id for e in listed.executions) == sorted(started)  # no half start
    execution = await flow.start("handover", {"key": "after-full-disk"})
    assert state(await flow.wait(execution.execution_id)) == "SUCCEEDED"


async def test_a_replica_whose_lease_lapsed_stops_its_runs_and_they_are_taken_over(
    flow: Flow, replica: Orchestrator
) -> None:
    request = orchestrator_pb2.StartExecutionRequest(workflow_name="handover")
    request.input.update({"key": "lapsed", "behaviour": {"charge": {"sleep": 0.8}}})
    execution, _ = await replica.start_execution(request)
    await _running(flow, execution.execution_id, "charge")
    lapsed = replica._lease
    assert lapsed is not None
    await flow.plane.store.revoke_lease(lapsed)  # as if etcd had expired it

    done = await _ended(replica, execution.execution_id)
    assert state(done) == "SUCCEEDED"
    assert replica._lease != lapsed  # it noticed, and took a new lease
    _, events = await replica.get_execution(execution.execution_id, include_events=True)
    assert orchestrator_pb2.EXECUTION_EVENT_TYPE_EXECUTION_RESUMED in [e.type for e in events]
    ended = [e for e in events if e.type == orchestrator_pb2.EXECUTION_EVENT_TYPE_EXECUTION_ENDED]
    assert len(ended) == 1
    # The charge in flight at the lapse was re-sent with its key: it happened once.
    assert [e["operation"] for e in flow.ledger.of("lapsed")] == ["reserve", "charge", "ship"]
