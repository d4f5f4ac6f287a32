"""Counted exactly once across replicas on a real etcd: a replica killed between
counting batches and acknowledging them, and a checkpoint whose answer etcd never
gave (etcd frozen mid-write)."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from flext_mesh.errors import StoreUnavailable
from flext_mesh.metrics.aggregator import Aggregator, AggregatorSettings, merge_stats
from flext_mesh.store.etcd import EtcdStore
from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc
from tests.conftest import start_serve
from tests.etcd_server import EtcdServer
from tests.metrics.test_exactly_once import batch
from tests.robustness.proxy import TcpProxy

pytestmark = pytest.mark.xdist_group("replicas")

BATCHES = 40
SIZE = 50


def numbered(sequence: int) -> metrics_pb2.DeliverCallsRequest:
    return metrics_pb2.DeliverCallsRequest(
        records=batch(SIZE), reporter_id="worst-case~01", batch_sequence=sequence
    )


@pytest.fixture
def etcd(tmp_path: Path) -> Iterator[EtcdServer]:
    server = EtcdServer.start(tmp_path)
    try:
        yield server
    finally:
        server.stop()


def test_a_replica_killed_between_counting_and_acknowledging_counts_nothing_twice(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """Forty batches go to replica A at once; A is killed (SIGKILL) as soon as its
    first acknowledgement arrives, so it had counted more than it acknowledged. Every
    batch, acknowledged or not, is then sent to replica B: B counts only those A had
    not, and the mesh counts every call once."""
    a = start_serve(tmp_path, "--store", etcd.url, "--node-name", "cp-a")
    b = start_serve(tmp_path, "--store", etcd.url, "--node-name", "cp-b")
    try:
        acknowledged_by_a: list[int] = []
        released = threading.Event()

        def held_open() -> Iterator[metrics_pb2.DeliverCallsRequest]:
            # The stream stays open after the last batch, so it ends only with A: A may
            # acknowledge every batch before the kill lands, and must not see a half-close.
            yield from (numbered(s) for s in range(1, BATCHES + 1))
            released.wait(20)

        with grpc.insecure_channel(a.address) as channel:
            acks = metrics_pb2_grpc.MetricsServiceStub(channel).DeliverCalls(
                held_open(), timeout=20
            )
            cut: grpc.RpcError | None = None
            try:
                for ack in acks:
                    acknowledged_by_a.append(ack.batch_sequence)
                    if len(acknowledged_by_a) == 1:
                        a.kill()
            except grpc.RpcError as exc:
                cut = exc
            finally:
                released.set()
        assert cut is not None, "the stream broke with A"
        assert acknowledged_by_a, "A acknowledged a batch before it was killed"

        with grpc.insecure_channel(b.address) as channel:
            stub = metrics_pb2_grpc.MetricsServiceStub(channel)
            done = threading.Event()

            def everything() -> Iterator[metrics_pb2.DeliverCallsRequest]:
                yield from (numbered(s) for s in range(1, BATCHES + 1))
                done.wait(20)  # half-close once every batch is acknowledged

            copies: dict[int, bool] = {}
            for ack in stub.DeliverCalls(everything(), timeout=20):
                copies[ack.batch_sequence] = ack.duplicate
                if len(copies) == BATCHES:
                    done.set()
            counted = stub.GetServiceReport(
                metrics_pb2.GetServiceReportRequest(service_name="payment"), timeout=5
            ).report.summary.total_calls
        counted_by_a = sum(copies.values())
        print(
            f"\nA acknowledged {len(acknowledged_by_a)} of {BATCHES} batches and had "
            f"counted {counted_by_a}; B counted {BATCHES - counted_by_a}; "
            f"the mesh counts {counted} calls of {BATCHES * SIZE}"
        )
        assert sorted(copies) == list(range(1, BATCHES + 1))
        assert all(copies[s] for s in acknowledged_by_a), "what A acknowledged is a copy on B"
        assert counted == BATCHES * SIZE
    finally:
        for plane in (a, b):
            if plane.proc.poll() is None:
                plane.kill()


async def test_a_checkpoint_whose_answer_was_lost_is_settled_before_the_next(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """etcd is frozen (SIGSTOP) while a checkpoint's transaction is on its way: the
    replica gets no answer and cannot tell whether it was written. Once etcd runs
    again, the next checkpoint settles it first (written or never to be), so the
    batch, sent again by its reporter, is counted exactly once."""
    store = EtcdStore([("127.0.0.1", etcd.client_port)], f"/{tmp_path.name}", timeout=0.5)
    await store.open()
    settings = AggregatorSettings(replica="cp-a", checkpoint_interval=3600)
    aggregator = Aggregator(store, settings)
    await aggregator.start()
    records = batch(25)
    try:
        # The reporter's ledger is known here already: the write is all that is left.
        counted = aggregator.submit(records, reporter_id="lost~01", sequence=1)
        await aggregator.checkpoint()  # (checkpoints are driven by hand here)
        assert not (await counted).duplicate
        first = aggregator.submit(records, reporter_id="lost~01", sequence=2)
        os.kill(etcd.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(StoreUnavailable):
                await aggregator.checkpoint()
        finally:
            os.kill(etcd.proc.pid, signal.SIGCONT)
        with pytest.raises(StoreUnavailable):
            await first  # not acknowledged: the reporter sends it again

        again = aggregator.submit(records, reporter_id="lost~01", sequence=2)
        await aggregator.checkpoint()
        assert (await again).duplicate  # counted once, by the first copy
        stats = merge_stats(
            s for _, _, series in aggregator.window("payment", 600) for s in series.values()
        )
        assert stats.count == 50
    finally:
        await aggregator.stop()
        await store.close()

    # What etcd holds says the same to a replica starting afresh.
    store = EtcdStore([("127.0.0.1", etcd.client_port)], f"/{tmp_path.name}")
    await store.open()
    fresh = Aggregator(store, AggregatorSettings(replica="cp-b"))
    await fresh.start()
    try:
        for sequence in (1, 2):
            reply = await fresh.ingest(records, reporter_id="lost~01", sequence=sequence)
            assert reply.duplicate
        stats = merge_stats(
            s for _, _, series in fresh.window("payment", 600) for s in series.values()
        )
        assert stats.count == 50
    finally:
        await fresh.stop()
        await store.close()


async def _reconnected(store: EtcdStore) -> None:
    """Wait until the store answers again (the first call after a cut fails)."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        try:
            await store.current_revision()
            return
        except StoreUnavailable:
            assert asyncio.get_running_loop().time() < deadline, "etcd unreachable"
            await asyncio.sleep(0.05)


class _AnswersHeldBack(TcpProxy):
    """A proxy to etcd that can hold back etcd's answers (requests still go through):
    a write is applied while its client waits in vain for the answer."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        super().__init__(upstream_host, upstream_port)
        self.answers = asyncio.Event()
        self.answers.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        pair = (writer, up_writer)
        self._pairs.add(pair)

        async def requests() -> None:
            while data := await reader.read(65536):
                up_writer.write(data)
                await up_writer.drain()

        async def answers() -> None:
            while data := await up_reader.read(65536):
                await self.answers.wait()
                writer.write(data)
                await writer.drain()

        try:
            await asyncio.gather(requests(), answers())
        except (ConnectionError, OSError):
            pass
        finally:
            self._pairs.discard(pair)
            for w in pair:
                w.close()


async def test_a_checkpoint_written_but_unanswered_is_taken_as_written(
    etcd: EtcdServer, tmp_path: Path
) -> None:
    """etcd applies a checkpoint's transaction but its answer never arrives (held back
    on the way): the next checkpoint finds the write in etcd and takes it as done, so
    the batch is counted once and its copy acknowledged as such."""
    async with _AnswersHeldBack("127.0.0.1", etcd.client_port) as proxy:
        store = EtcdStore([("127.0.0.1", proxy.port)], f"/{tmp_path.name}", timeout=0.5)
        await store.open()
        aggregator = Aggregator(store, AggregatorSettings(replica="cp-a", checkpoint_interval=3600))
        await aggregator.start()
        records = batch(25)
        try:
            counted = aggregator.submit(records, reporter_id="unanswered~01", sequence=1)
            await aggregator.checkpoint()
            assert not (await counted).duplicate
            first = aggregator.submit(records, reporter_id="unanswered~01", sequence=2)
            proxy.answers.clear()
            with pytest.raises(StoreUnavailable):
                await aggregator.checkpoint()
            with pytest.raises(StoreUnavailable):
                await first
            proxy.cut()  # the connection that held the answers goes
            proxy.answers.set()
            await _reconnected(store)

            again = aggregator.submit(records, reporter_id="unanswered~01", sequence=2)
            await aggregator.checkpoint()
            assert (await again).duplicate
            stats = merge_stats(
                s for _, _, series in aggregator.window("payment", 600) for s in series.values()
            )
            assert stats.count == 50
        finally:
            await aggregator.stop()
            await store.close()
