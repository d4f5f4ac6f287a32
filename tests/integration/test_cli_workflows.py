"""``flext-mesh workflow ...`` and ``flext-mesh execution ...`` as an operator runs them.

The real console script talks to a real ``flext-mesh serve``; steps run in real
``flext-sidecar`` processes serving tests.orchestrator.apps, steered by the execution
input (``{"key": ..., "behaviour": {OPERATION: {"fail" | "sleep" | "unavailable_first"}}}``).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from flext_mesh.cli import main
from flext_mesh.cli.workflows import EXECUTION_HEADERS, STEP_HEADERS, WORKFLOW_HEADERS
from flext_mesh.orchestrator.formats import load_workflow_file
from flext_mesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.conftest import BIN, REPO, ServeProcess, start_serve

EXAMPLES = REPO / "examples" / "workflows"
# Two YAML documents: a saga whose last step can fail after a compensable one, and a
# one-step workflow used by the listing and restart tests.
TWO_WORKFLOWS = """\
name: checkout
description: Reserve, then charge; the reservation is released when the charge fails.
steps:
  - name: validate_payment
    service: payment
  - name: reserve_inventory
    service: inventory
    depends_on: [validate_payment]
    compensation: release_inventory
  - name: process_payment
    service: payment
    depends_on: [reserve_inventory]
---
name: restock
steps:
  - name: reserve
    service: inventory
    retry: {max_attempts: 10, initial_backoff: 200ms, max_backoff: 1s}
    compensation: {operation: release, timeout: 2s}
"""
_SIDECAR_SERVING = re.compile(r"serving service=\S+ instance=\S+ listen=\S+")
# A line of the live view: "  HH:MM:SS.mmm  SUBJECT  WHAT".
_EVENT_LINE = re.compile(r"  (\d\d:\d\d:\d\d\.\d{3})  (\S+) +(.+)")


# -- processes ---------------------------------------------------------------------------


def cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run ``flext-mesh args...`` (without FLEXT_MESH_* from our environment)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXT_MESH_")}
    return subprocess.run(
        [str(BIN / "flext-mesh"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env=env,
    )


def cli_all(*commands: list[str]) -> list[subprocess.CompletedProcess[str]]:
    """Run several independent ``flext-mesh`` commands at once; results in order."""
    procs = [
        subprocess.Popen(
            [str(BIN / "flext-mesh"), *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    results = []
    for command, proc in zip(commands, procs, strict=True):
        out, err = proc.communicate(timeout=30)
        results.append(subprocess.CompletedProcess(command, proc.returncode, out, err))
    return results


def start_sidecars(
    tmp_path: Path, control_plane: str, services: dict[str, str], *, ttl: float = 2
) -> list[subprocess.Popen[str]]:
    """Start one flext-sidecar per ``{service: APP}`` of tests.orchestrator.apps; wait."""
    started: list[tuple[subprocess.Popen[str], Path]] = []
    for service, app in services.items():
        log = tmp_path / f"sidecar-{service}-{time.monotonic_ns()}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [
                    str(BIN / "flext-sidecar"),
                    "--service",
                    service,
                    "--app",
                    f"tests.orchestrator.apps:{app}",
                    "--control-plane",
                    control_plane,
                    "--ttl",
                    str(ttl),
                    "--grace-period",
                    "1",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "PYTHONPATH": str(REPO)},
            )
        started.append((proc, log))
    deadline = time.monotonic() + 20
    for proc, log in started:
        while not _SIDECAR_SERVING.search(log.read_text()):
            if proc.poll() is not None:
                raise AssertionError(f"flext-sidecar exited early:\n{log.read_text()}")
            assert time.monotonic() < deadline, f"flext-sidecar did not start:\n{log.read_text()}"
            time.sleep(0.05)
    wait_discoverable(control_plane, *services)
    return [proc for proc, _ in started]


def wait_discoverable(address: str, *services: str) -> None:
    """Wait until Discover returns a healthy instance of each service."""
    deadline = time.monotonic() + 20
    with grpc.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        for service in services:
            while True:
                try:
                    reply = stub.Discover(
                        registry_pb2.DiscoverRequest(service_name=service), timeout=5
                    )
                    if reply.instances:
                        break
                except grpc.RpcError:
                    pass  # no instance yet: NOT_FOUND or UNAVAILABLE
                assert time.monotonic() < deadline, f"{service} never became discoverable"
                time.sleep(0.05)


def stop(*procs: subprocess.Popen[str]) -> None:
    """Kill and reap."""
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
    for proc in procs:
        proc.wait(10)


def put_workflows(address: str, *paths: Path) -> None:
    """Store the workflows of ``paths`` over gRPC (the CLI is not under test here)."""
    with grpc.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        for path in paths:
            for workflow in load_workflow_file(path):
                stub.PutWorkflow(orchestrator_pb2.PutWorkflowRequest(workflow=workflow), timeout=10)


def get_execution(address: str, execution_id: str) -> orchestrator_pb2.Execution:
    with grpc.insecure_channel(address) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        request = orchestrator_pb2.GetExecutionRequest(execution_id=execution_id)
        return stub.GetExecution(request, timeout=10).execution


def wait_for(
    address: str,
    execution_id: str,
    done: Callable[[orchestrator_pb2.Execution], bool],
    what: str,
    within: float = 10,
) -> orchestrator_pb2.Execution:
    """Poll GetExecution until ``done(execution)``."""
    deadline = time.monotonic() + within
    while True:
        execution = get_execution(address, execution_id)
        if done(execution):
            return execution
        assert time.monotonic() < deadline, f"never {what}: {execution}"
        time.sleep(0.05)


def free_port() -> int:
    """A loopback port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A control plane with payment and inventory sidecars and four workflows stored.

    order_fulfillment and user_registration (examples/workflows), checkout and restock
    (TWO_WORKFLOWS). Tests tell their executions apart by workflow or input key.
    """
    tmp = tmp_path_factory.mktemp("cli-workflows")
    server = start_serve(tmp)
    sidecars: list[subprocess.Popen[str]] = []
    try:
        sidecars = start_sidecars(
            tmp, server.address, {"payment": "PAYMENT", "inventory": "INVENTORY"}
        )
        (tmp / "two.yaml").write_text(TWO_WORKFLOWS)
        put_workflows(
            server.address,
            EXAMPLES / "order_fulfillment.yaml",
            EXAMPLES / "user_registration.json",
            tmp / "two.yaml",
        )
        yield server.address
    finally:
        stop(server.proc, *sidecars)


def events(stdout: str) -> list[tuple[str, str]]:
    """(subject, what) of each live-view line of ``stdout``, in order."""
    found = []
    for line in stdout.splitlines():
        match = _EVENT_LINE.fullmatch(line)
        if match:
            found.append((match[2], match[3]))
    return found


def rows(stdout: str) -> list[list[str]]:
    """The rows of a printed table (header first), split on the column gaps."""
    return [re.split(r"\s{2,}", line) for line in stdout.splitlines() if line]


def key(name: str) -> str:
    """An input key unique to this run, so that side effects of reruns do not mix."""
    return f"{name}-{time.time_ns()}"


# -- workflow apply ------------------------------------------------------------------------


def test_apply_prints_each_version_and_whether_it_changed(
    serve_process: ServeProcess, tmp_path: Path
) -> None:
    address = serve_process.address
    two = tmp_path / "two.yaml"
    two.write_text(TWO_WORKFLOWS)
    files = [str(EXAMPLES / "user_registration.json"), str(EXAMPLES / "order_fulfillment.yaml")]
    files.append(str(two))

    first = cli("workflow", "apply", *files, "--control-plane", address)
    assert first.returncode == 0, first.stderr
    assert first.stderr == ""
    assert first.stdout == (
        "user_registration: version 1 (changed)\n"
        "order_fulfillment: version 1 (changed)\n"
        "checkout: version 1 (changed)\n"
        "restock: version 1 (changed)\n"
    )

    two.write_text(TWO_WORKFLOWS.replace("Reserve, then charge", "Reserve first, then charge"))
    again = cli("workflow", "apply", *files, "--control-plane", address)
    assert again.returncode == 0, again.stderr
    assert again.stdout == (
        "user_registration: version 1 (unchanged)\n"
        "order_fulfillment: version 1 (unchanged)\n"
        "checkout: version 2 (changed)\n"
        "restock: version 1 (unchanged)\n"
    )

    old = cli("workflow", "show", "checkout", "--version", "1", "--control-plane", address)
    assert old.returncode == 0, old.stderr
    assert old.stdout.splitlines()[:2] == [
        "workflow checkout, version 1",
        "description: Reserve, then charge; the reservation is released when the charge fails.",
    ]


def test_apply_lists_every_violation_the_control_plane_finds(plane: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        """\
name: fine
steps: [{name: only, service: payment}]
---
name: broken
steps:
  - {name: a, service: payment, depends_on: [nowhere]}
  - {name: b, service: payment, depends_on: [c]}
  - {name: c, service: payment, depends_on: [b]}
  - {name: d, service: payment, timeout: 2h}
"""
    )
    run = cli("workflow", "apply", str(bad), "--control-plane", plane)
    assert run.returncode == 1
    assert run.stdout == "fine: version 1 (changed)\n"  # the valid one is still applied
    headline, *violations = run.stderr.splitlines()
    assert headline == f"flext-mesh: error: workflow 'broken' ({bad}) is not valid:"
    assert "  workflow.steps[0].depends_on[0]: unknown step 'nowhere'" in violations
    assert "  workflow.steps[3].timeout: must be between 1ms and 1h, got 7200s" in violations
    assert any(v.startswith("  workflow.steps: cycle: b -> c -> b") for v in violations)
    assert all(v.startswith("  workflow.") for v in violations)
    with grpc.insecure_channel(plane) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        with pytest.raises(grpc.RpcError) as missing:
            stub.GetWorkflow(orchestrator_pb2.GetWorkflowRequest(name="broken"), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND


def test_apply_reads_every_file_before_calling_the_control_plane(tmp_path: Path) -> None:
    typo = tmp_path / "typo.json"
    typo.write_text(
        json.dumps(
            {
                "workflow_id": "typo",
                "steps": [{"step": "a", "service": "s", "timeout_ms": "5s", "retires": {}}],
            }
        )
    )
    good = str(EXAMPLES / "order_fulfillment.yaml")
    # Nothing listens there: a single call would end in "cannot reach the control plane".
    nowhere = f"127.0.0.1:{free_port()}"
    run = cli("workflow", "apply", good, str(typo), "--control-plane", nowhere)
    assert run.returncode == 1
    assert run.stdout == ""
    assert run.stderr.splitlines() == [
        f"flext-mesh: error: {typo} is not a valid workflow file:",
        f"  {typo}[0].steps[0].retires: is not a known key; did you mean 'retry'?",
        f"  {typo}[0].steps[0].timeout_ms: must be a number of milliseconds, got '5s'",
    ]


# -- workflow list / show / delete -----------------------------------------------------------


def test_list_and_show_describe_the_stored_workflows(plane: str) -> None:
    listed, shown, as_json = cli_all(
        ["workflow", "list", "--control-plane", plane],
        ["workflow", "show", "order_fulfillment", "--control-plane", plane],
        ["workflow", "show", "user_registration", "-o", "json", "--control-plane", plane],
    )
    assert listed.returncode == 0, listed.stderr
    table = rows(listed.stdout)
    assert table[0] == list(WORKFLOW_HEADERS)
    stored = {r[0]: r for r in table[1:]}
    assert list(stored) == sorted(stored)
    assert stored["order_fulfillment"][1:3] == ["1", "2"]
    assert stored["user_registration"][1:3] == ["1", "3"]
    assert stored["checkout"][1:3] == ["1", "3"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", stored["checkout"][3])

    assert shown.returncode == 0, shown.stderr
    head, steps = shown.stdout.split("\n\n")
    assert head.splitlines() == [
        "workflow order_fulfillment, version 1",
        "description: Validate the payment, then reserve the stock (released on failure).",
        "timeout: 120 s",
        head.splitlines()[3],
    ]
    assert re.fullmatch(r"created: \S+ \S+   updated: \S+ \S+", head.splitlines()[3])
    by_step = {r[0]: r for r in rows(steps)[1:]}
    assert by_step["validate_payment"][1:] == [
        "payment.validate_payment",
        "-",
        "yes",
        "5 s",
        "3 attempts, backoff 100 ms x2 up to 5 s",
        "-",
    ]
    assert by_step["reserve_inventory"][1:] == [
        "inventory.reserve_inventory",
        "validate_payment",
        "yes",
        "10 s",
        "3 attempts, backoff 100 ms x2 up to 5 s",
        "inventory.release_inventory (timeout 10 s, 5 attempts)",
    ]

    assert as_json.returncode == 0, as_json.stderr
    workflow = json.loads(as_json.stdout)
    assert workflow["name"] == "user_registration"
    assert [s["name"] for s in workflow["steps"]] == [
        "authenticate_request",
        "create_user_profile",
        "send_welcome_notification",
    ]
    assert workflow["steps"][2]["service"] == "notification"
    assert workflow["steps"][2]["required"] is False
    assert workflow["steps"][2]["depends_on"] == ["create_user_profile"]
    assert workflow["steps"][2]["timeout"] == "3s"


def test_delete_then_using_the_name_is_one_line_not_found(plane: str, tmp_path: Path) -> None:
    doomed = tmp_path / "doomed.json"
    guide = json.loads((EXAMPLES / "user_registration.json").read_text())
    doomed.write_text(json.dumps({**guide, "workflow_id": "doomed"}))
    put_workflows(plane, doomed)
    deleted = cli("workflow", "delete", "doomed", "--control-plane", plane)
    assert deleted.returncode == 0, deleted.stderr
    assert deleted.stdout == "workflow 'doomed' deleted\n"
    for run in cli_all(
        ["workflow", "show", "doomed", "--control-plane", plane],
        ["workflow", "run", "doomed", "--watch", "--control-plane", plane],
    ):
        assert run.returncode == 1, run
        assert run.stdout == ""
        assert run.stderr == "flext-mesh: error: workflow 'doomed' does not exist\n"


def test_unreachable_control_plane_and_bad_input_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = f"127.0.0.1:{free_port()}"
    unreachable = cli("workflow", "list", "--control-plane", target, "--timeout", "2")
    assert unreachable.returncode == 1
    assert unreachable.stdout == ""
    assert unreachable.stderr.count("\n") == 1
    assert unreachable.stderr.startswith(
        f"flext-mesh: error: cannot reach the control plane at {target}: "
    )

    # Usage errors stop in argparse, before any call: the entry point, in process.
    (tmp_path / "input.json").write_text("[1, 2]")
    (tmp_path / "empty.json").write_text("{}")
    for argv, problem in [
        (["workflow", "run", "x", "--input", "{nope"], "argument --input: not JSON: "),
        (
            ["workflow", "run", "x", "--input-file", str(tmp_path / "input.json")],
            "must hold a JSON object, not [1, 2]",
        ),
        (
            ["workflow", "run", "x", "--input", "{}", "--input-file", str(tmp_path / "empty.json")],
            "not allowed with argument --input",
        ),
        (
            ["execution", "list", "--state", "done"],
            "'done' is not an execution state (one of pending, running, succeeded, failed, "
            "compensating, compensated, compensation_failed, cancelled)",
        ),
        (["workflow", "show", "x", "--version", "0"], "'0' is not a whole number >= 1"),
    ]:
        with pytest.raises(SystemExit) as exited:
            main(argv)
        assert exited.value.code == 2, argv
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert problem in err


# -- workflow run --watch ----------------------------------------------------------------


def test_run_watch_prints_each_step_as_it_happens_and_exits_0(plane: str) -> None:
    run = cli(
        "workflow",
        "run",
        "order_fulfillment",
        "--input",
        json.dumps({"key": key("ok")}),
        "--watch",
        "--control-plane",
        plane,
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    lines = run.stdout.splitlines()
    started = re.fullmatch(r"execution (\w+) of order_fulfillment@1 started", lines[0])
    assert started, lines[0]
    assert re.fullmatch(rf"execution {started[1]}: SUCCEEDED in [\d.]+ m?s", lines[-1])
    seen = events(run.stdout)
    assert len(seen) == len(lines) - 2
    assert [(subject, what.split(" ")[0]) for subject, what in seen] == [
        ("(execution)", "CREATED"),
        ("(execution)", "STARTED"),
        ("validate_payment", "STARTED"),
        ("validate_payment", "SUCCEEDED"),
        ("reserve_inventory", "STARTED"),
        ("reserve_inventory", "SUCCEEDED"),
        ("(execution)", "ENDED"),
    ]
    assert re.fullmatch(r"STARTED \(attempt 1\) on payment-\S+", seen[2][1])
    assert re.fullmatch(r"SUCCEEDED [\d.]+ m?s on payment-\S+", seen[3][1])
    assert re.fullmatch(r"SUCCEEDED [\d.]+ m?s on inventory-\S+", seen[5][1])
    assert seen[6][1] == "ENDED SUCCEEDED"
    stamps = [m[1] for m in map(_EVENT_LINE.fullmatch, lines[1:-1]) if m]
    assert stamps == sorted(stamps)


def test_run_watch_of_a_failed_saga_shows_retries_and_compensation_and_exits_1(
    plane: str,
) -> None:
    behaviour = {
        "reserve_inventory": {"unavailable_first": 1},
        "process_payment": {"fail": "FAILED_PRECONDITION", "message": "card declined"},
    }
    run = cli(
        "workflow",
        "run",
        "checkout",
        "--input",
        json.dumps({"key": key("saga"), "behaviour": behaviour}),
        "--watch",
        "--control-plane",
        plane,
    )
    assert run.returncode == 1, run.stderr
    assert run.stderr == ""
    execution_id = run.stdout.split()[1]
    seen = events(run.stdout)
    assert [(s, w.split(" ")[0].rstrip(":")) for s, w in seen] == [
        ("(execution)", "CREATED"),
        ("(execution)", "STARTED"),
        ("validate_payment", "STARTED"),
        ("validate_payment", "SUCCEEDED"),
        ("reserve_inventory", "STARTED"),
        ("reserve_inventory", "RETRYING"),
        ("reserve_inventory", "STARTED"),
        ("reserve_inventory", "SUCCEEDED"),
        ("process_payment", "STARTED"),
        ("process_payment", "FAILED"),
        ("reserve_inventory", "COMPENSATION_STARTED"),
        ("reserve_inventory", "COMPENSATION_SUCCEEDED"),
        ("(execution)", "ENDED"),
    ]
    assert re.fullmatch(
        r"RETRYING after [\d.]+ ms: UNAVAILABLE reserve_inventory is overloaded "
        r"\(attempt 1 on inventory-\S+\)",
        seen[5][1],
    )
    # An answered failure: the retry may go to any instance (here the only one).
    assert re.fullmatch(r"STARTED \(attempt 2\) on inventory-\S+", seen[6][1])
    assert re.fullmatch(
        r"FAILED [\d.]+ m?s on payment-\S+: FAILED_PRECONDITION card declined", seen[9][1]
    )
    assert seen[10][1] == "COMPENSATION_STARTED inventory.release_inventory (attempt 1)"
    assert seen[12][1] == (
        "ENDED COMPENSATED: FAILED_PRECONDITION card declined (step process_payment)"
    )
    assert re.fullmatch(
        rf"execution {execution_id}: COMPENSATED in [\d.]+ m?s "
        r"\(step process_payment: FAILED_PRECONDITION card declined\)",
        run.stdout.splitlines()[-1],
    )

    # Later, the same history: from `execution watch` (replayed) and `show --events`.
    watched, shown, as_json = cli_all(
        ["execution", "watch", execution_id, "--control-plane", plane],
        ["execution", "show", execution_id, "--events", "--control-plane", plane],
        ["execution", "show", execution_id, "-o", "json", "--control-plane", plane],
    )
    assert watched.returncode == 1, watched.stderr
    assert events(watched.stdout) == seen
    assert shown.returncode == 0, shown.stderr
    head, steps, history = shown.stdout.split("\n\n")
    assert f"execution {execution_id}" in head.splitlines()
    assert "workflow:     checkout@1" in head.splitlines()
    assert "state:        COMPENSATED" in head.splitlines()
    assert "error:        FAILED_PRECONDITION card declined (step process_payment)" in head
    table = rows(steps)
    assert table[0] == list(STEP_HEADERS)
    assert [r[:3] for r in table[1:]] == [
        ["validate_payment", "SUCCEEDED", "1"],
        ["reserve_inventory", "COMPENSATED", "2 (+1 comp.)"],
        ["process_payment", "FAILED", "1"],
    ]
    assert table[3][5] == "FAILED_PRECONDITION card declined"
    assert history.splitlines()[0] == "events:"
    assert events(history) == seen
    answer = json.loads(as_json.stdout)
    assert answer["execution"]["state"] == "EXECUTION_STATE_COMPENSATED"
    assert answer["execution"]["failed_step"] == "process_payment"
    assert answer["events"] == []


def test_run_without_watch_prints_the_id_and_honours_the_idempotency_key(
    plane: str, tmp_path: Path
) -> None:
    given = tmp_path / "input.yaml"
    given.write_text(f"key: {key('idem')}\norder_id: o-7\n")
    idempotency_key = key("order-o-7")
    first, second = (
        cli(
            "workflow",
            "run",
            "order_fulfillment",
            "--input-file",
            str(given),
            "--idempotency-key",
            idempotency_key,
            *output,
            "--control-plane",
            plane,
        )
        for output in ((), ("-o", "json"))
    )
    assert first.returncode == 0, first.stderr
    execution_id = first.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{22}", execution_id)
    assert second.returncode == 0, second.stderr
    answer = json.loads(second.stdout)
    assert answer["existing"] is True
    assert answer["execution"]["execution_id"] == execution_id
    assert answer["execution"]["input"]["order_id"] == "o-7"
    ended = wait_for(plane, execution_id, lambda e: e.HasField("end_time"), "ended")
    assert ended.state == orchestrator_pb2.EXECUTION_STATE_SUCCEEDED


# -- execution list / cancel ------------------------------------------------------------------


def test_execution_list_filters_by_workflow_and_state_newest_first(plane: str) -> None:
    with grpc.insecure_channel(plane) as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        ids = []
        for behaviour in ({}, {"reserve": {"fail": "FAILED_PRECONDITION"}}):
            request = orchestrator_pb2.StartExecutionRequest(workflow_name="restock")
            request.input.update({"key": key("list"), "behaviour": behaviour})
            ids.append(stub.StartExecution(request, timeout=10).execution.execution_id)
    succeeded, failed = ids
    for execution_id in ids:
        wait_for(plane, execution_id, lambda e: e.HasField("end_time"), "ended")

    restock = ["execution", "list", "--workflow", "restock", "--control-plane", plane]
    everything, only_failed, only_succeeded, newest = cli_all(
        restock,
        [*restock, "--state", "failed"],
        [*restock, "--state", "EXECUTION_STATE_SUCCEEDED", "-o", "json"],
        [*restock, "--limit", "1"],
    )
    table = rows(everything.stdout)
    assert table[0] == list(EXECUTION_HEADERS)
    assert [r[:3] for r in table[1:]] == [
        [failed, "restock@1", "FAILED"],
        [succeeded, "restock@1", "SUCCEEDED"],
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", table[1][3])
    assert re.fullmatch(r"[\d.]+ m?s", table[1][4])
    assert [r[0] for r in rows(only_failed.stdout)[1:]] == [failed]
    assert [e["execution_id"] for e in json.loads(only_succeeded.stdout)] == [succeeded]
    assert [r[0] for r in rows(newest.stdout)[1:]] == [failed]


def test_cancel_stops_a_running_execution_and_refuses_an_ended_one(plane: str) -> None:
    slow = {"key": key("cancel"), "behaviour": {"reserve_inventory": {"sleep": 3}}}
    started = cli(
        "workflow",
        "run",
        "order_fulfillment",
        "--input",
        json.dumps(slow),
        "--control-plane",
        plane,
    )
    assert started.returncode == 0, started.stderr
    execution_id = started.stdout.strip()
    wait_for(
        plane,
        execution_id,
        lambda e: e.steps[1].state == orchestrator_pb2.STEP_STATE_RUNNING,
        "reached reserve_inventory",
    )
    began = time.monotonic()
    cancel = cli(
        "execution", "cancel", execution_id, "--reason", "customer called", "--control-plane", plane
    )
    assert cancel.returncode == 0, cancel.stderr
    # reserve_inventory was cut off in flight and declares release_inventory: the cancel
    # answers at once while its outcome is being settled.
    assert cancel.stdout == f"execution {execution_id}: COMPENSATING\n"
    assert time.monotonic() - began < 10
    ended = wait_for(
        plane,
        execution_id,
        lambda e: e.state == orchestrator_pb2.EXECUTION_STATE_CANCELLED,
        "cancelled",
    )
    # Its sidecar finished the reservation anyway (its caller went away): asked with the
    # same key, it answered that it succeeded, so the reservation was released.
    assert ended.steps[1].state == orchestrator_pb2.STEP_STATE_COMPENSATED
    assert not ended.steps[1].outcome_unknown

    shown, again = cli_all(
        ["execution", "show", execution_id, "--events", "--control-plane", plane],
        ["execution", "cancel", execution_id, "--control-plane", plane],
    )
    assert "state:        CANCELLED" in shown.stdout.splitlines()
    steps = {r[0]: r for r in rows(shown.stdout.split("\n\n")[1])[1:]}
    assert steps["validate_payment"][1] == "SUCCEEDED"
    assert steps["reserve_inventory"][1] == "COMPENSATED"
    seen = events(shown.stdout)
    assert ("(execution)", "CANCEL_REQUESTED: customer called") in seen
    assert (
        "reserve_inventory",
        "CANCELLED: stopped in flight: the execution is stopping",
    ) in seen
    resolved = [what for step, what in seen if what.startswith("OUTCOME_RESOLVED")]
    assert [w.split(":")[0] for w in resolved] == ["OUTCOME_RESOLVED SUCCEEDED"]
    assert any(
        step == "reserve_inventory" and what.startswith("COMPENSATION_SUCCEEDED")
        for step, what in seen
    )
    assert seen[-1][1] == "ENDED CANCELLED: customer called"
    assert "error:        CANCELLED: customer called" in shown.stdout.splitlines()

    assert again.returncode == 1
    assert again.stdout == ""
    assert again.stderr == (
        f"flext-mesh: error: execution {execution_id} already ended (CANCELLED)\n"
    )


# -- a control-plane restart during a watch -----------------------------------------------------


def test_watch_reconnects_after_a_control_plane_crash_without_losing_events(
    tmp_path: Path,
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    server = start_serve(tmp_path, "--listen", listen)
    # A long lease: the instance stays registered across the control plane's restart.
    sidecars = start_sidecars(tmp_path, listen, {"inventory": "INVENTORY"}, ttl=60)
    watch: subprocess.Popen[str] | None = None
    try:
        (tmp_path / "two.yaml").write_text(TWO_WORKFLOWS)
        put_workflows(listen, tmp_path / "two.yaml")
        command = ["workflow", "run", "restock", "--watch", "--control-plane", listen]
        command += [
            "--input",
            json.dumps({"key": key("restart"), "behaviour": {"reserve": {"sleep": 2}}}),
        ]
        watch = subprocess.Popen(
            [str(BIN / "flext-mesh"), *command],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert watch.stdout is not None
        before: list[str] = []
        while not before or "reserve" not in before[-1]:
            line = watch.stdout.readline()
            assert line, f"the watch ended early: {before}"
            before.append(line)
        assert watch.poll() is None  # printed live, while the step still runs

        server.kill()
        server = start_serve(tmp_path, "--listen", listen)
        out, err = watch.communicate(timeout=30)
        execution_id = "".join(before).split()[1]
        with grpc.insecure_channel(listen) as channel:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            request = orchestrator_pb2.GetExecutionRequest(
                execution_id=execution_id, include_events=True
            )
            history = stub.GetExecution(request, timeout=10).events
    finally:
        stop(server.proc, *sidecars, *([watch] if watch else []))

    assert watch.returncode == 0, err
    lines = ("".join(before) + out).splitlines()
    assert lines[-1].startswith(f"execution {execution_id}: SUCCEEDED in ")
    seen = events("\n".join(lines))
    assert seen[:2] == [("(execution)", "CREATED"), ("(execution)", "STARTED")]
    assert seen[2][0] == "reserve"
    first = re.fullmatch(r"STARTED \(attempt 1\) on (inventory-\S+)", seen[2][1])
    assert first, seen[2][1]
    assert seen[3][0] == "(execution)"
    assert seen[3][1].startswith("RESUMED: resumed by ")
    assert seen[4][0] == "reserve"
    # Sent again with the same idempotency key to the instance that got it.
    assert seen[4][1].startswith(f"STARTED (attempt 2) on {first[1]}: sent again"), seen[4][1]
    assert seen[-2][0] == "reserve"
    assert seen[-2][1].startswith("SUCCEEDED")
    assert seen[-1] == ("(execution)", "ENDED SUCCEEDED")
    # Every event of the history exactly once, in order: nothing lost, nothing twice.
    assert len(seen) == len(history)
    for (subject, what), event in zip(seen, history, strict=True):
        if event.step_name and not what.startswith("ENDED"):
            assert subject == event.step_name, (what, event)
        else:
            assert subject == "(execution)", (what, event)
    notes = err.splitlines()
    assert notes[0].startswith("flext-mesh: watch interrupted after event 3 (")
    assert notes[0].endswith(f"); reconnecting to {listen}")
    assert notes[-1] == "flext-mesh: watching again after event 3"
