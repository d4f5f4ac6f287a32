"""What every ``flext-mesh`` command shares besides rendering: parsers, paging, stdout, stderr.

Each noun adds its verbs with :func:`add_noun` and :meth:`Verbs.add`, which record the
function a verb runs as ``args.run``; a List call is read with :func:`every_page`. A
command prints its result with :func:`emit`, a remark with :func:`note`, and fails with
:func:`fail` (one ``flext-mesh: error: ...`` line) or :func:`fail_with` (a block such as
:func:`violations_block`). Tables and JSON are in :mod:`flext_mesh.cli.output`.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, Protocol, TypeVar

import grpc

from flext_mesh.cli.output import FORMATS, one_line
from flext_mesh.errors import FieldViolation, InvalidArgument, MeshError
from flext_mesh.rpc.status import from_rpc_error

__all__ = [
    "PAGE_SIZE",
    "PROG",
    "Verbs",
    "add_noun",
    "add_output_option",
    "emit",
    "every_page",
    "expected_error",
    "fail",
    "fail_with",
    "non_negative_int",
    "note",
    "positive_int",
    "violations_block",
]

#: The program name that starts every error line.
PROG = "flext-mesh"
#: The largest page the List calls allow: fewest round trips.
PAGE_SIZE = 1000


class _Page(Protocol):
    @property
    def next_page_token(self) -> str: ...


_PageT = TypeVar("_PageT", bound=_Page)
_ItemT = TypeVar("_ItemT")
_ErrorT = TypeVar("_ErrorT", bound=MeshError)


def emit(text: str) -> None:
    """Write ``text`` to stdout now (live output too); a closed pipe exits 1 quietly."""
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `flext-mesh services list | head -1`
        # Point stdout at /dev/null so that the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None


def note(text: str) -> None:
    """Write ``flext-mesh: TEXT`` to stderr: a remark that is not the command's output."""
    sys.stderr.write(f"{PROG}: {text}\n")
    sys.stderr.flush()


def fail(message: str, code: int = 1) -> NoReturn:
    """Exit with ``code`` after writing ``flext-mesh: error: MESSAGE`` to stderr."""
    fail_with(f"{PROG}: error: {message}\n", code)


def fail_with(text: str, code: int = 1) -> NoReturn:
    """Exit with ``code`` after writing ``text``, whole ``flext-mesh: error: ...`` lines."""
    sys.stderr.write(text)
    sys.stderr.flush()
    raise SystemExit(code)


def violations_block(headline: str, error: InvalidArgument) -> str:
    """``flext-mesh: error: HEADLINE:`` then each field violation of ``error``, indented."""
    violations = error.violations or (FieldViolation("", error.message),)
    lines = [f"{PROG}: error: {headline}:"]
    lines.extend(
        f"  {v.field}: {one_line(v.description)}" if v.field else f"  {one_line(v.description)}"
        for v in violations
    )
    return "\n".join(lines) + "\n"


# -- calls ---------------------------------------------------------------------------------


def every_page(
    fetch: Callable[[str, int], _PageT],
    items: Callable[[_PageT], Iterable[_ItemT]],
    *,
    limit: int = 0,
) -> list[_ItemT]:
    """The ``items`` of every page of a List call, the first ``limit`` of them (0: all).

    ``fetch(token, size)`` asks for the page at ``token`` ("" for the first) of at most
    ``size`` items. Paging stops at an empty next_page_token, or one given again.
    Annotate the result (mypy infers Any from the ``items`` lambda otherwise).
    """
    found: list[_ItemT] = []
    token = ""
    while not limit or len(found) < limit:
        wanted = limit - len(found) if limit else PAGE_SIZE
        page = fetch(token, min(wanted, PAGE_SIZE))
        found.extend(items(page))
        if not page.next_page_token or page.next_page_token == token:
            break
        token = page.next_page_token
    return found[:limit] if limit else found


def expected_error(exc: grpc.RpcError, kind: type[_ErrorT]) -> _ErrorT:
    """The error of a failed call if it is a ``kind``; any other is raised again.

    For the failures a command answers itself (a refused policy, a missing one); the
    others reach :func:`flext_mesh.cli.main`, which prints them as one line.
    """
    error = from_rpc_error(exc)
    if not isinstance(error, kind):
        raise exc
    return error


# -- parsers -------------------------------------------------------------------------------


class Verbs:
    """The verbs of one noun: each a parser with the noun's shared flags and its function."""

    def __init__(
        self, noun: argparse.ArgumentParser, parents: Sequence[argparse.ArgumentParser]
    ) -> None:
        self._verbs = noun.add_subparsers(dest="verb", metavar="VERB")
        self._verbs.required = True
        self._parents = list(parents)

    def add(
        self,
        name: str,
        run: Callable[..., str],
        *,
        help: str,
        description: str,
        parents: Sequence[argparse.ArgumentParser] | None = None,
    ) -> argparse.ArgumentParser:
        """Add the verb ``name``; parsing it sets ``args.run`` to ``run``.

        ``run(channel, args)`` for commands that call the control plane (main opens the
        channel), ``run(args)`` for those on local files (certs, tokens). ``parents``
        replaces the noun's shared flags for this verb.
        """
        verb = self._verbs.add_parser(
            name,
            parents=list(parents) if parents is not None else self._parents,
            help=help,
            description=description,
        )
        verb.set_defaults(run=run)
        return verb


def add_noun(
    nouns: argparse._SubParsersAction[Any],
    name: str,
    *,
    help: str,
    description: str,
    aliases: Sequence[str] = (),
    parents: Sequence[argparse.ArgumentParser] = (),
) -> Verbs:
    """Add the noun ``name``, whose verbs all take the flags of ``parents``."""
    noun = nouns.add_parser(name, aliases=list(aliases), help=help, description=description)
    return Verbs(noun, parents)


def add_output_option(parser: argparse.ArgumentParser) -> None:
    """Add ``-o/--output`` (``FORMATS``), the same on every command that prints a result."""
    parser.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default=FORMATS[0],
        metavar="FORMAT",
        help="one of table (for people), wide (the table with more columns), json or "
        "yaml (for scripts: the same document)",
    )


# -- argument types ------------------------------------------------------------------------


def positive_int(value: str) -> int:
    """A whole number >= 1, such as a version (argparse type)."""
    return _whole_number(value, 1)


def non_negative_int(value: str) -> int:
    """A whole number >= 0, such as a limit where 0 means none (argparse type)."""
    return _whole_number(value, 0)


def _whole_number(value: str, least: int) -> int:
    try:
        number = int(value)
    except ValueError:
        number = least - 1
    if number < least:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number >= {least}")
    return number
