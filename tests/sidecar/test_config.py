"""Where flext-sidecar's settings come from: flag > FLEXT_SIDECAR_X > (shared) FLEXT_MESH_X."""

from __future__ import annotations

import os

import pytest

from sidecar.config import SHARED, SidecarConfig, ignored_variables

_REQUIRED = {"service": "payment", "app": "tests.sidecar.apps:PROCESSORS"}


@pytest.fixture(autouse=True)
def _no_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    """None of the runner's own FLEXT_* variables."""
    for name in list(os.environ):
        if name.startswith(("FLEXT_MESH_", "FLEXT_SIDECAR_")):
            monkeypatch.delenv(name)


def test_a_shared_setting_falls_back_to_the_mesh_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    assert SidecarConfig(**_REQUIRED).control_plane == "127.0.0.1:50051"
    monkeypatch.setenv("FLEXT_MESH_CONTROL_PLANE", "10.0.0.1:50051")
    monkeypatch.setenv("FLEXT_MESH_TOKEN", "mesh-token")
    monkeypatch.setenv("FLEXT_MESH_ZONE", "eu-1a")
    config = SidecarConfig(**_REQUIRED)
    assert (config.control_plane, config.token, config.zone) == (
        "10.0.0.1:50051",
        "mesh-token",
        "eu-1a",
    )
    monkeypatch.setenv("FLEXT_SIDECAR_CONTROL_PLANE", "10.0.0.2:50051")
    assert SidecarConfig(**_REQUIRED).control_plane == "10.0.0.2:50051"
    given = SidecarConfig(**_REQUIRED, control_plane="10.0.0.3:50051")
    assert given.control_plane == "10.0.0.3:50051"
    assert ignored_variables(environ={"FLEXT_MESH_CONTROL_PLANE": "x"}) == []


def test_an_own_setting_reads_only_the_sidecar_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEXT_MESH_LISTEN", "127.0.0.1:50051")  # exported for serve
    monkeypatch.setenv("FLEXT_MESH_LOG_LEVEL", "DEBUG")
    config = SidecarConfig(**_REQUIRED)
    assert (config.listen, config.log_level) == ("127.0.0.1:0", "INFO")
    assert ignored_variables() == [
        ("FLEXT_MESH_LISTEN", "FLEXT_SIDECAR_LISTEN"),
        ("FLEXT_MESH_LOG_LEVEL", "FLEXT_SIDECAR_LOG_LEVEL"),
    ]
    # Said only where it would have mattered: not for a flag, nor beside the new name.
    monkeypatch.setenv("FLEXT_SIDECAR_LOG_LEVEL", "WARNING")
    assert SidecarConfig(**_REQUIRED).log_level == "WARNING"
    assert ignored_variables(given={"listen": "127.0.0.1:7000"}) == []


def test_the_shared_settings_are_those_of_every_client() -> None:
    assert {"control_plane", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "token"} <= SHARED
    assert not {"listen", "metrics_listen", "log_level", "grace_period", "insecure"} & SHARED
    assert set(SidecarConfig.model_fields) >= SHARED
