"""Active health checking of registered instances with ``grpc.health.v1.Health/Check``.

A lease only proves that a process still heartbeats; a hung process can keep doing that.
:class:`HealthChecker` therefore asks every tracked endpoint for its overall health
(``service=""``) every ``interval`` and damps the answers the way Envoy does:

- a new (``UNKNOWN``) instance is ``SERVING`` after one pass, and ``NOT_SERVING`` after
  ``unhealthy_threshold`` consecutive failures;
- a ``SERVING`` instance is ``NOT_SERVING`` only after ``unhealthy_threshold``
  consecutive failures, so one lost check does not flip it;
- a ``NOT_SERVING`` instance is ``SERVING`` again only after ``healthy_threshold``
  consecutive passes, so a flapping one stays out.

A check passes only when the endpoint answers ``SERVING`` within ``timeout``; any other
answer, an RPC error (``UNAVAILABLE`` for a closed port) or no answer in time (a hung
process) fails it.

One scheduler task keeps a heap of next-check times (the first check of a key at a random
offset within one interval, then every interval +/- jitter); each due check runs in a
task of its own, at most ``max_concurrent_checks`` at once, so a hung endpoint delays no
other. Channels are cached per endpoint, least recently used closed beyond
``max_channels``. :meth:`HealthChecker.aclose` cancels every task and closes every channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import heapq
import itertools
import logging
import math
import random
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import Any, Self

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flext_mesh.rpc.channels import ClientSecurity, TransportError, open_channel

__all__ = [
    "CheckStats",
    "HealthCheckSettings",
    "HealthChecker",
    "HealthStatus",
    "HealthTransition",
    "TransitionCallback",
]

_log = logging.getLogger("flext_mesh.registry.health")

_EWMA_ALPHA = 0.3
_MAX_ERROR_CHARS = 200


class HealthStatus(enum.IntEnum):
    """Health of a tracked key; the numbers are those of ``flext_mesh.v1.HealthStatus``."""

    UNKNOWN = 1
    SERVING = 2
    NOT_SERVING = 3


@dataclass(frozen=True, kw_only=True, slots=True)
class HealthCheckSettings:
    """How often and how strictly endpoints are checked; the defaults are Envoy-like."""

    interval: float = 5.0
    """Seconds between two checks of one endpoint (> 0)."""
    timeout: float = 1.0
    """Seconds one check may take before it fails (> 0 and at most interval)."""
    unhealthy_threshold: int = 3
    """Consecutive failures that make an endpoint NOT_SERVING (>= 1)."""
    healthy_threshold: int = 2
    """Consecutive passes that make a NOT_SERVING endpoint SERVING again (>= 1)."""
    jitter: float = 0.1
    """Fraction of interval added or subtracted at random to each next check (0 <= j < 1)."""
    max_channels: int = 256
    """Channels kept open, one per endpoint; the least recently used is closed beyond it."""
    max_concurrent_checks: int = 64
    """Checks in flight at once; further due checks wait for a slot (>= 1)."""
    security: ClientSecurity = field(default_factory=ClientSecurity)
    """TLS (CA, client certificate) and token of the checks' channels; plaintext by default."""

    def __post_init__(self) -> None:
        for name in ("interval", "timeout"):
            seconds = getattr(self, name)
            if not (isinstance(seconds, int | float) and math.isfinite(seconds) and seconds > 0):
                raise ValueError(f"{name} must be a finite number of seconds > 0, not {seconds!r}")
        if self.timeout > self.interval:
            raise ValueError(
                f"timeout must be at most interval ({self.interval!r}), not {self.timeout!r}"
            )
        for name in (
            "unhealthy_threshold",
            "healthy_threshold",
            "max_channels",
            "max_concurrent_checks",
        ):
            count = getattr(self, name)
            if isinstance(count, bool) or not isinstance(count, int) or count < 1:
                raise ValueError(f"{name} must be an integer >= 1, not {count!r}")
        if not 0.0 <= self.jitter < 1.0:
            raise ValueError(f"jitter must be a fraction 0 <= jitter < 1, not {self.jitter!r}")


@dataclass(kw_only=True, slots=True)
class CheckStats:
    """Damped status and counters of one tracked key."""

    status: HealthStatus = HealthStatus.UNKNOWN
    """Current status after damping."""
    consecutive_passes: int = 0
    """Passes since the last failure."""
    consecutive_failures: int = 0
    """Failures since the last pass."""
    total_checks: int = 0
    """Checks done for the current endpoint of the key."""
    passed_checks: int = 0
    """Of total_checks, those that passed."""
    ewma_latency_ms: float = 0.0
    """EWMA (alpha 0.3) of the round trip of checks that got an answer; 0 before any."""
    last_error: str = ""
    """Why the last check failed; empty when it passed or before any check."""
    last_check_at: float | None = None
    """When the last check ended (``time.time()``); None before any check."""

    @property
    def uptime_percentage(self) -> float:
        """Share of checks passed, 0 to 100; 100.0 before any check."""
        if self.total_checks == 0:
            return 100.0
        return 100.0 * self.passed_checks / self.total_checks


@dataclass(frozen=True, slots=True)
class HealthTransition:
    """A change of a key's status, as passed to ``on_transition``."""

    old: HealthStatus
    """Status before the check."""
    new: HealthStatus
    """Status after the check."""
    stats: CheckStats
    """A copy of the key's stats right after the check that changed the status."""
    reason: str
    """Why, e.g. ``3 consecutive failures, last: UNAVAILABLE: ...``."""


#: Awaited with the key and the transition whenever a key's status changes.
TransitionCallback = Callable[[str, HealthTransition], Awaitable[None]]


@dataclass(eq=False, slots=True)
class _Target:
    """One tracked key: where to check it and what was seen so far."""

    key: str
    endpoint: str
    settings: HealthCheckSettings
    stats: CheckStats
    # Held by the check of this key in progress: checks of one key never overlap, and
    # its transitions are delivered in order.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(eq=False, slots=True)
class _Channel:
    """A cached channel, the checks using it, and whether it left the cache."""

    channel: grpc.aio.Channel
    stub: Any  # health_pb2_grpc.HealthStub: grpc_health ships no type information
    users: int = 0
    retired: bool = False


@dataclass(frozen=True, slots=True)
class _Outcome:
    """What one Health/Check call showed."""

    passed: bool
    latency_ms: float | None  # None when no answer came
    error: str


def _next_status(
    status: HealthStatus, passes: int, failures: int, settings: HealthCheckSettings
) -> HealthStatus:
    """Envoy's damping: the status after a check, given the consecutive counters."""
    if failures >= settings.unhealthy_threshold:
        return HealthStatus.NOT_SERVING
    if status is HealthStatus.UNKNOWN and passes >= 1:
        return HealthStatus.SERVING
    if status is HealthStatus.NOT_SERVING and passes >= settings.healthy_threshold:
        return HealthStatus.SERVING
    return status


def _short(text: str) -> str:
    """One line of at most _MAX_ERROR_CHARS characters."""
    line = " ".join(text.split())
    return line if len(line) <= _MAX_ERROR_CHARS else line[: _MAX_ERROR_CHARS - 3] + "..."


def _status_name(status: int) -> str:
    """``NOT_SERVING`` for a Health/Check answer, the number for an unknown one."""
    try:
        return str(health_pb2.HealthCheckResponse.ServingStatus.Name(status))
    except ValueError:
        return str(status)


class HealthChecker:
    """Checks tracked endpoints with Health/Check and reports damped status changes.

    Use it as ``async with HealthChecker(settings, on_transition) as checker:`` or call
    :meth:`start` and :meth:`aclose` yourself. ``on_transition(key, transition)`` is
    awaited once per status change of a key, in order; its exceptions are logged. It
    runs while the key's check holds the key, so it must not await ``check_now(key)``.
    """

    def __init__(self, settings: HealthCheckSettings, on_transition: TransitionCallback) -> None:
        self._settings = settings
        self._on_transition = on_transition
        self._targets: dict[str, _Target] = {}
        self._endpoint_keys: Counter[str] = Counter()
        # (due on the monotonic clock, tie-breaker, target); stale entries are skipped.
        self._heap: list[tuple[float, int, _Target]] = []
        self._seq = itertools.count()
        self._wakeup = asyncio.Event()
        self._slots = asyncio.Semaphore(settings.max_concurrent_checks)
        self._channels: OrderedDict[str, _Channel] = OrderedDict()
        self._retired: set[_Channel] = set()
        backoff_ms = max(1, round(settings.interval * 1000))
        # Reconnect at least once per interval (the checker's, not a key's own): gRPC's
        # default backoff grows to 120 s, hiding for minutes that an endpoint came back.
        self._channel_options: list[tuple[str, Any]] = [
            ("grpc.initial_reconnect_backoff_ms", min(1000, backoff_ms)),
            ("grpc.max_reconnect_backoff_ms", backoff_ms),
        ]
        self._scheduler: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._random = random.Random()
        self._closed = False

    async def __aenter__(self) -> Self:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- control -----------------------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler task (once; later calls do nothing). Needs a running loop."""
        self._ensure_open()
        if self._scheduler is None:
            self._scheduler = asyncio.get_running_loop().create_task(
                self._schedule_checks(), name="flext-mesh-health-scheduler"
            )

    async def aclose(self) -> None:
        """Cancel the scheduler and every check, close every channel. Idempotent."""
        if self._closed:
            return
        self._closed = True
        current = asyncio.current_task()
        tasks = [task for task in self._tasks if task is not current]
        if self._scheduler is not None:
            tasks.append(self._scheduler)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        entries = [*self._channels.values(), *self._retired]
        self._channels.clear()
        self._retired.clear()
        self._targets.clear()
        self._endpoint_keys.clear()
        self._heap.clear()
        for entry in entries:
            await entry.channel.close()

    def track(
        self,
        key: str,
        endpoint: str,
        *,
        initial: int = HealthStatus.UNKNOWN,
        settings: HealthCheckSettings | None = None,
    ) -> None:
        """Check ``endpoint`` ("host:port") under ``key`` from now on.

        A new key (or a key given a different endpoint) starts from fresh stats with
        status ``initial`` (a :class:`HealthStatus` or its proto number; ValueError for
        any other) and is first checked at a random point within one interval.
        Tracking a key again with the same endpoint keeps its stats and schedule.
        ``settings`` overrides interval, timeout, thresholds and jitter for this key.
        """
        self._ensure_open()
        status = HealthStatus(initial)
        settings = self._settings if settings is None else settings
        current = self._targets.get(key)
        if current is not None and current.endpoint == endpoint:
            current.settings = settings
            return
        if current is not None:
            self._forget(current)
        target = _Target(key, endpoint, settings, CheckStats(status=status))
        self._targets[key] = target
        self._endpoint_keys[endpoint] += 1
        self._schedule(target, self._random.random() * settings.interval)

    def untrack(self, key: str) -> None:
        """Stop checking ``key``; a check of it in flight is discarded. No-op if unknown."""
        target = self._targets.pop(key, None)
        if target is not None:
            self._forget(target)

    def stats(self, key: str) -> CheckStats | None:
        """A copy of the stats of ``key``; None when it is not tracked."""
        target = self._targets.get(key)
        return None if target is None else replace(target.stats)

    def tracked(self) -> int:
        """How many keys are tracked."""
        return len(self._targets)

    def open_channels(self) -> int:
        """Channels open now: cached ones plus evicted ones still finishing a check."""
        return len(self._channels) + len(self._retired)

    async def check_now(self, key: str) -> CheckStats | None:
        """Check ``key`` now (after a check of it in flight) and return its stats then.

        ``on_transition`` has been awaited when this returns. None when ``key`` is not
        tracked, or stopped being tracked during the check.
        """
        target = self._targets.get(key)
        if target is None or self._closed:
            return None
        return await self._check(target)

    # -- scheduling ----------------------------------------------------------------------

    def _ensure_open(self) -> None:
        if self._closed:
            raise RuntimeError("HealthChecker is closed")

    def _is_current(self, target: _Target) -> bool:
        """The target is still what its key is tracked as (not untracked nor replaced)."""
        return not self._closed and self._targets.get(target.key) is target

    def _schedule(self, target: _Target, delay: float) -> None:
        heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), target))
        self._wakeup.set()

    async def _schedule_checks(self) -> None:
        """The one scheduler: start each due check, then plan the next one of its key."""
        while True:
            self._wakeup.clear()
            delay = self._heap[0][0] - time.monotonic() if self._heap else None
            if delay is None or delay > 0:
                # Sleep until the earliest check is due, or until track() adds one.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._wakeup.wait()
                continue
            _, _, target = heapq.heappop(self._heap)
            if not self._is_current(target):
                continue
            settings = target.settings
            spread = settings.interval * settings.jitter
            self._schedule(target, settings.interval + self._random.uniform(-spread, spread))
            if target.lock.locked():
                continue  # its previous check is still queued or running: skip this round
            self._spawn(self._check(target), f"flext-mesh-health-check:{target.key}")

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> None:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            _log.error("health task failed task=%s", task.get_name(), exc_info=exc)

    def _forget(self, target: _Target) -> None:
        """Account for ``target`` no longer being tracked (its key is already gone)."""
        self._endpoint_keys[target.endpoint] -= 1
        if self._endpoint_keys[target.endpoint] <= 0:
            del self._endpoint_keys[target.endpoint]
            entry = self._channels.pop(target.endpoint, None)
            if entry is not None:
                self._retire(entry)

    # -- checking ------------------------------------------------------------------------

    async def _check(self, target: _Target) -> CheckStats | None:
        """One check of ``target``: probe, record, notify. None when it was discarded."""
        async with target.lock:
            async with self._slots:
                if not self._is_current(target):
                    return None
                outcome = await self._probe(target)
            if not self._is_current(target):
                return None
            transition = self._record(target, outcome)
            snapshot = replace(target.stats)
            if transition is not None:
                await self._notify(target, transition)
            return snapshot

    async def _probe(self, target: _Target) -> _Outcome:
        """Call Health/Check on the target's endpoint, bounded by its timeout."""
        timeout = target.settings.timeout
        try:
            entry = self._channel(target.endpoint)
        except TransportError as exc:  # a TLS file gone or broken since start-up
            return _Outcome(False, None, _short(str(exc)))
        entry.users += 1
        started = time.monotonic()
        try:
            response = await entry.stub.Check(
                health_pb2.HealthCheckRequest(service=""), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                return _Outcome(False, None, f"no answer within {timeout:g}s")
            return _Outcome(False, None, _short(f"{exc.code().name}: {exc.details() or ''}"))
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            # grpc.aio raises CancelledError in the caller when aclose() closes the
            # channel under a check_now(); that caller was not cancelled itself.
            return _Outcome(False, None, "CANCELLED: channel closed")
        except Exception as exc:  # a bad target or a broken channel: a failed check
            return _Outcome(False, None, _short(f"{type(exc).__name__}: {exc}"))
        finally:
            await self._release(entry)
        latency_ms = (time.monotonic() - started) * 1000.0
        if response.status == health_pb2.HealthCheckResponse.SERVING:
            return _Outcome(True, latency_ms, "")
        return _Outcome(False, latency_ms, f"answered {_status_name(response.status)}")

    def _record(self, target: _Target, outcome: _Outcome) -> HealthTransition | None:
        """Count the outcome and apply the thresholds; the transition if status changed."""
        stats = target.stats
        stats.total_checks += 1
        stats.last_check_at = time.time()
        if outcome.latency_ms is not None:
            if stats.ewma_latency_ms == 0.0:
                stats.ewma_latency_ms = outcome.latency_ms
            else:
                stats.ewma_latency_ms += _EWMA_ALPHA * (outcome.latency_ms - stats.ewma_latency_ms)
        if outcome.passed:
            stats.passed_checks += 1
            stats.consecutive_passes += 1
            stats.consecutive_failures = 0
            stats.last_error = ""
        else:
            stats.consecutive_failures += 1
            stats.consecutive_passes = 0
            stats.last_error = outcome.error
        old = stats.status
        new = _next_status(
            old, stats.consecutive_passes, stats.consecutive_failures, target.settings
        )
        if new is old:
            return None
        stats.status = new
        if outcome.passed:
            reason = f"{stats.consecutive_passes} consecutive passes"
        else:
            reason = f"{stats.consecutive_failures} consecutive failures, last: {outcome.error}"
        return HealthTransition(old, new, replace(stats), reason)

    async def _notify(self, target: _Target, transition: HealthTransition) -> None:
        _log.debug(
            "health changed key=%s endpoint=%s old=%s new=%s reason=%r",
            target.key,
            target.endpoint,
            transition.old.name,
            transition.new.name,
            transition.reason,
        )
        try:
            await self._on_transition(target.key, transition)
        except Exception:
            _log.exception("health on_transition failed key=%s", target.key)

    # -- channels ------------------------------------------------------------------------

    def _channel(self, endpoint: str) -> _Channel:
        """The cached channel to ``endpoint``, opened (and the LRU one evicted) if needed."""
        entry = self._channels.get(endpoint)
        if entry is not None:
            self._channels.move_to_end(endpoint)
            return entry
        channel = open_channel(endpoint, self._settings.security, options=self._channel_options)
        entry = _Channel(channel, health_pb2_grpc.HealthStub(channel))
        self._channels[endpoint] = entry
        while len(self._channels) > self._settings.max_channels:
            _, oldest = self._channels.popitem(last=False)
            self._retire(oldest)
        return entry

    def _retire(self, entry: _Channel) -> None:
        """Close a channel that left the cache, once no check uses it any more."""
        entry.retired = True
        self._retired.add(entry)
        if entry.users == 0:
            self._spawn(self._close(entry), "flext-mesh-health-close-channel")

    async def _release(self, entry: _Channel) -> None:
        entry.users -= 1
        if entry.retired and entry.users == 0:
            await self._close(entry)

    async def _close(self, entry: _Channel) -> None:
        # No call is active on it, so close() cancels nothing and does not wait.
        self._retired.discard(entry)
        await entry.channel.close()
