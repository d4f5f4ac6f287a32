"""Fixtures of the xDS interop tests: one control plane per module, the sidecars a
test starts (killed at its end)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.conftest import ServeProcess, start_serve
from tests.sidecar.test_sidecar_process import SidecarProcess


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    server = start_serve(tmp_path_factory.mktemp("xds"))
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.kill()


@pytest.fixture
def sidecars() -> Iterator[list[SidecarProcess]]:
    started: list[SidecarProcess] = []
    try:
        yield started
    finally:
        for sidecar in started:
            if sidecar.proc.poll() is None:
                sidecar.proc.kill()
                sidecar.proc.wait(10)
