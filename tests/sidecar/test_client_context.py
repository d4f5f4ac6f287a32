"""A call made while serving one carries its context: correlation id, deadline, trace.

The served call's context is what the hosting layer sets with
``flext_mesh.rpc.context.serving``; here the tests set it themselves around a call and
look at what a real ProcessorService server in this process received.
"""

from __future__ import annotations

import asyncio
import re
import sys
import time
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.errors import DeadlineExceeded
from flext_mesh.hosting import ProcessorServicer
from flext_mesh.hosting.servicer import add_processor_servicer
from flext_mesh.rpc.context import CallContext, serving
from flext_mesh.server import create_server
from flext_mesh.v1 import processor_pb2, processor_pb2_grpc, registry_pb2, registry_pb2_grpc
from sidecar.client import ClientSettings, MeshClient, SyncMeshClient
from sidecar.config import SidecarConfig
from sidecar.main import Sidecar
from tests.registry.conftest import fast_config
from tests.sidecar.apps import PROCESSORS

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACESTATE = "congo=t61rcWkgMzE,rojo=00f067aa0ba902b7"
_Context = grpc.aio.ServicerContext[Any, Any]
DOC = (Path(__file__).resolve().parents[2] / "docs" / "sidecar.md").read_text()


@dataclass
class Seen:
    """What the callee received with one Invoke."""

    correlation_id: str
    metadata: dict[str, str]
    time_remaining: float | None


class EchoServicer(processor_pb2_grpc.ProcessorServiceServicer):
    """Records the request's correlation id, the metadata and the deadline left."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    async def Invoke(
        self, request: processor_pb2.InvokeRequest, context: _Context
    ) -> processor_pb2.InvokeResponse:
        self.seen.append(
            Seen(
                request.correlation_id,
                {key: str(value) for key, value in context.invocation_metadata() or ()},
                context.time_remaining(),
            )
        )
        return processor_pb2.InvokeResponse(correlation_id=request.correlation_id)


@dataclass
class Callees:
    """An echo server (service ``echo``) and a hosted processor (service ``payment``)."""

    echo: EchoServicer
    servers: list[grpc.aio.Server] = field(default_factory=list)
    clients: list[MeshClient] = field(default_factory=list)
    snapshot: registry_pb2.WatchResponse = field(default_factory=registry_pb2.WatchResponse)

    def client(self, **kwargs: Any) -> MeshClient:
        """A client fed the snapshot of both services (not started: no control plane)."""
        client = MeshClient("127.0.0.1:1", **kwargs)
        client._apply(self.snapshot)
        self.clients.append(client)
        return client


def _instance(service: str, port: int) -> registry_pb2.ServiceInstance:
    return registry_pb2.ServiceInstance(
        service_name=service,
        instance_id=f"{service}-1",
        endpoint=f"127.0.0.1:{port}",
        weight=100,
        health=registry_pb2.HEALTH_STATUS_SERVING,
        effective_weight=100.0,
    )


@pytest.fixture
async def callees() -> AsyncIterator[Callees]:
    echo = EchoServicer()
    echo_server = grpc.aio.server()
    processor_pb2_grpc.add_ProcessorServiceServicer_to_server(echo, echo_server)
    echo_port = echo_server.add_insecure_port("127.0.0.1:0")
    hosted = ProcessorServicer(PROCESSORS, service_name="payment", instance_id="payment-1")
    hosted_server = grpc.aio.server()
    add_processor_servicer(hosted, hosted_server)
    hosted_port = hosted_server.add_insecure_port("127.0.0.1:0")
    for server in (echo_server, hosted_server):
        await server.start()
    result = Callees(echo, [echo_server, hosted_server])
    result.snapshot = registry_pb2.WatchResponse(
        snapshot=registry_pb2.WatchSnapshot(
            instances=[_instance("echo", echo_port), _instance("payment", hosted_port)]
        ),
        revision=1,
    )
    try:
        yield result
    finally:
        for client in result.clients:
            await client.aclose()
        for server in result.servers:
            await server.stop(0)
        hosted.close()


def _inbound(cid: str = "ux-cid-1", *, within: float | None = 2.0) -> CallContext:
    deadline = None if within is None else time.monotonic() + within
    return CallContext(cid, deadline, TRACEPARENT, TRACESTATE)


async def test_a_call_made_while_serving_carries_the_inbound_id_deadline_and_trace(
    callees: Callees,
) -> None:
    client = callees.client()
    with serving(_inbound(within=2.0)):
        await client.call("echo", "op")
    seen = callees.echo.seen[-1]
    assert seen.correlation_id == "ux-cid-1"
    assert seen.metadata["x-correlation-id"] == "ux-cid-1"
    assert seen.metadata["traceparent"] == TRACEPARENT, "passed through unchanged"
    assert seen.metadata["tracestate"] == TRACESTATE
    assert seen.time_remaining is not None
    assert 1.5 < seen.time_remaining < 2.0, "what is left of the inbound deadline"

    # The hosted processor sees the same id (its result echoes the id it was given).
    with serving(_inbound("ux-cid-2")):
        result = await client.call("payment", "charge", {"customer_id": "c", "amount": 1})
    assert result["correlation_id"] == "ux-cid-2"


async def test_tasks_the_processor_starts_carry_the_context_too(callees: Callees) -> None:
    client = callees.client()
    with serving(_inbound("fan-out")):
        await asyncio.gather(*(client.call("echo", "op") for _ in range(3)))
        await asyncio.create_task(client.call("echo", "op"))
    assert [s.correlation_id for s in callees.echo.seen] == ["fan-out"] * 4


async def test_an_explicit_id_wins_and_outside_a_served_call_each_call_gets_its_own(
    callees: Callees,
) -> None:
    client = callees.client()
    with serving(_inbound("inbound")):
        await client.call("echo", "op", correlation_id="mine")
    await client.call("echo", "op")
    await client.call("echo", "op")
    first, second, third = callees.echo.seen
    assert first.correlation_id == "mine"
    assert second.correlation_id != third.correlation_id
    assert len(second.correlation_id) == 32
    assert "traceparent" not in second.metadata, "no trace headers are made up"


async def test_the_inbound_deadline_caps_even_an_explicit_timeout(callees: Callees) -> None:
    client = callees.client(settings=ClientSettings(deadline_margin=0.2))
    with serving(_inbound(within=0.5)):
        await client.call("echo", "op", timeout=5)
    capped = callees.echo.seen[-1].time_remaining
    assert capped is not None
    # gRPC's deadlines stray by some ms: a 20 ms tolerance.
    assert 0.2 < capped <= 0.5 - 0.2 + 0.02, "the inbound deadline less the margin"

    with serving(_inbound(within=None)):  # an inbound call without a deadline
        await client.call("echo", "op", timeout=5)
    kept = callees.echo.seen[-1].time_remaining
    assert kept is not None
    assert 4.5 < kept <= 5 + 0.05, "the call's own timeout"


async def test_an_inbound_deadline_already_spent_fails_at_once_without_calling(
    callees: Callees,
) -> None:
    client = callees.client()
    started = time.monotonic()
    with serving(_inbound(within=0.01)), pytest.raises(DeadlineExceeded, match="deadline"):
        await client.call("echo", "op")
    assert time.monotonic() - started < 0.1
    assert callees.echo.seen == [], "nothing is sent that could not be answered in time"


async def test_the_sync_client_carries_the_context_of_the_thread_that_calls_it(
    callees: Callees, tmp_path: Path
) -> None:
    plane, port = await create_server(fast_config(tmp_path))
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        register = registry_pb2.RegisterRequest(instance=callees.snapshot.snapshot.instances[0])
        register.instance.health_check_mode = registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY
        await registry_pb2_grpc.RegistryServiceStub(channel).Register(register)

        def sync_processor() -> str:
            # What a sync processor does in its worker thread, the context set there.
            with SyncMeshClient(f"127.0.0.1:{port}") as sync, serving(_inbound("in-thread")):
                return str(sync.call("echo", "op"))

        assert await asyncio.to_thread(sync_processor) == "{}"
    finally:
        await channel.close()
        await plane.stop(0.2)
    last = callees.echo.seen[-1]
    assert last.correlation_id == "in-thread"
    assert last.metadata["traceparent"] == TRACEPARENT


async def test_the_readme_mesh_example_runs_in_a_sidecar(tmp_path: Path) -> None:
    (block,) = [
        b for b in re.findall(r"```python\n(.*?)```", DOC, re.S) if "class CheckoutService(" in b
    ]
    module = types.ModuleType("readme_shop")
    exec(compile(block, "docs/sidecar.md", "exec"), module.__dict__)
    sys.modules["readme_shop"] = module
    plane, port = await create_server(fast_config(tmp_path))
    address = f"127.0.0.1:{port}"
    sidecars = [
        Sidecar(SidecarConfig(service=service, app=app, control_plane=address, instance_id=service))
        for service, app in (
            ("payment", "tests.sidecar.apps:PROCESSORS"),
            ("shop", "readme_shop:SHOP"),
        )
    ]
    client = MeshClient(address)
    try:
        for sidecar in sidecars:
            await sidecar.start()
        await client.start()
        assert await client.wait_for_instances("shop", 1, within=10)
        assert sidecars[1].client is not None
        assert await sidecars[1].client.wait_for_instances("payment", 1, within=10)
        reply = await client.call("shop", "checkout", {"customer_id": "c", "amount": 7})
        assert reply == {"paid": 7}
    finally:
        await client.aclose()
        for sidecar in sidecars:
            await sidecar.stop(0)
        await plane.stop(0.2)
        del sys.modules["readme_shop"]
