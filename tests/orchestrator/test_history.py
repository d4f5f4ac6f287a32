"""Unit tests of the execution history: its enums against the protobuf ones, and
histories stored by earlier versions folding into the state they recorded."""

from __future__ import annotations

import enum
from collections import defaultdict
from pathlib import Path

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from flext_mesh.orchestrator.history import (
    ExecutionEventType,
    ExecutionState,
    ExecutionView,
    StepState,
)
from flext_mesh.v1 import orchestrator_pb2

STORED = Path(__file__).parent / "data" / "stored_executions.txt"

Stored = tuple[orchestrator_pb2.Execution, list[orchestrator_pb2.ExecutionEvent]]


def _stored() -> dict[str, Stored]:
    """The executions of STORED: each record and its events in index order."""
    records: dict[str, orchestrator_pb2.Execution] = {}
    events: dict[str, list[orchestrator_pb2.ExecutionEvent]] = defaultdict(list)
    for line in STORED.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, value = line.split(" ")
        _, _, kind, execution_id, *_ = key.split("/")
        if kind == "executions":
            records[execution_id] = orchestrator_pb2.Execution.FromString(bytes.fromhex(value))
        else:
            events[execution_id].append(
                orchestrator_pb2.ExecutionEvent.FromString(bytes.fromhex(value))
            )
    return {
        execution_id: (record, events[execution_id]) for execution_id, record in records.items()
    }


@pytest.mark.parametrize(
    ("domain", "proto", "prefix"),
    [
        (ExecutionEventType, orchestrator_pb2.ExecutionEventType, "EXECUTION_EVENT_TYPE_"),
        (StepState, orchestrator_pb2.StepState, "STEP_STATE_"),
        (ExecutionState, orchestrator_pb2.ExecutionState, "EXECUTION_STATE_"),
    ],
)
def test_each_enum_matches_its_protobuf_enum_one_to_one(
    domain: type[enum.IntEnum], proto: EnumTypeWrapper, prefix: str
) -> None:
    # A value added, renamed or renumbered in orchestrator.proto must be mirrored here:
    # the engine writes int(member) into events and reads them back with domain(value).
    numbers = dict(proto.items())
    assert all(name.startswith(prefix) for name in numbers)
    expected = {name.removeprefix(prefix): number for name, number in numbers.items()}
    assert {member.name: member.value for member in domain} == expected
    assert len(domain.__members__) == len(domain)  # no aliases: numbers map back one-to-one


def test_the_stored_histories_hold_every_event_type() -> None:
    kinds = {ExecutionEventType(e.type) for _, events in _stored().values() for e in events}
    # Types added after these histories were stored (they replay without them).
    newer = {
        ExecutionEventType.STEP_OUTCOME_RESOLVED,
        ExecutionEventType.STEP_CARRIED_OVER,
        ExecutionEventType.EXECUTION_RETRIED,
    }
    assert kinds == set(ExecutionEventType) - {ExecutionEventType.UNSPECIFIED} - newer


S = StepState


@pytest.mark.parametrize(
    ("execution_id", "state", "steps", "completed"),
    [
        (
            "exec0005",
            ExecutionState.COMPENSATION_FAILED,
            [S.COMPENSATION_FAILED, S.COMPENSATED, S.FAILED, S.SKIPPED, S.SKIPPED],
            ["a", "b"],
        ),
        (
            "exec0006",
            ExecutionState.COMPENSATED,
            [S.COMPENSATED, S.FAILED, S.SKIPPED, S.SKIPPED, S.SKIPPED],
            ["a"],
        ),
        (
            "exec0008",
            ExecutionState.CANCELLED,
            [S.COMPENSATED, S.COMPENSATED, S.CANCELLED, S.SKIPPED, S.SKIPPED],
            ["a", "b"],
        ),
        (
            "exec0009",
            ExecutionState.SUCCEEDED,
            [S.SUCCEEDED] * 5,
            ["a", "b", "c", "opt", "after_opt"],
        ),
    ],
)
def test_a_stored_history_replays_into_the_record_stored_with_it(
    execution_id: str, state: ExecutionState, steps: list[StepState], completed: list[str]
) -> None:
    record, events = _stored()[execution_id]
    view = ExecutionView.replay(record, events)
    assert view.execution.SerializeToString(deterministic=True) == record.SerializeToString(
        deterministic=True
    )
    assert view.state is state
    assert view.ended
    names = ["a", "b", "c", "opt", "after_opt"]
    assert [view.state_of(name) for name in names] == steps
    assert view.completed == completed
    assert view.cancel_requested is (state is ExecutionState.CANCELLED)


def test_a_stored_history_cut_at_a_restart_shows_the_step_in_flight() -> None:
    record, events = _stored()["exec0009"]
    resumed = next(
        i
        for i, e in enumerate(events)
        if ExecutionEventType(e.type) is ExecutionEventType.EXECUTION_RESUMED
    )
    view = ExecutionView.replay(record, events[:resumed])
    assert view.state is ExecutionState.RUNNING
    assert not view.ended
    assert view.state_of("c") is StepState.RUNNING
    assert view.state_of("opt") is StepState.PENDING
    assert view.step("c").attempts == 1
