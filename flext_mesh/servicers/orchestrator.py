"""OrchestratorService: protobuf in, Orchestrator calls, protobuf out."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc

from flext_mesh.orchestrator.engine import Orchestrator
from flext_mesh.rpc import tracing
from flext_mesh.rpc.context import TRACEPARENT_HEADER
from flext_mesh.rpc.handlers import add_servicer
from flext_mesh.rpc.status import rpc_errors
from flext_mesh.servicers.watchers import WatchLimit
from flext_mesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc

__all__ = ["OrchestratorServicer", "add_orchestrator_servicer"]

_Context = grpc.aio.ServicerContext[Any, Any]


class OrchestratorServicer(orchestrator_pb2_grpc.OrchestratorServiceServicer):
    """Serves workflow definitions and executions."""

    def __init__(self, orchestrator: Orchestrator, watchers: WatchLimit | None = None) -> None:
        """``watchers`` counts open watch streams per client (shared with the registry's
        Watch); a default limit of 64 when None."""
        self.orchestrator = orchestrator
        self.watchers = watchers if watchers is not None else WatchLimit()

    @rpc_errors
    async def PutWorkflow(
        self, request: orchestrator_pb2.PutWorkflowRequest, context: _Context
    ) -> orchestrator_pb2.PutWorkflowResponse:
        """Create or replace a definition."""
        workflow, changed = await self.orchestrator.put_workflow(request.workflow)
        return orchestrator_pb2.PutWorkflowResponse(workflow=workflow, changed=changed)

    @rpc_errors
    async def GetWorkflow(
        self, request: orchestrator_pb2.GetWorkflowRequest, context: _Context
    ) -> orchestrator_pb2.GetWorkflowResponse:
        """One definition."""
        workflow = await self.orchestrator.get_workflow(request.name, request.version)
        return orchestrator_pb2.GetWorkflowResponse(workflow=workflow)

    @rpc_errors
    async def ListWorkflows(
        self, request: orchestrator_pb2.ListWorkflowsRequest, context: _Context
    ) -> orchestrator_pb2.ListWorkflowsResponse:
        """Definitions by name, paged."""
        workflows, token = await self.orchestrator.list_workflows(
            request.page_size, request.page_token
        )
        return orchestrator_pb2.ListWorkflowsResponse(workflows=workflows, next_page_token=token)

    @rpc_errors
    async def DeleteWorkflow(
        self, request: orchestrator_pb2.DeleteWorkflowRequest, context: _Context
    ) -> orchestrator_pb2.DeleteWorkflowResponse:
        """Delete a definition."""
        await self.orchestrator.delete_workflow(request.name)
        return orchestrator_pb2.DeleteWorkflowResponse()

    @rpc_errors
    async def StartExecution(
        self, request: orchestrator_pb2.StartExecutionRequest, context: _Context
    ) -> orchestrator_pb2.StartExecutionResponse:
        """Persist and start an execution; with ``wait``, answer once it ended."""
        execution, existing = await self.orchestrator.start_execution(
            request, caller_traceparent=_caller_traceparent(context)
        )
        if request.wait:
            execution = await self._ended(execution, context)
        return orchestrator_pb2.StartExecutionResponse(execution=execution, existing=existing)

    @rpc_errors
    async def RetryExecution(
        self, request: orchestrator_pb2.RetryExecutionRequest, context: _Context
    ) -> orchestrator_pb2.RetryExecutionResponse:
        """Run an ended execution again as a new one; with ``wait``, answer once it ended."""
        execution = await self.orchestrator.retry_execution(
            request.execution_id, caller_traceparent=_caller_traceparent(context)
        )
        if request.wait:
            execution = await self._ended(execution, context)
        return orchestrator_pb2.RetryExecutionResponse(execution=execution)

    async def _ended(
        self, execution: orchestrator_pb2.Execution, context: _Context
    ) -> orchestrator_pb2.Execution:
        """``execution`` once it ended, waited for as one of the caller's watches."""
        release = self.watchers.acquire(context)
        try:
            return await self.orchestrator.wait_ended(execution)
        finally:
            release()

    @rpc_errors
    async def GetExecution(
        self, request: orchestrator_pb2.GetExecutionRequest, context: _Context
    ) -> orchestrator_pb2.GetExecutionResponse:
        """One execution, with its history on request."""
        execution, events = await self.orchestrator.get_execution(
            request.execution_id, include_events=request.include_events
        )
        return orchestrator_pb2.GetExecutionResponse(execution=execution, events=events)

    @rpc_errors
    async def ListExecutions(
        self, request: orchestrator_pb2.ListExecutionsRequest, context: _Context
    ) -> orchestrator_pb2.ListExecutionsResponse:
        """Executions newest first, filtered and paged."""
        executions, token = await self.orchestrator.list_executions(
            request.workflow_name, request.state, request.page_size, request.page_token
        )
        return orchestrator_pb2.ListExecutionsResponse(executions=executions, next_page_token=token)

    @rpc_errors
    async def CancelExecution(
        self, request: orchestrator_pb2.CancelExecutionRequest, context: _Context
    ) -> orchestrator_pb2.CancelExecutionResponse:
        """Cancel and compensate."""
        execution = await self.orchestrator.cancel_execution(request.execution_id, request.reason)
        return orchestrator_pb2.CancelExecutionResponse(execution=execution)

    @rpc_errors
    async def WatchExecution(
        self, request: orchestrator_pb2.WatchExecutionRequest, context: _Context
    ) -> AsyncIterator[orchestrator_pb2.WatchExecutionResponse]:
        """Events until the execution ends; RESOURCE_EXHAUSTED when the caller already
        holds its most open watch streams."""
        release = self.watchers.acquire(context)
        try:
            async for message in self.orchestrator.watch_execution(
                request.execution_id, request.after_index
            ):
                yield message
        finally:
            release()

    @rpc_errors
    async def RecordStepResult(
        self, request: orchestrator_pb2.RecordStepResultRequest, context: _Context
    ) -> orchestrator_pb2.RecordStepResultResponse:
        """Keep the result of a step call whose answer was lost (shared idempotency)."""
        await self.orchestrator.record_step_result(
            request.service_name, request.operation, request.idempotency_key, request.result
        )
        return orchestrator_pb2.RecordStepResultResponse()


def _caller_traceparent(context: _Context) -> str:
    """The caller's traceparent header while tracing is on ("" otherwise)."""
    if not tracing.enabled():
        return ""
    return next(
        (str(v) for k, v in context.invocation_metadata() or () if k == TRACEPARENT_HEADER),
        "",
    )


def add_orchestrator_servicer(servicer: OrchestratorServicer, server: grpc.aio.Server) -> None:
    """Serve the orchestrator."""
    add_servicer(
        server, servicer, orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"]
    )
