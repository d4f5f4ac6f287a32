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

Servers raise these from domain code; :func:`to_rpc_status` and :func:`abort` turn them
into statuses (validation errors carry ``google.rpc.BadRequest`` details). Clients turn
``grpc.RpcError`` back into the same classes with :func:`from_rpc_error`.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2

if TYPE_CHECKING:
    from flext_mesh.result import FlextResult

__all__ = [
    "INFRASTRUCTURE_CODES",
    "AlreadyExists",
    "Cancelled",
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
    "abort",
    "error_for_code",
    "from_result",
    "from_rpc_error",
    "is_infrastructure",
    "rpc_errors",
    "to_rpc_status",
]

_log = logging.getLogger("flext_mesh.errors")

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
            message = "; ".join(f"{v.field}: {v.description}" for v in self.violations)
        super().__init__(message)

    @classmethod
    def from_violations(cls, violations: Sequence[FieldViolation]) -> InvalidArgument:
        """Build the error whose message lists every violation."""
        text = "; ".join(f"{v.field}: {v.description}" for v in violations)
        return cls(f"invalid request: {text}", violations)


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
    """Turn a failed FlextResult into the error of its code, keeping field violations."""
    message = result.error or "operation failed"
    cls = error_for_code(result.code or "FAILED_PRECONDITION")
    if cls is InvalidArgument:
        return InvalidArgument(
            message, [FieldViolation(f, d) for f, d in (result.field_violations or ())]
        )
    return cls(message)


def to_rpc_status(error: MeshError) -> status_pb2.Status:
    """The ``google.rpc.Status`` for an error, with BadRequest or RetryInfo details."""
    status = status_pb2.Status(code=error.code.value[0], message=error.message)
    if isinstance(error, InvalidArgument) and error.violations:
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in error.violations
            ]
        )
        status.details.add().Pack(detail)
    if isinstance(error, ResourceExhausted) and error.retry_after is not None:
        info = error_details_pb2.RetryInfo()
        info.retry_delay.FromNanoseconds(int(error.retry_after * 1e9))
        status.details.add().Pack(info)
    return status


async def abort(
    context: grpc.aio.ServicerContext[Any, Any],
    error: MeshError,
    *,
    trailing_metadata: Sequence[tuple[str, str | bytes]] = (),
) -> NoReturn:
    """Abort the RPC with the status of ``error``, its details, and ``trailing_metadata``.

    The ``google.rpc.Status`` details travel as ``grpc-status-details-bin`` in the
    trailing metadata (what ``abort_with_status`` does, without replacing other keys).
    """
    status = to_rpc_status(error)
    trailing = list(trailing_metadata)
    if status.details:
        trailing.append(("grpc-status-details-bin", status.SerializeToString()))
    await context.abort(error.code, error.message, trailing_metadata=tuple(trailing))
    raise AssertionError("unreachable: context.abort raises")  # pragma: no cover


def from_rpc_error(exc: grpc.RpcError) -> MeshError:
    """Map a client-side ``grpc.RpcError`` back to the error tree (``raise ... from exc``)."""
    # Sync calls raise grpc.Call subclasses; grpc.aio raises AioRpcError, which is not
    # one but has the same methods.
    code_of = getattr(exc, "code", None)
    code = code_of() if callable(code_of) else grpc.StatusCode.UNKNOWN
    details_of = getattr(exc, "details", None)
    message = (details_of() if callable(details_of) else None) or str(code.name)
    cls = error_for_code(code)
    if cls is InvalidArgument:
        return InvalidArgument(message, _field_violations(exc))
    if cls is ResourceExhausted:
        return ResourceExhausted(message, _retry_after(exc))
    if cls is MeshError and code is grpc.StatusCode.UNKNOWN:
        return InfrastructureError(message)
    if cls is MeshError:
        return StatusError(message, code)
    return cls(message)


def _status_details(exc: grpc.RpcError) -> list[Any]:
    trailing_of = getattr(exc, "trailing_metadata", None)
    trailing: Any = trailing_of() if callable(trailing_of) else None
    for key, value in trailing or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            return list(status.details)
    return []


def _field_violations(exc: grpc.RpcError) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    for any_detail in _status_details(exc):
        if any_detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            any_detail.Unpack(bad)
            out.extend(FieldViolation(v.field, v.description) for v in bad.field_violations)
    return out


def _retry_after(exc: grpc.RpcError) -> float | None:
    for any_detail in _status_details(exc):
        if any_detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            any_detail.Unpack(info)
            return float(info.retry_delay.ToNanoseconds()) / 1e9
    return None


_Handler = TypeVar("_Handler", bound=Callable[..., Any])


def rpc_errors(method: _Handler) -> _Handler:
    """Decorate a servicer method: MeshError aborts with its status; anything else INTERNAL.

    Works for unary handlers (coroutines) and server-streaming handlers (async
    generators). Unexpected exceptions are logged with their traceback once, and the
    client sees INTERNAL without internals leaking.
    """
    name = method.__qualname__

    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        async def stream_wrapper(self: Any, request: Any, context: Any) -> AsyncIterator[Any]:
            try:
                async for item in method(self, request, context):
                    yield item
            except MeshError as err:
                await abort(context, err)
            except grpc.aio.AbortError:
                raise
            except Exception:
                _log.exception("unexpected error in %s", name)
                await abort(context, InternalError(f"internal error in {name}"))

        return stream_wrapper  # type: ignore[return-value]

    @functools.wraps(method)
    async def unary_wrapper(self: Any, request: Any, context: Any) -> Any:
        try:
            return await method(self, request, context)
        except MeshError as err:
            await abort(context, err)
        except grpc.aio.AbortError:
            raise
        except Exception:
            _log.exception("unexpected error in %s", name)
            await abort(context, InternalError(f"internal error in {name}"))

    return unary_wrapper  # type: ignore[return-value]
