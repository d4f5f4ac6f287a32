"""Three control-plane replicas on one real etcd, real sidecars, real kills (issue 8).

Registrations made through one replica are discovered and watched through another
with the same revisions; sidecars list every replica and keep working (zero failed
mesh calls, no registration lost) when the one they talk to is killed; a workflow
whose owning replica is killed with SIGKILL is finished by another, no step twice.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.orchestrator.formats import workflow_from_dict
from flext_mesh.v1 import (
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from sidecar.client import MeshClient
from tests.conftest import ServeProcess, start_serve
from tests.etcd_server import EtcdServer
from tests.integration.test_workflows import Mesh
from tests.sidecar.test_sidecar_process import SidecarProcess, start_sidecar

pytestmark = pytest.mark.xdist_group("replicas")

NAMES = ("cp-a", "cp-b", "cp-c")
CHECKOUT = {
    "name": "replicated_checkout",
    "steps": [
        {"name": "validate_payment", "service": "payment"},
        {"name": "reserve_inventory", "service": "inventory", "depends_on": ["validate_payment"]},
        {"name": "process_payment", "service": "payment", "depends_on": ["reserve_inventory"]},
    ],
}


@dataclass
class Cluster:
    tmp: Path
    etcd: EtcdServer
    replicas: dict[str, ServeProcess]
    sidecars: dict[str, SidecarProcess]

    @property
    def addresses(self) -> str:
        """Every replica's address, as sidecars and clients take them."""
        return ",".join(plane.address for plane in self.replicas.values())

    def registry(self, name: str) -> tuple[grpc.Channel, registry_pb2_grpc.RegistryServiceStub]:
        channel = grpc.insecure_channel(self.replicas[name].address)
        return channel, registry_pb2_grpc.RegistryServiceStub(channel)

    def mesh(self, name: str) -> Mesh:
        """The workflow helpers of test_workflows, against one replica."""
        return Mesh(self.tmp, self.replicas[name], self.sidecars)


def _until(check: Any, within: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"{what} not met within {within} s"
        time.sleep(0.05)


def _instances(cluster: Cluster, replica: str, service: str) -> set[str]:
    channel, stub = cluster.registry(replica)
    with channel:
        try:
            reply = stub.Discover(
                registry_pb2.DiscoverRequest(service_name=service, healthy_only=False), timeout=5
            )
        except grpc.RpcError as exc:
            if exc.code() is grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
                return set()
            raise
    return {i.instance_id for i in reply.instances}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("replicas")
    etcd = EtcdServer.start(tmp)
    replicas: dict[str, ServeProcess] = {}
    sidecars: dict[str, SidecarProcess] = {}
    try:
        for name in NAMES:
            replicas[name] = start_serve(
                tmp, "--store", etcd.url, "--node-name", name, "--health-check-interval", "0.5"
            )
        addresses = ",".join(plane.address for plane in replicas.values())
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            futures = {
                service: pool.submit(
                    start_sidecar,
                    tmp,
                    addresses,
                    "--service",
                    service,
                    "--ttl",
                    "3",
                    app=f"tests.orchestrator.apps:{attr}",
                )
                for service, attr in (("payment", "PAYMENT"), ("inventory", "INVENTORY"))
            }
            sidecars = {service: future.result() for service, future in futures.items()}
        yield Cluster(tmp, etcd, replicas, sidecars)
    finally:
        for sidecar in sidecars.values():
            sidecar.proc.send_signal(signal.SIGTERM)
        for plane in replicas.values():
            if plane.proc.poll() is None:
                plane.kill()
        for sidecar in sidecars.values():
            try:
                sidecar.proc.wait(15)
            except subprocess.TimeoutExpired:
                sidecar.proc.kill()
        etcd.stop()


def test_a_registration_through_one_replica_is_discovered_and_watched_through_the_others(
    cluster: Cluster,
) -> None:
    channel_b, b = cluster.registry("cp-b")
    channel_c, c = cluster.registry("cp-c")
    with channel_b, channel_c:
        watch = b.Watch(registry_pb2.WatchRequest(service_names=["audit"]), timeout=15)
        snapshot = next(watch)
        assert snapshot.HasField("snapshot")

        request = registry_pb2.RegisterRequest(
            instance=registry_pb2.ServiceInstance(
                service_name="audit",
                instance_id="audit-1",
                endpoint="127.0.0.1:9",
                health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
            )
        )
        request.ttl.FromSeconds(30)
        registered = c.Register(request, timeout=5)

        message = next(message for message in watch if message.events)
        watch.cancel()
        assert [e.instance.instance_id for e in message.events] == ["audit-1"]
        # One store, one history: the same revision on every replica.
        assert message.revision == registered.revision
        for replica in NAMES:
            _until(lambda r=replica: _instances(cluster, r, "audit") == {"audit-1"}, 5)
        c.Deregister(
            registry_pb2.DeregisterRequest(service_name="audit", instance_id="audit-1"), timeout=5
        )
        _until(lambda: _instances(cluster, "cp-a", "audit") == set(), 5)


def test_sidecars_keep_calling_each_other_while_a_replica_dies(cluster: Cluster) -> None:
    before = _instances(cluster, "cp-a", "payment")
    assert before == {cluster.sidecars["payment"].instance}

    async def calls() -> tuple[int, list[str]]:
        client = MeshClient(cluster.addresses, caller_service="shop")
        failures: list[str] = []
        done = 0
        try:
            await client.start()
            deadline = time.monotonic() + 8.0  # past the sidecars' 3 s TTL, twice
            killed = False
            while time.monotonic() < deadline:
                if not killed and time.monotonic() > deadline - 7.0:
                    cluster.replicas["cp-c"].kill()  # the others stay
                    killed = True
                try:
                    await client.call("payment", "validate_payment", {"key": f"r-{done}"})
                    done += 1
                except Exception as exc:
                    failures.append(repr(exc))
                await asyncio.sleep(0.01)
        finally:
            await client.aclose()
        return done, failures

    done, failures = asyncio.run(calls())
    assert failures == []
    assert done > 50
    # No registration was lost: every remaining replica still has both sidecars.
    for replica in ("cp-a", "cp-b"):
        assert _instances(cluster, replica, "payment") == before
        assert _instances(cluster, replica, "inventory") == {cluster.sidecars["inventory"].instance}


def test_a_workflow_survives_the_kill_of_its_owning_replica(cluster: Cluster) -> None:
    owner = cluster.mesh("cp-a")
    with grpc.insecure_channel(owner.address) as channel:
        orchestrator_pb2_grpc.OrchestratorServiceStub(channel).PutWorkflow(
            orchestrator_pb2.PutWorkflowRequest(workflow=workflow_from_dict(CHECKOUT)), timeout=10
        )
    execution_id = owner.start(
        "replicated_checkout",
        {"key": "takeover", "behaviour": {"reserve_inventory": {"sleep": 2.0}}},
    )

    def reserving() -> bool:
        got = owner.get(execution_id).execution
        return any(
            s.step_name == "reserve_inventory" and s.state == orchestrator_pb2.STEP_STATE_RUNNING
            for s in got.steps
        )

    _until(reserving, 10, "reserve_inventory running")
    assert owner.get(execution_id).execution.owner == "cp-a"
    killed_at = time.monotonic()
    cluster.replicas["cp-a"].kill()

    survivor = cluster.mesh("cp-b")
    done = survivor.wait(execution_id, within=30)
    took = time.monotonic() - killed_at
    assert orchestrator_pb2.ExecutionState.Name(done.state) == "EXECUTION_STATE_SUCCEEDED"
    alive = {name for name, plane in cluster.replicas.items() if plane.proc.poll() is None}
    assert done.owner in alive  # whichever survivor claimed it first
    assert took < 15, f"takeover and finish took {took:.1f} s"
    history = survivor.get(execution_id).events
    assert any(e.type == orchestrator_pb2.EXECUTION_EVENT_TYPE_EXECUTION_RESUMED for e in history)
    # Re-sent with the same idempotency key: every step acted once.
    assert [e["operation"] for e in survivor.ledger("payment", "takeover")] == [
        "validate_payment",
        "process_payment",
    ]
    assert [e["operation"] for e in survivor.ledger("inventory", "takeover")] == [
        "reserve_inventory"
    ]
