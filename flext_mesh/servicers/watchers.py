"""How many watch streams each client holds open, and the limit on it.

A watch stream costs the control plane a queue, a handler task and fan-out work on
every change for as long as it stays open, and nothing ends it but the client: one
client opening streams in a loop would hold them all. :class:`WatchLimit` counts the
open streams (``RegistryService.Watch`` and ``OrchestratorService.WatchExecution``
together) per client, named by :func:`~flext_mesh.security.identity.client_key`: its
identity when authentication is on, its address otherwise.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flext_mesh.errors import ResourceExhausted
from flext_mesh.security.identity import client_key

__all__ = ["WatchLimit"]

#: Seconds a refused client is told to wait (a stream of its own may end meanwhile).
RETRY_AFTER = 1.0


class WatchLimit:
    """Open watch streams per client, at most ``max_per_client`` each."""

    def __init__(self, max_per_client: int = 64) -> None:
        if max_per_client < 1:
            raise ValueError(f"max_per_client must be at least 1, got {max_per_client}")
        self.max_per_client = max_per_client
        self._open: dict[str, int] = {}

    def open_streams(self, client: str | None = None) -> int:
        """Streams open now: of one client (a :func:`client_key`), or of all."""
        if client is None:
            return sum(self._open.values())
        return self._open.get(client, 0)

    def acquire(self, context: Any) -> Callable[[], None]:
        """Count one more stream of the caller, or raise ResourceExhausted at the limit.

        Returns the release function. It runs when the RPC ends for any reason (the
        context's done callback: cancelled, failed, server shut down) and may also be
        called by the handler; the stream is uncounted once either way.
        """
        key = client_key(context)
        held = self._open.get(key, 0)
        if held >= self.max_per_client:
            raise ResourceExhausted(
                f"client {key} already holds {held} open watch streams, the most allowed "
                "(--max-watchers-per-client); close one or raise the limit",
                retry_after=RETRY_AFTER,
            )
        self._open[key] = held + 1
        released = False

        def release(_context: object = None) -> None:
            nonlocal released
            if released:
                return
            released = True
            left = self._open.get(key, 0) - 1
            if left > 0:
                self._open[key] = left
            else:
                self._open.pop(key, None)

        context.add_done_callback(release)
        return release
