"""Metrics from several control-plane replicas on one store merge in every report.

Two aggregators on one store stand for two replicas (etcd in production; the store
interface is the same): calls reported to either show up in the other's windows, with
counts added and sketches merged, and a replica that restarts keeps its own buckets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flext_mesh.metrics.aggregator import Aggregator, AggregatorSettings, merge_stats
from flext_mesh.store.sqlite import SqliteStore
from tests.metrics.test_metrics_rpc import record


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteStore]:
    opened = SqliteStore(str(tmp_path / "shared.db"))
    await opened.open()
    try:
        yield opened
    finally:
        await opened.close()


def _replica(store: SqliteStore, name: str) -> Aggregator:
    return Aggregator(store, AggregatorSettings(replica=name, checkpoint_interval=0.05))


def _totals(aggregator: Aggregator, service: str) -> tuple[int, int, float]:
    stats = merge_stats(
        s for _, _, series in aggregator.window(service, 600) for s in series.values()
    )
    return stats.count, stats.failures, stats.sketch.quantile(0.99)


async def _eventually_equal(get: object, expected: object, within: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while get() != expected:  # type: ignore[operator]
        assert asyncio.get_running_loop().time() < deadline, (get(), expected)  # type: ignore[operator]
        await asyncio.sleep(0.02)


async def test_each_replica_reports_the_calls_of_all(store: SqliteStore) -> None:
    a, b = _replica(store, "a"), _replica(store, "b")
    await a.start()
    await b.start()
    try:
        await asyncio.gather(
            a.ingest([record(duration=10) for _ in range(300)]),
            b.ingest([record(duration=200, ok=False, code=9) for _ in range(100)]),
        )

        await _eventually_equal(lambda: _totals(a, "payment")[:2], (400, 100))
        await _eventually_equal(lambda: _totals(b, "payment")[:2], (400, 100))
        # The merged sketch holds both replicas' latencies: p99 is b's 200 ms.
        assert _totals(a, "payment")[2] == pytest.approx(200, rel=0.02)
        assert _totals(a, "payment") == _totals(b, "payment")
        assert a.services() == b.services() == ["payment"]
    finally:
        await a.stop()
        await b.stop()


async def test_a_restarted_replica_keeps_its_own_buckets_and_sees_the_others(
    store: SqliteStore,
) -> None:
    a, b = _replica(store, "a"), _replica(store, "b")
    await a.start()
    await b.start()
    await a.ingest([record(service="orders") for _ in range(5)])
    await b.ingest([record(service="orders") for _ in range(7)])
    await a.stop()

    again = _replica(store, "a")
    await again.start()
    try:
        assert _totals(again, "orders")[0] == 12
        # Its own buckets are its own again: new calls add to them, not to a copy.
        await again.ingest([record(service="orders") for _ in range(3)])
        await _eventually_equal(lambda: _totals(b, "orders")[0], 15)
    finally:
        await again.stop()
        await b.stop()
