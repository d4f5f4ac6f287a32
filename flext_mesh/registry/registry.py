"""The registry: one object that wires its parts and owns their lifecycle.

- :mod:`.cache`: instances and policies fed by the store, revisions, Watch streams
  (knows no transport and no strategy);
- :mod:`.discovery`: Discover answers (pickers, splits, zones, panic), ListServices;
- :mod:`.leases`: Register, Heartbeat, KeepAlive, Deregister;
- :mod:`.weights`: health transitions, outlier ejection, call feedback, effective
  weights and their recovery;
- :mod:`.policies`: traffic policies and the per-service settings they give;
- :mod:`.maintenance`: an operator's drain of one instance, and its undrain;
- :mod:`.health` and :mod:`.outlier`: active health checks and ejection bookkeeping.

Who changes an instance: Register and Deregister (callers), SetInstanceMaintenance
(operators), lease expiry (the store's sweeper), active health transitions, outlier
ejections and releases, and the periodic refresh of response time, uptime and effective
weight. Each change is one store write and so one revision and one watch event.
"""

from __future__ import annotations

import collections
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flext_mesh.registry.cache import (
    INSTANCES,
    POLICIES,
    REGISTRY,
    InstanceCache,
    InstanceChange,
    instance_key,
)
from flext_mesh.registry.discovery import Discovered, Discovery
from flext_mesh.registry.health import HealthChecker, HealthCheckSettings
from flext_mesh.registry.health import HealthStatus as CheckStatus
from flext_mesh.registry.leases import Leases
from flext_mesh.registry.maintenance import Maintenance
from flext_mesh.registry.outlier import OutlierDetector, OutlierSettings
from flext_mesh.registry.policies import OperationLister, Policies
from flext_mesh.registry.validation import DEFAULT_TTL
from flext_mesh.registry.watch import WatchHub
from flext_mesh.registry.weights import Weights, WeightSettings
from flext_mesh.store.base import Store
from flext_mesh.v1 import registry_pb2

__all__ = [
    "INSTANCES",
    "POLICIES",
    "REGISTRY",
    "REMOVALS_KEPT",
    "REMOVALS_KEPT_SECONDS",
    "Census",
    "Discovered",
    "OperationLister",
    "Registry",
    "RegistrySettings",
    "Removal",
]

_log = logging.getLogger("flext_mesh.registry")
_HS = registry_pb2.HealthStatus

#: How long a removed instance is remembered (for a page opened after it went).
REMOVALS_KEPT_SECONDS = 300.0
#: Most removals remembered (the oldest are forgotten first).
REMOVALS_KEPT = 1000


@dataclass(frozen=True, slots=True)
class Removal:
    """An instance that left the registry: as it last was, why, and when (epoch s)."""

    instance: registry_pb2.ServiceInstance
    #: REMOVAL_REASON_LEASE_EXPIRED or REMOVAL_REASON_DEREGISTERED.
    reason: registry_pb2.RemovalReason.ValueType
    time: float


@dataclass(frozen=True, kw_only=True)
class Census:
    """What the registry holds, counted (see :meth:`Registry.census`)."""

    #: Instances by (service, version, zone, health without its enum prefix).
    instances: dict[tuple[str, str, str, str], int]
    #: Ejected instances by service (0 for a service with none).
    ejected: dict[str, int]
    #: Instances in maintenance (drained) by service (0 for a service with none).
    maintenance: dict[str, int]
    #: Distinct leases holding an instance.
    leases: int
    #: Open Watch streams.
    watchers: int


@dataclass(frozen=True, kw_only=True)
class RegistrySettings:
    """How the registry behaves; the defaults are documented on the proto fields."""

    #: Lease TTL when Register sets none, seconds.
    default_ttl: float = DEFAULT_TTL
    #: Active health checking.
    health: HealthCheckSettings = field(default_factory=HealthCheckSettings)
    #: Outlier ejection defaults.
    outlier: OutlierSettings = field(default_factory=OutlierSettings)
    #: Below this percentage of healthy instances Discover returns all of them (0: never).
    panic_threshold_percent: float = 50.0
    #: How often response time, uptime and effective weight are refreshed, seconds.
    refresh_interval: float = 5.0
    #: Seconds without a call after which an instance's call error rate and latency
    #: are forgotten (its weight goes back to base x health).
    weight_expiration: float = 30.0
    #: Events per Watch message when replaying history.
    watch_chunk: int = 500
    #: Batches a watcher may fall behind before it is cut off.
    watch_max_pending: int = 1024
    #: Seconds between progress messages on an idle Watch stream.
    watch_progress_interval: float = 10.0
    #: Distinct Discover queries whose answers are kept pre-serialized.
    discover_cache_size: int = 4096
    #: Instances one service may have; Register of one more fails RESOURCE_EXHAUSTED.
    max_instances_per_service: int = 1000


class Registry:
    """The registry domain service (no gRPC here: errors are MeshErrors)."""

    def __init__(
        self,
        store: Store,
        settings: RegistrySettings | None = None,
        *,
        operation_lister: OperationLister | None = None,
        on_split_fallback: Callable[[str, str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``operation_lister`` asks an instance which operations it serves (for policy
        validation; without one, operation timeouts are not checked against them);
        ``on_split_fallback(service, version)`` counts Discover answers that fell back;
        ``clock`` (monotonic seconds) times the expiration of call statistics."""
        self.store = store
        self.settings = s = settings or RegistrySettings()
        self.hub = WatchHub(max_pending=s.watch_max_pending)
        self.cache = InstanceCache(
            store,
            self.hub,
            watch_chunk=s.watch_chunk,
            watch_progress_interval=s.watch_progress_interval,
        )
        self.policies = Policies(
            self.cache, outlier=s.outlier, health=s.health, operation_lister=operation_lister
        )
        self.weights = Weights(
            self.cache,
            self.policies,
            OutlierDetector(s.outlier),
            WeightSettings(refresh_interval=s.refresh_interval, expiration=s.weight_expiration),
            clock=clock,
        )
        self._health = HealthChecker(s.health, self.weights.on_health)
        self.weights.health = self._health
        self.leases = Leases(
            self.cache,
            self.weights,
            default_ttl=s.default_ttl,
            max_instances_per_service=s.max_instances_per_service,
        )
        self.maintenance = Maintenance(self.cache, self.weights)
        self.discovery = Discovery(
            self.cache,
            panic_threshold_percent=s.panic_threshold_percent,
            cache_size=s.discover_cache_size,
            on_split_fallback=on_split_fallback,
        )
        # True once the start-up snapshot is loaded (changes then re-track health checks).
        self._loaded = False
        self._removals: collections.deque[Removal] = collections.deque(maxlen=REMOVALS_KEPT)
        self.cache.on_instance(self._on_instance)
        self.cache.on_policy(self._on_policy)
        # The API the servicer, the dashboard and the metrics service use; each part
        # documents its calls.
        self.register = self.leases.register
        self.heartbeat = self.leases.heartbeat
        self.keep_alive = self.leases.keep_alive
        self.deregister = self.leases.deregister
        self.set_maintenance = self.maintenance.set
        self.record_call = self.weights.record_call
        self.set_call_stats = self.weights.set_call_stats
        self.refresh = self.weights.refresh
        self.policy = self.policies.policy
        self.get_policy = self.policies.get
        self.put_policy = self.policies.put
        self.delete_policy = self.policies.delete
        self.discover = self.discovery.discover
        self.list_services = self.discovery.list_services
        self.watch = self.cache.watch

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Load the registry from the store, start health checks and background work."""
        await self.cache.start()
        self._loaded = True
        self._health.start()
        for service in self.cache.services.values():
            for instance in service.values():
                self._track(instance)
        self.weights.start()
        _log.info(
            "registry loaded services=%d instances=%d revision=%d",
            len(self.cache.services),
            sum(len(s) for s in self.cache.services.values()),
            self.cache.revision,
        )

    async def stop(self) -> None:
        """Stop background work, health checks and every watch stream."""
        await self.weights.stop()
        await self._health.aclose()
        self.cache.stop()
        self.discovery.close()

    # -- active health checks follow the cache -------------------------------------

    def _on_instance(self, change: InstanceChange) -> None:
        if change.new is None:
            self._health.untrack(instance_key(change.service, change.instance_id))
            if change.old is not None:
                reason = (
                    registry_pb2.REMOVAL_REASON_LEASE_EXPIRED
                    if change.expired
                    else registry_pb2.REMOVAL_REASON_DEREGISTERED
                )
                self._removals.append(Removal(change.old, reason, time.time()))
            return
        old, new = change.old, change.new
        if self._loaded and (
            old is None
            or old.endpoint != new.endpoint
            or old.health_check_mode != new.health_check_mode
        ):
            self._track(new)

    def _on_policy(self, service: str) -> None:
        if self._loaded:  # health checks follow the service's new settings
            for instance in self.cache.instances(service).values():
                self._track(instance)

    def _track(self, instance: registry_pb2.ServiceInstance) -> None:
        key = instance_key(instance.service_name, instance.instance_id)
        if instance.health_check_mode == registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY:
            self._health.untrack(key)
            return
        known = (_HS.HEALTH_STATUS_SERVING, _HS.HEALTH_STATUS_NOT_SERVING)
        initial = CheckStatus(instance.health) if instance.health in known else CheckStatus.UNKNOWN
        self._health.track(
            key,
            instance.endpoint,
            initial=initial,
            settings=self.policies.settings_of(instance.service_name)[1],
        )

    # -- reads ---------------------------------------------------------------------

    def service_of_lease(self, lease_id: str) -> str | None:
        """The service whose instance ``lease_id`` keeps registered; None if none."""
        owner = self.cache.owner_of(lease_id)
        return owner[0] if owner is not None else None

    def get(self, service: str, instance_id: str) -> registry_pb2.ServiceInstance | None:
        """The cached instance, or None."""
        return self.cache.get(service, instance_id)

    def explain(
        self, service: str, in_answer: Iterable[str] = ()
    ) -> list[registry_pb2.WeightExplanation]:
        """Why each instance of ``service`` weighs what it does, sorted by instance id;
        ``in_answer``: the instance ids a Discover answer holds."""
        answered = set(in_answer)
        policy = self.cache.policies.get(service)
        splits = {s.version: s.weight for s in policy.splits} if policy is not None else {}
        out = []
        for instance_id, instance in sorted(self.cache.instances(service).items()):
            explained = self.weights.explain(instance)
            explained.split_weight = splits.get(instance.version, 0)
            explained.in_answer = instance_id in answered
            out.append(explained)
        return out

    def recently_removed(self, now: float | None = None) -> list[Removal]:
        """Instances removed in the last REMOVALS_KEPT_SECONDS (at most REMOVALS_KEPT,
        as this replica saw them go), the latest removal of each, oldest first; an
        instance registered again since is left out."""
        now = time.time() if now is None else now
        since = now - REMOVALS_KEPT_SECONDS
        removals = self._removals
        while removals and removals[0].time < since:
            removals.popleft()
        latest: dict[tuple[str, str], Removal] = {}
        for removal in removals:
            instance = removal.instance
            latest[(instance.service_name, instance.instance_id)] = removal
        return sorted(
            (r for key, r in latest.items() if self.cache.get(*key) is None),
            key=lambda r: r.time,
        )

    def census(self) -> Census:
        """Counts of what the registry holds (for gauges; O(instances), on the loop)."""
        instances: collections.Counter[tuple[str, str, str, str]] = collections.Counter()
        ejected: collections.Counter[str] = collections.Counter()
        drained: collections.Counter[str] = collections.Counter()
        leases: set[str] = set()
        health_name = _HS.Name
        for service, by_id in self.cache.services.items():
            ejected[service] += 0  # a series at 0, so "none ejected" is data too
            drained[service] += 0
            for instance in by_id.values():
                health = health_name(instance.health).removeprefix("HEALTH_STATUS_")
                instances[service, instance.version, instance.zone, health] += 1
                if instance.ejected:
                    ejected[service] += 1
                if instance.maintenance:
                    drained[service] += 1
                if instance.lease_id:
                    leases.add(instance.lease_id)
        return Census(
            instances=dict(instances),
            ejected=dict(ejected),
            maintenance=dict(drained),
            leases=len(leases),
            watchers=len(self.hub),
        )

    @property
    def revision(self) -> int:
        """The latest registry revision applied to the cache."""
        return self.cache.revision
