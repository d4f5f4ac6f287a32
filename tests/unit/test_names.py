"""Names and ids: their length limits, and how much of a value a message quotes."""

from __future__ import annotations

from flext_mesh.errors import FieldViolation
from flext_mesh.names import (
    MAX_ID,
    MAX_NAME,
    MAX_QUOTED,
    check_id,
    check_length,
    check_name,
    elide,
)


def test_elide_keeps_short_values_and_cuts_long_ones_with_an_ellipsis() -> None:
    assert elide("payment") == "payment"
    assert elide("x" * MAX_QUOTED) == "x" * MAX_QUOTED
    cut = elide("x" * 100_000)
    assert len(cut) == MAX_QUOTED
    assert cut.endswith("…")
    assert elide("abcdef", 4) == "abc…"


def test_ids_are_required_and_at_most_max_id_characters() -> None:
    assert check_id("lease_id", "a" * MAX_ID) == []
    assert check_id("lease_id", "") == [FieldViolation("lease_id", "is required")]
    assert check_id("lease_id", "", required=False) == []
    assert check_id("lease_id", "Q" * 100_000) == [
        FieldViolation("lease_id", f"is 100000 characters long; at most {MAX_ID}")
    ]


def test_length_violations_never_quote_the_value() -> None:
    (violation,) = check_length("type", "Q" * 1000, MAX_NAME)
    (name,) = check_name("service_name", "Q" * 1000)
    assert "Q" not in violation.description + name.description
    assert check_length("type", "", MAX_NAME) == []
