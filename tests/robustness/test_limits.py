"""Limits a client runs into: instances per service, open watch streams, slow watchers.

Each is a clear RESOURCE_EXHAUSTED naming the limit and the flag that raises it, and
each must hold under concurrency and give back what it counted when a stream ends,
however it ends.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from flext_mesh.errors import ResourceExhausted
from flext_mesh.registry.registry import Registry, RegistrySettings
from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.servicers.registry import RegistryServicer, add_registry_servicer
from flext_mesh.servicers.watchers import WatchLimit
from flext_mesh.store.sqlite import SqliteStore
from flext_mesh.v1 import (
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.registry.conftest import eventually
from tests.robustness.conftest import StartPlane, instance, register_request
from tests.robustness.proxy import TcpProxy

Channels = Callable[[str], grpc.aio.Channel]


def _address(port: int) -> str:
    return f"127.0.0.1:{port}"


async def _ids(stub: registry_pb2_grpc.RegistryServiceStub, service: str) -> set[str]:
    reply = await stub.Discover(
        registry_pb2.DiscoverRequest(service_name=service, healthy_only=False)
    )
    return {i.instance_id for i in reply.instances}


# -- instances per service ----------------------------------------------------------


async def test_a_service_past_its_instance_limit_is_refused_clearly(
    start_plane: StartPlane, channels: Channels
) -> None:
    plane = await start_plane(max_instances_per_service=3)
    stub = registry_pb2_grpc.RegistryServiceStub(channels(_address(plane.port)))
    for i in range(3):
        await stub.Register(register_request("pay", f"p{i}"))

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await stub.Register(register_request("pay", "p3"))
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    message = refused.value.details() or ""
    assert "'pay'" in message
    assert "limit of 3 instances" in message
    assert "--max-instances-per-service" in message
    assert await _ids(stub, "pay") == {"p0", "p1", "p2"}

    # Registering an instance again (a sidecar whose lease was lost) is always allowed,
    # with another endpoint too; other services have their own count.
    again = await stub.Register(register_request("pay", "p1", endpoint="127.0.0.1:10"))
    assert again.instance.endpoint == "127.0.0.1:10"
    await stub.Register(register_request("cart", "c0"))

    # A slot freed by a deregistration can be taken.
    await stub.Deregister(registry_pb2.DeregisterRequest(service_name="pay", instance_id="p0"))
    await stub.Register(register_request("pay", "p3"))
    assert await _ids(stub, "pay") == {"p1", "p2", "p3"}


async def test_concurrent_registrations_never_overshoot_the_limit(
    start_plane: StartPlane, channels: Channels
) -> None:
    plane = await start_plane(max_instances_per_service=10)
    stub = registry_pb2_grpc.RegistryServiceStub(channels(_address(plane.port)))
    await stub.Register(register_request("pay", "p0"))  # one already there

    async def register_soon(request: registry_pb2.RegisterRequest, delay: float) -> Any:
        await asyncio.sleep(delay)
        return await stub.Register(request)

    rnd = random.Random(5)
    for wave in range(8):
        # 40 new instances, and the registered one again 10 times, spread over 60 ms:
        # checks run while other registrations are in flight, starting and ending.
        requests = [register_request("pay", f"n{wave}-{i}") for i in range(40)]
        requests += [register_request("pay", "p0")] * 10
        delays = [0.0 if wave == 0 else rnd.uniform(0, 0.06) for _ in requests]
        outcomes = await asyncio.gather(
            *(register_soon(r, d) for r, d in zip(requests, delays, strict=True)),
            return_exceptions=True,
        )

        refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)]
        assert all(o.code() is grpc.StatusCode.RESOURCE_EXHAUSTED for o in refused), refused
        accepted = [
            o.instance.instance_id
            for o in outcomes
            if isinstance(o, registry_pb2.RegisterResponse) and o.instance.instance_id != "p0"
        ]
        assert len(outcomes) - len(refused) - len(accepted) == 10, "p0 again: never refused"
        assert len(accepted) == 9, f"wave {wave}: exactly the 9 free slots were taken"
        assert await _ids(stub, "pay") == {"p0", *accepted}
        for instance_id in accepted:  # free the slots for the next wave
            await stub.Deregister(
                registry_pb2.DeregisterRequest(service_name="pay", instance_id=instance_id)
            )


# -- watch streams per client ---------------------------------------------------------


async def _open_watch(
    stub: registry_pb2_grpc.RegistryServiceStub,
) -> grpc.aio.UnaryStreamCall[Any, Any]:
    """A Watch stream whose first message (the snapshot) has arrived: it is counted."""
    call = stub.Watch(registry_pb2.WatchRequest())
    first = await call.read()
    assert isinstance(first, registry_pb2.WatchResponse)
    return call


async def _refused_watch(stub: registry_pb2_grpc.RegistryServiceStub) -> grpc.aio.AioRpcError:
    call = stub.Watch(registry_pb2.WatchRequest())
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await call.read()
    return refused.value


async def test_a_client_past_its_watch_limit_is_refused_and_slots_come_back(
    start_plane: StartPlane, channels: Channels
) -> None:
    plane = await start_plane(max_watchers_per_client=3)
    channel = channels(_address(plane.port))
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    runs = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
    watches = [await _open_watch(stub) for _ in range(3)]

    refused = await _refused_watch(stub)
    assert refused.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "already holds 3 open watch streams" in (refused.details() or "")
    assert "--max-watchers-per-client" in (refused.details() or "")
    error = from_rpc_error(refused)
    assert isinstance(error, ResourceExhausted)
    assert error.retry_after == pytest.approx(1.0), "RetryInfo tells when to try again"

    # WatchExecution counts against the same limit (refused before it looks for the
    # execution: NOT_FOUND once a slot is free).
    execution_watch = runs.WatchExecution(
        orchestrator_pb2.WatchExecutionRequest(execution_id="nope")
    )
    with pytest.raises(grpc.aio.AioRpcError) as also_refused:
        await execution_watch.read()
    assert also_refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

    # A cancelled stream gives its slot back.
    watches.pop().cancel()
    await eventually(lambda: _slot_free(plane.watchers, 2))
    watches.append(await _open_watch(stub))
    assert (await _refused_watch(stub)).code() is grpc.StatusCode.RESOURCE_EXHAUSTED

    # Streams that fail (bad request, unknown execution) hold no slot afterwards.
    watches.pop().cancel()
    await eventually(lambda: _slot_free(plane.watchers, 2))
    for _ in range(5):
        bad = stub.Watch(registry_pb2.WatchRequest(from_revision=-1))
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await bad.read()
        assert invalid.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        missing = runs.WatchExecution(orchestrator_pb2.WatchExecutionRequest(execution_id="nope"))
        with pytest.raises(grpc.aio.AioRpcError) as not_found:
            await missing.read()
        assert not_found.value.code() is grpc.StatusCode.NOT_FOUND
    assert plane.watchers.open_streams() == 2
    watches.append(await _open_watch(stub))

    # A stopping control plane ends every stream, and uncounts each.
    await plane.stop(0.2)
    for call in watches:
        await asyncio.wait_for(_drain(call), 5)  # each stream ended
    assert plane.watchers.open_streams() == 0


async def _drain(call: grpc.aio.UnaryStreamCall[Any, Any]) -> None:
    """Read a stream to its end, whatever its status."""
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError:
        pass


async def _slot_free(watchers: WatchLimit, expected: int) -> bool:
    return watchers.open_streams() == expected


async def test_watch_limit_is_per_client_and_a_dropped_connection_frees_its_slots(
    start_plane: StartPlane, channels: Channels
) -> None:
    plane = await start_plane(max_watchers_per_client=2)
    direct = registry_pb2_grpc.RegistryServiceStub(channels(_address(plane.port)))
    async with TcpProxy("127.0.0.1", plane.port, source_host="127.0.0.2") as proxy:
        other = registry_pb2_grpc.RegistryServiceStub(channels(proxy.address))
        mine = [await _open_watch(direct) for _ in range(2)]
        theirs = [await _open_watch(other) for _ in range(2)]  # another address
        assert (await _refused_watch(direct)).code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await _refused_watch(other)).code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert plane.watchers.open_streams("address:127.0.0.2") == 2

        # The network drops the other client's connection: the server notices the dead
        # transport and its streams stop counting; it can watch again once reconnected.
        assert proxy.cut() >= 1
        await eventually(lambda: _slot_free(plane.watchers, 2), within=10)
        assert plane.watchers.open_streams("address:127.0.0.2") == 0
        theirs = [await _open_watch(other) for _ in range(2)]
        for call in mine + theirs:
            call.cancel()


# -- a watcher too slow to keep up --------------------------------------------------


async def test_a_watcher_too_slow_to_keep_up_is_cut_off_with_a_resumable_status(
    tmp_path: Path,
) -> None:
    """Over real gRPC: a client that stops reading fills the transport, then its queue;
    the control plane ends the stream RESOURCE_EXHAUSTED (RetryInfo, the revision to
    resume from) instead of buffering without bound, and resuming misses nothing."""
    store = SqliteStore(tmp_path / "slow.db", synchronous="NORMAL")
    await store.open()
    registry = Registry(store, RegistrySettings(watch_max_pending=4))
    await registry.start()
    server = grpc.aio.server()
    add_registry_servicer(RegistryServicer(registry), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    # No window growth (BDP probing): the client's HTTP/2 window stays at 64 KiB, so the
    # server feels at once a reader that does not read.
    channel = grpc.aio.insecure_channel(_address(port), options=[("grpc.http2.bdp_probe", 0)])
    try:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        call = stub.Watch(registry_pb2.WatchRequest(service_names=["pay"]))
        snapshot = await call.read()
        assert isinstance(snapshot, registry_pb2.WatchResponse)
        count = 400
        for i in range(count):  # nobody reads meanwhile; ~7 KB per event
            bulky = instance("pay", f"i{i:03d}")
            bulky.metadata.update({f"k{k}": "x" * 200 for k in range(30)})
            await registry.register(bulky)
        # Now read: what was queued arrives, then the cut-off status.
        seen: list[str] = []
        cut: grpc.aio.AioRpcError | None = None
        while cut is None:
            try:
                message = await asyncio.wait_for(call.read(), 10)
            except grpc.aio.AioRpcError as exc:
                cut = exc
                break
            assert message is not grpc.aio.EOF, "the stream must be cut off, not end"
            seen += [e.instance.instance_id for e in message.events]
        assert cut.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        details = cut.details() or ""
        assert "fell more than 4 batches behind" in details
        error = from_rpc_error(cut)
        assert isinstance(error, ResourceExhausted)
        assert error.retry_after is not None
        resume_from = int(details.split("resume from revision ")[1].split()[0])

        resumed = stub.Watch(
            registry_pb2.WatchRequest(service_names=["pay"], from_revision=resume_from)
        )
        expected = count
        while len(seen) < expected:
            message = await asyncio.wait_for(resumed.read(), 10)
            assert isinstance(message, registry_pb2.WatchResponse)
            assert not message.HasField("snapshot"), "resumed from history, no resync"
            seen += [e.instance.instance_id for e in message.events]
        assert sorted(seen) == [f"i{i:03d}" for i in range(count)], "nothing lost or doubled"
        resumed.cancel()
    finally:
        await channel.close()
        await server.stop(0)
        await registry.stop()
        await store.close()
