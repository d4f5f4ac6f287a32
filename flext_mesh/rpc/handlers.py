"""Registering servicers from their service descriptor.

Like the generated ``add_XServicer_to_server``, but methods named in ``raw_responses``
may return already-serialized bytes (pre-built answers on hot paths), and the table
is derived from the contract, so it cannot fall out of step with it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import DecodeError
from google.protobuf.message_factory import GetMessageClass

from flext_mesh.errors import InvalidArgument, Unavailable
from flext_mesh.rpc.status import abort

__all__ = ["LongStreams", "Undecodable", "WrappingInterceptor", "add_servicer", "checked"]

_M = TypeVar("_M")

_FACTORIES: dict[tuple[bool, bool], Callable[..., grpc.RpcMethodHandler[Any, Any]]] = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


def _bytes_or_message(response: Any) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


class Undecodable:
    """A request protobuf could not decode (e.g. a Struct nested past its depth limit).

    gRPC answers UNKNOWN when a deserializer raises, before any servicer code runs; the
    deserializers installed by :func:`add_servicer` return this instead, and the
    handler answers INVALID_ARGUMENT. Client-streaming servicers check for it with
    :func:`checked`.
    """

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def error(self) -> InvalidArgument:
        """The error to answer with."""
        return InvalidArgument(f"the request could not be decoded: {self.reason}")


def checked(request: _M | Undecodable) -> _M:
    """``request``, or raise INVALID_ARGUMENT when it could not be decoded."""
    if isinstance(request, Undecodable):
        raise request.error()
    return request


def _decoder(request_class: Any) -> Callable[[bytes], Any]:
    from_string = request_class.FromString

    def decode(data: bytes) -> Any:
        try:
            return from_string(data)
        except DecodeError as exc:
            return Undecodable(str(exc) or "malformed message")

    return decode


def _guard(behavior: Callable[..., Any], streaming_response: bool) -> Callable[..., Any]:
    """Answer INVALID_ARGUMENT for an undecodable unary request before the servicer."""
    if streaming_response:

        async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
            if isinstance(request, Undecodable):
                await abort(context, request.error())
            async for item in behavior(request, context):
                yield item

        return stream

    async def unary(request: Any, context: Any) -> Any:
        if isinstance(request, Undecodable):
            await abort(context, request.error())
        return await behavior(request, context)

    return unary


def add_servicer(
    server: grpc.aio.Server,
    servicer: object,
    service: ServiceDescriptor,
    *,
    raw_responses: Collection[str] = (),
) -> None:
    """Serve every RPC of ``service`` with the servicer's method of the same name.

    A request that protobuf cannot decode is answered INVALID_ARGUMENT, not UNKNOWN.
    """
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
    for method in service.methods:
        request_class = GetMessageClass(method.input_type)
        response_class = GetMessageClass(method.output_type)
        factory = _FACTORIES[(method.client_streaming, method.server_streaming)]
        behavior = getattr(servicer, method.name)
        if not method.client_streaming:
            behavior = _guard(behavior, method.server_streaming)
        handlers[method.name] = factory(
            behavior,
            request_deserializer=_decoder(request_class),
            response_serializer=(
                _bytes_or_message
                if method.name in raw_responses
                else response_class.SerializeToString
            ),
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(service.full_name, handlers),)
    )
    server.add_registered_method_handlers(service.full_name, handlers)


class LongStreams:
    """Handler tasks of streams that never end by themselves (KeepAlive, StreamCalls).

    A graceful stop lets RPCs in flight finish within the grace period; these streams
    would hold it up to its end. ``close_all()`` cancels them first, and each ends with
    UNAVAILABLE ("the control plane is stopping"): their clients see the stream end and
    reconnect to another replica, or to this one once restarted. (A handler that ends
    cancelled sends no status: its client would wait on the stream, and the server's
    drain on the client, until the grace period ran out.)
    """

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Mark the running handler as a long stream for the duration of the block."""
        task = asyncio.current_task()
        if task is None:  # pragma: no cover - handlers always run in a task
            yield
            return
        self._tasks.add(task)
        try:
            yield
        except asyncio.CancelledError:
            if not self._closing or task.cancelling() == 0:
                raise
            task.uncancel()
            raise Unavailable("the control plane is stopping; connect again") from None
        finally:
            self._tasks.discard(task)

    def __len__(self) -> int:
        return len(self._tasks)

    def close_all(self) -> None:
        """End every tracked stream with UNAVAILABLE (and refuse none later: a stream
        opened after this is the next server's to end)."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()


#: Most methods whose wrapped handler a WrappingInterceptor keeps.
_MAX_CACHED_METHODS = 4096


class WrappingInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that wraps each method's handler once (``_wrap``) and then
    hands out the wrapped one, so the per-call cost is a dict lookup.

    Generic handlers may build a new handler object per call; one that behaves the same
    (same behaviours and serializers) reuses the cached wrapping.
    """

    def __init__(self) -> None:
        # method -> (handler returned by the continuation, the wrapped handler)
        self._cache: dict[
            str, tuple[grpc.RpcMethodHandler[Any, Any], grpc.RpcMethodHandler[Any, Any]]
        ] = {}

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        """The method's handler, wrapped (once per method)."""
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        cached = self._cache.get(method)
        if cached is not None and (cached[0] is handler or _same_handler(cached[0], handler)):
            return cached[1]
        wrapped = self._wrap(method, handler)
        if cached is not None or len(self._cache) < _MAX_CACHED_METHODS:
            self._cache[method] = (handler, wrapped)
        return wrapped

    def _wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        """The handler to serve ``method`` with instead of ``handler``."""
        raise NotImplementedError


def _same_handler(a: grpc.RpcMethodHandler[Any, Any], b: grpc.RpcMethodHandler[Any, Any]) -> bool:
    """Whether two handlers (e.g. rebuilt per call by a generic handler) behave the same."""
    return (
        a.unary_unary == b.unary_unary
        and a.unary_stream == b.unary_stream
        and a.stream_unary == b.stream_unary
        and a.stream_stream == b.stream_stream
        and a.request_deserializer == b.request_deserializer
        and a.response_serializer == b.response_serializer
    )
