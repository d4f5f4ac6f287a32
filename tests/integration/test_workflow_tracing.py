"""Each workflow execution is one trace, on real processes, across a control-plane kill.

The control plane and the step sidecars export over OTLP to an in-process receiver
(tests/sidecar/test_tracing.py's). A saga whose second step is refused: the execution's
span (child of the StartExecution caller's), a span per step attempt and per
compensation under it, and each sidecar's server span under the attempt that called
it. Then an execution whose control plane is killed (SIGKILL) mid-step and started
again: the new process's spans still hang from the execution span chosen at its start,
which the new process emits when the execution ends.
"""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from opentelemetry.proto.trace.v1 import trace_pb2

from flext_mesh.orchestrator.formats import workflow_from_dict
from flext_mesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc
from tests.conftest import ServeProcess, start_serve
from tests.integration.saga_fleet import APPS, healthy_instances, until
from tests.otlp_receiver import Receiver, Span, running_receiver
from tests.sidecar.test_sidecar_process import SidecarProcess, start_sidecar

CALLER_SPAN = "00f067aa0ba902b7"
SERVER = trace_pb2.Span.SPAN_KIND_SERVER
CLIENT = trace_pb2.Span.SPAN_KIND_CLIENT
ERROR = trace_pb2.Status.STATUS_CODE_ERROR

SAGA = {
    "name": "traced_saga",
    "steps": [
        {"name": "charge", "service": "payment", "compensation": "refund"},
        {"name": "reserve", "service": "inventory", "depends_on": ["charge"]},
    ],
}
SLOW = {
    "name": "traced_slow",
    "steps": [
        {"name": "reserve", "service": "inventory"},
        {"name": "charge", "service": "payment", "depends_on": ["reserve"]},
    ],
}


def _otel(port: int) -> dict[str, str]:
    return {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{port}",
        "OTEL_EXPORTER_OTLP_INSECURE": "true",
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sidecars(tmp: Path, plane: str, port: int) -> list[SidecarProcess]:
    return [
        start_sidecar(
            tmp,
            plane,
            "--service",
            service,
            "--instance-id",
            f"{service}-1",
            "--ttl",
            "30",
            app=f"tests.orchestrator.apps:{APPS[service]}",
            env=_otel(port),
        )
        for service in ("payment", "inventory")
    ]


def _stop(processes: list[SidecarProcess], plane: ServeProcess | None) -> None:
    for sidecar in processes:
        sidecar.proc.send_signal(signal.SIGTERM)
    for sidecar in processes:
        sidecar.proc.wait(15)
    if plane is not None and plane.proc.poll() is None:
        plane.terminate()


def _start(address: str, workflow: dict[str, Any], data: dict[str, Any], trace: str) -> str:
    with grpc.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        stub.PutWorkflow(
            orchestrator_pb2.PutWorkflowRequest(workflow=workflow_from_dict(workflow)),
            timeout=10,
        )
        request = orchestrator_pb2.StartExecutionRequest(workflow_name=workflow["name"])
        request.input.update(data)
        reply = stub.StartExecution(
            request, timeout=10, metadata=(("traceparent", f"00-{trace}-{CALLER_SPAN}-01"),)
        )
    return reply.execution.execution_id


def _execution(address: str, execution_id: str) -> orchestrator_pb2.Execution:
    with grpc.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        request = orchestrator_pb2.GetExecutionRequest(execution_id=execution_id)
        return stub.GetExecution(request, timeout=10).execution


def _ended(address: str, execution_id: str) -> bool:
    try:
        state = _execution(address, execution_id).state
    except grpc.RpcError:
        return False
    return state not in (
        orchestrator_pb2.EXECUTION_STATE_PENDING,
        orchestrator_pb2.EXECUTION_STATE_RUNNING,
        orchestrator_pb2.EXECUTION_STATE_COMPENSATING,
    )


def _named(spans: list[Span], service: str, name: str, kind: int) -> list[Span]:
    return [s for s in spans if (s.service, s.name, s.kind) == (service, name, kind)]


@pytest.fixture(scope="module")
def collected() -> Iterator[tuple[Receiver, int]]:
    with running_receiver() as running:
        yield running


def test_a_saga_is_one_trace_of_attempts_and_compensations(
    collected: tuple[Receiver, int], tmp_path: Path
) -> None:
    found, port = collected
    trace = "6bf92f3577b34da6a3ce929d0e0e4731"
    plane = start_serve(tmp_path, env=_otel(port))
    sidecars: list[SidecarProcess] = []
    try:
        sidecars = _sidecars(tmp_path, plane.address, port)
        for service in ("payment", "inventory"):
            until(lambda s=service: bool(healthy_instances(plane.address, s)), 15, service)
        data = {"key": "t-1", "behaviour": {"reserve": {"fail": "FAILED_PRECONDITION"}}}
        execution_id = _start(plane.address, SAGA, data, trace)
        until(lambda: _ended(plane.address, execution_id), 20, "the saga ended")
        stored = _execution(plane.address, execution_id)
        until(lambda: len(found.of_trace(trace)) >= 7, 15, "every span exported")
    finally:
        _stop(sidecars, plane)

    spans = found.of_trace(trace)
    (execution,) = _named(
        spans, "flext-mesh", "workflow traced_saga", trace_pb2.Span.SPAN_KIND_INTERNAL
    )
    assert execution.parent == CALLER_SPAN
    assert stored.traceparent == f"00-{trace}-{execution.span_id}-01"
    assert stored.trace_parent_span_id == CALLER_SPAN
    assert execution.status == ERROR  # the saga failed (compensated)
    assert execution.attributes["flext_mesh.execution_id"] == execution_id
    (charge,) = _named(spans, "flext-mesh", "step charge", CLIENT)
    (reserve,) = _named(spans, "flext-mesh", "step reserve", CLIENT)
    (refund,) = _named(spans, "flext-mesh", "compensate charge", CLIENT)
    assert {charge.parent, reserve.parent, refund.parent} == {execution.span_id}
    assert reserve.status == ERROR
    served = {
        s.attributes["flext_mesh.operation"]: s
        for s in spans
        if s.kind == SERVER and s.name == "flext_mesh.v1.ProcessorService/Invoke"
    }
    assert served["charge"].parent == charge.span_id
    assert served["charge"].service == "payment"
    assert served["reserve"].parent == reserve.span_id
    assert served["refund"].parent == refund.span_id


def test_the_trace_goes_on_after_the_control_plane_is_killed_mid_step(
    collected: tuple[Receiver, int], tmp_path: Path
) -> None:
    found, port = collected
    trace = "7bf92f3577b34da6a3ce929d0e0e4732"
    listen = f"127.0.0.1:{_free_port()}"
    args = ("--listen", listen, "--store", f"sqlite:///{tmp_path / 'kept.db'}")
    plane = start_serve(tmp_path, *args, env=_otel(port))
    sidecars: list[SidecarProcess] = []
    second: ServeProcess | None = None
    try:
        sidecars = _sidecars(tmp_path, plane.address, port)
        for service in ("payment", "inventory"):
            until(lambda s=service: bool(healthy_instances(plane.address, s)), 15, service)
        data = {"key": "t-2", "behaviour": {"reserve": {"sleep": 1.5}}}
        execution_id = _start(plane.address, SLOW, data, trace)
        time.sleep(0.5)  # reserve is running on the sidecar
        plane.kill()
        second = start_serve(tmp_path, *args, env=_otel(port))
        until(lambda: _ended(second.address, execution_id), 30, "the execution ended")
        stored = _execution(second.address, execution_id)
        assert stored.state == orchestrator_pb2.EXECUTION_STATE_SUCCEEDED
        until(
            lambda: bool(_named(found.of_trace(trace), "flext-mesh", "workflow traced_slow", 1)),
            15,
            "the execution span exported",
        )
        until(
            lambda: bool(_named(found.of_trace(trace), "flext-mesh", "step charge", CLIENT)),
            15,
            "charge",
        )
    finally:
        _stop(sidecars, second)

    spans = found.of_trace(trace)
    (execution,) = _named(spans, "flext-mesh", "workflow traced_slow", 1)
    assert stored.traceparent == f"00-{trace}-{execution.span_id}-01"  # chosen by the first
    assert execution.parent == CALLER_SPAN
    # The second process resent reserve and ran charge: both under the same span.
    resent = _named(spans, "flext-mesh", "step reserve", CLIENT)
    assert resent, "the resend of reserve after the restart has a span"
    assert {s.parent for s in resent} == {execution.span_id}
    (charge,) = _named(spans, "flext-mesh", "step charge", CLIENT)
    assert charge.parent == execution.span_id
