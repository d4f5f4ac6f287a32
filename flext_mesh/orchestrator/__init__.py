"""The orchestrator: durable workflows with saga compensation."""

from __future__ import annotations

from flext_mesh.orchestrator.engine import Orchestrator, OrchestratorSettings
from flext_mesh.orchestrator.invoker import MeshInvoker

__all__ = ["MeshInvoker", "Orchestrator", "OrchestratorSettings"]
