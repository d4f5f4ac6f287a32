"""Per-client rate limits of writes and reported call records: the token buckets, and a
real control plane answering RESOURCE_EXHAUSTED with a RetryInfo."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.errors import ResourceExhausted
from flext_mesh.hosting.membership import Membership
from flext_mesh.hosting.reporter import CallReporter, ReporterSettings
from flext_mesh.rpc.channels import ClientSecurity, open_channel
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.security.ratelimit import RateLimiter
from flext_mesh.server import create_server
from flext_mesh.v1 import metrics_pb2, metrics_pb2_grpc, registry_pb2, registry_pb2_grpc
from tests.security.test_auth import config_for, record, register_request, secured_plane

Code = grpc.StatusCode


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# -- the buckets -------------------------------------------------------------------------


def test_a_bucket_allows_its_burst_then_refills_at_its_rate() -> None:
    clock = Clock()
    limiter = RateLimiter("writes", rate=10, burst=3, clock=clock)
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.1)
    assert limiter.acquire("b") == 0.0  # another client has its own bucket
    clock.now += 0.1
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") == pytest.approx(0.1)
    clock.now += 60  # refills up to the burst, not beyond
    assert [limiter.acquire("a") for _ in range(4)][-1] == pytest.approx(0.1)


def test_a_request_larger_than_the_burst_passes_a_full_bucket_and_leaves_a_debt() -> None:
    clock = Clock()
    limiter = RateLimiter("call records", rate=100, burst=50, clock=clock)
    assert limiter.acquire("a", 80) == 0.0  # never refused forever
    # 30 records of debt, then 10 more wanted: 40 / 100 per second.
    assert limiter.acquire("a", 10) == pytest.approx(0.4)
    clock.now += 0.4
    assert limiter.acquire("a", 10) == 0.0


def test_buckets_are_bounded_dropping_the_least_recently_used() -> None:
    clock = Clock()
    limiter = RateLimiter("writes", rate=1, burst=1, max_clients=3, clock=clock)
    for client in ("a", "b", "c"):
        assert limiter.acquire(client) == 0.0
    assert limiter.acquire("a") > 0  # a used again: b is now the oldest
    assert limiter.acquire("d") == 0.0
    assert len(limiter) == 3
    assert limiter.acquire("b") == 0.0  # b was dropped: a new bucket starts full
    assert limiter.acquire("a") > 0  # a was kept, still empty


# -- the control plane -------------------------------------------------------------------


def retry_after(exc: grpc.aio.AioRpcError) -> float:
    """The RetryInfo delay of a RESOURCE_EXHAUSTED (fails the test without one)."""
    assert exc.code() is Code.RESOURCE_EXHAUSTED, exc.details()
    error = from_rpc_error(exc)
    assert isinstance(error, ResourceExhausted)
    assert error.retry_after is not None
    return error.retry_after


async def exhausted(call: Any) -> tuple[float, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call
    return retry_after(info.value), info.value.details() or ""


async def test_writes_beyond_the_burst_wait_for_the_retry_delay(tmp_path: Path) -> None:
    async with (
        secured_plane(tmp_path, rate_limit_writes=5, rate_limit_writes_burst=3) as secured,
        secured.channel("payment-sidecar") as payment_channel,
        secured.channel("orders-sidecar") as orders_channel,
    ):
        payment = registry_pb2_grpc.RegistryServiceStub(payment_channel)
        orders = registry_pb2_grpc.RegistryServiceStub(orders_channel)
        for n in range(3):
            await payment.Register(register_request("payment", f"pay-{n}"))
        delay, details = await exhausted(payment.Register(register_request("payment", "pay-3")))
        assert 0.05 < delay <= 0.2
        assert details.startswith(
            "rate limit exceeded for token:payment-sidecar (5 writes/s, burst 3): retry in"
        )
        # Reads are not limited, and another client has its own bucket.
        await payment.Discover(registry_pb2.DiscoverRequest(service_name="payment"))
        for n in range(3):
            await orders.Register(register_request("orders", f"ord-{n}"))
        await asyncio.sleep(delay)
        await payment.Register(register_request("payment", "pay-3"))


async def test_keep_alive_messages_count_as_writes_and_slow_the_stream(tmp_path: Path) -> None:
    async with (
        secured_plane(tmp_path, rate_limit_writes=4, rate_limit_writes_burst=2) as secured,
        secured.channel("payment-sidecar") as channel,
    ):
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        lease = (await stub.Register(register_request("payment", "pay-1"))).lease.lease_id
        stream = stub.KeepAlive()
        started = time.monotonic()
        for _ in range(6):  # 1 from the burst, then 4 per second: 5 x 0.25 s
            await stream.write(registry_pb2.KeepAliveRequest(lease_ids=[lease]))
            assert [renewed.lease_id for renewed in (await stream.read()).leases] == [lease]
        assert time.monotonic() - started >= 1.2
        # The stream used the bucket up: a unary write of the same client waits.
        delay, _ = await exhausted(stub.Register(register_request("payment", "pay-2")))
        assert 0 < delay <= 0.25
        stream.cancel()


async def test_reports_are_limited_per_call_record(tmp_path: Path) -> None:
    async with (
        secured_plane(tmp_path, rate_limit_reports=10, rate_limit_reports_burst=50) as secured,
        secured.channel("payment-sidecar") as channel,
        secured.channel("orders-sidecar") as orders_channel,
    ):
        metrics = metrics_pb2_grpc.MetricsServiceStub(channel)
        batch = [record("payment")] * 40
        reply = await metrics.ReportCalls(metrics_pb2.ReportCallsRequest(records=batch))
        assert reply.accepted == 40
        # About 10 records left in the bucket: a batch of 40 waits for 30 more, 3 s.
        delay, details = await exhausted(
            metrics.ReportCalls(metrics_pb2.ReportCallsRequest(records=batch))
        )
        assert 1.5 < delay <= 3.0
        assert "10 call records/s, burst 50" in details
        # On a stream, a batch that would wait more than a second ends it.
        stream = metrics.StreamCalls()
        await stream.write(metrics_pb2.StreamCallsRequest(records=[record("payment")] * 5))
        await stream.write(metrics_pb2.StreamCallsRequest(records=batch))
        await stream.done_writing()
        delay, _ = await exhausted(stream)
        assert delay > 1.0
        other = metrics_pb2_grpc.MetricsServiceStub(orders_channel)
        reply = await other.ReportCalls(
            metrics_pb2.ReportCallsRequest(records=[record("orders")] * 50)
        )
        assert reply.accepted == 50


async def test_without_authentication_clients_are_limited_by_address(tmp_path: Path) -> None:
    plane, port = await create_server(
        config_for(tmp_path, rate_limit_writes=1, rate_limit_writes_burst=2)
    )
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = registry_pb2_grpc.RegistryServiceStub(channel)
            await stub.Register(register_request("payment", "pay-1"))
            await stub.Register(register_request("orders", "ord-1"))
            _, details = await exhausted(stub.Register(register_request("orders", "ord-2")))
            assert "for address:127.0.0.1 (1 writes/s, burst 2)" in details
    finally:
        await plane.stop(0.2)


async def test_the_sidecar_gets_through_a_rate_limit(tmp_path: Path) -> None:
    """Membership retries a refused Register with backoff; the reporter's stream is
    slowed down to the rate of call records, and loses nothing."""
    plane, port = await create_server(
        config_for(
            tmp_path,
            rate_limit_writes=2,
            rate_limit_writes_burst=1,
            rate_limit_reports=200,
            rate_limit_reports_burst=100,
        )
    )
    channel = open_channel(f"127.0.0.1:{port}", ClientSecurity())
    try:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        await stub.Register(register_request("other", "o-1"))  # empties the bucket
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Register(register_request("other", "o-2"))
        retry_after(info.value)
        instance = register_request("payment", "pay-1").instance
        membership = Membership(lambda: channel, instance, ttl=30.0, max_backoff=0.5)
        waited = time.monotonic()
        membership.start()
        try:
            await asyncio.wait_for(membership.registered.wait(), 5)
        finally:
            await membership.stop(deregister=False)
        # Refused at first: it got in once the bucket refilled (0.5 s after o-1).
        assert time.monotonic() - waited >= 0.2
        assert membership.registrations == 1

        # 300 records in batches of 150: 100 at once, then 200 per second.
        settings = ReporterSettings(batch_size=150, flush_interval=0.05)
        started = time.monotonic()
        async with CallReporter(lambda: channel, reporter_id="r", settings=settings) as reporter:
            for _ in range(300):
                reporter.record(record("payment"))
        stats = reporter.stats()
        assert (stats.sent, stats.dropped, stats.failed_flushes) == (300, 0, 0)
        assert time.monotonic() - started >= 0.9
    finally:
        await channel.close()
        await plane.stop(0.2)


async def test_rate_limits_off_install_no_interceptor(tmp_path: Path) -> None:
    plane, _ = await create_server(config_for(tmp_path, rate_limit_writes=0, rate_limit_reports=0))
    try:
        assert plane.security is None
    finally:
        await plane.stop(0.2)
