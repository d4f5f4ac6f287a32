"""Exactly-once call reporting: a batch that names its reporter and sequence number is
counted once, however often and in whatever order it arrives, across a failed durable
write (a full disk), a control-plane restart (``kill -9`` included) and replicas (the
ledger is shared)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from flext_mesh.errors import InvalidArgument
from flext_mesh.metrics.aggregator import Aggregator, AggregatorSettings
from flext_mesh.metrics.dedup import (
    RECENT,
    REPORTERS,
    LedgerCache,
    ReporterLedger,
    reporter_key,
)
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.store.sqlite import SqliteStore
from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc
from tests.conftest import start_serve
from tests.metrics.test_metrics_rpc import Plane, _close, _open, record


def batch(
    count: int, service: str = "payment", duration: float = 10.0
) -> list[metrics_pb2.CallRecord]:
    """``count`` good records of ``service``, durations spread for a sizeable sketch."""
    return [record(duration=duration + i % 97, service=service) for i in range(count)]


async def send(
    mesh: Plane,
    records: list[metrics_pb2.CallRecord],
    sequence: int,
    reporter: str = "sidecar-1~a1",
) -> metrics_pb2.ReportCallsResponse:
    return await mesh.metrics.ReportCalls(
        metrics_pb2.ReportCallsRequest(
            records=records, reporter_id=reporter, batch_sequence=sequence
        ),
        timeout=10,
    )


async def total(mesh: Plane, service: str = "payment") -> int:
    return (await mesh.service_report(service)).summary.total_calls


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Plane]:
    plane = await _open(tmp_path)
    try:
        yield plane
    finally:
        await _close(plane)


# -- over ReportCalls and StreamCalls --------------------------------------------------


async def test_a_batch_sent_twice_is_counted_once_and_answered_the_same(mesh: Plane) -> None:
    records = [*batch(30), record(duration=-1), record(service="")]
    first = await send(mesh, records, 1)
    again = await send(mesh, records, 1)

    assert (first.accepted, first.duplicate) == (30, False)
    assert (again.accepted, again.duplicate) == (30, True)
    assert [(r.index, r.field) for r in again.rejected] == [
        (30, "duration_ms"),
        (31, "service_name"),
    ]
    assert list(again.rejected) == list(first.rejected)
    assert await total(mesh) == 30
    # The next sequence is new, and another reporter's sequence 1 is its own.
    assert not (await send(mesh, batch(5), 2)).duplicate
    assert not (await send(mesh, batch(7), 1, reporter="sidecar-2~b2")).duplicate
    assert await total(mesh) == 42


async def test_sequences_out_of_order_are_each_counted_once(mesh: Plane) -> None:
    """Two streams of one reporter around a reconnect: the second re-sends some of the
    first's batches, out of order and one twice, between new ones."""

    def stream_batch(seq: int) -> metrics_pb2.StreamCallsRequest:
        return metrics_pb2.StreamCallsRequest(
            records=batch(seq), reporter_id="p1~f6", batch_sequence=seq
        )

    first = await mesh.metrics.StreamCalls(iter([stream_batch(s) for s in (3, 1, 5)]))
    second = await mesh.metrics.StreamCalls(iter([stream_batch(s) for s in (2, 4, 3, 1, 6, 2, 5)]))

    assert (first.batches, first.duplicate_batches) == (3, 0)
    assert (second.batches, second.duplicate_batches) == (7, 4)
    assert second.accepted == 2 + 4 + 3 + 1 + 6 + 2 + 5
    assert await total(mesh) == sum(range(1, 7))


async def test_sequence_zero_is_never_deduplicated(mesh: Plane) -> None:
    records = batch(10)
    for _ in range(2):
        reply = await send(mesh, records, 0)
        assert (reply.accepted, reply.duplicate) == (10, False)
    # Without a reporter id at all (grpcurl, old clients): the same.
    await mesh.report(records)
    assert await total(mesh) == 30


async def test_a_sequence_needs_a_usable_reporter_id(mesh: Plane) -> None:
    for reporter in ("", "x" * 257, "bad\nid"):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await send(mesh, batch(3), 1, reporter=reporter)
        error = from_rpc_error(info.value)
        assert isinstance(error, InvalidArgument)
        assert [v.field for v in error.violations] == ["reporter_id"]
    # On a stream, the batch's records are rejected and the stream goes on.
    reply = await mesh.metrics.StreamCalls(
        iter(
            [
                metrics_pb2.StreamCallsRequest(records=batch(4), batch_sequence=1),
                metrics_pb2.StreamCallsRequest(records=batch(6), reporter_id="r", batch_sequence=1),
            ]
        )
    )
    assert (reply.accepted, reply.rejected_count, reply.batches) == (6, 4, 2)
    assert {r.field for r in reply.rejected} == {"reporter_id"}
    assert await total(mesh) == 6


async def test_batches_resent_on_a_new_stream_or_by_report_calls_count_once(
    mesh: Plane,
) -> None:
    """A stream's batches sent again (its answer was lost), on a second stream and
    by ReportCalls, interleaved with new ones."""

    def stream_batch(seq: int) -> metrics_pb2.StreamCallsRequest:
        return metrics_pb2.StreamCallsRequest(
            records=batch(seq), reporter_id="p1~c3", batch_sequence=seq
        )

    first = await mesh.metrics.StreamCalls(iter([stream_batch(s) for s in (1, 2, 3)]))
    assert (first.accepted, first.batches, first.duplicate_batches) == (6, 3, 0)
    second = await mesh.metrics.StreamCalls(iter([stream_batch(s) for s in (2, 3, 4, 1)]))
    # Accepted counts the records of duplicates too: the reporter's accounting holds.
    assert (second.accepted, second.batches, second.duplicate_batches) == (10, 4, 3)
    unary = await send(mesh, batch(4), 4, reporter="p1~c3")
    assert unary.duplicate
    assert await total(mesh) == 1 + 2 + 3 + 4


# -- durability of the ledger ----------------------------------------------------------


async def test_a_resent_batch_is_recognized_after_a_restart(tmp_path: Path) -> None:
    mesh = await _open(tmp_path)
    try:
        for seq in (1, 2, 3):
            await send(mesh, batch(100), seq)
        # Not noted with sequence 0: nothing to remember.
        await send(mesh, batch(1), 0, reporter="other~d4")
    finally:
        await _close(mesh)

    mesh = await _open(tmp_path)  # same SQLite file
    try:
        assert await total(mesh) == 301
        assert [(await send(mesh, batch(100), seq)).duplicate for seq in (2, 3, 4)] == [
            True,
            True,
            False,
        ]
        assert await total(mesh) == 401
    finally:
        await _close(mesh)


def test_kill_9_keeps_the_batches_counted_and_known(tmp_path: Path) -> None:
    """The ledger is written with the records it protects: after a crash right after an
    acknowledgement, a batch sent again is known, and one never acknowledged is not."""
    store = f"sqlite:///{tmp_path / 'crash.db'}"
    server = start_serve(tmp_path, "--store", store)

    def report(
        stub: metrics_pb2_grpc.MetricsServiceStub, seq: int
    ) -> metrics_pb2.ReportCallsResponse:
        request = metrics_pb2.ReportCallsRequest(
            records=batch(200), reporter_id="sidecar-9~e5", batch_sequence=seq
        )
        reply: metrics_pb2.ReportCallsResponse = stub.ReportCalls(request, timeout=10)
        return reply

    with grpc.insecure_channel(server.address) as channel:
        stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        for seq in (1, 2, 3):
            assert report(stub, seq).accepted == 200
    server.kill()  # right after the last acknowledgement

    restarted = start_serve(tmp_path, "--store", store)
    try:
        with grpc.insecure_channel(restarted.address) as channel:
            stub = metrics_pb2_grpc.MetricsServiceStub(channel)
            assert [report(stub, seq).duplicate for seq in (3, 2, 4)] == [True, True, False]
            summary = stub.GetServiceReport(
                metrics_pb2.GetServiceReportRequest(service_name="payment"), timeout=10
            ).report.summary
        assert summary.total_calls == 800
    finally:
        restarted.terminate()


async def test_a_retry_after_a_full_disk_is_counted_once(tmp_path: Path) -> None:
    """A batch answered UNAVAILABLE because its durable write failed was folded in
    memory all the same (it is written once space returns): its retry, with the same
    sequence, is acknowledged once that write is done, and never counted twice."""
    mesh = await _open(tmp_path)
    try:
        store = mesh.plane.store
        assert isinstance(store, SqliteStore)
        await send(mesh, batch(50, service="base"), 1)
        await store.limit_size(1)  # the file may not grow any more

        counted: dict[str, int] = {"base": 50}
        failed: dict[int, str] = {}
        seq = 1
        for round_ in range(30):
            # Twenty services at once: one checkpoint, twenty new buckets to store.
            services = {seq + 1 + i: f"svc-{round_}-{i}" for i in range(20)}
            seq += len(services)
            answers = await asyncio.gather(
                *(send(mesh, batch(100, service=s), n) for n, s in services.items()),
                return_exceptions=True,
            )
            for (n, service), answer in zip(services.items(), answers, strict=True):
                if isinstance(answer, grpc.aio.AioRpcError):
                    assert answer.code() is grpc.StatusCode.UNAVAILABLE, answer
                    assert "disk is full" in (answer.details() or "")
                    failed[n] = service
                else:
                    assert isinstance(answer, metrics_pb2.ReportCallsResponse)
                    counted[service] = answer.accepted
            if failed:
                break
        assert failed, "the disk never filled up"

        # Retried while the disk is still full: not acknowledged, not counted again.
        n, service = next(iter(failed.items()))
        retried = await asyncio.gather(
            send(mesh, batch(100, service=service), n), return_exceptions=True
        )
        if isinstance(retried[0], grpc.aio.AioRpcError):
            assert retried[0].code() is grpc.StatusCode.UNAVAILABLE
        else:  # the write went through meanwhile after all
            assert isinstance(retried[0], metrics_pb2.ReportCallsResponse)
            assert retried[0].duplicate

        await store.limit_size(None)
        for n, service in failed.items():
            reply = await send(mesh, batch(100, service=service), n)
            assert (reply.accepted, reply.duplicate) == (100, True)
            counted[service] = 100
        for service, expected in counted.items():
            assert await total(mesh, service) == expected, service
    finally:
        await _close(mesh)

    mesh = await _open(tmp_path)  # and that is what the file holds
    try:
        for service, expected in counted.items():
            assert await total(mesh, service) == expected, service
        n, service = next(iter(failed.items()))
        assert (await send(mesh, batch(100, service=service), n)).duplicate
    finally:
        await _close(mesh)


# -- replicas ------------------------------------------------------------------------------


def _replica(store: SqliteStore, name: str, **settings: float) -> Aggregator:
    return Aggregator(store, AggregatorSettings(replica=name, checkpoint_interval=0.05, **settings))


def _count(*replicas: Aggregator, service: str = "orders") -> int:
    """Calls of ``service`` as the first replica reports them (its own and its peers')."""
    return sum(
        stats.count
        for _, _, series in replicas[0].window(service, 600)
        for stats in series.values()
    )


async def test_a_batch_counted_by_one_replica_is_a_copy_on_the_others(tmp_path: Path) -> None:
    """The ledger is shared: a batch re-sent to another replica after a failover (or
    back again) is acknowledged there as a copy, and when two replicas get the same
    batch at once, one counts it."""
    store = SqliteStore(str(tmp_path / "shared.db"))
    await store.open()
    try:
        a, b = _replica(store, "a"), _replica(store, "b")
        await a.start()
        await b.start()
        try:
            records = [record(service="orders")] * 5
            assert not (await a.ingest(records, reporter_id="r~1", sequence=1)).duplicate
            # b never saw this reporter: it reads its ledger from the store.
            assert (await b.ingest(records, reporter_id="r~1", sequence=1)).duplicate
            assert not (await b.ingest(records, reporter_id="r~1", sequence=2)).duplicate
            # a's own view of the reporter is stale now: its write is refused, it reads
            # the ledger again and finds 2 counted.
            assert (await a.ingest(records, reporter_id="r~1", sequence=2)).duplicate
            # The same batch on both at once: one counts it, the other answers a copy.
            both = await asyncio.gather(
                a.ingest(records, reporter_id="r~1", sequence=3),
                b.ingest(records, reporter_id="r~1", sequence=3),
            )
            assert sorted(r.duplicate for r in both) == [False, True]
            assert all(r.accepted == 5 for r in both)

            async def merged() -> int:
                return _count(a)

            await _eventually(merged, 15)
            assert _count(b) == 15
        finally:
            await a.stop()
            await b.stop()

        # A replica started afresh (the same name, or a new one) knows them too.
        for name in ("a", "c"):
            again = _replica(store, name)
            await again.start()
            try:
                for seq in (1, 2, 3):
                    reply = await again.ingest(records, reporter_id="r~1", sequence=seq)
                    assert reply.duplicate, (name, seq)
            finally:
                await again.stop()
    finally:
        await store.close()


async def _eventually(read: Callable[[], Awaitable[int]], expected: int) -> None:
    deadline = asyncio.get_running_loop().time() + 5
    while (value := await read()) != expected:
        assert asyncio.get_running_loop().time() < deadline, (value, expected)
        await asyncio.sleep(0.02)


async def test_an_idle_reporters_ledger_expires(tmp_path: Path) -> None:
    """Bounded: a reporter's key lives a reporter idle time (and a quarter) after its
    last batch, then the store deletes it."""
    store = SqliteStore(str(tmp_path / "shared.db"))
    await store.open()
    try:
        a = _replica(store, "a", reporter_idle_ttl=1.0)
        await a.start()
        try:
            await a.ingest([record(service="orders")], reporter_id="idle~1", sequence=1)
            assert await store.get(reporter_key("idle~1")) is not None
            deadline = asyncio.get_running_loop().time() + 10
            while await store.get(reporter_key("idle~1")) is not None:
                assert asyncio.get_running_loop().time() < deadline, "the ledger key stayed"
                await asyncio.sleep(0.1)
        finally:
            await a.stop()
    finally:
        await store.close()


async def test_ledgers_of_the_per_replica_layout_are_still_honoured(tmp_path: Path) -> None:
    """A replica upgraded while reporters re-send what the old layout counted: their
    batches stay copies, and the old shards go once their reporters are idle."""
    store = SqliteStore(str(tmp_path / "shared.db"))
    await store.open()
    now = [1_000_000.0]
    old = {"v": 1, "reporters": [["r~9", 4, [6], now[0]], ["r~8", 1, [], now[0] - 7200]]}
    await store.put(f"{REPORTERS}old-replica/03", json.dumps(old).encode())
    try:
        settings = AggregatorSettings(replica="a", checkpoint_interval=0.05, retention=1e9)
        a = Aggregator(store, settings, clock=lambda: now[0])
        await a.start()
        try:
            records = [record(service="orders")]  # stamped with the fake clock
            copies = [
                (await a.ingest(records, reporter_id="r~9", sequence=s)).duplicate
                for s in (4, 5, 6, 7)
            ]
            assert copies == [True, False, True, False]
            now[0] += 3601
            await a.rollup()  # housekeeping: every reporter of the old shard is idle
            assert await store.get(f"{REPORTERS}old-replica/03") is None
        finally:
            await a.stop()
    finally:
        await store.close()


# -- the ledger's bounds (pure logic) -----------------------------------------------------


def test_the_ledger_cache_forgets_idle_reporters_and_keeps_at_most_its_cap() -> None:
    cache = LedgerCache(idle_ttl=60, max_reporters=3)
    for i, rid in enumerate(("a", "b", "c")):
        cache.put(rid, ReporterLedger().noting([1]), now=float(i))
    cache.touch("a", now=10.0)  # a is the most recently used
    cache.put("d", ReporterLedger().noting([1]), now=11.0)  # one too many: b goes
    assert [r for r in ("a", "b", "c", "d") if cache.counted(r, 1)] == ["a", "c", "d"]
    assert cache.expire(now=65.0) == 1  # c: idle since 2
    assert len(cache) == 2
    assert cache.expire(now=72.0) == 2
    assert not cache.counted("a", 1)


def test_the_ledger_keeps_a_bounded_window_above_its_mark() -> None:
    ledger = ReporterLedger().noting(range(2, RECENT + 2))  # 1 never comes
    assert not ledger.counted(1)
    assert len(ledger.encode(0.0)) > RECENT  # the window is stored
    ledger = ledger.noting([RECENT + 2])  # past the bound: the mark jumps the gap
    assert ledger.counted(1)  # given up: a very late 1 would be taken for a copy
    value = ledger.encode(0.0)
    assert len(value) < 100  # compacted to the mark
    reloaded = ReporterLedger.decode(value, revision=7)
    assert all(reloaded.counted(s) for s in range(1, RECENT + 3))
    assert not reloaded.counted(RECENT + 3)
    assert reloaded.revision == 7


def test_a_reporter_id_makes_one_key_whatever_it_holds() -> None:
    assert reporter_key("payment-host-7001~a1b2") == f"{REPORTERS}payment-host-7001~a1b2"
    assert reporter_key("a/b%c") == f"{REPORTERS}a%2Fb%25c"
