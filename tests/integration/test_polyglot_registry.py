"""A real Node.js client drives RegistryService from the protos: the contracts are polyglot."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from tests.conftest import REPO, start_serve

NODE_TEST = REPO / "tests" / "polyglot" / "registry.test.mjs"


def test_node_client_drives_the_registry(tmp_path: Path) -> None:
    node = shutil.which("node")
    # Not a skip: CI must prove the polyglot promise, so a missing Node.js is a failure.
    assert node, "node not found: install Node.js 20+ and run 'make install-dev' (npm ci)"
    assert (REPO / "node_modules" / "@grpc" / "grpc-js").is_dir(), (
        "node_modules is missing @grpc/grpc-js: run 'make install-dev' (npm ci)"
    )
    server = start_serve(tmp_path)
    try:
        try:
            proc = subprocess.run(
                [node, "--test", str(NODE_TEST.relative_to(REPO))],
                cwd=REPO,
                env={**os.environ, "FLEXT_MESH_ADDRESS": server.address},
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(
                f"node --test timed out after 60 s\n--- stdout ---\n{exc.stdout}\n"
                f"--- stderr ---\n{exc.stderr}\n--- server log ---\n{server.log()}"
            ) from exc
        assert proc.returncode == 0, (
            f"node --test exited {proc.returncode}\n--- stdout ---\n{proc.stdout}\n"
            f"--- stderr ---\n{proc.stderr}\n--- server log ---\n{server.log()}"
        )
        assert "# fail 0" in proc.stdout, proc.stdout
    finally:
        if server.proc.poll() is None:
            server.kill()
