"""``FlextServices.ServiceValidation``: checking data against a schema or a contract.

A schema (or contract) is one of:

- a callable returning a ``FlextResult`` (the guide's style; returned as is) or a bool
  (an exception it raises becomes a failure);
- a pydantic model class: the data is validated by it and the validated dict returned;
- a JSON Schema dict, checked by the ``jsonschema`` library against the draft its
  ``$schema`` names (2020-12 by default); a schema that is itself invalid fails with
  INVALID_ARGUMENT.

Input that breaks its schema fails with INVALID_ARGUMENT; output that breaks its
contract with INTERNAL (the producer is at fault). Either way every bad field is
listed, in the message and in ``field_violations`` (dotted paths such as ``items.0``).
Validation is local: it never contacts the control plane.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self

import jsonschema
import pydantic
from jsonschema.exceptions import SchemaError

from flext_mesh.result import FlextResult

__all__ = ["ServiceValidation", "json_schema_violations"]

_ROOT = "(root)"
_REQUIRED = re.compile(r"^'(.+)' is a required property$")
_Violations = list[tuple[str, str]]


class ServiceValidation:
    """Validates inputs against schemas and outputs against contracts (the guide's API).

    ``control_plane`` is accepted for uniformity with the other ``FlextServices``
    objects and not used: validation is local.
    """

    def __init__(self, control_plane: str | None = None) -> None:
        self.control_plane = control_plane

    def validate_input(self, data: object, schema: object) -> FlextResult[Any]:
        """Check ``data`` against ``schema``; INVALID_ARGUMENT listing every bad field."""
        return _validate(data, schema, what="input", code="INVALID_ARGUMENT")

    def validate_output(self, data: object, contract: object) -> FlextResult[Any]:
        """Check ``data`` against ``contract``; INTERNAL listing every bad field."""
        return _validate(data, contract, what="output", code="INTERNAL")

    def close(self) -> FlextResult[None]:
        """Nothing to release; for uniformity with the other facade objects."""
        return FlextResult.ok(None)

    async def aclose(self) -> FlextResult[None]:
        """Async twin of :meth:`close`."""
        return FlextResult.ok(None)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _validate(data: object, schema: object, *, what: str, code: str) -> FlextResult[Any]:
    if isinstance(schema, type) and issubclass(schema, pydantic.BaseModel):
        return _validate_model(data, schema, what=what, code=code)
    if isinstance(schema, Mapping):
        try:
            violations = json_schema_violations(data, schema)
        except SchemaError as exc:
            return FlextResult.fail(
                f"{what} schema is invalid: {exc.message}", code="INVALID_ARGUMENT"
            )
        if violations:
            return _failure(what, "does not match its schema", violations, code)
        return FlextResult.ok(data)
    if callable(schema):
        return _validate_callable(data, schema, what=what, code=code)
    return FlextResult.fail(
        f"{what} schema must be a callable, a pydantic model class or a JSON Schema dict, "
        f"got {type(schema).__name__}",
        code="INVALID_ARGUMENT",
    )


def _failure(what: str, problem: str, violations: _Violations, code: str) -> FlextResult[Any]:
    listed = "; ".join(f"{field}: {text}" for field, text in violations)
    return FlextResult.fail(f"{what} {problem}: {listed}", code=code, field_violations=violations)


def _validate_model(
    data: object, model: type[pydantic.BaseModel], *, what: str, code: str
) -> FlextResult[Any]:
    try:
        validated = model.model_validate(data)
    except pydantic.ValidationError as exc:
        violations = [
            (".".join(str(part) for part in error["loc"]) or _ROOT, error["msg"])
            for error in exc.errors()
        ]
        return _failure(what, f"does not match {model.__name__}", violations, code)
    return FlextResult.ok(validated.model_dump())


def _validate_callable(
    data: object, check: Callable[[object], object], *, what: str, code: str
) -> FlextResult[Any]:
    try:
        outcome = check(data)
    except Exception as exc:  # the facade's promise: nothing raises to the caller
        return FlextResult.fail(f"{what} validation raised {type(exc).__name__}: {exc}", code=code)
    if isinstance(outcome, FlextResult):
        return outcome
    if isinstance(outcome, bool):
        return (
            FlextResult.ok(data) if outcome else FlextResult.fail(f"{what} is invalid", code=code)
        )
    return FlextResult.fail(
        f"{what} validator must return a FlextResult or a bool, got {type(outcome).__name__}",
        code="INVALID_ARGUMENT",
    )


# -- JSON Schema (subset) ---------------------------------------------------------------


def json_schema_violations(data: object, schema: Mapping[str, Any]) -> _Violations:
    """Every ``(path, problem)`` of ``data`` against ``schema``, in path order.

    Paths are dotted (``items.0.sku``); problems on the value itself are at ``(root)``.
    SchemaError when the schema is not a valid JSON Schema.
    """
    document = dict(schema)
    validator_class = jsonschema.validators.validator_for(document)
    validator_class.check_schema(document)
    validator = validator_class(document)
    instance: Any = data
    out: _Violations = []
    for error in sorted(validator.iter_errors(instance), key=lambda e: list(map(str, e.path))):
        parent = [str(part) for part in error.absolute_path]
        if error.validator == "required":
            # Reported on the object; name the missing field instead.
            match = _REQUIRED.match(error.message)
            if match:
                out.append((".".join([*parent, match[1]]), "is required"))
                continue
        if (
            error.validator == "additionalProperties"
            and error.validator_value is False
            and isinstance(error.instance, Mapping)
        ):
            declared = (
                error.schema.get("properties", {}) if isinstance(error.schema, Mapping) else {}
            )
            for name in sorted(set(error.instance) - set(declared)):
                out.append((".".join([*parent, str(name)]), "is not allowed"))
            continue
        out.append((".".join(parent) or _ROOT, error.message))
    return out
