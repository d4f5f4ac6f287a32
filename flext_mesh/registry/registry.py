"""The registry: instances under leases, their health and weights, discovery and watch.

State lives in the Store under ``/registry/instances/<service>/<instance id>`` (a
serialized ServiceInstance attached to the instance's lease). An in-memory cache is fed
by a store listener, so it holds every write before the writer's call returns, and
every change reaches Watch streams through one shared fan-out (:mod:`.watch`).

Who changes an instance: Register and Deregister (callers), lease expiry (the store's
sweeper), active health transitions (:mod:`.health`), outlier ejections and releases
(:mod:`.outlier`), and a periodic refresh of response time, uptime and effective
weight. Each change is one store write and so one revision and one watch event.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import statistics
import time
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace

from google.protobuf import duration_pb2, timestamp_pb2
from google.protobuf.message import DecodeError

from flext_mesh.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    MeshError,
    NotFound,
    ResourceExhausted,
    StoreUnavailable,
)
from flext_mesh.registry.health import HealthChecker, HealthCheckSettings, HealthTransition
from flext_mesh.registry.health import HealthStatus as CheckStatus
from flext_mesh.registry.outlier import OutlierDetector, OutlierSettings
from flext_mesh.registry.validation import (
    DEFAULT_TTL,
    DEFAULT_WEIGHT,
    check_name,
    raise_if,
    validate_instance,
    validate_ttl,
)
from flext_mesh.registry.watch import Watcher, WatchHub, make_batch
from flext_mesh.routing.balancer import (
    Candidate,
    Picker,
    Strategy,
    effective_weight,
    in_panic,
    performance_multiplier,
)
from flext_mesh.routing.policy import (
    SplitPicker,
    apply_split,
    apply_zone,
    known_versions,
    split_versions,
    validate_policy,
)
from flext_mesh.store import (
    Compacted,
    Compare,
    Event,
    EventType,
    KeyValue,
    Put,
    Store,
    StoreOpenError,
    follow,
)
from flext_mesh.v1 import registry_pb2

__all__ = ["INSTANCES", "Registry", "RegistrySettings"]

_log = logging.getLogger("flext_mesh.registry")

#: Store prefix of everything the registry keeps (instances and policies).
REGISTRY = "/registry/"
#: Store prefix of instances.
INSTANCES = "/registry/instances/"
#: Traffic policies, one key a service: ``/registry/policies/<service>``.
POLICIES = "/registry/policies/"
#: Asks one instance which operations it serves (ProcessorService.ListOperations).
OperationLister = Callable[[registry_pb2.ServiceInstance], Awaitable[set[str]]]

_HS = registry_pb2.HealthStatus
_HEALTHY = frozenset({_HS.HEALTH_STATUS_SERVING, _HS.HEALTH_STATUS_UNKNOWN})
_REG_FIELDS = (
    "endpoint",
    "version",
    "type",
    "zone",
    "labels",
    "capabilities",
    "weight",
    "health_check_mode",
    "metadata",
)
_WE = registry_pb2.WatchEventType


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


@dataclass(slots=True)
class _Answer:
    """A Discover query's answer in encoded parts, joined per call in the picked order.

    A repeated message field on the wire is the concatenation of its encoded elements,
    so an answer is ``header`` followed by the ``instances`` entries in any order: each
    call costs one O(n) join, and memory is linear in the instances.
    """

    revision: int
    picker: Picker | None
    header: bytes
    instances: list[bytes]
    limit: int = 0
    split_fallback: bool = False

    def encode(self) -> bytes:
        """The serialized DiscoverResponse led by the picker's next pick."""
        if self.picker is None:
            return self.header
        order = self.picker.order(self.picker.pick())
        if self.limit:
            order = order[: self.limit]
        instances = self.instances
        return self.header + b"".join([instances[i] for i in order])


#: Tag of DiscoverResponse.instances (field 1, length-delimited).
_INSTANCES_TAG = b"\x0a"


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _encoded_field(instance: registry_pb2.ServiceInstance) -> bytes:
    """``instance`` as one encoded element of DiscoverResponse.instances."""
    data = instance.SerializeToString()
    return _INSTANCES_TAG + _varint(len(data)) + data


def _key(service: str, instance_id: str) -> str:
    return f"{INSTANCES}{service}/{instance_id}"


def _split(key: str) -> tuple[str, str]:
    service, _, instance_id = key[len(INSTANCES) :].partition("/")
    return service, instance_id


def _now_ts() -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.GetCurrentTime()
    return ts


class Registry:
    """The registry domain service (no gRPC here: errors are MeshErrors)."""

    def __init__(
        self,
        store: Store,
        settings: RegistrySettings | None = None,
        *,
        operation_lister: OperationLister | None = None,
        on_split_fallback: Callable[[str, str], None] | None = None,
    ) -> None:
        """``operation_lister`` asks an instance which operations it serves (for policy
        validation; without one, operation timeouts are not checked against them);
        ``on_split_fallback(service, version)`` counts Discover answers that fell back."""
        self.store = store
        self.settings = settings or RegistrySettings()
        self.hub = WatchHub(max_pending=self.settings.watch_max_pending)
        self._services: dict[str, dict[str, registry_pb2.ServiceInstance]] = {}
        self._service_revision: dict[str, int] = {}
        self._revision = 0
        self._answers: OrderedDict[tuple[object, ...], _Answer] = OrderedDict()
        self._health = HealthChecker(self.settings.health, self._on_health)
        self._outliers = OutlierDetector(self.settings.outlier)
        self._error_rates: dict[tuple[str, str], float] = {}
        self._call_latency: dict[tuple[str, str], float] = {}
        # Median response time per service, recomputed by refresh(): weights use it.
        self._medians: dict[str, float] = {}
        self._unlisten: list[Callable[[], None]] = []
        self._policies: dict[str, registry_pb2.ServicePolicy] = {}
        self._splits: dict[str, SplitPicker] = {}
        self._operation_lister = operation_lister
        self._on_split_fallback = on_split_fallback
        # Per-service outlier and health settings derived from policies (cached).
        self._service_settings: dict[str, tuple[OutlierSettings, HealthCheckSettings]] = {}
        # Events that arrive while the start-up snapshot is read; replayed after it.
        # True once the start-up snapshot is loaded (policy changes then re-track).
        self._loaded = False
        # Instance ids with a Register in flight (how many), per service: each holds a
        # slot of the service's limit until it is in the cache (no overshoot under load).
        self._joining: dict[str, Counter[str]] = {}
        self._tasks: list[asyncio.Task[None]] = []
        # (service, instance id) -> (the cached instance object, its encoded element).
        self._encodings: dict[tuple[str, str], tuple[registry_pb2.ServiceInstance, bytes]] = {}
        # Lease id -> service name of the instance it keeps registered.
        self._lease_owners: dict[str, str] = {}

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Load the registry from the store, start health checks and background work."""
        revision, unlisten = await follow(self.store, REGISTRY, self._load, self._apply)
        self._unlisten.append(unlisten)
        self._revision = max(self._revision, revision)
        self._loaded = True
        self._health.start()
        for service in self._services.values():
            for instance in service.values():
                self._track(instance)
        self._tasks = [
            asyncio.create_task(self._refresh_forever(), name="registry-refresh"),
            asyncio.create_task(self._release_forever(), name="registry-outlier-release"),
        ]
        _log.info(
            "registry loaded services=%d instances=%d revision=%d",
            len(self._services),
            sum(len(s) for s in self._services.values()),
            self._revision,
        )

    async def stop(self) -> None:
        """Stop background work, health checks and every watch stream."""
        for stop in self._unlisten:
            stop()
        self._unlisten.clear()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        await self._health.aclose()
        self.hub.close_all()

    # -- the cache, fed by the store ---------------------------------------------

    def service_of_lease(self, lease_id: str) -> str | None:
        """The service whose instance ``lease_id`` keeps registered; None if none."""
        return self._lease_owners.get(lease_id)

    def _load(self, kvs: list[KeyValue]) -> None:
        """The start-up snapshot: every instance and policy into the cache."""
        for kv in kvs:
            try:
                if kv.key.startswith(POLICIES):
                    policy = registry_pb2.ServicePolicy.FromString(kv.value)
                    policy.revision = kv.mod_revision
                    self._policies[policy.service_name] = policy
                    continue
                instance = registry_pb2.ServiceInstance.FromString(kv.value)
            except DecodeError as exc:
                # Damage inside a record passes SQLite's structural check at open.
                raise StoreOpenError(
                    f"store {self.store.url} is corrupted: the record at {kv.key} cannot be "
                    f"decoded ({exc}); restore the store from a backup"
                ) from exc
            instance.revision = kv.mod_revision
            self._put_cached(instance)

    def _put_cached(self, instance: registry_pb2.ServiceInstance) -> None:
        name = instance.service_name
        service = self._services.setdefault(name, {})
        previous = service.get(instance.instance_id)
        if previous is not None and previous.lease_id != instance.lease_id:
            self._lease_owners.pop(previous.lease_id, None)
        service[instance.instance_id] = instance
        if instance.lease_id:
            self._lease_owners[instance.lease_id] = name
        self._service_revision[name] = max(self._service_revision.get(name, 0), instance.revision)

    def _apply(self, events: list[Event]) -> None:
        """Store listener: update the cache and publish watch events (on the loop)."""
        out: list[registry_pb2.WatchEvent] = []
        for event in events:
            out.append(self._apply_one(event))
            self._revision = max(self._revision, event.revision)
        self.hub.publish(out)

    def _apply_one(self, event: Event) -> registry_pb2.WatchEvent:
        if event.key.startswith(POLICIES):
            return self._apply_policy(event)
        service_name, instance_id = _split(event.key)
        if event.type is EventType.PUT:
            instance = registry_pb2.ServiceInstance.FromString(event.value)
            instance.revision = event.revision
            previous = self._services.get(service_name, {}).get(instance_id)
            self._put_cached(instance)
            if (
                previous is None
                or previous.endpoint != instance.endpoint
                or previous.health_check_mode != instance.health_check_mode
            ):
                self._track(instance)
            return _translate(event, instance)
        service = self._services.get(service_name, {})
        gone = service.pop(instance_id, None)
        if gone is not None:
            self._lease_owners.pop(gone.lease_id, None)
        self._encodings.pop((service_name, instance_id), None)
        if service:
            self._service_revision[service_name] = event.revision
        else:
            self._services.pop(service_name, None)
            self._service_revision.pop(service_name, None)
        self._health.untrack(event.key)
        self._outliers.forget(service_name, instance_id)
        self._error_rates.pop((service_name, instance_id), None)
        self._call_latency.pop((service_name, instance_id), None)
        return _translate(event, None)

    def _apply_policy(self, event: Event) -> registry_pb2.WatchEvent:
        out = _translate_event(event)
        name = out.service_name
        if event.type is EventType.PUT:
            self._policies[name] = out.policy
        else:
            self._policies.pop(name, None)
        self._splits.pop(name, None)
        self._service_settings.pop(name, None)
        if self._loaded:  # health checks follow the service's new settings
            for instance in self._services.get(name, {}).values():
                self._track(instance)
        # Discover answers depend on the policy: a new revision invalidates them.
        self._service_revision[name] = max(self._service_revision.get(name, 0), event.revision)
        return out

    def _track(self, instance: registry_pb2.ServiceInstance) -> None:
        key = _key(instance.service_name, instance.instance_id)
        if instance.health_check_mode == registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY:
            self._health.untrack(key)
            return
        known = (_HS.HEALTH_STATUS_SERVING, _HS.HEALTH_STATUS_NOT_SERVING)
        initial = CheckStatus(instance.health) if instance.health in known else CheckStatus.UNKNOWN
        self._health.track(
            key,
            instance.endpoint,
            initial=initial,
            settings=self._health_settings(instance.service_name),
        )

    def _settings_of(self, service: str) -> tuple[OutlierSettings, HealthCheckSettings]:
        """The service's outlier and health-check settings: its policy over the flags."""
        cached = self._service_settings.get(service)
        if cached is not None:
            return cached
        outlier, checks = self.settings.outlier, self.settings.health
        policy = self._policies.get(service)
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
        self._service_settings[service] = (outlier, checks)
        return outlier, checks

    def _health_settings(self, service: str) -> HealthCheckSettings:
        return self._settings_of(service)[1]

    def get(self, service: str, instance_id: str) -> registry_pb2.ServiceInstance | None:
        """The cached instance, or None."""
        return self._services.get(service, {}).get(instance_id)

    @property
    def revision(self) -> int:
        """The latest registry revision applied to the cache."""
        return self._revision

    # -- leases --------------------------------------------------------------------

    async def register(
        self, instance: registry_pb2.ServiceInstance, ttl: duration_pb2.Duration | None = None
    ) -> tuple[registry_pb2.ServiceInstance, registry_pb2.Lease, int]:
        """Register (or replace) an instance under a new lease (default TTL when None)."""
        raise_if(
            validate_instance("instance", instance)
            + validate_ttl("ttl", ttl or duration_pb2.Duration(), ttl is not None)
        )
        seconds = ttl.ToNanoseconds() / 1e9 if ttl is not None else self.settings.default_ttl
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
        ):
            new.ClearField(name)  # the control plane's fields
        if not new.instance_id:
            new.instance_id = f"{new.service_name}-{uuid.uuid4().hex[:12]}"
        if not new.weight:
            new.weight = DEFAULT_WEIGHT
        with self._slot(new.service_name, new.instance_id):
            previous = self.get(new.service_name, new.instance_id)
            return await self._register(new, previous, seconds)

    @contextlib.contextmanager
    def _slot(self, service: str, instance_id: str) -> Iterator[None]:
        """Hold the instance's slot of its service while it registers.

        Slots are the cached instances plus the registrations in flight, so concurrent
        Registers cannot overshoot the limit (nor can an instance that expires while it
        registers again); an instance already registered, or registering, always may.
        """
        joining = self._joining.get(service) or Counter()
        cached = self._services.get(service, {})
        if instance_id not in joining and instance_id not in cached:
            count = len(cached) + sum(1 for i in joining if i not in cached)
            limit = self.settings.max_instances_per_service
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
            new.register_time.CopyFrom(_now_ts())
        new.effective_weight = self._weight_of(new)
        lease = await self.store.grant_lease(seconds)
        new.lease_id = lease.lease_id
        new.last_renew_time.CopyFrom(_now_ts())
        try:
            key = _key(new.service_name, new.instance_id)
            put = Put(key, new.SerializeToString(), lease.lease_id)
            result = await self.store.txn((), (put,))
        except BaseException:
            await _quietly_revoke(self.store, lease.lease_id)
            raise
        if previous is not None and previous.lease_id != lease.lease_id:
            await _quietly_revoke(self.store, previous.lease_id)
        stored = self.get(new.service_name, new.instance_id) or new
        return stored, _lease(lease.lease_id, lease.ttl, lease.expires_at), result.revision

    async def heartbeat(self, lease_id: str) -> registry_pb2.Lease:
        """Renew one lease; NotFound when it expired or never existed."""
        if not lease_id:
            raise InvalidArgument.from_violations([FieldViolation("lease_id", "is required")])
        info = await self.store.keep_alive(lease_id)
        return _lease(info.lease_id, info.ttl, info.expires_at)

    async def keep_alive(self, lease_ids: Sequence[str]) -> registry_pb2.KeepAliveResponse:
        """Renew many leases; unknown or expired ones are listed, not fatal."""
        if not 1 <= len(lease_ids) <= 1000:
            raise InvalidArgument.from_violations(
                [FieldViolation("lease_ids", f"must list 1 to 1000 leases, got {len(lease_ids)}")]
            )
        response = registry_pb2.KeepAliveResponse()
        for lease_id in lease_ids:
            try:
                info = await self.store.keep_alive(lease_id)
            except NotFound:
                response.expired_lease_ids.append(lease_id)
            else:
                response.leases.append(_lease(info.lease_id, info.ttl, info.expires_at))
        return response

    async def deregister(self, service: str, instance_id: str) -> int:
        """Remove an instance now; NotFound when it is not registered."""
        raise_if(check_name("service_name", service) + check_name("instance_id", instance_id))
        instance = self.get(service, instance_id)
        if instance is None:
            raise NotFound(f"instance {instance_id!r} of service {service!r} is not registered")
        return await self.store.revoke_lease(instance.lease_id)

    # -- health, outliers and weights ---------------------------------------------

    def _weight_of(self, instance: registry_pb2.ServiceInstance) -> float:
        median = self._medians.get(instance.service_name, 0.0)
        error_rate = self._error_rates.get((instance.service_name, instance.instance_id), 0.0)
        perf = performance_multiplier(instance.response_time_ms, median, error_rate)
        return effective_weight(instance.weight, instance.health, instance.ejected, perf)

    async def _rewrite(
        self, instance: registry_pb2.ServiceInstance, changed: registry_pb2.ServiceInstance
    ) -> None:
        """Write ``changed`` if ``instance`` is still the stored version (else skip)."""
        changed.ClearField("revision")
        key = _key(instance.service_name, instance.instance_id)
        # NotFound: the lease expired meanwhile, so the instance is gone anyway.
        with contextlib.suppress(NotFound):
            await self.store.txn(
                (Compare(key, instance.revision),),
                (Put(key, changed.SerializeToString(), instance.lease_id),),
            )

    async def _on_health(self, key: str, transition: HealthTransition) -> None:
        service, instance_id = _split(key)
        instance = self.get(service, instance_id)
        if instance is None:
            return
        changed = registry_pb2.ServiceInstance()
        changed.CopyFrom(instance)
        changed.health = _HS.ValueType(int(transition.new))
        stats = transition.stats
        changed.uptime_percentage = stats.uptime_percentage
        if stats.ewma_latency_ms > 0:
            changed.response_time_ms = stats.ewma_latency_ms
        changed.effective_weight = self._weight_of(changed)
        _log.info(
            "instance health service=%s instance=%s %s->%s reason=%s",
            service,
            instance_id,
            transition.old.name,
            transition.new.name,
            transition.reason,
        )
        await self._rewrite(instance, changed)

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
        instance = self.get(service, instance_id)
        if instance is None:
            return
        if error_rate is not None:
            self._error_rates[(service, instance_id)] = error_rate
        ejection = self._outliers.record(
            service,
            instance_id,
            ok=not infrastructure_failure,
            service_size=len(self._services.get(service, {})),
            settings=self._settings_of(service)[0],
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
        await self._rewrite(instance, changed)

    def set_call_stats(
        self, service: str, instance_id: str, error_rate: float, latency_ms: float | None
    ) -> None:
        """Recent calls of an instance, from call reports: infrastructure error rate
        (0 to 1) and mean latency. They set its performance multiplier at the next
        refresh; the latency is folded into its response time (EWMA, alpha 0.3) and is
        preferred there over health-check round trips."""
        if self.get(service, instance_id) is None:
            return
        key = (service, instance_id)
        self._error_rates[key] = min(max(error_rate, 0.0), 1.0)
        if latency_ms is not None and latency_ms >= 0:
            previous = self._call_latency.get(key)
            self._call_latency[key] = (
                latency_ms if previous is None else 0.3 * latency_ms + 0.7 * previous
            )

    async def _release_forever(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for service, instance_id in self._outliers.release_due():
                instance = self.get(service, instance_id)
                if instance is None or not instance.ejected:
                    continue
                changed = registry_pb2.ServiceInstance()
                changed.CopyFrom(instance)
                changed.ejected = False
                changed.ClearField("ejected_until")
                changed.effective_weight = self._weight_of(changed)
                _log.info("instance released service=%s instance=%s", service, instance_id)
                await self._rewrite(instance, changed)

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.refresh_interval)
            try:
                await self.refresh()
            except Exception:
                _log.exception("registry refresh failed")

    async def refresh(self) -> int:
        """Write instances whose response time, uptime or effective weight moved.

        Thresholds: effective weight by more than 5%, uptime by a point or more,
        response time by more than 20% (and 1 ms). Returns how many were written.
        """
        written = 0
        # First the fresh measurements, then the service medians from them, then weights:
        # a latency change moves the weights in the same refresh.
        updates: list[tuple[registry_pb2.ServiceInstance, registry_pb2.ServiceInstance]] = []
        for name, service in list(self._services.items()):
            known: list[float] = []
            for instance in list(service.values()):
                ident = (instance.service_name, instance.instance_id)
                stats = self._health.stats(_key(*ident))
                call_latency = self._call_latency.get(ident)
                if (
                    stats is None
                    and call_latency is None
                    and not instance.response_time_ms
                    and ident not in self._error_rates
                ):
                    continue  # nothing measured: its weight cannot have moved
                changed = registry_pb2.ServiceInstance()
                changed.CopyFrom(instance)
                if stats is not None and stats.total_checks:
                    changed.uptime_percentage = stats.uptime_percentage
                    if stats.ewma_latency_ms > 0:
                        changed.response_time_ms = stats.ewma_latency_ms
                if call_latency is not None:
                    changed.response_time_ms = call_latency
                if changed.response_time_ms > 0:
                    known.append(changed.response_time_ms)
                updates.append((instance, changed))
            self._medians[name] = statistics.median(known) if known else 0.0
        for name in list(self._medians):
            if name not in self._services:
                del self._medians[name]
        for instance, changed in updates:
            changed.effective_weight = self._weight_of(changed)
            if _moved(instance, changed):
                await self._rewrite(instance, changed)
                written += 1
        return written

    # -- policies ------------------------------------------------------------------

    def policy(self, service: str) -> registry_pb2.ServicePolicy | None:
        """The service's policy as last committed, or None."""
        return self._policies.get(service)

    async def put_policy(
        self, policy: registry_pb2.ServicePolicy, expected_version: int = 0
    ) -> registry_pb2.ServicePolicy:
        """Validate and store a policy (version + 1); the previous one stays on error."""
        violations = validate_policy(policy)
        name = policy.service_name
        instances = list(self._services.get(name, {}).values())
        versions = known_versions(instances)
        for i, split in enumerate(policy.splits):
            if split.version and split.version not in versions:
                have = ", ".join(sorted(versions)) or "none"
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
        key = POLICIES + name
        current = await self.store.get(key)
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
        new.update_time.CopyFrom(_now_ts())
        new.ClearField("revision")
        result = await self.store.txn(
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
        candidates = sorted(instances, key=lambda i: (not _is_healthy(i), i.instance_id))
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

    async def delete_policy(self, service: str) -> int:
        """Delete a service's policy; NotFound when it has none."""
        raise_if(check_name("service_name", service))
        revision = await self.store.delete(POLICIES + service)
        if revision is None:
            raise NotFound(f"service {service!r} has no policy")
        _log.info("policy deleted service=%s", service)
        return revision

    def get_policy(self, service: str) -> registry_pb2.ServicePolicy:
        """The stored policy; NotFound when none."""
        raise_if(check_name("service_name", service))
        policy = self._policies.get(service)
        if policy is None:
            raise NotFound(f"service {service!r} has no policy")
        return policy

    # -- discovery -----------------------------------------------------------------

    def discover(self, request: registry_pb2.DiscoverRequest) -> bytes:
        """The serialized DiscoverResponse for a request (see registry.proto)."""
        healthy_only = request.healthy_only if request.HasField("healthy_only") else True
        policy = self._policies.get(request.service_name) if request.service_name else None
        strategy = (
            request.strategy
            or (policy.strategy if policy is not None else 0)
            or registry_pb2.LOAD_BALANCING_STRATEGY_WEIGHTED_ROUND_ROBIN
        )
        version = ""
        if policy is not None and policy.splits:
            split = self._splits.get(request.service_name)
            if split is None:
                split = self._splits[request.service_name] = SplitPicker(split_versions(policy))
            version = split.pick()
        zone = request.caller_zone if policy is not None and policy.zone.enabled else ""
        query = (
            request.service_name,
            request.type,
            tuple(sorted(request.label_selector.items())),
            strategy,
            healthy_only,
            request.limit,
            version,
            zone,
        )
        revision = (
            self._service_revision.get(request.service_name, -1)
            if request.service_name
            else self._revision
        )
        answer = self._answers.get(query)
        if answer is None or answer.revision != revision:
            _validate_discover(request, strategy)
            answer = self._build_answer(
                request, strategy, healthy_only, revision, policy=policy, version=version, zone=zone
            )
            self._answers[query] = answer
            if len(self._answers) > self.settings.discover_cache_size:
                self._answers.popitem(last=False)
        if answer.split_fallback and self._on_split_fallback is not None:
            self._on_split_fallback(request.service_name, version)
        return answer.encode()

    def _build_answer(
        self,
        request: registry_pb2.DiscoverRequest,
        strategy: int,
        healthy_only: bool,
        revision: int,
        *,
        policy: registry_pb2.ServicePolicy | None = None,
        version: str = "",
        zone: str = "",
    ) -> _Answer:
        if request.service_name:
            pool = list(self._services.get(request.service_name, {}).values())
            if not pool:
                raise NotFound(f"service {request.service_name!r} has no registered instance")
        else:
            pool = [i for s in self._services.values() for i in s.values()]
        if request.type:
            pool = [i for i in pool if i.type == request.type]
        for key, value in request.label_selector.items():
            pool = [i for i in pool if i.labels.get(key) == value]
        if not pool and not request.service_name:
            raise NotFound(f"no instance of type {request.type!r} is registered")
        pool.sort(key=lambda i: (i.service_name, i.instance_id))
        healthy = [i for i in pool if _is_healthy(i)]
        notes: list[str] = []
        panic = False
        chosen = pool
        threshold = (
            policy.panic_threshold_percent
            if policy is not None and policy.HasField("panic_threshold_percent")
            else self.settings.panic_threshold_percent
        )
        if healthy_only:
            if pool and in_panic(len(pool), len(healthy), threshold):
                panic = True
                notes.append(
                    f"panic mode: {len(healthy)} of {len(pool)} instances healthy, below "
                    f"{threshold:g}%; returning all of them"
                )
            else:
                chosen = healthy
                if not healthy:
                    notes.append("no healthy instance matches")
        split_fallback = zone_spillover = False
        if version:
            callable_ = (lambda i: True) if panic or not healthy_only else _is_healthy
            chosen, split_fallback = apply_split(chosen, version, lambda i: i.version, callable_)
            if split_fallback:
                notes.append(
                    f"split: version {version!r} has no healthy instance; "
                    "falling back to the other versions"
                )
        if zone:
            chosen, zone_spillover = apply_zone(chosen, zone, policy, lambda i: i.zone, _is_healthy)
            if zone_spillover:
                notes.append(f"zone {zone!r} is short of healthy instances; spilling over")
        weights = [
            i.effective_weight if i.effective_weight > 0 else (float(i.weight) if panic else 0.0)
            for i in chosen
        ]
        candidates = [
            Candidate(i.instance_id, w if w > 0 else 1e-9, i.response_time_ms, i.uptime_percentage)
            for i, w in zip(chosen, weights, strict=True)
        ]
        base = registry_pb2.DiscoverResponse(
            strategy=registry_pb2.LoadBalancingStrategy.ValueType(strategy),
            panic_mode=panic,
            revision=revision,
            notes=notes,
            selected_version=version,
            split_fallback=split_fallback,
            zone_spillover=zone_spillover,
        )
        header = base.SerializeToString()
        if not candidates:
            return _Answer(revision, None, header, [], split_fallback=split_fallback)
        return _Answer(
            revision,
            Picker(candidates, Strategy(strategy)),
            header,
            [self._encoded(i) for i in chosen],
            limit=request.limit,
            split_fallback=split_fallback,
        )

    def _encoded(self, instance: registry_pb2.ServiceInstance) -> bytes:
        """The instance's encoded DiscoverResponse element, made once per cached object
        (the cache replaces an instance's object whenever the instance changes)."""
        key = (instance.service_name, instance.instance_id)
        cached = self._encodings.get(key)
        if cached is not None and cached[0] is instance:
            return cached[1]
        encoded = _encoded_field(instance)
        self._encodings[key] = (instance, encoded)
        return encoded

    def list_services(
        self, page_size: int, page_token: str, type_filter: str
    ) -> registry_pb2.ListServicesResponse:
        """Services with instance counts and health, sorted by name, paged."""
        if page_size > 1000:
            raise InvalidArgument.from_violations(
                [FieldViolation("page_size", f"{page_size} is over the maximum 1000")]
            )
        after = ""
        if page_token:
            try:
                after = base64.urlsafe_b64decode(page_token.encode()).decode()
            except (ValueError, UnicodeDecodeError) as exc:
                raise InvalidArgument.from_violations(
                    [FieldViolation("page_token", "is not a token from a previous response")]
                ) from exc
        size = page_size or 100
        names = sorted(n for n in self._services if n > after)
        response = registry_pb2.ListServicesResponse(revision=self._revision)
        for name in names:
            instances = list(self._services[name].values())
            if type_filter and not any(i.type == type_filter for i in instances):
                continue
            if len(response.services) == size:
                last = response.services[-1].service_name
                response.next_page_token = base64.urlsafe_b64encode(last.encode()).decode()
                break
            response.services.append(_summary(name, instances))
        return response

    # -- watch -------------------------------------------------------------------

    async def watch(self, services: Sequence[str], from_revision: int) -> AsyncIterator[bytes]:
        """Serialized WatchResponses: history or a snapshot, then live changes."""
        violations = [
            v for i, name in enumerate(services) for v in check_name(f"service_names[{i}]", name)
        ]
        if from_revision < 0:
            violations.append(FieldViolation("from_revision", "must be >= 0"))
        raise_if(violations)
        watcher = self.hub.add(services)
        try:
            last = 0
            if from_revision and from_revision <= self._revision:
                try:
                    history = await self.store.events_since(from_revision, REGISTRY)
                except Compacted:
                    pass
                else:
                    last = from_revision
                    wanted = [e for e in history if watcher.wants(_service_of(e.key))]
                    chunk = self.settings.watch_chunk
                    for start in range(0, len(wanted), chunk):
                        part = [_translate_event(e) for e in wanted[start : start + chunk]]
                        batch = make_batch(part)
                        if batch is not None:
                            last = batch.last_revision
                            yield batch.payload
                    if not wanted:
                        yield _progress(self._revision)
                        last = max(last, self._revision)
            if not last:
                last = self._revision
                yield self._snapshot(watcher, resync=from_revision != 0)
            async for payload in self._live(watcher, last):
                yield payload
        finally:
            self.hub.remove(watcher)

    def _snapshot(self, watcher: Watcher, *, resync: bool) -> bytes:
        snapshot = registry_pb2.WatchSnapshot(resync=resync)
        for name in sorted(self._services):
            if watcher.wants(name):
                snapshot.instances.extend(
                    self._services[name][i] for i in sorted(self._services[name])
                )
        for name in sorted(self._policies):
            if watcher.wants(name):
                snapshot.policies.append(self._policies[name])
        return registry_pb2.WatchResponse(
            snapshot=snapshot, revision=self._revision
        ).SerializeToString()

    async def _live(self, watcher: Watcher, last: int) -> AsyncIterator[bytes]:
        progress = self.settings.watch_progress_interval
        while True:
            try:
                batch = await asyncio.wait_for(watcher.queue.get(), progress)
            except TimeoutError:
                yield _progress(max(last, self._revision))
                continue
            if batch is None:
                if watcher.overflowed:
                    raise ResourceExhausted(
                        f"watch stream cut off: the client fell more than "
                        f"{watcher.max_pending} batches behind; resume from revision {last} "
                        "(from_revision) to miss nothing",
                        retry_after=0.1,
                    )
                return
            if batch.last_revision <= last:
                continue
            if batch.first_revision <= last:
                fresh = make_batch([e for e in batch.events if e.revision > last])
                if fresh is None:
                    continue
                batch = fresh
            last = batch.last_revision
            yield batch.payload


# -- helpers ------------------------------------------------------------------------


def _is_healthy(instance: registry_pb2.ServiceInstance) -> bool:
    return instance.health in _HEALTHY and not instance.ejected and instance.effective_weight > 0


def _validate_discover(request: registry_pb2.DiscoverRequest, strategy: int) -> None:
    violations: list[FieldViolation] = []
    if not request.service_name and not request.type:
        violations.append(FieldViolation("service_name", "give service_name or type"))
    violations += check_name("service_name", request.service_name, required=False)
    if strategy not in registry_pb2.LoadBalancingStrategy.values():
        violations.append(FieldViolation("strategy", f"{strategy} is not a known strategy"))
    if request.limit > 10_000:
        violations.append(FieldViolation("limit", "at most 10000"))
    raise_if(violations)


def _moved(old: registry_pb2.ServiceInstance, new: registry_pb2.ServiceInstance) -> bool:
    ow, nw = old.effective_weight, new.effective_weight
    if (ow == 0) != (nw == 0) or (ow and abs(nw - ow) / ow > 0.05):
        return True
    if abs(new.uptime_percentage - old.uptime_percentage) >= 1.0:
        return True
    ort, nrt = old.response_time_ms, new.response_time_ms
    return abs(nrt - ort) > max(1.0, 0.2 * ort)


def _summary(
    name: str, instances: list[registry_pb2.ServiceInstance]
) -> registry_pb2.ServiceSummary:
    return registry_pb2.ServiceSummary(
        service_name=name,
        instance_count=len(instances),
        healthy_count=sum(1 for i in instances if _is_healthy(i)),
        unhealthy_count=sum(1 for i in instances if i.health not in _HEALTHY),
        ejected_count=sum(1 for i in instances if i.ejected),
        versions=sorted({i.version for i in instances if i.version}),
        types=sorted({i.type for i in instances if i.type}),
    )


def _lease(lease_id: str, ttl: float, expires_at: float) -> registry_pb2.Lease:
    lease = registry_pb2.Lease(lease_id=lease_id)
    lease.ttl.FromNanoseconds(int(ttl * 1e9))
    lease.expire_time.FromNanoseconds(int(expires_at * 1e9))
    return lease


def _progress(revision: int) -> bytes:
    return registry_pb2.WatchResponse(revision=revision).SerializeToString()


async def _quietly_revoke(store: Store, lease_id: str) -> None:
    """Revoke a lease no key uses any more; if the store refuses, it simply expires."""
    try:
        await store.revoke_lease(lease_id)
    except NotFound:
        pass
    except StoreUnavailable as exc:
        _log.warning("could not revoke unused lease %s, it will expire: %s", lease_id, exc)


def _service_of(key: str) -> str:
    if key.startswith(POLICIES):
        return key[len(POLICIES) :]
    return _split(key)[0]


def _translate_event(event: Event) -> registry_pb2.WatchEvent:
    if event.key.startswith(POLICIES):
        out = registry_pb2.WatchEvent(
            revision=event.revision, service_name=event.key[len(POLICIES) :]
        )
        out.time.GetCurrentTime()
        if event.type is EventType.PUT:
            out.type = _WE.WATCH_EVENT_TYPE_POLICY_PUT
            out.policy.ParseFromString(event.value)
            out.policy.revision = event.revision
        else:
            out.type = _WE.WATCH_EVENT_TYPE_POLICY_DELETED
        return out
    instance = (
        registry_pb2.ServiceInstance.FromString(event.value)
        if event.type is EventType.PUT
        else None
    )
    if instance is not None:
        instance.revision = event.revision
    return _translate(event, instance)


def _translate(
    event: Event, instance: registry_pb2.ServiceInstance | None
) -> registry_pb2.WatchEvent:
    """The WatchEvent of one store event, classified against the previous value."""
    service_name, _ = _split(event.key)
    out = registry_pb2.WatchEvent(revision=event.revision, service_name=service_name)
    out.time.GetCurrentTime()
    if instance is None:
        out.type = _WE.WATCH_EVENT_TYPE_REMOVED
        out.instance.ParseFromString(event.value)
        out.removal_reason = (
            registry_pb2.REMOVAL_REASON_LEASE_EXPIRED
            if event.expired
            else registry_pb2.REMOVAL_REASON_DEREGISTERED
        )
        return out
    out.instance.CopyFrom(instance)
    if event.prev_value is None:
        out.type = _WE.WATCH_EVENT_TYPE_ADDED
        return out
    previous = registry_pb2.ServiceInstance.FromString(event.prev_value)
    if any(_field(previous, f) != _field(instance, f) for f in _REG_FIELDS) or (
        previous.lease_id != instance.lease_id
    ):
        out.type = _WE.WATCH_EVENT_TYPE_UPDATED
    elif previous.health != instance.health or previous.ejected != instance.ejected:
        out.type = _WE.WATCH_EVENT_TYPE_HEALTH_CHANGED
    else:
        out.type = _WE.WATCH_EVENT_TYPE_WEIGHT_CHANGED
    return out


def _field(instance: registry_pb2.ServiceInstance, name: str) -> object:
    value = getattr(instance, name)
    if name == "labels":
        return dict(value)
    if name == "capabilities":
        return list(value)
    if name == "metadata":
        return value.SerializeToString(deterministic=True)
    return value
