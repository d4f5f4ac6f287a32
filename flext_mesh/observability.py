"""Prometheus metrics of the control plane: one registry per control plane, the metrics
of its own RPCs (a grpc.aio server interceptor), the mesh's call metrics (a collector
over the metrics service's aggregates), its event loop's lag (a collector over a
LoopLagMonitor) and the ``/metrics`` route that exposes them.

Wiring, in the control plane::

    obs = Observability()
    server = grpc.aio.server(interceptors=[obs.interceptor], ...)
    obs.set_call_source(metrics_service.call_series)   # on the event loop
    obs.set_loop_monitor(monitor)                      # flext_mesh.loop.LoopLagMonitor
    http = WebServer(host, port, {**obs.routes(), ...})  # flext_mesh.dashboard.web
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gzip
import inspect
import logging
import platform
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeAlias, TypeVar

import grpc
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from flext_mesh.buckets import CALL_BUCKETS_SECONDS
from flext_mesh.loop import LoopLagMonitor
from flext_mesh.result import STATUS_CODE_NAMES_BY_NUMBER
from flext_mesh.rpc.handlers import WrappingInterceptor
from flext_mesh.version import __version__

__all__ = [
    "CALL_BUCKETS_SECONDS",
    "RPC_BUCKETS_SECONDS",
    "WORKFLOW_BUCKETS_SECONDS",
    "CallMetricsCollector",
    "CallOutcome",
    "CallSeries",
    "CallerCalls",
    "LoopLagCollector",
    "MeshState",
    "MeshStateCollector",
    "Observability",
    "RpcMetricsInterceptor",
    "WorkflowDurations",
]

_log = logging.getLogger("flext_mesh.observability")

# No ``*_created`` series: a series per counter and histogram that dashboards do not use
# and that doubles what Prometheus stores.
disable_created_metrics()  # type: ignore[no-untyped-call]
_T = TypeVar("_T")

#: Upper bounds (seconds) of the control plane's own unary RPC latency histogram.
RPC_BUCKETS_SECONDS: tuple[float, ...] = CALL_BUCKETS_SECONDS

#: How a mesh call ended: business rejections are not infrastructure faults.
CallOutcome: TypeAlias = Literal["success", "business_error", "infrastructure_error"]

_CALL_LABELS: Final = ("service", "operation", "outcome")
#: The caller label of calls whose caller gave no name (grpcurl, a plain client).
_NO_CALLER: Final = "(unknown)"
#: gRPC status code names by number ("OK", "NOT_FOUND"...), the code label's values.
_CODE_NAMES: Final = STATUS_CODE_NAMES_BY_NUMBER
_RPC_LABELS: Final = ("grpc_service", "grpc_method")
_OK: Final = grpc.StatusCode.OK
_Behavior: TypeAlias = Callable[..., Any]
#: Formats a bucket bound as prometheus_client's own histograms do (``0.0005``, ``1.0``).
_format_le: Callable[[float], str] = floatToGoString


# -- the control plane's own RPCs -------------------------------------------------------


class _MethodMetrics:
    """The label children of one RPC method, resolved once so that a call only looks up."""

    __slots__ = ("_handled", "_labels", "handled_by_code", "handled_ok", "seconds", "started")

    def __init__(
        self, interceptor: RpcMetricsInterceptor, full_method: str, *, timed: bool
    ) -> None:
        service, _, method = full_method.rpartition("/")
        self._labels = (service.lstrip("/") or "unknown", method or "unknown")
        self._handled = interceptor.handled
        # Unary RPCs are timed, streams (unbounded) counted when started; resolving only
        # the one that applies keeps empty series out of the exposition.
        self.seconds = interceptor.handling_seconds.labels(*self._labels) if timed else None
        self.started = None if timed else interceptor.started.labels(*self._labels)
        self.handled_ok = self._handled.labels(*self._labels, _OK.name)
        self.handled_by_code: dict[grpc.StatusCode, Counter] = {_OK: self.handled_ok}

    def handled(self, code: grpc.StatusCode) -> Counter:
        """The handled counter of ``code`` (created on first use)."""
        child = self.handled_by_code.get(code)
        if child is None:
            child = self.handled_by_code[code] = self._handled.labels(*self._labels, code.name)
        return child


def _status_of(exc: BaseException, context: grpc.aio.ServicerContext[Any, Any]) -> grpc.StatusCode:
    """The status an RPC ends with when its handler raised ``exc`` (as grpc.aio sends it)."""
    if isinstance(exc, grpc.aio.AbortError):
        return context.code() or grpc.StatusCode.UNKNOWN
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        remaining = context.time_remaining()
        if remaining is not None and remaining <= 0:
            return grpc.StatusCode.DEADLINE_EXCEEDED
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN


class RpcMetricsInterceptor(WrappingInterceptor):
    """Counts and times the RPCs the control plane serves, on a given registry.

    Every RPC counts ``flext_mesh_rpc_server_handled_total{grpc_code}`` when it ends.
    Unary-unary RPCs also observe ``flext_mesh_rpc_server_handling_seconds`` (handler
    time); streaming RPCs, unbounded in time, count ``flext_mesh_rpc_server_started_total``
    instead (started - handled = open streams). Handlers written as coroutines or async
    generators are measured; synchronous ones (thread-pool handlers) pass through
    unmeasured. Labels are resolved once per method, so a call costs a dict lookup, a
    histogram observation and a counter increment.
    """

    def __init__(
        self, registry: CollectorRegistry, *, buckets: Sequence[float] = RPC_BUCKETS_SECONDS
    ) -> None:
        """Create the RPC metrics on ``registry``."""
        super().__init__()
        self.started = Counter(
            "flext_mesh_rpc_server_started_total",
            "Streaming RPCs started on the control plane.",
            _RPC_LABELS,
            registry=registry,
        )
        self.handled = Counter(
            "flext_mesh_rpc_server_handled_total",
            "RPCs completed on the control plane, by status code.",
            (*_RPC_LABELS, "grpc_code"),
            registry=registry,
        )
        self.handling_seconds = Histogram(
            "flext_mesh_rpc_server_handling_seconds",
            "Time the control plane's handlers took to answer unary RPCs.",
            _RPC_LABELS,
            buckets=tuple(buckets),
            registry=registry,
        )

    def _wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        serializers: dict[str, Any] = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            if not inspect.iscoroutinefunction(handler.unary_unary):
                return handler
            metrics = _MethodMetrics(self, method, timed=True)
            return grpc.unary_unary_rpc_method_handler(
                _timed_unary(handler.unary_unary, metrics), **serializers
            )
        streaming: tuple[tuple[_Behavior | None, Callable[..., Any]], ...] = (
            (handler.unary_stream, grpc.unary_stream_rpc_method_handler),
            (handler.stream_unary, grpc.stream_unary_rpc_method_handler),
            (handler.stream_stream, grpc.stream_stream_rpc_method_handler),
        )
        for behavior, make_handler in streaming:
            if behavior is None:
                continue
            if not (inspect.isasyncgenfunction(behavior) or inspect.iscoroutinefunction(behavior)):
                return handler
            metrics = _MethodMetrics(self, method, timed=False)
            wrapped: grpc.RpcMethodHandler[Any, Any] = make_handler(
                _counted(behavior, metrics), **serializers
            )
            return wrapped
        return handler


def _timed_unary(behavior: _Behavior, metrics: _MethodMetrics) -> _Behavior:
    seconds = metrics.seconds
    assert seconds is not None
    handled_ok = metrics.handled_ok
    clock = time.perf_counter

    async def unary(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        start = clock()
        try:
            response = await behavior(request, context)
        except BaseException as exc:
            seconds.observe(clock() - start)
            metrics.handled(_status_of(exc, context)).inc()
            raise
        seconds.observe(clock() - start)
        code = context.code()
        if code is None or code is _OK:
            handled_ok.inc()
        else:
            metrics.handled(code).inc()
        return response

    return unary


def _counted(behavior: _Behavior, metrics: _MethodMetrics) -> _Behavior:
    """A streaming behavior of the same kind (async generator, or coroutine using
    context.read/write) that counts started and handled."""
    started = metrics.started
    assert started is not None

    if inspect.isasyncgenfunction(behavior):

        async def generator(
            request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            started.inc()
            code = _OK
            try:
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response
            except BaseException as exc:
                code = _status_of(exc, context)
                raise
            else:
                code = context.code() or _OK
            finally:
                metrics.handled(code).inc()

        return generator

    async def coroutine(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        started.inc()
        try:
            response = await behavior(request, context)
        except BaseException as exc:
            metrics.handled(_status_of(exc, context)).inc()
            raise
        metrics.handled(context.code() or _OK).inc()
        return response

    return coroutine


# -- mesh call metrics ------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class CallerCalls:
    """Mesh calls one caller made to one service that ended with one gRPC status code,
    cumulative since the control plane started: an edge of the service graph."""

    #: The called service, e.g. ``payment``.
    service: str
    #: The calling service as its sidecar or client names itself (``caller_service``),
    #: "" when it gave none, ``(other)`` past the callers counted per service.
    caller: str
    #: The gRPC status code, 0 (OK) to 16.
    code: int
    count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class CallSeries:
    """Aggregated mesh calls of one (service, operation, outcome), as the metrics service
    holds them; cumulative since the control plane started (Prometheus counters)."""

    #: The called service, e.g. ``payment``.
    service: str
    #: The called operation, e.g. ``charge``.
    operation: str
    #: How the calls ended.
    outcome: CallOutcome
    #: Bucket upper bounds in seconds, ascending, without +Inf (usually CALL_BUCKETS_SECONDS).
    bucket_bounds_seconds: Sequence[float]
    #: Calls with duration <= each bound, then the +Inf count last (len(bounds) + 1 values).
    cumulative_counts: Sequence[float]
    #: Total duration of the calls, seconds.
    sum_seconds: float
    #: Number of calls; equals the +Inf count.
    count: float


class CallMetricsCollector(Collector):
    """Exposes the metrics service's call aggregates at scrape time, without observing
    per call: ``flext_mesh_call_duration_seconds`` (histogram) and
    ``flext_mesh_calls_total`` (counter), labelled service, operation, outcome; and
    ``flext_mesh_calls_by_caller_total`` (counter) labelled service, caller, code, the
    edges of a service graph (its labels are bounded: 17 codes, and the aggregator
    counts at most 32 callers per service).

    ``source`` returns the current series. With ``loop`` given, a scrape from another
    thread (``/metrics`` renders in a worker thread) runs ``source`` on that loop's thread,
    so it sees the aggregates between two updates, never in the middle of one.
    """

    def __init__(
        self,
        source: Callable[[], Iterable[CallSeries | CallerCalls]],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout: float = 5.0,
    ) -> None:
        """Collect from ``source``; ``timeout``: seconds to wait for the loop to run it."""
        self._source = source
        self._loop = loop
        self._timeout = timeout
        self._le_cache: dict[tuple[float, ...], tuple[str, ...]] = {}

    def describe(self) -> Iterable[Metric]:
        """The metric names (so the registry rejects duplicates without calling source)."""
        return self._families([])

    def collect(self) -> Iterable[Metric]:
        """The families built from the source's current series."""
        return self._families(self._snapshot())

    def _snapshot(self) -> list[CallSeries | CallerCalls]:
        return _on_loop(self._loop, lambda: list(self._source()), self._timeout)

    def _families(self, series: Iterable[CallSeries | CallerCalls]) -> list[Metric]:
        durations = HistogramMetricFamily(
            "flext_mesh_call_duration_seconds",
            "Duration of calls through the mesh, as reported by sidecars.",
            labels=_CALL_LABELS,
        )
        calls = CounterMetricFamily(
            "flext_mesh_calls_total",
            "Calls through the mesh, as reported by sidecars.",
            labels=_CALL_LABELS,
        )
        edges = CounterMetricFamily(
            "flext_mesh_calls_by_caller_total",
            "Calls through the mesh by calling service and gRPC status code, as reported "
            'by sidecars (at most 32 callers per service, then caller="(other)").',
            labels=("service", "caller", "code"),
        )
        for item in series:
            if isinstance(item, CallerCalls):
                edges.add_metric(
                    (item.service, item.caller or _NO_CALLER, _CODE_NAMES[item.code]),
                    float(item.count),
                )
                continue
            les = self._les(item.bucket_bounds_seconds)
            if len(item.cumulative_counts) != len(les):
                _log.warning(
                    "call series skipped: %d counts for %d buckets service=%s operation=%s",
                    len(item.cumulative_counts),
                    len(les),
                    item.service,
                    item.operation,
                )
                continue
            labels = (item.service, item.operation, item.outcome)
            durations.add_metric(
                labels,
                [(le, float(n)) for le, n in zip(les, item.cumulative_counts, strict=True)],
                float(item.sum_seconds),
            )
            calls.add_metric(labels, float(item.count))
        return [durations, calls, edges]

    def _les(self, bounds: Sequence[float]) -> tuple[str, ...]:
        key = tuple(float(bound) for bound in bounds)
        les = self._le_cache.get(key)
        if les is None:
            les = (*(_format_le(bound) for bound in key), "+Inf")
            if len(self._le_cache) < 64:
                self._le_cache[key] = les
        return les


def _on_loop(loop: asyncio.AbstractEventLoop | None, read: Callable[[], _T], timeout: float) -> _T:
    """``read()`` on ``loop``'s thread (between two of its callbacks, so never in the
    middle of an update), waited for up to ``timeout`` s from a scrape's thread."""
    if loop is None or loop.is_closed() or not loop.is_running() or _runs_on(loop):
        return read()
    future: concurrent.futures.Future[_T] = concurrent.futures.Future()

    def run() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(read())
            except Exception as exc:
                future.set_exception(exc)

    loop.call_soon_threadsafe(run)
    try:
        return future.result(timeout)
    except TimeoutError:
        future.cancel()
        raise


def _runs_on(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


# -- the event loop ---------------------------------------------------------------------


class LoopLagCollector(Collector):
    """Exposes a LoopLagMonitor at scrape time: ``flext_mesh_event_loop_lag_seconds``
    (histogram of how late its 0.1 s timer fired; the sum is the time the loop lost)
    and ``flext_mesh_event_loop_lag_max_seconds`` (the largest lag in its window, 60 s).

    Reads the monitor without the loop, so a scrape is answered even while the loop is
    slow, and costs the loop nothing.
    """

    def __init__(self, monitor: LoopLagMonitor) -> None:
        """Collect from ``monitor`` (started and stopped by its owner)."""
        self._monitor = monitor

    def describe(self) -> Iterable[Metric]:
        """The metric names (so the registry rejects duplicates)."""
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        """The two families from the monitor's current record."""
        return self._families(self._monitor)

    @staticmethod
    def _families(monitor: LoopLagMonitor | None) -> list[Metric]:
        lag = HistogramMetricFamily(
            "flext_mesh_event_loop_lag_seconds",
            "How late the control plane's event loop ran a periodic timer; while it is "
            "late nothing else runs on the loop (the sum is the time it lost).",
        )
        lag_max = GaugeMetricFamily(
            "flext_mesh_event_loop_lag_max_seconds",
            "The largest event loop lag in the last minute.",
        )
        if monitor is not None:
            snap = monitor.snapshot()
            les = (*(_format_le(bound) for bound in snap.bucket_bounds), "+Inf")
            lag.add_metric(
                [],
                [(le, float(n)) for le, n in zip(les, snap.cumulative_counts, strict=True)],
                snap.sum_seconds,
            )
            lag_max.add_metric([], snap.recent_max_seconds)
        return [lag, lag_max]


# -- what the control plane holds -------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class MeshState:
    """What this control plane holds right now, read at scrape time."""

    #: Registered instances by (service, version, zone, health).
    instances: Mapping[tuple[str, str, str, str], int]
    #: Instances ejected by outlier detection, by service.
    ejected: Mapping[str, int]
    #: Instances in maintenance (drained by an operator), by service.
    maintenance: Mapping[str, int] = field(default_factory=dict)
    #: Leases that hold at least one instance.
    leases: int
    #: Open registry Watch streams on this replica.
    watchers: int
    #: Executions this replica drives, by (workflow, state).
    executions: Mapping[tuple[str, str], int]
    #: The store's commit times: bucket bounds (seconds), cumulative counts with the
    #: +Inf count last, and their sum in seconds.
    commits: tuple[Sequence[float], Sequence[int], float] | None = None
    #: Connected xDS clients by state (SYNCED, PENDING, STALE, NACKED, NOT_SENT).
    xds_clients: Mapping[str, int] = field(default_factory=dict)
    #: xDS responses sent since start, by resource type (LDS, RDS, CDS, EDS).
    xds_responses: Mapping[str, int] = field(default_factory=dict)
    #: xDS NACKs received since start, by resource type.
    xds_nacks: Mapping[str, int] = field(default_factory=dict)
    #: Push latencies (a change marked to its response written), as ``commits``.
    xds_pushes: tuple[Sequence[float], Sequence[int], float] | None = None


class MeshStateCollector(Collector):
    """Gauges of the registry and the orchestrator, read at scrape time from ``source``
    on ``loop`` (see :class:`CallMetricsCollector`): ``flext_mesh_instances`` (service,
    version, zone, health), ``flext_mesh_instances_ejected`` (service),
    ``flext_mesh_instances_maintenance`` (service),
    ``flext_mesh_leases``, ``flext_mesh_registry_watchers``,
    ``flext_mesh_executions`` (workflow, state; the executions this replica drives, so
    a sum over replicas counts each once), ``flext_mesh_store_commit_seconds``, and of
    xDS: ``flext_mesh_xds_clients`` (state), ``flext_mesh_xds_responses_total`` and
    ``flext_mesh_xds_nacks_total`` (type) and ``flext_mesh_xds_push_seconds``.

    Cardinality: one series per service x version x zone x health seen, per service, and
    per workflow x state (at most the active states); no instance id or lease id; five
    xDS states and four types, no node id.
    """

    def __init__(
        self,
        source: Callable[[], MeshState],
        *,
        loop: asyncio.AbstractEventLoop | None = None,
        timeout: float = 5.0,
    ) -> None:
        """Collect from ``source``; ``timeout``: seconds to wait for the loop to run it."""
        self._source = source
        self._loop = loop
        self._timeout = timeout

    def describe(self) -> Iterable[Metric]:
        """The metric names (so the registry rejects duplicates without calling source)."""
        return self._families(None)

    def collect(self) -> Iterable[Metric]:
        """The gauges of the source's current state."""
        return self._families(_on_loop(self._loop, self._source, self._timeout))

    @staticmethod
    def _families(state: MeshState | None) -> list[Metric]:
        instances = GaugeMetricFamily(
            "flext_mesh_instances",
            "Registered instances, by service, version, zone and health.",
            labels=("service", "version", "zone", "health"),
        )
        ejected = GaugeMetricFamily(
            "flext_mesh_instances_ejected",
            "Instances ejected by outlier detection, by service.",
            labels=("service",),
        )
        drained = GaugeMetricFamily(
            "flext_mesh_instances_maintenance",
            "Instances in maintenance (drained: no new calls), by service.",
            labels=("service",),
        )
        leases = GaugeMetricFamily(
            "flext_mesh_leases", "Leases that hold at least one registered instance."
        )
        watchers = GaugeMetricFamily(
            "flext_mesh_registry_watchers", "Open registry Watch streams on this replica."
        )
        executions = GaugeMetricFamily(
            "flext_mesh_executions",
            "Workflow executions this replica drives, by workflow and state.",
            labels=("workflow", "state"),
        )
        commits = HistogramMetricFamily(
            "flext_mesh_store_commit_seconds",
            "Time of the store's durable writes (SQLite: a group commit with its fsync; "
            "etcd: a write's round trip).",
        )
        xds_clients = GaugeMetricFamily(
            "flext_mesh_xds_clients",
            "Connected xDS clients (ADS streams) by state: SYNCED, PENDING, STALE (a "
            "version unanswered for 5 s), NACKED, NOT_SENT.",
            labels=("state",),
        )
        xds_responses = CounterMetricFamily(
            "flext_mesh_xds_responses",
            "xDS responses sent to clients, by resource type.",
            labels=("type",),
        )
        xds_nacks = CounterMetricFamily(
            "flext_mesh_xds_nacks",
            "xDS responses clients rejected (NACKs), by resource type.",
            labels=("type",),
        )
        xds_pushes = HistogramMetricFamily(
            "flext_mesh_xds_push_seconds",
            "Time from a registry or policy change to the xDS response it caused being "
            "written to a client's stream (the 50 ms coalescing included), per stream.",
        )
        if state is not None:
            for xds_state, count in state.xds_clients.items():
                xds_clients.add_metric((xds_state,), count)
            for kind, count in state.xds_responses.items():
                xds_responses.add_metric((kind,), count)
            for kind, count in state.xds_nacks.items():
                xds_nacks.add_metric((kind,), count)
            if state.xds_pushes is not None:
                bounds, cumulative, total = state.xds_pushes
                les = [*(_format_le(bound) for bound in bounds), "+Inf"]
                xds_pushes.add_metric(
                    (), [(le, float(n)) for le, n in zip(les, cumulative, strict=True)], total
                )
            for instance_labels, count in sorted(state.instances.items()):
                instances.add_metric(instance_labels, count)
            for service, count in sorted(state.ejected.items()):
                ejected.add_metric((service,), count)
            for service, count in sorted(state.maintenance.items()):
                drained.add_metric((service,), count)
            leases.add_metric((), state.leases)
            watchers.add_metric((), state.watchers)
            for execution_labels, count in sorted(state.executions.items()):
                executions.add_metric(execution_labels, count)
            if state.commits is not None:
                bounds, cumulative, total = state.commits
                les = [*(_format_le(bound) for bound in bounds), "+Inf"]
                commits.add_metric(
                    (), [(le, float(n)) for le, n in zip(les, cumulative, strict=True)], total
                )
        return [
            instances,
            ejected,
            drained,
            leases,
            watchers,
            executions,
            commits,
            xds_clients,
            xds_responses,
            xds_nacks,
            xds_pushes,
        ]


# -- workflows --------------------------------------------------------------------------

#: Upper bounds (seconds) of the workflow and step duration histograms.
WORKFLOW_BUCKETS_SECONDS: tuple[float, ...] = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    1800.0,
)


class WorkflowDurations:
    """Workflow and step durations as Prometheus histograms under their own names:
    ``flext_mesh_workflow_duration_seconds{workflow,state}`` and
    ``flext_mesh_step_duration_seconds{workflow,step,code}`` (the step's last gRPC
    status). Observed by the orchestrator as each settles (see
    :class:`flext_mesh.orchestrator.reporting.Durations`)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        """Register both histograms in ``registry``."""
        self._executions = Histogram(
            "flext_mesh_workflow_duration_seconds",
            "Duration of ended workflow executions, start to end, by final state.",
            ("workflow", "state"),
            buckets=WORKFLOW_BUCKETS_SECONDS,
            registry=registry,
        )
        self._steps = Histogram(
            "flext_mesh_step_duration_seconds",
            "Duration of settled workflow steps, attempts and backoffs included, by the "
            "gRPC status of the last attempt.",
            ("workflow", "step", "code"),
            buckets=WORKFLOW_BUCKETS_SECONDS,
            registry=registry,
        )

    def step(self, workflow: str, step: str, code: str, seconds: float) -> None:
        """A step settled."""
        self._steps.labels(workflow, step, code).observe(seconds)

    def execution(self, workflow: str, state: str, seconds: float) -> None:
        """An execution ended."""
        self._executions.labels(workflow, state).observe(seconds)


# -- the bundle -------------------------------------------------------------------------


class Observability:
    """The control plane's metrics: its registry, RPC interceptor, call collector,
    process metrics and the ``/metrics`` route. One per control plane, so several can
    run in one process (tests) without sharing series."""

    def __init__(self, *, version: str | None = None, process_metrics: bool = True) -> None:
        """Create the registry; ``process_metrics`` adds process_*, python_* and gc metrics."""
        if version is None:
            version = __version__
        self.registry = CollectorRegistry()
        self.interceptor = RpcMetricsInterceptor(self.registry)
        self.build_info = Gauge(
            "flext_mesh_build_info",
            "Always 1; the labels say which flext-mesh, Python and grpcio run.",
            ("version", "python_version", "grpc_version"),
            registry=self.registry,
        )
        self.build_info.labels(version, platform.python_version(), grpc.__version__).set(1)
        if process_metrics:
            ProcessCollector(registry=self.registry)  # process_*: CPU, memory, fds (Linux)
            PlatformCollector(registry=self.registry)  # python_info
            GCCollector(registry=self.registry)  # python_gc_* (CPython)
        self._calls: CallMetricsCollector | None = None
        self._loop_lag: LoopLagCollector | None = None
        self._state: MeshStateCollector | None = None
        self.workflows = WorkflowDurations(self.registry)

    def set_call_source(
        self, source: Callable[[], Iterable[CallSeries | CallerCalls]] | None
    ) -> None:
        """Expose the mesh call metrics from ``source`` (None removes them). Call it on
        the event loop that updates the aggregates: scrapes run ``source`` there."""
        if self._calls is not None:
            self.registry.unregister(self._calls)
            self._calls = None
        if source is not None:
            loop: asyncio.AbstractEventLoop | None
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            self._calls = CallMetricsCollector(source, loop=loop)
            self.registry.register(self._calls)

    def set_state_source(self, source: Callable[[], MeshState] | None) -> None:
        """Expose the registry's and orchestrator's gauges from ``source`` (None removes
        them). Call it on the event loop that owns that state."""
        if self._state is not None:
            self.registry.unregister(self._state)
            self._state = None
        if source is not None:
            loop: asyncio.AbstractEventLoop | None
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                loop = None
            self._state = MeshStateCollector(source, loop=loop)
            self.registry.register(self._state)

    def set_loop_monitor(self, monitor: LoopLagMonitor | None) -> None:
        """Expose the event loop lag measured by ``monitor`` (None removes it)."""
        if self._loop_lag is not None:
            self.registry.unregister(self._loop_lag)
            self._loop_lag = None
        if monitor is not None:
            self._loop_lag = LoopLagCollector(monitor)
            self.registry.register(self._loop_lag)

    def render(self, *, gzipped: bool = False) -> bytes:
        """The exposition in Prometheus text format (blocking: run it in a thread)."""
        body = generate_latest(self.registry)
        return gzip.compress(body, compresslevel=6) if gzipped else body

    async def metrics(self, request: web.Request) -> web.Response:
        """The ``/metrics`` handler: renders in a worker thread, gzipped when accepted."""
        gzipped = _accepts_gzip(request.headers.get("accept-encoding", ""))
        body = await asyncio.to_thread(self.render, gzipped=gzipped)
        headers = {"Content-Type": CONTENT_TYPE_LATEST}
        if gzipped:
            headers |= {"Content-Encoding": "gzip", "Vary": "Accept-Encoding"}
        return web.Response(body=body, headers=headers)

    def routes(self) -> dict[str, Handler]:
        """The HTTP routes this object serves: ``/metrics``."""
        return {"/metrics": self.metrics}


def _accepts_gzip(accept_encoding: str) -> bool:
    for item in accept_encoding.split(","):
        coding, _, params = item.partition(";")
        if coding.strip().lower() == "gzip":
            q = params.strip().lower()
            return not (q.startswith("q=") and q[2:].strip() in ("0", "0.0", "0.00", "0.000"))
    return False
