"""The mesh client's discovery cache: every service's instances and policies, as the
registry last said them.

:class:`Discovery` follows ``RegistryService.Watch``: the first message's snapshot
carries every instance and policy, then events (instance ADDED / UPDATED / REMOVED,
``POLICY_PUT`` with the whole new policy, ``POLICY_DELETED``). A broken stream is
resumed from the last revision, with backoff; meanwhile the cache keeps its last-known
state, so calls keep flowing while the control plane is away (*static stability*).
Policies are handed to the client as they come; what they mean is :mod:`sidecar.routes`'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
    """The cached instances of one service, and the routes built from them."""

    __slots__ = ("instances", "routes")

    def __init__(self) -> None:
        self.instances: dict[str, registry_pb2.ServiceInstance] = {}
        #: Built by the client on the first call after a change; None: build again.
        self.routes: Routes | None = None

    def changed(self) -> None:
        """The instances or the plan changed: the routes are built again."""
        self.routes = None


class Discovery:
    """Instances and policies of every service, kept fresh by ``RegistryService.Watch``."""

    def __init__(self, on_policy: PolicyHandler, *, max_backoff: float) -> None:
        """``on_policy`` receives every policy put or deleted (a snapshot puts its
        policies and deletes those it no longer holds); ``max_backoff``: seconds
        between reconnection attempts at most."""
        self._on_policy = on_policy
        self._max_backoff = max_backoff
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

    def apply(self, message: registry_pb2.WatchResponse) -> None:
        """Apply one Watch message: a snapshot replaces everything, events update it."""
        if message.HasField("snapshot"):
            fresh: dict[str, ServiceEntry] = {}
            for instance in message.snapshot.instances:
                fresh.setdefault(instance.service_name, ServiceEntry()).instances[
                    instance.instance_id
                ] = instance
            self.services = fresh
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
            service = self.services.setdefault(event.service_name, ServiceEntry())
            if event.type == registry_pb2.WATCH_EVENT_TYPE_REMOVED:
                service.instances.pop(event.instance.instance_id, None)
            elif event.HasField("instance"):
                service.instances[event.instance.instance_id] = event.instance
            service.changed()
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

    def service_changed(self, service: str) -> None:
        """Build the routes of ``service`` again on its next call (its plan changed)."""
        cached = self.services.get(service)
        if cached is not None:
            cached.changed()
