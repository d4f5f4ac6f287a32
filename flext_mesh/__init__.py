"""flext-mesh: a gRPC service-mesh control plane, and the Template Method library.

The library part is what service code imports::

    from flext_mesh import FlextResult, ServiceProcessor

``FlextResult`` is a railway-oriented result; ``ServiceProcessor`` is the Template
Method base whose subclasses write only ``process()`` and ``build()``. Errors of the
mesh form one tree rooted at ``MeshError`` (see :mod:`flext_mesh.errors`).
"""

from __future__ import annotations

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

__version__ = "0.1.0"

__all__ = [
    "AlreadyExists",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "FlextResult",
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
