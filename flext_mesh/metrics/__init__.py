"""Call metrics: ingest, bucketed sketches, reports, alerts, feedback to the registry."""

from __future__ import annotations

from flext_mesh.metrics.aggregator import Aggregator, AggregatorSettings
from flext_mesh.metrics.service import Metrics

__all__ = ["Aggregator", "AggregatorSettings", "Metrics"]
