"""A chain of three services for ``flext-sidecar --app tests.sidecar.hops_app:HOP_X``.

``hop-a.a`` calls ``hop-b.b`` through the sidecar's mesh client (from a task it starts),
which calls ``hop-c.c``; ``c`` decides by ``mode``: ``ok``, ``raise`` (InvalidArgument
with a field violation), ``return`` (a FAILED_PRECONDITION FlextResult) or ``crash`` (a
bug: INTERNAL). ``b`` lets a nested error escape, or with ``mode: return`` hands it on as
a returned FlextResult. Every run appends one JSON line to the file named by
``$HOPS_RUNS``: what the processor saw of the call (correlation id, context, trace
headers), so a test counts runs and follows one id across the hops.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from typing import Any

from pydantic import BaseModel

from flext_mesh import FlextResult, ServiceProcessor
from flext_mesh.errors import FieldViolation, InvalidArgument, MeshError
from flext_mesh.rpc import context


class HopRequest(BaseModel):
    """What travels along the chain."""

    mode: str = "ok"
    amount: float = 1.0


def _seen(processor: ServiceProcessor[Any, Any, Any], operation: str) -> str:
    served = context.current()
    left = None if served is None else served.remaining()
    return json.dumps(
        {
            "operation": operation,
            "correlation_id": processor.correlation_id,
            "context_correlation_id": None if served is None else served.correlation_id,
            "traceparent": None if served is None else served.traceparent,
            "tracestate": None if served is None else served.tracestate,
            "deadline_left": left,
            "at": time.time(),
        }
    )


def _append(line: str) -> None:
    path = os.environ.get("HOPS_RUNS")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(line + "\n")


class HopA(ServiceProcessor[HopRequest, dict[str, Any], dict[str, Any]]):
    """First hop: calls hop-b.b from a task it starts."""

    async def process(self, request: HopRequest) -> FlextResult[dict[str, Any]]:
        from sidecar.client import mesh  # noqa: PLC0415 - only inside a sidecar

        await asyncio.to_thread(_append, _seen(self, "a"))
        nested = asyncio.create_task(mesh().call("hop-b", "b", request.model_dump()))
        return FlextResult[dict[str, Any]].ok(await nested)

    def build(self, reply: dict[str, Any], *, correlation_id: str) -> dict[str, Any]:
        return {"a": reply}


class HopB(ServiceProcessor[HopRequest, dict[str, Any], dict[str, Any]]):
    """Second hop: calls hop-c.c; returns its failure as a FlextResult in mode return."""

    async def process(self, request: HopRequest) -> FlextResult[dict[str, Any]]:
        from sidecar.client import mesh  # noqa: PLC0415 - only inside a sidecar

        await asyncio.to_thread(_append, _seen(self, "b"))
        try:
            reply = await mesh().call("hop-c", "c", request.model_dump())
        except MeshError as err:
            if request.mode == "return":
                return err.to_result()
            raise
        return FlextResult[dict[str, Any]].ok(reply)

    def build(self, reply: dict[str, Any], *, correlation_id: str) -> dict[str, Any]:
        return {"b": reply}


class HopC(ServiceProcessor[HopRequest, float, dict[str, Any]]):
    """Last hop (sync, in the sidecar's thread pool): accepts or rejects."""

    def process(self, request: HopRequest) -> FlextResult[float]:
        _append(_seen(self, "c"))
        if request.mode == "raise":
            raise InvalidArgument(
                "amount must be positive", [FieldViolation("amount", "must be > 0")]
            )
        if request.mode == "return":
            return FlextResult[float].fail("card expired", code="FAILED_PRECONDITION")
        if request.mode == "crash":
            raise RuntimeError("a bug in c")
        return FlextResult[float].ok(request.amount)

    def build(self, amount: float, *, correlation_id: str) -> dict[str, Any]:
        return {"charged": amount}


HOP_A = {"a": HopA()}
HOP_B = {"b": HopB()}
HOP_C = {"c": HopC()}
