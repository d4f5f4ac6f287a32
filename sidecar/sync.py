"""The mesh client for synchronous code."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

from flext_mesh.rpc.context import current as current_call
from flext_mesh.rpc.context import serving

if TYPE_CHECKING:
    from sidecar.client import MeshClient

__all__ = ["SyncMeshClient"]

_T = TypeVar("_T")


class SyncMeshClient:
    """The mesh client for synchronous code: a private event loop in a daemon thread."""

    def __init__(self, control_plane: str, **kwargs: Any) -> None:
        """``kwargs`` are :class:`~sidecar.client.MeshClient`'s."""
        from sidecar.client import MeshClient  # noqa: PLC0415 - sidecar.client re-exports us

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="mesh-client", daemon=True
        )
        self._thread.start()
        self.client: MeshClient = MeshClient(control_plane, **kwargs)
        self._run(self.client.start())

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coroutine, self._loop)
        return future.result()

    def call(
        self,
        service: str,
        operation: str,
        payload: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> dict[str, Any]:
        """Blocking twin of :meth:`MeshClient.call`. Called while serving a call (a
        sync processor in its worker thread), it carries that call's context as
        :meth:`MeshClient.call` does."""
        inbound = current_call()
        if inbound is None:
            return self._run(self.client.call(service, operation, payload, **kwargs))

        async def carried() -> dict[str, Any]:
            # The loop thread has its own context: set the caller's there.
            with serving(inbound):
                return await self.client.call(service, operation, payload, **kwargs)

        return self._run(carried())

    def close(self) -> None:
        """Stop the client and its loop thread."""
        self._run(self.client.aclose())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> SyncMeshClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
