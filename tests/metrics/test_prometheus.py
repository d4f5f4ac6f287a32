"""/metrics on the control plane's HTTP port, scraped for real and parsed by Prometheus'
parser, and the RPC interceptor on a real grpc.aio server."""

from __future__ import annotations

import asyncio
import gzip
import logging
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from flext_mesh.dashboard.web import WebServer
from flext_mesh.observability import (
    CALL_BUCKETS_SECONDS,
    CallMetricsCollector,
    CallSeries,
    Observability,
)
from flext_mesh.server import create_server
from flext_mesh.v1 import (
    metrics_pb2,
    metrics_pb2_grpc,
    orchestrator_pb2,
    orchestrator_pb2_grpc,
    processor_pb2,
    registry_pb2,
    registry_pb2_grpc,
)
from tests.registry.conftest import fast_config


def _scrape(port: int) -> dict[str, list[tuple[str, dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        text = reply.read().decode()
    out: dict[str, list[tuple[str, dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        out[family.name] = [(s.name, s.labels, s.value) for s in family.samples]
    return out


async def test_scrape_shows_mesh_calls_and_the_control_planes_own_rpcs(tmp_path: Path) -> None:
    plane, port = await create_server(fast_config(tmp_path))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = metrics_pb2_grpc.MetricsServiceStub(channel)
            records = [
                metrics_pb2.CallRecord(
                    service_name="payment",
                    operation="charge",
                    duration_ms=3.0 if i < 90 else 700.0,
                    success=i % 10 != 9,
                    status_code=0 if i % 10 != 9 else 14,
                )
                for i in range(100)
            ]
            await stub.ReportCalls(metrics_pb2.ReportCallsRequest(records=records))
            with pytest.raises(grpc.aio.AioRpcError):
                await stub.GetServiceReport(metrics_pb2.GetServiceReportRequest(service_name="x"))
        families = await asyncio.to_thread(_scrape, plane.http_port)
    finally:
        await plane.stop(0.2)

    calls = {s[1]["outcome"]: s[2] for s in families["flext_mesh_calls"] if s[0].endswith("_total")}
    assert calls == {"success": 90.0, "infrastructure_error": 10.0}
    duration = families["flext_mesh_call_duration_seconds"]
    buckets = {(s[1]["outcome"], s[1]["le"]): s[2] for s in duration if s[0].endswith("_bucket")}
    # Fast (3 ms): i < 90. Failed: i = 9, 19, ..., 99. So 81 fast and 9 slow successes,
    # 9 fast and 1 slow (i = 99) failures.
    assert buckets[("success", "0.005")] == 81.0
    assert buckets[("success", "+Inf")] == 90.0
    assert buckets[("infrastructure_error", "0.005")] == 9.0
    assert buckets[("infrastructure_error", "+Inf")] == 10.0
    sums = {s[1]["outcome"]: s[2] for s in duration if s[0].endswith("_sum")}
    assert abs(sums["success"] - (81 * 0.003 + 9 * 0.7)) < 1e-9

    handled = {
        (s[1]["grpc_method"], s[1]["grpc_code"]): s[2]
        for s in families["flext_mesh_rpc_server_handled"]
        if s[0].endswith("_total")
    }
    assert handled[("ReportCalls", "OK")] == 1.0
    assert handled[("GetServiceReport", "NOT_FOUND")] == 1.0
    assert "flext_mesh_build_info" in families


async def test_calls_by_caller_and_code_count_each_call_once_and_cap_the_callers(
    tmp_path: Path,
) -> None:
    """The service graph's edges: calls by caller and status code, a resent batch not
    counted twice, a success told as OK, and a service's callers past 32 as one
    "(other)" series, so a caller cannot grow the scrape without bound."""
    plane, port = await create_server(fast_config(tmp_path))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = metrics_pb2_grpc.MetricsServiceStub(channel)

            def record(caller: str, code: int, success: bool) -> metrics_pb2.CallRecord:
                return metrics_pb2.CallRecord(
                    service_name="payment",
                    operation="charge",
                    duration_ms=2.0,
                    success=success,
                    status_code=code,
                    caller_service=caller,
                )

            batch = [
                *(record("shop", 0, True) for _ in range(5)),
                *(record("shop", 5, False) for _ in range(2)),  # NOT_FOUND: a refusal
                record("cart", 14, False),  # UNAVAILABLE
                record("cart", 2, True),  # a success whatever its code says
                record("", 0, True),  # grpcurl or a client without a name
            ]
            request = metrics_pb2.ReportCallsRequest(
                records=batch, reporter_id="sidecar-a", batch_sequence=1
            )
            await stub.ReportCalls(request)
            await stub.ReportCalls(request)  # a resend after a lost answer
            many = [record(f"caller-{i:02}", 0, True) for i in range(40)]
            await stub.ReportCalls(metrics_pb2.ReportCallsRequest(records=many))
        families = await asyncio.to_thread(_scrape, plane.http_port)
    finally:
        await plane.stop(0.2)

    edges = {
        (s[1]["service"], s[1]["caller"], s[1]["code"]): s[2]
        for s in families["flext_mesh_calls_by_caller"]
        if s[0].endswith("_total")
    }
    assert edges[("payment", "shop", "OK")] == 5.0
    assert edges[("payment", "shop", "NOT_FOUND")] == 2.0
    assert edges[("payment", "cart", "UNAVAILABLE")] == 1.0
    assert edges[("payment", "cart", "OK")] == 1.0
    assert edges[("payment", "(unknown)", "OK")] == 1.0
    callers = {caller for _, caller, _ in edges}
    # shop, cart and "" took 3 of the 32 places; 29 of the 40 callers got one each.
    assert len(callers) == 33
    named = sum(n for (_, caller, _), n in edges.items() if caller.startswith("caller-"))
    assert named == 29.0
    assert edges[("payment", "(other)", "OK")] == 11.0
    assert sum(edges.values()) == 10 + 40


def _stall_the_loop(seconds: float) -> None:
    """Hold the event loop, as a blocking call in a handler would: nothing else runs."""
    time.sleep(seconds)


async def test_scrape_shows_the_event_loop_lag_and_a_stall_is_logged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="flext_mesh.loop")
    plane, _ = await create_server(fast_config(tmp_path))
    try:
        await asyncio.sleep(0.25)
        _stall_the_loop(0.4)
        await asyncio.sleep(0.15)
        families = await asyncio.to_thread(_scrape, plane.http_port)
    finally:
        await plane.stop(0.2)

    lag = {(s[0], s[1].get("le")): s[2] for s in families["flext_mesh_event_loop_lag_seconds"]}
    count = lag[("flext_mesh_event_loop_lag_seconds_count", None)]
    assert count >= 3
    assert lag[("flext_mesh_event_loop_lag_seconds_bucket", "+Inf")] == count
    assert lag[("flext_mesh_event_loop_lag_seconds_bucket", "0.25")] <= count - 1
    assert lag[("flext_mesh_event_loop_lag_seconds_sum", None)] >= 0.3
    [(_, _, lag_max)] = families["flext_mesh_event_loop_lag_max_seconds"]
    assert lag_max >= 0.3
    # One warning, from the control plane's monitor (the store's own stays quiet).
    stalls = [r.getMessage() for r in caplog.records if r.name == "flext_mesh.loop"]
    assert len(stalls) == 1, stalls
    assert stalls[0].startswith("event loop stalled for 0.")


# -- /metrics served alone ------------------------------------------------------------


def families(text: str) -> dict[str, list[Sample]]:
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def value(samples: Iterable[Sample], name: str, **labels: str) -> float:
    for sample in samples:
        if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
            return sample.value
    raise AssertionError(f"no sample {name} {labels}")


async def fetch(
    url: str, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """GET with urllib in a worker thread (a real, independent HTTP client)."""

    def get() -> tuple[int, dict[str, str], bytes]:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=5) as response:
            return (
                response.status,
                {k.lower(): v for k, v in response.headers.items()},
                response.read(),
            )

    return await asyncio.to_thread(get)


@pytest.fixture
def obs() -> Observability:
    return Observability(version="9.9.9")


@pytest.fixture
async def server(obs: Observability) -> AsyncIterator[WebServer]:
    async with WebServer("127.0.0.1", 0, obs.routes()) as http:
        yield http


async def test_metrics_is_prometheus_text_with_build_and_process_metrics(
    server: WebServer,
) -> None:
    status, headers, body = await fetch(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    assert int(headers["content-length"]) == len(body)
    found = families(body.decode())
    assert value(found["flext_mesh_build_info"], "flext_mesh_build_info", version="9.9.9") == 1
    assert value(found["process_resident_memory_bytes"], "process_resident_memory_bytes") > 0
    assert "python_info" in found


async def test_metrics_gzip_when_accepted(server: WebServer) -> None:
    url = f"http://127.0.0.1:{server.port}/metrics"
    status, headers, body = await fetch(url, {"Accept-Encoding": "gzip, deflate"})
    assert (status, headers["content-encoding"], headers["vary"]) == (
        200,
        "gzip",
        "Accept-Encoding",
    )
    assert "flext_mesh_build_info" in families(gzip.decompress(body).decode())


async def test_two_observabilities_in_one_process_do_not_share_series() -> None:
    first, second = Observability(version="1"), Observability(version="2")
    assert b'version="1"' in first.render()
    assert b'version="2"' not in first.render()
    assert b'version="2"' in second.render()


# -- mesh call metrics ------------------------------------------------------------------


def two_series() -> list[CallSeries]:
    bounds = (0.01, 0.1, 1.0)
    return [
        CallSeries(
            service="payment",
            operation="charge",
            outcome="success",
            bucket_bounds_seconds=bounds,
            cumulative_counts=(5, 8, 9, 10),
            sum_seconds=3.25,
            count=10,
        ),
        CallSeries(
            service="payment",
            operation="charge",
            outcome="infrastructure_error",
            bucket_bounds_seconds=bounds,
            cumulative_counts=(0, 0, 1, 2),
            sum_seconds=4.5,
            count=2,
        ),
    ]


async def test_call_collector_exposes_histogram_and_counter(
    obs: Observability, server: WebServer
) -> None:
    threads: list[int] = []

    def source() -> list[CallSeries]:
        threads.append(threading.get_ident())
        return two_series()

    obs.set_call_source(source)
    assert threads == []  # registering does not call the source
    _, _, body = await fetch(f"http://127.0.0.1:{server.port}/metrics")
    found = families(body.decode())
    hist = found["flext_mesh_call_duration_seconds"]
    ok = {"service": "payment", "operation": "charge", "outcome": "success"}
    bucket = "flext_mesh_call_duration_seconds_bucket"
    assert [value(hist, bucket, **ok, le=le) for le in ("0.01", "0.1", "1.0", "+Inf")] == [
        5,
        8,
        9,
        10,
    ]
    assert value(hist, "flext_mesh_call_duration_seconds_count", **ok) == 10
    assert value(hist, "flext_mesh_call_duration_seconds_sum", **ok) == 3.25
    bad = {**ok, "outcome": "infrastructure_error"}
    assert value(hist, bucket, **bad, le="+Inf") == 2
    assert value(hist, "flext_mesh_call_duration_seconds_sum", **bad) == 4.5
    assert value(found["flext_mesh_calls"], "flext_mesh_calls_total", **ok) == 10
    assert value(found["flext_mesh_calls"], "flext_mesh_calls_total", **bad) == 2
    # Rendered in a worker thread, yet the source ran on the event loop's thread.
    assert threads == [threading.get_ident()]


def test_call_collector_skips_inconsistent_series_and_formats_default_buckets() -> None:
    good = CallSeries(
        service="s",
        operation="o",
        outcome="business_error",
        bucket_bounds_seconds=CALL_BUCKETS_SECONDS,
        cumulative_counts=[1] * (len(CALL_BUCKETS_SECONDS) + 1),
        sum_seconds=0.0001,
        count=1,
    )
    broken = CallSeries(
        service="s",
        operation="broken",
        outcome="success",
        bucket_bounds_seconds=CALL_BUCKETS_SECONDS,
        cumulative_counts=[1],
        sum_seconds=0.0,
        count=1,
    )
    hist, calls, _ = CallMetricsCollector(lambda: [good, broken]).collect()
    les = [s.labels["le"] for s in hist.samples if s.name.endswith("_bucket")]
    assert les[:3] == ["0.0005", "0.001", "0.0025"]
    assert les[-1] == "+Inf"
    assert len(les) == len(CALL_BUCKETS_SECONDS) + 1
    assert [s.labels["operation"] for s in calls.samples] == ["o"]
    assert tuple(sorted(CALL_BUCKETS_SECONDS)) == CALL_BUCKETS_SECONDS


# -- the control plane's own RPCs -------------------------------------------------------

SERVICE = "flext_mesh.test.EchoService"


async def get(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
    if request == b"missing":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")
    return b"\x0a\x03" + request  # pre-serialized bytes, sent through an identity serializer


async def listing(
    request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]
) -> AsyncIterator[bytes]:
    if request == b"missing":
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such list")
    for i in range(3):
        yield b"item-%d" % i


async def chat(request_iterator: object, context: grpc.aio.ServicerContext[bytes, bytes]) -> None:
    """Reader/writer style: context.read() until EOF, context.write() each answer."""
    while isinstance(message := await context.read(), bytes):
        await context.write(message.upper())


def echo_handler() -> grpc.GenericRpcHandler:
    identity = {"request_deserializer": None, "response_serializer": None}

    def serialize(response: bytes) -> bytes:
        assert isinstance(response, bytes)
        return response

    return grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Get": grpc.unary_unary_rpc_method_handler(get, response_serializer=serialize),
            "List": grpc.unary_stream_rpc_method_handler(listing, **identity),
            "Chat": grpc.stream_stream_rpc_method_handler(chat, **identity),
        },
    )


async def test_interceptor_counts_rpcs_by_code_and_times_unary(
    obs: Observability, server: WebServer
) -> None:
    grpc_server = grpc.aio.server(interceptors=[obs.interceptor])
    grpc_server.add_generic_rpc_handlers((echo_handler(),))
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    await grpc_server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            unary: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]
            unary = channel.unary_unary(f"/{SERVICE}/Get")
            listing_call: grpc.aio.UnaryStreamMultiCallable[bytes, bytes]
            listing_call = channel.unary_stream(f"/{SERVICE}/List")
            for _ in range(5):
                assert await unary(b"abc") == b"\x0a\x03abc"
            for _ in range(2):
                with pytest.raises(grpc.aio.AioRpcError) as caught:
                    await unary(b"missing")
                assert caught.value.code() == grpc.StatusCode.NOT_FOUND
            assert [m async for m in listing_call(b"x")] == [b"item-0", b"item-1", b"item-2"]
            with pytest.raises(grpc.aio.AioRpcError):
                [m async for m in listing_call(b"missing")]
            chat: grpc.aio.StreamStreamMultiCallable[bytes, bytes]
            chat = channel.stream_stream(f"/{SERVICE}/Chat")
            chat_call = chat(iter([b"hi", b"yo"]))
            assert [m async for m in chat_call] == [b"HI", b"YO"]
    finally:
        await grpc_server.stop(None)

    _, _, body = await fetch(f"http://127.0.0.1:{server.port}/metrics")
    found = families(body.decode())
    handled = found["flext_mesh_rpc_server_handled"]
    name = "flext_mesh_rpc_server_handled_total"
    get_labels = {"grpc_service": SERVICE, "grpc_method": "Get"}
    assert value(handled, name, **get_labels, grpc_code="OK") == 5
    assert value(handled, name, **get_labels, grpc_code="NOT_FOUND") == 2
    list_labels = {"grpc_service": SERVICE, "grpc_method": "List"}
    assert value(handled, name, **list_labels, grpc_code="OK") == 1
    assert value(handled, name, **list_labels, grpc_code="NOT_FOUND") == 1
    chat_labels = {"grpc_service": SERVICE, "grpc_method": "Chat"}
    assert value(handled, name, **chat_labels, grpc_code="OK") == 1
    started = found["flext_mesh_rpc_server_started"]
    assert value(started, "flext_mesh_rpc_server_started_total", **list_labels) == 2
    seconds = found["flext_mesh_rpc_server_handling_seconds"]
    assert value(seconds, "flext_mesh_rpc_server_handling_seconds_count", **get_labels) == 7
    assert (
        value(seconds, "flext_mesh_rpc_server_handling_seconds_bucket", **get_labels, le="10.0")
        == 7
    )
    assert not [s for s in seconds if s.labels.get("grpc_method") == "List"]  # streams untimed


async def test_scrape_shows_instances_leases_watchers_and_running_executions(
    tmp_path: Path,
) -> None:
    plane, port = await create_server(fast_config(tmp_path))
    step_server = grpc.aio.server()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            registry = registry_pb2_grpc.RegistryServiceStub(channel)
            for instance_id, version, zone in (
                ("pay-1", "v1", "eu-1a"),
                ("pay-2", "v1", "eu-1a"),
                ("pay-3", "v2", "eu-1b"),
            ):
                request = registry_pb2.RegisterRequest(
                    instance=registry_pb2.ServiceInstance(
                        service_name="payment",
                        instance_id=instance_id,
                        endpoint="127.0.0.1:9",
                        version=version,
                        zone=zone,
                        health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
                    )
                )
                request.ttl.FromSeconds(60)
                await registry.Register(request)
            watch = registry.Watch(registry_pb2.WatchRequest(service_names=["payment"]))
            await watch.read()  # the snapshot: the stream is open

            # A workflow whose only step hangs: one execution RUNNING on this replica.
            hang = asyncio.Event()
            port_of_steps = await _hanging_step_server(step_server, hang)
            await _register_step_service(registry, port_of_steps)
            orchestrator = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            await orchestrator.PutWorkflow(
                orchestrator_pb2.PutWorkflowRequest(
                    workflow=orchestrator_pb2.Workflow(
                        name="slow",
                        steps=[orchestrator_pb2.WorkflowStep(name="wait", service="hangs")],
                    )
                )
            )
            await orchestrator.StartExecution(
                orchestrator_pb2.StartExecutionRequest(workflow_name="slow")
            )
            await asyncio.sleep(0.3)
            families = await asyncio.to_thread(_scrape, plane.http_port)
            watch.cancel()
            hang.set()
    finally:
        await step_server.stop(0)
        await plane.stop(0.2)

    instances = {
        (s[1]["service"], s[1]["version"], s[1]["zone"], s[1]["health"]): s[2]
        for s in families["flext_mesh_instances"]
    }
    assert instances[("payment", "v1", "eu-1a", "SERVING")] == 2.0
    assert instances[("payment", "v2", "eu-1b", "SERVING")] == 1.0
    assert families["flext_mesh_leases"][0][2] == 4.0  # three payment instances, one step
    assert families["flext_mesh_registry_watchers"][0][2] >= 1.0
    executions = {
        (s[1]["workflow"], s[1]["state"]): s[2] for s in families["flext_mesh_executions"]
    }
    assert executions == {("slow", "RUNNING"): 1.0}
    ejected = {s[1]["service"]: s[2] for s in families["flext_mesh_instances_ejected"]}
    assert ejected == {"payment": 0.0, "hangs": 0.0}
    assert not any(name.endswith("_created") for name in families)
    commits = {(s[0], s[1].get("le")): s[2] for s in families["flext_mesh_store_commit_seconds"]}
    count = commits[("flext_mesh_store_commit_seconds_count", None)]
    assert count >= 5  # four registrations and the execution's start, at least
    assert commits[("flext_mesh_store_commit_seconds_bucket", "+Inf")] == count
    assert commits[("flext_mesh_store_commit_seconds_sum", None)] > 0


async def _hanging_step_server(server: grpc.aio.Server, hang: asyncio.Event) -> int:
    """A ProcessorService whose every Invoke waits for ``hang``."""

    async def invoke(request: bytes, context: grpc.aio.ServicerContext[bytes, bytes]) -> bytes:
        await hang.wait()
        return processor_pb2.InvokeResponse().SerializeToString()

    handler = grpc.method_handlers_generic_handler(
        "flext_mesh.v1.ProcessorService",
        {"Invoke": grpc.unary_unary_rpc_method_handler(invoke)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return port


async def _register_step_service(
    registry: registry_pb2_grpc.RegistryServiceStub, port: int
) -> None:
    request = registry_pb2.RegisterRequest(
        instance=registry_pb2.ServiceInstance(
            service_name="hangs",
            instance_id="hangs-1",
            endpoint=f"127.0.0.1:{port}",
            health_check_mode=registry_pb2.HEALTH_CHECK_MODE_TTL_ONLY,
        )
    )
    request.ttl.FromSeconds(60)
    await registry.Register(request)


async def test_workflow_and_step_durations_have_their_own_histograms(tmp_path: Path) -> None:
    plane, port = await create_server(fast_config(tmp_path))
    step_server = grpc.aio.server()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            registry = registry_pb2_grpc.RegistryServiceStub(channel)
            release = asyncio.Event()
            release.set()  # every call answers at once
            await _register_step_service(registry, await _hanging_step_server(step_server, release))
            orchestrator = orchestrator_pb2_grpc.OrchestratorServiceStub(channel)
            steps = [
                orchestrator_pb2.WorkflowStep(name="a", service="hangs"),
                orchestrator_pb2.WorkflowStep(name="b", service="hangs", depends_on=["a"]),
            ]
            await orchestrator.PutWorkflow(
                orchestrator_pb2.PutWorkflowRequest(
                    workflow=orchestrator_pb2.Workflow(name="pair", steps=steps)
                )
            )
            for _ in range(3):
                done = await orchestrator.StartExecution(
                    orchestrator_pb2.StartExecutionRequest(workflow_name="pair", wait=True)
                )
                assert done.execution.state == orchestrator_pb2.EXECUTION_STATE_SUCCEEDED
            families = await asyncio.to_thread(_scrape, plane.http_port)
    finally:
        await step_server.stop(0)
        await plane.stop(0.2)

    def counts(family: str) -> dict[tuple[str, ...], float]:
        return {
            tuple(v for k, v in sorted(s[1].items())): s[2]
            for s in families[family]
            if s[0].endswith("_count")
        }

    assert counts("flext_mesh_workflow_duration_seconds") == {("SUCCEEDED", "pair"): 3.0}
    assert counts("flext_mesh_step_duration_seconds") == {
        ("OK", "a", "pair"): 3.0,
        ("OK", "b", "pair"): 3.0,
    }
    assert not any(name.endswith("_created") for name in families)
