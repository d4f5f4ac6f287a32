"""``flext-mesh``: the control plane (``serve``) and the operator commands.

Errors a user can fix (a bad flag, a port in use, an unusable store) print one line
naming the problem and exit non-zero, without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from typing import NoReturn

from pydantic import ValidationError

from flext_mesh.config import ServerConfig
from flext_mesh.logs import setup_logging
from flext_mesh.server import ServeError, serve
from flext_mesh.store import StoreOpenError

__all__ = ["main"]

PROG = "flext-mesh"


class _Parser(argparse.ArgumentParser):
    """argparse with errors on one line (``flext-mesh: error: ...``), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="flext-mesh: a gRPC service-mesh control plane.")
    nouns = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    nouns.required = True

    serve_p = nouns.add_parser(
        "serve",
        help="run the control plane",
        description="Run the control plane. Each flag is also read from FLEXT_MESH_<NAME>.",
    )
    serve_p.add_argument("--listen", metavar="HOST:PORT", help="gRPC address (127.0.0.1:50051)")
    serve_p.add_argument(
        "--http-listen", metavar="HOST:PORT", help="HTTP /metrics address (127.0.0.1:9464)"
    )
    serve_p.add_argument(
        "--store", metavar="URL", help="sqlite:///path.db (default sqlite:///var/flext-mesh.db)"
    )
    serve_p.add_argument(
        "--log-level", metavar="LEVEL", help="DEBUG, INFO (default), WARNING or ERROR"
    )
    serve_p.add_argument(
        "--grace-period",
        metavar="SECONDS",
        type=float,
        help="time in-flight RPCs get to finish on SIGTERM (default 10)",
    )
    serve_p.add_argument(
        "--max-message-bytes", metavar="BYTES", type=int, help="largest message (default 4 MiB)"
    )
    return parser


def _fail(message: str, code: int = 1) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    raise SystemExit(code)


def _server_config(args: argparse.Namespace) -> ServerConfig:
    flags = {
        name: getattr(args, name)
        for name in ("listen", "http_listen", "store", "log_level", "grace_period")
        if getattr(args, name) is not None
    }
    if args.max_message_bytes is not None:
        flags["max_message_bytes"] = args.max_message_bytes
    try:
        return ServerConfig(**flags)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).replace('_', '-')}: "
            f"{err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        _fail(f"bad configuration: {problems}", 2)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``flext-mesh`` console script."""
    args = _build_parser().parse_args(argv)
    if args.command == "serve":
        config = _server_config(args)
        setup_logging(config.log_level)
        try:
            asyncio.run(serve(config))
        except (ServeError, StoreOpenError) as exc:
            _fail(str(exc))
        except KeyboardInterrupt:  # a second Ctrl-C during shutdown
            _fail("interrupted", 130)
