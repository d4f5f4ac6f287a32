"""Human durations in files and flags: ``"250ms"``, ``"1.5s"``, ``"2m"``, ``"1m30s"``, ``"1h"``.

One parser for every place users write durations (workflow files, policy files), so
they accept the same spellings everywhere, and the formatter that writes them back.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

__all__ = ["MAX_DURATION_NANOS", "format_duration", "parse_duration"]

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


def format_duration(nanos: int) -> str:
    """Nanoseconds as a file would write them: ``500ms``, ``2s``, ``1.5s``, ``1m30s``, ``1h``.

    :func:`parse_duration` reads the text back to the same value.
    """
    if nanos == 0:
        return "0s"
    sign = "-" if nanos < 0 else ""
    nanos = abs(nanos)
    if nanos < 10**9:
        return sign + _trim(Decimal(nanos) / 10**6) + "ms"
    hours, rest = divmod(nanos, 3600 * 10**9)
    minutes, rest = divmod(rest, 60 * 10**9)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    if rest:
        text += _trim(Decimal(rest) / 10**9) + "s"
    return sign + text


def _trim(number: Decimal) -> str:
    text = f"{number:f}"
    return text.rstrip("0").rstrip(".") if "." in text else text
