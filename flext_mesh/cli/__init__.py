"""``flext-mesh``: the control plane (``serve``) and the operator commands.

Operator commands are ``flext-mesh <noun> <verb>`` (``services list``, ``metrics
report``, ``workflow run``, ``execution show``, ``policy split``, ...): a table
by default, ``-o json`` for scripts, against ``--control-plane HOST:PORT`` (also read
from ``FLEXT_MESH_CONTROL_PLANE``, default 127.0.0.1:50051).

Errors a user can fix (a bad flag, a port in use, an unusable store, an unreachable
control plane, an unknown service) print one line naming the problem and exit
non-zero, without a traceback: 2 for bad usage, 1 for the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import grpc
from pydantic import ValidationError

from flext_mesh.cli import metrics, policy, services, workflows
from flext_mesh.cli.output import FORMATS
from flext_mesh.config import DEFAULT_LISTEN, ServerConfig, parse_host_port
from flext_mesh.errors import DeadlineExceeded, InvalidArgument, Unavailable, from_rpc_error

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
    # One flag per ServerConfig field, so every setting is a flag and a variable;
    # pydantic converts and validates the strings.
    for name, info in ServerConfig.model_fields.items():
        serve_p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            metavar=_METAVARS.get(name, "N"),
            help=f"{info.description} (default {info.default}; env FLEXT_MESH_{name.upper()})",
        )

    client = _client_options()
    services.add_commands(nouns, parents=[client])
    metrics.add_commands(nouns, parents=[client])
    workflows.add_commands(nouns, parents=[client])
    policy.add_commands(nouns, parents=[client])
    return parser


_METAVARS = {
    "listen": "HOST:PORT",
    "http_listen": "HOST:PORT",
    "store": "URL",
    "log_level": "LEVEL",
}


def _client_options() -> argparse.ArgumentParser:
    """Flags every operator command takes; defaults from ``FLEXT_MESH_*`` variables."""
    options = _Parser(add_help=False)
    options.add_argument(
        "--control-plane",
        metavar="HOST:PORT",
        type=_address,
        # A string default goes through type=, so a bad variable is a usage error too.
        default=os.environ.get("FLEXT_MESH_CONTROL_PLANE", DEFAULT_LISTEN),
        help="control plane gRPC address (default %(default)s; env FLEXT_MESH_CONTROL_PLANE)",
    )
    options.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        default=os.environ.get("FLEXT_MESH_TIMEOUT", "10"),
        help="deadline of each call to the control plane (default %(default)s; "
        "env FLEXT_MESH_TIMEOUT)",
    )
    options.add_argument(
        "-o",
        "--output",
        choices=FORMATS,
        default=FORMATS[0],
        help="table for people (default), json for scripts",
    )
    return options


def _address(value: str) -> str:
    try:
        parse_host_port(value, allow_zero=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    return value.strip()


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds <= 3600:  # also rejects nan
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds in (0, 3600]")
    return seconds


def _fail(message: str, code: int = 1) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    raise SystemExit(code)


def _server_config(args: argparse.Namespace) -> ServerConfig:
    flags = {
        name: getattr(args, name)
        for name in ServerConfig.model_fields
        if getattr(args, name, None) is not None
    }
    try:
        return ServerConfig(**flags)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).replace('_', '-')}: "
            f"{err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        _fail(f"bad configuration: {problems}", 2)


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _rpc_failure(exc: grpc.RpcError, address: str, timeout: float) -> str:
    """The line to print for a failed call to the control plane."""
    error = from_rpc_error(exc)
    if isinstance(error, Unavailable):
        return f"cannot reach the control plane at {address}: {_one_line(error.message)}"
    if isinstance(error, DeadlineExceeded):
        return f"the control plane at {address} did not answer within {timeout:g} s"
    if isinstance(error, InvalidArgument) and error.violations:
        return "invalid request: " + "; ".join(
            f"{v.field}: {_one_line(v.description)}" for v in error.violations
        )
    return _one_line(error.message)


def _print(text: str) -> None:
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except BrokenPipeError:  # `flext-mesh services list | head -1`
        # Point stdout at /dev/null so that the flush at exit does not fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None


def _run_operator_command(args: argparse.Namespace) -> None:
    """Run a ``<noun> <verb>`` command over one channel; print its text or one error line."""
    address: str = args.control_plane
    try:
        with grpc.insecure_channel(address) as channel:
            text: str = args.run(channel, args)
    except grpc.RpcError as exc:
        _fail(_rpc_failure(exc, address, args.timeout))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    _print(text)


def _serve(args: argparse.Namespace) -> None:
    # Imported here: the operator commands need none of the server, and start faster.
    from flext_mesh.logs import setup_logging  # noqa: PLC0415
    from flext_mesh.server import ServeError, serve  # noqa: PLC0415
    from flext_mesh.store import StoreOpenError  # noqa: PLC0415

    config = _server_config(args)
    setup_logging(config.log_level)
    try:
        asyncio.run(serve(config))
    except (ServeError, StoreOpenError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        _fail("interrupted", 130)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``flext-mesh`` console script."""
    args = _build_parser().parse_args(argv)
    if args.command == "serve":
        _serve(args)
    else:
        _run_operator_command(args)
