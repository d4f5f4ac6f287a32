"""Retries: one policy type, one backoff, one retry loop for every caller.

``RetrySpec`` is a retry policy (``RetryPolicy`` in common.proto) with its defaults
applied; ``flext_mesh.routing.policy.retry_spec`` builds one from the message.
:func:`retry_async` retries a call per a spec: workflow steps and compensations in the
orchestrator, the mesh client following a service's pushed policy, registration.
:class:`Backoff` hands out the same waits to loops that retry until they are stopped
(reconnecting a stream, resuming an execution). Part of the kernel: gRPC and the error
tree only, no generated code, so every layer may use it.
"""

from __future__ import annotations

import asyncio
import math
import random
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import grpc

from flext_mesh.errors import INFRASTRUCTURE_CODES, MeshError

__all__ = [
    "ALLOWED_RETRYABLE",
    "DEFAULT_INITIAL_BACKOFF",
    "DEFAULT_JITTER",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_BACKOFF",
    "DEFAULT_MULTIPLIER",
    "DEFAULT_RETRYABLE",
    "UNLIMITED_ATTEMPTS",
    "Backoff",
    "OnAttempt",
    "RetryAdmission",
    "RetrySpec",
    "retry_async",
    "status_of",
]

_T = TypeVar("_T")

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
UNLIMITED_ATTEMPTS = sys.maxsize
"""``max_attempts`` of a call retried until its deadline or its caller stops it."""


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


class Backoff:
    """The waits of ``spec.backoff`` for a loop that retries until it is stopped.

    ``next(backoff)`` counts one more failure and returns the wait before the next try;
    :meth:`reset` after a success starts again from ``initial_backoff``.
    """

    __slots__ = ("_rand", "failures", "spec")

    def __init__(self, spec: RetrySpec, *, rand: Callable[[], float] = random.random) -> None:
        """``rand`` draws the jitter, uniform in [0, 1) (a seeded one in tests)."""
        self.spec = spec
        self._rand = rand
        #: Failures since the last reset: the waits handed out.
        self.failures = 0

    def __iter__(self) -> Backoff:
        return self

    def __next__(self) -> float:
        self.failures += 1
        return self.spec.backoff(self.failures, self._rand())

    def reset(self) -> None:
        """A try succeeded: the next failure waits ``initial_backoff`` again."""
        self.failures = 0


class RetryAdmission(Protocol):
    """Admits or refuses one more retry (the sidecar's ``RetryBudget``)."""

    def try_retry(self) -> bool:
        """Whether a retry may start now; an admitted retry is counted."""
        ...


OnAttempt = Callable[[int, Exception, float], Awaitable[object]]
"""Awaited before each wait: the number of the attempt that failed, its error, the wait."""


def status_of(error: BaseException) -> grpc.StatusCode | None:
    """The status code of a failed attempt (a MeshError or a grpc.RpcError); None for any
    other exception, which is never retried."""
    if isinstance(error, MeshError):
        return error.code
    if isinstance(error, grpc.RpcError):
        code = getattr(error, "code", None)
        return code() if callable(code) else grpc.StatusCode.UNKNOWN
    return None


async def retry_async(
    call: Callable[[], Awaitable[_T]],
    spec: RetrySpec,
    *,
    deadline: float | None = None,
    budget: RetryAdmission | None = None,
    on_attempt: OnAttempt | None = None,
    status: Callable[[Exception], grpc.StatusCode | None] = status_of,
    retry_after: Callable[[Exception], float | None] | None = None,
    first_attempt: int = 1,
    rand: Callable[[], float] = random.random,
) -> _T:
    """Await ``call()``, trying again per ``spec`` after a failure with a retryable status.

    The first attempt is a plain ``await``: nothing is built unless it fails. A failure
    is retried when ``status(error)`` is one of ``spec.retryable``; anything else
    (business rejections, exceptions ``status`` gives None for, cancellation) is raised
    at once. Attempt ``n`` failing waits ``spec.backoff(n, rand())``, at least what
    ``retry_after(error)`` asks (a server's RetryInfo), then attempt ``n + 1`` starts.
    The last failure is raised when attempt ``spec.max_attempts`` failed, when the wait
    would reach ``deadline`` (``time.monotonic()``: it never sleeps past it), or when
    ``budget`` refuses the retry (asked last, as it counts what it admits).
    ``on_attempt`` is awaited before each wait. ``first_attempt`` numbers the first
    attempt, for a call resumed after some attempts were made: ``spec.max_attempts``
    counts those too, and at least one attempt is made.
    """
    try:
        return await call()
    except Exception as error:
        failure = error
    attempt = first_attempt
    while True:
        code = status(failure)
        if code is None or attempt >= spec.max_attempts or not spec.retries(code):
            raise failure
        wait = spec.backoff(attempt, rand())
        asked = retry_after(failure) if retry_after is not None else None
        if asked is not None and asked > wait:
            wait = asked
        if deadline is not None and time.monotonic() + wait >= deadline:
            raise failure
        if budget is not None and not budget.try_retry():
            raise failure
        if on_attempt is not None:
            await on_attempt(attempt, failure, wait)
        await asyncio.sleep(wait)
        attempt += 1
        try:
            return await call()
        except Exception as error:
            failure = error
