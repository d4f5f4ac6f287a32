"""``flext-mesh``: the control plane (``serve``) and the operator commands.

Operator commands are ``flext-mesh <noun> <verb>`` (``services list``, ``metrics
report``, ``workflow run``, ``execution show``, ``policy split``, ...): a table
by default, ``-o wide`` for more columns, ``-o json`` or ``-o yaml`` for scripts,
against ``--control-plane HOST:PORT`` (also read from ``FLEXT_MESH_CONTROL_PLANE``,
default 127.0.0.1:50051).

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

import grpc
from pydantic import ValidationError

from flext_mesh.addresses import DEFAULT_LISTEN, split_addresses
from flext_mesh.cli import certs, metrics, policy, services, status, tokens, workflows, xds
from flext_mesh.cli.common import PROG, add_output_option, emit, fail
from flext_mesh.cli.output import one_line
from flext_mesh.config import ServerConfig
from flext_mesh.errors import DeadlineExceeded, InvalidArgument, Unavailable
from flext_mesh.flags import ArgumentParser, setting_help
from flext_mesh.rpc.channels import ClientSecurity, TransportError, open_channel, tls_problem
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.version import __version__

__all__ = ["main"]


def _build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog=PROG, description="flext-mesh: a gRPC service-mesh control plane.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    nouns = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=ArgumentParser)
    nouns.required = True

    serve_p = nouns.add_parser(
        "serve",
        help="run the control plane",
        description="Run the control plane. Each flag is also read from FLEXT_MESH_<NAME>.",
    )
    # One flag per ServerConfig field, so every setting is a flag and a variable;
    # pydantic converts and validates the strings.
    # The flags' own defaults are None: ServerConfig applies flag > variable > default.
    for name, info in ServerConfig.model_fields.items():
        help_text = setting_help(info, f"FLEXT_MESH_{name.upper()}")
        if info.annotation is bool:  # a switch: --insecure, not --insecure true
            serve_p.add_argument(
                f"--{name.replace('_', '-')}",
                dest=name,
                action="store_true",
                default=None,
                help=help_text,
            )
            continue
        serve_p.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            metavar=_METAVARS.get(name, "N"),
            help=help_text,
        )

    client = _client_options()
    services.add_commands(nouns, parents=[client])
    metrics.add_commands(nouns, parents=[client])
    workflows.add_commands(nouns, parents=[client])
    policy.add_commands(nouns, parents=[client])
    status.add_command(nouns, parents=[client])
    certs.add_commands(nouns)
    tokens.add_commands(nouns)
    xds.add_commands(nouns, parents=[client])
    return parser


_METAVARS = {
    "listen": "HOST:PORT",
    "http_listen": "HOST:PORT",
    "store": "URL",
    "log_level": "LEVEL",
    "log_format": "FORMAT",
    "tls_cert": "FILE",
    "tls_key": "FILE",
    "tls_ca": "FILE",
    "tls_client_auth": "MODE",
    "auth_tokens_file": "FILE",
    "auth_open_services": "NAMES",
    "token": "TOKEN",
}


def _client_options() -> argparse.ArgumentParser:
    """Flags every operator command takes; defaults from ``FLEXT_MESH_*`` variables."""
    options = ArgumentParser(add_help=False)
    options.add_argument(
        "--control-plane",
        metavar="HOST:PORT[,HOST:PORT]",
        type=_address,
        # A string default goes through type=, so a bad variable is a usage error too.
        default=os.environ.get("FLEXT_MESH_CONTROL_PLANE", DEFAULT_LISTEN),
        help="control plane gRPC address, or several replicas' comma separated "
        "(env FLEXT_MESH_CONTROL_PLANE)",
    )
    options.add_argument(
        "--timeout",
        metavar="SECONDS",
        type=_seconds,
        default=os.environ.get("FLEXT_MESH_TIMEOUT", "10"),
        help="deadline of each call to the control plane (env FLEXT_MESH_TIMEOUT)",
    )
    for flag, metavar, what in (
        ("tls-ca", "FILE", "CA bundle that verifies the control plane; set, it turns TLS on"),
        ("tls-cert", "FILE", "client certificate shown to a control plane requiring mTLS"),
        ("tls-key", "FILE", "private key of --tls-cert"),
        (
            "tls-server-name",
            "NAME",
            "name the control plane's certificate must carry, if not its host",
        ),
        # A secret: --help does not show the variable's value as the default.
        (
            "token",
            "TOKEN",
            "bearer token sent with every call (default: from the variable, not shown",
        ),
    ):
        variable = f"FLEXT_MESH_{flag.replace('-', '_').upper()}"
        help_text = (
            f"{what}; env {variable})" if "(default:" in what else f"{what} (env {variable})"
        )
        options.add_argument(
            f"--{flag}", metavar=metavar, default=os.environ.get(variable, ""), help=help_text
        )
    add_output_option(options)
    return options


def _address(value: str) -> str:
    try:
        split_addresses(value)
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
        fail(f"bad configuration: {problems}", 2)


def _rpc_failure(exc: grpc.RpcError, address: str, timeout: float) -> str:
    """The line to print for a failed call to the control plane."""
    error = from_rpc_error(exc)
    if isinstance(error, Unavailable):
        return f"cannot reach the control plane at {address}: {one_line(error.message)}"
    if isinstance(error, DeadlineExceeded):
        return f"the control plane at {address} did not answer within {timeout:g} s"
    if isinstance(error, InvalidArgument) and error.violations:
        return "invalid request: " + "; ".join(
            f"{v.field}: {one_line(v.description)}" for v in error.violations
        )
    return one_line(error.message)


def _client_security(args: argparse.Namespace) -> ClientSecurity:
    if (args.tls_cert or args.tls_key) and not args.tls_ca:
        fail(
            "--tls-cert and --tls-key need --tls-ca (the CA the control plane's "
            "certificate is signed by)",
            2,
        )
    return ClientSecurity(
        tls_ca=args.tls_ca,
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        tls_server_name=args.tls_server_name,
        token=args.token,
    )


def _transport_failure(exc: grpc.RpcError, address: str, security: ClientSecurity) -> str | None:
    """The line for a call that failed in the TLS handshake (or looks like it), else None."""
    if exc.code() is not grpc.StatusCode.UNAVAILABLE:
        return None
    details: str = exc.details() or ""
    problem = tls_problem(details)
    if problem is not None:
        hint = "--tls-server-name" if "host name" in problem else "--tls-ca"
        if "does not speak TLS" in problem:
            hint = "it may serve plaintext: drop --tls-ca"
        return f"TLS handshake with {address} failed: {problem} (check {hint})"
    if "Socket closed" in details or "Connection reset" in details:
        if not security.tls:
            hint = "if it serves TLS, give --tls-ca"
        elif not security.tls_cert:
            hint = "if it requires client certificates, give --tls-cert and --tls-key"
        else:
            hint = "is --tls-cert signed by a CA the control plane trusts?"
        return f"cannot reach the control plane at {address}: connection closed ({hint})"
    return None


def _quiet_grpc_core() -> None:
    """Keep the log lines of gRPC's C core off an operator command's stderr.

    A failed TLS handshake, say, makes the core write ``I1207 12:00:00.000000 ...
    ssl_transport_security.cc:...] Handshake failed ...`` before the command's own
    one-line error, which already says what went wrong. GRPC_VERBOSITY=NONE would
    silence it, but gRPC reads that variable once, when it is imported, and ``import
    flext_mesh`` has done that before any command runs. So the core's stderr (file
    descriptor 2) goes to /dev/null, and Python's ``sys.stderr`` to a copy of it.
    A GRPC_VERBOSITY the user set is honoured: then nothing changes.
    """
    stderr = sys.__stderr__
    if "GRPC_VERBOSITY" in os.environ or stderr is None or sys.stderr is not stderr:
        return  # asked for the core's lines; or main() called from Python (a test)
    stderr.flush()
    terminal = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    sys.stderr = open(  # noqa: SIM115 - stderr for the rest of the process
        terminal, "w", encoding=stderr.encoding, errors=stderr.errors, buffering=1
    )


def _run_operator_command(args: argparse.Namespace) -> None:
    """Run a ``<noun> <verb>`` command over one channel; print its text or one error line."""
    address: str = args.control_plane
    security = _client_security(args)
    _quiet_grpc_core()
    try:
        with open_channel(address, security, aio=False) as channel:
            text: str = args.run(channel, args)
    except TransportError as exc:
        fail(str(exc))
    except grpc.RpcError as exc:
        fail(_transport_failure(exc, address, security) or _rpc_failure(exc, address, args.timeout))
    except KeyboardInterrupt:
        fail("interrupted", 130)
    emit(text)


def _serve(args: argparse.Namespace) -> None:
    # Imported here: the operator commands need none of the server, and start faster.
    from flext_mesh.logs import setup_logging  # noqa: PLC0415
    from flext_mesh.server import ServeError, serve  # noqa: PLC0415
    from flext_mesh.store import StoreOpenError  # noqa: PLC0415

    config = _server_config(args)
    setup_logging(config.log_level, config.log_format)
    try:
        asyncio.run(serve(config))
    except (ServeError, StoreOpenError) as exc:
        fail(str(exc))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        fail("interrupted", 130)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``flext-mesh`` console script."""
    args = _build_parser().parse_args(argv)
    if args.command == "serve":
        _serve(args)
    elif args.command in ("certs", "cert"):
        try:
            emit(certs.run(args))
        except certs.CertsError as exc:
            fail(str(exc))
    elif args.command in ("tokens", "token"):
        try:
            emit(tokens.run(args))
        except tokens.TokensFileError as exc:
            fail(str(exc))
    elif args.command == "xds" and args.verb == "bootstrap":
        try:
            emit(xds.run(args))
        except xds.BootstrapError as exc:
            fail(str(exc), 2)
    else:
        _run_operator_command(args)
