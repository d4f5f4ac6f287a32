"""What travels beside a call's payload, and its limits: one home for each.

A correlation id names one user-visible request across every hop; it rides in the
request and in the ``x-correlation-id`` metadata header. An idempotency key makes a
re-sent call act once.
"""

from __future__ import annotations

import re

__all__ = [
    "CORRELATION_ID_HEADER",
    "MAX_CORRELATION_ID_LENGTH",
    "MAX_IDEMPOTENCY_KEY_LENGTH",
    "correlation_id_problem",
]

#: The metadata header carrying the correlation id (requests and trailers).
CORRELATION_ID_HEADER = "x-correlation-id"
#: Longest correlation id accepted (characters), as processor.proto documents.
MAX_CORRELATION_ID_LENGTH = 128
#: Longest idempotency key accepted (characters), as the contracts document.
MAX_IDEMPOTENCY_KEY_LENGTH = 256
_METADATA_SAFE = re.compile(r"^[\x20-\x7e]*$")


def correlation_id_problem(value: str) -> str:
    """Why ``value`` cannot be a correlation id ("" when it can): it travels as gRPC
    metadata, so at most 128 printable ASCII characters."""
    if len(value) > MAX_CORRELATION_ID_LENGTH:
        return f"at most {MAX_CORRELATION_ID_LENGTH} characters, got {len(value)}"
    if not _METADATA_SAFE.match(value):
        return "only printable ASCII characters (it is sent as gRPC metadata)"
    return ""
