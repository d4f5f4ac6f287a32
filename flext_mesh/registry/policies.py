"""Traffic policies: validated, versioned writes, and the settings they give a service.

A policy is stored under ``/registry/policies/<service>``; the cache follows it like any
instance. This module checks a policy against what is registered (split versions must
exist, timed operations must be served), bumps its version under a compare-and-swap,
and turns it into the service's outlier-ejection and health-check settings over the
control plane's flags.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

from flext_mesh.errors import FailedPrecondition, FieldViolation, MeshError, NotFound
from flext_mesh.names import check_name, raise_if
from flext_mesh.registry.cache import POLICIES, InstanceCache
from flext_mesh.registry.discovery import is_healthy
from flext_mesh.registry.health import HealthCheckSettings
from flext_mesh.registry.outlier import OutlierSettings
from flext_mesh.routing.policy import (
    MAX_OPERATION_TIMEOUTS,
    MAX_SPLITS,
    known_versions,
    validate_policy,
)
from flext_mesh.store.base import Compare, Put
from flext_mesh.v1 import registry_pb2

__all__ = ["OperationLister", "Policies"]

_log = logging.getLogger("flext_mesh.registry")

#: Asks one instance which operations it serves (ProcessorService.ListOperations).
OperationLister = Callable[[registry_pb2.ServiceInstance], Awaitable[set[str]]]


class Policies:
    """Stores policies and derives per-service settings from them."""

    def __init__(
        self,
        cache: InstanceCache,
        *,
        outlier: OutlierSettings,
        health: HealthCheckSettings,
        operation_lister: OperationLister | None = None,
    ) -> None:
        """``outlier`` and ``health`` are the flags' defaults a policy overrides;
        ``operation_lister`` checks timed operations (unchecked without one)."""
        self._cache = cache
        self._outlier = outlier
        self._health = health
        self._operation_lister = operation_lister
        self._settings: dict[str, tuple[OutlierSettings, HealthCheckSettings]] = {}
        cache.on_policy(self._forget)

    def _forget(self, service: str) -> None:
        self._settings.pop(service, None)

    def policy(self, service: str) -> registry_pb2.ServicePolicy | None:
        """The service's policy as last committed, or None."""
        return self._cache.policies.get(service)

    def get(self, service: str) -> registry_pb2.ServicePolicy:
        """The stored policy; NotFound when none."""
        raise_if(check_name("service_name", service))
        policy = self._cache.policies.get(service)
        if policy is None:
            raise NotFound(f"service {service!r} has no policy")
        return policy

    async def put(
        self, policy: registry_pb2.ServicePolicy, expected_version: int = 0
    ) -> registry_pb2.ServicePolicy:
        """Validate and store a policy (version + 1); the previous one stays on error."""
        violations = validate_policy(policy)
        if (
            len(policy.splits) > MAX_SPLITS
            or len(policy.operation_timeouts) > MAX_OPERATION_TIMEOUTS
        ):
            raise_if(violations)  # not worth checking against the registry entry by entry
        name = policy.service_name
        instances = list(self._cache.instances(name).values())
        versions = known_versions(instances)
        have = _some(sorted(versions))
        for i, split in enumerate(policy.splits):
            if split.version and split.version not in versions:
                violations.append(
                    FieldViolation(
                        f"policy.splits[{i}].version",
                        f"no instance of {name!r} has version {split.version!r} "
                        f"(registered versions: {have})",
                    )
                )
        if policy.operation_timeouts:
            violations += await self._check_operations(policy, instances)
        raise_if(violations)
        store = self._cache.store
        key = POLICIES + name
        current = await store.get(key)
        stored_version = (
            registry_pb2.ServicePolicy.FromString(current.value).version if current else 0
        )
        if expected_version and expected_version != stored_version:
            raise FailedPrecondition(
                f"policy of {name!r} is at version {stored_version}, not {expected_version}"
            )
        new = registry_pb2.ServicePolicy()
        new.CopyFrom(policy)
        new.version = stored_version + 1
        new.update_time.GetCurrentTime()
        new.ClearField("revision")
        result = await store.txn(
            [Compare(key, current.mod_revision if current else 0)],
            [Put(key, new.SerializeToString())],
        )
        if not result.succeeded:
            raise FailedPrecondition(f"policy of {name!r} changed meanwhile; read it and retry")
        new.revision = result.revision
        _log.info("policy stored service=%s version=%d", name, new.version)
        return new

    async def _check_operations(
        self, policy: registry_pb2.ServicePolicy, instances: list[registry_pb2.ServiceInstance]
    ) -> list[FieldViolation]:
        if self._operation_lister is None:
            return []
        name = policy.service_name
        candidates = sorted(instances, key=lambda i: (not is_healthy(i), i.instance_id))
        known: set[str] | None = None
        for instance in candidates[:3]:
            try:
                known = await self._operation_lister(instance)
                break
            except MeshError:
                continue
        if known is None:
            return [
                FieldViolation(
                    "policy.operation_timeouts",
                    f"cannot check the operations: no instance of {name!r} answered ListOperations",
                )
            ]
        return [
            FieldViolation(
                f"policy.operation_timeouts[{operation!r}]",
                f"{name!r} has no operation {operation!r} (known: "
                f"{', '.join(sorted(known)) or 'none'})",
            )
            for operation in sorted(policy.operation_timeouts)
            if operation not in known
        ]

    async def delete(self, service: str) -> int:
        """Delete a service's policy; NotFound when it has none."""
        raise_if(check_name("service_name", service))
        revision = await self._cache.store.delete(POLICIES + service)
        if revision is None:
            raise NotFound(f"service {service!r} has no policy")
        _log.info("policy deleted service=%s", service)
        return revision

    def settings_of(self, service: str) -> tuple[OutlierSettings, HealthCheckSettings]:
        """The service's outlier and health-check settings: its policy over the flags."""
        cached = self._settings.get(service)
        if cached is not None:
            return cached
        outlier, checks = self._outlier, self._health
        policy = self._cache.policies.get(service)
        if policy is not None and policy.HasField("outlier_detection"):
            od = policy.outlier_detection
            base = (
                od.base_ejection_time.ToNanoseconds() / 1e9
                if od.HasField("base_ejection_time")
                else outlier.base_ejection_time
            )
            outlier = replace(
                outlier,
                consecutive_failures=od.consecutive_failures or outlier.consecutive_failures,
                base_ejection_time=base,
                max_ejection_time=max(
                    base,
                    od.max_ejection_time.ToNanoseconds() / 1e9
                    if od.HasField("max_ejection_time")
                    else outlier.max_ejection_time,
                ),
                max_ejection_percent=(
                    od.max_ejection_percent
                    if od.HasField("max_ejection_percent")
                    else outlier.max_ejection_percent
                ),
            )
        if policy is not None and policy.HasField("health_check"):
            hc = policy.health_check
            interval = (
                hc.interval.ToNanoseconds() / 1e9 if hc.HasField("interval") else checks.interval
            )
            checks = replace(
                checks,
                interval=interval,
                timeout=min(
                    interval,
                    hc.timeout.ToNanoseconds() / 1e9 if hc.HasField("timeout") else checks.timeout,
                ),
                unhealthy_threshold=hc.unhealthy_threshold or checks.unhealthy_threshold,
                healthy_threshold=hc.healthy_threshold or checks.healthy_threshold,
            )
        self._settings[service] = (outlier, checks)
        return outlier, checks


def _some(names: list[str], most: int = 10) -> str:
    """The first ``most`` names, and how many more: a message stays short however many
    versions a service has."""
    if not names:
        return "none"
    shown = ", ".join(names[:most])
    return f"{shown} and {len(names) - most} more" if len(names) > most else shown
