"""What travels beside a call's payload, and its limits: one home for each.

A correlation id names one user-visible request across every hop; it rides in the
request and in the ``x-correlation-id`` metadata header. An idempotency key makes a
re-sent call act once. The calling service names itself in ``x-flext-caller``, so the
service it calls can count its calls by caller (the edges of the service graph).
"""

from __future__ import annotations

import re

__all__ = [
    "CALLER_HEADER",
    "CORRELATION_ID_HEADER",
    "MAX_CALLER_LENGTH",
    "MAX_CORRELATION_ID_LENGTH",
    "MAX_IDEMPOTENCY_KEY_LENGTH",
    "caller_of",
    "correlation_id_problem",
]

#: The metadata header carrying the correlation id (requests and trailers).
CORRELATION_ID_HEADER = "x-correlation-id"
#: The metadata header naming the calling service (telemetry only: never trusted for
#: authorization, which goes by the caller's token).
CALLER_HEADER = "x-flext-caller"
#: Longest caller name kept (a service name's limit); a longer one is ignored.
MAX_CALLER_LENGTH = 63
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


def caller_of(value: str) -> str:
    """The caller named by a ``x-flext-caller`` header, or "" when it names none a
    metric label can carry (too long, not printable ASCII): a call is never refused
    for it."""
    if len(value) > MAX_CALLER_LENGTH or not _METADATA_SAFE.match(value):
        return ""
    return value
