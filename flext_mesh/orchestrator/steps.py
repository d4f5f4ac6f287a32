"""What a step is sent, and how its attempts are counted.

:class:`StepInputs` builds the input of a step (or of its compensation) from its
template: references reach the execution's input, the outputs of completed steps and
the execution's ids. :func:`with_retries` numbers attempts and retries per the step's
policy: infrastructure faults (the policy's codes) are retried with backoff
(``flext_mesh.retry``); business rejections fail the attempt at once.
"""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from flext_mesh.errors import FieldViolation, InvalidArgument
from flext_mesh.orchestrator.history import ExecutionView
from flext_mesh.orchestrator.invoker import AttemptFailed, StepReply
from flext_mesh.orchestrator.spec import CompensationSpec, RetrySpec, StepSpec
from flext_mesh.orchestrator.templates import UnresolvedReference, resolve
from flext_mesh.retry import retry_async
from flext_mesh.rpc.payloads import struct_to_dict
from flext_mesh.v1 import registry_pb2

__all__ = [
    "Outcome",
    "Recorded",
    "StepInputs",
    "Target",
    "as_payload",
    "instance_id_of",
    "with_retries",
]


#: Reads the result an instance kept with the control plane for (execution id, step)
#: before it went (shared idempotency; :mod:`.step_results`); None when there is none.
Recorded = Callable[[str, str], Awaitable[StepReply | None]]


@dataclass(slots=True)
class Outcome:
    """How a step's attempts ended: its reply, or the last failure."""

    step: str
    reply: StepReply | None = None
    failure: AttemptFailed | None = None
    attempts: int = 0


class StepInputs:
    """The inputs of one execution's steps, and the outputs they are built from."""

    def __init__(self, view: ExecutionView) -> None:
        self.view = view
        self._input: dict[str, Any] | None = None
        #: Outputs of completed steps, decoded once.
        self.outputs: dict[str, dict[str, Any]] = {}
        #: Inputs of steps not settled yet, built once.
        self.payloads: dict[str, dict[str, Any]] = {}
        self._ctx: dict[str, Any] | None = None
        self._ctx_steps = -1

    def context(self) -> dict[str, Any]:
        """What references see: the input, completed steps' outputs, the execution."""
        if self._ctx is None or self._ctx_steps != len(self.view.completed):
            execution = self.view.execution
            if self._input is None:
                self._input = struct_to_dict(execution.input)
            steps = {}
            for name in self.view.completed:
                output = self.outputs.get(name)
                if output is None:
                    output = self.outputs[name] = struct_to_dict(self.view.step(name).output)
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

    def payload(self, step: StepSpec) -> dict[str, Any]:
        """The step's input; built once (its references only reach finished steps)."""
        payload = self.payloads.get(step.name)
        if payload is None:
            if step.input is None:
                payload = struct_to_dict(self.view.execution.input)
            else:
                payload = as_payload(step.input, self.context(), f"steps.{step.name}.input")
            self.payloads[step.name] = payload
        return payload

    def compensation_payload(
        self, step: StepSpec, compensation: CompensationSpec, *, anyway: bool = False
    ) -> dict[str, Any]:
        """The compensation's input: its template, else the step's output (or, when the
        step's outcome is unknown, the step's own input)."""
        if compensation.input is None:
            if anyway:  # no output to give: what the step was asked to do
                return self.payload(step)
            return struct_to_dict(self.view.step(step.name).output)
        return as_payload(compensation.input, self.context(), f"steps.{step.name}.compensation")


def as_payload(template: Any, context: dict[str, Any], where: str) -> dict[str, Any]:
    """``template`` resolved in ``context``; INVALID_ARGUMENT unless it is an object."""
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


#: Where an attempt goes: an instance, why none could be picked (the attempt fails with
#: it, unsent), or the result kept for shared idempotency (the attempt is not sent).
Target = registry_pb2.ServiceInstance | AttemptFailed | StepReply


def instance_id_of(target: Target) -> str:
    """The id of the instance an attempt goes to (or whose kept result settles it); ""
    when none could be picked."""
    return "" if isinstance(target, AttemptFailed) else target.instance_id


async def with_retries(
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
