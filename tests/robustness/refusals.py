"""What a client sees of a refused call: code, message, field violations, status size.

Shared by the bad-input tests. The status is read the way a client reads it: the
``grpc-message`` and the ``grpc-status-details-bin`` trailer (``google.rpc.Status``
with ``google.rpc.BadRequest``), unpacked with grpcio-status.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from flext_mesh.server import ControlPlane
from flext_mesh.v1 import (
    metrics_pb2_grpc,
    orchestrator_pb2_grpc,
    registry_pb2_grpc,
)
from tests.robustness.conftest import StartPlane

#: The character the tests fill oversized fields with; no message of the control
#: plane contains it, so counting it counts what a status quotes of the request.
MARKER = "Q"
#: Most characters of a request a status may quote back.
MAX_ECHO = 300


@dataclass
class Refusal:
    """A failed call as the client saw it."""

    code: grpc.StatusCode
    message: str
    violations: list[tuple[str, str]]
    #: Bytes of every trailer the client received (the status travels there).
    trailer_bytes: int
    #: The message and the serialized details, for counting what they quote.
    text: str

    @property
    def fields(self) -> list[str]:
        """The field paths the violations name."""
        return [field for field, _ in self.violations]

    def echoed(self, marker: str = MARKER) -> int:
        """How many characters of the marker the status quotes, message and details."""
        return self.text.count(marker)


def refusal_of(exc: grpc.aio.AioRpcError) -> Refusal:
    """Read a client-side error into a Refusal."""
    trailers = exc.trailing_metadata() or ()
    size = sum(len(key) + len(value) for key, value in trailers)
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    violations: list[tuple[str, str]] = []
    details = ""
    if status is not None:
        for detail in status.details:
            details += detail.value.decode("utf-8", errors="replace")
            if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                violations += [(v.field, v.description) for v in bad.field_violations]
    message = exc.details() or ""
    return Refusal(exc.code(), message, violations, size, message + details)


async def refused(call: Awaitable[Any]) -> Refusal:
    """Await a unary call that must fail; its refusal."""
    try:
        reply = await call
    except grpc.aio.AioRpcError as exc:
        return refusal_of(exc)
    raise AssertionError(f"the call succeeded: {reply}")


async def stream_refused(call: Any) -> Refusal:
    """Read a server stream that must fail before its first message; its refusal."""
    try:
        async for message in call:
            raise AssertionError(f"the stream answered: {message}")
    except grpc.aio.AioRpcError as exc:
        return refusal_of(exc)
    raise AssertionError("the stream ended without an error")


@dataclass
class Stubs:
    """One control plane and a stub of each of its services."""

    plane: ControlPlane
    registry: registry_pb2_grpc.RegistryServiceStub
    metrics: metrics_pb2_grpc.MetricsServiceStub
    orchestrator: orchestrator_pb2_grpc.OrchestratorServiceStub


def stubs_on(plane: ControlPlane, channel: grpc.aio.Channel) -> Stubs:
    """The stubs of a plane over ``channel``."""
    return Stubs(
        plane,
        registry_pb2_grpc.RegistryServiceStub(channel),
        metrics_pb2_grpc.MetricsServiceStub(channel),
        orchestrator_pb2_grpc.OrchestratorServiceStub(channel),
    )


async def open_stubs(
    start_plane: StartPlane, channels: Callable[[str], grpc.aio.Channel], **overrides: Any
) -> Stubs:
    """Start a control plane on an ephemeral port (SQLite in tmp_path); its stubs."""
    plane = await start_plane(**overrides)
    return stubs_on(plane, channels(f"127.0.0.1:{plane.port}"))


__all__ = [
    "MARKER",
    "MAX_ECHO",
    "Refusal",
    "Stubs",
    "open_stubs",
    "refusal_of",
    "refused",
    "stream_refused",
    "stubs_on",
]
