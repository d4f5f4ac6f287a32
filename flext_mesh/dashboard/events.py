"""Server-sent events: framing, and a heartbeat for streams that may stay silent.

A browser's ``EventSource`` reconnects by itself and sends the last ``id:`` it saw as
``Last-Event-ID``; the streams use revisions (registry) and event indexes (executions)
as ids, so a reconnect resumes where it broke off. A comment line every few seconds
keeps proxies from closing an idle stream and lets the server notice a closed tab on
its next write.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, TypeVar

__all__ = ["RETRY_MS", "aclose", "comment", "event", "with_heartbeats"]

#: How long a browser waits before reconnecting a broken stream, milliseconds.
RETRY_MS = 2000
T = TypeVar("T")


def event(name: str, data: Any, *, event_id: int | str | None = None) -> bytes:
    """One SSE message: ``event`` name, JSON ``data`` on one line, optional ``id``."""
    lines = []
    if event_id is not None:
        lines.append(f"id: {event_id}")
    lines.append(f"event: {name}")
    lines.append("data: " + json.dumps(data, separators=(",", ":"), ensure_ascii=False))
    return ("\n".join(lines) + "\n\n").encode()


async def aclose(stream: AsyncIterator[Any]) -> None:
    """Close an async generator now (its ``finally`` runs), not when it is collected."""
    close = getattr(stream, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()


def comment(text: str = "") -> bytes:
    """An SSE comment (ignored by EventSource): a heartbeat."""
    return f": {text}\n\n".encode()


async def with_heartbeats(
    source: AsyncIterator[T], interval: float
) -> AsyncGenerator[T | None, None]:
    """``source``'s items, and ``None`` after each ``interval`` s of silence (send a
    heartbeat then).

    The source runs in a task owned by this generator, so a silent source is never
    cancelled mid-step by a timeout; closing the generator cancels the task (and so
    closes the source). An exception of the source is raised here.
    """
    queue: asyncio.Queue[tuple[T | None, BaseException | None, bool]] = asyncio.Queue(16)

    async def pump() -> None:
        try:
            async for item in source:
                await queue.put((item, None, False))
        except Exception as exc:
            await queue.put((None, exc, True))
        else:
            await queue.put((None, None, True))
        finally:  # cancelled while waiting on the queue, the source is still open
            await aclose(source)

    task = asyncio.create_task(pump(), name="sse-source")
    try:
        while True:
            try:
                item, error, done = await asyncio.wait_for(queue.get(), interval)
            except TimeoutError:
                yield None
                continue
            if error is not None:
                raise error
            if done:
                return
            yield item
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
