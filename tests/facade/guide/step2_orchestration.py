"""Step 2, "Basic Service Orchestration": auth, payment and notification as one workflow.

The guide's class only; ``tests/facade/test_guide.py`` drives it. Its services are
served locally and called by the control plane's orchestrator; an optional step that
fails leaves the workflow completed, a failing required step fails it, and
``implement_compensation_patterns`` then runs each compensation action as a workflow.
"""

from __future__ import annotations

import time
import uuid

from flext_mesh import FlextResult, FlextServices
from tests.facade.guide._domain import Json, JsonService

# -- filled in: the services the guide leaves undefined ---------------------------------
# The orchestrator serves one processor per service for every operation name (the
# step's, or a compensation action's): a request carrying ``action`` is a compensation.


class AuthenticationService(JsonService):
    """Authenticates a user: a token is required."""

    def handle(self, request: Json) -> FlextResult[Json]:
        if "action" in request:
            return FlextResult.ok({"action": request["action"], "done": True})
        if not request.get("token"):
            return FlextResult.fail("no token given", code="UNAUTHENTICATED")
        return FlextResult.ok({"user": request.get("user"), "authenticated": True})


class PaymentProcessingService(JsonService):
    """Charges a payment; refunds and releases it when asked to compensate."""

    def handle(self, request: Json) -> FlextResult[Json]:
        if "action" in request:
            return FlextResult.ok({"action": request["action"], "done": True})
        amount = request.get("amount")
        if not isinstance(amount, int | float) or amount <= 0:
            return FlextResult.fail(
                f"amount must be positive, got {amount!r}", code="FAILED_PRECONDITION"
            )
        return FlextResult.ok({"charged": amount, "payment_id": f"pay-{uuid.uuid4().hex[:8]}"})


class NotificationService(JsonService):
    """Sends the confirmation e-mail; needs an address."""

    def handle(self, request: Json) -> FlextResult[Json]:
        if "action" in request:
            return FlextResult.ok({"action": request["action"], "done": True})
        to = request.get("to")
        if not isinstance(to, str) or "@" not in to:
            return FlextResult.fail(f"no e-mail address in {to!r}", code="INVALID_ARGUMENT")
        return FlextResult.ok({"sent_to": to})


# -- the guide's code, verbatim ---------------------------------------------------------


# fmt: off
class ServiceOrchestrationService:
    """Service orchestration implementation patterns."""

    def __init__(self):
        self.orchestrator = FlextServices.ServiceOrchestrator()
        self.registry = FlextServices.ServiceRegistry()
        self.metrics = FlextServices.ServiceMetrics()

    def setup_microservices_orchestration(self):
        """Setup microservices for orchestration."""

        # Register individual services
        auth_service = AuthenticationService()
        payment_service = PaymentProcessingService()
        notification_service = NotificationService()

        # Register with orchestrator
        self.orchestrator.register_service("auth", auth_service)
        self.orchestrator.register_service("payment", payment_service)
        self.orchestrator.register_service("notification", notification_service)

        # Register with service registry for discovery
        self.registry.register({
            "name": "auth_service",
            "type": "authentication",
            "endpoint": "https://auth.company.com",
            "version": "2.1.0"
        })

        self.registry.register({
            "name": "payment_service",
            "type": "payment",
            "endpoint": "https://payment.company.com",
            "version": "1.5.0"
        })

    def execute_complex_workflow(
        self,
        workflow_data: dict[str, object]
    ) -> FlextResult[dict[str, object]]:
        """Execute complex multi-service workflow."""

        workflow_definition = {
            "workflow_id": f"complex_workflow_{self._generate_id()}",
            "steps": [
                {
                    "step": "authenticate_user",
                    "service": "auth",
                    "input": workflow_data.get("auth_data"),
                    "required": True,
                    "timeout_ms": 5000
                },
                {
                    "step": "process_payment",
                    "service": "payment",
                    "input": workflow_data.get("payment_data"),
                    "required": True,
                    "depends_on": ["authenticate_user"],
                    "timeout_ms": 10000
                },
                {
                    "step": "send_confirmation",
                    "service": "notification",
                    "input": workflow_data.get("notification_data"),
                    "required": False,  # Optional step
                    "depends_on": ["process_payment"],
                    "timeout_ms": 3000
                }
            ]
        }

        # Execute with performance tracking
        start_time = time.time()
        workflow_result = self.orchestrator.orchestrate_workflow(workflow_definition)
        duration_ms = (time.time() - start_time) * 1000

        # Track orchestration metrics
        self.metrics.track_service_call(
            "complex_workflow_orchestrator",
            "execute_workflow",
            duration_ms
        )

        return workflow_result

    def implement_compensation_patterns(
        self,
        workflow_id: str,
        failed_step: str
    ) -> FlextResult[dict[str, object]]:
        """Implement compensation patterns for failed workflows."""

        compensation_actions = {
            "authenticate_user": [],  # No compensation needed
            "process_payment": ["refund_payment", "release_funds"],
            "send_confirmation": ["send_failure_notification"]
        }

        actions = compensation_actions.get(failed_step, [])
        compensation_results = {}

        for action in actions:
            # Execute compensation action
            action_result = self._execute_compensation_action(action, workflow_id)
            compensation_results[action] = action_result.success

        return FlextResult[dict[str, object]].ok(compensation_results)
# fmt: on

# -- filled in: the helper methods the guide leaves undefined ---------------------------

# The service each compensation action of the guide is addressed to.
_COMPENSATION_SERVICE = {
    "refund_payment": "payment",
    "release_funds": "payment",
    "send_failure_notification": "notification",
}


def _generate_id(self: ServiceOrchestrationService) -> str:
    """A short unique id for a workflow name."""
    return uuid.uuid4().hex[:12]


def _execute_compensation_action(
    self: ServiceOrchestrationService, action: str, workflow_id: str
) -> FlextResult[dict[str, object]]:
    """Run ``action`` on its service as a one-step durable workflow."""
    return self.orchestrator.orchestrate_workflow(
        {
            "workflow_id": f"compensate_{workflow_id}"[:63],
            "steps": [
                {
                    "step": action,
                    "service": _COMPENSATION_SERVICE[action],
                    "input": {"action": action, "workflow_id": workflow_id},
                }
            ],
        }
    )


ServiceOrchestrationService._generate_id = _generate_id
ServiceOrchestrationService._execute_compensation_action = _execute_compensation_action
