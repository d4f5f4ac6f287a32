"""Traffic policy end to end: a real control plane, real sidecars, pushed policies.

payment runs as two sidecars, ``pay-a`` (version v1, zone a) and ``pay-b`` (v2, zone
b); two ``shop`` sidecars (zone a) call payment through their own mesh clients, and
the test process calls through a MeshClient too. Policies are set with
PutServicePolicy and must be followed by every caller, without restarts.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.errors import DeadlineExceeded, MeshError
from flext_mesh.rpc.payloads import dict_to_struct, struct_to_dict
from flext_mesh.v1 import processor_pb2, processor_pb2_grpc, registry_pb2, registry_pb2_grpc
from sidecar.client import MeshClient
from tests.conftest import ServeProcess, start_serve
from tests.registry.conftest import eventually
from tests.sidecar.test_sidecar_process import SidecarProcess, start_sidecar

pytestmark = pytest.mark.xdist_group("traffic_policy")

APPS = "tests.integration.policy_apps"


@dataclass
class Mesh:
    tmp: Path
    plane: ServeProcess
    payment: dict[str, SidecarProcess]
    shops: list[SidecarProcess]

    def put(self, **fields: Any) -> registry_pb2.ServicePolicy:
        policy = registry_pb2.ServicePolicy(service_name="payment", **fields)
        with grpc.insecure_channel(self.plane.address) as channel:
            return (
                registry_pb2_grpc.RegistryServiceStub(channel)
                .PutServicePolicy(registry_pb2.PutServicePolicyRequest(policy=policy), timeout=10)
                .policy
            )

    def delete(self) -> None:
        with grpc.insecure_channel(self.plane.address) as channel:
            try:
                registry_pb2_grpc.RegistryServiceStub(channel).DeleteServicePolicy(
                    registry_pb2.DeleteServicePolicyRequest(service_name="payment"), timeout=10
                )
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.NOT_FOUND:
                    raise


def buy(shop: SidecarProcess, operation: str = "charge", **payload: Any) -> dict[str, Any]:
    """What ``shop`` got calling payment through its sidecar's mesh client."""
    with grpc.insecure_channel(shop.address) as channel:
        reply = processor_pb2_grpc.ProcessorServiceStub(channel).Invoke(
            processor_pb2.InvokeRequest(
                operation="buy",
                payload=dict_to_struct({"operation": operation, "payload": payload}),
            ),
            timeout=10,
        )
    result: dict[str, Any] = struct_to_dict(reply.result)
    return result


def _until(check: Any, within: float = 15.0) -> float:
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < within, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    tmp = tmp_path_factory.mktemp("policy")
    plane = start_serve(tmp, "--health-check-interval", "0.5")
    started: list[SidecarProcess] = []
    try:
        payment = {}
        for name, version, zone in (("pay-a", "v1", "a"), ("pay-b", "v2", "b")):
            payment[name] = start_sidecar(
                tmp,
                plane.address,
                "--service",
                "payment",
                "--instance-id",
                name,
                "--version",
                version,
                "--zone",
                zone,
                app=f"{APPS}:PAYMENT",
                env={"POLICY_INSTANCE": name, "POLICY_VERSION": version},
            )
            started.append(payment[name])
        shops = []
        for name in ("shop-1", "shop-2"):
            shops.append(
                start_sidecar(
                    tmp,
                    plane.address,
                    "--service",
                    "shop",
                    "--instance-id",
                    name,
                    "--zone",
                    "a",
                    app=f"{APPS}:SHOP",
                )
            )
            started.append(shops[-1])
        mesh = Mesh(tmp, plane, payment, shops)
        # Both shops see both payment instances before the tests start.
        _until(lambda: all(len({buy(s)["instance"] for _ in range(4)}) == 2 for s in shops))
        yield mesh
    finally:
        for sidecar in started:
            if sidecar.proc.poll() is None:
                sidecar.proc.kill()
        plane.kill()


@pytest.fixture
async def client(mesh: Mesh) -> AsyncIterator[MeshClient]:
    mesh.delete()
    async with MeshClient(mesh.plane.address, caller_service="test", zone="a") as client:
        assert await client.wait_for_instances("payment", 2)
        yield client
    mesh.delete()


async def test_a_90_10_split_is_observed_over_2000_calls(mesh: Mesh, client: MeshClient) -> None:
    mesh.put(
        splits=[
            registry_pb2.VersionSplit(version="v1", weight=90),
            registry_pb2.VersionSplit(version="v2", weight=10),
        ]
    )

    async def applied() -> bool:
        policy = client.policy("payment")
        return policy is not None and len(policy.splits) == 2

    await eventually(applied, within=5)
    versions: Counter[str] = Counter()
    for _ in range(2000):
        versions[(await client.call("payment", "charge", {}))["version"]] += 1
    assert abs(versions["v2"] / 2000 - 0.10) <= 0.03, versions
    assert versions["v1"] + versions["v2"] == 2000


def test_a_new_split_is_followed_by_every_sidecar_within_a_second(mesh: Mesh) -> None:
    mesh.put(splits=[registry_pb2.VersionSplit(version="v1", weight=100)])
    for shop in mesh.shops:
        _until(lambda shop=shop: buy(shop)["version"] == "v1", within=5)
    mesh.put(
        splits=[
            registry_pb2.VersionSplit(version="v1", weight=0),
            registry_pb2.VersionSplit(version="v2", weight=100),
        ]
    )
    changed = time.monotonic()
    for shop in mesh.shops:
        _until(lambda shop=shop: buy(shop)["version"] == "v2", within=5)
    assert time.monotonic() - changed < 1.0
    # And it stays there: no call goes back to v1.
    assert {buy(shop)["version"] for shop in mesh.shops for _ in range(10)} == {"v2"}


def test_a_timeout_policy_cuts_a_slow_operation(mesh: Mesh) -> None:
    shop = mesh.shops[0]
    assert "error" not in buy(shop, "slow", seconds=0.4)  # the flags allow 10 s
    timeout = registry_pb2.ServicePolicy()
    timeout.operation_timeouts["slow"].FromMilliseconds(150)
    mesh.put(operation_timeouts=timeout.operation_timeouts)
    _until(lambda: buy(shop, "slow", seconds=0.4).get("error") == "DEADLINE_EXCEEDED", within=5)
    cut = buy(shop, "slow", seconds=0.4)
    assert cut["error"] == "DEADLINE_EXCEEDED"
    assert cut["seconds"] < 0.35
    assert "error" not in buy(shop, "charge")  # other operations keep the default


async def test_retries_follow_the_pushed_status_codes(mesh: Mesh, client: MeshClient) -> None:
    with pytest.raises(MeshError) as refused:
        await client.call("payment", "flaky", {"key": "before"})
    assert refused.value.code is grpc.StatusCode.ABORTED  # not retried by default
    mesh.put(retry={"max_attempts": 3, "retryable_codes": ["ABORTED", "UNAVAILABLE"]})

    async def pushed() -> bool:
        policy = client.policy("payment")
        return policy is not None and "ABORTED" in policy.retry.retryable_codes

    await eventually(pushed, within=5)
    result = await client.call("payment", "flaky", {"key": "after"})
    assert result["calls"] == 2  # the first attempt was ABORTED and retried


def test_zone_preference_keeps_traffic_local_and_spills_over(mesh: Mesh) -> None:
    mesh.put(zone={"enabled": True, "min_healthy_percent": 50})
    shop = mesh.shops[0]
    _until(lambda: {buy(shop)["instance"] for _ in range(6)} == {"pay-a"}, within=5)
    mesh.payment["pay-a"].proc.kill()  # zone a loses its only payment instance
    _until(lambda: buy(shop).get("instance") == "pay-b", within=15)
    assert {buy(shop).get("instance") for _ in range(10)} == {"pay-b"}


def test_the_last_policy_applies_while_the_control_plane_is_down(mesh: Mesh) -> None:
    shop = mesh.shops[1]
    timeout = registry_pb2.ServicePolicy()
    timeout.operation_timeouts["slow"].FromMilliseconds(150)
    mesh.put(operation_timeouts=timeout.operation_timeouts)
    _until(lambda: buy(shop, "slow", seconds=0.4).get("error") == "DEADLINE_EXCEEDED", within=5)
    mesh.plane.kill()
    time.sleep(0.5)
    for _ in range(3):
        cut = buy(shop, "slow", seconds=0.4)
        # Cut by the policy's 150 ms, never the 0.4 s the operation takes; once those
        # deadline expiries opened the breakers of 'slow' (slower runs of this test make
        # more of them), refused at once, which the same policy caused.
        refused = "open circuit breaker for 'slow'" in str(cut.get("message", ""))
        assert cut.get("error") == DeadlineExceeded.grpc_status_code.name or refused, cut
        assert cut["seconds"] < 0.4, cut
    assert buy(shop, "charge").get("version") in {"v1", "v2"}
