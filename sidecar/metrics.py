"""A sidecar's own ``/metrics``, on an HTTP port of its own (``--metrics-listen``).

What only the sidecar knows, for Prometheus:

- ``flext_mesh_client_call_duration_seconds{service,operation,code}``: every attempt its
  mesh client made (the app's calls through ``mesh()``), by gRPC status name; the same
  buckets as the control plane's call histograms;
- ``flext_mesh_client_retries_total{service}``: attempts that were retries;
- ``flext_mesh_client_breakers{service,state}``: instance circuit breakers by state;
- ``flext_mesh_reporter_records_total{outcome}`` (``sent``, ``dropped``, ``rejected``)
  and ``flext_mesh_reporter_pending_records`` (buffered or awaiting acknowledgement):
  whether the call records reach the control plane;
- process metrics.

Cardinality: services and operations this app calls, times the gRPC codes seen; no
instance id. Off unless ``--metrics-listen`` is given: a plaintext HTTP port, so bind
it where only the scraper reaches.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from flext_mesh.addresses import parse_host_port
from flext_mesh.buckets import CALL_BUCKETS_SECONDS
from flext_mesh.hosting.reporter import CallReporter
from sidecar.client import MeshClient

__all__ = ["SidecarMetrics"]

disable_created_metrics()  # type: ignore[no-untyped-call]

#: gRPC status names by number (``OK``, ``UNAVAILABLE``, ...).
_CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


class _StateCollector(Collector):
    """Breakers and reporter counters, read at scrape time (on the loop's thread: the
    scrape renders there, see :meth:`SidecarMetrics._metrics`)."""

    def __init__(self, client: MeshClient | None, reporter: CallReporter | None) -> None:
        self._client = client
        self._reporter = reporter

    def describe(self) -> Iterable[Metric]:
        return self._families(None, None)

    def collect(self) -> Iterable[Metric]:
        return self._families(self._client, self._reporter)

    @staticmethod
    def _families(client: MeshClient | None, reporter: CallReporter | None) -> list[Metric]:
        breakers = GaugeMetricFamily(
            "flext_mesh_client_breakers",
            "Instance circuit breakers of the mesh client, by service and state.",
            labels=("service", "state"),
        )
        records = CounterMetricFamily(
            "flext_mesh_reporter_records",
            "Call records the sidecar reported: sent (acknowledged), dropped (buffer "
            "full), rejected (refused by the control plane as invalid).",
            labels=("outcome",),
        )
        pending = GaugeMetricFamily(
            "flext_mesh_reporter_pending_records",
            "Call records buffered or sent and awaiting their acknowledgement.",
        )
        if client is not None:
            for (service, state), count in sorted(client.breakers().items()):
                breakers.add_metric((service, state), count)
        if reporter is not None:
            stats = reporter.stats()
            records.add_metric(("sent",), stats.sent)
            records.add_metric(("dropped",), stats.dropped)
            records.add_metric(("rejected",), stats.rejected)
            pending.add_metric((), stats.buffered + stats.in_flight)
        return [breakers, records, pending]


class SidecarMetrics:
    """The sidecar's Prometheus registry and the HTTP server that exposes it."""

    def __init__(self, client: MeshClient | None, reporter: CallReporter | None) -> None:
        """Observe ``client``'s attempts and read its breakers and ``reporter``."""
        self.registry = CollectorRegistry()
        self._calls = Histogram(
            "flext_mesh_client_call_duration_seconds",
            "Attempts of the sidecar's mesh client, by service, operation and gRPC status.",
            ("service", "operation", "code"),
            buckets=CALL_BUCKETS_SECONDS,
            registry=self.registry,
        )
        self._retries = Counter(
            "flext_mesh_client_retries",
            "Attempts of the sidecar's mesh client that were retries, by service.",
            ("service",),
            registry=self.registry,
        )
        self.registry.register(_StateCollector(client, reporter))
        ProcessCollector(registry=self.registry)
        if client is not None:
            client.observe_attempt = self.attempt
        self._runner: web.AppRunner | None = None
        self.port = 0

    def attempt(self, service: str, operation: str, code: int, seconds: float, retry: bool) -> None:
        """One attempt of the mesh client (its ``observe_attempt`` hook)."""
        self._calls.labels(service, operation, _CODE_NAMES.get(code, str(code))).observe(seconds)
        if retry:
            self._retries.labels(service).inc()

    async def start(self, listen: str) -> int:
        """Serve ``/metrics`` on ``listen`` (HOST:PORT; port 0 picks one); the bound port."""
        host, port = parse_host_port(listen)
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop serving."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, request: web.Request) -> web.Response:
        # Rendered on the loop: the collectors read state the loop changes, and a
        # sidecar's registry is small (a few hundred series).
        del request
        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
