"""Names and their rules, shared by every layer: services, instances, operations,
workflows and steps are 1-63 characters of ``[A-Za-z0-9._-]`` starting with a letter
or digit; weights are 1..10000 (0 means the default 100)."""

from __future__ import annotations

import re
from collections.abc import Iterable

from flext_mesh.errors import FieldViolation, InvalidArgument

__all__ = [
    "DEFAULT_WEIGHT",
    "MAX_NAME",
    "MAX_WEIGHT",
    "NAME",
    "check_name",
    "raise_if",
]

#: A service, instance, operation, workflow or step name.
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
#: Longest name, in characters.
MAX_NAME = 63
#: An instance's weight when it names none.
DEFAULT_WEIGHT = 100
#: The largest weight an instance may have.
MAX_WEIGHT = 10_000


def check_name(field: str, value: str, *, required: bool = True) -> list[FieldViolation]:
    """Violations of a service, instance or operation name (empty when fine)."""
    if not value:
        return [FieldViolation(field, "is required")] if required else []
    if len(value) > MAX_NAME:
        return [FieldViolation(field, f"is {len(value)} characters long; at most {MAX_NAME}")]
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
