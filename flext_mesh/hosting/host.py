"""``ProcessorHost``: a gRPC server hosting ServiceProcessors, registered in the mesh.

One assembly for every process that hosts processors (``flext-sidecar`` and the
facade's embedded services): bind, serve ``ProcessorService`` (plus
``grpc.health.v1`` and, optionally, reflection), turn health SERVING, register the
instance under a lease and keep it (:class:`~flext_mesh.hosting.membership.Membership`);
health is NOT_SERVING while the control plane refuses the instance.
``stop()`` drains in the order callers rely on: health NOT_SERVING, new calls refused,
deregistered, in-flight calls given the grace period, server stopped.

Problems a user can fix (TLS files, plaintext on a public address, a port in use) raise
:class:`HostError` or :class:`~flext_mesh.rpc.channels.TransportError`, both
:class:`~flext_mesh.errors.ConfigError`; callers say them their own way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from flext_mesh.addresses import parse_host_port
from flext_mesh.errors import ConfigError, MeshError
from flext_mesh.hosting.membership import Membership
from flext_mesh.hosting.servicer import ProcessorServicer, add_processor_servicer
from flext_mesh.process import bind_problem
from flext_mesh.rpc import reflection
from flext_mesh.rpc.channels import ClientSecurity, check_listen, server_credentials
from flext_mesh.rpc.health import HEALTH_SERVICE, HealthServicer
from flext_mesh.v1 import processor_pb2, registry_pb2

__all__ = ["HostError", "HostSettings", "ProcessorHost"]

_log = logging.getLogger("flext_mesh.hosting")
_PROCESSOR_SERVICE = processor_pb2.DESCRIPTOR.services_by_name["ProcessorService"].full_name


class HostError(ConfigError):
    """The host cannot serve (its address is taken or not allowed); the message says why."""


@dataclass(frozen=True, kw_only=True)
class HostSettings:
    """How a host listens and which security it serves with."""

    listen: str
    """``HOST:PORT`` to bind (port 0: any free port)."""
    tls_cert: str = ""
    """PEM certificate served ("": plaintext)."""
    tls_key: str = ""
    """PEM key of ``tls_cert``."""
    tls_ca: str = ""
    """PEM CA that client certificates must chain to (with ``tls_client_auth``)."""
    tls_client_auth: str = "none"
    """``none`` or ``require`` (mutual TLS)."""
    insecure: bool = False
    """Allow plaintext on a non-loopback address."""
    reflection: bool = True
    """Serve gRPC server reflection (grpcurl works without the protos)."""


class ProcessorHost:
    """Serves one ProcessorServicer and keeps its instance registered in the mesh."""

    def __init__(
        self,
        settings: HostSettings,
        *,
        channel: Callable[[], grpc.aio.Channel],
        security: ClientSecurity | None = None,
    ) -> None:
        self.servicer: ProcessorServicer | None = None
        self.settings = settings
        self.health = HealthServicer()
        # SO_REUSEPORT off: a second process on the same port must fail, not share it.
        self.server = grpc.aio.server(options=[("grpc.so_reuseport", 0)])
        self.port = 0
        self.membership: Membership | None = None
        self._channel = channel
        self._security = security

    def bind(self) -> int:
        """Check the security settings and bind; returns the bound port."""
        settings = self.settings
        host, port = parse_host_port(settings.listen)
        credentials = server_credentials(
            settings.tls_cert, settings.tls_key, settings.tls_ca, settings.tls_client_auth
        )
        check_listen(settings.listen, tls=credentials is not None, insecure=settings.insecure)
        if self._security is not None:
            self._security.check()
        try:
            if credentials is None:
                self.port = self.server.add_insecure_port(settings.listen)
            else:
                self.port = self.server.add_secure_port(settings.listen, credentials)
        except RuntimeError as exc:
            raise HostError(bind_problem(host, port)) from exc
        return self.port

    async def serve(self, servicer: ProcessorServicer) -> None:
        """Serve ``servicer`` (after :meth:`bind`, which told the port its instance id
        may name) and turn health SERVING."""
        self.servicer = servicer
        add_processor_servicer(servicer, self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        if self.settings.reflection:
            reflection.enable_reflection(
                (_PROCESSOR_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), self.server
            )
        try:
            await self.server.start()
        except BaseException:
            await self.server.stop(None)
            servicer.close()
            raise
        for name in ("", _PROCESSOR_SERVICE):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)

    def register(
        self,
        instance: registry_pb2.ServiceInstance,
        *,
        ttl: float,
        report_first_refusal: bool = True,
        applied_revision: Callable[[], int] | None = None,
    ) -> Membership:
        """Register ``instance`` under a lease and keep it registered (in the background).

        While the control plane refuses it (a revoked token, a scope that does not
        cover the service), health is NOT_SERVING; SERVING again once it is accepted.
        ``report_first_refusal=False``: a refusal before any registration is left to
        the caller of ``membership.first_answer()``.
        """
        self.membership = Membership(
            self._channel,
            instance,
            ttl=ttl,
            on_standing=self._standing,
            report_first_refusal=report_first_refusal,
            applied_revision=applied_revision,
        )
        self.membership.start()
        return self.membership

    async def _standing(self, refusal: MeshError | None) -> None:
        # After enter_graceful_shutdown() (draining), set() changes nothing.
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if refusal is None
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", _PROCESSOR_SERVICE):
            await self.health.set(name, status)

    async def stop(self, grace: float) -> bool:
        """Drain and stop; False when calls were still running after ``grace`` seconds."""
        await self.health.enter_graceful_shutdown()
        servicer = self.servicer
        if servicer is not None:
            servicer.drain()
        if self.membership is not None:
            await self.membership.stop(deregister=True)
        idle = await servicer.wait_idle(grace) if servicer is not None else True
        if not idle:
            _log.warning("calls still running after %gs; stopping", grace)
        await self.server.stop(0.5)
        if servicer is not None:
            servicer.close()
        return idle
