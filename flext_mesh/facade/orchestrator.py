"""``FlextServices.ServiceOrchestrator``: the guide's workflows as durable executions.

``register_service(name, processor)`` serves a local ServiceProcessor on an embedded
gRPC server (``ProcessorService`` on ``listen_host`` and a free port, on the facade's
background loop) and registers it with the control plane under ``name`` (a lease kept
alive in the background, ``HEALTH_CHECK_MODE_TTL_ONLY``), so the control plane's
orchestrator can call it like any sidecar. The guide registers one processor per
service while its steps name the step (``validate_payment`` on ``payment``), and a
step's operation defaults to its name: a single processor therefore answers *every*
operation name of its service (compensations included). A mapping of operation name
to ServiceProcessor is served as is (unknown names are NOT_FOUND).

``orchestrate_workflow(workflow)`` takes the guide's dicts as written (see
``flext_mesh.orchestrator.formats.workflow_from_dict``), starts a durable execution
with the definition inline, follows it to its end (bounded by ``timeout``) and returns:

- ``ok(summary)``: ``workflow_id``, ``execution_id``, ``correlation_id``, ``status``
  (``"completed"``), ``duration_ms``, ``steps`` (name -> ``state``, ``output``,
  ``duration_ms``, ``attempts``, and ``error`` for an optional step that failed),
  ``outputs`` (name -> output of the steps that succeeded) and ``total_records``: the
  top-level ``total_records`` (else ``records_processed``) number of the step that
  finished last among those reporting one, i.e. what the end of a pipeline handled
  (0 when none reports any; the guide's ETL pattern reads it);
- ``fail(...)`` naming the failing step, its error and the compensation outcome, with
  the step error's status code; a bad workflow dict fails INVALID_ARGUMENT listing
  every violation.

Each call starts a new execution, even with the same ``workflow_id`` (the Quick Start
uses a fixed one): the id names the workflow, not one run of it. Each call sends a
fresh idempotency key, so its own retries of StartExecution never start a second
execution; a caller who wants "at most once across calls" puts an ``idempotency_key``
at the top level of the dict (a second call with it returns the first execution's
outcome). A top-level ``input`` is the execution input (default ``{}``), which steps
whose ``input`` is None receive.

Nothing raises to the caller; each blocking method has an ``a``-prefixed twin.
``close()`` (or leaving the ``with`` block, or the interpreter's exit) drains and
deregisters every local service. A control plane that refuses to register one (a token
or certificate without ``service:NAME``) fails ``register_service`` with its status.
An execution still running when ``timeout`` passes is left to the control plane (it
is durable): the failure names its execution id.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import grpc

from flext_mesh.errors import (
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    InternalError,
    InvalidArgument,
    MeshError,
    Unavailable,
)
from flext_mesh.facade import control_plane_address
from flext_mesh.facade._bridge import Bridge, attach, detach
from flext_mesh.hosting.host import HostError, HostSettings, ProcessorHost
from flext_mesh.hosting.operations import Operation
from flext_mesh.hosting.servicer import ProcessorServicer
from flext_mesh.names import check_name, raise_if
from flext_mesh.orchestrator.formats import workflow_from_dict
from flext_mesh.orchestrator.spec import validate_workflow
from flext_mesh.processor import ServiceProcessor
from flext_mesh.registry.validation import validate_instance
from flext_mesh.result import STATUS_CODE_NAMES, FlextResult
from flext_mesh.retry import UNLIMITED_ATTEMPTS, RetrySpec, retry_async
from flext_mesh.rpc.channels import (
    ClientSecurity,
    TransportError,
    open_channel,
)
from flext_mesh.rpc.payloads import dict_to_struct, struct_to_dict
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.v1 import (
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    registry_pb2,
)

__all__ = ["ServiceOrchestrator"]

_log = logging.getLogger("flext_mesh.facade")
_T = TypeVar("_T")

#: Lease TTL of a local service, seconds (renewed every third of it).
_TTL = 10.0
#: Longest wait for an unreachable control plane (registration, StartExecution).
_CONNECT_WINDOW = 10.0
#: StartExecution while the control plane is unreachable: until the connect window
#: ends, 100 ms apart doubling up to 1 s.
_START_RETRY = RetrySpec(
    max_attempts=UNLIMITED_ATTEMPTS,
    max_backoff=1.0,
    retryable=frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}),
)
#: Seconds in-flight calls of a local service get when it stops.
_GRACE = 2.0
#: Extra seconds a blocking call waits for the bridge beyond its own bound.
_MARGIN = 5.0
#: Operation names a catch-all service remembers (beyond, each call builds its own).
_MAX_REMEMBERED_OPERATIONS = 256
_S = orchestrator_pb2
_ENDED = {
    _S.EXECUTION_STATE_SUCCEEDED,
    _S.EXECUTION_STATE_FAILED,
    _S.EXECUTION_STATE_COMPENSATED,
    _S.EXECUTION_STATE_COMPENSATION_FAILED,
    _S.EXECUTION_STATE_CANCELLED,
}


class _AnyOperation(dict[str, Operation]):
    """Operation name -> Operation, where one processor answers every name asked."""

    def __init__(self, processor: ServiceProcessor[Any, Any, Any]) -> None:
        super().__init__()
        self._processor = processor

    def get(self, key: str, default: Any = None, /) -> Any:
        """The Operation for ``key`` (any non-empty name); ``default`` for ""."""
        if not key:
            return default
        found = super().get(key)
        if found is None:
            found = Operation.of(key, self._processor)
            if len(self) < _MAX_REMEMBERED_OPERATIONS:
                self[key] = found
        return found


class _CatchAllServicer(ProcessorServicer):
    """A ProcessorServicer whose single processor serves any operation name.

    ListOperations lists none: the names are the callers' (workflow step names).
    """

    def __init__(
        self, processor: ServiceProcessor[Any, Any, Any], *, service_name: str, instance_id: str
    ) -> None:
        super().__init__({}, service_name=service_name, instance_id=instance_id)
        self._operations = _AnyOperation(processor)


@dataclass(slots=True)
class _LocalService:
    """One registered local service: its host (server, servicer, lease)."""

    name: str
    instance_id: str
    host: ProcessorHost


def _operations_of(name: str, target: object) -> ServiceProcessor[Any, Any, Any] | dict[str, Any]:
    """The processor (catch-all) or mapping to serve; InvalidArgument for anything else."""
    if isinstance(target, ServiceProcessor):
        try:
            Operation.of(name, target)  # a bad request_model shows now, not on each call
        except TypeError as exc:
            raise InvalidArgument("", [FieldViolation("service", str(exc))]) from exc
        return target
    if isinstance(target, Mapping) and target:
        out: list[FieldViolation] = []
        for operation, processor in target.items():
            if not isinstance(operation, str) or not operation:
                out.append(FieldViolation("service", f"operation name {operation!r} is not text"))
            elif not isinstance(processor, ServiceProcessor):
                out.append(
                    FieldViolation(
                        f"service[{operation!r}]",
                        f"is a {type(processor).__name__}, not a ServiceProcessor",
                    )
                )
            else:
                try:
                    Operation.of(operation, processor)
                except TypeError as exc:
                    out.append(FieldViolation(f"service[{operation!r}]", str(exc)))
        raise_if(out)
        return dict(target)
    raise InvalidArgument(
        "",
        [
            FieldViolation(
                "service",
                f"{name!r} got a {type(target).__name__}: give a ServiceProcessor or a "
                "non-empty mapping of operation name to ServiceProcessor",
            )
        ],
    )


def _endpoint(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def _instance_id(name: str, port: int) -> str:
    suffix = f"-{port}-{secrets.token_hex(3)}"
    return name[: 63 - len(suffix)] + suffix


def _ms(duration: Any) -> float:
    return float(duration.ToNanoseconds()) / 1e6


def _state(value: int, enum: Any, prefix: str) -> str:
    return str(enum.Name(value)).removeprefix(prefix)


def _records(output: Mapping[str, Any]) -> float | None:
    for key in ("total_records", "records_processed"):
        value = output.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value
    return None


def _summary(name: str, execution: orchestrator_pb2.Execution) -> dict[str, Any]:
    """The ok() value of a succeeded execution (see the module docstring)."""
    steps: dict[str, Any] = {}
    total: float = 0
    latest = -1
    for step in execution.steps:
        output = struct_to_dict(step.output) if step.HasField("output") else None
        entry: dict[str, Any] = {
            "state": _state(step.state, _S.StepState, "STEP_STATE_").lower(),
            "output": output,
            "duration_ms": _ms(step.duration),
            "attempts": step.attempts,
        }
        if step.HasField("error"):
            entry["error"] = {"code": step.error.code_name, "message": step.error.message}
        steps[step.step_name] = entry
        records = _records(output) if output is not None else None
        if records is not None and step.end_time.ToNanoseconds() > latest:
            total, latest = records, step.end_time.ToNanoseconds()
    return {
        "workflow_id": name,
        "execution_id": execution.execution_id,
        "correlation_id": execution.correlation_id,
        "status": "completed",
        "duration_ms": _ms(execution.duration),
        "steps": steps,
        "outputs": struct_to_dict(execution.output),
        "total_records": int(total) if float(total).is_integer() else total,
    }


def _compensation(execution: orchestrator_pb2.Execution) -> str:
    """What was undone, e.g. ``COMPENSATED (validate_payment compensated)``."""
    done = [s.step_name for s in execution.steps if s.state == _S.STEP_STATE_COMPENSATED]
    failed = [
        f"{s.step_name} failed: {s.compensation_error.code_name} {s.compensation_error.message}"
        for s in execution.steps
        if s.state == _S.STEP_STATE_COMPENSATION_FAILED
    ]
    parts = [f"{name} compensated" for name in done] + failed
    state = execution.state
    if state == _S.EXECUTION_STATE_FAILED or (state == _S.EXECUTION_STATE_CANCELLED and not parts):
        return "none needed"
    label = _state(state, _S.ExecutionState, "EXECUTION_STATE_")
    text = f"{label} ({'; '.join(parts)})" if parts else label
    if failed:
        text += "; an operator must act"
    return text


def _failure(name: str, execution: orchestrator_pb2.Execution) -> FlextResult[dict[str, Any]]:
    """The fail() of an execution that did not succeed."""
    error = execution.error
    code = error.code_name if error.code_name in STATUS_CODE_NAMES - {"OK"} else "UNKNOWN"
    what = f"{error.code_name} {error.message}".strip()
    if execution.state == _S.EXECUTION_STATE_CANCELLED:
        head = f"workflow {name} was cancelled"
        code = "CANCELLED"
    elif execution.failed_step:
        head = f"workflow {name} failed at step {execution.failed_step}"
    else:
        head = f"workflow {name} failed"
    message = (
        f"{head}: {what or 'no error recorded'}; compensation: {_compensation(execution)} "
        f"(execution {execution.execution_id})"
    )
    return FlextResult.fail(message, code=code)


def _as_failure(error: MeshError) -> FlextResult[Any]:
    violations = error.violations if isinstance(error, InvalidArgument) else None
    return FlextResult.fail(error.message, code=error.code.name, field_violations=violations)


class ServiceOrchestrator:
    """The guide's ``FlextServices.ServiceOrchestrator``, backed by the control plane.

    ``control_plane`` defaults as in :func:`flext_mesh.facade.control_plane_address`;
    ``timeout`` bounds each call in seconds (a workflow's whole run included);
    ``listen_host`` is where local services listen (on a free port each) and how the
    control plane reaches them.

    ``security`` (default: from the ``FLEXT_MESH_TLS_*`` and ``FLEXT_MESH_TOKEN``
    variables) secures the channel to the control plane, and its certificate and key,
    when given, are served by the local services (TLS, no client certificate asked).
    Local services serve plaintext on a non-loopback ``listen_host`` only with
    ``insecure=True``.
    """

    def __init__(
        self,
        control_plane: str | None = None,
        *,
        timeout: float = 60.0,
        listen_host: str = "127.0.0.1",
        security: ClientSecurity | None = None,
        insecure: bool = False,
    ) -> None:
        self.control_plane = control_plane_address(control_plane)
        """Address of the control plane."""
        self.security = ClientSecurity.from_env() if security is None else security
        """TLS and token of the calls to the control plane; certificate of local services."""
        self.insecure = insecure
        """Whether local services may serve plaintext on a non-loopback ``listen_host``."""
        self.timeout = timeout
        """Bound of each call, in seconds."""
        self.listen_host = listen_host
        """Host local services listen on and advertise."""
        self._channel: grpc.aio.Channel | None = None
        self._services: dict[str, _LocalService] = {}
        self._closed = False
        self._bridge: Bridge | None = None
        self._bridge_lock = threading.Lock()

    # -- the guide's methods -------------------------------------------------------------

    def register_service(self, name: str, service: object) -> FlextResult[str]:
        """Serve ``service`` locally and register it as ``name``; ok(instance id)."""
        return self._blocking(self._register(name, service))

    async def aregister_service(self, name: str, service: object) -> FlextResult[str]:
        """Async twin of :meth:`register_service`."""
        return await self._async(self._register(name, service))

    def orchestrate_workflow(self, workflow: Mapping[str, Any]) -> FlextResult[dict[str, Any]]:
        """Run ``workflow`` (the guide's dict) to its end; see the module docstring."""
        return self._blocking(self._orchestrate(workflow))

    async def aorchestrate_workflow(
        self, workflow: Mapping[str, Any]
    ) -> FlextResult[dict[str, Any]]:
        """Async twin of :meth:`orchestrate_workflow`."""
        return await self._async(self._orchestrate(workflow))

    @property
    def services(self) -> dict[str, str]:
        """Local services registered by this object: name -> instance id."""
        return {name: local.instance_id for name, local in self._services.items()}

    # -- lifecycle -----------------------------------------------------------------------

    def close(self) -> FlextResult[None]:
        """Drain, deregister and stop every local service; close the channel (idempotent).
        An orchestrator left open is closed at interpreter exit."""
        bridge = self._closing()
        if bridge is None:
            return FlextResult[None].ok(None)
        try:
            bridge.run(self._close_on_loop(), len(self._services) * (_GRACE + 3) + _MARGIN)
        except Exception as exc:
            _log.exception("closing the ServiceOrchestrator failed")
            return FlextResult[None].fail(f"closing failed: {exc}", code="INTERNAL")
        finally:
            detach(self, bridge)
        return FlextResult[None].ok(None)

    async def aclose(self) -> FlextResult[None]:
        """Async twin of :meth:`close`."""
        bridge = self._closing()
        if bridge is None:
            return FlextResult[None].ok(None)
        try:
            await bridge.run_async(self._close_on_loop())
        except Exception as exc:
            _log.exception("closing the ServiceOrchestrator failed")
            return FlextResult[None].fail(f"closing failed: {exc}", code="INTERNAL")
        finally:
            detach(self, bridge)
        return FlextResult[None].ok(None)

    def __enter__(self) -> ServiceOrchestrator:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> ServiceOrchestrator:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- plumbing (everything below runs on the bridge's loop) ---------------------------

    def _loop_bridge(self) -> Bridge:
        """The bridge this object runs on (attached on first use, until closed)."""
        with self._bridge_lock:
            if self._bridge is None:
                self._bridge = attach(self)
            return self._bridge

    def _closing(self) -> Bridge | None:
        """The bridge to close on; None when there is nothing to close."""
        with self._bridge_lock:
            if self._bridge is None:
                self._closed = True
            return None if self._closed else self._bridge

    def _closed_failure(self, coroutine: Coroutine[Any, Any, Any]) -> FlextResult[Any]:
        coroutine.close()
        return FlextResult.fail("this ServiceOrchestrator is closed", code="FAILED_PRECONDITION")

    async def _async(self, coroutine: Coroutine[Any, Any, _T]) -> FlextResult[_T]:
        if self._closed:
            return self._closed_failure(coroutine)
        try:
            return await self._loop_bridge().run_async(self._guarded(coroutine))
        except RuntimeError as exc:  # the bridge stopped under a concurrent close()
            return FlextResult.fail(str(exc), code="FAILED_PRECONDITION")

    def _blocking(self, coroutine: Coroutine[Any, Any, _T]) -> FlextResult[_T]:
        if self._closed:
            return self._closed_failure(coroutine)
        try:
            return self._loop_bridge().run(self._guarded(coroutine), self.timeout + _MARGIN)
        except TimeoutError:
            return FlextResult.fail(
                f"no answer within {self.timeout + _MARGIN:.0f}s", code="DEADLINE_EXCEEDED"
            )
        except RuntimeError as exc:  # a blocking call made on the bridge's own loop
            return FlextResult.fail(str(exc), code="FAILED_PRECONDITION")

    async def _guarded(self, coroutine: Coroutine[Any, Any, _T]) -> FlextResult[_T]:
        try:
            if self._closed:
                coroutine.close()
                raise FailedPrecondition("this ServiceOrchestrator is closed")
            return FlextResult.ok(await coroutine)
        except MeshError as error:
            return _as_failure(error)
        except grpc.aio.AioRpcError as exc:
            return _as_failure(from_rpc_error(exc))
        except TransportError as exc:  # a TLS file of ``security`` missing or wrong
            return _as_failure(FailedPrecondition(str(exc)))
        except Exception as exc:
            _log.exception("ServiceOrchestrator call failed")
            return _as_failure(InternalError(f"unexpected {type(exc).__name__}: {exc}"))

    def channel(self) -> grpc.aio.Channel:
        """The channel to the control plane, created on the bridge's loop on first use."""
        if self._channel is None:
            self._channel = open_channel(self.control_plane, self.security)
        return self._channel

    async def _register(self, name: str, service: object) -> str:
        if not isinstance(name, str):
            raise InvalidArgument("", [FieldViolation("name", "must be a service name")])
        raise_if(check_name("name", name))
        operations = _operations_of(name, service)
        local = await self._start_local(name, operations)
        previous = self._services.get(name)
        self._services[name] = local
        if previous is not None:  # replaced only once the new one is registered
            await self._stop_local(previous)
        return local.instance_id

    async def _start_local(
        self, name: str, operations: ServiceProcessor[Any, Any, Any] | dict[str, Any]
    ) -> _LocalService:
        host = ProcessorHost(
            HostSettings(
                listen=_endpoint(self.listen_host, 0),
                tls_cert=self.security.tls_cert,
                tls_key=self.security.tls_key,
                insecure=self.insecure,
                reflection=False,
            ),
            channel=self.channel,
            security=self.security,
        )
        try:
            port = host.bind()
        except TransportError as exc:
            raise FailedPrecondition(str(exc)) from None
        except HostError as exc:
            raise Unavailable(f"cannot listen on {self.listen_host!r}: {exc}") from exc
        instance_id = _instance_id(name, port)
        servicer: ProcessorServicer
        if isinstance(operations, ServiceProcessor):
            servicer = _CatchAllServicer(operations, service_name=name, instance_id=instance_id)
        else:
            servicer = ProcessorServicer(operations, service_name=name, instance_id=instance_id)
        instance = registry_pb2.ServiceInstance(
            service_name=name,
            instance_id=instance_id,
            endpoint=_endpoint(self.listen_host, port),
            capabilities=sorted(operations) if isinstance(operations, dict) else [],
            health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
        )
        try:
            raise_if(validate_instance("instance", instance))
        except BaseException:
            await host.server.stop(None)
            servicer.close()
            raise
        await host.serve(servicer)
        membership = host.register(instance, ttl=_TTL, report_first_refusal=False)
        local = _LocalService(name, instance_id, host)
        window = min(self.timeout, _CONNECT_WINDOW)
        try:
            async with asyncio.timeout(window):
                refusal = await membership.first_answer()
        except TimeoutError:
            await self._stop_local(local)
            raise Unavailable(
                f"control plane {self.control_plane} unreachable: {name!r} was not registered "
                f"within {window:g}s"
            ) from None
        if refusal is not None:  # a token or certificate that may not register ``name``
            await self._stop_local(local)
            raise refusal
        local.instance_id = membership.instance.instance_id
        return local

    async def _stop_local(self, local: _LocalService) -> None:
        await local.host.stop(_GRACE)

    async def _close_on_loop(self) -> None:
        """Stop every local service and close the channel (on the bridge's loop)."""
        self._closed = True
        services, self._services = list(self._services.values()), {}
        for local in services:
            try:
                await self._stop_local(local)
            except Exception:
                _log.exception("stopping local service %s failed", local.name)
        if self._channel is not None:
            await self._channel.close()
            self._channel = None

    async def _orchestrate(self, workflow: Mapping[str, Any]) -> dict[str, Any]:
        deadline = asyncio.get_running_loop().time() + self.timeout
        if not isinstance(workflow, Mapping):
            raise InvalidArgument(
                "", [FieldViolation("workflow", f"must be a dict, got {type(workflow).__name__}")]
            )
        data = dict(workflow)
        payload = data.pop("input", None)
        key = data.pop("idempotency_key", None)
        out: list[FieldViolation] = []
        if payload is not None and not isinstance(payload, Mapping):
            out.append(FieldViolation("workflow.input", "must be a dict or None"))
        if key is not None and not isinstance(key, str):
            out.append(FieldViolation("workflow.idempotency_key", "must be text"))
        try:
            definition = workflow_from_dict(data)
        except InvalidArgument as exc:
            out.extend(exc.violations)
        else:
            try:
                validate_workflow(definition)
            except InvalidArgument as exc:
                out.extend(exc.violations)
        raise_if(out)
        request = orchestrator_pb2.StartExecutionRequest(
            inline_workflow=definition,
            input=dict_to_struct(dict(payload or {})),
            idempotency_key=key or f"flext-services-{uuid.uuid4().hex}",
        )
        stub = orchestrator_pb2_grpc.OrchestratorServiceStub(self.channel())
        execution = await self._start(stub, request, deadline)
        if execution.state not in _ENDED:
            execution = await self._follow(stub, execution.execution_id, definition.name, deadline)
        if execution.state == _S.EXECUTION_STATE_SUCCEEDED:
            return _summary(definition.name, execution)
        raise _FailedExecution(_failure(definition.name, execution))

    async def _start(
        self,
        stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub,
        request: orchestrator_pb2.StartExecutionRequest,
        deadline: float,
    ) -> orchestrator_pb2.Execution:
        """StartExecution, retried while the control plane is unreachable (same key)."""
        # ``deadline`` is the loop's time; retry_async's is time.monotonic().
        left = deadline - asyncio.get_running_loop().time()
        give_up = time.monotonic() + min(left, _CONNECT_WINDOW)

        async def start() -> orchestrator_pb2.Execution:
            try:
                timeout = max(give_up - time.monotonic(), 0.01)
                reply = await stub.StartExecution(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                raise from_rpc_error(exc) from exc
            return reply.execution

        try:
            return await retry_async(start, _START_RETRY, deadline=give_up)
        except (Unavailable, DeadlineExceeded) as error:
            raise Unavailable(
                f"control plane {self.control_plane} unreachable: {error.message}"
            ) from error

    async def _follow(
        self,
        stub: orchestrator_pb2_grpc.OrchestratorServiceAsyncStub,
        execution_id: str,
        name: str,
        deadline: float,
    ) -> orchestrator_pb2.Execution:
        """WatchExecution until the end (watching again after a broken stream)."""
        after = 0
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    try:
                        stream = stub.WatchExecution(
                            orchestrator_pb2.WatchExecutionRequest(
                                execution_id=execution_id, after_index=after
                            )
                        )
                        async for message in stream:
                            if message.HasField("event"):
                                after = max(after, message.event.index)
                            if message.HasField("execution") and message.execution.state in _ENDED:
                                return message.execution
                    except grpc.aio.AioRpcError as exc:
                        error = from_rpc_error(exc)
                        if not isinstance(error, Unavailable):
                            raise error from exc
                    await asyncio.sleep(0.2)
        except TimeoutError:
            raise DeadlineExceeded(
                f"workflow {name} still running after the {self.timeout:g}s timeout; "
                f"execution {execution_id} goes on in the control plane"
            ) from None


class _FailedExecution(MeshError):
    """An execution that ended without succeeding, carrying its ready-made failure."""

    def __init__(self, result: FlextResult[dict[str, Any]]) -> None:
        super().__init__(result.error or "workflow failed")
        self.result = result

    @property
    def code(self) -> grpc.StatusCode:
        """The failing step's status code."""
        return grpc.StatusCode[self.result.code or "UNKNOWN"]
