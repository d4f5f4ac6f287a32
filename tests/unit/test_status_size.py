"""A status is cut to a size every gRPC client reads, whatever the error held."""

from __future__ import annotations

from google.rpc import error_details_pb2

from flext_mesh.errors import FieldViolation, InvalidArgument, NotFound
from flext_mesh.rpc.status import MAX_STATUS_MESSAGE_BYTES, MAX_VIOLATION_BYTES, to_rpc_status


def _violations(error: InvalidArgument) -> list[tuple[str, str]]:
    bad = error_details_pb2.BadRequest()
    to_rpc_status(error).details[0].Unpack(bad)
    return [(v.field, v.description) for v in bad.field_violations]


def test_a_small_error_travels_whole() -> None:
    error = InvalidArgument.from_violations(
        [FieldViolation("a", "is required"), FieldViolation("b", "at most 3")]
    )
    status = to_rpc_status(error)
    assert status.message == "invalid request: a: is required; b: at most 3"
    assert _violations(error) == [("a", "is required"), ("b", "at most 3")]


def test_ten_thousand_violations_are_cut_to_the_first_ones_and_a_count() -> None:
    error = InvalidArgument.from_violations(
        [FieldViolation(f"records[{i}].service_name", "is required") for i in range(10_000)]
    )
    status = to_rpc_status(error)
    assert status.ByteSize() < MAX_STATUS_MESSAGE_BYTES + MAX_VIOLATION_BYTES + 1024
    assert len(status.message.encode()) <= MAX_STATUS_MESSAGE_BYTES
    # The message names the first 20 and counts the rest (built no bigger than that).
    assert status.message.endswith("records[19].service_name: is required; and 9980 more")
    listed = _violations(error)
    assert listed[0] == ("records[0].service_name", "is required")
    field, description = listed[-1]
    assert field == f"records[{len(listed) - 1}].service_name"
    assert description == f"and {10_000 - len(listed) + 1} more violations, not listed"


def test_a_huge_value_in_any_message_or_violation_is_cut() -> None:
    huge = "é" * 100_000  # two bytes each: the limits count bytes
    status = to_rpc_status(NotFound(f"workflow {huge!r} does not exist"))
    assert len(status.message.encode()) <= MAX_STATUS_MESSAGE_BYTES
    error = InvalidArgument("bad", [FieldViolation(f"labels[{huge!r}]", huge)])
    ((field, description),) = _violations(error)
    assert len(field.encode()) <= 200
    assert len(description.encode()) <= 400


def test_a_long_message_is_cut_with_an_ellipsis() -> None:
    error = InvalidArgument.from_violations(
        [FieldViolation(f"records[{i}].service_name", "x" * 200) for i in range(20)]
    )
    status = to_rpc_status(error)
    assert len(status.message.encode()) <= MAX_STATUS_MESSAGE_BYTES
    assert status.message.endswith("…")
