"""Retry policies (``RetryPolicy`` in common.proto) with their defaults applied.

One definition for every caller that retries: workflow steps and compensations in the
orchestrator, and the mesh client following a service's pushed policy;
``flext_mesh.routing.policy.retry_spec`` builds one from the message. Part of the
kernel: gRPC and the error tree only, no generated code, so every layer may use it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc

from flext_mesh.errors import INFRASTRUCTURE_CODES

__all__ = [
    "ALLOWED_RETRYABLE",
    "DEFAULT_INITIAL_BACKOFF",
    "DEFAULT_JITTER",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_BACKOFF",
    "DEFAULT_MULTIPLIER",
    "DEFAULT_RETRYABLE",
    "RetrySpec",
]

DEFAULT_RETRYABLE: frozenset[grpc.StatusCode] = INFRASTRUCTURE_CODES
"""Codes retried when ``retryable_codes`` is empty: the infrastructure faults."""
ALLOWED_RETRYABLE: frozenset[grpc.StatusCode] = INFRASTRUCTURE_CODES | {grpc.StatusCode.ABORTED}
"""Codes that ``retryable_codes`` may name; every other code is a business answer."""
DEFAULT_MAX_ATTEMPTS = 3
"""Attempts when ``max_attempts`` is 0."""
DEFAULT_INITIAL_BACKOFF = 0.1
"""Seconds before the second attempt when ``initial_backoff`` is unset."""
DEFAULT_MULTIPLIER = 2.0
"""Backoff factor when ``backoff_multiplier`` is 0."""
DEFAULT_MAX_BACKOFF = 5.0
"""Cap of one wait in seconds when ``max_backoff`` is unset."""
DEFAULT_JITTER = 0.2
"""Jitter fraction when ``jitter`` is unset."""


@dataclass(frozen=True, slots=True)
class RetrySpec:
    """A retry policy with its defaults applied (see ``RetryPolicy`` in common.proto)."""

    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    """Total attempts, the first one included (1 disables retries)."""
    initial_backoff: float = DEFAULT_INITIAL_BACKOFF
    """Seconds to wait before the second attempt (before jitter)."""
    multiplier: float = DEFAULT_MULTIPLIER
    """Factor between one wait and the next."""
    max_backoff: float = DEFAULT_MAX_BACKOFF
    """Cap, in seconds, on a single wait, applied after jitter."""
    jitter: float = DEFAULT_JITTER
    """Fraction of each wait drawn at random: 0 none, 1 uniform in [0, wait]."""
    retryable: frozenset[grpc.StatusCode] = DEFAULT_RETRYABLE
    """Status codes worth another attempt."""

    def backoff(self, retry_number: int, rand: float) -> float:
        """Seconds to wait before retry ``retry_number`` (1 = before the 2nd attempt).

        ``rand`` is a uniform draw in [0, 1). The wait is
        ``initial_backoff * multiplier**(retry_number - 1) * (1 - jitter * rand)``,
        capped at ``max_backoff`` after the jitter.
        """
        if retry_number < 1:
            raise ValueError(f"retry_number starts at 1, got {retry_number}")
        if not 0.0 <= rand < 1.0:
            raise ValueError(f"rand must be in [0, 1), got {rand}")
        try:
            base = self.initial_backoff * self.multiplier ** (retry_number - 1)
        except OverflowError:
            base = math.inf
        return min(base * (1.0 - self.jitter * rand), self.max_backoff)

    def retries(self, code: grpc.StatusCode) -> bool:
        """Tell whether a failure with ``code`` is worth another attempt."""
        return code in self.retryable
