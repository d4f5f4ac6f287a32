"""The guide's own code blocks (``tests/facade/guide``) against a real control plane.

One ``flext-mesh serve`` subprocess serves the module; ``FLEXT_MESH_CONTROL_PLANE``
names it, which is how the guide's no-argument constructors find it. Modules whose
guide block ends in usage code run it under :func:`runpy.run_module`; the others are
driven here the way a user of the guide would call them.
"""

from __future__ import annotations

import json
import re
import runpy
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from flext_mesh import default_recorder
from tests.conftest import BIN, ServeProcess, start_serve
from tests.facade.guide import pattern1_etl, step2_orchestration, step3_registry

GUIDE = "tests.facade.guide"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One ``flext-mesh serve`` subprocess for the whole module."""
    server = start_serve(tmp_path_factory.mktemp("guide"))
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.terminate()


@pytest.fixture(autouse=True)
def _control_plane_env(plane: ServeProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXT_MESH_CONTROL_PLANE", plane.address)


def close(*objects: Any) -> None:
    """Close the facade objects the guide's code leaves open (its leases, its servers)."""
    for obj in objects:
        obj.close()


def run_guide(module: str) -> dict[str, Any]:
    """Execute a guide module as a script (its usage code runs); its globals.

    ``alter_sys`` puts the module in ``sys.modules`` while it runs, where dataclasses
    look up the annotations of its domain classes.
    """
    return runpy.run_module(f"{GUIDE}.{module}", alter_sys=True)


def cli(plane: ServeProcess, *args: str) -> Any:
    """Run ``flext-mesh ARGS -o json`` against the plane; its parsed output."""
    done = subprocess.run(
        [str(BIN / "flext-mesh"), *args, "--control-plane", plane.address, "-o", "json"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return json.loads(done.stdout)


# -- Quick Start ---------------------------------------------------------------------------


def test_quick_start_registers_a_user(capsys: pytest.CaptureFixture[str]) -> None:
    ns = run_guide("quick_start_registration")

    result = ns["result"]
    assert result.success, result.error
    assert capsys.readouterr().out == f"User registered: {result.value.user_id}\n"
    assert (result.value.email, result.value.name) == ("ada@example.com", "Ada Lovelace")
    assert re.fullmatch(r"[0-9a-f]{32}", result.value.correlation_id)
    run = default_recorder.records("user_registration")[-1]
    assert (run.correlation_id, run.success) == (result.value.correlation_id, True)

    refused = ns["user_service"].run_with_metrics(
        "user_registration", ns["UserRequest"](email="nobody", name="x")
    )
    assert (refused.is_failure, refused.error) == (True, "Invalid email address")


def test_quick_start_fulfills_an_order_as_a_durable_execution(plane: ServeProcess) -> None:
    ns = run_guide("quick_start_orchestration")
    fulfillment = ns["order_fulfillment"]
    try:
        result = ns["result"]
        assert result.success, result.error
        summary = result.value
        assert (summary["workflow_id"], summary["status"]) == ("order_fulfillment_123", "completed")
        assert summary["outputs"] == {
            "validate_payment": {"payment": "validated"},
            "reserve_inventory": {"reserved": True},
        }
        # The services the guide registered are in the control plane's registry...
        payment = fulfillment.registry.discover("payment")
        assert payment.success, payment.error
        assert payment.value["instance_id"] == fulfillment.orchestrator.services["payment"]
        # ...and the execution is recorded there (``flext-mesh execution list``).
        listed = cli(plane, "execution", "list", "--workflow", "order_fulfillment_123")
        assert summary["execution_id"] in json.dumps(listed)
    finally:
        close(fulfillment.orchestrator, fulfillment.registry, fulfillment.metrics)


# -- Step 2 ----------------------------------------------------------------------------------


@pytest.fixture
def step2() -> Iterator[step2_orchestration.ServiceOrchestrationService]:
    service = step2_orchestration.ServiceOrchestrationService()
    service.setup_microservices_orchestration()
    try:
        yield service
    finally:
        close(service.orchestrator, service.registry, service.metrics)


def test_step2_an_optional_step_failing_still_completes(
    step2: step2_orchestration.ServiceOrchestrationService,
) -> None:
    result = step2.execute_complex_workflow(
        {
            "auth_data": {"user": "ada", "token": "t0k"},
            "payment_data": {"amount": 42},
            "notification_data": {"to": "no address"},
        }
    )

    assert result.success, result.error
    steps = result.value["steps"]
    assert steps["authenticate_user"]["output"] == {"user": "ada", "authenticated": True}
    assert steps["process_payment"]["output"]["charged"] == 42
    assert steps["send_confirmation"]["state"] == "failed"
    assert steps["send_confirmation"]["error"]["code"] == "INVALID_ARGUMENT"
    assert "send_confirmation" not in result.value["outputs"]
    # The registrations of setup are discoverable, URL endpoints as host:port.
    payment = step2.registry.discover("payment_service")
    assert payment.success, payment.error
    assert (payment.value["endpoint"], payment.value["version"]) == (
        "payment.company.com:443",
        "1.5.0",
    )
    # The orchestration time the guide tracks reaches the control plane's metrics.
    report = step2.metrics.report("complex_workflow_orchestrator")
    assert report.success, report.error
    assert report.value["operations"]["execute_workflow"]["total_calls"] >= 1


def test_step2_a_required_failure_reports_compensation(
    step2: step2_orchestration.ServiceOrchestrationService,
) -> None:
    result = step2.execute_complex_workflow(
        {
            "auth_data": {"user": "ada", "token": "t0k"},
            "payment_data": {"amount": 0},
            "notification_data": {"to": "ada@example.com"},
        }
    )

    assert (result.is_failure, result.code) == (True, "FAILED_PRECONDITION")
    match = re.match(
        r"workflow (complex_workflow_[0-9a-f]{12}) failed at step process_payment: "
        r"FAILED_PRECONDITION amount must be positive, got 0; compensation: none needed",
        result.error or "",
    )
    assert match, result.error
    # The guide's compensation pattern then runs each action of the failed step.
    compensated = step2.implement_compensation_patterns(match[1], "process_payment")
    assert compensated.success
    assert compensated.value == {"refund_payment": True, "release_funds": True}
    nothing = step2.implement_compensation_patterns(match[1], "authenticate_user")
    assert nothing.value == {}


# -- Step 3 ----------------------------------------------------------------------------------


def test_step3_discovers_registered_instances_with_health_and_load_balancing() -> None:
    enterprise = step3_registry.EnterpriseServiceRegistry()
    try:
        ids = {}
        for name, type_, endpoint in (
            ("payment-east", "payment", "https://pay-east.company.com"),
            ("payment-west", "payment", "http://pay-west.company.com:8080"),
            ("auth-service", "authentication", "auth.company.com:9000"),
        ):
            registered = enterprise.register_microservice_with_health_monitoring(
                {"name": name, "type": type_, "endpoint": endpoint, "version": "1.0.0"}
            )
            assert registered.success, registered.error
            ids[name] = registered.value
        refused = enterprise.register_microservice_with_health_monitoring({"name": "x"})
        assert (refused.is_failure, refused.error) == (
            True,
            "Missing required service information",
        )

        found = enterprise.discover_services_with_load_balancing("payment")
        assert found.success, found.error
        assert {(s["name"], s["endpoint"], s["instance_id"]) for s in found.value} == {
            ("payment-east", "pay-east.company.com:443", ids["payment-east"]),
            ("payment-west", "pay-west.company.com:8080", ids["payment-west"]),
        }
        assert {s["health"] for s in found.value} == {"SERVING"}
        assert [s["load_balancing_weight"] for s in found.value] == [100, 100]

        health = enterprise.perform_comprehensive_health_checks()
        assert health.success
        assert (health.value["healthy_services"], health.value["unhealthy_services"]) == (3, 0)

        # An instance that leaves fails its next health check and gets no traffic.
        assert enterprise.registry.deregister("payment-west").success
        health = enterprise.perform_comprehensive_health_checks()
        detail = health.value["services_detail"]["payment-west"]
        assert (detail["status"], detail["load_balancing_weight"]) == ("unhealthy", 0.0)
        found = enterprise.discover_services_with_load_balancing("payment", "highest_uptime")
        assert [s["name"] for s in found.value] == ["payment-east"]
        missing = enterprise.discover_services_with_load_balancing("billing")
        assert (missing.is_failure, missing.error) == (
            True,
            "No services found for type: billing",
        )
    finally:
        close(enterprise.registry, enterprise.metrics)


# -- Step 4 ----------------------------------------------------------------------------------


def test_step4_prints_the_performance_report(
    plane: ServeProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    ns = run_guide("step4_performance")
    manager = ns["performance_manager"]
    try:
        report_result = ns["report_result"]
        assert report_result.success, report_result.error
        report = report_result.value
        summary = report["summary"]
        out = capsys.readouterr().out.splitlines()
        assert out == [
            "Performance Report for user-service:",
            f"  Health score: {summary['health_score']}",
            f"  Performance grade: {summary['performance_grade']}",
            "  Success rate: 100.0%",
            "  Average duration: 125.3ms",
        ]
        assert summary["total_calls"] == 1
        assert summary["performance_grade"] == "A"
        assert 0 < summary["health_score"] <= 100
        assert report["operations"]["create_user"]["p95_duration_ms"] == 125.3
        assert report["baselines"] == {"create_user": 125.3}
        # The call reached the control plane (``flext-mesh metrics report user-service``).
        served = cli(plane, "metrics", "report", "user-service")
        assert "create_user" in json.dumps(served)
    finally:
        close(manager.metrics)


# -- Pattern 1 -------------------------------------------------------------------------------


def test_pattern1_etl_pipeline_loads_the_records() -> None:
    etl = pattern1_etl.ETLDataProcessingService()
    try:
        pattern1_etl.WAREHOUSE.clear()
        request = pattern1_etl.ETLRequest(
            source_type="tap-postgres",
            target_type="target-snowflake",
            source_config={"host": "db"},
            target_config={"account": "acme"},
            singer_schema={"type": "object", "properties": {"email": {"type": "string"}}},
        )
        created = etl.run_with_metrics("etl_pipeline", request)
        assert created.success, created.error
        assert created.value.status == "created"

        executed = etl.execute_etl_pipeline(created.value.pipeline_id)

        assert executed.success, executed.error
        assert executed.value.status == "completed"
        assert executed.value.records_processed == 3
        assert executed.value.execution_time_ms > 0
        assert [row["email"] for row in pattern1_etl.WAREHOUSE] == [
            "ada@example.com",
            "grace@example.com",
            "linus@example.com",
        ]

        incompatible = etl.run_with_metrics(
            "etl_pipeline", pattern1_etl.ETLRequest(**{**vars(request), "target_type": "x"})
        )
        assert (incompatible.is_failure, incompatible.code) == (True, "FAILED_PRECONDITION")
        no_schema = etl.run_with_metrics(
            "etl_pipeline", pattern1_etl.ETLRequest(**{**vars(request), "singer_schema": {}})
        )
        assert (no_schema.is_failure, no_schema.code) == (True, "INVALID_ARGUMENT")
    finally:
        etl.orchestrator.close()
