"""Who is calling: the identity an authenticated RPC runs as.

The auth interceptor sets :data:`current_identity` for the duration of each handler,
so servicers and limits can ask who the caller is without threading it through every
signature. :func:`client_key` names the caller for per-client limits: its identity
when authentication is on, its address otherwise.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

__all__ = ["ANONYMOUS", "Identity", "client_key", "current_identity", "peer_host"]

Source = Literal["token", "certificate", "anonymous"]


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller: a token's name or a certificate's SPIFFE id, and scopes."""

    name: str
    scopes: frozenset[str]
    source: Source


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


def client_key(context: Any) -> str:
    """The name per-client limits count under: identity if authenticated, else address."""
    identity = current_identity.get()
    if identity is not None and identity.source != "anonymous":
        return f"{identity.source}:{identity.name}"
    return f"address:{peer_host(context)}"
