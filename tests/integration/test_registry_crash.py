"""The registry survives kill -9 of the control plane."""

from __future__ import annotations

from pathlib import Path

import grpc

from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from tests.conftest import start_serve


def _register(stub: registry_pb2_grpc.RegistryServiceStub, i: int) -> registry_pb2.RegisterResponse:
    request = registry_pb2.RegisterRequest(
        instance=registry_pb2.ServiceInstance(
            service_name="payment",
            instance_id=f"p{i}",
            endpoint=f"127.0.0.1:{7000 + i}",
            health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
        )
    )
    request.ttl.FromSeconds(60)
    return stub.Register(request, timeout=10)


def test_kill_9_keeps_acknowledged_instances_and_the_revision(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'crash.db'}"
    server = start_serve(tmp_path, "--store", store)
    with grpc.insecure_channel(server.address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        replies = [_register(stub, i) for i in range(20)]
    server.kill()  # SIGKILL right after the last acknowledgement

    restarted = start_serve(tmp_path, "--store", store)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            found = stub.Discover(
                registry_pb2.DiscoverRequest(service_name="payment", healthy_only=False),
                timeout=10,
            )
            assert sorted(i.instance_id for i in found.instances) == sorted(
                f"p{i}" for i in range(20)
            )
            assert found.revision == replies[-1].revision
            # Leases survived too: the sidecars' next heartbeats keep them.
            for reply in replies:
                stub.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=reply.lease.lease_id))
            stream = stub.Watch(registry_pb2.WatchRequest(from_revision=replies[9].revision))
            first = next(stream)
            assert [e.instance.instance_id for e in first.events] == [
                f"p{i}" for i in range(10, 20)
            ]
            stream.cancel()
    finally:
        restarted.terminate()
