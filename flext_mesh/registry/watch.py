"""Fan-out of registry changes to Watch streams.

One hub per registry: each batch of changes is translated once, then serialized once
per distinct service filter (all watchers of ``payment`` share the same bytes), and
queued to every watcher. A watcher whose queue is full is cut off with a status that
tells it to resume from its last revision: nothing is buffered without bound and, as
history is kept, the resumed watcher loses nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass, field

from flext_mesh.v1 import registry_pb2

__all__ = ["Batch", "WatchHub", "Watcher"]


@dataclass(frozen=True, slots=True)
class Batch:
    """Events of one store batch for one watcher filter, with their serialized response."""

    first_revision: int
    last_revision: int
    events: tuple[registry_pb2.WatchEvent, ...]
    payload: bytes


@dataclass(eq=False)
class Watcher:
    """One Watch stream's queue. ``services`` None means every service."""

    services: frozenset[str] | None
    max_pending: int
    queue: asyncio.Queue[Batch | None] = field(default_factory=asyncio.Queue)
    overflowed: bool = False

    def wants(self, service: str) -> bool:
        """Whether events of ``service`` go to this watcher."""
        return self.services is None or service in self.services

    def offer(self, batch: Batch) -> None:
        """Queue a batch, or cut the watcher off when it is too far behind."""
        if self.overflowed:
            return
        if self.queue.qsize() >= self.max_pending:
            self.overflowed = True
            self.queue.put_nowait(None)
            return
        self.queue.put_nowait(batch)


class WatchHub:
    """Shared fan-out of WatchEvents to every open Watch stream."""

    def __init__(self, *, max_pending: int = 1024) -> None:
        self._max_pending = max_pending
        self._watchers: set[Watcher] = set()

    def __len__(self) -> int:
        return len(self._watchers)

    def add(self, services: Iterable[str] = ()) -> Watcher:
        """Register a watcher of ``services`` (empty: all); it starts buffering at once."""
        names = frozenset(services)
        watcher = Watcher(names or None, self._max_pending)
        self._watchers.add(watcher)
        return watcher

    def remove(self, watcher: Watcher) -> None:
        """Forget a watcher (its stream ended)."""
        self._watchers.discard(watcher)

    def close_all(self) -> None:
        """End every watch stream (shutdown)."""
        for watcher in self._watchers:
            watcher.queue.put_nowait(None)
        self._watchers.clear()

    def publish(self, events: list[registry_pb2.WatchEvent]) -> None:
        """Deliver one batch of events (in revision order) to every interested watcher."""
        if not events or not self._watchers:
            return
        by_filter: dict[frozenset[str] | None, Batch | None] = {}
        for watcher in self._watchers:
            key = watcher.services
            if key not in by_filter:
                by_filter[key] = make_batch(
                    [e for e in events if key is None or e.service_name in key]
                )
            batch = by_filter[key]
            if batch is not None:
                watcher.offer(batch)


def make_batch(events: list[registry_pb2.WatchEvent]) -> Batch | None:
    """The shared Batch for events (None when there are none)."""
    if not events:
        return None
    last = events[-1].revision
    payload = registry_pb2.WatchResponse(events=events, revision=last).SerializeToString()
    return Batch(events[0].revision, last, tuple(events), payload)
