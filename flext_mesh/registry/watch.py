"""Fan-out of registry changes to Watch streams.

Watchers with the same service filter share a *channel*: one log of batches, each
translated and serialized once (all watchers of ``payment`` send the same bytes).
Publishing a change costs one batch per channel that wants it; channels of other
services are not touched (an index by service name finds the channels a change
concerns). The channel's waiting watchers are woken :data:`WAKE_SLICE` per turn of the
event loop, so a change reaching 10,000 streams leaves room for other calls between
slices. Each watcher reads the log from its own cursor, so a slow stream delays nobody
else.

A batch stays in the log until every watcher of the channel has read it. A watcher that
falls more than ``max_pending`` batches behind is cut off with a status that tells it
to resume from its last revision: nothing is buffered without bound and, as history is
kept in the store, the resumed watcher loses nothing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from flext_mesh.v1 import registry_pb2

__all__ = ["Batch", "WatchHub", "Watcher", "make_batch"]


@dataclass(frozen=True, slots=True)
class Batch:
    """Events of one store batch for one watcher filter, with their serialized response."""

    first_revision: int
    last_revision: int
    events: tuple[registry_pb2.WatchEvent, ...]
    payload: bytes


class _Entry:
    __slots__ = ("batch", "unread")

    def __init__(self, batch: Batch, unread: int) -> None:
        self.batch = batch
        self.unread = unread


class _Channel:
    """The log and the waiting watchers of one filter."""

    __slots__ = ("closed", "first", "log", "max_pending", "services", "waiters", "watchers")

    def __init__(self, services: frozenset[str] | None, max_pending: int) -> None:
        self.services = services
        self.max_pending = max_pending
        self.log: deque[_Entry] = deque()
        self.first = 0  # sequence number of log[0]
        self.watchers: set[Watcher] = set()
        self.waiters: deque[asyncio.Future[bool]] = deque()
        self.closed = False

    @property
    def end(self) -> int:
        return self.first + len(self.log)

    def append(self, batch: Batch) -> None:
        if not self.watchers:
            return
        self.log.append(_Entry(batch, len(self.watchers)))
        if len(self.log) > self.max_pending:
            # Someone is too far behind: cut the laggards off (rare, so a scan is fine).
            limit = self.end - self.max_pending
            for watcher in self.watchers:
                if watcher._cursor < limit:
                    watcher._cut_off()
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def wait(self) -> asyncio.Future[bool]:
        """A future set True at the next wake-up (a watcher's own: cancelling it
        touches nobody else)."""
        waiters = self.waiters
        if len(waiters) > 2 * len(self.watchers) + 16:
            # Timed-out waits of idle watchers: drop them now and then.
            self.waiters = waiters = deque(w for w in waiters if not w.done())
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        waiters.append(future)
        return future

    def _wake(self) -> None:
        """Wake every waiting watcher, :data:`WAKE_SLICE` per turn of the event loop,
        so that thousands of streams never keep the loop from other work."""
        if not self.waiters:
            return
        waking, self.waiters = self.waiters, deque()
        _wake_slice(asyncio.get_running_loop(), waking)

    def release(self, upto: int, start: int) -> None:
        """A watcher read (or gave up) the entries from ``start`` up to ``upto``."""
        log = self.log
        for seq in range(max(start, self.first), min(upto, self.end)):
            log[seq - self.first].unread -= 1
        while log and log[0].unread <= 0:
            log.popleft()
            self.first += 1


class Watcher:
    """One Watch stream's place in its channel. ``services`` None means every service."""

    __slots__ = ("_channel", "_cursor", "max_pending", "overflowed")

    def __init__(self, channel: _Channel, max_pending: int) -> None:
        self._channel = channel
        self._cursor = channel.end
        self.max_pending = max_pending
        """Batches the watcher may fall behind before it is cut off."""
        self.overflowed = False
        """True once it fell too far behind (its stream must end with a status)."""

    @property
    def services(self) -> frozenset[str] | None:
        """The watched services; None for all."""
        return self._channel.services

    @property
    def pending(self) -> int:
        """Batches published and not read yet."""
        return self._channel.end - self._cursor

    def wants(self, service: str) -> bool:
        """Whether events of ``service`` go to this watcher."""
        services = self._channel.services
        return services is None or service in services

    async def next(self, timeout: float | None = None) -> Batch | None:  # noqa: ASYNC109
        """The next batch; None when the stream must end (hub closed, or overflowed);
        TimeoutError when nothing came within ``timeout`` seconds."""
        channel = self._channel
        while self._cursor >= channel.end:
            if channel.closed or self.overflowed:
                return None
            future = channel.wait()
            timer = (
                asyncio.get_running_loop().call_later(timeout, _time_out, future)
                if timeout is not None
                else None
            )
            try:
                woken = await future
            finally:
                if timer is not None:
                    timer.cancel()
            if not woken:
                raise TimeoutError
        if self.overflowed:
            return None
        seq = self._cursor
        batch = channel.log[seq - channel.first].batch
        self._cursor = seq + 1
        channel.release(seq + 1, seq)
        return batch

    def _cut_off(self) -> None:
        self.overflowed = True
        self._leave()

    def _leave(self) -> None:
        channel = self._channel
        channel.release(channel.end, self._cursor)
        self._cursor = channel.end


class WatchHub:
    """Shared fan-out of WatchEvents to every open Watch stream."""

    def __init__(self, *, max_pending: int = 1024) -> None:
        self._max_pending = max_pending
        self._channels: dict[frozenset[str] | None, _Channel] = {}
        # Service name -> channels whose filter names it (channel of all: key None).
        self._by_service: dict[str, set[_Channel]] = {}
        self._count = 0

    def __len__(self) -> int:
        return self._count

    def watched(self, service: str) -> bool:
        """Whether any watcher wants changes of ``service``."""
        return None in self._channels or service in self._by_service

    def add(self, services: Iterable[str] = ()) -> Watcher:
        """Register a watcher of ``services`` (empty: all); it starts buffering at once."""
        names = frozenset(services) or None
        channel = self._channels.get(names)
        if channel is None:
            channel = self._channels[names] = _Channel(names, self._max_pending)
            for name in names or ():
                self._by_service.setdefault(name, set()).add(channel)
        watcher = Watcher(channel, self._max_pending)
        channel.watchers.add(watcher)
        self._count += 1
        return watcher

    def remove(self, watcher: Watcher) -> None:
        """Forget a watcher (its stream ended)."""
        channel = watcher._channel
        if watcher not in channel.watchers:
            return
        channel.watchers.discard(watcher)
        watcher._leave()
        self._count -= 1
        if not channel.watchers and self._channels.get(channel.services) is channel:
            del self._channels[channel.services]
            for name in channel.services or ():
                chans = self._by_service.get(name)
                if chans is not None:
                    chans.discard(channel)
                    if not chans:
                        del self._by_service[name]

    def close_all(self) -> None:
        """End every watch stream (shutdown)."""
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()
        self._by_service.clear()

    def publish(self, events: list[registry_pb2.WatchEvent]) -> None:
        """Deliver one batch of events (in revision order) to every interested watcher."""
        if not events or not self._channels:
            return
        every = self._channels.get(None)
        if every is not None:
            batch = make_batch(events)
            if batch is not None:
                every.append(batch)
        concerned: set[_Channel] = set()
        for name in {e.service_name for e in events}:
            concerned.update(self._by_service.get(name, ()))
        for channel in concerned:
            wanted = channel.services or frozenset()
            batch = make_batch([e for e in events if e.service_name in wanted])
            if batch is not None:
                channel.append(batch)


#: Watchers woken per turn of the event loop when a change reaches many of them.
WAKE_SLICE = 256


def _wake_slice(loop: asyncio.AbstractEventLoop, waking: deque[asyncio.Future[bool]]) -> None:
    for _ in range(min(WAKE_SLICE, len(waking))):
        future = waking.popleft()
        if not future.done():
            future.set_result(True)
    if waking:
        loop.call_soon(_wake_slice, loop, waking)


def _time_out(future: asyncio.Future[bool]) -> None:
    if not future.done():
        future.set_result(False)


def make_batch(events: list[registry_pb2.WatchEvent]) -> Batch | None:
    """The shared Batch for events (None when there are none)."""
    if not events:
        return None
    last = events[-1].revision
    payload = registry_pb2.WatchResponse(events=events, revision=last).SerializeToString()
    return Batch(events[0].revision, last, tuple(events), payload)
