"""Ids and names of any size get a clear INVALID_ARGUMENT naming the field.

Every string id or name of every request of RegistryService, MetricsService and
OrchestratorService has a maximum length (names 63 characters, workflow names 54,
lease and execution ids 128, see docs/limits.md), checked before anything is looked
up. A 100 KB value used to come back whole inside a NOT_FOUND message, which a Python
client cannot even read (RESOURCE_EXHAUSTED: metadata over 16 KiB); now the status
names the field, says how long the value was, and quotes none of it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import grpc
import pytest

from flext_mesh.names import MAX_ID, MAX_QUOTED
from flext_mesh.orchestrator.engine import MAX_WORKFLOW_NAME
from flext_mesh.v1 import metrics_pb2, orchestrator_pb2, registry_pb2
from tests.robustness.conftest import StartPlane, instance
from tests.robustness.refusals import (
    MARKER,
    MAX_ECHO,
    Refusal,
    Stubs,
    open_stubs,
    refusal_of,
    refused,
    stream_refused,
)

Channels = Callable[[str], grpc.aio.Channel]
R, W = registry_pb2, orchestrator_pb2
HUGE = MARKER * 100_000
#: Most bytes of trailers a refusal of one oversized field may take.
MAX_TRAILERS = 2048


def _inline() -> orchestrator_pb2.Workflow:
    return W.Workflow(steps=[W.WorkflowStep(name="a", service="svc")])


async def _keep_alive(s: Stubs, value: str) -> Refusal:
    call = s.registry.KeepAlive()
    await call.write(R.KeepAliveRequest(lease_ids=["0" * 32, value]))
    try:
        reply = await call.read()
    except grpc.aio.AioRpcError as exc:
        return refusal_of(exc)
    raise AssertionError(f"KeepAlive answered {reply}")


_Request = Callable[[str], Any]


def _case(rpc: str, request: _Request, field: str) -> tuple[str, _Request, str]:
    """(``service.Method``, the request carrying a value, the field it must name)."""
    return rpc, request, field


def _call(s: Stubs, rpc: str, request: Any) -> Any:
    service, method = rpc.split(".")
    return getattr(getattr(s, service), method)(request)


def _record() -> metrics_pb2.CallRecord:
    return metrics_pb2.CallRecord(service_name="pay", operation="charge", duration_ms=1)


UNARY = [
    _case("registry.Heartbeat", lambda v: R.HeartbeatRequest(lease_id=v), "lease_id"),
    _case(
        "registry.Deregister",
        lambda v: R.DeregisterRequest(service_name="pay", instance_id=v),
        "instance_id",
    ),
    _case(
        "registry.Deregister",
        lambda v: R.DeregisterRequest(service_name=v, instance_id="p1"),
        "service_name",
    ),
    _case(
        "registry.Register",
        lambda v: R.RegisterRequest(instance=instance("pay", "p1", endpoint=v)),
        "instance.endpoint",
    ),
    _case(
        "registry.Register",
        lambda v: R.RegisterRequest(instance=instance("pay", "p1", labels={v: "x"})),
        "instance.labels",
    ),
    _case(
        "registry.Register",
        lambda v: R.RegisterRequest(instance=instance(v, "p1")),
        "instance.service_name",
    ),
    _case(
        "registry.Register",
        lambda v: R.RegisterRequest(instance=instance("pay", v)),
        "instance.instance_id",
    ),
    _case("registry.Discover", lambda v: R.DiscoverRequest(service_name=v), "service_name"),
    _case("registry.Discover", lambda v: R.DiscoverRequest(type=v), "type"),
    _case(
        "registry.Discover",
        lambda v: R.DiscoverRequest(service_name="pay", caller_zone=v),
        "caller_zone",
    ),
    _case(
        "registry.Discover",
        lambda v: R.DiscoverRequest(service_name="pay", label_selector={v: "x"}),
        "label_selector",
    ),
    _case("registry.ListServices", lambda v: R.ListServicesRequest(type=v), "type"),
    _case(
        "registry.GetServicePolicy",
        lambda v: R.GetServicePolicyRequest(service_name=v),
        "service_name",
    ),
    _case(
        "registry.DeleteServicePolicy",
        lambda v: R.DeleteServicePolicyRequest(service_name=v),
        "service_name",
    ),
    _case(
        "registry.PutServicePolicy",
        lambda v: R.PutServicePolicyRequest(policy=R.ServicePolicy(service_name=v)),
        "policy.service_name",
    ),
    _case(
        "metrics.GetServiceReport",
        lambda v: metrics_pb2.GetServiceReportRequest(service_name=v),
        "service_name",
    ),
    _case(
        "metrics.GetServiceReport",
        lambda v: metrics_pb2.GetServiceReportRequest(service_name="pay", operation=v),
        "operation",
    ),
    _case(
        "metrics.ListAlerts",
        lambda v: metrics_pb2.ListAlertsRequest(service_name=v),
        "service_name",
    ),
    _case(
        "metrics.ListAlerts", lambda v: metrics_pb2.ListAlertsRequest(page_token=v), "page_token"
    ),
    _case(
        "metrics.ReportCalls",
        lambda v: metrics_pb2.ReportCallsRequest(
            records=[_record()], reporter_id=v, batch_sequence=1
        ),
        "reporter_id",
    ),
    _case("orchestrator.GetWorkflow", lambda v: W.GetWorkflowRequest(name=v), "name"),
    _case("orchestrator.DeleteWorkflow", lambda v: W.DeleteWorkflowRequest(name=v), "name"),
    _case(
        "orchestrator.PutWorkflow",
        lambda v: W.PutWorkflowRequest(workflow=W.Workflow(name=v, steps=_inline().steps)),
        "workflow.name",
    ),
    _case(
        "orchestrator.ListWorkflows", lambda v: W.ListWorkflowsRequest(page_token=v), "page_token"
    ),
    _case(
        "orchestrator.StartExecution",
        lambda v: W.StartExecutionRequest(workflow_name=v),
        "workflow_name",
    ),
    _case(
        "orchestrator.StartExecution",
        lambda v: W.StartExecutionRequest(inline_workflow=_inline(), idempotency_key=v),
        "idempotency_key",
    ),
    _case(
        "orchestrator.StartExecution",
        lambda v: W.StartExecutionRequest(inline_workflow=_inline(), correlation_id=v),
        "correlation_id",
    ),
    _case(
        "orchestrator.GetExecution", lambda v: W.GetExecutionRequest(execution_id=v), "execution_id"
    ),
    _case(
        "orchestrator.CancelExecution",
        lambda v: W.CancelExecutionRequest(execution_id=v),
        "execution_id",
    ),
    _case(
        "orchestrator.ListExecutions",
        lambda v: W.ListExecutionsRequest(workflow_name=v),
        "workflow_name",
    ),
    _case(
        "orchestrator.ListExecutions", lambda v: W.ListExecutionsRequest(page_token=v), "page_token"
    ),
]

STREAMS = [
    _case("registry.Watch", lambda v: R.WatchRequest(service_names=[v]), "service_names[0]"),
    _case(
        "orchestrator.WatchExecution",
        lambda v: W.WatchExecutionRequest(execution_id=v),
        "execution_id",
    ),
]


def _assert_clear(refusal: Refusal, field: str) -> None:
    assert refusal.code is grpc.StatusCode.INVALID_ARGUMENT, refusal.message
    assert field in refusal.fields, refusal.violations
    assert refusal.echoed() <= MAX_ECHO, refusal.message[:500]
    assert refusal.trailer_bytes < MAX_TRAILERS


async def test_every_oversized_id_or_name_is_invalid_argument_naming_it(
    start_plane: StartPlane, channels: Channels
) -> None:
    s = await open_stubs(start_plane, channels)
    for rpc, request, field in UNARY:
        refusal = await refused(_call(s, rpc, request(HUGE)))
        try:
            _assert_clear(refusal, field)
        except AssertionError as exc:
            raise AssertionError(f"{rpc} {field}: {exc}") from exc
    for rpc, request, field in STREAMS:
        refusal = await stream_refused(_call(s, rpc, request(HUGE)))
        try:
            _assert_clear(refusal, field)
        except AssertionError as exc:
            raise AssertionError(f"{rpc} {field}: {exc}") from exc
    _assert_clear(await _keep_alive(s, HUGE), "lease_ids[1]")
    # Still serving, and still answering what it should.
    listed = await s.registry.ListServices(R.ListServicesRequest())
    assert list(listed.services) == []


async def test_a_1000_character_workflow_name_is_invalid_not_unknown(
    start_plane: StartPlane, channels: Channels
) -> None:
    s = await open_stubs(start_plane, channels)
    long = await refused(s.orchestrator.GetWorkflow(W.GetWorkflowRequest(name="w" * 1000)))
    assert long.code is grpc.StatusCode.INVALID_ARGUMENT
    assert long.violations == [("name", f"is 1000 characters long; at most {MAX_WORKFLOW_NAME}")]
    # The longest name a workflow can have is looked up: unknown, NOT_FOUND.
    longest = "w" * MAX_WORKFLOW_NAME
    unknown = await refused(s.orchestrator.GetWorkflow(W.GetWorkflowRequest(name=longest)))
    assert unknown.code is grpc.StatusCode.NOT_FOUND
    one_more = await refused(s.orchestrator.GetWorkflow(W.GetWorkflowRequest(name=longest + "w")))
    assert one_more.code is grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("length", [MAX_ID, MAX_ID + 1])
async def test_ids_up_to_the_limit_are_looked_up_and_quoted_short(
    start_plane: StartPlane, channels: Channels, length: int
) -> None:
    s = await open_stubs(start_plane, channels)
    value = MARKER * length
    orchestrator = s.orchestrator
    execution = await refused(orchestrator.GetExecution(W.GetExecutionRequest(execution_id=value)))
    cancel = await refused(
        orchestrator.CancelExecution(W.CancelExecutionRequest(execution_id=value))
    )
    lease = await refused(s.registry.Heartbeat(R.HeartbeatRequest(lease_id=value)))
    if length > MAX_ID:
        too_long = f"is {length} characters long; at most {MAX_ID}"
        for refusal, field in ((execution, "execution_id"), (cancel, "execution_id")):
            assert refusal.code is grpc.StatusCode.INVALID_ARGUMENT
            assert refusal.violations == [(field, too_long)]
            assert refusal.echoed() == 0
        assert lease.code is grpc.StatusCode.INVALID_ARGUMENT
        assert lease.violations == [("lease_id", too_long)]
        return
    for refusal in (execution, cancel, lease):
        assert refusal.code is grpc.StatusCode.NOT_FOUND, refusal.message
    # A NOT_FOUND names the execution by the start of its id, with an ellipsis.
    assert execution.echoed() < MAX_QUOTED
    assert "…" in execution.message
    renewed = s.registry.KeepAlive()
    await renewed.write(R.KeepAliveRequest(lease_ids=[value]))
    reply = await renewed.read()
    assert list(reply.expired_lease_ids) == [value]
    await renewed.done_writing()
