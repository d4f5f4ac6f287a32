"""``flext-mesh metrics report | alerts`` against a real control plane."""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc
from tests.conftest import BIN, ServeProcess, start_serve

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def signup_records() -> list[metrics_pb2.CallRecord]:
    """A service that started 7 minutes ago: 50 calls, 20 refused (INVALID_ARGUMENT)."""
    now = time.time()
    return [
        metrics_pb2.CallRecord(
            service_name="signup",
            operation="create",
            duration_ms=5.0,
            success=i >= 20,
            status_code=INVALID_ARGUMENT if i < 20 else 0,
            time_unix_nano=int((now - 420 + i * 8) * 1e9),
        )
        for i in range(50)
    ]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    process = start_serve(tmp_path_factory.mktemp("cli-metrics"))
    with grpc.insecure_channel(process.address) as channel:
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        stub.ReportCalls(metrics_pb2.ReportCallsRequest(records=signup_records()), timeout=10)
        lonely = metrics_pb2.CallRecord(
            service_name="lonely", operation="ping", duration_ms=1.0, success=True
        )
        stub.ReportCalls(metrics_pb2.ReportCallsRequest(records=[lonely]), timeout=10)
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


def test_report_shows_faults_and_refusals_apart(server: ServeProcess) -> None:
    proc = cli(server, "metrics", "report", "payment", "--window", "1h")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("payment: health ")
    # Its calls all came in just now: the rate is over their seconds, not the hour.
    assert re.search(r", 400 calls in the last \d+ s \(since \d\d:\d\d:\d\d\)$", lines[0])
    assert (
        "faults: 10.0% of calls (40 of 400 calls) were infrastructure faults:"
        " UNAVAILABLE 40 calls; they lower the health score"
    ) in lines
    assert not any(line.startswith("refused:") for line in lines)


def test_refused_input_of_a_young_service_reads_as_the_callers_business(
    server: ServeProcess,
) -> None:
    proc = cli(server, "metrics", "report", "signup")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    # 40% refused and no fault: healthy; the rate is over its 7 minutes, not 24 h.
    assert re.fullmatch(
        r"signup: health 100\.0 grade A, 50 calls in the last 7 min \(since \d\d:\d\d:\d\d\)",
        lines[0],
    ), lines[0]
    rows = {line.split()[0]: line.split() for line in lines[2:4]}
    assert 0.1 <= float(rows["(all)"][8]) <= 0.12  # RATE(/s): 50 calls / ~7 min
    assert (
        "refused: 40.0% of calls (20 of 50 calls) were business rejections (the callers'"
        " input): INVALID_ARGUMENT 20 calls; they lower the health score only above the"
        " 50.0% alert rate"
    ) in lines
    assert not any(line.startswith(("faults:", "alert")) for line in lines)
    [advice] = [line for line in lines if line.startswith("advice: ")]
    assert "check the callers' input" in advice
    assert "deploys" not in advice
    document = json.loads(cli(server, "metrics", "report", "signup", "-o", "json").stdout)
    summary = document["summary"]
    assert (summary["business_failures"], summary["business_error_rate"]) == ("20", 0.4)
    assert summary["failure_codes"] == [
        {"code": 3, "code_name": "INVALID_ARGUMENT", "calls": "20", "infrastructure": False}
    ]
    assert 420 <= float(summary["observed"].removesuffix("s")) <= 480
    assert document["business_error_alert_rate"] == 0.5


def test_one_call_is_one_call(server: ServeProcess) -> None:
    proc = cli(server, "metrics", "report", "lonely")
    assert proc.returncode == 0, proc.stderr
    assert re.match(r"lonely: health 100\.0 grade A, 1 call in the last \d+ s ", proc.stdout)
    assert "advice: Only 1 call in the window, fewer than the 20 needed" in proc.stdout
    assert "1 calls" not in proc.stdout


def test_a_lower_business_error_alert_rate_flags_the_refusals(tmp_path: Path) -> None:
    """FLEXT_MESH_BUSINESS_ERROR_ALERT_RATE=0.3: the same 40% of refusals cost points,
    raise a WARNING and are advised as the callers' requests being refused."""
    process = start_serve(tmp_path, env={"FLEXT_MESH_BUSINESS_ERROR_ALERT_RATE": "0.3"})
    try:
        with grpc.insecure_channel(process.address) as channel:
            metrics_pb2_grpc.MetricsServiceStub(channel).ReportCalls(
                metrics_pb2.ReportCallsRequest(records=signup_records()), timeout=10
            )
        proc = cli(process, "metrics", "report", "signup")
    finally:
        process.terminate()
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("signup: health 80.0 grade B, 50 calls in the last 7 min")
    assert "only above the 30.0% alert rate" in proc.stdout
    assert (
        "alert WARNING: signup: 40.0% of calls refused (20 of 50 calls; mostly"
        " INVALID_ARGUMENT (20)) is above the business error alert rate 30.0%: check the"
        " callers' input"
    ) in lines
    assert "advice: Callers' requests are being refused: 40.0% of calls" in proc.stdout


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
