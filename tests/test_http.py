"""The HTTP server and /metrics over real loopback sockets, and the RPC interceptor on a
real grpc.aio server."""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
import pytest
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from flext_mesh.http import HttpServer, Request, Response
from flext_mesh.observability import (
    CALL_BUCKETS_SECONDS,
    CallMetricsCollector,
    CallSeries,
    Observability,
)
from flext_mesh.security.certs import issue, make_ca

pytestmark = pytest.mark.timeout(20)

# -- helpers ----------------------------------------------------------------------------


async def hello(request: Request) -> Response:
    name = request.query.get("name", "world")
    return Response.text(f"hello {name} via {request.method}\n", headers={"X-Test": "1"})


async def boom(request: Request) -> Response:
    raise RuntimeError("handler bug")


async def stream(request: Request) -> Response:
    async def body() -> AsyncIterator[bytes]:
        for part in (b"data: one\n\n", b"", b"data: two\n\n", b"data: three\n\n"):
            yield part

    return Response(content_type="text/event-stream", body=body())


class Forever:
    """A stream that sends one event, then waits; records that it was closed."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def handler(self, request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            try:
                yield b"data: first\n\n"
                await asyncio.Event().wait()
            finally:
                self.closed.set()

        return Response(content_type="text/event-stream", body=body())


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response from a raw connection: status, lower-case headers, decoded body."""
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ")[1])
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
        return status, headers, body
    return status, headers, b""


async def read_body(
    reader: asyncio.StreamReader, headers: dict[str, str], *, head: bool = False
) -> bytes:
    if head or "content-length" not in headers:
        return b""
    return await reader.readexactly(int(headers["content-length"]))


async def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a fresh connection, read one response."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        status, headers, body = await asyncio.wait_for(read_response(reader), 5)
        body = body or await read_body(reader, headers)
        return status, headers, body
    finally:
        writer.close()


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
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                return (
                    response.status,
                    {k.lower(): v for k, v in response.headers.items()},
                    response.read(),
                )
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()

    return await asyncio.to_thread(get)


@pytest.fixture
def obs() -> Observability:
    return Observability(version="9.9.9")


@pytest.fixture
async def server(obs: Observability) -> AsyncIterator[HttpServer]:
    http = HttpServer(
        "127.0.0.1",
        0,
        {**obs.routes(), "/hello": hello, "/boom": boom, "/stream": stream},
        keepalive_timeout=5.0,
        request_timeout=2.0,
    )
    await http.start()
    yield http
    await http.stop()


# -- /metrics ---------------------------------------------------------------------------


async def test_metrics_is_prometheus_text_with_build_and_process_metrics(
    server: HttpServer,
) -> None:
    status, headers, body = await fetch(f"http://127.0.0.1:{server.port}/metrics")
    assert status == 200
    assert headers["content-type"] == CONTENT_TYPE_LATEST
    assert int(headers["content-length"]) == len(body)
    found = families(body.decode())
    assert value(found["flext_mesh_build_info"], "flext_mesh_build_info", version="9.9.9") == 1
    assert value(found["process_resident_memory_bytes"], "process_resident_memory_bytes") > 0
    assert "python_info" in found


async def test_metrics_gzip_when_accepted(server: HttpServer) -> None:
    request = b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip, deflate\r\n\r\n"
    status, headers, body = await exchange(server.port, request)
    assert (status, headers["content-encoding"]) == (200, "gzip")
    assert "flext_mesh_build_info" in families(gzip.decompress(body).decode())


async def test_two_observabilities_in_one_process_do_not_share_series() -> None:
    first, second = Observability(version="1"), Observability(version="2")
    assert b'version="1"' in first.render()
    assert b'version="2"' not in first.render()
    assert b'version="2"' in second.render()


# -- request handling -------------------------------------------------------------------


async def test_query_and_headers_reach_the_handler(server: HttpServer) -> None:
    status, headers, body = await fetch(f"http://127.0.0.1:{server.port}/hello?name=mesh%21")
    assert (status, body) == (200, b"hello mesh! via GET\n")
    assert headers["x-test"] == "1"
    assert headers["content-type"] == "text/plain; charset=utf-8"


async def test_unknown_path_is_404_and_other_methods_are_405(server: HttpServer) -> None:
    status, _, body = await exchange(server.port, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")
    assert (status, body) == (404, b"Not Found\n")
    status, headers, _ = await exchange(
        server.port, b"POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
    )
    assert (status, headers["allow"]) == (405, "GET, HEAD")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GARBAGE\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET /metrics HTTP/1.1 extra\r\n\r\n",
        b"GET /metrics HTTX/1.1\r\n\r\n",
        b"G(T /metrics HTTP/1.1\r\n\r\n",
        b"GET metrics HTTP/1.1\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nNoColonHere\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
        b"GET /%ff HTTP/1.1\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS hello on a plain port
    ],
)
async def test_malformed_requests_get_400_and_the_server_keeps_serving(
    server: HttpServer, request_bytes: bytes
) -> None:
    status, headers, body = await exchange(server.port, request_bytes)
    assert status == 400
    assert headers["connection"] == "close"
    assert body.startswith(b"Bad Request")
    assert b"Traceback" not in body
    status, _, _ = await exchange(server.port, b"GET /hello HTTP/1.1\r\n\r\n")
    assert status == 200


async def test_oversized_header_is_431_and_request_line_414(server: HttpServer) -> None:
    huge = b"GET /hello HTTP/1.1\r\nX-Big: " + b"a" * 20_000 + b"\r\n\r\n"
    assert (await exchange(server.port, huge))[0] == 431
    many = b"GET /hello HTTP/1.1\r\n" + b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(120))
    assert (await exchange(server.port, many + b"\r\n"))[0] == 431
    long_line = b"GET /hello?q=" + b"a" * 10_000 + b" HTTP/1.1\r\n\r\n"
    assert (await exchange(server.port, long_line))[0] == 414
    big_body = b"GET /hello HTTP/1.1\r\nContent-Length: 999999999\r\n\r\n"
    assert (await exchange(server.port, big_body))[0] == 413
    chunked_body = b"GET /hello HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    assert (await exchange(server.port, chunked_body))[0] == 411
    assert (await exchange(server.port, b"GET /hello HTTP/2.0\r\n\r\n"))[0] == 505
    assert (await exchange(server.port, b"GET /hello HTTP/1.1\r\n\r\n"))[0] == 200


async def test_keep_alive_serves_several_requests_on_one_connection(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        for name in ("a", "b"):
            writer.write(f"GET /hello?name={name} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            status, headers, _ = await read_response(reader)
            assert (status, headers["connection"]) == (200, "keep-alive")
            assert headers["keep-alive"] == "timeout=5"
            assert await read_body(reader, headers) == f"hello {name} via GET\n".encode()
        # Pipelined: both requests before reading; answers come back in order.
        writer.write(b"GET /hello?name=c HTTP/1.1\r\n\r\nGET /hello?name=d HTTP/1.1\r\n\r\n")
        for name in ("c", "d"):
            _, headers, _ = await read_response(reader)
            assert await read_body(reader, headers) == f"hello {name} via GET\n".encode()
        writer.write(b"GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n")
        _, headers, _ = await read_response(reader)
        assert headers["connection"] == "close"
        await read_body(reader, headers)
        assert await asyncio.wait_for(reader.read(), 5) == b""  # server closed it
    finally:
        writer.close()


async def test_http10_closes_unless_keep_alive_asked(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(b"GET /hello HTTP/1.0\r\n\r\n")
    _, headers, _ = await read_response(reader)
    assert headers["connection"] == "close"
    assert await read_body(reader, headers) == b"hello world via GET\n"
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()


async def test_head_sends_headers_and_length_without_body(server: HttpServer) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        writer.write(b"HEAD /hello HTTP/1.1\r\n\r\nGET /hello HTTP/1.1\r\n\r\n")
        status, headers, _ = await read_response(reader)
        assert (status, headers["content-length"]) == (200, str(len(b"hello world via HEAD\n")))
        # No body bytes follow: the very next bytes are the second response.
        status, headers, _ = await read_response(reader)
        assert await read_body(reader, headers) == b"hello world via GET\n"
    finally:
        writer.close()


async def test_handler_exception_is_500_logged_once_and_serving_continues(
    server: HttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="flext_mesh.http"):
        status, _, body = await fetch(f"http://127.0.0.1:{server.port}/boom")
    assert status == 500
    assert body == b"Internal Server Error\n"
    errors = [r for r in caplog.records if r.name == "flext_mesh.http"]
    assert len(errors) == 1
    assert errors[0].exc_info is not None
    assert (await fetch(f"http://127.0.0.1:{server.port}/hello"))[0] == 200


async def test_streaming_body_is_chunked_and_read_back_whole(server: HttpServer) -> None:
    expected = b"data: one\n\ndata: two\n\ndata: three\n\n"
    status, headers, body = await fetch(f"http://127.0.0.1:{server.port}/stream")
    assert (status, headers["content-type"], body) == (200, "text/event-stream", expected)
    assert headers["transfer-encoding"] == "chunked"
    assert "content-length" not in headers
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:  # the connection stays usable after the terminating chunk
        writer.write(b"GET /stream HTTP/1.1\r\n\r\nGET /hello HTTP/1.1\r\n\r\n")
        assert (await read_response(reader))[2] == expected
        _, headers, _ = await read_response(reader)
        assert await read_body(reader, headers) == b"hello world via GET\n"
    finally:
        writer.close()


async def test_stop_closes_idle_and_streaming_connections_and_is_idempotent(
    caplog: pytest.LogCaptureFixture,
) -> None:
    forever = Forever()
    http = HttpServer("127.0.0.1", 0, {"/hello": hello, "/events": forever.handler})
    port = await http.start()
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    idle_writer.write(b"GET /hello HTTP/1.1\r\n\r\n")
    _, headers, _ = await read_response(idle_reader)
    await read_body(idle_reader, headers)
    sse_reader, sse_writer = await asyncio.open_connection("127.0.0.1", port)
    sse_writer.write(b"GET /events HTTP/1.1\r\n\r\n")
    await sse_reader.readuntil(b"data: first\n\n")

    await asyncio.wait_for(asyncio.gather(http.stop(), http.stop()), 5)

    assert await asyncio.wait_for(idle_reader.read(), 5) == b""
    with pytest.raises(asyncio.IncompleteReadError):
        await asyncio.wait_for(sse_reader.readuntil(b"0\r\n\r\n"), 5)  # cut, not finished
    assert forever.closed.is_set()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await http.stop()
    idle_writer.close()
    sse_writer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_idle_keep_alive_connection_is_closed_after_timeout() -> None:
    async with HttpServer("127.0.0.1", 0, {"/hello": hello}, keepalive_timeout=0.2) as http:
        reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
        writer.write(b"GET /hello HTTP/1.1\r\n\r\n")
        _, headers, _ = await read_response(reader)
        assert headers["connection"] == "keep-alive"
        assert "keep-alive" not in headers  # no whole second to announce
        await read_body(reader, headers)
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()


async def test_silent_or_slow_client_is_cut_after_request_timeout() -> None:
    async with HttpServer("127.0.0.1", 0, {"/hello": hello}, request_timeout=0.2) as http:
        reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
        writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n")  # head never finished
        assert await asyncio.wait_for(reader.read(), 2) == b""
        writer.close()


async def test_client_leaving_mid_stream_closes_the_stream() -> None:
    closed = asyncio.Event()

    async def ticking(request: Request) -> Response:
        async def body() -> AsyncIterator[bytes]:
            try:
                while True:
                    yield b"data: tick\n\n"
                    await asyncio.sleep(0.01)
            finally:
                closed.set()

        return Response(content_type="text/event-stream", body=body())

    async with HttpServer("127.0.0.1", 0, {"/ticks": ticking, "/hello": hello}) as http:
        reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
        writer.write(b"GET /ticks HTTP/1.1\r\n\r\n")
        await reader.readuntil(b"data: tick\n\n")
        writer.close()
        await asyncio.wait_for(closed.wait(), 3)
        assert (await exchange(http.port, b"GET /hello HTTP/1.1\r\n\r\n"))[0] == 200


# -- path templates and TLS -------------------------------------------------------------


async def echo_params(request: Request) -> Response:
    return Response.json({"path": request.path, "params": dict(request.params)})


async def test_templates_match_one_segment_each_and_exact_routes_win() -> None:
    routes = {
        "/api/services/{name}": echo_params,
        "/api/services/{name}/report": echo_params,
        "/api/services/all": hello,
    }
    async with HttpServer("127.0.0.1", 0, routes) as http:
        base = f"http://127.0.0.1:{http.port}"
        status, headers, body = await fetch(f"{base}/api/services/pay%2Dment?x=1")
        assert (status, headers["content-type"]) == (200, "application/json")
        assert json.loads(body) == {
            "path": "/api/services/pay-ment",
            "params": {"name": "pay-ment"},
        }
        _, _, body = await fetch(f"{base}/api/services/payment/report")
        assert json.loads(body)["params"] == {"name": "payment"}
        assert (await fetch(f"{base}/api/services/all"))[2] == b"hello world via GET\n"
        for path in ("/api/services/", "/api/services/a/b", "/api/services/a/report/x"):
            assert (await fetch(base + path))[0] == 404, path
        assert set(http.routes) == set(routes)
        http.add_route("/api/services/{name}", hello)  # replaces the template's handler
        assert (await fetch(f"{base}/api/services/x"))[2] == b"hello world via GET\n"


@pytest.mark.parametrize("path", ["metrics", "/a/{b", "/a/{b}/{b}", "/a/{1x}"])
def test_bad_route_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="route"):
        HttpServer("127.0.0.1", 0, {path: hello})


async def test_tls_serves_https_and_refuses_plaintext(tmp_path: Path) -> None:
    ca = make_ca()
    leaf = issue(ca, "localhost", ip_addresses=["127.0.0.1"])
    cert, key = leaf.write(tmp_path, "http")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cadata=ca.cert_pem.decode())
    async with HttpServer("127.0.0.1", 0, {"/hello": hello}, ssl=server_context) as http:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", http.port, ssl=client_context, server_hostname="127.0.0.1"
        )
        try:
            writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers, _ = await asyncio.wait_for(read_response(reader), 5)
            assert (status, await read_body(reader, headers)) == (200, b"hello world via GET\n")
        finally:
            writer.close()
        # A plaintext request on the TLS port gets no HTTP answer, and serving goes on.
        plain_reader, plain_writer = await asyncio.open_connection("127.0.0.1", http.port)
        plain_writer.write(b"GET /hello HTTP/1.1\r\n\r\n")
        assert b"hello" not in await asyncio.wait_for(plain_reader.read(), 5)
        plain_writer.close()
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", http.port, ssl=client_context, server_hostname="127.0.0.1"
        )
        writer.write(b"GET /hello HTTP/1.1\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(read_response(reader), 5))[0] == 200
        writer.close()


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
    obs: Observability, server: HttpServer
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
    hist, calls = CallMetricsCollector(lambda: [good, broken]).collect()
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
    obs: Observability, server: HttpServer
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
