"""Logging set-up: one line per event, the correlation id when known, floods held back.

Two formats (``--log-format``): ``text``, ``time level logger message cid=...`` lines for
people, and ``json``, one object per line for log shippers (``time``, ``level``,
``logger``, ``message``, ``cid`` and any ``extra`` fields given to the call, a
traceback as ``exc``).

**Floods**: a record may name its *cause* (``extra={"cause": "..."}``); the first record
of a cause is written, the next ones within :data:`REPEAT_WINDOW` seconds are counted
instead, and the first one after the window says how many were held back. Anyone who
can reach a port can provoke an expected fault (an unimplemented method, a store that
is full or unreachable): such a record carries its reason in one line and no traceback,
and repeats cost a counter. gRPC's own report of an exception a servicer raised is
rewritten the same way: an unimplemented method is one WARNING without traceback;
anything else is a bug and keeps its traceback, once per exception type and method per
window.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Literal

__all__ = [
    "REPEAT_WINDOW",
    "LogFormat",
    "correlation_id",
    "log_failure",
    "set_trace_id_source",
    "setup_logging",
]

#: The correlation id of the work in progress; ``-`` when none. Set it around an RPC.
correlation_id: contextvars.ContextVar[str] = contextvars.ContextVar("correlation_id", default="-")

LogFormat = Literal["text", "json"]

#: Seconds during which further records of one cause are counted, not written.
REPEAT_WINDOW = 60.0

#: Most causes remembered at once (the oldest are forgotten first): causes are bounded
#: by code, but a method name in one comes from the caller.
_MAX_CAUSES = 4096

# LogRecord's own attributes: whatever else a record holds came from ``extra``.
_RESERVED = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "cid"}

# How grpc reports an exception escaping a servicer (grpc/_cython/.../server.pyx.pxi).
_GRPC_UNEXPECTED = re.compile(
    r"Unexpected \[(?P<kind>[^\]]+)\] raised by servicer method \[(?P<method>[^\]]*)\]"
)


class _TraceIds:
    """Where log records get the current trace id (set while tracing is on)."""

    source: Callable[[], str] | None = None


_trace_ids = _TraceIds()


def set_trace_id_source(source: Callable[[], str] | None) -> None:
    """Have every log record carry ``trace_id=source()`` when it is not empty (tracing
    sets it while on; None stops it)."""
    _trace_ids.source = source


class _CorrelationFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "cid"):
            record.cid = correlation_id.get()
        source = _trace_ids.source
        if source is not None and not hasattr(record, "trace_id"):
            trace_id = source()
            if trace_id:
                record.trace_id = trace_id
        return True


class _GrpcServicerErrors(logging.Filter):
    """Rewrites grpc's report of an exception a servicer raised (see the module doc)."""

    def filter(self, record: logging.LogRecord) -> bool:
        found = _GRPC_UNEXPECTED.search(record.getMessage())
        if found is None:
            return True
        kind, method = found["kind"], found["method"][:200]
        if kind == "NotImplementedError":
            record.msg = "a caller asked for a method this server does not implement method=%s"
            record.args = (method,)
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None
            record.cause = f"unimplemented {method}"
        else:
            record.cause = f"servicer bug {kind} {method}"
        return True


class _RepeatFilter(logging.Filter):
    """Holds back repeats of a record's ``cause`` for :data:`REPEAT_WINDOW` seconds."""

    def __init__(self, window: float = REPEAT_WINDOW) -> None:
        super().__init__()
        self.window = window
        self._lock = threading.Lock()  # sync processors log from pool threads
        #: cause -> (when its last written record was, records held back since)
        self._causes: dict[tuple[str, str], tuple[float, int]] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        cause = getattr(record, "cause", None)
        if not cause:
            return True
        key = (record.name, str(cause))
        now = time.monotonic()
        with self._lock:
            seen = self._causes.get(key)
            if seen is not None and now - seen[0] < self.window:
                self._causes[key] = (seen[0], seen[1] + 1)
                return False
            self._causes.pop(key, None)
            self._causes[key] = (now, 0)
            while len(self._causes) > _MAX_CAUSES:
                del self._causes[next(iter(self._causes))]
        if seen is not None and seen[1]:
            record.repeated = seen[1]  # held back in the window before this one
        return True


class _TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s cid=%(cid)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
        return _timestamp(record)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802
        line = super().formatMessage(record)
        trace_id = getattr(record, "trace_id", "")
        if trace_id:
            line += f" trace_id={trace_id}"
        repeated = getattr(record, "repeated", 0)
        if repeated:
            line += f" repeated={repeated}"
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "cid": getattr(record, "cid", "-"),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and key not in entry:
                entry[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def log_failure(
    log: logging.Logger,
    what: str,
    error: BaseException,
    *,
    expected: tuple[type[BaseException], ...] = (),
) -> None:
    """Log a failure of work that goes on (a loop, a handler), its repeats held back.

    An ``expected`` fault (the store full or unreachable, say) is one WARNING with its
    reason and no traceback; anything else is a bug: an ERROR with its traceback. Either
    way, more of the same ``what`` and exception type within :data:`REPEAT_WINDOW` are
    counted, not written.
    """
    cause = f"{what} {type(error).__name__}"
    if isinstance(error, expected):
        log.warning("%s: %s", what, error, extra={"cause": cause})
    else:
        log.error("%s", what, exc_info=error, extra={"cause": cause})


def _timestamp(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


def setup_logging(level: str = "INFO", log_format: LogFormat = "text") -> None:
    """Send logs to stderr as ``text`` lines or ``json`` objects, floods held back."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if log_format == "json" else _TextFormatter())
    handler.addFilter(_CorrelationFilter())
    handler.addFilter(_RepeatFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # grpc's own logger is chatty at INFO about things users cannot act on.
    grpc_logger = logging.getLogger("grpc")
    grpc_logger.setLevel(max(logging.WARNING, logging.getLevelName(level)))
    servicer_errors = logging.getLogger("grpc._cython.cygrpc")
    if not any(isinstance(f, _GrpcServicerErrors) for f in servicer_errors.filters):
        servicer_errors.addFilter(_GrpcServicerErrors())
