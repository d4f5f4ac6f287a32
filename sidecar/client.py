"""The mesh client: call ``service.operation`` through the mesh from Python code.

``MeshClient`` keeps a discovery cache fed by ``RegistryService.Watch`` (resuming from
its last revision after a broken stream, and keeping its last-known state while the
control plane is away: *static stability*). Each call picks an instance (see *Picks*),
skips instances whose circuit breaker is open, and calls ``ProcessorService.Invoke``
with the deadline and the correlation id.

Failures: a failure whose status code is retryable (by default the infrastructure
faults UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED, UNKNOWN) is
retried, preferably on another instance, with exponential backoff and jitter
(``flext_mesh.retry.retry_async``), within the overall deadline and the retry budget
(retries <= 20% of calls).
Only infrastructure faults count against the instance's breaker. A business rejection
(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ...) is raised at once as its
MeshError and never retried; nor are cancellations, nor ``BreakersOpen`` (every
instance's breaker is open: fail fast). The first attempt is a plain ``await``: no
retry state is built unless it fails, keeping retries off the fast path.

Traffic policy
    The control plane pushes each service's ``ServicePolicy`` over the same Watch: the
    first message's snapshot carries every policy, then ``POLICY_PUT`` (the whole new
    policy) and ``POLICY_DELETED`` events. The client applies a policy from the next
    call on, without restart; a snapshot replaces every policy; a deleted policy puts
    the service back on the settings; while the control plane is away the last policy
    stays in force. A policy that fails the control plane's validation is ignored (and
    logged): the previous one stays. ``policy(service)`` is the one in force.

    Precedence, highest first; a policy field that is unset (or 0, per registry.proto)
    does not count::

        deadline         call(timeout=) > policy operation_timeouts[operation]
                         > policy default_timeout > ClientSettings.default_timeout
        retries          policy retry, whole: its unset fields take common.proto's
                         defaults (3 attempts, 100 ms x 2.0 up to 5 s, jitter 0.2, the
                         infrastructure codes; ABORTED may be listed too)
                         > ClientSettings max_attempts, initial_backoff, max_backoff
                         (x 2.0, jitter 0.2, the infrastructure codes)
        breakers         each circuit_breaker field the policy sets
                         > ClientSettings.breaker > BreakerSettings' defaults
        strategy         policy strategy > weighted round robin
        version split    policy splits > no split
        zone preference  policy zone, for the caller zone: MeshClient(zone=)
                         > ClientSettings.zone; no caller zone: no preference

    The retry budget is the client's (``retry_budget_ratio``) whatever the policy.
    New breaker settings reconfigure the service's existing breakers in place: they
    keep their state (an open breaker stays open until its open period ends) and their
    newest outcomes, and the new thresholds apply from the next outcome.

Picks
    *Callable* instances are healthy (SERVING or UNKNOWN), not ejected, of effective
    weight > 0, and their breaker admits a call; when no instance of a service is
    healthy, every instance counts as healthy (panic: better an unhealthy instance than
    none). One call:

    1. Version split: the call picks a version by smooth weighted round robin over the
       versions with a weight > 0 (nginx's algorithm, as Discover: 90/10 sends exactly
       9 of every 10 calls to the first version, interleaved) and keeps it for its
       retries. When that version has no callable instance, the attempt falls back to
       the instances of the other versions: counted in
       ``split_fallbacks[(service, version)]`` and logged at WARNING once each time a
       version starts falling back (at INFO when it recovers).
    2. Zone preference: among what the split left, only the instances of the caller's
       zone while that zone has a callable instance and ``callable_in_zone * 100 >=
       min_healthy_percent * instances_in_zone`` (default 70; instances_in_zone counts
       unhealthy ones too); otherwise every zone, counted in
       ``zone_spillovers[service]``.
    3. The policy's strategy picks among what is left. A retry prefers an instance the
       call has not tried: in the same zone, then in the other zones, then in the other
       versions (this is not counted as a fallback or a spill-over), and only then one
       it tried already.

    What a policy implies is computed when the cache or the policy changes, not per
    call: without a split or zone preference, a pick is the strategy's choice and a
    breaker check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import grpc
from google.protobuf import duration_pb2

from flext_mesh.errors import DeadlineExceeded, NotFound, Unavailable, is_infrastructure
from flext_mesh.hosting.reporter import CallReporter
from flext_mesh.retry import ALLOWED_RETRYABLE, Backoff, RetrySpec, retry_async, status_of
from flext_mesh.routing.balancer import Candidate, Picker, Strategy
from flext_mesh.routing.policy import (
    DEFAULT_ZONE_MIN_HEALTHY_PERCENT,
    SplitPicker,
    retry_spec,
    validate_policy,
)
from flext_mesh.rpc.channels import ClientSecurity, TransportError, open_channel
from flext_mesh.rpc.metadata import CORRELATION_ID_HEADER
from flext_mesh.rpc.payloads import dict_to_struct, struct_to_dict
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.v1 import (
    common_pb2,
    metrics_pb2,
    processor_pb2,
    processor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from sidecar.breaker import BreakerSettings, CircuitBreaker, Permit, RetryBudget

__all__ = ["BreakersOpen", "ClientSettings", "MeshClient", "SyncMeshClient", "mesh"]

_log = logging.getLogger("flext_sidecar.client")
_T = TypeVar("_T")
_HEALTHY = (registry_pb2.HEALTH_STATUS_SERVING, registry_pb2.HEALTH_STATUS_UNKNOWN)
_NOTHING_TRIED: frozenset[str] = frozenset()


@dataclass(frozen=True, kw_only=True)
class ClientSettings:
    """How the mesh client calls; defaults documented here and in the README. A
    service's pushed policy overrides them (see the module docstring)."""

    #: Deadline of a call when the caller gives none, seconds.
    default_timeout: float = 10.0
    #: Attempts per call, the first included.
    max_attempts: int = 3
    #: Wait before the second attempt, seconds; doubles per retry, minus up to 20% jitter.
    initial_backoff: float = 0.05
    #: Cap of one backoff, seconds.
    max_backoff: float = 1.0
    #: Retries allowed as a share of calls (Envoy-style retry budget).
    retry_budget_ratio: float = 0.2
    #: Per-instance circuit breakers.
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    #: Seconds between Watch reconnection attempts at most.
    watch_max_backoff: float = 2.0
    #: Zone of the caller, for the policies' zone preference; empty: no preference.
    zone: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class _Plan:
    """What one service's calls follow: its policy merged over the settings."""

    default_timeout: float
    operation_timeouts: Mapping[str, float]
    retry: RetrySpec
    breaker: BreakerSettings
    strategy: Strategy
    #: The version rotation (its state lives as long as the policy); None: no split.
    split: SplitPicker | None
    #: Zone preference threshold in percent; None: no preference (or no caller zone).
    zone_min_percent: float | None


def _seconds(duration: duration_pb2.Duration) -> float:
    return duration.ToNanoseconds() / 1e9


def _retry_of(policy: common_pb2.RetryPolicy, service: str) -> RetrySpec:
    for name in policy.retryable_codes:
        if grpc.StatusCode.__members__.get(name) not in ALLOWED_RETRYABLE:
            # validate_policy refuses these; a newer control plane might not.
            _log.warning("policy of %s: %r is not a retryable code, ignored", service, name)
    return retry_spec(policy)


def _breaker_of(
    base: BreakerSettings, policy: registry_pb2.CircuitBreakerPolicy
) -> BreakerSettings:
    """``base`` with the fields the policy sets; ValueError when the result is invalid."""
    changes: dict[str, Any] = {}
    for name in (
        "consecutive_failures",
        "sliding_window_size",
        "minimum_calls",
        "half_open_max_calls",
    ):
        if getattr(policy, name):  # 0: not set
            changes[name] = getattr(policy, name)
    if policy.HasField("failure_rate_threshold_percent"):
        changes["failure_rate_threshold_percent"] = policy.failure_rate_threshold_percent
    if policy.HasField("open_duration"):
        changes["open_duration"] = _seconds(policy.open_duration)
    if policy.HasField("max_open_duration"):
        changes["max_open_duration"] = _seconds(policy.max_open_duration)
    # A policy that moves one end of a pair keeps the other end of the settings valid.
    window = changes.get("sliding_window_size", base.sliding_window_size)
    if "minimum_calls" not in changes and base.minimum_calls > window:
        changes["minimum_calls"] = window
    opened = changes.get("open_duration", base.open_duration)
    if "max_open_duration" not in changes and base.max_open_duration < opened:
        changes["max_open_duration"] = opened
    return base.with_overrides(**changes)


def _callable(instance: registry_pb2.ServiceInstance) -> bool:
    """Healthy, not ejected, of positive weight: what the registry says of an instance."""
    return instance.health in _HEALTHY and not instance.ejected and instance.effective_weight > 0


class _Tier:
    """Instances a pick may choose among, their breakers, and the strategy's picker."""

    __slots__ = ("breakers", "instances", "picker")

    def __init__(
        self,
        instances: list[registry_pb2.ServiceInstance],
        breakers: list[CircuitBreaker],
        strategy: Strategy,
    ) -> None:
        self.instances = instances
        self.breakers = breakers
        self.picker = Picker(
            [
                Candidate(
                    i.instance_id,
                    i.effective_weight or float(i.weight or 1),
                    i.response_time_ms,
                    i.uptime_percentage,
                )
                for i in instances
            ],
            strategy,
        )

    def acquire(
        self, skip: frozenset[str] | set[str]
    ) -> tuple[registry_pb2.ServiceInstance, Permit] | None:
        """The strategy's choice, else the next in its order: the first instance not in
        ``skip`` whose breaker admits a call, with the breaker's permit."""
        picker = self.picker
        first = picker.pick()
        instance = self.instances[first]
        if instance.instance_id not in skip:
            permit = self.breakers[first].acquire()
            if permit is not None:
                return instance, permit
        for index in picker.order(first):
            instance = self.instances[index]
            if index == first or instance.instance_id in skip:
                continue
            permit = self.breakers[index].acquire()
            if permit is not None:
                return instance, permit
        return None

    def callable_count(self) -> int:
        """Instances whose breaker would admit a call now."""
        return sum(1 for breaker in self.breakers if breaker.can_acquire())


class _Group:
    """The instances one split stage leaves (a version, or the others), by zone."""

    __slots__ = ("local", "local_size", "min_percent", "plain", "preferred")

    def __init__(
        self,
        everywhere: _Tier | None,
        local: _Tier | None = None,
        local_size: int = 0,
        min_percent: float | None = None,
    ) -> None:
        self.plain: tuple[_Tier, ...] = (everywhere,) if everywhere is not None else ()
        self.preferred = (local, *self.plain) if local is not None else self.plain
        self.local = local
        self.local_size = local_size
        self.min_percent = min_percent

    def tiers(self) -> tuple[tuple[_Tier, ...], bool]:
        """Tiers to pick from in order, and whether the zone preference spilled over."""
        if self.min_percent is None:
            return self.plain, False
        up = self.local.callable_count() if self.local is not None else 0
        if up and up * 100 >= self.min_percent * self.local_size:
            return self.preferred, False
        return self.plain, True

    def has_callable(self) -> bool:
        """Whether any instance of the group would admit a call now."""
        return any(breaker.can_acquire() for tier in self.plain for breaker in tier.breakers)


class _Route:
    """Where the calls of one split version go: its group first, then the others."""

    __slots__ = ("primary", "stages", "version")

    def __init__(self, version: str | None, primary: _Group, fallback: _Group | None) -> None:
        self.version = version
        self.primary = primary
        #: (group, is the fallback) in the order a pick tries them.
        self.stages: tuple[tuple[_Group, bool], ...] = (
            ((primary, False),) if fallback is None else ((primary, False), (fallback, True))
        )


class _Routes:
    """The routes of one service at one cache state and plan."""

    __slots__ = ("by_version", "default", "split")

    def __init__(
        self, split: SplitPicker | None, default: _Route, by_version: dict[str, _Route]
    ) -> None:
        self.split = split
        self.default = default
        self.by_version = by_version

    def choose(self) -> str | None:
        """The next version of the split; None without a split."""
        return self.split.pick() if self.split is not None else None

    def route(self, version: str | None) -> _Route:
        """The route of ``version`` (the policy may have changed since it was chosen)."""
        if version is None:
            return self.default
        return self.by_version.get(version, self.default)


class _Service:
    """The cached instances of one service, and the routes built from them."""

    __slots__ = ("instances", "plan", "routes")

    def __init__(self) -> None:
        self.instances: dict[str, registry_pb2.ServiceInstance] = {}
        self.routes: _Routes | None = None
        self.plan: _Plan | None = None  # the plan the routes were built for

    def changed(self) -> None:
        self.routes = None


class _Call:
    """One call's state across its attempts."""

    __slots__ = ("deadline", "request", "routed", "service", "tried", "version")

    def __init__(self, service: str, request: processor_pb2.InvokeRequest, deadline: float) -> None:
        self.service = service
        self.request = request
        self.deadline = deadline
        self.tried: set[str] = set()
        self.routed = False
        self.version: str | None = None


class MeshClient:
    """Async client of the mesh (see the module docstring).

    ``zone`` is the caller's zone for the policies' zone preference (default
    ``settings.zone``). ``split_fallbacks[(service, version)]`` counts the attempts that
    fell back from a split version without a callable instance, and
    ``zone_spillovers[service]`` the attempts that left the caller's zone because too
    few of its instances were callable.

    ``security`` secures the channels to the control plane and to the instances called
    (TLS when its ``tls_ca`` is set, mTLS with a certificate, a bearer token); None
    reads it from the ``FLEXT_MESH_TLS_*`` and ``FLEXT_MESH_TOKEN`` variables, as the
    sidecar's flags are, so an app configured by environment needs no code for it.
    Its ``tls_server_name`` applies to the control plane only.
    """

    def __init__(
        self,
        control_plane: str,
        *,
        caller_service: str = "",
        settings: ClientSettings | None = None,
        reporter: CallReporter | None = None,
        zone: str | None = None,
        security: ClientSecurity | None = None,
    ) -> None:
        self.control_plane = control_plane
        self.security = ClientSecurity.from_env() if security is None else security
        # Instances are checked against their own endpoint's name, never the override.
        self._peer_security = replace(self.security, tls_server_name="")
        self.caller_service = caller_service
        self.settings = settings or ClientSettings()
        self.reporter = reporter
        self.zone = self.settings.zone if zone is None else zone
        self.split_fallbacks: Counter[tuple[str, str]] = Counter()
        self.zone_spillovers: Counter[str] = Counter()
        self._falling_back: set[tuple[str, str]] = set()
        self._services: dict[str, _Service] = {}
        self._policies: dict[str, registry_pb2.ServicePolicy] = {}
        self._plans: dict[str, _Plan] = {}
        self._default_plan = self._plan(None)
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._breakers: dict[tuple[str, str], CircuitBreaker] = {}
        self._budget = RetryBudget(self.settings.retry_budget_ratio)
        self._revision = 0
        self._synced = asyncio.Event()
        self._changed = asyncio.Event()  # replaced by a fresh one after every change
        self._control: grpc.aio.Channel | None = None
        self._watch: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, *, wait: float = 5.0) -> None:
        """Start watching the registry; wait up to ``wait`` s for the first snapshot."""
        self._control = open_channel(self.control_plane, self.security)
        self._watch = asyncio.create_task(self._watch_forever(), name="mesh-client-watch")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await self._synced.wait()

    async def aclose(self) -> None:
        """Stop watching and close every channel."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
            self._watch = None
        for channel in [*self._channels.values(), *([self._control] if self._control else [])]:
            await channel.close()
        self._channels.clear()
        self._control = None

    async def __aenter__(self) -> MeshClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the discovery cache -------------------------------------------------------------

    @property
    def revision(self) -> int:
        """Registry revision the cache is at."""
        return self._revision

    def instances(self, service: str) -> list[registry_pb2.ServiceInstance]:
        """Last-known instances of a service (empty when unknown)."""
        cached = self._services.get(service)
        return list(cached.instances.values()) if cached else []

    def policy(self, service: str) -> registry_pb2.ServicePolicy | None:
        """The traffic policy in force for ``service`` (last known); None without one."""
        policy = self._policies.get(service)
        if policy is None:
            return None
        copy = registry_pb2.ServicePolicy()
        copy.CopyFrom(policy)
        return copy

    async def wait_for_instances(self, service: str, count: int = 1, within: float = 10.0) -> bool:
        """Wait until the cache holds at least ``count`` instances of ``service``."""
        try:
            async with asyncio.timeout(within):
                while len(self.instances(service)) < count:
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    async def _watch_forever(self) -> None:
        backoff = Backoff(
            RetrySpec(initial_backoff=0.2, max_backoff=self.settings.watch_max_backoff)
        )
        while True:
            assert self._control is not None
            stub = registry_pb2_grpc.RegistryServiceStub(self._control)
            try:
                stream = stub.Watch(registry_pb2.WatchRequest(from_revision=self._revision))
                async for message in stream:
                    self._apply(message)
                    backoff.reset()
            except grpc.aio.AioRpcError as exc:
                if not backoff.failures:
                    _log.warning(
                        "registry watch broke (%s); keeping last-known state", exc.code().name
                    )
            await asyncio.sleep(next(backoff))

    def _apply(self, message: registry_pb2.WatchResponse) -> None:
        """Apply one Watch message: a snapshot replaces everything, events update it."""
        if message.HasField("snapshot"):
            fresh: dict[str, _Service] = {}
            for instance in message.snapshot.instances:
                fresh.setdefault(instance.service_name, _Service()).instances[
                    instance.instance_id
                ] = instance
            self._services = fresh
            policies = {p.service_name: p for p in message.snapshot.policies}
            for name in sorted(self._policies.keys() | policies.keys()):
                self._set_policy(name, policies.get(name))
        for event in message.events:
            if event.type == registry_pb2.WATCH_EVENT_TYPE_POLICY_PUT:
                self._set_policy(event.service_name or event.policy.service_name, event.policy)
                continue
            if event.type == registry_pb2.WATCH_EVENT_TYPE_POLICY_DELETED:
                self._set_policy(event.service_name, None)
                continue
            service = self._services.setdefault(event.service_name, _Service())
            if event.type == registry_pb2.WATCH_EVENT_TYPE_REMOVED:
                service.instances.pop(event.instance.instance_id, None)
            elif event.HasField("instance"):
                service.instances[event.instance.instance_id] = event.instance
            service.changed()
        self._revision = max(self._revision, message.revision)
        self._synced.set()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # -- policies --------------------------------------------------------------------

    def _set_policy(self, service: str, policy: registry_pb2.ServicePolicy | None) -> None:
        """Put ``policy`` (None: none) in force for ``service``; an invalid one is ignored."""
        current = self._policies.get(service)
        if policy is None:
            if current is None:
                return
            del self._policies[service]
            self._plans.pop(service, None)
            plan = self._default_plan
            _log.info("traffic policy of %s deleted; back to the client settings", service)
        else:
            if current is not None and policy == current:
                return  # e.g. the same policy again in a resync snapshot: keep the rotation
            try:
                problems = validate_policy(policy)
                if problems:
                    raise ValueError("; ".join(f"{p.field}: {p.description}" for p in problems))
                plan = self._plan(policy)
            except ValueError as exc:
                _log.error(
                    "traffic policy version %d of %s ignored, the previous one stays: %s",
                    policy.version,
                    service,
                    exc,
                )
                return
            self._policies[service] = policy
            self._plans[service] = plan
            _log.info("traffic policy version %d of %s applied", policy.version, service)
        for (name, _), breaker in self._breakers.items():
            if name == service:
                breaker.reconfigure(plan.breaker)
        cached = self._services.get(service)
        if cached is not None:
            cached.changed()

    def _plan(self, policy: registry_pb2.ServicePolicy | None) -> _Plan:
        """The policy merged over the settings; ValueError when it cannot apply."""
        settings = self.settings
        if policy is None:
            return _Plan(
                default_timeout=settings.default_timeout,
                operation_timeouts={},
                retry=RetrySpec(
                    max_attempts=settings.max_attempts,
                    initial_backoff=settings.initial_backoff,
                    max_backoff=settings.max_backoff,
                ),
                breaker=settings.breaker,
                strategy=Strategy.WEIGHTED_ROUND_ROBIN,
                split=None,
                zone_min_percent=None,
            )
        default = self._default_plan
        weights = {s.version: s.weight for s in policy.splits if s.weight > 0}
        zone = policy.zone
        return _Plan(
            default_timeout=(
                _seconds(policy.default_timeout)
                if policy.HasField("default_timeout") and _seconds(policy.default_timeout) > 0
                else default.default_timeout
            ),
            operation_timeouts={
                op: _seconds(limit)
                for op, limit in policy.operation_timeouts.items()
                if _seconds(limit) > 0
            },
            retry=(
                _retry_of(policy.retry, policy.service_name)
                if policy.HasField("retry")
                else default.retry
            ),
            breaker=(
                _breaker_of(settings.breaker, policy.circuit_breaker)
                if policy.HasField("circuit_breaker")
                else default.breaker
            ),
            strategy=Strategy(policy.strategy) if policy.strategy else default.strategy,
            split=SplitPicker(weights) if weights else None,
            zone_min_percent=(
                (
                    zone.min_healthy_percent
                    if zone.HasField("min_healthy_percent")
                    else DEFAULT_ZONE_MIN_HEALTHY_PERCENT
                )
                if zone.enabled and self.zone
                else None
            ),
        )

    def _routes(self, service: str, cached: _Service) -> _Routes:
        """The service's routes, built again when its instances or its plan changed."""
        plan = self._plans.get(service, self._default_plan)
        routes = cached.routes
        if routes is not None and cached.plan is plan:
            return routes
        everything = sorted(cached.instances.values(), key=lambda i: i.instance_id)
        live = [i for i in everything if _callable(i)] or everything  # empty: panic

        def group(version: str | None = None, *, others: bool = False) -> _Group:
            """The instances of ``version`` (None: every one), or of the other versions."""

            def keep(instance: registry_pb2.ServiceInstance) -> bool:
                return version is None or (instance.version == version) != others

            members = [i for i in live if keep(i)]
            everywhere = self._tier(service, members, plan.strategy)
            if plan.zone_min_percent is None:
                return _Group(everywhere)
            zone = self.zone
            return _Group(
                everywhere,
                self._tier(service, [i for i in members if i.zone == zone], plan.strategy),
                sum(1 for i in everything if keep(i) and i.zone == zone),
                plan.zone_min_percent,
            )

        by_version: dict[str, _Route] = {}
        if plan.split is not None:
            for version in plan.split.weights:
                by_version[version] = _Route(version, group(version), group(version, others=True))
        routes = _Routes(plan.split, _Route(None, group(), None), by_version)
        cached.routes, cached.plan = routes, plan
        return routes

    def _tier(
        self, service: str, instances: list[registry_pb2.ServiceInstance], strategy: Strategy
    ) -> _Tier | None:
        if not instances:
            return None
        breakers = [self._breaker(service, i.instance_id) for i in instances]
        return _Tier(instances, breakers, strategy)

    # -- calls -----------------------------------------------------------------------

    async def call(
        self,
        service: str,
        operation: str,
        payload: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,  # noqa: ASYNC109 - the public API's name (issue 5)
        correlation_id: str | None = None,
        idempotency_key: str = "",
    ) -> dict[str, Any]:
        """Call ``operation`` of ``service``; returns the result as a dict.

        ``timeout`` (seconds) overrides the policy's and the settings' deadlines. Raises
        the MeshError of a business rejection, Unavailable when no instance can take the
        call, DeadlineExceeded when the deadline passes.
        """
        plan = self._plans.get(service, self._default_plan)
        limit = timeout or plan.operation_timeouts.get(operation, plan.default_timeout)
        request = processor_pb2.InvokeRequest(
            operation=operation,
            correlation_id=correlation_id or uuid.uuid4().hex,
            idempotency_key=idempotency_key,
        )
        request.payload.CopyFrom(dict_to_struct(dict(payload or {})))
        call = _Call(service, request, time.monotonic() + limit)
        self._budget.record_call()
        return await retry_async(
            lambda: self._attempt(call),
            plan.retry,
            deadline=call.deadline,
            budget=self._budget,
            status=_retry_status,
        )

    async def _attempt(self, call: _Call) -> dict[str, Any]:
        service, request = call.service, call.request
        instance, permit = self._pick(call)
        call.tried.add(instance.instance_id)
        remaining = call.deadline - time.monotonic()
        if remaining <= 0:
            permit.ignore()
            raise DeadlineExceeded(f"deadline passed before calling {service}")
        try:
            channel = self._channel(instance.endpoint)
        except TransportError as exc:  # a TLS file gone or half-written since start
            permit.ignore()
            raise Unavailable(str(exc)) from exc
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)
        started = time.perf_counter()
        code = 0
        try:
            reply = await stub.Invoke(
                request,
                timeout=remaining,
                metadata=((CORRELATION_ID_HEADER, request.correlation_id),),
            )
        except grpc.aio.AioRpcError as exc:
            status = exc.code()
            code = status.value[0]
            if is_infrastructure(status):
                permit.failure()
            else:
                permit.ignore()
            raise from_rpc_error(exc) from exc
        except asyncio.CancelledError:
            permit.ignore()
            raise
        else:
            permit.success()
            return struct_to_dict(reply.result)
        finally:
            self._report(service, instance, request, started, code)

    def _pick(self, call: _Call) -> tuple[registry_pb2.ServiceInstance, Permit]:
        service = call.service
        cached = self._services.get(service)
        if cached is None or not cached.instances:
            if not self._synced.is_set():
                raise Unavailable(f"no registry data yet for {service!r}")
            raise NotFound(f"service {service!r} has no registered instance")
        routes = self._routes(service, cached)
        if not call.routed:
            call.version = routes.choose()
            call.routed = True
        route = routes.route(call.version)
        # First instances the call has not tried, then any: a retry on the same
        # instance beats no call at all.
        for skip in (call.tried, _NOTHING_TRIED):
            for group, is_fallback in route.stages:
                tiers, spilled = group.tiers()
                for tier in tiers:
                    found = tier.acquire(skip)
                    if found is not None:
                        if spilled or route.version is not None:
                            self._count(service, route, spilled, is_fallback)
                        return found
        raise BreakersOpen(f"every instance of {service!r} has an open circuit breaker")

    def _count(self, service: str, route: _Route, spilled: bool, is_fallback: bool) -> None:
        """Count a pick's zone spill-over and split fallback; log fallback transitions."""
        if spilled:
            self.zone_spillovers[service] += 1
        if route.version is None:
            return
        key = (service, route.version)
        # Retrying on another version after trying every instance of the chosen one is
        # not a fallback: the version had callable instances.
        if is_fallback and not route.primary.has_callable():
            self.split_fallbacks[key] += 1
            if key not in self._falling_back:
                self._falling_back.add(key)
                _log.warning(
                    "traffic split of %s: version %r has no callable instance; "
                    "its share of calls falls back to the other versions",
                    service,
                    route.version,
                )
        elif not is_fallback and key in self._falling_back:
            self._falling_back.discard(key)
            _log.info("traffic split of %s: version %r is callable again", service, route.version)

    def _breaker(self, service: str, instance_id: str) -> CircuitBreaker:
        key = (service, instance_id)
        breaker = self._breakers.get(key)
        if breaker is None:

            def log(old: Any, new: Any) -> None:
                _log.info(
                    "circuit breaker service=%s instance=%s %s->%s",
                    service,
                    instance_id,
                    old.name,
                    new.name,
                )

            settings = self._plans.get(service, self._default_plan).breaker
            breaker = self._breakers[key] = CircuitBreaker(settings, on_transition=log)
        return breaker

    def breaker_state(self, service: str, instance_id: str) -> str:
        """CLOSED, OPEN or HALF_OPEN: the breaker of one instance, for operators."""
        return self._breaker(service, instance_id).state.name

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self._channels[endpoint] = open_channel(endpoint, self._peer_security)
        return channel

    def _report(
        self,
        service: str,
        instance: registry_pb2.ServiceInstance,
        request: processor_pb2.InvokeRequest,
        started: float,
        code: int,
    ) -> None:
        if self.reporter is None:
            return
        self.reporter.record_call(
            service,
            request.operation,
            (time.perf_counter() - started) * 1000,
            code == 0,
            code,
            instance_id=instance.instance_id,
            version=instance.version,
            correlation_id=request.correlation_id,
            side=metrics_pb2.CALL_SIDE_CLIENT,
            caller_service=self.caller_service,
        )


class BreakersOpen(Unavailable):
    """Every instance of the service has an open circuit breaker: fail fast, no retry."""


def _retry_status(error: BaseException) -> grpc.StatusCode | None:
    """The status of a failed attempt for the retry policy; None (no retry) when every
    breaker is open."""
    return None if isinstance(error, BreakersOpen) else status_of(error)


_current: MeshClient | None = None


def mesh() -> MeshClient:
    """The mesh client of the sidecar hosting this code (for processors that call
    other services); its calls are reported as outbound calls of this service."""
    if _current is None:
        raise RuntimeError("no mesh client: this code is not running in flext-sidecar")
    return _current


def set_current(client: MeshClient | None) -> None:
    """Make ``client`` the one :func:`mesh` returns (the sidecar does this)."""
    global _current  # noqa: PLW0603 - one client per sidecar process, by design
    _current = client


class SyncMeshClient:
    """The mesh client for synchronous code: a private event loop in a daemon thread."""

    def __init__(self, control_plane: str, **kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="mesh-client", daemon=True
        )
        self._thread.start()
        self.client = MeshClient(control_plane, **kwargs)
        self._run(self.client.start())

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result()

    def call(
        self,
        service: str,
        operation: str,
        payload: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Blocking twin of :meth:`MeshClient.call`."""
        return self._run(self.client.call(service, operation, payload, **kwargs))

    def close(self) -> None:
        """Stop the client and its loop thread."""
        self._run(self.client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> SyncMeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
