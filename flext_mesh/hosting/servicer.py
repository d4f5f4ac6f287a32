"""ProcessorService: runs the ServiceProcessors hosted by this process.

The control plane hosts none of its own (it lists an empty set); the sidecar hosts the
app's processors through the same servicer. The domain half (request models, payload
and result conversion, the idempotency cache) is `flext_mesh.hosting.operations`; this module adds
status codes, deadlines, threads, draining and call reporting.

One Invoke:

1. UNAVAILABLE while draining, NOT_FOUND for an unknown operation (known ones listed).
2. Correlation id: the request's, else metadata `x-correlation-id`, else generated; it
   is answered in the response and in trailing metadata `x-correlation-id`, and set in
   `flext_mesh.logs.correlation_id` while the call runs. The call's context (that id,
   the deadline, the W3C `traceparent` / `tracestate` headers) is made current with
   `flext_mesh.rpc.context.serving` while the processor runs, in the tasks it starts
   and in the pool thread of a sync processor: the mesh calls it makes carry it on.
   The processor reads the id as `self.correlation_id`.
3. The payload is validated against the operation's request model (INVALID_ARGUMENT
   with `google.rpc.BadRequest` field violations) and the processor runs: a sync
   `process` in this servicer's bounded thread pool, an async one on the loop.
4. The gRPC deadline bounds the run: past it the call answers DEADLINE_EXCEEDED. A sync
   processor cannot be stopped inside its thread; it runs to its end and its result
   is discarded (it holds a pool thread until then).
5. A `FlextResult` failure answers the status of its code with its message and
   details (field violations, retry delay); so does a `MeshError` raised in the
   processor, a nested mesh call's included (a rejection three hops away reaches the
   first caller as itself, and the outcome hook counts it as what it is). Any other
   exception answers INTERNAL naming only the exception's type.
6. With an idempotency key, the first successful response of (operation, key) is
   replayed for `idempotency_window` seconds (`replayed=true`, the first call's
   correlation id and duration); a duplicate of a call still running waits for it;
   failures are not remembered, so a retry runs again. A draining instance still
   answers keys it has (done or running). `lookup_only` reports a key's outcome
   without ever running the operation (NOT_FOUND when there is no record): how the
   orchestrator settles a step attempt whose answer it lost.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc
from google.protobuf import struct_pb2

from flext_mesh import logs
from flext_mesh.errors import (
    DeadlineExceeded,
    FieldViolation,
    InternalError,
    InvalidArgument,
    MeshError,
    NotFound,
    Unavailable,
    from_result,
)
from flext_mesh.hosting.operations import (
    DEFAULT_IDEMPOTENCY_MAX_KEYS,
    DEFAULT_IDEMPOTENCY_WINDOW,
    IdempotencyCache,
    Operation,
)
from flext_mesh.processor import ServiceProcessor, new_correlation_id
from flext_mesh.result import FlextResult
from flext_mesh.rpc.context import TRACEPARENT_HEADER, TRACESTATE_HEADER, CallContext, serving
from flext_mesh.rpc.handlers import add_servicer
from flext_mesh.rpc.metadata import (
    CORRELATION_ID_HEADER,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    correlation_id_problem,
)
from flext_mesh.rpc.payloads import dict_to_struct, struct_to_dict
from flext_mesh.rpc.status import abort, rpc_errors
from flext_mesh.v1 import processor_pb2, processor_pb2_grpc

__all__ = ["CallOutcome", "ProcessorServicer", "add_processor_servicer"]

_log = logging.getLogger("flext_mesh.hosting.servicer")

_Context = grpc.aio.ServicerContext[Any, Any]
_T = TypeVar("_T")

_OK = grpc.StatusCode.OK


@dataclass(frozen=True, slots=True, kw_only=True)
class CallOutcome:
    """How one Invoke ended, handed to the servicer's `on_call` hook."""

    operation: str
    """The operation name as requested (possibly unknown)."""
    duration_ms: float
    """Wall time of the whole Invoke in this servicer, in milliseconds."""
    success: bool
    """True when the call answered OK (a replay included)."""
    code: int
    """Numeric gRPC status code the call answered (0 for OK)."""
    correlation_id: str
    """Correlation id of the call (the caller's or the generated one)."""
    replayed: bool = False
    """True when the answer came from the idempotency cache without running."""


def _inbound_headers(context: _Context) -> tuple[str, str, str]:
    """The correlation id, `traceparent` and `tracestate` headers of a call ("" if absent)."""
    cid = traceparent = tracestate = ""
    for key, value in context.invocation_metadata() or ():
        if not isinstance(value, str):
            continue
        if key == CORRELATION_ID_HEADER:
            cid = cid or value
        elif key == TRACEPARENT_HEADER:
            traceparent = traceparent or value
        elif key == TRACESTATE_HEADER:
            tracestate = tracestate or value
    return cid, traceparent, tracestate


def _call_context(context: _Context, cid: str, traceparent: str, tracestate: str) -> CallContext:
    """The context the mesh calls made while serving this call carry on."""
    remaining: float | None = context.time_remaining()
    return CallContext(
        correlation_id=cid,
        deadline=None if remaining is None else time.monotonic() + remaining,
        traceparent=traceparent,
        tracestate=tracestate,
    )


def _deadline_passed(context: _Context) -> bool:
    remaining: float | None = context.time_remaining()
    return remaining is not None and remaining <= 0


def _run_blocking(
    operation: Operation, payload: struct_pb2.Struct, correlation_id: str
) -> FlextResult[struct_pb2.Struct]:
    """The whole sync path, run in a pool thread: Struct in, Struct out."""
    result = operation.run(struct_to_dict(payload), correlation_id=correlation_id)
    return result.map(dict_to_struct)


class ProcessorServicer(processor_pb2_grpc.ProcessorServiceServicer):
    """Serves Invoke and ListOperations for a fixed mapping of operation name to processor.

    Control methods for the host process: `drain()` (answer UNAVAILABLE from now on),
    `wait_idle(timeout)` (wait for in-flight calls) and `close()` (stop the threads).
    """

    def __init__(
        self,
        operations: Mapping[str, ServiceProcessor[Any, Any, Any]],
        *,
        service_name: str,
        instance_id: str = "",
        version: str = "",
        on_call: Callable[[CallOutcome], None] | None = None,
        on_lost_answer: Callable[[str, str, processor_pb2.InvokeResponse], None] | None = None,
        idempotency_window: float = DEFAULT_IDEMPOTENCY_WINDOW,
        idempotency_max_keys: int = DEFAULT_IDEMPOTENCY_MAX_KEYS,
        max_workers: int | None = None,
    ) -> None:
        """Serve `operations` under `service_name`.

        `on_call` runs on the event loop after every Invoke (keep it cheap; its
        exceptions are logged, once). `on_lost_answer(operation, key, response)` runs
        when a call with an idempotency key succeeds after its caller went away (its
        answer never reached anyone): the hook of shared idempotency, which keeps the
        result where a resend to another instance finds it. `idempotency_window` is in
        seconds and
        `idempotency_max_keys` bounds the keys remembered. `max_workers` bounds the
        threads running sync processors (default: ThreadPoolExecutor's, cpu count + 4,
        at most 32); the pool starts with the first sync call.
        """
        self._operations = {name: Operation.of(name, proc) for name, proc in operations.items()}
        self._service_name = service_name
        self._instance_id = instance_id
        self._version = version
        self._on_call = on_call
        self._on_call_failed = False
        self._on_lost_answer = on_lost_answer
        self._cache: IdempotencyCache[processor_pb2.InvokeResponse] = IdempotencyCache(
            window=idempotency_window, max_keys=idempotency_max_keys
        )
        self._max_workers = max_workers or min(32, (os.cpu_count() or 1) + 4)
        self._executor: ThreadPoolExecutor | None = None
        self._draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._operations_response = processor_pb2.ListOperationsResponse(
            operations=[
                processor_pb2.OperationInfo(
                    name=name,
                    description=op.description,
                    request_schema=dict_to_struct(op.request_schema),
                )
                for name, op in sorted(self._operations.items())
            ],
            service_name=service_name,
            instance_id=instance_id,
            version=version,
        )

    # -- control -----------------------------------------------------------------------

    @property
    def draining(self) -> bool:
        """True once `drain()` or `close()` was called."""
        return self._draining

    @property
    def in_flight(self) -> int:
        """Invoke calls accepted and not yet answered."""
        return self._in_flight

    def drain(self) -> None:
        """Answer every new Invoke with UNAVAILABLE ("draining"); calls in flight go on."""
        self._draining = True

    # The sidecar's SIGTERM drain has one grace period to share; a timeout argument
    # reads better there than wrapping every call in asyncio.timeout.
    async def wait_idle(self, timeout: float | None = None) -> bool:  # noqa: ASYNC109
        """Wait until no Invoke is in flight; False if `timeout` seconds passed first."""
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
                # Work whose caller went away still runs to completion (idempotency).
                await self._cache.wait_idle()
        except TimeoutError:
            return self._in_flight == 0 and self._cache.running == 0
        return True

    def close(self) -> None:
        """Drain and stop the thread pool (threads still running finish on their own)."""
        self._draining = True
        self._cache.cancel_all()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    # -- RPCs --------------------------------------------------------------------------

    @rpc_errors
    async def Invoke(
        self, request: processor_pb2.InvokeRequest, context: _Context
    ) -> processor_pb2.InvokeResponse:
        """Run one operation (see processor.proto and this module's docstring)."""
        started = time.perf_counter_ns()
        header_cid, traceparent, tracestate = _inbound_headers(context)
        given = request.correlation_id or header_cid
        problem = correlation_id_problem(given)
        # A bad id is refused, but the answer still needs one it can carry as metadata.
        cid = new_correlation_id() if problem or not given else given
        context.set_trailing_metadata(((CORRELATION_ID_HEADER, cid),))
        token = logs.correlation_id.set(cid)
        replayed = False

        def report(code: grpc.StatusCode) -> None:
            # Reported before the answer leaves, so a caller that saw the answer
            # can count on the hook having run.
            self._report(
                CallOutcome(
                    operation=request.operation,
                    duration_ms=(time.perf_counter_ns() - started) / 1e6,
                    success=code is _OK,
                    code=code.value[0],
                    correlation_id=cid,
                    replayed=replayed,
                )
            )

        try:
            if problem:
                raise InvalidArgument("", [FieldViolation("correlation_id", problem)])
            with serving(_call_context(context, cid, traceparent, tracestate)):
                response, replayed = await self._invoke(request, context, cid)
            report(_OK)
            return response
        except MeshError as err:
            report(err.code)
            await abort(context, err, trailing_metadata=((CORRELATION_ID_HEADER, cid),))
        except asyncio.CancelledError:
            report(
                grpc.StatusCode.DEADLINE_EXCEEDED
                if _deadline_passed(context)
                else grpc.StatusCode.CANCELLED
            )
            raise
        except grpc.aio.AbortError:
            report(grpc.StatusCode.UNKNOWN)
            raise
        except Exception:
            _log.exception("unexpected error invoking %r", request.operation)
            report(grpc.StatusCode.INTERNAL)
            await abort(
                context,
                InternalError("internal error in Invoke"),
                trailing_metadata=((CORRELATION_ID_HEADER, cid),),
            )
        finally:
            logs.correlation_id.reset(token)

    @rpc_errors
    async def ListOperations(
        self, request: processor_pb2.ListOperationsRequest, context: _Context
    ) -> processor_pb2.ListOperationsResponse:
        """List the operations served, sorted by name, with their request schemas."""
        return self._operations_response

    # -- internals ---------------------------------------------------------------------

    async def _invoke(
        self, request: processor_pb2.InvokeRequest, context: _Context, cid: str
    ) -> tuple[processor_pb2.InvokeResponse, bool]:
        key = request.idempotency_key
        has_key = bool(key) and self._cache.knows((request.operation, key))
        if self._draining and not has_key:
            # A resend of a call this instance has (or runs) is answered from it: the
            # work is done here once, whatever the drain.
            raise Unavailable(
                f"{self._service_name} instance {self._instance_id or '-'} is draining; "
                "call another instance"
            )
        operation = self._operations.get(request.operation)
        if operation is None:
            if not request.operation:
                raise InvalidArgument("", [FieldViolation("operation", "required")])
            known = ", ".join(sorted(self._operations)) or "none"
            raise NotFound(
                f"{self._service_name} has no operation {request.operation!r} (known: {known})"
            )
        if len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
            raise InvalidArgument(
                "",
                [
                    FieldViolation(
                        "idempotency_key",
                        f"at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters, got {len(key)}",
                    )
                ],
            )
        if request.lookup_only and not key:
            raise InvalidArgument(
                "", [FieldViolation("idempotency_key", "required with lookup_only")]
            )
        run = functools.partial(self._run, operation, request.payload, cid)
        self._in_flight += 1
        self._idle.clear()
        try:
            timeout = asyncio.timeout(context.time_remaining())
            try:
                async with timeout:
                    if request.lookup_only:
                        found = await self._cache.outcome((operation.name, key))
                        if found is None:
                            raise NotFound(
                                f"no call of {operation.name!r} with idempotency key {key!r} "
                                f"succeeded or runs on instance {self._instance_id or '-'}"
                            )
                        stored, replayed = found[0], True
                    elif not key:
                        return await run(), False
                    else:
                        stored, replayed = await self._cache.run((operation.name, key), run)
            except TimeoutError:
                if not timeout.expired():
                    raise
                self._answer_lost(operation.name, key, request.lookup_only)
                raise DeadlineExceeded(
                    f"operation {operation.name!r} did not finish before the deadline"
                ) from None
            except asyncio.CancelledError:
                self._answer_lost(operation.name, key, request.lookup_only)
                raise
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()
        if not replayed:
            return stored, False
        replay = processor_pb2.InvokeResponse()
        replay.CopyFrom(stored)
        replay.replayed = True
        return replay, True

    def _answer_lost(self, operation: str, key: str, lookup_only: bool) -> None:
        """The caller left while a keyed call runs on: hand its result, when it comes,
        to `on_lost_answer`."""
        hook = self._on_lost_answer
        if hook is None or not key or lookup_only:
            return
        self._cache.when_done((operation, key), functools.partial(hook, operation, key))

    async def _run(
        self, operation: Operation, payload: struct_pb2.Struct, cid: str
    ) -> processor_pb2.InvokeResponse:
        started = time.perf_counter_ns()
        if operation.is_async:
            result = (await operation.arun(struct_to_dict(payload), correlation_id=cid)).map(
                dict_to_struct
            )
        else:
            result = await self._in_thread(_run_blocking, operation, payload, cid)
        duration_ms = (time.perf_counter_ns() - started) / 1e6
        if result.is_failure:
            raise from_result(result)
        return processor_pb2.InvokeResponse(
            result=result.value,
            correlation_id=cid,
            duration_ms=duration_ms,
            instance_id=self._instance_id,
        )

    async def _in_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run `fn(*args)` in the pool with this task's context (the correlation id and
        the call's context, for the mesh calls a sync processor makes)."""
        if self._executor is None:
            self._executor = ThreadPoolExecutor(
                max_workers=self._max_workers, thread_name_prefix="flext-processor"
            )
        context = contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(context.run, fn, *args))

    def _report(self, outcome: CallOutcome) -> None:
        if self._on_call is None:
            return
        try:
            self._on_call(outcome)
        except Exception:
            if not self._on_call_failed:
                self._on_call_failed = True
                _log.exception("on_call hook raised; its later errors are not logged")


def add_processor_servicer(servicer: ProcessorServicer, server: grpc.aio.Server) -> None:
    """Serve ProcessorService (undecodable requests answered INVALID_ARGUMENT)."""
    add_servicer(server, servicer, processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"])
