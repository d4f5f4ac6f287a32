"""The context of the call being served, carried into the calls it makes.

While a processor serves an Invoke, the hosting layer sets the inbound call's
:class:`CallContext` (a context variable, as OpenTelemetry keeps its context); a mesh
client call made meanwhile, from any task the processor starts, carries it on: the
same correlation id, the time left of the inbound deadline (minus a margin for the way
back), and the W3C ``traceparent`` / ``tracestate`` headers, unchanged. Nothing for
the app to pass by hand.
"""

from __future__ import annotations

import contextlib
import contextvars
import time
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = [
    "TRACEPARENT_HEADER",
    "TRACESTATE_HEADER",
    "CallContext",
    "current",
    "serving",
]

#: W3C Trace Context headers, passed through as received.
TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"

_current: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar(
    "flext_mesh_call_context", default=None
)


@dataclass(frozen=True, slots=True)
class CallContext:
    """What an inbound call hands on to the calls made while serving it."""

    correlation_id: str
    """The inbound correlation id."""
    deadline: float | None = None
    """The inbound call's deadline on ``time.monotonic()``; None when it has none."""
    traceparent: str = ""
    """The inbound W3C ``traceparent`` header ("" when none)."""
    tracestate: str = ""
    """The inbound W3C ``tracestate`` header ("" when none)."""

    def remaining(self, margin: float = 0.0) -> float | None:
        """Seconds left of the inbound deadline less ``margin`` (never below 0); None
        when the inbound call has no deadline."""
        if self.deadline is None:
            return None
        return max(0.0, self.deadline - time.monotonic() - margin)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The trace headers to send on an outgoing call."""
        out: list[tuple[str, str]] = []
        if self.traceparent:
            out.append((TRACEPARENT_HEADER, self.traceparent))
        if self.tracestate:
            out.append((TRACESTATE_HEADER, self.tracestate))
        return tuple(out)


def current() -> CallContext | None:
    """The context of the call being served here; None outside one."""
    return _current.get()


@contextlib.contextmanager
def serving(context: CallContext) -> Iterator[CallContext]:
    """Make ``context`` current for the code (and the tasks it starts) in the block."""
    token = _current.set(context)
    try:
        yield context
    finally:
        _current.reset(token)
