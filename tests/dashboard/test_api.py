"""The dashboard's JSON API and event streams against a real in-process control plane.

Requests go over loopback HTTP to the control plane's own HTTP port (the one serving
``/metrics``); what they answer is compared with what the gRPC API answers for the
same thing, since the JSON API promises the gRPC contracts' documents.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from google.protobuf import json_format, timestamp_pb2

from flext_mesh.dashboard import Dashboard, DashboardSettings, bearer_token
from flext_mesh.dashboard.web import WebServer
from flext_mesh.errors import PermissionDenied
from flext_mesh.server import create_server
from flext_mesh.v1 import (
    metrics_pb2,
    metrics_pb2_grpc,
    orchestrator_pb2,
    registry_pb2,
)
from flext_mesh.xds.resources import EDS
from tests.dashboard.conftest import EventStream, Flow, get, get_json
from tests.registry.conftest import eventually, fast_config
from tests.xds.test_ads_protocol import Ads

pytestmark = pytest.mark.timeout(60)

TTL_ONLY = registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY
SLOW_ORDER = {
    "name": "order",
    "description": "charge, then reserve (slowly)",
    "steps": [
        {"name": "charge", "service": "payment"},
        {
            "name": "reserve",
            "service": "inventory",
            "depends_on": ["charge"],
            "compensation": {"operation": "release"},
        },
    ],
}


def proto_json(message: Any) -> dict[str, Any]:
    """The proto3 JSON mapping with proto field names, as the API promises."""
    return json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )


def base(flow: Flow) -> str:
    return f"http://127.0.0.1:{flow.plane.http_port}"


async def register(flow: Flow, service: str, instance_id: str, **fields: Any) -> None:
    request = registry_pb2.RegisterRequest(
        instance=registry_pb2.ServiceInstance(
            service_name=service,
            instance_id=instance_id,
            endpoint="127.0.0.1:9",
            health_check_mode=TTL_ONLY,
            **fields,
        )
    )
    request.ttl.FromSeconds(60)
    await flow.registry.Register(request)


async def report_calls(flow: Flow) -> None:
    """120 calls of payment through MetricsService.ReportCalls: 100 charges of 10-19 ms
    (all fine) and 20 refunds of 200 ms, 5 of them UNAVAILABLE."""
    now = time.time_ns()
    records = [
        metrics_pb2.CallRecord(
            service_name="payment",
            operation="charge",
            instance_id="pay-1",
            duration_ms=10 + i % 10,
            success=True,
            time_unix_nano=now - (i % 20) * 1_000_000_000,
        )
        for i in range(100)
    ] + [
        metrics_pb2.CallRecord(
            service_name="payment",
            operation="refund",
            instance_id="pay-1",
            duration_ms=200,
            success=i >= 5,
            status_code=14 if i < 5 else 0,
            time_unix_nano=now,
        )
        for i in range(20)
    ]
    stub = metrics_pb2_grpc.MetricsServiceStub(flow.channel)
    reply = await stub.ReportCalls(metrics_pb2.ReportCallsRequest(records=records))
    assert reply.accepted == 120


@pytest.fixture
async def sidecar_like(flow: Flow) -> Flow:
    """Step servers for SLOW_ORDER, and the workflow stored."""
    await flow.serve("payment", "charge", "refund")
    await flow.serve("inventory", "reserve", "release")
    await flow.put(SLOW_ORDER)
    return flow


# -- documents -------------------------------------------------------------------------


async def test_services_are_the_grpc_documents_with_every_instance(flow: Flow) -> None:
    await register(flow, "payment", "pay-1", version="1.0", zone="a", weight=50)
    await register(flow, "payment", "pay-2", version="2.0", zone="b")
    await register(flow, "inventory", "inv-1")

    status, listed = await get_json(f"{base(flow)}/api/v1/services")
    assert status == 200
    grpc_listed = await flow.registry.ListServices(registry_pb2.ListServicesRequest())
    assert listed == proto_json(grpc_listed)
    assert [s["service_name"] for s in listed["services"]] == ["inventory", "payment"]

    status, shown = await get_json(f"{base(flow)}/api/v1/services/payment")
    assert status == 200
    assert shown["service_name"] == "payment"
    by_id = {i["instance_id"]: i for i in shown["instances"]}
    assert set(by_id) == {"pay-1", "pay-2"}
    discovered = await flow.registry.Discover(
        registry_pb2.DiscoverRequest(service_name="payment", healthy_only=False)
    )
    for instance in discovered.instances:
        assert by_id[instance.instance_id] == proto_json(instance)
    first = by_id["pay-1"]
    assert (first["health"], first["weight"], first["zone"]) == ("HEALTH_STATUS_SERVING", 50, "a")
    assert {"effective_weight", "response_time_ms", "uptime_percentage", "ejected"} <= set(first)
    assert shown["policy"] is None
    assert int(shown["revision"]) >= 3


async def test_workflows_and_executions_are_the_grpc_documents(sidecar_like: Flow) -> None:
    flow = sidecar_like
    started = await flow.start("order", {"key": "k1"})
    await flow.wait(started.execution_id)
    await flow.start("order", {"key": "k2", "behaviour": {"reserve": {"sleep": 5}}})

    status, listed = await get_json(f"{base(flow)}/api/v1/workflows")
    assert status == 200
    assert [w["name"] for w in listed["workflows"]] == ["order"]
    status, shown = await get_json(f"{base(flow)}/api/v1/workflows/order")
    grpc_shown = await flow.stub.GetWorkflow(orchestrator_pb2.GetWorkflowRequest(name="order"))
    assert (status, shown) == (200, proto_json(grpc_shown))
    assert shown["workflow"]["steps"][1]["depends_on"] == ["charge"]

    _, executions = await get_json(f"{base(flow)}/api/v1/executions?workflow=order")
    assert len(executions["executions"]) == 2
    _, running = await get_json(f"{base(flow)}/api/v1/executions?state=running")
    _, succeeded = await get_json(f"{base(flow)}/api/v1/executions?state=EXECUTION_STATE_SUCCEEDED")
    assert [x["execution_id"] for x in succeeded["executions"]] == [started.execution_id]
    assert len(running["executions"]) == 1
    assert running["executions"][0]["state"] == "EXECUTION_STATE_RUNNING"

    url = f"{base(flow)}/api/v1/executions/{started.execution_id}?include_events=true"
    status, one = await get_json(url)
    grpc_one = await flow.get(started.execution_id, events=True)
    assert (status, one) == (200, proto_json(grpc_one))
    assert one["execution"]["state"] == "EXECUTION_STATE_SUCCEEDED"
    assert [e["type"] for e in one["events"]][-1] == "EXECUTION_EVENT_TYPE_EXECUTION_ENDED"
    _, without = await get_json(f"{base(flow)}/api/v1/executions/{started.execution_id}")
    assert without["events"] == []

    # The workflow's own metrics, under its metrics name workflow/order.
    url = f"{base(flow)}/api/v1/services/workflow%2Forder"
    deadline = time.monotonic() + 15
    while (await get_json(f"{url}/report?window=1h"))[0] != 200:
        assert time.monotonic() < deadline, "the workflow's durations never reached metrics"
        await asyncio.sleep(0.2)
    _, report = await get_json(f"{url}/report?window=1h")
    assert report["report"]["service_name"] == "workflow/order"
    status, series = await get_json(f"{url}/series?window=300")
    assert status == 200, series
    assert series["service_name"] == "workflow/order"


async def test_report_and_series_show_the_reported_calls(flow: Flow) -> None:
    await report_calls(flow)
    url = f"{base(flow)}/api/v1/services/payment"
    status, report = await get_json(f"{url}/report?window=5m")
    assert status == 200
    summary = report["report"]["summary"]
    assert (summary["total_calls"], summary["failed_calls"]) == ("120", "5")
    grpc_report = await metrics_pb2_grpc.MetricsServiceStub(flow.channel).GetServiceReport(
        metrics_pb2.GetServiceReportRequest(service_name="payment", window={"seconds": 300})
    )
    expected = proto_json(grpc_report.report)
    for document in (report["report"], expected):
        document.pop("generate_time")
        document.pop("window_start")
        # The calls are seconds old: their rate is over the seconds since, asked twice.
        for stats in (document["summary"], *document["operations"]):
            for field in ("observed", "throughput_per_second", "throughput_per_hour"):
                stats.pop(field)
    assert report["report"] == expected
    assert {"health_score", "grade"} <= set(summary)

    status, series = await get_json(f"{url}/series?window=300")
    assert status == 200
    assert series["window"] == "300s"
    assert len(series["time"]) == len(series["width"]) >= 2
    assert series["time"] == sorted(series["time"])
    by_operation = {o["operation"]: o for o in series["operations"]}
    assert list(by_operation) == ["", "charge", "refund"]
    assert sum(by_operation[""]["calls"]) == 120
    assert sum(by_operation["charge"]["calls"]) == 100
    charge = [p for p in by_operation["charge"]["p50_ms"] if p is not None]
    assert charge
    assert all(9.9 <= p <= 19.2 for p in charge)
    refund = by_operation["refund"]
    [(calls, rate, p99)] = [
        (c, r, p)
        for c, r, p in zip(refund["calls"], refund["error_rate"], refund["p99_ms"], strict=True)
        if c
    ]
    assert (calls, rate, refund["infrastructure_error_rate"][-1]) == (20, 0.25, 0.25)
    assert p99 == pytest.approx(200, rel=0.01)
    # Buckets without calls are gaps, not zeros.
    assert all(p is None for c, p in zip(refund["calls"], refund["p50_ms"], strict=True) if not c)

    _, only = await get_json(f"{url}/series?window=5m&operation=refund")
    assert [o["operation"] for o in only["operations"]] == ["refund"]


#: (path under /api/v1, HTTP status, gRPC status name) of requests a user may get wrong.
BAD_REQUESTS = [
    ("/xds?page_size=1001", 400, "INVALID_ARGUMENT"),
    ("/xds?page_token=not-a-token", 400, "INVALID_ARGUMENT"),
    ("/services/nope", 404, "NOT_FOUND"),
    ("/services/no%20way", 400, "INVALID_ARGUMENT"),
    ("/services/payment/report?window=soon", 400, "INVALID_ARGUMENT"),
    ("/services/payment/report?window=5s", 400, "INVALID_ARGUMENT"),
    ("/services/payment/report?window=-5m", 400, "INVALID_ARGUMENT"),
    ("/services/payment/series?window=400h", 400, "INVALID_ARGUMENT"),
    ("/services/payment/series?window=1h&operation=nope", 404, "NOT_FOUND"),
    ("/services/nope/report?window=1h", 404, "NOT_FOUND"),
    ("/services/nope/series", 404, "NOT_FOUND"),
    ("/services/nope/explain", 404, "NOT_FOUND"),
    ("/services/no%20way/explain", 400, "INVALID_ARGUMENT"),
    ("/services/payment/report?by_version=maybe", 400, "INVALID_ARGUMENT"),
    ("/services?page_size=lots", 400, "INVALID_ARGUMENT"),
    ("/services?page_size=5000", 400, "INVALID_ARGUMENT"),
    ("/services?page_token=x", 400, "INVALID_ARGUMENT"),
    ("/alerts?min_severity=loud", 400, "INVALID_ARGUMENT"),
    ("/workflows/nope", 404, "NOT_FOUND"),
    ("/workflows/order?version=x", 400, "INVALID_ARGUMENT"),
    ("/executions?state=sleeping", 400, "INVALID_ARGUMENT"),
    ("/executions/nope", 404, "NOT_FOUND"),
    ("/events/executions/nope", 404, "NOT_FOUND"),
    ("/events/registry?services=bad%20name", 400, "INVALID_ARGUMENT"),
    ("/events/registry?from_revision=-1", 400, "INVALID_ARGUMENT"),
    ("/nope", 404, "NOT_FOUND"),
    ("/services/payment/nope", 404, "NOT_FOUND"),
]


async def test_explain_and_status_answer_what_the_cli_shows(flow: Flow) -> None:
    """/services/NAME/explain is Discover's explanations; /status is `flext-mesh
    status`'s table: a registration that never said what it applied is "-"."""
    await register(flow, "payment", "pay-1", weight=50)
    await register(flow, "payment", "pay-2")
    status, explained = await get_json(f"{base(flow)}/api/v1/services/payment/explain")
    assert status == 200
    grpc_answer = await flow.registry.Discover(
        registry_pb2.DiscoverRequest(service_name="payment", explain=True)
    )
    assert explained["explanations"] == [proto_json(e) for e in grpc_answer.explanations]
    by_id = {e["instance_id"]: e for e in explained["explanations"]}
    assert by_id["pay-1"]["base_weight"] == 50
    assert by_id["pay-1"]["in_answer"] is True

    status, table = await get_json(f"{base(flow)}/api/v1/status")
    assert status == 200
    assert int(table["revision"]) >= 2
    assert table["stale_after_seconds"] == 30.0
    assert [(r["instance_id"], r["state"]) for r in table["instances"]] == [
        ("pay-1", "-"),
        ("pay-2", "-"),
    ]


async def test_xds_clients_are_the_list_xds_clients_document(flow: Flow) -> None:
    """/xds answers what ListXdsClients answers (`flext-mesh xds status`)."""
    await register(flow, "payment", "pay-1")
    ads = Ads(f"127.0.0.1:{flow.plane.port}", "web-1", zone="z1")
    try:
        ads.ask(EDS, "payment")
        await ads.read()
        ads.ask(EDS, "payment")  # ACK

        async def synced() -> bool:
            status, found = await get_json(f"{base(flow)}/api/v1/xds")
            assert status == 200
            return [c["state"] for c in found["clients"]] == ["XDS_SYNC_STATE_SYNCED"]

        await eventually(synced, within=3)
        _, document = await get_json(f"{base(flow)}/api/v1/xds")
        grpc_answer = await flow.registry.ListXdsClients(registry_pb2.ListXdsClientsRequest())
        assert document == proto_json(grpc_answer)
        (client,) = document["clients"]
        assert client["node_id"] == "web-1"
        assert client["types"][3]["type"] == "EDS"
        assert client["types"][3]["version_acked"] == "1"
        assert document["stale_after"] == "5s"
    finally:
        await ads.close()


async def test_removed_instances_are_remembered_until_registered_again(flow: Flow) -> None:
    """A page opened after an instance went still shows it, with why and when."""
    await register(flow, "payment", "pay-1")
    await register(flow, "payment", "pay-2")
    before = time.time()
    await flow.registry.Deregister(
        registry_pb2.DeregisterRequest(service_name="payment", instance_id="pay-2")
    )
    status, document = await get_json(f"{base(flow)}/api/v1/removed")
    assert status == 200
    assert document["kept_seconds"] == 300.0
    [gone] = document["removed"]
    assert gone["instance"]["instance_id"] == "pay-2"
    assert gone["removal_reason"] == "REMOVAL_REASON_DEREGISTERED"
    removed_at = json_format.Parse(f'"{gone["removed_time"]}"', timestamp_pb2.Timestamp())
    assert before - 1 <= removed_at.ToNanoseconds() / 1e9 <= time.time() + 1
    # Forgotten after five minutes.
    assert flow.plane.registry.recently_removed(now=time.time() + 301) == []

    await register(flow, "payment", "pay-2")  # back: no longer shown as removed
    status, document = await get_json(f"{base(flow)}/api/v1/removed")
    assert document["removed"] == []


async def test_bad_input_is_a_json_error_never_a_500(flow: Flow) -> None:
    await report_calls(flow)
    for path, status, code in BAD_REQUESTS:
        got, document = await get_json(f"{base(flow)}/api/v1{path}")
        assert (got, document["error"]["status"]) == (status, code), (path, document)
        assert document["error"]["code"] == status
        assert document["error"]["message"]
        if code == "INVALID_ARGUMENT":
            assert document["error"]["field_violations"][0]["field"], path


async def test_the_page_and_its_files_are_served_with_etags(flow: Flow) -> None:
    status, headers, _ = await get(f"{base(flow)}/")
    assert (status, headers["location"]) == (302, "/dashboard/")
    status, headers, page = await get(f"{base(flow)}/dashboard/")
    assert (status, headers["content-type"]) == (200, "text/html; charset=utf-8")
    assert b'src="app.js"' in page
    assert b"vendor/uPlot.iife.min.js" in page
    assert "frame-ancestors 'none'" in headers["content-security-policy"]
    status, headers, script = await get(f"{base(flow)}/dashboard/vendor/uPlot.iife.min.js")
    assert (status, headers["content-type"]) == (200, "text/javascript; charset=utf-8")
    assert b"uPlot" in script
    status, again, body = await get(
        f"{base(flow)}/dashboard/vendor/uPlot.iife.min.js",
        {"If-None-Match": headers["etag"]},
    )
    assert (status, body, again["etag"]) == (304, b"", headers["etag"])
    assert (await get(f"{base(flow)}/dashboard/app.css"))[0] == 200
    assert (await get(f"{base(flow)}/dashboard/vendor/uPlot.LICENSE"))[0] == 404
    status, headers, body = await get(f"{base(flow)}/dashboard/app.js", method="HEAD")
    assert (status, body) == (200, b"")
    assert int(headers["content-length"]) > 1000


# -- streams ---------------------------------------------------------------------------


async def test_registry_stream_sends_a_snapshot_then_changes_and_resumes(flow: Flow) -> None:
    await register(flow, "payment", "pay-1")
    stream = await EventStream.open(flow.plane.http_port, "/api/v1/events/registry")
    try:
        assert (stream.status, stream.headers["content-type"]) == (200, "text/event-stream")
        snapshot = await stream.until("snapshot")
        assert [i["instance_id"] for i in snapshot.data["snapshot"]["instances"]] == ["pay-1"]
        assert snapshot.id == snapshot.data["revision"]

        await register(flow, "payment", "pay-2")
        added = await stream.until("change")
        [event] = added.data["events"]
        assert (event["type"], event["instance"]["instance_id"]) == (
            "WATCH_EVENT_TYPE_ADDED",
            "pay-2",
        )
        assert int(added.id or 0) > int(snapshot.id or 0)
        await flow.registry.Deregister(
            registry_pb2.DeregisterRequest(service_name="payment", instance_id="pay-2")
        )
        removed = await stream.until("change")
        assert removed.data["events"][0]["type"] == "WATCH_EVENT_TYPE_REMOVED"
    finally:
        stream.close()

    # A browser reconnecting sends the last id it saw: it gets what it missed, in order.
    resumed = await EventStream.open(
        flow.plane.http_port,
        "/api/v1/events/registry?services=payment",
        {"Last-Event-ID": str(snapshot.id)},
    )
    try:
        types = []
        while len(types) < 2:
            change = await resumed.until("change")
            types += [e["type"].removeprefix("WATCH_EVENT_TYPE_") for e in change.data["events"]]
        assert types == ["ADDED", "REMOVED"]
    finally:
        resumed.close()


async def test_execution_stream_follows_the_steps_then_ends(sidecar_like: Flow) -> None:
    flow = sidecar_like
    started = await flow.start("order", {"key": "s1", "behaviour": {"reserve": {"sleep": 0.5}}})
    path = f"/api/v1/events/executions/{started.execution_id}"
    stream = await EventStream.open(flow.plane.http_port, path)
    seen: list[str] = []
    try:
        while True:
            event = await stream.next(within=10)
            assert event is not None, "the stream ended without an end event"
            if event.name == "end":
                break
            assert event.name == "event"
            assert event.id == event.data["index"]
            seen.append(f"{event.data['type'].removeprefix('EXECUTION_EVENT_TYPE_')}")
        assert event.data["state"] == "EXECUTION_STATE_SUCCEEDED"
        assert [s["state"] for s in event.data["steps"]] == ["STEP_STATE_SUCCEEDED"] * 2
        assert await stream.next() is None  # the server closed the stream after "end"
    finally:
        stream.close()
    assert seen[-1] == "EXECUTION_ENDED"
    assert seen.index("STEP_STARTED") < seen.index("STEP_SUCCEEDED")

    # Resuming after index 3 replays only the later events.
    again = await EventStream.open(flow.plane.http_port, path, {"Last-Event-ID": "3"})
    try:
        first = await again.until("event")
        assert first.id == "4"
        await again.until("end")
    finally:
        again.close()


async def test_a_stream_that_cannot_go_on_says_why_then_closes(sidecar_like: Flow) -> None:
    flow = sidecar_like
    started = await flow.start("order", {"key": "s2", "behaviour": {"reserve": {"sleep": 5}}})
    path = f"/api/v1/events/executions/{started.execution_id}"
    stream = await EventStream.open(flow.plane.http_port, path)
    try:
        await stream.until("event")
        flow.plane.orchestrator.close_watches()  # as on shutdown: watchers must go again
        failure = await stream.until("stream_error")
        assert failure.data["error"]["status"] == "UNAVAILABLE"
        assert "after_index" in failure.data["error"]["message"]
        assert await stream.next() is None
    finally:
        stream.close()


# -- a dashboard of its own: authorization, heartbeats, shutdown -------------------------


@pytest.fixture
async def guarded(flow: Flow) -> AsyncIterator[WebServer]:
    """A dashboard whose authorize lets only the token "good" read, with fast heartbeats."""

    def authorize(request: web.Request) -> bool | str:
        token = bearer_token(request)
        if token is None:
            return False
        return token == "good" or "this token lacks the read scope"

    plane = flow.plane
    dashboard = Dashboard(
        plane.registry,
        plane.metrics,
        plane.orchestrator,
        authorize=authorize,
        settings=DashboardSettings(heartbeat_interval=0.2),
    )
    http = WebServer("127.0.0.1", 0, dashboard.routes())
    await http.start()
    try:
        yield http
    finally:
        await http.stop()


async def test_authorize_hook_guards_the_api_and_streams_not_the_page(
    flow: Flow, guarded: WebServer
) -> None:
    url = f"http://127.0.0.1:{guarded.port}"
    status, headers, _ = await get(f"{url}/api/v1/services")
    assert (status, headers["www-authenticate"]) == (401, 'Bearer realm="flext-mesh"')
    status, document = await get_json(f"{url}/api/v1/services")
    assert (status, document["error"]["status"]) == (401, "UNAUTHENTICATED")
    status, document = await get_json(f"{url}/api/v1/services", {"Authorization": "Bearer bad"})
    assert (status, document["error"]) == (
        403,
        {"code": 403, "status": "PERMISSION_DENIED", "message": "this token lacks the read scope"},
    )
    assert (await get_json(f"{url}/api/v1/services", {"Authorization": "Bearer good"}))[0] == 200
    # A browser: the token form's cookie, among others.
    cookie = {"Cookie": "theme=dark; flext_mesh_token=good"}
    assert (await get_json(f"{url}/api/v1/services", cookie))[0] == 200
    refused = await EventStream.open(guarded.port, "/api/v1/events/registry")
    assert refused.status == 401
    refused.close()
    stream = await EventStream.open(guarded.port, "/api/v1/events/registry", cookie)
    assert stream.status == 200
    assert (await stream.until("snapshot")).data["snapshot"] == {
        "instances": [],
        "policies": [],
        "resync": False,
    }
    stream.close()
    assert (await get(f"{url}/dashboard/"))[0] == 200  # the page asks for the token itself


async def test_async_authorize_and_its_errors_map_to_http(flow: Flow) -> None:
    async def authorize(request: web.Request) -> bool:
        await asyncio.sleep(0)
        if request.query.get("who") == "mallory":
            raise PermissionDenied("mallory may not read")
        return True

    dashboard = Dashboard(
        flow.plane.registry, flow.plane.metrics, flow.plane.orchestrator, authorize=authorize
    )
    async with WebServer("127.0.0.1", 0, dashboard.routes()) as http:
        url = f"http://127.0.0.1:{http.port}/api/v1/workflows"
        assert (await get_json(url))[0] == 200
        status, document = await get_json(f"{url}?who=mallory")
        assert (status, document["error"]["message"]) == (403, "mallory may not read")


async def test_streams_send_heartbeats_and_free_their_watch_when_the_client_leaves(
    flow: Flow, guarded: WebServer
) -> None:
    hub = flow.plane.registry.hub
    before = len(hub)
    cookie = {"Cookie": "flext_mesh_token=good"}
    stream = await EventStream.open(guarded.port, "/api/v1/events/registry", cookie)
    await stream.until("snapshot")
    assert len(hub) == before + 1
    beat = await stream.next(within=2, comments=True)
    assert beat is not None
    assert (beat.name, beat.data) == ("comment", "keep-alive")
    stream.close()

    async def freed() -> bool:
        return len(hub) == before

    await eventually(freed, within=3)


async def test_open_streams_end_when_the_control_plane_stops(tmp_path: Path) -> None:
    plane, _ = await create_server(fast_config(tmp_path))
    try:
        stream = await EventStream.open(plane.http_port, "/api/v1/events/registry")
        await stream.until("snapshot")
        started = time.monotonic()
    finally:
        await asyncio.wait_for(plane.stop(0.2), 10)
    assert time.monotonic() - started < 5  # the open stream did not hold the stop up

    # The stream ended with its last chunk (an EventSource reconnects), then the
    # connection closed.
    while await stream.next(within=5) is not None:
        pass
    assert await asyncio.wait_for(stream.reader.read(), 5) == b""
    stream.close()


async def test_many_open_streams_each_get_every_change(flow: Flow) -> None:
    streams = [
        await EventStream.open(flow.plane.http_port, "/api/v1/events/registry") for _ in range(5)
    ]
    try:
        for stream in streams:
            await stream.until("snapshot")
        started = time.monotonic()
        for i in range(20):
            await register(flow, "payment", f"pay-{i}")
        assert time.monotonic() - started < 5
        for stream in streams:
            count = 0
            while count < 20:
                change = await stream.until("change")
                count += len(change.data["events"])
            assert count == 20
    finally:
        for stream in streams:
            stream.close()
