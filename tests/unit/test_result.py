"""Unit tests of FlextResult: construction, codes, violations and the combinators."""

from __future__ import annotations

import copy
import pickle
from dataclasses import dataclass
from enum import Enum

import pytest

from flext_mesh.result import (
    DEFAULT_FAILURE_CODE,
    STATUS_CODE_NAMES,
    FlextResult,
    UnwrapError,
)


@dataclass
class User:
    email: str


def test_ok_holds_value() -> None:
    result = FlextResult.ok(42)
    assert result.success
    assert result.is_success
    assert not result.is_failure
    assert result.value == 42
    assert result.unwrap() == 42
    assert result.error is None
    assert result.code is None
    assert result.field_violations == ()


def test_ok_may_hold_none() -> None:
    result = FlextResult[None].ok(None)
    assert result.success
    assert result.value is None


def test_guide_spelling_with_type_argument() -> None:
    user = User("a@b.c")
    ok = FlextResult[User].ok(user)
    failed = FlextResult[User].fail("Invalid email address")
    info = FlextResult[dict[str, object]].ok({"name": "svc"})

    assert ok.value is user
    assert failed.is_failure
    assert failed.error == "Invalid email address"
    assert info.value == {"name": "svc"}
    assert type(ok) is FlextResult


def test_fail_defaults_to_failed_precondition() -> None:
    result: FlextResult[int] = FlextResult.fail("Amount must be positive")
    assert result.is_failure
    assert not result.success
    assert result.error == "Amount must be positive"
    assert result.code == "FAILED_PRECONDITION" == DEFAULT_FAILURE_CODE
    assert result.field_violations == ()


@pytest.mark.parametrize(
    "code",
    ["INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED"],
)
def test_fail_keeps_explicit_code(code: str) -> None:
    result: FlextResult[int] = FlextResult.fail("nope", code=code)
    assert result.code == code


def test_fail_accepts_enum_members_by_name() -> None:
    class StatusCode(Enum):  # shaped like grpc.StatusCode, without importing grpc
        NOT_FOUND = (5, "not found")

    result: FlextResult[int] = FlextResult.fail("no such user", code=StatusCode.NOT_FOUND)
    assert result.code == "NOT_FOUND"


@pytest.mark.parametrize("code", ["not_found", "NOPE", "", "OK"])
def test_fail_rejects_unknown_or_ok_code(code: str) -> None:
    with pytest.raises(ValueError, match="code"):
        FlextResult.fail("x", code=code)


def test_status_code_names_match_grpc() -> None:
    grpc = pytest.importorskip("grpc")
    assert {c.name for c in grpc.StatusCode} == STATUS_CODE_NAMES


def test_fail_without_message_gets_placeholder() -> None:
    assert FlextResult.fail(None).error == "unknown error"
    assert FlextResult.fail("").error == "unknown error"


def test_field_violations_default_code_invalid_argument() -> None:
    result: FlextResult[int] = FlextResult.fail(
        "invalid order", field_violations=[("items.0.qty", "must be positive")]
    )
    assert result.code == "INVALID_ARGUMENT"
    assert result.field_violations == (("items.0.qty", "must be positive"),)


def test_field_violations_from_mapping_and_objects() -> None:
    @dataclass(frozen=True)
    class Violation:
        field: str
        description: str

    from_mapping: FlextResult[int] = FlextResult.fail("bad", field_violations={"email": "missing"})
    from_objects: FlextResult[int] = FlextResult.fail(
        "bad", code="INVALID_ARGUMENT", field_violations=[Violation("name", "too long")]
    )
    assert from_mapping.field_violations == (("email", "missing"),)
    assert from_objects.field_violations == (("name", "too long"),)


def test_explicit_code_wins_over_violations_default() -> None:
    result: FlextResult[int] = FlextResult.fail(
        "taken", code="ALREADY_EXISTS", field_violations=[("email", "already registered")]
    )
    assert result.code == "ALREADY_EXISTS"


def test_value_on_failure_raises_unwrap_error() -> None:
    result: FlextResult[int] = FlextResult.fail("no such order", code="NOT_FOUND")
    with pytest.raises(UnwrapError, match="no such order") as info:
        _ = result.value
    assert isinstance(info.value, ValueError)
    assert info.value.code == "NOT_FOUND"
    assert info.value.error == "no such order"
    with pytest.raises(UnwrapError):
        result.unwrap()


def test_unwrap_or() -> None:
    assert FlextResult.ok(3).unwrap_or(0) == 3
    failed: FlextResult[int] = FlextResult.fail("x")
    assert failed.unwrap_or(0) == 0
    assert failed.unwrap_or(None) is None


def test_map_applies_on_success() -> None:
    assert FlextResult.ok(2).map(lambda v: v * 10) == FlextResult.ok(20)


def test_map_and_flat_map_short_circuit_on_failure() -> None:
    calls: list[int] = []

    def record(v: int) -> int:
        calls.append(v)
        return v

    def record_result(v: int) -> FlextResult[int]:
        calls.append(v)
        return FlextResult.ok(v)

    failed: FlextResult[int] = FlextResult.fail(
        "bad", code="NOT_FOUND", field_violations=[("id", "unknown")]
    )
    mapped = failed.map(record)
    chained = failed.flat_map(record_result)

    assert calls == []
    for result in (mapped, chained):
        assert result.is_failure
        assert result.error == "bad"
        assert result.code == "NOT_FOUND"
        assert result.field_violations == (("id", "unknown"),)


def test_flat_map_chains_and_can_fail() -> None:
    def half(v: int) -> FlextResult[int]:
        if v % 2:
            return FlextResult.fail(f"{v} is odd", code="INVALID_ARGUMENT")
        return FlextResult.ok(v // 2)

    assert FlextResult.ok(8).flat_map(half).flat_map(half).value == 2
    odd = FlextResult.ok(6).flat_map(half).flat_map(half)
    assert odd.is_failure
    assert odd.error == "3 is odd"
    assert odd.code == "INVALID_ARGUMENT"


def test_map_lets_exceptions_propagate() -> None:
    def boom(_: int) -> int:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        FlextResult.ok(1).map(boom)


def test_truthiness_is_refused() -> None:
    failed: FlextResult[int] = FlextResult.fail("x")
    with pytest.raises(TypeError, match="success"):
        bool(failed)
    with pytest.raises(TypeError):
        _ = not FlextResult.ok(1)


def test_immutable() -> None:
    result = FlextResult.ok(1)
    with pytest.raises(AttributeError):
        result._value = 2
    with pytest.raises(AttributeError):
        result.foo = 2  # type: ignore[attr-defined]
    assert result.value == 1


def test_equality_and_hash() -> None:
    assert FlextResult.ok(1) == FlextResult.ok(1)
    assert FlextResult.ok(1) != FlextResult.ok(2)
    assert FlextResult.fail("a", code="NOT_FOUND") == FlextResult.fail("a", code="NOT_FOUND")
    assert FlextResult.fail("a", code="NOT_FOUND") != FlextResult.fail("a")
    assert FlextResult.ok(None) != FlextResult.fail("a")
    assert FlextResult.ok(1) != 1
    assert len({FlextResult.ok(1), FlextResult.ok(1), FlextResult.fail("x")}) == 2


def test_repr() -> None:
    assert repr(FlextResult.ok("x")) == "FlextResult.ok('x')"
    assert repr(FlextResult.fail("bad", code="NOT_FOUND")) == (
        "FlextResult.fail('bad', code='NOT_FOUND')"
    )
    assert "field_violations=(('a', 'b'),)" in repr(
        FlextResult.fail("bad", field_violations={"a": "b"})
    )


def test_pickle_and_copy_round_trip() -> None:
    failed: FlextResult[int] = FlextResult.fail("x", field_violations={"a": "b"})
    for result in (FlextResult.ok([1, 2]), failed):
        assert pickle.loads(pickle.dumps(result)) == result
        assert copy.deepcopy(result) == result
