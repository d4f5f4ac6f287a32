"""Processors for the traffic-policy tests, served by real sidecars.

``payment`` answers which instance and version served (from the environment the test
starts the sidecar with); ``shop`` calls payment through its sidecar's mesh client
with no timeout of its own, so the pushed policy decides timeouts, retries, splits
and zones.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

from flext_mesh import FlextResult, ServiceProcessor
from flext_mesh.errors import MeshError

_lock = threading.Lock()
_calls: dict[str, int] = {}


def _served() -> dict[str, Any]:
    return {
        "instance": os.environ.get("POLICY_INSTANCE", "?"),
        "version": os.environ.get("POLICY_VERSION", "?"),
    }


class Charge(ServiceProcessor[dict[str, Any], dict[str, Any], dict[str, Any]]):
    """Answer who served; ``seconds`` makes it slow."""

    async def process(self, request: dict[str, Any]) -> FlextResult[dict[str, Any]]:
        await asyncio.sleep(float(request.get("seconds", 0)))
        return FlextResult.ok(_served())

    def build(self, domain: dict[str, Any], *, correlation_id: str) -> dict[str, Any]:
        return domain


class Flaky(ServiceProcessor[dict[str, Any], dict[str, Any], dict[str, Any]]):
    """Fail with ABORTED on the first call of each ``key``, then succeed."""

    def process(self, request: dict[str, Any]) -> FlextResult[dict[str, Any]]:
        key = str(request.get("key", ""))
        with _lock:
            _calls[key] = _calls.get(key, 0) + 1
            n = _calls[key]
        if n == 1:
            return FlextResult.fail("conflict, try again", code="ABORTED")
        return FlextResult.ok({**_served(), "calls": n})

    def build(self, domain: dict[str, Any], *, correlation_id: str) -> dict[str, Any]:
        return domain


class Buy(ServiceProcessor[dict[str, Any], dict[str, Any], dict[str, Any]]):
    """Call ``payment.<operation>`` through the mesh; report the outcome as data."""

    async def process(self, request: dict[str, Any]) -> FlextResult[dict[str, Any]]:
        from sidecar.client import mesh  # noqa: PLC0415 - only inside a sidecar

        operation = str(request.get("operation", "charge"))
        payload = dict(request.get("payload") or {})
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            receipt = await mesh().call("payment", operation, payload)
        except MeshError as exc:
            return FlextResult.ok(
                {"error": exc.code.name, "seconds": loop.time() - started, "message": exc.message}
            )
        return FlextResult.ok({**receipt, "seconds": loop.time() - started})

    def build(self, domain: dict[str, Any], *, correlation_id: str) -> dict[str, Any]:
        return domain


PAYMENT = {"charge": Charge(), "slow": Charge(), "flaky": Flaky()}
SHOP = {"buy": Buy()}
