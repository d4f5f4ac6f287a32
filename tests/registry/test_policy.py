"""Service policies in the control plane: validation, storage, Watch push, Discover."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.hosting import ProcessorServicer
from flext_mesh.hosting.servicer import add_processor_servicer
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.server import create_server
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from tests.orchestrator.apps import processors
from tests.registry.conftest import Mesh, eventually, fast_config, start_health_endpoint


def policy(**fields: Any) -> registry_pb2.ServicePolicy:
    return registry_pb2.ServicePolicy(service_name="payment", **fields)


def splits(**weights: int) -> list[registry_pb2.VersionSplit]:
    return [registry_pb2.VersionSplit(version=v, weight=w) for v, w in weights.items()]


async def put(mesh: Mesh, value: registry_pb2.ServicePolicy, expected: int = 0) -> Any:
    return (
        await mesh.stub.PutServicePolicy(
            registry_pb2.PutServicePolicyRequest(policy=value, expected_version=expected)
        )
    ).policy


async def failure(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def discover(mesh: Mesh, **fields: Any) -> registry_pb2.DiscoverResponse:
    return await mesh.stub.Discover(registry_pb2.DiscoverRequest(service_name="payment", **fields))


@pytest.fixture
async def versions(mesh: Mesh) -> Mesh:
    """payment: p1 (v1, zone a), p2 (v1, zone b), p3 (v2, zone a)."""
    await mesh.register("payment", "p1", version="v1", zone="a")
    await mesh.register("payment", "p2", version="v1", zone="b")
    await mesh.register("payment", "p3", version="v2", zone="a")
    return mesh


async def test_a_policy_is_stored_versioned_and_read_back(versions: Mesh) -> None:
    first = await put(versions, policy(splits=splits(v1=90, v2=10)))
    assert (first.version, first.revision > 0) == (1, True)
    second = await put(versions, policy(splits=splits(v1=50, v2=50)), expected=1)
    assert second.version == 2
    got = await versions.stub.GetServicePolicy(
        registry_pb2.GetServicePolicyRequest(service_name="payment")
    )
    assert [(s.version, s.weight) for s in got.policy.splits] == [("v1", 50), ("v2", 50)]
    stale = await failure(put(versions, policy(), expected=1))
    assert stale.code() is grpc.StatusCode.FAILED_PRECONDITION
    await versions.stub.DeleteServicePolicy(
        registry_pb2.DeleteServicePolicyRequest(service_name="payment")
    )
    gone = await failure(
        versions.stub.GetServicePolicy(registry_pb2.GetServicePolicyRequest(service_name="payment"))
    )
    assert gone.code() is grpc.StatusCode.NOT_FOUND


async def test_a_bad_policy_names_every_field_and_the_previous_one_stays(versions: Mesh) -> None:
    await put(versions, policy(splits=splits(v1=100)))
    bad = policy(
        splits=splits(v1=60, v9=30),
        panic_threshold_percent=150,
        retry={"max_attempts": 20, "retryable_codes": ["NOT_FOUND"]},
        circuit_breaker={"sliding_window_size": 10, "minimum_calls": 50},
        zone={"enabled": True, "min_healthy_percent": -1},
    )
    bad.default_timeout.FromSeconds(7200)
    error = from_rpc_error(await failure(put(versions, bad)))
    fields = {v.field for v in error.violations}  # type: ignore[attr-defined]
    assert fields == {
        "policy.splits",
        "policy.splits[1].version",
        "policy.panic_threshold_percent",
        "policy.retry.max_attempts",
        "policy.retry.retryable_codes[0]",
        "policy.circuit_breaker.minimum_calls",
        "policy.zone.min_healthy_percent",
        "policy.default_timeout",
    }
    assert "no instance of 'payment' has version 'v9'" in error.message
    kept = await versions.stub.GetServicePolicy(
        registry_pb2.GetServicePolicyRequest(service_name="payment")
    )
    assert (kept.policy.version, [s.version for s in kept.policy.splits]) == (1, ["v1"])


async def test_a_split_is_followed_exactly_by_discover(versions: Mesh) -> None:
    await put(versions, policy(splits=splits(v1=90, v2=10)))
    picked = Counter()
    for _ in range(100):
        answer = await discover(versions)
        picked[answer.selected_version] += 1
        assert {i.version for i in answer.instances} == {answer.selected_version}
    assert picked == {"v1": 90, "v2": 10}


async def test_a_split_version_without_healthy_instance_falls_back_and_says_so(
    versions: Mesh,
) -> None:
    await put(versions, policy(splits=splits(v1=50, v2=50)))
    await versions.stub.Deregister(
        registry_pb2.DeregisterRequest(service_name="payment", instance_id="p3")
    )
    answers = [await discover(versions) for _ in range(4)]
    fallbacks = [a for a in answers if a.split_fallback]
    assert len(fallbacks) == 2
    for answer in fallbacks:
        assert answer.selected_version == "v2"
        assert {i.instance_id for i in answer.instances} == {"p1", "p2"}
        assert any("falling back" in note for note in answer.notes)
    metrics = versions.plane.observability.render().decode()
    assert 'flext_mesh_discover_split_fallbacks_total{service="payment",version="v2"} 2.0' in (
        metrics
    )


async def test_zone_preference_keeps_traffic_local_then_spills_over(versions: Mesh) -> None:
    await put(versions, policy(zone={"enabled": True}))
    local = await discover(versions, caller_zone="a")
    assert {i.instance_id for i in local.instances} == {"p1", "p3"}
    assert not local.zone_spillover
    elsewhere = await discover(versions, caller_zone="b")
    assert [i.instance_id for i in elsewhere.instances] == ["p2"]
    # Zone b loses its only instance: callers there spill over to zone a.
    await versions.stub.Deregister(
        registry_pb2.DeregisterRequest(service_name="payment", instance_id="p2")
    )
    spilled = await discover(versions, caller_zone="b")
    assert spilled.zone_spillover
    assert {i.instance_id for i in spilled.instances} == {"p1", "p3"}
    no_zone = await discover(versions)
    assert len(no_zone.instances) == 2


async def test_the_policy_strategy_and_panic_threshold_apply_to_discover(versions: Mesh) -> None:
    await put(
        versions,
        policy(
            strategy=registry_pb2.LOAD_BALANCING_STRATEGY_HIGHEST_UPTIME,
            panic_threshold_percent=0,
        ),
    )
    answer = await discover(versions)
    assert answer.strategy == registry_pb2.LOAD_BALANCING_STRATEGY_HIGHEST_UPTIME
    explicit = await discover(versions, strategy=registry_pb2.LOAD_BALANCING_STRATEGY_RANDOM)
    assert explicit.strategy == registry_pb2.LOAD_BALANCING_STRATEGY_RANDOM


async def test_policies_travel_over_watch_with_revisions(versions: Mesh) -> None:
    stream = versions.stub.Watch(registry_pb2.WatchRequest(service_names=["payment"]))
    first = await stream.read()
    assert list(first.snapshot.policies) == []
    stored = await put(versions, policy(splits=splits(v1=90, v2=10)))
    message = await stream.read()
    [event] = message.events
    assert event.type == registry_pb2.WATCH_EVENT_TYPE_POLICY_PUT
    assert (event.policy.version, event.revision) == (1, stored.revision)
    await versions.stub.DeleteServicePolicy(
        registry_pb2.DeleteServicePolicyRequest(service_name="payment")
    )
    deleted = await stream.read()
    assert deleted.events[0].type == registry_pb2.WATCH_EVENT_TYPE_POLICY_DELETED
    stream.cancel()
    # A watcher resuming from before the put replays both changes from history.
    replay = versions.stub.Watch(
        registry_pb2.WatchRequest(service_names=["payment"], from_revision=first.revision)
    )
    replayed = await replay.read()
    assert [e.type for e in replayed.events] == [
        registry_pb2.WATCH_EVENT_TYPE_POLICY_PUT,
        registry_pb2.WATCH_EVENT_TYPE_POLICY_DELETED,
    ]
    replay.cancel()
    await put(versions, policy(splits=splits(v1=100)))
    fresh = versions.stub.Watch(registry_pb2.WatchRequest(service_names=["payment"]))
    snapshot = (await fresh.read()).snapshot
    assert [p.version for p in snapshot.policies] == [1]  # a deleted policy starts over
    fresh.cancel()


async def test_a_policy_survives_a_restart(tmp_path: Path) -> None:
    plane, port = await create_server(fast_config(tmp_path))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        await stub.PutServicePolicy(
            registry_pb2.PutServicePolicyRequest(policy=policy(panic_threshold_percent=10))
        )
    await plane.stop(0)
    plane, port = await create_server(fast_config(tmp_path))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            got = await stub.GetServicePolicy(
                registry_pb2.GetServicePolicyRequest(service_name="payment")
            )
        assert (got.policy.version, got.policy.panic_threshold_percent) == (1, 10)
    finally:
        await plane.stop(0)


@pytest.fixture
async def served(mesh: Mesh) -> AsyncIterator[Mesh]:
    """payment served by a real ProcessorService (operations charge, refund, ledger)."""
    servicer = ProcessorServicer(processors("payment", "charge", "refund"), service_name="payment")
    server = grpc.aio.server()
    add_processor_servicer(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    await mesh.register("payment", "p1", endpoint=f"127.0.0.1:{port}", version="v1")
    try:
        yield mesh
    finally:
        await server.stop(0)
        servicer.close()


async def test_operation_timeouts_must_name_operations_the_service_serves(served: Mesh) -> None:
    good = policy()
    good.operation_timeouts["charge"].FromMilliseconds(500)
    assert (await put(served, good)).operation_timeouts["charge"].ToMilliseconds() == 500
    bad = policy()
    bad.operation_timeouts["chrage"].FromMilliseconds(500)
    error = from_rpc_error(await failure(put(served, bad)))
    assert [v.field for v in error.violations] == ["policy.operation_timeouts['chrage']"]  # type: ignore[attr-defined]
    assert "known: charge, ledger, refund" in error.message


async def test_a_policy_tunes_outlier_ejection_of_its_service_only(mesh: Mesh) -> None:
    for service in ("payment", "inventory"):
        for name in ("a", "b"):
            await mesh.register(service, f"{service}-{name}")
    await put(
        mesh,
        policy(outlier_detection={"consecutive_failures": 2, "max_ejection_percent": 50}),
    )
    registry = mesh.plane.registry
    for _ in range(2):
        await registry.record_call("payment", "payment-a", infrastructure_failure=True)
        await registry.record_call("inventory", "inventory-a", infrastructure_failure=True)
    assert (await mesh.instances("payment"))["payment-a"].ejected  # 2 failures: its policy
    assert not (await mesh.instances("inventory"))["inventory-a"].ejected  # default: 5


async def test_a_policy_tunes_active_health_checks_of_its_service(mesh: Mesh) -> None:
    endpoint = await start_health_endpoint()
    try:
        await mesh.register(
            "payment",
            "checked",
            endpoint=endpoint.endpoint,
            mode=registry_pb2.HEALTH_CHECK_MODE_GRPC,
        )
        # The flags (fast_config) turn an instance NOT_SERVING after 2 failed checks
        # 0.2 s apart; this service's policy asks for 50 failures in a row.
        tolerant = policy(health_check={"unhealthy_threshold": 50})
        await put(mesh, tolerant)
        await endpoint.set(False)
        await asyncio.sleep(1.5)
        health = (await mesh.instances("payment"))["checked"].health
        assert health != registry_pb2.HEALTH_STATUS_NOT_SERVING
        await mesh.stub.DeleteServicePolicy(
            registry_pb2.DeleteServicePolicyRequest(service_name="payment")
        )

        async def not_serving() -> bool:
            health = (await mesh.instances("payment"))["checked"].health
            return health == registry_pb2.HEALTH_STATUS_NOT_SERVING

        await eventually(not_serving, within=5)  # back on the flags' settings
    finally:
        await endpoint.server.stop(0)
