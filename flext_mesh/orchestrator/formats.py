"""Workflow definitions as users write them: friendly dicts, YAML and JSON files.

Pure code: no gRPC calls and no I/O apart from :func:`load_workflow_file` reading a file.
What a value may be and how a problem is worded is shared with the other readers of
users' files (:mod:`flext_mesh.documents`); limits, names and references are checked
afterwards by :func:`flext_mesh.orchestrator.spec.validate_workflow`.

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
    or ``"2"`` (seconds), or numbers of seconds; ``*_ms`` keys take numbers of
    milliseconds. A key whose value is ``None`` counts as absent: ``"input": None`` means
    no template (the execution input is sent). :func:`load_workflow_file` reads such
    data from YAML or JSON.
"""

from __future__ import annotations

import datetime
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from flext_mesh.documents import (
    MAX_EXACT_INT,
    FileProblem,
    Given,
    SyntaxProblem,
    as_bool,
    as_duration_nanos,
    as_list,
    as_number,
    as_string,
    as_whole_number,
    did_you_mean,
    given_keys,
    kind,
    parse_documents,
    read_text,
)
from flext_mesh.errors import FieldViolation, InvalidArgument
from flext_mesh.names import raise_if
from flext_mesh.v1 import common_pb2, orchestrator_pb2

__all__ = ["load_workflow_file", "workflow_from_dict"]

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


def _keys(
    data: Mapping[Any, Any], path: str, known: Mapping[str, str], out: list[FieldViolation]
) -> dict[str, Given]:
    """Known keys by canonical name (None values skipped); unknown and doubled keys reported."""

    def unknown(key: str) -> str:
        hint = did_you_mean(key, known) or f" (known keys: {', '.join(sorted(known))})"
        return f"is not a known key{hint}"

    return dict(given_keys(data, path, known, out, unknown=unknown))


def _text(given: Given | None, out: list[FieldViolation]) -> str:
    if given is None:
        return ""
    return as_string(given.value, given.path, out) or ""


def _list(given: Given, out: list[FieldViolation]) -> list[Any]:
    return as_list(given.value, given.path, out) or []


def _duration(given: Given, out: list[FieldViolation]) -> duration_pb2.Duration | None:
    milliseconds = given.key.endswith(("_ms", "Ms"))
    nanos = as_duration_nanos(given.value, given.path, out, milliseconds=milliseconds)
    if nanos is None:
        return None
    result = duration_pb2.Duration()
    result.FromNanoseconds(nanos)
    return result


def _timestamp(given: Given, out: list[FieldViolation]) -> timestamp_pb2.Timestamp | None:
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
        if abs(value) > MAX_EXACT_INT:
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
    out.append(FieldViolation(path, f"{kind(value)} is not JSON data (quote it as a string)"))
    return None


def _struct(given: Given | None, target: struct_pb2.Struct, out: list[FieldViolation]) -> None:
    if given is None:
        return
    if not isinstance(given.value, Mapping):
        out.append(
            FieldViolation(given.path, f"must be an object or null, got {kind(given.value)}")
        )
        return
    errors = len(out)
    data = _json_value(given.path, given.value, out)
    if len(out) == errors:
        target.SetInParent()
        target.update(data)


def _retry(given: Given | None, target: common_pb2.RetryPolicy, out: list[FieldViolation]) -> None:
    if given is None:
        return
    if not isinstance(given.value, Mapping):
        out.append(FieldViolation(given.path, f"must be an object, got {kind(given.value)}"))
        return
    keys = _keys(given.value, given.path, _RETRY_KEYS, out)
    target.SetInParent()
    if "max_attempts" in keys:
        attempts = keys["max_attempts"]
        target.max_attempts = (
            as_whole_number(attempts.value, attempts.path, out, low=0, high=2**32 - 1) or 0
        )
    for name in ("initial_backoff", "max_backoff"):
        if name in keys:
            duration = _duration(keys[name], out)
            if duration is not None:
                getattr(target, name).CopyFrom(duration)
    if "backoff_multiplier" in keys:
        multiplier = keys["backoff_multiplier"]
        target.backoff_multiplier = as_number(multiplier.value, multiplier.path, out) or 0.0
    if "jitter" in keys:
        jitter = as_number(keys["jitter"].value, keys["jitter"].path, out)
        if jitter is not None:
            target.jitter = jitter
    if "retryable_codes" in keys:
        codes = keys["retryable_codes"]
        for j, code in enumerate(_list(codes, out)):
            text = as_string(code, f"{codes.path}[{j}]", out)
            if text is not None:
                target.retryable_codes.append(text)


def _step(
    path: str, data: Any, target: orchestrator_pb2.WorkflowStep, out: list[FieldViolation]
) -> None:
    if not isinstance(data, Mapping):
        out.append(FieldViolation(path, f"must be an object, got {kind(data)}"))
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
                    FieldViolation(f"{deps.path}[{j}]", f"must be a step name, got {kind(dep)}")
                )
    if "required" in keys:
        required = as_bool(keys["required"].value, keys["required"].path, out)
        if required is not None:
            target.required = required
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
                    comp.path, f"must be an object or an operation name, got {kind(comp.value)}"
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
        raise_if([FieldViolation(field, f"must be an object, got {kind(data)}")])
    keys = _keys(data, field, _WORKFLOW_KEYS, out)
    workflow.name = _text(keys.get("name"), out)
    workflow.description = _text(keys.get("description"), out)
    if "version" in keys:
        version = keys["version"]
        workflow.version = (
            as_whole_number(version.value, version.path, out, low=0, high=2**63 - 1) or 0
        )
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
        documents = parse_documents(
            read_text(name), "JSON" if suffix == ".json" else "YAML", several=True
        )
    except SyntaxProblem as exc:
        raise _file_error(name, exc.detail) from exc
    except FileProblem as exc:
        raise _file_error(name, str(exc)) from exc
    found: list[Any] = []
    out: list[FieldViolation] = []
    for d, document in enumerate(documents):
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
            listed = document["workflows"]
            if isinstance(listed, list):
                found.extend(listed)
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
