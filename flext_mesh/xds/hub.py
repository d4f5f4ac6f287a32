"""The xDS hub: resources built from the registry cache, and the ADS streams they feed.

Every stream is indexed by the services it subscribed to. A registry change (an
instance written or removed, a policy put or deleted) only marks its service dirty;
at most every ``coalesce`` seconds the dirty services' built resources are dropped and
the streams subscribed to them are woken, each of which then sends what changed for
it. A flood of weight changes therefore costs a set insertion each, and a push per
stream at most every ``coalesce`` seconds; nothing is O(clients x services).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from google.protobuf import any_pb2

from flext_mesh.names import check_name
from flext_mesh.registry.cache import InstanceCache, InstanceChange
from flext_mesh.v1 import registry_pb2
from flext_mesh.xds import resources
from flext_mesh.xds.resources import CDS, EDS, LDS, RDS, service_of
from flext_mesh.xds.streams import AdsStream, ClientState, StreamTotals

__all__ = ["COALESCE_SECONDS", "PUSH_BUCKETS_SECONDS", "PushTimes", "Subscriber", "XdsHub"]

_log = logging.getLogger("flext_mesh.xds")

#: Changes within this many seconds go out as one push per stream.
COALESCE_SECONDS = 0.05
#: Upper bounds (seconds) of the push latency histogram: from a change being marked to
#: the response it caused being written to a stream (the coalescing delay included).
PUSH_BUCKETS_SECONDS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
)


class PushTimes:
    """How long changes took to reach the streams: a fixed-bucket histogram, written and
    read on the event loop."""

    def __init__(self) -> None:
        self.counts = [0] * (len(PUSH_BUCKETS_SECONDS) + 1)
        self.total_seconds = 0.0

    def observe(self, seconds: float) -> None:
        """Count one push that took ``seconds``."""
        self.counts[bisect.bisect_left(PUSH_BUCKETS_SECONDS, seconds)] += 1
        self.total_seconds += seconds

    def cumulative(self) -> tuple[list[int], float]:
        """Counts at or below each bound then the +Inf count, and the sum of seconds."""
        return list(itertools.accumulate(self.counts)), self.total_seconds


@dataclass(eq=False, slots=True)
class Subscriber:
    """One open ADS stream as the hub sees it: its protocol state and its wake-up."""

    stream: AdsStream
    #: Set when the stream has something to send (a request came, a change concerns it).
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    #: Set by the hub when it closes every stream (shutdown).
    closed: bool = False
    #: Services the hub indexed it under.
    services: frozenset[str] = frozenset()
    #: When the oldest change it was woken for and has not written yet was marked
    #: (``time.monotonic()``); None when there is none.
    marked: float | None = None

    def take_marked(self) -> float | None:
        """The mark of the changes about to be written, forgotten here (a change marked
        while they are written wakes the stream again with its own mark)."""
        marked, self.marked = self.marked, None
        return marked


class XdsHub:
    """Builds xDS resources from the registry cache and wakes the streams they concern."""

    def __init__(
        self,
        cache: InstanceCache,
        *,
        panic_threshold_percent: float = 50.0,
        coalesce: float = COALESCE_SECONDS,
    ) -> None:
        """``panic_threshold_percent``: the registry's default, for services whose
        policy sets none; ``coalesce``: seconds changes are gathered before a push."""
        self._cache = cache
        self._panic = panic_threshold_percent
        self._coalesce = coalesce
        self._subscribers: dict[int, Subscriber] = {}
        self._by_service: dict[str, set[Subscriber]] = {}
        self._wildcards: set[Subscriber] = set()
        # service -> (type, name, zone) -> the packed resource (None: does not exist).
        self._built: dict[str, dict[tuple[str, str, str], any_pb2.Any | None]] = {}
        # service -> when its first change since the last push was marked (monotonic).
        self._dirty: dict[str, float] = {}
        self._flush: asyncio.TimerHandle | None = None
        #: Pushes sent since start (a push: one stream woken by a change).
        self.pushes = 0
        #: Responses and NACKs of every stream since start, per type URL.
        self.totals = StreamTotals()
        #: From a change's mark to its response written, per stream that sent one.
        self.push_times = PushTimes()
        cache.on_instance(self._on_instance)
        cache.on_policy(self._mark)

    # -- streams -------------------------------------------------------------------

    def open(self, peer: str) -> Subscriber:
        """A new ADS stream from ``peer``."""
        subscriber = Subscriber(AdsStream(peer, self.resolve, totals=self.totals))
        self._subscribers[subscriber.stream.state.stream_id] = subscriber
        return subscriber

    def close(self, subscriber: Subscriber) -> None:
        """Forget a stream that ended."""
        self._subscribers.pop(subscriber.stream.state.stream_id, None)
        self._index(subscriber, frozenset())
        self._wildcards.discard(subscriber)

    def reindex(self, subscriber: Subscriber) -> None:
        """File the stream under the services it now subscribes to."""
        self._index(subscriber, frozenset(subscriber.stream.services))
        if subscriber.stream.wildcard:
            self._wildcards.add(subscriber)
        else:
            self._wildcards.discard(subscriber)

    def _index(self, subscriber: Subscriber, services: frozenset[str]) -> None:
        for gone in subscriber.services - services:
            streams = self._by_service.get(gone)
            if streams is not None:
                streams.discard(subscriber)
                if not streams:
                    del self._by_service[gone]
        for new in services - subscriber.services:
            self._by_service.setdefault(new, set()).add(subscriber)
        subscriber.services = services

    @property
    def revision(self) -> int:
        """The registry revision the resources are built from."""
        return self._cache.revision

    def clients(self) -> list[ClientState]:
        """Every connected client's state, oldest stream first (read only)."""
        return [s.stream.state for _, s in sorted(self._subscribers.items())]

    def close_all(self) -> None:
        """End every stream (shutdown): each handler returns at its next wake-up."""
        for subscriber in self._subscribers.values():
            subscriber.closed = True
            subscriber.wake.set()
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None

    # -- changes -------------------------------------------------------------------

    def _on_instance(self, change: InstanceChange) -> None:
        self._mark(change.service)

    def _mark(self, service: str) -> None:
        """Note a change of ``service``; a push follows within ``coalesce`` seconds."""
        if service not in self._by_service and service not in self._built and not self._wildcards:
            return
        self._dirty.setdefault(service, time.monotonic())
        if self._flush is None:
            self._flush = asyncio.get_running_loop().call_later(self._coalesce, self._push)

    def _push(self) -> None:
        self._flush = None
        dirty, self._dirty = self._dirty, {}
        woken: dict[Subscriber, float] = {}
        if self._wildcards and dirty:
            oldest = min(dirty.values())
            woken.update(dict.fromkeys(self._wildcards, oldest))
        for service, marked in dirty.items():
            self._built.pop(service, None)
            for subscriber in self._by_service.get(service, ()):
                woken[subscriber] = min(marked, woken.get(subscriber, marked))
        for subscriber, marked in woken.items():
            if subscriber.marked is None or marked < subscriber.marked:
                subscriber.marked = marked
            subscriber.wake.set()
        self.pushes += len(woken)

    def pushed(self, marked: float | None, responses: int) -> None:
        """A stream wrote ``responses`` after being woken by changes marked at
        ``marked`` (see :meth:`Subscriber.take_marked`): time the push."""
        if marked is not None and responses:
            self.push_times.observe(time.monotonic() - marked)

    # -- resources -----------------------------------------------------------------

    def names(self, type_url: str) -> list[str]:
        """Every Listener or Cluster name there is (for a wildcard subscription)."""
        services = sorted(set(self._cache.services) | set(self._cache.policies))
        return services if type_url in (LDS, CDS) else []

    def exists(self, service: str) -> bool:
        """A service the mesh knows: it has an instance or a policy."""
        return bool(self._cache.instances(service)) or service in self._cache.policies

    def resolve(
        self, type_url: str, names: Iterable[str], caller_zone: str
    ) -> dict[str, any_pb2.Any | None]:
        """The current resources of ``names`` (None for one that does not exist)."""
        return {name: self._resource(type_url, name, caller_zone) for name in names}

    def _resource(self, type_url: str, name: str, caller_zone: str) -> any_pb2.Any | None:
        service = service_of(name)
        policy = self._cache.policies.get(service)
        zone = caller_zone if type_url == EDS and policy is not None and policy.zone.enabled else ""
        if not self.exists(service):  # not kept: names nothing backs cost no memory
            return self._build(type_url, name, service, policy, zone)
        built = self._built.setdefault(service, {})
        key = (type_url, name, zone)
        if key in built:
            return built[key]
        out = self._build(type_url, name, service, policy, zone)
        built[key] = out
        return out

    def _build(
        self,
        type_url: str,
        name: str,
        service: str,
        policy: registry_pb2.ServicePolicy | None,
        zone: str,
    ) -> any_pb2.Any | None:
        valid = not check_name("service", service)
        if type_url == EDS:
            instances: list[registry_pb2.ServiceInstance] = (
                list(self._cache.instances(service).values()) if valid else []
            )
            version = resources.version_of_cluster(name)
            if version is not None:
                instances = [i for i in instances if i.version == version]
            members = resources.endpoints(instances, policy, self._panic)
            return resources.pack(resources.load_assignment(name, members, caller_zone=zone))
        if not valid or not self.exists(service):
            return None
        if type_url == LDS:
            return resources.pack(resources.listener(name))
        if type_url == RDS:
            if name != service:
                return None
            split = resources.split_of(policy, self._cache.instances(service).values())
            return resources.pack(resources.route_configuration(service, policy, split))
        if type_url == CDS:
            return resources.pack(resources.cluster(name, policy))
        return None
