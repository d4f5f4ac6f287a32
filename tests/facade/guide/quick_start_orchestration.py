"""Quick Start, "Service Orchestration Setup": order fulfillment.

Runs the guide's usage code when executed (see the package docstring): the workflow
runs as a durable execution on the control plane, which calls the two local services.
"""

from __future__ import annotations

from flext_mesh import FlextResult, FlextServices
from tests.facade.guide._domain import Json, JsonService

# -- filled in: the services the guide leaves undefined ---------------------------------


class PaymentProcessor(JsonService):
    """Validates the payment of an order (any order without a ``declined`` flag)."""

    def handle(self, request: Json) -> FlextResult[Json]:
        if request.get("declined"):
            return FlextResult.fail("payment declined", code="FAILED_PRECONDITION")
        return FlextResult.ok({"payment": "validated"})


class InventoryManager(JsonService):
    """Reserves the stock of an order."""

    def handle(self, request: Json) -> FlextResult[Json]:
        return FlextResult.ok({"reserved": True})


# -- the guide's code, verbatim ---------------------------------------------------------


# fmt: off
# Service orchestration with multiple services
class OrderFulfillmentOrchestrator:
    def __init__(self):
        self.orchestrator = FlextServices.ServiceOrchestrator()
        self.registry = FlextServices.ServiceRegistry()
        self.metrics = FlextServices.ServiceMetrics()

        # Register services
        self._setup_services()

    def _setup_services(self):
        """Register services for orchestration."""
        payment_service = PaymentProcessor()
        self.orchestrator.register_service("payment", payment_service)

        inventory_service = InventoryManager()
        self.orchestrator.register_service("inventory", inventory_service)
# fmt: on

# -- filled in: the ``orchestrator`` the guide's last line uses -------------------------
# deviation: the guide calls ``orchestrator.orchestrate_workflow`` without creating
# ``orchestrator``; the orchestrator of an OrderFulfillmentOrchestrator is meant.
order_fulfillment = OrderFulfillmentOrchestrator()
orchestrator = order_fulfillment.orchestrator

# -- the guide's code, verbatim (continued) ---------------------------------------------

# fmt: off
# Workflow execution with orchestration
workflow = {
    "workflow_id": "order_fulfillment_123",
    "steps": [
        {"step": "validate_payment", "service": "payment", "required": True},
        {"step": "reserve_inventory", "service": "inventory", "required": True}
    ]
}

result = orchestrator.orchestrate_workflow(workflow)
# fmt: on
