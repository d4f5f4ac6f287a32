"""Loading the app's processors named by ``--app MODULE:ATTR``."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from flext_mesh.errors import ConfigError
from flext_mesh.processor import ServiceProcessor

__all__ = ["AppError", "load_app"]


class AppError(ConfigError):
    """``--app`` does not name a usable mapping of processors; the message says why."""


def load_app(spec: str) -> dict[str, ServiceProcessor[Any, Any, Any]]:
    """Import ``MODULE:ATTR``; the attribute is a mapping of operation name to
    ServiceProcessor, or a callable returning one."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AppError(f"--app {spec!r} is not MODULE:ATTR (e.g. myapp.mesh:PROCESSORS)")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise AppError(f"--app {spec!r}: cannot import {module_name!r}: {exc}") from exc
    try:
        target: Any = getattr(module, attr)
    except AttributeError as exc:
        raise AppError(f"--app {spec!r}: module {module_name!r} has no {attr!r}") from exc
    if callable(target) and not isinstance(target, Mapping):
        try:
            target = target()
        except Exception as exc:
            raise AppError(f"--app {spec!r}: calling {attr} failed: {exc!r}") from exc
    if not isinstance(target, Mapping):
        raise AppError(
            f"--app {spec!r}: {attr} is a {type(target).__name__}, not a mapping of operation "
            "name to ServiceProcessor"
        )
    if not target:
        raise AppError(f"--app {spec!r}: {attr} has no operation")
    for name, processor in target.items():
        if not isinstance(name, str) or not name:
            raise AppError(f"--app {spec!r}: operation name {name!r} is not a non-empty string")
        if not isinstance(processor, ServiceProcessor):
            raise AppError(
                f"--app {spec!r}: operation {name!r} is a {type(processor).__name__}, "
                "not a ServiceProcessor"
            )
    return dict(target)
