"""Errors across the wire: :class:`~flext_mesh.errors.MeshError` <-> gRPC status.

Servers: :func:`abort` (or the :func:`rpc_errors` decorator on servicer methods) sends
the error's code, message and ``google.rpc`` details (BadRequest field violations,
RetryInfo). Clients: :func:`from_rpc_error` turns a ``grpc.RpcError`` back into the
same class (``raise from_rpc_error(exc) from exc``). Details are packed and read by
grpcio-status (``grpc_status.rpc_status``).
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NoReturn, TypeVar

import grpc
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from flext_mesh.errors import (
    FieldViolation,
    InfrastructureError,
    InternalError,
    InvalidArgument,
    MeshError,
    ResourceExhausted,
    StatusError,
    error_for_code,
)
from flext_mesh.logs import log_failure

__all__ = [
    "MAX_STATUS_MESSAGE_BYTES",
    "MAX_VIOLATION_BYTES",
    "abort",
    "from_rpc_error",
    "rpc_errors",
    "to_rpc_status",
]

_log = logging.getLogger("flext_mesh.rpc.status")

# A status travels as trailing metadata, which gRPC clients refuse past 16 KiB (a
# client then sees RESOURCE_EXHAUSTED instead of the real status) and may refuse past
# 8 KiB: whatever the request held, a status is cut to fit well within that.
#: Longest status message sent, UTF-8 bytes; a longer one ends in an ellipsis.
MAX_STATUS_MESSAGE_BYTES = 1024
#: Field violations sent at most, UTF-8 bytes of their paths and descriptions; the
#: rest are counted in one last violation.
MAX_VIOLATION_BYTES = 2048
_MAX_PATH_BYTES = 200
_MAX_DESCRIPTION_BYTES = 400


def _clip(text: str, limit: int) -> str:
    """``text`` within ``limit`` UTF-8 bytes, ending in an ellipsis when cut."""
    data = text.encode()
    if len(data) <= limit:
        return text
    return data[: limit - 3].decode(errors="ignore") + "…"


def _fitting(violations: Sequence[FieldViolation]) -> list[FieldViolation]:
    """The violations a status carries: the first ones, up to MAX_VIOLATION_BYTES."""
    out: list[FieldViolation] = []
    room = MAX_VIOLATION_BYTES
    for i, v in enumerate(violations):
        path = _clip(v.field, _MAX_PATH_BYTES)
        description = _clip(v.description, _MAX_DESCRIPTION_BYTES)
        size = len(path.encode()) + len(description.encode())
        if size > room:
            left = len(violations) - i
            out.append(FieldViolation(path, f"and {left} more violations, not listed"))
            break
        out.append(FieldViolation(path, description))
        room -= size
    return out


def to_rpc_status(error: MeshError) -> status_pb2.Status:
    """The ``google.rpc.Status`` for an error, with BadRequest or RetryInfo details,
    cut to a size every gRPC client accepts."""
    status = status_pb2.Status(
        code=error.code.value[0], message=_clip(error.message, MAX_STATUS_MESSAGE_BYTES)
    )
    if isinstance(error, InvalidArgument) and error.violations:
        detail = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(
                    field=v.field, description=v.description
                )
                for v in _fitting(error.violations)
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
        trailing.extend(rpc_status.to_status(status).trailing_metadata)
    await context.abort(error.code, status.message, trailing_metadata=tuple(trailing))
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
    if not callable(getattr(exc, "trailing_metadata", None)):
        return []
    try:
        status = rpc_status.from_call(exc)
    except ValueError:  # details that contradict the status: ignore them
        return []
    return list(status.details) if status is not None else []


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
            except Exception as exc:
                log_failure(_log, f"unexpected error in {name}", exc)
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
        except Exception as exc:
            log_failure(_log, f"unexpected error in {name}", exc)
            await abort(context, InternalError(f"internal error in {name}"))

    return unary_wrapper  # type: ignore[return-value]
