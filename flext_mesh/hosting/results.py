"""Shared idempotency: results of step calls whose answer never reached the caller.

A sidecar finishes work whose caller went away (the orchestrator's attempt timed out or
was cancelled, or its control plane died) and keeps the result in its idempotency
cache, so a resend *to this instance* is answered from it. When this instance is gone
by then (killed, drained, rescheduled), the resend has to go elsewhere and the work may
be done twice. With ``flext-sidecar --shared-idempotency``, :class:`LostResults` sends
such a result to the control plane (``OrchestratorService.RecordStepResult``), which
keeps it with the execution: the orchestrator settles the step from it instead of
running it again on another instance.

Nothing is sent for a call whose caller got its answer, so the success path pays
nothing. A result is sent as soon as the call ends, retried with backoff for at most
``within`` seconds (a control plane restarting, another replica taking over);
``flush`` is awaited by the host's drain, so a sidecar stopping hands over what it has.
Still at-least-once for a process killed between finishing the work and sending the
result: only the application's own store can close that window.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import grpc

from flext_mesh.retry import Backoff, RetrySpec
from flext_mesh.v1 import orchestrator_pb2, orchestrator_pb2_grpc, processor_pb2

__all__ = ["LostResults"]

_log = logging.getLogger("flext_mesh.hosting.results")

#: Codes after which sending again cannot help: the key is no workflow step's, the step
#: is another service's, the request is malformed.
_FINAL = frozenset(
    {
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
_BACKOFF = RetrySpec(initial_backoff=0.1, multiplier=2.0, max_backoff=2.0)


class LostResults:
    """Sends results whose caller went away to the control plane (module docstring)."""

    def __init__(
        self,
        channel: Callable[[], grpc.aio.Channel],
        service: str,
        *,
        within: float = 60.0,
        max_pending: int = 1000,
    ) -> None:
        """``channel`` gives the channel to the control plane; ``within`` bounds, in
        seconds, how long one result is retried; ``max_pending`` bounds the results
        held at once (beyond it new ones are dropped, with a warning)."""
        self._channel = channel
        self._service = service
        self._within = within
        self._max_pending = max_pending
        self._tasks: dict[tuple[str, str], asyncio.Task[None]] = {}
        #: Results the control plane kept, and those given up on (for tests and logs).
        self.sent = 0
        self.dropped = 0

    @property
    def pending(self) -> int:
        """Results not sent yet."""
        return len(self._tasks)

    def record(self, operation: str, key: str, response: processor_pb2.InvokeResponse) -> None:
        """Send ``response`` of (operation, key) in the background (on the event loop)."""
        which = (operation, key)
        if which in self._tasks:
            return
        if len(self._tasks) >= self._max_pending:
            self.dropped += 1
            _log.warning("lost-answer results: %d pending, dropping key=%s", len(self._tasks), key)
            return
        task = asyncio.get_running_loop().create_task(
            self._send(operation, key, response), name=f"lost-result {key}"
        )
        self._tasks[which] = task
        task.add_done_callback(lambda _: self._tasks.pop(which, None))

    async def _send(self, operation: str, key: str, response: processor_pb2.InvokeResponse) -> None:
        request = orchestrator_pb2.RecordStepResultRequest(
            service_name=self._service, operation=operation, idempotency_key=key
        )
        request.result.CopyFrom(response)
        deadline = time.monotonic() + self._within
        backoff = Backoff(_BACKOFF)
        while True:
            stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self._channel())
            left = deadline - time.monotonic()
            try:
                await stub.RecordStepResult(request, timeout=max(0.1, min(5.0, left)))
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _FINAL:
                    _log.debug("result of key=%s not kept: %s", key, exc.details())
                    self.dropped += 1
                    return
                wait = next(backoff)
                if time.monotonic() + wait >= deadline:
                    _log.warning(
                        "gave up keeping the result of key=%s after %gs: %s",
                        key,
                        self._within,
                        exc.details(),
                    )
                    self.dropped += 1
                    return
                await asyncio.sleep(wait)
                continue
            self.sent += 1
            _log.info("kept the result of key=%s whose caller went away", key)
            return

    async def flush(self, timeout: float) -> bool:  # noqa: ASYNC109 - shares the drain's grace
        """Wait for pending results to be sent; False if some were still pending."""
        tasks = list(self._tasks.values())
        if not tasks:
            return True
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        return not pending

    async def aclose(self) -> None:
        """Stop sending (what is pending is dropped)."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
