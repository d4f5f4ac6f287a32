"""The demo's services, written as the guide writes them (Template Method processors)."""

from __future__ import annotations

import os
import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, Field

from flext_mesh import FlextResult, ServiceProcessor


class PaymentRequest(BaseModel):
    """What a payment needs."""

    order_id: str
    amount: float


class Payment(BaseModel):
    """A payment made."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex[:8])
    order_id: str
    amount: float
    status: str = "captured"


class PaymentProcessor(ServiceProcessor[PaymentRequest, Payment, dict[str, Any]]):
    """Capture a payment for an order."""

    def process(self, request: PaymentRequest) -> FlextResult[Payment]:
        if request.amount <= 0:
            return FlextResult[Payment].fail("Amount must be positive", code="INVALID_ARGUMENT")
        if request.amount > 10_000:
            return FlextResult[Payment].fail(
                "High-value orders need approval", code="FAILED_PRECONDITION"
            )
        return FlextResult[Payment].ok(Payment(order_id=request.order_id, amount=request.amount))

    def build(self, payment: Payment, *, correlation_id: str) -> dict[str, Any]:
        return {
            "payment_id": payment.id,
            "status": payment.status,
            "amount": payment.amount,
            "instance": os.environ.get("DEMO_INSTANCE", "?"),
            "correlation_id": correlation_id,
        }


class ReservationRequest(BaseModel):
    """Items to reserve."""

    order_id: str
    items: list[str]


class InventoryManager(ServiceProcessor[ReservationRequest, dict[str, Any], dict[str, Any]]):
    """Reserve stock for an order."""

    def process(self, request: ReservationRequest) -> FlextResult[dict[str, Any]]:
        if not request.items:
            return FlextResult[dict[str, Any]].fail("Nothing to reserve", code="INVALID_ARGUMENT")
        return FlextResult[dict[str, Any]].ok(
            {"order_id": request.order_id, "items": request.items}
        )

    def build(self, reservation: dict[str, Any], *, correlation_id: str) -> dict[str, Any]:
        return {
            "reservation_id": f"r-{reservation['order_id']}",
            "reserved": len(reservation["items"]),
            "at": datetime.now(UTC).isoformat(timespec="seconds"),
        }


class PaymentValidator(ServiceProcessor[PaymentRequest, PaymentRequest, dict[str, Any]]):
    """Check that a payment can be attempted (the workflow's first step)."""

    def process(self, request: PaymentRequest) -> FlextResult[PaymentRequest]:
        if request.amount <= 0:
            return FlextResult[PaymentRequest].fail(
                "Amount must be positive", code="INVALID_ARGUMENT"
            )
        return FlextResult[PaymentRequest].ok(request)

    def build(self, request: PaymentRequest, *, correlation_id: str) -> dict[str, Any]:
        return {"order_id": request.order_id, "amount": request.amount, "validated": True}


class ReleaseRequest(BaseModel):
    """A reservation to give back."""

    reservation_id: str


class InventoryRelease(ServiceProcessor[ReleaseRequest, str, dict[str, Any]]):
    """Release a reservation: the compensation of reserve_inventory."""

    def process(self, request: ReleaseRequest) -> FlextResult[str]:
        return FlextResult[str].ok(request.reservation_id)

    def build(self, reservation_id: str, *, correlation_id: str) -> dict[str, Any]:
        return {"released": reservation_id}


PAYMENT = {
    "charge": PaymentProcessor(),
    # The workflow steps of examples/workflows/order_fulfillment.yaml and the demo.
    "validate_payment": PaymentValidator(),
    "process_payment": PaymentProcessor(),
}
INVENTORY = {
    "reserve": InventoryManager(),
    "reserve_inventory": InventoryManager(),
    "release_inventory": InventoryRelease(),
}
