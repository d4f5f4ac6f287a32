"""flext-mesh: a gRPC service-mesh control plane, and the Template Method library.

The library part is what service code imports::

    from flext_mesh import FlextResult, ServiceProcessor

and the guide's API, backed by a running control plane::

    from flext_mesh import FlextServices, FlextResult

``FlextResult`` is a railway-oriented result; ``ServiceProcessor`` is the Template
Method base whose subclasses write only ``process()`` and ``build()``. Errors of the
mesh form one tree rooted at ``MeshError`` (see :mod:`flext_mesh.errors`).
"""

from __future__ import annotations

import typing as _typing

from flext_mesh.errors import (
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InfrastructureError,
    InternalError,
    InvalidArgument,
    MeshError,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
)
from flext_mesh.processor import (
    MetricsSink,
    RunRecord,
    RunRecorder,
    ServiceProcessor,
    default_recorder,
    new_correlation_id,
)
from flext_mesh.result import FlextResult, UnwrapError

if _typing.TYPE_CHECKING:
    from flext_mesh.facade.namespace import FlextServices

from flext_mesh.version import __version__


def __getattr__(name: str) -> _typing.Any:
    # FlextServices pulls in gRPC clients and the embedded sidecar: imported on first
    # use, so processors that only need FlextResult and ServiceProcessor stay light.
    if name == "FlextServices":
        from flext_mesh.facade.namespace import FlextServices  # noqa: PLC0415

        return FlextServices
    raise AttributeError(f"module 'flext_mesh' has no attribute {name!r}")


__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "FlextResult",
    "FlextServices",
    "InfrastructureError",
    "InternalError",
    "InvalidArgument",
    "MeshError",
    "MetricsSink",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "RunRecord",
    "RunRecorder",
    "ServiceProcessor",
    "Unauthenticated",
    "Unavailable",
    "UnwrapError",
    "__version__",
    "default_recorder",
    "new_correlation_id",
]
