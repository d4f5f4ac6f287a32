"""When checkpoints happen: every interval, and sooner once enough records wait."""

from __future__ import annotations

import asyncio
from pathlib import Path

from flext_mesh.metrics.aggregator import (
    BUCKETS,
    Aggregator,
    AggregatorSettings,
    _decode_bucket,
    _encode_bucket,
)
from flext_mesh.store.sqlite import SqliteStore
from flext_mesh.v1 import metrics_pb2


def _batch(size: int) -> metrics_pb2.StreamCallsRequest:
    request = metrics_pb2.StreamCallsRequest()
    for i in range(size):
        request.records.add(service_name="pay", operation=f"op{i % 3}", duration_ms=1.0 + i)
    return request


async def test_enough_staged_records_are_checkpointed_before_the_interval(
    tmp_path: Path,
) -> None:
    store = SqliteStore(tmp_path / "m.db")
    await store.open()
    settings = AggregatorSettings(checkpoint_interval=3600, checkpoint_records=1_000)
    aggregator = Aggregator(store, settings)
    await aggregator.start()
    try:
        few = aggregator.submit(_batch(400))
        await asyncio.sleep(0.2)
        assert not few.done(), "400 records wait for the interval"
        more = aggregator.submit(_batch(600))  # 1,000 staged: a checkpoint starts now
        async with asyncio.timeout(5):
            assert (await few).accepted == 400
            assert (await more).accepted == 600
        counted = sum(
            s.count for _, _, series in aggregator.window("pay", 600) for s in series.values()
        )
        assert counted == 1_000
    finally:
        await aggregator.stop()
        await store.close()


async def test_a_bucket_is_stored_as_encoded_from_scratch_after_many_checkpoints(
    tmp_path: Path,
) -> None:
    """Series written before are not encoded again unless they changed: what is
    stored is the same as encoding the bucket anew, and reads back the same."""
    store = SqliteStore(tmp_path / "m.db")
    await store.open()
    # A fixed clock: every record in one 10 s bucket.
    aggregator = Aggregator(
        store, AggregatorSettings(checkpoint_interval=3600), clock=lambda: 1_800_000_005.0
    )
    await aggregator.start()
    try:
        for size in (300, 7, 50):  # the later batches touch some series only
            aggregator.submit(_batch(size))
            await aggregator.checkpoint()
        (kv,) = await store.range(BUCKETS + "pay/")
        (series,) = [s for _, _, s in aggregator.window("pay", 600)]
        assert kv.value == _encode_bucket(series)
        assert {k: (v.count, v.sketch.buckets()[1].tolist()) for k, v in series.items()} == {
            k: (v.count, v.sketch.buckets()[1].tolist())
            for k, v in _decode_bucket(kv.value).items()
        }
        assert sum(v.count for v in series.values()) == 357
    finally:
        await aggregator.stop()
        await store.close()
