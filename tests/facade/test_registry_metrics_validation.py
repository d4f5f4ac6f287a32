"""FlextServices' ServiceRegistry, ServiceMetrics and ServiceValidation against a real
control plane: the guide's registration dicts, leases kept alive, reports, schemas."""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pydantic
import pytest

from flext_mesh.facade.metrics import ServiceMetrics
from flext_mesh.facade.registry import ServiceRegistry, normalize_endpoint
from flext_mesh.facade.validation import ServiceValidation
from flext_mesh.result import FlextResult
from flext_mesh.server import create_server
from tests.conftest import ServeProcess, start_serve
from tests.registry.conftest import fast_config

# The guide's Pattern 2 ecosystem and Step 2's registrations.
GUIDE_SERVICES = [
    {
        "name": "auth-service",
        "type": "authentication",
        "endpoint": "https://auth.company.com",
        "version": "2.1.0",
        "capabilities": ["jwt", "oauth2", "saml"],
    },
    {
        "name": "user-service",
        "type": "user_management",
        "endpoint": "https://users.company.com",
        "version": "1.8.0",
        "capabilities": ["crud", "profile", "preferences"],
    },
    {
        "name": "notification-service",
        "type": "messaging",
        "endpoint": "https://notifications.company.com",
        "version": "1.5.0",
        "capabilities": ["email", "sms", "push"],
    },
    {
        "name": "payment_service",
        "type": "payment",
        "endpoint": "http://payment.company.com",
        "version": "1.5.0",
    },
]


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """One ``flext-mesh serve`` subprocess for the synchronous tests of this module."""
    server = start_serve(tmp_path_factory.mktemp("plane"))
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.kill()


def closed_port() -> str:
    """An address on loopback where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


# -- registry -----------------------------------------------------------------------------


def test_guide_registrations_are_discoverable_with_their_keys(plane: ServeProcess) -> None:
    with ServiceRegistry(plane.address) as registry:
        ids = {}
        for info in GUIDE_SERVICES:
            result = registry.register(info)
            assert result.success, result.error
            ids[info["name"]] = result.value

        for info in GUIDE_SERVICES:
            found = registry.discover(str(info["name"]))
            assert found.success, found.error
            service = found.value
            for key in ("name", "type", "version"):
                assert service[key] == info[key]
            assert service["capabilities"] == info.get("capabilities", [])
            assert service["instance_id"] == ids[str(info["name"])]
            # TTL-only by default: an HTTPS URL never answers gRPC health checks.
            assert service["health"] == "SERVING"
            assert service["health_check_mode"] == "TTL_ONLY"
            assert service["weight"] == 100
            assert service["endpoint_url"] == info["endpoint"]
        assert registry.discover("auth-service").value["endpoint"] == "auth.company.com:443"
        assert registry.discover("payment_service").value["endpoint"] == "payment.company.com:80"

        listed = registry.list_services()
        assert listed.success, listed.error
        by_name = {s["name"]: s for s in listed.value}
        assert by_name["user-service"]["healthy_count"] == 1
        assert by_name["user-service"]["types"] == ["user_management"]


def test_extra_keys_become_labels_or_metadata(plane: ServeProcess) -> None:
    with ServiceRegistry(plane.address) as registry:
        info = {
            "name": "inventory",
            "type": "inventory",
            "endpoint": "10.0.0.7:9000",
            "version": "3.0.0",
            "zone": "eu-west-1a",
            "weight": 250,
            "region": "eu",
            "priority": 5,
            "enabled": True,
            "limits": {"rps": 100, "burst": [1, 2]},
            "owner team": "stock",  # not a label key: metadata
        }
        assert registry.register(info).success
        service = registry.discover("inventory").value
        assert service["endpoint"] == "10.0.0.7:9000"
        assert "endpoint_url" not in service
        assert (service["zone"], service["weight"]) == ("eu-west-1a", 250)
        assert (service["region"], service["priority"], service["enabled"]) == ("eu", "5", "true")
        assert service["limits"] == {"rps": 100, "burst": [1, 2]}
        assert service["owner team"] == "stock"

        # Registering the same name and endpoint again replaces, never duplicates.
        first = registry.discover("inventory").value["instance_id"]
        assert registry.register({**info, "version": "3.0.1"}).value == first
        assert registry.discover("inventory").value["version"] == "3.0.1"
        counts = {s["name"]: s["instance_count"] for s in registry.list_services().value}
        assert counts["inventory"] == 1


def test_lease_is_kept_alive_and_gone_after_deregister_and_close(plane: ServeProcess) -> None:
    observer = ServiceRegistry(plane.address)
    registry = ServiceRegistry(plane.address, ttl=1)
    try:
        kept = registry.register({"name": "kept", "endpoint": "kept.local:1"})
        dropped = registry.register({"name": "dropped", "endpoint": "dropped.local:1"})
        assert kept.success
        assert dropped.success
        time.sleep(3.5)  # three and a half TTLs: only renewals keep them
        assert observer.discover("kept").value["instance_id"] == kept.value
        assert observer.discover("dropped").success

        removed = registry.deregister("dropped")
        assert removed.value == [dropped.value]
        assert observer.discover("dropped").code == "NOT_FOUND"
        assert registry.deregister("dropped").code == "NOT_FOUND"

        assert registry.close().success
        assert observer.discover("kept").code == "NOT_FOUND"  # at once, not after the TTL
        after = registry.discover("kept")
        assert after.code == "FAILED_PRECONDITION"
        assert "closed" in (after.error or "")
    finally:
        registry.close()
        observer.close()


def test_unknown_service_and_refused_registration_fail_without_raising(
    plane: ServeProcess,
) -> None:
    with ServiceRegistry(plane.address) as registry:
        missing = registry.discover("no-such-service")
        assert missing.is_failure
        assert missing.code == "NOT_FOUND"
        assert "no-such-service" in (missing.error or "")

        refused = registry.register({"name": "bad name!", "endpoint": "host:99999"})
        assert refused.code == "INVALID_ARGUMENT"
        fields = {field for field, _ in refused.field_violations}
        assert {"instance.service_name", "instance.endpoint"} <= fields
        assert "instance.service_name" in (refused.error or "")

        local = registry.register({"type": "payment", "weight": "heavy"})
        assert local.code == "INVALID_ARGUMENT"
        assert {f for f, _ in local.field_violations} == {"name", "endpoint", "weight"}


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("https://payment.company.com", "payment.company.com:443"),
        ("http://payment.company.com/api/v1", "payment.company.com:80"),
        ("https://h.example:8443/x?y=1", "h.example:8443"),
        ("https://[::1]", "[::1]:443"),
        ("payment.internal:50051", "payment.internal:50051"),
    ],
)
def test_endpoint_urls_become_host_port(given: str, expected: str) -> None:
    assert normalize_endpoint(given)[0] == expected


def test_unreachable_control_plane_fails_unavailable_in_bounded_time() -> None:
    for address in (closed_port(), "10.255.255.1:50051"):
        registry = ServiceRegistry(address, timeout=1)
        metrics = ServiceMetrics(address, timeout=1)
        calls: list[Callable[[], FlextResult[object]]] = [
            partial(registry.register, {"name": "a", "endpoint": "a:1"}),
            partial(registry.discover, "a"),
            registry.list_services,
            partial(metrics.report, "a"),
        ]
        try:
            for call in calls:
                start = time.monotonic()
                result = call()
                assert time.monotonic() - start < 3.5
                assert result.code == "UNAVAILABLE", result
                assert address in (result.error or "")
            assert metrics.track_service_call("a", "op", 1.0).success  # queued, not sent
            start = time.monotonic()
            flushed = metrics.flush()
            assert time.monotonic() - start < 3.5
            assert flushed.code == "UNAVAILABLE"
            assert "1 tracked call(s)" in (flushed.error or "")
        finally:
            registry.close()
            metrics.close()


# -- metrics ------------------------------------------------------------------------------


def test_tracked_calls_show_in_the_report_with_the_guide_keys(
    plane: ServeProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    with ServiceMetrics(plane.address) as metrics:
        for i in range(1, 21):
            tracked = metrics.track_service_call("user-svc", "create_user", float(i), i % 10 != 0)
            assert tracked.success
        for _ in range(5):
            result = metrics.track_service_call(
                "user-svc", "get_user", 3.0, True, {"cache_hit": False, "size": "medium"}
            )
            assert result.success
        report_result = metrics.report("user-svc", window_hours=6)
        assert report_result.success, report_result.error
        report = report_result.value

    summary = report["summary"]
    assert report["service"] == report["service_name"] == "user-svc"
    assert summary["total_calls"] == 25
    assert summary["success_rate"] == pytest.approx(23 / 25)
    assert summary["error_rate"] == pytest.approx(2 / 25)
    assert summary["throughput_per_hour"] == pytest.approx(25 / 6)
    assert summary["total_operations"] == 2
    assert 0 <= summary["health_score"] <= 100
    assert summary["performance_grade"] in {"A", "B", "C", "D", "F"}

    create = report["operations"]["create_user"]
    assert create["calls"] == create["total_calls"] == 20
    assert create["failed_calls"] == 2
    assert create["min_ms"] == pytest.approx(1.0, rel=0.01)
    assert create["max_ms"] == pytest.approx(20.0, rel=0.01)
    assert create["median_ms"] == pytest.approx(10.0, rel=0.11)
    assert 18 <= create["p95_ms"] <= 20.2
    assert create["p95_ms"] <= create["p99_ms"] <= create["max_ms"] * 1.01
    assert create["p95_duration_ms"] == create["p95_ms"]
    assert create["average_duration_ms"] == pytest.approx(10.5)
    assert report["operations"]["get_user"]["calls"] == 5
    assert isinstance(report["recommendations"], list)
    assert isinstance(report["alerts"], list)

    # Step 4 of the guide reads the report like this.
    print(f"Performance Report for {report['service_name']}:")
    print(f"  Health score: {report['summary']['health_score']}")
    print(f"  Performance grade: {report['summary']['performance_grade']}")
    print(f"  Success rate: {report['summary']['success_rate']:.1%}")
    print(f"  Average duration: {report['summary']['average_duration_ms']:.1f}ms")
    assert "Success rate: 92.0%" in capsys.readouterr().out


def test_track_service_call_checks_its_arguments(plane: ServeProcess) -> None:
    with ServiceMetrics(plane.address) as metrics:
        for args in (
            ("", "op", 1.0),
            ("svc", " ", 1.0),
            ("svc", "op", math.nan),
            ("svc", "op", math.inf),
            ("svc", "op", -1.0),
            ("svc", "op", "12"),
        ):
            result = metrics.track_service_call(*args)  # type: ignore[arg-type]
            assert result.code == "INVALID_ARGUMENT", args
            assert result.field_violations
        assert metrics.flush().value == 0  # nothing was queued
        unknown = metrics.report("never-called")
        assert unknown.code == "NOT_FOUND"
        assert metrics.report("x", window_hours=0).code == "INVALID_ARGUMENT"


# -- async twins --------------------------------------------------------------------------


async def test_async_twins_against_an_in_process_control_plane(tmp_path: Path) -> None:
    plane, port = await create_server(fast_config(tmp_path))
    address = f"127.0.0.1:{port}"
    try:
        async with ServiceRegistry(address, ttl=1) as registry:
            registered = await registry.aregister(GUIDE_SERVICES[0])
            assert registered.success, registered.error
            found = await registry.adiscover("auth-service")
            assert found.value["capabilities"] == ["jwt", "oauth2", "saml"]
            assert (await registry.adiscover("nope")).code == "NOT_FOUND"
            names = [s["name"] for s in (await registry.alist_services()).value]
            assert names == ["auth-service"]
        async with ServiceMetrics(address) as metrics:
            for ms in (5.0, 7.0, 9.0):
                assert (await metrics.atrack_service_call("auth-service", "login", ms)).success
            report = await metrics.areport("auth-service", window_hours=1)
            assert report.value["operations"]["login"]["calls"] == 3
        # The registry closed: its registration is gone.
        async with ServiceRegistry(address) as observer:
            assert (await observer.adiscover("auth-service")).code == "NOT_FOUND"
            deregistered = await registry.aderegister("auth-service")
            assert deregistered.code == "FAILED_PRECONDITION"
    finally:
        await plane.stop(0.2)


# -- validation ---------------------------------------------------------------------------


class ServiceInfo(pydantic.BaseModel):
    name: str
    endpoint: str
    version: str = "0.0.0"
    capabilities: list[str] = []
    weight: int = pydantic.Field(default=100, ge=1, le=10000)


SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "required": ["name", "endpoint", "type", "version"],
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 63},
        "endpoint": {"type": "string", "pattern": "^(https?://|[^:/]+:[0-9]+$)"},
        "type": {"enum": ["payment", "authentication", "messaging"]},
        "version": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "weight": {"type": "integer", "minimum": 1, "maximum": 10000},
        "capabilities": {"type": "array", "items": {"type": "string"}, "maxItems": 3},
    },
    "additionalProperties": False,
}


def test_validate_input_with_the_guides_callable() -> None:
    validator = ServiceValidation()

    def schema(info: dict[str, object]) -> FlextResult[dict[str, object]]:
        return (
            FlextResult[dict[str, object]].ok(info)
            if all(key in info for key in ["name", "endpoint", "type", "version"])
            else FlextResult[dict[str, object]].fail("Missing required service information")
        )

    assert validator.validate_input(GUIDE_SERVICES[0], schema).value == GUIDE_SERVICES[0]
    missing = validator.validate_input({"name": "x"}, schema)
    assert missing.error == "Missing required service information"
    assert validator.validate_input(3, lambda v: v > 2).value == 3
    raised = validator.validate_input({}, lambda info: info["name"])
    assert raised.is_failure
    assert "KeyError" in (raised.error or "")


def test_validate_with_a_pydantic_model() -> None:
    validator = ServiceValidation()
    ok = validator.validate_input({"name": "auth", "endpoint": "a:1", "weight": "7"}, ServiceInfo)
    assert ok.value == {
        "name": "auth",
        "endpoint": "a:1",
        "version": "0.0.0",
        "capabilities": [],
        "weight": 7,
    }
    bad = validator.validate_input({"name": "auth", "weight": 0, "capabilities": [1]}, ServiceInfo)
    assert bad.code == "INVALID_ARGUMENT"
    assert {f for f, _ in bad.field_violations} == {"endpoint", "weight", "capabilities.0"}
    assert "endpoint" in (bad.error or "")
    assert "ServiceInfo" in (bad.error or "")
    assert validator.validate_output({"name": "x"}, ServiceInfo).code == "INTERNAL"


def test_validate_with_a_json_schema() -> None:
    validator = ServiceValidation()
    good = {
        "name": "payment_service",
        "type": "payment",
        "endpoint": "https://payment.company.com",
        "version": "1.5.0",
        "capabilities": ["cards"],
    }
    assert validator.validate_input(good, SCHEMA).value == good

    bad = {
        "name": "",
        "type": "video",
        "endpoint": "payment",
        "weight": 1.5,
        "capabilities": ["a", 2, "c", "d"],
        "extra": True,
    }
    result = validator.validate_input(bad, SCHEMA)
    assert result.code == "INVALID_ARGUMENT"
    assert dict(result.field_violations) == {
        "version": "is required",
        "name": "'' should be non-empty",
        "type": "'video' is not one of ['payment', 'authentication', 'messaging']",
        "endpoint": "'payment' does not match '^(https?://|[^:/]+:[0-9]+$)'",
        "weight": "1.5 is not of type 'integer'",
        "capabilities": "['a', 2, 'c', 'd'] is too long",
        "capabilities.1": "2 is not of type 'string'",
        "extra": "is not allowed",
    }
    assert "version: is required" in (result.error or "")

    output = validator.validate_output({"status": "done"}, {"type": "object", "required": ["id"]})
    assert output.code == "INTERNAL"
    assert output.field_violations == (("id", "is required"),)

    assert validator.validate_input(True, {"type": "integer"}).is_failure
    assert validator.validate_input(2.0, {"type": "integer", "exclusiveMaximum": 2}).is_failure
    assert validator.validate_input(None, {"type": ["string", "null"]}).success

    either = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    assert validator.validate_input(3, either).success  # the whole standard, not a subset
    assert validator.validate_input({}, either).code == "INVALID_ARGUMENT"
    broken = validator.validate_input({}, {"type": "no-such-type"})
    assert broken.code == "INVALID_ARGUMENT"
    assert "schema is invalid" in (broken.error or "")
    assert validator.validate_input({}, 42).code == "INVALID_ARGUMENT"
