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
   with `google.rpc.BadRequest` field violations) and the processor runs: an async
   `process` on the loop, a sync one in this servicer's bounded thread pool, or, with
   `quick_sync_on_loop` (`flext-sidecar --quick-sync-on-loop`), on the loop once its
   runs are measured quick and never waiting (`flext_mesh.hosting.operations.SyncPlacement`): that
   spares two thread hand-overs per call, about what a small processor's whole run
   costs. A call with an idempotency key always runs a sync processor in the pool.
4. The gRPC deadline bounds the run: past it the call answers DEADLINE_EXCEEDED. A sync
   processor cannot be stopped inside its thread; it runs to its end and its result
   is discarded (it holds a pool thread until then). A run on the loop cannot be cut
   at all: one that outlives its deadline is answered DEADLINE_EXCEEDED when it ends,
   and, being too slow for the loop, sends its operation back to the pool.
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
from typing import Any, TypeVar, cast

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
    RunClock,
    SyncPlacement,
)
from flext_mesh.processor import ServiceProcessor, new_correlation_id
from flext_mesh.result import FlextResult
from flext_mesh.rpc import tracing
from flext_mesh.rpc.context import TRACEPARENT_HEADER, TRACESTATE_HEADER, CallContext, serving
from flext_mesh.rpc.handlers import add_servicer
from flext_mesh.rpc.metadata import (
    CALLER_HEADER,
    CORRELATION_ID_HEADER,
    MAX_IDEMPOTENCY_KEY_LENGTH,
    caller_of,
    correlation_id_problem,
)
from flext_mesh.rpc.payloads import dict_to_struct, fill_struct, struct_to_dict
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
    caller: str = ""
    """The calling service as its ``x-flext-caller`` header names it ("" if none)."""


def _inbound_headers(context: _Context) -> tuple[str, str, str, str]:
    """The correlation id, `traceparent`, `tracestate` and caller headers of a call (""
    if absent)."""
    cid = traceparent = tracestate = caller = ""
    for key, value in context.invocation_metadata() or ():
        if not isinstance(value, str):
            continue
        if key == CORRELATION_ID_HEADER:
            cid = cid or value
        elif key == CALLER_HEADER:
            caller = caller or value
        elif key == TRACEPARENT_HEADER:
            traceparent = traceparent or value
        elif key == TRACESTATE_HEADER:
            tracestate = tracestate or value
    return cid, traceparent, tracestate, caller


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


# CallOutcome's slot setters: an outcome is made for every call (see _outcome).
_OUTCOME_SETTERS = tuple(
    cast("Any", CallOutcome.__dict__[name]).__set__
    for name in (
        "operation",
        "duration_ms",
        "success",
        "code",
        "correlation_id",
        "replayed",
        "caller",
    )
)
_NEW = object.__new__


def _outcome(  # noqa: PLR0917 - CallOutcome's fields, in order, on a hot path
    operation: str,
    duration_ms: float,
    success: bool,
    code: int,
    correlation_id: str,
    replayed: bool,
    caller: str,
) -> CallOutcome:
    """A CallOutcome, its fields set through their slots (half the cost of its frozen
    `__init__`)."""
    outcome = _NEW(CallOutcome)
    (set_operation, set_duration, set_success, set_code, set_cid, set_replayed, set_caller) = (
        _OUTCOME_SETTERS
    )
    set_operation(outcome, operation)
    set_duration(outcome, duration_ms)
    set_success(outcome, success)
    set_code(outcome, code)
    set_cid(outcome, correlation_id)
    set_replayed(outcome, replayed)
    set_caller(outcome, caller_of(caller) if caller else "")
    return outcome


def _response(
    result: FlextResult[Any], correlation_id: str, instance_id: str
) -> processor_pb2.InvokeResponse | FlextResult[Any]:
    """The response holding a successful result's JSON object; a failure as it is."""
    if result.is_failure:
        return result
    response = processor_pb2.InvokeResponse(correlation_id=correlation_id, instance_id=instance_id)
    fill_struct(response.result, result.value)
    return response


def _run_in_pool(
    operation: Operation,
    payload: struct_pb2.Struct,
    correlation_id: str,
    instance_id: str,
    measure: bool,
) -> tuple[processor_pb2.InvokeResponse | FlextResult[Any], tuple[float, float, bool] | None]:
    """The whole sync path, run in a pool thread: Struct in, response (or failure) out,
    with how the run went (`RunClock.stop()`) when `measure`d."""
    clock = RunClock() if measure else None
    result = operation.run(struct_to_dict(payload), correlation_id=correlation_id)
    answer = _response(result, correlation_id, instance_id)
    return answer, None if clock is None else clock.stop()


class _Deadline:
    """`asyncio.timeout` for the one await of an Invoke, at a third of its cost: the
    task is cancelled when the call's deadline passes, and that cancellation leaves the
    block as TimeoutError (a cancellation from elsewhere stays one)."""

    __slots__ = ("_cancelling", "_handle", "_seconds", "_task", "expired")

    def __init__(self, seconds: float | None) -> None:
        self._seconds = seconds
        self._handle: asyncio.TimerHandle | None = None
        self._cancelling = 0
        self.expired = False

    def __enter__(self) -> _Deadline:
        if self._seconds is not None:
            task = asyncio.current_task()
            assert task is not None  # servicer methods run in tasks
            self._task = task
            self._cancelling = task.cancelling()
            self._handle = task.get_loop().call_later(max(0.0, self._seconds), self._expire)
        return self

    def _expire(self) -> None:
        self.expired = True
        self._handle = None
        self._task.cancel()

    def __exit__(self, exc_type: type[BaseException] | None, exc: object, tb: object) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if (
            self.expired
            and self._task.uncancel() <= self._cancelling
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError


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
        quick_sync_on_loop: bool = False,
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
        at most 32); the pool starts with the first sync call. `quick_sync_on_loop`: run
        a sync processor on the event loop once its runs are measured quick (see
        `flext_mesh.hosting.operations.SyncPlacement`; a processor's own `run_on_loop`
        applies either way).
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
        self._quick_sync_on_loop = quick_sync_on_loop
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
        header_cid, traceparent, tracestate, caller = _inbound_headers(context)
        given = request.correlation_id or header_cid
        problem = correlation_id_problem(given)
        # A bad id is refused, but the answer still needs one it can carry as metadata.
        cid = new_correlation_id() if problem or not given else given
        context.set_trailing_metadata(((CORRELATION_ID_HEADER, cid),))
        token = logs.correlation_id.set(cid)
        replayed = False
        traced = (
            tracing.server_span(
                request.operation,
                traceparent,
                tracestate,
                {
                    "flext_mesh.service": self._service_name,
                    "flext_mesh.instance_id": self._instance_id,
                    "flext_mesh.correlation_id": cid,
                },
            )
            if tracing.enabled()
            else None
        )

        def report(code: grpc.StatusCode) -> None:
            nonlocal traced
            if traced is not None:
                tracing.end_span(traced[0], code.value[0], code.name, token=traced[1])
                traced = None
            # Reported before the answer leaves, so a caller that saw the answer
            # can count on the hook having run.
            if self._on_call is not None:
                self._report(
                    _outcome(
                        request.operation,
                        (time.perf_counter_ns() - started) / 1e6,
                        code is _OK,
                        code.value[0],
                        cid,
                        replayed,
                        caller,
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
            if traced is not None:  # left by a path that reported nothing
                tracing.end_span(traced[0], grpc.StatusCode.UNKNOWN.value[0], token=traced[1])
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
        if self._draining and not (key and self._cache.knows((request.operation, key))):
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
        self._in_flight += 1
        self._idle.clear()
        try:
            placement = operation.placement
            if not key and placement is not None and placement.on_loop:
                # Nothing is awaited, so nothing can be cut at the deadline: a run that
                # outlives it is answered as the pool's would be, once it is over.
                started = time.perf_counter_ns()
                response = self._answer(
                    self._run_on_loop(operation, placement, request.payload, cid), started
                )
                if _deadline_passed(context):
                    raise self._deadline_exceeded(operation)
                return response, False
            run = functools.partial(self._run, operation, request.payload, cid)
            deadline = _Deadline(context.time_remaining())
            try:
                with deadline:
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
                if not deadline.expired:
                    raise
                self._answer_lost(operation.name, key, request.lookup_only)
                raise self._deadline_exceeded(operation) from None
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

    @staticmethod
    def _deadline_exceeded(operation: Operation) -> DeadlineExceeded:
        return DeadlineExceeded(f"operation {operation.name!r} did not finish before the deadline")

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
        """Run an async operation here, a sync one in the pool (a keyed call's too: its
        first run is a task of the idempotency cache, which its deadline must be able to
        leave while the run goes on)."""
        started = time.perf_counter_ns()
        placement = operation.placement
        if placement is None:
            result = await operation.arun(struct_to_dict(payload), correlation_id=cid)
            return self._answer(_response(result, cid, self._instance_id), started)
        measure = self._quick_sync_on_loop and placement.fixed is None
        try:
            answer, usage = await self._in_thread(
                _run_in_pool, operation, payload, cid, self._instance_id, measure
            )
        except asyncio.CancelledError:
            placement.pool_run_lost()  # cut at its deadline, or its caller left
            raise
        if measure and placement.pool_run(usage):
            _log.info(
                "operation %s runs on the event loop from now on: %d runs in a row were "
                "quick and did not wait",
                operation.name,
                placement.runs_to_move,
            )
        return self._answer(answer, started)

    def _answer(
        self, answer: processor_pb2.InvokeResponse | FlextResult[Any], started: int
    ) -> processor_pb2.InvokeResponse:
        """The response of a run started at `started` (perf_counter_ns); a failure raised
        as its MeshError."""
        if isinstance(answer, FlextResult):
            raise from_result(answer)
        answer.duration_ms = (time.perf_counter_ns() - started) / 1e6
        return answer

    def _run_on_loop(
        self, operation: Operation, placement: SyncPlacement, payload: struct_pb2.Struct, cid: str
    ) -> processor_pb2.InvokeResponse | FlextResult[Any]:
        """A sync operation run right here, on the event loop, in a copy of this task's
        context (as a pool thread would run it); a run too slow for the loop sends the
        operation back to the pool."""
        clock = RunClock()
        result = contextvars.copy_context().run(
            operation.run, struct_to_dict(payload), correlation_id=cid
        )
        answer = _response(result, cid, self._instance_id)
        usage = clock.stop()
        if placement.loop_run(usage):
            cpu, waited, _ = usage or (0.0, 0.0, False)
            _log.info(
                "operation %s goes back to the thread pool: a run on the event loop took "
                "%.2f ms of CPU and waited %.2f ms (back to the loop after %d quick runs "
                "in a row)",
                operation.name,
                cpu * 1000,
                waited * 1000,
                placement.runs_to_move,
            )
        return answer

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
