"""The orchestrator domain: workflow definitions and durable executions.

The store keyspace, keys and ids live in :mod:`.records`; the tunables in :mod:`.settings`.

An execution is driven by one task (:class:`_Run`). Every transition is first *staged*
(folded into the in-memory view), then *flushed*: the events and the rewritten
execution record go to the store in one transaction, and only after it committed does
the run act (send a call, sleep a backoff, compensate). Transitions decided together
(a step succeeded, its dependents start) share one transaction, so a 3-step linear
workflow costs 4 commits. After a restart every active execution is replayed from its
events and resumed; a step that was in flight is sent again with the same idempotency
key, which a sidecar answers from its cache instead of running it twice.

Step failures: infrastructure faults (the retry policy's codes) are retried with
backoff (``flext_mesh.retry``); business rejections fail the step at once. A failed optional
step skips its dependents; a failed required step (or a cancellation, or the
execution's timeout) stops scheduling, cancels running steps, and compensates the
completed steps in reverse order of completion, each compensation retried per its
policy. Compensations that still fail leave COMPENSATION_FAILED for an operator; the
remaining compensations run anyway, so as much as possible is undone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import grpc

from flext_mesh.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InternalError,
    InvalidArgument,
    MeshError,
    NotFound,
    Unavailable,
)
from flext_mesh.names import check_id, raise_if
from flext_mesh.orchestrator.catalog import (
    MAX_WORKFLOW_NAME,
    Catalog,
    validated,
)
from flext_mesh.orchestrator.executions import Executions
from flext_mesh.orchestrator.history import (
    ENDED_STATES,
    UNKNOWN_OUTCOME_CODES,
    ExecutionEventType,
    ExecutionState,
    ExecutionView,
    StepState,
)
from flext_mesh.orchestrator.invoker import AttemptFailed, StepInvoker, StepReply
from flext_mesh.orchestrator.ownership import Ownership
from flext_mesh.orchestrator.records import (
    ACTIVE,
    CANCELS,
    DEFINITIONS,
    ENDED,
    EXECUTIONS,
    OWNERS,
    error_info,
    event_key,
    idempotency_key,
    load_execution,
    mesh_error,
    new_execution_id,
    timestamp_now,
)
from flext_mesh.orchestrator.reporting import Reporter, end_record, step_record
from flext_mesh.orchestrator.retention import Retention
from flext_mesh.orchestrator.settings import OrchestratorSettings, default_owner
from flext_mesh.orchestrator.spec import (
    CompensationSpec,
    RetrySpec,
    StepSpec,
    WorkflowSpec,
)
from flext_mesh.orchestrator.templates import UnresolvedReference, resolve
from flext_mesh.retry import Backoff, retry_async
from flext_mesh.rpc.metadata import MAX_IDEMPOTENCY_KEY_LENGTH, correlation_id_problem
from flext_mesh.rpc.payloads import dict_to_struct, struct_to_dict
from flext_mesh.store import (
    Compare,
    Delete,
    Event,
    EventType,
    Put,
    Store,
)
from flext_mesh.v1 import metrics_pb2, orchestrator_pb2, registry_pb2

__all__ = [
    "MAX_INPUT_BYTES",
    "MAX_WORKFLOW_NAME",
    "Orchestrator",
    "OrchestratorSettings",
    "default_owner",
]

_log = logging.getLogger("flext_mesh.orchestrator")
_T = TypeVar("_T")

#: Largest execution input accepted, serialized.
MAX_INPUT_BYTES = 1024 * 1024
#: Longest cancellation reason, bytes.
MAX_REASON_BYTES = 1024

# -- helpers ---------------------------------------------------------------------------------


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


class _RunBroken(Exception):
    """The store failed under a run: it stops and is resumed from the store later."""


class _OwnershipLost(Exception):
    """Another replica took the execution over (this one's lease lapsed): stop quietly."""


# -- the engine ------------------------------------------------------------------------------


class Orchestrator:
    """Workflow definitions and the executions this replica drives."""

    def __init__(
        self,
        store: Store,
        invoker: StepInvoker,
        settings: OrchestratorSettings | None = None,
        *,
        report: Callable[[Sequence[metrics_pb2.CallRecord]], object] | None = None,
    ) -> None:
        """``report`` receives batches of execution and step duration records."""
        self.store = store
        self.invoker = invoker
        self.settings = settings or OrchestratorSettings()
        self._runs: dict[str, _Run] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._background: list[asyncio.Task[None]] = []
        self._stopping = False
        self._random = random.Random()
        self.catalog = Catalog(store)
        self.put_workflow = self.catalog.put_workflow
        self.get_workflow = self.catalog.get_workflow
        self.list_workflows = self.catalog.list_workflows
        self.delete_workflow = self.catalog.delete_workflow
        self.executions = Executions(store)
        self.get_execution = self.executions.get_execution
        self.list_executions = self.executions.list_executions
        self.watch_execution = self.executions.watch_execution
        self.close_watches = self.executions.close_watches
        self.remember_ended = self.executions.remember_ended
        self.reporter = Reporter(report, self.settings.metrics_flush_interval)
        self.record = self.reporter.record
        self.retention = Retention(store, self.settings)
        self.sweep = self.retention.sweep
        self.ownership = Ownership(
            store,
            self.settings,
            resume=self._resume,
            skip=lambda execution_id: execution_id in self._runs or self._stopping,
            abandon=self._abandon,
        )
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

    def _spawn(self, run: _Run, resumed: bool) -> None:
        self._runs[run.execution_id] = run
        task = asyncio.create_task(run.drive(resumed), name=f"execution-{run.execution_id}")
        run.task = task
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._finished(run, t))

    def _finished(self, run: _Run, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if self._runs.get(run.execution_id) is run:
            del self._runs[run.execution_id]
        if task.cancelled() or self._stopping:
            return
        error = task.exception()
        if error is None:
            return
        if isinstance(error, _OwnershipLost):
            self.ownership.claims.pop(run.execution_id, None)
            _log.warning("execution=%s was taken over by another replica", run.execution_id)
            return
        if not isinstance(error, _RunBroken):
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
                _log.warning("resuming execution=%s failed (%s); retrying", execution_id, exc)

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
        run = _Run(self, spec, view)
        run.owned = True
        cancel = await self.store.get(CANCELS + execution_id)
        if cancel is not None and not view.cancel_requested:
            run.stage(
                ExecutionEventType.CANCEL_REQUESTED,
                error=Cancelled(
                    f"cancelled: {cancel.value.decode()}" if cancel.value else "cancelled"
                ),
                message=cancel.value.decode(),
            )
        self._spawn(run, resumed=True)

    # -- executions ------------------------------------------------------------------

    async def start_execution(
        self, request: orchestrator_pb2.StartExecutionRequest
    ) -> tuple[orchestrator_pb2.Execution, bool]:
        """Persist a new execution and start driving it; (execution, existing)."""
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
        for step in spec.steps:
            execution.steps.add(
                step_name=step.name,
                state=orchestrator_pb2.STEP_STATE_PENDING,
                idempotency_key=f"{execution_id}/{step.name}",
            )
        run = _Run(self, spec, ExecutionView(execution))
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
        try:
            committed = await run.flush(compares=compares, extra=extra)
        except _RunBroken as broken:  # nothing started: the caller gets the store's error
            cause = broken.__cause__
            raise cause if isinstance(cause, MeshError) else Unavailable(str(broken)) from None
        if not committed:  # the same key won a race meanwhile
            existing = await self.executions.by_idempotency_key(request.idempotency_key)
            if existing is None:  # pragma: no cover - the winner's write is visible
                raise Unavailable("concurrent StartExecution with this key; retry")
            return existing, True
        self.claimed(execution_id, run.revision)
        run.owned = True
        snapshot = orchestrator_pb2.Execution()
        snapshot.CopyFrom(run.view.execution)
        run.first = first
        self._spawn(run, resumed=False)
        _log.info(
            "execution started id=%s workflow=%s version=%d cid=%s",
            execution_id,
            workflow.name or "(inline)",
            workflow.version,
            execution.correlation_id,
        )
        return snapshot, False

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
        except _OwnershipLost:  # taken over meanwhile: ask the new owner
            return await self._cancel_elsewhere(execution_id, reason)
        with_deadline = asyncio.timeout(self.settings.cancel_wait)
        try:
            async with with_deadline:
                await run.settled()
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


# -- one execution -----------------------------------------------------------------------


@dataclass(slots=True)
class _Outcome:
    step: str
    reply: StepReply | None = None
    failure: AttemptFailed | None = None
    attempts: int = 0


class _Run:
    """Drives one execution (see the module docstring)."""

    def __init__(self, orchestrator: Orchestrator, spec: WorkflowSpec, view: ExecutionView) -> None:
        self.orchestrator = orchestrator
        self.store = orchestrator.store
        self.spec = spec
        self.view = view
        self.execution_id = view.execution.execution_id
        self.task: asyncio.Task[None] | None = None
        self.first: list[str] = []
        self._staged: list[orchestrator_pb2.ExecutionEvent] = []
        self._lock = asyncio.Lock()
        self._cancel = asyncio.Event()
        self._progress = asyncio.Event()
        #: The execution state as last committed (the view may be ahead of it).
        self.committed_state = view.state
        self._input: dict[str, Any] | None = None
        self._outputs: dict[str, dict[str, Any]] = {}
        self._payloads: dict[str, dict[str, Any]] = {}
        self._ctx: dict[str, Any] | None = None
        self._ctx_steps = -1
        #: Store revision of the last committed flush.
        self.revision = 0
        #: True once this replica holds the execution's owner key: from then on every
        #: write must be fenced by it, and a run whose claim is gone writes nothing.
        self.owned = False
        #: Instance chosen for each step's next attempt (persisted with STEP_STARTED).
        #: (Or why none could be picked: the attempt fails with it, unsent.)
        self._targets: dict[str, registry_pb2.ServiceInstance | AttemptFailed] = {}
        #: Per step, the instance of the last attempt whose outcome is unknown (sent
        #: and not answered yet, or timed out): a cancel leaves it to be resolved.
        self._unanswered: dict[str, str] = {}

    # -- persistence ----------------------------------------------------------------

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
                self.orchestrator.remember_ended(self.execution_id, record)
                end_ms = execution.end_time.ToNanoseconds() // 1_000_000
                ops.append(Delete(ACTIVE + self.execution_id))
                ops.append(Delete(OWNERS + self.execution_id))
                ops.append(Delete(CANCELS + self.execution_id))
                ops.append(Put(f"{ENDED}{end_ms:013d}/{self.execution_id}", b""))
            fence = self.orchestrator.fence(self.execution_id)
            if fence is None and self.owned:  # the lease lapsed: another may drive it now
                raise _OwnershipLost(self.execution_id)
            guards = [*compares, fence] if fence is not None else compares
            try:
                result = await _committed(self.store.txn(guards, ops))
            except MeshError as exc:
                raise _RunBroken(exc.message) from exc
            if not result.succeeded and fence is not None:
                raise _OwnershipLost(self.execution_id)
            self.revision = result.revision
            self.committed_state = state
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

    async def request_cancel(self, reason: str) -> None:
        """Record CANCEL_REQUESTED (once) and stop scheduling."""
        if self.view.ended:
            raise FailedPrecondition(f"execution {self.execution_id} already ended")
        if not self.view.cancel_requested:
            self.stage(
                ExecutionEventType.CANCEL_REQUESTED,
                error=Cancelled(f"cancelled: {reason}" if reason else "cancelled"),
                message=reason,
            )
            await self.flush()
        self._cancel.set()

    # -- the drive --------------------------------------------------------------------

    async def drive(self, resumed: bool) -> None:
        """Run the execution to its end (or until this task is cancelled at shutdown)."""
        view = self.view
        inflight: list[str] = []
        if resumed:
            self.stage(
                ExecutionEventType.EXECUTION_RESUMED,
                message=f"resumed by {self.orchestrator.settings.owner}",
            )
            stopping = (
                view.cancel_requested
                or view.state == ExecutionState.COMPENSATING
                or self._required_failure() is not None
            )
            for step in view.execution.steps:
                if StepState(step.state) != StepState.RUNNING:
                    continue
                if stopping:
                    # Its answer is lost: settled before compensating (maybe applied).
                    self.stage(
                        ExecutionEventType.STEP_CANCELLED,
                        state=self._settling(step.step_name, step.instance_id),
                        step=step.step_name,
                        step_state=StepState.CANCELLED,
                        instance_id=step.instance_id,
                        message="in flight when the control plane stopped; not resent",
                    )
                else:
                    await self._resend(step)
                    inflight.append(step.step_name)
            if view.cancel_requested:
                self._cancel.set()
        else:
            inflight = list(self.first)
        stop_error = await self._forward(inflight)
        unsettled = [
            s.step_name
            for s in view.execution.steps
            if StepState(s.state) not in (StepState.SUCCEEDED, StepState.FAILED, StepState.SKIPPED)
        ]
        if stop_error is None and unsettled:  # a bug, but never a false SUCCEEDED
            _log.error("execution=%s ended with unsettled steps %s", self.execution_id, unsettled)
            stop_error = ("", InternalError(f"steps {', '.join(unsettled)} never settled"))
        if stop_error is None:
            self.stage(ExecutionEventType.EXECUTION_ENDED, state=ExecutionState.SUCCEEDED)
            await self.flush()
            self._record_end()
            return
        failed_step, error = stop_error
        outcome = await self._compensate()
        cancelled = self.view.cancel_requested
        if outcome == "failed":
            final = ExecutionState.COMPENSATION_FAILED
        elif cancelled:
            final = ExecutionState.CANCELLED
        elif outcome == "compensated":
            final = ExecutionState.COMPENSATED
        else:
            final = ExecutionState.FAILED
        self.stage(
            ExecutionEventType.EXECUTION_ENDED,
            state=final,
            failed_step=failed_step,
            error=error,
        )
        await self.flush()
        self._record_end()

    def _required_failure(self) -> tuple[str, MeshError] | None:
        """The first required step that failed, from the view (for resumes)."""
        failed = [
            s
            for s in self.view.execution.steps
            if StepState(s.state) == StepState.FAILED and self.spec.step(s.step_name).required
        ]
        if not failed:
            return None
        first = min(failed, key=lambda s: s.end_time.ToNanoseconds())
        return first.step_name, mesh_error(first.error)

    def _stop_reason(self) -> tuple[str, MeshError] | None:
        if self.view.cancel_requested:
            return "", mesh_error(self.view.cancel_error)
        failure = self._required_failure()
        if failure is not None:
            return failure
        if self._timed_out():
            return "", DeadlineExceeded(
                f"execution exceeded its timeout of {self.spec.timeout:g} s"
            )
        return None

    def _deadline(self) -> float | None:
        if not self.spec.timeout:
            return None
        started = self.view.execution.start_time.ToNanoseconds() / 1e9
        return started + self.spec.timeout

    def _timed_out(self) -> bool:
        deadline = self._deadline()
        return deadline is not None and time.time() >= deadline

    def schedule(self) -> list[str]:
        """Stage skips of steps that cannot run; returns the steps ready to start."""
        view = self.view
        ready: list[str] = []
        for step in self.spec.steps:
            if view.state_of(step.name) != StepState.PENDING:
                continue
            states = [view.state_of(d) for d in step.depends_on]
            blocked = [
                d
                for d, s in zip(step.depends_on, states, strict=True)
                if s in (StepState.FAILED, StepState.SKIPPED, StepState.CANCELLED)
            ]
            if blocked:
                self.stage(
                    ExecutionEventType.STEP_SKIPPED,
                    step=step.name,
                    step_state=StepState.SKIPPED,
                    message=f"dependency {blocked[0]} did not succeed",
                )
                continue
            if all(s == StepState.SUCCEEDED for s in states):
                try:
                    self._payload(step)
                except MeshError as err:
                    self.stage(
                        ExecutionEventType.STEP_FAILED,
                        step=step.name,
                        step_state=StepState.FAILED,
                        error=err,
                        message="input could not be built",
                    )
                    self._record_step(step, False, err.code)
                    continue
                ready.append(step.name)
        return ready

    async def begin(self, names: list[str]) -> list[str]:
        """Pick an instance for each ready step and stage its STEP_STARTED with it (so
        the instance is persisted before the call is sent); returns ``names``."""
        for name in names:
            instance = await self._pick(self.spec.step(name).service)
            self._targets[name] = instance
            self.stage(
                ExecutionEventType.STEP_STARTED,
                step=name,
                step_state=StepState.RUNNING,
                attempt=1,
                instance_id=_instance_id(instance),
            )
        return names

    async def _pick(self, service: str) -> registry_pb2.ServiceInstance | AttemptFailed:
        """The next instance of ``service``, or why there is none (the attempt then
        fails with it without being sent, and is retried per the policy)."""
        try:
            return await self.orchestrator.invoker.pick(service)
        except AttemptFailed as failure:
            return failure

    async def _resend(self, step: orchestrator_pb2.StepExecution) -> None:
        """Stage the STEP_STARTED of a step in flight when the last owner stopped: to the
        instance that got it while it is there, else elsewhere (at-least-once)."""
        service = self.spec.step(step.step_name).service
        invoker = self.orchestrator.invoker
        before = step.instance_id
        there = invoker.still_there(service, before)
        moved = there is None and bool(before)
        instance = there if there is not None else await self._pick(service)
        if not moved:
            message = "sent again after a restart, same idempotency key, same instance"
        else:
            message = (
                f"sent again after a restart, same idempotency key: instance {before} is "
                "gone, so the step may run twice (at-least-once)"
            )
        self._targets[step.step_name] = instance
        self.stage(
            ExecutionEventType.STEP_STARTED,
            step=step.step_name,
            step_state=StepState.RUNNING,
            attempt=step.attempts + 1,
            instance_id=_instance_id(instance),
            message=message,
            at_least_once=moved,
        )

    def _context(self) -> dict[str, Any]:
        """What references see: the input, completed steps' outputs, the execution."""
        if self._ctx is None or self._ctx_steps != len(self.view.completed):
            execution = self.view.execution
            if self._input is None:
                self._input = struct_to_dict(execution.input)
            steps = {}
            for name in self.view.completed:
                output = self._outputs.get(name)
                if output is None:
                    output = self._outputs[name] = struct_to_dict(self.view.step(name).output)
                steps[name] = {"output": output}
            self._ctx = {
                "input": self._input,
                "steps": steps,
                "execution": {
                    "id": execution.execution_id,
                    "correlation_id": execution.correlation_id,
                },
            }
            self._ctx_steps = len(self.view.completed)
        return self._ctx

    def _payload(self, step: StepSpec) -> dict[str, Any]:
        """The step's input; built once (its references only reach finished steps)."""
        payload = self._payloads.get(step.name)
        if payload is None:
            if step.input is None:
                payload = struct_to_dict(self.view.execution.input)
            else:
                payload = _as_payload(step.input, self._context(), f"steps.{step.name}.input")
            self._payloads[step.name] = payload
        return payload

    async def _forward(self, inflight: list[str]) -> tuple[str, MeshError] | None:
        """Schedule and run steps until all settled or the execution must stop."""
        running: dict[asyncio.Task[_Outcome], str] = {}
        try:
            for name in inflight:
                running[self._launch(name)] = name
            while True:
                stop = self._stop_reason()
                if stop is None:
                    ready = self.schedule()
                    stop = self._stop_reason()  # a required step's input failed
                    started = await self.begin(ready) if stop is None else []
                else:
                    started = []
                if stop is None and not started and not running:
                    return None  # the last outcomes are committed with EXECUTION_ENDED
                await self.flush()
                if stop is not None:
                    break
                for name in started:
                    running[self._launch(name)] = name
                waiter = asyncio.ensure_future(self._cancel.wait())
                deadline = self._deadline()
                try:
                    done, _ = await asyncio.wait(
                        [*running, waiter],
                        timeout=None if deadline is None else max(0.0, deadline - time.time()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                finally:
                    waiter.cancel()
                for task in [t for t in running if t in done]:
                    del running[task]
                    self._settle(task.result())
            # Stopping: cancel what runs, skip what waits, all recorded together.
            for task in running:
                task.cancel()
            outcomes = await asyncio.gather(*running, return_exceptions=True)
            for (task, name), outcome in zip(list(running.items()), outcomes, strict=True):
                del task
                if isinstance(outcome, _Outcome):
                    self._settle(outcome)  # it finished as we cancelled it
                else:
                    # An attempt on its way had its answer cut off: the instance may
                    # do the work anyway; settled before compensating.
                    unanswered = self._unanswered.pop(name, "")
                    self.stage(
                        ExecutionEventType.STEP_CANCELLED,
                        state=self._settling(name, unanswered),
                        step=name,
                        step_state=StepState.CANCELLED,
                        error=stop[1],
                        instance_id=unanswered,
                        message="stopped in flight: the execution is stopping"
                        if unanswered
                        else "stopped: the execution is stopping",
                    )
            running.clear()
            for step in self.spec.steps:
                if self.view.state_of(step.name) == StepState.PENDING:
                    self.stage(
                        ExecutionEventType.STEP_SKIPPED,
                        step=step.name,
                        step_state=StepState.SKIPPED,
                        message="not run: the execution is stopping",
                    )
            await self.flush()
            return stop
        finally:
            for task in running:
                task.cancel()
            if running:
                await asyncio.gather(*running, return_exceptions=True)

    def _launch(self, name: str) -> asyncio.Task[_Outcome]:
        step = self.spec.step(name)
        return asyncio.create_task(self._run_step(step), name=f"{self.execution_id}/{name}")

    def _settle(self, outcome: _Outcome) -> None:
        step = self.spec.step(outcome.step)
        self._payloads.pop(step.name, None)
        if outcome.reply is not None:
            self._outputs[step.name] = outcome.reply.output
            self.stage(
                ExecutionEventType.STEP_SUCCEEDED,
                step=step.name,
                step_state=StepState.SUCCEEDED,
                attempt=outcome.attempts,
                output=outcome.reply.output,
                instance_id=outcome.reply.instance_id,
                message="replayed by the callee" if outcome.reply.replayed else "",
            )
            self._record_step(step, True, grpc.StatusCode.OK)
            return
        assert outcome.failure is not None
        error = outcome.failure.error
        self.stage(
            ExecutionEventType.STEP_FAILED,
            step=step.name,
            step_state=StepState.FAILED,
            attempt=outcome.attempts,
            error=error,
            instance_id=outcome.failure.instance_id,
            message="" if step.required else "optional step: dependents are skipped",
        )
        self._record_step(step, False, error.code)

    async def _run_step(self, step: StepSpec) -> _Outcome:
        record = self.view.step(step.name)
        first_attempt = record.attempts or 1
        idempotency_key = record.idempotency_key
        invoker = self.orchestrator.invoker
        last: list[AttemptFailed] = []

        async def call() -> StepReply:
            payload = self._payload(step)
            target = self._targets.get(step.name)
            if target is None:  # pragma: no cover - every attempt is staged with one
                target = await self._pick(step.service)
            if isinstance(target, AttemptFailed):
                raise target
            timeout = step.timeout
            deadline = self._deadline()
            if deadline is not None:
                timeout = max(0.001, min(timeout, deadline - time.time()))
            self._unanswered[step.name] = target.instance_id
            try:
                reply = await invoker.invoke(
                    step.service,
                    step.operation,
                    payload,
                    timeout=timeout,
                    correlation_id=self.view.execution.correlation_id,
                    idempotency_key=idempotency_key,
                    instance=target,
                )
            except AttemptFailed as failure:
                if not _unknown_outcome(failure):
                    self._unanswered.pop(step.name, None)  # it answered: not done
                raise
            self._unanswered.pop(step.name, None)
            return reply

        attempts = [first_attempt]

        async def on_retry(number: int, failure: AttemptFailed, backoff: float) -> None:
            last[:] = [failure]
            self.stage(
                ExecutionEventType.STEP_RETRYING,
                step=step.name,
                step_state=StepState.RUNNING,
                attempt=number,
                error=failure.error,
                instance_id=failure.instance_id,
                backoff=backoff,
            )
            await self.flush()

        async def before_attempt(number: int) -> None:
            attempts[0] = number
            if number <= first_attempt:
                return
            # A resend whose previous answer was lost goes back to the same instance
            # (its idempotency cache joins or replays it); after an answer, any instance.
            failure = last[0] if last else None
            there: registry_pb2.ServiceInstance | None = None
            pinned = failure is not None and _unknown_outcome(failure)
            if failure is not None and pinned:
                there = invoker.still_there(step.service, failure.instance_id)
            moved = pinned and there is None
            target = there if there is not None else await self._pick(step.service)
            self._targets[step.name] = target
            self.stage(
                ExecutionEventType.STEP_STARTED,
                step=step.name,
                step_state=StepState.RUNNING,
                attempt=number,
                instance_id=_instance_id(target),
                at_least_once=moved,
                message=(
                    "the instance that got the previous attempt is gone: the step may "
                    "run twice (at-least-once)"
                    if moved
                    else ""
                ),
            )
            await self.flush()

        try:
            reply = await _with_retries(
                call,
                step.retry,
                first_attempt,
                self.orchestrator._random,
                on_retry=on_retry,
                before_attempt=before_attempt,
            )
        except AttemptFailed as failure:
            return _Outcome(step.name, failure=failure, attempts=attempts[0])
        except MeshError as error:  # the input could not be built
            return _Outcome(step.name, failure=AttemptFailed(error), attempts=attempts[0])
        finally:
            self._targets.pop(step.name, None)
        return _Outcome(step.name, reply=reply, attempts=attempts[0])

    # -- compensation ---------------------------------------------------------------------

    async def _compensate(self) -> str:
        """Settle unknown outcomes, then compensate completed steps newest first (and
        those whose outcome cannot be known): "none", "compensated" or "failed"."""
        anyway = await self._resolve_unknown()
        todo = [
            *anyway,
            *(
                name
                for name in reversed(self.view.completed)
                if self.spec.step(name).compensation is not None
                and self.view.state_of(name) in (StepState.SUCCEEDED, StepState.COMPENSATING)
            ),
        ]
        already = [
            s.step_name
            for s in self.view.execution.steps
            if StepState(s.state) in (StepState.COMPENSATED, StepState.COMPENSATION_FAILED)
        ]
        if not todo and not already:
            return "none"
        for name in todo:
            await self._compensate_step(self.spec.step(name), anyway=name in anyway)
        failed = any(
            StepState(s.state) == StepState.COMPENSATION_FAILED for s in self.view.execution.steps
        )
        return "failed" if failed else "compensated"

    def _settling(self, name: str, instance_id: str) -> ExecutionState:
        """COMPENSATING when a step cut off in flight on ``instance_id`` declares a
        compensation (its outcome is settled, then maybe undone), else no change."""
        if instance_id and self.spec.step(name).compensation is not None:
            return ExecutionState.COMPENSATING
        return ExecutionState.UNSPECIFIED

    def _unknown_outcomes(self) -> list[orchestrator_pb2.StepExecution]:
        """Steps with a compensation whose last attempt may have been applied unseen."""
        return [
            s
            for s in self.view.execution.steps
            if s.outcome_unknown
            and self.spec.step(s.step_name).compensation is not None
            and StepState(s.state)
            in (StepState.CANCELLED, StepState.FAILED, StepState.COMPENSATING)
        ]

    async def _resolve_unknown(self) -> list[str]:
        """Ask the instance that got each unknown attempt what became of it (same key,
        ``lookup_only``, at most ``resolve_timeout`` s, all at once): one that succeeded
        becomes SUCCEEDED (then compensated like any), one with no record was not
        applied. Returns the steps whose outcome cannot be known: compensated anyway."""
        steps = self._unknown_outcomes()
        if not steps:
            return []
        answers = await asyncio.gather(*(self._ask(s) for s in steps))
        anyway: list[str] = []
        for step, (reply, reason, applied) in zip(steps, answers, strict=True):
            name = step.step_name
            if StepState(step.state) == StepState.COMPENSATING:
                anyway.append(name)  # resumed mid-compensation: it was decided already
                continue
            if reply is not None:
                self.stage(
                    ExecutionEventType.STEP_OUTCOME_RESOLVED,
                    state=ExecutionState.COMPENSATING,
                    step=name,
                    step_state=StepState.SUCCEEDED,
                    output=reply.output,
                    instance_id=reply.instance_id,
                    message=f"instance {reply.instance_id} answered that it succeeded: "
                    "it is compensated",
                )
                self._outputs[name] = reply.output
                continue
            # Not applied: the step keeps its state. Cannot be known: COMPENSATING, and
            # its compensation runs anyway (compensations tolerate nothing to undo).
            self.stage(
                ExecutionEventType.STEP_OUTCOME_RESOLVED,
                state=ExecutionState.COMPENSATING,
                step=name,
                step_state=StepState(step.state) if applied is False else StepState.COMPENSATING,
                instance_id=step.instance_id,
                message=reason,
            )
            if applied is None:
                anyway.append(name)
        await self.flush()
        return anyway

    async def _ask(
        self, step: orchestrator_pb2.StepExecution
    ) -> tuple[StepReply | None, str, bool | None]:
        """(reply, why, applied) of a step's unknown attempt: applied is True with the
        reply, False when the instance has no record of it, None when unknowable."""
        spec = self.spec.step(step.step_name)
        invoker = self.orchestrator.invoker
        timeout = self.orchestrator.settings.resolve_timeout
        instance = invoker.still_there(spec.service, step.instance_id)
        if instance is None:
            return (
                None,
                f"instance {step.instance_id} is gone: whether the step was applied cannot "
                "be known; its compensation runs anyway",
                None,
            )
        try:
            reply = await invoker.invoke(
                spec.service,
                spec.operation,
                {},
                timeout=timeout,
                correlation_id=self.view.execution.correlation_id,
                idempotency_key=step.idempotency_key,
                instance=instance,
                lookup_only=True,
            )
        except AttemptFailed as failure:
            if failure.error.code == grpc.StatusCode.NOT_FOUND:
                return (
                    None,
                    f"instance {step.instance_id} has no record of it: not applied, "
                    "nothing to compensate",
                    False,
                )
            return (
                None,
                f"instance {step.instance_id} did not say within {timeout:g} s "
                f"({failure.error.message}): whether the step was applied cannot be known; "
                "its compensation runs anyway",
                None,
            )
        return reply, "", True

    async def _compensate_step(self, step: StepSpec, *, anyway: bool = False) -> None:
        compensation = step.compensation
        assert compensation is not None
        record = self.view.step(step.name)
        first_attempt = record.compensation_attempts + 1
        idempotency_key = f"{record.idempotency_key}/compensation"
        errors: list[AttemptFailed] = []

        async def before_attempt(number: int) -> None:
            self.stage(
                ExecutionEventType.COMPENSATION_STARTED,
                state=ExecutionState.COMPENSATING,
                step=step.name,
                step_state=StepState.COMPENSATING,
                attempt=number,
                error=errors[-1].error if errors else None,
                message=f"{compensation.service}.{compensation.operation}"
                + (" (the step's outcome is unknown: compensating anyway)" if anyway else ""),
            )
            await self.flush()

        async def on_retry(number: int, failure: AttemptFailed, backoff: float) -> None:
            errors.append(failure)

        async def call() -> StepReply:
            payload = self._compensation_payload(step, compensation, anyway=anyway)
            return await self.orchestrator.invoker.invoke(
                compensation.service,
                compensation.operation,
                payload,
                timeout=compensation.timeout,
                correlation_id=self.view.execution.correlation_id,
                idempotency_key=idempotency_key,
            )

        try:
            reply = await _with_retries(
                call,
                compensation.retry,
                first_attempt,
                self.orchestrator._random,
                on_retry=on_retry,
                before_attempt=before_attempt,
            )
        except (AttemptFailed, MeshError) as exc:
            failure = exc if isinstance(exc, AttemptFailed) else AttemptFailed(exc)
            self.stage(
                ExecutionEventType.COMPENSATION_FAILED,
                state=ExecutionState.COMPENSATING,
                step=step.name,
                step_state=StepState.COMPENSATION_FAILED,
                attempt=self.view.step(step.name).compensation_attempts,
                error=failure.error,
                instance_id=failure.instance_id,
                message="compensation failed after its retries: an operator must act",
            )
            await self.flush()
            _log.error(
                "compensation failed execution=%s step=%s: %s",
                self.execution_id,
                step.name,
                failure.error.message,
            )
            return
        self.stage(
            ExecutionEventType.COMPENSATION_SUCCEEDED,
            state=ExecutionState.COMPENSATING,
            step=step.name,
            step_state=StepState.COMPENSATED,
            attempt=self.view.step(step.name).compensation_attempts,
            output=reply.output,
            instance_id=reply.instance_id,
        )
        await self.flush()

    def _compensation_payload(
        self, step: StepSpec, compensation: CompensationSpec, *, anyway: bool = False
    ) -> dict[str, Any]:
        if compensation.input is None:
            if anyway:  # no output to give: what the step was asked to do
                return self._payload(step)
            return struct_to_dict(self.view.step(step.name).output)
        return _as_payload(compensation.input, self._context(), f"steps.{step.name}.compensation")

    # -- metrics -------------------------------------------------------------------------

    def _record_step(self, step: StepSpec, success: bool, code: grpc.StatusCode) -> None:
        self.orchestrator.record(step_record(self.view, step.name, success, code))

    def _record_end(self) -> None:
        execution = self.view.execution
        self.orchestrator.record(end_record(self.view))
        _log.info(
            "execution ended id=%s state=%s duration_ms=%.1f",
            self.execution_id,
            self.view.state.name,
            execution.duration.ToNanoseconds() / 1e6,
        )


# -- retries ---------------------------------------------------------------------------------


def _instance_id(target: registry_pb2.ServiceInstance | AttemptFailed) -> str:
    return "" if isinstance(target, AttemptFailed) else target.instance_id


def _unknown_outcome(failure: AttemptFailed) -> bool:
    """True when the attempt reached an instance and its answer was lost (it may have
    been applied there)."""
    return bool(failure.instance_id) and failure.error.code.value[0] in UNKNOWN_OUTCOME_CODES


async def _with_retries(
    call: Callable[[], Awaitable[StepReply]],
    policy: RetrySpec,
    first_attempt: int,
    rng: random.Random,
    *,
    on_retry: Callable[[int, AttemptFailed, float], Awaitable[None]],
    before_attempt: Callable[[int], Awaitable[None]],
) -> StepReply:
    """Call with the policy's retries, numbering attempts from ``first_attempt``.

    Only the policy's codes are retried (infrastructure faults by default); a business
    rejection raises at once. An attempt resumed after a restart counts: the attempts
    left are ``max_attempts - (first_attempt - 1)``, at least one. The first attempt is
    a plain ``await`` (see ``flext_mesh.retry.retry_async``).
    """
    number = first_attempt

    async def attempt() -> StepReply:
        await before_attempt(number)
        return await call()

    async def retrying(failed: int, failure: Exception, backoff: float) -> None:
        nonlocal number
        assert isinstance(failure, AttemptFailed)
        await on_retry(failed, failure, backoff)
        number = failed + 1

    return await retry_async(
        attempt,
        policy,
        on_attempt=retrying,
        status=lambda e: e.error.code if isinstance(e, AttemptFailed) else None,
        first_attempt=first_attempt,
        rand=rng.random,
    )


# -- validation ------------------------------------------------------------------------------


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


def _as_payload(template: Any, context: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        value = resolve(template, context)
    except UnresolvedReference as exc:
        raise InvalidArgument(f"{where}: {exc}", [FieldViolation(where, str(exc))]) from None
    if not isinstance(value, dict):
        raise InvalidArgument(
            f"{where} resolved to {type(value).__name__}; a step's input must be an object",
            [FieldViolation(where, "must resolve to an object")],
        )
    return value
