"""Event-loop lag: how late the loop runs a timer, and the time it could not run at all.

A :class:`LoopLagMonitor` asks the loop to wake it every ``interval`` (0.1 s) and
measures how late each wake-up comes. That *lag* is time nothing could run on the
loop: a blocking call, a long callback, CPU-heavy work, a process starved of CPU. The
monitor keeps

- every lag in histogram buckets (:data:`LAG_BUCKETS_SECONDS`) and their sum, the
  *lost time* (``lost_seconds``);
- the largest lag since it started and within the last ``window`` (60 s);
- *stalls*: consecutive wake-ups each later than ``stall_threshold`` (0.25 s) make one
  stall; ``stalled_seconds`` adds up their lags. A stall is logged as a warning naming
  its length, at most once per ``warn_every`` (10 s) with a count of the others.

A wake-up that is overdue but has not run yet (the loop is stuck, or is back and has
not reached the monitor) already counts, up to now, in ``lost_seconds``,
``stalled_seconds`` and ``stalls``: whatever runs first after a stall sees it. Read on
the loop, these totals only grow. Reads from another thread (a ``/metrics`` scrape) go
through :meth:`LoopLagMonitor.snapshot`, whose bucket counts always agree with its
count.

The owner calls ``start()`` on the loop and ``await aclose()`` when it stops. Cost: ten
wake-ups a second, a few microseconds each.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

__all__ = ["LAG_BUCKETS_SECONDS", "LagSnapshot", "LoopLagMonitor"]

from flext_mesh.buckets import CALL_BUCKETS_SECONDS

_log = logging.getLogger("flext_mesh.loop")

#: Upper bounds (seconds, ascending, +Inf implied) of the lag histogram: a healthy loop
#: lands in the first buckets (the timer's own resolution is about 1 ms). The call
#: histograms' bounds, so lag and call latency read on one scale.
LAG_BUCKETS_SECONDS: tuple[float, ...] = CALL_BUCKETS_SECONDS


@dataclass(frozen=True, slots=True, kw_only=True)
class LagSnapshot:
    """The monitor's record at one moment, shaped as a Prometheus histogram."""

    #: Bucket upper bounds in seconds, ascending, without +Inf.
    bucket_bounds: tuple[float, ...]
    #: Wake-ups with a lag <= each bound, cumulative, then the +Inf count last.
    cumulative_counts: tuple[int, ...]
    #: Lags added up: the time the loop lost, seconds.
    sum_seconds: float
    #: Wake-ups measured; equals the +Inf count.
    count: int
    #: The largest lag since the monitor started, seconds.
    max_seconds: float
    #: The largest lag within the monitor's window, seconds.
    recent_max_seconds: float


class LoopLagMonitor:
    """Measures the event loop's lag and lost time (see the module docstring)."""

    def __init__(
        self,
        *,
        interval: float = 0.1,
        stall_threshold: float = 0.25,
        window: float = 60.0,
        log_stalls: bool = True,
        warn_every: float = 10.0,
        buckets: Sequence[float] = LAG_BUCKETS_SECONDS,
    ) -> None:
        """``interval``: seconds between wake-ups; ``stall_threshold``: a wake-up later
        than this is (part of) a stall; ``window``: seconds the recent maximum covers;
        ``log_stalls``: warn about stalls (one monitor per process should)."""
        if interval <= 0 or stall_threshold <= 0 or window <= 0:
            raise ValueError("interval, stall_threshold and window must be positive")
        self.interval = interval
        self.stall_threshold = stall_threshold
        self._window = window
        self._log_stalls = log_stalls
        self._warn_every = warn_every
        self._bounds = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self._bounds) + 1)
        self._sum = 0.0
        self._max = 0.0
        # (time, lag) with lags strictly decreasing: the window's maximum is first.
        self._recent: deque[tuple[float, float]] = deque()
        self._recent_max = 0.0
        self._stalled = 0.0
        self._stalls = 0
        self._in_stall = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._time: Callable[[], float] = time.monotonic  # the loop's clock once started
        self._task: asyncio.Task[None] | None = None
        self._due = math.inf  # loop time the next wake-up is due; inf when not running
        self._next_warning = -math.inf
        self._unwarned = 0  # stalls left out of the log by the rate limit
        self._unwarned_max = 0.0

    # -- lifecycle ---------------------------------------------------------------

    def start(self) -> None:
        """Start measuring on the running loop; again after ``aclose`` goes on counting."""
        if self._task is not None and not self._task.done():
            raise RuntimeError("the loop lag monitor is already running")
        loop = asyncio.get_running_loop()
        self._loop, self._time = loop, loop.time
        self._due = loop.time() + self.interval
        self._task = loop.create_task(self._run(), name="loop-lag-monitor")

    async def aclose(self) -> None:
        """Stop measuring (an overdue wake-up is counted first); totals stay readable."""
        task, loop = self._task, self._loop
        if task is None or loop is None or task.done():
            return
        overdue = loop.time() - self._due
        if overdue > 0:
            self._record(overdue, loop.time())
        self._due = math.inf
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        loop = self._loop
        assert loop is not None
        while True:
            await asyncio.sleep(max(0.0, self._due - loop.time()))
            now = loop.time()
            self._record(max(0.0, now - self._due), now)
            self._due = now + self.interval

    def _record(self, lag: float, now: float) -> None:
        self._counts[bisect_left(self._bounds, lag)] += 1
        self._sum += lag
        self._max = max(self._max, lag)
        recent = self._recent
        while recent and recent[-1][1] <= lag:
            recent.pop()
        recent.append((now, lag))
        while recent[0][0] < now - self._window:
            recent.popleft()
        self._recent_max = recent[0][1]
        if lag <= self.stall_threshold:
            self._in_stall = False
            return
        self._stalled += lag
        if not self._in_stall:
            self._stalls += 1
            self._in_stall = True
        if self._log_stalls:
            self._warn(lag, now)

    def _warn(self, lag: float, now: float) -> None:
        if now < self._next_warning:
            self._unwarned += 1
            self._unwarned_max = max(self._unwarned_max, lag)
            return
        others = ""
        if self._unwarned:
            others = (
                f"; {self._unwarned} more over {self.stall_threshold:g} s since the last "
                f"warning, the longest {self._unwarned_max:.2f} s"
            )
        _log.warning(
            "event loop stalled for %.2f s: nothing else ran on it meanwhile "
            "(RPCs, lease renewals, sweeps waited)%s",
            lag,
            others,
        )
        self._next_warning = now + self._warn_every
        self._unwarned = 0
        self._unwarned_max = 0.0

    # -- readings ----------------------------------------------------------------

    def _overdue(self) -> float:
        return max(0.0, self._time() - self._due)

    @property
    def lost_seconds(self) -> float:
        """Time the loop could not run, seconds: every lag, an overdue wake-up included."""
        return self._sum + self._overdue()

    def stall_totals(self) -> tuple[float, int]:
        """``(stalled seconds, stalls)`` up to now, a stall still going on included.

        One reading for both, as lease expiry asks for it on every renewal."""
        overdue = self._time() - self._due
        if overdue <= self.stall_threshold:
            return self._stalled, self._stalls
        return self._stalled + overdue, self._stalls + (0 if self._in_stall else 1)

    @property
    def stalled_seconds(self) -> float:
        """Lags of the wake-ups later than the stall threshold, added up, seconds."""
        return self.stall_totals()[0]

    @property
    def stalls(self) -> int:
        """Stalls seen: runs of consecutive wake-ups later than the stall threshold."""
        return self.stall_totals()[1]

    @property
    def max_lag(self) -> float:
        """The largest lag since the monitor started, seconds."""
        return max(self._max, self._overdue())

    @property
    def recent_max_lag(self) -> float:
        """The largest lag within the last ``window`` seconds."""
        return max(self._recent_max, self._overdue())

    def snapshot(self) -> LagSnapshot:
        """The histogram and maxima now; safe to call from any thread."""
        counts = tuple(self._counts)  # one copy: the buckets agree with the count
        cumulative = tuple(itertools.accumulate(counts))
        return LagSnapshot(
            bucket_bounds=self._bounds,
            cumulative_counts=cumulative,
            sum_seconds=self._sum,
            count=cumulative[-1],
            max_seconds=self.max_lag,
            recent_max_seconds=self.recent_max_lag,
        )
