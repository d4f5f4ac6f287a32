"""Workflow definitions: validation, friendly input shapes and ``${...}`` references.

Pure code: no gRPC calls and no I/O apart from :func:`load_workflow_file` reading a file.

Shapes
    :func:`workflow_from_dict` turns user-friendly data into an
    ``orchestrator_pb2.Workflow``. It takes the guide's shape::

        {"workflow_id": "order_fulfillment_123",      # or "saga_id", or "name"
         "steps": [{"step": "validate_payment",      # or "name"
                    "service": "payment", "required": True,
                    "depends_on": [], "timeout_ms": 5000, "input": {...} or None}]}

    and the proto-JSON / YAML one (snake_case or camelCase keys, mixed freely)::

        name, description, timeout ("30s") | timeout_ms, version, create_time, update_time,
        steps: [{name, service, operation, input, depends_on | dependsOn, required,
                 timeout ("5s", or a number of seconds) | timeout_ms,
                 retry: {max_attempts, initial_backoff | initial_backoff_ms,
                         backoff_multiplier | multiplier, max_backoff | max_backoff_ms,
                         jitter, retryable_codes: ["UNAVAILABLE", ...]},
                 compensation: {service, operation, input, timeout | timeout_ms, retry}
                               or just "operation_name"}]

    Durations are strings such as ``"250ms"``, ``"1.5s"``, ``"2m"``, ``"1h"``, ``"1m30s"``
    or numbers of seconds; ``*_ms`` keys take numbers of milliseconds. A key whose value
    is ``None`` counts as absent: ``"input": None`` means no template (the execution
    input is sent). :func:`load_workflow_file` reads such data from YAML or JSON.

Limits (the contract is in ``protos/flext_mesh/v1/orchestrator.proto`` and
``common.proto``; :func:`validate_workflow` reports every violation at once)
    - workflow: name required (service-name rules: 1-63 of ``[A-Za-z0-9._-]``, starting
      with a letter or digit), description at most 1 KiB, timeout (when set) over 0 and
      at most 7 days, 1 to 100 steps with unique names;
    - step: service required, operation defaults to the step name, timeout 1 ms to 1 h
      (default 30 s), ``required`` defaults to true, at most 100 ``depends_on`` entries,
      each an other step, listed once, and no cycles through them;
    - retry: ``max_attempts`` 1-10 (0: default 3, or 5 for a compensation),
      ``initial_backoff`` 1 ms to 60 s (default 100 ms), ``backoff_multiplier`` 1-10
      (0: default 2), ``max_backoff`` from ``initial_backoff`` to 5 min (default 5 s, or
      ``initial_backoff`` when that is longer), ``jitter`` 0-1 (default 0.2),
      ``retryable_codes`` among UNAVAILABLE, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED,
      INTERNAL, UNKNOWN (the default set) and ABORTED: business codes are never retried;
    - compensation: operation required, service defaults to the step's, timeout to the
      step's, retries to 5 attempts.

References
    Inside string values of an input (at any depth; dict keys are not templated), a
    string that is exactly one reference takes the referenced value with its JSON type;
    a reference inside a longer string is interpolated as text (compact JSON for
    objects, lists, booleans and null). Forms: ``${input}``, ``${input.a.b}``,
    ``${steps.NAME.output}``, ``${steps.NAME.output.a.b}``, ``${execution.id}``,
    ``${execution.correlation_id}``. Path segments are ``[A-Za-z0-9_-]+`` (so a step
    whose name holds a ``.`` cannot be referenced); a numeric segment also indexes a
    list; ``$${`` writes a literal ``${``. NAME must be an ancestor of the step through
    ``depends_on``; a compensation may also use its own step's output.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import yaml
from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from flext_mesh.durations import parse_duration
from flext_mesh.errors import FieldViolation, InvalidArgument
from flext_mesh.names import check_name, raise_if
from flext_mesh.retry import (
    ALLOWED_RETRYABLE,
    DEFAULT_INITIAL_BACKOFF,
    DEFAULT_JITTER,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MULTIPLIER,
    DEFAULT_RETRYABLE,
    RetrySpec,
)
from flext_mesh.routing.policy import retry_spec
from flext_mesh.rpc.payloads import struct_to_dict
from flext_mesh.v1 import common_pb2, orchestrator_pb2

__all__ = [
    "ALLOWED_RETRYABLE",
    "DEFAULT_COMPENSATION_ATTEMPTS",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_RETRYABLE",
    "DEFAULT_STEP_TIMEOUT",
    "MAX_DEPENDS_ON",
    "MAX_DESCRIPTION_BYTES",
    "MAX_STEPS",
    "MAX_STEP_TIMEOUT",
    "MAX_WORKFLOW_TIMEOUT",
    "MIN_STEP_TIMEOUT",
    "CompensationSpec",
    "RetrySpec",
    "StepSpec",
    "UnresolvedReference",
    "WorkflowSpec",
    "load_workflow_file",
    "references",
    "resolve",
    "validate_workflow",
    "workflow_from_dict",
]

MAX_STEPS = 100
"""Most steps in a workflow."""
MAX_DEPENDS_ON = 100
"""Most ``depends_on`` entries of one step."""
DEFAULT_STEP_TIMEOUT = 30.0
"""Seconds one attempt of a step may take when its timeout is unset."""
MIN_STEP_TIMEOUT, MAX_STEP_TIMEOUT = 0.001, 3600.0
"""Bounds, in seconds, of a step's (or a compensation's) timeout."""
MAX_WORKFLOW_TIMEOUT = 7 * 24 * 3600.0
"""Longest deadline, in seconds, of a whole execution."""
MAX_DESCRIPTION_BYTES = 1024
"""Longest workflow description, in UTF-8 bytes."""
DEFAULT_COMPENSATION_ATTEMPTS = 5
"""Attempts of a compensation when its retry policy leaves ``max_attempts`` at 0."""
# The rest of RetryPolicy's contract (common.proto).
_MAX_ATTEMPTS = 10
_MIN_BACKOFF, _MAX_INITIAL_BACKOFF = 0.001, 60.0
_MAX_MULTIPLIER = 10.0
_MAX_MAX_BACKOFF = 300.0

# Largest whole number a Struct (doubles) carries exactly.
_MAX_EXACT_INT = 2**53
# google.protobuf.Duration's range.
_MAX_DURATION_SECONDS = 315_576_000_000
_STATUS_CODES = {code.name: code for code in grpc.StatusCode}
_STEP_TIMEOUT_BOUNDS = (MIN_STEP_TIMEOUT, MAX_STEP_TIMEOUT, "between 1ms and 1h")


# -- the validated definition -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompensationSpec:
    """How to undo a completed step, with defaults applied."""

    service: str
    """Service to call (the step's service unless given)."""
    operation: str
    """Operation to call."""
    input: Any | None
    """Input template (references allowed); None sends the step's output."""
    timeout: float
    """Seconds one attempt may take (the step's timeout unless given)."""
    retry: RetrySpec
    """Retries (5 attempts unless given)."""


@dataclass(frozen=True, slots=True)
class StepSpec:
    """One validated step, with defaults applied."""

    name: str
    """Unique name in the workflow."""
    service: str
    """Service to call."""
    operation: str
    """Operation to call (the step name unless given)."""
    input: Any | None
    """Input template (references allowed); None sends the execution input."""
    depends_on: tuple[str, ...]
    """Steps that must succeed first, as listed."""
    required: bool
    """False: a failure is recorded, dependents are skipped and the execution goes on."""
    timeout: float
    """Seconds one attempt may take."""
    retry: RetrySpec
    """Retries of infrastructure faults."""
    compensation: CompensationSpec | None
    """Undo action, if any."""


@dataclass(frozen=True, slots=True)
class WorkflowSpec:
    """A validated workflow: steps in definition order and their graph."""

    name: str
    """Workflow name."""
    version: int
    """Version, as given in the definition."""
    steps: tuple[StepSpec, ...]
    """Steps in definition order."""
    timeout: float | None
    """Deadline, in seconds, of a whole execution; None means none."""
    _by_name: dict[str, StepSpec] = field(init=False, repr=False, compare=False)
    _dependents: dict[str, tuple[str, ...]] = field(init=False, repr=False, compare=False)
    _ancestors: dict[str, frozenset[str]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        by_name = {step.name: step for step in self.steps}
        dependents = {
            name: tuple(s.name for s in self.steps if name in s.depends_on) for name in by_name
        }
        graph = {name: step.depends_on for name, step in by_name.items()}
        ancestors = {name: _closure(step.depends_on, graph) for name, step in by_name.items()}
        object.__setattr__(self, "_by_name", by_name)
        object.__setattr__(self, "_dependents", dependents)
        object.__setattr__(self, "_ancestors", ancestors)

    def step(self, name: str) -> StepSpec:
        """The step called ``name``; KeyError when there is none."""
        return self._by_name[name]

    def dependents(self, name: str) -> tuple[str, ...]:
        """Steps that list ``name`` in their ``depends_on``, in definition order."""
        return self._dependents[name]

    def ancestors(self, name: str) -> frozenset[str]:
        """Every step that must succeed before ``name`` runs (transitive ``depends_on``)."""
        return self._ancestors[name]


def _closure(start: Any, graph: Mapping[str, Any]) -> frozenset[str]:
    seen: set[str] = set()
    todo = [name for name in start if name in graph]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(dep for dep in graph[name] if dep in graph)
    return frozenset(seen)


# -- references ---------------------------------------------------------------------------


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
class _Ref:
    expression: str
    parts: tuple[str, ...]

    @property
    def text(self) -> str:
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


def _scan(text: str) -> tuple[list[str | _Ref], list[tuple[str, str]]]:
    """Split ``text`` into literal pieces and references; also list malformed ones."""
    pieces: list[str | _Ref] = []
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
        pieces.append(_Ref(expression, tuple(expression.split("."))))
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


def _template_refs(template: Any) -> Iterator[_Ref]:
    for text in _strings(template):
        if "${" not in text:
            continue
        pieces, problems = _scan(text)
        if problems:
            raise UnresolvedReference(*problems[0])
        yield from (piece for piece in pieces if isinstance(piece, _Ref))


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
    if len(pieces) == 1 and isinstance(pieces[0], _Ref):
        return copy.deepcopy(_lookup(pieces[0], context))
    return "".join(
        _render(_lookup(piece, context)) if isinstance(piece, _Ref) else piece for piece in pieces
    )


def _lookup(ref: _Ref, context: Mapping[str, Any]) -> Any:
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
                ref.text, f"{label} is {_kind(value)}, which has no key {segment!r}"
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
        if math.isfinite(value) and value.is_integer() and abs(value) <= _MAX_EXACT_INT:
            return str(int(value))
        return json.dumps(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


# -- validation ---------------------------------------------------------------------------


def _seconds(duration: duration_pb2.Duration) -> float | None:
    """Seconds of a well-formed Duration; None when its fields are out of range."""
    seconds, nanos = duration.seconds, duration.nanos
    if abs(nanos) >= 1_000_000_000 or (seconds > 0 > nanos) or (seconds < 0 < nanos):
        return None
    return seconds + nanos / 1e9


def _check_timeout(
    path: str,
    duration: duration_pb2.Duration,
    bounds: tuple[float, float, str],
    out: list[FieldViolation],
) -> float | None:
    """The duration in seconds, or None (and a violation) when outside ``bounds``."""
    low, high, text = bounds
    seconds = _seconds(duration)
    if seconds is None:
        out.append(FieldViolation(path, "is not a valid duration"))
        return None
    if not low <= seconds <= high:
        out.append(FieldViolation(path, f"must be {text}, got {seconds:g}s"))
        return None
    return seconds


def _check_retry(
    path: str, policy: common_pb2.RetryPolicy, default_attempts: int, out: list[FieldViolation]
) -> RetrySpec:
    attempts = policy.max_attempts or default_attempts
    if not 1 <= attempts <= _MAX_ATTEMPTS:
        out.append(
            FieldViolation(
                f"{path}.max_attempts",
                f"must be 1 to {_MAX_ATTEMPTS} (0 for the default {default_attempts}), "
                f"got {attempts}",
            )
        )
    initial: float | None = DEFAULT_INITIAL_BACKOFF
    if policy.HasField("initial_backoff"):
        initial = _check_timeout(
            f"{path}.initial_backoff",
            policy.initial_backoff,
            (_MIN_BACKOFF, _MAX_INITIAL_BACKOFF, "between 1ms and 60s"),
            out,
        )
    multiplier = policy.backoff_multiplier or DEFAULT_MULTIPLIER
    if not 1.0 <= multiplier <= _MAX_MULTIPLIER:  # NaN fails too
        out.append(
            FieldViolation(
                f"{path}.backoff_multiplier",
                f"must be 1.0 to {_MAX_MULTIPLIER:g} (0 for the default 2.0), got {multiplier:g}",
            )
        )
    if policy.HasField("max_backoff"):
        low = initial if initial is not None else _MIN_BACKOFF
        _check_timeout(
            f"{path}.max_backoff",
            policy.max_backoff,
            (low, _MAX_MAX_BACKOFF, f"at least initial_backoff ({low:g}s) and at most 5m"),
            out,
        )
    jitter = policy.jitter if policy.HasField("jitter") else DEFAULT_JITTER
    if not 0.0 <= jitter <= 1.0:
        out.append(FieldViolation(f"{path}.jitter", f"must be 0.0 to 1.0, got {jitter:g}"))
    for j, name in enumerate(policy.retryable_codes):
        code = _STATUS_CODES.get(name)
        field_path = f"{path}.retryable_codes[{j}]"
        if code is None:
            out.append(
                FieldViolation(
                    field_path, f"{name!r} is not a gRPC status code name (e.g. 'UNAVAILABLE')"
                )
            )
        elif code not in ALLOWED_RETRYABLE:
            allowed = ", ".join(sorted(c.name for c in ALLOWED_RETRYABLE))
            out.append(
                FieldViolation(
                    field_path,
                    f"{name} is a business code and business codes are never retried "
                    f"(retryable: {allowed})",
                )
            )
    return retry_spec(policy, default_attempts=default_attempts)


def _check_references(
    path: str,
    template: Any,
    out: list[FieldViolation],
    *,
    step: str,
    index: Mapping[str, int],
    allowed: frozenset[str],
    compensation: bool,
) -> None:
    for text in _strings(template):
        if "${" not in text:
            continue
        pieces, problems = _scan(text)
        out.extend(FieldViolation(path, f"{shown}: {why}") for shown, why in problems)
        for ref in pieces:
            if not isinstance(ref, _Ref) or ref.parts[0] != "steps":
                continue
            name = ref.parts[1]
            if name not in index:
                out.append(FieldViolation(path, f"{ref.text}: unknown step {name!r}"))
            elif name == step and not compensation:
                out.append(
                    FieldViolation(
                        path, f"{ref.text}: a step cannot use its own output (its compensation can)"
                    )
                )
            elif name != step and name not in allowed:
                out.append(
                    FieldViolation(
                        path,
                        f"{ref.text}: steps.{name} is not an ancestor of {step}: "
                        "add it to depends_on",
                    )
                )


def _cycles(order: list[str], graph: Mapping[str, list[str]]) -> list[list[str]]:
    """Cycles through ``graph`` (name -> depends_on), found by a DFS in definition order."""
    white, grey, black = 0, 1, 2
    color = dict.fromkeys(order, white)
    found: list[list[str]] = []
    seen: set[frozenset[str]] = set()
    for start in order:
        if color[start] != white:
            continue
        color[start] = grey
        path = [start]
        stack = [iter(graph[start])]
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                color[path.pop()] = black
                stack.pop()
            elif color[nxt] == white:
                color[nxt] = grey
                path.append(nxt)
                stack.append(iter(graph[nxt]))
            elif color[nxt] == grey:
                cycle = path[path.index(nxt) :]
                if frozenset(cycle) not in seen:
                    seen.add(frozenset(cycle))
                    found.append([*cycle, nxt])
    return found


def validate_workflow(
    workflow: orchestrator_pb2.Workflow, *, field: str = "workflow"
) -> WorkflowSpec:
    """The workflow's spec with defaults applied; InvalidArgument listing every violation.

    Violations carry paths such as ``workflow.steps[2].depends_on[0]`` or
    ``workflow.steps[1].retry.max_attempts`` (``field`` replaces ``workflow``). Cycles
    and references are checked only when the step count is within MAX_STEPS.
    """
    out: list[FieldViolation] = check_name(f"{field}.name", workflow.name)
    size = len(workflow.description.encode())
    if size > MAX_DESCRIPTION_BYTES:
        out.append(
            FieldViolation(
                f"{field}.description", f"is {size} bytes; at most {MAX_DESCRIPTION_BYTES}"
            )
        )
    timeout: float | None = None
    if workflow.HasField("timeout"):
        timeout = _check_timeout(
            f"{field}.timeout",
            workflow.timeout,
            (1e-9, MAX_WORKFLOW_TIMEOUT, "over 0 and at most 7 days"),
            out,
        )
    count = len(workflow.steps)
    if count == 0:
        out.append(FieldViolation(f"{field}.steps", "needs at least one step"))
    elif count > MAX_STEPS:
        out.append(FieldViolation(f"{field}.steps", f"has {count} steps; at most {MAX_STEPS}"))

    index: dict[str, int] = {}
    for i, step in enumerate(workflow.steps):
        if step.name in index:
            out.append(
                FieldViolation(
                    f"{field}.steps[{i}].name",
                    f"duplicate step name {step.name!r} (also steps[{index[step.name]}])",
                )
            )
        elif step.name:
            index[step.name] = i
    # The graph follows the first step of each name; self-edges and unknowns are reported
    # below, not followed.
    graph = {
        name: [d for d in workflow.steps[i].depends_on if d in index and d != name]
        for name, i in index.items()
    }

    steps: list[StepSpec] = []
    for i, step in enumerate(workflow.steps):
        path = f"{field}.steps[{i}]"
        out += check_name(f"{path}.name", step.name)
        out += check_name(f"{path}.service", step.service)
        out += check_name(f"{path}.operation", step.operation, required=False)
        step_timeout: float | None = DEFAULT_STEP_TIMEOUT
        if step.HasField("timeout"):
            step_timeout = _check_timeout(
                f"{path}.timeout",
                step.timeout,
                _STEP_TIMEOUT_BOUNDS,
                out,
            )
        step_timeout = step_timeout or DEFAULT_STEP_TIMEOUT
        retry = _check_retry(f"{path}.retry", step.retry, DEFAULT_MAX_ATTEMPTS, out)
        if len(step.depends_on) > MAX_DEPENDS_ON:
            out.append(
                FieldViolation(
                    f"{path}.depends_on",
                    f"has {len(step.depends_on)} entries; at most {MAX_DEPENDS_ON}",
                )
            )
        listed: dict[str, int] = {}
        for j, dep in enumerate(step.depends_on):
            dep_path = f"{path}.depends_on[{j}]"
            if dep in listed:
                out.append(
                    FieldViolation(
                        dep_path, f"{dep!r} is listed twice (also depends_on[{listed[dep]}])"
                    )
                )
                continue
            listed[dep] = j
            if not dep:
                out.append(FieldViolation(dep_path, "is empty; name a step"))
            elif dep == step.name:
                out.append(FieldViolation(dep_path, "a step cannot depend on itself"))
            elif dep not in index:
                out.append(
                    FieldViolation(dep_path, f"unknown step {dep!r}{_did_you_mean(dep, index)}")
                )
        compensation: CompensationSpec | None = None
        if step.HasField("compensation"):
            comp = step.compensation
            cpath = f"{path}.compensation"
            out += check_name(f"{cpath}.operation", comp.operation)
            out += check_name(f"{cpath}.service", comp.service, required=False)
            comp_timeout: float | None = step_timeout
            if comp.HasField("timeout"):
                comp_timeout = _check_timeout(
                    f"{cpath}.timeout",
                    comp.timeout,
                    _STEP_TIMEOUT_BOUNDS,
                    out,
                )
            compensation = CompensationSpec(
                service=comp.service or step.service,
                operation=comp.operation,
                input=struct_to_dict(comp.input) if comp.HasField("input") else None,
                timeout=comp_timeout or step_timeout,
                retry=_check_retry(
                    f"{cpath}.retry", comp.retry, DEFAULT_COMPENSATION_ATTEMPTS, out
                ),
            )
        steps.append(
            StepSpec(
                name=step.name,
                service=step.service,
                operation=step.operation or step.name,
                input=struct_to_dict(step.input) if step.HasField("input") else None,
                depends_on=tuple(step.depends_on),
                required=step.required if step.HasField("required") else True,
                timeout=step_timeout,
                retry=retry,
                compensation=compensation,
            )
        )

    if count <= MAX_STEPS:
        out.extend(
            FieldViolation(
                f"{field}.steps",
                "cycle: " + " -> ".join(cycle) + " (each step depends on the next)",
            )
            for cycle in _cycles(list(index), graph)
        )
        for i, spec in enumerate(steps):
            if spec.input is None and spec.compensation is None:
                continue
            ancestors = _closure(spec.depends_on, graph)
            path = f"{field}.steps[{i}]"
            if spec.input is not None:
                _check_references(
                    f"{path}.input",
                    spec.input,
                    out,
                    step=spec.name,
                    index=index,
                    allowed=ancestors,
                    compensation=False,
                )
            if spec.compensation is not None and spec.compensation.input is not None:
                _check_references(
                    f"{path}.compensation.input",
                    spec.compensation.input,
                    out,
                    step=spec.name,
                    index=index,
                    allowed=ancestors,
                    compensation=True,
                )
    raise_if(out)
    return WorkflowSpec(
        name=workflow.name, version=workflow.version, steps=tuple(steps), timeout=timeout
    )


def _did_you_mean(word: str, choices: Any) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


# -- friendly shapes ----------------------------------------------------------------------

_WORKFLOW_KEYS = {
    "name": "name",
    "workflow_id": "name",
    "saga_id": "name",
    "description": "description",
    "version": "version",
    "timeout": "timeout",
    "timeout_ms": "timeout",
    "timeoutMs": "timeout",
    "steps": "steps",
    "create_time": "create_time",
    "createTime": "create_time",
    "update_time": "update_time",
    "updateTime": "update_time",
}
_STEP_KEYS = {
    "name": "name",
    "step": "name",
    "service": "service",
    "operation": "operation",
    "input": "input",
    "depends_on": "depends_on",
    "dependsOn": "depends_on",
    "required": "required",
    "timeout": "timeout",
    "timeout_ms": "timeout",
    "timeoutMs": "timeout",
    "retry": "retry",
    "compensation": "compensation",
}
_COMPENSATION_KEYS = {
    "service": "service",
    "operation": "operation",
    "input": "input",
    "timeout": "timeout",
    "timeout_ms": "timeout",
    "timeoutMs": "timeout",
    "retry": "retry",
}
_RETRY_KEYS = {
    "max_attempts": "max_attempts",
    "maxAttempts": "max_attempts",
    "initial_backoff": "initial_backoff",
    "initialBackoff": "initial_backoff",
    "initial_backoff_ms": "initial_backoff",
    "initialBackoffMs": "initial_backoff",
    "backoff_multiplier": "backoff_multiplier",
    "backoffMultiplier": "backoff_multiplier",
    "multiplier": "backoff_multiplier",
    "max_backoff": "max_backoff",
    "maxBackoff": "max_backoff",
    "max_backoff_ms": "max_backoff",
    "maxBackoffMs": "max_backoff",
    "jitter": "jitter",
    "retryable_codes": "retryable_codes",
    "retryableCodes": "retryable_codes",
}


@dataclass(frozen=True, slots=True)
class _Given:
    path: str  # field path as the user wrote it
    key: str
    value: Any


def _keys(
    data: Mapping[Any, Any], path: str, known: Mapping[str, str], out: list[FieldViolation]
) -> dict[str, _Given]:
    """Known keys by canonical name (None values skipped); unknown and doubled keys reported."""
    given: dict[str, _Given] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            out.append(FieldViolation(path, f"has a key that is not a string: {key!r}"))
            continue
        target = known.get(key)
        if target is None:
            hint = _did_you_mean(key, known) or f" (known keys: {', '.join(sorted(known))})"
            out.append(FieldViolation(f"{path}.{key}", f"is not a known key{hint}"))
            continue
        if target in given:
            out.append(
                FieldViolation(
                    f"{path}.{key}", f"repeats {given[target].key!r}; give only one of them"
                )
            )
            continue
        if value is not None:
            given[target] = _Given(f"{path}.{key}", key, value)
    return given


def _text(given: _Given | None, out: list[FieldViolation]) -> str:
    if given is None:
        return ""
    if not isinstance(given.value, str):
        out.append(FieldViolation(given.path, f"must be a string, got {_kind(given.value)}"))
        return ""
    return given.value


def _number(given: _Given, out: list[FieldViolation]) -> float | None:
    value = given.value
    if isinstance(value, bool) or not isinstance(value, int | float):
        out.append(FieldViolation(given.path, f"must be a number, got {_kind(value)}"))
        return None
    if not math.isfinite(value):
        out.append(FieldViolation(given.path, f"must be a finite number, got {value}"))
        return None
    return float(value)


def _integer(given: _Given, low: int, high: int, out: list[FieldViolation]) -> int | None:
    value = given.value
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value):  # proto-JSON int64
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        out.append(FieldViolation(given.path, f"must be a whole number, got {_kind(value)}"))
        return None
    if not low <= value <= high:
        out.append(FieldViolation(given.path, f"must be {low} to {high}, got {value}"))
        return None
    return value


def _duration(given: _Given, out: list[FieldViolation]) -> duration_pb2.Duration | None:
    value = given.value
    nanos: int
    if given.key.endswith(("_ms", "Ms")):
        if isinstance(value, str):
            out.append(
                FieldViolation(given.path, f"must be a number of milliseconds, got {value!r}")
            )
            return None
        ms = _number(given, out)
        if ms is None:
            return None
        nanos = value * 10**6 if isinstance(value, int) else round(ms * 1e6)
    elif isinstance(value, str):
        parsed = parse_duration(value)
        if parsed is None:
            out.append(
                FieldViolation(
                    given.path,
                    f"{value!r} is not a duration (e.g. '250ms', '1.5s', '2m', '1h', or a "
                    "number of seconds)",
                )
            )
            return None
        nanos = parsed
    else:
        seconds = _number(given, out)
        if seconds is None:
            return None
        nanos = value * 10**9 if isinstance(value, int) else round(seconds * 1e9)
    if abs(nanos) > _MAX_DURATION_SECONDS * 10**9:
        out.append(FieldViolation(given.path, "is too long for a duration"))
        return None
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(nanos)
    return duration


def _timestamp(given: _Given, out: list[FieldViolation]) -> timestamp_pb2.Timestamp | None:
    stamp = timestamp_pb2.Timestamp()
    try:
        if isinstance(given.value, datetime.datetime):
            stamp.FromDatetime(given.value)
        elif isinstance(given.value, str):
            stamp.FromJsonString(given.value)
        else:
            raise ValueError(given.value)
    except ValueError:
        out.append(
            FieldViolation(given.path, "must be an RFC 3339 time, e.g. '2024-05-01T12:00:00Z'")
        )
        return None
    return stamp


def _json_value(path: str, value: Any, out: list[FieldViolation]) -> Any:
    """``value`` as plain JSON data (dicts, lists, ...), each unfit part reported."""
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, int):
        if abs(value) > _MAX_EXACT_INT:
            out.append(
                FieldViolation(
                    path, f"{value} is beyond 2**53, where JSON numbers lose digits: use a string"
                )
            )
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            out.append(FieldViolation(path, f"{value} is not a JSON number"))
        return value
    if isinstance(value, Mapping):
        result: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                out.append(FieldViolation(path, f"has a key that is not a string: {key!r}"))
                continue
            result[key] = _json_value(f"{path}.{key}", item, out)
        return result
    if isinstance(value, list | tuple):
        return [_json_value(f"{path}[{i}]", item, out) for i, item in enumerate(value)]
    out.append(FieldViolation(path, f"{_kind(value)} is not JSON data (quote it as a string)"))
    return None


def _struct(given: _Given | None, target: struct_pb2.Struct, out: list[FieldViolation]) -> None:
    if given is None:
        return
    if not isinstance(given.value, Mapping):
        out.append(
            FieldViolation(given.path, f"must be an object or null, got {_kind(given.value)}")
        )
        return
    errors = len(out)
    data = _json_value(given.path, given.value, out)
    if len(out) == errors:
        target.SetInParent()
        target.update(data)


def _retry(given: _Given | None, target: common_pb2.RetryPolicy, out: list[FieldViolation]) -> None:
    if given is None:
        return
    if not isinstance(given.value, Mapping):
        out.append(FieldViolation(given.path, f"must be an object, got {_kind(given.value)}"))
        return
    keys = _keys(given.value, given.path, _RETRY_KEYS, out)
    target.SetInParent()
    if "max_attempts" in keys:
        attempts = _integer(keys["max_attempts"], 0, 2**32 - 1, out)
        target.max_attempts = attempts or 0
    for name in ("initial_backoff", "max_backoff"):
        if name in keys:
            duration = _duration(keys[name], out)
            if duration is not None:
                getattr(target, name).CopyFrom(duration)
    if "backoff_multiplier" in keys:
        target.backoff_multiplier = _number(keys["backoff_multiplier"], out) or 0.0
    if "jitter" in keys:
        jitter = _number(keys["jitter"], out)
        if jitter is not None:
            target.jitter = jitter
    if "retryable_codes" in keys:
        codes = keys["retryable_codes"]
        for j, code in enumerate(_list(codes, out)):
            if isinstance(code, str):
                target.retryable_codes.append(code)
            else:
                out.append(
                    FieldViolation(f"{codes.path}[{j}]", f"must be a string, got {_kind(code)}")
                )


def _list(given: _Given, out: list[FieldViolation]) -> list[Any]:
    if not isinstance(given.value, list | tuple):
        out.append(FieldViolation(given.path, f"must be a list, got {_kind(given.value)}"))
        return []
    return list(given.value)


def _step(
    path: str, data: Any, target: orchestrator_pb2.WorkflowStep, out: list[FieldViolation]
) -> None:
    if not isinstance(data, Mapping):
        out.append(FieldViolation(path, f"must be an object, got {_kind(data)}"))
        return
    keys = _keys(data, path, _STEP_KEYS, out)
    target.name = _text(keys.get("name"), out)
    target.service = _text(keys.get("service"), out)
    target.operation = _text(keys.get("operation"), out)
    _struct(keys.get("input"), target.input, out)
    if "depends_on" in keys:
        deps = keys["depends_on"]
        for j, dep in enumerate(_list(deps, out)):
            if isinstance(dep, str):
                target.depends_on.append(dep)
            else:
                out.append(
                    FieldViolation(f"{deps.path}[{j}]", f"must be a step name, got {_kind(dep)}")
                )
    if "required" in keys:
        if isinstance(keys["required"].value, bool):
            target.required = keys["required"].value
        else:
            out.append(
                FieldViolation(
                    keys["required"].path,
                    f"must be true or false, got {_kind(keys['required'].value)}",
                )
            )
    if "timeout" in keys:
        duration = _duration(keys["timeout"], out)
        if duration is not None:
            target.timeout.CopyFrom(duration)
    _retry(keys.get("retry"), target.retry, out)
    if "compensation" in keys:
        comp = keys["compensation"]
        if isinstance(comp.value, str):  # shorthand: the operation alone
            target.compensation.SetInParent()
            target.compensation.operation = comp.value
        elif isinstance(comp.value, Mapping):
            ckeys = _keys(comp.value, comp.path, _COMPENSATION_KEYS, out)
            target.compensation.SetInParent()
            target.compensation.service = _text(ckeys.get("service"), out)
            target.compensation.operation = _text(ckeys.get("operation"), out)
            _struct(ckeys.get("input"), target.compensation.input, out)
            if "timeout" in ckeys:
                duration = _duration(ckeys["timeout"], out)
                if duration is not None:
                    target.compensation.timeout.CopyFrom(duration)
            _retry(ckeys.get("retry"), target.compensation.retry, out)
        else:
            out.append(
                FieldViolation(
                    comp.path, f"must be an object or an operation name, got {_kind(comp.value)}"
                )
            )


def workflow_from_dict(
    data: Mapping[str, Any], *, field: str = "workflow"
) -> orchestrator_pb2.Workflow:
    """The Workflow described by ``data`` in either shape of the module docstring.

    Unknown keys, wrong types and unparsable durations raise InvalidArgument listing every
    problem with its path (e.g. ``workflow.steps[1].timeout_ms``). Limits, names and
    references are not checked here: run :func:`validate_workflow` on the result.
    """
    out: list[FieldViolation] = []
    workflow = orchestrator_pb2.Workflow()
    if not isinstance(data, Mapping):
        raise_if([FieldViolation(field, f"must be an object, got {_kind(data)}")])
    keys = _keys(data, field, _WORKFLOW_KEYS, out)
    workflow.name = _text(keys.get("name"), out)
    workflow.description = _text(keys.get("description"), out)
    if "version" in keys:
        workflow.version = _integer(keys["version"], 0, 2**63 - 1, out) or 0
    if "timeout" in keys:
        duration = _duration(keys["timeout"], out)
        if duration is not None:
            workflow.timeout.CopyFrom(duration)
    for name in ("create_time", "update_time"):
        if name in keys:
            stamp = _timestamp(keys[name], out)
            if stamp is not None:
                getattr(workflow, name).CopyFrom(stamp)
    if "steps" in keys:
        steps = keys["steps"]
        for i, step in enumerate(_list(steps, out)):
            _step(f"{steps.path}[{i}]", step, workflow.steps.add(), out)
    raise_if(out)
    return workflow


# -- files --------------------------------------------------------------------------------


def _file_error(name: str, description: str) -> InvalidArgument:
    return InvalidArgument.from_violations([FieldViolation(name, description)])


def _documents(name: str, text: str, json_file: bool) -> list[Any]:
    if json_file:
        try:
            return [json.loads(text)]
        except json.JSONDecodeError as exc:
            raise _file_error(name, f"line {exc.lineno}, column {exc.colno}: {exc.msg}") from exc
    try:
        return list(yaml.safe_load_all(text))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        raise _file_error(name, f"{where}{problem}") from exc
    except yaml.YAMLError as exc:
        raise _file_error(name, f"invalid YAML: {exc}") from exc


def load_workflow_file(path: str | os.PathLike[str]) -> list[orchestrator_pb2.Workflow]:
    """The workflows of a YAML (``.yaml``/``.yml``) or JSON (``.json``) file, in file order.

    YAML may hold several documents; JSON an object or a list of objects. Each document
    is a workflow, a list of workflows, or ``{"workflows": [...]}``; empty YAML
    documents are skipped. Each workflow goes through :func:`workflow_from_dict` with
    the field ``FILE[i]`` (i counts workflows across the file). Unreadable files, bad
    syntax (with its line), files without workflows and every conversion problem raise
    InvalidArgument.
    """
    name = os.fspath(path)
    suffix = Path(name).suffix.lower()
    if suffix not in (".yaml", ".yml", ".json"):
        raise _file_error(name, "must end in .yaml, .yml or .json")
    try:
        text = Path(name).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise _file_error(name, f"is not UTF-8 text: {exc.reason}") from exc
    except OSError as exc:
        raise _file_error(name, f"cannot be read: {exc.strerror or exc}") from exc
    found: list[Any] = []
    out: list[FieldViolation] = []
    for d, document in enumerate(_documents(name, text, suffix == ".json")):
        if document is None:
            continue
        if isinstance(document, Mapping) and "workflows" in document:
            extra = sorted(str(key) for key in document if key != "workflows")
            if extra:
                out.append(
                    FieldViolation(
                        name, f"document {d + 1}: unexpected keys beside 'workflows': {extra}"
                    )
                )
            items = document["workflows"]
            if isinstance(items, list):
                found.extend(items)
            else:
                out.append(FieldViolation(name, f"document {d + 1}: 'workflows' must be a list"))
        elif isinstance(document, list):
            found.extend(document)
        else:
            found.append(document)
    workflows: list[orchestrator_pb2.Workflow] = []
    for i, item in enumerate(found):
        try:
            workflows.append(workflow_from_dict(item, field=f"{name}[{i}]"))
        except InvalidArgument as exc:
            out.extend(exc.violations)
    if not found and not out:
        out.append(FieldViolation(name, "holds no workflow"))
    raise_if(out)
    return workflows
