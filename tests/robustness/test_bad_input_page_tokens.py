"""Page tokens are opaque and checked by every List RPC.

A token the control plane did not make (``AAAA``, the base64 of some text, the base64
of a real cursor as older releases made them) or a token sent with another query than
the one that made it is INVALID_ARGUMENT naming ``page_token``; tokens made by one
control plane work after it restarts (and on any replica: the checksum key is fixed).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc

from flext_mesh.paging import MAX_PAGE_TOKEN
from flext_mesh.server import create_server
from flext_mesh.v1 import metrics_pb2, orchestrator_pb2, registry_pb2
from tests.registry.conftest import fast_config
from tests.robustness.conftest import StartPlane, register_request
from tests.robustness.refusals import MAX_ECHO, Refusal, Stubs, open_stubs, refused, stubs_on

Channels = Callable[[str], grpc.aio.Channel]
W = orchestrator_pb2
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE.value[0]


def _b64(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode()


#: Tokens nobody handed out: base64 that decodes, to nothing useful or to a real
#: cursor (what a token was before tokens were checked).
FORGED = ["AAAA", _b64("hello world"), _b64("w-b"), _b64("100"), _b64("0"), "x" * 600]


def _refuses_token(refusal: Refusal) -> None:
    assert refusal.code is grpc.StatusCode.INVALID_ARGUMENT, refusal.message
    assert refusal.fields == ["page_token"], refusal.violations
    assert refusal.echoed("x") <= MAX_ECHO


async def _workflows(s: Stubs, *names: str) -> None:
    for name in names:
        step = W.WorkflowStep(name="a", service="svc")
        await s.orchestrator.PutWorkflow(
            W.PutWorkflowRequest(workflow=W.Workflow(name=name, steps=[step]))
        )


async def _executions(s: Stubs, workflow: str, count: int) -> None:
    """Executions of an inline workflow whose step's service does not exist."""
    for _ in range(count):
        inline = W.Workflow(name=workflow, steps=[W.WorkflowStep(name="a", service="nobody")])
        await s.orchestrator.StartExecution(W.StartExecutionRequest(inline_workflow=inline))


async def _alerts(s: Stubs) -> None:
    """Several firing alerts: every other call of two services fails."""
    records = [
        metrics_pb2.CallRecord(
            service_name=service,
            operation=operation,
            duration_ms=5,
            success=i % 2 == 0,
            status_code=0 if i % 2 == 0 else UNAVAILABLE,
        )
        for service in ("pay", "cart")
        for operation in ("a", "b")
        for i in range(60)
    ]
    await s.metrics.ReportCalls(metrics_pb2.ReportCallsRequest(records=records))
    await s.plane.metrics.evaluate_alerts()  # the control plane does this every 10 s


async def test_forged_tokens_are_refused_by_list_workflows_executions_and_alerts(
    start_plane: StartPlane, channels: Channels
) -> None:
    s = await open_stubs(start_plane, channels)
    await _workflows(s, "w-a", "w-b", "w-c")
    await _executions(s, "w", 3)
    await _alerts(s)
    lists: dict[str, Callable[[str], Any]] = {
        "ListWorkflows": lambda t: s.orchestrator.ListWorkflows(
            W.ListWorkflowsRequest(page_size=1, page_token=t)
        ),
        "ListExecutions": lambda t: s.orchestrator.ListExecutions(
            W.ListExecutionsRequest(page_size=1, page_token=t)
        ),
        "ListAlerts": lambda t: s.metrics.ListAlerts(
            metrics_pb2.ListAlertsRequest(page_size=1, page_token=t)
        ),
    }
    for name, listing in lists.items():
        first = await listing("")
        assert first.next_page_token, name  # there is a next page to ask for
        assert len(first.next_page_token) <= MAX_PAGE_TOKEN
        for token in FORGED:
            try:
                _refuses_token(await refused(listing(token)))
            except AssertionError as exc:
                raise AssertionError(f"{name} accepted {token[:20]!r}: {exc}") from exc
        # One character changed in a real token: refused too.
        real = first.next_page_token
        tampered = real[:-1] + ("A" if real[-1] != "A" else "B")
        _refuses_token(await refused(listing(tampered)))
        # The real one still works.
        assert await listing(real)


async def test_forged_tokens_are_refused_by_list_services(
    start_plane: StartPlane, channels: Channels
) -> None:
    s = await open_stubs(start_plane, channels)
    for service in ("s-a", "s-b", "s-c"):
        await s.registry.Register(register_request(service, "i1"))
    first = await s.registry.ListServices(registry_pb2.ListServicesRequest(page_size=1))
    assert first.next_page_token
    for token in FORGED:
        _refuses_token(
            await refused(
                s.registry.ListServices(
                    registry_pb2.ListServicesRequest(page_size=1, page_token=token)
                )
            )
        )
    other_type = await refused(
        s.registry.ListServices(
            registry_pb2.ListServicesRequest(
                page_size=1, page_token=first.next_page_token, type="web"
            )
        )
    )
    _refuses_token(other_type)


async def test_a_token_is_refused_with_another_query(
    start_plane: StartPlane, channels: Channels
) -> None:
    s = await open_stubs(start_plane, channels)
    await _workflows(s, "w-a", "w-b", "w-c")
    await _executions(s, "one", 3)
    await _executions(s, "two", 3)
    await _alerts(s)
    executions = await s.orchestrator.ListExecutions(
        W.ListExecutionsRequest(workflow_name="one", page_size=1)
    )
    token = executions.next_page_token
    assert token
    for other in (
        W.ListExecutionsRequest(workflow_name="two", page_size=1, page_token=token),
        W.ListExecutionsRequest(page_size=1, page_token=token),
        W.ListExecutionsRequest(
            workflow_name="one",
            state=W.EXECUTION_STATE_FAILED,
            page_size=1,
            page_token=token,
        ),
    ):
        _refuses_token(await refused(s.orchestrator.ListExecutions(other)))
    # The same query with another page size is the same listing: accepted.
    more = await s.orchestrator.ListExecutions(
        W.ListExecutionsRequest(workflow_name="one", page_size=5, page_token=token)
    )
    assert [e.workflow_name for e in more.executions] == ["one", "one"]

    # A token of one listing is no token of another.
    workflows = await s.orchestrator.ListWorkflows(W.ListWorkflowsRequest(page_size=1))
    _refuses_token(
        await refused(
            s.orchestrator.ListExecutions(
                W.ListExecutionsRequest(page_token=workflows.next_page_token)
            )
        )
    )
    _refuses_token(
        await refused(s.orchestrator.ListWorkflows(W.ListWorkflowsRequest(page_token=token)))
    )

    alerts = await s.metrics.ListAlerts(metrics_pb2.ListAlertsRequest(page_size=1))
    assert alerts.next_page_token
    for other_alerts in (
        metrics_pb2.ListAlertsRequest(service_name="pay", page_token=alerts.next_page_token),
        metrics_pb2.ListAlertsRequest(
            min_severity=metrics_pb2.ALERT_SEVERITY_CRITICAL, page_token=alerts.next_page_token
        ),
    ):
        _refuses_token(await refused(s.metrics.ListAlerts(other_alerts)))


async def test_tokens_outlive_the_control_plane_that_made_them(tmp_path: Path) -> None:
    plane, port = await create_server(fast_config(tmp_path))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        s = stubs_on(plane, channel)
        await _workflows(s, "w-a", "w-b", "w-c")
        first = await s.orchestrator.ListWorkflows(W.ListWorkflowsRequest(page_size=2))
    finally:
        await channel.close()
        await plane.stop(0.2)
    assert [w.name for w in first.workflows] == ["w-a", "w-b"]

    again, port = await create_server(fast_config(tmp_path))  # same store, new process state
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        s = stubs_on(again, channel)
        rest = await s.orchestrator.ListWorkflows(
            W.ListWorkflowsRequest(page_size=2, page_token=first.next_page_token)
        )
    finally:
        await channel.close()
        await again.stop(0.2)
    assert [w.name for w in rest.workflows] == ["w-c"]
    assert rest.next_page_token == ""
