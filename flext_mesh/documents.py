"""Documents users write by hand: YAML and JSON files, or the same data as Python dicts.

One set of rules for every reader of such documents (workflow files and the guide's
workflow dicts, policy files), so that they read files the same way and refuse the same
things in the same words. Checks append a :class:`~flext_mesh.errors.FieldViolation`
(the field's path as the user wrote it, and what is wrong) to a list and return None,
so that a reader reports every problem of a document at once.
"""

from __future__ import annotations

import difflib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from flext_mesh.durations import MAX_DURATION_NANOS, parse_duration
from flext_mesh.errors import FieldViolation

__all__ = [
    "DURATION_HINT",
    "MAX_EXACT_INT",
    "FileProblem",
    "Given",
    "SyntaxProblem",
    "as_bool",
    "as_duration_nanos",
    "as_list",
    "as_number",
    "as_string",
    "as_whole_number",
    "closest",
    "did_you_mean",
    "given_keys",
    "join",
    "kind",
    "parse_documents",
    "read_text",
]

MAX_EXACT_INT = 2**53
"""Largest whole number a JSON number (a double, as in a protobuf Struct) holds exactly."""
DURATION_HINT = "e.g. '500ms', '2s', '1m', '1m30s', or a number of seconds"
"""Spellings a refused duration is answered with."""

_WHOLE = re.compile(r"-?\d+")


# -- files --------------------------------------------------------------------------------


class FileProblem(ValueError):
    """A file that cannot be used; ``str()`` says why, as in "FILE cannot be read: ..."."""


class SyntaxProblem(FileProblem):
    """Text that is not the JSON or YAML it should be: ``str()`` is ``"is not JSON: ..."``."""

    def __init__(
        self, language: str, problem: str, line: int | None = None, column: int | None = None
    ) -> None:
        self.language = language
        """``"JSON"`` or ``"YAML"``."""
        self.problem = problem
        """What the parser found wrong."""
        self.line = line
        """Line of the problem, from 1; None when the parser does not say."""
        self.column = column
        """Column of the problem, from 1; None when the parser does not say."""
        super().__init__(f"is not {language}: {self._placed()}")

    def _placed(self) -> str:
        if self.line is None:
            return self.problem
        return f"line {self.line}, column {self.column}: {self.problem}"

    @property
    def detail(self) -> str:
        """The problem where a message already names the file and the language is plain.

        ``"line 3, column 13: Expecting value"``; when the parser gives no place, all of
        ``str()`` (``"is not YAML: ..."``), so that the problem still reads as one.
        """
        return self._placed() if self.line is not None else str(self)


def read_text(source: str | os.PathLike[str] | TextIO) -> str:
    """The text of a UTF-8 file, or what is left of an open stream such as stdin.

    FileProblem when it cannot be read or is not UTF-8 text.
    """
    try:
        if isinstance(source, str | os.PathLike):
            return Path(source).read_text(encoding="utf-8")
        return source.read()
    except UnicodeDecodeError as exc:
        raise FileProblem(f"is not UTF-8 text: {exc.reason}") from exc
    except OSError as exc:
        raise FileProblem(f"cannot be read: {exc.strerror or exc}") from exc


def parse_documents(text: str, language: str, *, several: bool = False) -> list[Any]:
    """The documents of a JSON or YAML text (``language``: ``"JSON"`` or ``"YAML"``).

    JSON holds one document; YAML one, or with ``several`` any number (``---``
    between them, an empty one read as None). SyntaxProblem names the line and column.
    """
    if language == "JSON":
        try:
            return [json.loads(text)]
        except json.JSONDecodeError as exc:
            raise SyntaxProblem("JSON", exc.msg, exc.lineno, exc.colno) from exc
    import yaml  # noqa: PLC0415 - only the commands that read files need it

    try:
        return list(yaml.safe_load_all(text)) if several else [yaml.safe_load(text)]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
        if mark is None:
            raise SyntaxProblem("YAML", problem) from exc
        raise SyntaxProblem("YAML", problem, mark.line + 1, mark.column + 1) from exc
    except yaml.YAMLError as exc:
        raise SyntaxProblem("YAML", " ".join(str(exc).split())) from exc


# -- keys ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Given:
    """One value of a document as the user gave it."""

    path: str
    """Its field path as written, e.g. ``workflow.steps[1].timeout_ms``."""
    key: str
    """The key it was given under (one of the field's spellings)."""
    value: Any
    """The value, never None (a None value counts as absent)."""


def join(path: str, key: str) -> str:
    """The path of ``key`` inside ``path`` (``retry.jitter``; just ``key`` at the top)."""
    return f"{path}.{key}" if path else key


def given_keys(
    data: Mapping[Any, Any],
    path: str,
    known: Mapping[str, str],
    out: list[FieldViolation],
    *,
    unknown: Callable[[str], str],
) -> Iterator[tuple[str, Given]]:
    """The values of ``data`` whose key ``known`` maps to a field, as (field, Given).

    In the order of ``data``; a None value counts as absent. Reported as they come (so
    that they interleave with the caller's own reports in document order): a key that is
    not a string, an unknown key (``unknown(key)`` says what is wrong with it), and a
    field given a second time under another spelling.
    """
    spelled: dict[str, str] = {}
    for key, value in data.items():
        if not isinstance(key, str):
            out.append(FieldViolation(path, f"has a key that is not a string: {key!r}"))
            continue
        where = join(path, key)
        name = known.get(key)
        if name is None:
            out.append(FieldViolation(where, unknown(key)))
            continue
        if name in spelled:
            out.append(FieldViolation(where, f"repeats {spelled[name]!r}; give only one of them"))
            continue
        if value is not None:
            spelled[name] = key
            yield name, Given(where, key, value)


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The choice most like ``word`` (a typo's likely meaning); None when none is close."""
    found = difflib.get_close_matches(word, list(choices), n=1)
    return found[0] if found else None


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'retry'?"`` after a refused word, or ``""`` when nothing is close."""
    found = closest(word, choices)
    return f"; did you mean {found!r}?" if found else ""


# -- values -------------------------------------------------------------------------------


def kind(value: Any) -> str:
    """What ``value`` is, in a document's words: ``a string``, ``an object``, ``null``..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list | tuple):
        return "a list"
    if isinstance(value, Mapping):
        return "an object"
    return f"a {type(value).__name__}"


def as_string(value: Any, path: str, out: list[FieldViolation]) -> str | None:
    """``value`` when it is a string."""
    if not isinstance(value, str):
        out.append(FieldViolation(path, f"must be a string, got {kind(value)}"))
        return None
    return value


def as_bool(value: Any, path: str, out: list[FieldViolation]) -> bool | None:
    """``value`` when it is true or false."""
    if not isinstance(value, bool):
        out.append(FieldViolation(path, f"must be true or false, got {kind(value)}"))
        return None
    return value


def as_list(value: Any, path: str, out: list[FieldViolation]) -> list[Any] | None:
    """``value`` as a list when it is one."""
    if not isinstance(value, list | tuple):
        out.append(FieldViolation(path, f"must be a list, got {kind(value)}"))
        return None
    return list(value)


def as_number(value: Any, path: str, out: list[FieldViolation]) -> float | None:
    """``value`` as a float when it is a finite number (true and false are not numbers)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        out.append(FieldViolation(path, f"must be a number, got {kind(value)}"))
        return None
    if not math.isfinite(value):
        out.append(FieldViolation(path, f"must be a finite number, got {value}"))
        return None
    return float(value)


def as_whole_number(
    value: Any, path: str, out: list[FieldViolation], *, low: int, high: int
) -> int | None:
    """``value`` as an int from ``low`` to ``high``.

    Also taken: a float without a fraction (``5.0``) and a string of digits (proto JSON
    writes 64-bit integers as ``"42"``).
    """
    if isinstance(value, str) and _WHOLE.fullmatch(value.strip()):
        value = int(value)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        out.append(FieldViolation(path, f"must be a whole number, got {kind(value)}"))
        return None
    if not low <= value <= high:
        out.append(
            FieldViolation(path, f"must be a whole number from {low} to {high}, got {value}")
        )
        return None
    return value


def as_duration_nanos(
    value: Any, path: str, out: list[FieldViolation], *, milliseconds: bool = False
) -> int | None:
    """Nanoseconds of a duration as written, at most a protobuf Duration's range.

    Text (``"250ms"``, ``"1.5s"``, ``"1m30s"``, ``"2"`` for seconds, see
    :func:`~flext_mesh.durations.parse_duration`) or a number of seconds; with
    ``milliseconds`` (a ``*_ms`` key), only a number of milliseconds. Negative values
    pass: each reader bounds its own.
    """
    nanos: int
    if milliseconds:
        if isinstance(value, str):
            out.append(FieldViolation(path, f"must be a number of milliseconds, got {value!r}"))
            return None
        if as_number(value, path, out) is None:
            return None
        nanos = value * 10**6 if isinstance(value, int) else round(value * 1e6)
    elif isinstance(value, str):
        parsed = parse_duration(value, bare_seconds=True)
        if parsed is None:
            out.append(FieldViolation(path, f"{value!r} is not a duration ({DURATION_HINT})"))
            return None
        nanos = parsed
    elif isinstance(value, bool) or not isinstance(value, int | float):
        out.append(FieldViolation(path, f"must be a duration ({DURATION_HINT}), got {kind(value)}"))
        return None
    elif not math.isfinite(value):
        out.append(FieldViolation(path, f"{value} is not a duration ({DURATION_HINT})"))
        return None
    else:
        nanos = value * 10**9 if isinstance(value, int) else round(value * 1e9)
    if abs(nanos) > MAX_DURATION_NANOS:
        out.append(FieldViolation(path, "is too long for a duration"))
        return None
    return nanos
