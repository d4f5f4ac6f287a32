"""Last-known instances survive an empty push (Nacos's empty-push protection).

When every instance of a service leaves the registry at once (leases that expired
while the store was frozen, a control plane that came back without them), a client
keeps calling the instances it last knew for a grace period, unless one answers
UNAVAILABLE, instead of failing NotFound in the moment before they register again.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from flext_mesh.errors import NotFound
from flext_mesh.server import ControlPlane, create_server
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from sidecar.client import ClientSettings, MeshClient
from sidecar.config import SidecarConfig
from sidecar.main import Sidecar
from tests.conftest import start_serve
from tests.etcd_server import EtcdServer
from tests.registry.conftest import eventually, fast_config
from tests.sidecar.apps import PROCESSORS
from tests.sidecar.test_client_per_try import Instances
from tests.sidecar.test_sidecar_process import start_sidecar

CHARGE = {"customer_id": "c", "amount": 1}


@pytest.fixture
async def fleet() -> AsyncIterator[Instances]:
    instances = Instances()
    try:
        yield instances
    finally:
        await instances.aclose()


def _removed(*instances: registry_pb2.ServiceInstance) -> registry_pb2.WatchResponse:
    return registry_pb2.WatchResponse(
        events=[
            registry_pb2.WatchEvent(
                type=registry_pb2.WATCH_EVENT_TYPE_REMOVED,
                service_name=i.service_name,
                instance=i,
            )
            for i in instances
        ],
        revision=100,
    )


def _added(*instances: registry_pb2.ServiceInstance) -> registry_pb2.WatchResponse:
    return registry_pb2.WatchResponse(
        events=[
            registry_pb2.WatchEvent(
                type=registry_pb2.WATCH_EVENT_TYPE_ADDED,
                service_name=i.service_name,
                instance=i,
            )
            for i in instances
        ],
        revision=101,
    )


async def test_calls_go_on_to_the_last_known_instances_for_the_grace_only(
    fleet: Instances,
) -> None:
    await fleet.start("a", PROCESSORS)
    await fleet.start("b", PROCESSORS)
    client = fleet.client(settings=ClientSettings(last_known_grace=0.5))
    client._apply(_removed(*fleet.instances))
    assert client.instances("payment") == [], "nothing is registered"
    for _ in range(10):
        assert (await client.call("payment", "charge", CHARGE))["charged"] == 1
    await asyncio.sleep(0.5)
    with pytest.raises(NotFound, match="has no registered instance"):
        await client.call("payment", "charge", CHARGE)


async def test_instances_that_register_again_end_the_grace(fleet: Instances) -> None:
    await fleet.start("a", PROCESSORS)
    client = fleet.client(settings=ClientSettings(last_known_grace=0.3))
    client._apply(_removed(*fleet.instances))
    client._apply(_added(*fleet.instances))
    await asyncio.sleep(0.4)
    for _ in range(3):  # registered again: no grace needed, none running out
        assert (await client.call("payment", "charge", CHARGE))["charged"] == 1


async def test_a_last_known_instance_that_answers_unavailable_is_forgotten_at_once(
    fleet: Instances,
) -> None:
    await fleet.start("a", PROCESSORS)
    await fleet.start("b", PROCESSORS)
    client = fleet.client(settings=ClientSettings(initial_backoff=0.001, max_backoff=0.002))
    client._apply(_removed(*fleet.instances))
    server, _ = fleet.servers[0]
    await server.stop(0)  # "a" really is gone
    for _ in range(6):  # retried on "b" when "a" refuses; "a" is then never tried again
        assert (await client.call("payment", "charge", CHARGE))["charged"] == 1
    assert client.breaker_state("payment", "a") == "CLOSED", "one refusal, then forgotten"
    server, _ = fleet.servers[1]
    await server.stop(0)
    started = time.monotonic()
    with pytest.raises(NotFound):
        await client.call("payment", "charge", CHARGE)
    assert time.monotonic() - started < 1.0, "no waiting out the 30 s grace"


async def test_a_snapshot_without_the_service_is_an_empty_push_too(fleet: Instances) -> None:
    await fleet.start("a", PROCESSORS)
    client = fleet.client()
    # The control plane came back without the instances: its snapshot lacks them.
    client._apply(registry_pb2.WatchResponse(snapshot=registry_pb2.WatchSnapshot(), revision=5))
    assert (await client.call("payment", "charge", CHARGE))["charged"] == 1
    with pytest.raises(NotFound):
        await client.call("ledger", "post", {})


# -- with real sidecars and a real control plane --------------------------------------------


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    control, _ = await create_server(fast_config(tmp_path))
    try:
        yield control
    finally:
        await control.stop(0.2)


async def _load(client: MeshClient, outcomes: list[str], stop: asyncio.Event) -> None:
    """Calls at about 100 per second until ``stop``, each outcome recorded."""

    async def one() -> None:
        try:
            await client.call("payment", "charge", CHARGE)
        except Exception as exc:
            outcomes.append(f"{type(exc).__name__}: {exc}")
        else:
            outcomes.append("ok")

    tasks: set[asyncio.Task[None]] = set()
    while not stop.is_set():
        task = asyncio.create_task(one())
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        await asyncio.sleep(0.01)
    await asyncio.gather(*tasks)


async def test_deregistering_every_instance_fails_no_call_while_they_register_again(
    plane: ControlPlane,
) -> None:
    address = f"127.0.0.1:{plane.port}"
    sidecars = []
    for name in ("a", "b"):
        sidecar = Sidecar(
            SidecarConfig(
                service="payment",
                app="tests.sidecar.apps:PROCESSORS",
                control_plane=address,
                instance_id=name,
                ttl=2.0,
            )
        )
        await sidecar.start()
        sidecars.append(sidecar)
    client = MeshClient(address)
    channel = grpc.aio.insecure_channel(address)
    try:
        await client.start()
        assert await client.wait_for_instances("payment", 2, within=10)
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        outcomes: list[str] = []
        stop = asyncio.Event()
        load = asyncio.create_task(_load(client, outcomes, stop))
        await asyncio.sleep(0.5)
        for name in ("a", "b"):  # both leases revoked: the set is empty
            await stub.Deregister(
                registry_pb2.DeregisterRequest(service_name="payment", instance_id=name)
            )

        async def empty() -> bool:
            return not client.instances("payment")

        async def back() -> bool:
            return len(client.instances("payment")) == 2

        await eventually(empty, within=5)
        await eventually(back, within=10)  # the sidecars notice and register again
        await asyncio.sleep(0.3)
        stop.set()
        await load
        failed = [o for o in outcomes if o != "ok"]
        assert failed == [], f"{len(failed)} of {len(outcomes)} calls failed: {failed[:3]}"
        assert len(outcomes) > 50
    finally:
        await channel.close()
        await client.aclose()
        for sidecar in sidecars:
            await sidecar.stop(0)


@pytest.mark.xdist_group("client_etcd_freeze")
@pytest.mark.timeout(90)
async def test_a_frozen_etcd_fails_no_call(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """etcd SIGSTOPped for 10 s under load: the leases expire when it resumes and the
    sidecars register again moments later; no call fails meanwhile."""
    etcd = EtcdServer.start(tmp_path)
    plane = start_serve(tmp_path, "--store", etcd.url, "--health-check-interval", "0.5")
    sidecars = [
        start_sidecar(tmp_path, plane.address, "--instance-id", name, "--ttl", "3")
        for name in ("a", "b")
    ]
    client = MeshClient(plane.address)
    frozen = False
    try:
        await client.start()
        assert await client.wait_for_instances("payment", 2, within=15)
        outcomes: list[str] = []
        stop = asyncio.Event()
        load = asyncio.create_task(_load(client, outcomes, stop))
        await asyncio.sleep(1.0)
        etcd.proc.send_signal(signal.SIGSTOP)
        frozen = True
        await asyncio.sleep(10)
        etcd.proc.send_signal(signal.SIGCONT)
        frozen = False

        async def back() -> bool:
            return len(client.instances("payment")) == 2

        await asyncio.sleep(2)  # the leases expire, the sidecars register again
        await eventually(back, within=15)
        await asyncio.sleep(1)
        stop.set()
        await load
        failed = [o for o in outcomes if o != "ok"]
        assert failed == [], f"{len(failed)} of {len(outcomes)} calls failed: {failed[:3]}"
        assert len(outcomes) > 800
        assert "no registered instance left" in caplog.text, "the set did go empty"
    finally:
        if frozen:
            etcd.proc.send_signal(signal.SIGCONT)
        await client.aclose()
        for sidecar in sidecars:
            sidecar.proc.send_signal(signal.SIGTERM)
        for sidecar in sidecars:
            sidecar.proc.wait(15)
        plane.terminate()
        etcd.stop()
