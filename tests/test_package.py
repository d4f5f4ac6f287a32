"""The distribution as users install it: names, typing marker, console scripts."""

from __future__ import annotations

import importlib
import importlib.metadata
import subprocess
import sys
import tomllib
from pathlib import Path

import flext_mesh
import sidecar
from flext_mesh.addresses import AddressError
from flext_mesh.cli.certs import CertsError
from flext_mesh.errors import ConfigError, MeshError
from flext_mesh.rpc.channels import TransportError
from flext_mesh.security.auth import SecurityConfigError
from flext_mesh.security.tokens import TokensFileError
from flext_mesh.server import ServeError
from flext_mesh.store import StoreOpenError
from flext_mesh.version import __version__
from sidecar.app import AppError
from sidecar.main import SidecarError

REPO = Path(__file__).resolve().parent.parent


def test_all_is_complete_and_importable() -> None:
    public = {name for name in dir(flext_mesh) if not name.startswith("_")}
    modules = {"cli", "config", "errors", "logs", "processor", "result", "server", "servicers"}
    modules |= {"store", "v1", "registry", "metrics", "observability", "process"}
    modules |= {"orchestrator", "durations", "facade", "retry"}  # submodules imported on the way
    modules |= {"dashboard", "security", "addresses", "rpc", "routing", "hosting", "names"}
    modules |= {"paging", "documents", "flags"}
    modules |= {"version", "loop", "buckets", "xds"}
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


def _modules_loaded_by(statement: str) -> set[str]:
    code = f"{statement}; import sys; print(chr(10).join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return set(out.stdout.split())


def test_the_sidecar_client_loads_no_store_registry_or_etcd_client() -> None:
    # The data plane must not drag the control plane in: no store, no registry, no aetcd.
    loaded = _modules_loaded_by("import sidecar.client")
    heavy = ("flext_mesh.store", "flext_mesh.registry", "aetcd", "flext_mesh.orchestrator")
    assert sorted(m for m in loaded if m.startswith(heavy)) == []


def test_a_plaintext_sidecar_loads_no_certificate_library() -> None:
    # cryptography is about 12 MB of RSS; only a sidecar given TLS files needs it.
    loaded = _modules_loaded_by("import sidecar.main")
    assert sorted(m for m in loaded if m.startswith("cryptography")) == []


def test_the_library_loads_without_the_control_plane() -> None:
    # Service code imports FlextResult and ServiceProcessor: no servicers, no store.
    loaded = _modules_loaded_by("import flext_mesh")
    heavy = ("flext_mesh.store", "flext_mesh.registry", "flext_mesh.servicers", "sidecar")
    assert sorted(m for m in loaded if m.startswith(heavy)) == []


def test_every_startup_error_is_a_config_error() -> None:

    startup = (AddressError, CertsError, TransportError, SecurityConfigError, TokensFileError)
    startup += (ServeError, StoreOpenError, AppError, SidecarError)
    for cls in startup:
        assert issubclass(cls, ConfigError), cls
        assert not issubclass(cls, MeshError), cls


def test_version_is_one_number_printed_by_both_commands() -> None:
    # pyproject reads flext_mesh.version; the installed scripts print the same number.
    installed = importlib.metadata.version("flext-mesh")
    assert installed == __version__
    bin_dir = Path(sys.executable).parent
    for command in ("flext-mesh", "flext-sidecar"):
        done = subprocess.run(
            [str(bin_dir / command), "--version"],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert (done.returncode, done.stdout, done.stderr) == (0, f"{command} {installed}\n", "")


def test_sidecar_version_with_a_value_is_still_the_instance_version() -> None:
    # --version VALUE is what the instance registers for traffic splits, not a request to print.
    bin_dir = Path(sys.executable).parent
    done = subprocess.run(
        [str(bin_dir / "flext-sidecar"), "--version", "1.4.0"],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 2
    assert "app: Field required" in done.stderr
    assert __version__ not in done.stdout


def test_the_otlp_exporter_loads_beside_the_xds_protos() -> None:
    """xds-protos ships an old copy of opentelemetry-proto's modules over the real ones
    (grpc/grpc#42926); `make install` puts the real ones back, and a process asked to
    export over OTLP checks it before it starts."""
    from flext_mesh.rpc import tracing  # noqa: PLC0415 - imported by this test alone

    assert tracing.settings_problem({"OTEL_TRACES_EXPORTER": "otlp"}) == ""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )

    assert OTLPSpanExporter is not None
    import envoy.service.discovery.v3.ads_pb2_grpc  # noqa: PLC0415 - the xDS side loads

    assert envoy.service.discovery.v3.ads_pb2_grpc.AggregatedDiscoveryServiceStub is not None
