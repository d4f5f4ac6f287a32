"""Call reporting: a bounded buffer of call records, flushed in batches over StreamCalls.

The sidecar calls :meth:`CallReporter.record` (or :meth:`CallReporter.record_call`) once
per call, on the event loop thread; that is an O(1) append that never blocks and never
raises. One background task owned by the reporter sends the buffer to the control
plane in batches over one long-lived ``MetricsService.StreamCalls`` client stream:

* a batch leaves when ``batch_size`` records are waiting, or ``flush_interval`` seconds
  after the oldest waiting record arrived (measured from when the buffer last became
  non-empty or a batch was last taken from it), whichever comes first;
* the stream is closed and reopened every ``stream_max_age`` seconds or after
  ``stream_max_records`` records, so that the control plane's answer (accepted and
  rejected counts, logged at DEBUG) acknowledges what was written on it, and no
  stream is held open while the reporter is idle;
* while the control plane is unreachable the reporter retries with exponential
  backoff and jitter (capped), the buffer keeps accepting records and drops the
  OLDEST beyond ``max_buffer``; each batch tells the control plane how many records
  were dropped since the previous one (``dropped_since_last``).

Delivery guarantee: **at least once, best effort.** Records written to a stream stay
held ("in flight") until the control plane answers for that stream. If the stream
fails first, they go back to the front of the buffer and are sent again on the next
stream. The control plane folds batches in as they arrive, so a stream that fails
after some batches were received (for instance a lost answer) leads to those records
being counted twice. Records are lost only when they are dropped from a full buffer
(counted in ``dropped``) or still buffered when :meth:`CallReporter.aclose` gives up.

Memory is bounded: at most ``max_buffer`` records wait, plus at most
``stream_max_records + batch_size`` in flight. Every record is accounted for::

    recorded == sent + dropped + buffered + in_flight
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

import grpc

from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc

__all__ = ["MAX_BATCH", "CallReporter", "ChannelSource", "ReporterSettings", "ReporterStats"]

_log = logging.getLogger("flext_sidecar.reporter")

#: Most records the control plane takes in one batch.
MAX_BATCH = 10_000

#: Returns the channel to the control plane to use now (the owner may fail over).
ChannelSource = Callable[[], grpc.aio.Channel]


@dataclass(frozen=True, kw_only=True, slots=True)
class ReporterSettings:
    """How a :class:`CallReporter` buffers and sends (all times in seconds)."""

    max_buffer: int = 50_000
    """Records waiting to be sent, at most; beyond it the oldest is dropped."""
    batch_size: int = 500
    """Records per batch, at most; a full batch is sent at once (1 to 10000)."""
    flush_interval: float = 1.0
    """A partial batch is sent this long after its oldest record arrived."""
    stream_max_age: float = 30.0
    """A stream is closed (and its records acknowledged) after this long."""
    stream_max_records: int = 10_000
    """A stream is closed after this many records were written on it."""
    ack_timeout: float = 10.0
    """Time the control plane has to answer once a stream is closed."""
    connect_timeout: float = 5.0
    """Time one attempt waits for the channel to be ready before backing off."""
    backoff_initial: float = 0.1
    """First delay after a failed attempt; it doubles per failure."""
    backoff_max: float = 5.0
    """Longest delay between attempts, jitter included."""

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= MAX_BATCH:
            raise ValueError(f"batch_size must be 1 to {MAX_BATCH}, got {self.batch_size}")
        if self.max_buffer < self.batch_size:
            raise ValueError(
                f"max_buffer ({self.max_buffer}) must be at least batch_size ({self.batch_size})"
            )
        if self.stream_max_records < 1:
            raise ValueError("stream_max_records must be at least 1")
        for name in (
            "flush_interval",
            "stream_max_age",
            "ack_timeout",
            "connect_timeout",
            "backoff_initial",
            "backoff_max",
        ):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a positive number of seconds, got {value}")


@dataclass(frozen=True, slots=True)
class ReporterStats:
    """A snapshot of a reporter's counters (``recorded == sent + dropped + buffered +
    in_flight``)."""

    recorded: int
    """Records handed to the reporter."""
    sent: int
    """Records the control plane acknowledged (including the ones it rejected)."""
    dropped: int
    """Records dropped because the buffer was full (or the reporter closed)."""
    failed_flushes: int
    """Attempts to connect or to complete a stream that failed."""
    buffered: int
    """Records waiting to be sent."""
    in_flight: int
    """Records written on the open stream, awaiting its acknowledgement."""
    rejected: int
    """Acknowledged records the control plane refused as invalid."""
    batches: int
    """Batches the control plane acknowledged."""


def _backoff(attempt: int, initial: float, cap: float) -> float:
    """Exponential backoff with "equal jitter": within [d/2, d], d = min(cap, initial * 2^n)."""
    delay = min(cap, initial * 2.0 ** min(attempt, 32))
    return delay / 2 + random.uniform(0, delay / 2)


class _StreamFailed(Exception):
    """An attempt to deliver over one stream failed (already logged by the caller)."""


class CallReporter:
    """Buffers call records and streams them to the control plane in batches.

    ``channel`` returns the channel to use for the next stream (called once per
    attempt, so the owner may switch control planes). Give that channel a short
    ``grpc.max_reconnect_backoff_ms`` so reconnection after an outage is prompt.
    Use ``async with`` or :meth:`start` / :meth:`aclose`; the reporter owns its task.
    """

    def __init__(
        self,
        channel: ChannelSource,
        *,
        reporter_id: str,
        settings: ReporterSettings | None = None,
    ) -> None:
        self.reporter_id = reporter_id
        self.settings = settings or ReporterSettings()
        self._channel = channel
        self._max_buffer = self.settings.max_buffer
        self._batch_size = self.settings.batch_size
        self._buffer: deque[metrics_pb2.CallRecord] = deque(maxlen=self._max_buffer)
        # When the oldest waiting record arrived (approximately), time.monotonic().
        self._first_at = 0.0
        self._in_flight: list[list[metrics_pb2.CallRecord]] = []
        self._in_flight_count = 0
        self._recorded = 0
        self._sent = 0
        self._dropped = 0
        self._dropped_reported = 0
        self._failed_flushes = 0
        self._failing = 0  # consecutive failed attempts
        self._rejected = 0
        self._batches = 0
        self._wake = asyncio.Event()  # a batch may be due, or closing
        self._abandon = asyncio.Event()  # closing without flushing: cut waits short
        self._closing = False
        self._flush_on_close = True
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    # -- recording (event loop thread only) --------------------------------------------

    def record(self, record: metrics_pb2.CallRecord) -> None:
        """Queue one record: O(1), never blocks, never raises; drops the oldest when full.

        Call it from the event loop thread only (the buffer and its wake-up event are
        not thread-safe); from another thread use ``loop.call_soon_threadsafe``.
        """
        self._recorded += 1
        if self._closed:
            self._dropped += 1
            return
        buffer = self._buffer
        size = len(buffer)
        if size == self._max_buffer:
            self._dropped += 1  # append() below pushes the oldest out
        elif size == 0:
            self._first_at = time.monotonic()
        buffer.append(record)
        if size == 0 or size + 1 == self._batch_size:
            # The first record starts the flush-interval clock of an idle flusher (which
            # waits without a timeout while the buffer is empty); a full batch is due now.
            self._wake.set()

    def record_call(
        self,
        service: str,
        operation: str,
        duration_ms: float,
        success: bool,
        status_code: int = 0,
        *,
        instance_id: str = "",
        version: str = "",
        correlation_id: str = "",
        side: metrics_pb2.CallSide.ValueType = metrics_pb2.CALL_SIDE_SERVER,
        caller_service: str = "",
    ) -> None:
        """Build a :class:`CallRecord` stamped now and :meth:`record` it (never raises)."""
        try:
            call = metrics_pb2.CallRecord(
                service_name=service,
                operation=operation,
                duration_ms=duration_ms,
                success=success,
                status_code=status_code,
                instance_id=instance_id,
                version=version,
                correlation_id=correlation_id,
                side=side,
                caller_service=caller_service,
                time_unix_nano=time.time_ns(),
            )
        except (TypeError, ValueError):
            # A malformed record must not break the call it describes.
            self._recorded += 1
            self._dropped += 1
            _log.debug("dropped a malformed call record service=%r", service, exc_info=True)
            return
        self.record(call)

    def stats(self) -> ReporterStats:
        """A snapshot of the counters."""
        return ReporterStats(
            recorded=self._recorded,
            sent=self._sent,
            dropped=self._dropped,
            failed_flushes=self._failed_flushes,
            buffered=len(self._buffer),
            in_flight=self._in_flight_count,
            rejected=self._rejected,
            batches=self._batches,
        )

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Start the background flusher (idempotent; needs a running event loop)."""
        if self._closing:
            raise RuntimeError("CallReporter is closed")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="sidecar-call-reporter")

    async def aclose(self, *, flush: bool = True, within: float = 5.0) -> None:
        """Stop the flusher, first sending what is buffered when ``flush`` (idempotent).

        Within ``within`` seconds the flusher sends the buffer (``flush=True``) or only
        closes its open stream; then it is cancelled. What was not delivered stays
        counted in ``buffered``; records recorded afterwards count as ``dropped``.
        """
        if not self._closing:
            self._closing = True
            self._flush_on_close = flush
            if not flush:
                self._abandon.set()
            self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=within)
            if not done:
                _log.warning(
                    "call reporter closing: gave up after %.1fs with %d records undelivered",
                    within,
                    len(self._buffer) + self._in_flight_count,
                )
                task.cancel()
                await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                _log.error("call reporter failed", exc_info=task.exception())
        self._closed = True

    async def __aenter__(self) -> CallReporter:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the flusher -------------------------------------------------------------------

    def _due(self) -> bool:
        """Whether a batch should leave now."""
        size = len(self._buffer)
        if size == 0 or (self._closing and not self._flush_on_close):
            return False
        if size >= self._batch_size or self._closing:
            return True
        return time.monotonic() - self._first_at >= self.settings.flush_interval

    async def _wait_due(self, until: float | None, stream: grpc.aio.Call | None = None) -> bool:
        """Wait until a batch is due (True); False at ``until`` (monotonic), on closing,
        or when ``stream`` ended."""
        while True:
            self._wake.clear()
            if stream is not None and stream.done():
                return False
            if self._due():
                return True
            if self._closing:
                return False
            now = time.monotonic()
            timeouts: list[float] = []
            if self._buffer:
                timeouts.append(self._first_at + self.settings.flush_interval - now)
            if until is not None:
                if now >= until:
                    return False
                timeouts.append(until - now)
            try:
                async with asyncio.timeout(min(timeouts) if timeouts else None):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _run(self) -> None:
        settings = self.settings
        while await self._wait_due(None):
            try:
                await self._stream_once()
            except _StreamFailed:
                self._failing += 1
                self._failed_flushes += 1
                delay = _backoff(self._failing - 1, settings.backoff_initial, settings.backoff_max)
                # Flushing on close keeps retrying until aclose() gives up.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._abandon.wait()
                continue
            if self._failing:
                _log.info("call reporting resumed after %d failed attempts", self._failing)
            self._failing = 0

    async def _stream_once(self) -> None:
        """Send due batches over one stream until it is due to rotate, then close it."""
        settings = self.settings
        try:
            channel = self._channel()
            async with asyncio.timeout(settings.connect_timeout):
                await channel.channel_ready()
        except Exception as exc:
            self._log_failure("control plane unreachable", exc)
            raise _StreamFailed from exc
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        call = stub.StreamCalls(timeout=settings.stream_max_age + settings.ack_timeout)
        # A stream that fails while idle wakes the flusher, which requeues its records.
        call.add_done_callback(lambda _: self._wake.set())
        rotate_at = time.monotonic() + settings.stream_max_age
        dropped_reported_at_open = self._dropped_reported
        try:
            while self._in_flight_count < settings.stream_max_records and await self._wait_due(
                rotate_at, call
            ):
                await call.write(self._take_batch())
            await call.done_writing()
            response = await call
        except asyncio.CancelledError:
            call.cancel()
            self._requeue(dropped_reported_at_open)
            raise
        except Exception as exc:
            call.cancel()
            self._requeue(dropped_reported_at_open)
            self._log_failure("call stream failed", exc)
            raise _StreamFailed from exc
        self._acknowledge(response)

    def _take_batch(self) -> metrics_pb2.StreamCallsRequest:
        """Move up to ``batch_size`` records from the buffer to the in-flight batches."""
        buffer = self._buffer
        count = min(self._batch_size, len(buffer))
        batch = [buffer.popleft() for _ in range(count)]
        if buffer:
            self._first_at = time.monotonic()
        self._in_flight.append(batch)
        self._in_flight_count += count
        dropped = self._dropped - self._dropped_reported
        self._dropped_reported = self._dropped
        return metrics_pb2.StreamCallsRequest(
            records=batch, reporter_id=self.reporter_id, dropped_since_last=dropped
        )

    def _acknowledge(self, response: metrics_pb2.StreamCallsResponse) -> None:
        """The control plane answered for the stream: its records are delivered."""
        self._sent += self._in_flight_count
        self._rejected += response.rejected_count
        self._batches += response.batches
        _log.debug(
            "call stream acknowledged records=%d accepted=%d rejected=%d batches=%d",
            self._in_flight_count,
            response.accepted,
            response.rejected_count,
            response.batches,
        )
        for rejected in response.rejected[:3]:
            _log.debug(
                "control plane rejected a call record field=%s reason=%s",
                rejected.field,
                rejected.reason,
            )
        self._in_flight.clear()
        self._in_flight_count = 0

    def _requeue(self, dropped_reported: int) -> None:
        """Put unacknowledged records back in front of the buffer (oldest dropped if full)."""
        # Drops reported on the failed stream may not have arrived: report them again.
        self._dropped_reported = dropped_reported
        if not self._in_flight:
            return
        held = self._in_flight_count + len(self._buffer)
        self._buffer = deque(
            itertools.chain(itertools.chain.from_iterable(self._in_flight), self._buffer),
            maxlen=self._max_buffer,
        )
        self._dropped += held - len(self._buffer)
        self._first_at = 0.0  # they are overdue: send as soon as a stream is up
        self._in_flight.clear()
        self._in_flight_count = 0

    def _log_failure(self, what: str, exc: BaseException) -> None:
        """WARNING on the first failure of a run of failures, DEBUG after."""
        detail = (
            f"{exc.code().name}: {exc.details()}"
            if isinstance(exc, grpc.aio.AioRpcError)
            else (type(exc).__name__ if isinstance(exc, TimeoutError) else repr(exc))
        )
        level = logging.DEBUG if self._failing else logging.WARNING
        _log.log(
            level,
            "%s (%s); retrying with backoff, %d records buffered",
            what,
            detail,
            len(self._buffer) + self._in_flight_count,
        )
