"""Who is calling: the identity an authenticated RPC runs as.

The auth interceptor sets :data:`current_identity` for the duration of each handler,
so servicers and limits can ask who the caller is without threading it through every
signature. :func:`client_key` names the caller for per-client limits: its identity
when authentication is on, its address otherwise.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = ["ANONYMOUS", "Identity", "client_key", "current_identity", "key_of", "peer_host"]

Source = Literal["token", "certificate", "anonymous"]


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller: a token's name or a certificate's SPIFFE id, and scopes.

    Scopes are ``admin``, ``read``, ``workflow`` and ``service:NAME`` (see
    :mod:`flext_mesh.security.auth` for what each allows).
    """

    name: str
    scopes: frozenset[str]
    source: Source
    #: True when the scopes include ``admin`` (derived).
    admin: bool = field(init=False, repr=False, compare=False)
    #: The NAMEs of the ``service:NAME`` scopes (derived).
    services: frozenset[str] = field(init=False, repr=False, compare=False)
    #: The scopes without their parameter: ``service:payment`` gives ``service`` (derived).
    kinds: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        services = frozenset(s[len("service:") :] for s in self.scopes if s.startswith("service:"))
        object.__setattr__(self, "admin", "admin" in self.scopes)
        object.__setattr__(self, "services", services)
        object.__setattr__(self, "kinds", frozenset(s.partition(":")[0] for s in self.scopes))

    def describe(self) -> str:
        """``token 'ci' (scopes: read, workflow)``: the caller, for error messages."""
        what = {"token": "token", "certificate": "certificate", "anonymous": "caller"}[self.source]
        return f"{what} {self.name!r} (scopes: {', '.join(sorted(self.scopes)) or 'none'})"


#: The caller when authentication is off.
ANONYMOUS = Identity("anonymous", frozenset({"admin"}), "anonymous")

#: The identity of the RPC being handled (None outside an RPC, or before the interceptor).
current_identity: ContextVar[Identity | None] = ContextVar("flext_mesh_identity", default=None)


def peer_host(context: Any) -> str:
    """The caller's address without its port (``ipv4:127.0.0.1:5000`` → ``127.0.0.1``)."""
    peer: str = context.peer() or "unknown"
    kind, _, rest = peer.partition(":")
    if kind == "ipv6" and rest.startswith("%5B"):
        return rest[3:].split("%5D", 1)[0]
    if kind == "ipv6" and rest.startswith("["):
        return rest[1:].split("]", 1)[0]
    if kind in {"ipv4", "ipv6"}:
        return rest.rsplit(":", 1)[0]
    return peer


def key_of(identity: Identity | None, context: Any) -> str:
    """The limit key of ``identity`` (``token:NAME``, ``certificate:SPIFFE-ID``), or of
    the caller's address when there is none or it is anonymous (``address:HOST``)."""
    if identity is not None and identity.source != "anonymous":
        return f"{identity.source}:{identity.name}"
    return f"address:{peer_host(context)}"


def client_key(context: Any) -> str:
    """The name per-client limits count under: identity if authenticated, else address."""
    return key_of(current_identity.get(), context)
