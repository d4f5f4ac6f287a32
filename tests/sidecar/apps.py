"""Processors that the sidecar tests serve with ``--app tests.sidecar.apps:...``."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

from pydantic import BaseModel

from flext_mesh import FlextResult, ServiceProcessor


class ChargeRequest(BaseModel):
    """What a charge needs."""

    customer_id: str
    amount: float


class Charge(BaseModel):
    """A charge made."""

    customer_id: str
    amount: float


class ChargeService(ServiceProcessor[ChargeRequest, Charge, dict[str, Any]]):
    """Charge a customer."""

    def process(self, request: ChargeRequest) -> FlextResult[Charge]:
        if request.amount <= 0:
            return FlextResult[Charge].fail("Amount must be positive", code="INVALID_ARGUMENT")
        return FlextResult[Charge].ok(Charge(**request.model_dump()))

    def build(self, charge: Charge, *, correlation_id: str) -> dict[str, Any]:
        return {"charged": charge.amount, "correlation_id": correlation_id}


class SlowRequest(BaseModel):
    """How long to work."""

    seconds: float


class SlowService(ServiceProcessor[SlowRequest, float, dict[str, Any]]):
    """Work for a while (to test draining)."""

    async def process(self, request: SlowRequest) -> FlextResult[float]:
        await asyncio.sleep(request.seconds)
        return FlextResult[float].ok(time.time())

    def build(self, finished: float, *, correlation_id: str) -> dict[str, Any]:
        return {"finished": finished}


class CheckoutRequest(BaseModel):
    """An order to pay through the mesh."""

    customer_id: str
    amount: float


class CheckoutService(ServiceProcessor[CheckoutRequest, dict[str, Any], dict[str, Any]]):
    """Pay for an order by calling payment.charge through this sidecar's mesh client."""

    async def process(self, request: CheckoutRequest) -> FlextResult[dict[str, Any]]:
        from sidecar.client import mesh  # noqa: PLC0415 - only inside a sidecar

        receipt = await mesh().call("payment", "charge", request.model_dump(), timeout=5)
        return FlextResult[dict[str, Any]].ok(receipt)

    def build(self, receipt: dict[str, Any], *, correlation_id: str) -> dict[str, Any]:
        return {"paid": receipt["charged"]}


class WhoAmIRequest(BaseModel):
    """How long to work before answering."""

    seconds: float = 0.0


class WhoAmIService(ServiceProcessor[WhoAmIRequest, float, dict[str, Any]]):
    """Answer which process (so which instance) served the call, after a while."""

    async def process(self, request: WhoAmIRequest) -> FlextResult[float]:
        await asyncio.sleep(request.seconds)
        return FlextResult[float].ok(request.seconds)

    def build(self, seconds: float, *, correlation_id: str) -> dict[str, Any]:
        return {"pid": os.getpid(), "seconds": seconds}


PROCESSORS = {"charge": ChargeService(), "slow": SlowService()}
WHOAMI = {"whoami": WhoAmIService()}
CHECKOUT = {"checkout": CheckoutService()}


def make_processors() -> dict[str, ServiceProcessor[Any, Any, Any]]:
    """The same, from a factory."""
    return dict(PROCESSORS)


NOT_A_MAPPING = 42
BAD_VALUE = {"charge": "not a processor"}
