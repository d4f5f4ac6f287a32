"""The backward half of a saga: settle lost outcomes, then undo completed steps.

A failed required step (or a cancellation, or the execution's timeout) stops the run
(:mod:`.run`); then each step whose last attempt's answer was lost is settled first: the
instance that got it is asked what became of it (same idempotency key, nothing run).
Then the completed steps are compensated in reverse order of completion, each
compensation retried per its policy. Compensations that still fail leave
COMPENSATION_FAILED for an operator; the remaining compensations run anyway, so as much
as possible is undone.
"""

from __future__ import annotations

import asyncio
import logging
import random

import grpc

from flext_mesh.errors import MeshError
from flext_mesh.orchestrator.history import ExecutionEventType, ExecutionState, StepState
from flext_mesh.orchestrator.invoker import AttemptFailed, StepInvoker, StepReply
from flext_mesh.orchestrator.journal import Journal
from flext_mesh.orchestrator.spec import StepSpec, WorkflowSpec
from flext_mesh.orchestrator.steps import Recorded, StepInputs, with_retries
from flext_mesh.v1 import orchestrator_pb2

__all__ = ["Compensation"]

_log = logging.getLogger("flext_mesh.orchestrator")


class Compensation:
    """Settles the unknown outcomes of one execution and compensates its steps."""

    def __init__(
        self,
        journal: Journal,
        spec: WorkflowSpec,
        inputs: StepInputs,
        invoker: StepInvoker,
        *,
        resolve_timeout: float,
        rng: random.Random,
        recorded: Recorded | None = None,
    ) -> None:
        """``resolve_timeout``: seconds an instance has to say what became of an attempt
        whose answer was lost; ``rng`` jitters retry backoffs; ``recorded`` reads a step
        result kept for shared idempotency (asked when the instance is gone)."""
        self.spec = spec
        self.view = journal.view
        self.execution_id = journal.execution_id
        self.stage = journal.stage
        self.flush = journal.flush
        self.inputs = inputs
        self.invoker = invoker
        self.resolve_timeout = resolve_timeout
        self.rng = rng
        self.recorded = recorded

    async def compensate(self) -> str:
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

    def settling(self, name: str, instance_id: str) -> ExecutionState:
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
                    message=reason
                    or f"instance {reply.instance_id} answered that it succeeded: "
                    "it is compensated",
                )
                self.inputs.outputs[name] = reply.output
                continue
            # Not applied: the step keeps its state. Cannot be known: COMPENSATING, and
            # its compensation runs anyway (compensations tolerate nothing to undo).
            self.stage(
                ExecutionEventType.STEP_OUTCOME_RESOLVED,
                state=ExecutionState.COMPENSATING,
                step=name,
                step_state=StepState(step.state) if applied is False else StepState.COMPENSATING,
                instance_id=self.view.unresolved_on(name) or step.instance_id,
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
        invoker = self.invoker
        timeout = self.resolve_timeout
        holder = self.view.unresolved_on(step.step_name) or step.instance_id
        instance = invoker.still_there(spec.service, holder)
        if instance is None and self.recorded is not None:
            kept = await self.recorded(self.execution_id, step.step_name)
            if kept is not None:  # the instance sent it before it went (shared idempotency)
                return (
                    kept,
                    f"instance {kept.instance_id} kept its result with the control plane "
                    "before it went (shared idempotency): it succeeded; it is compensated",
                    True,
                )
        if instance is None:
            return (
                None,
                f"instance {holder} is gone: whether the step was applied cannot "
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
                traceparent=self.view.execution.traceparent,
                span=f"lookup {step.step_name}",
            )
        except AttemptFailed as failure:
            if failure.error.code == grpc.StatusCode.NOT_FOUND:
                return (
                    None,
                    f"instance {holder} has no record of it: not applied, nothing to compensate",
                    False,
                )
            said = f"{failure.error.code.name}: {failure.error.message}"
            if failure.error.code == grpc.StatusCode.DEADLINE_EXCEEDED:
                said = f"still running after {timeout:g} s"
            return (
                None,
                f"instance {holder} gave no answer ({said}): whether the step was applied "
                "cannot be known; its compensation runs anyway",
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
            payload = self.inputs.compensation_payload(step, compensation, anyway=anyway)
            return await self.invoker.invoke(
                compensation.service,
                compensation.operation,
                payload,
                timeout=compensation.timeout,
                correlation_id=self.view.execution.correlation_id,
                idempotency_key=idempotency_key,
                traceparent=self.view.execution.traceparent,
                span=f"compensate {step.name}",
            )

        try:
            reply = await with_retries(
                call,
                compensation.retry,
                first_attempt,
                self.rng,
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
