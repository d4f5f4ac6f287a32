"""Seeing the xDS clients: ListXdsClients, ``flext-mesh xds status`` and /metrics, against
a real control plane and raw ADS streams that ACK, NACK or never answer."""

from __future__ import annotations

import asyncio
import json
import re
import time
import urllib.request
from collections.abc import Callable

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from flext_mesh.rpc.status import from_rpc_error
from flext_mesh.server import ControlPlane
from flext_mesh.v1 import registry_pb2, registry_pb2_grpc
from flext_mesh.xds.resources import CDS, EDS, LDS, RDS
from flext_mesh.xds.status import STALE_AFTER
from tests.conftest import BIN
from tests.xds.test_ads_protocol import Ads, register

pytestmark = pytest.mark.timeout(40)
SYNCED = registry_pb2.XDS_SYNC_STATE_SYNCED
PENDING = registry_pb2.XDS_SYNC_STATE_PENDING
STALE = registry_pb2.XDS_SYNC_STATE_STALE
NACKED = registry_pb2.XDS_SYNC_STATE_NACKED
NOT_SENT = registry_pb2.XDS_SYNC_STATE_NOT_SENT
LOCALITY_ERROR = "endpoints[0].locality error:field not present"


async def list_clients(
    plane: ControlPlane, **request: object
) -> registry_pb2.ListXdsClientsResponse:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{plane.port}") as channel:
        stub = registry_pb2_grpc.RegistryServiceStub(channel)
        return await stub.ListXdsClients(registry_pb2.ListXdsClientsRequest(**request))  # type: ignore[arg-type]


async def until(
    plane: ControlPlane,
    done: Callable[[registry_pb2.ListXdsClientsResponse], bool],
    within: float = 3.0,
) -> registry_pb2.ListXdsClientsResponse:
    """ListXdsClients until ``done`` holds (the control plane applies requests async)."""
    deadline = time.monotonic() + within
    while True:
        listed = await list_clients(plane)
        if done(listed) or time.monotonic() > deadline:
            return listed
        await asyncio.sleep(0.05)


def by_node(listed: registry_pb2.ListXdsClientsResponse) -> dict[str, registry_pb2.XdsClient]:
    return {client.node_id: client for client in listed.clients}


async def walk(ads: Ads, service: str = "payment") -> None:
    """Subscribe to every type of ``service`` and ACK each response, as gRPC does."""
    for type_url in (LDS, RDS, CDS, EDS):
        ads.ask(type_url, service)
        await ads.read()
        ads.ask(type_url, service)  # ACK


async def cli(plane: ControlPlane, *args: str) -> str:
    """The real ``flext-mesh xds status`` (a subprocess: the control plane runs on this
    test's event loop, which must keep serving while the command waits)."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "flext-mesh"),
        "xds",
        "status",
        "--control-plane",
        f"127.0.0.1:{plane.port}",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    return out.decode()


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name.startswith("flext_mesh_xds_")
    }


async def test_a_synced_client_and_a_nacking_one_are_told_apart(
    control_plane: ControlPlane,
) -> None:
    address = f"127.0.0.1:{control_plane.port}"
    await register(control_plane, "pay-1", 7001, zone="z1")
    await register(control_plane, "ledger-1", 7101, service="ledger")
    good = Ads(address, "web-1", zone="z1")
    opened = [good]
    try:
        await walk(good)
        bad = Ads(address, "web-2", zone="z2")  # opened second: listed second
        opened.append(bad)
        bad.ask(EDS, "ledger")
        await bad.read()
        bad.ask(EDS, "ledger", error=LOCALITY_ERROR)  # NACK

        listed = await until(
            control_plane,
            lambda r: {c.node_id: c.state for c in r.clients} == {"web-1": SYNCED, "web-2": NACKED},
        )
        clients = by_node(listed)
        assert [c.node_id for c in listed.clients] == ["web-1", "web-2"]  # oldest first
        assert listed.stale_after.seconds == STALE_AFTER
        assert listed.registry_revision == control_plane.registry.cache.revision
        web1 = clients["web-1"]
        assert web1.zone == "z1"
        assert web1.peer.startswith("ipv")
        assert web1.connect_time.seconds > 0
        assert [t.type for t in web1.types] == ["LDS", "RDS", "CDS", "EDS"]
        assert all(t.state == SYNCED and t.version_acked == t.version_sent for t in web1.types)
        assert all(t.subscribed == ["payment"] and t.subscribed_count == 1 for t in web1.types)
        assert all(t.last_ack_time.seconds and t.last_send_time.seconds for t in web1.types)
        web2 = clients["web-2"]
        eds = web2.types[3]
        assert eds.state == NACKED
        assert eds.last_nack_error == LOCALITY_ERROR
        assert eds.nacks == 1
        assert eds.version_sent == "1"
        assert eds.version_acked == ""
        assert eds.last_nack_time.seconds > 0
        assert [t.state for t in web2.types[:3]] == [NOT_SENT] * 3

        # The operator's view: the real command, table and wide.
        table = await cli(control_plane)
        lines = table.splitlines()
        assert lines[0].split() == ["NODE", "ZONE", "LDS", "RDS", "CDS", "EDS", "STATE", "SINCE"]
        assert lines[1].startswith("web-1")
        assert lines[1].count("SYNCED v1") == 4
        assert lines[1].split()[-3] == "SYNCED"
        assert lines[1].endswith("s ago")  # SINCE: its last ACK
        assert lines[2].split()[:3] == ["web-2", "z2", "-"]
        assert "NACK v1" in lines[2]
        assert lines[2].split()[-2:] == ["NACKED", "-"]
        wide = await cli(control_plane, "-o", "wide")
        headers = wide.splitlines()[0].split()
        assert headers[-4:] == ["USER_AGENT", "PEER", "CONNECTED", "NACK_ERROR"]
        assert LOCALITY_ERROR in wide.splitlines()[2]
        document = json.loads(await cli(control_plane, "-o", "json"))
        assert [c["state"] for c in document] == ["XDS_SYNC_STATE_SYNCED", "XDS_SYNC_STATE_NACKED"]

        # A change reaches web-1 (an EDS push), which is timed; /metrics shows it all.
        await register(control_plane, "pay-2", 7002, zone="z1")
        pushed = await good.read()
        assert pushed.type_url == EDS
        good.ask(EDS, "payment")
        await until(control_plane, lambda r: by_node(r)["web-1"].types[3].version_acked == "2")
        metrics = await asyncio.to_thread(scrape, control_plane.http_port)
        assert metrics["flext_mesh_xds_clients", (("state", "SYNCED"),)] == 1
        assert metrics["flext_mesh_xds_clients", (("state", "NACKED"),)] == 1
        assert metrics["flext_mesh_xds_clients", (("state", "STALE"),)] == 0
        assert metrics["flext_mesh_xds_nacks_total", (("type", "EDS"),)] == 1
        assert metrics["flext_mesh_xds_nacks_total", (("type", "LDS"),)] == 0
        # web-1: one response per type, then the push; web-2: one EDS response.
        assert metrics["flext_mesh_xds_responses_total", (("type", "EDS"),)] == 3
        assert metrics["flext_mesh_xds_responses_total", (("type", "LDS"),)] == 1
        assert metrics["flext_mesh_xds_push_seconds_count", ()] >= 1
        # The push waited for the 50 ms coalescing, not for seconds.
        assert metrics["flext_mesh_xds_push_seconds_bucket", (("le", "0.025"),)] == 0
        assert metrics["flext_mesh_xds_push_seconds_bucket", (("le", "1.0"),)] >= 1
        assert not any(name.endswith("_created") for name, _ in metrics)
    finally:
        for ads in opened:
            await ads.close()


async def test_a_version_never_answered_turns_stale(control_plane: ControlPlane) -> None:
    await register(control_plane, "pay-1", 7001)
    silent = Ads(f"127.0.0.1:{control_plane.port}", "mute-1")
    try:
        silent.ask(CDS, "payment")
        await silent.read()  # and never ACKed
        listed = await until(control_plane, lambda r: len(r.clients) == 1)
        (client,) = listed.clients
        assert client.types[2].state == PENDING
        assert client.state == PENDING
        await asyncio.sleep(STALE_AFTER + 0.3)
        (client,) = (await list_clients(control_plane)).clients
        assert client.types[2].state == STALE
        assert client.state == STALE
        (row,) = (await cli(control_plane)).splitlines()[1:]
        assert re.search(r"STALE v1 \(sent [5-9]s ago\)", row), row  # the CLI takes a moment
        assert row.split()[-2:] == ["STALE", "-"]  # never ACKed anything
        metrics = await asyncio.to_thread(scrape, control_plane.http_port)
        assert metrics["flext_mesh_xds_clients", (("state", "STALE"),)] == 1
    finally:
        await silent.close()


async def test_pages_and_bad_input(control_plane: ControlPlane) -> None:
    await register(control_plane, "pay-1", 7001)
    streams: list[Ads] = []
    try:
        for i in range(3):  # one after the other: the list's order is the streams'
            ads = Ads(f"127.0.0.1:{control_plane.port}", f"node-{i}")
            streams.append(ads)
            ads.ask(LDS, "payment")
            await ads.read()
        await until(control_plane, lambda r: len(r.clients) == 3)
        first = await list_clients(control_plane, page_size=2)
        assert [c.node_id for c in first.clients] == ["node-0", "node-1"]
        assert first.next_page_token
        second = await list_clients(control_plane, page_size=2, page_token=first.next_page_token)
        assert [c.node_id for c in second.clients] == ["node-2"]
        assert second.next_page_token == ""

        # A closed stream leaves the list.
        await streams[1].close()
        listed = await until(control_plane, lambda r: len(r.clients) == 2)
        assert [c.node_id for c in listed.clients] == ["node-0", "node-2"]

        for request, field in (
            ({"page_size": 1001}, "page_size"),
            ({"page_token": "not-a-token"}, "page_token"),
        ):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await list_clients(control_plane, **request)
            assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
            error = from_rpc_error(refused.value)
            assert [v.field for v in error.violations] == [field]  # type: ignore[attr-defined]
    finally:
        for ads in streams:
            await ads.close()
