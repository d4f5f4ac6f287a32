"""ServiceOrchestrator against a real control plane: the guide's workflows, end to end.

Sync tests use a ``flext-mesh serve`` subprocess (shared by the module); the async
test runs a control plane in this process and uses the ``a``-prefixed twins. The
processors are the guide's, whose bodies it leaves to the reader.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.facade.orchestrator import ServiceOrchestrator
from flext_mesh.processor import ServiceProcessor
from flext_mesh.result import FlextResult
from flext_mesh.server import create_server
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from tests.conftest import ServeProcess, start_serve
from tests.registry.conftest import fast_config

Json = dict[str, Any]

# The Quick Start's workflow, exactly as the guide writes it.
QUICK_START: Json = {
    "workflow_id": "order_fulfillment_123",
    "steps": [
        {"step": "validate_payment", "service": "payment", "required": True},
        {"step": "reserve_inventory", "service": "inventory", "required": True},
    ],
}


class _Recording(ServiceProcessor[Json, Json, Json]):
    """A processor that remembers its requests and returns ``answer`` (or fails)."""

    def __init__(self, answer: Json | None = None, *, fail: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.answer = answer or {}
        self.fail = fail
        self.requests: list[Json] = []

    def process(self, request: Json, /) -> FlextResult[Json]:
        self.requests.append(request)
        if self.fail is not None:
            code, message = self.fail
            return FlextResult.fail(message, code=code)
        return FlextResult.ok(self.answer)

    def build(self, domain: Json, /, *, correlation_id: str) -> Json:
        return domain


class PaymentProcessor(_Recording):
    """Validates a payment."""


class InventoryManager(_Recording):
    """Reserves stock."""


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    server = start_serve(tmp_path_factory.mktemp("plane"))
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.terminate()


@pytest.fixture
def orchestrator(plane: ServeProcess) -> Iterator[ServiceOrchestrator]:
    with ServiceOrchestrator(plane.address, timeout=20) as orch:
        yield orch


def _instances(address: str, service: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        try:
            reply = stub.Discover(
                registry_pb2.DiscoverRequest(service_name=service, healthy_only=False), timeout=5
            )
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:
                return []
            raise
    return [i.instance_id for i in reply.instances]


def test_the_quick_start_order_fulfillment_runs_on_local_processors(
    orchestrator: ServiceOrchestrator,
) -> None:
    payment = PaymentProcessor({"payment": "validated"})
    inventory = InventoryManager({"reserved": 2})
    assert orchestrator.register_service("payment", payment).success
    assert orchestrator.register_service("inventory", inventory).success

    result = orchestrator.orchestrate_workflow(QUICK_START)

    assert result.success, result.error
    summary = result.value
    assert summary["workflow_id"] == "order_fulfillment_123"
    assert summary["status"] == "completed"
    assert summary["execution_id"]
    assert {name: step["state"] for name, step in summary["steps"].items()} == {
        "validate_payment": "succeeded",
        "reserve_inventory": "succeeded",
    }
    assert summary["outputs"] == {
        "validate_payment": {"payment": "validated"},
        "reserve_inventory": {"reserved": 2},
    }
    assert summary["steps"]["reserve_inventory"]["attempts"] == 1
    # No execution input in the guide: each step got the empty one.
    assert payment.requests == [{}]
    assert inventory.requests == [{}]

    # The fixed workflow_id does not make a second call return the first execution.
    again = orchestrator.orchestrate_workflow(QUICK_START)
    assert again.success, again.error
    assert again.value["execution_id"] != summary["execution_id"]
    assert len(payment.requests) == 2
    # A top-level "input" is the execution input, sent to steps without their own.
    with_input = orchestrator.orchestrate_workflow({**QUICK_START, "input": {"order": 7}})
    assert with_input.success, with_input.error
    assert payment.requests[-1] == inventory.requests[-1] == {"order": 7}


def test_an_optional_step_that_fails_leaves_the_complex_workflow_completed(
    orchestrator: ServiceOrchestrator,
) -> None:
    auth = _Recording({"user_id": "u-1"})
    payment = _Recording({"charged": 42})
    notification = _Recording(fail=("UNAVAILABLE", "smtp relay down"))
    for name, processor in (("auth", auth), ("payment", payment), ("notification", notification)):
        assert orchestrator.register_service(name, processor).success
    workflow_data: Json = {
        "auth_data": {"user": "ada", "token": "t0k"},
        "payment_data": {"amount": 42},
        "notification_data": {"to": "ada@example.com"},
    }
    # Step 2's definition as the guide writes it.
    workflow_definition = {
        "workflow_id": f"complex_workflow_{uuid.uuid4().hex}",
        "steps": [
            {
                "step": "authenticate_user",
                "service": "auth",
                "input": workflow_data.get("auth_data"),
                "required": True,
                "timeout_ms": 5000,
            },
            {
                "step": "process_payment",
                "service": "payment",
                "input": workflow_data.get("payment_data"),
                "required": True,
                "depends_on": ["authenticate_user"],
                "timeout_ms": 10000,
            },
            {
                "step": "send_confirmation",
                "service": "notification",
                "input": workflow_data.get("notification_data"),
                "required": False,  # Optional step
                "depends_on": ["process_payment"],
                "timeout_ms": 3000,
            },
        ],
    }

    result = orchestrator.orchestrate_workflow(workflow_definition)

    assert result.success, result.error
    steps = result.value["steps"]
    assert steps["authenticate_user"]["state"] == "succeeded"
    assert steps["process_payment"]["output"] == {"charged": 42}
    confirmation = steps["send_confirmation"]
    assert confirmation["state"] == "failed"
    assert confirmation["error"] == {"code": "UNAVAILABLE", "message": "smtp relay down"}
    assert confirmation["attempts"] == 3  # an infrastructure fault is retried
    assert "send_confirmation" not in result.value["outputs"]
    assert auth.requests == [{"user": "ada", "token": "t0k"}]
    assert payment.requests == [{"amount": 42}]
    assert notification.requests[0] == {"to": "ada@example.com"}


def test_a_failed_required_step_names_the_step_and_the_compensation(
    orchestrator: ServiceOrchestrator,
) -> None:
    refund = _Recording({"refunded": True})
    payment = {"validate_payment": PaymentProcessor({"hold": "h-7"}), "refund_payment": refund}
    assert orchestrator.register_service("payment", payment).success
    inventory = InventoryManager(fail=("FAILED_PRECONDITION", "out of stock"))
    assert orchestrator.register_service("inventory", inventory).success
    workflow = {
        **QUICK_START,
        "steps": [
            {**QUICK_START["steps"][0], "compensation": "refund_payment"},
            {**QUICK_START["steps"][1], "depends_on": ["validate_payment"]},
        ],
    }

    result = orchestrator.orchestrate_workflow(workflow)

    assert result.is_failure
    assert result.code == "FAILED_PRECONDITION"
    assert result.error is not None
    assert result.error.startswith(
        "workflow order_fulfillment_123 failed at step reserve_inventory: "
        "FAILED_PRECONDITION out of stock; compensation: COMPENSATED "
        "(validate_payment compensated)"
    )
    assert refund.requests == [{"hold": "h-7"}]  # the compensated step's output
    assert len(inventory.requests) == 1  # a business rejection is not retried


def test_a_bad_workflow_fails_with_every_violation(plane: ServeProcess) -> None:
    with ServiceOrchestrator(plane.address, timeout=5) as orch:
        result = orch.orchestrate_workflow(
            {
                "workflow_id": "bad id!",
                "steps": [
                    {"step": "a", "service": "x", "depends_on": ["missing"]},
                    {"step": "b", "timeout_ms": 0},
                ],
            }
        )
    assert result.is_failure
    assert result.code == "INVALID_ARGUMENT"
    fields = {field for field, _ in result.field_violations}
    assert {"workflow.name", "workflow.steps[0].depends_on[0]", "workflow.steps[1].service"} <= (
        fields
    )
    assert "workflow.steps[1].timeout" in fields


def test_close_deregisters_the_local_services(plane: ServeProcess) -> None:
    orch = ServiceOrchestrator(plane.address, timeout=10)
    registered = orch.register_service("closing-svc", PaymentProcessor())
    assert registered.success, registered.error
    assert _instances(plane.address, "closing-svc") == [registered.value]

    replaced = orch.register_service("closing-svc", PaymentProcessor())
    assert replaced.success
    assert _instances(plane.address, "closing-svc") == [replaced.value]

    orch.close()
    assert _instances(plane.address, "closing-svc") == []
    after = orch.orchestrate_workflow(QUICK_START)
    assert (after.is_failure, after.code) == (True, "FAILED_PRECONDITION")


def test_an_unreachable_control_plane_fails_unavailable_in_bounded_time() -> None:
    with ServiceOrchestrator("127.0.0.1:1", timeout=2) as orch:
        started = time.monotonic()
        registered = orch.register_service("payment", PaymentProcessor())
        run = orch.orchestrate_workflow(QUICK_START)
        elapsed = time.monotonic() - started
        assert orch.services == {}  # the local server did not stay up
    assert (registered.is_failure, registered.code) == (True, "UNAVAILABLE")
    assert (run.is_failure, run.code) == (True, "UNAVAILABLE")
    assert "127.0.0.1:1" in (run.error or "")
    assert elapsed < 8


async def test_the_etl_pattern_reports_total_records_with_the_async_twins(
    tmp_path: Path,
) -> None:
    plane, port = await create_server(fast_config(tmp_path))
    tap = _Recording({"stream": "users", "records_processed": 150})  # 30 filtered out
    transform = _Recording({"models": 3})
    target = _Recording({"records_processed": 120})
    try:
        async with ServiceOrchestrator(f"127.0.0.1:{port}", timeout=20) as orch:
            ids = {}
            for name, processor in (("tap", tap), ("target", target), ("transform", transform)):
                registered = await orch.aregister_service(name, processor)
                assert registered.success, registered.error
                ids[name] = registered.value
            assert plane.registry.get("tap", ids["tap"]) is not None
            pipeline_id = "p-42"
            # Pattern 1's workflow as the guide writes it.
            etl_workflow = {
                "workflow_id": f"etl_{pipeline_id}",
                "steps": [
                    {"step": "extract", "service": "tap", "timeout_ms": 300000},
                    {"step": "transform", "service": "transform", "depends_on": ["extract"]},
                    {"step": "load", "service": "target", "depends_on": ["transform"]},
                ],
            }
            workflow_result = await orch.aorchestrate_workflow(etl_workflow)
            assert workflow_result.success, workflow_result.error
            assert workflow_result.value.get("total_records", 0) == 120
            assert workflow_result.value.get("duration_ms", 0) > 0
            assert workflow_result.value["outputs"]["extract"]["stream"] == "users"
        # Leaving the block deregistered them.
        assert [name for name, id_ in ids.items() if plane.registry.get(name, id_)] == []
    finally:
        await plane.stop(0.2)


class MicroserviceIntegrationManager:
    """Pattern 2, with the guide's undefined helpers filled in for the test."""

    def __init__(self, address: str) -> None:
        self.orchestrator = ServiceOrchestrator(address, timeout=20)
        self.proxies: dict[str, _Recording] = {}

    def _create_service_proxy(self, service_info: Json) -> _Recording:
        proxy = _Recording({"served_by": service_info["name"]})
        self.proxies[service_info["name"]] = proxy
        return proxy

    def _generate_id(self) -> str:
        return uuid.uuid4().hex[:12]


def test_pattern_2_service_proxies_run_the_cross_service_workflow(plane: ServeProcess) -> None:
    manager = MicroserviceIntegrationManager(plane.address)
    with manager.orchestrator:
        for service_info in (
            {"name": "auth-service", "type": "authentication"},
            {"name": "user-service", "type": "user_management"},
            {"name": "notification-service", "type": "messaging"},
        ):
            registered = manager.orchestrator.register_service(
                service_info["name"], manager._create_service_proxy(service_info)
            )
            assert registered.success, registered.error
        # Anything but a processor (or a mapping of them) is refused, not served.
        refused = manager.orchestrator.register_service("odd-service", object())
        assert (refused.is_failure, refused.code) == (True, "INVALID_ARGUMENT")
        workflow_request: Json = {"credentials": {"token": "t"}, "user_data": {"name": "Ada"}}
        cross_service_workflow = {
            "workflow_id": f"cross_service_{manager._generate_id()}",
            "steps": [
                {
                    "step": "authenticate_request",
                    "service": "auth-service",
                    "input": workflow_request.get("credentials"),
                    "required": True,
                },
                {
                    "step": "create_user_profile",
                    "service": "user-service",
                    "input": workflow_request.get("user_data"),
                    "required": True,
                    "depends_on": ["authenticate_request"],
                },
                {
                    "step": "send_welcome_notification",
                    "service": "notification-service",
                    "input": workflow_request.get("notification_data"),
                    "required": False,
                    "depends_on": ["create_user_profile"],
                },
            ],
        }
        result = manager.orchestrator.orchestrate_workflow(cross_service_workflow)
    assert result.success, result.error
    assert result.value["outputs"]["create_user_profile"] == {"served_by": "user-service"}
    assert manager.proxies["user-service"].requests == [{"name": "Ada"}]
    # "input": None sends the execution input, which the guide leaves empty.
    assert manager.proxies["notification-service"].requests == [{}]
