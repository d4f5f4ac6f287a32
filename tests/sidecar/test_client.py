"""The mesh client against real sidecars and a real control plane."""

from __future__ import annotations

import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from flext_mesh.errors import InfrastructureError, InvalidArgument, NotFound
from flext_mesh.hosting.operations import QUICK_RUNS_TO_MOVE
from flext_mesh.server import ControlPlane, create_server
from sidecar.client import BreakersOpen, MeshClient, SyncMeshClient
from sidecar.config import SidecarConfig
from sidecar.main import Sidecar
from tests.conftest import start_serve
from tests.registry.conftest import eventually, fast_config
from tests.sidecar.test_sidecar_process import start_sidecar

APP = "tests.sidecar.apps:PROCESSORS"


@pytest.fixture
async def plane(tmp_path: Path) -> AsyncIterator[ControlPlane]:
    control, _ = await create_server(fast_config(tmp_path))
    try:
        yield control
    finally:
        await control.stop(0.2)


async def _sidecar(plane: ControlPlane, name: str, **settings: object) -> Sidecar:
    sidecar = Sidecar(
        SidecarConfig(
            service="payment",
            app=APP,
            control_plane=f"127.0.0.1:{plane.port}",
            instance_id=name,
            ttl=2.0,
            **settings,  # type: ignore[arg-type]
        )
    )
    await sidecar.start()
    return sidecar


async def _registered(client: MeshClient, count: int) -> None:
    assert await client.wait_for_instances("payment", count, within=10)


async def test_calls_are_balanced_over_instances_and_business_errors_are_not_retried(
    plane: ControlPlane,
) -> None:
    a = await _sidecar(plane, "a")
    b = await _sidecar(plane, "b")
    client = MeshClient(f"127.0.0.1:{plane.port}", caller_service="shop")
    try:
        await client.start()
        await _registered(client, 2)
        for i in range(40):
            result = await client.call(
                "payment", "charge", {"customer_id": "c", "amount": 1 + i}, correlation_id=f"k{i}"
            )
            assert result == {"charged": 1 + i, "correlation_id": f"k{i}"}
        served = {s.config.instance_id: s.reporter.stats().recorded for s in (a, b)}  # type: ignore[union-attr]
        assert served["a"] >= 10
        assert served["b"] >= 10
        before = sum(served.values())
        with pytest.raises(InvalidArgument, match="Amount must be positive"):
            await client.call("payment", "charge", {"customer_id": "c", "amount": -1})
        after = sum(s.reporter.stats().recorded for s in (a, b))  # type: ignore[union-attr]
        assert after == before + 1, "a business rejection is not retried"
        with pytest.raises(NotFound):
            await client.call("ledger", "post", {})
    finally:
        await client.aclose()
        await a.stop(0.5)
        await b.stop(0.5)


async def test_calls_keep_flowing_with_the_control_plane_down(tmp_path: Path) -> None:
    control, port = await create_server(fast_config(tmp_path))
    sidecar = await _sidecar(control, "a")
    client = MeshClient(f"127.0.0.1:{port}")
    try:
        await client.start()
        await _registered(client, 1)
        await control.stop(0)  # the control plane goes away
        for _ in range(10):
            result = await client.call("payment", "charge", {"customer_id": "c", "amount": 2})
            assert result["charged"] == 2
    finally:
        await client.aclose()
        await sidecar.stop(0.5)


def test_the_sync_client_for_synchronous_code(tmp_path: Path) -> None:
    plane = start_serve(tmp_path)
    sidecar = start_sidecar(tmp_path, plane.address)
    try:
        with SyncMeshClient(plane.address) as client:
            deadline = time.monotonic() + 10
            while not client.client.instances("payment"):
                assert time.monotonic() < deadline
                time.sleep(0.05)
            assert (
                client.call("payment", "charge", {"customer_id": "c", "amount": 3})["charged"] == 3
            )
    finally:
        sidecar.proc.send_signal(signal.SIGTERM)
        sidecar.proc.wait(15)
        plane.terminate()


async def test_kill_9_of_one_instance_loses_no_call(tmp_path: Path) -> None:
    plane = start_serve(tmp_path, "--health-check-interval", "0.5")
    first = start_sidecar(tmp_path, plane.address, "--instance-id", "first")
    second = start_sidecar(tmp_path, plane.address, "--instance-id", "second")
    client = MeshClient(plane.address)
    try:
        await client.start()
        await _registered(client, 2)
        failures = 0
        for i in range(60):
            if i == 20:
                first.proc.send_signal(signal.SIGKILL)  # a crash: no deregistration
            try:
                await client.call("payment", "charge", {"customer_id": "c", "amount": 1})
            except Exception:
                failures += 1
        assert failures == 0
        assert client.breaker_state("payment", "first") in {"OPEN", "HALF_OPEN"}

        async def gone() -> bool:
            return {i.instance_id for i in client.instances("payment")} == {"second"}

        await eventually(gone, within=2 + 3)  # TTL 2 s, plus sweep and watch delivery
    finally:
        await client.aclose()
        for sidecar in (first, second):
            if sidecar.proc.poll() is None:
                sidecar.proc.send_signal(signal.SIGTERM)
                sidecar.proc.wait(15)
        plane.terminate()


async def test_a_hosted_processor_calls_another_service_and_both_sides_report(
    plane: ControlPlane,
) -> None:
    payment = await _sidecar(plane, "pay")
    checkout = Sidecar(
        SidecarConfig(
            service="checkout",
            app="tests.sidecar.apps:CHECKOUT",
            control_plane=f"127.0.0.1:{plane.port}",
            instance_id="co",
        )
    )
    await checkout.start()
    client = MeshClient(f"127.0.0.1:{plane.port}")
    try:
        await client.start()
        assert await client.wait_for_instances("checkout")
        assert checkout.client is not None
        assert await checkout.client.wait_for_instances("payment")
        result = await client.call("checkout", "checkout", {"customer_id": "c", "amount": 9})
        assert result == {"paid": 9}
        stats = checkout.reporter.stats()  # type: ignore[union-attr]
        assert stats.recorded == 2, "one inbound checkout call and one outbound payment call"
    finally:
        await client.aclose()
        await checkout.stop(0.5)
        await payment.stop(0.5)


async def test_open_breakers_fail_fast_without_retrying(plane: ControlPlane) -> None:
    sidecar = await _sidecar(plane, "only")
    client = MeshClient(f"127.0.0.1:{plane.port}")
    try:
        await client.start()
        await _registered(client, 1)
        # The only instance stops answering while its lease is still renewed.
        await sidecar.server.stop(0)
        for _ in range(2):  # 3 attempts each: consecutive failures open the breaker
            with pytest.raises(InfrastructureError):
                await client.call("payment", "charge", {"customer_id": "c", "amount": 1})
        assert client.breaker_state("payment", "only") == "OPEN"
        started = time.monotonic()
        with pytest.raises(BreakersOpen):
            await client.call("payment", "charge", {"customer_id": "c", "amount": 1})
        assert time.monotonic() - started < 0.05, "no backoff, no retry: it fails fast"
    finally:
        await client.aclose()
        await sidecar.stop(0)


async def test_a_quick_sync_processor_moves_to_the_loop_only_when_allowed(
    plane: ControlPlane,
) -> None:
    moving = await _sidecar(plane, "a", quick_sync_on_loop=True)
    pooled = await _sidecar(plane, "b")
    client = MeshClient(f"127.0.0.1:{plane.port}", caller_service="shop")
    try:
        await client.start()
        await _registered(client, 2)
        placements = {}
        for sidecar in (moving, pooled):
            assert sidecar.processor is not None
            placements[sidecar.config.instance_id] = sidecar.processor._operations[
                "charge"
            ].placement
        # Balanced over the two; a busy machine may need more than 32 runs in a row.
        for i in range(40 * QUICK_RUNS_TO_MOVE):
            result = await client.call("payment", "charge", {"customer_id": "c", "amount": i + 1})
            assert result["charged"] == i + 1
            if i > 2 * QUICK_RUNS_TO_MOVE and placements["a"].on_loop:  # type: ignore[union-attr]
                break
        assert {name: p.on_loop for name, p in placements.items() if p} == {
            "a": True,
            "b": False,
        }
    finally:
        await client.aclose()
        await moving.stop(0.5)
        await pooled.stop(0.5)
