"""The control-plane process: one grpc.aio server, its store, health and reflection.

``create_server(config)`` builds and starts a ControlPlane on the configured address
(port 0 picks a free one) so tests run a real server in-process; ``serve(config)`` is
``flext-mesh serve``: it runs until SIGTERM or SIGINT, then drains within the grace
period and exits 0.
"""

from __future__ import annotations

import gc
import itertools
import logging
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import Counter

from flext_mesh.addresses import parse_host_port
from flext_mesh.config import ServerConfig
from flext_mesh.dashboard import Dashboard
from flext_mesh.dashboard.access import authorizer, http_ssl_context, permitter
from flext_mesh.dashboard.web import WebServer
from flext_mesh.errors import ConfigError
from flext_mesh.hosting.servicer import ProcessorServicer, add_processor_servicer
from flext_mesh.loop import LoopLagMonitor
from flext_mesh.metrics.aggregator import AggregatorSettings
from flext_mesh.metrics.analysis import Thresholds
from flext_mesh.metrics.service import Metrics
from flext_mesh.observability import CallerCalls, CallSeries, MeshState, Observability
from flext_mesh.orchestrator.engine import Orchestrator, OrchestratorSettings, default_owner
from flext_mesh.orchestrator.invoker import MeshInvoker
from flext_mesh.process import bind_problem, signal_received
from flext_mesh.registry.health import HealthCheckSettings
from flext_mesh.registry.outlier import OutlierSettings
from flext_mesh.registry.registry import Registry, RegistrySettings
from flext_mesh.rpc import reflection, tracing
from flext_mesh.rpc.channels import (
    ClientSecurity,
    TransportError,
    check_listen,
    open_channel,
    server_credentials,
)
from flext_mesh.rpc.handlers import LongStreams
from flext_mesh.rpc.health import HEALTH_SERVICE, HealthServicer
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.security.auth import SecurityConfigError, build_security, check_auth_required
from flext_mesh.servicers.metrics import MetricsServicer, add_metrics_servicer
from flext_mesh.servicers.orchestrator import OrchestratorServicer, add_orchestrator_servicer
from flext_mesh.servicers.registry import RegistryServicer, add_registry_servicer
from flext_mesh.servicers.watchers import WatchLimit
from flext_mesh.servicers.xds import ADS_SERVICE, AdsServicer, add_ads_servicer
from flext_mesh.store import COMMIT_BUCKETS_SECONDS, Store, open_store
from flext_mesh.v1 import (
    metrics_pb2,
    orchestrator_pb2,
    processor_pb2,
    processor_pb2_grpc,
    registry_pb2,
)
from flext_mesh.xds import status as xds_status
from flext_mesh.xds.hub import PUSH_BUCKETS_SECONDS, XdsHub

__all__ = ["SERVICE_NAMES", "ControlPlane", "ServeError", "create_server", "serve"]

_log = logging.getLogger("flext_mesh.server")

#: Fully qualified names of the services the control plane hosts (health reports each).
SERVICE_NAMES: tuple[str, ...] = (
    registry_pb2.DESCRIPTOR.services_by_name["RegistryService"].full_name,
    metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name,
    orchestrator_pb2.DESCRIPTOR.services_by_name["OrchestratorService"].full_name,
    processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"].full_name,
)


class ServeError(ConfigError):
    """The control plane cannot start (address in use, bad store); the message says why."""


def client_security(config: ServerConfig) -> ClientSecurity:
    """How the control plane calls sidecars (health checks, ListOperations, steps)."""
    return ClientSecurity(
        tls_ca=config.tls_ca, tls_cert=config.tls_cert, tls_key=config.tls_key, token=config.token
    )


def registry_settings(config: ServerConfig) -> RegistrySettings:
    """The registry's settings from the server configuration."""
    return RegistrySettings(
        default_ttl=config.default_ttl,
        health=HealthCheckSettings(
            interval=config.health_check_interval,
            timeout=min(config.health_check_timeout, config.health_check_interval),
            unhealthy_threshold=config.health_unhealthy_threshold,
            healthy_threshold=config.health_healthy_threshold,
            security=client_security(config),
        ),
        outlier=OutlierSettings(
            consecutive_failures=config.outlier_consecutive_failures,
            base_ejection_time=config.outlier_base_ejection_time,
            max_ejection_time=max(
                config.outlier_max_ejection_time, config.outlier_base_ejection_time
            ),
            max_ejection_percent=config.outlier_max_ejection_percent,
        ),
        panic_threshold_percent=config.panic_threshold_percent,
        max_instances_per_service=config.max_instances_per_service,
    )


class ControlPlane:
    """A running control plane: its gRPC server, store, registry and health servicer."""

    def __init__(self, config: ServerConfig, store: Store) -> None:
        self.config = config
        self.store = store
        self.observability = Observability()
        #: Measures stalls of the event loop: /metrics and a warning for each long one.
        self.loop_monitor = LoopLagMonitor()
        self.observability.set_loop_monitor(self.loop_monitor)
        #: Several replicas may share an etcd store; a SQLite file has one owner.
        shared_store = config.store.startswith("etcd://")
        self._split_fallbacks = Counter(
            "flext_mesh_discover_split_fallbacks",
            "Discover answers whose split version had no healthy instance.",
            ("service", "version"),
            registry=self.observability.registry,
        )
        self.registry = Registry(
            store,
            registry_settings(config),
            operation_lister=self._list_operations,
            on_split_fallback=lambda service, version: self._split_fallbacks.labels(
                service, version
            ).inc(),
        )
        #: xDS for proxyless gRPC clients, fed by the registry's cache.
        self.xds = XdsHub(
            self.registry.cache, panic_threshold_percent=config.panic_threshold_percent
        )
        self.metrics = Metrics(
            store,
            self.registry,
            AggregatorSettings(
                retention=config.metrics_retention,
                max_series_per_service=config.metrics_max_series_per_service,
                # Replicas sharing etcd keep their buckets apart and merge on read.
                replica=(config.node_name or default_owner()) if shared_store else "",
            ),
            Thresholds(business_error_alert_rate=config.business_error_alert_rate),
        )
        self.orchestrator = Orchestrator(
            store,
            MeshInvoker(self.registry, report=self._report_call, security=client_security(config)),
            OrchestratorSettings(
                retention=config.execution_retention,
                resolve_timeout=config.step_resolve_timeout,
                owner=config.node_name or default_owner(),
                exclusive_store=not shared_store,
            ),
            report=self.metrics.aggregator.record,
            durations=self.observability.workflows,
        )
        self.health = HealthServicer()
        options: list[tuple[str, Any]] = [
            ("grpc.max_receive_message_length", config.max_message_bytes),
            ("grpc.max_send_message_length", config.max_message_bytes),
            # Long-lived Watch and KeepAlive streams: let clients keep them alive with pings.
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.so_reuseport", 0),
        ]
        self.streams = LongStreams()
        # Open Watch and WatchExecution streams per client, counted together.
        self.watchers = WatchLimit(config.max_watchers_per_client)
        # Authentication and rate limits (None when both are off: no cost per call);
        # after the metrics interceptor, so refused calls are counted too.
        self.security = build_security(config, self.registry)
        interceptors: list[grpc.aio.ServerInterceptor] = [self.observability.interceptor]
        if self.security is not None:
            interceptors.append(self.security)
        self.server = grpc.aio.server(options=options, interceptors=interceptors)
        self.port = 0
        host, port = parse_host_port(config.http_listen)
        self.dashboard = Dashboard(
            self.registry,
            self.metrics,
            self.orchestrator,
            authorize=authorizer(self.security),
            permit=permitter(self.security),
            xds=self.xds,
        )
        self.http = WebServer(
            host,
            port,
            {**self.observability.routes(), **self.dashboard.routes()},
            ssl=http_ssl_context(config),
        )
        self.http_port = 0

    def _add_services(self) -> None:
        add_registry_servicer(
            RegistryServicer(self.registry, self.streams, self.watchers, self.xds), self.server
        )
        add_metrics_servicer(MetricsServicer(self.metrics, self.streams), self.server)
        add_orchestrator_servicer(
            OrchestratorServicer(self.orchestrator, self.watchers), self.server
        )
        add_processor_servicer(ProcessorServicer({}, service_name="flext-mesh"), self.server)
        add_ads_servicer(AdsServicer(self.xds, self.streams), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_reflection(
            (*SERVICE_NAMES, ADS_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), self.server
        )

    async def start(self) -> int:
        """Open the store, bind, start serving; returns the bound port."""
        host, port = parse_host_port(self.config.listen)
        credentials = self._server_credentials()
        try:
            check_auth_required(self.config)
            if self.security is not None:
                self.security.load()
        except SecurityConfigError as exc:
            raise ServeError(str(exc)) from None
        # Process-wide: the store's writer and gRPC's poller thread hand results to the
        # loop; with the default 5 ms interval a busy loop makes each hand-off wait.
        sys.setswitchinterval(self.config.switch_interval_ms / 1000)
        await self.store.open()
        try:
            self.loop_monitor.start()
            await self.registry.start()
            await self.metrics.start()
            await self.orchestrator.start()
            self._add_services()
            try:
                if credentials is None:
                    self.port = self.server.add_insecure_port(self.config.listen)
                else:
                    self.port = self.server.add_secure_port(self.config.listen, credentials)
            except RuntimeError as exc:
                raise ServeError(bind_problem(host, port)) from exc
            await self.server.start()
            self.observability.set_call_source(self._call_series)
            self.observability.set_state_source(self._state)
            try:
                self.http_port = await self.http.start()
            except OSError as exc:
                host, port = parse_host_port(self.config.http_listen)
                raise ServeError(bind_problem(host, port)) from exc
        except BaseException:
            await self.server.stop(0)
            await self.orchestrator.stop()
            await self.metrics.stop()
            await self.registry.stop()
            await self.store.close()
            await self.loop_monitor.aclose()
            raise
        for name in ("", *SERVICE_NAMES, ADS_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return self.port

    def _server_credentials(self) -> grpc.ServerCredentials | None:
        """TLS credentials per the configuration (None: plaintext) under the loopback
        rule; ServeError naming the problem before anything is opened."""
        config = self.config
        try:
            credentials = server_credentials(
                config.tls_cert, config.tls_key, config.tls_ca, config.tls_client_auth
            )
            check_listen(config.listen, tls=credentials is not None, insecure=config.insecure)
            client_security(config).check()
        except TransportError as exc:
            raise ServeError(str(exc)) from None
        return credentials

    async def stop(self, grace: float | None = None) -> None:
        """Report NOT_SERVING, let in-flight RPCs finish within ``grace`` s, close the store."""
        grace = self.config.grace_period if grace is None else grace
        await self.health.enter_graceful_shutdown()
        await self.http.stop()
        # Watch streams never end by themselves: close them so the drain is not held up.
        self.registry.hub.close_all()
        self.xds.close_all()
        self.orchestrator.close_watches()
        self.streams.close_all()
        await self.server.stop(grace)
        await self.orchestrator.stop()
        await self.metrics.stop()
        await self.registry.stop()
        await self.store.close()
        await self.loop_monitor.aclose()

    async def _list_operations(self, instance: registry_pb2.ServiceInstance) -> set[str]:
        """The operations an instance serves (ProcessorService.ListOperations, 2 s)."""
        async with open_channel(instance.endpoint, client_security(self.config)) as channel:
            stub = processor_pb2_grpc.ProcessorServiceStub(channel)
            try:
                reply = await stub.ListOperations(processor_pb2.ListOperationsRequest(), timeout=2)
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from exc
        return {operation.name for operation in reply.operations}

    def _report_call(self, record: metrics_pb2.CallRecord) -> None:
        """A step call made by the orchestrator, folded like a sidecar's report.

        Queued and folded in batches with the workflow durations: folding one record
        at a time costs about 100 µs on the event loop.
        """
        self.orchestrator.record(record)

    def _state(self) -> MeshState:
        """The registry's and the orchestrator's counts, for Prometheus gauges."""
        census = self.registry.census()
        hub = self.xds
        pushes, push_seconds = hub.push_times.cumulative()
        return MeshState(
            instances=census.instances,
            ejected=census.ejected,
            maintenance=census.maintenance,
            leases=census.leases,
            watchers=census.watchers,
            executions=self.orchestrator.driven(),
            commits=(COMMIT_BUCKETS_SECONDS, *self.store.commit_times.cumulative()),
            xds_clients=xds_status.census(hub.clients(), time.time()),
            xds_responses={xds_status.SHORT_NAMES[t]: n for t, n in hub.totals.responses.items()},
            xds_nacks={xds_status.SHORT_NAMES[t]: n for t, n in hub.totals.nacks.items()},
            xds_pushes=(PUSH_BUCKETS_SECONDS, pushes, push_seconds),
        )

    def _call_series(self) -> Iterable[CallSeries | CallerCalls]:
        """The metrics service's cumulative call histograms and calls by caller and
        status code, for Prometheus."""
        bounds = [float(b) / 1000 for b in self.metrics.aggregator.prometheus_bounds_ms]
        for service, operation, outcome, counts, total_ms in self.metrics.call_series():
            cumulative = list(itertools.accumulate(counts))
            yield CallSeries(
                service=service,
                operation=operation,
                outcome=outcome,  # type: ignore[arg-type]
                bucket_bounds_seconds=bounds,
                cumulative_counts=cumulative,
                sum_seconds=total_ms / 1000,
                count=cumulative[-1],
            )
        for service, caller, code, calls in self.metrics.caller_series():
            yield CallerCalls(service=service, caller=caller, code=code, count=calls)


async def create_server(
    config: ServerConfig, *, store: Store | None = None
) -> tuple[ControlPlane, int]:
    """Build and start a control plane; returns it and its bound port."""
    plane = ControlPlane(config, store if store is not None else open_store(config.store))
    port = await plane.start()
    return plane, port


async def serve(config: ServerConfig) -> None:
    """Run ``flext-mesh serve`` until SIGTERM/SIGINT, then drain and return."""
    problem = tracing.settings_problem()
    if problem:
        raise ServeError(problem)
    async with tracing.traced_process("flext-mesh"):
        await _serve(config)


async def _serve(config: ServerConfig) -> None:
    stop = signal_received()
    plane, port = await create_server(config)
    # What start-up made (modules, the loaded registry) lives as long as the process:
    # keep it out of the garbage collector's full passes, which otherwise walk it all
    # and hold the event loop for tens of milliseconds each time.
    gc.collect()
    gc.freeze()
    host, _ = parse_host_port(config.listen)
    http_host, _ = parse_host_port(config.http_listen)
    _log.info(
        "serving grpc=%s:%d http=%s:%d store=%s pid=%d",
        host,
        port,
        http_host,
        plane.http_port,
        plane.store.url,
        os.getpid(),
    )
    received = await stop
    _log.info("stopping signal=%s grace=%.1fs", received, config.grace_period)
    await plane.stop()
    _log.info("stopped")
