"""Leases: Register, Heartbeat, KeepAlive and Deregister.

An instance lives under a store lease: Register grants one and writes the instance
attached to it; renewals keep it; the store's sweeper removes the instance when the
lease expires, and Deregister revokes it at once. Each renewal moves the instance's
``last_renew_time`` in the cache (to the second; kept in memory, and written to the
store with the instance's next change, so after a restart it reads as of that write).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence

from google.protobuf import duration_pb2, timestamp_pb2

from flext_mesh.errors import (
    FieldViolation,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
    StoreUnavailable,
)
from flext_mesh.names import check_name, raise_if
from flext_mesh.registry.cache import InstanceCache, instance_key, stamp_now
from flext_mesh.registry.validation import DEFAULT_WEIGHT, validate_instance, validate_ttl
from flext_mesh.registry.weights import Weights
from flext_mesh.store.base import LeaseInfo, Store
from flext_mesh.v1 import registry_pb2

__all__ = ["Leases"]

_log = logging.getLogger("flext_mesh.registry")
_HS = registry_pb2.HealthStatus
#: Most leases one KeepAlive message renews.
MAX_KEEP_ALIVE = 1000
#: Renewals handled between two yields to the event loop.
_SLICE = 250


class Leases:
    """Registers instances under leases and renews them."""

    def __init__(
        self,
        cache: InstanceCache,
        weights: Weights,
        *,
        default_ttl: float,
        max_instances_per_service: int,
    ) -> None:
        self._cache = cache
        self._store: Store = cache.store
        self._weights = weights
        self._default_ttl = default_ttl
        self._max_instances = max_instances_per_service
        # Instance ids with a Register in flight (how many), per service: each holds a
        # slot of the service's limit until it is in the cache (no overshoot under load).
        self._joining: dict[str, Counter[str]] = {}

    async def register(
        self, instance: registry_pb2.ServiceInstance, ttl: duration_pb2.Duration | None = None
    ) -> tuple[registry_pb2.ServiceInstance, registry_pb2.Lease, int]:
        """Register (or replace) an instance under a new lease (default TTL when None)."""
        raise_if(
            validate_instance("instance", instance)
            + validate_ttl("ttl", ttl or duration_pb2.Duration(), ttl is not None)
        )
        seconds = ttl.ToNanoseconds() / 1e9 if ttl is not None else self._default_ttl
        new = registry_pb2.ServiceInstance()
        new.CopyFrom(instance)
        for name in (
            "effective_weight",
            "response_time_ms",
            "uptime_percentage",
            "ejected",
            "ejected_until",
            "register_time",
            "last_renew_time",
            "lease_id",
            "revision",
            "applied_revision",
            "applied_time",
            "maintenance",
            "maintenance_reason",
            "maintenance_time",
        ):
            new.ClearField(name)  # the control plane's fields
        if not new.instance_id:
            new.instance_id = f"{new.service_name}-{uuid.uuid4().hex[:12]}"
        if not new.weight:
            new.weight = DEFAULT_WEIGHT
        with self._slot(new.service_name, new.instance_id):
            async with self._cache.write_lock(new.service_name, new.instance_id):
                previous = self._cache.get(new.service_name, new.instance_id)
                return await self._register(new, previous, seconds)

    @contextlib.contextmanager
    def _slot(self, service: str, instance_id: str) -> Iterator[None]:
        """Hold the instance's slot of its service while it registers.

        Slots are the cached instances plus the registrations in flight, so concurrent
        Registers cannot overshoot the limit (nor can an instance that expires while it
        registers again); an instance already registered, or registering, always may.
        """
        joining = self._joining.get(service) or Counter()
        cached = self._cache.instances(service)
        if instance_id not in joining and instance_id not in cached:
            count = len(cached) + sum(1 for i in joining if i not in cached)
            limit = self._max_instances
            if count >= limit:
                raise ResourceExhausted(
                    f"service {service!r} has reached its limit of {limit} instances "
                    f"(--max-instances-per-service); deregister unused instances or raise "
                    "the limit"
                )
        joining[instance_id] += 1
        self._joining[service] = joining
        try:
            yield
        finally:
            joining[instance_id] -= 1
            if not joining[instance_id]:
                del joining[instance_id]
                if not joining:
                    del self._joining[service]

    async def _register(
        self,
        new: registry_pb2.ServiceInstance,
        previous: registry_pb2.ServiceInstance | None,
        seconds: float,
    ) -> tuple[registry_pb2.ServiceInstance, registry_pb2.Lease, int]:
        if previous is not None and previous.maintenance:
            # An operator's drain outlives re-registrations; only undrain ends it.
            new.maintenance = True
            new.maintenance_reason = previous.maintenance_reason
            new.maintenance_time.CopyFrom(previous.maintenance_time)
        if previous is not None and previous.endpoint == new.endpoint:
            # Same process registering again: keep what the control plane knows of it.
            new.health = previous.health
            new.response_time_ms = previous.response_time_ms
            new.uptime_percentage = previous.uptime_percentage
            new.register_time.CopyFrom(previous.register_time)
        else:
            new.health = (
                _HS.HEALTH_STATUS_SERVING
                if new.health_check_mode == registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY
                else _HS.HEALTH_STATUS_UNKNOWN
            )
            new.uptime_percentage = 100.0
            stamp_now(new.register_time)
        new.effective_weight = self._weights.weight_of(new)
        key = instance_key(new.service_name, new.instance_id)

        def value(lease: LeaseInfo) -> bytes:
            new.lease_id = lease.lease_id
            stamp_now(new.last_renew_time)
            return new.SerializeToString()

        # One durable write for the lease and the instance (one commit on SQLite).
        lease, result = await self._store.put_with_lease(key, value, seconds)
        if previous is not None and previous.lease_id != lease.lease_id:
            await _quietly_revoke(self._store, previous.lease_id)
        stored = self._cache.get(new.service_name, new.instance_id) or new
        return stored, _lease(lease.lease_id, lease.ttl, lease.expires_at), result.revision

    async def heartbeat(self, lease_id: str) -> registry_pb2.Lease:
        """Renew one lease; NotFound when it expired or never existed."""
        if not lease_id:
            raise InvalidArgument.from_violations([FieldViolation("lease_id", "is required")])
        info = await self._store.keep_alive(lease_id)
        self._cache.renewed(lease_id)
        return _lease(info.lease_id, info.ttl, info.expires_at)

    async def keep_alive(
        self, lease_ids: Sequence[str], *, applied_revision: int = 0
    ) -> registry_pb2.KeepAliveResponse:
        """Renew many leases; unknown or expired ones are listed, not fatal.
        ``applied_revision``: what the sender's mesh client has applied (its instances
        show it, see :meth:`InstanceCache.renewed`)."""
        if not 1 <= len(lease_ids) <= MAX_KEEP_ALIVE:
            raise InvalidArgument.from_violations(
                [
                    FieldViolation(
                        "lease_ids",
                        f"must list 1 to {MAX_KEEP_ALIVE} leases, got {len(lease_ids)}",
                    )
                ]
            )
        response = registry_pb2.KeepAliveResponse()
        renewed = self._cache.renewed
        for i, lease_id in enumerate(lease_ids):
            if i and not i % _SLICE:
                await asyncio.sleep(0)  # a full message is 1,000 renewals: let others in
            try:
                info = await self._store.keep_alive(lease_id)
            except NotFound:
                response.expired_lease_ids.append(lease_id)
            else:
                renewed(lease_id, applied_revision=applied_revision)
                response.leases.append(_lease(info.lease_id, info.ttl, info.expires_at))
        return response

    async def deregister(self, service: str, instance_id: str) -> int:
        """Remove an instance now; NotFound when it is not registered."""
        raise_if(check_name("service_name", service) + check_name("instance_id", instance_id))
        instance = self._cache.get(service, instance_id)
        if instance is None:
            raise NotFound(f"instance {instance_id!r} of service {service!r} is not registered")
        return await self._store.revoke_lease(instance.lease_id)


def _lease(lease_id: str, ttl: float, expires_at: float) -> registry_pb2.Lease:
    ttl_ns = int(ttl * 1e9)
    expires_ns = int(expires_at * 1e9)
    return registry_pb2.Lease(
        lease_id=lease_id,
        ttl=duration_pb2.Duration(seconds=ttl_ns // 1_000_000_000, nanos=ttl_ns % 1_000_000_000),
        expire_time=timestamp_pb2.Timestamp(
            seconds=expires_ns // 1_000_000_000, nanos=expires_ns % 1_000_000_000
        ),
    )


async def _quietly_revoke(store: Store, lease_id: str) -> None:
    """Revoke a lease no key uses any more; if the store refuses, it simply expires."""
    try:
        await store.revoke_lease(lease_id)
    except NotFound:
        pass
    except StoreUnavailable as exc:
        _log.warning("could not revoke unused lease %s, it will expire: %s", lease_id, exc)
