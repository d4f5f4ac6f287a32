"""Breakers that match the fault: a slow operation does not take its instance down."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from pydantic import BaseModel

from flext_mesh import FlextResult, ServiceProcessor
from flext_mesh.errors import DeadlineExceeded, Unavailable
from flext_mesh.server import ControlPlane, create_server
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from sidecar.breaker import BreakerBoard, BreakerSettings, BreakerState
from sidecar.client import BreakersOpen, MeshClient
from sidecar.config import SidecarConfig
from sidecar.main import Sidecar
from tests.registry.conftest import eventually, fast_config
from tests.sidecar.apps import ChargeService


class Nothing(BaseModel):
    """No input."""


class SlowReport(ServiceProcessor[Nothing, None, dict[str, Any]]):
    """An operation that takes a second."""

    async def process(self, request: Nothing) -> FlextResult[None]:
        await asyncio.sleep(1.0)
        return FlextResult[None].ok(None)

    def build(self, domain: None, *, correlation_id: str) -> dict[str, Any]:
        return {}


SLOW_AND_FAST = {"slow": SlowReport(), "fast": ChargeService()}
CHARGE = {"customer_id": "c", "amount": 2}


def _policy_applied(client: MeshClient, service: str) -> Callable[[], Awaitable[bool]]:
    async def applied() -> bool:
        return client.policy(service) is not None

    return applied


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    control, _ = await create_server(fast_config(tmp_path))
    try:
        yield control
    finally:
        await control.stop(0.2)


async def test_a_slow_operation_opens_its_own_breaker_and_the_instance_keeps_serving(
    plane: ControlPlane,
) -> None:
    address = f"127.0.0.1:{plane.port}"
    sidecar = Sidecar(
        SidecarConfig(
            service="report",
            app="tests.sidecar.test_client_breakers:SLOW_AND_FAST",
            control_plane=address,
            instance_id="only",
        )
    )
    await sidecar.start()
    client = MeshClient(address)
    channel = grpc.aio.insecure_channel(address)
    try:
        await client.start()
        assert await client.wait_for_instances("report", 1, within=10)
        policy = registry_pb2.ServicePolicy(service_name="report")
        policy.operation_timeouts["slow"].FromMilliseconds(200)
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        await stub.PutServicePolicy(registry_pb2.PutServicePolicyRequest(policy=policy))
        await eventually(_policy_applied(client, "report"), within=5)

        for _ in range(5):  # five slow calls in a row time out, as the policy asks
            started = time.monotonic()
            with pytest.raises(DeadlineExceeded):
                await client.call("report", "slow")
            assert time.monotonic() - started < 0.5
        assert client.breaker_state("report", "only", "slow") == "OPEN"
        assert client.breaker_state("report", "only") == "CLOSED", "the instance is fine"

        started = time.monotonic()
        with pytest.raises(BreakersOpen, match="for 'slow'"):
            await client.call("report", "slow")
        assert time.monotonic() - started < 0.05, "slow now fails fast"

        refused = 0
        for i in range(20):  # the other operation on the same (only) instance answers
            try:
                reply = await client.call("report", "fast", {**CHARGE, "amount": 1 + i})
            except BreakersOpen:
                refused += 1
            else:
                assert reply["charged"] == 1 + i
        assert refused == 0
    finally:
        await channel.close()
        await client.aclose()
        await sidecar.stop(0)


def test_which_breaker_a_fault_counts_against() -> None:
    now = [0.0]
    board = BreakerBoard(
        lambda service: BreakerSettings(consecutive_failures=2, open_duration=1.0),
        clock=lambda: now[0],
    )
    breakers = board.of("svc", "i-1")
    for _ in range(2):  # the operation's own deadline expired: that operation only
        permit = breakers.acquire("slow")
        assert permit is not None
        permit.operation_failure()
    assert board.state("svc", "i-1", "slow") is BreakerState.OPEN
    assert board.state("svc", "i-1") is BreakerState.CLOSED
    assert breakers.acquire("slow") is None
    fast = breakers.acquire("fast")
    assert fast is not None
    fast.success()

    now[0] = 1.0  # the open period ends: a trial call of slow is let through
    trial = breakers.acquire("slow")
    assert trial is not None
    trial.success()
    assert board.state("svc", "i-1", "slow") is BreakerState.HALF_OPEN

    for _ in range(2):  # a connection-level fault counts against the whole instance
        permit = breakers.acquire("fast")
        assert permit is not None
        permit.failure()
    assert board.state("svc", "i-1") is BreakerState.OPEN
    assert breakers.acquire("fast") is None
    assert breakers.acquire("slow") is None
    assert board.state("svc", "i-2", "fast") is BreakerState.CLOSED, "never failed there"


async def test_a_refused_connection_opens_the_instance_breaker_for_every_operation(
    plane: ControlPlane,
) -> None:
    address = f"127.0.0.1:{plane.port}"
    sidecar = Sidecar(
        SidecarConfig(
            service="report",
            app="tests.sidecar.test_client_breakers:SLOW_AND_FAST",
            control_plane=address,
            instance_id="only",
        )
    )
    await sidecar.start()
    client = MeshClient(address)
    try:
        await client.start()
        assert await client.wait_for_instances("report", 1, within=10)
        await sidecar.server.stop(0)  # nothing listens any more; the lease lives on
        for _ in range(2):
            with pytest.raises(Unavailable):
                await client.call("report", "fast", CHARGE)
        assert client.breaker_state("report", "only") == "OPEN"
        with pytest.raises(BreakersOpen, match=r"circuit breaker$"):
            await client.call("report", "slow")
    finally:
        await client.aclose()
        await sidecar.stop(0)
