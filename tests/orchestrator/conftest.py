"""Fixtures for orchestrator tests: a control plane and step servers, in process.

The step servers are real grpc.aio servers running the sidecar's ProcessorServicer on
ephemeral ports, registered with the control plane like a sidecar registers; the
control plane discovers and calls them over the network. (Tests with sidecar processes
and a Node.js step live in tests/integration.)
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.hosting import ProcessorServicer
from flext_mesh.hosting.servicer import add_processor_servicer
from flext_mesh.orchestrator.formats import workflow_from_dict
from flext_mesh.rpc.payloads import dict_to_struct
from flext_mesh.server import ControlPlane, create_server
from flext_mesh.v1 import (
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    processor_pb2,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.orchestrator.apps import Ledger, processors
from tests.registry.conftest import fast_config

_ids = itertools.count(1)
ENDED = {
    orchestrator_pb2.EXECUTION_STATE_SUCCEEDED,
    orchestrator_pb2.EXECUTION_STATE_FAILED,
    orchestrator_pb2.EXECUTION_STATE_COMPENSATED,
    orchestrator_pb2.EXECUTION_STATE_COMPENSATION_FAILED,
    orchestrator_pb2.EXECUTION_STATE_CANCELLED,
}


@dataclass
class Flow:
    """A control plane, its orchestrator stub, and the step servers started so far."""

    plane: ControlPlane
    channel: grpc.aio.Channel
    stub: orchestrator_pb2_grpc.OrchestratorServiceStub
    registry: registry_pb2_grpc.RegistryServiceStub
    ledger: Ledger = field(default_factory=Ledger)
    servers: list[grpc.aio.Server] = field(default_factory=list)
    servicers: list[ProcessorServicer] = field(default_factory=list)

    async def serve(
        self,
        service: str,
        *operations: str,
        on_lost_answer: Callable[[str, str, processor_pb2.InvokeResponse], None] | None = None,
    ) -> str:
        """Serve ``operations`` of ``service`` on a new instance; returns its instance id."""
        servicer = ProcessorServicer(
            processors(service, *operations, ledger=self.ledger),
            service_name=service,
            instance_id=f"{service}-{next(_ids)}",
            on_lost_answer=on_lost_answer,
        )
        server = grpc.aio.server()
        add_processor_servicer(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.servers.append(server)
        self.servicers.append(servicer)
        request = registry_pb2.RegisterRequest(
            instance=registry_pb2.ServiceInstance(
                service_name=service,
                instance_id=servicer._instance_id,
                endpoint=f"127.0.0.1:{port}",
                health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
            )
        )
        request.ttl.FromSeconds(600)
        await self.registry.Register(request)
        return servicer._instance_id

    async def put(self, workflow: dict[str, Any]) -> orchestrator_pb2.Workflow:
        """PutWorkflow from a dict in the guide's or the proto's shape."""
        reply = await self.stub.PutWorkflow(
            orchestrator_pb2.PutWorkflowRequest(workflow=workflow_from_dict(workflow))
        )
        return reply.workflow

    async def start(
        self, workflow: str | dict[str, Any], payload: dict[str, Any] | None = None, **fields: Any
    ) -> orchestrator_pb2.Execution:
        """StartExecution of a stored workflow (by name) or an inline one (a dict)."""
        request = orchestrator_pb2.StartExecutionRequest(**fields)
        if isinstance(workflow, str):
            request.workflow_name = workflow
        else:
            request.inline_workflow.CopyFrom(workflow_from_dict(workflow))
        request.input.CopyFrom(dict_to_struct(payload or {}))
        return (await self.stub.StartExecution(request)).execution

    async def get(
        self, execution_id: str, *, events: bool = False
    ) -> orchestrator_pb2.GetExecutionResponse:
        return await self.stub.GetExecution(
            orchestrator_pb2.GetExecutionRequest(execution_id=execution_id, include_events=events)
        )

    async def wait(self, execution_id: str, within: float = 15.0) -> orchestrator_pb2.Execution:
        """Follow WatchExecution until the execution ends; returns it as it ended."""
        async with asyncio.timeout(within):
            stream = self.stub.WatchExecution(
                orchestrator_pb2.WatchExecutionRequest(execution_id=execution_id)
            )
            async for message in stream:
                if message.HasField("execution"):
                    assert message.execution.state in ENDED
                    return message.execution
        raise AssertionError("the watch ended without the execution")


@pytest.fixture
async def flow(tmp_path: Path) -> AsyncIterator[Flow]:
    plane, port = await create_server(fast_config(tmp_path))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    result = Flow(
        plane,
        channel,
        orchestrator_pb2_grpc.OrchestratorServiceStub(channel),
        registry_pb2_grpc.RegistryServiceStub(channel),
    )
    try:
        yield result
    finally:
        # The test may have swapped in a restarted control plane: stop the current one.
        await result.channel.close()
        await result.plane.stop(0.2)
        for server in result.servers:
            await server.stop(0)
        for servicer in result.servicers:
            servicer.close()


def states(execution: orchestrator_pb2.Execution) -> dict[str, str]:
    """Step name -> state name without the prefix, e.g. {"charge": "SUCCEEDED"}."""
    return {
        s.step_name: orchestrator_pb2.StepState.Name(s.state).removeprefix("STEP_STATE_")
        for s in execution.steps
    }


def state(execution: orchestrator_pb2.Execution) -> str:
    """The execution's state without the prefix."""
    return orchestrator_pb2.ExecutionState.Name(execution.state).removeprefix("EXECUTION_STATE_")


def kinds(events: Any) -> list[str]:
    """Event types without the prefix, with the step name: ["STEP_STARTED charge", ...]."""
    out = []
    for e in events:
        name = orchestrator_pb2.ExecutionEventType.Name(e.type).removeprefix(
            "EXECUTION_EVENT_TYPE_"
        )
        out.append(f"{name} {e.step_name}".strip())
    return out
