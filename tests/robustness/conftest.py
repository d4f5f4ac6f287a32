"""Fixtures for robustness tests: control planes with chosen limits, stubs, a clock."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.server import ControlPlane, create_server
from flext_mesh.v1 import registry_pb2
from tests.registry.conftest import fast_config

TTL_ONLY = registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY

StartPlane = Callable[..., Awaitable[ControlPlane]]


@pytest.fixture
async def start_plane(tmp_path: Path) -> AsyncIterator[StartPlane]:
    """Start in-process control planes with config overrides; all stopped at the end."""
    planes: list[ControlPlane] = []

    async def start(**overrides: Any) -> ControlPlane:
        plane, _ = await create_server(fast_config(tmp_path, **overrides))
        planes.append(plane)
        return plane

    try:
        yield start
    finally:
        for plane in planes:
            await plane.stop(0.2)


@pytest.fixture
async def channels() -> AsyncIterator[Callable[[str], grpc.aio.Channel]]:
    """Open insecure channels to addresses; all closed at the end."""
    opened: list[grpc.aio.Channel] = []

    def open_channel(address: str) -> grpc.aio.Channel:
        channel = grpc.aio.insecure_channel(address)
        opened.append(channel)
        return channel

    try:
        yield open_channel
    finally:
        for channel in opened:
            await channel.close()


def instance(service: str, instance_id: str, **fields: Any) -> registry_pb2.ServiceInstance:
    """A TTL-only instance on a dummy endpoint."""
    return registry_pb2.ServiceInstance(
        service_name=service,
        instance_id=instance_id,
        endpoint=fields.pop("endpoint", "127.0.0.1:9"),
        health_check_mode=TTL_ONLY,
        **fields,
    )


def register_request(
    service: str, instance_id: str, *, ttl: float = 30.0, **fields: Any
) -> registry_pb2.RegisterRequest:
    """A RegisterRequest of a TTL-only instance with a TTL in seconds."""
    request = registry_pb2.RegisterRequest(instance=instance(service, instance_id, **fields))
    request.ttl.FromNanoseconds(int(ttl * 1e9))
    return request
