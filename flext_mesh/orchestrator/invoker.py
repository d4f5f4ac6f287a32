"""How the orchestrator calls a step: discover an instance, then ProcessorService.Invoke.

Discovery goes through the control plane's own registry (the same answer a client's
Discover gets: healthy instances, weighted round robin over effective weights, panic
mode). One call is one attempt on one instance. The engine picks the instance *before*
the attempt (`pick`) so that it is persisted with the attempt's STEP_STARTED event, and
it sends a resend whose earlier outcome is unknown back to that instance while it is
`still_there` (the callee's idempotency cache joins or replays it: the work is done
once). `lookup` asks an instance what became of an attempt without running anything.
Every attempt is reported to the metrics service as a client-side call record, so the
orchestrator's calls feed outlier ejection like any sidecar's.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc

from flext_mesh.errors import DeadlineExceeded, InvalidArgument, MeshError, NotFound, Unavailable
from flext_mesh.rpc import tracing
from flext_mesh.rpc.channels import ClientSecurity, TransportError, open_channel
from flext_mesh.rpc.metadata import CALLER_HEADER, CORRELATION_ID_HEADER
from flext_mesh.rpc.payloads import dict_to_struct, struct_to_dict
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.v1 import metrics_pb2, processor_pb2, processor_pb2_grpc, registry_pb2

__all__ = ["AttemptFailed", "Discovery", "MeshInvoker", "StepInvoker", "StepReply"]

#: Channels kept open to step endpoints; the least recently used is closed beyond this.
MAX_CHANNELS = 256
#: The orchestrator's name as a caller in call records.
CALLER = "flext-mesh-orchestrator"


@dataclass(frozen=True, slots=True)
class StepReply:
    """A successful attempt: the operation's output and who served it."""

    output: dict[str, Any]
    instance_id: str
    replayed: bool = False


class AttemptFailed(Exception):
    """An attempt failed; ``error`` says how, ``instance_id`` where ("" if none was picked)."""

    def __init__(self, error: MeshError, instance_id: str = "") -> None:
        super().__init__(error.message)
        self.error = error
        self.instance_id = instance_id


class StepInvoker(Protocol):
    """Makes one attempt of a step call."""

    async def pick(self, service: str) -> registry_pb2.ServiceInstance:
        """The instance the next attempt goes to; AttemptFailed when none is healthy."""

    def still_there(self, service: str, instance_id: str) -> registry_pb2.ServiceInstance | None:
        """The instance while it is registered and not failing its health checks."""

    async def invoke(
        self,
        service: str,
        operation: str,
        payload: Mapping[str, Any],
        *,
        timeout: float,  # noqa: ASYNC109 - a gRPC deadline, passed on as is
        correlation_id: str,
        idempotency_key: str,
        instance: registry_pb2.ServiceInstance | None = None,
        lookup_only: bool = False,
        traceparent: str = "",
        span: str = "",
    ) -> StepReply:
        """Call once (on ``instance``, else the next one picked); raise AttemptFailed."""

    async def aclose(self) -> None:
        """Close connections."""


class Discovered(Protocol):
    """One Discover answer, read in process without decoding."""

    def first(self) -> registry_pb2.ServiceInstance | None:
        """The chosen instance; None when no instance is healthy."""


class Discovery(Protocol):
    """The registry's Discover, in process (see flext_mesh.registry.Registry.discover)."""

    async def discover(self, request: registry_pb2.DiscoverRequest) -> Discovered:
        """The answer to one Discover request."""

    def get(self, service: str, instance_id: str) -> registry_pb2.ServiceInstance | None:
        """The registered instance, or None."""


class MeshInvoker:
    """Calls steps on instances found in the registry (see the module docstring)."""

    def __init__(
        self,
        discovery: Discovery,
        *,
        report: Callable[[metrics_pb2.CallRecord], None] | None = None,
        security: ClientSecurity | None = None,
    ) -> None:
        """``report`` receives a call record per attempt (quick, must not raise);
        ``security`` secures the channels to step endpoints (default plaintext)."""
        self._discovery = discovery
        self._report = report
        self._security = security or ClientSecurity()
        self._channels: OrderedDict[str, grpc.aio.Channel] = OrderedDict()
        # The Invoke method of each open channel (a stub builds one per method: not per call).
        self._invokes: dict[str, Any] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def still_there(self, service: str, instance_id: str) -> registry_pb2.ServiceInstance | None:
        """The instance while it is registered and not NOT_SERVING (a draining one
        still answers the keys it has)."""
        if not instance_id:
            return None
        instance = self._discovery.get(service, instance_id)
        if instance is None or instance.health == registry_pb2.HEALTH_STATUS_NOT_SERVING:
            return None
        return instance

    async def pick(self, service: str) -> registry_pb2.ServiceInstance:
        try:
            answer = await self._discovery.discover(
                registry_pb2.DiscoverRequest(service_name=service)
            )
        except NotFound as exc:
            raise AttemptFailed(Unavailable(exc.message)) from None
        except InvalidArgument as exc:
            raise AttemptFailed(exc) from None
        first = answer.first()
        if first is None:
            raise AttemptFailed(Unavailable(f"service {service!r} has no healthy instance"))
        return first

    def _channel(self, endpoint: str) -> grpc.aio.Channel:
        channel = self._channels.get(endpoint)
        if channel is None:
            channel = self._channels[endpoint] = open_channel(endpoint, self._security)
            self._invokes[endpoint] = processor_pb2_grpc.ProcessorServiceStub(channel).Invoke
            while len(self._channels) > MAX_CHANNELS:
                gone, oldest = self._channels.popitem(last=False)
                self._invokes.pop(gone, None)
                task = asyncio.create_task(oldest.close(grace=5.0))
                self._closing.add(task)
                task.add_done_callback(self._closing.discard)
        else:
            self._channels.move_to_end(endpoint)
        return channel

    async def invoke(
        self,
        service: str,
        operation: str,
        payload: Mapping[str, Any],
        *,
        timeout: float,  # noqa: ASYNC109 - a gRPC deadline, passed on as is
        correlation_id: str,
        idempotency_key: str,
        instance: registry_pb2.ServiceInstance | None = None,
        lookup_only: bool = False,
        traceparent: str = "",
        span: str = "",
    ) -> StepReply:
        """One attempt on ``instance`` (else the next instance of ``service``);
        AttemptFailed on any failure. ``lookup_only`` asks what became of an earlier
        attempt with the key (NOT_FOUND: no record) and never runs the operation.
        ``span``: the name of this attempt's span, a child of the execution's
        ``traceparent`` (while tracing is on); its context travels with the call."""
        if instance is None:
            instance = await self.pick(service)
        request = processor_pb2.InvokeRequest(
            operation=operation,
            correlation_id=correlation_id,
            idempotency_key=idempotency_key,
            lookup_only=lookup_only,
        )
        request.payload.CopyFrom(dict_to_struct(dict(payload)))
        try:
            self._channel(instance.endpoint)
        except TransportError as exc:  # a TLS file gone or broken since start-up
            raise AttemptFailed(Unavailable(str(exc)), instance.instance_id) from exc
        call = self._invokes[instance.endpoint]
        metadata: tuple[tuple[str, str], ...] = (
            (CORRELATION_ID_HEADER, correlation_id),
            (CALLER_HEADER, CALLER),
        )
        traced = (
            tracing.child_span(
                traceparent,
                span or f"{service}.{operation}",
                {
                    "rpc.system": "grpc",
                    "rpc.service": "flext_mesh.v1.ProcessorService",
                    "rpc.method": "Invoke",
                    "server.address": instance.endpoint,
                    "flext_mesh.service": service,
                    "flext_mesh.operation": operation,
                    "flext_mesh.instance_id": instance.instance_id,
                    "flext_mesh.correlation_id": correlation_id,
                    "flext_mesh.idempotency_key": idempotency_key,
                },
            )
            if traceparent and tracing.enabled()
            else None
        )
        if traced is not None:
            metadata = (*metadata, *tracing.inject(traced))
        started = time.perf_counter()
        started_ns = time.time_ns()
        code = 0
        try:
            reply = await call(request, timeout=timeout, metadata=metadata)
        except grpc.aio.AioRpcError as exc:
            code = exc.code().value[0]
            error = from_rpc_error(exc)
            if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
                error = DeadlineExceeded(
                    f"{service}.{operation} did not answer within {timeout:g} s"
                )
            raise AttemptFailed(error, instance.instance_id) from exc
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED.value[0]
            raise
        finally:
            if traced is not None:
                tracing.end_span(traced, code)
            if not lookup_only:  # a question about a call, not a call
                self._record(
                    instance=instance,
                    operation=operation,
                    correlation_id=correlation_id,
                    started=started,
                    started_ns=started_ns,
                    code=code,
                )
        return StepReply(struct_to_dict(reply.result), instance.instance_id, reply.replayed)

    def _record(
        self,
        *,
        instance: registry_pb2.ServiceInstance,
        operation: str,
        correlation_id: str,
        started: float,
        started_ns: int,
        code: int,
    ) -> None:
        if self._report is None:
            return
        self._report(
            metrics_pb2.CallRecord(
                service_name=instance.service_name,
                instance_id=instance.instance_id,
                operation=operation,
                duration_ms=(time.perf_counter() - started) * 1000,
                success=code == 0,
                status_code=code,
                correlation_id=correlation_id,
                time_unix_nano=started_ns,
                version=instance.version,
                side=metrics_pb2.CALL_SIDE_CLIENT,
                caller_service=CALLER,
            )
        )

    async def aclose(self) -> None:
        """Close every channel."""
        channels = list(self._channels.values())
        self._channels.clear()
        self._invokes.clear()
        await asyncio.gather(*(c.close() for c in channels), *self._closing)
