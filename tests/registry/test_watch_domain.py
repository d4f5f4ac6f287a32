"""Watch behaviour that needs short settings: progress messages and slow consumers."""

from __future__ import annotations

import asyncio

import pytest

from flext_mesh.errors import ResourceExhausted
from flext_mesh.registry.registry import Registry, RegistrySettings
from flext_mesh.store.sqlite import SqliteStore
from flext_mesh.v1 import registry_pb2


def _instance(i: int) -> registry_pb2.ServiceInstance:
    return registry_pb2.ServiceInstance(
        service_name="pay",
        instance_id=f"i{i}",
        endpoint="127.0.0.1:9",
        health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
    )


async def test_an_idle_watch_gets_progress_messages_with_the_revision(store: SqliteStore) -> None:
    registry = Registry(store, RegistrySettings(watch_progress_interval=0.1))
    await registry.start()
    try:
        _, _, revision = await registry.register(_instance(1))
        stream = registry.watch(["pay"], 0)
        snapshot = registry_pb2.WatchResponse.FromString(await anext(stream))
        assert snapshot.revision == revision
        progress = registry_pb2.WatchResponse.FromString(await asyncio.wait_for(anext(stream), 5))
        assert not progress.events
        assert not progress.HasField("snapshot")
        assert progress.revision == revision
        await stream.aclose()
    finally:
        await registry.stop()


async def test_a_consumer_that_falls_behind_is_cut_off_and_can_resume(
    store: SqliteStore,
) -> None:
    registry = Registry(store, RegistrySettings(watch_max_pending=5))
    await registry.start()
    try:
        stream = registry.watch([], 0)
        first = registry_pb2.WatchResponse.FromString(await anext(stream))
        for i in range(20):  # never read meanwhile: the queue overflows
            await registry.register(_instance(i))
        received: list[registry_pb2.WatchEvent] = []

        async def drain() -> None:
            async for payload in stream:
                received.extend(registry_pb2.WatchResponse.FromString(payload).events)

        with pytest.raises(ResourceExhausted, match="resume from revision"):
            await drain()
        last = received[-1].revision if received else first.revision
        resumed = registry.watch([], last)
        rest: list[registry_pb2.WatchEvent] = []
        while len(received) + len(rest) < 20:
            rest.extend(registry_pb2.WatchResponse.FromString(await anext(resumed)).events)
        ids = [e.instance.instance_id for e in received + rest]
        assert ids == [f"i{i}" for i in range(20)], "nothing lost across the cut-off"
        await resumed.aclose()
    finally:
        await registry.stop()
