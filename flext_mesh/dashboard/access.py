"""Who may read the dashboard and its JSON API, and HTTPS for the HTTP port.

The dashboard follows the control plane's security settings:

- authentication off: everyone who reaches the HTTP port may read (it is on loopback
  unless the operator chose otherwise);
- with a tokens file: a bearer token (header, or the page's cookie) whose scopes
  include ``read``, ``admin`` or ``service:NAME`` (which reads discovery anyway);
- authentication by client certificates only: browsers do not present them to this
  port, so the dashboard refuses every request and says to add a tokens file.

With ``--tls-cert`` the HTTP port (dashboard and ``/metrics``) serves HTTPS with the
same certificate.
"""

from __future__ import annotations

import ssl

from aiohttp import web

from flext_mesh.config import ServerConfig
from flext_mesh.dashboard.api import Authorize, bearer_token
from flext_mesh.errors import Unauthenticated
from flext_mesh.security.auth import SecurityInterceptor

__all__ = ["authorizer", "http_ssl_context"]

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
