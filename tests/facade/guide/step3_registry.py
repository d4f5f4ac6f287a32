"""Step 3, "Service Registry Setup": registration with health monitoring, discovery by
type with load balancing, and health checks.

The guide's class only; ``tests/facade/test_guide.py`` drives it. Registrations are
leases on the control plane kept alive in the background; discovery and health checks
ask the control plane which instance of each service is healthy.
"""

# ruff: noqa: E501, E731
# The guide's own style: long lines, a lambda bound to a name.

from __future__ import annotations

import time
from datetime import datetime

from flext_mesh import FlextResult, FlextServices

# -- the guide's code, verbatim ---------------------------------------------------------


# fmt: off
class EnterpriseServiceRegistry:
    """Enterprise service registry implementation."""

    def __init__(self):
        self.registry = FlextServices.ServiceRegistry()
        self.metrics = FlextServices.ServiceMetrics()
        self.validator = FlextServices.ServiceValidation()

        # Service storage and monitoring
        self._service_health: dict[str, dict[str, object]] = {}
        self._load_balancing_weights: dict[str, dict[str, float]] = {}

    def register_microservice_with_health_monitoring(
        self,
        service_info: dict[str, object]
    ) -> FlextResult[str]:
        """Register microservice with comprehensive health monitoring."""

        # Validate service registration
        validation_schema = lambda info: (
            FlextResult[dict].ok(info)
            if all(key in info for key in ["name", "endpoint", "type", "version"])
            else FlextResult[dict].fail("Missing required service information")
        )

        validation_result = self.validator.validate_input(service_info, validation_schema)
        if validation_result.is_failure:
            return FlextResult[str].fail(validation_result.error)

        # Register with FlextServices registry
        registration_result = self.registry.register(service_info)
        if registration_result.is_failure:
            return registration_result

        service_id = registration_result.value
        service_name = service_info["name"]

        # Initialize health monitoring
        self._service_health[service_name] = {
            "status": "registered",
            "health_checks": 0,
            "last_health_check": None,
            "response_time_ms": 0,
            "error_count": 0,
            "uptime_percentage": 100.0
        }

        # Initialize load balancing
        self._load_balancing_weights[service_name] = {
            "current_weight": 100,
            "base_weight": 100,
            "health_multiplier": 1.0,
            "performance_multiplier": 1.0
        }

        return FlextResult[str].ok(service_id)

    def discover_services_with_load_balancing(
        self,
        service_type: str,
        load_balancing_strategy: str = "weighted_round_robin"
    ) -> FlextResult[list[dict[str, object]]]:
        """Discover services with load balancing information."""

        # Discover services by type
        all_services = []
        for service_name, health_info in self._service_health.items():
            service_result = self.registry.discover(service_name)

            if service_result.success:
                service_data = service_result.value

                if service_data.get("type") == service_type:
                    # Add health and load balancing info
                    service_entry = {
                        **service_data,
                        "health_status": health_info["status"],
                        "response_time_ms": health_info["response_time_ms"],
                        "uptime_percentage": health_info["uptime_percentage"],
                        "load_balancing_weight": self._load_balancing_weights[service_name]["current_weight"]
                    }
                    all_services.append(service_entry)

        if not all_services:
            return FlextResult[list[dict[str, object]]].fail(
                f"No services found for type: {service_type}"
            )

        # Apply load balancing strategy
        if load_balancing_strategy == "weighted_round_robin":
            # Sort by weight (highest first)
            all_services.sort(key=lambda s: s["load_balancing_weight"], reverse=True)
        elif load_balancing_strategy == "least_response_time":
            # Sort by response time (lowest first)
            all_services.sort(key=lambda s: s["response_time_ms"])
        elif load_balancing_strategy == "highest_uptime":
            # Sort by uptime (highest first)
            all_services.sort(key=lambda s: s["uptime_percentage"], reverse=True)

        return FlextResult[list[dict[str, object]]].ok(all_services)

    def perform_comprehensive_health_checks(self) -> FlextResult[dict[str, object]]:
        """Perform comprehensive health checks with detailed reporting."""

        health_summary = {
            "total_services": len(self._service_health),
            "healthy_services": 0,
            "unhealthy_services": 0,
            "degraded_services": 0,
            "average_response_time": 0,
            "services_detail": {}
        }

        total_response_time = 0

        for service_name, health_info in self._service_health.items():
            # Perform health check
            health_start = time.time()
            health_result = self._perform_health_check(service_name)
            health_duration = (time.time() - health_start) * 1000

            # Update health information
            if health_result.success:
                status = "healthy"
                health_summary["healthy_services"] += 1
            else:
                status = "unhealthy"
                health_summary["unhealthy_services"] += 1
                health_info["error_count"] += 1

            # Update metrics
            health_info["health_checks"] += 1
            health_info["last_health_check"] = datetime.utcnow().isoformat()
            health_info["response_time_ms"] = health_duration
            health_info["status"] = status

            # Calculate uptime percentage
            total_checks = health_info["health_checks"]
            error_count = health_info["error_count"]
            health_info["uptime_percentage"] = ((total_checks - error_count) / total_checks) * 100

            # Update load balancing weights
            self._update_load_balancing_weight(service_name, health_info)

            # Track metrics
            self.metrics.track_service_call(service_name, "health_check", health_duration)

            total_response_time += health_duration

            # Store detailed health information
            health_summary["services_detail"][service_name] = {
                "status": status,
                "response_time_ms": health_duration,
                "uptime_percentage": health_info["uptime_percentage"],
                "total_checks": total_checks,
                "error_count": error_count,
                "load_balancing_weight": self._load_balancing_weights[service_name]["current_weight"]
            }

        # Calculate average response time
        if health_summary["total_services"] > 0:
            health_summary["average_response_time"] = total_response_time / health_summary["total_services"]

        health_summary["health_check_timestamp"] = datetime.utcnow().isoformat()

        return FlextResult[dict[str, object]].ok(health_summary)
# fmt: on

# -- filled in: the helper methods the guide leaves undefined ---------------------------


def _perform_health_check(
    self: EnterpriseServiceRegistry, service_name: str
) -> FlextResult[dict[str, object]]:
    """Healthy when the control plane has a healthy instance of ``service_name``."""
    return self.registry.discover(service_name)


def _update_load_balancing_weight(
    self: EnterpriseServiceRegistry, service_name: str, health_info: dict[str, object]
) -> None:
    """Scale the base weight by uptime; an unhealthy service gets no traffic."""
    weights = self._load_balancing_weights[service_name]
    weights["health_multiplier"] = 1.0 if health_info["status"] == "healthy" else 0.0
    weights["current_weight"] = (
        weights["base_weight"]
        * weights["health_multiplier"]
        * weights["performance_multiplier"]
        * float(health_info["uptime_percentage"])
        / 100.0
    )


EnterpriseServiceRegistry._perform_health_check = _perform_health_check
EnterpriseServiceRegistry._update_load_balancing_weight = _update_load_balancing_weight
