"""The orchestrator's store keyspace, and reading an execution back from it.

Store layout (every value a serialized message)::

    /orchestrator/workflows/NAME                    latest Workflow
    /orchestrator/workflow-versions/NAME/VERSION    every version ever stored
    /orchestrator/executions/ID                     Execution (steps, no events)
    /orchestrator/execution-definitions/ID          the Workflow the execution runs
    /orchestrator/events/ID/INDEX                   ExecutionEvent, INDEX from 1
    /orchestrator/active/ID                         present while it has not ended
    /orchestrator/ended/END_MS/ID                   retention index of ended ones
    /orchestrator/idempotency/SHA256(KEY)           execution id of a StartExecution key
    /orchestrator/owners/ID                         owning replica, under its lease
    /orchestrator/cancel-requests/ID                a cancel another replica received
    /orchestrator/step-results/ID/STEP              a step result whose answer was lost

Also here: execution ids, timestamps, and the conversions between a ``MeshError`` and
the ``ErrorInfo`` an event records.
"""

from __future__ import annotations

import hashlib
import secrets
import time

import grpc
from google.protobuf import timestamp_pb2

from flext_mesh.errors import FieldViolation, InvalidArgument, MeshError, error_for_code
from flext_mesh.orchestrator.history import ExecutionView
from flext_mesh.store import Store
from flext_mesh.v1 import common_pb2, orchestrator_pb2

__all__ = [
    "ACTIVE",
    "CANCELS",
    "DEFINITIONS",
    "ENDED",
    "EVENTS",
    "EXECUTIONS",
    "IDEMPOTENCY",
    "OWNERS",
    "STEP_RESULTS",
    "VERSIONS",
    "WORKFLOWS",
    "checked_page_size",
    "error_info",
    "event_key",
    "idempotency_key",
    "load_execution",
    "mesh_error",
    "new_execution_id",
    "read_events",
    "timestamp_now",
]

WORKFLOWS = "/orchestrator/workflows/"
VERSIONS = "/orchestrator/workflow-versions/"
EXECUTIONS = "/orchestrator/executions/"
DEFINITIONS = "/orchestrator/execution-definitions/"
EVENTS = "/orchestrator/events/"
ACTIVE = "/orchestrator/active/"
ENDED = "/orchestrator/ended/"
IDEMPOTENCY = "/orchestrator/idempotency/"
#: Who drives an active execution: the owner's name, under the owner's lease, so it
#: goes when the owner dies; its mod revision fences the owner's writes.
OWNERS = "/orchestrator/owners/"
#: CancelExecution received by a replica that does not drive the execution.
CANCELS = "/orchestrator/cancel-requests/"
#: Step results kept for shared idempotency (see :mod:`.step_results`).
STEP_RESULTS = "/orchestrator/step-results/"


def timestamp_now() -> timestamp_pb2.Timestamp:
    """The current time as a protobuf Timestamp."""
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(time.time_ns())
    return stamp


def error_info(error: MeshError) -> common_pb2.ErrorInfo:
    """What an event records of ``error``."""
    code = error.code
    return common_pb2.ErrorInfo(
        code=code.value[0],
        code_name=code.name,
        message=error.message[:4096],
        infrastructure=code
        in (
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            grpc.StatusCode.UNKNOWN,
        ),
    )


def mesh_error(info: common_pb2.ErrorInfo) -> MeshError:
    """The error an ErrorInfo recorded (its class from the code name)."""
    return error_for_code(info.code_name or "UNKNOWN")(info.message)


def event_key(execution_id: str, index: int) -> str:
    """The key of an execution's event number ``index``."""
    return f"{EVENTS}{execution_id}/{index:010d}"


def idempotency_key(key: str) -> str:
    """The key holding the execution id a StartExecution idempotency key started."""
    return IDEMPOTENCY + hashlib.sha256(key.encode()).hexdigest()


def new_execution_id() -> str:
    """Time-ordered (milliseconds, then random): key order is creation order."""
    return f"{time.time_ns() // 1_000_000:012x}{secrets.token_hex(5)}"


def checked_page_size(value: int) -> int:
    """A request's page size: 100 when unset, INVALID_ARGUMENT above 1000."""
    if value > 1000:
        raise InvalidArgument("", [FieldViolation("page_size", f"at most 1000, got {value}")])
    return value or 100


async def read_events(store: Store, execution_id: str) -> list[orchestrator_pb2.ExecutionEvent]:
    """Every event of an execution, in order."""
    return [
        orchestrator_pb2.ExecutionEvent.FromString(kv.value)
        for kv in await store.range(f"{EVENTS}{execution_id}/")
    ]


async def load_execution(
    store: Store, execution_id: str
) -> tuple[orchestrator_pb2.Workflow, ExecutionView] | None:
    """The definition an execution runs and its view replayed from its events; None
    when its record or its definition is missing."""
    record = await store.get(EXECUTIONS + execution_id)
    definition = await store.get(DEFINITIONS + execution_id)
    if record is None or definition is None:
        return None
    execution = orchestrator_pb2.Execution.FromString(record.value)
    workflow = orchestrator_pb2.Workflow.FromString(definition.value)
    events = await read_events(store, execution_id)
    return workflow, ExecutionView.replay(execution, events)
