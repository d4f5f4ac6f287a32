"""Envoy v3 resources built from the registry: what a proxyless gRPC client reads.

Naming (one service ``payment``):

- Listener ``payment`` (the client dials ``xds:///payment``), or ``payment:PORT`` for a
  client that dials ``xds:///payment:PORT`` (the port is ignored): an ``api_listener``
  HttpConnectionManager whose routes come over ADS (RDS) from RouteConfiguration
  ``payment``, with the Router filter last.
- RouteConfiguration ``payment``: one virtual host for every authority (``*``), one
  route (prefix ``""``) to cluster ``payment``, or weighted clusters ``payment/VERSION``
  when the service's policy splits traffic by version; the policy's default timeout as
  ``max_stream_duration`` and its retry policy as ``retry_policy``.
- Cluster ``payment`` (every instance) and ``payment/VERSION`` (the instances of one
  version; ``/`` never occurs in a service name): EDS over ADS, round robin, outlier
  detection when the policy sets one.
- ClusterLoadAssignment of the same name: one locality per instance (``zone`` = the
  instance's zone, ``sub_zone`` = its instance id) weighted by its effective weight,
  because gRPC clients ignore endpoint weights under round robin but honour locality
  weights; priority 0 for the caller's zone and 1 for the others when the policy
  prefers zones.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from envoy.config.cluster.v3 import cluster_pb2, outlier_detection_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2, health_check_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message

from flext_mesh.addresses import parse_host_port
from flext_mesh.registry.discovery import is_healthy
from flext_mesh.routing.balancer import in_panic
from flext_mesh.v1 import common_pb2, registry_pb2

__all__ = [
    "CDS",
    "EDS",
    "LDS",
    "OUTLIER_INTERVAL",
    "RDS",
    "TYPES",
    "Endpoint",
    "cluster",
    "cluster_name",
    "listener",
    "load_assignment",
    "pack",
    "retry_on",
    "route_configuration",
    "service_of",
    "split_of",
    "version_of_cluster",
]

LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
#: The four types, in the order a push sends them (clusters and endpoints before the
#: listeners and routes that name them: make before break).
TYPES: tuple[str, ...] = (CDS, EDS, LDS, RDS)

#: How often a client's outlier detection looks at its counters (gRPC reads
#: ``interval``; the policy has no such field), seconds.
OUTLIER_INTERVAL = 1.0
#: Share of failed calls over an interval that ejects an instance (gRPC counts
#: every non-OK status as a failure; the control plane counts only infrastructure
#: faults), percent.
OUTLIER_FAILURE_PERCENT = 50

#: gRPC status names a client retries on through xDS (gRFC A44); the policy's other
#: codes have no xDS spelling and are dropped.
_RETRY_ON = {
    "CANCELLED": "cancelled",
    "DEADLINE_EXCEEDED": "deadline-exceeded",
    "INTERNAL": "internal",
    "RESOURCE_EXHAUSTED": "resource-exhausted",
    "UNAVAILABLE": "unavailable",
}
#: The policy's default retryable codes (common.proto RetryPolicy.retryable_codes).
_DEFAULT_RETRYABLE = ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "INTERNAL")
_ADS = config_source_pb2.ConfigSource(
    ads=config_source_pb2.AggregatedConfigSource(),
    resource_api_version=config_source_pb2.ApiVersion.V3,
)
_HEALTHY = health_check_pb2.HealthStatus.HEALTHY
_UNHEALTHY = health_check_pb2.HealthStatus.UNHEALTHY
_ROUTER = "envoy.filters.http.router"


def pack(message: Message) -> any_pb2.Any:
    """``message`` packed in an Any, as DiscoveryResponse.resources holds it."""
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def service_of(name: str) -> str:
    """The service a resource name belongs to: ``payment`` for ``payment``,
    ``payment:50051`` (a listener) and ``payment/v2`` (a version's cluster)."""
    return name.partition(":")[0].partition("/")[0]


def cluster_name(service: str, version: str | None = None) -> str:
    """The cluster of a service, or of one version of it."""
    return service if version is None else f"{service}/{version}"


def version_of_cluster(name: str) -> str | None:
    """The version a cluster name selects; None for the whole service."""
    _, slash, version = name.partition("/")
    return version if slash else None


def _duration(seconds: float) -> duration_pb2.Duration:
    out = duration_pb2.Duration()
    out.FromNanoseconds(round(seconds * 1e9))
    return out


def listener(name: str) -> listener_pb2.Listener:
    """The Listener a client dialing ``xds:///NAME`` asks for."""
    manager = hcm_pb2.HttpConnectionManager(
        rds=hcm_pb2.Rds(config_source=_ADS, route_config_name=service_of(name)),
        http_filters=[hcm_pb2.HttpFilter(name=_ROUTER, typed_config=pack(router_pb2.Router()))],
    )
    return listener_pb2.Listener(
        name=name, api_listener=api_listener_pb2.ApiListener(api_listener=pack(manager))
    )


def split_of(
    policy: registry_pb2.ServicePolicy | None,
    instances: Iterable[registry_pb2.ServiceInstance],
) -> dict[str, int]:
    """Version -> weight of the policy's split, restricted to versions that have a
    healthy instance (as Discover falls back); empty: route to the whole service."""
    if policy is None or not policy.splits:
        return {}
    healthy = {i.version for i in instances if is_healthy(i)}
    return {s.version: s.weight for s in policy.splits if s.weight > 0 and s.version in healthy}


def retry_on(codes: Iterable[str]) -> str:
    """The ``retry_on`` of a policy's retryable codes (those gRPC knows)."""
    names = [_RETRY_ON[c] for c in (list(codes) or _DEFAULT_RETRYABLE) if c in _RETRY_ON]
    return ",".join(dict.fromkeys(names))


def _retry_policy(retry: common_pb2.RetryPolicy) -> route_components_pb2.RetryPolicy | None:
    attempts = retry.max_attempts or 3
    codes = retry_on(retry.retryable_codes)
    if attempts <= 1 or not codes:
        return None
    base = retry.initial_backoff.ToNanoseconds() / 1e9 if retry.HasField("initial_backoff") else 0.1
    cap = retry.max_backoff.ToNanoseconds() / 1e9 if retry.HasField("max_backoff") else 5.0
    return route_components_pb2.RetryPolicy(
        retry_on=codes,
        num_retries={"value": attempts - 1},
        retry_back_off=route_components_pb2.RetryPolicy.RetryBackOff(
            base_interval=_duration(base), max_interval=_duration(max(cap, base))
        ),
    )


def route_configuration(
    service: str,
    policy: registry_pb2.ServicePolicy | None,
    split: Mapping[str, int],
) -> route_pb2.RouteConfiguration:
    """The RouteConfiguration of a service: its cluster, or its split's clusters."""
    action = route_components_pb2.RouteAction()
    if split:
        action.weighted_clusters.clusters.extend(
            route_components_pb2.WeightedCluster.ClusterWeight(
                name=cluster_name(service, version), weight={"value": weight}
            )
            for version, weight in sorted(split.items())
        )
    else:
        action.cluster = cluster_name(service)
    if policy is not None:
        if policy.HasField("default_timeout"):
            action.max_stream_duration.max_stream_duration.CopyFrom(policy.default_timeout)
            action.max_stream_duration.grpc_timeout_header_max.CopyFrom(policy.default_timeout)
        if policy.HasField("retry"):
            retry = _retry_policy(policy.retry)
            if retry is not None:
                action.retry_policy.CopyFrom(retry)
    route = route_components_pb2.Route(
        match=route_components_pb2.RouteMatch(prefix=""), route=action
    )
    return route_pb2.RouteConfiguration(
        name=service,
        virtual_hosts=[
            route_components_pb2.VirtualHost(name=service, domains=["*"], routes=[route])
        ],
    )


def cluster(name: str, policy: registry_pb2.ServicePolicy | None) -> cluster_pb2.Cluster:
    """The Cluster ``name`` (a service or one of its versions): EDS over ADS."""
    out = cluster_pb2.Cluster(
        name=name,
        type=cluster_pb2.Cluster.DiscoveryType.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ADS, service_name=name),
        lb_policy=cluster_pb2.Cluster.LbPolicy.ROUND_ROBIN,
    )
    if policy is not None and policy.HasField("outlier_detection"):
        out.outlier_detection.CopyFrom(_outlier(policy.outlier_detection))
    return out


def _outlier(
    settings: registry_pb2.OutlierDetectionPolicy,
) -> outlier_detection_pb2.OutlierDetection:
    """gRFC A50's failure-percentage ejection from the policy's outlier settings:
    ``consecutive_failures`` becomes the calls an instance needs in an interval."""
    base = settings.base_ejection_time if settings.HasField("base_ejection_time") else None
    cap = settings.max_ejection_time if settings.HasField("max_ejection_time") else None
    percent = settings.max_ejection_percent if settings.HasField("max_ejection_percent") else 10.0
    return outlier_detection_pb2.OutlierDetection(
        interval=_duration(OUTLIER_INTERVAL),
        base_ejection_time=base if base is not None else _duration(30),
        max_ejection_time=cap if cap is not None else _duration(300),
        # At least one instance is always ejectable, as the control plane's ejection.
        max_ejection_percent={"value": max(1, math.ceil(percent))},
        failure_percentage_threshold={"value": OUTLIER_FAILURE_PERCENT},
        enforcing_failure_percentage={"value": 100},
        failure_percentage_minimum_hosts={"value": 1},
        failure_percentage_request_volume={"value": settings.consecutive_failures or 5},
        enforcing_success_rate={"value": 0},
    )


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One instance as an EDS endpoint (an IP literal and port; a DNS name is skipped:
    gRPC clients reject an endpoint that is not an IP address)."""

    instance_id: str
    zone: str
    host: str
    port: int
    healthy: bool
    weight: int


def endpoints(
    instances: Iterable[registry_pb2.ServiceInstance],
    policy: registry_pb2.ServicePolicy | None,
    panic_threshold_percent: float,
) -> list[Endpoint]:
    """The instances as endpoints, sorted by instance id; below the panic threshold
    every instance counts as healthy (as Discover answers in panic mode)."""
    pool = sorted(instances, key=lambda i: i.instance_id)
    threshold = (
        policy.panic_threshold_percent
        if policy is not None and policy.HasField("panic_threshold_percent")
        else panic_threshold_percent
    )
    panic = in_panic(len(pool), sum(map(is_healthy, pool)), threshold)
    out = []
    for instance in pool:
        try:
            host, port = parse_host_port(instance.endpoint, allow_zero=False)
            ipaddress.ip_address(host)
        except ValueError:
            continue
        weight = instance.effective_weight
        if weight <= 0:
            weight = float(instance.weight or 100)
        out.append(
            Endpoint(
                instance_id=instance.instance_id,
                zone=instance.zone,
                host=host,
                port=port,
                healthy=panic or is_healthy(instance),
                weight=max(1, round(weight)),
            )
        )
    return out


def load_assignment(
    name: str, members: Iterable[Endpoint], *, caller_zone: str = ""
) -> endpoint_pb2.ClusterLoadAssignment:
    """The ClusterLoadAssignment of cluster ``name``: one locality per instance;
    with ``caller_zone`` (the policy prefers zones and the caller has one) its zone's
    instances at priority 0, the others at 1, when that zone has a healthy one."""
    members = list(members)
    local = bool(caller_zone) and any(m.healthy and m.zone == caller_zone for m in members)
    out = endpoint_pb2.ClusterLoadAssignment(cluster_name=name)
    for member in members:
        endpoint = endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(
                        address=member.host, port_value=member.port
                    )
                )
            ),
            health_status=_HEALTHY if member.healthy else _UNHEALTHY,
            load_balancing_weight={"value": member.weight},
        )
        out.endpoints.append(
            endpoint_components_pb2.LocalityLbEndpoints(
                locality=base_pb2.Locality(zone=member.zone, sub_zone=member.instance_id),
                lb_endpoints=[endpoint],
                load_balancing_weight={"value": member.weight},
                priority=1 if local and member.zone != caller_zone else 0,
            )
        )
    return out
