"""Workflow definitions: every stored version, the latest ones, their validated specs.

PutWorkflow stores a new version (numbered from 1 per name) only when the definition
changed. Every replica keeps the latest definition of each workflow in memory, fed by a
store listener, so a PutWorkflow on one replica is seen by all; validated specs are
cached per (name, version), which never change. An execution runs on its own copy of
the definition: deleting or changing a workflow does not touch executions started.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable

from flext_mesh.errors import FieldViolation, InvalidArgument, NotFound
from flext_mesh.names import check_length, check_name, elide, raise_if
from flext_mesh.orchestrator.records import (
    VERSIONS,
    WORKFLOWS,
    checked_page_size,
    timestamp_now,
)
from flext_mesh.orchestrator.spec import WorkflowSpec, validate_workflow
from flext_mesh.paging import decode_page_token, encode_page_token
from flext_mesh.store import Compare, Event, EventType, KeyValue, Put, Store, follow
from flext_mesh.v1 import orchestrator_pb2

__all__ = ["MAX_WORKFLOW_NAME", "Catalog", "check_workflow_name", "validated"]

_log = logging.getLogger("flext_mesh.orchestrator")

#: Longest workflow name: its metrics series is ``workflow/NAME`` and must fit 63.
MAX_WORKFLOW_NAME = 54
#: The query of ListWorkflows' page tokens (it has no filter).
_LIST_WORKFLOWS = ("ListWorkflows",)


class Catalog:
    """The workflow definitions: stored, listed, and resolved for a StartExecution."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # Latest definitions, kept fresh by a store listener (every replica sees every
        # PutWorkflow); validated specs per (name, version), which never change.
        self._latest: dict[str, orchestrator_pb2.Workflow] = {}
        self._specs: OrderedDict[tuple[str, int], WorkflowSpec] = OrderedDict()
        self._unlisten: Callable[[], None] | None = None

    async def start(self) -> None:
        """Load the latest definitions and follow their changes."""

        def load(kvs: list[KeyValue]) -> None:
            for kv in kvs:
                name = kv.key.removeprefix(WORKFLOWS)
                self._latest[name] = orchestrator_pb2.Workflow.FromString(kv.value)

        _, self._unlisten = await follow(self.store, WORKFLOWS, load, self._on_workflows)

    def stop(self) -> None:
        """Stop following the definitions' changes."""
        if self._unlisten is not None:
            self._unlisten()
        self._unlisten = None

    def _on_workflows(self, events: list[Event]) -> None:
        """Store listener: keep the latest definitions (on the loop, before acks)."""
        for event in events:
            name = event.key.removeprefix(WORKFLOWS)
            if event.type == EventType.DELETE:
                self._latest.pop(name, None)
            else:
                self._latest[name] = orchestrator_pb2.Workflow.FromString(event.value)

    def spec_of(self, workflow: orchestrator_pb2.Workflow) -> WorkflowSpec:
        """The validated spec of a stored version (cached: a version never changes)."""
        key = (workflow.name, workflow.version)
        spec = self._specs.get(key)
        if spec is None:
            spec = self._specs[key] = validated(workflow)
            if len(self._specs) > 1024:
                self._specs.popitem(last=False)
        return spec

    async def put_workflow(
        self, workflow: orchestrator_pb2.Workflow
    ) -> tuple[orchestrator_pb2.Workflow, bool]:
        """Store a definition; returns it as stored and whether it changed."""
        validated(workflow)
        key = WORKFLOWS + workflow.name
        while True:
            current = await self.store.get(key)
            stored = orchestrator_pb2.Workflow.FromString(current.value) if current else None
            if stored is not None and _same_definition(stored, workflow):
                return stored, False
            last = await self.store.range(f"{VERSIONS}{workflow.name}/", reverse=True, limit=1)
            version = int(last[0].key.rsplit("/", 1)[1]) + 1 if last else 1
            now = timestamp_now()
            fresh = orchestrator_pb2.Workflow()
            fresh.CopyFrom(workflow)
            fresh.version = version
            fresh.create_time.CopyFrom(stored.create_time if stored else now)
            fresh.update_time.CopyFrom(now)
            value = fresh.SerializeToString()
            result = await self.store.txn(
                [Compare(key, current.mod_revision if current else 0)],
                [Put(key, value), Put(f"{VERSIONS}{workflow.name}/{version:012d}", value)],
            )
            if result.succeeded:
                _log.info("workflow stored name=%s version=%d", workflow.name, version)
                return fresh, True

    async def get_workflow(self, name: str, version: int = 0) -> orchestrator_pb2.Workflow:
        """The latest (or a given) version; NOT_FOUND when unknown or deleted."""
        _require_name("name", name)
        latest = self._latest.get(name)
        if latest is None:
            raise NotFound(f"workflow {elide(name)!r} does not exist")
        if version <= 0 or version == latest.version:
            return latest
        kv = await self.store.get(f"{VERSIONS}{name}/{version:012d}")
        if kv is None:
            raise NotFound(f"workflow {elide(name)!r} has no version {version}")
        return orchestrator_pb2.Workflow.FromString(kv.value)

    async def list_workflows(
        self, page_size: int, page_token: str
    ) -> tuple[list[orchestrator_pb2.Workflow], str]:
        """Definitions sorted by name, and the next page's token."""
        size = checked_page_size(page_size)
        after = decode_page_token(page_token, _LIST_WORKFLOWS)
        kvs = await self.store.range(
            WORKFLOWS, start_after=WORKFLOWS + after if after else "", limit=size + 1
        )
        more = len(kvs) > size
        workflows = [orchestrator_pb2.Workflow.FromString(kv.value) for kv in kvs[:size]]
        last = workflows[-1].name if more else ""
        return workflows, encode_page_token(last, _LIST_WORKFLOWS)

    async def delete_workflow(self, name: str) -> None:
        """Delete a definition; executions already started finish on their copy."""
        _require_name("name", name)
        if await self.store.delete(WORKFLOWS + name) is None:
            raise NotFound(f"workflow {name!r} does not exist")
        _log.info("workflow deleted name=%s", name)

    async def definition_of(
        self, request: orchestrator_pb2.StartExecutionRequest
    ) -> tuple[orchestrator_pb2.Workflow, WorkflowSpec]:
        """The definition a StartExecution runs (named or inline) and its spec."""
        which = request.WhichOneof("definition")
        if which == "inline_workflow":
            workflow = orchestrator_pb2.Workflow()
            workflow.CopyFrom(request.inline_workflow)
            workflow.ClearField("version")
            return workflow, validated(workflow, field="inline_workflow", inline=True)
        if which is None or not request.workflow_name:
            raise InvalidArgument(
                "",
                [FieldViolation("workflow_name", "give a workflow name or an inline_workflow")],
            )
        if request.workflow_version < 0:
            raise InvalidArgument(
                "", [FieldViolation("workflow_version", "must be >= 0 (0 = latest)")]
            )
        raise_if(check_workflow_name("workflow_name", request.workflow_name))
        workflow = await self.get_workflow(request.workflow_name, request.workflow_version)
        return workflow, self.spec_of(workflow)


def validated(
    workflow: orchestrator_pb2.Workflow, *, field: str = "workflow", inline: bool = False
) -> WorkflowSpec:
    """The workflow's spec; INVALID_ARGUMENT listing every violation."""
    checked = workflow
    if inline and not workflow.name:
        checked = orchestrator_pb2.Workflow()
        checked.CopyFrom(workflow)
        checked.name = "inline"
    extra: list[FieldViolation] = []
    if len(checked.name) > MAX_WORKFLOW_NAME:
        extra.append(
            FieldViolation(
                f"{field}.name",
                f"is {len(checked.name)} characters long; at most {MAX_WORKFLOW_NAME}",
            )
        )
    try:
        spec = validate_workflow(checked, field=field)
    except InvalidArgument as exc:
        if extra:
            raise InvalidArgument(exc.message, [*exc.violations, *extra]) from None
        raise
    if extra:
        raise InvalidArgument("the workflow is not valid", extra)
    return spec


def _same_definition(a: orchestrator_pb2.Workflow, b: orchestrator_pb2.Workflow) -> bool:
    def bare(w: orchestrator_pb2.Workflow) -> bytes:
        copy = orchestrator_pb2.Workflow()
        copy.CopyFrom(w)
        copy.ClearField("version")
        copy.ClearField("create_time")
        copy.ClearField("update_time")
        return copy.SerializeToString(deterministic=True)

    return bare(a) == bare(b)


def check_workflow_name(field: str, value: str, *, required: bool = True) -> list[FieldViolation]:
    """Violations of a workflow name in a request that looks one up (a longer one or
    one of other characters cannot have been stored)."""
    return check_length(field, value, MAX_WORKFLOW_NAME) or check_name(
        field, value, required=required
    )


def _require_name(name: str, value: str) -> None:
    raise_if(check_workflow_name(name, value))
