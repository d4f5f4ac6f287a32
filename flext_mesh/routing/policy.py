"""Service traffic policies: validation, the version split and zone preference, and the
retry policies (protobuf -> :class:`~flext_mesh.retry.RetrySpec`).

A ``ServicePolicy`` (registry.proto) is stored under ``/registry/policies/SERVICE``,
versioned, and pushed to every watcher with the instances. Validation names every bad
field at once; what the service's instances look like (their versions, the operations
they serve) is checked by the registry, which knows them.

The split and zone rules here are the control plane's (Discover); the mesh client
applies the same rules to the policy it receives over Watch:

1. **Version split**: pick a version by smooth weighted round robin over the versions
   with a weight (90/10 gives exactly 9 of 10 picks to the first, interleaved); keep the
   callable instances of that version; when it has none, fall back to the instances of
   every version (``split_fallback``).
2. **Zone preference**: with a caller zone, keep the instances of that zone while it has
   a healthy one and at least ``min_healthy_percent`` (default 70) of its instances are
   healthy; otherwise spill over to every zone (``zone_spillover``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import grpc
from google.protobuf import duration_pb2

from flext_mesh.errors import FieldViolation
from flext_mesh.names import check_name
from flext_mesh.retry import (
    ALLOWED_RETRYABLE,
    DEFAULT_INITIAL_BACKOFF,
    DEFAULT_JITTER,
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_MAX_BACKOFF,
    DEFAULT_MULTIPLIER,
    DEFAULT_RETRYABLE,
    RetrySpec,
)
from flext_mesh.v1 import common_pb2, registry_pb2

__all__ = [
    "DEFAULT_ZONE_MIN_HEALTHY_PERCENT",
    "MAX_OPERATION_TIMEOUTS",
    "MAX_SPLITS",
    "Selection",
    "SplitPicker",
    "apply_zone",
    "retry_spec",
    "validate_policy",
]

DEFAULT_ZONE_MIN_HEALTHY_PERCENT = 70.0
_RETRYABLE = frozenset(code.name for code in ALLOWED_RETRYABLE)
_T = TypeVar("_T")


def _seconds(value: duration_pb2.Duration) -> float:
    return value.ToNanoseconds() / 1e9


def _range(
    out: list[FieldViolation], path: str, value: float, *, low: float, high: float, unit: str = ""
) -> None:
    if not low <= value <= high:
        out.append(
            FieldViolation(
                path, f"must be between {low:g}{unit} and {high:g}{unit}, got {value:g}{unit}"
            )
        )


def _duration(
    out: list[FieldViolation], path: str, message: object, name: str, *, low: float, high: float
) -> float | None:
    if not message.HasField(name):  # type: ignore[attr-defined]
        return None
    value = _seconds(getattr(message, name))
    _range(out, path, value, low=low, high=high, unit=" s")
    return value


#: Most version splits a policy may hold (a version per release in flight is a handful).
MAX_SPLITS = 100
#: Most per-operation timeouts a policy may hold.
MAX_OPERATION_TIMEOUTS = 1000


def validate_policy(
    policy: registry_pb2.ServicePolicy, *, field: str = "policy"
) -> list[FieldViolation]:
    """Violations of the policy's own fields (ranges, sums, names); empty when fine.

    A list over its bound (:data:`MAX_SPLITS`, :data:`MAX_OPERATION_TIMEOUTS`) is one
    violation, and its entries are not looked at: the cost stays bounded by the limits.
    """
    out: list[FieldViolation] = list(check_name(f"{field}.service_name", policy.service_name))
    oversized = []
    if len(policy.splits) > MAX_SPLITS:
        oversized.append(
            FieldViolation(
                f"{field}.splits", f"at most {MAX_SPLITS} splits, got {len(policy.splits)}"
            )
        )
    if len(policy.operation_timeouts) > MAX_OPERATION_TIMEOUTS:
        oversized.append(
            FieldViolation(
                f"{field}.operation_timeouts",
                f"at most {MAX_OPERATION_TIMEOUTS} operations, "
                f"got {len(policy.operation_timeouts)}",
            )
        )
    if oversized:
        return out + oversized
    if policy.strategy and policy.strategy not in registry_pb2.LoadBalancingStrategy.values():
        out.append(FieldViolation(f"{field}.strategy", f"{policy.strategy} is not a strategy"))
    _duration(out, f"{field}.default_timeout", policy, "default_timeout", low=0.001, high=3600)
    for operation, limit in sorted(policy.operation_timeouts.items()):
        path = f"{field}.operation_timeouts[{operation!r}]"
        out += check_name(path, operation)
        _range(out, path, _seconds(limit), low=0.001, high=3600, unit=" s")
    if policy.HasField("retry"):
        out += _retry_violations(policy.retry, f"{field}.retry")
    if policy.HasField("circuit_breaker"):
        out += _breaker_violations(policy.circuit_breaker, f"{field}.circuit_breaker")
    if policy.HasField("outlier_detection"):
        od = policy.outlier_detection
        path = f"{field}.outlier_detection"
        if od.consecutive_failures:
            _range(out, f"{path}.consecutive_failures", od.consecutive_failures, low=1, high=1000)
        base = _duration(
            out, f"{path}.base_ejection_time", od, "base_ejection_time", low=1, high=3600
        )
        cap = _duration(
            out, f"{path}.max_ejection_time", od, "max_ejection_time", low=1, high=86400
        )
        if base is not None and cap is not None and cap < base:
            out.append(FieldViolation(f"{path}.max_ejection_time", "must be >= base_ejection_time"))
        if od.HasField("max_ejection_percent"):
            _range(
                out,
                f"{path}.max_ejection_percent",
                od.max_ejection_percent,
                low=0,
                high=100,
                unit="%",
            )
    if policy.HasField("health_check"):
        hc = policy.health_check
        path = f"{field}.health_check"
        interval = _duration(out, f"{path}.interval", hc, "interval", low=0.1, high=300)
        timeout = _duration(out, f"{path}.timeout", hc, "timeout", low=0.001, high=300)
        if timeout is not None and timeout > (interval if interval is not None else 5.0):
            out.append(FieldViolation(f"{path}.timeout", "must be at most the interval"))
        for name in ("unhealthy_threshold", "healthy_threshold"):
            value = getattr(hc, name)
            if value:
                _range(out, f"{path}.{name}", value, low=1, high=100)
    if policy.HasField("panic_threshold_percent"):
        _range(
            out,
            f"{field}.panic_threshold_percent",
            policy.panic_threshold_percent,
            low=0,
            high=100,
            unit="%",
        )
    if policy.splits:
        seen: dict[str, int] = {}
        for i, split in enumerate(policy.splits):
            path = f"{field}.splits[{i}]"
            if not split.version:
                out.append(FieldViolation(f"{path}.version", "is required"))
            elif split.version in seen:
                out.append(
                    FieldViolation(
                        f"{path}.version",
                        f"version {split.version!r} is split twice "
                        f"(also splits[{seen[split.version]}])",
                    )
                )
            else:
                seen[split.version] = i
            if split.weight > 100:
                out.append(FieldViolation(f"{path}.weight", f"at most 100, got {split.weight}"))
        total = sum(s.weight for s in policy.splits)
        if total != 100:
            out.append(FieldViolation(f"{field}.splits", f"weights must sum to 100, got {total}"))
    if policy.HasField("zone") and policy.zone.HasField("min_healthy_percent"):
        _range(
            out,
            f"{field}.zone.min_healthy_percent",
            policy.zone.min_healthy_percent,
            low=0,
            high=100,
            unit="%",
        )
    return out


def _retry_violations(retry: common_pb2.RetryPolicy, path: str) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    if retry.max_attempts:
        _range(out, f"{path}.max_attempts", retry.max_attempts, low=1, high=10)
    initial = _duration(
        out, f"{path}.initial_backoff", retry, "initial_backoff", low=0.001, high=60
    )
    cap = _duration(out, f"{path}.max_backoff", retry, "max_backoff", low=0.001, high=300)
    if initial is not None and cap is not None and cap < initial:
        out.append(FieldViolation(f"{path}.max_backoff", "must be >= initial_backoff"))
    if retry.backoff_multiplier:
        _range(out, f"{path}.backoff_multiplier", retry.backoff_multiplier, low=1, high=10)
    if retry.HasField("jitter"):
        _range(out, f"{path}.jitter", retry.jitter, low=0, high=1)
    _duration(out, f"{path}.per_try_timeout", retry, "per_try_timeout", low=0.001, high=3600)
    for i, code in enumerate(retry.retryable_codes):
        if code not in _RETRYABLE:
            out.append(
                FieldViolation(
                    f"{path}.retryable_codes[{i}]",
                    f"{code!r} is not retryable: use {', '.join(sorted(_RETRYABLE))} "
                    "(business rejections are never retried)",
                )
            )
    return out


def retry_spec(
    policy: common_pb2.RetryPolicy, *, default_attempts: int = DEFAULT_MAX_ATTEMPTS
) -> RetrySpec:
    """The policy with common.proto's defaults for what it leaves unset.

    It is not validated here (see ``validate_policy``; the orchestrator validates the
    policies of its steps); codes that are not retryable names are dropped.
    """
    initial = (
        _seconds(policy.initial_backoff)
        if policy.HasField("initial_backoff")
        else DEFAULT_INITIAL_BACKOFF
    )
    codes = {
        code
        for name in policy.retryable_codes
        if (code := grpc.StatusCode.__members__.get(name)) in ALLOWED_RETRYABLE
    }
    return RetrySpec(
        max_attempts=policy.max_attempts or default_attempts,
        initial_backoff=initial,
        multiplier=policy.backoff_multiplier or DEFAULT_MULTIPLIER,
        max_backoff=(
            _seconds(policy.max_backoff)
            if policy.HasField("max_backoff")
            else max(DEFAULT_MAX_BACKOFF, initial)
        ),
        jitter=policy.jitter if policy.HasField("jitter") else DEFAULT_JITTER,
        retryable=frozenset(codes) if policy.retryable_codes else DEFAULT_RETRYABLE,
    )


def _breaker_violations(
    breaker: registry_pb2.CircuitBreakerPolicy, path: str
) -> list[FieldViolation]:
    out: list[FieldViolation] = []
    if breaker.consecutive_failures:
        _range(out, f"{path}.consecutive_failures", breaker.consecutive_failures, low=1, high=1000)
    if breaker.HasField("failure_rate_threshold_percent"):
        _range(
            out,
            f"{path}.failure_rate_threshold_percent",
            breaker.failure_rate_threshold_percent,
            low=1,
            high=100,
            unit="%",
        )
    if breaker.sliding_window_size:
        _range(out, f"{path}.sliding_window_size", breaker.sliding_window_size, low=1, high=10_000)
    window = breaker.sliding_window_size or 100
    if breaker.minimum_calls > window:
        out.append(
            FieldViolation(f"{path}.minimum_calls", f"at most sliding_window_size ({window})")
        )
    opened = _duration(out, f"{path}.open_duration", breaker, "open_duration", low=0.1, high=600)
    cap = _duration(
        out, f"{path}.max_open_duration", breaker, "max_open_duration", low=0.1, high=3600
    )
    if cap is not None and cap < (opened if opened is not None else 5.0):
        out.append(FieldViolation(f"{path}.max_open_duration", "must be >= open_duration"))
    if breaker.half_open_max_calls:
        _range(out, f"{path}.half_open_max_calls", breaker.half_open_max_calls, low=1, high=100)
    return out


# -- selection ------------------------------------------------------------------------------


@dataclass
class SplitPicker:
    """Smooth weighted round robin over versions (nginx's algorithm): deterministic,
    exact over a cycle, and interleaved (90/10 does not send 10 in a row to v2)."""

    weights: dict[str, int]
    _current: dict[str, int] = field(default_factory=dict)

    def pick(self) -> str:
        """The next version."""
        total = 0
        best = ""
        best_value = -1
        for version, weight in self.weights.items():
            if weight <= 0:
                continue
            value = self._current.get(version, 0) + weight
            self._current[version] = value
            total += weight
            if value > best_value:
                best, best_value = version, value
        if best:
            self._current[best] -= total
        return best


@dataclass(frozen=True, slots=True)
class Selection:
    """What the split and the zone preference kept, and whether they fell back."""

    instances: list[registry_pb2.ServiceInstance]
    version: str = ""
    split_fallback: bool = False
    zone_spillover: bool = False
    notes: tuple[str, ...] = ()


def split_versions(policy: registry_pb2.ServicePolicy | None) -> dict[str, int]:
    """Version -> weight of the policy's split (empty without one)."""
    if policy is None:
        return {}
    return {s.version: s.weight for s in policy.splits}


def apply_split(
    instances: Sequence[_T],
    version: str,
    version_of: Callable[[_T], str],
    callable_: Callable[[_T], bool],
) -> tuple[list[_T], bool]:
    """Instances of ``version`` that are callable, or every instance when none is."""
    chosen = [i for i in instances if version_of(i) == version and callable_(i)]
    if chosen:
        return chosen, False
    return list(instances), True


def apply_zone(
    instances: Sequence[_T],
    caller_zone: str,
    policy: registry_pb2.ServicePolicy | None,
    zone_of: Callable[[_T], str],
    healthy: Callable[[_T], bool],
) -> tuple[list[_T], bool]:
    """The caller-zone instances while that zone is healthy enough; (instances, spilled)."""
    if not caller_zone or policy is None or not policy.zone.enabled:
        return list(instances), False
    threshold = (
        policy.zone.min_healthy_percent
        if policy.zone.HasField("min_healthy_percent")
        else DEFAULT_ZONE_MIN_HEALTHY_PERCENT
    )
    local = [i for i in instances if zone_of(i) == caller_zone]
    healthy_local = [i for i in local if healthy(i)]
    if healthy_local and len(healthy_local) * 100 >= threshold * len(local):
        return local, False
    return list(instances), True


def known_versions(instances: Iterable[registry_pb2.ServiceInstance]) -> set[str]:
    """Versions the instances are registered with."""
    return {i.version for i in instances if i.version}
