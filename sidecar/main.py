"""``flext-sidecar``: serve an app's ServiceProcessors beside it, registered in the mesh.

It serves ``ProcessorService`` and ``grpc.health.v1`` on ``--listen``, registers with
the control plane under a lease and keeps it alive (registering again after losing
it), and starts serving even while the control plane is down. A registration the
control plane refuses (PERMISSION_DENIED, UNAUTHENTICATED, INVALID_ARGUMENT) is one line
and exit 2 when it is the first answer; later (a revoked token) it is one ERROR, health
NOT_SERVING and registration retried with capped backoff. On SIGTERM or SIGINT:
health turns NOT_SERVING, new calls are refused as draining, the instance is
deregistered, in-flight calls get the grace period, and the process exits 0.

Errors a user can fix (a bad flag, a bad ``--app``, a port in use) print one line and
exit non-zero without a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import socket
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import grpc
from pydantic import ValidationError
from pydantic_settings import SettingsError

from flext_mesh.addresses import parse_host_port
from flext_mesh.errors import ConfigError
from flext_mesh.flags import ArgumentParser, setting_help
from flext_mesh.hosting.host import HostSettings, ProcessorHost
from flext_mesh.hosting.membership import Membership, describe_refusal
from flext_mesh.hosting.reporter import CallReporter
from flext_mesh.hosting.results import LostResults
from flext_mesh.hosting.servicer import CallOutcome, ProcessorServicer
from flext_mesh.logs import setup_logging
from flext_mesh.process import bind_problem, signal_received
from flext_mesh.rpc import tracing
from flext_mesh.rpc.channels import ClientSecurity, open_channel
from flext_mesh.v1 import metrics_pb2, registry_pb2
from flext_mesh.version import __version__
from sidecar.app import AppError, load_app
from sidecar.client import MeshClient, set_current
from sidecar.config import (
    ENV_PREFIX,
    SHARED,
    SHARED_ENV_PREFIX,
    SidecarConfig,
    ignored_variables,
)

if TYPE_CHECKING:
    from sidecar.metrics import SidecarMetrics

__all__ = ["Sidecar", "freeze_start_up", "main"]

PROG = "flext-sidecar"
_log = logging.getLogger("flext_sidecar")


class SidecarError(ConfigError):
    """The sidecar cannot start; the message says why."""


class RegistrationRefused(SidecarError):
    """The control plane refused the first registration (a token or certificate that
    may not register the service, a bad instance): exit 2, nothing will change that."""


class Sidecar:
    """One running sidecar: its host (server, processors, membership), reporter and
    mesh client."""

    def __init__(self, config: SidecarConfig) -> None:
        self.config = config
        self.operations = load_app(config.app, app_dir=config.app_dir)
        #: How this sidecar calls the control plane and other sidecars.
        self.security = ClientSecurity(
            tls_ca=config.tls_ca,
            tls_cert=config.tls_cert,
            tls_key=config.tls_key,
            tls_server_name=config.tls_server_name,
            token=config.token,
        )
        self.host = ProcessorHost(
            HostSettings(
                listen=config.listen,
                tls_cert=config.tls_cert,
                tls_key=config.tls_key,
                tls_ca=config.tls_ca,
                tls_client_auth=config.tls_client_auth,
                insecure=config.insecure,
            ),
            channel=self.channel,
            security=self.security,
        )
        self.port = 0
        self._channel: grpc.aio.Channel | None = None
        self.reporter: CallReporter | None = None
        self.client: MeshClient | None = None
        #: Results of step calls whose caller went away (--shared-idempotency).
        self.lost_results: LostResults | None = None
        #: The sidecar's own /metrics (--metrics-listen).
        self.metrics: SidecarMetrics | None = None

    @property
    def server(self) -> grpc.aio.Server:
        """The gRPC server serving ProcessorService, health and reflection."""
        return self.host.server

    @property
    def processor(self) -> ProcessorServicer | None:
        """The ProcessorService servicer, once started."""
        return self.host.servicer

    @property
    def membership(self) -> Membership | None:
        """The instance's registration, once started."""
        return self.host.membership

    def channel(self) -> grpc.aio.Channel:
        """The channel to the control plane (created on first use)."""
        if self._channel is None:
            self._channel = open_channel(self.config.control_plane, self.security)
        return self._channel

    async def start(self) -> int:
        """Bind and serve, then start registering; returns the bound port."""
        config = self.config
        host, _ = parse_host_port(config.listen)
        sys.setswitchinterval(config.switch_interval_ms / 1000)  # process-wide, see config
        try:
            self.port = self.host.bind()
        except ConfigError as exc:
            raise SidecarError(str(exc)) from None
        advertise = config.advertise or f"{_advertised_host(host)}:{self.port}"
        instance_id = config.instance_id or f"{config.service}-{socket.gethostname()}-{self.port}"
        self.reporter = CallReporter(self.channel, reporter_id=instance_id)
        reporter = self.reporter

        def report(outcome: CallOutcome) -> None:
            reporter.record_call(
                config.service,
                outcome.operation,
                outcome.duration_ms,
                outcome.success,
                outcome.code,
                instance_id=instance_id,
                version=config.version,
                correlation_id=outcome.correlation_id,
                side=metrics_pb2.CALL_SIDE_SERVER,
                caller_service=outcome.caller,
            )

        if config.shared_idempotency:
            self.lost_results = LostResults(self.channel, config.service)
        await self.host.serve(
            ProcessorServicer(
                self.operations,
                service_name=config.service,
                instance_id=instance_id,
                version=config.version,
                on_call=report,
                on_lost_answer=self.lost_results.record if self.lost_results else None,
                quick_sync_on_loop=config.quick_sync_on_loop,
            )
        )
        self.host.register(
            registry_pb2.ServiceInstance(
                service_name=config.service,
                instance_id=instance_id,
                endpoint=advertise,
                version=config.version,
                type=config.type,
                zone=config.zone,
                labels=config.labels(),
                capabilities=sorted(self.operations),
                weight=config.weight,
                health_check_mode=registry_pb2.HEALTH_CHECK_MODE_GRPC,
            ),
            ttl=config.ttl,
            report_first_refusal=False,  # run() exits with it
            applied_revision=lambda: self.client.revision if self.client is not None else 0,
        )
        self.reporter.start()
        self.client = MeshClient(
            config.control_plane,
            caller_service=config.service,
            reporter=self.reporter,
            zone=config.zone,  # the caller zone of the policies' zone preference
            security=self.security,
        )
        await self.client.start(wait=0)
        set_current(self.client)
        if config.metrics_listen:
            # Imported only when asked for: prometheus_client and aiohttp cost RSS.
            from sidecar.metrics import SidecarMetrics  # noqa: PLC0415

            self.metrics = SidecarMetrics(self.client, self.reporter)
            try:
                port = await self.metrics.start(config.metrics_listen)
            except OSError as exc:
                await self.stop(grace=0)  # deregistered, not left to expire
                host_, port_ = parse_host_port(config.metrics_listen)
                raise SidecarError(
                    f"--metrics-listen {config.metrics_listen}: {bind_problem(host_, port_)}"
                ) from exc
            _log.info(
                "metrics served http=%s:%d/metrics", parse_host_port(config.metrics_listen)[0], port
            )
        _log.info(
            "serving service=%s instance=%s listen=%s:%d advertise=%s operations=%s",
            config.service,
            instance_id,
            host,
            self.port,
            advertise,
            ",".join(sorted(self.operations)),
        )
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Drain: NOT_SERVING, refuse new calls, deregister, let in-flight calls finish."""
        await self.host.stop(self.config.grace_period if grace is None else grace)
        if self.lost_results is not None:  # hand over what the drain finished
            await self.lost_results.flush(2.0)
            await self.lost_results.aclose()
        if self.metrics is not None:
            await self.metrics.stop()
        if self.client is not None:
            set_current(None)
            await self.client.aclose()
        if self.reporter is not None:
            await self.reporter.aclose(flush=True, within=2.0)
        if self._channel is not None:
            await self._channel.close()


def freeze_start_up() -> None:
    """Keep what start-up made (modules, the app, the servers) out of the garbage
    collector's passes: it lives as long as the process, and walking it in every full
    collection holds the event loop for milliseconds, as in ``flext-mesh serve``."""
    gc.collect()
    gc.freeze()


def _advertised_host(host: str) -> str:
    if host in ("0.0.0.0", "[::]", ""):
        return socket.gethostname()
    return host


async def run(config: SidecarConfig) -> None:
    """Run a sidecar until SIGTERM or SIGINT, then drain.

    Raises :class:`RegistrationRefused` (after stopping) when the control plane's first
    answer to the registration is a refusal.
    """
    problem = tracing.settings_problem()
    if problem:
        raise SidecarError(problem)
    async with tracing.traced_process(config.service):
        await _run(config)


async def _run(config: SidecarConfig) -> None:
    stop = signal_received()
    sidecar = Sidecar(config)
    await sidecar.start()
    freeze_start_up()
    membership = sidecar.membership
    assert membership is not None
    first = asyncio.ensure_future(membership.first_answer())
    try:
        await asyncio.wait((stop, first), return_when=asyncio.FIRST_COMPLETED)
        refusal = first.result() if first.done() else None
    finally:
        first.cancel()
    if not stop.done() and refusal is not None:
        await sidecar.stop(grace=0)
        raise RegistrationRefused(
            f"the control plane at {config.control_plane} refused to register service "
            f"{config.service!r}: {describe_refusal(refusal)}"
        )
    received = await stop
    _log.info("draining signal=%s grace=%.1fs", received, config.grace_period)
    await sidecar.stop()
    _log.info("stopped")


def _parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog=PROG,
        description="Serve an app's ServiceProcessors in the mesh. Each flag is also read "
        f"from {ENV_PREFIX}<NAME>; the settings the whole mesh shares (--control-plane, "
        f"--zone, --tls-ca, --tls-cert, --tls-key, --tls-server-name, --token) then from "
        f"{SHARED_ENV_PREFIX}<NAME>, as flext-mesh and MeshClient read them. A flag beats "
        "its variables, which beat the default.",
    )
    # The flags' own defaults are None: SidecarConfig applies the precedence.
    for name, info in SidecarConfig.model_fields.items():
        flag = f"--{name.replace('_', '-')}"
        variables = f"{ENV_PREFIX}{name.upper()}"
        if name in SHARED:
            variables += f", {SHARED_ENV_PREFIX}{name.upper()}"
        kwargs: dict[str, Any] = {"dest": name, "help": setting_help(info, variables)}
        if name in _METAVARS:
            kwargs.update(metavar=_METAVARS[name])
        if name == "label":
            kwargs.update(action="append", metavar="KEY=VALUE")
        elif name == "version":
            # The instance's version takes a value; alone, --version prints the
            # sidecar's own version, as every other command's --version does.
            kwargs.update(
                nargs="?",
                const=_SHOW_VERSION,
                metavar="VERSION",
                help=f"{info.description} Without a value: print {PROG}'s own version "
                f"and exit. (env {variables})",
            )
        elif info.annotation is bool:  # a switch: --insecure, not --insecure true
            kwargs.update(action="store_true", default=None)
        parser.add_argument(flag, **kwargs)
    return parser


_SHOW_VERSION = object()

_METAVARS = {
    "service": "NAME",
    "app": "MODULE:ATTR",
    "app_dir": "DIR",
    "listen": "HOST:PORT",
    "advertise": "HOST:PORT",
    "control_plane": "HOST:PORT[,HOST:PORT]",
    "instance_id": "ID",
    "version": "VERSION",
    "weight": "N",
    "zone": "ZONE",
    "type": "TYPE",
    "ttl": "SECONDS",
    "grace_period": "SECONDS",
    "log_level": "LEVEL",
    "log_format": "FORMAT",
    "metrics_listen": "HOST:PORT",
    "switch_interval_ms": "MS",
    "tls_cert": "FILE",
    "tls_key": "FILE",
    "tls_ca": "FILE",
    "tls_client_auth": "MODE",
    "tls_server_name": "NAME",
    "token": "TOKEN",
}


def _fail(message: str, code: int = 1) -> NoReturn:
    sys.stderr.write(f"{PROG}: error: {message}\n")
    raise SystemExit(code)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``flext-sidecar`` console script."""
    args = _parser().parse_args(argv)
    if args.version is _SHOW_VERSION:
        sys.stdout.write(f"{PROG} {__version__}\n")
        raise SystemExit(0)
    flags = {k: v for k, v in vars(args).items() if v is not None}
    ignored = ignored_variables(given=flags)
    try:
        config = SidecarConfig(**flags)
    except SettingsError as exc:
        _fail(f"bad configuration: {exc}", 2)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']).replace('_', '-') or 'flags'}: "
            f"{err['msg'].removeprefix('Value error, ')}"
            for err in exc.errors()
        )
        _fail(f"bad configuration: {problems}", 2)
    setup_logging(config.log_level, config.log_format)
    if ignored:
        # They are flext-mesh serve's: exported for it, they must not move the sidecar.
        _log.warning(
            "%s",
            "; ".join(
                f"ignoring {old} (flext-mesh serve's): flext-sidecar reads {new}"
                for old, new in ignored
            ),
        )
    try:
        asyncio.run(run(config))
    except (AppError, RegistrationRefused) as exc:
        _fail(str(exc), 2)
    except SidecarError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _fail("interrupted", 130)
