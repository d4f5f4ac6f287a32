"""One background event loop for the ``FlextServices`` facade, and its lifecycle.

The guide's API is synchronous; the mesh's clients are asyncio. Every facade object
does its I/O on one loop running in a thread of its own, so:

- synchronous code (the guide's style) calls ``bridge.run(coroutine)`` and blocks
  until it is done, with a timeout;
- asyncio code awaits ``bridge.run_async(coroutine)``: the work still happens on the
  bridge's loop, and the caller's loop is never blocked.

Objects bound to a loop (gRPC channels, servers, background renewals) are created on
the bridge's loop, so both styles can share one facade object.

Who stops it: a facade object :func:`attach`\\ es itself on first use (so it holds the
bridge it made its channel on) and :func:`detach`\\ es when it is closed; the last one
to leave stops the loop, cancels what is left on it and closes it (a later use starts
a new bridge). At interpreter exit, objects never closed are closed on the loop
(their leases deregistered, their servers stopped, their records flushed, each with
its own bound) before the loop stops: a script that just ends leaves no instance
behind in the registry and prints no asyncio or gRPC warning.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any, Protocol, TypeVar

__all__ = ["EXIT_TIMEOUT", "Bridge", "BridgeUser", "attach", "detach"]

_log = logging.getLogger("flext_mesh.facade")
_T = TypeVar("_T")
_lock = threading.Lock()
_bridge: Bridge | None = None
_exit_hook = False

#: Seconds the objects left open get, together, to close at interpreter exit.
EXIT_TIMEOUT = 10.0


class BridgeUser(Protocol):
    """A facade object that keeps things on the bridge's loop until it is closed."""

    def _close_on_loop(self) -> Coroutine[Any, Any, object]:
        """Close everything the object started (run on the bridge's loop)."""
        ...


class Bridge:
    """A private event loop in a thread; see the module docstring."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        #: Objects attached (guarded by the module's lock).
        self.users: set[BridgeUser] = set()
        self._stopping = False
        self._warned = False
        self._thread = threading.Thread(target=self._serve, name="flext-services", daemon=True)
        self._thread.start()

    # -- running coroutines

    def submit(self, coroutine: Coroutine[Any, Any, _T]) -> Future[_T]:
        """Schedule ``coroutine`` on the bridge's loop (RuntimeError once stopped)."""
        if self._stopping:
            coroutine.close()
            raise RuntimeError("FlextServices: its event loop is stopped")
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

    # -- stopping

    def stop(self) -> None:
        """Stop the loop; its thread then cancels what is left and closes it."""
        if self._stopping:
            return
        self._stopping = True
        if not self.loop.is_closed():
            self.loop.call_soon_threadsafe(self.loop.stop)

    def join(self, timeout: float) -> bool:
        """Wait for the thread to finish; False when it is still running."""
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def close_users(self, users: list[BridgeUser], within: float) -> None:
        """Close ``users`` on the loop, together, for at most ``within`` seconds."""

        async def close_all() -> None:
            outcomes = await asyncio.gather(
                *(user._close_on_loop() for user in users), return_exceptions=True
            )
            for user, outcome in zip(users, outcomes, strict=True):
                if isinstance(outcome, BaseException):
                    _log.warning("closing %s failed: %r", type(user).__name__, outcome)

        async def bounded() -> None:
            try:
                async with asyncio.timeout(within):
                    await close_all()
            except TimeoutError:
                _log.warning("FlextServices objects still closing after %gs; stopping", within)

        try:
            self.submit(bounded()).result(within + 1.0)
        except Exception as exc:  # a wedged loop must not hang the interpreter's exit
            _log.warning("closing FlextServices objects failed: %r", exc)

    def _serve(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            self._finish()

    def _finish(self) -> None:
        """Cancel the tasks left on the stopped loop, finish async generators, close."""
        loop = self.loop
        try:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            if tasks:
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        except Exception:
            _log.exception("stopping the FlextServices event loop failed")
        finally:
            loop.close()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def attach(user: BridgeUser) -> Bridge:
    """The process's bridge (started if needed), held by ``user`` until :func:`detach`."""
    global _bridge, _exit_hook  # noqa: PLW0603 - one per process, created lazily
    with _lock:
        if _bridge is None:
            _bridge = Bridge()
            if not _exit_hook:
                atexit.register(_at_exit)
                _exit_hook = True
        _bridge.users.add(user)
        return _bridge


def detach(user: BridgeUser, bridge: Bridge) -> None:
    """``user`` is closed; when it was the bridge's last user, stop the bridge (without
    waiting: safe from asyncio code)."""
    global _bridge  # noqa: PLW0603
    with _lock:
        bridge.users.discard(user)
        if bridge.users:
            return
        if _bridge is bridge:
            _bridge = None
    bridge.stop()


def _at_exit() -> None:
    """Close the objects left open, then stop the loop (registered with atexit)."""
    global _bridge
    with _lock:
        current, _bridge = _bridge, None
        users = list(current.users) if current is not None else []
    if current is None:
        return
    if users:
        current.close_users(users, EXIT_TIMEOUT)
    current.stop()
    if not current.join(5.0):
        _log.warning("the FlextServices event loop did not stop within 5s")
