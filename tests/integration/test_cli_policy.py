"""``flext-mesh policy ...`` as an operator runs it, against a real ``flext-mesh serve``.

``payment`` is served by two real ``flext-sidecar`` processes (versions v1 and v2,
operations charge and slow), so that the control plane can check operation timeouts;
the other services are TTL-only registrations with versions, enough for splits. Each
test uses its own service, so that the tests do not depend on their order. The unit
tests at the end convert policy files without a server.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.duration_pb2 import Duration

from flext_mesh.cli import main
from flext_mesh.cli import policy as policy_cli
from flext_mesh.cli.policy import load_policy_file, policy_from_data
from flext_mesh.durations import format_duration, parse_duration
from flext_mesh.errors import InvalidArgument
from flext_mesh.orchestrator.formats import workflow_from_dict
from flext_mesh.v1 import common_pb2, registry_pb2, registry_pb2_grpc
from tests.conftest import BIN, REPO, start_serve
from tests.sidecar.test_sidecar_process import start_sidecar

EXAMPLE = REPO / "examples" / "policies" / "payment.yaml"
# What a refused duration is answered with, in policy and workflow files alike.
HINT = "e.g. '500ms', '2s', '1m', '1m30s', or a number of seconds"
LRT = registry_pb2.LOAD_BALANCING_STRATEGY_LEAST_RESPONSE_TIME
RANDOM = registry_pb2.LOAD_BALANCING_STRATEGY_RANDOM
# TTL-only services and the versions of their instances.
FAKE_SERVICES = {
    "orders": ("v1", "v2"),
    "inventory": ("v1", "v2"),
    "billing": ("v1", "v2"),
    "ledger": ("v1", "v2"),
    "catalog": ("v1",),
    "search": ("v1",),
}


def cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``flext-mesh args... --control-plane address``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXT_MESH_")}
    return subprocess.run(
        [str(BIN / "flext-mesh"), *args, "--control-plane", address],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=env,
    )


def ok(address: str, *args: str) -> str:
    """The stdout of a command that must succeed silently on stderr."""
    run = cli(address, *args)
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    return run.stdout


def stored(address: str, service: str) -> dict[str, Any]:
    """``policy show SERVICE -o json``, parsed."""
    document: dict[str, Any] = json.loads(ok(address, "policy", "show", service, "-o", "json"))
    return document


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A control plane with ``payment`` on two sidecars and the FAKE_SERVICES."""
    tmp = tmp_path_factory.mktemp("cli-policy")
    server = start_serve(tmp)
    sidecars = []
    try:
        for version in ("v1", "v2"):
            sidecars.append(start_sidecar(tmp, server.address, "--version", version))
        with grpc.insecure_channel(server.address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            for service, versions in FAKE_SERVICES.items():
                for version in versions:
                    instance = registry_pb2.ServiceInstance(
                        service_name=service,
                        instance_id=f"{service}-{version}",
                        endpoint=f"127.0.0.1:{closed_port()}",
                        version=version,
                        health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
                    )
                    stub.Register(
                        registry_pb2.RegisterRequest(instance=instance, ttl=Duration(seconds=60)),
                        timeout=10,
                    )
        yield server.address
    finally:
        for sidecar in sidecars:
            sidecar.proc.send_signal(signal.SIGTERM)
        for sidecar in sidecars:
            try:
                sidecar.proc.wait(10)
            except subprocess.TimeoutExpired:
                sidecar.proc.kill()
        server.kill()


# -- set and show --------------------------------------------------------------------------


def test_set_the_example_then_show_it_as_a_summary_and_as_json(
    address: str, tmp_path: Path
) -> None:
    assert ok(address, "policy", "set", "payment", str(EXAMPLE)) == "payment: policy version 1\n"

    lines = ok(address, "policy", "show", "payment").splitlines()
    assert lines[0] == "payment: policy version 1"
    settings = dict(line.split(":", 1) for line in lines[1:])
    summary = {key: value.strip() for key, value in settings.items()}
    assert summary["updated"].endswith(")")  # "YYYY-MM-DD HH:MM:SS (revision N)"
    assert summary["strategy"] == "least_response_time"
    assert summary["default timeout"] == "2s"
    assert summary["operation timeouts"] == "charge=500ms"
    assert summary["retry"] == (
        "max_attempts=3 initial_backoff=50ms retryable_codes=UNAVAILABLE,RESOURCE_EXHAUSTED"
    )
    assert summary["circuit breaker"] == "consecutive_failures=5 open_duration=5s"
    assert summary["outlier detection"] == "not set"
    assert summary["health check"] == "not set"
    assert summary["panic threshold"] == "not set"
    assert summary["split"] == "v1=90 v2=10"
    assert summary["zone preference"] == "on, min_healthy_percent=70"

    policy = stored(address, "payment")
    assert policy["service_name"] == "payment"
    assert policy["version"] == "1"
    assert policy["strategy"] == "LOAD_BALANCING_STRATEGY_LEAST_RESPONSE_TIME"
    assert policy["default_timeout"] == "2s"
    assert policy["operation_timeouts"] == {"charge": "0.500s"}
    assert policy["retry"]["initial_backoff"] == "0.050s"
    assert policy["retry"]["retryable_codes"] == ["UNAVAILABLE", "RESOURCE_EXHAUSTED"]
    assert policy["circuit_breaker"]["open_duration"] == "5s"
    # Settings the file left out are the sidecars' defaults, not zeros: they are not
    # printed (a backoff_multiplier of 0.0 would read as "no backoff growth").
    assert policy["retry"] == {
        "max_attempts": 3,
        "initial_backoff": "0.050s",
        "retryable_codes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    assert policy["circuit_breaker"] == {"consecutive_failures": 5, "open_duration": "5s"}
    assert "outlier_detection" not in policy
    assert policy["splits"] == [{"version": "v1", "weight": 90}, {"version": "v2", "weight": 10}]
    assert policy["zone"] == {"enabled": True, "min_healthy_percent": 70.0}

    # What -o json prints can be set again as it is (the output-only fields are ignored).
    saved = tmp_path / "payment.json"
    saved.write_text(json.dumps(policy))
    assert ok(address, "policy", "set", "payment", str(saved)) == "payment: policy version 2\n"
    again = stored(address, "payment")
    for key in ("version", "update_time", "revision"):
        del policy[key], again[key]
    assert again == policy


def test_a_policy_the_control_plane_refuses_lists_every_violation(address: str) -> None:
    bad = "default_timeout: 2h\nretry: {max_attempts: 50}\nsplits: {v1: 60, v3: 40}\n"
    run = subprocess.run(
        [str(BIN / "flext-mesh"), "policy", "set", "ledger", "-", "--control-plane", address],
        input=bad,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 1
    assert run.stdout == ""
    headline, *violations = run.stderr.splitlines()
    assert headline == "flext-mesh: error: the control plane refused the policy of ledger:"
    fields = [line.split(":")[0].strip() for line in violations]
    assert all(line.startswith("  ") for line in violations)
    assert fields == [
        "policy.default_timeout",
        "policy.retry.max_attempts",
        "policy.splits[1].version",
    ]
    assert "'v3'" in violations[2]
    assert "v1, v2" in violations[2]  # the versions that are registered
    # Nothing was stored.
    refused = cli(address, "policy", "show", "ledger")
    assert refused.returncode == 1
    assert refused.stderr == "flext-mesh: error: service 'ledger' has no policy\n"


def test_an_operation_timeout_must_name_an_operation_the_instances_serve(
    address: str, tmp_path: Path
) -> None:
    file = tmp_path / "refund.yaml"
    file.write_text("operation_timeouts:\n  charge: 1s\n  refund: 1s\n")
    run = cli(address, "policy", "set", "payment", str(file))
    assert run.returncode == 1
    headline, *violations = run.stderr.splitlines()
    assert headline == "flext-mesh: error: the control plane refused the policy of payment:"
    assert len(violations) == 1
    assert "refund" in violations[0]
    assert "charge, slow" in violations[0]


def test_a_file_that_cannot_be_converted_is_reported_without_calling_the_server(
    tmp_path: Path,
) -> None:
    file = tmp_path / "typos.yaml"
    file.write_text(
        "service_name: payments\n"
        "strategy: fastest\n"
        "defaultTimeout: soon\n"
        "retry:\n  initial_backof: 1s\n"
        "splits: {v1: 90, v2: ten}\n"
    )
    # Nothing listens there: any call would fail with "cannot reach".
    run = cli(f"127.0.0.1:{closed_port()}", "policy", "set", "payment", str(file))
    assert run.returncode == 1
    assert run.stdout == ""
    headline, *violations = run.stderr.splitlines()
    assert headline == f"flext-mesh: error: {file} is not a valid policy:"
    assert [line.split(":")[0] for line in violations] == [
        "  strategy",
        "  defaultTimeout",
        "  retry.initial_backof",
        "  splits.v2",
        "  service_name",
    ]
    assert "did you mean 'initial_backoff'?" in violations[2]
    assert violations[4] == "  service_name: is 'payments', but the policy is set for 'payment'"


def test_a_missing_file_is_one_line(tmp_path: Path) -> None:
    run = cli(f"127.0.0.1:{closed_port()}", "policy", "set", "payment", str(tmp_path / "no.yaml"))
    assert run.returncode == 1
    assert run.stderr.splitlines()[1:] == ["  the file cannot be read: No such file or directory"]


def test_expected_version_guards_against_lost_updates(address: str, tmp_path: Path) -> None:
    file = tmp_path / "catalog.yaml"
    file.write_text("strategy: random\n")
    assert ok(address, "policy", "set", "catalog", str(file)) == "catalog: policy version 1\n"
    set_at_1 = ("policy", "set", "catalog", str(file), "--expected-version", "1")
    assert ok(address, *set_at_1) == "catalog: policy version 2\n"
    stale = cli(address, *set_at_1)
    assert stale.returncode == 1
    assert stale.stderr == "flext-mesh: error: policy of 'catalog' is at version 2, not 1\n"


# -- split ---------------------------------------------------------------------------------


def test_split_changes_only_the_split_and_bumps_the_version(address: str, tmp_path: Path) -> None:
    # No policy yet: the split starts one.
    created = ok(address, "policy", "split", "orders", "v1=100")
    assert created == "orders: policy version 1, split v1=100\n"
    file = tmp_path / "orders.yaml"
    file.write_text("strategy: RANDOM\ndefault_timeout: 1s\nsplits: [{version: v1, weight: 100}]\n")
    assert ok(address, "policy", "set", "orders", str(file)) == "orders: policy version 2\n"
    before = stored(address, "orders")

    shifted = ok(address, "policy", "split", "orders", "v1=90", "v2=10")
    assert shifted == "orders: policy version 3, split v1=90 v2=10\n"
    # Discover says which version the split chose for its answer.
    summary = ok(address, "services", "discover", "orders").splitlines()[0]
    assert re.search(r"selected version: v[12]\b", summary), summary
    after = stored(address, "orders")
    assert after["splits"] == [{"version": "v1", "weight": 90}, {"version": "v2", "weight": 10}]
    assert after["version"] == "3"
    for key in ("splits", "version", "update_time", "revision"):
        del before[key], after[key]
    assert after == before  # strategy and timeout untouched

    assert ok(address, "policy", "split", "orders", "--clear") == (
        "orders: policy version 4, no split\n"
    )
    cleared = stored(address, "orders")
    assert cleared["splits"] == []
    assert cleared["strategy"] == "LOAD_BALANCING_STRATEGY_RANDOM"
    assert ok(address, "policy", "split", "orders", "--clear") == (
        "orders: policy version 4 has no split\n"
    )


def test_a_split_naming_an_unknown_version_is_refused(address: str) -> None:
    run = cli(address, "policy", "split", "billing", "v1=50", "v9=50")
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.splitlines() == [
        "flext-mesh: error: the control plane refused the policy of billing:",
        "  policy.splits[1].version: no instance of 'billing' has version 'v9' "
        "(registered versions: v1, v2)",
    ]
    assert cli(address, "policy", "show", "billing").returncode == 1  # nothing stored


def test_split_applies_itself_again_after_a_concurrent_change(address: str) -> None:
    """Another writer puts between split's read and write: split re-reads and keeps theirs."""
    with grpc.insecure_channel(address) as raw:
        stub = registry_pb2_grpc.RegistryServiceStub(raw)
        first = registry_pb2.ServicePolicy(
            service_name="inventory",
            strategy=RANDOM,
            splits=[registry_pb2.VersionSplit(version="v1", weight=100)],
        )
        stub.PutServicePolicy(registry_pb2.PutServicePolicyRequest(policy=first), timeout=10)

        theirs = registry_pb2.ServicePolicy()
        theirs.CopyFrom(first)
        theirs.strategy = LRT
        theirs.retry.CopyFrom(common_pb2.RetryPolicy(max_attempts=2))
        channel = grpc.intercept_channel(raw, _BeforeFirstPut(lambda: _put(stub, theirs)))
        args = argparse.Namespace(
            name="inventory",
            weights=[("v1", 70), ("v2", 30)],
            clear=False,
            output="table",
            timeout=10.0,
            usage_error=_no_usage_error,
        )
        text = policy_cli.split(channel, args)

        assert text == "inventory: policy version 3, split v1=70 v2=30\n"
        now = stub.GetServicePolicy(
            registry_pb2.GetServicePolicyRequest(service_name="inventory"), timeout=10
        ).policy
    assert now.strategy == LRT
    assert now.retry.max_attempts == 2
    assert [(s.version, s.weight) for s in now.splits] == [("v1", 70), ("v2", 30)]


def _put(stub: registry_pb2_grpc.RegistryServiceStub, policy: registry_pb2.ServicePolicy) -> None:
    stub.PutServicePolicy(registry_pb2.PutServicePolicyRequest(policy=policy), timeout=10)


def _no_usage_error(message: str) -> None:
    raise AssertionError(f"usage error: {message}")


class _BeforeFirstPut(grpc.UnaryUnaryClientInterceptor):
    """Runs ``action`` once, just before the first PutServicePolicy goes out."""

    def __init__(self, action: Callable[[], None]) -> None:
        self.action: Callable[[], None] | None = action

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        if details.method.endswith("/PutServicePolicy") and self.action is not None:
            action, self.action = self.action, None
            action()
        return continuation(details, request)


# -- delete --------------------------------------------------------------------------------


def test_delete_then_show_is_one_line_not_found(address: str, tmp_path: Path) -> None:
    file = tmp_path / "search.json"
    file.write_text('{"strategy": "highest_uptime", "panicThresholdPercent": 30}')
    assert ok(address, "policy", "set", "search", str(file)) == "search: policy version 1\n"
    assert "panic threshold:     30%" in ok(address, "policy", "show", "search")
    deleted = json.loads(ok(address, "policy", "delete", "search", "-o", "json"))
    assert int(deleted["revision"]) > 0
    for verb in ("show", "delete"):
        run = cli(address, "policy", verb, "search")
        assert run.returncode == 1
        assert run.stdout == ""
        assert run.stderr == "flext-mesh: error: service 'search' has no policy\n"


# -- usage errors --------------------------------------------------------------------------


def test_a_split_not_summing_to_100_is_a_usage_error() -> None:
    run = cli(f"127.0.0.1:{closed_port()}", "policy", "split", "payment", "v1=90", "v2=20")
    assert run.returncode == 2
    assert run.stdout == ""
    assert run.stderr == (
        "flext-mesh policy split: error: the weights sum to 110, not 100: v1=90 v2=20 "
        "(see --help)\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["split", "payment", "v1"], "argument VERSION=WEIGHT: 'v1' is not VERSION=WEIGHT"),
        (["split", "payment", "v1=101"], "'v1=101' is not VERSION=WEIGHT"),
        (["split", "payment", "v1=50", "v1=50"], "version 'v1' is given twice"),
        (["split", "payment", "v1=100", "--clear"], "not both"),
        (["split", "payment"], "give VERSION=WEIGHT pairs"),
        (["set", "payment"], "the following arguments are required: FILE"),
        (["set", "payment", "f.yaml", "--expected-version", "0"], "'0' is not a whole number"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # In process (the parser is the console script's): nothing here reaches a server.
    with pytest.raises(SystemExit) as exited:
        main(["policy", *args, "--control-plane", f"127.0.0.1:{closed_port()}"])
    assert exited.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1
    assert err.startswith(f"flext-mesh policy {args[0]}: error: ")
    assert message in err


# -- converting files (unit) ---------------------------------------------------------------


def test_the_example_file_converts_to_the_policy_it_describes() -> None:
    policy = load_policy_file(str(EXAMPLE), "payment")
    expected = registry_pb2.ServicePolicy(
        service_name="payment",
        strategy=LRT,
        default_timeout=Duration(seconds=2),
        operation_timeouts={"charge": Duration(nanos=500_000_000)},
        retry=common_pb2.RetryPolicy(
            max_attempts=3,
            initial_backoff=Duration(nanos=50_000_000),
            retryable_codes=["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
        ),
        circuit_breaker=registry_pb2.CircuitBreakerPolicy(
            consecutive_failures=5, open_duration=Duration(seconds=5)
        ),
        splits=[
            registry_pb2.VersionSplit(version="v1", weight=90),
            registry_pb2.VersionSplit(version="v2", weight=10),
        ],
        zone=registry_pb2.ZonePolicy(enabled=True, min_healthy_percent=70),
    )
    assert policy == expected


@pytest.mark.parametrize(
    ("given", "nanos"),
    [
        ("500ms", 500_000_000),
        ("2s", 2_000_000_000),
        ("1m", 60_000_000_000),
        ("1m30s", 90_000_000_000),
        ("1.5s", 1_500_000_000),
        ("0.050s", 50_000_000),  # proto JSON
        ("250us", 250_000),
        (3, 3_000_000_000),  # numbers are seconds
        (0.25, 250_000_000),
        ("2", 2_000_000_000),
    ],
)
def test_durations_in_every_accepted_form(given: object, nanos: int) -> None:
    policy = policy_from_data({"default_timeout": given}, "payment")
    assert policy.default_timeout.ToNanoseconds() == nanos


@pytest.mark.parametrize("given", ["", "fast", "5 parsecs", "1x", "-2s", -1, True, "inf"])
def test_what_is_not_a_duration_is_refused(given: object) -> None:
    with pytest.raises(InvalidArgument) as caught:
        policy_from_data({"retry": {"initial_backoff": given}}, "payment")
    [violation] = caught.value.violations
    assert violation.field == "retry.initial_backoff"


@pytest.mark.parametrize(
    "given",
    [
        "LOAD_BALANCING_STRATEGY_LEAST_RESPONSE_TIME",
        "least_response_time",
        "Least-Response-Time",
        2,
    ],
)
def test_enum_values_full_short_or_any_case(given: object) -> None:
    assert policy_from_data({"strategy": given}, "payment").strategy == LRT


def test_an_unknown_enum_value_lists_the_choices() -> None:
    with pytest.raises(InvalidArgument) as caught:
        policy_from_data({"strategy": "fastest"}, "payment")
    [violation] = caught.value.violations
    assert violation.field == "strategy"
    assert violation.description == (
        "'fastest' is not one of weighted_round_robin, least_response_time, "
        "highest_uptime, power_of_two_choices, random"
    )


def test_splits_as_a_mapping_or_a_list_and_camel_case_keys() -> None:
    as_mapping = policy_from_data(
        {"splits": {"v1": 90, "v2": 10}, "operationTimeouts": {"charge": "1s"}}, "payment"
    )
    as_list = policy_from_data(
        {
            "splits": [{"version": "v1", "weight": 90}, {"version": "v2", "weight": "10"}],
            "operation_timeouts": {"charge": 1},
        },
        "payment",
    )
    assert as_mapping == as_list
    assert [(s.version, s.weight) for s in as_mapping.splits] == [("v1", 90), ("v2", 10)]


def test_an_unquoted_numeric_version_is_refused() -> None:
    # YAML reads `1.10: 50` as the number 1.1: the version would silently change.
    with pytest.raises(InvalidArgument) as caught:
        policy_from_data({"splits": {1.1: 50, "1.2": 50}}, "payment")
    [violation] = caught.value.violations
    assert violation.field == "splits"
    assert "quote it" in violation.description


def test_the_service_name_comes_from_the_command_and_must_match_the_file() -> None:
    assert policy_from_data({}, "payment").service_name == "payment"
    assert policy_from_data({"serviceName": "payment"}, "payment").service_name == "payment"
    with pytest.raises(InvalidArgument) as caught:
        policy_from_data({"service_name": "ledger"}, "payment")
    [violation] = caught.value.violations
    assert violation.field == "service_name"
    assert violation.description == "is 'ledger', but the policy is set for 'payment'"


def test_unknown_and_repeated_fields_are_named_with_their_path() -> None:
    with pytest.raises(InvalidArgument) as caught:
        policy_from_data(
            {
                "timeout": "1s",
                "circuit_breaker": {"open_duration": "1s", "openDuration": "2s", "trips": 1},
            },
            "payment",
        )
    assert [(v.field, v.description) for v in caught.value.violations] == [
        ("timeout", "is not a field of ServicePolicy (did you mean 'default_timeout'?)"),
        ("circuit_breaker.openDuration", "repeats 'open_duration'; give only one of them"),
        (
            "circuit_breaker.trips",
            "is not a field of CircuitBreakerPolicy (known fields: consecutive_failures, "
            "failure_rate_threshold_percent, sliding_window_size, minimum_calls, "
            "open_duration, max_open_duration, half_open_max_calls)",
        ),
    ]


def test_wrong_types_are_named_with_their_path() -> None:
    with pytest.raises(InvalidArgument) as caught:
        policy_from_data(
            {
                "zone": {"enabled": "yes", "min_healthy_percent": "most"},
                "retry": {"max_attempts": -1, "retryable_codes": "UNAVAILABLE"},
                "splits": [{"version": 1, "weight": 100}],
                "health_check": "often",
            },
            "payment",
        )
    assert [v.field for v in caught.value.violations] == [
        "zone.enabled",
        "zone.min_healthy_percent",
        "retry.max_attempts",
        "retry.retryable_codes",
        "splits[0].version",
        "health_check",
    ]


def test_a_file_must_hold_a_mapping(tmp_path: Path) -> None:
    file = tmp_path / "list.yaml"
    file.write_text("- strategy: random\n")
    with pytest.raises(InvalidArgument) as caught:
        load_policy_file(str(file), "payment")
    assert caught.value.violations[0].description == (
        "the file must hold a mapping of policy fields, not a list"
    )
    broken = tmp_path / "broken.json"
    broken.write_text('{"strategy": }')
    with pytest.raises(InvalidArgument) as caught:
        load_policy_file(str(broken), "payment")
    assert caught.value.violations[0].description == (
        "the file is not JSON: line 1, column 14: Expecting value"
    )
    broken = tmp_path / "broken.yaml"
    broken.write_text("strategy: random\n---\nstrategy: random\n")
    with pytest.raises(InvalidArgument) as caught:
        load_policy_file(str(broken), "payment")
    assert caught.value.violations[0].description == (
        "the file is not YAML: line 2, column 1: expected a single document in the stream "
        "but found another document"
    )


def test_a_null_field_is_absent_and_clashes_with_no_other_spelling() -> None:
    policy = policy_from_data({"default_timeout": None, "defaultTimeout": "2s"}, "payment")
    assert policy.default_timeout.ToNanoseconds() == 2_000_000_000


@pytest.mark.parametrize(
    ("given", "description"),
    [
        ("soon", f"'soon' is not a duration ({HINT})"),
        (True, f"must be a duration ({HINT}), got a boolean"),
        (float("inf"), f"inf is not a duration ({HINT})"),
        (10**12, "is too long for a duration"),
    ],
)
def test_policy_and_workflow_files_refuse_a_duration_in_the_same_words(
    given: object, description: str
) -> None:
    with pytest.raises(InvalidArgument) as policy:
        policy_from_data({"retry": {"max_backoff": given}}, "payment")
    with pytest.raises(InvalidArgument) as workflow:
        workflow_from_dict({"name": "w", "steps": [{"name": "a", "retry": {"max_backoff": given}}]})
    assert [v.description for v in policy.value.violations] == [description]
    assert [v.description for v in workflow.value.violations] == [description]


def test_policy_and_workflow_files_refuse_a_count_in_the_same_words() -> None:
    with pytest.raises(InvalidArgument) as policy:
        policy_from_data({"retry": {"max_attempts": "three"}}, "payment")
    with pytest.raises(InvalidArgument) as workflow:
        workflow_from_dict(
            {"name": "w", "steps": [{"name": "a", "retry": {"max_attempts": "three"}}]}
        )
    policy_said = [v.description for v in policy.value.violations]
    workflow_said = [v.description for v in workflow.value.violations]
    assert policy_said == workflow_said == ["must be a whole number, got a string"]


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        (500_000_000, "500ms"),
        (1_500_000, "1.5ms"),
        (2_000_000_000, "2s"),
        (1_500_000_000, "1.5s"),
        (90_000_000_000, "1m30s"),
        (3_600_000_000_000, "1h"),
        (0, "0s"),
    ],
)
def test_durations_are_shown_as_a_file_would_write_them(nanos: int, text: str) -> None:
    assert format_duration(nanos) == text
    assert parse_duration(text) == nanos


def test_json_leaves_out_settings_at_their_default_and_keeps_an_explicit_zero() -> None:
    policy = registry_pb2.ServicePolicy(
        service_name="payment",
        retry=common_pb2.RetryPolicy(max_attempts=2, jitter=0.0),
        health_check=registry_pb2.HealthCheckPolicy(),
    )
    document = policy_cli.policy_to_dict(policy)
    assert document["retry"] == {"max_attempts": 2, "jitter": 0.0}  # jitter 0: none, as set
    assert document["health_check"] == {}  # set, every field at its default
    assert "circuit_breaker" not in document
    assert document["service_name"] == "payment"
    assert document["splits"] == []  # the policy's own fields are all there
