"""Logging set-up: one line per event, ``key=value`` fields, the correlation id when known."""

from __future__ import annotations

import contextvars
import logging
import sys
import time

__all__ = ["correlation_id", "setup_logging"]

#: The correlation id of the work in progress; ``-`` when none. Set it around an RPC.
correlation_id: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="-")


class _CorrelationFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "cid"):
            record.cid = correlation_id.get()
        return True


class _Formatter(logging.Formatter):
    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def setup_logging(level: str = "INFO") -> None:
    """Send flext_mesh logs to stderr as ``time level logger message cid=...`` lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter("%(asctime)s %(levelname)s %(name)s %(message)s cid=%(cid)s"))
    handler.addFilter(_CorrelationFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # grpc's own logger is chatty at INFO about things users cannot act on.
    logging.getLogger("grpc").setLevel(max(logging.WARNING, logging.getLevelName(level)))
