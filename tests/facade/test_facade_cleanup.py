"""The ``FlextServices`` facade cleans up after itself: real scripts (subprocesses)
against a real ``flext-mesh serve``.

Closing it explicitly, leaving a ``with`` block, or just letting the script end
deregisters every instance it registered (Discover stops listing them at once, long
before their 10 s leases would run out), stops its event loop, and prints nothing:
no asyncio or gRPC warning, no traceback.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh import FlextServices
from flext_mesh.rpc.channels import ClientSecurity
from flext_mesh.security.tokens import add_token
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from tests.conftest import REPO, ServeProcess, start_serve

pytestmark = pytest.mark.xdist_group("facade_cleanup")

LIBRARY = (REPO / "docs" / "library.md").read_text()

#: A processor for the scripts below (docs/library.md's, shortened).
PROCESSOR = """
from pydantic import BaseModel

from flext_mesh import FlextResult, FlextServices, ServiceProcessor


class Payment(BaseModel):
    order_id: str
    amount: float


class PaymentProcessor(ServiceProcessor[Payment, Payment, dict[str, object]]):
    def process(self, payment: Payment) -> FlextResult[Payment]:
        return FlextResult[Payment].ok(payment)

    def build(self, payment: Payment, *, correlation_id: str) -> dict[str, object]:
        return {"order_id": payment.order_id}


def loop_stopped(within: float = 5.0) -> bool:
    import threading
    import time

    deadline = time.monotonic() + within
    while any(t.name == "flext-services" for t in threading.enumerate()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True
"""


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    server = start_serve(tmp_path_factory.mktemp("facade-cleanup"))
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.kill()


def listed(plane: ServeProcess, service: str) -> list[str]:
    """Instance ids Discover lists for ``service`` (healthy or not)."""
    with grpc.insecure_channel(plane.address) as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        try:
            reply = stub.Discover(
                registry_pb2.DiscoverRequest(service_name=service, healthy_only=False), timeout=5
            )
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.NOT_FOUND:
                raise
            return []
    return [instance.instance_id for instance in reply.instances]


def wait_listed(plane: ServeProcess, service: str, count: int, within: float = 3.0) -> None:
    """Wait until Discover lists ``count`` instances of ``service`` (its answers follow
    the store a moment behind a write). ``within`` is well under the 10 s leases, so an
    instance gone in time was deregistered, not expired."""
    deadline = time.monotonic() + within
    while len(found := listed(plane, service)) != count:
        assert time.monotonic() < deadline, f"{service}: {found}, expected {count}"
        time.sleep(0.05)


def script(tmp_path: Path, name: str, body: str) -> Path:
    path = tmp_path / f"{name}.py"
    path.write_text(body)
    return path


def environment(plane: ServeProcess) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEXT_MESH_")}
    return {**env, "FLEXT_MESH_CONTROL_PLANE": plane.address, "PYTHONASYNCIODEBUG": ""}


def assert_quiet(stderr: str) -> None:
    """Nothing on stderr: no warning, no traceback, no asyncio or gRPC complaint."""
    assert stderr.strip() == "", stderr


def readme_facade_example() -> str:
    blocks = [
        block
        for block in re.findall(r"```python\n(.*?)```", LIBRARY, flags=re.S)
        if "FlextServices." in block and "orchestrate_workflow" in block
    ]
    assert len(blocks) == 1, "docs/library.md shows the FlextServices example once"
    return blocks[0]


def test_the_readme_example_runs_as_printed_and_leaves_nothing_behind(
    plane: ServeProcess, tmp_path: Path
) -> None:
    path = script(tmp_path, "readme_facade", readme_facade_example())
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=environment(plane),
    )
    ended = time.monotonic()

    assert done.returncode == 0, done.stderr
    assert_quiet(done.stderr)
    lines = done.stdout.splitlines()
    assert lines[:2] == ["billing.company.com:443", "completed"], done.stdout
    assert re.fullmatch(r"[A-F]", lines[2]), done.stdout
    # Deregistered at exit, not expired: its leases (10 s) had not run out.
    wait_listed(plane, "billing", 0)
    wait_listed(plane, "payment", 0)
    assert time.monotonic() - started < 10.0
    assert "leases expired" not in plane.log()
    print(f"\nscript ran in {ended - started:.2f}s; its instances were gone at once")


@pytest.mark.parametrize(
    "closing",
    [
        pytest.param(
            """
registry = FlextServices.ServiceRegistry()
orchestrator = FlextServices.ServiceOrchestrator()
assert registry.register({"name": "billing", "endpoint": "127.0.0.1:9"}).success
assert orchestrator.register_service("payment", PaymentProcessor()).success
print("registered", flush=True)
input()
assert registry.close().success and orchestrator.close().success
assert registry.close().success  # idempotent
assert registry.discover("billing").code == "FAILED_PRECONDITION"  # closed
""",
            id="close",
        ),
        pytest.param(
            """
with FlextServices.ServiceRegistry() as registry, FlextServices.ServiceOrchestrator() as orch:
    assert registry.register({"name": "billing", "endpoint": "127.0.0.1:9"}).success
    assert orch.register_service("payment", PaymentProcessor()).success
    print("registered", flush=True)
    input()
""",
            id="with",
        ),
        pytest.param(
            """
import asyncio

async def main() -> None:
    async with FlextServices.ServiceRegistry() as registry:
        async with FlextServices.ServiceOrchestrator() as orchestrator:
            billing = {"name": "billing", "endpoint": "127.0.0.1:9"}
            assert (await registry.aregister(billing)).success
            assert (await orchestrator.aregister_service("payment", PaymentProcessor())).success
            print("registered", flush=True)
            await asyncio.to_thread(input)

asyncio.run(main())
""",
            id="async-with",
        ),
    ],
)
def test_closing_deregisters_at_once_and_stops_the_loop(
    plane: ServeProcess, tmp_path: Path, closing: str
) -> None:
    # Registered, the script waits for a line, then closes; closed, it says so and
    # waits again: what is gone by then, closing removed.
    body = PROCESSOR + textwrap.dedent(closing)
    body += '\nprint("closed", loop_stopped(), flush=True)\ninput()\n'
    proc = subprocess.Popen(
        [sys.executable, str(script(tmp_path, "closing", body))],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(plane),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.readline() == "registered\n"
        wait_listed(plane, "billing", 1)
        wait_listed(plane, "payment", 1)
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "closed True\n", "the loop's thread stopped"
        wait_listed(plane, "billing", 0)
        wait_listed(plane, "payment", 0)
        proc.stdin.write("\n")
        proc.stdin.flush()
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, stderr
    assert_quiet(stderr)


def test_exit_with_the_control_plane_gone_is_bounded_and_quiet(tmp_path: Path) -> None:
    """Deregistering at exit cannot reach a dead control plane: the script still ends
    soon, without a traceback."""
    server = start_serve(tmp_path)
    body = PROCESSOR + textwrap.dedent(
        """
        registry = FlextServices.ServiceRegistry()
        orchestrator = FlextServices.ServiceOrchestrator()
        assert registry.register({"name": "billing", "endpoint": "127.0.0.1:9"}).success
        assert orchestrator.register_service("payment", PaymentProcessor()).success
        print("registered", flush=True)
        input()
        """
    )
    proc = subprocess.Popen(
        [sys.executable, str(script(tmp_path, "orphan", body))],
        cwd=tmp_path,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment(server),
    )
    try:
        assert proc.stdout is not None
        assert proc.stdin is not None
        assert proc.stdout.readline() == "registered\n"
        server.kill()
        started = time.monotonic()
        proc.stdin.write("\n")
        proc.stdin.flush()
        _, stderr = proc.communicate(timeout=30)
        took = time.monotonic() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, stderr
    assert took < 12.0, f"exit took {took:.1f}s"
    assert "Traceback" not in stderr, stderr
    for sign in ("Task was destroyed", "Event loop is closed", "was never awaited"):
        assert sign not in stderr, stderr
    print(f"\nexit with the control plane gone took {took:.2f}s")


def test_a_refused_local_service_fails_at_once_with_the_refusal(tmp_path: Path) -> None:
    """A token without ``service:payment``: register_service says so, in well under the
    10 s it waits for an unreachable control plane, and leaves nothing running."""
    tokens_file = tmp_path / "tokens.yaml"
    token = add_token(tokens_file, "orders-sidecar", ["service:orders"])
    server = start_serve(tmp_path, "--auth-tokens-file", str(tokens_file))
    namespace: dict[str, Any] = {"__name__": "processors"}
    exec(compile(PROCESSOR, "processors", "exec"), namespace)
    try:
        with FlextServices.ServiceOrchestrator(
            server.address, security=ClientSecurity(token=token)
        ) as orchestrator:
            started = time.monotonic()
            result = orchestrator.register_service("payment", namespace["PaymentProcessor"]())
            took = time.monotonic() - started
            assert result.code == "PERMISSION_DENIED", result
            assert "may not register instances of 'payment'" in (result.error or "")
            assert took < 3.0
            assert orchestrator.services == {}
    finally:
        server.kill()
