"""Maintenance: an operator drains one instance (no new calls) and undrains it.

A drained instance keeps its registration and its lease; the flag, its reason and
when it began are fields of the stored ``ServiceInstance``, so they survive a restart
of the control plane, and every other writer of the instance (health transitions,
ejections, weight refreshes, a Register of the same instance) carries them over. Its
effective weight is 0 (see :meth:`Weights.weight_of`), Discover with ``healthy_only``
leaves it out, and the change is one store write: one revision and one
``WATCH_EVENT_TYPE_MAINTENANCE_CHANGED`` event, which mesh clients act on.
"""

from __future__ import annotations

from flext_mesh.errors import FieldViolation, NotFound, Unavailable
from flext_mesh.names import check_length, check_name, elide, raise_if
from flext_mesh.registry.cache import InstanceCache, instance_key, stamp_now
from flext_mesh.registry.weights import Weights
from flext_mesh.store.base import Compare, Put
from flext_mesh.v1 import registry_pb2

__all__ = ["MAX_REASON", "Maintenance"]

#: Longest maintenance reason, in characters.
MAX_REASON = 256
#: Writes tried when another writer changes the instance at the same moment.
_ATTEMPTS = 5


def _validate(
    service: str, instance_id: str, maintenance: bool, reason: str
) -> list[FieldViolation]:
    violations = check_name("service_name", service) + check_name("instance_id", instance_id)
    length = check_length("reason", reason, MAX_REASON)
    violations += length
    if not length and any(ch < " " or ch == "\x7f" for ch in reason):
        violations.append(FieldViolation("reason", "must not hold control characters"))
    if reason and not maintenance:
        violations.append(
            FieldViolation("reason", "is only taken with maintenance=true (draining)")
        )
    return violations


class Maintenance:
    """Puts instances in maintenance and takes them out (SetInstanceMaintenance)."""

    def __init__(self, cache: InstanceCache, weights: Weights) -> None:
        self._cache = cache
        self._weights = weights

    async def set(
        self, service: str, instance_id: str, maintenance: bool, reason: str = ""
    ) -> tuple[registry_pb2.ServiceInstance, int]:
        """Drain (``maintenance``) or undrain an instance; (the instance as stored, the
        revision of the change, or its current one when nothing changed). NotFound when
        it is not registered."""
        raise_if(_validate(service, instance_id, maintenance, reason))
        key = instance_key(service, instance_id)
        async with self._cache.write_lock(service, instance_id):
            for _ in range(_ATTEMPTS):
                instance = self._cache.get(service, instance_id)
                if instance is None:
                    raise NotFound(
                        f"instance {elide(instance_id)!r} of service {elide(service)!r} is not "
                        "registered"
                    )
                if instance.maintenance == maintenance and instance.maintenance_reason == reason:
                    return instance, instance.revision
                changed = registry_pb2.ServiceInstance()
                changed.CopyFrom(instance)
                changed.maintenance = maintenance
                changed.maintenance_reason = reason
                if not maintenance:
                    changed.ClearField("maintenance_time")
                elif not instance.maintenance:
                    stamp_now(changed.maintenance_time)
                changed.effective_weight = self._weights.weight_of(changed)
                changed.ClearField("revision")
                try:
                    result = await self._cache.store.txn(
                        (Compare(key, instance.revision),),
                        (Put(key, changed.SerializeToString(), instance.lease_id),),
                    )
                except NotFound:  # its lease expired meanwhile: the instance is leaving
                    raise NotFound(
                        f"instance {elide(instance_id)!r} of service {elide(service)!r} is not "
                        "registered (its lease expired)"
                    ) from None
                if result.succeeded:
                    # The cache holds every write before the writer's call returns.
                    stored = self._cache.get(service, instance_id)
                    return (stored if stored is not None else changed), result.revision
        raise Unavailable(
            f"instance {instance_id!r} of service {service!r} kept changing while its "
            "maintenance was being set; try again"
        )
