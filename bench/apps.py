"""The processors ``bench.sidecar`` serves: a tiny charge with a pydantic request model.

The sidecar hosts them with ``--app bench.apps:PROCESSORS``; the direct baseline runs
the very same objects' ``process`` and ``build`` behind a plain ``grpc.aio`` servicer.

- ``charge``: a plain ``def process`` (how most processors are written). The sidecar
  runs sync processors in its thread pool, so this one pays a thread hop per call.
- ``charge_async``: the same logic with ``async def process``: the sidecar awaits it
  on its event loop, as the direct servicer does for both.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from flext_mesh import FlextResult, ServiceProcessor

__all__ = [
    "PAYLOAD",
    "PROCESSORS",
    "AsyncChargeService",
    "Charge",
    "ChargeRequest",
    "ChargeService",
]


class ChargeRequest(BaseModel):
    """What a charge needs."""

    customer_id: str
    amount: float


class Charge(BaseModel):
    """A charge made."""

    customer_id: str
    amount: float


PAYLOAD: dict[str, Any] = {"customer_id": "c-0042", "amount": 12.5}
"""The request payload every benchmark call sends."""


def _charge(request: ChargeRequest) -> FlextResult[Charge]:
    if request.amount <= 0:
        return FlextResult[Charge].fail("Amount must be positive", code="INVALID_ARGUMENT")
    return FlextResult[Charge].ok(Charge(customer_id=request.customer_id, amount=request.amount))


def _build(charge: Charge, correlation_id: str) -> dict[str, Any]:
    return {
        "customer_id": charge.customer_id,
        "charged": charge.amount,
        "correlation_id": correlation_id,
    }


class ChargeService(ServiceProcessor[ChargeRequest, Charge, dict[str, Any]]):
    """Charge a customer (sync process)."""

    def process(self, request: ChargeRequest) -> FlextResult[Charge]:
        return _charge(request)

    def build(self, charge: Charge, *, correlation_id: str) -> dict[str, Any]:
        return _build(charge, correlation_id)


class AsyncChargeService(ServiceProcessor[ChargeRequest, Charge, dict[str, Any]]):
    """Charge a customer (async process)."""

    async def process(self, request: ChargeRequest) -> FlextResult[Charge]:
        return _charge(request)

    def build(self, charge: Charge, *, correlation_id: str) -> dict[str, Any]:
        return _build(charge, correlation_id)


PROCESSORS: dict[str, ServiceProcessor[Any, Any, Any]] = {
    "charge": ChargeService(),
    "charge_async": AsyncChargeService(),
}
"""Operation name -> processor, for ``--app bench.apps:PROCESSORS``."""
