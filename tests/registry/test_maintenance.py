"""SetInstanceMaintenance over real gRPC: drain and undrain one instance.

Real control planes in this process (real gRPC, a real SQLite store); the traffic side
(real sidecars, a mesh client, kill -9) is in tests/integration/test_maintenance.py.
"""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import grpc
import pytest

from flext_mesh.errors import InvalidArgument
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.server import create_server
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from tests.metrics.test_prometheus import _scrape
from tests.registry.conftest import Mesh, eventually, fast_config

WE = registry_pb2.WatchEventType
Code = grpc.StatusCode


def _drain(
    service: str, instance_id: str, maintenance: bool = True, reason: str = ""
) -> registry_pb2.SetInstanceMaintenanceRequest:
    return registry_pb2.SetInstanceMaintenanceRequest(
        service_name=service, instance_id=instance_id, maintenance=maintenance, reason=reason
    )


async def _healthy_ids(mesh: Mesh, service: str) -> list[str]:
    reply = await mesh.stub.Discover(registry_pb2.DiscoverRequest(service_name=service))
    return sorted(i.instance_id for i in reply.instances)


async def test_a_drained_instance_leaves_discovery_but_stays_registered(mesh: Mesh) -> None:
    await mesh.register("payment", "p1")
    await mesh.register("payment", "p2")
    assert await _healthy_ids(mesh, "payment") == ["p1", "p2"]

    reply = await mesh.stub.SetInstanceMaintenance(_drain("payment", "p1", reason="kernel upgrade"))
    assert reply.instance.maintenance
    assert reply.instance.maintenance_reason == "kernel upgrade"
    assert reply.instance.HasField("maintenance_time")
    assert reply.instance.effective_weight == 0
    assert reply.revision > 0

    # Clients get only p2; p1 is still listed, and its lease goes on.
    for _ in range(5):
        assert await _healthy_ids(mesh, "payment") == ["p2"]
    everything = await mesh.instances("payment")
    assert sorted(everything) == ["p1", "p2"]
    assert everything["p1"].maintenance
    assert everything["p1"].health == registry_pb2.HEALTH_STATUS_SERVING  # health is its own
    await mesh.stub.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=everything["p1"].lease_id))

    summary = (await mesh.stub.ListServices(registry_pb2.ListServicesRequest())).services[0]
    assert (summary.instance_count, summary.healthy_count, summary.maintenance_count) == (2, 1, 1)
    assert summary.unhealthy_count == 0

    explained = await mesh.stub.Discover(
        registry_pb2.DiscoverRequest(service_name="payment", explain=True)
    )
    why = {e.instance_id: e for e in explained.explanations}
    assert why["p1"].maintenance
    assert why["p1"].maintenance_factor == 0
    assert why["p1"].maintenance_reason == "kernel upgrade"
    assert why["p1"].effective_weight == 0
    assert not why["p1"].in_answer
    assert why["p2"].maintenance_factor == 1
    assert why["p2"].in_answer

    # Undrain: back in the answers with its weight.
    back = await mesh.stub.SetInstanceMaintenance(_drain("payment", "p1", maintenance=False))
    assert not back.instance.maintenance
    assert back.instance.maintenance_reason == ""
    assert not back.instance.HasField("maintenance_time")
    assert back.instance.effective_weight == 100
    assert await _healthy_ids(mesh, "payment") == ["p1", "p2"]


async def test_setting_the_same_state_again_writes_nothing(mesh: Mesh) -> None:
    await mesh.register("payment", "p1")
    first = await mesh.stub.SetInstanceMaintenance(_drain("payment", "p1", reason="disk"))
    again = await mesh.stub.SetInstanceMaintenance(_drain("payment", "p1", reason="disk"))
    assert again.revision == first.revision
    assert again.instance.maintenance_time == first.instance.maintenance_time
    # Another reason replaces it; the drain keeps its start time.
    other = await mesh.stub.SetInstanceMaintenance(_drain("payment", "p1", reason="memory"))
    assert other.revision > first.revision
    assert other.instance.maintenance_reason == "memory"
    assert other.instance.maintenance_time == first.instance.maintenance_time
    undrained = await mesh.stub.SetInstanceMaintenance(_drain("payment", "p1", False))
    still = await mesh.stub.SetInstanceMaintenance(_drain("payment", "p1", False))
    assert still.revision == undrained.revision


async def test_watchers_get_a_maintenance_event_each_way(mesh: Mesh) -> None:
    await mesh.register("payment", "p1")
    stream = mesh.stub.Watch(registry_pb2.WatchRequest(service_names=["payment"]))
    first = await stream.read()
    assert first.HasField("snapshot")
    await mesh.stub.SetInstanceMaintenance(_drain("payment", "p1", reason="move racks"))
    await mesh.stub.SetInstanceMaintenance(_drain("payment", "p1", False))
    seen: list[registry_pb2.WatchEvent] = []
    async with asyncio.timeout(5):
        while len(seen) < 2:
            seen.extend((await stream.read()).events)
    stream.cancel()
    assert [e.type for e in seen] == [WE.WATCH_EVENT_TYPE_MAINTENANCE_CHANGED] * 2
    assert [e.instance.maintenance for e in seen] == [True, False]
    assert seen[0].instance.maintenance_reason == "move racks"


async def test_a_new_registration_of_the_instance_keeps_it_drained(mesh: Mesh) -> None:
    await mesh.register("payment", "p1", endpoint="127.0.0.1:7001")
    await mesh.register("payment", "p2")
    await mesh.stub.SetInstanceMaintenance(_drain("payment", "p1", reason="patching"))
    # The sidecar registers again (a new lease, even a new port): still drained. A
    # Register that says maintenance=false changes nothing either.
    again = await mesh.register("payment", "p1", endpoint="127.0.0.1:7002", maintenance=False)
    assert again.instance.maintenance
    assert again.instance.maintenance_reason == "patching"
    assert again.instance.effective_weight == 0
    assert await _healthy_ids(mesh, "payment") == ["p2"]
    # ... and a fresh instance cannot register itself drained.
    fresh = await mesh.register("payment", "p3", maintenance=True, maintenance_reason="x")
    assert not fresh.instance.maintenance
    assert fresh.instance.maintenance_reason == ""


async def test_panic_mode_never_brings_a_drained_instance_back(mesh: Mesh) -> None:
    # "down" fails its health checks (nothing listens there); "drained" is drained.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    await mesh.register(
        "payment", "down", endpoint=closed, mode=registry_pb2.HEALTH_CHECK_MODE_GRPC
    )
    await mesh.register("payment", "drained")
    await mesh.stub.SetInstanceMaintenance(_drain("payment", "drained"))

    async def down_is_down() -> bool:
        return (await mesh.instances("payment"))["down"].health == (
            registry_pb2.HEALTH_STATUS_NOT_SERVING
        )

    await eventually(down_is_down)
    reply = await mesh.stub.Discover(registry_pb2.DiscoverRequest(service_name="payment"))
    assert reply.panic_mode  # 0 of 1 healthy: the drained one does not count
    assert [i.instance_id for i in reply.instances] == ["down"]
    assert any("1 instance(s) in maintenance left out" in note for note in reply.notes)


async def test_bad_requests_name_the_field_and_unknown_instances_are_not_found(
    mesh: Mesh,
) -> None:
    await mesh.register("payment", "p1")

    async def refused(request: registry_pb2.SetInstanceMaintenanceRequest) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.stub.SetInstanceMaintenance(request)
        return info.value

    error = await refused(_drain("payment", "nope"))
    assert error.code() is Code.NOT_FOUND
    assert error.details() == "instance 'nope' of service 'payment' is not registered"
    assert (await refused(_drain("ledger", "p1"))).code() is Code.NOT_FOUND

    cases = {
        "service_name": _drain("", "p1"),
        "instance_id": _drain("payment", "bad id!"),
    }
    for field, request in cases.items():
        error = await refused(request)
        assert error.code() is Code.INVALID_ARGUMENT
        mesh_error = from_rpc_error(error)
        assert isinstance(mesh_error, InvalidArgument)
        assert [v.field for v in mesh_error.violations] == [field]

    long_reason = await refused(_drain("payment", "p1", reason="x" * 257))
    violations = from_rpc_error(long_reason).violations  # type: ignore[attr-defined]
    assert [(v.field, v.description) for v in violations] == [
        ("reason", "is 257 characters long; at most 256")
    ]
    control = from_rpc_error(await refused(_drain("payment", "p1", reason="a\nb")))
    assert [v.field for v in control.violations] == ["reason"]  # type: ignore[attr-defined]
    undrain_with_reason = from_rpc_error(await refused(_drain("payment", "p1", False, "why")))
    assert [v.field for v in undrain_with_reason.violations] == ["reason"]  # type: ignore[attr-defined]
    # Nothing of that changed the instance.
    assert not (await mesh.instances("payment"))["p1"].maintenance


async def test_a_drain_survives_a_restart_and_shows_in_the_gauges(tmp_path: Path) -> None:
    plane, port = await create_server(fast_config(tmp_path))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            mesh = Mesh(plane, channel, registry_pb2_grpc.RegistryServiceStub(channel))
            await mesh.register("payment", "p1", ttl=60)
            await mesh.register("payment", "p2", ttl=60)
            await mesh.stub.SetInstanceMaintenance(_drain("payment", "p1", reason="rack 4"))
            families = await asyncio.to_thread(_scrape, plane.http_port)
            gauge = {s[1]["service"]: s[2] for s in families["flext_mesh_instances_maintenance"]}
            assert gauge == {"payment": 1.0}
            # The instances gauge still counts it, by its health.
            assert sum(s[2] for s in families["flext_mesh_instances"]) == 2
    finally:
        await plane.stop(0.2)
    plane, port = await create_server(fast_config(tmp_path))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            mesh = Mesh(plane, channel, registry_pb2_grpc.RegistryServiceStub(channel))
            instances = await mesh.instances("payment")
            assert instances["p1"].maintenance
            assert instances["p1"].maintenance_reason == "rack 4"
            assert await _healthy_ids(mesh, "payment") == ["p2"]
    finally:
        await plane.stop(0.2)


async def test_a_drain_acknowledged_beside_a_re_registration_is_never_lost(mesh: Mesh) -> None:
    """The sidecar registers again (a lost lease) while an operator drains it: whichever
    lands first, an acknowledged drain stays. Register wrote blindly over the instance,
    so a drain committed between its read and its write was undone."""
    await mesh.register("payment", "p1")
    lost = 0
    for round_ in range(30):
        drained, _ = await asyncio.gather(
            mesh.stub.SetInstanceMaintenance(_drain("payment", "p1", reason=f"round {round_}")),
            mesh.register("payment", "p1"),
        )
        assert drained.instance.maintenance
        everything = await mesh.instances("payment")
        if not everything["p1"].maintenance:
            lost += 1
        await mesh.stub.SetInstanceMaintenance(_drain("payment", "p1", maintenance=False))
    assert lost == 0, f"{lost} of 30 acknowledged drains were undone by a registration"
