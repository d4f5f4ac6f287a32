"""Hosting ServiceProcessors: serving them over ProcessorService, registering them with
a lease, and reporting their calls. Used by ``flext-sidecar`` and by the facade."""

from __future__ import annotations

from flext_mesh.hosting.servicer import ProcessorServicer

__all__ = ["ProcessorServicer"]
