"""Who may call what on the control plane, and how often: one grpc.aio interceptor.

Authentication (on when ``--auth-tokens-file`` is given or client certificates are
required with ``--tls-client-auth require``):

- a bearer token in the ``authorization: Bearer <token>`` metadata, looked up in the
  tokens file (:mod:`flext_mesh.security.tokens`); when a call carries one it decides,
  even over mTLS. A token revoked from the file is refused within a second, and an
  open client stream (KeepAlive, StreamCalls, DeliverCalls) that authenticated with it ends at its
  next message; an open server stream (Watch) runs until it ends;
- otherwise the client certificate's SPIFFE-style URI SAN:
  ``spiffe://flext-mesh/service/NAME`` is ``service:NAME``,
  ``spiffe://flext-mesh/admin/NAME`` is ``admin``, ``.../read/NAME`` is ``read`` and
  ``.../workflow/NAME`` is ``workflow`` (NAME names the holder, e.g. ``ci``).

No credentials, or a token that no entry matches: UNAUTHENTICATED. Services named in
``--auth-open-services`` (health and reflection by default) need none.

Authorization: :data:`METHOD_RULES` says, for every RPC, which scopes may call it;
``admin`` may call everything. ``service:NAME`` is what a sidecar needs: it registers,
renews, deregisters and drains (SetInstanceMaintenance) only instances of NAME, reports
only calls served by NAME or made by NAME (``caller_service``: its outbound calls), and
reads discovery (Discover, ListServices, Watch, GetServicePolicy, and xDS:
StreamAggregatedResources) to call the others. ``read`` reads everything (registry,
reports, alerts, workflows, executions, xDS clients); ``workflow`` manages workflows and their
executions and reads them. A wrong scope: PERMISSION_DENIED naming the scope needed.
Every refusal is logged at INFO with the method, the client (a token's name, a
certificate's identity or, unauthenticated, an address; never a credential) and the
reason, at most once per 10 s for one client, method and kind (:class:`RefusalLog`).

Rate limits: per client (its token's name, its certificate's SPIFFE id, or its
address when authentication is off), writes (each write RPC, each KeepAlive message)
and reported call records (counted per record, not per message) draw from token
buckets; past the burst, a unary call gets RESOURCE_EXHAUSTED with a
``google.rpc.RetryInfo`` saying when to retry. On a stream (KeepAlive, StreamCalls) a
message the limit would delay by at most :data:`STREAM_MAX_WAIT` is delayed instead,
so a steady stream slows down to the rate without losing anything; past that, the
stream ends RESOURCE_EXHAUSTED with a RetryInfo. A rate of 0 turns a limit off.

The interceptor wraps each method's handler once; a method that needs neither
authentication nor a limit (every read with authentication off) gets its handler
back untouched, so it costs one dict lookup per call.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol, TypeAlias

import grpc

from flext_mesh.addresses import parse_host_port
from flext_mesh.config import ServerConfig
from flext_mesh.errors import (
    ConfigError,
    MeshError,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
)
from flext_mesh.names import NAME as NAME_RULE
from flext_mesh.rpc.channels import is_loopback
from flext_mesh.rpc.handlers import Undecodable, WrappingInterceptor
from flext_mesh.rpc.status import abort
from flext_mesh.security.certs import SPIFFE_TRUST_DOMAIN
from flext_mesh.security.identity import Identity, current_identity, key_of
from flext_mesh.security.ratelimit import RateLimiter
from flext_mesh.security.tokens import TokenFile, TokensFileError

__all__ = [
    "METHOD_RULES",
    "STREAM_MAX_WAIT",
    "Authenticator",
    "LeaseOwnerLookup",
    "MethodRule",
    "RefusalLog",
    "SecurityConfigError",
    "SecurityInterceptor",
    "auth_enabled",
    "build_security",
    "certificate_identity",
    "check_auth_required",
]

_log = logging.getLogger("flext_mesh.security.auth")

Limit: TypeAlias = Literal["writes", "reports"]
#: What a ``service:NAME`` caller's request must be about (see :class:`MethodRule`).
Target: TypeAlias = Literal["instance", "service_name", "lease", "leases", "records"]
_Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
_Behavior: TypeAlias = Callable[..., Any]
#: On a stream, a message that the rate limit would delay by at most this many seconds
#: waits (the stream slows down); longer, the stream ends RESOURCE_EXHAUSTED. A stream
#: ended after some messages were taken makes a reporter send them again.
STREAM_MAX_WAIT: Final = 1.0


class SecurityConfigError(ConfigError, ValueError):
    """The security settings cannot work (no authentication off loopback, a bad tokens
    file); the message is the one line ``flext-mesh serve`` prints."""


@dataclass(frozen=True, slots=True)
class MethodRule:
    """Who may call one RPC, and which rate limit it draws from."""

    #: Scope kinds allowed besides ``admin``: ``read``, ``workflow``, ``service``.
    scopes: frozenset[str]
    #: The bucket each call (or each message, or record) draws from; None: no limit.
    limit: Limit | None = None
    #: For a ``service:NAME`` caller, what of the request must belong to NAME: the
    #: instance registered, the ``service_name`` field, the lease(s) renewed, the call
    #: records reported. None: any request (reads).
    target: Target | None = None

    def needed(self) -> str:
        """The scopes that may call, for messages: ``admin or read``."""
        names = sorted("service:NAME" if kind == "service" else kind for kind in self.scopes)
        return " or ".join(["admin", *names])


_READ = frozenset({"read"})
_DISCOVERY = frozenset({"read", "service"})
_WORKFLOW_READ = frozenset({"read", "workflow"})
_WORKFLOW = frozenset({"workflow"})
_SERVICE = frozenset({"service"})
_ADMIN: frozenset[str] = frozenset()

#: The rule of every RPC the control plane serves, by full method name. A test checks
#: it lists every method of the contracts: a new RPC cannot be served unguarded (and a
#: method missing here is admin-only anyway).
METHOD_RULES: dict[str, MethodRule] = {
    # RegistryService
    "/flext_mesh.v1.RegistryService/Register": MethodRule(_SERVICE, "writes", "instance"),
    "/flext_mesh.v1.RegistryService/Heartbeat": MethodRule(_SERVICE, "writes", "lease"),
    "/flext_mesh.v1.RegistryService/KeepAlive": MethodRule(_SERVICE, "writes", "leases"),
    "/flext_mesh.v1.RegistryService/Deregister": MethodRule(_SERVICE, "writes", "service_name"),
    "/flext_mesh.v1.RegistryService/Discover": MethodRule(_DISCOVERY),
    "/flext_mesh.v1.RegistryService/ListServices": MethodRule(_DISCOVERY),
    "/flext_mesh.v1.RegistryService/Watch": MethodRule(_DISCOVERY),
    "/flext_mesh.v1.RegistryService/PutServicePolicy": MethodRule(_ADMIN, "writes"),
    "/flext_mesh.v1.RegistryService/GetServicePolicy": MethodRule(_DISCOVERY),
    "/flext_mesh.v1.RegistryService/DeleteServicePolicy": MethodRule(_ADMIN, "writes"),
    "/flext_mesh.v1.RegistryService/SetInstanceMaintenance": MethodRule(
        _SERVICE, "writes", "service_name"
    ),
    "/flext_mesh.v1.RegistryService/ListXdsClients": MethodRule(_READ),
    # MetricsService
    "/flext_mesh.v1.MetricsService/ReportCalls": MethodRule(_SERVICE, "reports", "records"),
    "/flext_mesh.v1.MetricsService/StreamCalls": MethodRule(_SERVICE, "reports", "records"),
    "/flext_mesh.v1.MetricsService/DeliverCalls": MethodRule(_SERVICE, "reports", "records"),
    "/flext_mesh.v1.MetricsService/GetServiceReport": MethodRule(_READ),
    "/flext_mesh.v1.MetricsService/ListAlerts": MethodRule(_READ),
    # OrchestratorService
    "/flext_mesh.v1.OrchestratorService/PutWorkflow": MethodRule(_WORKFLOW, "writes"),
    "/flext_mesh.v1.OrchestratorService/GetWorkflow": MethodRule(_WORKFLOW_READ),
    "/flext_mesh.v1.OrchestratorService/ListWorkflows": MethodRule(_WORKFLOW_READ),
    "/flext_mesh.v1.OrchestratorService/DeleteWorkflow": MethodRule(_WORKFLOW, "writes"),
    "/flext_mesh.v1.OrchestratorService/StartExecution": MethodRule(_WORKFLOW, "writes"),
    "/flext_mesh.v1.OrchestratorService/GetExecution": MethodRule(_WORKFLOW_READ),
    "/flext_mesh.v1.OrchestratorService/ListExecutions": MethodRule(_WORKFLOW_READ),
    "/flext_mesh.v1.OrchestratorService/CancelExecution": MethodRule(_WORKFLOW, "writes"),
    "/flext_mesh.v1.OrchestratorService/RetryExecution": MethodRule(_WORKFLOW, "writes"),
    "/flext_mesh.v1.OrchestratorService/WatchExecution": MethodRule(_WORKFLOW_READ),
    "/flext_mesh.v1.OrchestratorService/RecordStepResult": MethodRule(
        _SERVICE, "writes", "service_name"
    ),
    # ProcessorService (the control plane's own, without processors)
    "/flext_mesh.v1.ProcessorService/Invoke": MethodRule(_ADMIN),
    "/flext_mesh.v1.ProcessorService/ListOperations": MethodRule(_READ),
    # xDS (ADS) for proxyless gRPC clients: discovery, like Discover and Watch
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources": (
        MethodRule(_DISCOVERY)
    ),
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources": (
        MethodRule(_DISCOVERY)
    ),
}
#: Methods not in the table (none, when it is complete).
_UNLISTED = MethodRule(_ADMIN)


# -- configuration -----------------------------------------------------------------------


def auth_enabled(config: ServerConfig) -> bool:
    """Whether calls must authenticate: a tokens file, or client certificates asked for."""
    return bool(config.auth_tokens_file) or config.tls_client_auth != "none"


def check_auth_required(config: ServerConfig) -> None:
    """Refuse to serve unauthenticated off loopback unless ``--insecure`` says so.

    Anyone who reaches a non-loopback address could otherwise register, deregister
    and report as any service, so authentication is required there: a tokens file or
    required client certificates.
    """
    host, _ = parse_host_port(config.listen)
    if (
        is_loopback(host)
        or config.insecure
        or config.auth_tokens_file
        or config.tls_client_auth == "require"
    ):
        return
    raise SecurityConfigError(
        f"refusing to serve {config.listen} without authentication: it is not a loopback "
        "address; give --auth-tokens-file (see `flext-mesh tokens create`) or "
        "--tls-client-auth require, or --insecure to let anyone on the network call it"
    )


# -- identities ----------------------------------------------------------------------------

_SPIFFE_PREFIX: Final = f"spiffe://{SPIFFE_TRUST_DOMAIN}/"
_SPIFFE_KINDS: Final = frozenset({"service", "admin", "read", "workflow"})
_certificate_identities: dict[bytes, Identity | None] = {}


def _spiffe_identity(uri: bytes) -> Identity | None:
    """The identity a flext-mesh SPIFFE id stands for, None for any other URI."""
    if uri in _certificate_identities:
        return _certificate_identities[uri]
    text = uri.decode("utf-8", "replace")
    identity: Identity | None = None
    if text.startswith(_SPIFFE_PREFIX):
        kind, sep, name = text[len(_SPIFFE_PREFIX) :].partition("/")
        if sep and kind in _SPIFFE_KINDS and NAME_RULE.match(name):
            scope = f"service:{name}" if kind == "service" else kind
            identity = Identity(text, frozenset({scope}), "certificate")
    if len(_certificate_identities) < 4096:
        _certificate_identities[uri] = identity
    return identity


def certificate_identity(auth_context: Mapping[str, Iterable[bytes]]) -> Identity | None:
    """The identity of a verified client certificate from gRPC's auth context.

    gRPC lists the certificate's URI SANs under ``peer_uri``; exactly one of them must
    be a ``spiffe://flext-mesh/...`` id. None when no certificate was shown;
    Unauthenticated when one was but names no flext-mesh identity, or several.
    """
    uris = list(auth_context.get("peer_uri", ()))
    if not uris:
        uris = [
            san
            for san in auth_context.get("x509_subject_alternative_name", ())
            if san.startswith(b"spiffe://")
        ]
    found = {identity for identity in map(_spiffe_identity, uris) if identity is not None}
    if len(found) == 1:
        return found.pop()
    subject = b", ".join(auth_context.get("x509_subject", ())).decode("utf-8", "replace")
    if len(found) > 1:
        raise Unauthenticated(
            f"client certificate {subject!r} names several flext-mesh identities "
            f"({', '.join(sorted(i.name for i in found))}); it must name one"
        )
    if subject or uris:
        raise Unauthenticated(
            f"client certificate {subject!r} names no flext-mesh identity: it needs a URI "
            f"SAN {_SPIFFE_PREFIX}service/NAME (or admin/, read/, workflow/), or send a "
            "bearer token"
        )
    return None


class Authenticator:
    """Tells who a call comes from: its bearer token, else its client certificate."""

    def __init__(self, tokens: TokenFile | None, *, certificates: bool) -> None:
        self.tokens = tokens
        self.certificates = certificates
        ways = []
        if tokens is not None:
            ways.append(
                "send the metadata 'authorization: Bearer <token>' "
                "(tokens come from `flext-mesh tokens create`)"
            )
        if certificates:
            ways.append(f"present a client certificate with a URI SAN {_SPIFFE_PREFIX}KIND/NAME")
        self._missing = "missing credentials: " + ", or ".join(ways)

    def authenticate(self, context: _Context) -> Identity:
        """The caller's identity; Unauthenticated when it proves none."""
        tokens = self.tokens
        if tokens is not None:
            for key, value in context.invocation_metadata() or ():
                if key == "authorization":
                    return self._bearer(tokens, value)
        if self.certificates:
            identity = certificate_identity(context.auth_context())
            if identity is not None:
                return identity
        raise Unauthenticated(self._missing)

    @staticmethod
    def _bearer(tokens: TokenFile, value: str | bytes) -> Identity:
        if isinstance(value, bytes):
            value = value.decode("latin-1")
        scheme, _, token = value.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("malformed authorization metadata: expected 'Bearer <token>'")
        identity = tokens.identify(token)
        if identity is None:
            raise Unauthenticated("invalid bearer token: unknown or revoked")
        return identity


# -- refusals in the log -------------------------------------------------------------------


class RefusalLog:
    """Logs refused calls at INFO: what was refused, who asked (a token's name, a
    certificate's identity or an address; never a credential) and why.

    A client retrying a refused call would fill the log: one line per client, method
    and kind of refusal per ``every`` seconds, the next one saying how many were left
    out meanwhile.
    """

    def __init__(self, every: float = 10.0, *, max_keys: int = 4096) -> None:
        self.every = every
        self.max_keys = max_keys
        self._last: dict[tuple[str, str, str], tuple[float, int]] = {}

    def log(self, kind: str, method: str, client: str, reason: str) -> None:
        """Log one refusal of ``method`` to ``client`` (``kind``: unauthenticated or
        permission denied), unless the same was logged less than ``every`` s ago."""
        key = (kind, method, client)
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last[0] < self.every:
            self._last[key] = (last[0], last[1] + 1)
            return
        if last is None and len(self._last) >= self.max_keys:
            self._last = {k: v for k, v in self._last.items() if now - v[0] < self.every}
            if len(self._last) >= self.max_keys:
                self._last.clear()
        self._last[key] = (now, 0)
        left_out = f" (and {last[1]} more like it)" if last is not None and last[1] else ""
        _log.info(
            "%s method=%s client=%s reason=%s%s",
            kind,
            method.lstrip("/"),
            client,
            reason,
            left_out,
        )


#: The control plane's refusals (one per process).
refusals = RefusalLog()


# -- which service a lease keeps registered --------------------------------------------------


class LeaseOwnerLookup(Protocol):
    """Answers which service holds a lease (the registry implements it): ``service:NAME``
    callers may renew only leases of NAME."""

    def service_of_lease(self, lease_id: str) -> str | None:
        """The service whose instance ``lease_id`` keeps registered; None if none."""
        ...


# -- the interceptor ---------------------------------------------------------------------------


#: Checks one streamed message: aborts the RPC when it may not go on, may delay it.
_Check: TypeAlias = Callable[[Any], Awaitable[None]]


class _CheckedContext:
    """The servicer context of a client-streaming RPC whose ``read()`` checks each
    message (KeepAlive reads with ``context.read()``, not the request iterator)."""

    __slots__ = ("_check", "_context")

    def __init__(self, context: _Context, check: _Check) -> None:
        self._context = context
        self._check = check

    async def read(self) -> Any:
        message = await self._context.read()
        if message is not grpc.aio.EOF:
            await self._check(message)
        return message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._context, name)


async def _checked_messages(requests: AsyncIterator[Any], check: _Check) -> AsyncIterator[Any]:
    async for message in requests:
        await check(message)
        yield message


class SecurityInterceptor(WrappingInterceptor):
    """Authenticates, authorizes and rate-limits the control plane's RPCs.

    ``load()`` (tokens file) is called by the control plane at start; which service holds
    a lease is asked of ``leases`` (the registry) when a renewal comes.
    """

    def __init__(
        self,
        *,
        authenticator: Authenticator | None = None,
        leases: LeaseOwnerLookup | None = None,
        writes: RateLimiter | None = None,
        reports: RateLimiter | None = None,
        open_services: Iterable[str] = (),
        rules: dict[str, MethodRule] | None = None,
    ) -> None:
        super().__init__()
        self.authenticator = authenticator
        self.leases = leases
        self.limiters: dict[Limit, RateLimiter | None] = {"writes": writes, "reports": reports}
        self.open_prefixes = tuple(f"/{name}/" for name in open_services)
        self.rules = METHOD_RULES if rules is None else rules

    # -- lifecycle

    def load(self) -> None:
        """Read the tokens file (SecurityConfigError naming the problem)."""
        tokens = self.authenticator.tokens if self.authenticator is not None else None
        if tokens is not None:
            try:
                tokens.load()
            except TokensFileError as exc:
                raise SecurityConfigError(f"--auth-tokens-file {exc}") from None
            _log.info("authentication on tokens=%d file=%s", len(tokens), tokens.path)

    # -- interception

    def _wrap(
        self, method: str, handler: grpc.RpcMethodHandler[Any, Any]
    ) -> grpc.RpcMethodHandler[Any, Any]:
        if method.startswith(self.open_prefixes):
            return handler
        rule = self.rules.get(method, _UNLISTED)
        limiter = self.limiters[rule.limit] if rule.limit is not None else None
        if self.authenticator is None and limiter is None:
            return handler
        guard = _Guard(self, method, rule, limiter)
        serializers: dict[str, Any] = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                guard.unary(handler.unary_unary), **serializers
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                guard.unary(handler.unary_stream), **serializers
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                guard.streaming(handler.stream_unary), **serializers
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            guard.streaming(handler.stream_stream), **serializers
        )


class _Guard:
    """The checks of one method, and the wrappers that run them around its behavior."""

    def __init__(
        self,
        interceptor: SecurityInterceptor,
        method: str,
        rule: MethodRule,
        limiter: RateLimiter | None,
    ) -> None:
        self.method = method
        self.rule = rule
        self.limiter = limiter
        self.authenticator = interceptor.authenticator
        self.leases = interceptor.leases
        self.target = rule.target
        self.per_record = rule.limit == "reports"

    # -- the checks

    def identify(self, context: _Context) -> Identity | None:
        """Authenticate and check the method's scope; None when authentication is off."""
        if self.authenticator is None:
            return None
        try:
            identity = self.authenticator.authenticate(context)
        except Unauthenticated as exc:
            refusals.log("unauthenticated", self.method, key_of(None, context), exc.message)
            raise
        if identity.admin or not identity.kinds.isdisjoint(self.rule.scopes):
            return identity
        error = PermissionDenied(
            f"{identity.describe()} may not call {self.method.lstrip('/')}: "
            f"needs scope {self.rule.needed()}"
        )
        refusals.log("permission denied", self.method, key_of(identity, context), error.message)
        raise error

    def inspect(self, identity: Identity | None, key: str, request: Any) -> MeshError | None:
        """The error for one unary request, None when it may go on."""
        error = self.check_target(identity, request)
        if error is None and self.limiter is not None:
            error, _ = self.limit(key, request, 0.0)
        return error

    def check_target(self, identity: Identity | None, request: Any) -> MeshError | None:
        """For a ``service:NAME`` caller, whether the request is about NAME."""
        if (
            identity is None
            or identity.admin
            or self.target is None
            or isinstance(request, Undecodable)  # the handler answers INVALID_ARGUMENT
        ):
            return None
        return self._check_target(identity, request)

    def limit(self, key: str, request: Any, max_wait: float) -> tuple[MeshError | None, float]:
        """Draw the request's cost from ``key``'s bucket: (None, delay to wait before
        going on) or (RESOURCE_EXHAUSTED, 0) when it would wait more than ``max_wait``."""
        limiter = self.limiter
        if limiter is None:
            return None, 0.0
        cost = (
            len(request.records) if self.per_record and not isinstance(request, Undecodable) else 1
        )
        allowed, wait = limiter.reserve(key, cost, max_wait)
        if allowed:
            return None, wait
        return ResourceExhausted(
            f"rate limit exceeded for {key} ({limiter.describe()}): retry in {wait:.3f} s",
            retry_after=wait,
        ), 0.0

    def _check_target(self, identity: Identity, request: Any) -> MeshError | None:
        allowed = identity.services
        target = self.target
        if target == "instance":
            service = request.instance.service_name
            if service not in allowed:
                return self._denied(identity, f"register instances of {service!r}", service)
        elif target == "service_name":
            service = request.service_name
            if service not in allowed:
                verb = self.method.rpartition("/")[2]
                return self._denied(identity, f"call {verb} for {service!r}", service)
        elif target in ("lease", "leases"):
            lease_ids = [request.lease_id] if target == "lease" else request.lease_ids
            for lease_id in lease_ids:
                # An unknown lease is let through: the registry answers it expired,
                # which tells the caller to register again.
                owner = self.leases.service_of_lease(lease_id) if self.leases is not None else None
                if owner is not None and owner not in allowed:
                    return self._denied(
                        identity, f"renew lease {lease_id!r} of an instance of {owner!r}", owner
                    )
        elif target == "records":
            for index, record in enumerate(request.records):
                if record.service_name not in allowed and record.caller_service not in allowed:
                    return self._denied(
                        identity,
                        f"report records[{index}], a call of {record.service_name!r} by "
                        f"{record.caller_service or 'an unnamed caller'!r}",
                        record.service_name,
                    )
        return None

    def _denied(self, identity: Identity, what: str, service: str) -> PermissionDenied:
        error = PermissionDenied(
            f"{identity.describe()} may not {what}: needs scope admin or service:{service}"
        )
        client = f"{identity.source}:{identity.name}"
        refusals.log("permission denied", self.method, client, error.message)
        return error

    # -- the wrappers

    def unary(self, behavior: _Behavior) -> _Behavior:
        """Wrap a unary-request behavior (coroutine or async generator)."""
        identify = self.identify
        inspect_request = self.inspect
        per_request = self.limiter is not None or self.target is not None

        async def admit(request: Any, context: _Context) -> Identity | None:
            try:
                identity = identify(context)
                error = (
                    inspect_request(identity, key_of(identity, context), request)
                    if per_request
                    else None
                )
            except MeshError as exc:
                error = exc
                identity = None
            if error is not None:
                await abort(context, error)
            return identity

        if inspect.isasyncgenfunction(behavior):

            async def stream(request: Any, context: _Context) -> AsyncIterator[Any]:
                identity = await admit(request, context)
                # Not reset: the generator may be closed in another context, and the
                # RPC's task (whose context this is) ends with it.
                current_identity.set(identity)
                async with contextlib.aclosing(behavior(request, context)) as responses:
                    async for response in responses:
                        yield response

            return stream

        if inspect.iscoroutinefunction(behavior):
            # The hot path (Discover, Register...): admission inlined, one frame less.

            async def coroutine(request: Any, context: _Context) -> Any:
                try:
                    identity = identify(context)
                    error = (
                        inspect_request(identity, key_of(identity, context), request)
                        if per_request
                        else None
                    )
                except MeshError as exc:
                    identity, error = None, exc
                if error is not None:
                    await abort(context, error)
                token = current_identity.set(identity)
                try:
                    return await behavior(request, context)
                finally:
                    current_identity.reset(token)

            return coroutine

        async def unary(request: Any, context: _Context) -> Any:
            identity = await admit(request, context)
            token = current_identity.set(identity)
            try:
                result = behavior(request, context)
                return await result if inspect.isawaitable(result) else result
            finally:
                current_identity.reset(token)

        return unary

    def streaming(self, behavior: _Behavior) -> _Behavior:
        """Wrap a client-streaming behavior: scope once, then each message."""
        identify = self.identify
        check_target = self.check_target
        limit = self.limit
        limited = self.limiter is not None
        target = self.target
        tokens = self.authenticator.tokens if self.authenticator is not None else None

        async def admit(context: _Context) -> Identity | None:
            try:
                return identify(context)
            except MeshError as exc:
                await abort(context, exc)

        def checks(admitted: Identity | None, context: _Context) -> _Check | None:
            # A token revoked while its stream is open (a KeepAlive runs for hours) is
            # noticed at the stream's next message.
            revocable = tokens is not None and admitted is not None and admitted.source == "token"
            if not (limited or revocable) and (
                admitted is None or admitted.admin or target is None
            ):
                return None
            key = key_of(admitted, context)
            identity = admitted
            generation = tokens.generation if tokens is not None else 0

            async def check(message: Any) -> None:
                nonlocal identity, generation
                if revocable:
                    assert tokens is not None
                    tokens.refresh()
                    if tokens.generation != generation:
                        generation = tokens.generation
                        try:
                            identity = identify(context)
                        except MeshError as exc:
                            await abort(context, exc)
                error = check_target(identity, message)
                if error is None:
                    error, delay = limit(key, message, STREAM_MAX_WAIT)
                    if delay > 0:
                        # Backpressure: the stream slows down to the rate, losing nothing.
                        await asyncio.sleep(delay)
                if error is not None:
                    await abort(context, error)

            return check

        if inspect.isasyncgenfunction(behavior):

            async def generator(requests: AsyncIterator[Any], context: _Context) -> Any:
                identity = await admit(context)
                current_identity.set(identity)
                check = checks(identity, context)
                if check is not None:
                    requests = _checked_messages(requests, check)
                    context = _CheckedContext(context, check)  # type: ignore[assignment]
                async with contextlib.aclosing(behavior(requests, context)) as responses:
                    async for response in responses:
                        yield response

            return generator

        async def coroutine(requests: AsyncIterator[Any], context: _Context) -> Any:
            identity = await admit(context)
            token = current_identity.set(identity)
            try:
                check = checks(identity, context)
                if check is not None:
                    requests = _checked_messages(requests, check)
                    context = _CheckedContext(context, check)  # type: ignore[assignment]
                result = behavior(requests, context)
                return await result if inspect.isawaitable(result) else result
            finally:
                current_identity.reset(token)

        return coroutine


def build_security(config: ServerConfig, leases: LeaseOwnerLookup) -> SecurityInterceptor | None:
    """The interceptor the configuration asks for; None when it has nothing to do
    (authentication off and both rate limits 0), so it costs nothing then."""
    authenticator: Authenticator | None = None
    owners: LeaseOwnerLookup | None = None
    if auth_enabled(config):
        tokens = TokenFile(config.auth_tokens_file) if config.auth_tokens_file else None
        authenticator = Authenticator(tokens, certificates=config.tls_client_auth != "none")
        owners = leases
    writes = (
        RateLimiter("writes", config.rate_limit_writes, config.rate_limit_writes_burst)
        if config.rate_limit_writes > 0
        else None
    )
    reports = (
        RateLimiter("call records", config.rate_limit_reports, config.rate_limit_reports_burst)
        if config.rate_limit_reports > 0
        else None
    )
    if authenticator is None and writes is None and reports is None:
        return None
    return SecurityInterceptor(
        authenticator=authenticator,
        leases=owners,
        writes=writes,
        reports=reports,
        open_services=config.auth_open_services,
    )
