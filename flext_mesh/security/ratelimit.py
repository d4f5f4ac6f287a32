"""Per-client token buckets: how many writes, or call records, a client may send.

A bucket holds up to ``burst`` tokens and refills at ``rate`` per second; a request
costing ``n`` takes ``n`` tokens. A request larger than the whole bucket (a batch of
more records than ``burst``) is let through when the bucket is full and leaves it in
debt, so that the rate still holds over time and no batch is refused forever. A
caller that may wait (a stream slowed down rather than refused) reserves tokens ahead
with :meth:`RateLimiter.reserve`, and those who come after it wait behind it.

Buckets are kept per client key (see :func:`flext_mesh.security.identity.client_key`)
in least-recently-used order, at most ``max_clients`` of them: the one dropped first
is the one idle longest, which has usually refilled anyway (a new bucket starts full).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Final

__all__ = ["MAX_CLIENTS", "RateLimiter"]

#: Buckets kept per limiter; beyond it the least recently used is dropped.
MAX_CLIENTS: Final = 10_000
#: Waits shorter than this (seconds) are rounding errors of the clock arithmetic.
_EPSILON: Final = 1e-9


class _Bucket:
    __slots__ = ("stamp", "tokens")

    def __init__(self, tokens: float, stamp: float) -> None:
        self.tokens = tokens
        self.stamp = stamp


class RateLimiter:
    """Token buckets of one kind of request (``what``: "writes", "call records")."""

    def __init__(
        self,
        what: str,
        rate: float,
        burst: int,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a rate limiter needs rate > 0 and burst >= 1")
        self.what = what
        self.rate = rate
        self.burst = float(burst)
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, client: str, cost: float = 1.0) -> float:
        """Take ``cost`` tokens for ``client``: 0.0 when allowed, else seconds to wait."""
        allowed, wait = self.reserve(client, cost)
        return 0.0 if allowed else wait

    def reserve(self, client: str, cost: float = 1.0, max_wait: float = 0.0) -> tuple[bool, float]:
        """Take ``cost`` tokens for ``client`` if they are there within ``max_wait`` s.

        ``(True, delay)``: taken; the caller goes on after ``delay`` seconds (0.0 when
        they were there already). ``(False, retry_after)``: refused, nothing taken; the
        tokens will be there in ``retry_after`` seconds.
        """
        now = self._clock()
        buckets = self._buckets
        bucket = buckets.get(client)
        if bucket is None:
            bucket = buckets[client] = _Bucket(self.burst, now)
            if len(buckets) > self.max_clients:
                buckets.popitem(last=False)
        else:
            buckets.move_to_end(client)
            elapsed = now - bucket.stamp
            if elapsed > 0:
                bucket.tokens = min(self.burst, bucket.tokens + elapsed * self.rate)
                bucket.stamp = now
        needed = min(cost, self.burst)
        wait = (needed - bucket.tokens) / self.rate
        if wait <= _EPSILON:
            bucket.tokens -= cost
            return True, 0.0
        if wait <= max_wait:
            bucket.tokens -= cost  # a reservation: later callers wait behind it
            return True, wait
        return False, wait

    def describe(self) -> str:
        """``1000/s, burst 2000``: the limit, for error messages."""
        return f"{self.rate:g} {self.what}/s, burst {self.burst:g}"
