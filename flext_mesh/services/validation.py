"""``FlextServices.ServiceValidation``: checking data against a schema or a contract.

A schema (or contract) is one of:

- a callable returning a ``FlextResult`` (the guide's style; returned as is) or a bool
  (an exception it raises becomes a failure);
- a pydantic model class: the data is validated by it and the validated dict returned;
- a JSON Schema dict, of which this common subset is understood: ``type`` (one or a
  list), ``enum``, ``const``, ``required``, ``properties``, ``additionalProperties``
  (false or a schema), ``items``, ``minItems`` / ``maxItems``, ``minimum`` /
  ``maximum`` / ``exclusiveMinimum`` / ``exclusiveMaximum`` (numbers),
  ``minLength`` / ``maxLength``, ``pattern``. Annotations (``title``,
  ``description``, ``$schema``, ``default``, ...) are ignored; any other keyword fails
  with UNIMPLEMENTED rather than be silently skipped.

Input that breaks its schema fails with INVALID_ARGUMENT; output that breaks its
contract with INTERNAL (the producer is at fault). Either way every bad field is
listed, in the message and in ``field_violations`` (dotted paths such as ``items.0``).
Validation is local: it never contacts the control plane.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, Self

import pydantic

from flext_mesh.result import FlextResult

__all__ = ["ServiceValidation", "json_schema_violations"]

_ROOT = "(root)"
_ANNOTATIONS = frozenset(
    {
        "$schema",
        "$id",
        "$comment",
        "title",
        "description",
        "default",
        "examples",
        "format",
        "deprecated",
        "readOnly",
        "writeOnly",
    }
)
_KEYWORDS = frozenset(
    {
        "type",
        "enum",
        "const",
        "required",
        "properties",
        "additionalProperties",
        "items",
        "minItems",
        "maxItems",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "minLength",
        "maxLength",
        "pattern",
    }
)
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
        unsupported = sorted(_unsupported_keywords(schema))
        if unsupported:
            return FlextResult.fail(
                f"{what} schema uses JSON Schema keywords this validator does not "
                f"implement: {', '.join(unsupported)}",
                code="UNIMPLEMENTED",
            )
        try:
            violations = json_schema_violations(data, schema)
        except (re.error, TypeError, ValueError) as exc:
            return FlextResult.fail(f"{what} schema is invalid: {exc}", code="INVALID_ARGUMENT")
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


def _unsupported_keywords(schema: Mapping[str, Any]) -> set[str]:
    found = {k for k in schema if k not in _KEYWORDS and k not in _ANNOTATIONS}
    for key in ("properties",):
        for sub in (schema.get(key) or {}).values():
            if isinstance(sub, Mapping):
                found |= _unsupported_keywords(sub)
    for key in ("items", "additionalProperties"):
        sub = schema.get(key)
        if isinstance(sub, Mapping):
            found |= _unsupported_keywords(sub)
    return found


def _is_type(value: object, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if name == "integer":
        return not isinstance(value, bool) and (
            isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        )
    if name == "number":
        return not isinstance(value, bool) and isinstance(value, int | float)
    if name == "string":
        return isinstance(value, str)
    if name == "array":
        return isinstance(value, list | tuple)
    if name == "object":
        return isinstance(value, Mapping)
    return False


def _path(parent: str, child: object) -> str:
    return str(child) if parent == _ROOT else f"{parent}.{child}"


def json_schema_violations(data: object, schema: Mapping[str, Any]) -> _Violations:
    """Every ``(path, problem)`` of ``data`` against ``schema`` (the subset above)."""
    out: _Violations = []
    _check(data, schema, _ROOT, out)
    return out


def _check(value: object, schema: Mapping[str, Any], path: str, out: _Violations) -> None:
    expected = schema.get("type")
    if expected is not None:
        names = [expected] if isinstance(expected, str) else list(expected)
        if not any(_is_type(value, n) for n in names):
            out.append((path, f"must be of type {' or '.join(names)}"))
            return  # the other keywords would only repeat the problem
    if "enum" in schema and not any(_equal(value, e) for e in schema["enum"]):
        out.append((path, f"must be one of {list(schema['enum'])!r}"))
    if "const" in schema and not _equal(value, schema["const"]):
        out.append((path, f"must be {schema['const']!r}"))
    if isinstance(value, int | float) and not isinstance(value, bool):
        _check_number(float(value), schema, path, out)
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            out.append((path, f"must be at least {schema['minLength']} characters"))
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            out.append((path, f"must be at most {schema['maxLength']} characters"))
        if "pattern" in schema and re.search(schema["pattern"], value) is None:
            out.append((path, f"must match the pattern {schema['pattern']!r}"))
    if isinstance(value, list | tuple):
        if "minItems" in schema and len(value) < schema["minItems"]:
            out.append((path, f"must have at least {schema['minItems']} items"))
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            out.append((path, f"must have at most {schema['maxItems']} items"))
        items = schema.get("items")
        if isinstance(items, Mapping):
            for index, item in enumerate(value):
                _check(item, items, _path(path, index), out)
    if isinstance(value, Mapping):
        _check_object(value, schema, path, out)


def _check_number(value: float, schema: Mapping[str, Any], path: str, out: _Violations) -> None:
    if math.isnan(value):
        out.append((path, "must be a number, not NaN"))
        return
    if "minimum" in schema and value < schema["minimum"]:
        out.append((path, f"must be at least {schema['minimum']}"))
    if "maximum" in schema and value > schema["maximum"]:
        out.append((path, f"must be at most {schema['maximum']}"))
    low = schema.get("exclusiveMinimum")
    if isinstance(low, int | float) and not isinstance(low, bool) and value <= low:
        out.append((path, f"must be greater than {low}"))
    high = schema.get("exclusiveMaximum")
    if isinstance(high, int | float) and not isinstance(high, bool) and value >= high:
        out.append((path, f"must be less than {high}"))


def _check_object(
    value: Mapping[Any, Any], schema: Mapping[str, Any], path: str, out: _Violations
) -> None:
    properties: Mapping[str, Any] = schema.get("properties") or {}
    for name in schema.get("required") or ():
        if name not in value:
            out.append((_path(path, name), "is required"))
    extra = schema.get("additionalProperties", True)
    for key, item in value.items():
        sub = properties.get(key)
        if isinstance(sub, Mapping):
            _check(item, sub, _path(path, key), out)
        elif extra is False:
            out.append((_path(path, key), "is not allowed (additionalProperties is false)"))
        elif isinstance(extra, Mapping):
            _check(item, extra, _path(path, key), out)


def _equal(a: object, b: object) -> bool:
    """JSON equality: True is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    return a == b
