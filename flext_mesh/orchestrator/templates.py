"""The ``${...}`` references inside a step's input: finding them and resolving them.

Inside string values of an input (at any depth; dict keys are not templated), a string
that is exactly one reference takes the referenced value with its JSON type; a
reference inside a longer string is interpolated as text (compact JSON for objects,
lists, booleans and null). Forms: ``${input}``, ``${input.a.b}``,
``${steps.NAME.output}``, ``${steps.NAME.output.a.b}``, ``${execution.id}``,
``${execution.correlation_id}``. Path segments are ``[A-Za-z0-9_-]+`` (so a step whose
name holds a ``.`` cannot be referenced); a numeric segment also indexes a list; ``$${``
writes a literal ``${``. Which steps a step may name is a rule of the workflow
(:func:`flext_mesh.orchestrator.spec.validate_workflow` checks it, with
:func:`scan_template`); :func:`resolve` only needs the values.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from flext_mesh.documents import MAX_EXACT_INT, kind

__all__ = ["Reference", "UnresolvedReference", "references", "resolve", "scan_template"]


class UnresolvedReference(Exception):
    """A ``${...}`` reference that is malformed or points at nothing."""

    def __init__(self, reference: str, reason: str) -> None:
        super().__init__(f"{reference}: {reason}")
        self.reference = reference
        """The reference as written, e.g. ``${steps.reserve.output.id}``."""
        self.reason = reason
        """Why it cannot be resolved."""


# Alternatives, leftmost first: the escape, a closed reference, an unclosed one.
_TOKEN = re.compile(r"\$\$\{|\$\{([^}]*)\}|\$\{")
_SEGMENT = re.compile(r"[A-Za-z0-9_-]+")
_EXECUTION_KEYS = ("id", "correlation_id")


@dataclass(frozen=True, slots=True)
class Reference:
    """One well-formed reference of a template."""

    expression: str
    """What is between ``${`` and ``}``, e.g. ``steps.reserve.output.id``."""
    parts: tuple[str, ...]
    """The expression split at its dots; ``parts[0]`` is input, steps or execution."""

    @property
    def text(self) -> str:
        """The reference as written, e.g. ``${steps.reserve.output.id}``."""
        return "${" + self.expression + "}"


def _expression_problem(expression: str) -> str | None:
    if not expression:
        return "is empty"
    parts = expression.split(".")
    if not all(_SEGMENT.fullmatch(part) for part in parts):
        return "path segments must be letters, digits, '_' or '-', separated by '.'"
    root = parts[0]
    if root == "input":
        return None
    if root == "steps":
        if len(parts) < 3 or parts[2] != "output":
            return "a step reference is steps.NAME.output, optionally followed by a path"
        return None
    if root == "execution":
        if len(parts) == 2 and parts[1] in _EXECUTION_KEYS:
            return None
        return "execution offers only execution.id and execution.correlation_id"
    return "must start with 'input', 'steps' or 'execution'"


def _scan(text: str) -> tuple[list[str | Reference], list[tuple[str, str]]]:
    """Split ``text`` into literal pieces and references; also list malformed ones."""
    pieces: list[str | Reference] = []
    problems: list[tuple[str, str]] = []
    literal: list[str] = []
    pos = 0
    for match in _TOKEN.finditer(text):
        literal.append(text[pos : match.start()])
        pos = match.end()
        if match.group(0) == "$${":
            literal.append("${")
            continue
        expression = match.group(1)
        if expression is None:
            shown = text[match.start() : match.start() + 40]
            problems.append((shown, "has no closing '}'"))
            continue
        problem = _expression_problem(expression)
        if problem is not None:
            problems.append((match.group(0), problem))
            continue
        if "".join(literal):
            pieces.append("".join(literal))
        literal = []
        pieces.append(Reference(expression, tuple(expression.split("."))))
    literal.append(text[pos:])
    if "".join(literal):
        pieces.append("".join(literal))
    return pieces, problems


def _strings(template: Any) -> Iterator[str]:
    """Every string value inside a JSON-like template (dict keys excluded)."""
    if isinstance(template, str):
        yield template
    elif isinstance(template, Mapping):
        for value in template.values():
            yield from _strings(value)
    elif isinstance(template, list | tuple):
        for value in template:
            yield from _strings(value)


def scan_template(template: Any) -> Iterator[tuple[list[Reference], list[tuple[str, str]]]]:
    """The references of each string of ``template`` that holds ``${``.

    One item per such string: its well-formed references, and its malformed ones as (the
    text as written, why it is malformed).
    """
    for text in _strings(template):
        if "${" not in text:
            continue
        pieces, problems = _scan(text)
        yield [piece for piece in pieces if isinstance(piece, Reference)], problems


def _template_refs(template: Any) -> Iterator[Reference]:
    for refs, problems in scan_template(template):
        if problems:
            raise UnresolvedReference(*problems[0])
        yield from refs


def references(template: Any) -> list[str]:
    """Every reference expression in ``template``, first appearance first, without repeats.

    ``{"id": "${input.order_id}", "note": "for ${steps.reserve.output.id}"}`` gives
    ``["input.order_id", "steps.reserve.output.id"]``. Raises UnresolvedReference for a
    malformed one.
    """
    found: dict[str, None] = {}
    for ref in _template_refs(template):
        found.setdefault(ref.expression)
    return list(found)


def resolve(template: Any, context: Mapping[str, Any]) -> Any:
    """A copy of ``template`` with every reference replaced from ``context``.

    ``context`` is ``{"input": ..., "steps": {NAME: {"output": ...}}, "execution":
    {"id": ..., "correlation_id": ...}}``. The result shares no mutable data with
    either argument. Raises UnresolvedReference naming the reference and what is missing.
    """
    if isinstance(template, str):
        return _resolve_string(template, context)
    if isinstance(template, Mapping):
        return {key: resolve(value, context) for key, value in template.items()}
    if isinstance(template, list | tuple):
        return [resolve(value, context) for value in template]
    return copy.deepcopy(template)


def _resolve_string(text: str, context: Mapping[str, Any]) -> Any:
    if "${" not in text:
        return text
    pieces, problems = _scan(text)
    if problems:
        raise UnresolvedReference(*problems[0])
    if len(pieces) == 1 and isinstance(pieces[0], Reference):
        return copy.deepcopy(_lookup(pieces[0], context))
    return "".join(
        _render(_lookup(piece, context)) if isinstance(piece, Reference) else piece
        for piece in pieces
    )


def _lookup(ref: Reference, context: Mapping[str, Any]) -> Any:
    parts = ref.parts
    if parts[0] == "execution":
        execution = context.get("execution")
        if not isinstance(execution, Mapping) or parts[1] not in execution:
            raise UnresolvedReference(ref.text, f"execution has no {parts[1]!r}")
        return execution[parts[1]]
    if parts[0] == "input":
        if "input" not in context:
            raise UnresolvedReference(ref.text, "the context has no input")
        value, label, path = context["input"], "input", parts[1:]
    else:
        steps = context.get("steps")
        entry = steps.get(parts[1]) if isinstance(steps, Mapping) else None
        if not isinstance(entry, Mapping) or "output" not in entry:
            raise UnresolvedReference(
                ref.text, f"step {parts[1]!r} has no output (it has not succeeded)"
            )
        value, label, path = entry["output"], "output", parts[3:]
    for segment in path:
        if isinstance(value, Mapping):
            if segment not in value:
                raise UnresolvedReference(ref.text, f"{label} has no key {segment!r}")
            value = value[segment]
        elif isinstance(value, list | tuple):
            if not segment.isdigit():
                raise UnresolvedReference(
                    ref.text, f"{label} is a list; {segment!r} is not an index"
                )
            if int(segment) >= len(value):
                raise UnresolvedReference(
                    ref.text, f"{label} has no index {int(segment)} (length {len(value)})"
                )
            value = value[int(segment)]
        else:
            raise UnresolvedReference(
                ref.text, f"{label} is {kind(value)}, which has no key {segment!r}"
            )
        label = f"{label}.{segment}"
    return value


def _render(value: Any) -> str:
    """A value as text inside a longer string."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        # A Struct carries every number as a double: 5.0 was most likely written 5.
        if math.isfinite(value) and value.is_integer() and abs(value) <= MAX_EXACT_INT:
            return str(int(value))
        return json.dumps(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)
