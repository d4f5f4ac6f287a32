"""The orchestrator domain: workflow definitions and durable executions.

:class:`Orchestrator` is what the servicer, the dashboard and the server use. It owns the
lifecycle (start and stop, spawning runs, resuming them after a store failure or a
takeover), starts executions, retries ended ones (:meth:`Orchestrator.retry_execution`)
and cancels them (on whichever replica drives them), and hands the rest to its parts:

- :mod:`.catalog`: workflow definitions, their versions and validated specs;
- :mod:`.executions`: GetExecution, ListExecutions, WatchExecution;
- :mod:`.ownership`: which replica drives which execution, the fence on its writes;
- :mod:`.run`: one execution driven to its end, with :mod:`.journal` (transitions
  staged, then flushed in one transaction), :mod:`.steps` (inputs, attempts, retries)
  and :mod:`.compensation` (lost outcomes settled, completed steps undone);
- :mod:`.retention`: ended executions deleted; :mod:`.reporting`: duration records;
- :mod:`.records`: the store keyspace, keys and ids, an execution read back;
  :mod:`.settings`: the tunables.

Beside them: :mod:`.spec` (a definition validated), :mod:`.history` (the view events
fold into), :mod:`.invoker` (one step attempt), :mod:`.templates` (references in
inputs) and :mod:`.formats` (workflow files).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import uuid
from collections.abc import Callable, Sequence

from flext_mesh.errors import (
    FailedPrecondition,
    FieldViolation,
    InvalidArgument,
    MeshError,
    NotFound,
    Unavailable,
)
from flext_mesh.names import check_id, elide, raise_if
from flext_mesh.orchestrator.catalog import MAX_WORKFLOW_NAME, Catalog, validated
from flext_mesh.orchestrator.executions import Executions
from flext_mesh.orchestrator.history import (
    ENDED_STATES,
    ExecutionEventType,
    ExecutionState,
    ExecutionView,
    StepState,
)
from flext_mesh.orchestrator.invoker import StepInvoker
from flext_mesh.orchestrator.journal import OwnershipLost, RunBroken
from flext_mesh.orchestrator.ownership import Ownership
from flext_mesh.orchestrator.records import (
    ACTIVE,
    CANCELS,
    DEFINITIONS,
    EXECUTIONS,
    event_key,
    idempotency_key,
    load_execution,
    new_execution_id,
    timestamp_now,
)
from flext_mesh.orchestrator.reporting import Durations, Reporter
from flext_mesh.orchestrator.retention import Retention
from flext_mesh.orchestrator.run import Run, RunContext, cancel_error
from flext_mesh.orchestrator.settings import OrchestratorSettings, default_owner
from flext_mesh.orchestrator.spec import RetrySpec
from flext_mesh.orchestrator.step_results import StepResults
from flext_mesh.retry import Backoff
from flext_mesh.rpc import tracing
from flext_mesh.rpc.metadata import MAX_IDEMPOTENCY_KEY_LENGTH, correlation_id_problem
from flext_mesh.rpc.payloads import struct_to_dict
from flext_mesh.store import Compare, Delete, Event, EventType, Put, Store
from flext_mesh.v1 import metrics_pb2, orchestrator_pb2

__all__ = [
    "MAX_INPUT_BYTES",
    "MAX_WORKFLOW_NAME",
    "Orchestrator",
    "OrchestratorSettings",
    "default_owner",
]

_log = logging.getLogger("flext_mesh.orchestrator")

#: Largest execution input accepted, serialized.
MAX_INPUT_BYTES = 1024 * 1024
#: Longest cancellation reason, bytes.
MAX_REASON_BYTES = 1024
#: Tries of a RetryExecution whose old execution changes under it.
_RETRY_ATTEMPTS = 3


class Orchestrator:
    """Workflow definitions and the executions this replica drives."""

    def __init__(
        self,
        store: Store,
        invoker: StepInvoker,
        settings: OrchestratorSettings | None = None,
        *,
        report: Callable[[Sequence[metrics_pb2.CallRecord]], object] | None = None,
        durations: Durations | None = None,
    ) -> None:
        """``report`` receives batches of execution and step duration records;
        ``durations`` also observes each as it happens."""
        self.store = store
        self.invoker = invoker
        self.settings = settings or OrchestratorSettings()
        self._runs: dict[str, Run] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._stopping = False
        self.catalog = Catalog(store)
        self.executions = Executions(store)
        self.reporter = Reporter(report, self.settings.metrics_flush_interval)
        self.retention = Retention(store, self.settings)
        self.step_results = StepResults(store, self.catalog.spec_of)
        self.ownership = Ownership(
            store,
            self.settings,
            resume=self._resume,
            skip=lambda execution_id: execution_id in self._runs or self._stopping,
            abandon=self._abandon,
        )
        self._run_context = RunContext(
            store=store,
            invoker=invoker,
            settings=self.settings,
            fence=self.ownership.fence,
            record=self.reporter.record,
            remember_ended=self.executions.remember_ended,
            rng=random.Random(),
            recorded=self.step_results.recorded,
            durations=durations,
        )
        # The API the servicer, the dashboard and the server use; each part documents
        # its calls.
        self.put_workflow = self.catalog.put_workflow
        self.get_workflow = self.catalog.get_workflow
        self.list_workflows = self.catalog.list_workflows
        self.delete_workflow = self.catalog.delete_workflow
        self.get_execution = self.executions.get_execution
        self.list_executions = self.executions.list_executions
        self.watch_execution = self.executions.watch_execution
        self.close_watches = self.executions.close_watches
        self.remember_ended = self.executions.remember_ended
        self.record = self.reporter.record
        self.sweep = self.retention.sweep
        self.record_step_result = self.step_results.record
        self.owner_ops = self.ownership.owner_ops
        self.fence = self.ownership.fence
        self.claimed = self.ownership.claimed
        self._claim = self.ownership.claim  # (the fencing tests claim directly)
        self._unlisten_cancels: Callable[[], None] | None = None

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        """Load the workflows, resume the executions that had not ended, start work.

        On an exclusive store (SQLite) this replica takes every active execution; on a
        shared one (etcd) it takes those whose owner's lease is gone, now and whenever
        an owner key disappears.
        """
        await self.catalog.start()
        await self.ownership.start()
        self._unlisten_cancels = self.store.listen(CANCELS, self._on_cancel_requests)
        resumed = await self.ownership.claim_orphans(force=self.settings.exclusive_store)
        if resumed:
            _log.info("resumed executions=%d", resumed)
        self._background = [
            asyncio.create_task(self.retention.sweep_forever(), name="orchestrator-retention"),
            asyncio.create_task(self.reporter.flush_forever(), name="orchestrator-metrics"),
            asyncio.create_task(self.ownership.keep_lease_forever(), name="orchestrator-lease"),
            asyncio.create_task(self.ownership.claim_forever(), name="orchestrator-claims"),
        ]

    async def stop(self) -> None:
        """Stop driving executions (they resume at the next start) and close connections."""
        self._stopping = True
        self.catalog.stop()
        self.ownership.stop_listening()
        if self._unlisten_cancels is not None:
            self._unlisten_cancels()
        self._unlisten_cancels = None
        for task in [*self._background, *self._tasks]:
            task.cancel()
        await asyncio.gather(*self._background, *self._tasks, return_exceptions=True)
        self._background.clear()
        self._tasks.clear()
        self._runs.clear()
        self.reporter.flush()
        await self.invoker.aclose()
        await self.ownership.release()

    @property
    def _lease(self) -> str | None:
        """This replica's ownership lease (the fencing tests revoke it)."""
        return self.ownership.lease

    def _abandon(self) -> None:
        """Cancel every run: the ownership lease lapsed, their claims are gone."""
        for run in list(self._runs.values()):
            if run.task is not None:
                run.task.cancel()

    def _spawn(self, run: Run, resumed: bool) -> None:
        self._runs[run.execution_id] = run
        task = asyncio.create_task(run.drive(resumed), name=f"execution-{run.execution_id}")
        run.task = task
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._finished(run, t))

    def _finished(self, run: Run, task: asyncio.Task[None]) -> None:
        if not run.journal.ended.done():  # its waiters follow the store instead
            run.journal.ended.set_result(None)
        self._tasks.discard(task)
        if self._runs.get(run.execution_id) is run:
            del self._runs[run.execution_id]
        if task.cancelled() or self._stopping:
            return
        error = task.exception()
        if error is None:
            return
        if isinstance(error, OwnershipLost):
            self.ownership.claims.pop(run.execution_id, None)
            _log.warning("execution=%s was taken over by another replica", run.execution_id)
            return
        if not isinstance(error, RunBroken):
            _log.error(
                "execution=%s stopped on an unexpected error; resuming it",
                run.execution_id,
                exc_info=error,
            )
        retry = asyncio.create_task(self._resume_later(run.execution_id))
        self._tasks.add(retry)
        retry.add_done_callback(self._tasks.discard)

    async def _resume_later(self, execution_id: str) -> None:
        first = self.settings.resume_delay
        backoff = Backoff(RetrySpec(initial_backoff=first, max_backoff=max(first, 30.0)))
        while not self._stopping:
            await asyncio.sleep(next(backoff))
            try:
                await self._resume(execution_id)
                return
            except Exception as exc:
                _log.warning(
                    "resuming execution=%s failed (%s); retrying",
                    execution_id,
                    exc,
                    extra={"cause": f"resume {execution_id} failed"},
                )

    async def _resume(self, execution_id: str) -> None:
        if execution_id in self._runs:
            return
        claims = self.ownership.claims
        if execution_id not in claims and not await self.ownership.claim(execution_id):
            return  # another replica drives it
        loaded = await load_execution(self.store, execution_id)
        if loaded is None:
            await self.ownership.drop_active(execution_id)
            raise NotFound(f"execution {execution_id} has no record; dropped from active")
        workflow, view = loaded
        if view.ended:
            await self.ownership.drop_active(execution_id)
            return
        view.execution.owner = self.settings.owner
        # An inline definition is stored without a name; it was valid when it started.
        spec = validated(workflow, inline=not workflow.name)
        run = Run(self._run_context, spec, view)
        run.journal.owned = True
        cancel = await self.store.get(CANCELS + execution_id)
        if cancel is not None and not view.cancel_requested:
            run.stage(
                ExecutionEventType.CANCEL_REQUESTED,
                error=cancel_error(cancel.value.decode()),
                message=cancel.value.decode(),
            )
        self._spawn(run, resumed=True)

    # -- executions ------------------------------------------------------------------

    async def start_execution(
        self, request: orchestrator_pb2.StartExecutionRequest, *, caller_traceparent: str = ""
    ) -> tuple[orchestrator_pb2.Execution, bool]:
        """Persist a new execution and start driving it; (execution, existing). While
        tracing is on, its span joins the trace of ``caller_traceparent`` (if any)."""
        workflow, spec = await self.catalog.definition_of(request)
        _check_start(request)
        if request.idempotency_key:
            existing = await self.executions.by_idempotency_key(request.idempotency_key)
            if existing is not None:
                return existing, True
        execution_id = new_execution_id()
        execution = orchestrator_pb2.Execution(
            execution_id=execution_id,
            workflow_name=workflow.name,
            workflow_version=workflow.version,
            state=orchestrator_pb2.EXECUTION_STATE_PENDING,
            correlation_id=request.correlation_id or uuid.uuid4().hex,
            idempotency_key=request.idempotency_key,
            owner=self.settings.owner,
        )
        execution.input.CopyFrom(request.input)
        traced = tracing.new_execution_trace(caller_traceparent)
        if traced is not None:
            execution.traceparent, execution.trace_parent_span_id = traced
        for step in spec.steps:
            execution.steps.add(
                step_name=step.name,
                state=orchestrator_pb2.STEP_STATE_PENDING,
                idempotency_key=f"{execution_id}/{step.name}",
            )
        run = Run(self._run_context, spec, ExecutionView(execution))
        run.stage(ExecutionEventType.EXECUTION_CREATED, state=ExecutionState.PENDING)
        run.stage(ExecutionEventType.EXECUTION_STARTED, state=ExecutionState.RUNNING)
        first = await run.begin(run.schedule())
        extra: list[Put | Delete] = [
            Put(DEFINITIONS + execution_id, workflow.SerializeToString()),
            Put(ACTIVE + execution_id, b""),
            *self.owner_ops(execution_id),
        ]
        compares: list[Compare] = []
        if request.idempotency_key:
            idem = idempotency_key(request.idempotency_key)
            extra.append(Put(idem, execution_id.encode()))
            compares.append(Compare(idem, 0))
        committed = await self._first_flush(run, compares, extra)
        if not committed:  # the same key won a race meanwhile
            existing = await self.executions.by_idempotency_key(request.idempotency_key)
            if existing is None:  # pragma: no cover - the winner's write is visible
                raise Unavailable("concurrent StartExecution with this key; retry")
            return existing, True
        snapshot = self._launch(run, execution_id, first)
        _log.info(
            "execution started id=%s workflow=%s version=%d cid=%s",
            execution_id,
            workflow.name or "(inline)",
            workflow.version,
            execution.correlation_id,
        )
        return snapshot, False

    async def retry_execution(
        self, execution_id: str, *, caller_traceparent: str = ""
    ) -> orchestrator_pb2.Execution:
        """Run an ended execution again as a new one (see RetryExecution in
        orchestrator.proto): the steps whose effect stands are carried over, the others
        run. Both histories are committed in one transaction before this returns."""
        raise_if(check_id("execution_id", execution_id))
        for _ in range(_RETRY_ATTEMPTS):
            record = await self.store.get(EXECUTIONS + execution_id)
            if record is None:
                raise NotFound(f"execution {elide(execution_id)!r} does not exist")
            old = orchestrator_pb2.Execution.FromString(record.value)
            _check_retryable(old)
            definition = await self.store.get(DEFINITIONS + execution_id)
            if definition is None:  # pragma: no cover - written with the execution
                raise FailedPrecondition(f"execution {execution_id} has no definition left")
            retried = await self._start_retry(
                old, record.mod_revision, definition.value, caller_traceparent
            )
            if retried is not None:
                return retried
            # The old execution changed meanwhile (retried by another call, or swept).
        raise Unavailable(f"execution {execution_id} kept changing; retry again")

    async def _start_retry(
        self,
        old: orchestrator_pb2.Execution,
        old_revision: int,
        definition: bytes,
        caller_traceparent: str,
    ) -> orchestrator_pb2.Execution | None:
        """Persist and start the retry of ``old``; None when ``old`` changed meanwhile."""
        workflow = orchestrator_pb2.Workflow.FromString(definition)
        # An inline definition is stored without a name; it was valid when it started.
        spec = validated(workflow, inline=not workflow.name)
        old_id = old.execution_id
        old_state = ExecutionState(old.state)
        carried = _carried_steps(old)
        execution_id = new_execution_id()
        execution = orchestrator_pb2.Execution(
            execution_id=execution_id,
            workflow_name=old.workflow_name,
            workflow_version=old.workflow_version,
            state=orchestrator_pb2.EXECUTION_STATE_PENDING,
            correlation_id=old.correlation_id,
            owner=self.settings.owner,
        )
        execution.input.CopyFrom(old.input)
        traced = tracing.new_execution_trace(caller_traceparent)
        if traced is not None:
            execution.traceparent, execution.trace_parent_span_id = traced
        for step in spec.steps:
            kept = carried.get(step.name)
            execution.steps.add(
                step_name=step.name,
                state=orchestrator_pb2.STEP_STATE_PENDING,
                # A carried step keeps the key it ran under; the others run under new ones.
                idempotency_key=kept.idempotency_key if kept else f"{execution_id}/{step.name}",
            )
        run = Run(self._run_context, spec, ExecutionView(execution))
        run.stage(
            ExecutionEventType.EXECUTION_CREATED,
            state=ExecutionState.PENDING,
            message=f"retry of execution {old_id} ({old_state.name})",
            related_execution_id=old_id,
        )
        # In the order they completed: a failure of the retry compensates newest first.
        for done in sorted(carried.values(), key=lambda s: s.end_time.ToNanoseconds()):
            run.stage(
                ExecutionEventType.STEP_CARRIED_OVER,
                step=done.step_name,
                step_state=StepState.SUCCEEDED,
                output=struct_to_dict(done.output),
                instance_id=done.instance_id,
                message=f"succeeded in execution {old_id}; not run again",
                related_execution_id=old_id,
            )
        run.stage(ExecutionEventType.EXECUTION_STARTED, state=ExecutionState.RUNNING)
        first = await run.begin(run.schedule())
        # The old execution: as it was, plus the event naming its retry.
        note = orchestrator_pb2.ExecutionEvent(
            index=old.event_count + 1,
            type=orchestrator_pb2.EXECUTION_EVENT_TYPE_EXECUTION_RETRIED,
            execution_state=old.state,
            message=f"retried as execution {execution_id}",
            related_execution_id=execution_id,
        )
        note.time.CopyFrom(timestamp_now())
        old.event_count = note.index
        old.retried_by = execution_id
        extra: list[Put | Delete] = [
            Put(DEFINITIONS + execution_id, definition),
            Put(ACTIVE + execution_id, b""),
            *self.owner_ops(execution_id),
            Put(event_key(old_id, note.index), note.SerializeToString()),
            Put(EXECUTIONS + old_id, old.SerializeToString()),
        ]
        committed = await self._first_flush(
            run, [Compare(EXECUTIONS + old_id, old_revision)], extra
        )
        if not committed:
            return None
        snapshot = self._launch(run, execution_id, first)
        _log.info(
            "execution retried id=%s as=%s workflow=%s carried=%d cid=%s",
            old_id,
            execution_id,
            old.workflow_name or "(inline)",
            len(carried),
            execution.correlation_id,
        )
        return snapshot

    async def _first_flush(
        self, run: Run, compares: list[Compare], extra: list[Put | Delete]
    ) -> bool:
        """Write a new execution's first events with ``extra``, if ``compares`` hold
        (False when they did not: nothing was written)."""
        try:
            return await run.flush(compares=compares, extra=extra)
        except RunBroken as broken:  # nothing started: the caller gets the store's error
            cause = broken.__cause__
            raise cause if isinstance(cause, MeshError) else Unavailable(str(broken)) from None

    def _launch(self, run: Run, execution_id: str, first: list[str]) -> orchestrator_pb2.Execution:
        """Drive a new execution whose first events are durable; the execution as it
        starts."""
        self.claimed(execution_id, run.journal.revision)
        run.journal.owned = True
        snapshot = orchestrator_pb2.Execution()
        snapshot.CopyFrom(run.view.execution)
        run.first = first
        self._spawn(run, resumed=False)
        return snapshot

    def driven(self) -> dict[tuple[str, str], int]:
        """Executions this replica drives now, by (workflow, state without its prefix);
        an inline definition counts as workflow ``(inline)``."""
        counts: dict[tuple[str, str], int] = {}
        for run in self._runs.values():
            key = (run.view.execution.workflow_name or "(inline)", run.view.state.name)
            counts[key] = counts.get(key, 0) + 1
        return counts

    async def wait_ended(self, execution: orchestrator_pb2.Execution) -> orchestrator_pb2.Execution:
        """``execution`` once it ended (StartExecution with ``wait``).

        Driven here: the record its run committed last, handed over in memory. Else (or
        if the run stopped without ending it: taken over, store broken, shutdown): the
        store's events, like a WatchExecution.
        """
        run = self._runs.get(execution.execution_id)
        if run is not None:
            # Shielded: a caller that goes away must not cancel what other waiters share.
            record = await asyncio.shield(run.journal.ended)
            if record is not None:
                return orchestrator_pb2.Execution.FromString(record)
        return await self.executions.wait_ended(execution)

    async def cancel_execution(self, execution_id: str, reason: str) -> orchestrator_pb2.Execution:
        """Record a cancellation and wait (briefly) until running steps stopped."""
        raise_if(check_id("execution_id", execution_id))
        if len(reason.encode()) > MAX_REASON_BYTES:
            raise InvalidArgument(
                "", [FieldViolation("reason", f"at most {MAX_REASON_BYTES} bytes")]
            )
        run = self._runs.get(execution_id)
        if run is None:
            return await self._cancel_elsewhere(execution_id, reason)
        try:
            await run.request_cancel(reason)
        except OwnershipLost:  # taken over meanwhile: ask the new owner
            return await self._cancel_elsewhere(execution_id, reason)
        with_deadline = asyncio.timeout(self.settings.cancel_wait)
        try:
            async with with_deadline:
                await run.journal.settled()
        except TimeoutError:
            pass
        execution, _ = await self.get_execution(execution_id)
        return execution

    async def _cancel_elsewhere(self, execution_id: str, reason: str) -> orchestrator_pb2.Execution:
        """Cancel an execution another replica drives (or that awaits a new owner).

        The request is stored where the owner listens (and where whoever resumes the
        execution looks); then this waits for the owner to commit that it stopped.
        """
        subscription = self.store.subscribe(EXECUTIONS + execution_id)
        try:
            execution, _ = await self.get_execution(execution_id)
            state = ExecutionState(execution.state)
            if state in ENDED_STATES:
                raise FailedPrecondition(f"execution {execution_id} already ended ({state.name})")
            await self.store.put(CANCELS + execution_id, reason.encode())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.cancel_wait):
                    async for batch in subscription:
                        latest = orchestrator_pb2.Execution.FromString(batch[-1].value)
                        state = ExecutionState(latest.state)
                        if state in (*ENDED_STATES, ExecutionState.COMPENSATING):
                            return latest
            execution, _ = await self.get_execution(execution_id)
            return execution
        finally:
            subscription.close()

    def _on_cancel_requests(self, events: list[Event]) -> None:
        """Store listener: a CancelExecution reached another replica; act if it is ours."""
        for event in events:
            if event.type == EventType.DELETE:
                continue
            run = self._runs.get(event.key.removeprefix(CANCELS))
            if run is not None and not run.view.ended:
                task = asyncio.create_task(run.request_cancel(event.value.decode()))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)


def _check_retryable(execution: orchestrator_pb2.Execution) -> None:
    """FAILED_PRECONDITION unless RetryExecution may run ``execution`` again."""
    execution_id = execution.execution_id
    state = ExecutionState(execution.state)
    if execution.retried_by:
        raise FailedPrecondition(
            f"execution {execution_id} was already retried as execution "
            f"{execution.retried_by}; retry that one"
        )
    if state == ExecutionState.SUCCEEDED:
        raise FailedPrecondition(
            f"execution {execution_id} SUCCEEDED: there is nothing to retry; start a new execution"
        )
    if state not in ENDED_STATES:
        raise FailedPrecondition(
            f"execution {execution_id} has not ended ({state.name}): wait for it to end, or "
            "cancel it, then retry"
        )


def _carried_steps(
    execution: orchestrator_pb2.Execution,
) -> dict[str, orchestrator_pb2.StepExecution]:
    """The steps a retry of ``execution`` takes over, by name: those whose effect still
    stands (SUCCEEDED, never compensated); none after a whole rollback (COMPENSATED)."""
    if ExecutionState(execution.state) == ExecutionState.COMPENSATED:
        return {}
    return {s.step_name: s for s in execution.steps if StepState(s.state) == StepState.SUCCEEDED}


def _check_start(request: orchestrator_pb2.StartExecutionRequest) -> None:
    violations: list[FieldViolation] = []
    if request.input.ByteSize() > MAX_INPUT_BYTES:
        violations.append(
            FieldViolation(
                "input", f"is {request.input.ByteSize()} bytes; at most {MAX_INPUT_BYTES}"
            )
        )
    if len(request.idempotency_key) > MAX_IDEMPOTENCY_KEY_LENGTH:
        violations.append(
            FieldViolation("idempotency_key", f"at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters")
        )
    problem = correlation_id_problem(request.correlation_id)
    if problem:
        violations.append(FieldViolation("correlation_id", problem))
    if violations:
        raise InvalidArgument("", violations)
