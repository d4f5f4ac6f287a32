"""`ServiceProcessor`: the Template Method base for business operations.

A subclass writes only `process(request) -> FlextResult[TDomain]` (a plain `def` or an
`async def`) and a pure `build(domain, *, correlation_id) -> TResult`. The base adds
correlation ids, timing, exception capture, run records (`RunRecord`) sent to metrics
sinks, pydantic validation of JSON / dict payloads and batch runs. Nothing here knows
about gRPC: failures carry a status code *name* that the serving layer translates.

Async: `arun_with_metrics` awaits an async `process` and calls a sync one inline (the
caller decides about thread pools). `run_with_metrics` on an async `process` uses
`asyncio.run` when the current thread has no running loop, and raises `TypeError` inside
a running loop.

Failures: a `FlextResult.fail` is the processor's answer as it is. A `MeshError` raised
in `process` or `build` (a rejection of the processor's own, or one a nested mesh call
raised) is the same failure: its code, message, field violations and retry delay
(`MeshError.to_result`), so a business rejection keeps its kind across hops. Any other
exception is a bug: logged with its traceback, an `INTERNAL` failure.

While `process` and `build` run, `self.correlation_id` is the run's correlation id (the
inbound call's, when a sidecar serves it): a context variable, so it is right in every
task and thread that serves a call at the same time.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar, cast, runtime_checkable

import pydantic

from flext_mesh.errors import MeshError, is_infrastructure
from flext_mesh.result import FieldViolationPair, FlextResult

__all__ = [
    "DEFAULT_MAX_RECORDS",
    "CategoryStats",
    "MetricsSink",
    "RunRecord",
    "RunRecorder",
    "ServiceProcessor",
    "default_recorder",
    "format_validation_error",
    "new_correlation_id",
]

logger = logging.getLogger("flext_mesh.processor")

TRequest = TypeVar("TRequest")
TDomain = TypeVar("TDomain")
TResult = TypeVar("TResult")
TReq = TypeVar("TReq")
R = TypeVar("R")
M = TypeVar("M", bound=pydantic.BaseModel)

DEFAULT_MAX_RECORDS = 10_000
"""Default number of run records the in-memory recorder keeps."""

_INTERNAL = "INTERNAL"
_CANCELLED = "CANCELLED"
_INVALID_ARGUMENT = "INVALID_ARGUMENT"

# The correlation id of the run in progress in this context (task or thread).
_run_correlation_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "flext_mesh_run_correlation_id", default=None
)


def new_correlation_id() -> str:
    """A fresh correlation id (32 hex characters of a random UUID)."""
    # uuid.uuid4().hex, without the UUID object: a third of the cost, on every call.
    data = bytearray(os.urandom(16))
    data[6] = (data[6] & 0x0F) | 0x40  # version 4
    data[8] = (data[8] & 0x3F) | 0x80  # RFC 4122 variant
    return data.hex()


# -- run records and sinks -------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class RunRecord:
    """One `run_with_metrics` / `arun_with_metrics` call, as sent to metrics sinks."""

    processor: str
    """Class name of the processor."""
    category: str
    """The category (operation label) the caller passed."""
    correlation_id: str
    """The correlation id of the run (given by the caller or generated)."""
    duration_ms: float
    """Wall time of process + build, in milliseconds (from `time.perf_counter_ns`)."""
    success: bool
    """True only when process succeeded and build returned."""
    error: str | None
    """The failure message, None on success."""
    code: str | None
    """gRPC status code name of the failure, None on success."""
    started_at: float
    """Start of the run, in Unix seconds."""


@runtime_checkable
class MetricsSink(Protocol):
    """Receives a `RunRecord` after every run; must be cheap and thread-safe."""

    def record(self, run: RunRecord) -> None:
        """Take one run record."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CategoryStats:
    """Aggregates of the retained records of one category."""

    count: int
    """Number of runs."""
    failures: int
    """Runs that did not succeed."""
    mean_ms: float
    """Mean duration in milliseconds."""
    max_ms: float
    """Longest duration in milliseconds."""


class RunRecorder:
    """Thread-safe bounded in-memory `MetricsSink` keeping the newest `maxlen` records."""

    def __init__(self, maxlen: int = DEFAULT_MAX_RECORDS) -> None:
        """Keep at most `maxlen` records (oldest dropped first)."""
        if maxlen <= 0:
            raise ValueError(f"maxlen must be positive, got {maxlen}")
        self._lock = threading.Lock()
        self._records: deque[RunRecord] = deque(maxlen=maxlen)

    @property
    def maxlen(self) -> int:
        """Capacity of the recorder."""
        return cast("int", self._records.maxlen)

    def record(self, run: RunRecord) -> None:
        """Append a record, dropping the oldest when full."""
        with self._lock:
            self._records.append(run)

    def records(self, category: str | None = None) -> list[RunRecord]:
        """A copy of the retained records, oldest first, optionally of one category."""
        with self._lock:
            snapshot = list(self._records)
        if category is None:
            return snapshot
        return [r for r in snapshot if r.category == category]

    def snapshot(self) -> dict[str, CategoryStats]:
        """Per-category aggregates (count, failures, mean and max ms) of retained records."""
        totals: dict[str, list[float]] = {}  # category -> [count, failures, sum_ms, max_ms]
        for run in self.records():
            acc = totals.setdefault(run.category, [0, 0, 0.0, 0.0])
            acc[0] += 1
            acc[1] += 0 if run.success else 1
            acc[2] += run.duration_ms
            acc[3] = max(acc[3], run.duration_ms)
        return {
            category: CategoryStats(
                count=int(count),
                failures=int(failures),
                mean_ms=total_ms / count,
                max_ms=max_ms,
            )
            for category, (count, failures, total_ms, max_ms) in totals.items()
        }

    def clear(self) -> None:
        """Drop every record."""
        with self._lock:
            self._records.clear()

    def __len__(self) -> int:
        return len(self._records)


default_recorder = RunRecorder()
"""The process-wide recorder every processor reports to unless told otherwise."""

# RunRecord's slot setters, in field order: a record is made on every run, and its
# frozen __init__ (one object.__setattr__ per field, by name) costs twice as much.
_RECORD_SETTERS = tuple(
    cast("Any", RunRecord.__dict__[name]).__set__
    for name in (
        "processor",
        "category",
        "correlation_id",
        "duration_ms",
        "success",
        "error",
        "code",
        "started_at",
    )
)
_NEW = object.__new__


def _run_record(  # noqa: PLR0917 - RunRecord's fields, in order, on a hot path
    processor: str,
    category: str,
    correlation_id: str,
    duration_ms: float,
    success: bool,
    error: str | None,
    code: str | None,
    started_at: float,
) -> RunRecord:
    """A RunRecord, its fields set through their slots (see `_RECORD_SETTERS`)."""
    run = _NEW(RunRecord)
    set_processor, set_category, set_cid, set_ms, set_success, set_error, set_code, set_at = (
        _RECORD_SETTERS
    )
    set_processor(run, processor)
    set_category(run, category)
    set_cid(run, correlation_id)
    set_ms(run, duration_ms)
    set_success(run, success)
    set_error(run, error)
    set_code(run, code)
    set_at(run, started_at)
    return run


_failed_sinks: set[int] = set()
_failed_sinks_lock = threading.Lock()


def _emit(sinks: Iterable[MetricsSink], run: RunRecord) -> None:
    for sink in sinks:
        try:
            sink.record(run)
        except Exception:
            # Logged once per sink (by id) so a broken sink cannot flood the log.
            with _failed_sinks_lock:
                first = id(sink) not in _failed_sinks
                _failed_sinks.add(id(sink))
            if first:
                logger.exception("metrics sink %r raised; its later errors are not logged", sink)


# -- validation errors -----------------------------------------------------------------


def _dotted(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc)


def format_validation_error(
    exc: pydantic.ValidationError,
) -> tuple[str, tuple[FieldViolationPair, ...]]:
    """A message naming each bad field and the `(dotted.path, description)` pairs."""
    violations = tuple((_dotted(err["loc"]), err["msg"]) for err in exc.errors())
    parts = [f"{field}: {msg}" if field else msg for field, msg in violations]
    return f"invalid {exc.title}: {'; '.join(parts)}", violations


# -- the processor ---------------------------------------------------------------------


class ServiceProcessor(ABC, Generic[TRequest, TDomain, TResult]):
    """Template Method base: subclasses implement `process` and `build` only."""

    metrics_sink: MetricsSink = default_recorder
    """Primary sink of this processor's run records (`default_recorder` by default)."""

    run_on_loop: bool | None = None
    """Where a host runs a sync `process`: None (the default) lets the host decide; the
    sidecar measures, and runs on its event loop an operation whose runs are quick and
    do not wait, sparing two thread hand-overs per call
    (`flext_mesh.hosting.operations.SyncPlacement`). False: always in the host's thread
    pool; set it when `process` may wait (for I/O, a lock, an event loop) even if it
    seldom does. True: always on the event loop (it must be quick and never wait).
    Ignored for an async `process`, which always runs on the loop."""

    # Copy-on-write so the hot path reads it without a lock; a class default so that
    # subclasses whose __init__ forgets super().__init__() still work.
    _extra_sinks: tuple[MetricsSink, ...] = ()

    def __init__(self, *, metrics_sink: MetricsSink | None = None) -> None:
        """Optionally replace the primary sink; more can be added with `add_sink`."""
        if metrics_sink is not None:
            self.metrics_sink = metrics_sink

    # -- what subclasses write ---------------------------------------------------------

    @abstractmethod
    def process(
        self, request: TRequest, /
    ) -> FlextResult[TDomain] | Awaitable[FlextResult[TDomain]]:
        """Turn a request into a domain object, applying business rules (sync or async)."""

    @abstractmethod
    def build(self, domain: TDomain, /, *, correlation_id: str) -> TResult:
        """Build the final result from a domain object; pure."""

    # -- description and sinks ---------------------------------------------------------

    @classmethod
    def describe(cls) -> str:
        """First line of the subclass's own docstring ("" when it has none)."""
        doc = cls.__dict__.get("__doc__")
        if not isinstance(doc, str):
            return ""
        cleaned = inspect.cleandoc(doc)
        return cleaned.splitlines()[0].strip() if cleaned else ""

    @property
    def correlation_id(self) -> str:
        """The correlation id of the call being processed, from inside `process` or
        `build` (the inbound call's when a sidecar serves it; tasks started there see it
        too). Raises RuntimeError outside a run."""
        cid = _run_correlation_id.get()
        if cid is None:
            raise RuntimeError(
                f"{type(self).__name__}.correlation_id is known only while "
                "run_with_metrics / arun_with_metrics runs process() or build()"
            )
        return cid

    @property
    def operation_description(self) -> str:
        """Same as `describe()`: the one-line description of this processor."""
        return self.describe()

    @property
    def sinks(self) -> tuple[MetricsSink, ...]:
        """Every sink a run record goes to: `metrics_sink`, then added sinks."""
        return (self.metrics_sink, *self._extra_sinks)

    def add_sink(self, sink: MetricsSink) -> None:
        """Also send run records to `sink` (keeps the existing ones)."""
        self._extra_sinks = (*self._extra_sinks, sink)

    def remove_sink(self, sink: MetricsSink) -> None:
        """Stop sending run records to a sink added with `add_sink`."""
        self._extra_sinks = tuple(s for s in self._extra_sinks if s is not sink)

    # -- the template methods ----------------------------------------------------------

    def run_with_metrics(
        self, category: str, request: TRequest, *, correlation_id: str | None = None
    ) -> FlextResult[TResult]:
        """Process, build and record one request; a MeshError raised becomes its own
        failure, any other exception an INTERNAL one.

        An async `process` runs under `asyncio.run` when no loop is running in this
        thread; inside a running loop this raises TypeError (use `arun_with_metrics`).
        """
        if inspect.iscoroutinefunction(self.process):
            if _loop_is_running():
                name = type(self).__name__
                raise TypeError(
                    f"{name}.process is async and an event loop is running in this thread; "
                    f"use `await processor.arun_with_metrics(...)` instead of run_with_metrics"
                )
            return asyncio.run(
                self.arun_with_metrics(category, request, correlation_id=correlation_id)
            )
        cid = correlation_id or new_correlation_id()
        started_at = time.time()
        start_ns = time.perf_counter_ns()
        stage = "process"
        token = _run_correlation_id.set(cid)
        try:
            outcome = self.process(request)
            if not isinstance(outcome, FlextResult) and inspect.isawaitable(outcome):
                if inspect.iscoroutine(outcome):
                    outcome.close()
                raise TypeError(
                    "process() returned an awaitable; declare it `async def` "
                    "or call arun_with_metrics"
                )
            domain = _expect_result(outcome)
            stage = "build"
            result = self._complete(domain, cid)
        except Exception as exc:
            result = self._failure(exc, stage, f"category={category}, correlation_id={cid}")
        finally:
            _run_correlation_id.reset(token)
        self._record(category, cid, result, started_at, start_ns)
        return result

    async def arun_with_metrics(
        self, category: str, request: TRequest, *, correlation_id: str | None = None
    ) -> FlextResult[TResult]:
        """Like `run_with_metrics`, awaiting an async `process` (a sync one runs inline)."""
        cid = correlation_id or new_correlation_id()
        started_at = time.time()
        start_ns = time.perf_counter_ns()
        stage = "process"
        token = _run_correlation_id.set(cid)
        try:
            outcome = self.process(request)
            if not isinstance(outcome, FlextResult) and inspect.isawaitable(outcome):
                outcome = await outcome
            domain = _expect_result(outcome)
            stage = "build"
            result = self._complete(domain, cid)
        except asyncio.CancelledError:
            cancelled: FlextResult[TResult] = FlextResult.fail("cancelled", code=_CANCELLED)
            self._record(category, cid, cancelled, started_at, start_ns)
            raise
        except Exception as exc:
            result = self._failure(exc, stage, f"category={category}, correlation_id={cid}")
        finally:
            _run_correlation_id.reset(token)
        self._record(category, cid, result, started_at, start_ns)
        return result

    def process_json(
        self,
        json_text: str | bytes,
        model: type[M],
        handler: Callable[[M], FlextResult[R]],
    ) -> FlextResult[R]:
        """Parse and validate JSON into `model`, then return `handler(validated)`.

        Bad JSON or invalid fields give an INVALID_ARGUMENT failure naming each field.
        """
        return self._validated(lambda: model.model_validate_json(json_text), model, handler)

    def process_dict(
        self,
        data: Mapping[str, Any],
        model: type[M],
        handler: Callable[[M], FlextResult[R]],
    ) -> FlextResult[R]:
        """Like `process_json` for already-parsed data (e.g. a protobuf Struct as dict)."""
        payload = data if isinstance(data, dict) else dict(data)
        return self._validated(lambda: model.model_validate(payload), model, handler)

    def run_batch(
        self,
        requests: Iterable[TReq],
        handler: Callable[[TReq], FlextResult[R]],
    ) -> tuple[list[R], list[str]]:
        """Run `handler` on each request: (success values, error messages) in order.

        An exception in the handler becomes that item's error message; the batch goes on.
        """
        successes: list[R] = []
        errors: list[str] = []
        for request in requests:
            try:
                result = handler(request)
            except Exception as exc:
                logger.exception("run_batch handler raised in %s", type(self).__name__)
                errors.append(f"{type(exc).__name__}: {exc}")
                continue
            if result.success:
                successes.append(result.value)
            else:
                errors.append(result.error or "unknown error")
        return successes, errors

    # -- internals ---------------------------------------------------------------------

    def _complete(
        self, domain_result: FlextResult[TDomain], correlation_id: str
    ) -> FlextResult[TResult]:
        if domain_result.is_failure:
            # A failure holds no value, so it is a failure of any type.
            return cast("FlextResult[TResult]", domain_result)
        return FlextResult.ok(self.build(domain_result.value, correlation_id=correlation_id))

    def _failure(self, exc: Exception, stage: str, context: str) -> FlextResult[R]:
        """The failure an exception in `stage` stands for: a MeshError's own (its code
        and details), anything else an INTERNAL failure, logged with its traceback."""
        if isinstance(exc, MeshError):
            try:
                failure: FlextResult[R] = exc.to_result()
            except ValueError:  # code OK, a negative retry delay: a bug where it was raised
                return self._internal_failure(exc, stage, context)
            # An answer, not a bug: no traceback. A fault of the infrastructure under a
            # nested call is worth a line; a business rejection is the caller's business.
            logger.log(
                logging.WARNING if is_infrastructure(exc.code) else logging.DEBUG,
                "%s.%s failed with %s: %s (%s)",
                type(self).__name__,
                stage,
                exc.code.name,
                exc.message,
                context,
            )
            return failure
        return self._internal_failure(exc, stage, context)

    def _internal_failure(self, exc: Exception, stage: str, context: str) -> FlextResult[R]:
        """Log an unexpected exception and turn it into an INTERNAL failure."""
        name = type(self).__name__
        logger.error("%s.%s raised (%s)", name, stage, context, exc_info=exc)
        return FlextResult.fail(
            f"{name}.{stage} raised {type(exc).__name__}: {exc}", code=_INTERNAL
        )

    def _record(
        self,
        category: str,
        correlation_id: str,
        result: FlextResult[TResult],
        started_at: float,
        start_ns: int,
    ) -> None:
        run = _run_record(
            type(self).__name__,
            category,
            correlation_id,
            (time.perf_counter_ns() - start_ns) / 1_000_000,
            result.success,
            result.error,
            result.code,
            started_at,
        )
        extra = self._extra_sinks
        _emit((self.metrics_sink, *extra) if extra else (self.metrics_sink,), run)

    def _validated(
        self,
        validate: Callable[[], M],
        model: type[M],
        handler: Callable[[M], FlextResult[R]],
    ) -> FlextResult[R]:
        try:
            request = validate()
        except pydantic.ValidationError as exc:
            message, violations = format_validation_error(exc)
            return FlextResult.fail(message, code=_INVALID_ARGUMENT, field_violations=violations)
        except Exception as exc:
            return self._internal_failure(
                exc, "process_json/process_dict", f"validating {model.__name__}"
            )
        try:
            return handler(request)
        except Exception as exc:
            return self._failure(exc, "process_json/process_dict", f"handler for {model.__name__}")


def _expect_result(outcome: object) -> FlextResult[Any]:
    if not isinstance(outcome, FlextResult):
        raise TypeError(f"process() must return a FlextResult, got {type(outcome).__name__}")
    return outcome


def _loop_is_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True
