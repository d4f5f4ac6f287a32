"""Distributed tracing with OpenTelemetry, off unless the standard ``OTEL_*`` variables
turn it on.

On: ``OTEL_TRACES_EXPORTER=otlp`` (or ``console``), or an OTLP endpoint
(``OTEL_EXPORTER_OTLP_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) with no
exporter named; ``OTEL_TRACES_EXPORTER=none`` or ``OTEL_SDK_DISABLED=true`` keep it off.
The exporter reads its own variables (endpoint, headers, ``OTEL_EXPORTER_OTLP_INSECURE``,
timeouts), the batch processor its ``OTEL_BSP_*``, the sampler ``OTEL_TRACES_SAMPLER``;
``OTEL_SERVICE_NAME`` overrides the service name a process reports under.

What is traced (the RPC semantic conventions): a ``SERVER`` span for every Invoke a
sidecar serves, child of the caller's W3C ``traceparent``, current while the processor
runs; a ``CLIENT`` span for every attempt of a mesh call, child of whatever span is
current (the served call's, or the app's own), whose context travels as the call's
``traceparent``. Log lines written meanwhile carry its ``trace_id``. Off, none of this
runs: the trace headers received pass through unchanged, as they always did.

The SDK and the exporter are imported only when tracing is on (they cost RSS).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import os
import random
from collections.abc import AsyncIterator, Mapping
from typing import TYPE_CHECKING, Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from flext_mesh.logs import set_trace_id_source

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

__all__ = [
    "PROCESSOR_INVOKE",
    "Tracing",
    "child_span",
    "client_span",
    "configure",
    "current_trace_id",
    "enabled",
    "end_span",
    "execution_span",
    "inject",
    "new_execution_trace",
    "server_span",
    "settings_problem",
    "traced_process",
]

_log = logging.getLogger("flext_mesh.tracing")

#: The span name of a ProcessorService Invoke, client or server side (``$service/$method``).
PROCESSOR_INVOKE = "flext_mesh.v1.ProcessorService/Invoke"
_RPC_SERVICE = "flext_mesh.v1.ProcessorService"

_propagator = TraceContextTextMapPropagator()


class _Active:
    """The process's tracer while tracing is on (one per process, like the provider)."""

    tracer: trace.Tracer | None = None


_active = _Active()


class Tracing:
    """The process's tracer provider while tracing is on; :meth:`shutdown` flushes it."""

    def __init__(self, provider: TracerProvider, exporter: str) -> None:
        self.provider = provider
        self.exporter = exporter

    def shutdown(self) -> None:
        """Export what is still buffered and stop (blocking: at most a few seconds)."""
        _active.tracer = None
        set_trace_id_source(None)
        self.provider.shutdown()


def _exporter_name(env: Mapping[str, str]) -> str:
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return "none"
    named = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if named:
        return named.split(",")[0].strip()
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    return "otlp" if endpoint else "none"


def settings_problem(env: Mapping[str, str] | None = None) -> str:
    """Why the ``OTEL_*`` variables cannot be followed ("" when they can): checked before
    a process starts, so a typo is one line at start, not a surprise later."""
    exporter_name = _exporter_name(os.environ if env is None else env)
    if exporter_name == "otlp" and not _otlp_protos_whole():
        return (
            "the OTLP exporter cannot load: the opentelemetry-proto modules were overwritten "
            "by the older copy xds-protos ships (grpc/grpc#42926); put them back with "
            "'pip install --force-reinstall --no-deps opentelemetry-proto' (make install "
            "does)"
        )
    if exporter_name in ("none", "otlp", "console"):
        return ""
    return f"OTEL_TRACES_EXPORTER={exporter_name!r} is not supported: use otlp, console or none"


def _otlp_protos_whole() -> bool:
    """Whether the installed OTLP messages are the exporter's (not an older copy)."""
    from opentelemetry.proto.common.v1 import common_pb2  # noqa: PLC0415 - only for OTLP

    return hasattr(common_pb2, "InstrumentationScope")


def configure(service_name: str, env: Mapping[str, str] | None = None) -> Tracing | None:
    """Turn tracing on as the ``OTEL_*`` variables say; None when they leave it off.

    ``service_name`` is the resource's ``service.name`` unless ``OTEL_SERVICE_NAME``
    says otherwise. Call it once per process, before serving.
    """
    env = os.environ if env is None else env
    problem = settings_problem(env)
    if problem:
        raise ValueError(problem)
    exporter_name = _exporter_name(env)
    if exporter_name == "none":
        return None
    # Imported only now: the SDK and the exporter cost several MB of RSS.
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import (  # noqa: PLC0415
        BatchSpanProcessor,
        ConsoleSpanExporter,
        SpanExporter,
    )
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator  # noqa: PLC0415

    class ChosenIds(RandomIdGenerator):
        """Random ids, but the ones :func:`execution_span` chose ahead of time."""

        def generate_span_id(self) -> int:
            chosen = _chosen.get()
            return chosen[1] if chosen is not None else super().generate_span_id()

        def generate_trace_id(self) -> int:
            chosen = _chosen.get()
            return chosen[0] if chosen is not None else super().generate_trace_id()

    name = env.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(
        resource=Resource.create({"service.name": name}), id_generator=ChosenIds()
    )
    exporter: SpanExporter
    if exporter_name == "console":
        exporter = ConsoleSpanExporter()
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
            OTLPSpanExporter,
        )

        exporter = OTLPSpanExporter()
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # the app's own spans join the same traces
    _active.tracer = provider.get_tracer("flext_mesh")
    set_trace_id_source(current_trace_id)
    _log.info("tracing on exporter=%s service_name=%s", exporter_name, name)
    return Tracing(provider, exporter_name)


@contextlib.asynccontextmanager
async def traced_process(service_name: str) -> AsyncIterator[Tracing | None]:
    """Tracing on for the block as the ``OTEL_*`` variables say, flushed at its end
    (in a thread: the exporter blocks). Check :func:`settings_problem` first."""
    tracing = configure(service_name)
    try:
        yield tracing
    finally:
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)  # exports what is buffered


def enabled() -> bool:
    """Whether spans are made (cheap: call it before building anything for a span)."""
    return _active.tracer is not None


def server_span(
    operation: str, traceparent: str, tracestate: str, attributes: Mapping[str, Any]
) -> tuple[trace.Span, object] | None:
    """Start the SERVER span of a served Invoke and make it current; None when off.

    Its parent is the caller's ``traceparent`` (a new trace without one). End it with
    :func:`end_span`, in the same task.
    """
    tracer = _active.tracer
    if tracer is None:
        return None
    carrier = {"traceparent": traceparent, "tracestate": tracestate} if traceparent else {}
    parent = _propagator.extract(carrier)
    span = tracer.start_span(
        PROCESSOR_INVOKE,
        context=parent,
        kind=SpanKind.SERVER,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": _RPC_SERVICE,
            "rpc.method": "Invoke",
            "flext_mesh.operation": operation,
            **attributes,
        },
    )
    token = otel_context.attach(trace.set_span_in_context(span, parent))
    return span, token


def client_span(attributes: Mapping[str, Any]) -> trace.Span | None:
    """Start the CLIENT span of one mesh call attempt, child of the current span; None
    when off. Send :func:`inject` of it with the call, end it with :func:`end_span`."""
    tracer = _active.tracer
    if tracer is None:
        return None
    return tracer.start_span(
        PROCESSOR_INVOKE,
        kind=SpanKind.CLIENT,
        attributes={
            "rpc.system": "grpc",
            "rpc.service": _RPC_SERVICE,
            "rpc.method": "Invoke",
            **attributes,
        },
    )


def inject(span: trace.Span) -> tuple[tuple[str, str], ...]:
    """The ``traceparent`` (and ``tracestate``) headers that make ``span`` the parent."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(span))
    return tuple(carrier.items())


def end_span(
    span: trace.Span, code: int, message: str = "", *, token: object | None = None
) -> None:
    """End ``span`` with the call's gRPC status number (an error unless 0); detach the
    context a :func:`server_span` attached."""
    span.set_attribute("rpc.grpc.status_code", code)
    if code:
        span.set_status(Status(StatusCode.ERROR, message or None))
    span.end()
    if token is not None:
        otel_context.detach(token)  # type: ignore[arg-type]


# -- workflows --------------------------------------------------------------------------
#
# An execution may outlive the process that started it (restarts, takeover by another
# replica), so its span cannot stay open in memory. Its context is chosen when it
# starts and stored with the execution (``Execution.traceparent``); every step attempt
# and compensation is a span made as a child of that stored context, by whichever
# replica runs it; and the execution span itself is emitted when the execution ends,
# with its stored ids and its recorded start and end times.

#: (trace id, span id) the next span must take (see ``ChosenIds`` in :func:`configure`).
_chosen: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
    "flext_mesh_chosen_span_ids", default=None
)


def new_execution_trace(caller_traceparent: str) -> tuple[str, str] | None:
    """(traceparent of a new execution's span, the span id of its parent or "") to
    store with the execution; None when tracing is off. The execution joins the
    caller's trace when it sent a ``traceparent``."""
    if _active.tracer is None:
        return None
    parent = trace.get_current_span(
        _propagator.extract({"traceparent": caller_traceparent} if caller_traceparent else {})
    ).get_span_context()
    trace_id = parent.trace_id if parent.is_valid else random.getrandbits(128) or 1
    span_id = random.getrandbits(64) or 1
    parent_span = format(parent.span_id, "016x") if parent.is_valid else ""
    return f"00-{trace_id:032x}-{span_id:016x}-01", parent_span


def child_span(
    traceparent: str, name: str, attributes: Mapping[str, Any], *, kind: SpanKind = SpanKind.CLIENT
) -> trace.Span | None:
    """A span that is a child of a stored ``traceparent`` (a step attempt of an
    execution); None when off or without one. End it with :func:`end_span`."""
    tracer = _active.tracer
    if tracer is None or not traceparent:
        return None
    parent = _propagator.extract({"traceparent": traceparent})
    return tracer.start_span(name, context=parent, kind=kind, attributes=dict(attributes))


def execution_span(
    traceparent: str,
    parent_span_id: str,
    name: str,
    *,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, Any],
    error: str = "",
) -> None:
    """Emit the span of an ended execution with the ids stored at its start (see
    :func:`new_execution_trace`), its start and end times; nothing when off."""
    tracer = _active.tracer
    if tracer is None or not traceparent:
        return
    parts = traceparent.split("-")
    if len(parts) != 4:
        return
    try:
        ids = (int(parts[1], 16), int(parts[2], 16))
        parent_id = int(parent_span_id, 16) if parent_span_id else 0
    except ValueError:
        return
    parent = otel_context.Context()
    if parent_id:
        parent = trace.set_span_in_context(
            trace.NonRecordingSpan(
                trace.SpanContext(
                    ids[0], parent_id, is_remote=True, trace_flags=trace.TraceFlags(1)
                )
            )
        )
    chosen = _chosen.set(ids)
    try:
        span = tracer.start_span(
            name,
            context=parent,
            kind=SpanKind.INTERNAL,
            attributes=dict(attributes),
            start_time=start_ns,
        )
    finally:
        _chosen.reset(chosen)
    if error:
        span.set_status(Status(StatusCode.ERROR, error))
    span.end(end_time=end_ns)


def current_trace_id() -> str:
    """The current span's trace id as 32 hex digits; "" when off or outside a span."""
    if _active.tracer is None:
        return ""
    span_context = trace.get_current_span().get_span_context()
    return format(span_context.trace_id, "032x") if span_context.is_valid else ""
