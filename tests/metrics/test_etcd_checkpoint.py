"""The metrics service on a real etcd with its default transaction limit (128 ops).

A checkpoint or roll-up touching more buckets than one etcd transaction may hold is
split into transactions that fit (a coarse bucket always with the deletes of the fine
buckets merged into it), so many active services work on a stock etcd.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from flext_mesh.metrics.aggregator import (
    REPLICA_BUCKETS,
    Aggregator,
    AggregatorSettings,
    merge_stats,
)
from flext_mesh.store import open_store
from flext_mesh.v1 import metrics_pb2
from tests.etcd_server import EtcdServer

SERVICES = [f"svc-{i:03d}" for i in range(300)]


@pytest.fixture(scope="module")
def stock_etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    server = EtcdServer.start(tmp_path_factory.mktemp("etcd-stock"), max_txn_ops=128)
    try:
        yield server
    finally:
        server.stop()


def record(service: str, stamp: int) -> metrics_pb2.CallRecord:
    return metrics_pb2.CallRecord(
        service_name=service, operation="op", duration_ms=5.0, success=True, time_unix_nano=stamp
    )


def _count(aggregator: Aggregator, service: str) -> int:
    return merge_stats(
        stats for _, _, series in aggregator.window(service, 3600) for stats in series.values()
    ).count


async def test_checkpoints_and_rollups_of_many_services_fit_etcds_limit(
    stock_etcd: EtcdServer, tmp_path: Path
) -> None:
    now = [1_800_000_000.0]
    store = open_store(f"{stock_etcd.url}/checkpoint-{tmp_path.name}")
    await store.open()
    try:
        aggregator = Aggregator(store, AggregatorSettings(replica="cp-a"), clock=lambda: now[0])
        await aggregator.start()
        stamp = int(now[0] * 1e9)
        result = await aggregator.ingest(
            [record(name, stamp) for name in SERVICES for _ in range(2)],
            reporter_id="sidecar-1",
            sequence=1,
        )
        assert result.accepted == 600
        stored = await store.range(f"{REPLICA_BUCKETS}cp-a/")
        assert len(stored) == 300

        now[0] += 700  # the 10 s buckets are now older than 10 minutes: roll them up
        assert await aggregator.rollup() == 300
        stored_keys = [kv.key for kv in await store.range(f"{REPLICA_BUCKETS}cp-a/")]
        assert len(stored_keys) == 300
        assert all("/000060/" in key for key in stored_keys)  # only 1 min buckets left
        await aggregator.stop()

        again = Aggregator(store, AggregatorSettings(replica="cp-a"), clock=lambda: now[0])
        await again.start()
        try:
            assert {_count(again, name) for name in SERVICES} == {2}
            duplicate = await again.ingest(
                [record(SERVICES[0], stamp)],
                reporter_id="sidecar-1",
                sequence=1,
            )
            assert duplicate.duplicate  # the ledger went with the last transaction
        finally:
            await again.stop()
    finally:
        await store.close()
