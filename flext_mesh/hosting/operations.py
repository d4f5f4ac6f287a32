"""Running hosted ServiceProcessors by operation name: the domain half of ProcessorService.

Plain Python (protobuf's Struct for payloads, no gRPC): the servicer in
`flext_mesh.hosting.servicer` turns what this module returns into status codes.

- `Operation` binds a name to a processor, finds its request model (`request_model_of`),
  validates dict payloads through the processor's `process_dict` and runs it
  (`run_with_metrics` in a worker thread, or `arun_with_metrics` on the loop).
- `SyncPlacement` decides, from how its runs went (`RunClock`), whether a sync
  operation runs in the thread pool or on the event loop.
- Payloads: :mod:`flext_mesh.rpc.payloads` (Struct <-> dict).
- Results: `result_to_json` (the rule is in its docstring).
- `IdempotencyCache`: replays the first successful outcome of a key; concurrent
  duplicates wait for the first; `outcome` reports what became of a key without
  running anything (how a caller settles an attempt whose answer it lost).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import gc
import inspect
import logging
import re
import resource
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, get_args, get_origin

import pydantic
import pydantic_core

from flext_mesh.processor import ServiceProcessor
from flext_mesh.result import FlextResult

__all__ = [
    "DEFAULT_IDEMPOTENCY_MAX_KEYS",
    "DEFAULT_IDEMPOTENCY_WINDOW",
    "QUICK_RUN",
    "QUICK_RUNS_TO_MOVE",
    "QUICK_WAIT",
    "SLOW_ON_LOOP",
    "IdempotencyCache",
    "Operation",
    "RunClock",
    "SyncPlacement",
    "request_model_of",
    "result_to_json",
]

_log = logging.getLogger("flext_mesh.hosting.operations")

T = TypeVar("T")

DEFAULT_IDEMPOTENCY_WINDOW = 600.0
"""Seconds a successful outcome stays replayable under its idempotency key."""

DEFAULT_IDEMPOTENCY_MAX_KEYS = 10_000
"""Most idempotency keys remembered; the least recently used is forgotten first."""

_INTERNAL = "INTERNAL"
_JSON_SCALARS = frozenset({str, int, float, bool, type(None)})


# -- payloads and results ----------------------------------------------------------------


def result_to_json(value: object) -> dict[str, Any]:
    """The JSON object a processor's result travels as (the Invoke response's Struct).

    - a pydantic model: `model_dump(mode="json")`;
    - a dataclass: its fields, as `dataclasses.asdict` gives them;
    - a Mapping: as is;
    - anything else (str, int, list, None, ...): `{"value": <it>}`.

    Values inside are made JSON-safe as pydantic does: datetimes, dates and UUIDs become
    ISO / canonical strings, Decimals strings, enums their values, sets and tuples lists,
    non-string keys strings. Numbers become doubles in the Struct, so integers beyond
    2**53 lose precision: send those as strings. Raises
    `pydantic_core.PydanticSerializationError` for values that have no JSON form.
    """
    if type(value) is dict and all(
        type(key) is str and type(item) in _JSON_SCALARS for key, item in value.items()
    ):
        return dict(value)  # already what to_jsonable_python would make of it, and common
    if isinstance(value, pydantic.BaseModel):
        dumped: object = value.model_dump(mode="json")
    elif (dataclasses.is_dataclass(value) and not isinstance(value, type)) or isinstance(
        value, Mapping
    ):
        dumped = pydantic_core.to_jsonable_python(value)
    else:
        return {"value": pydantic_core.to_jsonable_python(value)}
    # A RootModel of a list, say, dumps to a non-object: wrap it like any other value.
    return dumped if isinstance(dumped, dict) else {"value": dumped}


# -- request models ----------------------------------------------------------------------

_NO_MODEL = object()


def _request_argument(cls: type, bindings: Mapping[Any, Any]) -> object:
    """TRequest of ServiceProcessor as `cls` binds it, following generic intermediates."""
    bases = cls.__dict__.get("__orig_bases__", cls.__bases__)
    for base in bases:
        origin = get_origin(base) or base
        if not (isinstance(origin, type) and issubclass(origin, ServiceProcessor)):
            continue
        args = tuple(
            bindings.get(arg, arg) if isinstance(arg, TypeVar) else arg for arg in get_args(base)
        )
        if origin is ServiceProcessor:
            return args[0] if args else _NO_MODEL
        params = getattr(origin, "__parameters__", ())
        found = _request_argument(origin, dict(zip(params, args, strict=False)))
        if found is not _NO_MODEL:
            return found
    return _NO_MODEL


def request_model_of(
    processor: ServiceProcessor[Any, Any, Any] | type[ServiceProcessor[Any, Any, Any]],
) -> type[pydantic.BaseModel] | None:
    """The pydantic model a processor's payload is validated against, or None (plain dict).

    An explicit class attribute `request_model` wins (None there means "no model");
    otherwise the TRequest argument of `ServiceProcessor[TRequest, ...]` found through
    the class's bases (generic intermediate classes are followed), when it is a
    `pydantic.BaseModel` subclass. Raises TypeError for a `request_model` that is
    neither None nor a BaseModel subclass.
    """
    cls = processor if isinstance(processor, type) else type(processor)
    explicit = getattr(cls, "request_model", _NO_MODEL)
    if explicit is not _NO_MODEL:
        if explicit is None:
            return None
        if isinstance(explicit, type) and issubclass(explicit, pydantic.BaseModel):
            return explicit
        raise TypeError(
            f"{cls.__name__}.request_model must be a pydantic BaseModel subclass or None, "
            f"got {explicit!r}"
        )
    found = _request_argument(cls, {})
    if isinstance(found, type) and issubclass(found, pydantic.BaseModel):
        return found
    return None


# -- where a sync operation runs -------------------------------------------------------------

QUICK_RUN = 250e-6
"""Most CPU seconds a run of a sync `process` may take to count as quick: about what a
thread holds the GIL before it is asked to hand it over, so running it on the event loop
holds the loop no longer than running it in a thread would."""
QUICK_WAIT = 20e-6
"""Most seconds a run may spend waiting (off the CPU, not preempted) to count as quick:
a run that waits for anything (I/O, a lock, another thread, the event loop) waits
longer than this."""
QUICK_RUNS_TO_MOVE = 32
"""Quick runs in a row, in the thread pool, before an operation moves to the event loop."""
SLOW_ON_LOOP = 2 * QUICK_RUN
"""A run on the event loop that takes more CPU seconds than this or waits over 20 ms,
or two in a row that wait longer than this, send the operation back to the thread pool,
to come back only after twice as many quick runs in a row as before (at most 256)."""
_LONG_WAIT = 1e-3  # a run in the pool that waited this long waited for something
_STALL = 20e-3  # a run on the loop that waited this long stalled it, whatever for
_MAX_QUICK_RUNS_TO_MOVE = 256
_RUSAGE_THREAD: int | None = getattr(resource, "RUSAGE_THREAD", None)  # Linux only
# Garbage collections started so far (counted once a RunClock is used): a run that a
# collection interrupted took longer than its own work.
_collections = 0


def _count_collection(phase: str, info: dict[str, int]) -> None:
    global _collections  # noqa: PLW0603 - one count per process, read by every RunClock
    if phase == "start":
        _collections += 1


def _preemptions() -> int:
    """Involuntary context switches of this thread so far (0 where not counted)."""
    if _RUSAGE_THREAD is None:
        return 0
    return resource.getrusage(_RUSAGE_THREAD).ru_nivcsw


class RunClock:
    """Measures one run on the calling thread: its CPU time, how long it spent off the
    CPU, and whether the system preempted it.

    Off the CPU, a run waited (for I/O, a lock, another thread, or the GIL: another
    Python thread's turn, usually short) or was preempted (an involuntary context
    switch: the machine's doing, not the run's, and then its time off the CPU says
    little). A run a garbage collection interrupted says nothing and is not measured.
    """

    __slots__ = ("_collections", "_cpu", "_preempted", "_started")

    def __init__(self) -> None:
        """Start measuring now."""
        if _count_collection not in gc.callbacks:
            gc.callbacks.append(_count_collection)
        self._collections = _collections
        self._preempted = _preemptions()
        self._cpu = time.thread_time()
        self._started = time.perf_counter()

    def stop(self) -> tuple[float, float, bool] | None:
        """CPU seconds and seconds off the CPU since the start, and whether the run was
        preempted; None when a garbage collection ran meanwhile."""
        took = time.perf_counter() - self._started
        cpu = time.thread_time() - self._cpu
        if _collections != self._collections:
            return None
        return cpu, max(0.0, took - cpu), _preemptions() != self._preempted


class SyncPlacement:
    """Where the runs of one sync operation go: the host's thread pool, or the event loop.

    A sync `process` is served in the host's thread pool, which costs two thread
    hand-overs per call (about as much as a small processor's whole run). A host that
    allows it (the sidecar does) runs an operation on the event loop instead once it has
    measured `QUICK_RUNS_TO_MOVE` quick runs in a row in the pool (`RunClock`): each at
    most `QUICK_RUN` of CPU and `QUICK_WAIT` off the CPU. A run that takes more CPU, or
    waits over a millisecond, starts the count again; one that waits less, or was
    preempted, is not counted (the GIL or the system may have held it up), so an
    operation that waits for I/O, a lock or another thread on every run never moves. On
    the loop each run is measured too: one that takes more than `SLOW_ON_LOOP` of CPU or
    is off the CPU over 20 ms, or two in a row that wait longer than `SLOW_ON_LOOP`
    without being preempted, send the operation back to the pool. A processor's
    `run_on_loop` (True or False) fixes the place instead. Single event loop: not
    thread-safe.
    """

    __slots__ = ("_needed", "_streak", "_waited", "fixed", "moved_back", "on_loop")

    def __init__(self, *, fixed: bool | None = None) -> None:
        """`fixed`: the processor's `run_on_loop` (None: measured)."""
        self.fixed = fixed
        """True or False when the processor fixed the place; None when it is measured."""
        self.on_loop = fixed is True
        """Whether the next run goes to the event loop."""
        self.moved_back = 0
        """Times a run on the loop was too slow and the operation went back to the pool."""
        self._streak = 0
        self._needed = QUICK_RUNS_TO_MOVE
        self._waited = False  # the last run on the loop waited longer than SLOW_ON_LOOP

    @property
    def runs_to_move(self) -> int:
        """Quick runs in a row in the pool that move the operation to the loop (this
        grows each time it has to go back)."""
        return self._needed

    def pool_run(self, usage: tuple[float, float, bool] | None) -> bool:
        """Count a run made in the pool (`RunClock.stop()`); True when that moves the
        operation to the loop."""
        if usage is None:
            return False
        cpu, waited, preempted = usage
        if cpu > QUICK_RUN or waited > (_STALL if preempted else _LONG_WAIT):
            self._streak = 0
            return False
        if preempted or waited > QUICK_WAIT or self.fixed is not None or self.on_loop:
            return False
        self._streak += 1
        if self._streak < self._needed:
            return False
        self._streak = 0
        self._waited = False
        self.on_loop = True
        return True

    def pool_run_lost(self) -> None:
        """A run in the pool whose caller left before it ended (its deadline, say): it
        does not count as quick."""
        self._streak = 0

    def loop_run(self, usage: tuple[float, float, bool] | None) -> bool:
        """Count a run made on the loop (`RunClock.stop()`); True when it was too slow
        for the loop and the operation goes back to the pool."""
        if usage is None or self.fixed is not None:
            return False
        cpu, waited, preempted = usage
        waited_long = waited > SLOW_ON_LOOP and not preempted
        if cpu <= SLOW_ON_LOOP and waited <= _STALL and not (waited_long and self._waited):
            self._waited = waited_long
            return False
        self.on_loop = False
        self.moved_back += 1
        self._needed = min(self._needed * 2, _MAX_QUICK_RUNS_TO_MOVE)
        return True


# -- operations --------------------------------------------------------------------------


def _exception_failure(processor_name: str) -> re.Pattern[str]:
    # What ServiceProcessor._internal_failure writes: "<Class>.<stage> raised <Type>: <text>"
    return re.compile(rf"^({re.escape(processor_name)}\.[\w/]+ raised \w+)(: .*)?$", re.DOTALL)


@dataclass(frozen=True, slots=True, eq=False)
class Operation:
    """One operation served by name: a processor, its request model and how it runs."""

    name: str
    """Operation name callers use in Invoke."""
    processor: ServiceProcessor[Any, Any, Any]
    """The processor that serves it."""
    request_model: type[pydantic.BaseModel] | None
    """Model payloads are validated against; None passes the payload as a plain dict."""
    is_async: bool
    """True when `process` is `async def` (runs on the loop, not in a thread)."""
    description: str
    """One-line description (the processor's `describe()`)."""
    request_schema: dict[str, Any] = field(default_factory=dict)
    """JSON Schema of the request model; empty without a model (or if it has none)."""
    placement: SyncPlacement | None = None
    """Where a sync `process` runs (the loop or the thread pool); None for an async one."""
    _internal_pattern: re.Pattern[str] = field(
        default=re.compile(r"(?!)"), repr=False, compare=False
    )

    @classmethod
    def of(cls, name: str, processor: ServiceProcessor[Any, Any, Any]) -> Operation:
        """Describe `processor` as operation `name` (raises TypeError for a bad model or
        a `run_on_loop` that is neither None nor a bool)."""
        model = request_model_of(processor)
        on_loop = getattr(processor, "run_on_loop", None)
        if on_loop is not None and not isinstance(on_loop, bool):
            raise TypeError(
                f"{type(processor).__name__}.run_on_loop must be True, False or None, "
                f"got {on_loop!r}"
            )
        is_async = inspect.iscoroutinefunction(processor.process)
        schema: dict[str, Any] = {}
        if model is not None:
            try:
                schema = model.model_json_schema()
            except Exception:
                _log.warning("no JSON Schema for %s (operation %s)", model.__name__, name)
        return cls(
            name=name,
            processor=processor,
            request_model=model,
            is_async=is_async,
            description=processor.describe(),
            request_schema=schema,
            placement=None if is_async else SyncPlacement(fixed=on_loop),
            _internal_pattern=_exception_failure(type(processor).__name__),
        )

    def run(self, payload: Mapping[str, Any], *, correlation_id: str) -> FlextResult[Any]:
        """Validate, `run_with_metrics` and turn the result into JSON (a blocking call).

        For a sync `process`; call it from a worker thread. The success value is the
        `result_to_json` object; a failure is the processor's, made safe to show callers.
        """
        proc = self.processor
        if self.request_model is None:
            result = proc.run_with_metrics(self.name, dict(payload), correlation_id=correlation_id)
        else:
            result = proc.process_dict(
                payload,
                self.request_model,
                lambda request: proc.run_with_metrics(
                    self.name, request, correlation_id=correlation_id
                ),
            )
        return self._finish(result)

    async def arun(self, payload: Mapping[str, Any], *, correlation_id: str) -> FlextResult[Any]:
        """Like `run` for an async `process`, awaited on the running loop."""
        proc = self.processor
        request: Any = dict(payload)
        if self.request_model is not None:
            validated = proc.process_dict(payload, self.request_model, FlextResult.ok)
            if validated.is_failure:
                return self._finish(validated)
            request = validated.value
        result = await proc.arun_with_metrics(self.name, request, correlation_id=correlation_id)
        return self._finish(result)

    def _finish(self, result: FlextResult[Any]) -> FlextResult[Any]:
        if result.is_failure:
            return self._public_failure(result)
        try:
            return FlextResult.ok(result_to_json(result.value))
        except Exception as exc:
            _log.error("result of operation %s has no JSON form", self.name, exc_info=exc)
            return FlextResult.fail(
                f"operation {self.name!r} returned a {type(result.value).__name__} "
                "that has no JSON form",
                code=_INTERNAL,
            )

    def _public_failure(self, result: FlextResult[Any]) -> FlextResult[Any]:
        """Keep the processor's own messages; cut exception text from captured exceptions.

        `run_with_metrics` turns an exception into "<Class>.process raised <Type>: <text>"
        and logs it with its traceback; callers get only "<Class>.process raised <Type>".
        """
        if result.code != _INTERNAL or result.error is None:
            return result
        match = self._internal_pattern.match(result.error)
        if match is None:
            return result
        return FlextResult.fail(
            f"{match.group(1)} (the callee's log has the details)", code=_INTERNAL
        )


# -- idempotency -------------------------------------------------------------------------


class _Flight(Generic[T]):
    """The first call of a key while it runs; duplicates wait on `done`."""

    __slots__ = ("done", "outcome", "task")

    def __init__(self, task: asyncio.Task[T]) -> None:
        self.done = asyncio.Event()
        self.task = task
        self.outcome: tuple[T] | None = None  # boxed: set only when the call succeeded


class IdempotencyCache(Generic[T]):
    """Remembers the first successful outcome of each key for `window` seconds.

    `run(key, fn)` returns `(value, replayed)`. A key seen again within the window gets
    the remembered value without `fn` running again; a duplicate arriving while the
    first call still runs waits for it and gets its value. The first call runs in a
    task of its own: a caller that goes away (cancelled, its deadline passed, its
    client crashed) does not stop it, so its outcome is still remembered for the retry
    that will come with the same key, and the work is done once. Failures (`fn`
    raising) are not remembered: the next call with the key runs `fn` again, and so does
    a duplicate that was waiting for a call that failed. At most `max_keys` keys are
    kept, the least recently used dropped first. Single event loop, not thread-safe.
    """

    def __init__(
        self,
        *,
        window: float = DEFAULT_IDEMPOTENCY_WINDOW,
        max_keys: int = DEFAULT_IDEMPOTENCY_MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`window` in seconds (> 0), `max_keys` > 0; `clock` is for tests."""
        if window <= 0:
            raise ValueError(f"window must be positive, got {window}")
        if max_keys <= 0:
            raise ValueError(f"max_keys must be positive, got {max_keys}")
        self.window = window
        """Seconds an outcome stays replayable, counted from when it was stored."""
        self.max_keys = max_keys
        """Most keys remembered."""
        self._clock = clock
        self._done: OrderedDict[Hashable, tuple[float, T]] = OrderedDict()
        self._running: dict[Hashable, _Flight[T]] = {}

    def __len__(self) -> int:
        return len(self._done)

    def __contains__(self, key: Hashable) -> bool:
        return self._lookup(key) is not None

    @property
    def running(self) -> int:
        """First calls still running (possibly with no caller waiting any more)."""
        return len(self._running)

    async def wait_idle(self) -> None:
        """Wait until no first call is running."""
        while self._running:
            flight = next(iter(self._running.values()))
            await flight.done.wait()

    def cancel_all(self) -> None:
        """Cancel the running first calls (on shutdown)."""
        for flight in self._running.values():
            flight.task.cancel()

    def _lookup(self, key: Hashable) -> tuple[T] | None:
        entry = self._done.get(key)
        if entry is None:
            return None
        stored_at, value = entry
        if self._clock() - stored_at >= self.window:
            del self._done[key]
            return None
        self._done.move_to_end(key)
        return (value,)

    def _put(self, key: Hashable, value: T) -> None:
        self._done[key] = (self._clock(), value)
        self._done.move_to_end(key)
        while len(self._done) > self.max_keys:
            self._done.popitem(last=False)

    def _finished(self, key: Hashable, flight: _Flight[T], task: asyncio.Task[T]) -> None:
        if self._running.get(key) is flight:
            del self._running[key]
        if not task.cancelled() and task.exception() is None:
            value = task.result()
            self._put(key, value)
            flight.outcome = (value,)
        flight.done.set()

    def when_done(self, key: Hashable, callback: Callable[[T], None]) -> bool:
        """Call ``callback(value)`` when `key`'s running first call succeeds; False (and
        no call) when none runs."""
        flight = self._running.get(key)
        if flight is None:
            return False

        def done(task: asyncio.Task[T]) -> None:
            if not task.cancelled() and task.exception() is None:
                callback(task.result())

        flight.task.add_done_callback(done)
        return True

    def knows(self, key: Hashable) -> bool:
        """True when `key` has a remembered outcome or its first call is running."""
        return key in self._running or self._lookup(key) is not None

    async def outcome(self, key: Hashable) -> tuple[T] | None:
        """What became of `key`'s call, never running anything: its remembered value
        (boxed), after waiting for the first call while it runs; None when there is no
        record (never seen, failed, or forgotten)."""
        while True:
            hit = self._lookup(key)
            if hit is not None:
                return hit
            flight = self._running.get(key)
            if flight is None:
                return None
            await flight.done.wait()
            if flight.outcome is not None:
                return flight.outcome

    async def run(self, key: Hashable, fn: Callable[[], Awaitable[T]]) -> tuple[T, bool]:
        """`(value, replayed)`: the remembered outcome of `key`, or `fn()`'s (then kept)."""
        while True:
            hit = self._lookup(key)
            if hit is not None:
                return hit[0], True
            flight = self._running.get(key)
            if flight is None:
                break
            await flight.done.wait()
            if flight.outcome is not None:
                return flight.outcome[0], True
            # The first call failed: this one is a retry and may run.

        async def first() -> T:
            return await fn()

        task = asyncio.ensure_future(first())
        flight = _Flight[T](task)
        self._running[key] = flight
        task.add_done_callback(functools.partial(self._finished, key, flight))
        return await asyncio.shield(task), False
