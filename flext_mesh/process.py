"""Process-level helpers shared by ``flext-mesh serve`` and ``flext-sidecar``."""

from __future__ import annotations

import asyncio
import errno
import signal
import socket

__all__ = ["bind_problem", "signal_received"]


def bind_problem(host: str, port: int) -> str:
    """Say why binding ``host:port`` failed, probing with a plain socket for the reason."""
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    probe = socket.socket(family, socket.SOCK_STREAM)
    try:
        probe.bind((host.strip("[]"), port))
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return f"cannot listen on {host}:{port}: address already in use"
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    finally:
        probe.close()
    return f"cannot listen on {host}:{port}"


def signal_received() -> asyncio.Future[str]:
    """Handle SIGTERM and SIGINT from now on; the future resolves to the signal's name.

    Install it before starting up, so that a signal during start-up is not lost.
    """
    loop = asyncio.get_running_loop()
    received: asyncio.Future[str] = loop.create_future()

    def on_signal(sig: signal.Signals) -> None:
        if not received.done():
            received.set_result(sig.name)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    return received
