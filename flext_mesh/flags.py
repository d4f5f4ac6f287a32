"""The command-line parsers of ``flext-mesh`` and ``flext-sidecar``: one look for both.

:class:`ArgumentParser` prints a usage error as one line (``PROG: error: ... (see
--help)``, exit status 2) and, through :class:`DefaultsHelpFormatter`, shows each
option's default in ``--help`` the same way everywhere: ``(default: X)``, or
``(default: X; env VARIABLE)`` for an option also read from a variable. A default
that means "not set" (None, False, "", nothing) is not shown: the option's help says
what leaving it out does. :func:`setting_help` does the same for flags made from the
fields of a settings model, whose defaults are the model's.
"""

from __future__ import annotations

import argparse
from collections.abc import Collection
from typing import Any, NoReturn

from pydantic.fields import FieldInfo

__all__ = ["ArgumentParser", "DefaultsHelpFormatter", "setting_help", "shown_default"]

_DEFAULT = "(default:"
_ENV = "(env "


def shown_default(value: object) -> str | None:
    """A default as ``--help`` shows it; None when it means "not set"."""
    if value is None or value is False or value is argparse.SUPPRESS:
        return None
    if isinstance(value, Collection) and not isinstance(value, str):
        return ",".join(str(item) for item in value) or None
    return str(value) or None


def _with_default(help_text: str, shown: str | None) -> str:
    """``help_text`` ending in ``(default: SHOWN)``, merged into a final ``(env ...)``.

    Unchanged when nothing is to be shown or the text already says its default.
    """
    if shown is None or _DEFAULT in help_text:
        return help_text
    start = help_text.rfind(_ENV)
    if start != -1 and help_text.endswith(")"):
        return f"{help_text[:start]}{_DEFAULT} {shown}; {help_text[start + 1 :]}"
    return f"{help_text} {_DEFAULT} {shown})"


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, with ``(default: X)`` after every option that has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help
        if text is None or not action.option_strings or "%(default)" in text:
            return text
        shown = shown_default(action.default)
        # The text is %-formatted next: a % of the default must stay one.
        return _with_default(text, None if shown is None else shown.replace("%", "%%"))


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors on one line (``PROG: error: ...``, exit status 2) and
    defaults shown in ``--help``; its subparsers are the same."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        """Exit 2 after ``PROG: error: MESSAGE (see --help)``."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def setting_help(info: FieldInfo, variables: str) -> str:
    """The ``--help`` of a flag made from a settings field: the field's description,
    then ``(default: X; env VARIABLES)`` with the field's default (the flag's own
    default is None, so that the model applies its precedence). A description ending
    in its own ``(default: ...)``, saying what an empty default means, keeps it."""
    description = (info.description or "").strip().removesuffix(".")
    if info.annotation is bool:  # a switch
        return f"{description} (env {variables}=true)"
    if info.is_required():
        return f"{description} (required; env {variables})"
    if description.endswith(")") and description.rfind(_DEFAULT) != -1:
        return f"{description[:-1]}; env {variables})"
    return _with_default(f"{description} (env {variables})", shown_default(info.default))
