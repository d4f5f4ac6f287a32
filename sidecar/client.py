"""The mesh client: call ``service.operation`` through the mesh from Python code.

``MeshClient`` keeps a discovery cache fed by ``RegistryService.Watch`` (resuming from
its last revision after a broken stream, and keeping its last-known state while the
control plane is away: *static stability*). Each call picks an instance by weighted
round robin over effective weights, skips instances whose circuit breaker is open,
and calls ``ProcessorService.Invoke`` with the deadline and the correlation id.

Failures: an infrastructure fault (UNAVAILABLE, DEADLINE_EXCEEDED of one attempt,
INTERNAL, RESOURCE_EXHAUSTED, UNKNOWN) counts against the instance's breaker and is
retried on another instance with exponential backoff and jitter (tenacity), within the
overall deadline and the retry budget (retries <= 20% of calls). A business rejection
(INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ...) is raised at once as its
MeshError and never retried; nor are cancellations. The first attempt is a plain
``await``: tenacity is entered only after a fault, keeping it off the fast path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential_jitter,
)

from flext_mesh.errors import (
    InfrastructureError,
    MeshError,
    NotFound,
    Unavailable,
    from_rpc_error,
    is_infrastructure,
)
from flext_mesh.invoke import dict_to_struct, struct_to_dict
from flext_mesh.registry.balancer import Candidate, Picker, Strategy
from flext_mesh.v1 import (
    metrics_pb2,
    processor_pb2,
    processor_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from sidecar.breaker import BreakerSettings, CircuitBreaker, Permit, RetryBudget
from sidecar.reporter import CallReporter

__all__ = ["BreakersOpen", "ClientSettings", "MeshClient", "SyncMeshClient", "mesh"]

_log = logging.getLogger("flext_sidecar.client")
_T = TypeVar("_T")
_HEALTHY = (registry_pb2.HEALTH_STATUS_SERVING, registry_pb2.HEALTH_STATUS_UNKNOWN)
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


@dataclass(frozen=True, kw_only=True)
class ClientSettings:
    """How the mesh client calls; defaults documented here and in the README."""

    #: Deadline of a call when the caller gives none, seconds.
    default_timeout: float = 10.0
    #: Attempts per call, the first included.
    max_attempts: int = 3
    #: First retry backoff, seconds; doubles per retry, with jitter.
    initial_backoff: float = 0.05
    #: Cap of one backoff, seconds.
    max_backoff: float = 1.0
    #: Retries allowed as a share of calls (Envoy-style retry budget).
    retry_budget_ratio: float = 0.2
    #: Per-instance circuit breakers.
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    #: Seconds between Watch reconnection attempts at most.
    watch_max_backoff: float = 2.0


class _Service:
    """The cached instances of one service and the picker over the callable ones."""

    def __init__(self) -> None:
        self.instances: dict[str, registry_pb2.ServiceInstance] = {}
        self._picker: Picker | None = None
        self._order: list[registry_pb2.ServiceInstance] = []
        self._dirty = True

    def changed(self) -> None:
        self._dirty = True

    def candidates(self) -> tuple[Picker | None, list[registry_pb2.ServiceInstance]]:
        if self._dirty:
            live = [
                i
                for i in sorted(self.instances.values(), key=lambda i: i.instance_id)
                if i.health in _HEALTHY and not i.ejected and i.effective_weight > 0
            ]
            if not live:  # panic: better an unhealthy instance than none
                live = sorted(self.instances.values(), key=lambda i: i.instance_id)
            self._order = live
            self._picker = (
                Picker(
                    [
                        Candidate(
                            i.instance_id,
                            i.effective_weight or float(i.weight or 1),
                            i.response_time_ms,
                            i.uptime_percentage,
                        )
                        for i in live
                    ],
                    Strategy.WEIGHTED_ROUND_ROBIN,
                )
                if live
                else None
            )
            self._dirty = False
        return self._picker, self._order


class MeshClient:
    """Async client of the mesh (see the module docstring)."""

    def __init__(
        self,
        control_plane: str,
        *,
        caller_service: str = "",
        settings: ClientSettings | None = None,
        reporter: CallReporter | None = None,
    ) -> None:
        self.control_plane = control_plane
        self.caller_service = caller_service
        self.settings = settings or ClientSettings()
        self.reporter = reporter
        self._services: dict[str, _Service] = {}
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
        self._control = grpc.aio.insecure_channel(self.control_plane, options=_CHANNEL_OPTIONS)
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
        failures = 0
        while True:
            assert self._control is not None
            stub = registry_pb2_grpc.RegistryServiceStub(self._control)
            try:
                stream = stub.Watch(registry_pb2.WatchRequest(from_revision=self._revision))
                async for message in stream:
                    self._apply(message)
                    failures = 0
            except grpc.aio.AioRpcError as exc:
                failures += 1
                if failures == 1:
                    _log.warning(
                        "registry watch broke (%s); keeping last-known state", exc.code().name
                    )
            delay = min(self.settings.watch_max_backoff, 0.1 * 2 ** min(failures, 6))
            await asyncio.sleep(delay)

    def _apply(self, message: registry_pb2.WatchResponse) -> None:
        if message.HasField("snapshot"):
            fresh: dict[str, _Service] = {}
            for instance in message.snapshot.instances:
                fresh.setdefault(instance.service_name, _Service()).instances[
                    instance.instance_id
                ] = instance
            self._services = fresh
        for event in message.events:
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

        Raises the MeshError of a business rejection, Unavailable when no instance can
        take the call, DeadlineExceeded when the deadline passes.
        """
        deadline = time.monotonic() + (timeout or self.settings.default_timeout)
        request = processor_pb2.InvokeRequest(
            operation=operation,
            correlation_id=correlation_id or uuid.uuid4().hex,
            idempotency_key=idempotency_key,
        )
        request.payload.CopyFrom(dict_to_struct(dict(payload or {})))
        self._budget.record_call()
        tried: set[str] = set()
        try:
            return await self._attempt(service, request, deadline, tried)
        except InfrastructureError as first:
            if self.settings.max_attempts <= 1 or isinstance(first, BreakersOpen):
                raise
            last: MeshError = first
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.settings.max_attempts - 1),
            wait=wait_exponential_jitter(
                multiplier=self.settings.initial_backoff,
                max=self.settings.max_backoff,
                jitter=self.settings.initial_backoff,
            ),
            retry=retry_if_exception(
                lambda e: isinstance(e, InfrastructureError) and not isinstance(e, BreakersOpen)
            ),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    if time.monotonic() >= deadline or not self._budget.try_retry():
                        raise last
                    try:
                        return await self._attempt(service, request, deadline, tried)
                    except InfrastructureError as exc:
                        last = exc
                        raise
        except RetryError as exc:  # pragma: no cover - reraise=True re-raises instead
            raise last from exc
        raise last  # pragma: no cover

    async def _attempt(
        self,
        service: str,
        request: processor_pb2.InvokeRequest,
        deadline: float,
        tried: set[str],
    ) -> dict[str, Any]:
        instance, permit = self._pick(service, tried)
        tried.add(instance.instance_id)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            permit.ignore()
            raise Unavailable(f"deadline passed before calling {service}")
        stub = processor_pb2_grpc.ProcessorServiceStub(self._channel(instance.endpoint))
        started = time.perf_counter()
        code = 0
        try:
            reply = await stub.Invoke(
                request,
                timeout=remaining,
                metadata=(("x-correlation-id", request.correlation_id),),
            )
        except grpc.aio.AioRpcError as exc:
            code = exc.code().value[0]
            if is_infrastructure(exc.code()):
                permit.failure()
            else:
                permit.ignore()
            error = from_rpc_error(exc)
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                error = InfrastructureError(error.message)
            raise error from exc
        except asyncio.CancelledError:
            permit.ignore()
            raise
        else:
            permit.success()
            return struct_to_dict(reply.result)
        finally:
            self._report(service, instance, request, started, code)

    def _pick(self, service: str, tried: set[str]) -> tuple[registry_pb2.ServiceInstance, Permit]:
        cached = self._services.get(service)
        if cached is None or not cached.instances:
            if not self._synced.is_set():
                raise Unavailable(f"no registry data yet for {service!r}")
            raise NotFound(f"service {service!r} has no registered instance")
        picker, order = cached.candidates()
        if picker is None:
            raise Unavailable(f"service {service!r} has no callable instance")
        first = picker.pick()
        untried = [i for i in picker.order(first) if order[i].instance_id not in tried]
        for index in untried or picker.order(first):
            instance = order[index]
            breaker = self._breaker(service, instance.instance_id)
            permit = breaker.acquire()
            if permit is not None:
                return instance, permit
        raise BreakersOpen(f"every instance of {service!r} has an open circuit breaker")

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

            breaker = self._breakers[key] = CircuitBreaker(self.settings.breaker, on_transition=log)
        return breaker

    def breaker_state(self, service: str, instance_id: str) -> str:
        """CLOSED, OPEN or HALF_OPEN: the breaker of one instance, for operators."""
        return self._breaker(service, instance_id).state.name

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self._channels[endpoint] = grpc.aio.insecure_channel(
                endpoint, options=_CHANNEL_OPTIONS
            )
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
