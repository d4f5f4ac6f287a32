"""A stall of the control plane's event loop against instances that keep renewing: the
renewals gRPC queued during the stall are served after it, and nothing expires."""

from __future__ import annotations

import asyncio
import threading
import time

import grpc

from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from tests.registry.conftest import Mesh


def _stall_the_loop(seconds: float) -> None:
    """Hold the event loop, as a blocking call in a handler would: nothing else runs."""
    time.sleep(seconds)


async def test_a_stall_expires_no_instance_whose_heartbeats_were_queued(mesh: Mesh) -> None:
    lease_id = (await mesh.register("payment", "steady", ttl=1.0)).lease.lease_id
    expiries = mesh.plane.store.subscribe("/registry/instances/")
    address = f"127.0.0.1:{mesh.plane.port}"
    stop = threading.Event()
    refused: list[grpc.StatusCode] = []

    def heartbeat_every_quarter_second() -> None:
        # Its own thread and channel: it goes on sending while the loop is stalled.
        with grpc.insecure_channel(address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            while not stop.is_set():
                try:
                    stub.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=lease_id), timeout=10)
                except grpc.RpcError as exc:
                    refused.append(exc.code())
                stop.wait(0.25)

    client = threading.Thread(target=heartbeat_every_quarter_second)
    client.start()
    try:
        await asyncio.sleep(0.3)
        _stall_the_loop(2.0)  # twice the TTL: the lease's deadline passes meanwhile
        await asyncio.sleep(1.0)  # the queued heartbeat is served; sweeps go on
    finally:
        stop.set()
        await asyncio.to_thread(client.join)

    assert refused == []
    assert "steady" in await mesh.instances("payment")
    expiries.close()  # what it got so far, then the end
    expired = [e.key async for batch in expiries for e in batch if e.expired]
    assert expired == []
