"""Fixtures for registry tests: a control plane with short intervals, stubs, health servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from flext_mesh.config import ServerConfig
from flext_mesh.server import ControlPlane, create_server
from flext_mesh.store.sqlite import SqliteStore
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc

TTL_ONLY = registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY


@dataclass
class Mesh:
    """A control plane with a channel and a registry stub."""

    plane: ControlPlane
    channel: grpc.aio.Channel
    stub: registry_pb2_grpc.RegistryServiceStub

    async def register(
        self,
        service: str,
        instance_id: str,
        *,
        endpoint: str = "127.0.0.1:9",
        ttl: float = 30.0,
        weight: int = 0,
        mode: int = TTL_ONLY,
        **fields: Any,
    ) -> registry_pb2.RegisterResponse:
        request = registry_pb2.RegisterRequest(
            instance=registry_pb2.ServiceInstance(
                service_name=service,
                instance_id=instance_id,
                endpoint=endpoint,
                weight=weight,
                health_check_mode=mode,  # type: ignore[arg-type]
                **fields,
            )
        )
        request.ttl.FromNanoseconds(int(ttl * 1e9))
        return await self.stub.Register(request)

    async def instances(self, service: str) -> dict[str, registry_pb2.ServiceInstance]:
        reply = await self.stub.Discover(
            registry_pb2.DiscoverRequest(service_name=service, healthy_only=False)
        )
        return {i.instance_id: i for i in reply.instances}


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    """An open SQLite store in a temporary directory."""
    s = SqliteStore(tmp_path / "registry.db")
    await s.open()
    yield s
    await s.close()


def fast_config(tmp_path: Path, **overrides: Any) -> ServerConfig:
    """A config with short health intervals, for tests."""
    settings: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "http_listen": "127.0.0.1:0",
        "store": f"sqlite:///{tmp_path / 'mesh.db'}",
        "grace_period": 0.5,
        "health_check_interval": 0.2,
        "health_check_timeout": 0.2,
        "health_unhealthy_threshold": 2,
        "health_healthy_threshold": 2,
    }
    settings.update(overrides)
    return ServerConfig(**settings)


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    plane, port = await create_server(fast_config(tmp_path))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield Mesh(plane, channel, registry_pb2_grpc.RegistryServiceStub(channel))
    finally:
        await channel.close()
        await plane.stop(0.2)


async def eventually(
    check: Callable[[], Awaitable[bool]], *, within: float = 10.0, interval: float = 0.05
) -> float:
    """Poll ``check`` until it is true; returns the seconds it took (fails on timeout)."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


class HungHealth(health_pb2_grpc.HealthServicer):
    """A health service that never answers: a hung process."""

    async def Check(self, request: Any, context: Any) -> Any:
        await asyncio.sleep(3600)


@dataclass
class HealthEndpoint:
    """A real gRPC server with a health service whose answers a test controls."""

    server: grpc.aio.Server
    servicer: health.aio.HealthServicer
    port: int

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def set(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        await self.servicer.set("", status)


async def start_health_endpoint(port: int = 0, *, hung: bool = False) -> HealthEndpoint:
    """Start a health server on 127.0.0.1 (SERVING), or one that hangs on Check."""
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    if hung:
        health_pb2_grpc.add_HealthServicer_to_server(HungHealth(), server)
    else:
        health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    endpoint = HealthEndpoint(server, servicer, bound)
    if not hung:
        await endpoint.set(True)
    return endpoint
