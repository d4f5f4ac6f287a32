"""The store's subscription registry: each event reaches the subscriptions whose prefix
holds its key, found by prefix rather than by asking every subscription."""

from __future__ import annotations

import pytest

from flext_mesh.store import Event, EventType, Subscription
from flext_mesh.store.base import Subscriptions


def _put(key: str, revision: int = 1) -> Event:
    return Event(revision, EventType.PUT, key, b"v")


async def _drained(sub: Subscription) -> list[str]:
    keys: list[str] = []
    while not sub._queue.empty():
        batch = sub._queue.get_nowait()
        if batch is not None:
            keys.extend(e.key for e in batch)
    return keys


async def test_each_event_reaches_every_prefix_holding_its_key_and_no_other() -> None:
    subs = Subscriptions()
    execution = Subscription("/orchestrator/events/e1/")
    parent = Subscription("/orchestrator/")
    everything = Subscription("")
    partial = Subscription("/orchestrator/events/e")
    neighbour = Subscription("/orchestrator/events/e10/")
    for sub in (execution, parent, everything, partial, neighbour):
        subs.add(sub)
    subs.deliver([_put("/orchestrator/events/e1/0000000001"), _put("/registry/x/y")])
    assert await _drained(execution) == ["/orchestrator/events/e1/0000000001"]
    assert await _drained(parent) == ["/orchestrator/events/e1/0000000001"]
    assert await _drained(everything) == [
        "/orchestrator/events/e1/0000000001",
        "/registry/x/y",
    ]
    assert await _drained(partial) == ["/orchestrator/events/e1/0000000001"]
    assert await _drained(neighbour) == []


async def test_a_closed_subscription_is_forgotten_at_once() -> None:
    subs = Subscriptions()
    many = [Subscription(f"/orchestrator/events/e{i}/") for i in range(1000)]
    for sub in many:
        subs.add(sub)
    assert len(subs) == 1000
    for sub in many:
        sub.close()
    assert len(subs) == 0  # nothing left behind by executions that ended


@pytest.mark.parametrize("watchers", [10, 10_000])
async def test_a_commit_touches_only_the_subscriptions_it_concerns(watchers: int) -> None:
    """With one watcher per running execution, an event of one execution is handed to
    its watcher only, whatever the number of others."""
    subs = Subscriptions()
    delivered = []

    class Counting(Subscription):
        def deliver(self, events: list[Event]) -> None:
            delivered.append(self.prefix)
            super().deliver(events)

    for i in range(watchers):
        subs.add(Counting(f"/orchestrator/events/e{i}/"))
    subs.deliver([_put("/orchestrator/events/e3/0000000007")])
    assert delivered == ["/orchestrator/events/e3/"]
