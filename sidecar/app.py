"""Loading the app's processors named by ``--app MODULE:ATTR``.

As uvicorn and gunicorn do, the module is looked for first in ``--app-dir`` (default:
the current directory), put at the front of ``sys.path``, then in the installed
packages: ``flext-sidecar --app examples.apps:PAYMENT`` works from the directory that
holds ``examples/``, with no ``PYTHONPATH`` to set.
"""

from __future__ import annotations

import importlib
import sys
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flext_mesh.errors import ConfigError
from flext_mesh.processor import ServiceProcessor

__all__ = ["AppError", "add_app_dir", "load_app"]


class AppError(ConfigError):
    """``--app`` does not name a usable mapping of processors; the message says why."""


def add_app_dir(app_dir: str | Path = ".") -> Path:
    """Put ``app_dir`` (resolved) at the front of ``sys.path``; returns it.

    AppError when it is not a directory.
    """
    directory = Path(app_dir or ".").expanduser().resolve()
    if not directory.is_dir():
        raise AppError(f"--app-dir {str(app_dir)!r}: no such directory ({directory})")
    entry = str(directory)
    if not sys.path or sys.path[0] != entry:
        if entry in sys.path:
            sys.path.remove(entry)
        sys.path.insert(0, entry)
    return directory


def load_app(spec: str, *, app_dir: str | Path = ".") -> dict[str, ServiceProcessor[Any, Any, Any]]:
    """Import ``MODULE:ATTR`` from ``app_dir`` (then the installed packages); the
    attribute is a mapping of operation name to ServiceProcessor, or a callable
    returning one."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise AppError(f"--app {spec!r} is not MODULE:ATTR (e.g. myapp.mesh:PROCESSORS)")
    directory = add_app_dir(app_dir)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and _is_part_of(exc.name, module_name):
            raise AppError(
                f"--app {spec!r}: cannot import {module_name!r}: {exc} (looked in "
                f"{directory}, the --app-dir, then in the installed packages)"
            ) from exc
        raise AppError(
            f"--app {spec!r}: importing module {module_name!r} failed: {exc}{_where(exc)}"
        ) from exc
    except Exception as exc:  # the app's own code failed while importing
        what = exc.msg if isinstance(exc, SyntaxError) else str(exc)
        raise AppError(
            f"--app {spec!r}: importing module {module_name!r} failed: "
            f"{type(exc).__name__}: {what}{_where(exc)}"
        ) from exc
    try:
        target: Any = getattr(module, attr)
    except AttributeError as exc:
        raise AppError(
            f"--app {spec!r}: module {module_name!r} ({module.__file__}) has no {attr!r}"
        ) from exc
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


def _is_part_of(missing: str, module_name: str) -> bool:
    """Whether the module not found is ``module_name`` or one of its packages (rather
    than something the app itself imports)."""
    return module_name == missing or module_name.startswith(f"{missing}.")


def _where(exc: BaseException) -> str:
    """`` (at FILE:LINE)``: where the app's code raised, innermost frame first."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f" (at {exc.filename}:{exc.lineno})"
    frames = [
        frame
        for frame in traceback.extract_tb(exc.__traceback__)
        if "importlib" not in frame.filename
    ]
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""
