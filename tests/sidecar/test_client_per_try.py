"""Per-attempt timeouts: an instance that hangs leaves time to retry on another."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import duration_pb2

from flext_mesh import FlextResult, ServiceProcessor
from flext_mesh.cli.policy import describe_policy, policy_from_data
from flext_mesh.errors import DeadlineExceeded
from flext_mesh.hosting import ProcessorServicer
from flext_mesh.hosting.servicer import CallOutcome, add_processor_servicer
from flext_mesh.routing.policy import validate_policy
from flext_mesh.server import ControlPlane, create_server
from flext_mesh.v1 import registry_pb2
from sidecar.client import ClientSettings, MeshClient
from sidecar.config import SidecarConfig
from sidecar.main import Sidecar
from tests.registry.conftest import fast_config
from tests.sidecar.apps import PROCESSORS, Charge, ChargeRequest

CHARGE = {"customer_id": "c", "amount": 1}


class HangingCharge(ServiceProcessor[ChargeRequest, Charge, dict[str, Any]]):
    """A charge that never comes back in time: the instance hangs."""

    async def process(self, request: ChargeRequest) -> FlextResult[Charge]:
        await asyncio.sleep(60)
        return FlextResult[Charge].ok(Charge(**request.model_dump()))

    def build(self, charge: Charge, *, correlation_id: str) -> dict[str, Any]:
        return {"charged": charge.amount}


class SlowCharge(HangingCharge):
    """A charge that takes half a second."""

    async def process(self, request: ChargeRequest) -> FlextResult[Charge]:
        await asyncio.sleep(0.5)
        return FlextResult[Charge].ok(Charge(**request.model_dump()))


HANGING = {"charge": HangingCharge()}


# -- with real sidecars -------------------------------------------------------------------


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    control, _ = await create_server(fast_config(tmp_path))
    try:
        yield control
    finally:
        await control.stop(0.2)


async def _sidecar(plane: ControlPlane, name: str, app: str) -> Sidecar:
    sidecar = Sidecar(
        SidecarConfig(
            service="payment",
            app=app,
            control_plane=f"127.0.0.1:{plane.port}",
            instance_id=name,
            ttl=5.0,
        )
    )
    await sidecar.start()
    return sidecar


async def test_one_hung_instance_of_three_fails_no_call_at_50_per_second(
    plane: ControlPlane,
) -> None:
    sidecars = [
        await _sidecar(plane, "hung", "tests.sidecar.test_client_per_try:HANGING"),
        await _sidecar(plane, "ok-1", "tests.sidecar.apps:PROCESSORS"),
        await _sidecar(plane, "ok-2", "tests.sidecar.apps:PROCESSORS"),
    ]
    # A 1 s deadline: each attempt gets 1/3 s while an untried instance is left.
    client = MeshClient(f"127.0.0.1:{plane.port}", settings=ClientSettings(default_timeout=1.0))
    try:
        await client.start()
        assert await client.wait_for_instances("payment", 3, within=10)
        outcomes: list[str] = []
        durations: list[float] = []

        async def one() -> None:
            started = time.monotonic()
            try:
                await client.call("payment", "charge", CHARGE)
            except Exception as exc:
                outcomes.append(type(exc).__name__)
            else:
                outcomes.append("ok")
            durations.append(time.monotonic() - started)

        tasks = []
        started = time.monotonic()
        for i in range(150):  # 50 calls per second for 3 s
            tasks.append(asyncio.create_task(one()))
            await asyncio.sleep(max(0.0, started + (i + 1) / 50 - time.monotonic()))
        await asyncio.gather(*tasks)
        failed = [o for o in outcomes if o != "ok"]
        assert failed == [], f"{len(failed)} of 150 calls failed: {sorted(set(failed))}"
        assert max(durations) < 1.0, "every call answered within its deadline"
        assert client.breaker_state("payment", "hung") in {"OPEN", "HALF_OPEN"}
    finally:
        await client.aclose()
        for sidecar in sidecars:
            await sidecar.stop(0)


# -- with instances served in this process -----------------------------------------------


class Instances:
    """Instances of ``payment`` served in this process, each with its own processors."""

    def __init__(self) -> None:
        #: Calls served, by instance id.
        self.served: Counter[str] = Counter()
        self.servers: list[tuple[grpc.aio.Server, ProcessorServicer]] = []
        self.instances: list[registry_pb2.ServiceInstance] = []
        self.clients: list[MeshClient] = []

    async def start(
        self, instance_id: str, processors: Mapping[str, ServiceProcessor[Any, Any, Any]]
    ) -> None:
        def served(outcome: CallOutcome) -> None:
            self.served[instance_id] += 1

        servicer = ProcessorServicer(
            processors, service_name="payment", instance_id=instance_id, on_call=served
        )
        server = grpc.aio.server()
        add_processor_servicer(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self.servers.append((server, servicer))
        self.instances.append(
            registry_pb2.ServiceInstance(
                service_name="payment",
                instance_id=instance_id,
                endpoint=f"127.0.0.1:{port}",
                weight=100,
                health=registry_pb2.HEALTH_STATUS_SERVING,
                effective_weight=100.0,
            )
        )

    def client(self, policy: registry_pb2.ServicePolicy | None = None, **kwargs: Any) -> MeshClient:
        """A client fed the instances (and ``policy``) as a Watch snapshot."""
        client = MeshClient("127.0.0.1:1", **kwargs)
        client._apply(
            registry_pb2.WatchResponse(
                snapshot=registry_pb2.WatchSnapshot(
                    instances=self.instances, policies=[policy] if policy else []
                ),
                revision=1,
            )
        )
        self.clients.append(client)
        return client

    async def aclose(self) -> None:
        for client in self.clients:
            await client.aclose()
        for server, servicer in self.servers:
            await server.stop(0)
            servicer.close()


@pytest.fixture
async def fleet() -> AsyncIterator[Instances]:
    instances = Instances()
    try:
        yield instances
    finally:
        await instances.aclose()


def _seconds(value: float) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(round(value * 1e9))
    return duration


async def test_a_pushed_per_try_timeout_is_retried_even_when_deadlines_are_not(
    fleet: Instances,
) -> None:
    await fleet.start("a-hung", HANGING)
    await fleet.start("b-ok", PROCESSORS)
    policy = registry_pb2.ServicePolicy(service_name="payment", version=1)
    policy.default_timeout.CopyFrom(_seconds(5))
    policy.retry.per_try_timeout.CopyFrom(_seconds(0.1))
    policy.retry.retryable_codes.append("UNAVAILABLE")  # DEADLINE_EXCEEDED is not listed
    client = fleet.client(policy)
    for _ in range(6):  # round robin: every other call tries the hung instance first
        started = time.monotonic()
        assert (await client.call("payment", "charge", CHARGE))["charged"] == 1
        assert time.monotonic() - started < 1.0, "0.1 s on the hung one, then the other"


async def test_the_last_attempt_gets_what_is_left_and_one_instance_keeps_its_deadline(
    fleet: Instances,
) -> None:
    await fleet.start("slow-1", {"charge": SlowCharge()})
    client = fleet.client()
    # Alone, the instance gets the whole second, not a third of it.
    assert (await client.call("payment", "charge", CHARGE, timeout=1.0))["charged"] == 1

    await fleet.start("slow-2", {"charge": SlowCharge()})
    client = fleet.client()
    # Two slow instances: the first attempt is cut at 1/3 s, the second (the last
    # untried instance) gets the 2/3 s left and answers in its 0.5 s.
    for _ in range(2):
        assert (await client.call("payment", "charge", CHARGE, timeout=1.0))["charged"] == 1
    # A per-try timeout that is set applies to every attempt but the last, untried
    # instance left or not: 0.2 s, 0.2 s, then too little of the 0.6 s for 0.5 s.
    strict = fleet.client(settings=ClientSettings(per_try_timeout=0.2))
    with pytest.raises(DeadlineExceeded):
        await strict.call("payment", "charge", CHARGE, timeout=0.6)


def test_a_per_try_timeout_out_of_range_is_refused_naming_the_field() -> None:
    for bad in (0.0001, 7200.0):
        policy = registry_pb2.ServicePolicy(service_name="payment")
        policy.retry.per_try_timeout.CopyFrom(_seconds(bad))
        problems = validate_policy(policy)
        assert [p.field for p in problems] == ["policy.retry.per_try_timeout"]
        assert "between 0.001 s and 3600 s" in problems[0].description
    with pytest.raises(ValueError, match="per_try_timeout must be finite and > 0"):
        ClientSettings(per_try_timeout=0)


def test_operators_set_it_in_a_policy_file_and_see_it_in_policy_show() -> None:
    policy = policy_from_data({"retry": {"per_try_timeout": "300ms"}}, "payment")
    assert policy.retry.per_try_timeout.ToMilliseconds() == 300
    assert validate_policy(policy) == []
    assert "per_try_timeout=300ms" in describe_policy(policy)
