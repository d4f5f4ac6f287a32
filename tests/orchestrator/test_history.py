"""Unit tests of the execution history's enums and of folding events into a view."""

from __future__ import annotations

import enum

import pytest
from google.protobuf.internal.enum_type_wrapper import EnumTypeWrapper

from flext_mesh.orchestrator.history import ExecutionEventType, ExecutionState, StepState
from flext_mesh.v1 import orchestrator_pb2


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
