"""Faults of the world around the control plane: a full disk, a damaged store file,
connections cut between a sidecar and the control plane.

The disk is filled for real: SQLite's ``max_page_count`` is lowered on the store's
live connection (``SqliteStore.limit_size``), so writes fail inside SQLite with
SQLITE_FULL exactly as on a full file system.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest

from flext_mesh.config import ServerConfig
from flext_mesh.errors import StoreUnavailable
from flext_mesh.hosting.membership import Membership
from flext_mesh.hosting.reporter import CallReporter, ReporterSettings
from flext_mesh.logs import setup_logging
from flext_mesh.server import ControlPlane, create_server
from flext_mesh.store.sqlite import SqliteStore
from flext_mesh.v1 import (
    metrics_pb2,
    metrics_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from sidecar.client import MeshClient
from tests.conftest import BIN
from tests.registry.conftest import fast_config
from tests.robustness.conftest import StartPlane, instance, register_request
from tests.robustness.proxy import TcpProxy

Channels = Callable[[str], grpc.aio.Channel]
INSTANCES = "/registry/instances/"
# What a client may see when a write cannot be made durable: never INTERNAL/UNKNOWN.
CLEAN_FAILURES = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}


def _address(port: int) -> str:
    return f"127.0.0.1:{port}"


def _sqlite(plane: ControlPlane) -> SqliteStore:
    assert isinstance(plane.store, SqliteStore)
    return plane.store


def _bulky(service: str, instance_id: str) -> registry_pb2.RegisterRequest:
    """A registration of ~2 KB: each one needs fresh pages in the store."""
    request = register_request(service, instance_id)
    request.instance.metadata.update({"blob": "x" * 2000})
    return request


async def _discovered(stub: registry_pb2_grpc.RegistryServiceStub, service: str) -> set[str]:
    try:
        reply = await stub.Discover(
            registry_pb2.DiscoverRequest(service_name=service, healthy_only=False)
        )
    except grpc.aio.AioRpcError as exc:
        if exc.code() is grpc.StatusCode.NOT_FOUND:
            return set()
        raise
    return {i.instance_id for i in reply.instances}


async def _stored(store: SqliteStore, service: str) -> set[str]:
    return {kv.key.rsplit("/", 1)[1] for kv in await store.range(f"{INSTANCES}{service}/")}


# -- a full disk --------------------------------------------------------------------


async def test_a_full_disk_fails_writes_cleanly_and_the_control_plane_recovers(
    tmp_path: Path, channels: Channels
) -> None:
    config = fast_config(tmp_path)
    plane, port = await create_server(config)
    try:
        store = _sqlite(plane)
        stub = registry_pb2_grpc.RegistryServiceStub(channels(_address(port)))
        expected: set[str] = set()
        for i in range(20):  # some state to keep
            await stub.Register(_bulky("pay", f"base{i}"))
            expected.add(f"base{i}")
        watch = stub.Watch(registry_pb2.WatchRequest(service_names=["pay"]))
        snapshot = await watch.read()
        assert isinstance(snapshot, registry_pb2.WatchResponse)
        revision_before = await store.current_revision()

        # The file may not grow any more: fill what room is left, until writes fail.
        await store.limit_size(1)
        failures: list[grpc.aio.AioRpcError] = []
        for i in range(500):
            try:
                await stub.Register(_bulky("pay", f"fill{i}"))
            except grpc.aio.AioRpcError as exc:
                failures.append(exc)
                if len(failures) >= 5:
                    break
            else:
                expected.add(f"fill{i}")
        assert len(failures) >= 5, "the disk never filled up"
        assert {f.code() for f in failures} == {grpc.StatusCode.UNAVAILABLE}
        assert all("disk is full" in (f.details() or "") for f in failures)

        # Whatever a client tries now gets a clean answer: success when it still fits,
        # UNAVAILABLE when it does not; and only what succeeded is there.
        outcomes: list[grpc.StatusCode] = []
        for i in range(30):
            service, instance_id = "pay", f"late{i}"
            try:
                if i % 3 == 2 and expected:
                    instance_id = sorted(expected)[i % len(expected)]
                    await stub.Deregister(
                        registry_pb2.DeregisterRequest(
                            service_name=service, instance_id=instance_id
                        )
                    )
                    expected.discard(instance_id)
                else:
                    await stub.Register(_bulky(service, instance_id))
                    expected.add(instance_id)
                outcomes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                outcomes.append(exc.code())
        assert set(outcomes) <= {grpc.StatusCode.OK, *CLEAN_FAILURES}, outcomes
        assert grpc.StatusCode.UNAVAILABLE in outcomes

        # Reads keep working, and memory, store and watchers agree with the outcomes.
        assert await _discovered(stub, "pay") == expected
        assert await _stored(store, "pay") == expected
        listed = await stub.ListServices(registry_pb2.ListServicesRequest())
        assert [s.instance_count for s in listed.services] == [len(expected)]
        watched = set(expected_from(snapshot))
        while True:
            message = await asyncio.wait_for(watch.read(), 5)
            assert isinstance(message, registry_pb2.WatchResponse)
            for event in message.events:
                if event.type == registry_pb2.WATCH_EVENT_TYPE_REMOVED:
                    watched.discard(event.instance.instance_id)
                else:
                    watched.add(event.instance.instance_id)
            if message.revision >= await store.current_revision():
                break
        assert watched == expected, "a watcher saw exactly the writes that succeeded"
        assert await store.current_revision() > revision_before

        # Space comes back: writes succeed again, without a restart.
        await store.limit_size(None)
        await stub.Register(_bulky("pay", "after"))
        expected.add("after")
        gone = sorted(expected)[0]
        await stub.Deregister(registry_pb2.DeregisterRequest(service_name="pay", instance_id=gone))
        expected.discard(gone)
        assert await _discovered(stub, "pay") == expected
        watch.cancel()
    finally:
        await plane.stop(0.2)

    # And the file holds exactly that: a restart reloads the same registry.
    plane, port = await create_server(config)
    try:
        stub = registry_pb2_grpc.RegistryServiceStub(channels(_address(port)))
        assert await _discovered(stub, "pay") == expected
        assert await _stored(_sqlite(plane), "pay") == expected
    finally:
        await plane.stop(0.2)


def expected_from(snapshot: registry_pb2.WatchResponse) -> list[str]:
    """Instance ids of a Watch snapshot."""
    return [i.instance_id for i in snapshot.snapshot.instances]


async def test_a_full_disk_is_one_log_line_not_a_traceback_twice_a_second(
    tmp_path: Path, channels: Channels, capsys: pytest.CaptureFixture[str]
) -> None:
    # Metrics checkpoints retry every second while the disk is full: each failure was
    # a traceback. Now the first is one WARNING with its reason, the rest are counted.
    setup_logging("INFO")
    plane, port = await create_server(fast_config(tmp_path))
    try:
        store = _sqlite(plane)
        stub = metrics_pb2_grpc.MetricsServiceStub(channels(_address(port)))
        await store.limit_size(1)
        for size in (3000, 300, 30):  # fill what room is left, to the last page
            for i in range(200):
                with contextlib.suppress(StoreUnavailable):
                    await store.put(f"/fill/{size}/{i}", os.urandom(size))
        capsys.readouterr()
        record = metrics_pb2.CallRecord(service_name="pay", operation="charge", duration_ms=3)
        report = asyncio.ensure_future(
            stub.ReportCalls(metrics_pb2.ReportCallsRequest(records=[record] * 50))
        )
        await asyncio.sleep(3.5)  # several checkpoints fail meanwhile
        err = capsys.readouterr().err
        await store.limit_size(None)
        with contextlib.suppress(grpc.aio.AioRpcError):  # UNAVAILABLE: sent again later
            await asyncio.wait_for(report, 10)
    finally:
        await plane.stop(0.2)
    failed = [line for line in err.splitlines() if "metrics checkpoint failed" in line]
    assert len(failed) == 1, err
    assert " WARNING " in failed[0]
    assert "disk is full" in failed[0]
    assert "Traceback" not in err


async def test_a_failed_write_changes_nothing_in_the_store(tmp_path: Path) -> None:
    """At the store: a refused write moves no revision, publishes no event and leaves
    no row; the next write once space returns takes the very next revision."""
    store = SqliteStore(tmp_path / "full.db")
    await store.open()
    try:
        seen: list[int] = []
        store.listen("/", lambda events: seen.extend(e.revision for e in events))
        lease = await store.grant_lease(30)
        for i in range(20):
            await store.put(f"/k/{i}", os.urandom(1500), lease=lease.lease_id)
        await store.limit_size(1)
        refused: list[str] = []
        for i in range(200):
            revision, published = await store.current_revision(), list(seen)
            try:
                await store.put(f"/more/{i}", os.urandom(3000))
            except StoreUnavailable as exc:
                message = str(exc)
                assert await store.current_revision() == revision
                assert seen == published
                refused.append(f"/more/{i}")
                if len(refused) >= 3:
                    break
        assert len(refused) >= 3, "the disk never filled up"
        assert "disk is full" in message
        for key in refused:
            assert await store.get(key) is None
        assert {le.lease_id for le in await store.leases()} == {lease.lease_id}

        await store.limit_size(None)
        assert await store.put("/after", b"1") == revision + 1
        assert seen == [*published, revision + 1]
    finally:
        await store.close()
    reopened = SqliteStore(tmp_path / "full.db")
    await reopened.open()
    try:
        assert await reopened.current_revision() == revision + 1
        assert len(await reopened.range("/k/")) == 20
        for key in refused:
            assert await reopened.get(key) is None
    finally:
        await reopened.close()


# -- a damaged store file -----------------------------------------------------------


async def _make_store(path: Path) -> None:
    """A store with instances and a policy, as a control plane leaves it."""
    config = ServerConfig(
        listen="127.0.0.1:0", http_listen="127.0.0.1:0", store=f"sqlite:///{path}"
    )
    plane, port = await create_server(config)
    try:
        async with grpc.aio.insecure_channel(_address(port)) as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            for i in range(60):
                await stub.Register(_bulky("pay", f"p{i:03d}"))
            await stub.Register(register_request("pay", "marked", version="MARKER-MARKER"))
    finally:
        await plane.stop(0)


def _damage_header(data: bytearray, rnd: random.Random) -> None:
    for i in range(16, 100):  # page size, format numbers, counters: not the magic string
        data[i] = rnd.randrange(256)


def _damage_a_page(data: bytearray, rnd: random.Random) -> None:
    page = 4096
    index = rnd.randrange(2, len(data) // page)
    data[index * page : (index + 1) * page] = rnd.randbytes(page)


def _damage_a_record(data: bytearray, rnd: random.Random) -> None:
    # Structurally valid SQLite, a record's bytes garbled (no check of SQLite sees it).
    at = data.index(b"MARKER-MARKER")
    data[at : at + 13] = b"\xff\xfe" + rnd.randbytes(11)


@pytest.mark.parametrize(
    "damage", [_damage_header, _damage_a_page, _damage_a_record], ids=["header", "page", "record"]
)
async def test_a_damaged_store_file_stops_serve_with_one_line(
    tmp_path: Path, damage: Callable[[bytearray, random.Random], None]
) -> None:
    path = tmp_path / "mesh.db"
    await _make_store(path)
    wal = await asyncio.to_thread(os.path.exists, f"{path}-wal")
    assert not wal, "stopped cleanly: everything is in the file"
    data = bytearray(path.read_bytes())
    damage(data, random.Random(7))
    path.write_bytes(bytes(data))

    serve = [str(BIN / "flext-mesh"), "serve", "--listen", "127.0.0.1:0"]
    proc = await asyncio.to_thread(
        subprocess.run,
        [*serve, "--http-listen", "127.0.0.1:0", "--store", f"sqlite:///{path}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("flext-mesh: error: store ")
    assert str(path) in last
    assert "corrupted" in last or "not a usable SQLite database" in last
    assert "backup" in last, "it says what to do"


# -- connections cut between a sidecar and the control plane -------------------------


async def test_a_sidecar_rides_out_connections_cut_mid_stream(
    start_plane: StartPlane, channels: Channels
) -> None:
    """Watch, KeepAlive and StreamCalls all go through a proxy whose connections are
    cut (RST) three times. The watch resumes, the lease never lapses, and every call
    record is counted exactly once: batches cut in flight are sent again with their
    sequence numbers, and those the control plane had received are not counted again."""
    plane = await start_plane()
    direct = channels(_address(plane.port))
    registry = registry_pb2_grpc.RegistryServiceStub(direct)
    metrics = metrics_pb2_grpc.MetricsServiceStub(direct)

    removals: list[registry_pb2.WatchEvent] = []

    async def watch_removals() -> None:
        async for message in registry.Watch(registry_pb2.WatchRequest(service_names=["pay"])):
            removals.extend(
                e for e in message.events if e.type == registry_pb2.WATCH_EVENT_TYPE_REMOVED
            )

    observer = asyncio.create_task(watch_removals())
    options = [("grpc.initial_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 500)]
    async with TcpProxy("127.0.0.1", plane.port) as proxy:
        channel = grpc.aio.insecure_channel(proxy.address, options=options)
        membership = Membership(lambda: channel, instance("pay", "p1"), ttl=3.0)
        client = MeshClient(proxy.address)
        reporter = CallReporter(
            lambda: channel,
            reporter_id="p1",
            settings=ReporterSettings(
                batch_size=20,
                flush_interval=0.05,
                stream_max_age=1.0,
                connect_timeout=2.0,
                ack_timeout=2.0,
                backoff_initial=0.05,
                backoff_max=0.5,
            ),
        )
        recording = True

        async def record_calls() -> None:
            while recording:
                reporter.record_call("pay", "charge", 1.5, True, instance_id="p1")
                await asyncio.sleep(0.004)

        membership.start()
        recorder: asyncio.Task[None] | None = None
        try:
            await asyncio.wait_for(membership.registered.wait(), 10)
            lease_id = membership.lease_id
            await client.start()
            assert client.instances("pay"), "the client watches through the proxy"
            reporter.start()
            recorder = asyncio.create_task(record_calls())
            in_flight_at_cuts: list[int] = []
            for cut in range(3):
                await asyncio.sleep(0.9)
                # Sampled and cut in the same step of the loop: nothing moves between.
                in_flight_at_cuts.append(reporter.stats().in_flight)
                assert proxy.cut() >= 1, "the sidecar's connections went through the proxy"
                # A change made after the cut reaches the client once its watch resumes.
                await registry.Register(register_request("cart", f"c{cut}"))
                assert await client.wait_for_instances("cart", cut + 1, within=10)
            await asyncio.sleep(1.0)
            recording = False
            await recorder
            await reporter.aclose(flush=True, within=15)

            # The lease lived throughout: never expired, never registered anew.
            assert membership.registrations == 1
            assert membership.lease_id == lease_id
            assert not removals, [e.removal_reason for e in removals]
            assert await _discovered(registry, "pay") == {"p1"}

            stats = reporter.stats()
            assert stats.buffered == stats.in_flight == stats.dropped == 0, stats
            assert stats.failed_flushes >= 1, "the cuts did break call streams"
            report = await metrics.GetServiceReport(
                metrics_pb2.GetServiceReportRequest(service_name="pay")
            )
            counted = report.report.summary.total_calls
            print(
                f"\nrecorded={stats.recorded} counted={counted} "
                f"in_flight_at_cuts={in_flight_at_cuts} failed_flushes={stats.failed_flushes} "
                f"duplicate_batches={stats.duplicate_batches}"
            )
            assert sum(in_flight_at_cuts) > 0, "the cuts caught records in flight"
            assert counted == stats.recorded == stats.sent, "each record counted exactly once"
        finally:
            recording = False
            if recorder is not None:
                await asyncio.gather(recorder, return_exceptions=True)
            await reporter.aclose(flush=False, within=1)
            await membership.stop(deregister=False)
            await client.aclose()
            await channel.close()
            observer.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await observer
