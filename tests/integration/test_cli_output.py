"""``-o table|wide|json|yaml`` of the real ``flext-mesh`` against a real control plane."""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest
import yaml
from google.protobuf.duration_pb2 import Duration

from flext_mesh.cli.output import FORMATS
from flext_mesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc, registry_pb2_grpc
from tests.conftest import start_serve
from tests.integration.test_cli_services import cli, register, table


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A control plane with ``payment`` (two instances in two zones), a workflow
    ``charge`` and one execution of it that has ended (its service has no instance)."""
    server = start_serve(tmp_path_factory.mktemp("cli-output"))
    try:
        with grpc.insecure_channel(server.address) as channel:
            registry = registry_pb2_grpc.RegistryServiceStub(channel)
            for number, zone in enumerate(("eu-1a", "eu-1b")):
                register(
                    registry,
                    "payment",
                    f"pay-{number}",
                    7100 + number,
                    version=f"1.{number}",
                    zone=zone,
                    type="store",
                    capabilities=["jwt"],
                )
            orchestrator = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            step = orchestrator_pb2.WorkflowStep(
                name="charge",
                service="nowhere",
                timeout=Duration(seconds=1),
                retry=common_pb2.RetryPolicy(max_attempts=1),
            )
            workflow = orchestrator_pb2.Workflow(
                name="charge", description="take the money", steps=[step]
            )
            orchestrator.PutWorkflow(
                orchestrator_pb2.PutWorkflowRequest(workflow=workflow), timeout=10
            )
            started = orchestrator.StartExecution(
                orchestrator_pb2.StartExecutionRequest(workflow_name="charge"), timeout=10
            ).execution
            deadline = time.monotonic() + 20
            while not started.HasField("end_time"):  # a document that no longer changes
                assert time.monotonic() < deadline, "the execution never ended"
                time.sleep(0.1)
                started = orchestrator.GetExecution(
                    orchestrator_pb2.GetExecutionRequest(execution_id=started.execution_id),
                    timeout=10,
                ).execution
        yield server.address
    finally:
        server.kill()


# The commands compared, each as a list of arguments; their documents must not change
# between two runs (no live health, no times that move).
_COMMANDS = {
    "services list": ["services", "list"],
    "services show": ["services", "show", "payment"],
    "workflow list": ["workflow", "list"],
    "execution list": ["execution", "list"],
    "policy split": ["policy", "split", "payment", "--clear"],
}


_RUNS: dict[tuple[str, ...], dict[str, subprocess.CompletedProcess[str]]] = {}


def _each_format(address: str, command: list[str]) -> dict[str, subprocess.CompletedProcess[str]]:
    """``command`` run once with each ``-o`` (the runs are kept for the module's tests)."""
    key = (address, *command)
    if key not in _RUNS:
        runs = [[*command, "-o", output, "--control-plane", address] for output in FORMATS]
        with ThreadPoolExecutor(2) as pool:
            done = list(pool.map(lambda args: cli(*args), runs))
        for run in done:
            assert run.returncode == 0, run.stderr
            assert run.stderr == ""
        _RUNS[key] = dict(zip(FORMATS, done, strict=True))
    return _RUNS[key]


@pytest.mark.parametrize("command", list(_COMMANDS), ids=list(_COMMANDS))
def test_json_and_yaml_print_the_same_document(address: str, command: str) -> None:
    runs = _each_format(address, _COMMANDS[command])
    from_json = json.loads(runs["json"].stdout)
    from_yaml = yaml.safe_load(runs["yaml"].stdout)
    assert from_yaml == from_json
    # Block style (no {...} or [...] but for empty ones), keys in the JSON order.
    assert not [
        line
        for line in runs["yaml"].stdout.splitlines()
        if ("{" in line or "[" in line) and not line.endswith(("{}", "[]"))
    ]
    if isinstance(from_json, list) and from_json:
        assert [list(item) for item in from_yaml] == [list(item) for item in from_json]


def test_wide_adds_columns_where_there_is_more_to_show(address: str) -> None:
    services = _each_format(address, _COMMANDS["services list"])
    narrow, wide = table(services["table"].stdout), table(services["wide"].stdout)
    assert wide[0] == [*narrow[0], "POLICY", "ZONES", "REVISION"]
    assert wide[1][: len(narrow[1])] == narrow[1]
    assert wide[1][len(narrow[1]) :] == ["-", "eu-1a,eu-1b", "2"]

    instances = _each_format(address, _COMMANDS["services show"])
    narrow, wide = table(instances["table"].stdout), table(instances["wide"].stdout)
    extra = ["TYPE", "CAPABILITIES", "CHECK", "REGISTERED", "RENEWED", "REVISION", "APPLIED"]
    assert wide[0] == [*narrow[0], *extra]
    assert [row[len(narrow[0]) : len(narrow[0]) + 3] for row in wide[1:]] == [
        ["store", "jwt", "TTL_ONLY"],
        ["store", "jwt", "TTL_ONLY"],
    ]

    executions = _each_format(address, _COMMANDS["execution list"])
    narrow, wide = table(executions["table"].stdout), table(executions["wide"].stdout)
    assert wide[0] == [*narrow[0], "ENDED", "ATTEMPTS", "FAILED_STEP", "CORRELATION", "OWNER"]
    document = json.loads(executions["json"].stdout)[0]
    assert wide[1][len(narrow[0]) + 2 :] == [
        "charge",
        document["correlation_id"],
        document["owner"],
    ]

    workflows = _each_format(address, _COMMANDS["workflow list"])
    narrow, wide = table(workflows["table"].stdout), table(workflows["wide"].stdout)
    assert wide[0] == [*narrow[0], "CREATED", "TIMEOUT", "DESCRIPTION"]
    assert wide[1][-2:] == ["none", "take the money"]


def test_wide_is_the_table_where_there_is_nothing_more(address: str) -> None:
    runs = _each_format(address, _COMMANDS["policy split"])
    assert (
        runs["wide"].stdout == runs["table"].stdout == "payment: no policy, so no split to clear\n"
    )


@pytest.mark.parametrize(
    "command",
    [["services", "list"], ["execution", "show", "x"], ["status"], ["tokens", "list"]],
    ids=" ".join,
)
def test_an_unknown_format_is_one_line_naming_the_allowed_ones(
    command: list[str], tmp_path: Path
) -> None:
    run = cli(*command, "-o", "xml", "--file", str(tmp_path / "tokens"))
    assert run.returncode == 2
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"flext-mesh {' '.join(command[:2])}")
    assert "invalid choice: 'xml' (choose from 'table', 'json', 'yaml', 'wide')" in lines[0]


def test_each_noun_answers_to_its_singular_too(address: str, tmp_path: Path) -> None:
    plural = json.loads(_each_format(address, _COMMANDS["services list"])["json"].stdout)
    singular = cli("service", "list", "-o", "json", "--control-plane", address)
    assert singular.returncode == 0, singular.stderr
    assert json.loads(singular.stdout) == plural
    made = cli("cert", "init", "--dir", str(tmp_path))  # a local noun, run without a channel
    assert made.returncode == 0, made.stderr
    assert (tmp_path / "ca.crt").exists()
