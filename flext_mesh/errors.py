"""One error tree for the whole mesh, mapped to gRPC status codes in one place.

::

    MeshError                      UNKNOWN
    ├── InvalidArgument            INVALID_ARGUMENT  (with field violations)
    ├── NotFound                   NOT_FOUND
    ├── AlreadyExists              ALREADY_EXISTS
    ├── FailedPrecondition         FAILED_PRECONDITION
    ├── PermissionDenied           PERMISSION_DENIED
    ├── Unauthenticated            UNAUTHENTICATED
    ├── Cancelled                  CANCELLED
    ├── Unimplemented              UNIMPLEMENTED
    ├── ResourceExhausted          RESOURCE_EXHAUSTED (transient)
    ├── StatusError                any other code, kept as is (ABORTED, OUT_OF_RANGE, ...)
    └── InfrastructureError        transient faults: retried, trip breakers
        ├── Unavailable            UNAVAILABLE
        │   └── StoreUnavailable   UNAVAILABLE (a store read or write failed)
        ├── DeadlineExceeded       DEADLINE_EXCEEDED
        └── InternalError          INTERNAL

Servers raise these from domain code; :mod:`flext_mesh.rpc.status` turns them into
statuses (validation errors carry ``google.rpc.BadRequest`` details, through
grpcio-status) and client-side ``grpc.RpcError`` back into the same classes. A
``ServiceProcessor`` that raises one (its own, or one a nested mesh call raised) fails
with it as a ``FlextResult`` (:meth:`MeshError.to_result`), and the mesh answers its
status: a business rejection stays one, hop after hop.

What stops a process from starting (a flag, a file, an address, the store or the app
to host) is a :class:`ConfigError`: never sent over an RPC, reported in one line by
the process that hit it::

    ConfigError
    ├── StoreOpenError        (flext_mesh.store.base)   the store cannot be opened
    ├── TransportError        (flext_mesh.rpc.channels) TLS files, addresses of a channel
    ├── AddressError          (flext_mesh.addresses)    an address list
    ├── TokensFileError       (flext_mesh.security.tokens)
    ├── SecurityConfigError   (flext_mesh.security.auth)
    ├── ServeError            (flext_mesh.server)       the control plane cannot start
    ├── CertsError            (flext_mesh.cli.certs)
    ├── SidecarError          (sidecar.main)            the sidecar cannot start
    └── AppError              (sidecar.app)             the app module cannot be loaded

Standing alone, on purpose: ``UnwrapError`` (the library's, a ValueError as the guide
has it: a programming error, never an RPC), ``UnresolvedReference`` (a workflow
reference, reported as InvalidArgument by the definition checks), the store's
``Compacted`` and ``SubscriptionLagged`` (signals to a watcher that it must reload,
answered in the domain), and private control-flow exceptions inside one module.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import grpc

from flext_mesh.result import FlextResult

__all__ = [
    "INFRASTRUCTURE_CODES",
    "AlreadyExists",
    "Cancelled",
    "ConfigError",
    "DeadlineExceeded",
    "FailedPrecondition",
    "FieldViolation",
    "InfrastructureError",
    "InternalError",
    "InvalidArgument",
    "MeshError",
    "NotFound",
    "PermissionDenied",
    "ResourceExhausted",
    "StatusError",
    "StoreUnavailable",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "error_for_code",
    "from_result",
    "is_infrastructure",
]

#: Codes that mean the infrastructure failed, not the business: retried by clients,
#: counted by circuit breakers and outlier ejection.
INFRASTRUCTURE_CODES: frozenset[grpc.StatusCode] = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.UNKNOWN,
    }
)


def is_infrastructure(code: grpc.StatusCode) -> bool:
    """Tell whether a status code is an infrastructure fault (see the module docstring)."""
    return code in INFRASTRUCTURE_CODES


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One bad field of a request: its path (``instance.endpoint``) and what is wrong."""

    field: str
    description: str


class MeshError(Exception):
    """Root of every flext-mesh error; ``grpc_status_code`` says how it travels."""

    grpc_status_code: ClassVar[grpc.StatusCode] = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def code(self) -> grpc.StatusCode:
        """The gRPC status code of this error."""
        return self.grpc_status_code

    def to_result(self) -> FlextResult[Any]:
        """This error as a failed FlextResult: its code, message, field violations and
        retry delay, so that a processor can return a nested call's error unchanged."""
        return FlextResult.fail(
            self.message,
            code=self.code.name,
            field_violations=getattr(self, "violations", None),
            retry_after=getattr(self, "retry_after", None),
        )


class StatusError(MeshError):
    """A status with no class of its own in the tree (ABORTED, OUT_OF_RANGE, DATA_LOSS,
    ...): it keeps its precise code, so callers can still tell one from another."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self._code = code

    @property
    def code(self) -> grpc.StatusCode:
        """The status code as received or chosen."""
        return self._code


class InvalidArgument(MeshError):
    """The request is malformed; ``violations`` names each bad field."""

    grpc_status_code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, violations: Iterable[FieldViolation] = ()) -> None:
        self.violations: tuple[FieldViolation, ...] = tuple(violations)
        if self.violations and message == "":
            message = _listed(self.violations)
        super().__init__(message)

    @classmethod
    def from_violations(cls, violations: Sequence[FieldViolation]) -> InvalidArgument:
        """Build the error whose message lists the violations (the first ones of many)."""
        return cls(f"invalid request: {_listed(violations)}", violations)


#: Violations a message spells out; the status keeps all (cut to fit when sent).
_MESSAGE_VIOLATIONS = 20


def _listed(violations: Sequence[FieldViolation]) -> str:
    """``field: description; ...`` of the first violations, and how many more there are:
    a request with thousands of bad fields must not cost a message of all of them."""
    text = "; ".join(f"{v.field}: {v.description}" for v in violations[:_MESSAGE_VIOLATIONS])
    more = len(violations) - _MESSAGE_VIOLATIONS
    return f"{text}; and {more} more" if more > 0 else text


class NotFound(MeshError):
    """The named thing does not exist."""

    grpc_status_code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MeshError):
    """The thing to create exists already."""

    grpc_status_code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MeshError):
    """The system is not in a state that allows the request (a business rejection)."""

    grpc_status_code = grpc.StatusCode.FAILED_PRECONDITION


class PermissionDenied(MeshError):
    """The caller is known but not allowed to do this."""

    grpc_status_code = grpc.StatusCode.PERMISSION_DENIED


class Unauthenticated(MeshError):
    """The caller did not prove who it is."""

    grpc_status_code = grpc.StatusCode.UNAUTHENTICATED


class Cancelled(MeshError):
    """The caller cancelled the operation."""

    grpc_status_code = grpc.StatusCode.CANCELLED


class Unimplemented(MeshError):
    """The RPC or feature is not available in this version."""

    grpc_status_code = grpc.StatusCode.UNIMPLEMENTED


class ResourceExhausted(MeshError):
    """A limit was reached; ``retry_after`` (seconds) tells when to try again."""

    grpc_status_code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class InfrastructureError(MeshError):
    """A transient fault of the infrastructure: worth retrying elsewhere or later."""

    grpc_status_code = grpc.StatusCode.UNKNOWN


class Unavailable(InfrastructureError):
    """The service cannot answer now."""

    grpc_status_code = grpc.StatusCode.UNAVAILABLE


class StoreUnavailable(Unavailable):
    """The store failed to read or write (disk full, I/O error, lost connection)."""


class DeadlineExceeded(InfrastructureError):
    """The deadline passed before the work finished."""

    grpc_status_code = grpc.StatusCode.DEADLINE_EXCEEDED


class InternalError(InfrastructureError):
    """A bug or an invariant broken on the server side."""

    grpc_status_code = grpc.StatusCode.INTERNAL


_BY_CODE: dict[grpc.StatusCode, type[MeshError]] = {
    cls.grpc_status_code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        AlreadyExists,
        FailedPrecondition,
        PermissionDenied,
        Unauthenticated,
        Cancelled,
        Unimplemented,
        ResourceExhausted,
        Unavailable,
        DeadlineExceeded,
        InternalError,
    )
}
_BY_NAME: dict[str, grpc.StatusCode] = {code.name: code for code in grpc.StatusCode}


def error_for_code(code: grpc.StatusCode | str) -> type[MeshError]:
    """The error class for a status code (or its name); MeshError for the rest."""
    if isinstance(code, str):
        found = _BY_NAME.get(code.upper())
        if found is None:
            return MeshError
        code = found
    return _BY_CODE.get(code, MeshError)


def from_result(result: FlextResult[Any]) -> MeshError:
    """Turn a failed FlextResult into the error of its code, keeping field violations
    and the retry delay (a code with no class of its own is a StatusError)."""
    message = result.error or "operation failed"
    name = result.code or "FAILED_PRECONDITION"
    cls = error_for_code(name)
    if cls is InvalidArgument:
        return InvalidArgument(
            message, [FieldViolation(f, d) for f, d in (result.field_violations or ())]
        )
    if cls is ResourceExhausted:
        return ResourceExhausted(message, result.retry_after)
    if cls is MeshError:
        return StatusError(message, _BY_NAME.get(name.upper(), grpc.StatusCode.UNKNOWN))
    return cls(message)


class ConfigError(Exception):
    """A setting, file, address or dependency that stops a process from starting; the
    message names it and says what to do. Never crosses an RPC."""
