"""The distribution as users install it: names, typing marker, console scripts."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import flext_mesh
import sidecar

REPO = Path(__file__).resolve().parent.parent


def test_all_is_complete_and_importable() -> None:
    public = {name for name in dir(flext_mesh) if not name.startswith("_")}
    modules = {"cli", "config", "errors", "logs", "processor", "result", "server", "servicers"}
    modules |= {"store", "v1", "registry", "metrics", "http", "observability", "invoke", "process"}
    modules |= {"orchestrator", "durations", "services", "retry"}  # submodules imported on the way
    modules |= {"dashboard", "security", "addresses"}
    modules |= {"annotations"}  # from __future__ import annotations
    assert public - modules - set(flext_mesh.__all__) == set()
    for name in flext_mesh.__all__:
        assert hasattr(flext_mesh, name), name


def test_typed_packages_ship_py_typed() -> None:
    for package in (flext_mesh, sidecar):
        assert (Path(package.__file__).parent / "py.typed").exists()


def test_only_flext_mesh_and_sidecar_are_top_level_and_scripts_resolve() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert project["project"]["name"] == "flext-mesh"
    assert project["tool"]["setuptools"]["packages"]["find"]["include"] == [
        "flext_mesh*",
        "sidecar*",
    ]
    for script in project["project"]["scripts"].values():
        module, attr = script.split(":")
        assert callable(getattr(importlib.import_module(module), attr))
