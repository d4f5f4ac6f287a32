"""Keeping one instance registered: register, renew over KeepAlive, register again.

The loop never gives up while the sidecar runs: registration is retried with
exponential backoff and jitter (``retry_async``) while the control plane is unreachable,
the lease is renewed every TTL/3 over one ``KeepAlive`` stream, and a lease reported
expired (the control plane lost it, or was down longer than the TTL) leads to a new
registration. The sidecar serves its callers throughout: membership runs beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from flext_mesh.errors import InvalidArgument
from flext_mesh.retry import UNLIMITED_ATTEMPTS, RetrySpec, retry_async, status_of
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc

__all__ = ["Membership"]

_log = logging.getLogger("flext_sidecar.membership")


#: Every status but a refusal: a refused registration (bad input, no right to register)
#: will not get better by retrying.
_RETRYABLE = frozenset(grpc.StatusCode) - {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.UNAUTHENTICATED,
}


class Membership:
    """Registers ``instance`` and keeps its lease alive until ``stop()``."""

    def __init__(
        self,
        channel: Callable[[], grpc.aio.Channel],
        instance: registry_pb2.ServiceInstance,
        *,
        ttl: float,
        max_backoff: float = 5.0,
    ) -> None:
        self._channel = channel
        self.instance = instance
        self.ttl = ttl
        self._retry = RetrySpec(
            max_attempts=UNLIMITED_ATTEMPTS,
            initial_backoff=0.2,
            max_backoff=max_backoff,
            jitter=0.5,
            retryable=_RETRYABLE,
        )
        self.lease_id = ""
        self.registered = asyncio.Event()
        self.registrations = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the background loop."""
        self._task = asyncio.create_task(self._run(), name="sidecar-membership")

    async def stop(self, *, deregister: bool = True, within: float = 2.0) -> None:
        """Stop renewing; deregister (best effort, within ``within`` seconds) when asked."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if deregister and self.lease_id:
            stub = registry_pb2_grpc.RegistryServiceStub(self._channel())
            with contextlib.suppress(grpc.aio.AioRpcError, TimeoutError):
                await stub.Deregister(
                    registry_pb2.DeregisterRequest(
                        service_name=self.instance.service_name,
                        instance_id=self.instance.instance_id,
                    ),
                    timeout=within,
                )
                _log.info("deregistered instance=%s", self.instance.instance_id)
            self.lease_id = ""

    async def _run(self) -> None:
        while True:
            try:
                await self._register()
                await self._keep_alive()  # returns when the lease is lost
            except grpc.aio.AioRpcError:
                raise  # a refused registration: logged by _register
            except Exception:
                # Membership must outlive any surprise: log it and start over.
                _log.exception("membership loop failed; registering again")
                self.registered.clear()
                await asyncio.sleep(min(self.ttl / 3, 1.0))

    async def _register(self) -> None:
        request = registry_pb2.RegisterRequest(instance=self.instance)
        request.ttl.FromNanoseconds(int(self.ttl * 1e9))

        async def register() -> registry_pb2.RegisterResponse:
            stub = registry_pb2_grpc.RegistryServiceStub(self._channel())
            return await stub.Register(request, timeout=max(1.0, self.ttl / 3))

        async def failed(attempt: int, error: Exception, wait: float) -> None:
            code = status_of(error)
            _log.debug("registration attempt=%d failed (%s); again in %.2fs", attempt, code, wait)

        try:
            reply = await retry_async(register, self._retry, on_attempt=failed)
        except grpc.aio.AioRpcError as exc:
            error = from_rpc_error(exc)
            if isinstance(error, InvalidArgument):
                _log.error("registration refused: %s", error.message)
            raise
        self.lease_id = reply.lease.lease_id
        self.instance.instance_id = reply.instance.instance_id
        self.registrations += 1
        self.registered.set()
        _log.info(
            "registered service=%s instance=%s endpoint=%s lease=%s",
            reply.instance.service_name,
            reply.instance.instance_id,
            reply.instance.endpoint,
            self.lease_id,
        )

    async def _keep_alive(self) -> None:
        """Renew every TTL/3 over one stream; return when the lease is gone."""
        interval = self.ttl / 3
        while True:
            stub = registry_pb2_grpc.RegistryServiceStub(self._channel())
            call = stub.KeepAlive()
            try:
                while True:
                    await call.write(registry_pb2.KeepAliveRequest(lease_ids=[self.lease_id]))
                    reply = await asyncio.wait_for(call.read(), timeout=interval * 2)
                    if not isinstance(reply, registry_pb2.KeepAliveResponse):
                        break  # EOF: the control plane closed the stream
                    if self.lease_id in reply.expired_lease_ids:
                        _log.warning("lease %s expired; registering again", self.lease_id)
                        self.registered.clear()
                        return
                    await asyncio.sleep(interval)
            except (grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError) as exc:
                # A write on a stream the server already ended (the control plane
                # died) raises InvalidStateError rather than AioRpcError.
                _log.debug("keep-alive stream broke: %r", exc)
                await asyncio.sleep(min(interval, 1.0))
            finally:
                call.cancel()
