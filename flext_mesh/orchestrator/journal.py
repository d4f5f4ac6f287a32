"""One execution's history as the run makes it: staged, then flushed to the store.

Every transition is first *staged* (folded into the in-memory view), then *flushed*: the
events and the rewritten execution record go to the store in one transaction, and only
after it committed does the run act (send a call, sleep a backoff, compensate).
Transitions decided together (a step succeeded, its dependents start) share one
transaction, so a 3-step linear workflow costs 4 commits. Once this replica owns the
execution, every flush is fenced by its owner key (:mod:`.ownership`): a run whose claim
is gone writes nothing and stops (:class:`OwnershipLost`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from flext_mesh.errors import MeshError
from flext_mesh.orchestrator.history import (
    ENDED_STATES,
    ExecutionEventType,
    ExecutionState,
    ExecutionView,
    StepState,
)
from flext_mesh.orchestrator.records import (
    ACTIVE,
    CANCELS,
    ENDED,
    EXECUTIONS,
    OWNERS,
    error_info,
    event_key,
    timestamp_now,
)
from flext_mesh.rpc.payloads import dict_to_struct
from flext_mesh.store import Compare, Delete, Put, Store
from flext_mesh.v1 import orchestrator_pb2

__all__ = ["Journal", "OwnershipLost", "RunBroken"]

_T = TypeVar("_T")


class RunBroken(Exception):
    """The store failed under a run: it stops and is resumed from the store later."""


class OwnershipLost(Exception):
    """Another replica took the execution over (this one's lease lapsed): stop quietly."""


async def _committed(awaitable: Awaitable[_T]) -> _T:
    """Await a store write to its end even if the caller is cancelled meanwhile.

    A transition handed to the store either commits or fails; a cancellation (shutdown,
    a cancelled step) must not leave the run unsure which, so it is delivered after.
    """
    future = asyncio.ensure_future(awaitable)
    cancelled = False
    while not future.done():
        try:
            await asyncio.shield(future)
        except asyncio.CancelledError:
            if future.cancelled():  # the write itself was cancelled (store closing)
                raise
            cancelled = True  # the caller was: finish the write, then tell it
    if cancelled:
        raise asyncio.CancelledError
    return future.result()


class Journal:
    """The staged and committed history of one execution."""

    def __init__(
        self,
        store: Store,
        view: ExecutionView,
        *,
        fence: Callable[[str], Compare | None],
        remember_ended: Callable[[str, bytes], None],
    ) -> None:
        """``fence(id)`` guards each write (None: not owned yet); ``remember_ended(id,
        record)`` receives the record of an execution that ends, before it is committed."""
        self.store = store
        self.view = view
        self.execution_id = view.execution.execution_id
        self._fence = fence
        self._remember_ended = remember_ended
        self._staged: list[orchestrator_pb2.ExecutionEvent] = []
        self._lock = asyncio.Lock()
        self._progress = asyncio.Event()
        #: The committed record once this run ended the execution; None if the run
        #: stopped without ending it here (taken over, store broken, shutdown).
        self.ended: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        #: The execution state as last committed (the view may be ahead of it).
        self.committed_state = view.state
        #: Store revision of the last committed flush.
        self.revision = 0
        #: True once this replica holds the execution's owner key: from then on every
        #: write must be fenced by it, and a run whose claim is gone writes nothing.
        self.owned = False

    def stage(
        self,
        kind: ExecutionEventType,
        *,
        state: ExecutionState = ExecutionState.UNSPECIFIED,
        step: str = "",
        step_state: StepState = StepState.UNSPECIFIED,
        attempt: int = 0,
        error: MeshError | None = None,
        output: dict[str, Any] | None = None,
        instance_id: str = "",
        message: str = "",
        backoff: float | None = None,
        failed_step: str = "",
        at_least_once: bool = False,
        related_execution_id: str = "",
    ) -> orchestrator_pb2.ExecutionEvent:
        """Fold an event into the view now; it is persisted by the next flush."""
        # Into the message as protobuf numbers (each ValueType is int at run time).
        event = orchestrator_pb2.ExecutionEvent(
            index=self.view.execution.event_count + 1,
            type=orchestrator_pb2.ExecutionEventType.ValueType(kind),
            step_name=step,
            attempt=attempt,
            execution_state=orchestrator_pb2.ExecutionState.ValueType(state or self.view.state),
            step_state=orchestrator_pb2.StepState.ValueType(step_state),
            instance_id=instance_id,
            message=message,
            failed_step=failed_step,
            at_least_once=at_least_once,
            related_execution_id=related_execution_id,
        )
        event.time.CopyFrom(timestamp_now())
        if error is not None:
            event.error.CopyFrom(error_info(error))
        if output is not None:
            event.output.CopyFrom(dict_to_struct(output))
        if backoff is not None:
            event.backoff.FromNanoseconds(int(backoff * 1e9))
        self.view.apply(event)
        self._staged.append(event)
        return event

    async def flush(
        self, *, compares: Sequence[Compare] = (), extra: Sequence[Put | Delete] = ()
    ) -> bool:
        """Persist the staged events with the execution record, in one transaction."""
        async with self._lock:
            if not self._staged and not extra:
                return True
            events, self._staged = self._staged, []
            execution = self.view.execution
            state = self.view.state
            ops: list[Put | Delete] = [
                Put(event_key(self.execution_id, e.index), e.SerializeToString()) for e in events
            ]
            record = execution.SerializeToString()
            ops.append(Put(EXECUTIONS + self.execution_id, record))
            ops.extend(extra)
            if self.view.ended:
                # Before the commit: a watcher sees ENDED only once it is committed.
                self._remember_ended(self.execution_id, record)
                end_ms = execution.end_time.ToNanoseconds() // 1_000_000
                ops.append(Delete(ACTIVE + self.execution_id))
                ops.append(Delete(OWNERS + self.execution_id))
                ops.append(Delete(CANCELS + self.execution_id))
                ops.append(Put(f"{ENDED}{end_ms:013d}/{self.execution_id}", b""))
            fence = self._fence(self.execution_id)
            if fence is None and self.owned:  # the lease lapsed: another may drive it now
                raise OwnershipLost(self.execution_id)
            guards = [*compares, fence] if fence is not None else compares
            try:
                result = await _committed(self.store.txn(guards, ops))
            except MeshError as exc:
                raise RunBroken(exc.message) from exc
            if not result.succeeded and fence is not None:
                raise OwnershipLost(self.execution_id)
            self.revision = result.revision
            self.committed_state = state
            if self.view.ended and result.succeeded and not self.ended.done():
                self.ended.set_result(record)
            self._progress.set()
            self._progress = asyncio.Event()
            return result.succeeded

    async def settled(self) -> None:
        """Wait until running steps stopped after a cancellation (compensating or ended)."""
        while self.committed_state not in (
            *ENDED_STATES,
            ExecutionState.COMPENSATING,
        ):
            await self._progress.wait()
