"""flext-sidecar as a real process beside a real control plane."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from flext_mesh.v1 import (
    metrics_pb2,
    metrics_pb2_grpc,
    processor_pb2,
    processor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.conftest import BIN, REPO, ServeProcess, start_serve

_SERVING = re.compile(r"serving service=\S+ instance=(?P<instance>\S+) listen=(?P<listen>\S+)")


class SidecarProcess:
    """A running flext-sidecar and where it listens."""

    def __init__(self, proc: subprocess.Popen[str], log: Path, address: str, instance: str):
        self.proc = proc
        self.log_path = log
        self.address = address
        self.instance = instance

    def log(self) -> str:
        return self.log_path.read_text()


def start_sidecar(
    tmp_path: Path,
    control_plane: str,
    *args: str,
    app: str = "tests.sidecar.apps:PROCESSORS",
    env: dict[str, str] | None = None,
) -> SidecarProcess:
    """Start flext-sidecar against ``control_plane`` ("": the variables say where)."""
    log = tmp_path / f"sidecar-{time.monotonic_ns()}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "flext-sidecar"),
                "--service",
                "payment",
                "--app",
                app,
                *(("--control-plane", control_plane) if control_plane else ()),
                "--ttl",
                "2",
                "--grace-period",
                "5",
                *args,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = _SERVING.search(log.read_text())
        if match:
            return SidecarProcess(proc, log, match["listen"], match["instance"])
        if proc.poll() is not None:
            raise AssertionError(f"flext-sidecar exited early:\n{log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"flext-sidecar did not start:\n{log.read_text()}")


@pytest.fixture
def control_plane(tmp_path: Path) -> Iterator[ServeProcess]:
    server = start_serve(tmp_path, "--health-check-interval", "0.5")
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.kill()


def _instances(address: str) -> dict[str, registry_pb2.ServiceInstance]:
    with grpc.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        try:
            reply = stub.Discover(
                registry_pb2.DiscoverRequest(service_name="payment", healthy_only=False),
                timeout=5,
            )
        except grpc.RpcError:
            return {}
    return {i.instance_id: i for i in reply.instances}


def _wait(check, within: float = 15.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def test_the_sidecar_registers_serves_and_deregisters_on_sigterm(
    tmp_path: Path, control_plane: ServeProcess
) -> None:
    sidecar = start_sidecar(tmp_path, control_plane.address, "--version", "1.2.0")
    try:
        _wait(lambda: sidecar.instance in _instances(control_plane.address))
        registered = _instances(control_plane.address)[sidecar.instance]
        assert registered.version == "1.2.0"
        assert sorted(registered.capabilities) == ["charge", "slow"]
        _wait(
            lambda: (
                _instances(control_plane.address)[sidecar.instance].health
                == registry_pb2.HEALTH_STATUS_SERVING
            )
        )  # the control plane's active checks reach the sidecar's health service
        with grpc.insecure_channel(registered.endpoint) as channel:
            stub = processor_pb2_grpc.ProcessorServiceStub(channel)
            request = processor_pb2.InvokeRequest(operation="charge", correlation_id="c-1")
            request.payload.update({"customer_id": "c1", "amount": 12.5})
            reply = stub.Invoke(request, timeout=5)
            assert dict(reply.result) == {"charged": 12.5, "correlation_id": "c-1"}
    finally:
        sidecar.proc.send_signal(signal.SIGTERM)
        code = sidecar.proc.wait(15)
    assert code == 0, sidecar.log()
    assert sidecar.instance not in _instances(control_plane.address), "deregistered at once"


def test_sigterm_drain_finishes_in_flight_calls(
    tmp_path: Path, control_plane: ServeProcess
) -> None:
    sidecar = start_sidecar(tmp_path, control_plane.address)
    results: list[object] = []

    def call() -> None:
        with grpc.insecure_channel(sidecar.address) as channel:
            stub = processor_pb2_grpc.ProcessorServiceStub(channel)
            request = processor_pb2.InvokeRequest(operation="slow")
            request.payload.update({"seconds": 1.5})
            try:
                results.append(dict(stub.Invoke(request, timeout=10).result))
            except grpc.RpcError as exc:
                results.append(exc.code())

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(0.5)  # the call is running
    sidecar.proc.send_signal(signal.SIGTERM)
    thread.join(15)
    assert sidecar.proc.wait(15) == 0
    assert len(results) == 1
    assert isinstance(results[0], dict), f"the in-flight call was lost: {results[0]}"
    assert "draining" in sidecar.log()


def test_the_sidecar_serves_while_the_control_plane_is_down_and_registers_later(
    tmp_path: Path,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    address = f"127.0.0.1:{port}"
    sidecar = start_sidecar(tmp_path, address)  # nothing listens there yet
    try:
        with grpc.insecure_channel(sidecar.address) as channel:
            stub = processor_pb2_grpc.ProcessorServiceStub(channel)
            listed = stub.ListOperations(processor_pb2.ListOperationsRequest(), timeout=5)
            assert [op.name for op in listed.operations] == ["charge", "slow"]
        plane = start_serve(tmp_path, "--listen", address)
        try:
            _wait(lambda: sidecar.instance in _instances(address))
        finally:
            plane.terminate()
    finally:
        sidecar.proc.send_signal(signal.SIGTERM)
        sidecar.proc.wait(15)


def test_the_sidecar_registers_again_after_the_control_plane_was_killed(
    tmp_path: Path,
) -> None:
    plane = start_serve(tmp_path)
    address = plane.address
    sidecar = start_sidecar(tmp_path, address)
    try:
        _wait(lambda: sidecar.instance in _instances(address))
        plane.kill()  # kill -9: the KeepAlive stream dies under the sidecar
        plane = start_serve(tmp_path, "--listen", address)
        # A restarted store gives each lease one more TTL (2 s): past it, the instance
        # is still there only if the sidecar renewed or registered again.
        time.sleep(4)
        assert sidecar.instance in _instances(address), sidecar.log()
        assert "membership loop failed" not in sidecar.log()
    finally:
        plane.terminate()
        sidecar.proc.send_signal(signal.SIGTERM)
        sidecar.proc.wait(15)


@pytest.mark.parametrize(
    ("app", "expected"),
    [
        ("tests.sidecar.missing:X", "cannot import 'tests.sidecar.missing'"),
        ("tests.sidecar.apps:NOPE", "has no 'NOPE'"),
        ("tests.sidecar.apps:NOT_A_MAPPING", "not a mapping"),
        ("tests.sidecar.apps:BAD_VALUE", "not a ServiceProcessor"),
        ("nocolon", "is not MODULE:ATTR"),
    ],
)
def test_a_bad_app_exits_2_with_one_line(app: str, expected: str) -> None:
    proc = subprocess.run(
        [str(BIN / "flext-sidecar"), "--service", "payment", "--app", app],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("flext-sidecar: error:")
    assert expected in last
    assert "Traceback" not in proc.stderr


def test_a_factory_app_and_flags_from_the_environment(
    tmp_path: Path, control_plane: ServeProcess
) -> None:
    env_app = "tests.sidecar.apps:make_processors"
    sidecar = start_sidecar(
        tmp_path, control_plane.address, app=env_app, env={"FLEXT_SIDECAR_LABEL": "tier=gold"}
    )
    try:
        _wait(lambda: sidecar.instance in _instances(control_plane.address))
        assert dict(_instances(control_plane.address)[sidecar.instance].labels) == {"tier": "gold"}
    finally:
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(15) == 0


def test_flext_mesh_listen_exported_for_serve_leaves_the_sidecar_alone(tmp_path: Path) -> None:
    # One shell: `export FLEXT_MESH_LISTEN=... FLEXT_MESH_CONTROL_PLANE=...`, then both.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{probe.getsockname()[1]}"
    shell = {"FLEXT_MESH_LISTEN": address, "FLEXT_MESH_CONTROL_PLANE": address}
    server = start_serve(tmp_path, env=shell)
    sidecar = None
    try:
        assert server.address == address  # serve took its address from the variable
        # No --control-plane: the sidecar reads the shared FLEXT_MESH_CONTROL_PLANE, but
        # not FLEXT_MESH_LISTEN, which is serve's: it listens on its own default.
        sidecar = start_sidecar(tmp_path, "", env=shell)
        assert sidecar.address != address
        _wait(lambda: sidecar.instance in _instances(address))
        warnings = [line for line in sidecar.log().splitlines() if "FLEXT_MESH_LISTEN" in line]
        assert len(warnings) == 1
        assert (
            " WARNING flext_sidecar ignoring FLEXT_MESH_LISTEN (flext-mesh serve's): "
            "flext-sidecar reads FLEXT_SIDECAR_LISTEN cid=-"
        ) in warnings[0]
        assert "FLEXT_MESH_CONTROL_PLANE" not in sidecar.log()
    finally:
        if sidecar is not None:
            sidecar.proc.send_signal(signal.SIGTERM)
            assert sidecar.proc.wait(15) == 0
        server.kill()


def test_inbound_calls_are_reported_to_the_control_plane(
    tmp_path: Path, control_plane: ServeProcess
) -> None:

    sidecar = start_sidecar(tmp_path, control_plane.address, "--version", "2.0.0")
    try:
        with grpc.insecure_channel(sidecar.address) as channel:
            stub = processor_pb2_grpc.ProcessorServiceStub(channel)
            codes = []
            for amount in (5.0, -1.0, 7.0):  # -1 is a business rejection
                request = processor_pb2.InvokeRequest(operation="charge")
                request.payload.update({"customer_id": "c1", "amount": amount})
                try:
                    stub.Invoke(request, timeout=5)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())
            assert codes == [
                grpc.StatusCode.OK,
                grpc.StatusCode.INVALID_ARGUMENT,
                grpc.StatusCode.OK,
            ]

        def reported() -> bool:
            with grpc.insecure_channel(control_plane.address) as channel:
                metrics = metrics_pb2_grpc.MetricsServiceStub(channel)
                try:
                    report = metrics.GetServiceReport(
                        metrics_pb2.GetServiceReportRequest(
                            service_name="payment", by_version=True
                        ),
                        timeout=5,
                    ).report
                except grpc.RpcError:
                    return False
            return (
                report.summary.total_calls == 3
                and report.summary.failed_calls == 1
                and report.summary.infrastructure_failures == 0
                and [v.version for v in report.versions] == ["2.0.0"]
            )

        _wait(reported)
    finally:
        sidecar.proc.send_signal(signal.SIGTERM)
        assert sidecar.proc.wait(15) == 0


def test_a_port_in_use_exits_1_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [
                str(BIN / "flext-sidecar"),
                "--service",
                "payment",
                "--app",
                "tests.sidecar.apps:PROCESSORS",
                "--listen",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"flext-sidecar: error: cannot listen on 127.0.0.1:{port}: address already in use"
    )
