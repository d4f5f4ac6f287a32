"""Names, ids and their rules, shared by every layer.

Services, instances, operations, workflows and steps are 1-63 characters of
``[A-Za-z0-9._-]`` starting with a letter or digit; weights are 1..10000 (0 means the
default 100). Ids the control plane hands out (leases, executions) are at most
:data:`MAX_ID` characters. Every limit is checked before anything is looked up, and an
error quotes at most :data:`MAX_QUOTED` characters of what the caller sent
(:func:`elide`), so a huge field cannot make a huge status.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from flext_mesh.errors import FieldViolation, InvalidArgument

__all__ = [
    "DEFAULT_WEIGHT",
    "MAX_ID",
    "MAX_NAME",
    "MAX_QUOTED",
    "MAX_WEIGHT",
    "NAME",
    "check_id",
    "check_length",
    "check_name",
    "elide",
    "raise_if",
]

#: A service, instance, operation, workflow or step name.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
#: Longest name, in characters.
MAX_NAME = 63
#: Longest lease or execution id accepted, in characters. The control plane hands out
#: far shorter ones (32 hex digits for a lease, 22 for an execution, 16 on etcd); the
#: bound leaves room for other stores while keeping a status that quotes one small.
MAX_ID = 128
#: Characters of a caller's value an error message quotes before eliding the rest.
MAX_QUOTED = 40
#: An instance's weight when it names none.
DEFAULT_WEIGHT = 100
#: The largest weight an instance may have.
MAX_WEIGHT = 10_000


def elide(value: str, limit: int = MAX_QUOTED) -> str:
    """``value`` cut to ``limit`` characters, ending in an ellipsis when it was cut:
    what a message may quote of a caller's value."""
    if len(value) <= limit:
        return value
    return value[: max(limit - 1, 0)] + "…"


def check_length(field: str, value: str, maximum: int) -> list[FieldViolation]:
    """A violation when ``value`` is longer than ``maximum`` characters (empty when
    fine); the description says how long it is, never what it says."""
    if len(value) > maximum:
        return [FieldViolation(field, f"is {len(value)} characters long; at most {maximum}")]
    return []


def check_id(field: str, value: str, *, required: bool = True) -> list[FieldViolation]:
    """Violations of a lease or execution id: required (unless not), at most MAX_ID."""
    if not value:
        return [FieldViolation(field, "is required")] if required else []
    return check_length(field, value, MAX_ID)


def check_name(field: str, value: str, *, required: bool = True) -> list[FieldViolation]:
    """Violations of a service, instance or operation name (empty when fine)."""
    if not value:
        return [FieldViolation(field, "is required")] if required else []
    if len(value) > MAX_NAME:
        return check_length(field, value, MAX_NAME)
    if not NAME.match(value):
        return [
            FieldViolation(
                field, "must be letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        ]
    return []


def raise_if(violations: Iterable[FieldViolation]) -> None:
    """Raise InvalidArgument listing every violation, if there is any."""
    found = list(violations)
    if found:
        raise InvalidArgument.from_violations(found)
