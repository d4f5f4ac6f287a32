"""Keeping one instance registered: register, renew over KeepAlive, register again.

The loop never gives up while the sidecar runs: registration is retried with
exponential backoff and jitter (``retry_async``) while the control plane is unreachable,
the lease is renewed every TTL/3 over one ``KeepAlive`` stream, and a lease reported
expired (the control plane lost it, or was down longer than the TTL) leads to a new
registration. The sidecar serves its callers throughout: membership runs beside it.

A refusal (INVALID_ARGUMENT, PERMISSION_DENIED, UNAUTHENTICATED: a bad instance, a
token or certificate that may not register the service, a revoked token) is not an
outage: it is logged once at ERROR with the control plane's reason, ``on_standing``
hears of it (the host turns its health NOT_SERVING), and registration is tried again
with a backoff capped at ``max_refused_backoff``, so fixing the token file or the ACL
brings the instance back without a restart. :meth:`Membership.first_answer` tells
whoever must stop at a refusal at start (``flext-sidecar`` exits 2) what the first
answer was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from flext_mesh.errors import InvalidArgument, MeshError
from flext_mesh.logs import log_failure
from flext_mesh.retry import UNLIMITED_ATTEMPTS, Backoff, RetrySpec, retry_async, status_of
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc

__all__ = ["REFUSAL_CODES", "Membership", "describe_refusal"]

_log = logging.getLogger("flext_sidecar.membership")

#: Answers that say "no" rather than "not now": retrying at once will not help.
REFUSAL_CODES = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNAUTHENTICATED,
    }
)
#: Every status but a refusal is retried at the pace of an outage.
_RETRYABLE = frozenset(grpc.StatusCode) - REFUSAL_CODES - {grpc.StatusCode.OK}

#: Called when the standing changes: the refusal, or None once registered again.
OnStanding = Callable[[MeshError | None], Awaitable[None]]


def describe_refusal(error: MeshError) -> str:
    """``PERMISSION_DENIED: token 'x' may not ...``: the code and the control plane's
    reason, with every field violation of an INVALID_ARGUMENT."""
    message = error.message
    if isinstance(error, InvalidArgument) and error.violations:
        named = "; ".join(f"{v.field}: {v.description}" for v in error.violations)
        if named not in message:
            message = f"{message}: {named}" if message else named
    return f"{error.code.name}: {message}"


class _Refused(Exception):
    """The control plane said no (one of REFUSAL_CODES)."""

    def __init__(self, error: MeshError) -> None:
        super().__init__(error.message)
        self.error = error


class Membership:
    """Registers ``instance`` and keeps its lease alive until ``stop()``.

    ``on_standing`` is awaited with the refusal when the control plane refuses the
    instance, and with None when it is registered again after one.
    ``report_first_refusal=False`` leaves a refusal that comes before any registration
    to whoever awaits :meth:`first_answer` (it is not logged here).
    """

    def __init__(
        self,
        channel: Callable[[], grpc.aio.Channel],
        instance: registry_pb2.ServiceInstance,
        *,
        ttl: float,
        max_backoff: float = 5.0,
        max_refused_backoff: float = 30.0,
        on_standing: OnStanding | None = None,
        report_first_refusal: bool = True,
        applied_revision: Callable[[], int] | None = None,
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
        #: Waits between registrations the control plane refused: 1 s doubling up to
        #: ``max_refused_backoff`` (a fixed ACL is noticed that late at most).
        self._refused_backoff = Backoff(
            RetrySpec(
                max_attempts=UNLIMITED_ATTEMPTS,
                initial_backoff=min(1.0, max_refused_backoff),
                max_backoff=max_refused_backoff,
                jitter=0.2,
            )
        )
        self._on_standing = on_standing
        #: The registry revision this process's mesh client has applied, said on each
        #: KeepAlive (``flext-mesh status``).
        self._applied_revision = applied_revision
        self._report_first_refusal = report_first_refusal
        self.lease_id = ""
        self.registered = asyncio.Event()
        self.registrations = 0
        #: The control plane's refusal while the instance is refused, else None.
        self.refusal: MeshError | None = None
        self._first: asyncio.Future[MeshError | None] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the background loop."""
        self._first = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name="sidecar-membership")

    async def first_answer(self) -> MeshError | None:
        """Wait for the control plane's first answer: None once registered, the refusal
        when it refused first (outages are waited out)."""
        if self._first is None:
            raise RuntimeError("Membership.first_answer() before start()")
        return await asyncio.shield(self._first)

    async def stop(self, *, deregister: bool = True, within: float = 2.0) -> None:
        """Stop renewing; deregister (best effort, within ``within`` seconds) when asked."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._first is not None and not self._first.done():
            self._first.cancel()
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
            except _Refused as refused:
                await self._refused(refused.error)
                await asyncio.sleep(next(self._refused_backoff))
                continue
            except Exception as exc:
                # Membership must outlive any surprise: log it and start over.
                log_failure(_log, "membership loop failed; registering again", exc)
                self.registered.clear()
                await asyncio.sleep(min(self.ttl / 3, 1.0))
                continue
            self._refused_backoff.reset()
            await self._accepted()
            try:
                await self._keep_alive()  # returns when the lease is lost
            except Exception as exc:
                log_failure(_log, "membership loop failed; registering again", exc)
                await asyncio.sleep(min(self.ttl / 3, 1.0))
            self.registered.clear()

    async def _refused(self, error: MeshError) -> None:
        """The control plane refused the instance: out of the mesh until it accepts."""
        first = self._first is not None and not self._first.done()
        known = self.refusal
        self.refusal = error
        self.registered.clear()
        self.lease_id = ""
        if first:
            assert self._first is not None
            self._first.set_result(error)
        changed = known is None or (known.code, known.message) != (error.code, error.message)
        # A first refusal with report_first_refusal=False: the caller of first_answer()
        # says it its own way.
        quiet = first and not self._report_first_refusal
        if changed:
            if not quiet:
                _log.error(
                    "registration refused by the control plane: %s; service=%s instance=%s is "
                    "out of the mesh, registering again with backoff up to %gs",
                    describe_refusal(error),
                    self.instance.service_name,
                    self.instance.instance_id,
                    self._refused_backoff.spec.max_backoff,
                )
            if self._on_standing is not None and known is None:
                await self._on_standing(error)
        else:
            _log.debug("registration still refused: %s", describe_refusal(error))

    async def _accepted(self) -> None:
        if self._first is not None and not self._first.done():
            self._first.set_result(None)
        if self.refusal is not None:
            _log.info(
                "registration accepted again after a refusal (%s)", describe_refusal(self.refusal)
            )
            self.refusal = None
            if self._on_standing is not None:
                await self._on_standing(None)

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
            if exc.code() in REFUSAL_CODES:
                raise _Refused(from_rpc_error(exc)) from exc
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
        """Renew every TTL/3 over one stream; return when the lease is gone or its
        renewal is refused (registering again then says why)."""
        interval = self.ttl / 3
        # After a broken stream, try again soon (0.1 s doubling up to the interval):
        # a renewal waiting a whole interval behind a cut leaves too little of the TTL.
        pause = 0.1
        while True:
            stub = registry_pb2_grpc.RegistryServiceStub(self._channel())
            # Our own request iterator, ended in ``finally``: with a channel that has
            # interceptors (a token), grpc's stand-in for call.write() stays pending
            # after the server ends the stream, and is destroyed pending later.
            outbox: asyncio.Queue[registry_pb2.KeepAliveRequest | None] = asyncio.Queue()
            call = stub.KeepAlive(_until_none(outbox))
            try:
                while True:
                    outbox.put_nowait(
                        registry_pb2.KeepAliveRequest(
                            lease_ids=[self.lease_id],
                            applied_revision=(
                                self._applied_revision() if self._applied_revision else 0
                            ),
                        )
                    )
                    # asyncio.timeout, not wait_for: on 3.11 wait_for swallows a
                    # cancel that lands as the read completes, and stop() would wait
                    # for this loop for ever.
                    async with asyncio.timeout(interval * 2):
                        reply = await call.read()
                    if not isinstance(reply, registry_pb2.KeepAliveResponse):
                        break  # EOF: the control plane closed the stream
                    if self.lease_id in reply.expired_lease_ids:
                        _log.warning("lease %s expired; registering again", self.lease_id)
                        return
                    pause = 0.1
                    await asyncio.sleep(interval)
            except grpc.aio.AioRpcError as exc:
                if exc.code() in REFUSAL_CODES:
                    _log.debug("lease renewal refused (%s): %s", exc.code().name, exc.details())
                    return
                _log.debug("keep-alive stream broke: %s: %s", exc.code().name, exc.details())
                await asyncio.sleep(pause)
                pause = min(pause * 2, interval)
            except (TimeoutError, asyncio.InvalidStateError) as exc:
                # A write on a stream the server already ended (the control plane
                # died) raises InvalidStateError rather than AioRpcError.
                _log.debug("keep-alive stream broke: %r", exc)
                await asyncio.sleep(pause)
                pause = min(pause * 2, interval)
            finally:
                outbox.put_nowait(None)
                call.cancel()


async def _until_none(
    queue: asyncio.Queue[registry_pb2.KeepAliveRequest | None],
) -> AsyncIterator[registry_pb2.KeepAliveRequest]:
    while (request := await queue.get()) is not None:
        yield request
