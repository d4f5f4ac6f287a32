"""The HTTP port's server (aiohttp) over real loopback sockets: JSON errors, limits, slow
clients, streams at shutdown, HTTPS."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from flext_mesh.dashboard.web import WebServer, send_stream
from flext_mesh.security.certs import issue, make_ca
from tests.dashboard.conftest import get

pytestmark = pytest.mark.timeout(30)


async def hello(request: web.Request) -> web.Response:
    return web.Response(text=f"hello {request.query.get('name', 'world')}")


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("handler bug")


class Forever:
    """A stream that sends one event, then waits; records that its body was closed."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def handler(self, request: web.Request) -> web.StreamResponse:
        async def body() -> AsyncGenerator[bytes, None]:
            try:
                yield b"data: first\n\n"
                await asyncio.Event().wait()
            finally:
                self.closed.set()

        return await send_stream(request, body(), headers={"Content-Type": "text/event-stream"})


async def broken_stream(request: web.Request) -> web.StreamResponse:
    async def body() -> AsyncGenerator[bytes, None]:
        yield b"data: one\n\n"
        raise RuntimeError("stream bug")

    return await send_stream(request, body(), headers={"Content-Type": "text/event-stream"})


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """A response's status and lower-case headers."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(status_line.split(" ")[1]), headers


async def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes on a fresh connection; one response (with a Content-Length body)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        status, headers = await read_head(reader)
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body
    finally:
        writer.close()


@pytest.fixture
async def server() -> AsyncIterator[WebServer]:
    routes = {"/hello": hello, "/boom": boom, "/broken": broken_stream}
    async with WebServer("127.0.0.1", 0, routes, max_body_bytes=1024) as http:
        yield http


def error_of(headers: dict[str, str], body: bytes) -> dict[str, object]:
    assert headers["content-type"] == "application/json", body
    assert headers["x-content-type-options"] == "nosniff"
    error: dict[str, object] = json.loads(body)["error"]
    return error


# -- what the server answers by itself --------------------------------------------------


async def test_unknown_route_is_a_json_404(server: WebServer) -> None:
    status, headers, body = await get(f"http://127.0.0.1:{server.port}/nope?x=1")
    assert status == 404
    assert error_of(headers, body) == {
        "code": 404,
        "status": "NOT_FOUND",
        "message": "nothing is served at /nope",
    }


async def test_other_methods_are_a_json_405_naming_get(server: WebServer) -> None:
    status, headers, body = await get(f"http://127.0.0.1:{server.port}/hello", method="DELETE")
    assert status == 405
    assert headers["allow"] == "GET,HEAD"
    assert error_of(headers, body)["status"] == "UNIMPLEMENTED"


async def test_handler_exception_is_a_json_500_logged_once_and_serving_continues(
    server: WebServer, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        status, headers, body = await get(f"http://127.0.0.1:{server.port}/boom")
    assert status == 500
    assert error_of(headers, body)["status"] == "INTERNAL"
    assert b"handler bug" not in body
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.name for r in errors] == ["flext_mesh.http"]
    assert errors[0].exc_info is not None
    assert (await get(f"http://127.0.0.1:{server.port}/hello"))[::2] == (200, b"hello world")


# -- limits and bad input ---------------------------------------------------------------


async def test_bodies_over_the_limit_or_without_length_are_refused(server: WebServer) -> None:
    base = b"GET /hello HTTP/1.1\r\nHost: x\r\n"
    status, headers, body = await exchange(server.port, base + b"Content-Length: 5000\r\n\r\n")
    assert (status, error_of(headers, body)["status"]) == (413, "RESOURCE_EXHAUSTED")
    chunked = base + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    status, headers, body = await exchange(server.port, chunked)
    assert (status, error_of(headers, body)["status"]) == (411, "INVALID_ARGUMENT")
    small = base + b"Content-Length: 3\r\n\r\nabc"
    assert (await exchange(server.port, small))[::2] == (200, b"hello world")


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /hello HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 10_000 + b"\r\n\r\n",
        b"GET /hello?q=" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nHost: x\r\n"
        + b"".join(b"X-%d: %d\r\n" % (i, i) for i in range(120))
        + b"\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /hello HTTP/1.1\r\nHost: x\r\nBad Name: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",  # TLS hello on a plain port
    ],
)
async def test_oversized_or_malformed_heads_get_400_quietly_and_serving_continues(
    server: WebServer, request_bytes: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO):
        status, _, body = await exchange(server.port, request_bytes)
    assert status == 400
    assert b"Traceback" not in body
    assert not [r for r in caplog.records if r.levelno >= logging.INFO]
    assert (await exchange(server.port, b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 200


# -- slow clients -----------------------------------------------------------------------


async def test_a_slow_client_does_not_hold_up_others_and_is_cut_after_the_timeout() -> None:
    async with WebServer("127.0.0.1", 0, {"/hello": hello}, keepalive_timeout=0.5) as http:
        slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", http.port)
        slow_writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", http.port)
        idle_writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        status, headers = await read_head(idle_reader)
        assert status == 200
        await idle_reader.readexactly(int(headers["content-length"]))
        # Meanwhile others are served at once.
        for name in ("a", "b", "c"):
            request = f"GET /hello?name={name} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
            assert (await exchange(http.port, request))[2] == f"hello {name}".encode()
        # Then the silent one and the idle kept-alive one are closed.
        assert await asyncio.wait_for(slow_reader.read(), 3) == b""
        assert await asyncio.wait_for(idle_reader.read(), 3) == b""
        slow_writer.close()
        idle_writer.close()


async def test_a_stream_outlives_the_keepalive_timeout() -> None:
    async def ticks(request: web.Request) -> web.StreamResponse:
        async def body() -> AsyncGenerator[bytes, None]:
            for i in range(5):
                yield b"data: %d\n\n" % i
                await asyncio.sleep(0.2)

        return await send_stream(request, body(), headers={"Content-Type": "text/event-stream"})

    async with WebServer("127.0.0.1", 0, {"/ticks": ticks}, keepalive_timeout=0.3) as http:
        reader, writer = await asyncio.open_connection("127.0.0.1", http.port)
        try:
            writer.write(b"GET /ticks HTTP/1.1\r\nHost: x\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"data: 4\n\n\r\n0\r\n\r\n"), 5)
        finally:
            writer.close()


# -- streams and shutdown ---------------------------------------------------------------


async def test_stop_ends_open_streams_and_closes_connections_promptly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    forever = Forever()
    http = WebServer("127.0.0.1", 0, {"/hello": hello, "/events": forever.handler})
    port = await http.start()
    idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
    idle_writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
    _, headers = await read_head(idle_reader)
    await idle_reader.readexactly(int(headers["content-length"]))
    sse_reader, sse_writer = await asyncio.open_connection("127.0.0.1", port)
    sse_writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
    await asyncio.wait_for(sse_reader.readuntil(b"data: first\n\n"), 5)

    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(http.stop(), 5)
    assert asyncio.get_running_loop().time() - started < 1  # nothing waited for a timeout

    assert forever.closed.is_set()
    rest = await asyncio.wait_for(sse_reader.read(), 5)
    assert rest.endswith(b"0\r\n\r\n")  # the stream ended with its last chunk
    assert await asyncio.wait_for(idle_reader.read(), 5) == b""
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await http.stop()  # again: nothing to do
    idle_writer.close()
    sse_writer.close()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_failing_stream_is_cut_not_finished_and_logged_once(
    server: WebServer, caplog: pytest.LogCaptureFixture
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    try:
        with caplog.at_level(logging.ERROR):
            writer.write(b"GET /broken HTTP/1.1\r\nHost: x\r\n\r\n")
            status, _ = await read_head(reader)
            rest = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert status == 200
    assert b"data: one" in rest
    assert not rest.endswith(b"0\r\n\r\n")
    assert [r.name for r in caplog.records if r.levelno >= logging.ERROR] == ["flext_mesh.http"]


# -- HTTPS ------------------------------------------------------------------------------


async def test_tls_serves_https_and_refuses_plaintext(tmp_path: Path) -> None:
    ca = make_ca()
    leaf = issue(ca, "localhost", ip_addresses=["127.0.0.1"])
    cert, key = leaf.write(tmp_path, "http")
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cadata=ca.cert_pem.decode())

    async def https_get() -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", http.port, ssl=client_context, server_hostname="127.0.0.1"
        )
        try:
            writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
            status, headers = await read_head(reader)
            return status, await reader.readexactly(int(headers["content-length"]))
        finally:
            writer.close()

    async with WebServer("127.0.0.1", 0, {"/hello": hello}, ssl=server_context) as http:
        assert await https_get() == (200, b"hello world")
        # A plaintext request on the TLS port gets no HTTP answer, and serving goes on.
        plain_reader, plain_writer = await asyncio.open_connection("127.0.0.1", http.port)
        plain_writer.write(b"GET /hello HTTP/1.1\r\nHost: x\r\n\r\n")
        assert b"hello" not in await asyncio.wait_for(plain_reader.read(), 5)
        plain_writer.close()
        assert await https_get() == (200, b"hello world")
