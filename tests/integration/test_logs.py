"""Logs of real processes under abuse: what anyone who reaches the port can provoke."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.conftest import BIN, ServeProcess
from tests.sidecar.test_sidecar_process import start_sidecar

_BAD = b"\xff\xff\xff\xff"


_CONTROL_PLANE_METHODS = ("RegistryService/Discover", "OrchestratorService/StartExecution")
_SIDECAR_METHODS = ("ProcessorService/Invoke", "ProcessorService/ListOperations")


def _abuse(address: str, methods: tuple[str, ...], rounds: int = 100) -> None:
    """Health/List, an unknown method and undecodable requests to ``methods``, ``rounds``
    of each."""
    with grpc.insecure_channel(address) as channel:
        unknown = channel.unary_unary("/flext_mesh.v1.RegistryService/NoSuchMethod")
        undecodable = [channel.unary_unary(f"/flext_mesh.v1.{method}") for method in methods]
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(rounds):
            listed = health.List(health_pb2.HealthListRequest(), timeout=5)
            assert listed.statuses[""].status == health_pb2.HealthCheckResponse.SERVING
            for call, code in (
                (unknown, grpc.StatusCode.UNIMPLEMENTED),
                *((c, grpc.StatusCode.INVALID_ARGUMENT) for c in undecodable),
            ):
                with pytest.raises(grpc.RpcError) as caught:
                    call(_BAD, timeout=5)
                assert caught.value.code() is code, caught.value


def test_abuse_of_the_control_plane_and_a_sidecar_leaves_a_readable_log(
    serve_process: ServeProcess, tmp_path: Path
) -> None:
    sidecar = start_sidecar(tmp_path, serve_process.address)
    try:
        time.sleep(0.5)
        before = (len(serve_process.log().splitlines()), len(sidecar.log().splitlines()))
        _abuse(serve_process.address, _CONTROL_PLANE_METHODS)
        _abuse(sidecar.address, _SIDECAR_METHODS)
        # Health/List names every service the server reports on.
        with grpc.insecure_channel(sidecar.address) as channel:
            listed = health_pb2_grpc.HealthStub(channel).List(health_pb2.HealthListRequest())
        assert "flext_mesh.v1.ProcessorService" in listed.statuses
        time.sleep(0.5)
        for log, lines_before in zip((serve_process.log(), sidecar.log()), before, strict=True):
            assert "Traceback" not in log, log
            added = log.splitlines()[lines_before:]
            assert len(added) <= 3, added  # 300 bad requests: at most a line per cause
    finally:
        sidecar.proc.terminate()
        sidecar.proc.wait(15)


def test_log_format_json_writes_one_object_per_line(tmp_path: Path) -> None:
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "flext-mesh"),
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--store",
                f"sqlite:///{tmp_path / 'mesh.db'}",
                "--log-format",
                "json",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
        )
    try:
        deadline = time.monotonic() + 20
        while "serving grpc=" not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
    finally:
        proc.terminate()
        assert proc.wait(15) == 0
    entries = [json.loads(line) for line in log_path.read_text().splitlines() if line]
    serving = next(e for e in entries if e["message"].startswith("serving grpc="))
    assert (serving["level"], serving["logger"], serving["cid"]) == (
        "INFO",
        "flext_mesh.server",
        "-",
    )
    assert all({"time", "level", "logger", "message"} <= e.keys() for e in entries)


def test_a_sidecar_reads_its_log_format_from_the_environment(
    serve_process: ServeProcess, tmp_path: Path
) -> None:
    sidecar_log = tmp_path / "direct.log"
    with sidecar_log.open("w") as out:
        proc = subprocess.Popen(
            [
                str(BIN / "flext-sidecar"),
                "--service",
                "payment",
                "--app",
                "tests.sidecar.apps:PROCESSORS",
                "--control-plane",
                serve_process.address,
                "--listen",
                "127.0.0.1:0",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            text=True,
            env={
                **os.environ,
                "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
                "FLEXT_SIDECAR_LOG_FORMAT": "json",
            },
        )
    try:
        deadline = time.monotonic() + 20
        while "registered" not in sidecar_log.read_text():
            assert proc.poll() is None, sidecar_log.read_text()
            assert time.monotonic() < deadline, sidecar_log.read_text()
            time.sleep(0.05)
    finally:
        proc.terminate()
        proc.wait(15)
    entries = [json.loads(line) for line in sidecar_log.read_text().splitlines() if line]
    assert any("registered" in e["message"] for e in entries)


def test_an_unsupported_trace_exporter_is_one_line_at_start(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            str(BIN / "flext-mesh"),
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--store",
            f"sqlite:///{tmp_path / 'mesh.db'}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "OTEL_TRACES_EXPORTER": "zipkin"},
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "flext-mesh: error: OTEL_TRACES_EXPORTER='zipkin' is not supported: "
        "use otlp, console or none"
    )
    assert "Traceback" not in proc.stderr
