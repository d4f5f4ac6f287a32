"""Server reflection that serves the contracts with their comments.

The generated ``*_pb2`` modules embed descriptors without source info (the comments),
and the library's reflection servicer serves what those hold: `grpcurl describe`
showed no comment. ``make protos`` also writes ``flext_mesh/v1/descriptors.binpb``,
the contracts with source info; this servicer serves each generated file's descriptor
with the comments of that set added. Nothing else changes: the set's ``json_name``
fields are left out, so grpcurl still prints and reads JSON with the proto field
names. Lookups go through a pool of their own, never the default pool the generated
modules live in. Files outside the set (the well-known types, ``grpc.health.v1``,
reflection itself, ``google.rpc``'s error details that errors carry) are served as the
process holds them, without comments; a name the pool lacks is looked up in the
process's default pool before it is NOT_FOUND (grpcurl asks for the type of each error
detail it prints: ``google.rpc.BadRequest``).
"""

from __future__ import annotations

import functools
import importlib
import logging
from collections.abc import Iterable, Mapping
from importlib import resources

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

__all__ = ["SERVICE_NAME", "enable_reflection"]

#: The reflection service's full name (for the list of services reflection names).
SERVICE_NAME: str = reflection.SERVICE_NAME

_DESCRIPTOR_SET = "descriptors.binpb"

_log = logging.getLogger("flext_mesh.rpc.reflection")


def _module_of(file_name: str) -> str:
    """``flext_mesh/v1/registry.proto`` -> ``flext_mesh.v1.registry_pb2``."""
    return file_name.removesuffix(".proto").replace("/", ".") + "_pb2"


def _without_comments(
    file: descriptor_pb2.FileDescriptorProto,
) -> descriptor_pb2.FileDescriptorProto:
    """``file`` as the generated modules hold it: no source info, no json_name."""
    bare = descriptor_pb2.FileDescriptorProto()
    bare.CopyFrom(file)
    bare.ClearField("source_code_info")
    messages = list(bare.message_type)
    while messages:
        message = messages.pop()
        messages.extend(message.nested_type)
        for field in (*message.field, *message.extension):
            field.ClearField("json_name")
    for field in bare.extension:
        field.ClearField("json_name")
    return bare


class _Files:
    """The pool reflection looks names up in, and each file's encoding as served."""

    def __init__(self, described: Iterable[descriptor_pb2.FileDescriptorProto]) -> None:
        self.pool = descriptor_pool.DescriptorPool()
        self.encoded: dict[str, bytes] = {}
        #: Files of the set that differ from their generated module: served without
        #: comments, since the comments may not belong to what is served.
        self.stale: list[str] = []
        commented = {file.name: file for file in described}
        for name in commented:
            self._add(importlib.import_module(_module_of(name)).DESCRIPTOR, commented)
        for module in (health_pb2, reflection_pb2, status_pb2, error_details_pb2):
            self._add(module.DESCRIPTOR, commented)

    def known(self, descriptor: FileDescriptor) -> FileDescriptor:
        """``descriptor``'s file as this pool holds it (added with its imports first)."""
        self._add(descriptor, {})
        return self.pool.FindFileByName(descriptor.name)

    def _add(
        self,
        descriptor: FileDescriptor,
        commented: Mapping[str, descriptor_pb2.FileDescriptorProto],
    ) -> None:
        if descriptor.name in self.encoded:
            return
        for dependency in descriptor.dependencies:
            self._add(dependency, commented)
        proto = descriptor_pb2.FileDescriptorProto()
        descriptor.CopyToProto(proto)
        with_comments = commented.get(proto.name)
        if with_comments is not None:
            if _without_comments(with_comments) == proto:
                proto.source_code_info.CopyFrom(with_comments.source_code_info)
            else:
                self.stale.append(proto.name)
        self.pool.Add(proto)
        self.encoded[proto.name] = proto.SerializeToString()

    def file_of_method(self, symbol: str) -> FileDescriptor | None:
        """The file of the RPC named ``package.Service.Method`` (which the pool's
        symbol lookup does not find), or None."""
        service_name, _, method = symbol.rpartition(".")
        try:
            service = self.pool.FindServiceByName(service_name)
        except KeyError:
            return None
        return service.file if method in service.methods_by_name else None

    def closure(self, descriptor: FileDescriptor) -> list[bytes]:
        """The encodings of ``descriptor``'s file and every file it imports, itself first."""
        seen: dict[str, None] = {}
        pending = [descriptor]
        while pending:
            file = pending.pop()
            if file.name not in seen:
                seen[file.name] = None
                pending.extend(file.dependencies)
        return [self.encoded[name] for name in seen]


@functools.cache
def _files() -> _Files:
    """The contracts with their comments, read once per process from the package."""
    data = resources.files("flext_mesh.v1").joinpath(_DESCRIPTOR_SET).read_bytes()
    files = _Files(descriptor_pb2.FileDescriptorSet.FromString(data).file)
    if files.stale:
        _log.warning(
            "reflection serves %s without comments: flext_mesh/v1/%s differs from the "
            "generated modules (run 'make protos')",
            ", ".join(files.stale),
            _DESCRIPTOR_SET,
        )
    return files


def _not_found(request: reflection_pb2.ServerReflectionRequest) -> object:
    return reflection_pb2.ServerReflectionResponse(
        error_response=reflection_pb2.ErrorResponse(
            error_code=grpc.StatusCode.NOT_FOUND.value[0], error_message="not found"
        ),
        original_request=request,
    )


class _ReflectionServicer(reflection.aio.ReflectionServicer):  # type: ignore[misc]  # untyped library
    """The library's asyncio servicer; file answers come from :class:`_Files`."""

    def __init__(self, service_names: Iterable[str], files: _Files) -> None:
        super().__init__(service_names, pool=files.pool)
        self._files = files

    def _answer(
        self, request: reflection_pb2.ServerReflectionRequest, file: FileDescriptor
    ) -> object:
        return reflection_pb2.ServerReflectionResponse(
            file_descriptor_response=reflection_pb2.FileDescriptorResponse(
                file_descriptor_proto=self._files.closure(file)
            ),
            original_request=request,
        )

    def _file_by_filename(
        self, request: reflection_pb2.ServerReflectionRequest, filename: str
    ) -> object:
        try:
            file = self._files.pool.FindFileByName(filename)
        except KeyError:
            try:
                file = self._files.known(descriptor_pool.Default().FindFileByName(filename))
            except KeyError:
                return _not_found(request)
        return self._answer(request, file)

    def _file_containing_symbol(
        self, request: reflection_pb2.ServerReflectionRequest, symbol: str
    ) -> object:
        file: FileDescriptor | None
        try:
            file = self._files.pool.FindFileContainingSymbol(symbol)
        except KeyError:
            file = self._files.file_of_method(symbol)
        if file is None:
            try:
                found = descriptor_pool.Default().FindFileContainingSymbol(symbol)
            except KeyError:
                return _not_found(request)
            file = self._files.known(found)
        return self._answer(request, file)

    def _file_containing_extension(
        self,
        request: reflection_pb2.ServerReflectionRequest,
        containing_type: str,
        extension_number: int,
    ) -> object:
        pool = self._files.pool
        try:
            message = pool.FindMessageTypeByName(containing_type)
            extension = pool.FindExtensionByNumber(message, extension_number)
            file = pool.FindFileContainingSymbol(extension.full_name)
        except KeyError:
            return _not_found(request)
        return self._answer(request, file)


def enable_reflection(service_names: Iterable[str], server: grpc.aio.Server) -> None:
    """Serve reflection for ``service_names`` on ``server``, with the contracts' comments."""
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        _ReflectionServicer(service_names, _files()), server
    )
