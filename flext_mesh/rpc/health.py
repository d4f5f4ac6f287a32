"""``grpc.health.v1.Health`` with every method of the protocol, ``List`` included.

grpcio-health-checking's asyncio servicer answers Check and Watch but not List (added
to the protocol in 2024): each List call reached a caller as UNKNOWN-ish UNIMPLEMENTED
and the server's log as a traceback. This one answers it from the same statuses.
"""

from __future__ import annotations

from typing import Any

from grpc_health.v1 import health, health_pb2

__all__ = ["HEALTH_SERVICE", "HealthServicer"]

#: The health service's full name (for reflection and the health statuses).
HEALTH_SERVICE: str = health.SERVICE_NAME


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]  # untyped library
    """The library's asyncio health servicer, plus ``List``."""

    async def List(  # noqa: N802 - the RPC's name
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        """Every service this server reports on, with its status ("" is the server)."""
        response = health_pb2.HealthListResponse()
        for service, status in sorted(self._server_status.items()):
            response.statuses[service].status = status
        return response
