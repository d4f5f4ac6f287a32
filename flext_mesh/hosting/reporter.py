"""Call reporting: a bounded buffer of call records, delivered in acknowledged batches.

The sidecar calls :meth:`CallReporter.record` (or :meth:`CallReporter.record_call`) once
per call, on the event loop thread; that is an O(1) append that never blocks and never
raises. One background task owned by the reporter sends the buffer to the control
plane in numbered batches over one long-lived ``MetricsService.DeliverCalls`` stream,
which acknowledges each batch once its records are durably counted:

* a batch leaves when ``batch_size`` records are waiting, or ``flush_interval`` seconds
  after the oldest waiting record arrived (measured from when the buffer last became
  non-empty or a batch was last taken from it), whichever comes first;
* at most ``max_unacknowledged`` records are written and not yet acknowledged; past
  that the reporter waits for acknowledgements (the buffer keeps filling);
* a batch not acknowledged within ``ack_timeout`` of being written fails the stream (a
  control plane that hangs is left, as one that is gone);
* the stream is closed, once its batches are acknowledged, and a new one opened when
  due, every ``stream_max_age`` seconds or after ``stream_max_records`` records;
* while the control plane is unreachable the reporter retries with exponential
  backoff and jitter (capped), never sooner than a ``google.rpc.RetryInfo`` that came
  with RESOURCE_EXHAUSTED says (the control plane's rate limit); the buffer keeps
  accepting records and drops the OLDEST beyond ``max_buffer``; each batch tells the
  control plane how many records were dropped since the previous one
  (``dropped_since_last``).

Delivery guarantee: **exactly once, across control-plane replicas.** Every batch gets
a sequence number (1, 2, 3, ...) under :attr:`CallReporter.batch_reporter_id` when it
leaves the buffer, and keeps it. It is held only until its acknowledgement: when a
stream fails, the batches written on it and not acknowledged are sent again, with
their numbers and before any new batch, one ``ReportCalls`` each (each acknowledged,
or refused with its own status and RetryInfo, by itself), to whichever replica the
channel reaches next. The control planes share one ledger of counted (reporter id, sequence)
pairs, written with the records, so a batch counted before its acknowledgement was
lost is acknowledged again as a copy (``duplicate_batches``), never counted again.
A control plane without ``DeliverCalls`` (older than the reporter) gets each batch by
``ReportCalls``, acknowledged by its answer, with the same guarantee. Records are
lost only when they are dropped from a full buffer (counted in ``dropped``), refused
by the control plane (``rejected``), or still held when :meth:`CallReporter.aclose`
gives up.

Memory is bounded: at most ``max_buffer`` records wait in the buffer, plus at most
``max_unacknowledged + batch_size`` in numbered batches (written and not acknowledged,
or waiting to be sent again). Every record is accounted for::

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
#: How long a reporter that found no DeliverCalls uses ReportCalls before trying again.
_UNARY_FOR = 300.0

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
    max_unacknowledged: int = 10_000
    """Records written and not yet acknowledged, at most (at least ``batch_size``)."""
    stream_max_age: float = 30.0
    """A stream is closed (once its batches are acknowledged) after this long."""
    stream_max_records: int = 10_000
    """A stream is closed after this many records were written on it."""
    ack_timeout: float = 10.0
    """Time the control plane has to acknowledge a batch written to it."""
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
        if self.max_unacknowledged < self.batch_size:
            raise ValueError(
                f"max_unacknowledged ({self.max_unacknowledged}) must be at least "
                f"batch_size ({self.batch_size})"
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


class _Unimplemented(Exception):
    """The control plane has no DeliverCalls (it is older than this reporter)."""


class CallReporter:
    """Buffers call records and delivers them to the control plane in batches.

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
        # Numbered batches not acknowledged yet, by sequence, oldest first, and their
        # records; of those, the ones written on the open stream (with when), and the
        # ones to send (again) before any new batch.
        self._unacked: dict[int, metrics_pb2.DeliverCallsRequest] = {}
        self._unacked_count = 0
        self._written: dict[int, float] = {}
        self._written_count = 0
        self._pending: deque[int] = deque()
        # Until when the control plane is taken to lack DeliverCalls (monotonic).
        self._unary_until = 0.0
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
        self._wake = asyncio.Event()  # a batch may be due, an ack came, or closing
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
            buffered=len(self._buffer) + self._unacked_count - self._written_count,
            in_flight=self._written_count,
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

        Within ``within`` seconds the flusher sends the buffer and waits for its
        acknowledgements (``flush=True``), or only waits for the acknowledgements of
        what it wrote; then it is cancelled. What was not delivered stays counted in
        ``buffered`` or ``in_flight``; records recorded afterwards count as ``dropped``.
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
                    len(self._buffer) + self._unacked_count,
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

    # -- what to send ------------------------------------------------------------------

    def _buffer_due(self) -> bool:
        """Whether a new batch should leave the buffer now."""
        size = len(self._buffer)
        if size == 0:
            return False
        if size >= self._batch_size or self._closing:
            return True
        return time.monotonic() - self._first_at >= self.settings.flush_interval

    def _due(self) -> bool:
        """Whether there is a batch to send now (window permitting)."""
        if self._closing and not self._flush_on_close:
            return False
        return bool(self._pending) or self._buffer_due()

    def _window_full(self) -> bool:
        return self._written_count >= self.settings.max_unacknowledged

    def _next_batch(self, *, new: bool = True) -> metrics_pb2.DeliverCallsRequest | None:
        """The next batch to write: one to send again, else (``new``) a new one if due;
        marked written. None when none is due."""
        if self._closing and not self._flush_on_close:
            return None
        batch = None
        while self._pending and batch is None:
            batch = self._unacked.get(self._pending.popleft())  # None: acknowledged since
        if batch is None and new and self._buffer_due():
            batch = self._take_batch()
        if batch is not None:
            self._written[batch.batch_sequence] = time.monotonic()
            self._written_count += len(batch.records)
        return batch

    def _take_batch(self) -> metrics_pb2.DeliverCallsRequest:
        """Number the next batch of up to ``batch_size`` buffered records."""
        buffer = self._buffer
        count = min(self._batch_size, len(buffer))
        records = [buffer.popleft() for _ in range(count)]
        if buffer:
            self._first_at = time.monotonic()
        dropped = self._dropped - self._dropped_reported
        self._dropped_reported = self._dropped
        self._sequence += 1
        batch = metrics_pb2.DeliverCallsRequest(
            records=records,
            reporter_id=self.batch_reporter_id,
            dropped_since_last=dropped,
            batch_sequence=self._sequence,
        )
        self._unacked[self._sequence] = batch
        self._unacked_count += count
        return batch

    def _acknowledge(
        self, sequence: int, *, rejected: int, duplicate: bool
    ) -> metrics_pb2.DeliverCallsRequest | None:
        """The control plane acknowledged a batch: it is delivered, and forgotten."""
        batch = self._unacked.pop(sequence, None)
        if batch is None:
            return None  # not ours, or acknowledged before
        size = len(batch.records)
        self._unacked_count -= size
        if self._written.pop(sequence, None) is not None:
            self._written_count -= size
        self._sent += size
        self._rejected += rejected
        self._batches += 1
        self._duplicates += duplicate
        self._wake.set()
        return batch

    def _requeue(self) -> None:
        """Every unacknowledged batch goes back, numbered as it is, to be sent again
        first (in order)."""
        self._pending = deque(self._unacked)
        self._written.clear()
        self._written_count = 0

    # -- the flusher -------------------------------------------------------------------

    async def _wait(self, until: float | None, call: grpc.aio.Call | None = None) -> bool:
        """Wait until a batch can be written (True); False at ``until`` (monotonic), on
        closing with nothing left to send, or when ``call`` ended. Raises TimeoutError
        when a written batch waits for its acknowledgement past ``ack_timeout``."""
        ack_timeout = self.settings.ack_timeout
        while True:
            self._wake.clear()
            if call is not None and call.done():
                return False
            now = time.monotonic()
            if self._written:
                oldest = next(iter(self._written.values()))
                if now - oldest > ack_timeout:
                    raise TimeoutError(f"no acknowledgement within {ack_timeout:g}s")
            if self._due():
                if not self._window_full():
                    return True
            elif self._closing:
                return False
            timeouts: list[float] = []
            if self._buffer and not self._window_full():
                timeouts.append(self._first_at + self.settings.flush_interval - now)
            if self._written:
                timeouts.append(next(iter(self._written.values())) + ack_timeout - now)
            if until is not None:
                if now >= until:
                    return False
                timeouts.append(until - now)
            try:
                async with asyncio.timeout(max(0.0, min(timeouts)) if timeouts else None):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def _run(self) -> None:
        backoff = self._backoff
        while await self._wait(None):
            try:
                await self._deliver_once()
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

    async def _deliver_once(self) -> None:
        """Send again the batches of a failed attempt, one ReportCalls each, then deliver
        due batches over one stream until it is due to rotate, then close it once they
        are acknowledged.

        Those sent again are acknowledged one by one, with their own status: a stream
        the rate limit ends while batches are being written may report a plain
        INTERNAL error in place of its RESOURCE_EXHAUSTED and RetryInfo (grpc's client
        replaces the status when a write fails), and the next stream would be cut the
        same way without waiting as long as asked.
        """
        settings = self.settings
        try:
            channel = self._channel()
            async with asyncio.timeout(settings.connect_timeout):
                await channel.channel_ready()
        except Exception as exc:
            self._log_failure("control plane unreachable", exc)
            raise _StreamFailed from exc
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        if time.monotonic() < self._unary_until:
            await self._report_unary(stub)
            return
        if self._pending:
            await self._report_unary(stub, again_only=True)
            if not self._due():
                return  # no stream is held open while idle
        try:
            await self._stream(stub)
        except _Unimplemented:
            _log.info(
                "the control plane has no DeliverCalls (an older version): reporting "
                "each batch with ReportCalls"
            )
            self._unary_until = time.monotonic() + _UNARY_FOR
            await self._report_unary(stub)

    async def _stream(self, stub: metrics_pb2_grpc.MetricsServiceAsyncStub) -> None:
        settings = self.settings
        call = stub.DeliverCalls(timeout=settings.stream_max_age + settings.ack_timeout)
        # A stream that fails while idle wakes the flusher, which sends its batches again.
        call.add_done_callback(lambda _: self._wake.set())
        reader = asyncio.create_task(self._read_acks(call), name="sidecar-call-reporter-acks")
        rotate_at = time.monotonic() + settings.stream_max_age
        written = 0
        try:
            # The control plane answers with its headers first: nothing is written to a
            # stream it refuses (a write racing the refusal would hide its status).
            async with asyncio.timeout(settings.connect_timeout):
                await call.initial_metadata()
            if call.done() and await call.code() is grpc.StatusCode.UNIMPLEMENTED:
                raise _Unimplemented
            while written < settings.stream_max_records and await self._wait(rotate_at, call):
                batch = self._next_batch()
                if batch is None:
                    continue
                await call.write(batch)
                written += len(batch.records)
            await call.done_writing()
            # The control plane ends the stream once it acknowledged every batch.
            async with asyncio.timeout(settings.ack_timeout):
                await asyncio.shield(reader)
            if self._written:
                raise RuntimeError("the stream ended before acknowledging every batch")
        except asyncio.CancelledError:
            call.cancel()
            self._requeue()
            raise
        except _Unimplemented:
            raise
        except Exception as exc:
            error = await _failure_of(call, reader, exc)
            call.cancel()
            self._requeue()
            if (
                isinstance(error, grpc.aio.AioRpcError)
                and error.code() is grpc.StatusCode.UNIMPLEMENTED
            ):
                raise _Unimplemented from exc
            self._log_failure("call stream failed", error)
            raise _StreamFailed(_retry_after(error)) from exc
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)

    async def _read_acks(
        self,
        call: grpc.aio.StreamStreamCall[
            metrics_pb2.DeliverCallsRequest, metrics_pb2.DeliverCallsResponse
        ],
    ) -> None:
        async for ack in call:
            self._acknowledge(
                ack.batch_sequence, rejected=len(ack.rejected), duplicate=ack.duplicate
            )
            for rejected in ack.rejected[:3]:
                _log.debug(
                    "control plane rejected a call record field=%s reason=%s",
                    rejected.field,
                    rejected.reason,
                )

    async def _report_unary(
        self, stub: metrics_pb2_grpc.MetricsServiceAsyncStub, *, again_only: bool = False
    ) -> None:
        """Deliver due batches one ReportCalls each, concurrently up to the window,
        until none is due (a control plane older than DeliverCalls), or only the
        batches to send again (``again_only``).

        A batch the control plane refuses as a whole (INVALID_ARGUMENT, or
        RESOURCE_EXHAUSTED without RetryInfo: its series limit) is acknowledged as
        rejected, not retried for ever. Raises _StreamFailed when some fail.
        """
        timeout = self.settings.ack_timeout + self.settings.connect_timeout
        rotate_at = time.monotonic() + self.settings.stream_max_age
        while (self._pending if again_only else True) and await self._wait(rotate_at):
            batches: list[metrics_pb2.DeliverCallsRequest] = []
            while (
                not self._window_full()
                and (batch := self._next_batch(new=not again_only)) is not None
            ):
                batches.append(batch)
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
            errors: list[BaseException] = []
            for batch, result in zip(batches, results, strict=True):
                sequence = batch.batch_sequence
                if isinstance(result, metrics_pb2.ReportCallsResponse):
                    self._acknowledge(
                        sequence, rejected=len(result.rejected), duplicate=result.duplicate
                    )
                elif _refused_for_good(result):
                    assert isinstance(result, grpc.aio.AioRpcError)
                    _log.warning(
                        "control plane refused a batch of %d call records (%s: %s)",
                        len(batch.records),
                        result.code().name,
                        result.details(),
                    )
                    self._acknowledge(sequence, rejected=len(batch.records), duplicate=False)
                else:
                    errors.append(result)
            if errors:
                self._requeue()
                self._log_failure("reporting call records failed", errors[0])
                waits = [w for w in map(_retry_after, errors) if w is not None]
                raise _StreamFailed(max(waits) if waits else None)

    def _log_failure(self, what: str, exc: BaseException) -> None:
        """WARNING on the first failure of a run of failures, DEBUG after."""
        detail = (
            f"{exc.code().name}: {exc.details()}"
            if isinstance(exc, grpc.aio.AioRpcError)
            else (str(exc) or type(exc).__name__)
        )
        level = logging.DEBUG if self._backoff.failures else logging.WARNING
        _log.log(
            level,
            "%s (%s); retrying with backoff, %d records buffered",
            what,
            detail,
            len(self._buffer) + self._unacked_count,
        )


async def _failure_of(
    call: grpc.aio.Call, reader: asyncio.Task[None], exc: Exception
) -> BaseException:
    """The error with the stream's status (and its RetryInfo) when the stream ended with
    one: the acknowledgement reader gets it, while a write to a stream the server
    already ended fails with a plainer error ("Internal error from Core")."""
    if call.done():
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await asyncio.wait({reader})
        if reader.done() and not reader.cancelled():
            error = reader.exception()
            if isinstance(error, grpc.aio.AioRpcError):
                return error
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
