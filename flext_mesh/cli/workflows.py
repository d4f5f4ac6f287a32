"""``flext-mesh workflow`` and ``flext-mesh execution``: the orchestrator from a shell.

``workflow apply|list|show|delete|run`` manage definitions and start executions;
``execution show|list|cancel|watch`` inspect and steer them. Like the other nouns,
each command asks OrchestratorService over the channel it is given and returns the text
to print; the caller (:func:`flext_mesh.cli.main`) owns the channel and turns a failed
RPC into one line on stderr. Two things differ: ``--watch`` and ``execution watch``
print each event as it happens (and exit 1 unless the execution SUCCEEDED), and
``workflow apply`` lists every field violation of a rejected definition, one per line.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import duration_pb2, struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from flext_mesh.cli.common import (
    PROG,
    add_noun,
    emit,
    every_page,
    expected_error,
    fail,
    fail_with,
    non_negative_int,
    note,
    positive_int,
    violations_block,
)
from flext_mesh.cli.output import (
    DOCUMENT_FORMATS,
    EMPTY,
    enum_label,
    enum_text,
    format_date_time,
    one_line,
    render_messages,
    render_stream_item,
    render_table,
)
from flext_mesh.errors import InvalidArgument
from flext_mesh.v1 import common_pb2, orchestrator_pb2, orchestrator_pb2_grpc

__all__ = [
    "ENDED_STATES",
    "EXECUTION_HEADERS",
    "EXECUTION_WIDE_HEADERS",
    "STEP_HEADERS",
    "STEP_WIDE_HEADERS",
    "WORKFLOW_HEADERS",
    "WORKFLOW_STEP_HEADERS",
    "WORKFLOW_WIDE_HEADERS",
    "add_commands",
    "apply",
    "cancel_execution",
    "delete_workflow",
    "describe_workflow",
    "human_duration",
    "list_executions",
    "list_workflows",
    "parse_state",
    "retry_execution",
    "run_workflow",
    "show_execution",
    "show_workflow",
    "watch_execution",
]

Xs = orchestrator_pb2.ExecutionState
Ev = orchestrator_pb2.ExecutionEventType
Ss = orchestrator_pb2.StepState

#: States an execution does not leave.
ENDED_STATES = frozenset(
    {
        Xs.EXECUTION_STATE_SUCCEEDED,
        Xs.EXECUTION_STATE_FAILED,
        Xs.EXECUTION_STATE_COMPENSATED,
        Xs.EXECUTION_STATE_COMPENSATION_FAILED,
        Xs.EXECUTION_STATE_CANCELLED,
    }
)
#: Columns of ``workflow list``.
WORKFLOW_HEADERS = ("NAME", "VERSION", "STEPS", "UPDATED")
#: Columns ``workflow list -o wide`` adds.
WORKFLOW_WIDE_HEADERS = (*WORKFLOW_HEADERS, "CREATED", "TIMEOUT", "DESCRIPTION")
#: Columns of the step table of ``workflow show``.
WORKFLOW_STEP_HEADERS = (
    "STEP",
    "CALLS",
    "DEPENDS_ON",
    "REQUIRED",
    "TIMEOUT",
    "RETRY",
    "COMPENSATION",
)
#: Columns of ``execution list``.
EXECUTION_HEADERS = ("ID", "WORKFLOW", "STATE", "STARTED", "DURATION")
#: Columns ``execution list -o wide`` adds: when it ended, the attempts of all its steps
#: (compensations included), the step that failed it, its correlation id and its owner.
EXECUTION_WIDE_HEADERS = (
    *EXECUTION_HEADERS,
    "ENDED",
    "ATTEMPTS",
    "FAILED_STEP",
    "CORRELATION",
    "OWNER",
)
#: Columns of the step table of ``execution show``.
STEP_HEADERS = ("STEP", "STATE", "ATTEMPTS", "DURATION", "INSTANCE", "ERROR")
#: Columns ``execution show -o wide`` adds to the step table.
STEP_WIDE_HEADERS = (*STEP_HEADERS, "STARTED", "ENDED", "IDEMPOTENCY_KEY", "NOTES")

_EXECUTION_SUBJECT = "(execution)"  # step names cannot hold parentheses
# Reconnections of a watch whose stream broke with UNAVAILABLE (a control-plane
# restart): each try waits this long at most for the channel to be ready again.
_RECONNECT_WAITS = (0.5, 1.0, 2.0, 4.0, 8.0, 8.0)


def add_commands(
    nouns: argparse._SubParsersAction[Any],
    parents: Sequence[argparse.ArgumentParser],
) -> None:
    """Add the ``workflow`` and ``execution`` nouns; ``parents`` carry the connection flags."""
    _add_workflow_commands(nouns, parents)
    _add_execution_commands(nouns, parents)


def _add_workflow_commands(
    nouns: argparse._SubParsersAction[Any], parents: Sequence[argparse.ArgumentParser]
) -> None:
    verbs = add_noun(
        nouns,
        "workflow",
        aliases=["workflows"],
        help="apply, list, show, delete and run workflow definitions",
        description="Manage the workflow definitions of a running control plane.",
        parents=parents,
    )

    apply_p = verbs.add(
        "apply",
        apply,
        help="create or update workflows from YAML or JSON files",
        description=(
            "Create or update the workflows of YAML (several documents allowed) or JSON "
            "files. Every file is read first: nothing is applied when one cannot be. "
            "Prints each workflow's version and whether it changed."
        ),
    )
    apply_p.add_argument("files", metavar="FILE", nargs="+", help=".yaml, .yml or .json file")

    verbs.add(
        "list",
        list_workflows,
        help="one row per workflow (latest versions)",
        description="One row per workflow definition, latest versions, sorted by name.",
    )

    show_p = verbs.add(
        "show",
        show_workflow,
        help="a workflow's steps with their effective settings",
        description=(
            "A workflow's steps with their effective settings (defaults applied); "
            "-o json prints the definition as stored."
        ),
    )
    show_p.add_argument("name", metavar="NAME", help="workflow name")
    show_p.add_argument(
        "--version",
        metavar="N",
        type=positive_int,
        default=0,
        help="this version (default: the latest)",
    )

    delete_p = verbs.add(
        "delete",
        delete_workflow,
        help="delete a workflow (running executions finish)",
        description="Delete a workflow; executions already started finish on their version.",
    )
    delete_p.add_argument("name", metavar="NAME", help="workflow name")

    run_p = verbs.add(
        "run",
        run_workflow,
        help="start an execution, optionally following it live",
        description=(
            "Start an execution of a stored workflow and print its id. With --watch, "
            "print each event as it happens and exit 0 only if the execution SUCCEEDED. "
            "-o json prints the StartExecutionResponse (with --watch: one JSON object "
            "per line, then every WatchExecutionResponse)."
        ),
    )
    run_p.add_argument("name", metavar="NAME", help="workflow name")
    run_p.add_argument(
        "--version",
        metavar="N",
        type=positive_int,
        default=0,
        help="this version (default: the latest)",
    )
    given = run_p.add_mutually_exclusive_group()
    given.add_argument(
        "--input",
        metavar="JSON",
        type=_input_json,
        help="execution input, a JSON object (default: {})",
    )
    given.add_argument(
        "--input-file",
        metavar="FILE",
        type=_input_file,
        dest="input",
        help="execution input from a JSON or YAML file holding an object",
    )
    run_p.add_argument(
        "--idempotency-key",
        metavar="K",
        default="",
        help="a second run with the same key returns the first execution",
    )
    run_p.add_argument("--watch", action="store_true", help="follow the execution until it ends")


def _add_execution_commands(
    nouns: argparse._SubParsersAction[Any], parents: Sequence[argparse.ArgumentParser]
) -> None:
    verbs = add_noun(
        nouns,
        "execution",
        aliases=["executions"],
        help="show, list, cancel, retry and watch workflow executions",
        description="Inspect and steer the workflow executions of a running control plane.",
        parents=parents,
    )

    show_p = verbs.add(
        "show",
        show_execution,
        help="an execution's state and its steps",
        description=(
            "An execution's state, times, error and steps. -o json prints the "
            "GetExecutionResponse (events empty unless --events)."
        ),
    )
    show_p.add_argument("id", metavar="ID", help="execution id")
    show_p.add_argument("--events", action="store_true", help="also print the event history")

    list_p = verbs.add(
        "list",
        list_executions,
        help="executions, newest first",
        description="Executions, newest first, optionally of one workflow or in one state.",
    )
    list_p.add_argument(
        "--workflow", metavar="NAME", default="", help="only this workflow's (default: all)"
    )
    list_p.add_argument(
        "--state",
        metavar="STATE",
        type=parse_state,
        default=Xs.EXECUTION_STATE_UNSPECIFIED,
        help=f"only executions in this state: {', '.join(_STATE_NAMES)} (default: any)",
    )
    list_p.add_argument(
        "--limit",
        metavar="N",
        type=non_negative_int,
        default=50,
        help="at most N executions, 0 for all",
    )

    cancel_p = verbs.add(
        "cancel",
        cancel_execution,
        help="cancel an execution (completed steps are compensated)",
        description=(
            "Cancel an execution: running steps are stopped and completed ones "
            "compensated. Prints the state the control plane reports afterwards."
        ),
    )
    cancel_p.add_argument("id", metavar="ID", help="execution id")
    cancel_p.add_argument("--reason", metavar="TEXT", default="", help="recorded in the history")

    retry_p = verbs.add(
        "retry",
        retry_execution,
        help="run an ended execution again from its first unfinished step",
        description=(
            "Run an ended execution (FAILED, CANCELLED, COMPENSATION_FAILED, COMPENSATED) "
            "again as a new execution, once the cause of its failure is fixed. The new "
            "one runs the same workflow version with the same input; the steps that "
            "succeeded and were not compensated are carried over (not run again), the "
            "others run under new idempotency keys (a COMPENSATED execution runs from the "
            "start). Prints the new execution's id; with --watch, follows it and exits 0 "
            "only if it SUCCEEDED. An execution is retried once (retry the retry after)."
        ),
    )
    retry_p.add_argument("id", metavar="ID", help="the ended execution's id")
    retry_p.add_argument("--watch", action="store_true", help="follow the new execution")

    watch_p = verbs.add(
        "watch",
        watch_execution,
        help="follow an execution live until it ends",
        description=(
            "Print an execution's events from the start, then live until it ends; exit 0 "
            "only if it SUCCEEDED. -o json prints one WatchExecutionResponse per line."
        ),
    )
    watch_p.add_argument("id", metavar="ID", help="execution id")


# -- workflow ------------------------------------------------------------------------------


def apply(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``workflow apply``: read every file, then PutWorkflow each workflow in file order.

    A file that cannot be read or converted stops everything before any call; a
    definition the control plane rejects is reported with all its violations, the
    others are still applied, and the command exits 1.
    """
    # Imported here: the orchestrator package is heavy and only apply needs it.
    from flext_mesh.orchestrator.formats import load_workflow_file  # noqa: PLC0415

    loaded: list[tuple[str, orchestrator_pb2.Workflow]] = []
    problems: list[str] = []
    for name in args.files:
        try:
            loaded.extend((name, workflow) for workflow in load_workflow_file(name))
        except InvalidArgument as exc:
            problems.append(violations_block(f"{name} is not a valid workflow file", exc))
    if problems:
        fail_with("".join(problems))

    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    applied: list[orchestrator_pb2.PutWorkflowResponse] = []
    for name, workflow in loaded:
        try:
            applied.append(
                stub.PutWorkflow(
                    orchestrator_pb2.PutWorkflowRequest(workflow=workflow), timeout=args.timeout
                )
            )
        except grpc.RpcError as exc:
            error = expected_error(exc, InvalidArgument)
            label = f"workflow {workflow.name!r} ({name})" if workflow.name else name
            problems.append(violations_block(f"{label} is not valid", error))
    if args.output in DOCUMENT_FORMATS:
        text = render_messages(applied, args.output)
    else:
        text = "".join(
            f"{r.workflow.name}: version {r.workflow.version} "
            f"({'changed' if r.changed else 'unchanged'})\n"
            for r in applied
        )
    if problems:
        emit(text)
        fail_with("".join(problems))
    return text


def list_workflows(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``workflow list``: every page of ListWorkflows, as a table or a JSON array."""
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    workflows: list[orchestrator_pb2.Workflow] = every_page(
        lambda token, size: stub.ListWorkflows(
            orchestrator_pb2.ListWorkflowsRequest(page_size=size, page_token=token),
            timeout=args.timeout,
        ),
        lambda page: page.workflows,
    )
    if args.output in DOCUMENT_FORMATS:
        return render_messages(workflows, args.output)
    if args.output == "wide":
        return render_table(
            WORKFLOW_WIDE_HEADERS,
            (
                (
                    w.name,
                    w.version,
                    len(w.steps),
                    format_date_time(w.update_time),
                    format_date_time(w.create_time),
                    human_duration(_seconds(w.timeout)) if w.HasField("timeout") else "none",
                    one_line(w.description),
                )
                for w in workflows
            ),
        )
    return render_table(
        WORKFLOW_HEADERS,
        ((w.name, w.version, len(w.steps), format_date_time(w.update_time)) for w in workflows),
    )


def show_workflow(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``workflow show``: the definition, with every default spelled out."""
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    workflow = stub.GetWorkflow(
        orchestrator_pb2.GetWorkflowRequest(name=args.name, version=args.version),
        timeout=args.timeout,
    ).workflow
    if args.output in DOCUMENT_FORMATS:
        return render_messages(workflow, args.output)
    return describe_workflow(workflow)


def describe_workflow(workflow: orchestrator_pb2.Workflow) -> str:
    """A workflow for people: a header, one table row per step, then the input templates."""
    from flext_mesh.orchestrator.spec import validate_workflow  # noqa: PLC0415

    lines = [f"workflow {workflow.name}, version {workflow.version}"]
    try:
        # The spec carries the defaults the orchestrator applies.
        spec = validate_workflow(workflow)
    except InvalidArgument as exc:  # stored under older rules than this CLI's
        lines.append(f"note: the definition does not validate here ({one_line(exc.message)})")
        return "\n".join(lines) + "\n" + render_messages(workflow)
    if workflow.description:
        lines.append(f"description: {workflow.description}")
    timeout = human_duration(spec.timeout) if spec.timeout is not None else "none"
    lines.append(f"timeout: {timeout}")
    created, updated = workflow.create_time, workflow.update_time
    lines.append(f"created: {format_date_time(created)}   updated: {format_date_time(updated)}")
    rows = []
    templates = []
    for step in spec.steps:
        retry = step.retry
        compensation = "-"
        if step.compensation is not None:
            comp = step.compensation
            compensation = (
                f"{comp.service}.{comp.operation} "
                f"(timeout {human_duration(comp.timeout)}, {comp.retry.max_attempts} attempts)"
            )
            if comp.input is not None:
                templates.append(f"compensation input of {step.name}: {_compact(comp.input)}")
        if step.input is not None:
            templates.append(f"input of {step.name}: {_compact(step.input)}")
        rows.append(
            (
                step.name,
                f"{step.service}.{step.operation}",
                ",".join(step.depends_on),
                "yes" if step.required else "no",
                human_duration(step.timeout),
                f"{retry.max_attempts} attempts, backoff {human_duration(retry.initial_backoff)}"
                f" x{retry.multiplier:g} up to {human_duration(retry.max_backoff)}",
                compensation,
            )
        )
    lines.append("")
    lines.append(render_table(WORKFLOW_STEP_HEADERS, rows).rstrip("\n"))
    if templates:
        lines.append("")
        lines.extend(templates)
    return "\n".join(lines) + "\n"


def delete_workflow(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``workflow delete``: DeleteWorkflow; running executions finish on their copy."""
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    response = stub.DeleteWorkflow(
        orchestrator_pb2.DeleteWorkflowRequest(name=args.name), timeout=args.timeout
    )
    if args.output in DOCUMENT_FORMATS:
        return render_messages(response, args.output)
    return f"workflow {args.name!r} deleted\n"


def run_workflow(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``workflow run``: StartExecution; with ``--watch``, follow it to its end."""
    request = orchestrator_pb2.StartExecutionRequest(
        workflow_name=args.name,
        workflow_version=args.version,
        idempotency_key=args.idempotency_key,
    )
    if args.input is not None:
        request.input.CopyFrom(args.input)
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    response = stub.StartExecution(request, timeout=args.timeout)
    execution = response.execution
    how = "exists for this idempotency key" if response.existing else "started"
    return _follow_new(
        channel,
        args,
        response,
        f"execution {execution.execution_id} of {_workflow_label(execution)} {how}\n",
    )


def _follow_new(
    channel: grpc.Channel, args: argparse.Namespace, response: Any, headline: str
) -> str:
    """What ``workflow run`` and ``execution retry`` print of the execution they made
    (``response.execution``): its id or the response, or with ``--watch`` ``headline``
    (or the response) and then its events until it ends."""
    execution = response.execution
    if not args.watch:
        if args.output in DOCUMENT_FORMATS:
            return render_messages(response, args.output)
        return f"{execution.execution_id}\n"
    emit(render_stream_item(response, args.output) if args.output in DOCUMENT_FORMATS else headline)
    _watch_to_end(channel, args, execution)
    return ""


# -- execution -----------------------------------------------------------------------------


def show_execution(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``execution show``: state, times, error and steps; the history with ``--events``."""
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    response = stub.GetExecution(
        orchestrator_pb2.GetExecutionRequest(execution_id=args.id, include_events=args.events),
        timeout=args.timeout,
    )
    if args.output in DOCUMENT_FORMATS:
        return render_messages(response, args.output)
    execution = response.execution
    lines = [
        f"execution {execution.execution_id}",
        f"workflow:     {_workflow_label(execution)}",
        f"state:        {_state(execution.state)}",
        f"created:      {format_date_time(execution.create_time, millis=True)}",
        f"started:      {format_date_time(execution.start_time, millis=True)}",
        f"ended:        {format_date_time(execution.end_time, millis=True)}",
        f"duration:     {_duration_of(execution)}",
    ]
    if execution.HasField("error"):
        failed = f" (step {execution.failed_step})" if execution.failed_step else ""
        lines.append(f"error:        {_error_text(execution.error)}{failed}")
    if execution.retry_of:
        lines.append(f"retry of:     {execution.retry_of}")
    if execution.retried_by:
        lines.append(f"retried by:   {execution.retried_by}")
    lines.append(f"correlation:  {execution.correlation_id}")
    if execution.idempotency_key:
        lines.append(f"idempotency:  {execution.idempotency_key}")
    if args.output == "wide":
        lines.append(f"owner:        {execution.owner or EMPTY}")
        lines.append(f"events:       {execution.event_count}")
        if execution.traceparent:
            lines.append(f"traceparent:  {execution.traceparent}")
        steps = render_table(STEP_WIDE_HEADERS, (_step_wide_row(s) for s in execution.steps))
    else:
        steps = render_table(STEP_HEADERS, (_step_row(s) for s in execution.steps))
    lines.append("")
    lines.append(steps.rstrip())
    if args.events:
        lines.append("")
        lines.append("events:")
        lines.extend(_event_lines(execution, response.events))
    return "\n".join(lines) + "\n"


def list_executions(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``execution list``: pages of ListExecutions (newest first) up to ``--limit``."""
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    found: list[orchestrator_pb2.Execution] = every_page(
        lambda token, size: stub.ListExecutions(
            orchestrator_pb2.ListExecutionsRequest(
                workflow_name=args.workflow,
                state=args.state,
                page_size=size,
                page_token=token,
            ),
            timeout=args.timeout,
        ),
        lambda page: page.executions,
        limit=args.limit,
    )
    if args.output in DOCUMENT_FORMATS:
        return render_messages(found, args.output)
    rows: list[list[object]] = [
        [
            e.execution_id,
            _workflow_label(e),
            _state(e.state),
            format_date_time(e.start_time),
            _duration_of(e),
        ]
        for e in found
    ]
    if args.output != "wide":
        return render_table(EXECUTION_HEADERS, rows)
    for row, e in zip(rows, found, strict=True):
        row += [
            format_date_time(e.end_time),
            sum(s.attempts + s.compensation_attempts for s in e.steps),
            e.failed_step,
            e.correlation_id,
            e.owner,
        ]
    return render_table(EXECUTION_WIDE_HEADERS, rows)


def cancel_execution(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``execution cancel``: CancelExecution; prints the state reported afterwards."""
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    response = stub.CancelExecution(
        orchestrator_pb2.CancelExecutionRequest(execution_id=args.id, reason=args.reason),
        timeout=args.timeout,
    )
    if args.output in DOCUMENT_FORMATS:
        return render_messages(response, args.output)
    return f"execution {response.execution.execution_id}: {_state(response.execution.state)}\n"


def retry_execution(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``execution retry``: RetryExecution; with ``--watch``, follow the new one."""
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    response = stub.RetryExecution(
        orchestrator_pb2.RetryExecutionRequest(execution_id=args.id), timeout=args.timeout
    )
    execution = response.execution
    carried = [s.step_name for s in execution.steps if s.state == Ss.STEP_STATE_SUCCEEDED]
    over = f"; carried over: {', '.join(carried)}" if carried else ""
    return _follow_new(
        channel,
        args,
        response,
        f"execution {execution.execution_id} of {_workflow_label(execution)} started: "
        f"retry of {execution.retry_of}{over}\n",
    )


def watch_execution(channel: grpc.Channel, args: argparse.Namespace) -> str:
    """``execution watch``: the history, then live events until the execution ends."""
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    execution = stub.GetExecution(
        orchestrator_pb2.GetExecutionRequest(execution_id=args.id), timeout=args.timeout
    ).execution
    if args.output not in DOCUMENT_FORMATS:
        emit(f"execution {execution.execution_id} of {_workflow_label(execution)}\n")
    _watch_to_end(channel, args, execution)
    return ""


# -- the live view -------------------------------------------------------------------------


class _Progress:
    """Turns events into lines, remembering when each step (and compensation) started."""

    def __init__(self, execution: orchestrator_pb2.Execution) -> None:
        names = [s.step_name for s in execution.steps]
        self.width = max([len(_EXECUTION_SUBJECT), *(len(n) for n in names)])
        self.started: dict[str, int] = {}
        self.compensating: dict[str, int] = {}

    def line(self, event: orchestrator_pb2.ExecutionEvent) -> str:
        """The line of one event: ``  HH:MM:SS.mmm  SUBJECT  WHAT``."""
        when = event.time.ToNanoseconds()
        if event.type == Ev.EXECUTION_EVENT_TYPE_STEP_STARTED:
            self.started.setdefault(event.step_name, when)
        elif event.type == Ev.EXECUTION_EVENT_TYPE_COMPENSATION_STARTED:
            self.compensating.setdefault(event.step_name, when)
        subject = event.step_name if _is_step_event(event) else _EXECUTION_SUBJECT
        return f"  {_clock(event.time)}  {subject.ljust(self.width)}  {self._what(event, when)}"

    def _since(self, starts: dict[str, int], step: str, when: int) -> str:
        start = starts.get(step)
        return "" if start is None else f" {human_duration((when - start) / 1e9)}"

    def _what(self, event: orchestrator_pb2.ExecutionEvent, when: int) -> str:
        kind = event.type
        step = event.step_name
        on = f" on {event.instance_id}" if event.instance_id else ""
        note = f": {one_line(event.message)}" if event.message else ""
        error = _error_text(event.error) if event.HasField("error") else ""
        if kind == Ev.EXECUTION_EVENT_TYPE_STEP_STARTED:
            twice = " [at-least-once]" if event.at_least_once else ""
            return f"STARTED (attempt {event.attempt}){on}{twice}{note}"
        if kind == Ev.EXECUTION_EVENT_TYPE_STEP_CARRIED_OVER:
            return f"CARRIED_OVER from execution {event.related_execution_id}{on} (not run again)"
        if kind == Ev.EXECUTION_EVENT_TYPE_EXECUTION_RETRIED:
            return f"RETRIED as execution {event.related_execution_id}"
        if kind == Ev.EXECUTION_EVENT_TYPE_STEP_OUTCOME_RESOLVED:
            return f"OUTCOME_RESOLVED {_step_state(event.step_state)}{note}"
        if kind == Ev.EXECUTION_EVENT_TYPE_STEP_RETRYING:
            backoff = human_duration(_seconds(event.backoff))
            served = f" on {event.instance_id}" if event.instance_id else ""
            return f"RETRYING after {backoff}: {error} (attempt {event.attempt}{served})"
        if kind == Ev.EXECUTION_EVENT_TYPE_STEP_SUCCEEDED:
            return f"SUCCEEDED{self._since(self.started, step, when)}{on}"
        if kind == Ev.EXECUTION_EVENT_TYPE_STEP_FAILED:
            return f"FAILED{self._since(self.started, step, when)}{on}: {error}{note}"
        if kind == Ev.EXECUTION_EVENT_TYPE_COMPENSATION_STARTED:
            after = f" after {error}" if error else ""
            return f"COMPENSATION_STARTED {event.message} (attempt {event.attempt}){after}"
        if kind == Ev.EXECUTION_EVENT_TYPE_COMPENSATION_SUCCEEDED:
            return f"COMPENSATION_SUCCEEDED{self._since(self.compensating, step, when)}{on}"
        if kind == Ev.EXECUTION_EVENT_TYPE_COMPENSATION_FAILED:
            return f"COMPENSATION_FAILED{on}: {error}{note}"
        if kind == Ev.EXECUTION_EVENT_TYPE_EXECUTION_ENDED:
            failed_step = event.failed_step or step  # histories from before failed_step
            failed = f" (step {failed_step})" if failed_step else ""
            state = _state(event.execution_state)
            if event.HasField("error"):
                error = _error_text(event.error, after_state=state)
            cause = f": {error}{failed}" if error else ""
            return f"ENDED {state}{cause}"
        name = enum_text(Ev.DESCRIPTOR, kind).removeprefix("EXECUTION_")
        if kind == Ev.EXECUTION_EVENT_TYPE_STEP_CANCELLED:
            name = "CANCELLED"
        elif kind == Ev.EXECUTION_EVENT_TYPE_STEP_SKIPPED:
            name = "SKIPPED"
        return f"{name}{note}"


def _event_lines(
    execution: orchestrator_pb2.Execution, events: Iterable[orchestrator_pb2.ExecutionEvent]
) -> list[str]:
    progress = _Progress(execution)
    return [progress.line(event) for event in events]


def _is_step_event(event: orchestrator_pb2.ExecutionEvent) -> bool:
    return bool(event.step_name) and event.type != Ev.EXECUTION_EVENT_TYPE_EXECUTION_ENDED


def _summary(execution: orchestrator_pb2.Execution) -> str:
    text = f"execution {execution.execution_id}: {_state(execution.state)}"
    if execution.HasField("duration"):
        text += f" in {human_duration(_seconds(execution.duration))}"
    if execution.HasField("error") and execution.state != Xs.EXECUTION_STATE_SUCCEEDED:
        failed = f"step {execution.failed_step}: " if execution.failed_step else ""
        text += f" ({failed}{_error_text(execution.error, after_state=_state(execution.state))})"
    return text + "\n"


def _watch_to_end(
    channel: grpc.Channel, args: argparse.Namespace, execution: orchestrator_pb2.Execution
) -> None:
    """Print events until the execution ends; exit 1 unless it SUCCEEDED."""
    progress = _Progress(execution)

    def show(message: orchestrator_pb2.WatchExecutionResponse) -> None:
        if args.output in DOCUMENT_FORMATS:
            emit(render_stream_item(message, args.output))
        elif message.HasField("event"):
            emit(progress.line(message.event) + "\n")

    try:
        ended = _follow(channel, execution.execution_id, show, args.control_plane)
    except KeyboardInterrupt:
        note(_resume_hint(execution.execution_id))
        raise
    if args.output not in DOCUMENT_FORMATS:
        emit(_summary(ended))
    if ended.state != Xs.EXECUTION_STATE_SUCCEEDED:
        raise SystemExit(1)


def _follow(
    channel: grpc.Channel,
    execution_id: str,
    show: Callable[[orchestrator_pb2.WatchExecutionResponse], None],
    address: str,
) -> orchestrator_pb2.Execution:
    """Stream WatchExecution to ``show`` until the end; returns the ended execution.

    When the stream breaks with UNAVAILABLE (the control plane restarts, or this
    watcher fell behind), it waits for the channel and watches again after the last
    event shown, a few times, so no event is lost or shown twice.
    """
    stub = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    last = 0
    tries = 0
    while True:
        broken: grpc.RpcError | None = None
        try:
            # No deadline: an execution may run for days; the stream ends with it.
            for message in stub.WatchExecution(
                orchestrator_pb2.WatchExecutionRequest(execution_id=execution_id, after_index=last)
            ):
                if tries:
                    note(f"watching again after event {last}")
                    tries = 0
                if message.event.index > last or not message.HasField("event"):
                    last = max(last, message.event.index)
                    show(message)
                if message.HasField("execution"):
                    return message.execution
            lost = "the stream ended before the execution did"
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNAVAILABLE:
                raise
            broken, lost = exc, one_line(exc.details() or "UNAVAILABLE")
        if tries == len(_RECONNECT_WAITS):
            note(_resume_hint(execution_id))
            if broken is not None:
                raise broken  # the usual "cannot reach the control plane" line
            fail(f"lost the watch of execution {execution_id}: {lost}")
        if tries == 0:
            note(f"watch interrupted after event {last} ({lost}); reconnecting to {address}")
        else:
            note(f"reconnecting to {address} (try {tries + 1} of {len(_RECONNECT_WAITS)}): {lost}")
        ready = grpc.channel_ready_future(channel)
        try:
            ready.result(timeout=_RECONNECT_WAITS[tries])
        except grpc.FutureTimeoutError:
            pass
        finally:
            ready.cancel()
        tries += 1


def _resume_hint(execution_id: str) -> str:
    return (
        f"execution {execution_id} goes on; follow it with: {PROG} execution watch {execution_id}"
    )


# -- formatting ----------------------------------------------------------------------------


def human_duration(seconds: float) -> str:
    """``12.3 ms`` below one second, else ``1.5 s`` (one decimal, ``.0`` dropped)."""
    if seconds < 1:
        return f"{seconds * 1000:.1f}".removesuffix(".0") + " ms"
    return f"{seconds:.1f}".removesuffix(".0") + " s"


def _seconds(duration: duration_pb2.Duration) -> float:
    return duration.ToNanoseconds() / 1e9


def _duration_of(execution: orchestrator_pb2.Execution) -> str:
    if not execution.HasField("duration"):
        return EMPTY
    return human_duration(_seconds(execution.duration))


def _clock(timestamp: Timestamp) -> str:
    """Local ``HH:MM:SS.mmm``."""
    local = timestamp.ToDatetime(tzinfo=UTC).astimezone()
    return local.strftime("%H:%M:%S.") + f"{local.microsecond // 1000:03d}"


def _state(state: int) -> str:
    return enum_text(Xs.DESCRIPTOR, state)


def _step_state(state: int) -> str:
    return enum_text(orchestrator_pb2.StepState.DESCRIPTOR, state)


def _workflow_label(execution: orchestrator_pb2.Execution) -> str:
    return f"{execution.workflow_name or '(inline)'}@{execution.workflow_version}"


def _error_text(error: common_pb2.ErrorInfo, *, after_state: str = "") -> str:
    """``FAILED_PRECONDITION card declined``; a cancellation's message is its reason:
    ``CANCELLED: customer called``. ``after_state``: the state printed just before,
    whose name the code is not repeated after (``ENDED CANCELLED: customer called``)."""
    message = one_line(error.message)
    if error.code_name == after_state and message:
        return message
    separator = ": " if error.code_name == "CANCELLED" else " "
    return separator.join(part for part in (error.code_name, message) if part)


def _step_row(step: orchestrator_pb2.StepExecution) -> tuple[str, ...]:
    errors = []
    if step.HasField("error"):
        errors.append(_error_text(step.error))
    if step.HasField("compensation_error"):
        errors.append(f"compensation: {_error_text(step.compensation_error)}")
    attempts = str(step.attempts)
    if step.compensation_attempts:
        attempts += f" (+{step.compensation_attempts} comp.)"
    return (
        step.step_name,
        enum_text(orchestrator_pb2.StepState.DESCRIPTOR, step.state),
        attempts,
        human_duration(_seconds(step.duration)) if step.HasField("duration") else EMPTY,
        step.instance_id,
        "; ".join(errors),
    )


def _step_wide_row(step: orchestrator_pb2.StepExecution) -> tuple[str, ...]:
    notes = []
    if step.outcome_unknown:
        notes.append("outcome unknown")
    if step.at_least_once:
        notes.append("at-least-once")
    return (
        *_step_row(step),
        format_date_time(step.start_time, millis=True),
        format_date_time(step.end_time, millis=True),
        step.idempotency_key,
        ", ".join(notes),
    )


def _compact(data: Any) -> str:
    return json.dumps(data, separators=(", ", ": "), ensure_ascii=False)


# -- argument types ------------------------------------------------------------------------

_STATE_NAMES = tuple(
    enum_label(name, "EXECUTION_STATE_").lower()
    for name, value in Xs.items()
    if value != Xs.EXECUTION_STATE_UNSPECIFIED
)


def parse_state(value: str) -> orchestrator_pb2.ExecutionState.ValueType:
    """``running``, ``RUNNING`` or ``EXECUTION_STATE_RUNNING`` as the enum (argparse type)."""
    name = value.strip().upper().replace("-", "_")
    if not name.startswith("EXECUTION_STATE_"):
        name = "EXECUTION_STATE_" + name
    if name == "EXECUTION_STATE_UNSPECIFIED" or name not in Xs.keys():  # noqa: SIM118
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an execution state (one of {', '.join(_STATE_NAMES)})"
        )
    return Xs.Value(name)


def _input_struct(data: Any, origin: str) -> struct_pb2.Struct:
    if not isinstance(data, dict):
        raise argparse.ArgumentTypeError(f"{origin} must hold a JSON object, not {data!r:.40}")
    struct = struct_pb2.Struct()
    try:
        struct.update(data)
    except (ValueError, TypeError) as exc:
        raise argparse.ArgumentTypeError(f"{origin} is not JSON data: {exc}") from exc
    return struct


def _input_json(value: str) -> struct_pb2.Struct:
    try:
        data = json.loads(value)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    return _input_struct(data, "the input")


def _input_file(value: str) -> struct_pb2.Struct:
    path = Path(value)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise argparse.ArgumentTypeError(f"cannot read {value}: {exc}") from exc
    import yaml  # noqa: PLC0415 - only YAML input files need it

    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise argparse.ArgumentTypeError(f"{value}: {one_line(str(exc))}") from exc
    return _input_struct(data, value)
