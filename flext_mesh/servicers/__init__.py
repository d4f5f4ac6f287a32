"""gRPC servicers: protobuf in, domain calls, protobuf out; status codes live only here."""

from __future__ import annotations

from flext_mesh.servicers.processor import ProcessorServicer

__all__ = ["ProcessorServicer"]
