"""Who may read the dashboard and its JSON API, and HTTPS for the HTTP port.

The dashboard follows the control plane's security settings:

- authentication off: everyone who reaches the HTTP port may read (it is on loopback
  unless the operator chose otherwise);
- with a tokens file: a bearer token (header, or the page's cookie) whose scopes
  include ``read``, ``admin`` or ``service:NAME`` (which reads discovery anyway);
- authentication by client certificates only: browsers do not present them to this
  port, so the dashboard refuses every request and says to add a tokens file.

Its actions (cancel, retry an execution) need the scope of their RPC, as
``security.auth.METHOD_RULES`` says (``workflow`` or ``admin``); with authentication
off, anyone who may read may act.

With ``--tls-cert`` the HTTP port (dashboard and ``/metrics``) serves HTTPS with the
same certificate.
"""

from __future__ import annotations

import ssl

from aiohttp import web

from flext_mesh.config import ServerConfig
from flext_mesh.dashboard.api import Authorize, Permit, bearer_token
from flext_mesh.errors import Unauthenticated
from flext_mesh.security.auth import METHOD_RULES, SecurityInterceptor

__all__ = ["authorizer", "http_ssl_context", "permitter"]

#: Scope kinds that may read the dashboard.
_READERS = frozenset({"read", "service"})


def authorizer(security: SecurityInterceptor | None) -> Authorize | None:
    """The dashboard's ``authorize`` hook for these settings; None: open."""
    if security is None or security.authenticator is None:
        return None
    tokens = security.authenticator.tokens

    def authorize(request: web.Request) -> bool | str:
        if tokens is None:
            return (
                "the dashboard takes bearer tokens: start the control plane with "
                "--auth-tokens-file (client certificates do not reach the HTTP port)"
            )
        token = bearer_token(request)
        if token is None:
            return "send a token with scope read (Authorization: Bearer, or the page's form)"
        identity = tokens.identify(token)
        if identity is None:
            raise Unauthenticated("invalid bearer token: unknown or revoked")
        if identity.admin or not identity.kinds.isdisjoint(_READERS):
            return True
        return f"{identity.describe()} may not read the dashboard: needs scope read or admin"

    return authorize


def permitter(security: SecurityInterceptor | None) -> Permit | None:
    """The dashboard's ``permit`` hook for these settings; None: open."""
    if security is None or security.authenticator is None:
        return None
    tokens = security.authenticator.tokens

    def permit(request: web.Request, method: str) -> bool | str:
        if tokens is None:
            return (
                "the dashboard takes bearer tokens: start the control plane with --auth-tokens-file"
            )
        rule = METHOD_RULES[method]
        token = bearer_token(request)
        if token is None:
            return f"send a token with scope {rule.needed()}"
        identity = tokens.identify(token)
        if identity is None:
            raise Unauthenticated("invalid bearer token: unknown or revoked")
        if identity.admin or not identity.kinds.isdisjoint(rule.scopes):
            return True
        name = method.rsplit("/", 1)[-1]
        return f"{identity.describe()} may not call {name}: needs scope {rule.needed()}"

    return permit


def http_ssl_context(config: ServerConfig) -> ssl.SSLContext | None:
    """An HTTPS context from ``--tls-cert``/``--tls-key``; None when TLS is off."""
    if not config.tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key or None)
    except (OSError, ssl.SSLError):
        # The gRPC side checks the same files at start and refuses them in one line.
        return None
    return context
