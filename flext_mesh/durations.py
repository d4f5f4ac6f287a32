"""Human durations in files and flags: ``"250ms"``, ``"1.5s"``, ``"2m"``, ``"1m30s"``, ``"1h"``.

One parser for every place users write durations (workflow files, policy files), so
they accept the same spellings everywhere.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["MAX_DURATION_NANOS", "parse_duration"]

#: The largest google.protobuf.Duration, in nanoseconds.
MAX_DURATION_NANOS = 315_576_000_000 * 10**9

_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_NANOS = {
    "ns": 1,
    "us": 10**3,
    "µs": 10**3,
    "ms": 10**6,
    "s": 10**9,
    "m": 60 * 10**9,
    "h": 3600 * 10**9,
}


def parse_duration(text: str, *, bare_seconds: bool = False) -> int | None:
    """Nanoseconds of a duration (a leading ``-`` negates it); None when it is not one.

    Units: ns, us (µs), ms, s, m, h, combinable (``"1m30s"``). With ``bare_seconds``, a
    plain number (``"2"``, ``"0.5"``) is seconds.
    """
    text = text.strip()
    sign = -1 if text.startswith("-") else 1
    text = text.removeprefix("-")
    if bare_seconds:
        try:
            seconds = Decimal(text)
        except InvalidOperation:
            pass
        else:
            return sign * round(seconds * 10**9) if text and seconds.is_finite() else None
    pos, total = 0, Decimal(0)
    while pos < len(text):
        match = _PART.match(text, pos)
        if match is None:
            return None
        total += Decimal(match.group(1)) * _UNIT_NANOS[match.group(2)]
        pos = match.end()
    return sign * round(total) if pos else None
