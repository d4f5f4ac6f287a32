"""The registry's parts at their edges: renewals, label selectors, weight recovery,
fan-out isolation, and answers built on the worker thread."""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from flext_mesh.errors import InvalidArgument
from flext_mesh.registry import discovery
from flext_mesh.registry.registry import Registry, RegistrySettings
from flext_mesh.registry.watch import WAKE_SLICE, Watcher, WatchHub
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.store.sqlite import SqliteStore
from flext_mesh.v1 import registry_pb2
from tests.registry.conftest import Mesh

TTL_ONLY = registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY


# -- renewals ------------------------------------------------------------------------


async def test_last_renew_time_moves_on_heartbeat_and_keep_alive(mesh: Mesh) -> None:
    first = await mesh.register("pay", "a", ttl=30)
    second = await mesh.register("pay", "b", ttl=30)
    registered = first.instance.last_renew_time.ToNanoseconds()
    await asyncio.sleep(1.2)
    await mesh.stub.Heartbeat(registry_pb2.HeartbeatRequest(lease_id=first.lease.lease_id))
    seen = await mesh.instances("pay")
    after_heartbeat = seen["a"].last_renew_time.ToNanoseconds()
    assert after_heartbeat - registered >= 1_000_000_000
    assert seen["b"].last_renew_time == second.instance.last_renew_time, "b was not renewed"

    await asyncio.sleep(1.2)
    call = mesh.stub.KeepAlive()
    await call.write(registry_pb2.KeepAliveRequest(lease_ids=[second.lease.lease_id]))
    reply = await call.read()
    assert not reply.expired_lease_ids
    await call.done_writing()
    seen = await mesh.instances("pay")
    assert (
        seen["b"].last_renew_time.ToNanoseconds() - second.instance.last_renew_time.ToNanoseconds()
        >= 2_000_000_000
    )
    assert seen["a"].last_renew_time.ToNanoseconds() == after_heartbeat


# -- Discover input --------------------------------------------------------------------


async def test_an_empty_label_key_is_invalid_argument_not_not_found(mesh: Mesh) -> None:
    await mesh.register("pay", "a")
    for service in ("pay", "ghost"):
        request = registry_pb2.DiscoverRequest(service_name=service)
        request.label_selector[""] = "x"
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await mesh.stub.Discover(request)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        error = from_rpc_error(info.value)
        assert isinstance(error, InvalidArgument)
        assert [v.field for v in error.violations] == ["label_selector"]
        assert "empty" in error.violations[0].description


# -- weights recover ---------------------------------------------------------------------


def _instance(name: str, **fields: Any) -> registry_pb2.ServiceInstance:
    return registry_pb2.ServiceInstance(
        service_name="pay",
        instance_id=name,
        endpoint="127.0.0.1:9",
        health_check_mode=TTL_ONLY,
        **fields,
    )


@contextlib.asynccontextmanager
async def _registry(store: SqliteStore, now: list[float]) -> AsyncIterator[Registry]:
    """A registry whose call statistics expire after 30 s of ``now[0]``."""
    settings = RegistrySettings(refresh_interval=3600, weight_expiration=30)
    registry = Registry(store, settings, clock=lambda: now[0])
    await registry.start()
    try:
        yield registry
    finally:
        await registry.stop()


async def test_weights_cut_by_errors_recover_after_the_expiration(store: SqliteStore) -> None:
    now = [1000.0]
    async with _registry(store, now) as registry:
        await registry.register(_instance("a"))
        registry.set_call_stats("pay", "a", error_rate=0.375, latency_ms=None)
        await registry.refresh()
        assert registry.get("pay", "a").effective_weight == pytest.approx(25.0)  # type: ignore[union-attr]

        now[0] += 29  # no call since: still within the expiration
        await registry.refresh()
        assert registry.get("pay", "a").effective_weight == pytest.approx(25.0)  # type: ignore[union-attr]

        now[0] += 2  # 31 s without a call: the error factor is forgotten
        assert await registry.refresh() == 1
        assert registry.get("pay", "a").effective_weight == pytest.approx(100.0)  # type: ignore[union-attr]

        registry.set_call_stats("pay", "a", error_rate=0.375, latency_ms=None)
        now[0] += 20  # calls again: the fresh rate counts at once
        await registry.refresh()
        assert registry.get("pay", "a").effective_weight == pytest.approx(25.0)  # type: ignore[union-attr]


async def test_a_stale_call_latency_goes_back_to_unknown(store: SqliteStore) -> None:
    now = [0.0]
    async with _registry(store, now) as registry:
        for name in ("a", "b", "c"):
            await registry.register(_instance(name))
        for name, latency in (("a", 10.0), ("b", 10.0), ("c", 160.0)):
            registry.set_call_stats("pay", name, error_rate=0.0, latency_ms=latency)
        await registry.refresh()
        slow = registry.get("pay", "c")
        assert slow is not None
        assert slow.response_time_ms == pytest.approx(160.0)
        assert slow.effective_weight == pytest.approx(50.0)  # 4x the median: half

        now[0] += 31
        for name in ("a", "b"):  # they keep getting calls, c none
            registry.set_call_stats("pay", name, error_rate=0.0, latency_ms=10.0)
        await registry.refresh()
        slow = registry.get("pay", "c")
        assert slow is not None
        assert slow.response_time_ms == 0.0
        assert slow.effective_weight == pytest.approx(100.0)


async def test_explain_gives_the_factors_that_make_each_effective_weight(
    store: SqliteStore,
) -> None:
    now = [0.0]
    async with _registry(store, now) as registry:
        for name in ("a", "b", "c"):
            await registry.register(_instance(name))
        for name, latency, errors in (("a", 10.0, 0.0), ("b", 10.0, 0.25), ("c", 160.0, 0.0)):
            registry.set_call_stats("pay", name, error_rate=errors, latency_ms=latency)
        await registry.refresh()
        explained = {e.instance_id: e for e in registry.explain("pay", in_answer=["a", "b"])}
    assert sorted(explained) == ["a", "b", "c"]
    for e in explained.values():
        product = e.base_weight * e.health_factor * e.latency_factor * e.error_factor
        assert e.effective_weight == pytest.approx(product)
        assert e.effective_weight == pytest.approx(
            registry.get("pay", e.instance_id).effective_weight
        )  # type: ignore[union-attr]
    assert (explained["b"].error_factor, explained["b"].infrastructure_error_rate) == (0.5, 0.25)
    assert explained["c"].latency_factor == pytest.approx(0.5)  # 16x slower than the median
    assert explained["c"].service_median_ms == pytest.approx(10.0)
    assert [e.in_answer for e in explained.values()] == [True, True, False]


# -- fan-out -------------------------------------------------------------------------------


async def test_a_change_of_one_service_does_no_work_for_watchers_of_another() -> None:
    hub = WatchHub(max_pending=8)
    others = [hub.add(["orders"]) for _ in range(1000)]
    mine = hub.add(["pay"])
    everyone = hub.add([])
    event = registry_pb2.WatchEvent(revision=7, service_name="pay")
    hub.publish([event])
    assert all(w.pending == 0 for w in others)
    assert (mine.pending, everyone.pending) == (1, 1)
    batch = await mine.next(1)
    assert batch is not None
    assert [e.service_name for e in batch.events] == ["pay"]
    for _ in range(20):  # orders watchers never read, and are never cut off by pay's changes
        hub.publish([registry_pb2.WatchEvent(revision=8, service_name="pay")])
    assert not any(w.overflowed for w in others)
    assert everyone.overflowed, "the watcher of every service fell 8 batches behind"
    assert len(hub) == 1002


async def test_batches_are_released_once_every_watcher_read_them() -> None:
    hub = WatchHub(max_pending=100)
    a, b = hub.add(["pay"]), hub.add(["pay"])
    for revision in range(1, 4):
        hub.publish([registry_pb2.WatchEvent(revision=revision, service_name="pay")])
    for _ in range(3):
        assert await a.next(1) is not None
    channel = a._channel
    assert len(channel.log) == 3, "b has read nothing yet"
    hub.remove(b)
    assert len(channel.log) == 0
    with pytest.raises(TimeoutError):
        await a.next(0.05)


# -- answers built off the loop ----------------------------------------------------------


async def test_answers_built_on_the_worker_thread_are_the_same_as_inline(
    store: SqliteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    registry = Registry(store, RegistrySettings(refresh_interval=3600))
    await registry.start()
    try:
        for i in range(30):
            await registry.register(_instance(f"i{i:02d}", weight=10 + i))
        request = registry_pb2.DiscoverRequest(service_name="pay")
        inline = [(await registry.discover(request)).payload() for _ in range(40)]
        monkeypatch.setattr(discovery, "THREAD_AT", 10)
        await registry.register(
            _instance("i00", weight=10)
        )  # a new revision: the next answer is rebuilt, on the thread
        threaded = [(await registry.discover(request)).payload() for _ in range(40)]

        def order(payload: bytes) -> list[str]:
            return [
                i.instance_id for i in registry_pb2.DiscoverResponse.FromString(payload).instances
            ]

        def counts(payloads: list[bytes]) -> Counter[str]:
            return Counter(order(p)[0] for p in payloads)

        by_weight = sorted(order(inline[0]), key=lambda i: (-int(i[1:]), i))
        for payload in inline + threaded:
            first, *rest = order(payload)
            assert rest == [i for i in by_weight if i != first]
        share = counts(inline)
        assert all(abs(share[i] - counts(threaded)[i]) <= 1 for i in by_weight)
        concurrent = await asyncio.gather(*(registry.discover(request) for _ in range(5)))
        firsts = [answer.first() for answer in concurrent]
        assert all(first is not None for first in firsts)
        assert len({id(a._answer) for a in concurrent}) == 1, "one shared answer"
    finally:
        await registry.stop()


async def test_answers_rebuilt_on_every_change_do_not_favour_one_instance(
    store: SqliteStore,
) -> None:
    registry = Registry(store, RegistrySettings(refresh_interval=3600))
    await registry.start()
    try:
        for i in range(10):
            await registry.register(_instance(f"i{i}"))
        request = registry_pb2.DiscoverRequest(service_name="pay")
        firsts: Counter[str] = Counter()
        for i in range(200):  # a change, then one Discover: every answer is a new one
            await registry.register(_instance(f"extra-{i % 2}"))
            first = (await registry.discover(request)).first()
            assert first is not None
            firsts[first.instance_id] += 1
        assert len(firsts) == 12
        assert max(firsts.values()) < 50, firsts
    finally:
        await registry.stop()


async def test_a_change_wakes_thousands_of_watchers_a_slice_per_turn_of_the_loop() -> None:
    hub = WatchHub(max_pending=8)
    watchers = [hub.add(["pay"]) for _ in range(1000)]
    received: list[int] = []

    async def read(watcher: Watcher) -> None:
        batch = await watcher.next(10)
        assert batch is not None
        received.append(batch.last_revision)

    tasks = [asyncio.create_task(read(w)) for w in watchers]
    await asyncio.sleep(0)  # every reader waits
    hub.publish([registry_pb2.WatchEvent(revision=9, service_name="pay")])
    turns = 0
    while len(received) < 1000:
        await asyncio.sleep(0)
        turns += 1
        assert turns < 100
    assert received == [9] * 1000
    assert turns >= 1000 // WAKE_SLICE, "not all woken in one turn: other work gets in"
    await asyncio.gather(*tasks)


async def test_an_idle_watcher_times_out_and_leaves_no_waits_behind() -> None:
    hub = WatchHub()
    watcher = hub.add(["pay"])
    for _ in range(100):
        with pytest.raises(TimeoutError):
            await watcher.next(0)
    assert len(watcher._channel.waiters) <= 2 * 1 + 16 + 1


async def test_in_process_callers_read_the_answer_without_decoding(store: SqliteStore) -> None:
    registry = Registry(store, RegistrySettings(refresh_interval=3600))
    await registry.start()
    try:
        for i in range(5):
            await registry.register(_instance(f"i{i}", weight=10 * (i + 1)))
        for limit in (0, 3):
            answer = await registry.discover(
                registry_pb2.DiscoverRequest(service_name="pay", limit=limit)
            )
            decoded = registry_pb2.DiscoverResponse.FromString(answer.payload())
            instances = answer.instances()
            assert list(decoded.instances) == instances
            assert answer.first() is instances[0]
            assert len(instances) == (limit or 5)
    finally:
        await registry.stop()
