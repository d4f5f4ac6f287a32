"""``FlextServices``: the guide's API, backed by the mesh.

Code written against the guide (``FlextServices.ServiceRegistry()``,
``ServiceOrchestrator().orchestrate_workflow(...)``, ``ServiceMetrics()``, ...) runs
unchanged; every call does the real thing through the control plane given as
``control_plane=`` or ``FLEXT_MESH_CONTROL_PLANE`` (default ``127.0.0.1:50051``).
Methods return ``FlextResult``s; nothing raises to the caller. Each blocking method has
an ``a``-prefixed twin for asyncio code. ``close()``, leaving a ``with`` block, or the
interpreter's exit deregisters what an object registered and stops its background work
(see :mod:`flext_mesh.facade._bridge`).
"""

from __future__ import annotations

import os

__all__ = ["DEFAULT_CONTROL_PLANE", "control_plane_address"]

#: Where the facade finds the control plane when neither argument nor variable says.
DEFAULT_CONTROL_PLANE = "127.0.0.1:50051"


def control_plane_address(given: str | None = None) -> str:
    """``given``, else ``FLEXT_MESH_CONTROL_PLANE``, else 127.0.0.1:50051."""
    return given or os.environ.get("FLEXT_MESH_CONTROL_PLANE") or DEFAULT_CONTROL_PLANE
