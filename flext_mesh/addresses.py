"""Control-plane addresses: one ``HOST:PORT``, or several for replicas, as a gRPC target.

Clients (sidecars, the CLI, the library) accept ``HOST:PORT[,HOST:PORT...]``. One
address is passed to gRPC as is (a DNS name with several records fails over by
itself). Several become one target with every address (``ipv4:a:1,b:2``), so gRPC's
``pick_first`` policy connects to the first that answers and moves to the next when
its connection breaks: a replica that dies costs the calls in flight on it, not the
client's configuration. Names in a list are resolved once, when the channel is made.
"""

from __future__ import annotations

import ipaddress
import re
import socket

from flext_mesh.errors import ConfigError

__all__ = [
    "DEFAULT_LISTEN",
    "AddressError",
    "first_name",
    "grpc_target",
    "parse_host_port",
    "split_addresses",
]

#: The control plane's default gRPC address, and where clients look for it.
DEFAULT_LISTEN = "127.0.0.1:50051"
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(?P<port>[0-9]{1,5})$")


def parse_host_port(value: str, *, allow_zero: bool = True) -> tuple[str, int]:
    """Split ``HOST:PORT`` (IPv6 in brackets); ValueError naming the problem otherwise."""
    match = _HOST_PORT.match(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not HOST:PORT (e.g. 127.0.0.1:50051 or [::1]:50051)")
    port = int(match["port"])
    low = 0 if allow_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} in {value!r} is outside {low}..65535")
    return match["host"], port


class AddressError(ConfigError, ValueError):
    """An address list that cannot be a gRPC target; the message says why."""


def split_addresses(value: str) -> list[tuple[str, int]]:
    """``HOST:PORT[,HOST:PORT...]`` as (host, port) pairs, hosts without brackets."""
    pairs = []
    for item in value.split(","):
        if not item.strip():
            continue
        try:
            host, port = parse_host_port(item, allow_zero=False)
        except ValueError as exc:
            raise AddressError(str(exc)) from None
        pairs.append((host.strip("[]"), port))
    if not pairs:
        raise AddressError(f"{value!r} names no HOST:PORT")
    return pairs


def _family(host: str) -> int | None:
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    return socket.AF_INET6 if address.version == 6 else socket.AF_INET


def first_name(value: str) -> str:
    """The first host name (not an IP address) of an address list, or "": the name a
    TLS certificate is checked against when the target became a list of addresses."""
    return next((host for host, _ in split_addresses(value) if _family(host) is None), "")


def _resolve(host: str, port: int) -> tuple[int, str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise AddressError(f"cannot resolve {host}: {exc.strerror}") from None
    infos.sort(key=lambda info: info[0] != socket.AF_INET)  # IPv4 first
    family, _, _, _, sockaddr = infos[0]
    return family, str(sockaddr[0])


def grpc_target(value: str) -> str:
    """The gRPC target for one address or a comma-separated list of them."""
    pairs = split_addresses(value)
    if len(pairs) == 1:
        host, port = pairs[0]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    resolved = []
    for host, port in pairs:
        family = _family(host)
        address = host
        if family is None:
            family, address = _resolve(host, port)
        resolved.append((family, address, port))
    families = {family for family, _, _ in resolved}
    if len(families) > 1:
        raise AddressError(f"{value!r} mixes IPv4 and IPv6 addresses; list replicas of one family")
    if families == {socket.AF_INET6}:
        return "ipv6:" + ",".join(f"[{host}]:{port}" for _, host, port in resolved)
    return "ipv4:" + ",".join(f"{host}:{port}" for _, host, port in resolved)
