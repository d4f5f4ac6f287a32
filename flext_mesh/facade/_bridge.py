"""One background event loop for the ``FlextServices`` facade.

The guide's API is synchronous; the mesh's clients are asyncio. Every facade object
does its I/O on one loop running in a daemon thread of its own (started on first use,
shared by the whole process), so:

- synchronous code (the guide's style) calls ``bridge().run(coroutine)`` and blocks
  until it is done, with a timeout;
- asyncio code awaits ``bridge().run_async(coroutine)``: the work still happens on the
  bridge's loop, and the caller's loop is never blocked.

Objects bound to a loop (gRPC channels, background renewals) are created on the
bridge's loop, so both styles can share one facade object.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, TypeVar

__all__ = ["Bridge", "bridge"]

_log = logging.getLogger("flext_mesh.facade")
_T = TypeVar("_T")
_lock = threading.Lock()
_bridge: Bridge | None = None


class Bridge:
    """A private event loop in a daemon thread; see the module docstring."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name="flext-services", daemon=True
        )
        self._thread.start()
        self._warned = False

    def submit(self, coroutine: Coroutine[Any, Any, _T]) -> Future[_T]:
        """Schedule ``coroutine`` on the bridge's loop."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    def run(self, coroutine: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run ``coroutine`` on the bridge's loop and wait for it (synchronous callers)."""
        if threading.current_thread() is self._thread:
            coroutine.close()
            raise RuntimeError("FlextServices: a blocking call made on its own loop")
        if not self._warned and _running_loop() is not None:
            self._warned = True
            _log.warning(
                "a blocking FlextServices call was made from asyncio code: it blocks that "
                "event loop; await the a-prefixed method instead (e.g. aregister)"
            )
        return self.submit(coroutine).result(timeout)

    async def run_async(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` on the bridge's loop; the caller's loop keeps running."""
        return await asyncio.wrap_future(self.submit(coroutine))

    def close(self) -> None:
        """Stop the loop and its thread (at interpreter exit)."""
        if self.loop.is_closed():
            return
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self._thread.is_alive():
            self.loop.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def bridge() -> Bridge:
    """The process's bridge, started on first use."""
    global _bridge  # noqa: PLW0603 - one per process, created lazily
    with _lock:
        if _bridge is None:
            _bridge = Bridge()
            atexit.register(_bridge.close)
        return _bridge
