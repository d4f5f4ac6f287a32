"""The descriptor set reflection serves: the generated contracts plus their comments."""

from __future__ import annotations

import tomllib
from importlib import resources

from google.protobuf import descriptor_pb2

from flext_mesh.rpc.reflection import _Files, _files
from flext_mesh.v1 import registry_pb2
from tests.conftest import REPO

CONTRACTS = {
    path.relative_to(REPO / "protos").as_posix() for path in REPO.glob("protos/**/*.proto")
}


def _served(files: _Files, name: str) -> descriptor_pb2.FileDescriptorProto:
    return descriptor_pb2.FileDescriptorProto.FromString(files.encoded[name])


def test_the_package_ships_every_contract_with_its_comments() -> None:
    data = resources.files("flext_mesh.v1").joinpath("descriptors.binpb").read_bytes()
    shipped = descriptor_pb2.FileDescriptorSet.FromString(data)
    assert {file.name for file in shipped.file} == CONTRACTS
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "v1/descriptors.binpb" in project["tool"]["setuptools"]["package-data"]["flext_mesh"]
    files = _files()
    assert files.stale == []
    for name in CONTRACTS:
        served = _served(files, name)
        assert len(served.source_code_info.location) > 10, name
        # The fields keep their proto names in JSON: no json_name is served.
        assert all(
            not field.json_name for message in served.message_type for field in message.field
        )


def test_a_set_that_differs_from_the_generated_modules_is_served_without_comments() -> None:
    data = resources.files("flext_mesh.v1").joinpath("descriptors.binpb").read_bytes()
    shipped = descriptor_pb2.FileDescriptorSet.FromString(data)
    registry = next(f for f in shipped.file if f.name == "flext_mesh/v1/registry.proto")
    del registry.message_type[0].field[-1]  # an edited proto, not regenerated
    files = _Files(shipped.file)
    assert files.stale == ["flext_mesh/v1/registry.proto"]
    served = _served(files, "flext_mesh/v1/registry.proto")
    assert not served.HasField("source_code_info")
    generated = descriptor_pb2.FileDescriptorProto()
    registry_pb2.DESCRIPTOR.CopyToProto(generated)
    assert served == generated  # what the process encodes with, not the edited set
    assert _served(files, "flext_mesh/v1/common.proto").HasField("source_code_info")
