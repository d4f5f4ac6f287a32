"""Servicers for RPCs not built yet: they answer UNIMPLEMENTED and say when they arrive."""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor

__all__ = ["unimplemented_servicer"]


def unimplemented_servicer(base: type[Any], service: ServiceDescriptor, arrives_with: str) -> Any:
    """An instance of ``base`` whose every RPC aborts with UNIMPLEMENTED and a clear message."""

    def make(method_name: str) -> Any:
        message = (
            f"{service.full_name}/{method_name} is not implemented in this version of "
            f"flext-mesh: it arrives with {arrives_with}"
        )

        async def handler(
            self: Any, request: Any, context: grpc.aio.ServicerContext[Any, Any]
        ) -> Any:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

        handler.__name__ = method_name
        return handler

    namespace = {m.name: make(m.name) for m in service.methods}
    cls = type(f"Unimplemented{service.name}", (base,), namespace)
    return cls()
