"""Plans and picks of the mesh client: which instance each attempt of a call goes to.

A service's *plan* is its pushed ``ServicePolicy`` merged over the client's settings;
its *routes* are the instances the plan lets a pick choose among, grouped by split
version and zone, each group with the strategy's picker and the instances' breakers.
Both are computed when the cache or the policy changes, not per call: without a split
or zone preference, a pick is the strategy's choice and a breaker check.

Traffic policy
    The client applies a policy from the next call on, without restart; a snapshot
    replaces every policy; a deleted policy puts the service back on the settings;
    while the control plane is away the last policy stays in force. A policy that fails
    the control plane's validation is ignored (and logged): the previous one stays.

    Precedence, highest first; a policy field that is unset (or 0, per registry.proto)
    does not count::

        deadline         call(timeout=) > policy operation_timeouts[operation]
                         > policy default_timeout > ClientSettings.default_timeout;
                         never later than the deadline of the call being served
                         (less ClientSettings.deadline_margin), when there is one
        retries          policy retry, whole: its unset fields take common.proto's
                         defaults (3 attempts, 100 ms x 2.0 up to 5 s, jitter 0.2, the
                         infrastructure codes; ABORTED may be listed too)
                         > ClientSettings max_attempts, initial_backoff, max_backoff
                         (x 2.0, jitter 0.2, the infrastructure codes)
        per-try timeout  policy retry.per_try_timeout (a policy retry without one
                         means the default) > ClientSettings.per_try_timeout
                         > deadline / max_attempts while an untried instance is left
        breakers         each circuit_breaker field the policy sets
                         > ClientSettings.breaker > BreakerSettings' defaults
        strategy         policy strategy > weighted round robin
        version split    policy splits > no split
        zone preference  policy zone, for the caller zone: MeshClient(zone=)
                         > ClientSettings.zone > FLEXT_MESH_ZONE; no caller zone:
                         no preference

    The retry budget is the client's (``retry_budget_ratio``) whatever the policy.
    New breaker settings reconfigure the service's existing breakers in place: they
    keep their state (an open breaker stays open until its open period ends) and their
    newest outcomes, and the new thresholds apply from the next outcome.

Picks
    *Callable* instances are healthy (SERVING or UNKNOWN), not ejected, of effective
    weight > 0, and their breaker admits a call; when no instance of a service is
    healthy, every instance counts as healthy (panic: better an unhealthy instance than
    none). Instances in maintenance (drained by an operator) are never picked, not even
    in panic: the routes leave them out. One call:

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
       it tried already. When the chosen instance's breakers refuse the call, the
       strategy chooses again (its turn passes to the next in the rotation, not always
       to the same instance); only then is the rest tried by weight.

    Routes are built again after every change of the service, but a weighted round
    robin does not start over each time (that gave the first instance one extra call
    per change: 60% of the calls with a change every 5): the picker is kept while the
    instances and weights it reads are unchanged, and a new one carries on after the
    instance picked last.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import grpc
from google.protobuf import duration_pb2

from flext_mesh.errors import Unavailable
from flext_mesh.retry import ALLOWED_RETRYABLE, RetrySpec
from flext_mesh.routing.balancer import Candidate, Picker, Strategy
from flext_mesh.routing.policy import (
    DEFAULT_ZONE_MIN_HEALTHY_PERCENT,
    SplitPicker,
    retry_spec,
    validate_policy,
)
from flext_mesh.v1 import common_pb2, registry_pb2
from sidecar.breaker import BreakerBoard, BreakerSettings, CallPermit, InstanceBreakers

__all__ = [
    "Attempts",
    "BreakersOpen",
    "Plan",
    "Plans",
    "Router",
    "Routes",
    "callable_instance",
    "seconds",
]

_log = logging.getLogger("flext_sidecar.client")
_HEALTHY = (registry_pb2.HEALTH_STATUS_SERVING, registry_pb2.HEALTH_STATUS_UNKNOWN)
_NOTHING_TRIED: frozenset[str] = frozenset()


class BreakersOpen(Unavailable):
    """Every instance of the service has an open circuit breaker: fail fast, no retry."""


def seconds(duration: duration_pb2.Duration) -> float:
    """A protobuf Duration in seconds."""
    return duration.ToNanoseconds() / 1e9


def callable_instance(instance: registry_pb2.ServiceInstance) -> bool:
    """Healthy, not ejected, not in maintenance, of positive weight: what the registry
    says of an instance."""
    return (
        instance.health in _HEALTHY
        and not instance.ejected
        and not instance.maintenance
        and instance.effective_weight > 0
    )


# -- plans ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Plan:
    """What one service's calls follow: its policy merged over the settings."""

    default_timeout: float
    operation_timeouts: Mapping[str, float]
    retry: RetrySpec
    #: Longest one attempt may take; None: the call's deadline / retry.max_attempts.
    per_try_timeout: float | None
    breaker: BreakerSettings
    strategy: Strategy
    #: The version rotation (its state lives as long as the policy); None: no split.
    split: SplitPicker | None
    #: Zone preference threshold in percent; None: no preference (or no caller zone).
    zone_min_percent: float | None
    #: ``retry`` that also retries DEADLINE_EXCEEDED: for calls whose attempts are cut
    #: by a per-try timeout, which is worth cutting only to try again.
    cut_retry: RetrySpec = field(init=False)
    #: Whether ``retry`` itself retries DEADLINE_EXCEEDED (worked out once, not per call).
    retries_deadline: bool = field(init=False)

    def __post_init__(self) -> None:
        deadline = grpc.StatusCode.DEADLINE_EXCEEDED
        cut = replace(self.retry, retryable=self.retry.retryable | {deadline})
        object.__setattr__(self, "cut_retry", cut)
        object.__setattr__(self, "retries_deadline", deadline in self.retry.retryable)


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
        changes["open_duration"] = seconds(policy.open_duration)
    if policy.HasField("max_open_duration"):
        changes["max_open_duration"] = seconds(policy.max_open_duration)
    # A policy that moves one end of a pair keeps the other end of the settings valid.
    window = changes.get("sliding_window_size", base.sliding_window_size)
    if "minimum_calls" not in changes and base.minimum_calls > window:
        changes["minimum_calls"] = window
    opened = changes.get("open_duration", base.open_duration)
    if "max_open_duration" not in changes and base.max_open_duration < opened:
        changes["max_open_duration"] = opened
    return base.with_overrides(**changes)


def plan_of(
    policy: registry_pb2.ServicePolicy, default: Plan, breaker_base: BreakerSettings, zone: str
) -> Plan:
    """``policy`` merged over ``default`` (the settings' plan); ValueError when it cannot
    apply. ``breaker_base`` is what the policy's breaker fields override; ``zone`` the
    caller's ("" for none)."""
    weights = {s.version: s.weight for s in policy.splits if s.weight > 0}
    zone_policy = policy.zone
    return Plan(
        default_timeout=(
            seconds(policy.default_timeout)
            if policy.HasField("default_timeout") and seconds(policy.default_timeout) > 0
            else default.default_timeout
        ),
        operation_timeouts={
            op: seconds(limit)
            for op, limit in policy.operation_timeouts.items()
            if seconds(limit) > 0
        },
        retry=(
            _retry_of(policy.retry, policy.service_name)
            if policy.HasField("retry")
            else default.retry
        ),
        # The policy's retry replaces the settings' whole, per-try timeout included.
        per_try_timeout=(
            (seconds(policy.retry.per_try_timeout) or None)
            if policy.HasField("retry")
            else default.per_try_timeout
        ),
        breaker=(
            _breaker_of(breaker_base, policy.circuit_breaker)
            if policy.HasField("circuit_breaker")
            else default.breaker
        ),
        strategy=Strategy(policy.strategy) if policy.strategy else default.strategy,
        split=SplitPicker(weights) if weights else None,
        zone_min_percent=(
            (
                zone_policy.min_healthy_percent
                if zone_policy.HasField("min_healthy_percent")
                else DEFAULT_ZONE_MIN_HEALTHY_PERCENT
            )
            if zone_policy.enabled and zone
            else None
        ),
    )


class Plans:
    """The policy in force for each service and the plan made of it."""

    def __init__(self, default: Plan, breaker_base: BreakerSettings, zone: str) -> None:
        self.default = default
        self._breaker_base = breaker_base
        self._zone = zone
        self._policies: dict[str, registry_pb2.ServicePolicy] = {}
        #: The plans of the services with a policy (read on every call).
        self.by_service: dict[str, Plan] = {}

    def plan(self, service: str) -> Plan:
        """The plan of ``service``'s calls."""
        return self.by_service.get(service, self.default)

    def policy(self, service: str) -> registry_pb2.ServicePolicy | None:
        """The policy in force for ``service`` (not a copy); None without one."""
        return self._policies.get(service)

    def set(self, service: str, policy: registry_pb2.ServicePolicy | None) -> Plan | None:
        """Put ``policy`` (None: none) in force for ``service``; returns the new plan, or
        None when nothing changed (the same policy again, or an invalid one, ignored)."""
        current = self._policies.get(service)
        if policy is None:
            if current is None:
                return None
            del self._policies[service]
            self.by_service.pop(service, None)
            _log.info("traffic policy of %s deleted; back to the client settings", service)
            return self.default
        if current is not None and policy == current:
            return None  # e.g. the same policy again in a resync snapshot: keep the rotation
        try:
            problems = validate_policy(policy)
            if problems:
                raise ValueError("; ".join(f"{p.field}: {p.description}" for p in problems))
            plan = plan_of(policy, self.default, self._breaker_base, self._zone)
        except ValueError as exc:
            _log.error(
                "traffic policy version %d of %s ignored, the previous one stays: %s",
                policy.version,
                service,
                exc,
            )
            return None
        self._policies[service] = policy
        self.by_service[service] = plan
        _log.info("traffic policy version %d of %s applied", policy.version, service)
        return plan


# -- routes --------------------------------------------------------------------------


class _Rotation:
    """What a tier's picker carries over when the tier is built again: the picker
    itself while its inputs are unchanged, else where its rotation had got to."""

    __slots__ = ("last", "picker", "signature")

    def __init__(self) -> None:
        self.signature: tuple[Any, ...] = ()
        self.picker: Picker | None = None
        #: Instance id of the last pick; "" before any.
        self.last = ""


#: Strategies whose every pick is the same until the candidates change.
_FIXED = frozenset({Strategy.LEAST_RESPONSE_TIME, Strategy.HIGHEST_UPTIME})


class _Tier:
    """Instances a pick may choose among, their breakers, and the strategy's picker."""

    __slots__ = ("breakers", "draws", "instances", "picker", "rotation")

    def __init__(
        self,
        instances: list[registry_pb2.ServiceInstance],
        breakers: list[InstanceBreakers],
        strategy: Strategy,
        rotation: _Rotation,
    ) -> None:
        """``instances`` are sorted by id; ``rotation`` is the one of the tier this one
        replaces (same service, version and zone)."""
        self.instances = instances
        self.breakers = breakers
        self.rotation = rotation
        #: Picks drawn before falling back to the fixed order, when one is refused.
        self.draws = 1 if strategy in _FIXED else len(instances)
        ids = [i.instance_id for i in instances]
        weights = [i.effective_weight or float(i.weight or 1) for i in instances]
        signature: tuple[Any, ...] = (strategy, ids, weights)
        if strategy is not Strategy.WEIGHTED_ROUND_ROBIN and strategy is not Strategy.RANDOM:
            signature += (
                [i.response_time_ms for i in instances],
                [i.uptime_percentage for i in instances],
            )
        if rotation.picker is not None and rotation.signature == signature:
            # A change that moves nothing the strategy reads (health checks' response
            # times under round robin, labels, renewals) keeps the picker: a new one
            # would start its rotation over and favour its first candidates.
            self.picker = rotation.picker
            return
        self.picker = Picker(
            [
                Candidate(key, weight, i.response_time_ms, i.uptime_percentage)
                for key, weight, i in zip(ids, weights, instances, strict=True)
            ],
            strategy,
            # Carry on after the last pick, not from the first instance again.
            start=bisect_right(ids, rotation.last) if rotation.last else None,
        )
        rotation.picker, rotation.signature = self.picker, signature

    def acquire(
        self, skip: frozenset[str] | set[str], operation: str
    ) -> tuple[registry_pb2.ServiceInstance, CallPermit] | None:
        """The strategy's choice, else its next choices, else the first in its fixed
        order: the first instance not in ``skip`` whose breakers admit a call of
        ``operation``, with their permit."""
        picker = self.picker
        instances = self.instances
        for _ in range(self.draws):
            index = picker.pick()
            instance = instances[index]
            if instance.instance_id not in skip:
                permit = self.breakers[index].acquire(operation)
                if permit is not None:
                    self.rotation.last = instance.instance_id
                    return instance, permit
        # Drawing again gives a refused pick's share to the next in the rotation, not
        # always to the same instance; the fixed order is the last resort.
        drawn = index
        for index in picker.order(drawn):
            instance = instances[index]
            if index == drawn or instance.instance_id in skip:
                continue
            permit = self.breakers[index].acquire(operation)
            if permit is not None:
                self.rotation.last = instance.instance_id
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


class Routes:
    """The routes of one service at one cache state and plan."""

    __slots__ = ("by_version", "default", "plan", "size", "split")

    def __init__(
        self, plan: Plan, default: _Route, by_version: dict[str, _Route], size: int
    ) -> None:
        self.plan = plan
        #: Instances the routes lead to.
        self.size = size
        self.split = plan.split
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


class Attempts:
    """What a pick needs of one call across its attempts."""

    __slots__ = ("routed", "service", "tried", "version")

    def __init__(self, service: str) -> None:
        self.service = service
        self.tried: set[str] = set()
        self.routed = False
        self.version: str | None = None


class Router:
    """Builds each service's routes and picks an instance per attempt (see *Picks*).

    ``split_fallbacks[(service, version)]`` counts the attempts that fell back from a
    split version without a callable instance, ``zone_spillovers[service]`` the attempts
    that left the caller's zone because too few of its instances were callable.
    """

    def __init__(self, plans: Plans, breakers: BreakerBoard, zone: str) -> None:
        self.plans = plans
        self.zone = zone
        self._breakers = breakers
        self.split_fallbacks: Counter[tuple[str, str]] = Counter()
        self.zone_spillovers: Counter[str] = Counter()
        self._falling_back: set[tuple[str, str]] = set()
        # By (service, version, the other versions, caller zone only).
        self._rotations: dict[tuple[str, str | None, bool, bool], _Rotation] = {}

    def build(self, service: str, instances: Mapping[str, registry_pb2.ServiceInstance]) -> Routes:
        """The routes of ``service`` over ``instances`` under its current plan (those in
        maintenance left out: ``size`` 0 when every instance is)."""
        plan = self.plans.plan(service)
        everything = sorted(
            (i for i in instances.values() if not i.maintenance), key=lambda i: i.instance_id
        )
        live = [i for i in everything if callable_instance(i)] or everything  # empty: panic

        def group(version: str | None = None, *, others: bool = False) -> _Group:
            """The instances of ``version`` (None: every one), or of the other versions."""

            def keep(instance: registry_pb2.ServiceInstance) -> bool:
                return version is None or (instance.version == version) != others

            members = [i for i in live if keep(i)]
            everywhere = self._tier(service, (version, others, False), members, plan.strategy)
            if plan.zone_min_percent is None:
                return _Group(everywhere)
            zone = self.zone
            return _Group(
                everywhere,
                self._tier(
                    service,
                    (version, others, True),
                    [i for i in members if i.zone == zone],
                    plan.strategy,
                ),
                sum(1 for i in everything if keep(i) and i.zone == zone),
                plan.zone_min_percent,
            )

        by_version: dict[str, _Route] = {}
        if plan.split is not None:
            for version in plan.split.weights:
                by_version[version] = _Route(version, group(version), group(version, others=True))
        return Routes(plan, _Route(None, group(), None), by_version, len(live))

    def _tier(
        self,
        service: str,
        key: tuple[str | None, bool, bool],
        instances: list[registry_pb2.ServiceInstance],
        strategy: Strategy,
    ) -> _Tier | None:
        if not instances:
            return None
        rotation = self._rotations.setdefault((service, *key), _Rotation())
        breakers = [self._breakers.of(service, i.instance_id) for i in instances]
        return _Tier(instances, breakers, strategy, rotation)

    def pick(
        self, routes: Routes, call: Attempts, operation: str
    ) -> tuple[registry_pb2.ServiceInstance, CallPermit]:
        """An instance for the next attempt of ``call`` and its breakers' permit; raises
        BreakersOpen when every breaker refuses."""
        service = call.service
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
                    found = tier.acquire(skip, operation)
                    if found is not None:
                        if spilled or route.version is not None:
                            self._count(service, route, spilled, is_fallback)
                        return found
        raise BreakersOpen(
            f"every instance of {service!r} has an open circuit breaker"
            + ("" if self._open_for_instances(routes, route) else f" for {operation!r}")
        )

    @staticmethod
    def _open_for_instances(routes: Routes, route: _Route) -> bool:
        """Whether the instances' own breakers (not only operations') are all open."""
        return not any(group.has_callable() for group, _ in route.stages)

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
