"""``flext-mesh metrics report | alerts`` against a real control plane."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator

import grpc
import pytest

from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc
from tests.conftest import BIN, ServeProcess, start_serve


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    process = start_serve(tmp_path_factory.mktemp("cli-metrics"))
    with grpc.insecure_channel(process.address) as channel:
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        records = [
            metrics_pb2.CallRecord(
                service_name="payment",
                operation="charge" if i % 2 else "refund",
                duration_ms=float(1 + i % 50),
                success=i % 10 != 0,
                status_code=0 if i % 10 else 14,
                version="v2" if i % 3 == 0 else "v1",
            )
            for i in range(400)
        ]
        stub.ReportCalls(metrics_pb2.ReportCallsRequest(records=records), timeout=10)
    try:
        yield process
    finally:
        process.terminate()


def cli(server: ServeProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "flext-mesh"), *args, "--control-plane", server.address],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_report_table_shows_each_operation_and_the_summary(server: ServeProcess) -> None:
    proc = cli(server, "metrics", "report", "payment", "--window", "1h")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("payment: health ")
    assert lines[1].split()[:4] == ["OPERATION", "CALLS", "ERROR%", "P50(ms)"]
    rows = {line.split()[0]: line.split() for line in lines[2:] if line.split()}
    assert rows["charge"][1] == "200"
    assert rows["refund"][1] == "200"
    assert rows["(all)"][1] == "400"
    assert rows["(all)"][2] == "10.0"  # error %


def test_report_by_version_and_as_json(server: ServeProcess) -> None:
    proc = cli(server, "metrics", "report", "payment", "--by-version")
    assert proc.returncode == 0, proc.stderr
    assert "charge@v2" in proc.stdout
    proc = cli(server, "metrics", "report", "payment", "-o", "json")
    document = json.loads(proc.stdout)
    assert document["summary"]["total_calls"] == "400"
    assert {op["operation"] for op in document["operations"]} == {"charge", "refund"}


def test_alerts_and_errors_are_one_line(server: ServeProcess) -> None:
    proc = cli(server, "metrics", "alerts")
    assert proc.returncode == 0, proc.stderr
    proc = cli(server, "metrics", "report", "ghost")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        "flext-mesh: error: service 'ghost' has no call recorded in the last 86400s"
    ]
    proc = cli(server, "metrics", "report", "payment", "--window", "soon")
    assert proc.returncode == 2
    assert "is not a window like 90s" in proc.stderr
