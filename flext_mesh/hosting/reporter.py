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
  backoff and jitter (capped), never sooner than a ``google.rpc.RetryInfo`` that came
  with RESOURCE_EXHAUSTED says (the control plane's rate limit); the buffer keeps
  accepting records and drops the OLDEST beyond ``max_buffer``; each batch tells the
  control plane how many records were dropped since the previous one
  (``dropped_since_last``).

Delivery guarantee: **exactly once per control-plane replica.** Every batch gets a
sequence number (1, 2, 3, ...) under :attr:`CallReporter.batch_reporter_id` when it
leaves the buffer, and keeps it. Batches written to a stream stay held ("in flight")
until the control plane answers for that stream. If the stream fails first, they are
sent again, with their sequence numbers, one ``ReportCalls`` each (each acknowledged
by itself, so a stream that keeps failing part-way cannot hold them back) before new
batches go out on the next stream. The control plane counts a batch once per
(reporter id, sequence), so the batches it had received before the failure are
acknowledged again, not counted again. A batch re-sent to another replica after a
failover may be counted twice. Records are lost only when they are dropped from a
full buffer (counted in ``dropped``), refused by the control plane (``rejected``),
or still held when :meth:`CallReporter.aclose` gives up.

Memory is bounded: at most ``max_buffer`` records wait in the buffer, plus at most
``stream_max_records + batch_size`` in numbered batches (in flight or waiting to be
sent again). Every record is accounted for::

    recorded == sent + dropped + buffered + in_flight
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any

import grpc

from flext_mesh.errors import ResourceExhausted
from flext_mesh.retry import Backoff, RetrySpec
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc

__all__ = ["MAX_BATCH", "CallReporter", "ChannelSource", "ReporterSettings", "ReporterStats"]

_log = logging.getLogger("flext_sidecar.reporter")

#: Most records the control plane takes in one batch.
MAX_BATCH = 10_000
#: Longest reporter id the control plane takes (metrics.proto), suffix included.
_MAX_REPORTER_ID = 256

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
    """First delay after a failed attempt (less up to half of it, at random); it doubles
    per failure."""
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
    """Records waiting to be sent (new, or in batches to send again)."""
    in_flight: int
    """Records sent and awaiting their acknowledgement."""
    rejected: int
    """Acknowledged records the control plane refused as invalid."""
    batches: int
    """Batches the control plane acknowledged."""
    duplicate_batches: int
    """Acknowledged batches the control plane had counted before (sent again after a
    failure that hid their first acknowledgement); counted once all the same."""


class _StreamFailed(Exception):
    """An attempt to deliver over one stream failed (already logged by the caller)."""

    def __init__(self, retry_after: float | None = None) -> None:
        super().__init__(retry_after)
        #: Seconds the control plane asked to wait (RetryInfo), when it did.
        self.retry_after = retry_after


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
        suffix = secrets.token_hex(6)
        base = "".join(c for c in reporter_id if c.isprintable())
        #: The id the batches carry: ``reporter_id`` and a random suffix drawn now. The
        #: control plane deduplicates by (this id, batch sequence), and the sequence
        #: starts again at 1 in a new process: the same id would make its first
        #: batches look like copies of the old process's ones.
        self.batch_reporter_id = f"{base[: _MAX_REPORTER_ID - len(suffix) - 1]}~{suffix}"
        self.settings = settings or ReporterSettings()
        self._channel = channel
        self._max_buffer = self.settings.max_buffer
        self._batch_size = self.settings.batch_size
        self._buffer: deque[metrics_pb2.CallRecord] = deque(maxlen=self._max_buffer)
        # When the oldest waiting record arrived (approximately), time.monotonic().
        self._first_at = 0.0
        self._sequence = 0  # of the last batch taken from the buffer
        # Numbered batches of failed attempts, oldest first, to send again as they are.
        self._resend: deque[metrics_pb2.StreamCallsRequest] = deque()
        self._resend_count = 0
        self._in_flight: list[metrics_pb2.StreamCallsRequest] = []
        self._in_flight_count = 0
        self._recorded = 0
        self._sent = 0
        self._dropped = 0
        self._dropped_reported = 0
        self._failed_flushes = 0
        # Waits after failed attempts; its ``failures`` counts the consecutive ones.
        self._backoff = Backoff(
            RetrySpec(
                initial_backoff=self.settings.backoff_initial,
                max_backoff=self.settings.backoff_max,
                jitter=0.5,
            )
        )
        self._rejected = 0
        self._batches = 0
        self._duplicates = 0
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
            buffered=len(self._buffer) + self._resend_count,
            in_flight=self._in_flight_count,
            rejected=self._rejected,
            batches=self._batches,
            duplicate_batches=self._duplicates,
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
                    len(self._buffer) + self._resend_count + self._in_flight_count,
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
        if self._closing and not self._flush_on_close:
            return False
        if self._resend:
            return True  # overdue: send as soon as the control plane is there
        size = len(self._buffer)
        if size == 0:
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
        backoff = self._backoff
        while await self._wait_due(None):
            try:
                await self._stream_once()
            except _StreamFailed as failed:
                self._failed_flushes += 1
                delay = next(backoff)
                if failed.retry_after is not None:
                    # The control plane said when (its rate limit): no sooner.
                    delay = max(delay, failed.retry_after)
                # Flushing on close keeps retrying until aclose() gives up.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await self._abandon.wait()
                continue
            if backoff.failures:
                _log.info("call reporting resumed after %d failed attempts", backoff.failures)
            backoff.reset()

    async def _stream_once(self) -> None:
        """Send again the batches of failed attempts, then due batches over one stream
        until it is due to rotate, then close it."""
        settings = self.settings
        try:
            channel = self._channel()
            async with asyncio.timeout(settings.connect_timeout):
                await channel.channel_ready()
        except Exception as exc:
            self._log_failure("control plane unreachable", exc)
            raise _StreamFailed from exc
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        if self._resend:
            await self._send_again(stub)
            if not self._due():
                return  # no stream is held open while idle
        call = stub.StreamCalls(timeout=settings.stream_max_age + settings.ack_timeout)
        # A stream that fails while idle wakes the flusher, which requeues its records.
        call.add_done_callback(lambda _: self._wake.set())
        rotate_at = time.monotonic() + settings.stream_max_age
        try:
            while self._in_flight_count < settings.stream_max_records and await self._wait_due(
                rotate_at, call
            ):
                await call.write(self._take_batch())
            await call.done_writing()
            response = await call
        except asyncio.CancelledError:
            call.cancel()
            self._requeue()
            raise
        except Exception as exc:
            error = await _status_of(call, exc)
            call.cancel()
            self._requeue()
            self._log_failure("call stream failed", error)
            raise _StreamFailed(_retry_after(error)) from exc
        self._acknowledge(response)

    async def _send_again(self, stub: metrics_pb2_grpc.MetricsServiceAsyncStub) -> None:
        """Send the batches of failed attempts again, one ReportCalls each, concurrently.

        Each is acknowledged by itself: a stream that a rate limit ends after its first
        batches would make every later attempt pay for those again and never get
        further. A batch the control plane refuses as a whole (INVALID_ARGUMENT, or
        RESOURCE_EXHAUSTED without RetryInfo: its series limit) is acknowledged as
        rejected, not retried for ever. Raises _StreamFailed when some remain.
        """
        batches = list(self._resend)
        self._resend.clear()
        self._resend_count = 0
        self._in_flight.extend(batches)
        self._in_flight_count += sum(len(b.records) for b in batches)
        timeout = self.settings.ack_timeout + self.settings.connect_timeout
        try:
            results = await asyncio.gather(
                *(
                    stub.ReportCalls(
                        metrics_pb2.ReportCallsRequest(
                            records=batch.records,
                            reporter_id=batch.reporter_id,
                            batch_sequence=batch.batch_sequence,
                        ),
                        timeout=timeout,
                    )
                    for batch in batches
                ),
                return_exceptions=True,
            )
        except asyncio.CancelledError:
            self._requeue()
            raise
        failed: list[metrics_pb2.StreamCallsRequest] = []
        errors: list[BaseException] = []
        for batch, result in zip(batches, results, strict=True):
            size = len(batch.records)
            if isinstance(result, metrics_pb2.ReportCallsResponse):
                self._sent += size
                self._rejected += len(result.rejected)
                self._batches += 1
                self._duplicates += result.duplicate
            elif _refused_for_good(result):
                assert isinstance(result, grpc.aio.AioRpcError)
                _log.warning(
                    "control plane refused a batch of %d call records (%s: %s)",
                    size,
                    result.code().name,
                    result.details(),
                )
                self._sent += size
                self._rejected += size
                self._batches += 1
            else:
                failed.append(batch)
                errors.append(result)
        self._in_flight = failed
        self._in_flight_count = sum(len(b.records) for b in failed)
        if failed:
            self._requeue()
            self._log_failure("sending call records again failed", errors[0])
            waits = [w for w in map(_retry_after, errors) if w is not None]
            raise _StreamFailed(max(waits) if waits else None)

    def _take_batch(self) -> metrics_pb2.StreamCallsRequest:
        """Number the next batch of up to ``batch_size`` buffered records; it is in flight."""
        buffer = self._buffer
        count = min(self._batch_size, len(buffer))
        records = [buffer.popleft() for _ in range(count)]
        if buffer:
            self._first_at = time.monotonic()
        dropped = self._dropped - self._dropped_reported
        self._dropped_reported = self._dropped
        self._sequence += 1
        batch = metrics_pb2.StreamCallsRequest(
            records=records,
            reporter_id=self.batch_reporter_id,
            dropped_since_last=dropped,
            batch_sequence=self._sequence,
        )
        self._in_flight.append(batch)
        self._in_flight_count += count
        return batch

    def _acknowledge(self, response: metrics_pb2.StreamCallsResponse) -> None:
        """The control plane answered for the stream: its records are delivered."""
        self._sent += self._in_flight_count
        self._rejected += response.rejected_count
        self._batches += response.batches
        self._duplicates += response.duplicate_batches
        _log.debug(
            "call stream acknowledged records=%d accepted=%d rejected=%d batches=%d duplicates=%d",
            self._in_flight_count,
            response.accepted,
            response.rejected_count,
            response.batches,
            response.duplicate_batches,
        )
        for rejected in response.rejected[:3]:
            _log.debug(
                "control plane rejected a call record field=%s reason=%s",
                rejected.field,
                rejected.reason,
            )
        self._in_flight.clear()
        self._in_flight_count = 0

    def _requeue(self) -> None:
        """Unacknowledged batches go back, numbered as they are, to be sent again first."""
        for batch in self._in_flight:
            # Drops reported with a batch that may not have arrived are reported again,
            # with the next new batch (ReportCalls does not carry them).
            self._dropped_reported -= batch.dropped_since_last
            batch.dropped_since_last = 0
        self._resend.extendleft(reversed(self._in_flight))
        self._resend_count += self._in_flight_count
        self._in_flight = []
        self._in_flight_count = 0

    def _log_failure(self, what: str, exc: BaseException) -> None:
        """WARNING on the first failure of a run of failures, DEBUG after."""
        detail = (
            f"{exc.code().name}: {exc.details()}"
            if isinstance(exc, grpc.aio.AioRpcError)
            else (type(exc).__name__ if isinstance(exc, TimeoutError) else repr(exc))
        )
        level = logging.DEBUG if self._backoff.failures else logging.WARNING
        _log.log(
            level,
            "%s (%s); retrying with backoff, %d records buffered",
            what,
            detail,
            len(self._buffer) + self._resend_count + self._in_flight_count,
        )


async def _status_of(call: grpc.aio.StreamUnaryCall[Any, Any], exc: Exception) -> BaseException:
    """The error with the call's status (and its RetryInfo) when the call has ended:
    a write to a stream the server already ended may fail with a plainer exception."""
    if isinstance(exc, grpc.aio.AioRpcError) or not call.done():
        return exc
    try:
        await call
    except grpc.aio.AioRpcError as status:
        return status
    except Exception:  # not a status: keep the first error
        return exc
    return exc


def _retry_after(error: BaseException) -> float | None:
    """Seconds a RESOURCE_EXHAUSTED's RetryInfo asks to wait, or None."""
    if isinstance(error, grpc.aio.AioRpcError):
        mapped = from_rpc_error(error)
        if isinstance(mapped, ResourceExhausted):
            return mapped.retry_after
    return None


def _refused_for_good(error: BaseException) -> bool:
    """Whether re-sending the batch would be refused again (not worth retrying)."""
    if not isinstance(error, grpc.aio.AioRpcError):
        return False
    code = error.code()
    return code is grpc.StatusCode.INVALID_ARGUMENT or (
        code is grpc.StatusCode.RESOURCE_EXHAUSTED and _retry_after(error) is None
    )
