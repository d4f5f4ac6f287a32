"""ProcessorService: runs the ServiceProcessors hosted by this process.

The control plane hosts none of its own (it lists an empty set); the sidecar hosts the
app's processors through the same servicer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import grpc

from flext_mesh.errors import NotFound, Unimplemented, rpc_errors
from flext_mesh.processor import ServiceProcessor
from flext_mesh.v1 import processor_pb2, processor_pb2_grpc

__all__ = ["ProcessorServicer"]

_Context = grpc.aio.ServicerContext[Any, Any]


class ProcessorServicer(processor_pb2_grpc.ProcessorServiceServicer):
    """Serves Invoke and ListOperations for a fixed mapping of operation name to processor."""

    def __init__(
        self,
        operations: Mapping[str, ServiceProcessor[Any, Any, Any]],
        *,
        service_name: str,
        instance_id: str = "",
        version: str = "",
    ) -> None:
        self._operations = dict(operations)
        self._service_name = service_name
        self._instance_id = instance_id
        self._version = version

    @rpc_errors
    async def Invoke(
        self, request: processor_pb2.InvokeRequest, context: _Context
    ) -> processor_pb2.InvokeResponse:
        """Run one operation (see processor.proto)."""
        if request.operation not in self._operations:
            known = ", ".join(sorted(self._operations)) or "none"
            raise NotFound(
                f"{self._service_name} has no operation {request.operation!r} (known: {known})"
            )
        raise Unimplemented("invoking hosted processors arrives with the sidecar")

    @rpc_errors
    async def ListOperations(
        self, request: processor_pb2.ListOperationsRequest, context: _Context
    ) -> processor_pb2.ListOperationsResponse:
        """List the operations served, sorted by name."""
        return processor_pb2.ListOperationsResponse(
            operations=[
                processor_pb2.OperationInfo(name=name, description=proc.describe())
                for name, proc in sorted(self._operations.items())
            ],
            service_name=self._service_name,
            instance_id=self._instance_id,
            version=self._version,
        )
