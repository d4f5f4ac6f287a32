"""An execution's state, folded from its event history.

The history is the source of truth: every transition is an ``ExecutionEvent``,
persisted before it is acted on. :class:`ExecutionView` applies events one by one to an
``Execution`` message (what GetExecution shows) and keeps what the engine needs to
resume that the message does not show (the order steps completed in, whether a
cancellation was asked). Folding the same events always gives the same view, so a
control plane that restarts rebuilds exactly the state it had persisted.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from google.protobuf import duration_pb2, timestamp_pb2

from flext_mesh.v1 import common_pb2, orchestrator_pb2

__all__ = [
    "ENDED_STATES",
    "NOT_AN_ANSWER_CODES",
    "UNKNOWN_OUTCOME_CODES",
    "ExecutionEventType",
    "ExecutionState",
    "ExecutionView",
    "StepState",
    "duration_between",
]


# The three enums below mirror those of orchestrator.proto: names without the prefix,
# the same numbers (tests/orchestrator/test_history.py holds them to it). A member goes
# into a message as its number and a message's number comes out as ``Enum(value)``, so
# what is stored is the protobuf encoding, as it was before these enums existed.


class ExecutionEventType(enum.IntEnum):
    """Kinds of execution event: ``orchestrator_pb2.ExecutionEventType`` without its prefix."""

    UNSPECIFIED = 0
    EXECUTION_CREATED = 1
    EXECUTION_STARTED = 2
    STEP_STARTED = 3
    STEP_RETRYING = 4
    STEP_SUCCEEDED = 5
    STEP_FAILED = 6
    STEP_SKIPPED = 7
    STEP_CANCELLED = 8
    COMPENSATION_STARTED = 9
    COMPENSATION_SUCCEEDED = 10
    COMPENSATION_FAILED = 11
    CANCEL_REQUESTED = 12
    EXECUTION_RESUMED = 13
    EXECUTION_ENDED = 14
    STEP_OUTCOME_RESOLVED = 15
    STEP_CARRIED_OVER = 16
    EXECUTION_RETRIED = 17


class StepState(enum.IntEnum):
    """States of a step: ``orchestrator_pb2.StepState`` without its prefix."""

    UNSPECIFIED = 0
    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    SKIPPED = 5
    CANCELLED = 6
    COMPENSATING = 7
    COMPENSATED = 8
    COMPENSATION_FAILED = 9


class ExecutionState(enum.IntEnum):
    """States of an execution: ``orchestrator_pb2.ExecutionState`` without its prefix."""

    UNSPECIFIED = 0
    PENDING = 1
    RUNNING = 2
    SUCCEEDED = 3
    FAILED = 4
    COMPENSATING = 5
    COMPENSATED = 6
    COMPENSATION_FAILED = 7
    CANCELLED = 8


#: Execution states that are final: nothing runs any more.
ENDED_STATES: frozenset[ExecutionState] = frozenset(
    {
        ExecutionState.SUCCEEDED,
        ExecutionState.FAILED,
        ExecutionState.COMPENSATED,
        ExecutionState.COMPENSATION_FAILED,
        ExecutionState.CANCELLED,
    }
)


#: Status codes (numbers) of an attempt whose answer was lost rather than given: the
#: instance may have done the work.
UNKNOWN_OUTCOME_CODES: frozenset[int] = frozenset(
    {
        1,  # CANCELLED: the caller cut it off (CancelExecution, a stopping execution)
        4,  # DEADLINE_EXCEEDED: the step's timeout passed first
    }
)
#: Status codes that say nothing of what an instance did with a key: it could not be
#: reached, or something before the operation refused the call. Any other answer from
#: an instance (success, a rejection, a failure of the operation) tells what became of
#: the key there: its callee holds a key's call until it ends, and answers a resend of
#: a key it holds from it.
NOT_AN_ANSWER_CODES: frozenset[int] = frozenset(
    {
        2,  # UNKNOWN: transport trouble of any kind
        8,  # RESOURCE_EXHAUSTED: a rate limit or a full queue before the operation
        14,  # UNAVAILABLE: not reachable, connection broken, draining
    }
)


def duration_between(
    start: timestamp_pb2.Timestamp, end: timestamp_pb2.Timestamp
) -> duration_pb2.Duration:
    """``end - start`` as a Duration (zero when either is unset)."""
    out = duration_pb2.Duration()
    if start.seconds or start.nanos:
        out.FromNanoseconds(max(0, end.ToNanoseconds() - start.ToNanoseconds()))
    return out


class ExecutionView:
    """An execution as its events left it.

    ``execution`` is the message clients see; ``completed`` lists the steps that
    succeeded in the order they did (compensation runs it backwards);
    ``cancel_requested`` is True once CancelExecution was recorded, with
    ``cancel_error`` saying why.
    """

    __slots__ = (
        "_in_flight",
        "_steps",
        "_unresolved",
        "cancel_error",
        "cancel_requested",
        "completed",
        "execution",
    )

    def __init__(self, execution: orchestrator_pb2.Execution) -> None:
        """Start from a fresh execution (id, workflow, input, steps PENDING, no events)."""
        self.execution = execution
        self._steps = {s.step_name: s for s in execution.steps}
        self.completed: list[str] = []
        self.cancel_requested = False
        #: The error CancelExecution recorded (CANCELLED with the reason).
        self.cancel_error = common_pb2.ErrorInfo()
        #: Per step, the instance of the attempt on its way (STEP_STARTED, no answer yet).
        self._in_flight: dict[str, str] = {}
        #: Per step, the instance that got an attempt whose answer was lost and that has
        #: not answered for the key since: it may have done the work.
        self._unresolved: dict[str, str] = {}

    @classmethod
    def replay(
        cls,
        execution: orchestrator_pb2.Execution,
        events: Iterable[orchestrator_pb2.ExecutionEvent],
    ) -> ExecutionView:
        """The view after ``events``, starting from ``execution`` reset to its creation."""
        fresh = orchestrator_pb2.Execution(
            execution_id=execution.execution_id,
            workflow_name=execution.workflow_name,
            workflow_version=execution.workflow_version,
            correlation_id=execution.correlation_id,
            idempotency_key=execution.idempotency_key,
            owner=execution.owner,
            traceparent=execution.traceparent,
            trace_parent_span_id=execution.trace_parent_span_id,
        )
        fresh.input.CopyFrom(execution.input)
        for step in execution.steps:
            fresh.steps.add(
                step_name=step.step_name,
                state=orchestrator_pb2.STEP_STATE_PENDING,
                idempotency_key=step.idempotency_key,
            )
        view = cls(fresh)
        for event in events:
            view.apply(event)
        return view

    @property
    def state(self) -> ExecutionState:
        """The execution's state."""
        return ExecutionState(self.execution.state)

    @property
    def ended(self) -> bool:
        """True once the execution reached a final state."""
        return self.state in ENDED_STATES

    def step(self, name: str) -> orchestrator_pb2.StepExecution:
        """The step's execution record (KeyError when the workflow has no such step)."""
        return self._steps[name]

    def state_of(self, name: str) -> StepState:
        """The step's state."""
        return StepState(self._steps[name].state)

    def in_flight_on(self, name: str) -> str:
        """The instance the step's current attempt went to, until it answers ("")."""
        return self._in_flight.get(name, "")

    def unresolved_on(self, name: str) -> str:
        """The instance that may have done the step unseen ("" when none): it got an
        attempt whose answer was lost (timed out, cut off, in flight when the last owner
        stopped) and has not answered for the key since. A resend goes back to it while
        it is there; before compensating, it is asked what became of the step."""
        return self._unresolved.get(name, "")

    def apply(self, event: orchestrator_pb2.ExecutionEvent) -> None:
        """Fold one event in; events must come in index order, without gaps."""
        execution = self.execution
        if event.index != execution.event_count + 1:
            raise ValueError(
                f"event {event.index} of execution {execution.execution_id} does not follow "
                f"event {execution.event_count}"
            )
        execution.event_count = event.index
        if event.execution_state:
            execution.state = event.execution_state
        kind = ExecutionEventType(event.type)
        if kind == ExecutionEventType.EXECUTION_CREATED:
            execution.create_time.CopyFrom(event.time)
            execution.retry_of = event.related_execution_id
        elif kind == ExecutionEventType.EXECUTION_RETRIED:
            execution.retried_by = event.related_execution_id
        elif kind == ExecutionEventType.EXECUTION_STARTED:
            execution.start_time.CopyFrom(event.time)
        elif kind == ExecutionEventType.CANCEL_REQUESTED:
            self.cancel_requested = True
            self.cancel_error.CopyFrom(event.error)
        elif kind == ExecutionEventType.EXECUTION_RESUMED:
            # Attempts on their way when the last owner stopped: their answers are lost.
            self._unresolved.update(self._in_flight)
            self._in_flight.clear()
        elif kind == ExecutionEventType.EXECUTION_ENDED:
            execution.end_time.CopyFrom(event.time)
            execution.duration.CopyFrom(duration_between(execution.start_time, event.time))
            if event.HasField("error"):
                execution.error.CopyFrom(event.error)
            # Histories written before failed_step existed named it in step_name.
            execution.failed_step = event.failed_step or event.step_name
        elif event.step_name:
            self._apply_step(event)

    def _apply_step(self, event: orchestrator_pb2.ExecutionEvent) -> None:
        step = self._steps[event.step_name]
        if event.step_state:
            step.state = event.step_state
        kind = ExecutionEventType(event.type)
        if kind == ExecutionEventType.STEP_STARTED:
            step.attempts = event.attempt
            if not step.HasField("start_time"):
                step.start_time.CopyFrom(event.time)
            if event.instance_id:
                step.instance_id = event.instance_id
                self._in_flight[step.step_name] = event.instance_id
            if event.at_least_once:
                step.at_least_once = True
        elif kind == ExecutionEventType.STEP_RETRYING:
            step.attempts = event.attempt
            step.error.CopyFrom(event.error)
            step.instance_id = event.instance_id
            self._answered(step.step_name, event.error.code, event.instance_id)
        elif kind == ExecutionEventType.STEP_CARRIED_OVER:
            # Succeeded in the execution this one retries: done, and compensated like
            # any completed step if this one fails (it never ran here: no times).
            step.output.CopyFrom(event.output)
            step.instance_id = event.instance_id
            self.completed.append(step.step_name)
            self.execution.output.get_or_create_struct(step.step_name).CopyFrom(event.output)
        elif kind == ExecutionEventType.STEP_SUCCEEDED:
            self._in_flight.pop(step.step_name, None)
            self._unresolved.pop(step.step_name, None)
            step.ClearField("error")
            step.output.CopyFrom(event.output)
            step.instance_id = event.instance_id
            self._end_step(step, event)
            self.completed.append(step.step_name)
            self.execution.output.get_or_create_struct(step.step_name).CopyFrom(event.output)
        elif kind == ExecutionEventType.STEP_FAILED:
            step.error.CopyFrom(event.error)
            step.instance_id = event.instance_id
            self._answered(step.step_name, event.error.code, event.instance_id)
            step.outcome_unknown = step.step_name in self._unresolved
            self._end_step(step, event)
        elif kind in (
            ExecutionEventType.STEP_SKIPPED,
            ExecutionEventType.STEP_CANCELLED,
        ):
            if event.HasField("error"):
                step.error.CopyFrom(event.error)
            cut_off = self._in_flight.pop(step.step_name, "")
            if kind == ExecutionEventType.STEP_CANCELLED:
                if cut_off:  # its answer will never come: it may have done the work
                    self._unresolved[step.step_name] = cut_off
                step.outcome_unknown = step.step_name in self._unresolved
            self._end_step(step, event)
        elif kind == ExecutionEventType.STEP_OUTCOME_RESOLVED:
            if StepState(event.step_state) == StepState.SUCCEEDED:
                step.ClearField("error")
                step.output.CopyFrom(event.output)
                step.instance_id = event.instance_id
                self.completed.append(step.step_name)
                self.execution.output.get_or_create_struct(step.step_name).CopyFrom(event.output)
            # COMPENSATING: it cannot be known (its compensation runs anyway); any
            # other state: it was not applied.
            step.outcome_unknown = StepState(event.step_state) == StepState.COMPENSATING
            if not step.outcome_unknown:
                self._unresolved.pop(step.step_name, None)
        elif kind == ExecutionEventType.COMPENSATION_STARTED:
            step.compensation_attempts = event.attempt
            if event.HasField("error"):
                step.compensation_error.CopyFrom(event.error)
        elif kind == ExecutionEventType.COMPENSATION_SUCCEEDED:
            step.ClearField("compensation_error")
        elif kind == ExecutionEventType.COMPENSATION_FAILED:
            step.compensation_error.CopyFrom(event.error)

    def _answered(self, name: str, code: int, instance_id: str) -> None:
        """An attempt on ``instance_id`` ended with ``code``: lost (the instance may have
        done it), an answer about the key (that instance did not, or did and failed), or
        no answer at all (nothing learnt)."""
        self._in_flight.pop(name, None)
        if not instance_id:
            return  # never sent: no instance was picked
        if code in UNKNOWN_OUTCOME_CODES:
            self._unresolved[name] = instance_id
        elif code not in NOT_AN_ANSWER_CODES and self._unresolved.get(name) == instance_id:
            del self._unresolved[name]

    @staticmethod
    def _end_step(
        step: orchestrator_pb2.StepExecution, event: orchestrator_pb2.ExecutionEvent
    ) -> None:
        step.end_time.CopyFrom(event.time)
        step.duration.CopyFrom(duration_between(step.start_time, event.time))
