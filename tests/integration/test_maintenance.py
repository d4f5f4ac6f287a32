"""Draining an instance with real processes: ``flext-mesh serve``, two ``flext-sidecar``s
of one service, a mesh client calling them, and the operator's ``flext-mesh services
drain`` / ``undrain``; then a ``kill -9`` of the control plane."""

from __future__ import annotations

import asyncio
import signal
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from flext_mesh.errors import Unavailable
from sidecar.client import MeshClient
from tests.conftest import ServeProcess, start_serve
from tests.integration.test_cli_services import cli, rows_by_first_cell
from tests.registry.conftest import eventually
from tests.sidecar.test_sidecar_process import SidecarProcess, start_sidecar

APP = "tests.sidecar.apps:WHOAMI"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def _served_by(client: MeshClient, calls: int) -> Counter[int]:
    """Which sidecar process answered each of ``calls`` calls, counted."""
    pids: Counter[int] = Counter()
    for _ in range(calls):
        reply = await client.call("payment", "whoami", {"seconds": 0}, timeout=5)
        pids[reply["pid"]] += 1
    return pids


def _drained_in_client(client: MeshClient, instance_id: str, drained: bool = True) -> Any:
    """A check for :func:`eventually`: the client's cache shows the instance (un)drained."""

    async def check() -> bool:
        found = [i for i in client.instances("payment") if i.instance_id == instance_id]
        return bool(found) and found[0].maintenance == drained

    return check


async def test_a_drained_instance_gets_no_new_calls_finishes_its_own_and_stays_drained(
    tmp_path: Path,
) -> None:
    listen = f"127.0.0.1:{_free_port()}"
    store = f"sqlite:///{tmp_path / 'mesh.db'}"
    serve: ServeProcess = start_serve(tmp_path, "--listen", listen, "--store", store)
    sidecars: list[SidecarProcess] = []
    client = MeshClient(listen, caller_service="shop")
    try:
        for name in ("pay-a", "pay-b"):
            sidecars.append(start_sidecar(tmp_path, listen, "--instance-id", name, app=APP))
        a, b = sidecars
        await client.start()
        assert await client.wait_for_instances("payment", 2, within=15)
        assert set(await _served_by(client, 20)) == {a.proc.pid, b.proc.pid}

        # Slow calls on both instances, then the drain while they run.
        slow = [
            asyncio.create_task(
                client.call("payment", "whoami", {"seconds": 2.0}, timeout=10),
            )
            for _ in range(4)
        ]
        await asyncio.sleep(0.5)
        drained = await asyncio.to_thread(
            cli,
            "services",
            "drain",
            "payment",
            "pay-a",
            "--reason",
            "kernel upgrade",
            "--control-plane",
            listen,
        )
        assert drained.returncode == 0, drained.stderr
        assert drained.stdout.startswith(
            "payment/pay-a drained (kernel upgrade): no new calls; calls in flight finish"
        )
        # The client hears of it over its Watch stream; from then on only pay-b serves.
        await eventually(_drained_in_client(client, "pay-a"), within=5)
        assert await _served_by(client, 30) == Counter({b.proc.pid: 30})
        # The calls that were running on pay-a when it was drained finished there.
        finished = await asyncio.gather(*slow)
        assert {reply["pid"] for reply in finished} == {a.proc.pid, b.proc.pid}

        # Still registered and renewing, shown drained to the operator.
        listed = await asyncio.to_thread(cli, "services", "list", "--control-plane", listen)
        row = rows_by_first_cell(listed.stdout)["payment"]
        assert row[1:6] == ["2", "1", "0", "0", "1"], listed.stdout  # 2 instances, 1 drained
        shown = await asyncio.to_thread(
            cli, "services", "show", "payment", "--control-plane", listen
        )
        rows = rows_by_first_cell(shown.stdout)
        assert rows["pay-a"][4].endswith(", DRAINED")  # after its health: SERVING or UNKNOWN
        assert "DRAINED" not in rows["pay-b"][4]
        explained = await asyncio.to_thread(
            cli, "services", "explain", "payment", "pay-a", "--control-plane", listen
        )
        assert "maintenance:    x0 (drained: kernel upgrade)" in explained.stdout
        assert "effective:      0.0" in explained.stdout

        # kill -9 of the control plane; it comes back on the same store and port.
        serve.kill()
        serve = start_serve(tmp_path, "--listen", listen, "--store", store)
        shown = await asyncio.to_thread(
            cli, "services", "show", "payment", "--control-plane", listen, "-o", "json"
        )
        assert shown.returncode == 0, shown.stderr
        assert '"maintenance": true' in shown.stdout
        assert '"maintenance_reason": "kernel upgrade"' in shown.stdout
        assert await _served_by(client, 20) == Counter({b.proc.pid: 20})

        # Undrain: pay-a gets calls again.
        undrained = await asyncio.to_thread(
            cli, "services", "undrain", "payment", "pay-a", "--control-plane", listen
        )
        assert undrained.returncode == 0, undrained.stderr
        assert undrained.stdout.startswith("payment/pay-a undrained: it gets calls again")
        await eventually(_drained_in_client(client, "pay-a", drained=False), within=5)
        assert set(await _served_by(client, 20)) == {a.proc.pid, b.proc.pid}

        # An unknown instance and a bad service name, as the operator sees them.
        unknown = await asyncio.to_thread(
            cli, "services", "drain", "payment", "pay-z", "--control-plane", listen
        )
        assert unknown.returncode != 0
        assert "pay-z" in unknown.stderr
        assert "not registered" in unknown.stderr
        bad = await asyncio.to_thread(
            cli, "services", "drain", "", "pay-a", "--control-plane", listen
        )
        assert bad.returncode != 0
        assert "service_name: is required" in bad.stderr
    finally:
        await client.aclose()
        for sidecar in sidecars:
            if sidecar.proc.poll() is None:
                sidecar.proc.send_signal(signal.SIGTERM)
        for sidecar in sidecars:
            sidecar.proc.wait(15)
        if serve.proc.poll() is None:
            serve.kill()


async def test_every_instance_drained_is_a_clear_unavailable(tmp_path: Path) -> None:
    """The mesh client never falls back to a drained instance, even when all are."""
    serve = start_serve(tmp_path)
    sidecar = start_sidecar(tmp_path, serve.address, "--instance-id", "pay-a", app=APP)
    client = MeshClient(serve.address, caller_service="shop")
    try:
        await client.start()
        assert await client.wait_for_instances("payment", 1, within=15)
        await client.call("payment", "whoami", {}, timeout=5)
        drained = await asyncio.to_thread(
            cli, "services", "drain", "payment", "pay-a", "--control-plane", serve.address
        )
        assert drained.returncode == 0, drained.stderr
        await eventually(_drained_in_client(client, "pay-a"), within=5)
        with pytest.raises(Unavailable, match="every instance of 'payment' is in maintenance"):
            await client.call("payment", "whoami", {}, timeout=1)
    finally:
        await client.aclose()
        sidecar.proc.send_signal(signal.SIGTERM)
        sidecar.proc.wait(15)
        serve.kill()
