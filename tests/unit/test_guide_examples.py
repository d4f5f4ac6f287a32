"""The FlextServices guide's ServiceProcessor examples, run against flext_mesh unchanged.

`UserRegistrationService` and `OrderProcessingService` below keep the guide's method
bodies; only the imports differ, plus the domain classes the guide leaves undefined.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import TypeAlias
from uuid import uuid4

import pydantic
import pytest

from flext_mesh.processor import ServiceProcessor as _ServiceProcessor
from flext_mesh.processor import default_recorder
from flext_mesh.result import FlextResult


class FlextServices:
    """Lets the guide's `FlextServices.ServiceProcessor[...]` spelling work unchanged."""

    ServiceProcessor: TypeAlias = _ServiceProcessor


# -- the domain classes the guide uses but does not define -------------------------------


def _new_id() -> str:
    return uuid4().hex


class UserRequest(pydantic.BaseModel):
    email: str
    name: str


class User(pydantic.BaseModel):
    id: str = pydantic.Field(default_factory=_new_id)
    email: str
    name: str
    created_at: datetime = pydantic.Field(default_factory=datetime.utcnow)


class UserResponse(pydantic.BaseModel):
    user_id: str
    email: str
    name: str
    correlation_id: str
    timestamp: datetime


class OrderItem(pydantic.BaseModel):
    sku: str
    qty: int = pydantic.Field(gt=0)


class OrderRequest(pydantic.BaseModel):
    customer_id: str
    amount: float
    items: list[OrderItem] = []


class Order(pydantic.BaseModel):
    id: str = pydantic.Field(default_factory=_new_id)
    customer_id: str
    amount: float
    items: list[OrderItem]
    status: str
    approval_required: bool = False
    created_at: datetime = pydantic.Field(default_factory=datetime.utcnow)


class OrderResponse(pydantic.BaseModel):
    order_id: str
    status: str
    amount: float
    correlation_id: str
    created_at: datetime


# -- the guide's services (method bodies as in the guide) -------------------------------


class UserRegistrationService(FlextServices.ServiceProcessor[UserRequest, User, UserResponse]):
    """User registration using Template Method pattern."""

    def process(self, request: UserRequest) -> FlextResult[User]:
        """Process request into domain object (business logic only)."""

        # Business validation
        if not request.email or "@" not in request.email:
            return FlextResult[User].fail("Invalid email address")

        # Create domain object
        user = User(
            email=request.email.lower().strip(),
            name=request.name.strip(),
            created_at=datetime.utcnow(),
        )

        return FlextResult[User].ok(user)

    def build(self, user: User, *, correlation_id: str) -> UserResponse:
        """Build final result (pure function)."""
        return UserResponse(
            user_id=user.id,
            email=user.email,
            name=user.name,
            correlation_id=correlation_id,
            timestamp=datetime.utcnow(),
        )


class OrderProcessingService(FlextServices.ServiceProcessor[OrderRequest, Order, OrderResponse]):
    """Order processing showing Template Method benefits."""

    def process(self, request: OrderRequest) -> FlextResult[Order]:
        """Focus on business logic only."""

        # Business validation
        if request.amount <= 0:
            return FlextResult[Order].fail("Amount must be positive")

        # Business logic
        order = Order(
            customer_id=request.customer_id,
            amount=request.amount,
            items=request.items,
            status="processing",
        )

        # Business rule validation
        if order.amount > 10000:  # High-value order
            order.approval_required = True

        return FlextResult[Order].ok(order)

    def build(self, order: Order, *, correlation_id: str) -> OrderResponse:
        """Pure function - no side effects."""
        return OrderResponse(
            order_id=order.id,
            status=order.status,
            amount=order.amount,
            correlation_id=correlation_id,  # Template Method provides this
            created_at=order.created_at,
        )


# -- the guide's usage ------------------------------------------------------------------

HEX32 = re.compile(r"^[0-9a-f]{32}$")


@pytest.fixture(autouse=True)
def _fresh_default_recorder() -> None:
    default_recorder.clear()


def _guide_report(result: FlextResult[UserResponse]) -> None:
    """The guide's Quick Start reporting snippet, verbatim."""
    if result.success:
        print(f"User registered: {result.value.user_id}")
    else:
        print(f"Registration failed: {result.error}")


def test_quick_start_user_registration(capsys: pytest.CaptureFixture[str]) -> None:
    request = UserRequest(email="  Ada@Example.COM ", name=" Ada Lovelace ")

    user_service = UserRegistrationService()
    result = user_service.run_with_metrics("user_registration", request)
    _guide_report(result)

    response = result.value
    assert capsys.readouterr().out == f"User registered: {response.user_id}\n"
    assert HEX32.match(response.user_id)
    assert response.email == "ada@example.com"
    assert response.name == "Ada Lovelace"
    assert HEX32.match(response.correlation_id)
    [run] = default_recorder.records()
    assert run.processor == "UserRegistrationService"
    assert run.category == "user_registration"
    assert run.correlation_id == response.correlation_id
    assert run.success
    assert run.duration_ms >= 0


def test_quick_start_user_registration_rejected(capsys: pytest.CaptureFixture[str]) -> None:
    user_service = UserRegistrationService()
    result = user_service.run_with_metrics(
        "user_registration", UserRequest(email="not-an-email", name="Bob")
    )
    _guide_report(result)

    assert capsys.readouterr().out == "Registration failed: Invalid email address\n"
    assert result.code == "FAILED_PRECONDITION"
    [run] = default_recorder.records()
    assert (run.success, run.error) == (False, "Invalid email address")


def test_correlation_id_from_caller_reaches_response() -> None:
    result = UserRegistrationService().run_with_metrics(
        "user_registration", UserRequest(email="a@b.c", name="A"), correlation_id="req-77"
    )
    assert result.value.correlation_id == "req-77"
    assert default_recorder.records()[0].correlation_id == "req-77"


def test_order_standard_processing_with_metrics() -> None:
    order_service = OrderProcessingService()
    order_request = OrderRequest(customer_id="c-1", amount=250.0, items=[OrderItem(sku="a", qty=2)])

    result = order_service.run_with_metrics("order_processing", order_request)

    response = result.value
    assert response.status == "processing"
    assert response.amount == 250.0
    assert HEX32.match(response.order_id)
    assert HEX32.match(response.correlation_id)
    assert default_recorder.snapshot()["order_processing"].count == 1


def test_order_rules() -> None:
    order_service = OrderProcessingService()

    rejected = order_service.run_with_metrics(
        "order_processing", OrderRequest(customer_id="c-1", amount=0)
    )
    high_value = order_service.process(OrderRequest(customer_id="c-1", amount=20_000))
    normal = order_service.process(OrderRequest(customer_id="c-1", amount=10))

    assert rejected.is_failure
    assert rejected.error == "Amount must be positive"
    assert default_recorder.snapshot()["order_processing"].failures == 1
    assert isinstance(high_value, FlextResult)
    assert isinstance(normal, FlextResult)
    assert high_value.value.approval_required is True
    assert normal.value.approval_required is False


def test_order_json_processing_with_validation() -> None:
    order_service = OrderProcessingService()
    json_string = '{"customer_id": "c-9", "amount": 99.5, "items": [{"sku": "x", "qty": 1}]}'

    json_result = order_service.process_json(
        json_string,
        OrderRequest,  # Pydantic model for validation
        lambda req: order_service.run_with_metrics("json_order", req),
    )

    assert json_result.value.amount == 99.5
    assert json_result.value.status == "processing"
    [run] = default_recorder.records()
    assert (run.category, run.success) == ("json_order", True)
    assert run.correlation_id == json_result.value.correlation_id


def test_order_json_processing_rejects_bad_input() -> None:
    order_service = OrderProcessingService()

    def handler(req: OrderRequest) -> FlextResult[OrderResponse]:  # the guide's lambda
        return order_service.run_with_metrics("json_order", req)

    broken = order_service.process_json('{"customer_id": ', OrderRequest, handler)
    invalid = order_service.process_json(
        '{"amount": "lots", "items": [{"sku": "x", "qty": 0}]}', OrderRequest, handler
    )

    assert broken.code == "INVALID_ARGUMENT"
    assert "Invalid JSON" in (broken.error or "")
    assert invalid.code == "INVALID_ARGUMENT"
    assert sorted(f for f, _ in invalid.field_violations) == [
        "amount",
        "customer_id",
        "items.0.qty",
    ]
    assert "items.0.qty: Input should be greater than 0" in (invalid.error or "")
    assert default_recorder.records() == []  # the handler never ran


def test_order_batch_processing_with_error_collection() -> None:
    order_service = OrderProcessingService()
    batch_requests = [
        OrderRequest(customer_id="c-1", amount=10),
        OrderRequest(customer_id="c-2", amount=-5),
        OrderRequest(customer_id="c-3", amount=30),
    ]

    successes, errors = order_service.run_batch(
        batch_requests, lambda req: order_service.run_with_metrics("batch_order", req)
    )

    assert [s.amount for s in successes] == [10, 30]
    assert all(isinstance(s, OrderResponse) for s in successes)
    assert errors == ["Amount must be positive"]
    stats = default_recorder.snapshot()["batch_order"]
    assert (stats.count, stats.failures) == (3, 1)
