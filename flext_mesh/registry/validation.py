"""Validation of registry requests: every bad field is named, all at once.

Limits (also documented on the proto fields): names 1-63 characters of
``[A-Za-z0-9._-]`` starting with a letter or digit; endpoints ``host:port`` with a
port in 1..65535; weight 1..10000 (0 means the default 100); TTL 1 s..1 h (unset
means 10 s); at most 32 labels (keys 1-63 of ``[A-Za-z0-9._/-]``, values at most 255
characters), at most 32 capabilities, metadata at most 16 KiB.
"""

from __future__ import annotations

import re

from google.protobuf import duration_pb2

from flext_mesh.errors import FieldViolation
from flext_mesh.names import DEFAULT_WEIGHT, MAX_NAME, MAX_WEIGHT, check_name, raise_if
from flext_mesh.v1 import registry_pb2

__all__ = [
    "DEFAULT_TTL",
    "DEFAULT_WEIGHT",
    "MAX_TTL",
    "MAX_WEIGHT",
    "MIN_TTL",
    "check_name",
    "raise_if",
    "validate_endpoint",
    "validate_instance",
    "validate_ttl",
]

LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}$")
_HOST = re.compile(
    r"^(?:\[[0-9A-Fa-f:.]{2,45}\]"  # bracketed IPv6
    r"|(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*)$"
)
_PRINTABLE = re.compile(r"^[\x21-\x7e]*$")

DEFAULT_TTL = 10.0
MIN_TTL = 1.0
MAX_TTL = 3600.0
MAX_LABELS = 32
MAX_LABEL_VALUE = 255
MAX_CAPABILITIES = 32
MAX_SHORT = MAX_NAME
MAX_METADATA_BYTES = 16 * 1024


def validate_endpoint(field: str, endpoint: str) -> list[FieldViolation]:
    """Violations of a ``host:port`` endpoint."""
    if not endpoint:
        return [FieldViolation(field, "is required (host:port)")]
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host:
        return [FieldViolation(field, f"{endpoint!r} is not host:port")]
    if not port.isdigit():
        return [FieldViolation(field, f"port {port!r} is not a number")]
    if not 1 <= int(port) <= 65535:
        return [FieldViolation(field, f"port {port} is outside 1..65535")]
    if len(host) > 253 or not _HOST.match(host):
        return [FieldViolation(field, f"host {host!r} is not a DNS name or IP address")]
    return []


def validate_ttl(field: str, ttl: duration_pb2.Duration, present: bool) -> list[FieldViolation]:
    """Violations of a lease TTL (unset is fine: the default applies)."""
    if not present:
        return []
    seconds = ttl.seconds + ttl.nanos / 1e9
    if ttl.nanos < 0 or ttl.nanos >= 1_000_000_000 or not MIN_TTL <= seconds <= MAX_TTL:
        return [FieldViolation(field, f"must be between 1s and 1h, got {seconds:g}s")]
    return []


def _short(field: str, value: str) -> list[FieldViolation]:
    if len(value) > MAX_SHORT:
        return [FieldViolation(field, f"is {len(value)} characters long; at most {MAX_SHORT}")]
    if not _PRINTABLE.match(value):
        return [FieldViolation(field, "must be printable ASCII without spaces")]
    return []


def validate_instance(prefix: str, instance: registry_pb2.ServiceInstance) -> list[FieldViolation]:
    """Violations of the user-set fields of an instance."""
    out = check_name(f"{prefix}.service_name", instance.service_name)
    out += check_name(f"{prefix}.instance_id", instance.instance_id, required=False)
    out += validate_endpoint(f"{prefix}.endpoint", instance.endpoint)
    for name in ("version", "type", "zone"):
        out += _short(f"{prefix}.{name}", getattr(instance, name))
    if len(instance.labels) > MAX_LABELS:
        out.append(
            FieldViolation(
                f"{prefix}.labels", f"has {len(instance.labels)} labels; at most {MAX_LABELS}"
            )
        )
    for key, value in sorted(instance.labels.items()):
        if not LABEL_KEY.match(key):
            out.append(
                FieldViolation(
                    f"{prefix}.labels[{key!r}]",
                    "key must be 1-63 letters, digits, '.', '_', '/' or '-'",
                )
            )
        if len(value) > MAX_LABEL_VALUE:
            out.append(
                FieldViolation(
                    f"{prefix}.labels[{key!r}]",
                    f"value is {len(value)} characters long; at most {MAX_LABEL_VALUE}",
                )
            )
    if len(instance.capabilities) > MAX_CAPABILITIES:
        out.append(
            FieldViolation(
                f"{prefix}.capabilities",
                f"has {len(instance.capabilities)} entries; at most {MAX_CAPABILITIES}",
            )
        )
    for i, capability in enumerate(instance.capabilities):
        if not capability or len(capability) > MAX_SHORT:
            out.append(FieldViolation(f"{prefix}.capabilities[{i}]", "must be 1-63 characters"))
    if instance.weight > MAX_WEIGHT:
        out.append(
            FieldViolation(
                f"{prefix}.weight", f"{instance.weight} is over the maximum {MAX_WEIGHT}"
            )
        )
    if instance.health_check_mode not in registry_pb2.HealthCheckMode.values():
        out.append(FieldViolation(f"{prefix}.health_check_mode", "is not a known mode"))
    if instance.HasField("metadata") and instance.metadata.ByteSize() > MAX_METADATA_BYTES:
        out.append(
            FieldViolation(
                f"{prefix}.metadata",
                f"is {instance.metadata.ByteSize()} bytes; at most {MAX_METADATA_BYTES}",
            )
        )
    return out
