"""Weights: what calls and health checks say about each instance, written back to it.

Inputs: call reports (the metrics service hands over each instance's infrastructure
error rate and mean latency every few seconds), call outcomes one by one (outlier
ejection), and active health-check transitions and round trips. Outputs: store writes
of the instance's health, response time, uptime, ejection and effective weight (see
:mod:`flext_mesh.routing.balancer` for the formula), each one revision and one watch
event.

Weights recover: an instance that got no call for :attr:`WeightSettings.expiration`
seconds (30 s by default) forgets its call error rate and call latency, so its error
and latency factors go back to 1 and its effective weight to base x health (as gRPC's
weighted round robin, A58, expires stale weights after ``weight_expiration_period``).
Health-check round trips keep informing its response time meanwhile.

Periodic work walks every instance in slices and yields to the event loop between
them, so 10,000 instances never hold the loop for long.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

from flext_mesh.errors import MeshError, NotFound
from flext_mesh.logs import log_failure
from flext_mesh.registry.cache import InstanceCache, InstanceChange, instance_key, split_key
from flext_mesh.registry.health import HealthChecker, HealthTransition
from flext_mesh.registry.outlier import OutlierDetector
from flext_mesh.registry.policies import Policies
from flext_mesh.routing.balancer import (
    effective_weight,
    health_factor,
    performance_factors,
    performance_multiplier,
)
from flext_mesh.store.base import Compare, Put
from flext_mesh.v1 import registry_pb2

__all__ = ["WeightSettings", "Weights"]

_log = logging.getLogger("flext_mesh.registry")
_HS = registry_pb2.HealthStatus
#: Instances handled between two yields to the event loop.
_SLICE = 500


@dataclass(frozen=True, kw_only=True)
class WeightSettings:
    """How weights are refreshed and how long call statistics count."""

    #: Seconds between refreshes of response time, uptime and effective weight.
    refresh_interval: float = 5.0
    #: Seconds without a call after which an instance's call statistics are forgotten.
    expiration: float = 30.0


class Weights:
    """Keeps instances' health, response time, ejection and effective weight current."""

    def __init__(
        self,
        cache: InstanceCache,
        policies: Policies,
        outliers: OutlierDetector,
        settings: WeightSettings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``clock`` (monotonic seconds) times call statistics' expiration."""
        self._cache = cache
        self._policies = policies
        self._outliers = outliers
        self.settings = settings or WeightSettings()
        self._clock = clock
        self.health: HealthChecker | None = None
        """The active health checker whose round trips feed response times."""
        self._error_rates: dict[tuple[str, str], float] = {}
        self._call_latency: dict[tuple[str, str], float] = {}
        self._last_call: dict[tuple[str, str], float] = {}
        # Instances whose call latency expired: their response time falls back to the
        # health checks' round trips, or to unknown.
        self._stale_latency: set[tuple[str, str]] = set()
        # Median response time per service, recomputed by refresh(): weights use it.
        self._medians: dict[str, float] = {}
        self._tasks: list[asyncio.Task[None]] = []
        cache.on_instance(self._forget)

    def start(self) -> None:
        """Start the periodic refresh and the release of ejected instances."""
        self._tasks = [
            asyncio.create_task(self._refresh_forever(), name="registry-refresh"),
            asyncio.create_task(self._release_forever(), name="registry-outlier-release"),
        ]

    async def stop(self) -> None:
        """Stop the background work."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()

    def _forget(self, change: InstanceChange) -> None:
        if change.new is not None:
            return
        ident = (change.service, change.instance_id)
        self._outliers.forget(*ident)
        self._error_rates.pop(ident, None)
        self._call_latency.pop(ident, None)
        self._last_call.pop(ident, None)
        self._stale_latency.discard(ident)

    def explain(self, instance: registry_pb2.ServiceInstance) -> registry_pb2.WeightExplanation:
        """The factors of ``instance``'s effective weight, from what is known now (the
        same inputs and rules as :meth:`weight_of`)."""
        median = self._medians.get(instance.service_name, 0.0)
        error_rate = self._error_rates.get((instance.service_name, instance.instance_id), 0.0)
        latency, errors = performance_factors(instance.response_time_ms, median, error_rate)
        health = health_factor(instance.health, instance.ejected)
        explained = registry_pb2.WeightExplanation(
            instance_id=instance.instance_id,
            version=instance.version,
            zone=instance.zone,
            base_weight=instance.weight,
            health=instance.health,
            health_factor=health,
            ejected=instance.ejected,
            response_time_ms=instance.response_time_ms,
            service_median_ms=median,
            latency_factor=latency,
            infrastructure_error_rate=error_rate,
            error_factor=errors,
            effective_weight=self.weight_of(instance),
            maintenance=instance.maintenance,
            maintenance_factor=0.0 if instance.maintenance else 1.0,
            maintenance_reason=instance.maintenance_reason,
        )
        if instance.ejected and instance.HasField("ejected_until"):
            explained.ejected_until.CopyFrom(instance.ejected_until)
        return explained

    def weight_of(self, instance: registry_pb2.ServiceInstance) -> float:
        """The instance's effective weight from what is known now (0 in maintenance)."""
        if instance.maintenance:
            return 0.0
        median = self._medians.get(instance.service_name, 0.0)
        error_rate = self._error_rates.get((instance.service_name, instance.instance_id), 0.0)
        perf = performance_multiplier(instance.response_time_ms, median, error_rate)
        return effective_weight(instance.weight, instance.health, instance.ejected, perf)

    async def rewrite(
        self, instance: registry_pb2.ServiceInstance, changed: registry_pb2.ServiceInstance
    ) -> None:
        """Write ``changed`` if ``instance`` is still the stored version (else skip)."""
        changed.ClearField("revision")
        key = instance_key(instance.service_name, instance.instance_id)
        # NotFound: the lease expired meanwhile, so the instance is gone anyway.
        with contextlib.suppress(NotFound):
            await self._cache.store.txn(
                (Compare(key, instance.revision),),
                (Put(key, changed.SerializeToString(), instance.lease_id),),
            )

    # -- inputs ----------------------------------------------------------------------

    async def on_health(self, key: str, transition: HealthTransition) -> None:
        """An active health check changed an instance's status."""
        service, instance_id = split_key(key)
        instance = self._cache.get(service, instance_id)
        if instance is None:
            return
        changed = registry_pb2.ServiceInstance()
        changed.CopyFrom(instance)
        changed.health = _HS.ValueType(int(transition.new))
        stats = transition.stats
        changed.uptime_percentage = stats.uptime_percentage
        if stats.ewma_latency_ms > 0:
            changed.response_time_ms = stats.ewma_latency_ms
        changed.effective_weight = self.weight_of(changed)
        _log.info(
            "instance health service=%s instance=%s %s->%s reason=%s",
            service,
            instance_id,
            transition.old.name,
            transition.new.name,
            transition.reason,
        )
        await self.rewrite(instance, changed)

    async def record_call(
        self,
        service: str,
        instance_id: str,
        *,
        infrastructure_failure: bool,
        latency_ms: float | None = None,
        error_rate: float | None = None,
    ) -> None:
        """Feed one call outcome (from the metrics service) to outlier ejection.

        Business rejections must be passed as successes (``infrastructure_failure``
        False): only infrastructure faults count against an instance.
        """
        instance = self._cache.get(service, instance_id)
        if instance is None:
            return
        ident = (service, instance_id)
        self._last_call[ident] = self._clock()
        self._stale_latency.discard(ident)
        if error_rate is not None:
            self._error_rates[ident] = error_rate
        ejection = self._outliers.record(
            service,
            instance_id,
            ok=not infrastructure_failure,
            service_size=len(self._cache.instances(service)),
            settings=self._policies.settings_of(service)[0],
        )
        if ejection is None:
            return
        changed = registry_pb2.ServiceInstance()
        changed.CopyFrom(instance)
        changed.ejected = True
        changed.ejected_until.FromNanoseconds(int((time.time() + ejection.duration) * 1e9))
        changed.effective_weight = 0.0
        _log.info(
            "instance ejected service=%s instance=%s for=%.0fs times=%d",
            service,
            instance_id,
            ejection.duration,
            ejection.times_ejected,
        )
        await self.rewrite(instance, changed)

    def set_call_stats(
        self, service: str, instance_id: str, error_rate: float, latency_ms: float | None
    ) -> None:
        """Recent calls of an instance, from call reports: infrastructure error rate
        (0 to 1) and mean latency. They set its performance multiplier at the next
        refresh; the latency is folded into its response time (EWMA, alpha 0.3) and is
        preferred there over health-check round trips."""
        if self._cache.get(service, instance_id) is None:
            return
        key = (service, instance_id)
        self._last_call[key] = self._clock()
        self._stale_latency.discard(key)
        self._error_rates[key] = min(max(error_rate, 0.0), 1.0)
        if latency_ms is not None and latency_ms >= 0:
            previous = self._call_latency.get(key)
            self._call_latency[key] = (
                latency_ms if previous is None else 0.3 * latency_ms + 0.7 * previous
            )

    # -- periodic work -------------------------------------------------------------------

    async def _release_forever(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for service, instance_id in self._outliers.release_due():
                instance = self._cache.get(service, instance_id)
                if instance is None or not instance.ejected:
                    continue
                changed = registry_pb2.ServiceInstance()
                changed.CopyFrom(instance)
                changed.ejected = False
                changed.ClearField("ejected_until")
                changed.effective_weight = self.weight_of(changed)
                _log.info("instance released service=%s instance=%s", service, instance_id)
                await self.rewrite(instance, changed)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_interval)
            try:
                await self.refresh()
            except Exception as exc:
                log_failure(_log, "registry refresh failed", exc, expected=(MeshError,))

    def _expire(self) -> None:
        """Forget call statistics of instances that got no call for the expiration."""
        horizon = self._clock() - self.settings.expiration
        stale = [key for key, at in self._last_call.items() if at <= horizon]
        for key in stale:
            del self._last_call[key]
            self._error_rates.pop(key, None)
            if self._call_latency.pop(key, None) is not None:
                self._stale_latency.add(key)

    async def refresh(self) -> int:
        """Write instances whose response time, uptime or effective weight moved.

        Thresholds: effective weight by more than 5%, uptime by a point or more,
        response time by more than 20% (and 1 ms). Returns how many were written.
        """
        self._expire()
        written = 0
        # First the fresh measurements, then the service medians from them, then weights:
        # a latency change moves the weights in the same refresh.
        updates: list[tuple[registry_pb2.ServiceInstance, registry_pb2.ServiceInstance]] = []
        handled = 0
        for name, service in list(self._cache.services.items()):
            known: list[float] = []
            for instance in list(service.values()):
                handled += 1
                if handled % _SLICE == 0:
                    await asyncio.sleep(0)
                changed = self._measured(instance)
                if changed is None:
                    continue
                if changed.response_time_ms > 0:
                    known.append(changed.response_time_ms)
                updates.append((instance, changed))
            self._medians[name] = statistics.median(known) if known else 0.0
        for name in list(self._medians):
            if name not in self._cache.services:
                del self._medians[name]
        for i, (instance, changed) in enumerate(updates):
            if i % _SLICE == _SLICE - 1:
                await asyncio.sleep(0)
            changed.effective_weight = self.weight_of(changed)
            if _moved(instance, changed):
                await self.rewrite(instance, changed)
                written += 1
        return written

    def _measured(
        self, instance: registry_pb2.ServiceInstance
    ) -> registry_pb2.ServiceInstance | None:
        """A copy of the instance with fresh measurements; None when nothing is known."""
        ident = (instance.service_name, instance.instance_id)
        stats = self.health.stats(instance_key(*ident)) if self.health is not None else None
        call_latency = self._call_latency.get(ident)
        stale = ident in self._stale_latency
        if (
            stats is None
            and call_latency is None
            and not stale
            and not instance.response_time_ms
            and ident not in self._error_rates
            and instance.effective_weight == self.weight_of(instance)
        ):
            return None  # nothing measured: its weight cannot have moved
        changed = registry_pb2.ServiceInstance()
        changed.CopyFrom(instance)
        if stale:
            self._stale_latency.discard(ident)
            changed.response_time_ms = 0.0
        if stats is not None and stats.total_checks:
            changed.uptime_percentage = stats.uptime_percentage
            if stats.ewma_latency_ms > 0:
                changed.response_time_ms = stats.ewma_latency_ms
        if call_latency is not None:
            changed.response_time_ms = call_latency
        return changed


def _moved(old: registry_pb2.ServiceInstance, new: registry_pb2.ServiceInstance) -> bool:
    ow, nw = old.effective_weight, new.effective_weight
    if (ow == 0) != (nw == 0) or (ow and abs(nw - ow) / ow > 0.05):
        return True
    if abs(new.uptime_percentage - old.uptime_percentage) >= 1.0:
        return True
    ort, nrt = old.response_time_ms, new.response_time_ms
    return abs(nrt - ort) > max(1.0, 0.2 * ort)
