"""Shared idempotency records: step results whose answer never reached the orchestrator.

A sidecar run with ``--shared-idempotency`` sends the result of a step call that ended
after its caller went away (``OrchestratorService.RecordStepResult``; see
:mod:`flext_mesh.hosting.results`). It is kept under::

    /orchestrator/step-results/EXECUTION_ID/STEP    InvokeResponse (instance_id: whose)

and deleted with the execution by retention. Read only on the unhappy path: when a
resend would have to go to another instance than the one that may hold a lost attempt
(that one is gone), or when that attempt's outcome must be settled before compensating
and its instance is gone. A recorded result then settles the step as succeeded, so the
work is not done again elsewhere. The first attempt of every step pays nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from flext_mesh.errors import FieldViolation, InvalidArgument, NotFound, PermissionDenied
from flext_mesh.orchestrator.invoker import StepReply
from flext_mesh.orchestrator.records import DEFINITIONS, EXECUTIONS, STEP_RESULTS
from flext_mesh.orchestrator.spec import WorkflowSpec
from flext_mesh.rpc.metadata import MAX_IDEMPOTENCY_KEY_LENGTH
from flext_mesh.rpc.payloads import struct_to_dict
from flext_mesh.store import Store
from flext_mesh.v1 import orchestrator_pb2, processor_pb2

__all__ = ["SpecOf", "StepResults", "step_result_key"]

#: Gives the validated spec of a stored definition (the catalog's ``spec_of``).
SpecOf = Callable[[orchestrator_pb2.Workflow], WorkflowSpec]


def step_result_key(execution_id: str, step: str) -> str:
    """Where the recorded result of one step of one execution is kept."""
    return f"{STEP_RESULTS}{execution_id}/{step}"


class StepResults:
    """Records and reads step results kept for shared idempotency (module docstring)."""

    def __init__(
        self, store: Store, spec_of: SpecOf, *, max_result_bytes: int = 1024 * 1024
    ) -> None:
        """``spec_of`` gives the validated spec of a stored definition (the catalog's)."""
        self._store = store
        self._spec_of = spec_of
        self._max_result_bytes = max_result_bytes

    async def record(
        self,
        service: str,
        operation: str,
        key: str,
        result: processor_pb2.InvokeResponse,
    ) -> None:
        """Keep ``result`` of the step call ``key`` (``EXECUTION_ID/STEP``) made to
        ``service``. INVALID_ARGUMENT for a malformed request, NOT_FOUND when the key is
        no step of a known execution, PERMISSION_DENIED when the step calls another
        service or operation."""
        violations = []
        if not service:
            violations.append(FieldViolation("service_name", "required"))
        if not operation:
            violations.append(FieldViolation("operation", "required"))
        if not key:
            violations.append(FieldViolation("idempotency_key", "required"))
        elif len(key) > MAX_IDEMPOTENCY_KEY_LENGTH:
            violations.append(
                FieldViolation(
                    "idempotency_key",
                    f"at most {MAX_IDEMPOTENCY_KEY_LENGTH} characters, got {len(key)}",
                )
            )
        size = result.ByteSize()
        if size > self._max_result_bytes:
            violations.append(
                FieldViolation("result", f"at most {self._max_result_bytes} bytes, got {size}")
            )
        if violations:
            raise InvalidArgument("", violations)
        execution_id, _, step_name = key.partition("/")
        if not step_name or "/" in step_name:
            raise NotFound(f"idempotency key {key!r} is no workflow step's (EXECUTION_ID/STEP)")
        raw = await self._store.get(DEFINITIONS + execution_id)
        if raw is None or await self._store.get(EXECUTIONS + execution_id) is None:
            raise NotFound(f"no execution {execution_id!r} (key {key!r})")
        spec = self._spec_of(orchestrator_pb2.Workflow.FromString(raw.value))
        try:
            step = spec.step(step_name)
        except KeyError:
            raise NotFound(f"execution {execution_id} has no step {step_name!r}") from None
        if step.service != service or step.operation != operation:
            raise PermissionDenied(
                f"step {step_name!r} of execution {execution_id} calls "
                f"{step.service}.{step.operation}, not {service}.{operation}"
            )
        await self._store.put(step_result_key(execution_id, step_name), result.SerializeToString())

    async def recorded(self, execution_id: str, step: str) -> StepReply | None:
        """The result kept for the step, or None."""
        kv = await self._store.get(step_result_key(execution_id, step))
        if kv is None:
            return None
        response = processor_pb2.InvokeResponse.FromString(kv.value)
        return StepReply(struct_to_dict(response.result), response.instance_id, replayed=True)
