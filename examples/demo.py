"""``make demo``: a small mesh on 127.0.0.1, end to end.

A control plane, two payment instances and one inventory instance (real
``flext-sidecar`` processes hosting the guide-style processors in examples/apps.py),
and a caller going through the mesh client: it prints discovery picks, kills one
payment instance (kill -9) and shows the breaker opening and traffic shifting, then
prints the payment service's metrics report. Last, the orchestrator: the example
workflow (examples/workflows/order_fulfillment.yaml) and a checkout saga whose refused
payment releases the reserved stock. Everything stops by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import grpc

from flext_mesh.orchestrator.formats import load_workflow_file, workflow_from_dict
from flext_mesh.rpc.payloads import dict_to_struct
from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc, orchestrator_pb2, orchestrator_pb2_grpc
from sidecar.client import MeshClient

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def _start(
    cmd: list[str], log: Path, pattern: str, env: dict[str, str]
) -> tuple[subprocess.Popen[str], re.Match[str]]:
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        match = re.search(pattern, log.read_text())
        if match:
            return proc, match
        if proc.poll() is not None:
            raise SystemExit(f"demo: {cmd[0]} exited:\n{log.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise SystemExit(f"demo: {cmd[0]} did not start:\n{log.read_text()}")


async def run(calls: int) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="flext-demo-"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    processes: list[subprocess.Popen[str]] = []
    try:
        plane, match = _start(
            [
                str(BIN / "flext-mesh"),
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                "127.0.0.1:0",
                "--store",
                f"sqlite:///{workdir / 'demo.db'}",
                "--health-check-interval",
                "1",
            ],
            workdir / "control-plane.log",
            r"serving grpc=(\S+)",
            env,
        )
        processes.append(plane)
        address = match[1]
        print(f"control plane on {address}")
        sidecars = {}
        for name, service, app in (
            ("pay-1", "payment", "examples.apps:PAYMENT"),
            ("pay-2", "payment", "examples.apps:PAYMENT"),
            ("inv-1", "inventory", "examples.apps:INVENTORY"),
        ):
            proc, _ = _start(
                [
                    str(BIN / "flext-sidecar"),
                    "--service",
                    service,
                    "--app",
                    app,
                    "--control-plane",
                    address,
                    "--instance-id",
                    name,
                    "--ttl",
                    "3",
                ],
                workdir / f"{name}.log",
                r"registered service=",
                {**env, "DEMO_INSTANCE": name},
            )
            processes.append(proc)
            sidecars[name] = proc
            print(f"sidecar {name} ({service}) registered")

        async with MeshClient(address, caller_service="shop") as client:
            await client.wait_for_instances("payment", 2)
            picks: Counter[str] = Counter()
            for i in range(calls):
                if i == calls // 2:
                    print("killing pay-1 (kill -9)")
                    sidecars["pay-1"].send_signal(signal.SIGKILL)
                reservation = await client.call(
                    "inventory", "reserve", {"order_id": f"o{i}", "items": ["book"]}
                )
                payment = await client.call(
                    "payment", "charge", {"order_id": f"o{i}", "amount": 10 + i}
                )
                picks[payment["instance"]] += 1
                if i % 10 == 0 or i == calls // 2 + 1:
                    print(
                        f"order o{i}: reserved {reservation['reserved']}, paid by "
                        f"{payment['instance']}; picks so far {dict(picks)}; breaker pay-1: "
                        f"{client.breaker_state('payment', 'pay-1')}"
                    )
            try:
                await client.call("payment", "charge", {"order_id": "big", "amount": 50_000})
            except Exception as exc:
                print(f"a business rejection is not retried: {type(exc).__name__}: {exc}")
            print(f"all {calls} orders went through; picks {dict(picks)}")

        await asyncio.sleep(2)  # let the sidecars flush their call reports
        async with grpc.aio.insecure_channel(address) as channel:
            report = (
                await metrics_pb2_grpc.MetricsServiceStub(channel).GetServiceReport(
                    metrics_pb2.GetServiceReportRequest(service_name="payment", by_instance=True)
                )
            ).report
        summary = report.summary
        print(
            f"payment report: {summary.total_calls} calls, error rate "
            f"{summary.error_rate:.1%}, p50 {summary.p50_ms:.1f} ms, p99 "
            f"{summary.p99_ms:.1f} ms, health {summary.health_score:.0f} grade {summary.grade}"
        )
        for instance in report.instances:
            print(f"  {instance.instance_id}: {instance.total_calls} calls")

        async with grpc.aio.insecure_channel(address) as channel:
            await _workflows(orchestrator_pb2_grpc.OrchestratorServiceStub(channel))
    finally:
        for proc in reversed(processes):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()


# The guide's order fulfillment with the payment taken last: a refused payment undoes
# the reservation (saga compensation). Written as the guide writes workflows.
CHECKOUT = {
    "workflow_id": "checkout",
    "steps": [
        {"step": "validate_payment", "service": "payment", "required": True},
        {
            "step": "reserve_inventory",
            "service": "inventory",
            "depends_on": ["validate_payment"],
            "compensation": {"operation": "release_inventory"},
        },
        {
            "step": "process_payment",
            "service": "payment",
            "depends_on": ["reserve_inventory"],
            "timeout_ms": 5000,
        },
    ],
}


async def _workflows(stub: orchestrator_pb2_grpc.OrchestratorServiceStub) -> None:
    """Apply the example workflow and the checkout saga, run them, print the outcome."""
    for workflow in [
        *load_workflow_file(REPO / "examples" / "workflows" / "order_fulfillment.yaml"),
        workflow_from_dict(CHECKOUT),
    ]:
        await stub.PutWorkflow(orchestrator_pb2.PutWorkflowRequest(workflow=workflow))
    for name, order in (
        ("order_fulfillment", {"order_id": "w1", "amount": 30, "items": ["book"]}),
        ("checkout", {"order_id": "w2", "amount": 30, "items": ["lamp"]}),
        ("checkout", {"order_id": "w3", "amount": 50_000, "items": ["car"]}),
    ):
        started = await stub.StartExecution(
            orchestrator_pb2.StartExecutionRequest(workflow_name=name, input=dict_to_struct(order))
        )
        ended = None
        async for message in stub.WatchExecution(
            orchestrator_pb2.WatchExecutionRequest(execution_id=started.execution.execution_id)
        ):
            if message.HasField("execution"):
                ended = message.execution
        assert ended is not None
        state = orchestrator_pb2.ExecutionState.Name(ended.state).removeprefix("EXECUTION_STATE_")
        steps = ", ".join(
            f"{s.step_name} {orchestrator_pb2.StepState.Name(s.state).removeprefix('STEP_STATE_')}"
            for s in ended.steps
        )
        why = f" ({ended.failed_step}: {ended.error.message})" if ended.failed_step else ""
        print(
            f"workflow {name} for order {order['order_id']}: {state} in "
            f"{ended.duration.ToNanoseconds() / 1e6:.1f} ms{why}; {steps}"
        )


def main() -> None:
    """``python -m examples.demo [--calls N]``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--calls", type=int, default=60, help="orders to place (default 60)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("flext_sidecar.client").setLevel(logging.INFO)
    asyncio.run(run(args.calls))


if __name__ == "__main__":
    main()
