"""Step 4, "Comprehensive Performance Monitoring": the performance manager's report.

Runs the guide's usage code when executed (see the package docstring). Tracked calls
go to the control plane's MetricsService; the report's health score, recommendations,
alerts and anomalies come from the control plane's report of the service.
"""

# ruff: noqa: E501, F841
# The guide's own style: long lines, an unused ``anomaly_result``.

from __future__ import annotations

from datetime import datetime, timedelta

from flext_mesh import FlextResult, FlextServices

# -- the guide's code, verbatim ---------------------------------------------------------


# fmt: off
class ServicePerformanceManager:
    """Comprehensive service performance monitoring."""

    def __init__(self):
        self.metrics = FlextServices.ServiceMetrics()

        # Performance data storage
        self._performance_history: dict[str, list[dict[str, object]]] = {}
        self._performance_baselines: dict[str, dict[str, float]] = {}
        self._alert_thresholds: dict[str, dict[str, float]] = {}
        self._anomaly_detection: dict[str, object] = {}

    def track_comprehensive_service_metrics(
        self,
        service_name: str,
        operation_name: str,
        duration_ms: float,
        success: bool,
        metadata: dict[str, object] | None = None
    ) -> FlextResult[None]:
        """Track comprehensive service metrics with anomaly detection."""

        # Track with FlextServices metrics
        tracking_result = self.metrics.track_service_call(
            service_name,
            operation_name,
            duration_ms
        )

        if tracking_result.is_failure:
            return tracking_result

        # Store detailed performance record
        performance_record = {
            "service_name": service_name,
            "operation_name": operation_name,
            "duration_ms": duration_ms,
            "success": success,
            "timestamp": datetime.utcnow().isoformat(),
            "metadata": metadata or {}
        }

        # Add to performance history
        service_key = f"{service_name}.{operation_name}"
        if service_key not in self._performance_history:
            self._performance_history[service_key] = []

        self._performance_history[service_key].append(performance_record)

        # Keep only recent history (last 1000 records)
        if len(self._performance_history[service_key]) > 1000:
            self._performance_history[service_key] = self._performance_history[service_key][-1000:]

        # Update performance baselines
        self._update_performance_baselines(service_key, performance_record)

        # Detect performance anomalies
        anomaly_result = self._detect_performance_anomaly(service_key, performance_record)

        return FlextResult[None].ok(None)

    def generate_comprehensive_performance_report(
        self,
        service_name: str,
        time_window_hours: int = 24
    ) -> FlextResult[dict[str, object]]:
        """Generate comprehensive performance analysis report."""

        cutoff_time = datetime.utcnow() - timedelta(hours=time_window_hours)

        # Collect performance data for all operations
        service_operations = {}
        overall_stats = {
            "total_calls": 0,
            "successful_calls": 0,
            "failed_calls": 0,
            "total_duration_ms": 0
        }

        for service_key, history in self._performance_history.items():
            if service_key.startswith(f"{service_name}."):
                operation_name = service_key.split(".", 1)[1]

                # Filter by time window
                recent_calls = [
                    call for call in history
                    if datetime.fromisoformat(call["timestamp"]) >= cutoff_time
                ]

                if recent_calls:
                    # Calculate operation statistics
                    durations = [call["duration_ms"] for call in recent_calls]
                    successes = [call for call in recent_calls if call["success"]]
                    failures = [call for call in recent_calls if not call["success"]]

                    operation_stats = {
                        "operation_name": operation_name,
                        "total_calls": len(recent_calls),
                        "successful_calls": len(successes),
                        "failed_calls": len(failures),
                        "success_rate": len(successes) / len(recent_calls),
                        "average_duration_ms": sum(durations) / len(durations),
                        "min_duration_ms": min(durations),
                        "max_duration_ms": max(durations),
                        "median_duration_ms": sorted(durations)[len(durations) // 2],
                        "p95_duration_ms": sorted(durations)[int(len(durations) * 0.95)],
                        "p99_duration_ms": sorted(durations)[int(len(durations) * 0.99)],
                        "throughput_per_hour": len(recent_calls) / time_window_hours,
                        "error_rate": len(failures) / len(recent_calls),
                        "performance_trend": self._calculate_performance_trend(recent_calls),
                        "anomalies_detected": self._get_operation_anomalies(service_key, time_window_hours)
                    }

                    service_operations[operation_name] = operation_stats

                    # Update overall statistics
                    overall_stats["total_calls"] += len(recent_calls)
                    overall_stats["successful_calls"] += len(successes)
                    overall_stats["failed_calls"] += len(failures)
                    overall_stats["total_duration_ms"] += sum(durations)

        if not service_operations:
            return FlextResult[dict[str, object]].fail(
                f"No performance data found for service {service_name}"
            )

        # Generate comprehensive report
        report = {
            "service_name": service_name,
            "time_window_hours": time_window_hours,
            "report_generated_at": datetime.utcnow().isoformat(),
            "summary": {
                "total_operations": len(service_operations),
                "total_calls": overall_stats["total_calls"],
                "success_rate": overall_stats["successful_calls"] / overall_stats["total_calls"],
                "error_rate": overall_stats["failed_calls"] / overall_stats["total_calls"],
                "average_duration_ms": overall_stats["total_duration_ms"] / overall_stats["total_calls"],
                "throughput_per_hour": overall_stats["total_calls"] / time_window_hours,
                "health_score": self._calculate_service_health_score(service_name),
                "performance_grade": self._calculate_performance_grade(service_operations)
            },
            "operations": service_operations,
            "baselines": self._performance_baselines.get(service_name, {}),
            "thresholds": self._alert_thresholds.get(service_name, {}),
            "recommendations": self._generate_performance_recommendations(service_name, service_operations),
            "alerts": self._generate_performance_alerts(service_name, service_operations)
        }

        return FlextResult[dict[str, object]].ok(report)

# fmt: on

# -- filled in: the helper methods the guide leaves undefined ---------------------------
# Score, recommendations, alerts and anomalies are the control plane's, computed from
# every process reporting calls of the service (its default 24 h window when the guide's
# helper is not given one); baselines, trend and grade are computed here from the
# manager's own history, as the guide's data suggests.

#: Weight of a new duration in the moving baseline.
_BASELINE_ALPHA = 0.2
#: A call this many times slower than its baseline is an anomaly.
_ANOMALY_FACTOR = 3.0


def _control_plane_report(
    self: ServicePerformanceManager, service_name: str, hours: float = 24
) -> dict[str, object]:
    """The control plane's report of ``service_name``, or {} when it has none."""
    report = self.metrics.report(service_name, hours)
    return report.value if report.success else {}


def _update_performance_baselines(
    self: ServicePerformanceManager, service_key: str, performance_record: dict[str, object]
) -> None:
    """Move the operation's baseline (an exponential moving average) towards the call."""
    service_name, operation_name = service_key.split(".", 1)
    baselines = self._performance_baselines.setdefault(service_name, {})
    duration = float(performance_record["duration_ms"])
    previous = baselines.get(operation_name)
    baselines[operation_name] = (
        duration if previous is None else previous + _BASELINE_ALPHA * (duration - previous)
    )


def _detect_performance_anomaly(
    self: ServicePerformanceManager, service_key: str, performance_record: dict[str, object]
) -> FlextResult[bool]:
    """ok(True) when the call took over three times its operation's baseline."""
    service_name, operation_name = service_key.split(".", 1)
    baseline = self._performance_baselines.get(service_name, {}).get(operation_name)
    anomalous = baseline is not None and float(performance_record["duration_ms"]) > (
        _ANOMALY_FACTOR * baseline
    )
    if anomalous:
        self._anomaly_detection[service_key] = performance_record
    return FlextResult.ok(anomalous)


def _calculate_performance_trend(
    self: ServicePerformanceManager, recent_calls: list[dict[str, object]]
) -> str:
    """``degrading`` / ``improving`` when the newer half is 20% slower / faster."""
    half = len(recent_calls) // 2
    if half == 0:
        return "stable"
    older = sum(float(c["duration_ms"]) for c in recent_calls[:half]) / half
    newer = sum(float(c["duration_ms"]) for c in recent_calls[half:]) / (len(recent_calls) - half)
    if newer > older * 1.2:
        return "degrading"
    if newer < older * 0.8:
        return "improving"
    return "stable"


def _get_operation_anomalies(
    self: ServicePerformanceManager, service_key: str, time_window_hours: int
) -> list[dict[str, object]]:
    """The anomalies the control plane detected for this operation in the window."""
    service_name, operation_name = service_key.split(".", 1)
    operations = _control_plane_report(self, service_name, time_window_hours).get("operations", {})
    return list(operations.get(operation_name, {}).get("anomalies_detected", []))


def _calculate_service_health_score(self: ServicePerformanceManager, service_name: str) -> float:
    """The control plane's health score of the service (0 when it has no calls)."""
    summary = _control_plane_report(self, service_name).get("summary", {})
    return float(summary.get("health_score", 0.0))


def _calculate_performance_grade(
    self: ServicePerformanceManager, service_operations: dict[str, dict[str, object]]
) -> str:
    """A to F from the worst operation's success rate and p95 latency."""
    worst_success = min(float(op["success_rate"]) for op in service_operations.values())
    worst_p95 = max(float(op["p95_duration_ms"]) for op in service_operations.values())
    for grade, success, p95 in (("A", 0.999, 200), ("B", 0.99, 500), ("C", 0.95, 1000)):
        if worst_success >= success and worst_p95 <= p95:
            return grade
    return "D" if worst_success >= 0.9 else "F"


def _generate_performance_recommendations(
    self: ServicePerformanceManager,
    service_name: str,
    service_operations: dict[str, dict[str, object]],
) -> list[str]:
    """The control plane's recommendations for the service."""
    return list(_control_plane_report(self, service_name).get("recommendations", []))


def _generate_performance_alerts(
    self: ServicePerformanceManager,
    service_name: str,
    service_operations: dict[str, dict[str, object]],
) -> list[dict[str, object]]:
    """The control plane's alerts for the service."""
    return list(_control_plane_report(self, service_name).get("alerts", []))


ServicePerformanceManager._update_performance_baselines = _update_performance_baselines
ServicePerformanceManager._detect_performance_anomaly = _detect_performance_anomaly
ServicePerformanceManager._calculate_performance_trend = _calculate_performance_trend
ServicePerformanceManager._get_operation_anomalies = _get_operation_anomalies
ServicePerformanceManager._calculate_service_health_score = _calculate_service_health_score
ServicePerformanceManager._calculate_performance_grade = _calculate_performance_grade
ServicePerformanceManager._generate_performance_recommendations = (
    _generate_performance_recommendations
)
ServicePerformanceManager._generate_performance_alerts = _generate_performance_alerts

# -- the guide's code, verbatim (continued) ---------------------------------------------

# fmt: off
# Usage examples
performance_manager = ServicePerformanceManager()

# Track service performance
performance_manager.track_comprehensive_service_metrics(
    "user-service",
    "create_user",
    125.3,  # duration in ms
    True,   # success
    {"request_size": "medium", "cache_hit": False}
)

# Generate performance report
report_result = performance_manager.generate_comprehensive_performance_report(
    "user-service",
    time_window_hours=6
)

if report_result.success:
    report = report_result.value
    print(f"Performance Report for {report['service_name']}:")
    print(f"  Health score: {report['summary']['health_score']}")
    print(f"  Performance grade: {report['summary']['performance_grade']}")
    print(f"  Success rate: {report['summary']['success_rate']:.1%}")
    print(f"  Average duration: {report['summary']['average_duration_ms']:.1f}ms")
# fmt: on
