"""deploy/'s alert rules and Grafana dashboard against a real Prometheus.

A control plane and two sidecars (``--metrics-listen``) under load, a workflow run,
Debian's ``prometheus`` scraping all three every second with ``rules.yml`` loaded:
``promtool check rules`` passes, and **every** PromQL expression of the rules and of
the dashboard, evaluated through Prometheus's HTTP API, answers without error and with
data. An alert's expression ``<query> > <threshold>`` is evaluated as ``<query> > bool
<threshold>``: the query behind it must have data while nothing is wrong.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from flext_mesh.rpc.payloads import dict_to_struct
from flext_mesh.v1 import (
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    processor_pb2,
    processor_pb2_grpc,
)
from tests.conftest import REPO, ServeProcess
from tests.sidecar.test_sidecar_process import SidecarProcess, start_sidecar

RULES = REPO / "deploy" / "prometheus" / "rules.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "flext-mesh.json"
_COMPARISON = re.compile(r"\s*(<=|>=|==|!=|<|>)\s*(-?[0-9.]+)\s*$")


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{name} is not installed (make test installs Debian's prometheus)")
        pytest.skip(f"{name} is not installed (make prometheus)")
    return found


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())


def _query(base: str, expr: str) -> dict[str, Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    try:
        return dict(_get(url))
    except urllib.error.HTTPError as exc:  # 400/422: Prometheus says why in JSON
        return dict(json.loads(exc.read()))


def rule_expressions() -> list[tuple[str, str]]:
    """(alert name, expression as evaluated here) of every rule in rules.yml."""
    out = []
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            expr = " ".join(rule["expr"].split())
            assert _COMPARISON.search(expr), f"{rule['alert']}: not '<query> <op> <number>'"
            out.append((rule["alert"], _COMPARISON.sub(r" \1 bool \2", expr)))
    return out


def dashboard_expressions() -> list[tuple[str, str]]:
    """(panel title, expression) of every target of the Grafana dashboard."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    return [(p["title"], t["expr"]) for p in panels for t in p.get("targets", [])]


def test_promtool_checks_the_rules() -> None:
    promtool = _binary("promtool")
    proc = subprocess.run(
        [promtool, "check", "rules", str(RULES)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rule_expressions())} rules found" in proc.stdout


@pytest.fixture
def prometheus_over(
    serve_process: ServeProcess, tmp_path: Path
) -> Iterator[tuple[str, list[SidecarProcess], ServeProcess]]:
    """Prometheus scraping the control plane and two sidecars, with rules.yml loaded."""
    binary = _binary("prometheus")
    http = re.search(r"http=127\.0\.0\.1:(\d+)", serve_process.log())
    assert http is not None, serve_process.log()
    ports = [_free_port(), _free_port()]
    payment = start_sidecar(
        tmp_path, serve_process.address, "--metrics-listen", f"127.0.0.1:{ports[0]}"
    )
    checkout = start_sidecar(
        tmp_path,
        serve_process.address,
        "--service",
        "checkout",
        "--metrics-listen",
        f"127.0.0.1:{ports[1]}",
        app="tests.sidecar.apps:CHECKOUT",
    )
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(RULES)],
                "scrape_configs": [
                    {
                        "job_name": "flext-mesh",
                        "static_configs": [{"targets": [f"127.0.0.1:{http[1]}"]}],
                    },
                    {
                        "job_name": "flext-mesh-sidecar",
                        "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in ports]}],
                    },
                ],
            }
        )
    )
    port = _free_port()
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                targets = _get(f"{base}/api/v1/targets")["data"]["activeTargets"]
                if len(targets) == 3 and all(t["health"] == "up" for t in targets):
                    break
            except (OSError, KeyError):
                pass
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.2)
        yield base, [payment, checkout], serve_process
    finally:
        proc.terminate()
        proc.wait(15)
        log.close()
        for sidecar in (checkout, payment):
            sidecar.proc.terminate()
            sidecar.proc.wait(15)


def _load(sidecars: list[SidecarProcess], control_plane: ServeProcess) -> None:
    """Calls through the mesh (checkout -> payment) and three workflow executions."""
    _, checkout = sidecars
    with grpc.insecure_channel(checkout.address) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        request = processor_pb2.InvokeRequest(
            operation="checkout", payload=dict_to_struct({"customer_id": "c", "amount": 3.0})
        )
        for _ in range(20):
            stub.Invoke(request, timeout=10)
    with grpc.insecure_channel(control_plane.address) as channel:
        orchestrator = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        step = orchestrator_pb2.WorkflowStep(
            name="pay",
            service="payment",
            operation="charge",
            input=dict_to_struct({"customer_id": "${input.customer_id}", "amount": 1.0}),
        )
        orchestrator.PutWorkflow(
            orchestrator_pb2.PutWorkflowRequest(
                workflow=orchestrator_pb2.Workflow(name="pay", steps=[step])
            )
        )
        for i in range(3):
            start = orchestrator_pb2.StartExecutionRequest(workflow_name="pay", wait=True)
            start.input.update({"customer_id": f"c-{i}"})
            done = orchestrator.StartExecution(start, timeout=30)
            assert done.execution.state == orchestrator_pb2.EXECUTION_STATE_SUCCEEDED, done


def test_every_rule_and_dashboard_expression_answers_with_data(
    prometheus_over: tuple[str, list[SidecarProcess], ServeProcess],
) -> None:
    base, sidecars, control_plane = prometheus_over
    _load(sidecars, control_plane)
    expressions = [*rule_expressions(), *dashboard_expressions()]
    pending = dict.fromkeys(expressions, "never evaluated")
    deadline = time.monotonic() + 30  # rate() needs two scrapes after the load
    while pending and time.monotonic() < deadline:
        for name, expr in list(pending):
            answer = _query(base, expr)
            if answer.get("status") != "success":
                pending[name, expr] = f"error: {answer.get('error')}"
            elif not answer["data"]["result"]:
                pending[name, expr] = "no data"
            else:
                del pending[name, expr]
        time.sleep(0.5)
    assert not pending, "\n".join(f"{n}: {e}\n  -> {why}" for (n, e), why in pending.items())

    # The service graph's edges: checkout's sidecar calls payment (caller named by its
    # sidecar), the orchestrator runs the workflow's steps on payment.
    edges = _query(base, "sum by (caller, service, code) (flext_mesh_calls_by_caller_total)")
    counted = {
        (e["metric"]["caller"], e["metric"]["service"], e["metric"]["code"]): float(e["value"][1])
        for e in edges["data"]["result"]
    }
    assert counted[("checkout", "payment", "OK")] >= 20, counted
    assert counted[("flext-mesh-orchestrator", "payment", "OK")] >= 3, counted

    # The rules are loaded and evaluated by Prometheus itself, none in error, none firing.
    groups = _get(f"{base}/api/v1/rules")["data"]["groups"]
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(rule_expressions())
    assert all(rule["health"] == "ok" for rule in rules), rules
    firing = [rule["name"] for rule in rules if rule["state"] == "firing"]
    assert firing == []
