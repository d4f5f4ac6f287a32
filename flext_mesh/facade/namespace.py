"""The ``FlextServices`` namespace of the guide, every member backed by the mesh."""

from __future__ import annotations

from flext_mesh.facade.metrics import ServiceMetrics as _ServiceMetrics
from flext_mesh.facade.orchestrator import ServiceOrchestrator as _ServiceOrchestrator
from flext_mesh.facade.registry import ServiceRegistry as _ServiceRegistry
from flext_mesh.facade.validation import ServiceValidation as _ServiceValidation
from flext_mesh.processor import ServiceProcessor as _ServiceProcessor

__all__ = ["FlextServices"]


class FlextServices:
    """The guide's entry point: ``FlextServices.ServiceRegistry()`` and friends.

    - ``ServiceProcessor``: the library's Template Method base (the same class).
    - ``ServiceRegistry``: register instances (leases kept alive), discover them.
    - ``ServiceOrchestrator``: serve local processors, run the guide's workflow dicts
      as durable executions.
    - ``ServiceMetrics``: report calls in batches, read the service report.
    - ``ServiceValidation``: validate inputs and outputs (callables, pydantic models,
      JSON Schema).

    Each takes ``control_plane=`` (else ``FLEXT_MESH_CONTROL_PLANE``, else
    127.0.0.1:50051); methods return ``FlextResult``s and have ``a``-prefixed async
    twins.
    """

    ServiceProcessor = _ServiceProcessor
    ServiceRegistry = _ServiceRegistry
    ServiceOrchestrator = _ServiceOrchestrator
    ServiceMetrics = _ServiceMetrics
    ServiceValidation = _ServiceValidation
