"""Workflows across real processes: `flext-mesh serve`, `flext-sidecar`s, a Node.js step.

The guide's order-fulfillment and user-registration workflows run against sidecar
processes hosting the step processors (tests/orchestrator/apps.py); each processor
keeps a ledger of the side effects it really performed, read back through its
``ledger`` operation. The control plane is killed with SIGKILL mid-execution and
restarted on the same store: the execution completes and no step acted twice.
"""

from __future__ import annotations

import concurrent.futures
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.orchestrator.formats import workflow_from_dict
from flext_mesh.rpc.payloads import dict_to_struct, struct_to_dict
from flext_mesh.v1 import (
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    processor_pb2,
    processor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.conftest import REPO, ServeProcess, start_serve
from tests.sidecar.test_sidecar_process import SidecarProcess, start_sidecar

pytestmark = pytest.mark.xdist_group("workflows")

NODE_SERVER = REPO / "tests" / "polyglot" / "processor_server.mjs"
SERVICES = {
    "payment": "PAYMENT",
    "inventory": "INVENTORY",
    "auth": "AUTH",
    "users": "USERS",
    "notification": "NOTIFICATION",
}

ORDER_FULFILLMENT = {
    "workflow_id": "order_fulfillment",
    "steps": [
        {"step": "validate_payment", "service": "payment", "required": True},
        {
            "step": "reserve_inventory",
            "service": "inventory",
            "required": True,
            "depends_on": ["validate_payment"],
            "compensation": {"operation": "release_inventory"},
        },
        {
            "step": "process_payment",
            "service": "payment",
            "required": True,
            "depends_on": ["reserve_inventory"],
            "compensation": {"operation": "refund_payment"},
        },
    ],
}

USER_REGISTRATION = {
    "workflow_id": "user_registration",
    "steps": [
        {"step": "authenticate_request", "service": "auth", "required": True},
        {
            "step": "create_user_profile",
            "service": "users",
            "required": True,
            "depends_on": ["authenticate_request"],
            "compensation": {"operation": "delete_user_profile"},
        },
        {
            "step": "send_welcome_notification",
            "service": "notification",
            "required": False,
            "depends_on": ["create_user_profile"],
            "timeout_ms": 3000,
        },
    ],
}


@dataclass
class Mesh:
    """A control plane subprocess and one sidecar process per service."""

    tmp: Path
    plane: ServeProcess
    sidecars: dict[str, SidecarProcess]

    @property
    def address(self) -> str:
        return self.plane.address

    def orchestrator(self, channel: grpc.Channel) -> orchestrator_pb2_grpc.OrchestratorServiceStub:
        return orchestrator_pb2_grpc.OrchestratorServiceStub(channel)

    def put(self, workflow: dict[str, Any]) -> None:
        with grpc.insecure_channel(self.address) as channel:
            self.orchestrator(channel).PutWorkflow(
                orchestrator_pb2.PutWorkflowRequest(workflow=workflow_from_dict(workflow)),
                timeout=10,
            )

    def start(self, name: str, payload: dict[str, Any]) -> str:
        with grpc.insecure_channel(self.address) as channel:
            reply = self.orchestrator(channel).StartExecution(
                orchestrator_pb2.StartExecutionRequest(
                    workflow_name=name, input=dict_to_struct(payload)
                ),
                timeout=10,
            )
        return reply.execution.execution_id

    def wait(self, execution_id: str, within: float = 20.0) -> orchestrator_pb2.Execution:
        """Follow WatchExecution to the end (watching again if the stream breaks)."""
        deadline = time.monotonic() + within
        last = 0
        while time.monotonic() < deadline:
            try:
                with grpc.insecure_channel(self.address) as channel:
                    stream = self.orchestrator(channel).WatchExecution(
                        orchestrator_pb2.WatchExecutionRequest(
                            execution_id=execution_id, after_index=last
                        ),
                        timeout=max(0.1, deadline - time.monotonic()),
                    )
                    for message in stream:
                        if message.HasField("event"):
                            last = message.event.index
                        if message.HasField("execution"):
                            return message.execution
            except grpc.RpcError:
                time.sleep(0.2)
        raise AssertionError(f"execution {execution_id} did not end within {within} s")

    def get(self, execution_id: str) -> orchestrator_pb2.GetExecutionResponse:
        with grpc.insecure_channel(self.address) as channel:
            return self.orchestrator(channel).GetExecution(
                orchestrator_pb2.GetExecutionRequest(
                    execution_id=execution_id, include_events=True
                ),
                timeout=10,
            )

    def ledger(self, service: str, key: str) -> list[dict[str, Any]]:
        """Side effects the service's sidecar really performed for ``key``."""
        with grpc.insecure_channel(self.sidecars[service].address) as channel:
            reply = processor_pb2_grpc.ProcessorServiceStub(channel).Invoke(
                processor_pb2.InvokeRequest(
                    operation="ledger", payload=dict_to_struct({"key": key})
                ),
                timeout=10,
            )
        entries: list[dict[str, Any]] = struct_to_dict(reply.result)["entries"]
        return entries


def _start_sidecars(tmp: Path, address: str) -> dict[str, SidecarProcess]:
    with concurrent.futures.ThreadPoolExecutor(len(SERVICES)) as pool:
        futures = {
            service: pool.submit(
                start_sidecar,
                tmp,
                address,
                "--service",
                service,
                "--ttl",
                "5",
                app=f"tests.orchestrator.apps:{attr}",
            )
            for service, attr in SERVICES.items()
        }
        return {service: future.result() for service, future in futures.items()}


def _registered(address: str, services: set[str]) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = registry_pb2_grpc.RegistryServiceStub(channel).ListServices(
            registry_pb2.ListServicesRequest(), timeout=5
        )
    return services <= {s.service_name for s in reply.services}


def _until(check: Any, within: float = 15.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("workflows")
    plane = start_serve(tmp, "--health-check-interval", "0.5")
    sidecars = _start_sidecars(tmp, plane.address)
    mesh = Mesh(tmp, plane, sidecars)
    try:
        _until(lambda: _registered(plane.address, set(SERVICES)))
        mesh.put(ORDER_FULFILLMENT)
        mesh.put(USER_REGISTRATION)
        yield mesh
    finally:
        for sidecar in sidecars.values():
            sidecar.proc.send_signal(signal.SIGTERM)
        mesh.plane.terminate()
        for sidecar in sidecars.values():
            try:
                sidecar.proc.wait(15)
            except subprocess.TimeoutExpired:
                sidecar.proc.kill()


def _states(execution: orchestrator_pb2.Execution) -> dict[str, str]:
    return {
        s.step_name: orchestrator_pb2.StepState.Name(s.state).removeprefix("STEP_STATE_")
        for s in execution.steps
    }


def _state(execution: orchestrator_pb2.Execution) -> str:
    return orchestrator_pb2.ExecutionState.Name(execution.state).removeprefix("EXECUTION_STATE_")


def test_the_guide_order_fulfillment_runs_on_sidecars(mesh: Mesh) -> None:
    done = mesh.wait(mesh.start("order_fulfillment", {"key": "order-1", "amount": 25}))
    assert _state(done) == "SUCCEEDED", done
    assert _states(done) == {
        "validate_payment": "SUCCEEDED",
        "reserve_inventory": "SUCCEEDED",
        "process_payment": "SUCCEEDED",
    }
    assert {s.instance_id for s in done.steps} == {
        mesh.sidecars["payment"].instance,
        mesh.sidecars["inventory"].instance,
    }
    payments = [e["operation"] for e in mesh.ledger("payment", "order-1")]
    assert payments == ["validate_payment", "process_payment"]
    assert [e["operation"] for e in mesh.ledger("inventory", "order-1")] == ["reserve_inventory"]


def test_a_declined_payment_releases_the_reserved_inventory(mesh: Mesh) -> None:
    behaviour = {"process_payment": {"fail": "FAILED_PRECONDITION", "message": "card declined"}}
    done = mesh.wait(mesh.start("order_fulfillment", {"key": "order-2", "behaviour": behaviour}))
    assert _state(done) == "COMPENSATED"
    assert (done.failed_step, done.error.message) == ("process_payment", "card declined")
    assert _states(done)["reserve_inventory"] == "COMPENSATED"
    inventory = [e["operation"] for e in mesh.ledger("inventory", "order-2")]
    assert inventory == ["reserve_inventory", "release_inventory"]
    release = mesh.ledger("inventory", "order-2")[1]
    assert release["request"]["reserve_inventory_id"] == "reserve_inventory-order-2"


def test_the_guide_user_registration_survives_its_optional_notification(mesh: Mesh) -> None:
    behaviour = {"send_welcome_notification": {"fail": "UNAVAILABLE"}}
    done = mesh.wait(mesh.start("user_registration", {"key": "user-1", "behaviour": behaviour}))
    assert _state(done) == "SUCCEEDED"
    assert _states(done) == {
        "authenticate_request": "SUCCEEDED",
        "create_user_profile": "SUCCEEDED",
        "send_welcome_notification": "FAILED",
    }
    notification = next(s for s in done.steps if s.step_name == "send_welcome_notification")
    assert notification.attempts == 3  # UNAVAILABLE is retried, then given up on
    assert [e["operation"] for e in mesh.ledger("users", "user-1")] == ["create_user_profile"]


def test_kill_9_of_the_control_plane_mid_execution_loses_nothing(mesh: Mesh) -> None:
    behaviour = {"reserve_inventory": {"sleep": 1.5}}
    execution_id = mesh.start("order_fulfillment", {"key": "order-k9", "behaviour": behaviour})

    def reserving() -> bool:
        steps = _states(mesh.get(execution_id).execution)
        return steps["reserve_inventory"] == "RUNNING"

    _until(reserving)
    address = mesh.address
    mesh.plane.kill()  # SIGKILL while inventory works on the reservation
    mesh.plane = start_serve(mesh.tmp, "--listen", address, "--health-check-interval", "0.5")

    done = mesh.wait(execution_id, within=30)
    assert _state(done) == "SUCCEEDED", done
    reserve = next(s for s in done.steps if s.step_name == "reserve_inventory")
    assert reserve.attempts == 2  # re-sent after the restart, with the same key
    history = mesh.get(execution_id).events
    types = [orchestrator_pb2.ExecutionEventType.Name(e.type) for e in history]
    assert "EXECUTION_EVENT_TYPE_EXECUTION_RESUMED" in types
    # Every step's side effect happened exactly once.
    assert [e["operation"] for e in mesh.ledger("inventory", "order-k9")] == ["reserve_inventory"]
    assert [e["operation"] for e in mesh.ledger("payment", "order-k9")] == [
        "validate_payment",
        "process_payment",
    ]


def test_a_node_js_processor_is_one_step_of_a_workflow(mesh: Mesh) -> None:
    node = shutil.which("node")
    assert node, "node not found: install Node.js 20+ and run 'make install-dev' (npm ci)"
    stderr_path = mesh.tmp / "node-step.stderr"
    with stderr_path.open("w") as stderr:
        proc = subprocess.Popen(
            [node, str(NODE_SERVER.relative_to(REPO))],
            cwd=REPO,
            env={**os.environ, "FLEXT_MESH_ADDRESS": mesh.address},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ready "), f"{line!r}\n{stderr_path.read_text()}"
        mesh.put(
            {
                "name": "greet_new_user",
                "steps": [
                    {"name": "create_user_profile", "service": "users"},
                    {
                        "name": "greet",
                        "service": "node-greeter",
                        "depends_on": ["create_user_profile"],
                        "input": {"name": "${steps.create_user_profile.output.key}"},
                    },
                ],
            }
        )
        done = mesh.wait(mesh.start("greet_new_user", {"key": "ada"}))
        assert _state(done) == "SUCCEEDED", done
        output = struct_to_dict(done.output)
        assert output["greet"] == {"greeting": "hello ada", "runtime": "node"}
        greet = next(s for s in done.steps if s.step_name == "greet")
        assert greet.instance_id == "node-1"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
