"""The mesh client's discovery cache: every service's instances and policies, as the
registry last said them.

:class:`Discovery` follows ``RegistryService.Watch``: the first message's snapshot
carries every instance and policy, then events (instance ADDED / UPDATED / REMOVED,
``POLICY_PUT`` with the whole new policy, ``POLICY_DELETED``). A broken stream is
resumed from the last revision, with backoff; meanwhile the cache keeps its last-known
state, so calls keep flowing while the control plane is away (*static stability*).
Policies are handed to the client as they come; what they mean is :mod:`sidecar.routes`'.

Empty-push protection (Nacos's, and Envoy's panic mode in spirit): when the last
instance of a service leaves (leases that expired while the store was frozen, a
control plane that came back without them) the client does not answer NotFound at
once. For ``grace`` seconds (30 by default) :meth:`ServiceEntry.last_known` still
offers the instances that left within that time, and calls go to them; one that
answers UNAVAILABLE is forgotten at once (:meth:`Discovery.forget`). Instances that
register again end it. This only ever applies to an empty set: while some instance is
registered, the departed ones are never called.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import grpc

from flext_mesh.retry import Backoff, RetrySpec
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from sidecar.routes import Routes

__all__ = ["Discovery", "PolicyHandler", "ServiceEntry"]

_log = logging.getLogger("flext_sidecar.client")

PolicyHandler = Callable[[str, "registry_pb2.ServicePolicy | None"], None]
"""Called with (service, its new policy or None when deleted) for every policy change."""


class ServiceEntry:
    """The cached instances of one service, the routes built from them, and the
    instances that left it lately."""

    __slots__ = ("_clock", "_departed", "grace", "instances", "last_known_routes", "routes")

    def __init__(self, grace: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.instances: dict[str, registry_pb2.ServiceInstance] = {}
        #: Built by the client on the first call after a change; None: build again.
        self.routes: Routes | None = None
        #: The routes over :meth:`last_known`, built while the set is empty.
        self.last_known_routes: Routes | None = None
        self.grace = grace
        self._clock = clock
        # Instance id -> (the instance as it was, monotonic time it left).
        self._departed: dict[str, tuple[registry_pb2.ServiceInstance, float]] = {}

    def changed(self) -> None:
        """The instances or the plan changed: the routes are built again."""
        self.routes = None
        self.last_known_routes = None

    def put(self, instance: registry_pb2.ServiceInstance) -> None:
        """An instance registered or changed."""
        self.instances[instance.instance_id] = instance
        self._departed.pop(instance.instance_id, None)

    def depart(self, instance_id: str) -> None:
        """An instance left the registry."""
        instance = self.instances.pop(instance_id, None)
        if instance is not None and self.grace > 0:
            self._prune()
            self._departed[instance_id] = (instance, self._clock())

    def last_known(self) -> dict[str, registry_pb2.ServiceInstance]:
        """The instances that left within the grace, by id; empty while some instance is
        registered (they stand in only for an empty set)."""
        if self.instances or not self._departed:
            return {}
        if self._prune():
            self.last_known_routes = None
        return {key: instance for key, (instance, _) in self._departed.items()}

    def state(self) -> tuple[bool, bool]:
        """Whether instances are registered, and whether last-known ones stand in."""
        return bool(self.instances), bool(self.last_known())

    def forget(self, instance_id: str) -> None:
        """Stop offering a departed instance (it answered UNAVAILABLE)."""
        if self._departed.pop(instance_id, None) is not None:
            self.last_known_routes = None

    def _prune(self) -> bool:
        horizon = self._clock() - self.grace
        expired = [key for key, (_, left) in self._departed.items() if left <= horizon]
        for key in expired:
            del self._departed[key]
        return bool(expired)


class Discovery:
    """Instances and policies of every service, kept fresh by ``RegistryService.Watch``."""

    def __init__(
        self,
        on_policy: PolicyHandler,
        *,
        max_backoff: float,
        grace: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``on_policy`` receives every policy put or deleted (a snapshot puts its
        policies and deletes those it no longer holds); ``max_backoff``: seconds
        between reconnection attempts at most; ``grace``: seconds the instances of a
        service that emptied stay callable (0: none)."""
        self._on_policy = on_policy
        self._max_backoff = max_backoff
        self._grace = grace
        self._clock = clock
        self.services: dict[str, ServiceEntry] = {}
        self._policy_names: set[str] = set()
        self._revision = 0
        #: Set once the first snapshot arrived.
        self.synced = asyncio.Event()
        self._changed = asyncio.Event()  # replaced by a fresh one after every change
        self._task: asyncio.Task[None] | None = None

    @property
    def revision(self) -> int:
        """Registry revision the cache is at."""
        return self._revision

    def start(self, channel: grpc.aio.Channel) -> None:
        """Start following the registry through ``channel`` (the control plane's)."""
        self._task = asyncio.create_task(self._watch_forever(channel), name="mesh-client-watch")

    async def wait_synced(self, within: float) -> None:
        """Wait up to ``within`` seconds for the first snapshot."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                await self.synced.wait()

    async def aclose(self) -> None:
        """Stop following the registry (the cache keeps its state)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def instances(self, service: str) -> list[registry_pb2.ServiceInstance]:
        """Last-known instances of a service (empty when unknown)."""
        cached = self.services.get(service)
        return list(cached.instances.values()) if cached else []

    async def wait_for_instances(self, service: str, count: int = 1, within: float = 10.0) -> bool:
        """Wait until the cache holds at least ``count`` instances of ``service``."""
        try:
            async with asyncio.timeout(within):
                while len(self.instances(service)) < count:
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    async def _watch_forever(self, channel: grpc.aio.Channel) -> None:
        backoff = Backoff(RetrySpec(initial_backoff=0.2, max_backoff=self._max_backoff))
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        while True:
            try:
                stream = stub.Watch(registry_pb2.WatchRequest(from_revision=self._revision))
                async for message in stream:
                    self.apply(message)
                    backoff.reset()
            except grpc.aio.AioRpcError as exc:
                if not backoff.failures:
                    _log.warning(
                        "registry watch broke (%s); keeping last-known state", exc.code().name
                    )
            await asyncio.sleep(next(backoff))

    def _entry(self, service: str) -> ServiceEntry:
        entry = self.services.get(service)
        if entry is None:
            entry = self.services[service] = ServiceEntry(self._grace, self._clock)
        return entry

    def apply(self, message: registry_pb2.WatchResponse) -> None:
        """Apply one Watch message: a snapshot replaces everything, events update it."""
        # Service -> (had registered instances, was calling last-known ones) before.
        touched: dict[str, tuple[bool, bool]] = {}
        if message.HasField("snapshot"):
            fresh: dict[str, list[registry_pb2.ServiceInstance]] = {}
            for instance in message.snapshot.instances:
                fresh.setdefault(instance.service_name, []).append(instance)
            for name in self.services.keys() | fresh.keys():
                entry = self._entry(name)
                touched.setdefault(name, entry.state())
                keep = {i.instance_id for i in fresh.get(name, ())}
                for instance_id in [key for key in entry.instances if key not in keep]:
                    entry.depart(instance_id)
                for instance in fresh.get(name, ()):
                    entry.put(instance)
                entry.changed()
            policies = {p.service_name: p for p in message.snapshot.policies}
            for name in sorted(self._policy_names | policies.keys()):
                self._policy(name, policies.get(name))
        for event in message.events:
            if event.type == registry_pb2.WATCH_EVENT_TYPE_POLICY_PUT:
                self._policy(event.service_name or event.policy.service_name, event.policy)
                continue
            if event.type == registry_pb2.WATCH_EVENT_TYPE_POLICY_DELETED:
                self._policy(event.service_name, None)
                continue
            entry = self._entry(event.service_name)
            touched.setdefault(event.service_name, entry.state())
            if event.type == registry_pb2.WATCH_EVENT_TYPE_REMOVED:
                entry.depart(event.instance.instance_id)
            elif event.HasField("instance"):
                entry.put(event.instance)
            entry.changed()
        for name, (had, stood_in) in touched.items():
            entry = self.services[name]
            if had and not entry.instances and entry.last_known():
                _log.warning(
                    "service %s has no registered instance left; calling its %d last-known "
                    "instances for up to %.0f s",
                    name,
                    len(entry.last_known()),
                    self._grace,
                )
            elif stood_in and entry.instances:
                _log.info("service %s has registered instances again", name)
        self._revision = max(self._revision, message.revision)
        self.synced.set()
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _policy(self, service: str, policy: registry_pb2.ServicePolicy | None) -> None:
        if policy is None:
            self._policy_names.discard(service)
        else:
            self._policy_names.add(service)
        self._on_policy(service, policy)

    def forget(self, service: str, instance_id: str) -> None:
        """Stop calling a last-known instance of ``service`` (it answered UNAVAILABLE)."""
        entry = self.services.get(service)
        if entry is not None:
            entry.forget(instance_id)

    def service_changed(self, service: str) -> None:
        """Build the routes of ``service`` again on its next call (its plan changed)."""
        cached = self.services.get(service)
        if cached is not None:
            cached.changed()
