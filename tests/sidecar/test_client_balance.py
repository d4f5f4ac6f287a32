"""Equal instances share calls equally, however often the registry pushes changes.

Each Watch change of a service builds its routes again. A picker built afresh starts
its rotation at the first instance; with a change every few calls that instance got
about 60% (3 of every 5). The client now keeps the picker while nothing it reads moved,
and otherwise carries the rotation on from the last pick. A pick whose breaker refuses
now passes its turn to the next in the rotation rather than always to the same one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from flext_mesh.server import ControlPlane, create_server
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from sidecar.client import ClientSettings, MeshClient
from sidecar.config import SidecarConfig
from sidecar.main import Sidecar
from tests.registry.conftest import eventually, fast_config
from tests.sidecar.apps import PROCESSORS
from tests.sidecar.test_client_per_try import Instances

CHARGE = {"customer_id": "c", "amount": 1}


@pytest.fixture
async def fleet() -> AsyncIterator[Instances]:
    instances = Instances()
    try:
        yield instances
    finally:
        await instances.aclose()


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    control, _ = await create_server(fast_config(tmp_path))
    try:
        yield control
    finally:
        await control.stop(0.2)


async def test_two_equal_sidecars_share_2000_calls_within_a_few_percent(
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
        for i in range(400):
            # The registry pushes a change every 5 calls (here a policy, as weights,
            # health and response times do), and the routes are built again.
            policy = registry_pb2.ServicePolicy(service_name="payment")
            policy.default_timeout.FromMilliseconds(2000 + i)
            await stub.PutServicePolicy(registry_pb2.PutServicePolicyRequest(policy=policy))

            async def applied(limit: int = 2000 + i) -> bool:
                current = client.policy("payment")
                return current is not None and current.default_timeout.ToMilliseconds() == limit

            await eventually(applied, within=5, interval=0.002)
            for _ in range(5):
                await client.call("payment", "charge", CHARGE)
        served = Counter(
            {
                s.config.instance_id: s.reporter.stats().recorded  # type: ignore[union-attr]
                for s in sidecars
            }
        )
        assert sum(served.values()) == 2000
        assert abs(served["a"] - served["b"]) <= 2000 * 0.03, served
    finally:
        await channel.close()
        await client.aclose()
        for sidecar in sidecars:
            await sidecar.stop(0)


def _updated(
    instance: registry_pb2.ServiceInstance, revision: int, **changes: float
) -> registry_pb2.WatchResponse:
    changed = registry_pb2.ServiceInstance()
    changed.CopyFrom(instance)
    for name, value in changes.items():
        setattr(changed, name, value)
    return registry_pb2.WatchResponse(
        events=[
            registry_pb2.WatchEvent(
                type=registry_pb2.WATCH_EVENT_TYPE_UPDATED,
                service_name=changed.service_name,
                instance=changed,
            )
        ],
        revision=revision,
    )


async def test_weights_that_move_a_little_every_few_calls_keep_the_rotation_going(
    fleet: Instances,
) -> None:
    await fleet.start("a", PROCESSORS)
    await fleet.start("b", PROCESSORS)
    client = fleet.client()
    first = fleet.instances[0]
    for i in range(200):
        # Alternately a response time alone (nothing round robin reads) and the
        # effective weight (a new picker), every 3 calls.
        change = {"response_time_ms": 1.0 + i % 7} if i % 2 else {"effective_weight": 99.0 + i % 3}
        client._apply(_updated(first, 10 + i, **change))
        for _ in range(3):
            await client.call("payment", "charge", CHARGE)
    assert abs(fleet.served["a"] - fleet.served["b"]) <= 600 * 0.03, fleet.served


async def test_the_share_of_an_instance_whose_breaker_is_open_is_spread_evenly(
    fleet: Instances,
) -> None:
    for name in ("a", "b", "c"):
        await fleet.start(name, PROCESSORS)
    client = fleet.client(settings=ClientSettings(initial_backoff=0.001, max_backoff=0.002))
    server, _ = fleet.servers[0]
    await server.stop(0)  # "a" refuses connections; the registry has not noticed yet
    for _ in range(30):
        await client.call("payment", "charge", CHARGE)
    assert client.breaker_state("payment", "a") == "OPEN"
    before = Counter(fleet.served)
    for _ in range(300):
        await client.call("payment", "charge", CHARGE)
    served = Counter(fleet.served)
    served.subtract(before)
    assert abs(served["b"] - served["c"]) <= 300 * 0.03, served


async def test_a_changed_set_of_instances_keeps_no_stale_picker(fleet: Instances) -> None:
    for name in ("a", "b"):
        await fleet.start(name, PROCESSORS)
    client = fleet.client()
    for _ in range(4):
        await client.call("payment", "charge", CHARGE)
    await fleet.start("c", PROCESSORS)
    client._apply(
        registry_pb2.WatchResponse(
            events=[
                registry_pb2.WatchEvent(
                    type=registry_pb2.WATCH_EVENT_TYPE_ADDED,
                    service_name="payment",
                    instance=fleet.instances[2],
                )
            ],
            revision=50,
        )
    )
    before = Counter(fleet.served)
    for _ in range(300):
        await client.call("payment", "charge", CHARGE)
    served = Counter(fleet.served)
    served.subtract(before)
    assert sorted(served.values()) == [100, 100, 100]
