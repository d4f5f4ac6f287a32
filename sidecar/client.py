"""The mesh client: call ``service.operation`` through the mesh from Python code.

``MeshClient`` keeps a discovery cache fed by ``RegistryService.Watch``
(:mod:`sidecar.discovery`: resumed after a broken stream, last-known state kept while
the control plane is away, and while a service's set is momentarily empty). Each call
picks an instance by the service's plan (:mod:`sidecar.routes`: the pushed traffic
policy over these settings, version split, zone preference, strategy), skips instances
whose circuit breakers refuse it (:mod:`sidecar.breaker`), and calls
``ProcessorService.Invoke`` with the deadline and the correlation id.

Context: a call made while a hosted processor serves one (the hosting layer sets
:func:`flext_mesh.rpc.context.serving`; contextvars follow the tasks it starts) carries
that call's correlation id unless one is given, a deadline no later than that call's
less ``ClientSettings.deadline_margin`` (20 ms, for the answer's way back), and its
W3C ``traceparent`` / ``tracestate`` headers, unchanged.

Failures: a failure whose status code is retryable (by default the infrastructure
faults UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED, UNKNOWN) is
retried, preferably on another instance, with exponential backoff and jitter
(``flext_mesh.retry.retry_async``), within the overall deadline and the retry budget
(retries <= 20% of calls). Each attempt but the last has a per-try timeout (see
``ClientSettings.per_try_timeout``): an instance that hangs costs a share of the
deadline, not all of it. Only infrastructure faults count against breakers: a
connection-level fault against the instance, a deadline set for the operation or the
call against that operation on the instance (:mod:`sidecar.breaker`). A business
rejection (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ...) is raised at once as
its MeshError and never retried; nor are cancellations, nor ``BreakersOpen`` (every
instance's breaker is open: fail fast). The first attempt is a plain ``await``: no
retry state is built unless it fails, keeping retries off the fast path.

Public names: :class:`MeshClient`, :class:`ClientSettings`, :class:`BreakersOpen`,
:class:`SyncMeshClient` (for synchronous code), and :func:`mesh` (the client of the
sidecar hosting the code that calls it).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import grpc

from flext_mesh.errors import DeadlineExceeded, NotFound, Unavailable, is_infrastructure
from flext_mesh.hosting.reporter import CallReporter
from flext_mesh.processor import new_correlation_id
from flext_mesh.retry import RetrySpec, retry_async, status_of
from flext_mesh.routing.balancer import Strategy
from flext_mesh.rpc import tracing
from flext_mesh.rpc.channels import ClientSecurity, TransportError, open_channel
from flext_mesh.rpc.context import current as current_call
from flext_mesh.rpc.metadata import CALLER_HEADER, CORRELATION_ID_HEADER, caller_of
from flext_mesh.rpc.payloads import fill_struct, struct_to_dict
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.v1 import metrics_pb2, processor_pb2, processor_pb2_grpc, registry_pb2
from sidecar.breaker import (
    BreakerBoard,
    BreakerSettings,
    BreakerState,
    CallPermit,
    RetryBudget,
)
from sidecar.discovery import Discovery
from sidecar.routes import Attempts, BreakersOpen, Plan, Plans, Router
from sidecar.sync import SyncMeshClient

__all__ = [
    "BreakersOpen",
    "ClientSettings",
    "MeshClient",
    "SyncMeshClient",
    "mesh",
    "set_current",
]

_log = logging.getLogger("flext_sidecar.client")
_DEADLINE = grpc.StatusCode.DEADLINE_EXCEEDED
_UNAVAILABLE = grpc.StatusCode.UNAVAILABLE
_ZONE_ENV = "FLEXT_MESH_ZONE"


def _positive(name: str, value: float | None, *, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"ClientSettings.{name} must be a number of seconds, got {value!r}")
    if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
        low = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"ClientSettings.{name} must be finite and {low}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ClientSettings:
    """How the mesh client calls; defaults documented here and in docs/sidecar.md. A
    service's pushed policy overrides them (see :mod:`sidecar.routes`). A bad value
    raises ``ValueError`` naming the field."""

    #: Deadline of a call when the caller gives none, seconds.
    default_timeout: float = 10.0
    #: Attempts per call, the first included.
    max_attempts: int = 3
    #: Wait before the second attempt, seconds; doubles per retry, minus up to 20% jitter.
    initial_backoff: float = 0.05
    #: Cap of one backoff, seconds.
    max_backoff: float = 1.0
    #: Longest one attempt may take, seconds (Envoy's per_try_timeout); an attempt
    #: that outlives it is retried. None: the call's deadline divided by its attempts
    #: (3.3 s of the default 10 s), applied while an instance the call has not tried
    #: is left to retry on, so that an instance that hangs leaves time to retry on
    #: another, and a service of one instance keeps its whole deadline per attempt.
    #: The last attempt may always use whatever is left of the deadline.
    per_try_timeout: float | None = None
    #: Retries allowed as a share of calls (Envoy-style retry budget).
    retry_budget_ratio: float = 0.2
    #: Per-instance circuit breakers.
    breaker: BreakerSettings = field(default_factory=BreakerSettings)
    #: Seconds between Watch reconnection attempts at most.
    watch_max_backoff: float = 2.0
    #: Zone of the caller, for the policies' zone preference; None reads
    #: ``FLEXT_MESH_ZONE`` (as ``flext-sidecar --zone`` does); empty: no preference.
    zone: str | None = None
    #: Time kept back from the inbound call's deadline when a call made while serving
    #: it inherits that deadline, seconds: for the answer to travel back in time.
    deadline_margin: float = 0.02
    #: Seconds a service whose last instance left (a lease expired while the store
    #: froze, a control plane came back empty) is still called on its last-known
    #: instances before NotFound, unless one of them answers UNAVAILABLE first.
    last_known_grace: float = 30.0

    def __post_init__(self) -> None:
        for name in ("default_timeout", "initial_backoff", "max_backoff", "watch_max_backoff"):
            _positive(name, getattr(self, name))
        _positive("per_try_timeout", self.per_try_timeout)
        _positive("deadline_margin", self.deadline_margin, allow_zero=True)
        _positive("last_known_grace", self.last_known_grace, allow_zero=True)
        if isinstance(self.max_attempts, bool) or not (
            isinstance(self.max_attempts, int) and self.max_attempts >= 1
        ):
            raise ValueError(
                f"ClientSettings.max_attempts must be an integer >= 1, got {self.max_attempts!r}"
            )


def _default_plan(settings: ClientSettings) -> Plan:
    """The plan of a service without a policy: the settings alone."""
    retry = RetrySpec(
        max_attempts=settings.max_attempts,
        initial_backoff=settings.initial_backoff,
        max_backoff=settings.max_backoff,
    )
    return Plan(
        default_timeout=settings.default_timeout,
        operation_timeouts={},
        retry=retry,
        per_try_timeout=settings.per_try_timeout,
        breaker=settings.breaker,
        strategy=Strategy.WEIGHTED_ROUND_ROBIN,
        split=None,
        zone_min_percent=None,
    )


class AttemptTimedOut(DeadlineExceeded):
    """One attempt outlived its per-try timeout (the call's deadline had not passed)."""


class _Call(Attempts):
    """One call's state across its attempts."""

    __slots__ = (
        "deadline",
        "explicit_per_try",
        "last_attempt",
        "metadata",
        "operation",
        "per_try",
        "request",
        "scoped",
        "size",
        "started_attempts",
    )

    def __init__(
        self,
        service: str,
        request: processor_pb2.InvokeRequest,
        *,
        deadline: float,
        metadata: tuple[tuple[str, str], ...],
        per_try: float,
        explicit_per_try: bool,
        last_attempt: int,
        scoped: bool,
    ) -> None:
        # Attempts.__init__ inlined: one per call, on the hot path.
        self.service = service
        self.tried: set[str] = set()
        self.routed = False
        self.version: str | None = None
        self.request = request
        self.operation = request.operation
        self.deadline = deadline
        self.metadata = metadata
        #: Longest one attempt may take, but the last.
        self.per_try = per_try
        #: Whether the per-try timeout was set (else the default share of the deadline,
        #: applied only while an untried instance is left).
        self.explicit_per_try = explicit_per_try
        #: Instances the last pick could choose among.
        self.size = 0
        #: Number of the last attempt the retry policy allows (it gets all that is left).
        self.last_attempt = last_attempt
        #: Whether the deadline was set for this call or operation (an expiry counts
        #: against the operation on the instance) rather than the service's default.
        self.scoped = scoped
        self.started_attempts = 0


class MeshClient:
    """Async client of the mesh (see the module docstring).

    ``zone`` is the caller's zone for the policies' zone preference (default
    ``settings.zone``, whose default is ``FLEXT_MESH_ZONE``).
    ``split_fallbacks[(service, version)]`` counts the attempts that fell back from a
    split version without a callable instance, and ``zone_spillovers[service]`` the
    attempts that left the caller's zone because too few of its instances were
    callable.

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
        #: The headers every call carries before the correlation id's and trace's: the
        #: caller's name, for the called service's metrics by caller.
        named = caller_of(caller_service)
        self._own_headers: tuple[tuple[str, str], ...] = ((CALLER_HEADER, named),) if named else ()
        self.settings = settings or ClientSettings()
        self.reporter = reporter
        if zone is None:
            zone = self.settings.zone
        self.zone = os.environ.get(_ZONE_ENV, "") if zone is None else zone
        self._plans = Plans(_default_plan(self.settings), self.settings.breaker, self.zone)
        self._breakers = BreakerBoard(
            lambda service: self._plans.plan(service).breaker, on_transition=_log_transition
        )
        self._router = Router(self._plans, self._breakers, self.zone)
        self._discovery = Discovery(
            self._policy_changed,
            max_backoff=self.settings.watch_max_backoff,
            grace=self.settings.last_known_grace,
        )
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._invokers: dict[
            str,
            grpc.aio.UnaryUnaryMultiCallable[
                processor_pb2.InvokeRequest, processor_pb2.InvokeResponse
            ],
        ] = {}
        self._budget = RetryBudget(self.settings.retry_budget_ratio)
        self._control: grpc.aio.Channel | None = None
        #: Observes every attempt: (service, operation, gRPC code number, seconds,
        #: whether it is a retry). The sidecar's ``/metrics`` sets it; None costs nothing.
        self.observe_attempt: Callable[[str, str, int, float, bool], None] | None = None

    # -- lifecycle -------------------------------------------------------------------

    async def start(self, *, wait: float = 5.0) -> None:
        """Start watching the registry; wait up to ``wait`` s for the first snapshot."""
        self._control = open_channel(self.control_plane, self.security)
        self._discovery.start(self._control)
        await self._discovery.wait_synced(wait)

    async def aclose(self) -> None:
        """Stop watching and close every channel."""
        await self._discovery.aclose()
        for channel in [*self._channels.values(), *([self._control] if self._control else [])]:
            await channel.close()
        self._channels.clear()
        self._invokers.clear()
        self._control = None

    async def __aenter__(self) -> MeshClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- the discovery cache and the policies --------------------------------------------

    @property
    def revision(self) -> int:
        """Registry revision the cache is at."""
        return self._discovery.revision

    @property
    def split_fallbacks(self) -> Counter[tuple[str, str]]:
        """Attempts that fell back from a split version, by (service, version)."""
        return self._router.split_fallbacks

    @property
    def zone_spillovers(self) -> Counter[str]:
        """Attempts that left the caller's zone, by service."""
        return self._router.zone_spillovers

    def instances(self, service: str) -> list[registry_pb2.ServiceInstance]:
        """Registered instances of a service, as last known (empty when unknown)."""
        return self._discovery.instances(service)

    def policy(self, service: str) -> registry_pb2.ServicePolicy | None:
        """The traffic policy in force for ``service`` (last known); None without one."""
        policy = self._plans.policy(service)
        if policy is None:
            return None
        copy = registry_pb2.ServicePolicy()
        copy.CopyFrom(policy)
        return copy

    async def wait_for_instances(self, service: str, count: int = 1, within: float = 10.0) -> bool:
        """Wait until the cache holds at least ``count`` instances of ``service``."""
        return await self._discovery.wait_for_instances(service, count, within)

    def _apply(self, message: registry_pb2.WatchResponse) -> None:
        """Apply one Watch message (what the watch loop does with each)."""
        self._discovery.apply(message)

    def _policy_changed(self, service: str, policy: registry_pb2.ServicePolicy | None) -> None:
        plan = self._plans.set(service, policy)
        if plan is None:
            return
        self._breakers.reconfigure(service, plan.breaker)
        self._discovery.service_changed(service)

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

        ``timeout`` (seconds) overrides the policy's and the settings' deadlines. Made
        while serving a call (inside a hosted processor), the call carries that call's
        correlation id (unless ``correlation_id`` is given), a deadline no later than
        its deadline less ``settings.deadline_margin``, and its ``traceparent`` /
        ``tracestate`` headers. Raises the MeshError of a business rejection,
        Unavailable when no instance can take the call, DeadlineExceeded when the
        deadline passes, ValueError for a timeout that is not a positive number.
        """
        plans = self._plans
        plan = plans.by_service.get(service, plans.default)
        if timeout:
            if not (timeout > 0 and math.isfinite(timeout)):
                raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
            limit, scoped = timeout, True
        else:
            limit = plan.operation_timeouts.get(operation, 0.0)
            scoped = limit > 0
            if not scoped:
                limit = plan.default_timeout
        metadata: tuple[tuple[str, str], ...] = ()
        inbound = current_call()
        if inbound is not None:
            correlation_id = correlation_id or inbound.correlation_id
            left = inbound.remaining(self.settings.deadline_margin)
            if left is not None and left < limit:
                limit, scoped = left, True
            metadata = inbound.metadata()
        correlation_id = correlation_id or new_correlation_id()
        request = processor_pb2.InvokeRequest(
            operation=operation,
            correlation_id=correlation_id,
            idempotency_key=idempotency_key,
        )
        if payload:
            fill_struct(request.payload, payload)
        retry = plan.retry
        per_try = plan.per_try_timeout or limit / retry.max_attempts
        call = _Call(
            service,
            request,
            deadline=time.monotonic() + limit,
            metadata=((CORRELATION_ID_HEADER, correlation_id), *self._own_headers, *metadata),
            per_try=per_try,
            explicit_per_try=plan.per_try_timeout is not None,
            last_attempt=retry.max_attempts,
            scoped=scoped,
        )
        self._budget.record_call()
        if per_try < limit:
            # A per-try expiry is retried even when the policy does not retry
            # DEADLINE_EXCEEDED: cutting the attempt is only worth it for a retry.
            return await retry_async(
                lambda: self._attempt(call),
                plan.cut_retry,
                deadline=call.deadline,
                budget=self._budget,
                status=_retry_status if plan.retries_deadline else _cut_status,
            )
        return await retry_async(
            lambda: self._attempt(call),
            retry,
            deadline=call.deadline,
            budget=self._budget,
            status=_retry_status,
        )

    async def _attempt(self, call: _Call) -> dict[str, Any]:
        service, request = call.service, call.request
        instance, permit, last_known = self._pick(call)
        call.tried.add(instance.instance_id)
        call.started_attempts += 1
        remaining = call.deadline - time.monotonic()
        if remaining <= 0:
            permit.ignore()
            raise DeadlineExceeded(f"deadline passed before calling {service}")
        cut = (
            call.started_attempts < call.last_attempt
            and call.per_try < remaining
            and (call.explicit_per_try or call.size > len(call.tried))
        )
        try:
            invoke = self._invoker(instance.endpoint)
        except TransportError as exc:  # a TLS file gone or half-written since start
            permit.ignore()
            raise Unavailable(str(exc)) from exc
        metadata = call.metadata
        span = (
            tracing.client_span(
                {
                    "server.address": instance.endpoint,
                    "flext_mesh.service": service,
                    "flext_mesh.operation": request.operation,
                    "flext_mesh.instance_id": instance.instance_id,
                    "flext_mesh.correlation_id": request.correlation_id,
                    "flext_mesh.attempt": call.started_attempts,
                }
            )
            if tracing.enabled()
            else None
        )
        if span is not None:  # this attempt's span, not the inbound one, is the parent
            # The correlation id and own headers, then this attempt's trace headers.
            kept = 1 + len(self._own_headers)
            metadata = (*call.metadata[:kept], *tracing.inject(span))
        started = time.perf_counter()
        code = 0
        try:
            reply = await invoke(
                request,
                timeout=call.per_try if cut else remaining,
                metadata=metadata,
            )
        except grpc.aio.AioRpcError as exc:
            status = exc.code()
            code = status.value[0]
            if status is _DEADLINE and call.scoped:
                permit.operation_failure()
            elif is_infrastructure(status):
                permit.failure()
            else:
                permit.ignore()
            if status is _UNAVAILABLE and last_known:
                self._discovery.forget(service, instance.instance_id)
            if (
                cut
                and status is _DEADLINE
                and time.perf_counter() - started >= call.per_try * 0.9
                and time.monotonic() < call.deadline
            ):
                raise AttemptTimedOut(
                    f"attempt {call.started_attempts} on {instance.instance_id} took more "
                    f"than its per-try timeout of {call.per_try:.3g} s"
                ) from exc
            raise from_rpc_error(exc) from exc
        except asyncio.CancelledError:
            permit.ignore()
            raise
        else:
            permit.success()
            return struct_to_dict(reply.result)
        finally:
            if span is not None:
                tracing.end_span(span, code)
            self._report(service, instance, request, started, code, retry=call.started_attempts > 1)

    def _pick(self, call: _Call) -> tuple[registry_pb2.ServiceInstance, CallPermit, bool]:
        """An instance, its breakers' permit, and whether it is only last-known."""
        service = call.service
        cached = self._discovery.services.get(service)
        if cached is not None and cached.instances:
            routes = cached.routes
            plans = self._plans
            if routes is None or routes.plan is not plans.by_service.get(service, plans.default):
                routes = cached.routes = self._router.build(service, cached.instances)
            if not routes.size:
                raise Unavailable(
                    f"every instance of {service!r} is in maintenance (drained); "
                    "undrain one: flext-mesh services undrain"
                )
            call.size = routes.size
            instance, permit = self._router.pick(routes, call, call.operation)
            return instance, permit, False
        if not self._discovery.synced.is_set():
            raise Unavailable(f"no registry data yet for {service!r}")
        last_known = cached.last_known() if cached is not None else None
        if cached is None or not last_known:
            raise NotFound(f"service {service!r} has no registered instance")
        routes = cached.last_known_routes
        if routes is None or routes.plan is not self._plans.plan(service):
            routes = cached.last_known_routes = self._router.build(service, last_known)
        call.size = routes.size
        instance, permit = self._router.pick(routes, call, call.operation)
        return instance, permit, True

    def breakers(self) -> dict[tuple[str, str], int]:
        """Instance breakers by (service, CLOSED / OPEN / HALF_OPEN)."""
        return self._breakers.census()

    def breaker_state(self, service: str, instance_id: str, operation: str = "") -> str:
        """CLOSED, OPEN or HALF_OPEN: the breaker of one instance, or of one operation on
        it (an operation whose own deadline never expired there reads CLOSED)."""
        return self._breakers.state(service, instance_id, operation).name

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self._channels[endpoint] = open_channel(endpoint, self._peer_security)
        return channel

    def _invoker(
        self, endpoint: str
    ) -> grpc.aio.UnaryUnaryMultiCallable[
        processor_pb2.InvokeRequest, processor_pb2.InvokeResponse
    ]:
        """``ProcessorService.Invoke`` on the instance at ``endpoint`` (made once per
        channel: a stub per call costs as much as building the request)."""
        invoke = self._invokers.get(endpoint)
        if invoke is None:
            stub: processor_pb2_grpc.ProcessorServiceAsyncStub = (
                processor_pb2_grpc.ProcessorServiceStub(self._channel(endpoint))
            )
            invoke = self._invokers[endpoint] = stub.Invoke
        return invoke

    def _report(
        self,
        service: str,
        instance: registry_pb2.ServiceInstance,
        request: processor_pb2.InvokeRequest,
        started: float,
        code: int,
        *,
        retry: bool,
    ) -> None:
        elapsed = time.perf_counter() - started
        if self.observe_attempt is not None:
            self.observe_attempt(service, request.operation, code, elapsed, retry)
        if self.reporter is None:
            return
        self.reporter.record_call(
            service,
            request.operation,
            elapsed * 1000,
            code == 0,
            code,
            instance_id=instance.instance_id,
            version=instance.version,
            correlation_id=request.correlation_id,
            side=metrics_pb2.CALL_SIDE_CLIENT,
            caller_service=self.caller_service,
        )


def _log_transition(
    service: str, instance_id: str, operation: str, old: BreakerState, new: BreakerState
) -> None:
    if operation:
        _log.info(
            "circuit breaker service=%s instance=%s operation=%s %s->%s",
            service,
            instance_id,
            operation,
            old.name,
            new.name,
        )
    else:
        _log.info(
            "circuit breaker service=%s instance=%s %s->%s",
            service,
            instance_id,
            old.name,
            new.name,
        )


def _retry_status(error: BaseException) -> grpc.StatusCode | None:
    """The status of a failed attempt for the retry policy; None (no retry) when every
    breaker is open."""
    return None if isinstance(error, BreakersOpen) else status_of(error)


def _cut_status(error: BaseException) -> grpc.StatusCode | None:
    """As :func:`_retry_status`, for a policy that does not retry DEADLINE_EXCEEDED:
    only an attempt cut by its per-try timeout is retried, not an expired call."""
    if isinstance(error, DeadlineExceeded) and not isinstance(error, AttemptTimedOut):
        return None
    return _retry_status(error)


_current: MeshClient | None = None


def mesh() -> MeshClient:
    """The mesh client of the sidecar hosting this code (for processors that call
    other services); its calls are reported as outbound calls of this service, and a
    call made while serving one carries that call's correlation id, deadline and trace
    headers (see :meth:`MeshClient.call`). RuntimeError outside a sidecar."""
    if _current is None:
        raise RuntimeError("no mesh client: this code is not running in flext-sidecar")
    return _current


def set_current(client: MeshClient | None) -> None:
    """Make ``client`` the one :func:`mesh` returns (the sidecar does this)."""
    global _current  # noqa: PLW0603 - one client per sidecar process, by design
    _current = client
