"""A sidecar's own /metrics (``--metrics-listen``), scraped from real processes."""

from __future__ import annotations

import socket
import subprocess
import urllib.request
from pathlib import Path

import grpc
from prometheus_client.parser import text_string_to_metric_families

from flext_mesh.rpc.payloads import dict_to_struct
from flext_mesh.v1 import processor_pb2, processor_pb2_grpc
from tests.conftest import BIN, ServeProcess
from tests.sidecar.test_sidecar_process import REPO, start_sidecar


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _scrape(port: int) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        family.name: [(s.name, s.labels, s.value) for s in family.samples]
        for family in text_string_to_metric_families(text)
    }


def test_a_sidecar_exposes_its_client_calls_breakers_and_reporting(
    serve_process: ServeProcess, tmp_path: Path
) -> None:
    payment = start_sidecar(tmp_path, serve_process.address)
    metrics_port = _free_port()
    checkout = start_sidecar(
        tmp_path,
        serve_process.address,
        "--service",
        "checkout",
        "--metrics-listen",
        f"127.0.0.1:{metrics_port}",
        app="tests.sidecar.apps:CHECKOUT",
    )
    try:
        assert f"metrics served http=127.0.0.1:{metrics_port}/metrics" in checkout.log()
        with grpc.insecure_channel(checkout.address) as channel:
            stub = processor_pb2_grpc.ProcessorServiceStub(channel)
            request = processor_pb2.InvokeRequest(
                operation="checkout",
                payload=dict_to_struct({"customer_id": "c-1", "amount": 12.5}),
            )
            for _ in range(5):
                stub.Invoke(request, timeout=10)
        families = _scrape(metrics_port)
    finally:
        for sidecar in (checkout, payment):
            sidecar.proc.terminate()
            sidecar.proc.wait(15)

    calls = {
        (s[1]["service"], s[1]["operation"], s[1]["code"]): s[2]
        for s in families["flext_mesh_client_call_duration_seconds"]
        if s[0].endswith("_count")
    }
    assert calls == {("payment", "charge", "OK"): 5.0}
    breakers = {
        (s[1]["service"], s[1]["state"]): s[2] for s in families["flext_mesh_client_breakers"]
    }
    assert breakers == {
        ("payment", "CLOSED"): 1.0,
        ("payment", "OPEN"): 0.0,
        ("payment", "HALF_OPEN"): 0.0,
    }
    records = {s[1]["outcome"]: s[2] for s in families["flext_mesh_reporter_records"]}
    assert set(records) == {"sent", "dropped", "rejected"}
    assert records["dropped"] == 0.0
    assert "flext_mesh_reporter_pending_records" in families
    assert "flext_mesh_client_retries" in families
    assert "process_resident_memory_bytes" in families
    assert not any(name.endswith("_created") for name in families)


def test_a_metrics_port_in_use_exits_1_with_one_line(
    serve_process: ServeProcess, tmp_path: Path
) -> None:
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
                "--control-plane",
                serve_process.address,
                "--listen",
                "127.0.0.1:0",
                "--metrics-listen",
                f"127.0.0.1:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=REPO,
            check=False,
        )
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"flext-sidecar: error: --metrics-listen 127.0.0.1:{port}:"), last
    assert "Traceback" not in proc.stderr


def test_a_bad_metrics_address_exits_2_with_one_line(serve_process: ServeProcess) -> None:
    proc = subprocess.run(
        [
            str(BIN / "flext-sidecar"),
            "--service",
            "payment",
            "--app",
            "tests.sidecar.apps:PROCESSORS",
            "--control-plane",
            serve_process.address,
            "--metrics-listen",
            "nonsense",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("flext-sidecar: error: bad configuration: metrics-listen: ")
