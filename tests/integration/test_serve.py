"""``flext-mesh serve`` as a user runs it: grpcurl sessions, signals, bad input."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BIN, REPO, ServeProcess, grpcurl_path, start_serve
from tests.sidecar.test_sidecar_process import start_sidecar

SERVICES = (
    "flext_mesh.v1.RegistryService",
    "flext_mesh.v1.MetricsService",
    "flext_mesh.v1.OrchestratorService",
    "flext_mesh.v1.ProcessorService",
)


def grpcurl(address: str, *args: str, data: dict[str, object] | None = None) -> tuple[int, str]:
    """Run the real grpcurl against ``address``; returns (exit code, stdout+stderr)."""
    cmd = [grpcurl_path(), "-plaintext"]
    if data is not None:
        cmd += ["-d", json.dumps(data)]
    proc = subprocess.run(
        [*cmd, address, *args], capture_output=True, text=True, timeout=30, check=False
    )
    return proc.returncode, proc.stdout + proc.stderr


def test_grpcurl_lists_every_service_and_health(serve_process: ServeProcess) -> None:
    code, out = grpcurl(serve_process.address, "list")
    assert code == 0, out
    listed = set(out.split())
    assert {*SERVICES, "grpc.health.v1.Health"} <= listed


@pytest.mark.parametrize("service", SERVICES)
def test_grpcurl_describes_each_service_from_reflection(
    serve_process: ServeProcess, service: str
) -> None:
    code, out = grpcurl(serve_process.address, "describe", service)
    assert code == 0, out
    assert f"{service} is a service" in out
    assert "rpc " in out


def _comment_above(proto: str, declaration: str, *, within: str = "") -> list[str]:
    """The ``//`` comment lines right above ``declaration`` (the first after the line
    starting with ``within``) in protos/flext_mesh/v1/."""
    lines = (REPO / "protos" / "flext_mesh" / "v1" / proto).read_text().splitlines()
    begin = next(i for i, line in enumerate(lines) if line.startswith(within))
    at = next(i for i in range(begin, len(lines)) if lines[i].strip().startswith(declaration))
    comment: list[str] = []
    for line in reversed(lines[:at]):
        if not line.strip().startswith("//"):
            break
        comment.insert(0, line.strip())
    assert comment, f"no comment above {declaration!r} in {proto}"
    return comment


def test_describe_shows_message_fields_with_their_comments(serve_process: ServeProcess) -> None:
    code, out = grpcurl(serve_process.address, "describe", "flext_mesh.v1.RegisterRequest")
    assert code == 0, out
    assert ".flext_mesh.v1.ServiceInstance instance = 1;" in out
    assert ".google.protobuf.Duration ttl = 2;" in out
    shown = [line.strip() for line in out.splitlines()]
    for comment in (
        _comment_above("registry.proto", "message RegisterRequest"),
        _comment_above(
            "registry.proto",
            "google.protobuf.Duration ttl = 2;",
            within="message RegisterRequest",
        ),
    ):
        assert all(line in shown for line in comment), (comment, out)


def test_describe_shows_an_rpc_and_a_field_with_their_comments(
    serve_process: ServeProcess,
) -> None:
    code, out = grpcurl(serve_process.address, "describe", "flext_mesh.v1.RegistryService.Register")
    assert code == 0, out
    assert "flext_mesh.v1.RegistryService.Register is a method" in out
    assert _comment_above("registry.proto", "rpc Register(")[0] in out
    code, out = grpcurl(serve_process.address, "describe", "flext_mesh.v1.ServiceInstance.endpoint")
    assert code == 0, out
    assert _comment_above("registry.proto", "string endpoint = 3;")[0] in out
    code, out = grpcurl(serve_process.address, "describe", "flext_mesh.v1.RegistryService.Nope")
    assert code != 0
    assert "Symbol not found" in out
    # Files outside the contracts still resolve, from the running process.
    code, out = grpcurl(serve_process.address, "describe", "grpc.health.v1.Health")
    assert code == 0, out
    assert "rpc Check ( .grpc.health.v1.HealthCheckRequest )" in out


def test_a_sidecar_describes_invoke_with_its_comment(
    tmp_path: Path, serve_process: ServeProcess
) -> None:
    sidecar = start_sidecar(tmp_path, serve_process.address)
    try:
        code, out = grpcurl(sidecar.address, "describe", "flext_mesh.v1.ProcessorService")
        assert code == 0, out
        assert _comment_above("processor.proto", "rpc Invoke(")[0] in out
        code, out = grpcurl(sidecar.address, "flext_mesh.v1.ProcessorService/ListOperations")
        assert code == 0, out
        assert "charge" in out
    finally:
        sidecar.proc.send_signal(signal.SIGTERM)
        sidecar.proc.wait(15)


def test_health_check_answers_serving_overall_and_per_service(
    serve_process: ServeProcess,
) -> None:
    code, out = grpcurl(serve_process.address, "grpc.health.v1.Health/Check")
    assert code == 0, out
    assert json.loads(out) == {"status": "SERVING"}
    for service in SERVICES:
        code, out = grpcurl(
            serve_process.address, "grpc.health.v1.Health/Check", data={"service": service}
        )
        assert json.loads(out) == {"status": "SERVING"}, service


def test_a_policy_session_with_grpcurl(serve_process: ServeProcess) -> None:
    """Operators set and read traffic policies with grpcurl; bad ones name every field."""
    address = serve_process.address
    code, out = grpcurl(
        address,
        "flext_mesh.v1.RegistryService/GetServicePolicy",
        data={"service_name": "payment"},
    )
    assert code != 0
    assert "Code: NotFound" in out
    assert "no policy" in out
    code, out = grpcurl(
        address,
        "flext_mesh.v1.RegistryService/PutServicePolicy",
        data={
            "policy": {
                "service_name": "payment",
                "splits": [{"version": "v1", "weight": 90}, {"version": "v2", "weight": 20}],
                "retry": {"max_attempts": 50, "retryable_codes": ["INVALID_ARGUMENT"]},
            }
        },
    )
    assert code != 0
    assert "Code: InvalidArgument" in out
    for field in (
        "policy.splits",
        "policy.splits[0].version",
        "policy.retry.max_attempts",
        "policy.retry.retryable_codes[0]",
    ):
        assert field in out, out
    code, out = grpcurl(
        address,
        "flext_mesh.v1.RegistryService/PutServicePolicy",
        data={"policy": {"service_name": "payment", "default_timeout": "2s"}},
    )
    assert code == 0, out
    assert json.loads(out)["policy"]["version"] == "1"


def test_a_workflow_session_with_grpcurl(serve_process: ServeProcess) -> None:
    """docs/grpcurl.md's session: store, run and watch a workflow; a bad one is refused."""
    address = serve_process.address
    workflow = {
        "name": "order_fulfillment",
        "steps": [
            {"name": "validate_payment", "service": "payment", "retry": {"max_attempts": 2}},
            {
                "name": "reserve_inventory",
                "service": "inventory",
                "depends_on": ["validate_payment"],
                "input": {"order_id": "${input.order_id}"},
                "compensation": {"operation": "release_inventory"},
            },
        ],
    }
    code, out = grpcurl(
        address, "flext_mesh.v1.OrchestratorService/PutWorkflow", data={"workflow": workflow}
    )
    assert code == 0, out
    assert json.loads(out)["workflow"]["version"] == "1"
    code, out = grpcurl(
        address,
        "flext_mesh.v1.OrchestratorService/StartExecution",
        data={"workflow_name": "order_fulfillment", "input": {"order_id": "o-1"}},
    )
    assert code == 0, out
    execution_id = json.loads(out)["execution"]["execution_id"]
    code, out = grpcurl(
        address,
        "flext_mesh.v1.OrchestratorService/WatchExecution",
        data={"execution_id": execution_id},
    )
    assert code == 0, out
    messages = [json.loads(m) for m in out.replace("}\n{", "}\x00{").split("\x00")]
    types = [m["event"]["type"].removeprefix("EXECUTION_EVENT_TYPE_") for m in messages]
    # No instance of payment is registered: retried once, then the execution fails.
    assert types == [
        "EXECUTION_CREATED",
        "EXECUTION_STARTED",
        "STEP_STARTED",
        "STEP_RETRYING",
        "STEP_STARTED",
        "STEP_FAILED",
        "STEP_SKIPPED",
        "EXECUTION_ENDED",
    ]
    assert messages[-1]["execution"]["state"] == "EXECUTION_STATE_FAILED"
    assert "no registered instance" in messages[-1]["execution"]["error"]["message"]

    bad = {"name": "bad", "steps": [{"name": "a", "service": "svc", "depends_on": ["a", "x"]}]}
    code, out = grpcurl(
        address, "flext_mesh.v1.OrchestratorService/PutWorkflow", data={"workflow": bad}
    )
    assert code != 0
    assert "Code: InvalidArgument" in out
    assert "workflow.steps[0].depends_on" in out
    assert "google.rpc.BadRequest" in out


def test_processor_service_of_the_control_plane_lists_no_operation(
    serve_process: ServeProcess,
) -> None:
    code, out = grpcurl(serve_process.address, "flext_mesh.v1.ProcessorService/ListOperations")
    assert code == 0, out
    assert json.loads(out) == {"service_name": "flext-mesh"}
    code, out = grpcurl(
        serve_process.address, "flext_mesh.v1.ProcessorService/Invoke", data={"operation": "x"}
    )
    assert "Code: NotFound" in out
    assert "'x'" in out


def test_sigterm_exits_0_within_the_grace_period(tmp_path: Path) -> None:
    server = start_serve(tmp_path, "--grace-period", "3")
    started = time.monotonic()
    assert server.terminate(timeout=10) == 0
    assert time.monotonic() - started < 3 + 2
    log = server.log()
    assert "stopping signal=SIGTERM grace=3.0s" in log
    assert log.rstrip().splitlines()[-1].split()[3] == "stopped"


def test_sigterm_does_not_wait_for_the_streams_of_connected_sidecars(tmp_path: Path) -> None:
    """KeepAlive, StreamCalls and Watch never end by themselves: a graceful stop ends
    them with UNAVAILABLE instead of waiting on them (the sidecars reconnect). Ended by
    cancelling alone, a stream sent no status, and the stop waited about 7.5 s for the
    sidecar to give up on it."""
    server = start_serve(tmp_path, "--grace-period", "20")
    # The default lease (10 s): a sidecar with a short one gives up on a silent
    # KeepAlive stream soon enough to hide a stream ended without a status.
    sidecar = start_sidecar(tmp_path, server.address, "--ttl", "10")
    try:
        time.sleep(2.0)  # registered, renewing, watching and reporting
        started = time.monotonic()
        assert server.terminate(timeout=30) == 0
        assert time.monotonic() - started < 3, server.log()
    finally:
        sidecar.proc.send_signal(signal.SIGTERM)
        sidecar.proc.wait(15)


def test_sigint_also_drains_and_exits_0(tmp_path: Path) -> None:
    server = start_serve(tmp_path)
    server.proc.send_signal(signal.SIGINT)
    assert server.proc.wait(10) == 0
    assert "stopping signal=SIGINT" in server.log()


def test_configuration_comes_from_flext_mesh_variables(tmp_path: Path) -> None:
    store = tmp_path / "from-env.db"
    server = start_serve(
        tmp_path,
        "--listen",
        "127.0.0.1:0",
        "--store",
        f"sqlite:///{store}",
        env={"FLEXT_MESH_GRACE_PERIOD": "2.5", "FLEXT_MESH_LOG_LEVEL": "debug"},
    )
    try:
        assert store.exists()
    finally:
        assert server.terminate() == 0
    assert "grace=2.5s" in server.log()


def _run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "flext-mesh"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["serve", "--bogus"], None, "unrecognized arguments: --bogus"),
        (["serve", "--listen", "nonsense"], None, "listen: 'nonsense' is not HOST:PORT"),
        (["serve", "--listen", "127.0.0.1:70000"], None, "port 70000"),
        (["serve", "--grace-period", "-1"], None, "grace-period"),
        (["serve", "--store", "mysql://x"], None, "is not a store URL"),
        (["serve"], {"FLEXT_MESH_LOG_LEVEL": "LOUD"}, "log-level"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(
    args: list[str], env: dict[str, str] | None, expected: str
) -> None:
    proc = _run_cli(*args, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("flext-mesh: error:")
    assert expected in lines[0]
    assert "Traceback" not in proc.stderr


def test_port_in_use_exits_1_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _run_cli(
            "serve", "--listen", f"127.0.0.1:{port}", "--store", f"sqlite:///{tmp_path}/x.db"
        )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"flext-mesh: error: cannot listen on 127.0.0.1:{port}: address already in use"
    assert "Traceback" not in proc.stderr


def test_a_second_control_plane_on_the_same_store_is_refused(tmp_path: Path) -> None:
    """Two planes on one SQLite file would both drive the same executions."""
    first = start_serve(tmp_path)
    try:
        proc = _run_cli(
            "serve", "--listen", "127.0.0.1:0", "--store", f"sqlite:///{tmp_path}/mesh.db"
        )
        assert proc.returncode == 1
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("flext-mesh: error: store file ")
        assert f"in use by another flext-mesh process (pid {first.proc.pid})" in last
        assert "Traceback" not in proc.stderr
    finally:
        first.kill()  # kill -9: the kernel releases the lock with the process
    second = start_serve(tmp_path)
    assert second.terminate() == 0


@pytest.mark.parametrize(
    ("make_store", "expected"),
    [
        (lambda d: d / "file" / "sub" / "x.db", "cannot create store directory"),
        (lambda d: Path("/sys/flext-mesh.db"), "cannot open store file /sys/flext-mesh.db"),
        (lambda d: d / "corrupt.db", "not a usable SQLite database"),
    ],
)
def test_unusable_store_exits_1_with_one_line(
    tmp_path: Path, make_store: object, expected: str
) -> None:
    (tmp_path / "file").write_text("a file, not a directory")
    (tmp_path / "corrupt.db").write_bytes(b"garbage" * 1000)
    path = make_store(tmp_path)  # type: ignore[operator]
    proc = _run_cli("serve", "--listen", "127.0.0.1:0", "--store", f"sqlite:///{path}")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("flext-mesh: error:")
    assert expected in last
    assert "Traceback" not in proc.stderr


def test_http_port_in_use_exits_1_with_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = _run_cli(
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            f"127.0.0.1:{port}",
            "--store",
            f"sqlite:///{tmp_path}/x.db",
        )
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last == f"flext-mesh: error: cannot listen on 127.0.0.1:{port}: address already in use"
