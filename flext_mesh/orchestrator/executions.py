"""Executions read back: GetExecution, ListExecutions and WatchExecution.

What these show is what is committed: the execution record as last written, its events
in order. A watch replays the events after the asked index, then follows new ones until
the execution ends; its last message carries the ended execution (remembered by the run
that ended it, before the commit, so it need not be read back).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import AsyncIterator

from flext_mesh.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from flext_mesh.names import check_id, elide, raise_if
from flext_mesh.orchestrator.catalog import check_workflow_name
from flext_mesh.orchestrator.history import ENDED_STATES, ExecutionEventType, ExecutionState
from flext_mesh.orchestrator.records import (
    EVENTS,
    EXECUTIONS,
    checked_page_size,
    event_key,
    idempotency_key,
    read_events,
)
from flext_mesh.paging import decode_page_token, encode_page_token
from flext_mesh.store import Store, Subscription, SubscriptionLagged
from flext_mesh.v1 import orchestrator_pb2

__all__ = ["Executions"]


class Executions:
    """Reads of committed executions, and the WatchExecution streams open on them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._watchers: set[Subscription] = set()
        # Records of executions that just ended, for the last WatchExecution message.
        self._ended: OrderedDict[str, bytes] = OrderedDict()

    async def by_idempotency_key(self, key: str) -> orchestrator_pb2.Execution | None:
        """The execution a StartExecution with idempotency key ``key`` started, if any."""
        kv = await self.store.get(idempotency_key(key))
        if kv is None:
            return None
        record = await self.store.get(EXECUTIONS + kv.value.decode())
        return orchestrator_pb2.Execution.FromString(record.value) if record else None

    async def get_execution(
        self, execution_id: str, *, include_events: bool = False
    ) -> tuple[orchestrator_pb2.Execution, list[orchestrator_pb2.ExecutionEvent]]:
        """The execution as last committed, and its history when asked."""
        raise_if(check_id("execution_id", execution_id))
        record = await self.store.get(EXECUTIONS + execution_id)
        if record is None:
            raise NotFound(f"execution {elide(execution_id)!r} does not exist")
        events: list[orchestrator_pb2.ExecutionEvent] = []
        if include_events:
            events = await read_events(self.store, execution_id)
        return orchestrator_pb2.Execution.FromString(record.value), events

    async def list_executions(
        self, workflow_name: str, state: int, page_size: int, page_token: str
    ) -> tuple[list[orchestrator_pb2.Execution], str]:
        """Executions newest first, filtered, and the next page's token."""
        size = checked_page_size(page_size)
        violations = check_workflow_name("workflow_name", workflow_name, required=False)
        if state and state not in orchestrator_pb2.ExecutionState.values():
            violations.append(FieldViolation("state", f"unknown state {state}"))
        raise_if(violations)
        query = ("ListExecutions", workflow_name, state)
        after = decode_page_token(page_token, query)
        found: list[orchestrator_pb2.Execution] = []
        cursor = EXECUTIONS + after if after else ""
        chunk = max(size * 2, 64)
        while len(found) <= size:
            kvs = await self.store.range(EXECUTIONS, start_after=cursor, limit=chunk, reverse=True)
            for kv in kvs:
                execution = orchestrator_pb2.Execution.FromString(kv.value)
                if workflow_name and execution.workflow_name != workflow_name:
                    continue
                if state and execution.state != state:
                    continue
                found.append(execution)
                if len(found) > size:
                    break
            if len(kvs) < chunk:
                break
            cursor = kvs[-1].key
        more = len(found) > size
        page = found[:size]
        return page, encode_page_token(page[-1].execution_id if more else "", query)

    async def watch_execution(
        self, execution_id: str, after_index: int, *, running: bool = False
    ) -> AsyncIterator[orchestrator_pb2.WatchExecutionResponse]:
        """Events after ``after_index``, live, until the execution ends. ``running``:
        the caller knows it had not ended at ``after_index`` (spares a read)."""
        raise_if(check_id("execution_id", execution_id))
        if after_index < 0:
            raise InvalidArgument("", [FieldViolation("after_index", "must be >= 0")])
        prefix = f"{EVENTS}{execution_id}/"
        subscription = self.store.subscribe(prefix)
        self._watchers.add(subscription)
        try:
            last = after_index
            kvs = await self.store.range(
                prefix, start_after=event_key(execution_id, last) if last else ""
            )
            if not kvs and not running:
                # Nothing after the asked index: unknown, still running, or ended.
                execution, _ = await self.get_execution(execution_id)
                if ExecutionState(execution.state) in ENDED_STATES:
                    yield orchestrator_pb2.WatchExecutionResponse(execution=execution)
                    return
            for kv in kvs:
                event = orchestrator_pb2.ExecutionEvent.FromString(kv.value)
                last = event.index
                message = await self._watch_message(execution_id, event)
                yield message
                if message.HasField("execution"):
                    return
            async for batch in subscription:
                for store_event in batch:
                    event = orchestrator_pb2.ExecutionEvent.FromString(store_event.value)
                    if event.index <= last:
                        continue
                    last = event.index
                    message = await self._watch_message(execution_id, event)
                    yield message
                    if message.HasField("execution"):
                        return
            raise Unavailable(
                f"the control plane is shutting down; watch again with after_index={last}"
            )
        except SubscriptionLagged:
            raise Unavailable(f"watcher fell behind; watch again with after_index={last}") from None
        finally:
            subscription.close()
            self._watchers.discard(subscription)

    async def wait_ended(self, execution: orchestrator_pb2.Execution) -> orchestrator_pb2.Execution:
        """``execution`` once it ended (StartExecution with ``wait``; given as the start
        answered it): the watch's last message, without streaming the events before it."""
        if ExecutionState(execution.state) in ENDED_STATES:
            return execution
        execution_id = execution.execution_id
        async for message in self.watch_execution(
            execution_id, execution.event_count, running=True
        ):
            if message.HasField("execution"):
                return message.execution
        raise Unavailable(f"the watch of execution {execution_id} ended before it did")

    def close_watches(self) -> None:
        """End every WatchExecution stream (on shutdown, so the drain is not held up)."""
        for subscription in list(self._watchers):
            subscription.close()

    async def _watch_message(
        self, execution_id: str, event: orchestrator_pb2.ExecutionEvent
    ) -> orchestrator_pb2.WatchExecutionResponse:
        message = orchestrator_pb2.WatchExecutionResponse(event=event)
        if ExecutionEventType(event.type) == ExecutionEventType.EXECUTION_ENDED:
            record = self._ended.get(execution_id)
            if record is not None:
                message.execution.ParseFromString(record)
            else:
                ended, _ = await self.get_execution(execution_id)
                message.execution.CopyFrom(ended)
        return message

    def remember_ended(self, execution_id: str, record: bytes) -> None:
        """Keep a just-ended execution's record for the watchers' last message."""
        self._ended[execution_id] = record
        while len(self._ended) > 256:
            self._ended.popitem(last=False)
