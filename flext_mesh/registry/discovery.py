"""Discovery: Discover answers (pickers, version splits, zones, panic) and ListServices.

An answer is built once per query and registry revision, and costs O(n) in the
instances it holds: a header (the DiscoverResponse without instances) and each
instance's encoded element from the cache, joined per call in the order the picker
chooses (a repeated message field is the concatenation of its encoded elements). A
call on an unchanged service is one pick and one join. Building an answer of a large
service (:data:`THREAD_AT` instances or more) runs on a worker thread, so the event
loop keeps serving meanwhile; concurrent calls of the same query share one build.
Answers are kept in an LRU bounded by the number of instances they hold in total.

In-process callers (the orchestrator's invoker) read the chosen instances from a
:class:`Discovered` without decoding the bytes.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from flext_mesh.errors import FieldViolation, NotFound
from flext_mesh.names import MAX_NAME, check_length, check_name, raise_if
from flext_mesh.paging import decode_page_token, encode_page_token
from flext_mesh.registry.cache import InstanceCache
from flext_mesh.routing.balancer import Picker, Strategy, in_panic
from flext_mesh.routing.policy import SplitPicker, apply_split, apply_zone, split_versions
from flext_mesh.v1 import registry_pb2

__all__ = ["THREAD_AT", "Discovered", "Discovery", "is_healthy"]

_HS = registry_pb2.HealthStatus
_HEALTHY = frozenset({_HS.HEALTH_STATUS_SERVING, _HS.HEALTH_STATUS_UNKNOWN})
_WRR = registry_pb2.LOAD_BALANCING_STRATEGY_WEIGHTED_ROUND_ROBIN
#: Answers of this many instances or more are built on a worker thread.
THREAD_AT = 1000
#: An answer's instances are re-encoded at most this often when they were renewed
#: (their last_renew_time moved), seconds.
RENEWAL_REFRESH = 1.0
#: New encodings handed to the cache between two yields to the event loop.
_KEEP_SLICE = 2000
#: Most instances all cached answers may hold together (memory stays bounded).
MAX_CACHED_INSTANCES = 200_000

_Query = tuple[str, str, tuple[tuple[str, str], ...], int, bool, int, str, str]


def is_healthy(instance: registry_pb2.ServiceInstance) -> bool:
    """Whether Discover counts the instance as healthy (serving, not ejected, not in
    maintenance, weighted)."""
    return (
        instance.health in _HEALTHY
        and not instance.ejected
        and not instance.maintenance
        and instance.effective_weight > 0
    )


@dataclass(slots=True)
class _Answer:
    """A query's answer at one revision, in encoded parts."""

    revision: int
    renewals: int
    picker: Picker | None
    header: bytes
    members: list[registry_pb2.ServiceInstance]
    encodings: list[bytes]
    limit: int = 0
    split_fallback: bool = False
    encoded_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class Discovered:
    """One Discover call's answer: the instances in the chosen order, and its bytes."""

    _answer: _Answer
    _first: int

    def first(self) -> registry_pb2.ServiceInstance | None:
        """The chosen instance (shared with the registry's cache: do not change it)."""
        if self._first < 0:
            return None
        return self._answer.members[self._first]

    def _order(self) -> list[int]:
        answer = self._answer
        if answer.picker is None:
            return []
        return answer.picker.order(self._first, answer.limit)

    def instances(self) -> list[registry_pb2.ServiceInstance]:
        """Every instance of the answer in order (shared objects: do not change them)."""
        members = self._answer.members
        return [members[i] for i in self._order()]

    def payload(self) -> bytes:
        """The serialized DiscoverResponse."""
        answer = self._answer
        encodings = answer.encodings
        return answer.header + b"".join([encodings[i] for i in self._order()])


class Discovery:
    """Answers Discover and ListServices from the cache."""

    def __init__(
        self,
        cache: InstanceCache,
        *,
        panic_threshold_percent: float = 50.0,
        cache_size: int = 4096,
        on_split_fallback: Callable[[str, str], None] | None = None,
    ) -> None:
        """``on_split_fallback(service, version)`` counts answers that fell back."""
        self._cache = cache
        self._panic = panic_threshold_percent
        self._cache_size = cache_size
        self._on_split_fallback = on_split_fallback
        self._answers: OrderedDict[_Query, _Answer] = OrderedDict()
        self._held = 0  # instances held by the cached answers
        self._building: dict[_Query, asyncio.Future[_Answer]] = {}
        self._splits: dict[str, tuple[int, SplitPicker]] = {}
        self._executor: ThreadPoolExecutor | None = None

    def close(self) -> None:
        """Stop the worker thread (builds in progress finish on their own)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- Discover ------------------------------------------------------------------

    async def discover(self, request: registry_pb2.DiscoverRequest) -> Discovered:
        """The answer to one Discover request (see registry.proto)."""
        cache = self._cache
        service = request.service_name
        healthy_only = request.healthy_only if request.HasField("healthy_only") else True
        policy = cache.policies.get(service) if service else None
        strategy = request.strategy or (policy.strategy if policy is not None else 0) or _WRR
        version = ""
        if policy is not None and policy.splits:
            version = self._split_picker(service, policy).pick()
        zone = request.caller_zone if policy is not None and policy.zone.enabled else ""
        query: _Query = (
            service,
            request.type,
            tuple(sorted(request.label_selector.items())),
            strategy,
            healthy_only,
            request.limit,
            version,
            zone,
        )
        revision = cache.service_revision(service) if service else cache.revision
        renewals = cache.renewals(service) if service else 0
        answer = self._answers.get(query)
        if answer is None or answer.revision != revision:
            answer = await self._build_shared(query, request, strategy, revision, renewals)
        elif answer.renewals != renewals and (
            time.monotonic() - answer.encoded_at >= RENEWAL_REFRESH
        ):
            await self._reencode(answer, renewals)
        else:
            self._answers.move_to_end(query)
        if answer.split_fallback and self._on_split_fallback is not None:
            self._on_split_fallback(service, version)
        return Discovered(answer, answer.picker.pick() if answer.picker is not None else -1)

    def _split_picker(self, service: str, policy: registry_pb2.ServicePolicy) -> SplitPicker:
        known = self._splits.get(service)
        if known is None or known[0] != policy.revision:
            known = self._splits[service] = (
                policy.revision,
                SplitPicker(split_versions(policy)),
            )
        return known[1]

    async def _build_shared(
        self,
        query: _Query,
        request: registry_pb2.DiscoverRequest,
        strategy: int,
        revision: int,
        renewals: int,
    ) -> _Answer:
        """Build the query's answer once, however many calls wait for it."""
        building = self._building.get(query)
        if building is not None:
            return await asyncio.shield(building)
        _validate(request, strategy)
        pool = self._pool(request)
        future: asyncio.Future[_Answer] = asyncio.get_running_loop().create_future()
        self._building[query] = future
        try:
            policy = self._cache.policies.get(request.service_name)
            build = functools.partial(
                self._build,
                pool,
                query,
                limit=request.limit,
                strategy=strategy,
                revision=revision,
                renewals=renewals,
                policy=policy,
            )
            if len(pool) >= THREAD_AT:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(1, thread_name_prefix="discover")
                loop = asyncio.get_running_loop()
                answer, fresh = await loop.run_in_executor(self._executor, build)
            else:
                answer, fresh = build()
            await self._keep(fresh)
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: waiters (if any) get it too
            raise
        finally:
            self._building.pop(query, None)
        future.set_result(answer)
        self._remember(query, answer)
        return answer

    def _remember(self, query: _Query, answer: _Answer) -> None:
        old = self._answers.pop(query, None)
        if old is not None:
            self._held -= len(old.members)
        self._answers[query] = answer
        self._held += len(answer.members)
        while self._answers and (
            len(self._answers) > self._cache_size or self._held > MAX_CACHED_INSTANCES
        ):
            _, evicted = self._answers.popitem(last=False)
            self._held -= len(evicted.members)

    def _pool(self, request: registry_pb2.DiscoverRequest) -> list[registry_pb2.ServiceInstance]:
        """The instances a query starts from (copied on the loop: the cache moves)."""
        if request.service_name:
            pool = list(self._cache.instances(request.service_name).values())
            if not pool:
                raise NotFound(f"service {request.service_name!r} has no registered instance")
            return pool
        return [i for s in self._cache.services.values() for i in s.values()]

    def _build(
        self,
        pool: list[registry_pb2.ServiceInstance],
        query: _Query,
        *,
        limit: int,
        strategy: int,
        revision: int,
        renewals: int,
        policy: registry_pb2.ServicePolicy | None,
    ) -> tuple[_Answer, list[tuple[registry_pb2.ServiceInstance, bytes]]]:
        """The answer (may run on the worker thread: reads only its arguments and the
        cache's encodings; new encodings are returned for the loop to keep)."""
        service, type_, labels, _, healthy_only, _, version, zone = query
        notes: list[str] = []
        if type_:
            pool = [i for i in pool if i.type == type_]
        for key, value in labels:
            pool = [i for i in pool if i.labels.get(key) == value]
        if not pool and not service:
            raise NotFound(f"no instance of type {type_!r} is registered")
        if healthy_only:
            # Drained on purpose: never an answer's fallback, and not counted in panic.
            drained = len(pool)
            pool = [i for i in pool if not i.maintenance]
            drained -= len(pool)
            if drained:
                notes.append(f"{drained} instance(s) in maintenance left out")
        if service:
            pool.sort(key=_instance_id)
        else:
            pool.sort(key=_service_and_id)
        healthy = [i for i in pool if is_healthy(i)]
        panic = False
        chosen = pool
        threshold = (
            policy.panic_threshold_percent
            if policy is not None and policy.HasField("panic_threshold_percent")
            else self._panic
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
            callable_ = (lambda i: True) if panic or not healthy_only else is_healthy
            chosen, split_fallback = apply_split(chosen, version, _version, callable_)
            if split_fallback:
                notes.append(
                    f"split: version {version!r} has no healthy instance; "
                    "falling back to the other versions"
                )
        if zone:
            chosen, zone_spillover = apply_zone(chosen, zone, policy, _zone, is_healthy)
            if zone_spillover:
                notes.append(f"zone {zone!r} is short of healthy instances; spilling over")
        header = registry_pb2.DiscoverResponse(
            strategy=registry_pb2.LoadBalancingStrategy.ValueType(strategy),
            panic_mode=panic,
            revision=revision,
            notes=notes,
            selected_version=version,
            split_fallback=split_fallback,
            zone_spillover=zone_spillover,
        ).SerializeToString()
        if not chosen:
            empty = _Answer(revision, renewals, None, header, [], [], split_fallback=split_fallback)
            return empty, []
        picker = Picker.from_columns(
            [i.instance_id for i in chosen],
            [_weight(i, panic) for i in chosen],
            [i.response_time_ms for i in chosen],
            [i.uptime_percentage for i in chosen],
            Strategy(strategy),
            rotate=True,
        )
        encodings, fresh = self._cache.encodings_of(chosen)
        answer = _Answer(
            revision,
            renewals,
            picker,
            header,
            chosen,
            encodings,
            limit=limit,
            split_fallback=split_fallback,
        )
        return answer, fresh

    async def _reencode(self, answer: _Answer, renewals: int) -> None:
        """Bring the answer's bytes up to date with renewals (same picker, same order)."""
        answer.renewals = renewals
        answer.encoded_at = time.monotonic()
        members = answer.members
        if len(members) >= THREAD_AT:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(1, thread_name_prefix="discover")
            loop = asyncio.get_running_loop()
            encodings, fresh = await loop.run_in_executor(
                self._executor, self._cache.encodings_of, members
            )
        else:
            encodings, fresh = self._cache.encodings_of(members)
        answer.encodings = encodings
        await self._keep(fresh)

    async def _keep(self, fresh: list[tuple[registry_pb2.ServiceInstance, bytes]]) -> None:
        """Hand new encodings to the cache, a slice at a time (there may be thousands
        after a burst of renewals or at start-up)."""
        for start in range(0, len(fresh), _KEEP_SLICE):
            if start:
                await asyncio.sleep(0)
            self._cache.keep_encodings(fresh[start : start + _KEEP_SLICE])

    # -- ListServices ----------------------------------------------------------------

    def list_services(
        self, page_size: int, page_token: str, type_filter: str
    ) -> registry_pb2.ListServicesResponse:
        """Services with instance counts and health, sorted by name, paged."""
        violations: list[FieldViolation] = []
        if not 0 <= page_size <= 1000:
            violations.append(FieldViolation("page_size", f"{page_size} is not in 0..1000"))
        violations += check_length("type", type_filter, MAX_NAME)
        raise_if(violations)
        query = ("ListServices", type_filter)
        after = decode_page_token(page_token, query)
        size = page_size or 100
        services = self._cache.services
        names = sorted(n for n in services if n > after)
        response = registry_pb2.ListServicesResponse(revision=self._cache.revision)
        for name in names:
            instances = list(services[name].values())
            if type_filter and not any(i.type == type_filter for i in instances):
                continue
            if len(response.services) == size:
                last = response.services[-1].service_name
                response.next_page_token = encode_page_token(last, query)
                break
            response.services.append(_summary(name, instances))
        return response


def _instance_id(instance: registry_pb2.ServiceInstance) -> str:
    return instance.instance_id


def _service_and_id(instance: registry_pb2.ServiceInstance) -> tuple[str, str]:
    return (instance.service_name, instance.instance_id)


def _version(instance: registry_pb2.ServiceInstance) -> str:
    return instance.version


def _zone(instance: registry_pb2.ServiceInstance) -> str:
    return instance.zone


def _weight(instance: registry_pb2.ServiceInstance, panic: bool) -> float:
    w = instance.effective_weight
    if w > 0:
        return w
    # In panic every instance is returned; unweighted ones count by their base weight.
    w = float(instance.weight) if panic else 0.0
    return w if w > 0 else 1e-9


def _validate(request: registry_pb2.DiscoverRequest, strategy: int) -> None:
    violations: list[FieldViolation] = []
    if not request.service_name and not request.type:
        violations.append(FieldViolation("service_name", "give service_name or type"))
    violations += check_name("service_name", request.service_name, required=False)
    violations += check_length("type", request.type, MAX_NAME)
    violations += check_length("caller_zone", request.caller_zone, MAX_NAME)
    if strategy not in registry_pb2.LoadBalancingStrategy.values():
        violations.append(FieldViolation("strategy", f"{strategy} is not a known strategy"))
    if not 0 <= request.limit <= 10_000:
        violations.append(FieldViolation("limit", "must be 0 (all) to 10000"))
    for key in sorted(request.label_selector):
        if not key:
            violations.append(FieldViolation("label_selector", "a label key is empty"))
        elif len(key) > 63:
            violations.append(
                FieldViolation("label_selector", f"a key is {len(key)} characters; at most 63")
            )
    for key, value in request.label_selector.items():
        if len(value) > 255:
            violations.append(
                FieldViolation(
                    f"label_selector[{key[:63]!r}]",
                    f"value is {len(value)} characters; at most 255",
                )
            )
    if len(request.label_selector) > 32:
        violations.append(FieldViolation("label_selector", "at most 32 labels"))
    raise_if(violations)


def _summary(
    name: str, instances: list[registry_pb2.ServiceInstance]
) -> registry_pb2.ServiceSummary:
    return registry_pb2.ServiceSummary(
        service_name=name,
        instance_count=len(instances),
        healthy_count=sum(1 for i in instances if is_healthy(i)),
        unhealthy_count=sum(1 for i in instances if i.health not in _HEALTHY),
        ejected_count=sum(1 for i in instances if i.ejected),
        maintenance_count=sum(1 for i in instances if i.maintenance),
        versions=sorted({i.version for i in instances if i.version}),
        types=sorted({i.type for i in instances if i.type}),
    )
