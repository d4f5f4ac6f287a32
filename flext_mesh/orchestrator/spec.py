"""Workflow specs: the limits of a workflow definition and the check that applies them.

:func:`validate_workflow` turns an ``orchestrator_pb2.Workflow`` into a
:class:`WorkflowSpec` with every default applied, or reports every violation at once.
Pure code: no gRPC calls, no I/O. Friendlier input shapes and files are read by
:mod:`flext_mesh.orchestrator.formats`; the ``${...}`` references of step inputs are
:mod:`flext_mesh.orchestrator.templates`.

Limits (the contract is in ``protos/flext_mesh/v1/orchestrator.proto`` and
``common.proto``)
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
      step's, retries to 5 attempts;
    - references: a step's input may name ``${steps.NAME.output}`` only for NAME an
      ancestor of the step through ``depends_on``; a compensation may also use its own
      step's output.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.protobuf import duration_pb2

from flext_mesh.documents import did_you_mean
from flext_mesh.errors import FieldViolation
from flext_mesh.names import check_name, raise_if
from flext_mesh.orchestrator.templates import scan_template
from flext_mesh.retry import (
    ALLOWED_RETRYABLE,
    DEFAULT_INITIAL_BACKOFF,
    DEFAULT_JITTER,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MULTIPLIER,
    RetrySpec,
)
from flext_mesh.routing.policy import retry_spec
from flext_mesh.rpc.payloads import struct_to_dict
from flext_mesh.v1 import common_pb2, orchestrator_pb2

__all__ = [
    "DEFAULT_COMPENSATION_ATTEMPTS",
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
    "WorkflowSpec",
    "validate_workflow",
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
    for refs, problems in scan_template(template):
        out.extend(FieldViolation(path, f"{shown}: {why}") for shown, why in problems)
        for ref in refs:
            if ref.parts[0] != "steps":
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
                    FieldViolation(dep_path, f"unknown step {dep!r}{did_you_mean(dep, index)}")
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
