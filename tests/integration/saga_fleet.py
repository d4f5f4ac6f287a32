"""Real processes for the saga edge-case tests: sidecars by service, ledgers summed.

A :class:`Fleet` is the sidecar processes of a test, several per service when a step's
service has more than one instance. :meth:`Fleet.operations` asks the ``ledger``
operation of every live instance of a service (tests/orchestrator/apps.py) and sums
them, so a side effect performed twice on two instances is counted twice.
"""

from __future__ import annotations

import concurrent.futures
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc

from flext_mesh.rpc.payloads import dict_to_struct, struct_to_dict
from flext_mesh.v1 import (
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    processor_pb2,
    processor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.sidecar.test_sidecar_process import SidecarProcess, start_sidecar

__all__ = [
    "APPS",
    "Fleet",
    "SidecarSpec",
    "cancel",
    "events_of",
    "healthy_instances",
    "ledger",
    "state_name",
    "step",
    "step_states",
    "until",
]

#: The app (tests/orchestrator/apps.py) hosting each service's operations.
APPS = {"payment": "PAYMENT", "inventory": "INVENTORY", "shipping": "SHIPPING"}


@dataclass(frozen=True)
class SidecarSpec:
    """One sidecar to start: its service, instance id and lease TTL (seconds)."""

    service: str
    instance_id: str
    ttl: float = 5.0


@dataclass
class Fleet:
    """The sidecar processes of one test, by service."""

    sidecars: dict[str, list[SidecarProcess]] = field(default_factory=dict)

    @classmethod
    def start(cls, tmp: Path, control_plane: str, specs: Sequence[SidecarSpec]) -> Fleet:
        """Start every sidecar (in parallel) against ``control_plane`` (one or several
        replicas' addresses); a failure stops those already started."""
        fleet = cls()

        def one(spec: SidecarSpec) -> SidecarProcess:
            return start_sidecar(
                tmp,
                control_plane,
                "--service",
                spec.service,
                "--instance-id",
                spec.instance_id,
                "--ttl",
                f"{spec.ttl:g}",
                app=f"tests.orchestrator.apps:{APPS[spec.service]}",
            )

        with concurrent.futures.ThreadPoolExecutor(len(specs)) as pool:
            futures = [(spec, pool.submit(one, spec)) for spec in specs]
            errors: list[BaseException] = []
            for spec, future in futures:
                try:
                    fleet.sidecars.setdefault(spec.service, []).append(future.result())
                except Exception as exc:
                    errors.append(exc)
        if errors:
            fleet.stop()
            raise errors[0]
        return fleet

    def instance(self, instance_id: str) -> SidecarProcess:
        """The sidecar of an instance id."""
        for sidecars in self.sidecars.values():
            for sidecar in sidecars:
                if sidecar.instance == instance_id:
                    return sidecar
        raise KeyError(instance_id)

    def instance_ids(self, service: str) -> set[str]:
        """Instance ids of a service's sidecars (dead ones included)."""
        return {s.instance for s in self.sidecars[service]}

    def operations(self, service: str, key: str) -> list[str]:
        """Operations really performed for ``key``, summed over every live instance of
        ``service`` (sorted: which instance did what is not the point)."""
        performed: list[str] = []
        for sidecar in self.sidecars[service]:
            if sidecar.proc.poll() is None:
                performed += [e["operation"] for e in ledger(sidecar.address, key)]
        return sorted(performed)

    def stop(self) -> None:
        """SIGTERM every live sidecar, then wait (SIGKILL past 15 s)."""
        everyone = [s for sidecars in self.sidecars.values() for s in sidecars]
        for sidecar in everyone:
            if sidecar.proc.poll() is None:
                sidecar.proc.send_signal(signal.SIGTERM)
        for sidecar in everyone:
            try:
                sidecar.proc.wait(15)
            except subprocess.TimeoutExpired:
                sidecar.proc.kill()
                sidecar.proc.wait(10)


def ledger(address: str, key: str) -> list[dict[str, Any]]:
    """Side effects the sidecar at ``address`` really performed for ``key``."""
    with grpc.insecure_channel(address) as channel:
        reply = processor_pb2_grpc.ProcessorServiceStub(channel).Invoke(
            processor_pb2.InvokeRequest(operation="ledger", payload=dict_to_struct({"key": key})),
            timeout=10,
        )
    entries: list[dict[str, Any]] = struct_to_dict(reply.result)["entries"]
    return entries


def healthy_instances(address: str, service: str) -> set[str]:
    """Instances of ``service`` the control plane at ``address`` would call now."""
    with grpc.insecure_channel(address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        try:
            reply = stub.Discover(
                registry_pb2.DiscoverRequest(service_name=service, healthy_only=True), timeout=5
            )
        except grpc.RpcError:
            return set()
    return {i.instance_id for i in reply.instances}


def cancel(address: str, execution_id: str, reason: str) -> orchestrator_pb2.Execution:
    """CancelExecution; the execution as the control plane answered it."""
    with grpc.insecure_channel(address) as channel:
        reply = orchestrator_pb2_grpc.OrchestratorServiceStub(channel).CancelExecution(
            orchestrator_pb2.CancelExecutionRequest(execution_id=execution_id, reason=reason),
            timeout=15,
        )
    return reply.execution


def until(check: Callable[[], bool], within: float, what: str) -> None:
    """Poll ``check`` every 50 ms; fail when it is still false after ``within`` s."""
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        time.sleep(0.05)


def state_name(execution: orchestrator_pb2.Execution) -> str:
    """The execution's state without its enum prefix."""
    return orchestrator_pb2.ExecutionState.Name(execution.state).removeprefix("EXECUTION_STATE_")


def step_states(execution: orchestrator_pb2.Execution) -> dict[str, str]:
    """Each step's state without its enum prefix."""
    return {
        s.step_name: orchestrator_pb2.StepState.Name(s.state).removeprefix("STEP_STATE_")
        for s in execution.steps
    }


def step(execution: orchestrator_pb2.Execution, name: str) -> orchestrator_pb2.StepExecution:
    """The step record of ``name``."""
    return next(s for s in execution.steps if s.step_name == name)


def events_of(
    events: Sequence[orchestrator_pb2.ExecutionEvent], kind: int, step_name: str | None = None
) -> list[orchestrator_pb2.ExecutionEvent]:
    """The events of one type (of one step when ``step_name`` is given), in order."""
    return [e for e in events if e.type == kind and (step_name is None or e.step_name == step_name)]
