"""Acknowledged delivery: ``DeliverCalls`` answers each batch once it is durably
counted, the reporter keeps only what is unacknowledged, and it sends that again to
whatever control plane it reaches next (a hung one is left after ``ack_timeout``);
a control plane older than ``DeliverCalls`` gets the batches by ``ReportCalls``."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.errors import InvalidArgument
from flext_mesh.hosting.reporter import CallReporter, ReporterSettings
from flext_mesh.metrics.service import Metrics
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.servicers.metrics import MetricsServicer
from flext_mesh.store.sqlite import SqliteStore
from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc
from tests.conftest import start_serve
from tests.metrics.test_exactly_once import batch
from tests.metrics.test_metrics_rpc import Plane, _close, _open

CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 300),
]


def numbered(
    sequence: int, records: list[metrics_pb2.CallRecord], reporter: str = "side~01"
) -> metrics_pb2.DeliverCallsRequest:
    return metrics_pb2.DeliverCallsRequest(
        records=records, reporter_id=reporter, batch_sequence=sequence
    )


async def total(stub: metrics_pb2_grpc.MetricsServiceStub, service: str = "payment") -> int:
    try:
        reply = await stub.GetServiceReport(
            metrics_pb2.GetServiceReportRequest(service_name=service), timeout=5
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.NOT_FOUND:
            return 0
        raise
    return reply.report.summary.total_calls


async def until(check: Any, within: float, what: str) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, f"{what} not within {within} s"
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Plane]:
    plane = await _open(tmp_path)
    try:
        yield plane
    finally:
        await _close(plane)


async def test_each_batch_is_acknowledged_by_its_sequence_while_the_stream_is_open(
    mesh: Plane,
) -> None:
    call = mesh.metrics.DeliverCalls(timeout=20)
    bad = [metrics_pb2.CallRecord(service_name="payment", operation="charge", duration_ms=-1)]
    await call.write(numbered(1, batch(30)))
    await call.write(numbered(2, bad * 4))
    await call.write(numbered(3, batch(5)))
    acks = {}
    for _ in range(3):
        ack = await call.read()
        acks[ack.batch_sequence] = ack
    assert (acks[1].accepted, acks[1].duplicate, len(acks[1].rejected)) == (30, False, 0)
    assert (acks[2].accepted, [r.field for r in acks[2].rejected]) == (0, ["duration_ms"] * 4)
    assert acks[3].accepted == 5
    # Counted before the client closes: a report sees them now.
    assert await total(mesh.metrics) == 35

    await call.write(numbered(1, batch(30)))  # sent again on the same stream
    again = await call.read()
    assert (again.batch_sequence, again.accepted, again.duplicate) == (1, 30, True)
    await call.done_writing()
    assert await call.read() is grpc.aio.EOF
    assert await call.code() is grpc.StatusCode.OK

    # A new stream (a reconnect) recognises them as well, in any order.
    call = mesh.metrics.DeliverCalls(timeout=20)
    for sequence in (3, 4, 1):
        await call.write(numbered(sequence, batch(sequence)))
    await call.done_writing()
    answered = {ack.batch_sequence: ack.duplicate async for ack in call}
    assert answered == {3: True, 4: False, 1: True}
    assert await total(mesh.metrics) == 39


async def test_a_batch_without_its_number_ends_the_stream_naming_it(mesh: Plane) -> None:
    call = mesh.metrics.DeliverCalls(timeout=10)
    await call.write(numbered(1, batch(2)))
    await call.write(metrics_pb2.DeliverCallsRequest(records=batch(2), reporter_id="side~01"))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        async for _ in call:
            pass
    error = from_rpc_error(info.value)
    assert isinstance(error, InvalidArgument)
    assert [v.field for v in error.violations] == ["batch_sequence"]


async def test_a_hung_control_plane_is_left_and_its_batches_count_once_elsewhere(
    tmp_path: Path,
) -> None:
    """The control plane is frozen (SIGSTOP) with batches written to it and not
    acknowledged, then killed. The reporter gives up on it after ``ack_timeout`` and
    sends them again to the control plane restarted on the same store, which counts
    each once (those the frozen one had already written are known as copies)."""
    port = free_port()
    store = f"sqlite:///{tmp_path / 'mesh.db'}"
    serve = start_serve(tmp_path, "--store", store, "--listen", f"127.0.0.1:{port}")
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", CHANNEL_OPTIONS)
    settings = ReporterSettings(
        batch_size=20,
        flush_interval=0.05,
        ack_timeout=1.0,
        connect_timeout=0.5,
        backoff_initial=0.05,
        backoff_max=0.3,
    )
    reporter = CallReporter(lambda: channel, reporter_id="frozen", settings=settings)
    restarted = None
    try:
        reporter.start()
        for _ in range(10):
            for record in batch(20):
                reporter.record(record)
            await asyncio.sleep(0.03)
        await until(lambda: reporter.stats().sent > 0, 10, "a first acknowledgement")
        os.kill(serve.proc.pid, signal.SIGSTOP)
        for record in batch(100):
            reporter.record(record)
        await until(lambda: reporter.stats().in_flight > 0, 5, "batches written, unanswered")
        await until(lambda: reporter.stats().failed_flushes > 0, 5, "the ack timeout")
        serve.kill()

        restarted = start_serve(tmp_path, "--store", store, "--listen", f"127.0.0.1:{port}")
        await until(lambda: reporter.stats().sent == 300, 15, "every record acknowledged")
        stats = reporter.stats()
        assert (stats.recorded, stats.sent, stats.buffered, stats.dropped) == (300, 300, 0, 0)
        assert await total(metrics_pb2_grpc.MetricsServiceStub(channel)) == 300
    finally:
        await reporter.aclose(flush=False, within=1)
        await channel.close()
        if serve.proc.poll() is None:
            os.kill(serve.proc.pid, signal.SIGCONT)
            serve.kill()
        if restarted is not None:
            restarted.kill()


def _before_deliver_calls(current: MetricsServicer) -> grpc.GenericRpcHandler:
    """MetricsService as a control plane served it before DeliverCalls existed: the
    method is unknown to it (UNIMPLEMENTED)."""
    return grpc.method_handlers_generic_handler(
        "flext_mesh.v1.MetricsService",
        {
            "ReportCalls": grpc.unary_unary_rpc_method_handler(
                current.ReportCalls,
                request_deserializer=metrics_pb2.ReportCallsRequest.FromString,
                response_serializer=metrics_pb2.ReportCallsResponse.SerializeToString,
            ),
            "GetServiceReport": grpc.unary_unary_rpc_method_handler(
                current.GetServiceReport,
                request_deserializer=metrics_pb2.GetServiceReportRequest.FromString,
                response_serializer=metrics_pb2.GetServiceReportResponse.SerializeToString,
            ),
        },
    )


async def test_a_control_plane_without_deliver_calls_gets_each_batch_by_report_calls(
    tmp_path: Path,
) -> None:
    store = SqliteStore(str(tmp_path / "old.db"))
    await store.open()
    metrics = Metrics(store)
    await metrics.start()
    server = grpc.aio.server()
    server.add_generic_rpc_handlers([_before_deliver_calls(MetricsServicer(metrics))])
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", CHANNEL_OPTIONS)
    try:
        settings = ReporterSettings(batch_size=50, flush_interval=0.05, backoff_initial=0.05)
        async with CallReporter(lambda: channel, reporter_id="new", settings=settings) as reporter:
            for record in batch(420):
                reporter.record(record)
            await until(lambda: reporter.stats().sent == 420, 10, "every record acknowledged")
        stats = reporter.stats()
        assert (stats.sent, stats.batches, stats.failed_flushes) == (420, 9, 0)
        assert await total(metrics_pb2_grpc.MetricsServiceStub(channel)) == 420
    finally:
        await channel.close()
        await server.stop(0)
        await metrics.stop()
        await store.close()
