"""A Node.js ProcessorService in the mesh, called by the Python MeshClient like a sidecar.

``tests/polyglot/processor_server.mjs`` is built only from ``protos/`` with
@grpc/grpc-js: it serves ProcessorService and grpc.health.v1, registers itself with a
real ``flext-mesh serve`` (active gRPC health checks, not TTL-only), heartbeats, and
deregisters on SIGTERM. The Python side uses nothing Node-specific.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.errors import FieldViolation, InvalidArgument, NotFound
from flext_mesh.hosting.reporter import CallReporter
from flext_mesh.rpc.payloads import dict_to_struct, struct_to_dict
from flext_mesh.v1 import processor_pb2, processor_pb2_grpc, registry_pb2, registry_pb2_grpc
from sidecar.client import MeshClient
from tests.conftest import REPO, ServeProcess, start_serve
from tests.registry.conftest import eventually

NODE_SERVER = REPO / "tests" / "polyglot" / "processor_server.mjs"
SERVICE = "node-greeter"
READY_TIMEOUT = 20.0


@dataclass
class NodeGreeter:
    """A control plane and the Node processor registered with it."""

    plane: ServeProcess
    proc: asyncio.subprocess.Process
    port: int
    stderr_path: Path

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def logs(self) -> str:
        """Node's stderr and the control plane's log, for failure messages."""
        return (
            f"\n--- node stderr ---\n{self.stderr_path.read_text()}"
            f"\n--- server log ---\n{self.plane.log()}"
        )


def _node() -> str:
    node = shutil.which("node")
    # Not a skip: CI must prove the polyglot promise, so a missing Node.js is a failure.
    assert node, "node not found: install Node.js 20+ and run 'make install-dev' (npm ci)"
    assert (REPO / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        "node_modules is missing @grpc/grpc-js: run 'make install-dev' (npm ci)"
    )
    return node


@pytest.fixture
async def greeter(tmp_path: Path) -> AsyncIterator[NodeGreeter]:
    node = _node()
    # Short health-check interval: the Node instance is checked over grpc.health.v1.
    plane = start_serve(tmp_path, "--health-check-interval", "0.5")
    stderr_path = tmp_path / "node-processor.stderr"
    proc: asyncio.subprocess.Process | None = None
    try:
        with stderr_path.open("w") as stderr:
            proc = await asyncio.create_subprocess_exec(
                node,
                str(NODE_SERVER.relative_to(REPO)),
                cwd=REPO,
                env={**os.environ, "FLEXT_MESH_ADDRESS": plane.address},
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
            )
        assert proc.stdout is not None
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                line = (await proc.stdout.readline()).decode()
        except TimeoutError:
            line = ""
        assert line.startswith("ready "), (
            f"node did not print 'ready <port>' (got {line!r}, exit {proc.returncode})"
            f"\n--- node stderr ---\n{stderr_path.read_text()}\n--- server log ---\n{plane.log()}"
        )
        yield NodeGreeter(plane, proc, int(line.split()[1]), stderr_path)
    finally:
        if proc is not None and proc.returncode is None:
            proc.kill()
            await proc.wait()
        if plane.proc.poll() is None:
            plane.kill()


class _Attempts(CallReporter):
    """Records every Invoke attempt the client makes (never started: sends nothing)."""

    def __init__(self) -> None:
        super().__init__(lambda: grpc.aio.insecure_channel("127.0.0.1:9"), reporter_id="test")
        self.attempts: list[tuple[str, str, int]] = []

    def record_call(
        self,
        service: str,
        operation: str,
        duration_ms: float,
        success: bool,
        status_code: int = 0,
        **_: Any,
    ) -> None:
        self.attempts.append((service, operation, status_code))


async def _serving_instance(
    client: MeshClient, greeter: NodeGreeter
) -> registry_pb2.ServiceInstance:
    """The node-greeter instance, once an active gRPC health check has passed."""

    async def serving() -> bool:
        return any(
            i.health == registry_pb2.HEALTH_STATUS_SERVING for i in client.instances(SERVICE)
        )

    try:
        await eventually(serving, within=10)
    except AssertionError as exc:
        raise AssertionError(
            f"{SERVICE} never SERVING: {client.instances(SERVICE)}{greeter.logs()}"
        ) from exc
    [instance] = client.instances(SERVICE)
    return instance


async def test_the_python_mesh_client_calls_a_node_processor(greeter: NodeGreeter) -> None:
    attempts = _Attempts()
    client = MeshClient(greeter.plane.address, caller_service="polyglot", reporter=attempts)
    try:
        await client.start()
        instance = await _serving_instance(client, greeter)
        assert instance.instance_id == "node-1"
        assert instance.version == "node-1.0"
        assert instance.endpoint == greeter.endpoint
        assert instance.health_check_mode == registry_pb2.HEALTH_CHECK_MODE_GRPC
        assert struct_to_dict(instance.metadata)["runtime"] == "node"

        result = await client.call(SERVICE, "greet", {"name": "mesh"})
        assert result == {"greeting": "hello mesh", "runtime": "node"}
        assert await client.call(SERVICE, "add", {"a": 2, "b": 3}) == {"sum": 5}
        assert await client.call(SERVICE, "add", {"a": 0.25, "b": -1.5}) == {"sum": -1.25}

        # Business rejections: raised at once as their MeshError, never retried.
        before = len(attempts.attempts)
        with pytest.raises(InvalidArgument, match="name") as rejected:
            await client.call(SERVICE, "greet", {"name": ""})
        assert rejected.value.violations == (
            FieldViolation("name", "a non-empty name is required"),
        )
        with pytest.raises(InvalidArgument, match="name"):
            await client.call(SERVICE, "greet", {})
        with pytest.raises(InvalidArgument) as bad_add:
            await client.call(SERVICE, "add", {"a": 2, "b": "three"})
        assert [v.field for v in bad_add.value.violations] == ["b"]
        with pytest.raises(NotFound, match="known operations: add, greet"):
            await client.call(SERVICE, "shout", {"name": "mesh"})
        invalid = grpc.StatusCode.INVALID_ARGUMENT.value[0]
        not_found = grpc.StatusCode.NOT_FOUND.value[0]
        assert attempts.attempts[before:] == [
            (SERVICE, "greet", invalid),
            (SERVICE, "greet", invalid),
            (SERVICE, "add", invalid),
            (SERVICE, "shout", not_found),
        ], "one attempt per rejected call: business errors are not retried"
        assert client.breaker_state(SERVICE, "node-1") == "CLOSED"
        # Still serving normally after the rejections.
        assert await client.call(SERVICE, "greet", {"name": "again"}) == {
            "greeting": "hello again",
            "runtime": "node",
        }
    finally:
        await client.aclose()


async def test_the_node_processor_speaks_the_whole_contract(greeter: NodeGreeter) -> None:
    async with grpc.aio.insecure_channel(greeter.endpoint) as channel:
        stub = processor_pb2_grpc.ProcessorServiceStub(channel)

        listed = await stub.ListOperations(processor_pb2.ListOperationsRequest(), timeout=5)
        assert (listed.service_name, listed.instance_id, listed.version) == (
            SERVICE,
            "node-1",
            "node-1.0",
        )
        assert [op.name for op in listed.operations] == ["add", "greet"]
        schemas = {op.name: struct_to_dict(op.request_schema) for op in listed.operations}
        # Nested objects, lists, strings, numbers and bools all survive Node's Struct encoding.
        assert schemas["greet"] == {
            "type": "object",
            "properties": {"name": {"type": "string", "minLength": 1}},
            "required": ["name"],
            "additionalProperties": False,
        }
        assert schemas["add"]["required"] == ["a", "b"]

        # Correlation id: echoed in the response and in trailing metadata.
        request = processor_pb2.InvokeRequest(operation="greet", correlation_id="corr-42")
        request.payload.CopyFrom(dict_to_struct({"name": "trailers", "extra": [1, None, True]}))
        call = stub.Invoke(request, timeout=5)
        reply = await call
        assert struct_to_dict(reply.result) == {"greeting": "hello trailers", "runtime": "node"}
        assert (reply.correlation_id, reply.instance_id, reply.replayed) == (
            "corr-42",
            "node-1",
            False,
        )
        assert reply.duration_ms >= 0
        assert ("x-correlation-id", "corr-42") in tuple(await call.trailing_metadata())

        # Generated when the caller sends none.
        generated = await stub.Invoke(
            processor_pb2.InvokeRequest(operation="add", payload=dict_to_struct({"a": 1, "b": 1})),
            timeout=5,
        )
        assert generated.correlation_id
        assert struct_to_dict(generated.result) == {"sum": 2}

        # Idempotency: the same key replays the first result without running again.
        first = processor_pb2.InvokeRequest(
            operation="add", idempotency_key="k-1", payload=dict_to_struct({"a": 1, "b": 2})
        )
        again = processor_pb2.InvokeRequest(
            operation="add", idempotency_key="k-1", payload=dict_to_struct({"a": 10, "b": 20})
        )
        one = await stub.Invoke(first, timeout=5)
        two = await stub.Invoke(again, timeout=5)
        assert struct_to_dict(one.result) == struct_to_dict(two.result) == {"sum": 3}
        assert (one.replayed, two.replayed) == (False, True)

    # The control plane's active gRPC health check passes against Node's Health service.
    async with grpc.aio.insecure_channel(greeter.plane.address) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)

        async def checked() -> bool:
            reply = await registry.Discover(
                registry_pb2.DiscoverRequest(service_name=SERVICE), timeout=5
            )
            return [
                (i.instance_id, i.health, i.uptime_percentage > 0) for i in reply.instances
            ] == [("node-1", registry_pb2.HEALTH_STATUS_SERVING, True)]

        await eventually(checked, within=10)


async def test_sigterm_deregisters_and_exits_0(greeter: NodeGreeter) -> None:
    client = MeshClient(greeter.plane.address)
    try:
        await client.start()
        await _serving_instance(client, greeter)
        assert await client.call(SERVICE, "add", {"a": 2, "b": 3}) == {"sum": 5}

        greeter.proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            code = await greeter.proc.wait()
        assert code == 0, f"node exited {code}{greeter.logs()}"

        async def gone() -> bool:
            return not client.instances(SERVICE)

        await eventually(gone, within=5)  # removed at once, well before its 10 s lease ends
        async with grpc.aio.insecure_channel(greeter.plane.address) as channel:
            registry = registry_pb2_grpc.RegistryServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await registry.Discover(
                    registry_pb2.DiscoverRequest(service_name=SERVICE, healthy_only=False),
                    timeout=5,
                )
            assert missing.value.code() is grpc.StatusCode.NOT_FOUND
        with pytest.raises(NotFound):
            await client.call(SERVICE, "add", {"a": 1, "b": 1})
    finally:
        await client.aclose()
