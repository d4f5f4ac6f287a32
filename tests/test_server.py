"""The control plane in-process: create_server on a free port, health on shutdown."""

from __future__ import annotations

import asyncio
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flext_mesh.config import ServerConfig
from flext_mesh.server import SERVICE_NAMES, ControlPlane, create_server
from flext_mesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc, registry_pb2, registry_pb2_grpc


async def test_create_server_binds_a_free_port_and_serves(control_plane: ControlPlane) -> None:
    assert control_plane.port > 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{control_plane.port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for name in ("", *SERVICE_NAMES):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_generated_stubs_reach_the_services(control_plane: ControlPlane) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{control_plane.port}") as channel:
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
        listed = await stub.ListWorkflows(orchestrator_pb2.ListWorkflowsRequest())
        assert list(listed.workflows) == []
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await registry.GetServicePolicy(
                registry_pb2.GetServicePolicyRequest(service_name="payment")
            )
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    assert "'payment' has no policy" in (info.value.details() or "")


async def test_shutdown_turns_health_not_serving_for_watchers(tmp_path: Path) -> None:
    config = ServerConfig(
        listen="127.0.0.1:0", http_listen="127.0.0.1:0", store=f"sqlite:///{tmp_path / 'm.db'}"
    )
    plane, port = await create_server(config)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        watch = health_pb2_grpc.HealthStub(channel).Watch(
            health_pb2.HealthCheckRequest(service=SERVICE_NAMES[0])
        )
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.create_task(plane.stop(grace=2.0))
        second = await asyncio.wait_for(watch.read(), 5)
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await stopping
        watch.cancel()


async def test_a_stopped_control_plane_keeps_its_store_for_the_next(tmp_path: Path) -> None:
    config = ServerConfig(
        listen="127.0.0.1:0", http_listen="127.0.0.1:0", store=f"sqlite:///{tmp_path / 'keep.db'}"
    )
    plane, _ = await create_server(config)
    revision = await plane.store.put("/probe", b"kept")
    await plane.stop(0)
    plane2, _ = await create_server(config)
    try:
        assert await plane2.store.current_revision() == revision
        kept = await plane2.store.get("/probe")
        assert kept is not None
        assert kept.value == b"kept"
    finally:
        await plane2.stop(0)
