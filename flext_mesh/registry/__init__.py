"""The service registry: leases, active health, outlier ejection, discovery, watch."""

from __future__ import annotations

from flext_mesh.registry.registry import INSTANCES, Registry, RegistrySettings

__all__ = ["INSTANCES", "Registry", "RegistrySettings"]
