"""``--app`` is found as uvicorn and gunicorn find their apps: in the current directory
by default, in ``--app-dir`` when given, with no ``PYTHONPATH`` to set; real
``flext-sidecar`` processes beside a real control plane."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from flext_mesh.v1 import processor_pb2, processor_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.conftest import BIN, ServeProcess, start_serve

pytestmark = pytest.mark.xdist_group("app_loading")

_SERVING = re.compile(r"serving service=\S+ instance=(?P<instance>\S+) listen=(?P<listen>\S+)")

#: An app of its own, outside the repository: one operation echoing its input.
APP = """
from pydantic import BaseModel

from flext_mesh import FlextResult, ServiceProcessor


class Greeting(BaseModel):
    name: str


class Greeter(ServiceProcessor[Greeting, str, dict[str, str]]):
    def process(self, request: Greeting) -> FlextResult[str]:
        return FlextResult[str].ok(request.name)

    def build(self, name: str, *, correlation_id: str) -> dict[str, str]:
        return {"greeting": f"hello {name}"}


PROCESSORS = {"greet": Greeter()}
"""


def environment(**extra: str) -> dict[str, str]:
    """This environment without PYTHONPATH: only the current directory and --app-dir
    may make the app importable."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {**env, **extra}


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    server = start_serve(tmp_path_factory.mktemp("app-loading"))
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.kill()


@pytest.fixture
def app_dir(tmp_path: Path) -> Path:
    """A directory holding ``greeter/mesh.py`` (a package) and nothing else."""
    package = tmp_path / "project" / "greeter"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "mesh.py").write_text(APP)
    return tmp_path / "project"


@dataclass
class Sidecar:
    """A running ``flext-sidecar --service greeter`` and its log."""

    proc: subprocess.Popen[str]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


def start(cwd: Path, plane: ServeProcess, *args: str, env: dict[str, str] | None = None) -> Sidecar:
    """Start ``flext-sidecar --service greeter ARGS`` in ``cwd``."""
    log_path = cwd / f"sidecar-{time.monotonic_ns()}.log"
    with log_path.open("w") as log:
        command = [str(BIN / "flext-sidecar"), "--service", "greeter"]
        proc = subprocess.Popen(
            [*command, "--control-plane", plane.address, *args],
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            env=env or environment(),
        )
    return Sidecar(proc, log_path)


def registers_and_serves(sidecar: Sidecar, plane: ServeProcess) -> None:
    """Wait until ``sidecar`` is listed by Discover, then call it."""
    deadline = time.monotonic() + 30
    while not (match := _SERVING.search(sidecar.log())):
        assert sidecar.proc.poll() is None, sidecar.log()
        assert time.monotonic() < deadline, sidecar.log()
        time.sleep(0.05)
    with grpc.insecure_channel(plane.address) as channel:
        registry = registry_pb2_grpc.RegistryServiceStub(channel)
        request = registry_pb2.DiscoverRequest(service_name="greeter", healthy_only=False)
        while True:
            try:
                found = registry.Discover(request, timeout=5)
            except grpc.RpcError:
                found = registry_pb2.DiscoverResponse()
            if match["instance"] in {i.instance_id for i in found.instances}:
                break
            assert time.monotonic() < deadline, sidecar.log()
            time.sleep(0.1)
    with grpc.insecure_channel(match["listen"]) as channel:
        invoke = processor_pb2.InvokeRequest(operation="greet")
        invoke.payload.update({"name": "ada"})
        reply = processor_pb2_grpc.ProcessorServiceStub(channel).Invoke(invoke, timeout=5)
    assert dict(reply.result) == {"greeting": "hello ada"}


def stop(*sidecars: Sidecar) -> None:
    """SIGTERM each; each exits 0 (bounded)."""
    for sidecar in sidecars:
        if sidecar.proc.poll() is None:
            sidecar.proc.send_signal(signal.SIGTERM)
    for sidecar in sidecars:
        try:
            code = sidecar.proc.wait(30)
        except subprocess.TimeoutExpired:
            sidecar.proc.kill()
            sidecar.proc.wait(10)
            raise AssertionError(f"no exit 30 s after SIGTERM:\n{sidecar.log()}") from None
        assert code == 0, sidecar.log()


def serve(cwd: Path, plane: ServeProcess, *args: str, env: dict[str, str] | None = None) -> None:
    """Run ``flext-sidecar --service greeter ARGS`` in ``cwd`` until it registers and
    answers a call, then stop it."""
    sidecar = start(cwd, plane, *args, env=env)
    try:
        registers_and_serves(sidecar, plane)
    finally:
        stop(sidecar)


def fails(cwd: Path, *args: str, env: dict[str, str] | None = None) -> str:
    """Run ``flext-sidecar --service greeter ARGS`` expecting exit 2; its one line."""
    done = subprocess.run(
        [str(BIN / "flext-sidecar"), "--service", "greeter", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env=env or environment(),
    )
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    return lines[0]


def test_the_current_directory_is_importable_by_default(app_dir: Path, plane: ServeProcess) -> None:
    serve(app_dir, plane, "--app", "greeter.mesh:PROCESSORS")


def test_app_dir_names_where_the_app_is_imported_from(
    app_dir: Path, plane: ServeProcess, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    app = ("--app", "greeter.mesh:PROCESSORS")
    sidecars = [
        start(elsewhere, plane, *app, "--app-dir", str(app_dir)),
        # Relative to the current directory, and from the environment as every flag.
        start(tmp_path, plane, *app, "--app-dir", "project"),
        start(elsewhere, plane, *app, env=environment(FLEXT_SIDECAR_APP_DIR=str(app_dir))),
    ]
    try:
        for sidecar in sidecars:
            registers_and_serves(sidecar, plane)
    finally:
        stop(*sidecars)


def test_a_module_not_found_names_the_module_and_the_directory_searched(
    app_dir: Path, tmp_path: Path
) -> None:
    line = fails(tmp_path, "--app", "greeter.mesh:PROCESSORS")
    assert line == (
        "flext-sidecar: error: --app 'greeter.mesh:PROCESSORS': cannot import 'greeter.mesh': "
        f"No module named 'greeter' (looked in {tmp_path.resolve()}, the --app-dir, then in "
        "the installed packages)"
    )
    line = fails(tmp_path, "--app", "greeter.nope:PROCESSORS", "--app-dir", str(app_dir))
    assert "cannot import 'greeter.nope': No module named 'greeter.nope'" in line
    assert f"looked in {app_dir.resolve()}" in line


def test_a_missing_app_dir_and_a_failing_module_are_one_line(app_dir: Path, tmp_path: Path) -> None:
    line = fails(tmp_path, "--app", "greeter.mesh:PROCESSORS", "--app-dir", "nowhere")
    assert line == (
        f"flext-sidecar: error: --app-dir 'nowhere': no such directory "
        f"({tmp_path.resolve() / 'nowhere'})"
    )
    (app_dir / "greeter" / "broken.py").write_text("import json\n\nimport no_such_dependency\n")
    line = fails(app_dir, "--app", "greeter.broken:PROCESSORS")
    assert line == (
        "flext-sidecar: error: --app 'greeter.broken:PROCESSORS': importing module "
        "'greeter.broken' failed: No module named 'no_such_dependency' "
        f"(at {app_dir.resolve() / 'greeter' / 'broken.py'}:3)"
    )
    (app_dir / "greeter" / "crash.py").write_text("RATE = 1 / 0\n")
    line = fails(app_dir, "--app", "greeter.crash:PROCESSORS")
    assert line.endswith(
        "importing module 'greeter.crash' failed: ZeroDivisionError: division by zero "
        f"(at {app_dir.resolve() / 'greeter' / 'crash.py'}:1)"
    )
