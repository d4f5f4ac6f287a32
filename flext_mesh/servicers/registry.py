"""RegistryService: protobuf in, Registry calls, protobuf out (status codes only here)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc

from flext_mesh.errors import FieldViolation, InvalidArgument
from flext_mesh.names import MAX_ID, MAX_NAME, check_id, check_length, raise_if
from flext_mesh.registry.registry import Registry
from flext_mesh.rpc.handlers import LongStreams, add_servicer, checked
from flext_mesh.rpc.status import rpc_errors
from flext_mesh.security.auth import refusals
from flext_mesh.security.identity import client_key
from flext_mesh.servicers.watchers import WatchLimit
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from flext_mesh.xds import status as xds_status
from flext_mesh.xds.hub import XdsHub

__all__ = ["RegistryServicer", "add_registry_servicer"]

_Context = grpc.aio.ServicerContext[Any, Any]
#: Longer than any endpoint (a 253-character host, ':' and a port): refused before the
#: registry's validation would quote it.
_MAX_ENDPOINT = 259
_REGISTER = "/flext_mesh.v1.RegistryService/Register"


class RegistryServicer(registry_pb2_grpc.RegistryServiceServicer):
    """Serves the registry; Discover and Watch answer pre-serialized bytes."""

    def __init__(
        self,
        registry: Registry,
        streams: LongStreams | None = None,
        watchers: WatchLimit | None = None,
        xds: XdsHub | None = None,
    ) -> None:
        """``watchers`` counts open Watch streams per client (shared with the
        orchestrator's WatchExecution); a default limit of 64 when None. ``xds``: the
        hub whose clients ListXdsClients lists (none listed without one)."""
        self.registry = registry
        self.xds = xds
        self.streams = streams if streams is not None else LongStreams()
        self.watchers = watchers if watchers is not None else WatchLimit()

    @rpc_errors
    async def Register(
        self, request: registry_pb2.RegisterRequest, context: _Context
    ) -> registry_pb2.RegisterResponse:
        """Register an instance under a lease."""
        ttl = request.ttl if request.HasField("ttl") else None
        try:
            raise_if(
                check_length("instance.endpoint", request.instance.endpoint, _MAX_ENDPOINT)
                + _long_keys("instance.labels", request.instance.labels)
            )
            instance, lease, revision = await self.registry.register(request.instance, ttl)
        except InvalidArgument as exc:  # a refusal the operator should see, as auth's are
            refusals.log("invalid registration", _REGISTER, client_key(context), exc.message)
            raise
        return registry_pb2.RegisterResponse(instance=instance, lease=lease, revision=revision)

    @rpc_errors
    async def Heartbeat(
        self, request: registry_pb2.HeartbeatRequest, context: _Context
    ) -> registry_pb2.HeartbeatResponse:
        """Renew one lease."""
        raise_if(check_id("lease_id", request.lease_id))
        return registry_pb2.HeartbeatResponse(lease=await self.registry.heartbeat(request.lease_id))

    @rpc_errors
    async def KeepAlive(  # type: ignore[override]
        self, request_iterator: AsyncIterator[registry_pb2.KeepAliveRequest], context: _Context
    ) -> None:
        """Renew leases over a stream, one response per request.

        Reads and writes on the context directly: no async-generator layers on the
        hottest stream of the control plane.
        """
        keep_alive = self.registry.keep_alive
        with self.streams.track():
            while True:
                request = await context.read()
                if request is grpc.aio.EOF:
                    return
                lease_ids = checked(request).lease_ids
                if max(map(len, lease_ids), default=0) > MAX_ID:
                    raise_if(
                        v
                        for i, lease_id in enumerate(lease_ids)
                        for v in check_id(f"lease_ids[{i}]", lease_id)
                    )
                await context.write(
                    await keep_alive(lease_ids, applied_revision=request.applied_revision)
                )

    @rpc_errors
    async def Deregister(
        self, request: registry_pb2.DeregisterRequest, context: _Context
    ) -> registry_pb2.DeregisterResponse:
        """Remove an instance now."""
        revision = await self.registry.deregister(request.service_name, request.instance_id)
        return registry_pb2.DeregisterResponse(revision=revision)

    @rpc_errors
    async def Discover(self, request: registry_pb2.DiscoverRequest, context: _Context) -> bytes:  # type: ignore[override]
        """Instances ordered by strategy (pre-serialized DiscoverResponse); with
        ``explain``, each instance's weight factors appended (a serialized message's
        fields may follow one another: the client reads one DiscoverResponse)."""
        discovered = await self.registry.discover(request)
        payload = discovered.payload()
        if not request.explain:
            return payload
        why = registry_pb2.DiscoverResponse(
            explanations=self.registry.explain(
                request.service_name, (i.instance_id for i in discovered.instances())
            )
        )
        return payload + why.SerializeToString()

    @rpc_errors
    async def ListServices(
        self, request: registry_pb2.ListServicesRequest, context: _Context
    ) -> registry_pb2.ListServicesResponse:
        """Services with counts and health."""
        return self.registry.list_services(request.page_size, request.page_token, request.type)

    @rpc_errors
    async def ListXdsClients(
        self, request: registry_pb2.ListXdsClientsRequest, context: _Context
    ) -> registry_pb2.ListXdsClientsResponse:
        """The xDS clients connected to this replica and where each stands."""
        hub = self.xds
        return xds_status.list_clients(
            hub.clients() if hub is not None else [],
            hub.revision if hub is not None else self.registry.cache.revision,
            request.page_size,
            request.page_token,
            time.time(),
        )

    @rpc_errors
    async def Watch(  # type: ignore[override]
        self, request: registry_pb2.WatchRequest, context: _Context
    ) -> AsyncIterator[bytes]:
        """Changes from a revision (pre-serialized WatchResponses); RESOURCE_EXHAUSTED
        when the caller already holds its most open watch streams."""
        release = self.watchers.acquire(context)
        try:
            async for payload in self.registry.watch(
                list(request.service_names), request.from_revision
            ):
                yield payload
        finally:
            release()

    @rpc_errors
    async def PutServicePolicy(
        self, request: registry_pb2.PutServicePolicyRequest, context: _Context
    ) -> registry_pb2.PutServicePolicyResponse:
        """Validate and store a service's traffic policy."""
        policy = await self.registry.put_policy(request.policy, request.expected_version)
        return registry_pb2.PutServicePolicyResponse(policy=policy)

    @rpc_errors
    async def GetServicePolicy(
        self, request: registry_pb2.GetServicePolicyRequest, context: _Context
    ) -> registry_pb2.GetServicePolicyResponse:
        """The stored policy."""
        return registry_pb2.GetServicePolicyResponse(
            policy=self.registry.get_policy(request.service_name)
        )

    @rpc_errors
    async def DeleteServicePolicy(
        self, request: registry_pb2.DeleteServicePolicyRequest, context: _Context
    ) -> registry_pb2.DeleteServicePolicyResponse:
        """Delete a policy; callers fall back to their own settings."""
        revision = await self.registry.delete_policy(request.service_name)
        return registry_pb2.DeleteServicePolicyResponse(revision=revision)

    @rpc_errors
    async def SetInstanceMaintenance(
        self, request: registry_pb2.SetInstanceMaintenanceRequest, context: _Context
    ) -> registry_pb2.SetInstanceMaintenanceResponse:
        """Drain an instance (no new calls) or undrain it."""
        instance, revision = await self.registry.set_maintenance(
            request.service_name, request.instance_id, request.maintenance, request.reason
        )
        return registry_pb2.SetInstanceMaintenanceResponse(instance=instance, revision=revision)


def _long_keys(field: str, labels: Mapping[str, str]) -> list[FieldViolation]:
    """A violation when a label key is longer than any valid one (not quoting it)."""
    longest = max(map(len, labels), default=0)
    if longest > MAX_NAME:
        return [FieldViolation(field, f"has a key {longest} characters long; at most {MAX_NAME}")]
    return []


def add_registry_servicer(servicer: RegistryServicer, server: grpc.aio.Server) -> None:
    """Serve the registry; Discover and Watch may answer pre-serialized bytes."""
    add_servicer(
        server,
        servicer,
        registry_pb2.DESCRIPTOR.services_by_name["RegistryService"],
        raw_responses=("Discover", "Watch"),
    )
