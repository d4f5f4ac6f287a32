"""``flext-mesh tokens``: create, list and revoke bearer tokens in a tokens file.

``tokens create NAME --scope SCOPE [--scope ...]`` makes a random token, appends its
SHA-256 to the file (created with mode 0600) and prints the token once, on stdout;
``tokens list`` shows names and scopes; ``tokens revoke NAME`` removes an entry. The
file is ``--file PATH`` or ``FLEXT_MESH_AUTH_TOKENS_FILE``, the same variable that
``flext-mesh serve`` reads, which picks up changes within a second: no restart.
Nothing here talks to a control plane.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from flext_mesh.cli.common import add_noun, add_output_option
from flext_mesh.cli.output import DOCUMENT_FORMATS, render_document, render_table
from flext_mesh.security.tokens import (
    SCOPE_KINDS,
    TokensFileError,
    add_token,
    check_scope,
    load_entries,
    remove_token,
)

__all__ = ["TokensFileError", "add_commands", "run"]

_FILE_VARIABLE = "FLEXT_MESH_AUTH_TOKENS_FILE"


def add_commands(nouns: argparse._SubParsersAction[Any]) -> None:
    """Add the ``tokens`` noun with its ``create``, ``list`` and ``revoke`` verbs."""
    file_options = argparse.ArgumentParser(add_help=False)
    default = os.environ.get(_FILE_VARIABLE, "")
    file_options.add_argument(
        "--file",
        metavar="PATH",
        default=default,
        required=not default,
        help=f"the tokens file (env {_FILE_VARIABLE})",
    )
    verbs = add_noun(
        nouns,
        "tokens",
        aliases=["token"],
        help="create, list and revoke bearer tokens (a local tokens file)",
        description="Manage the tokens file of `flext-mesh serve --auth-tokens-file`: "
        "it stores SHA-256 hashes only. A running control plane sees changes within a "
        "second.",
        parents=[file_options],
    )

    create_p = verbs.add(
        "create",
        _create,
        help="make a token, store its hash, print it once",
        description="Make a random token, append its hash to the file (created with mode "
        "0600 if missing) and print the token on stdout. It is shown only this once.",
    )
    create_p.add_argument("name", metavar="NAME", help="unique name of the token's holder")
    create_p.add_argument(
        "--scope",
        action="append",
        required=True,
        type=_scope,
        metavar="SCOPE",
        help=f"repeatable: {', '.join(SCOPE_KINDS)}",
    )

    list_p = verbs.add(
        "list",
        _list,
        help="names and scopes of the tokens",
        description="List the tokens of the file: names, scopes, creation times.",
    )
    add_output_option(list_p)

    revoke_p = verbs.add(
        "revoke",
        _revoke,
        help="remove a token (a running control plane refuses it within a second)",
        description="Remove the token named NAME from the file.",
    )
    revoke_p.add_argument("name", metavar="NAME")


def _scope(value: str) -> str:
    problem = check_scope(value)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return value


def run(args: argparse.Namespace) -> str:
    """Run the parsed ``tokens`` command; returns the text to print (TokensFileError)."""
    text: str = args.run(args)
    return text


def _create(args: argparse.Namespace) -> str:
    token = add_token(args.file, args.name, args.scope)
    sys.stderr.write(
        f"created token {args.name!r} with scopes {', '.join(args.scope)} in {args.file}; "
        "it is printed once, below: keep it secret\n"
    )
    return token + "\n"


def _list(args: argparse.Namespace) -> str:
    entries = load_entries(args.file)
    if args.output in DOCUMENT_FORMATS:
        data = [{"name": e.name, "scopes": list(e.scopes), "created": e.created} for e in entries]
        return render_document({"tokens": data}, args.output)
    rows = [(e.name, ",".join(e.scopes), e.created or "-") for e in entries]
    return render_table(("NAME", "SCOPES", "CREATED"), rows)


def _revoke(args: argparse.Namespace) -> str:
    entry = remove_token(args.file, args.name)
    return f"revoked token {entry.name!r} ({', '.join(entry.scopes)})\n"
