"""The ADS server of an in-process control plane, driven by a raw ADS stream: what each
response holds, ACKs and NACKs as a status view sees them, and what a change pushes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.config.route.v3 import route_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from flext_mesh.server import ControlPlane
from flext_mesh.v1 import registry_pb2
from flext_mesh.xds.resources import CDS, EDS, LDS, RDS

pytestmark = pytest.mark.timeout(30)
TTL_ONLY = registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY


class Ads:
    """One ADS stream: send requests, read responses with a deadline."""

    def __init__(self, address: str, node_id: str = "node-1", zone: str = "") -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.queue: asyncio.Queue[discovery_pb2.DiscoveryRequest] = asyncio.Queue()
        self.node = base_pb2.Node(id=node_id, locality=base_pb2.Locality(zone=zone))
        stub = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel)
        self.call = stub.StreamAggregatedResources(self._requests())
        self.last: dict[str, discovery_pb2.DiscoveryResponse] = {}
        self.acked: dict[str, str] = {}
        self.responses: asyncio.Queue[discovery_pb2.DiscoveryResponse] = asyncio.Queue()
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for response in self.call:
            self.responses.put_nowait(response)

    async def _requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while True:
            yield await self.queue.get()

    def ask(self, type_url: str, *names: str, ack: bool = True, error: str = "") -> None:
        """Subscribe to ``names``; after a response of the type, ACK it (or NACK)."""
        request = discovery_pb2.DiscoveryRequest(
            node=self.node, type_url=type_url, resource_names=list(names)
        )
        last = self.last.get(type_url)
        if last is not None and ack:
            request.response_nonce = last.nonce
            request.version_info = last.version_info
            if not error:
                self.acked[type_url] = last.version_info
            if error:  # a NACK carries the version last accepted
                request.version_info = self.acked.get(type_url, "")
                request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self.queue.put_nowait(request)

    async def read(self, within: float = 3.0) -> discovery_pb2.DiscoveryResponse:
        response = await asyncio.wait_for(self.responses.get(), within)
        assert isinstance(response, discovery_pb2.DiscoveryResponse)
        self.last[response.type_url] = response
        return response

    async def nothing(self, within: float = 0.4) -> None:
        await asyncio.sleep(within)
        assert self.responses.empty(), f"unexpected response: {self.responses.get_nowait()}"

    async def close(self) -> None:
        self.call.cancel()
        self.reader.cancel()
        await asyncio.gather(self.reader, return_exceptions=True)
        await self.channel.close()


def unpack(response: discovery_pb2.DiscoveryResponse, cls: Any) -> list[Any]:
    out = []
    for packed in response.resources:
        message = cls()
        assert packed.Unpack(message)
        out.append(message)
    return out


async def register(
    plane: ControlPlane, instance_id: str, port: int, **fields: Any
) -> registry_pb2.ServiceInstance:
    instance = registry_pb2.ServiceInstance(
        service_name=fields.pop("service", "payment"),
        instance_id=instance_id,
        endpoint=f"127.0.0.1:{port}",
        health_check_mode=TTL_ONLY,
        **fields,
    )
    stored, _, _ = await plane.registry.register(instance)
    return stored


@pytest.fixture
async def ads(control_plane: ControlPlane) -> AsyncIterator[Ads]:
    stream = Ads(f"127.0.0.1:{control_plane.port}", zone="z1")
    try:
        yield stream
    finally:
        await stream.close()


async def test_a_client_walks_listener_route_cluster_endpoints(
    control_plane: ControlPlane, ads: Ads
) -> None:
    await register(control_plane, "pay-1", 7001, weight=25, zone="z1")
    await register(control_plane, "pay-2", 7002, weight=75, zone="z2")

    ads.ask(LDS, "payment")
    (listener,) = unpack(await ads.read(), listener_pb2.Listener)
    assert listener.name == "payment"
    assert listener.api_listener.api_listener.type_url.endswith("HttpConnectionManager")
    ads.ask(LDS, "payment")  # ACK
    ads.ask(RDS, "payment")
    (routes,) = unpack(await ads.read(), route_pb2.RouteConfiguration)
    assert routes.virtual_hosts[0].domains == ["*"]
    assert routes.virtual_hosts[0].routes[0].route.cluster == "payment"
    ads.ask(RDS, "payment")
    ads.ask(CDS, "payment")
    (cluster,) = unpack(await ads.read(), cluster_pb2.Cluster)
    assert cluster.type == cluster_pb2.Cluster.DiscoveryType.EDS
    assert cluster.eds_cluster_config.eds_config.HasField("ads")
    ads.ask(CDS, "payment")
    ads.ask(EDS, "payment")
    (assignment,) = unpack(await ads.read(), endpoint_pb2.ClusterLoadAssignment)
    ads.ask(EDS, "payment")
    by_zone = {
        group.locality.zone: (
            group.lb_endpoints[0].endpoint.address.socket_address.port_value,
            group.load_balancing_weight.value,
            group.locality.sub_zone,
            group.lb_endpoints[0].health_status,
        )
        for group in assignment.endpoints
    }
    healthy = health_check_pb2.HealthStatus.HEALTHY
    assert by_zone == {"z1": (7001, 25, "pay-1", healthy), "z2": (7002, 75, "pay-2", healthy)}
    # Without a zone policy every locality is priority 0.
    assert {g.priority for g in assignment.endpoints} == {0}
    await ads.nothing()  # ACKs are not answered

    (client,) = control_plane.xds.clients()
    assert client.node_id == "node-1"
    assert client.zone == "z1"
    for type_url in (LDS, RDS, CDS, EDS):
        state = client.types[type_url]
        assert state.version_sent == state.version_acked == ads.last[type_url].version_info
        assert state.subscribed == {"payment"}
        assert state.ack_time > 0
        assert state.nack_error == ""


async def test_a_change_pushes_only_what_it_changed(control_plane: ControlPlane, ads: Ads) -> None:
    await register(control_plane, "pay-1", 7001)
    for type_url in (LDS, RDS, CDS, EDS):
        ads.ask(type_url, "payment")
        await ads.read()
        ads.ask(type_url, "payment")

    # A new instance changes the endpoints only: one EDS response, nothing else.
    await register(control_plane, "pay-2", 7002)
    response = await ads.read()
    assert response.type_url == EDS
    (assignment,) = unpack(response, endpoint_pb2.ClusterLoadAssignment)
    assert len(assignment.endpoints) == 2
    ads.ask(EDS, "payment")
    await ads.nothing()

    # A timeout policy changes the route only.
    policy = registry_pb2.ServicePolicy(service_name="payment")
    policy.default_timeout.FromMilliseconds(250)
    await control_plane.registry.put_policy(policy)
    response = await ads.read()
    assert response.type_url == RDS
    (routes,) = unpack(response, route_pb2.RouteConfiguration)
    duration = routes.virtual_hosts[0].routes[0].route.max_stream_duration
    assert duration.max_stream_duration.ToMilliseconds() == 250
    assert duration.grpc_timeout_header_max.ToMilliseconds() == 250
    ads.ask(RDS, "payment")
    await ads.nothing()


async def test_a_nack_is_recorded_and_the_accepted_version_kept(
    control_plane: ControlPlane, ads: Ads
) -> None:
    await register(control_plane, "pay-1", 7001)
    ads.ask(EDS, "payment")
    first = await ads.read()
    ads.ask(EDS, "payment")  # ACK version 1
    await register(control_plane, "pay-2", 7002)
    second = await ads.read()
    assert second.version_info != first.version_info
    ads.ask(EDS, "payment", error="endpoints[1].locality error:field not present")
    await ads.nothing()  # the rejected resources are not sent again

    (client,) = control_plane.xds.clients()
    state = client.types[EDS]
    assert state.version_sent == second.version_info
    assert state.version_acked == first.version_info
    assert state.nack_error == "endpoints[1].locality error:field not present"
    assert state.nacks == 1
    assert state.nack_time > 0

    # The next change is sent, and its ACK clears the error.
    await register(control_plane, "pay-3", 7003)
    third = await ads.read()
    ads.ask(EDS, "payment")
    await asyncio.sleep(0.1)
    assert state.version_acked == third.version_info
    assert state.nack_error == ""


async def test_a_listener_that_does_not_exist_is_not_sent_until_it_does(
    control_plane: ControlPlane, ads: Ads
) -> None:
    ads.ask(LDS, "ghost")
    await ads.nothing()
    await register(control_plane, "ghost-1", 7001, service="ghost")
    (listener,) = unpack(await ads.read(), listener_pb2.Listener)
    assert listener.name == "ghost"
    ads.ask(LDS, "ghost")
    # Its last instance gone, the listener is left out: the client drops it.
    await control_plane.registry.deregister("ghost", "ghost-1")
    response = await ads.read()
    assert response.type_url == LDS
    assert not response.resources


async def test_listener_names_with_a_port_and_every_subscribed_listener_sent(
    control_plane: ControlPlane, ads: Ads
) -> None:
    await register(control_plane, "pay-1", 7001)
    await register(control_plane, "ship-1", 7002, service="shipping")
    ads.ask(LDS, "payment:50051")
    (listener,) = unpack(await ads.read(), listener_pb2.Listener)
    assert listener.name == "payment:50051"
    ads.ask(LDS, "payment:50051", "shipping")
    listeners = unpack(await ads.read(), listener_pb2.Listener)
    assert sorted(x.name for x in listeners) == ["payment:50051", "shipping"]


async def test_a_stale_nonce_is_ignored(control_plane: ControlPlane, ads: Ads) -> None:
    await register(control_plane, "pay-1", 7001)
    ads.ask(CDS, "payment")
    await ads.read()
    stale = discovery_pb2.DiscoveryRequest(
        type_url=CDS, resource_names=["payment", "other"], response_nonce="999"
    )
    ads.queue.put_nowait(stale)
    await ads.nothing()
    (client,) = control_plane.xds.clients()
    assert client.stale_requests == 1
    assert client.types[CDS].subscribed == {"payment"}


async def test_split_zones_retries_and_outlier_detection_follow_the_policy(
    control_plane: ControlPlane, ads: Ads
) -> None:
    await register(control_plane, "v1-a", 7001, version="v1", zone="z1")
    await register(control_plane, "v1-b", 7002, version="v1", zone="z2")
    await register(control_plane, "v2-a", 7003, version="v2", zone="z2")
    policy = registry_pb2.ServicePolicy(
        service_name="payment",
        splits=[
            registry_pb2.VersionSplit(version="v1", weight=90),
            registry_pb2.VersionSplit(version="v2", weight=10),
        ],
        zone=registry_pb2.ZonePolicy(enabled=True),
    )
    policy.retry.max_attempts = 3
    policy.retry.retryable_codes.extend(["UNAVAILABLE", "UNKNOWN"])
    policy.retry.initial_backoff.FromMilliseconds(20)
    policy.outlier_detection.consecutive_failures = 3
    policy.outlier_detection.base_ejection_time.FromSeconds(10)
    await control_plane.registry.put_policy(policy)

    ads.ask(RDS, "payment")
    (routes,) = unpack(await ads.read(), route_pb2.RouteConfiguration)
    action = routes.virtual_hosts[0].routes[0].route
    assert [(c.name, c.weight.value) for c in action.weighted_clusters.clusters] == [
        ("payment/v1", 90),
        ("payment/v2", 10),
    ]
    assert action.retry_policy.retry_on == "unavailable"  # UNKNOWN has no xDS spelling
    assert action.retry_policy.num_retries.value == 2
    assert action.retry_policy.retry_back_off.base_interval.ToMilliseconds() == 20

    ads.ask(CDS, "payment/v1", "payment/v2")
    clusters = {c.name: c for c in unpack(await ads.read(), cluster_pb2.Cluster)}
    assert set(clusters) == {"payment/v1", "payment/v2"}
    outlier = clusters["payment/v1"].outlier_detection
    assert outlier.failure_percentage_request_volume.value == 3
    assert outlier.enforcing_failure_percentage.value == 100
    assert outlier.base_ejection_time.ToSeconds() == 10

    ads.ask(EDS, "payment/v1")
    (assignment,) = unpack(await ads.read(), endpoint_pb2.ClusterLoadAssignment)
    priorities = {g.locality.sub_zone: g.priority for g in assignment.endpoints}
    assert priorities == {"v1-a": 0, "v1-b": 1}  # the caller is in z1


async def test_a_flood_of_changes_is_coalesced_and_a_closed_stream_forgotten(
    control_plane: ControlPlane,
) -> None:
    ads = Ads(f"127.0.0.1:{control_plane.port}")
    await register(control_plane, "pay-0", 7000)
    ads.ask(EDS, "payment")
    await ads.read()
    ads.ask(EDS, "payment")
    began = asyncio.get_running_loop().time()
    for i in range(1, 30):
        await register(control_plane, f"pay-{i}", 7000 + i)
    took = asyncio.get_running_loop().time() - began
    await asyncio.sleep(0.3)
    pushes = []
    while not ads.responses.empty():
        pushes.append(ads.responses.get_nowait())
    (assignment,) = unpack(pushes[-1], endpoint_pb2.ClusterLoadAssignment)
    assert len(assignment.endpoints) == 30  # the last push has them all
    # At most one push per 50 ms (and one more for the tail), not one per change.
    assert len(pushes) <= took / 0.05 + 2, (len(pushes), took)
    assert len(pushes) < 29
    print(f"{len(pushes)} pushes for 29 changes in {took:.3f} s")

    await ads.close()
    for _ in range(50):
        if not control_plane.xds.clients():
            break
        await asyncio.sleep(0.02)
    assert control_plane.xds.clients() == []


@pytest.mark.parametrize(
    ("names", "why"),
    [
        ([f"svc-{i}" for i in range(1001)], "1001 names; at most 1000"),
        (["x" * 201], "longer than 200 characters"),
    ],
)
async def test_too_many_or_too_long_names_end_the_stream_with_a_field_violation(
    control_plane: ControlPlane, names: list[str], why: str
) -> None:
    """Bounded subscriptions: the stream ends INVALID_ARGUMENT naming resource_names, and
    the control plane serves the next stream as before."""
    await register(control_plane, "pay-1", 7001)
    bad = Ads(f"127.0.0.1:{control_plane.port}", node_id="greedy")
    try:
        bad.ask(LDS, *names)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await asyncio.wait_for(bad.reader, 5)
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        details = rpc_status.from_call(refused.value)
        assert details is not None
        (detail,) = details.details
        violations = error_details_pb2.BadRequest()
        assert detail.Unpack(violations)
        assert violations.field_violations[0].field == "resource_names"
        assert why in violations.field_violations[0].description
    finally:
        await bad.close()
    good = Ads(f"127.0.0.1:{control_plane.port}", node_id="fine")
    try:
        good.ask(LDS, "payment")
        (listener,) = unpack(await good.read(), listener_pb2.Listener)
        assert listener.name == "payment"
    finally:
        await good.close()
