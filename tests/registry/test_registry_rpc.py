"""RegistryService over real gRPC: leases, discovery, health, ejection, watch."""

from __future__ import annotations

import asyncio
import collections
import time
from pathlib import Path

import grpc
import pytest

from flext_mesh.errors import FieldViolation, InvalidArgument
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.server import create_server
from flext_mesh.store.sqlite import SqliteStore
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from tests.registry.conftest import Mesh, eventually, fast_config, start_health_endpoint

HS = registry_pb2.HealthStatus
WE = registry_pb2.WatchEventType


async def test_register_returns_instance_lease_and_revision(mesh: Mesh) -> None:
    reply = await mesh.register("payment", "p1", version="1.2.0", weight=250, ttl=12)
    assert reply.instance.instance_id == "p1"
    assert reply.instance.weight == 250
    assert reply.instance.effective_weight == 250
    assert reply.instance.health == HS.HEALTH_STATUS_SERVING  # TTL-only: the lease is health
    assert reply.lease.lease_id == reply.instance.lease_id
    assert reply.lease.ttl.seconds == 12
    assert reply.revision > 0


async def test_a_generated_instance_id_and_default_weight_and_ttl(mesh: Mesh) -> None:
    request = registry_pb2.RegisterRequest(
        instance=registry_pb2.ServiceInstance(service_name="billing", endpoint="10.0.0.7:8080")
    )
    reply = await mesh.stub.Register(request)
    assert reply.instance.instance_id.startswith("billing-")
    assert reply.instance.weight == 100
    assert reply.lease.ttl.seconds == 10
    assert reply.instance.health == HS.HEALTH_STATUS_UNKNOWN  # not checked yet


async def test_registering_the_same_instance_again_replaces_it_and_its_lease(
    mesh: Mesh,
) -> None:
    first = await mesh.register("payment", "p1", endpoint="127.0.0.1:7001")
    second = await mesh.register("payment", "p1", endpoint="127.0.0.1:7002")
    instances = await mesh.instances("payment")
    assert list(instances) == ["p1"]
    assert instances["p1"].endpoint == "127.0.0.1:7002"
    assert second.lease.lease_id != first.lease.lease_id
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.stub.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=first.lease.lease_id))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


async def test_bad_registration_names_every_bad_field(mesh: Mesh) -> None:
    request = registry_pb2.RegisterRequest(
        instance=registry_pb2.ServiceInstance(
            service_name="",
            instance_id="bad id!",
            endpoint="nonsense",
            weight=20_000,
            labels={f"k{i}": "v" for i in range(40)},
        )
    )
    request.ttl.FromSeconds(7200)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.stub.Register(request)
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    err = from_rpc_error(info.value)
    assert isinstance(err, InvalidArgument)
    fields = {v.field for v in err.violations}
    assert fields == {
        "instance.service_name",
        "instance.instance_id",
        "instance.endpoint",
        "instance.weight",
        "instance.labels",
        "ttl",
    }


@pytest.mark.parametrize(
    ("endpoint", "problem"),
    [
        ("127.0.0.1:0", "outside 1..65535"),
        ("127.0.0.1:65536", "outside 1..65535"),
        ("host-only", "is not host:port"),
        (":8080", "is not host:port"),
        ("bad_host!:80", "is not a DNS name"),
    ],
)
async def test_endpoints_must_be_host_and_port(mesh: Mesh, endpoint: str, problem: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.register("payment", "p1", endpoint=endpoint)
    err = from_rpc_error(info.value)
    assert isinstance(err, InvalidArgument)
    assert [v.field for v in err.violations] == ["instance.endpoint"]
    assert problem in err.violations[0].description


@pytest.mark.parametrize("seconds", [0.5, 3601])
async def test_ttl_outside_one_second_to_one_hour_is_refused(mesh: Mesh, seconds: float) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.register("payment", "p1", ttl=seconds)
    err = from_rpc_error(info.value)
    assert isinstance(err, InvalidArgument)
    assert err.violations == (
        FieldViolation("ttl", f"must be between 1s and 1h, got {seconds:g}s"),
    )


async def test_an_unrenewed_lease_expires_within_ttl_plus_one_second(mesh: Mesh) -> None:
    registered = time.monotonic()
    await mesh.register("payment", "short", ttl=1.0)
    kept = await mesh.register("payment", "renewed", ttl=1.0)

    async def gone() -> bool:
        await mesh.stub.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=kept.lease.lease_id))
        return "short" not in await mesh.instances("payment")

    await eventually(gone, within=5)
    assert time.monotonic() - registered <= 2.0 + 0.5  # TTL + 1 s, + slack for a loaded CI
    assert "renewed" in await mesh.instances("payment")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.stub.Heartbeat(registry_pb2.HeartbeatRequest(lease_id="no-such-lease"))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


async def test_keep_alive_stream_renews_many_leases_and_lists_expired_ones(mesh: Mesh) -> None:
    leases = [(await mesh.register("svc", f"i{i}", ttl=1.0)).lease.lease_id for i in range(5)]
    stream = mesh.stub.KeepAlive()
    for _ in range(8):  # 2 s of renewals every 0.25 s: twice the TTL
        await stream.write(registry_pb2.KeepAliveRequest(lease_ids=[*leases, "unknown"]))
        reply = await stream.read()
        assert sorted(lease.lease_id for lease in reply.leases) == sorted(leases)
        assert list(reply.expired_lease_ids) == ["unknown"]
        await asyncio.sleep(0.25)
    await stream.done_writing()
    assert len(await mesh.instances("svc")) == 5


async def test_deregister_removes_at_once_and_unknown_is_not_found(mesh: Mesh) -> None:
    await mesh.register("payment", "p1")
    await mesh.stub.Deregister(
        registry_pb2.DeregisterRequest(service_name="payment", instance_id="p1")
    )
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.stub.Discover(registry_pb2.DiscoverRequest(service_name="payment"))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.stub.Deregister(
            registry_pb2.DeregisterRequest(service_name="payment", instance_id="p1")
        )
    assert info.value.code() is grpc.StatusCode.NOT_FOUND


async def test_weighted_round_robin_gives_each_instance_its_share(mesh: Mesh) -> None:
    for instance_id, weight in (("a", 100), ("b", 200), ("c", 300)):
        await mesh.register("payment", instance_id, weight=weight)
    firsts = collections.Counter()
    for _ in range(600):
        reply = await mesh.stub.Discover(registry_pb2.DiscoverRequest(service_name="payment"))
        assert len(reply.instances) == 3
        firsts[reply.instances[0].instance_id] += 1
    assert abs(firsts["a"] - 100) <= 1
    assert abs(firsts["b"] - 200) <= 1
    assert abs(firsts["c"] - 300) <= 1


async def test_discover_by_type_and_labels_and_strategies(mesh: Mesh) -> None:
    await mesh.register("pay-eu", "e1", type="payment", labels={"zone": "eu"}, weight=10)
    await mesh.register("pay-us", "u1", type="payment", labels={"zone": "us"}, weight=10)
    await mesh.register("mail", "m1", type="email")
    by_type = await mesh.stub.Discover(registry_pb2.DiscoverRequest(type="payment"))
    assert {i.instance_id for i in by_type.instances} == {"e1", "u1"}
    eu = await mesh.stub.Discover(
        registry_pb2.DiscoverRequest(type="payment", label_selector={"zone": "eu"})
    )
    assert [i.instance_id for i in eu.instances] == ["e1"]
    for strategy in registry_pb2.LoadBalancingStrategy.values()[1:]:
        reply = await mesh.stub.Discover(
            registry_pb2.DiscoverRequest(type="payment", strategy=strategy, limit=1)
        )
        assert reply.strategy == strategy
        assert len(reply.instances) == 1


async def test_discover_bad_requests(mesh: Mesh) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.stub.Discover(registry_pb2.DiscoverRequest())
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.stub.Discover(registry_pb2.DiscoverRequest(service_name="ghost"))
    assert info.value.code() is grpc.StatusCode.NOT_FOUND
    await mesh.register("payment", "p1")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await mesh.stub.Discover(
            registry_pb2.DiscoverRequest(service_name="payment", strategy=42)  # type: ignore[arg-type]
        )
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_list_services_counts_and_pages(mesh: Mesh) -> None:
    for i in range(5):
        await mesh.register(f"svc-{i}", "a", version=f"{i}.0")
    await mesh.register("svc-0", "b", version="0.1")
    page = await mesh.stub.ListServices(registry_pb2.ListServicesRequest(page_size=2))
    names = [s.service_name for s in page.services]
    while page.next_page_token:
        page = await mesh.stub.ListServices(
            registry_pb2.ListServicesRequest(page_size=2, page_token=page.next_page_token)
        )
        names += [s.service_name for s in page.services]
    assert names == [f"svc-{i}" for i in range(5)]
    full = await mesh.stub.ListServices(registry_pb2.ListServicesRequest())
    first = full.services[0]
    assert (first.instance_count, first.healthy_count) == (2, 2)
    assert list(first.versions) == ["0.0", "0.1"]


async def test_active_checks_mark_stopped_and_hung_instances_and_bring_them_back(
    mesh: Mesh,
) -> None:
    good = await start_health_endpoint()
    flaky = await start_health_endpoint()
    hung = await start_health_endpoint(hung=True)
    try:
        for name, ep in (("good", good), ("flaky", flaky), ("hung", hung)):
            await mesh.register("api", name, endpoint=ep.endpoint, mode=0)

        async def status(name: str) -> int:
            return (await mesh.instances("api"))[name].health

        async def settled() -> bool:
            states = {n: await status(n) for n in ("good", "flaky", "hung")}
            return states == {
                "good": HS.HEALTH_STATUS_SERVING,
                "flaky": HS.HEALTH_STATUS_SERVING,
                "hung": HS.HEALTH_STATUS_NOT_SERVING,
            }

        await eventually(settled)
        port = flaky.port
        await flaky.server.stop(0)  # the process died but its lease lives on

        async def flaky_down() -> bool:
            return await status("flaky") == HS.HEALTH_STATUS_NOT_SERVING

        await eventually(flaky_down)
        healthy = await mesh.stub.Discover(registry_pb2.DiscoverRequest(service_name="api"))
        # 1 of 3 healthy is below the 50% panic threshold: all are returned, and said so.
        assert healthy.panic_mode
        flaky = await start_health_endpoint(port)  # restarted on the same port

        async def flaky_back() -> bool:
            return await status("flaky") == HS.HEALTH_STATUS_SERVING

        await eventually(flaky_back)
        reply = await mesh.stub.Discover(registry_pb2.DiscoverRequest(service_name="api"))
        assert not reply.panic_mode
        assert {i.instance_id for i in reply.instances} == {"good", "flaky"}
        assert (await mesh.instances("api"))["flaky"].uptime_percentage < 100
    finally:
        for ep in (good, flaky, hung):
            await ep.server.stop(0)


async def test_panic_threshold_returns_everything_and_says_so(mesh: Mesh) -> None:
    up = await start_health_endpoint()
    try:
        await mesh.register("api", "up", endpoint=up.endpoint, mode=0)
        for i in range(3):  # nothing listens on port 9: NOT_SERVING after two checks
            await mesh.register("api", f"down{i}", endpoint="127.0.0.1:9", mode=0)

        async def three_down() -> bool:
            inst = await mesh.instances("api")
            return sum(i.health == HS.HEALTH_STATUS_NOT_SERVING for i in inst.values()) == 3

        await eventually(three_down)
        reply = await mesh.stub.Discover(registry_pb2.DiscoverRequest(service_name="api"))
        assert reply.panic_mode
        assert len(reply.instances) == 4
        assert any("panic mode" in note for note in reply.notes)
        strict = await mesh.stub.Discover(
            registry_pb2.DiscoverRequest(service_name="api", healthy_only=False)
        )
        assert not strict.panic_mode
    finally:
        await up.server.stop(0)


async def test_infrastructure_failures_eject_and_business_rejections_do_not(
    mesh: Mesh,
) -> None:
    for name in ("a", "b", "c"):
        await mesh.register("pay", name)
    registry = mesh.plane.registry
    for _ in range(20):
        await registry.record_call("pay", "b", infrastructure_failure=False)  # rejections
    for _ in range(5):
        await registry.record_call("pay", "a", infrastructure_failure=True)
    instances = await mesh.instances("pay")
    assert instances["a"].ejected
    assert instances["a"].effective_weight == 0
    assert instances["a"].HasField("ejected_until")
    assert not instances["b"].ejected
    reply = await mesh.stub.Discover(registry_pb2.DiscoverRequest(service_name="pay"))
    assert {i.instance_id for i in reply.instances} == {"b", "c"}
    for _ in range(5):  # at most 10% (but at least one) of a service is ejected at once
        await registry.record_call("pay", "c", infrastructure_failure=True)
    assert not (await mesh.instances("pay"))["c"].ejected


async def _collect(
    stream: grpc.aio.UnaryStreamCall[registry_pb2.WatchRequest, registry_pb2.WatchResponse],
    count: int,
) -> tuple[list[registry_pb2.WatchEvent], int]:
    events: list[registry_pb2.WatchEvent] = []
    revision = 0
    async with asyncio.timeout(10):
        while len(events) < count:
            message = await stream.read()
            assert message is not grpc.aio.EOF
            events.extend(message.events)
            revision = message.revision
    return events, revision


async def test_watch_starts_with_a_snapshot_then_streams_changes(mesh: Mesh) -> None:
    await mesh.register("pay", "a")
    stream = mesh.stub.Watch(registry_pb2.WatchRequest(service_names=["pay"]))
    first = await stream.read()
    assert [i.instance_id for i in first.snapshot.instances] == ["a"]
    assert not first.snapshot.resync
    await mesh.register("other", "x")  # not watched
    await mesh.register("pay", "b")
    await mesh.register("pay", "b", version="2")
    await mesh.stub.Deregister(registry_pb2.DeregisterRequest(service_name="pay", instance_id="a"))
    events, _ = await _collect(stream, 3)
    assert [(e.type, e.instance.instance_id) for e in events] == [
        (WE.WATCH_EVENT_TYPE_ADDED, "b"),
        (WE.WATCH_EVENT_TYPE_UPDATED, "b"),
        (WE.WATCH_EVENT_TYPE_REMOVED, "a"),
    ]
    assert events[2].removal_reason == registry_pb2.REMOVAL_REASON_DEREGISTERED
    revisions = [e.revision for e in events]
    assert revisions == sorted(revisions)
    stream.cancel()


async def test_watch_resumes_after_a_dropped_connection_without_losing_events(
    mesh: Mesh,
) -> None:
    stream = mesh.stub.Watch(registry_pb2.WatchRequest())
    await stream.read()  # snapshot
    await mesh.register("pay", "a")
    _, last = await _collect(stream, 1)
    stream.cancel()  # the connection drops
    changes = []
    for i in range(10):
        reply = await mesh.register("pay", f"n{i}")
        changes.append(reply.revision)
    await mesh.stub.Deregister(registry_pb2.DeregisterRequest(service_name="pay", instance_id="a"))
    resumed = mesh.stub.Watch(registry_pb2.WatchRequest(from_revision=last))
    got, _ = await _collect(resumed, 11)
    assert [e.revision for e in got][:10] == changes
    assert [e.instance.instance_id for e in got] == [*(f"n{i}" for i in range(10)), "a"]
    assert got[-1].type == WE.WATCH_EVENT_TYPE_REMOVED
    resumed.cancel()


async def test_watch_from_a_compacted_revision_gets_a_resync_snapshot(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "small.db", history_revisions=4)
    plane, port = await create_server(fast_config(tmp_path), store=store)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            mesh = Mesh(plane, channel, registry_pb2_grpc.RegistryServiceStub(channel))
            for i in range(12):
                await mesh.register("pay", f"i{i}")
            stream = mesh.stub.Watch(registry_pb2.WatchRequest(from_revision=1))
            first = await stream.read()
            assert first.snapshot.resync
            assert len(first.snapshot.instances) == 12
            stream.cancel()
    finally:
        await plane.stop(0)


async def test_expiries_reach_watchers_as_one_coalesced_update(mesh: Mesh) -> None:
    for i in range(20):
        await mesh.register("batch", f"i{i}", ttl=1.0)
    stream = mesh.stub.Watch(registry_pb2.WatchRequest(service_names=["batch"]))
    await stream.read()  # snapshot
    messages = []
    removed = 0
    async with asyncio.timeout(10):
        while removed < 20:
            message = await stream.read()
            if message.events:
                messages.append(message)
                removed += sum(
                    e.removal_reason == registry_pb2.REMOVAL_REASON_LEASE_EXPIRED
                    for e in message.events
                )
    # Registered a write apart, so they fall due over a few sweeps, not 20 messages.
    assert len(messages) <= 5
    stream.cancel()


async def test_restart_keeps_instances_and_revision_and_grants_grace(tmp_path: Path) -> None:
    config = fast_config(tmp_path)
    plane, port = await create_server(config)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        mesh = Mesh(plane, channel, registry_pb2_grpc.RegistryServiceStub(channel))
        reply = await mesh.register("pay", "a", ttl=2.0)
    await plane.stop(0)
    await asyncio.sleep(2.2)  # longer than the TTL while the control plane was down
    plane, port = await create_server(config)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            mesh = Mesh(plane, channel, registry_pb2_grpc.RegistryServiceStub(channel))
            assert plane.registry.revision == reply.revision
            assert "a" in await mesh.instances("pay"), "one TTL of grace after a restart"
            await mesh.stub.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=reply.lease.lease_id))
    finally:
        await plane.stop(0)
