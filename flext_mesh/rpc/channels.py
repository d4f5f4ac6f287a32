"""Transport security: TLS and mTLS for every gRPC server and channel of the mesh.

The same names mean the same thing in the control plane, the sidecar and the CLI:

- ``tls_cert`` / ``tls_key``: this process's own certificate (chain) and key, served
  when it listens and presented as a client certificate when it calls others;
- ``tls_ca``: the CA bundle it trusts, to verify the servers it calls and, when it
  serves with ``tls_client_auth``, its clients' certificates;
- ``token``: the bearer token it sends (``authorization: Bearer <token>``).

Servers: :func:`server_credentials` checks the files (readable, PEM, the key matching
the certificate) and builds the credentials, and :func:`check_listen` applies the
loopback rule: plaintext is served only on a loopback address unless the operator
says ``--insecure``. Both raise :class:`TransportError` with a message fit for a
one-line start-up failure.

Clients: :class:`ClientSecurity` says how to call (``from_env()`` reads the
``FLEXT_MESH_*`` variables) and :func:`open_channel` opens a channel: TLS when
``tls_ca`` is set (mTLS when a certificate and key are given too), plaintext
otherwise; the token rides on every call through a client interceptor, so it works
over plaintext loopback as well (gRPC's call credentials refuse insecure channels).
File contents are cached by path, modification time and size: a rotated file is read
again by the next channel opened.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import re
from collections.abc import (
    AsyncIterable,
    Awaitable,
    Callable,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, overload

import grpc

from flext_mesh.addresses import AddressError, first_name, grpc_target
from flext_mesh.errors import ConfigError

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "ClientSecurity",
    "TransportError",
    "check_listen",
    "client_credentials",
    "is_loopback",
    "open_channel",
    "server_credentials",
    "tls_problem",
]

_ENV = "FLEXT_MESH_"

#: gRPC's default reconnect backoff grows to 120 s: a peer or control plane that comes
#: back would go unnoticed for minutes. Every channel of the mesh retries within 2 s.
RECONNECT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
# BoringSSL's reason in gRPC's UNAVAILABLE details: "...OPENSSL_internal:REASON: text: OK".
_SSL_REASON = re.compile(r"OPENSSL_internal:(?P<reason>[A-Z0-9_]+)(?::\s*(?P<text>[^:]+))?")
_FileStamp = tuple[str, int, int]  # path, mtime_ns, size


class TransportError(ConfigError, ValueError):
    """A TLS setting that cannot work (a missing file, a key not matching its
    certificate, mTLS without a CA) or a listen address refused by the loopback rule."""


# -- the loopback rule ---------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or name, IPv6 bracketed or not) is loopback only.

    127.0.0.0/8, ::1 (and IPv4-mapped loopback) and ``localhost``; a wildcard
    (0.0.0.0, ::, empty) or any other name is not, whatever it resolves to today.
    """
    name = host.strip().strip("[]").split("%", 1)[0].rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def check_listen(address: str, *, tls: bool, insecure: bool) -> None:
    """The loopback rule: refuse plaintext on a non-loopback ``HOST:PORT``.

    Plaintext off loopback would let anyone on the network read and forge mesh
    traffic, so it takes an explicit ``--insecure``.
    """
    if tls or insecure:
        return
    host = address.rsplit(":", 1)[0] if ":" in address else address
    if not is_loopback(host):
        raise TransportError(
            f"refusing to serve plaintext gRPC on {address}, which is not a loopback "
            "address: give --tls-cert and --tls-key (see `flext-mesh certs`), or "
            "--insecure to allow plaintext on the network"
        )


# -- files -----------------------------------------------------------------------------


def _stamp(path: str, what: str) -> _FileStamp:
    try:
        info = os.stat(path)
    except OSError as exc:
        raise TransportError(f"{what} {path}: {exc.strerror or exc}") from None
    return (path, info.st_mtime_ns, info.st_size)


@functools.lru_cache(maxsize=64)
def _read_stamped(stamp: _FileStamp, what: str) -> bytes:
    try:
        with open(stamp[0], "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise TransportError(f"{what} {stamp[0]}: {exc.strerror or exc}") from None


def _read(path: str, what: str) -> bytes:
    """The contents of ``path``, cached until the file changes; TransportError if unreadable."""
    return _read_stamped(_stamp(path, what), what)


def _certificates(pem: bytes, path: str, what: str) -> list[x509.Certificate]:
    from cryptography import x509  # noqa: PLC0415 - only with TLS: ~12 MB of RSS otherwise

    try:
        certificates = x509.load_pem_x509_certificates(pem)
    except ValueError:
        certificates = []
    if not certificates:
        raise TransportError(f"{what} {path} holds no PEM certificate")
    return certificates


@functools.lru_cache(maxsize=32)
def _checked_pair(cert_stamp: _FileStamp, key_stamp: _FileStamp, flag: str) -> tuple[bytes, bytes]:
    """The certificate chain and key, after checking that the key belongs to the
    certificate (gRPC itself would only fail at the first handshake, vaguely)."""
    cert_path, key_path = cert_stamp[0], key_stamp[0]
    cert_pem = _read_stamped(cert_stamp, f"{flag}-cert")
    key_pem = _read_stamped(key_stamp, f"{flag}-key")
    leaf = _certificates(cert_pem, cert_path, f"{flag}-cert")[0]
    from cryptography.exceptions import UnsupportedAlgorithm  # noqa: PLC0415 - as above
    from cryptography.hazmat.primitives import serialization  # noqa: PLC0415

    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except TypeError:
        raise TransportError(
            f"{flag}-key {key_path} is encrypted; give an unencrypted PEM key"
        ) from None
    except (ValueError, UnsupportedAlgorithm):
        raise TransportError(f"{flag}-key {key_path} holds no PEM private key") from None
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(*spki) != leaf.public_key().public_bytes(*spki):
        raise TransportError(
            f"{flag}-key {key_path} does not match the certificate in {flag}-cert {cert_path}"
        )
    return cert_pem, key_pem


def _pair(cert: str, key: str, flag: str = "--tls") -> tuple[bytes, bytes]:
    if bool(cert) != bool(key):
        given, missing = ("cert", "key") if cert else ("key", "cert")
        raise TransportError(f"{flag}-{given} needs {flag}-{missing} too")
    return _checked_pair(_stamp(cert, f"{flag}-cert"), _stamp(key, f"{flag}-key"), flag)


def _ca(path: str, flag: str = "--tls-ca") -> bytes:
    pem = _read(path, flag)
    _certificates(pem, path, flag)
    return pem


# -- servers ---------------------------------------------------------------------------


def server_credentials(
    cert: str, key: str, ca: str = "", client_auth: str = "none"
) -> grpc.ServerCredentials | None:
    """TLS credentials to serve with, or None for plaintext (no ``cert``).

    ``client_auth``: ``none`` (no client certificate asked) or ``require`` (mTLS: a
    client without a certificate signed by ``ca`` fails the handshake). ``optional``
    is refused: grpcio cannot ask for a client certificate without requiring it (its
    ``ssl_server_credentials`` either requires one or never asks), and silently
    serving without client certificates would hide every certificate identity.
    """
    if client_auth not in ("none", "optional", "require"):
        raise TransportError(
            f"--tls-client-auth {client_auth!r} is not one of none, optional, require"
        )
    if client_auth == "optional":
        raise TransportError(
            "--tls-client-auth optional is not supported: grpcio cannot ask for a client "
            "certificate without requiring it; use require (mTLS), or none with tokens"
        )
    if not cert and not key:
        if client_auth != "none":
            raise TransportError(f"--tls-client-auth {client_auth} needs --tls-cert and --tls-key")
        return None
    cert_pem, key_pem = _pair(cert, key)
    if client_auth == "require" and not ca:
        raise TransportError(
            "--tls-client-auth require needs --tls-ca: the CA that signs client certificates"
        )
    return grpc.ssl_server_credentials(
        [(key_pem, cert_pem)],
        root_certificates=_ca(ca) if client_auth == "require" else None,
        require_client_auth=client_auth == "require",
    )


# -- clients ---------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ClientSecurity:
    """How a process calls others: TLS when ``tls_ca`` is set, plaintext otherwise."""

    tls_ca: str = ""
    """PEM CA bundle that verifies the servers called; set, it turns TLS on."""
    tls_cert: str = ""
    """PEM certificate shown to servers that ask (mTLS); used only with ``tls_ca``."""
    tls_key: str = ""
    """PEM key of ``tls_cert``."""
    tls_server_name: str = ""
    """Name the server certificate must carry, instead of the target's host."""
    token: str = field(default="", repr=False)
    """Bearer token sent as ``authorization: Bearer <token>`` on every call."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ClientSecurity:
        """From FLEXT_MESH_TLS_CA, _TLS_CERT, _TLS_KEY, _TLS_SERVER_NAME and _TOKEN."""
        env = os.environ if environ is None else environ
        return cls(
            tls_ca=env.get(f"{_ENV}TLS_CA", ""),
            tls_cert=env.get(f"{_ENV}TLS_CERT", ""),
            tls_key=env.get(f"{_ENV}TLS_KEY", ""),
            tls_server_name=env.get(f"{_ENV}TLS_SERVER_NAME", ""),
            token=env.get(f"{_ENV}TOKEN", ""),
        )

    @property
    def tls(self) -> bool:
        """Whether channels use TLS."""
        return bool(self.tls_ca)

    def check(self) -> None:
        """Read and check the files now (TransportError), so a bad setting fails at start."""
        client_credentials(self)


_PLAINTEXT = ClientSecurity()


def client_credentials(security: ClientSecurity) -> grpc.ChannelCredentials | None:
    """The channel credentials of ``security``, or None when it is plaintext."""
    if not security.tls_ca:
        if security.tls_cert or security.tls_key:
            _pair(security.tls_cert, security.tls_key)  # still report a bad pair
        return None
    root = _ca(security.tls_ca)
    if security.tls_cert or security.tls_key:
        cert_pem, key_pem = _pair(security.tls_cert, security.tls_key)
        return grpc.ssl_channel_credentials(root, key_pem, cert_pem)
    return grpc.ssl_channel_credentials(root)


class _SyncCallDetails(grpc.ClientCallDetails):
    """``grpc.ClientCallDetails`` with new metadata (the interface has no constructor)."""

    def __init__(
        self, details: grpc.ClientCallDetails, metadata: tuple[tuple[str, str | bytes], ...]
    ) -> None:
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class _SyncToken(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    """Adds the bearer token to every call of a synchronous channel."""

    def __init__(self, token: str) -> None:
        self._header = ("authorization", f"Bearer {token}")

    def _details(self, details: grpc.ClientCallDetails) -> _SyncCallDetails:
        metadata = tuple(details.metadata or ())
        if not any(key == "authorization" for key, _ in metadata):
            metadata += (self._header,)
        return _SyncCallDetails(details, metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_stream_unary(
        self, continuation: Any, details: Any, requests: Iterator[Any]
    ) -> Any:
        return continuation(self._details(details), requests)

    def intercept_stream_stream(
        self, continuation: Any, details: Any, requests: Iterator[Any]
    ) -> Any:
        return continuation(self._details(details), requests)


class _AioToken:
    """Adds the bearer token to the call details of an asyncio channel's calls."""

    def __init__(self, token: str) -> None:
        self._value = f"Bearer {token}"

    def _details(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = grpc.aio.Metadata.from_tuple(tuple(details.metadata or ()))
        if metadata.get("authorization") is None:
            metadata.add("authorization", self._value)
        return grpc.aio.ClientCallDetails(
            details.method,
            details.timeout,
            metadata,
            details.credentials,
            details.wait_for_ready,
        )


_Continuation = Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]]


class _AioUnaryUnaryToken(_AioToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(
        self, continuation: _Continuation, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioUnaryStreamToken(_AioToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(
        self, continuation: _Continuation, client_call_details: Any, request: Any
    ) -> Any:
        return await continuation(self._details(client_call_details), request)


class _AioStreamUnaryToken(_AioToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(
        self,
        continuation: _Continuation,
        client_call_details: Any,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


class _AioStreamStreamToken(_AioToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(
        self,
        continuation: _Continuation,
        client_call_details: Any,
        request_iterator: AsyncIterable[Any] | Iterable[Any],
    ) -> Any:
        return await continuation(self._details(client_call_details), request_iterator)


@overload
def open_channel(
    target: str,
    security: ClientSecurity | None = ...,
    *,
    options: Sequence[tuple[str, Any]] = ...,
    aio: Literal[True] = ...,
) -> grpc.aio.Channel: ...


@overload
def open_channel(
    target: str,
    security: ClientSecurity | None = ...,
    *,
    options: Sequence[tuple[str, Any]] = ...,
    aio: Literal[False],
) -> grpc.Channel: ...


def open_channel(
    target: str,
    security: ClientSecurity | None = None,
    *,
    options: Sequence[tuple[str, Any]] = (),
    aio: bool = True,
) -> grpc.aio.Channel | grpc.Channel:
    """A channel to ``target`` secured per ``security`` (None: plaintext, no token).

    A ``grpc.aio`` channel, or a synchronous one with ``aio=False`` (the CLI). Raises
    TransportError when a file of ``security`` is missing or wrong. ``options`` add to,
    or override, :data:`RECONNECT_OPTIONS`.
    """
    security = security or _PLAINTEXT
    credentials = client_credentials(security)
    channel_options = list({**dict(RECONNECT_OPTIONS), **dict(options)}.items())
    server_name = security.tls_server_name
    if "," in target:  # several control-plane replicas: one target, pick_first fails over
        try:
            server_name = server_name or first_name(target)
            target = grpc_target(target)
        except AddressError as exc:
            raise TransportError(str(exc)) from None
    if credentials is not None and server_name:
        channel_options.append(("grpc.ssl_target_name_override", server_name))
    if aio:
        interceptors: list[grpc.aio.ClientInterceptor] | None = None
        if security.token:
            interceptors = [
                _AioUnaryUnaryToken(security.token),
                _AioUnaryStreamToken(security.token),
                _AioStreamUnaryToken(security.token),
                _AioStreamStreamToken(security.token),
            ]
        if credentials is None:
            return grpc.aio.insecure_channel(
                target, options=channel_options, interceptors=interceptors
            )
        return grpc.aio.secure_channel(
            target, credentials, options=channel_options, interceptors=interceptors
        )
    if credentials is None:
        channel = grpc.insecure_channel(target, options=channel_options)
    else:
        channel = grpc.secure_channel(target, credentials, options=channel_options)
    if security.token:
        return grpc.intercept_channel(channel, _SyncToken(security.token))
    return channel


def tls_problem(details: str) -> str | None:
    """What failed in a TLS handshake, read from an UNAVAILABLE status's details; None
    when the details do not show a handshake failure (a plaintext client talking to a
    TLS server only sees "Socket closed", which could be anything)."""
    if "Hostname Verification Check failed" in details:
        return "the server's certificate is not valid for this host name"
    match = _SSL_REASON.search(details)
    if match is None:
        return "handshake failed" if "handshake" in details.lower() else None
    reason, text = match["reason"], (match["text"] or "").strip()
    if reason == "WRONG_VERSION_NUMBER":
        return "the server does not speak TLS (WRONG_VERSION_NUMBER)"
    if text and text != "OK" and "verification context" not in text:
        return f"{text} ({reason})"
    return reason
