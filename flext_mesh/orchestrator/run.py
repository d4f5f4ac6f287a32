"""One execution driven to its end by one task: the run state machine.

A run schedules the steps whose dependencies succeeded, picks an instance for each and
stages its STEP_STARTED (so the instance is persisted before the call is sent), runs them
concurrently, and folds their outcomes back into the view; its :class:`~.journal.Journal`
flushes each set of transitions in one transaction before the run acts on them. After a
restart every active execution is replayed from its events and resumed; a step that was
in flight is sent again with the same idempotency key, which a sidecar answers from its
cache instead of running it twice.

Step failures: attempts are retried per the step's policy (:mod:`.steps`). A failed
optional step skips its dependents; a failed required step (or a cancellation, or the
execution's timeout) stops scheduling, cancels running steps, and hands over to
:mod:`.compensation`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from flext_mesh.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    InternalError,
    MeshError,
)
from flext_mesh.orchestrator.compensation import Compensation
from flext_mesh.orchestrator.history import (
    ExecutionEventType,
    ExecutionState,
    ExecutionView,
    StepState,
)
from flext_mesh.orchestrator.invoker import AttemptFailed, StepInvoker, StepReply
from flext_mesh.orchestrator.journal import Journal
from flext_mesh.orchestrator.records import mesh_error
from flext_mesh.orchestrator.reporting import Durations, end_record, step_record
from flext_mesh.orchestrator.settings import OrchestratorSettings
from flext_mesh.orchestrator.spec import StepSpec, WorkflowSpec
from flext_mesh.orchestrator.steps import (
    Outcome,
    Recorded,
    StepInputs,
    Target,
    instance_id_of,
    with_retries,
)
from flext_mesh.rpc import tracing
from flext_mesh.store import Compare, Store
from flext_mesh.v1 import metrics_pb2, orchestrator_pb2, registry_pb2

__all__ = ["Run", "RunContext", "cancel_error"]

_log = logging.getLogger("flext_mesh.orchestrator")


@dataclass(frozen=True, kw_only=True)
class RunContext:
    """What a run needs of the replica that drives it."""

    store: Store
    #: Makes each step attempt.
    invoker: StepInvoker
    settings: OrchestratorSettings
    #: The guard of a write for an execution (see :meth:`.ownership.Ownership.fence`).
    fence: Callable[[str], Compare | None]
    #: Queues a duration record for the metrics service.
    record: Callable[[metrics_pb2.CallRecord], None]
    #: Keeps a just-ended execution's record for the watchers' last message.
    remember_ended: Callable[[str, bytes], None]
    #: Jitters retry backoffs.
    rng: random.Random
    #: Reads a step result kept for shared idempotency (when an instance is gone).
    recorded: Recorded | None = None
    #: Also observes step and execution durations as they happen (Prometheus).
    durations: Durations | None = None


class Run:
    """Drives one execution (see the module docstring)."""

    def __init__(self, context: RunContext, spec: WorkflowSpec, view: ExecutionView) -> None:
        self.context = context
        self.invoker = context.invoker
        self.spec = spec
        self.view = view
        self.execution_id = view.execution.execution_id
        self.task: asyncio.Task[None] | None = None
        self.first: list[str] = []
        self.journal = Journal(
            context.store, view, fence=context.fence, remember_ended=context.remember_ended
        )
        self.stage = self.journal.stage
        self.flush = self.journal.flush
        self.inputs = StepInputs(view)
        self.compensation = Compensation(
            self.journal,
            spec,
            self.inputs,
            context.invoker,
            resolve_timeout=context.settings.resolve_timeout,
            rng=context.rng,
            recorded=context.recorded,
        )
        #: Done once a cancellation was asked (a future, not an Event: the drive waits
        #: on it beside its running steps without a task per scheduling round).
        self._cancel: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        #: Instance chosen for each step's next attempt (persisted with STEP_STARTED).
        #: (Or why none could be picked: the attempt fails with it, unsent.)
        self._targets: dict[str, Target] = {}

    @property
    def _workflow(self) -> str:
        return self.view.execution.workflow_name or "(inline)"

    def _cancel_now(self) -> None:
        if not self._cancel.done():
            self._cancel.set_result(None)

    async def request_cancel(self, reason: str) -> None:
        """Record CANCEL_REQUESTED (once) and stop scheduling."""
        if self.view.ended:
            raise FailedPrecondition(f"execution {self.execution_id} already ended")
        if not self.view.cancel_requested:
            self.stage(
                ExecutionEventType.CANCEL_REQUESTED,
                error=cancel_error(reason),
                message=reason,
            )
            await self.flush()
        self._cancel_now()

    # -- the drive --------------------------------------------------------------------

    async def drive(self, resumed: bool) -> None:
        """Run the execution to its end (or until this task is cancelled at shutdown)."""
        view = self.view
        inflight: list[str] = []
        if resumed:
            self.stage(
                ExecutionEventType.EXECUTION_RESUMED,
                message=f"resumed by {self.context.settings.owner}",
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
                    unresolved = view.unresolved_on(step.step_name)
                    self.stage(
                        ExecutionEventType.STEP_CANCELLED,
                        state=self.compensation.settling(step.step_name, unresolved),
                        step=step.step_name,
                        step_state=StepState.CANCELLED,
                        instance_id=unresolved,
                        message="in flight when the control plane stopped; not resent",
                    )
                else:
                    await self._resend(step)
                    inflight.append(step.step_name)
            if view.cancel_requested:
                self._cancel_now()
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
        outcome = await self.compensation.compensate()
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
                    self.inputs.payload(step)
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
                instance_id=instance_id_of(instance),
            )
        return names

    async def _pick(self, service: str) -> registry_pb2.ServiceInstance | AttemptFailed:
        """The next instance of ``service``, or why there is none (the attempt then
        fails with it without being sent, and is retried per the policy)."""
        try:
            return await self.invoker.pick(service)
        except AttemptFailed as failure:
            return failure

    async def _place(self, name: str) -> tuple[Target, bool, str]:
        """Where the step's next attempt goes, whether it is then at-least-once, and why.

        While an instance may hold a lost attempt (``ExecutionView.unresolved_on``), the
        resend goes back to it: its idempotency cache joins or replays the first call.
        If it is gone, the result it kept with the control plane settles the step
        (shared idempotency); failing that, the next instance gets it, at-least-once.
        Otherwise the next instance in rotation.
        """
        service = self.spec.step(name).service
        holder = self.view.unresolved_on(name)
        if not holder:
            return await self._pick(service), False, ""
        there = self.invoker.still_there(service, holder)
        if there is not None:
            return there, False, "same instance"
        if self.context.recorded is not None:
            kept = await self.context.recorded(self.execution_id, name)
            if kept is not None:
                return (
                    kept,
                    False,
                    (
                        f"instance {holder} is gone; it kept its result with the control plane "
                        "(shared idempotency): settled from it, not sent again"
                    ),
                )
        return (
            await self._pick(service),
            True,
            (
                f"instance {holder}, which may hold a lost attempt, is gone: the step may run "
                "twice (at-least-once)"
            ),
        )

    async def _resend(self, step: orchestrator_pb2.StepExecution) -> None:
        """Stage the STEP_STARTED of a step in flight when the last owner stopped."""
        target, moved, why = await self._place(step.step_name)
        self._targets[step.step_name] = target
        self.stage(
            ExecutionEventType.STEP_STARTED,
            step=step.step_name,
            step_state=StepState.RUNNING,
            attempt=step.attempts + 1,
            instance_id=instance_id_of(target),
            message=f"sent again after a restart, same idempotency key{': ' if why else ''}{why}",
            at_least_once=moved,
        )

    async def _forward(self, inflight: list[str]) -> tuple[str, MeshError] | None:
        """Schedule and run steps until all settled or the execution must stop."""
        running: dict[asyncio.Task[Outcome], str] = {}
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
                deadline = self._deadline()
                waited: list[asyncio.Future[Any]] = [*running, self._cancel]
                done, _ = await asyncio.wait(
                    waited,
                    timeout=None if deadline is None else max(0.0, deadline - time.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                for task in [t for t in running if t in done]:
                    del running[task]
                    self._settle(task.result())
            # Stopping: cancel what runs, skip what waits, all recorded together.
            for task in running:
                task.cancel()
            outcomes = await asyncio.gather(*running, return_exceptions=True)
            for (task, name), outcome in zip(list(running.items()), outcomes, strict=True):
                del task
                if isinstance(outcome, Outcome):
                    self._settle(outcome)  # it finished as we cancelled it
                else:
                    # An attempt on its way had its answer cut off: the instance may
                    # do the work anyway; settled before compensating.
                    unanswered = self.view.in_flight_on(name)
                    self.stage(
                        ExecutionEventType.STEP_CANCELLED,
                        state=self.compensation.settling(name, unanswered),
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

    def _launch(self, name: str) -> asyncio.Task[Outcome]:
        step = self.spec.step(name)
        return asyncio.create_task(self._run_step(step), name=f"{self.execution_id}/{name}")

    def _settle(self, outcome: Outcome) -> None:
        step = self.spec.step(outcome.step)
        self.inputs.payloads.pop(step.name, None)
        if outcome.reply is not None:
            self.inputs.outputs[step.name] = outcome.reply.output
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

    async def _run_step(self, step: StepSpec) -> Outcome:
        record = self.view.step(step.name)
        first_attempt = record.attempts or 1
        idempotency_key = record.idempotency_key
        invoker = self.invoker

        async def call() -> StepReply:
            payload = self.inputs.payload(step)
            target = self._targets.get(step.name)
            if target is None:  # pragma: no cover - every attempt is staged with one
                target = await self._pick(step.service)
            if isinstance(target, AttemptFailed):
                raise target
            if isinstance(target, StepReply):
                return target  # the result kept for shared idempotency
            timeout = step.timeout
            deadline = self._deadline()
            if deadline is not None:
                timeout = max(0.001, min(timeout, deadline - time.time()))
            return await invoker.invoke(
                step.service,
                step.operation,
                payload,
                timeout=timeout,
                correlation_id=self.view.execution.correlation_id,
                idempotency_key=idempotency_key,
                instance=target,
                traceparent=self.view.execution.traceparent,
                span=f"step {step.name}",
            )

        attempts = [first_attempt]

        async def on_retry(number: int, failure: AttemptFailed, backoff: float) -> None:
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
            target, moved, why = await self._place(step.name)
            self._targets[step.name] = target
            self.stage(
                ExecutionEventType.STEP_STARTED,
                step=step.name,
                step_state=StepState.RUNNING,
                attempt=number,
                instance_id=instance_id_of(target),
                at_least_once=moved,
                message="" if why == "same instance" else why,
            )
            await self.flush()

        try:
            reply = await with_retries(
                call,
                step.retry,
                first_attempt,
                self.context.rng,
                on_retry=on_retry,
                before_attempt=before_attempt,
            )
        except AttemptFailed as failure:
            return Outcome(step.name, failure=failure, attempts=attempts[0])
        except MeshError as error:  # the input could not be built
            return Outcome(step.name, failure=AttemptFailed(error), attempts=attempts[0])
        finally:
            self._targets.pop(step.name, None)
        return Outcome(step.name, reply=reply, attempts=attempts[0])

    # -- metrics -------------------------------------------------------------------------

    def _record_step(self, step: StepSpec, success: bool, code: grpc.StatusCode) -> None:
        record = step_record(self.view, step.name, success, code)
        self.context.record(record)
        if self.context.durations is not None:
            self.context.durations.step(
                self._workflow, step.name, code.name, record.duration_ms / 1000
            )

    def _record_end(self) -> None:
        execution = self.view.execution
        record = end_record(self.view)
        self.context.record(record)
        if execution.traceparent:
            tracing.execution_span(
                execution.traceparent,
                execution.trace_parent_span_id,
                f"workflow {self._workflow}",
                start_ns=execution.start_time.ToNanoseconds(),
                end_ns=execution.end_time.ToNanoseconds(),
                attributes={
                    "flext_mesh.workflow": self._workflow,
                    "flext_mesh.execution_id": self.execution_id,
                    "flext_mesh.state": self.view.state.name,
                    "flext_mesh.correlation_id": execution.correlation_id,
                },
                error=execution.error.message
                if self.view.state != ExecutionState.SUCCEEDED
                else "",
            )
        if self.context.durations is not None:
            self.context.durations.execution(
                self._workflow, self.view.state.name, record.duration_ms / 1000
            )
        _log.info(
            "execution ended id=%s state=%s duration_ms=%.1f",
            self.execution_id,
            self.view.state.name,
            execution.duration.ToNanoseconds() / 1e6,
        )


def cancel_error(reason: str) -> Cancelled:
    """The error of an execution cancelled for ``reason``: the reason as its message
    (the CANCELLED code says the rest), or "no reason given"."""
    return Cancelled(reason or "no reason given")
