"""A standalone mesh client takes its zone from FLEXT_MESH_ZONE, as the sidecar does."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from flext_mesh.v1 import registry_pb2
from sidecar.client import ClientSettings, MeshClient
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


async def test_the_zone_variable_sets_the_caller_zone_of_the_preference(
    fleet: Instances, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, zone in (("a", "zone-a"), ("b", "zone-b"), ("c", "zone-b")):
        await fleet.start(name, PROCESSORS)
        fleet.instances[-1].zone = zone
    monkeypatch.setenv("FLEXT_MESH_ZONE", "zone-b")
    policy = registry_pb2.ServicePolicy(service_name="payment", version=1)
    policy.zone.enabled = True
    client = fleet.client(policy)
    assert client.zone == "zone-b"
    for _ in range(20):
        await client.call("payment", "charge", CHARGE)
    assert fleet.served == {"b": 10, "c": 10}, "only the caller's zone"


def test_an_explicit_zone_beats_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXT_MESH_ZONE", "zone-b")
    assert MeshClient("127.0.0.1:1", zone="").zone == "", "no preference, said in code"
    assert MeshClient("127.0.0.1:1", settings=ClientSettings(zone="zone-c")).zone == "zone-c"
    monkeypatch.delenv("FLEXT_MESH_ZONE")
    assert MeshClient("127.0.0.1:1").zone == "", "neither: no preference"


async def test_bad_settings_and_timeouts_are_refused_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"ClientSettings\.default_timeout must be finite"):
        ClientSettings(default_timeout=-1)
    with pytest.raises(ValueError, match=r"ClientSettings\.max_attempts must be an integer"):
        ClientSettings(max_attempts=0)
    with pytest.raises(ValueError, match=r"ClientSettings\.last_known_grace must be finite"):
        ClientSettings(last_known_grace=float("nan"))
    client = MeshClient("127.0.0.1:1")
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            await client.call("payment", "charge", CHARGE, timeout=bad)
    await client.aclose()
