"""A small asyncio HTTP/1.1 server for the control plane's ``/metrics``, dashboard and
JSON API, run on the same event loop as the gRPC server.

Only what those endpoints need: ``GET`` and ``HEAD``, keep-alive with an idle timeout,
optional TLS, exact-path routes and path templates (``/api/v1/services/{name}``: each
``{name}`` matches one non-empty path segment, handed to the handler in
``Request.params``; an exact route wins over a template, templates are tried in the
order added), bodies either as ``bytes`` (sent with ``Content-Length``) or as an async
iterator of ``bytes`` (sent with ``Transfer-Encoding: chunked``, e.g. server-sent
events). Bad input gets a plain-text 4xx and never a traceback; a failing handler gets a
500 and is logged once; neither stops the server.

Status codes the server itself answers with::

    400 malformed request line or header      414 request line over max_head_bytes
    404 no route for the path                 431 headers over max_head_bytes (or 100 fields)
    405 method other than GET/HEAD            413 request body over max_body_bytes
    411 request body with Transfer-Encoding   505 HTTP major version other than 1
    500 the handler raised or returned no Response
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import logging
import re
import ssl as ssl_module
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from http import HTTPStatus
from types import MappingProxyType
from typing import Final
from urllib.parse import parse_qsl, unquote, urlsplit

__all__ = ["Handler", "HttpServer", "Request", "Response"]

_log = logging.getLogger("flext_mesh.http")

_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION: Final = re.compile(rb"HTTP/([0-9])\.([0-9])")
_BAD_VALUE: Final = re.compile(r"[\r\n\x00]")
_MAX_HEADER_FIELDS: Final = 100
_MAX_EMPTY_LINES: Final = 4
#: Framing is the server's business: these names are dropped from handler headers.
_FRAMING: Final = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive"})
_NO_BODY_STATUSES: Final = frozenset({204, 304})
_PARAM: Final = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One parsed request as a handler sees it (a GET/HEAD body is read and discarded)."""

    #: The method as sent, e.g. ``GET`` or ``HEAD`` (handlers see no other).
    method: str
    #: The percent-decoded path without the query, e.g. ``/metrics``.
    path: str
    #: Query parameters; a repeated name keeps its first value; blank values are kept.
    query: Mapping[str, str] = field(default_factory=dict)
    #: Header fields by lower-case name; repeated fields are joined with ``", "``.
    headers: Mapping[str, str] = field(default_factory=dict)
    #: The protocol version of the request, ``HTTP/1.1`` or ``HTTP/1.0``.
    version: str = "HTTP/1.1"
    #: Path parameters of a template route (``{name}`` -> its segment); empty otherwise.
    params: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True, kw_only=True)
class Response:
    """What a handler returns: a status, a content type, a body and extra headers.

    ``body`` is either ``bytes`` (sent with ``Content-Length``) or an async iterable of
    ``bytes`` sent as it is produced with chunked transfer-encoding (for server-sent
    events). The server closes an async generator body when the client goes away or the
    server stops; a gone client is noticed on the next write, so a long-lived stream
    should send something (an SSE comment) every few seconds.
    """

    #: The HTTP status code.
    status: int = 200
    #: The ``Content-Type`` header.
    content_type: str = "text/plain; charset=utf-8"
    #: The body: bytes, or an async iterable of bytes to stream.
    body: bytes | AsyncIterable[bytes] = b""
    #: Extra headers; ``Content-Length``, ``Transfer-Encoding`` and ``Connection`` are
    #: set by the server and ignored here.
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def text(
        cls, text: str, *, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> Response:
        """A ``text/plain`` UTF-8 response."""
        return cls(status=status, body=text.encode(), headers=headers or {})

    @classmethod
    def json(
        cls, data: object, *, status: int = 200, headers: Mapping[str, str] | None = None
    ) -> Response:
        """An ``application/json`` response of ``data`` (compact, UTF-8)."""
        body = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()
        return cls(status=status, content_type="application/json", body=body, headers=headers or {})

    @property
    def streaming(self) -> bool:
        """Whether the body is streamed (chunked) rather than sent whole."""
        return not isinstance(self.body, bytes)


#: A route handler: receives the request, returns the response.
Handler = Callable[[Request], Awaitable[Response]]


class _Reject(Exception):
    """The request cannot be served: answer ``status`` and close the connection."""

    def __init__(self, status: HTTPStatus, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _ClientGone(Exception):
    """The client closed the connection or stayed silent past a timeout."""


class HttpServer:
    """An HTTP/1.1 server on ``asyncio.start_server`` serving GET/HEAD routes."""

    def __init__(
        self,
        host: str,
        port: int,
        routes: Mapping[str, Handler] | None = None,
        *,
        keepalive_timeout: float = 75.0,
        request_timeout: float = 10.0,
        max_head_bytes: int = 8192,
        max_body_bytes: int = 64 * 1024,
        server_name: str = "flext-mesh",
        ssl: ssl_module.SSLContext | None = None,
    ) -> None:
        """Configure; nothing is bound until ``start()``.

        ``keepalive_timeout``: seconds an idle kept-alive connection waits for its next
        request (75 s outlives a 15-60 s Prometheus scrape interval); ``request_timeout``:
        seconds a client gets to send a whole request head (and body), and to finish a
        TLS handshake; ``max_head_bytes``: limit of the request line and, separately, of
        all header lines together; ``ssl``: serve HTTPS with this server-side context.
        """
        self.host = host.strip("[]")
        self.port = port
        self._routes: dict[str, Handler] = {}
        self._templates: dict[str, tuple[re.Pattern[str], Handler]] = {}
        for path, handler in (routes or {}).items():
            self.add_route(path, handler)
        self._ssl = ssl
        self._keepalive_timeout = keepalive_timeout
        self._request_timeout = request_timeout
        self._max_head_bytes = max_head_bytes
        self._max_body_bytes = max_body_bytes
        self._server_name = server_name
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self._closing = False
        self._stopped = asyncio.Event()

    @property
    def routes(self) -> Mapping[str, Handler]:
        """The route table, templates included (a read-only copy; see ``add_route``)."""
        templates = {path: handler for path, (_, handler) in self._templates.items()}
        return MappingProxyType({**self._routes, **templates})

    def add_route(self, path: str, handler: Handler) -> None:
        """Serve ``path`` with ``handler``: an exact path (``/api/v1/services``) or a
        template whose ``{name}`` parts each match one path segment
        (``/api/v1/services/{name}/report``). Adding a path again replaces its handler.
        """
        if not path.startswith("/"):
            raise ValueError(f"route path must start with '/': {path!r}")
        pattern = _template(path)
        if pattern is None:
            self._routes[path] = handler
        else:
            self._templates[path] = (pattern, handler)

    async def start(self) -> int:
        """Bind and start accepting; returns the bound port (port 0 picks a free one).

        Raises ``OSError`` when the address cannot be bound.
        """
        if self._server is not None or self._closing:
            raise RuntimeError("HttpServer.start() called twice")
        self._server = await asyncio.start_server(
            self._on_connection,
            self.host,
            self.port,
            # Bounds a single line in the stream buffer; lines over it are rejected.
            limit=self._max_head_bytes,
            reuse_address=True,
            ssl=self._ssl,
            ssl_handshake_timeout=self._request_timeout if self._ssl is not None else None,
        )
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        """Stop accepting and close every open connection (in-flight requests are
        cancelled). Idempotent; a concurrent second call waits for the first."""
        if self._closing:
            await self._stopped.wait()
            return
        self._closing = True
        try:
            if self._server is not None:
                self._server.close()
            tasks = list(self._connections)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._server is not None:
                await self._server.wait_closed()
        finally:
            self._stopped.set()

    async def __aenter__(self) -> HttpServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- one connection ------------------------------------------------------------

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is None or self._closing:
            writer.close()
            return
        self._connections[task] = writer
        try:
            await self._serve(reader, writer)
        except (_ClientGone, ConnectionError, TimeoutError):
            pass
        except asyncio.CancelledError:
            # stop() cancelled us: end normally, since asyncio 3.11's stream callback
            # calls task.exception(), which raises (and logs) on a cancelled task.
            if not self._closing:
                raise
        except Exception:
            _log.exception("http connection failed peer=%s", writer.get_extra_info("peername"))
        finally:
            self._connections.pop(task, None)
            writer.close()
            try:  # a client that reads nothing could hold a graceful close forever
                async with asyncio.timeout(1.0):
                    await writer.wait_closed()
            except Exception:
                writer.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Serve requests on one connection until it is closed or should be."""
        idle_timeout = self._request_timeout
        while not self._closing:
            try:
                request, keep_alive = await self._read_request(reader, idle_timeout)
            except _Reject as reject:
                _log.debug("http rejected status=%d detail=%s", reject.status, reject.detail)
                response = Response.text(
                    f"{reject.status.phrase}: {reject.detail}\n", status=reject.status
                )
                await self._send(
                    writer, response, head_only=False, version=(1, 1), keep_alive=False
                )
                await self._linger(reader, writer)
                return
            response = await self._dispatch(request)
            version = (1, 0) if request.version == "HTTP/1.0" else (1, 1)
            keep_alive = await self._send(
                writer,
                response,
                head_only=request.method == "HEAD",
                version=version,
                keep_alive=keep_alive and not self._closing,
            )
            if not keep_alive:
                return
            idle_timeout = self._keepalive_timeout

    def _route(self, request: Request) -> tuple[Handler, Request] | None:
        """The handler of the request's path, and the request with its path parameters."""
        handler = self._routes.get(request.path)
        if handler is not None:
            return handler, request
        for pattern, candidate in self._templates.values():
            matched = pattern.fullmatch(request.path)
            if matched is not None:
                return candidate, replace(request, params=matched.groupdict())
        return None

    async def _dispatch(self, request: Request) -> Response:
        routed = self._route(request)
        if routed is None:
            return Response.text("Not Found\n", status=404)
        handler, request = routed
        if request.method not in ("GET", "HEAD"):
            return Response.text("Method Not Allowed\n", status=405, headers={"Allow": "GET, HEAD"})
        try:
            response = await handler(request)
        except Exception:
            _log.exception("http handler failed method=%s path=%s", request.method, request.path)
            return Response.text("Internal Server Error\n", status=500)
        if not isinstance(response, Response):
            _log.error(
                "http handler returned %s, not a Response path=%s",
                type(response).__name__,
                request.path,
            )
            return Response.text("Internal Server Error\n", status=500)
        return response

    # -- reading -------------------------------------------------------------------

    async def _read_line(self, reader: asyncio.StreamReader, too_long: _Reject) -> bytes:
        try:
            return await reader.readuntil(b"\n")
        except asyncio.LimitOverrunError:
            raise too_long from None
        except asyncio.IncompleteReadError as exc:
            raise _ClientGone from exc

    async def _read_request(
        self, reader: asyncio.StreamReader, idle_timeout: float
    ) -> tuple[Request, bool]:
        """Read one request head (and discard its body); returns it and keep-alive."""
        uri_too_long = _Reject(HTTPStatus.REQUEST_URI_TOO_LONG, "request line too long")
        async with asyncio.timeout(idle_timeout):
            line = await self._read_line(reader, uri_too_long)
            for _ in range(_MAX_EMPTY_LINES):  # RFC 9112 2.2: ignore leading empty lines
                if line not in (b"\r\n", b"\n"):
                    break
                line = await self._read_line(reader, uri_too_long)
        async with asyncio.timeout(self._request_timeout):
            if len(line) > self._max_head_bytes:
                raise uri_too_long
            method, target, version = _parse_request_line(line)
            headers = await self._read_headers(reader)
            await self._discard_body(reader, headers)
        keep_alive = _keep_alive(version, headers.get("connection", ""))
        path, query = _parse_target(target)
        request = Request(
            method=method,
            path=path,
            query=query,
            headers=headers,
            version=f"HTTP/{version[0]}.{version[1]}",
        )
        return request, keep_alive

    async def _read_headers(self, reader: asyncio.StreamReader) -> dict[str, str]:
        too_large = _Reject(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "headers too large")
        headers: dict[str, str] = {}
        size = 0
        for _ in range(_MAX_HEADER_FIELDS + 1):
            line = await self._read_line(reader, too_large)
            size += len(line)
            if size > self._max_head_bytes:
                raise too_large
            if line in (b"\r\n", b"\n"):
                return headers
            name, value = _parse_header(line)
            if name in headers:
                if name in ("content-length", "host") and headers[name] != value:
                    raise _Reject(HTTPStatus.BAD_REQUEST, f"conflicting {name} headers")
                if name not in ("content-length", "host"):
                    headers[name] = f"{headers[name]}, {value}"
            else:
                headers[name] = value
        raise _Reject(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, "too many header fields")

    async def _discard_body(self, reader: asyncio.StreamReader, headers: Mapping[str, str]) -> None:
        if "transfer-encoding" in headers:
            raise _Reject(HTTPStatus.LENGTH_REQUIRED, "request bodies need a Content-Length")
        length = headers.get("content-length")
        if length is None:
            return
        if not length.isdigit() or not length.isascii():
            raise _Reject(HTTPStatus.BAD_REQUEST, "invalid Content-Length")
        size = int(length)
        if size > self._max_body_bytes:
            raise _Reject(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, "request body too large")
        if size:
            try:
                await reader.readexactly(size)
            except asyncio.IncompleteReadError as exc:
                raise _ClientGone from exc

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Half-close and drain what the client still sends, briefly, so that closing
        with unread input does not reset the connection before it reads the answer."""
        with contextlib.suppress(Exception):
            if writer.can_write_eof():
                writer.write_eof()
            async with asyncio.timeout(1.0):
                received = 0
                while received < 1024 * 1024:
                    chunk = await reader.read(65536)
                    if not chunk:
                        break
                    received += len(chunk)

    # -- writing -------------------------------------------------------------------

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        response: Response,
        *,
        head_only: bool,
        version: tuple[int, int],
        keep_alive: bool,
    ) -> bool:
        """Write ``response``; returns whether the connection may serve another request."""
        try:
            extra = _checked_headers(response.headers)
        except ValueError:
            _log.exception("http handler returned invalid headers")
            if isinstance(response.body, AsyncGenerator):
                await _close_stream(response.body)
            response = Response.text("Internal Server Error\n", status=500)
            extra = []
        status = response.status
        has_body = status not in _NO_BODY_STATUSES and status >= 200
        body = response.body
        chunked = False
        lines = [f"HTTP/1.1 {status} {_reason(status)}"]
        defaults = {"date": email.utils.formatdate(usegmt=True), "server": self._server_name}
        if has_body:
            defaults["content-type"] = response.content_type
        given = {name.lower() for name, _ in extra}
        lines.extend(f"{k.title()}: {v}" for k, v in defaults.items() if k not in given)
        lines.extend(f"{name}: {value}" for name, value in extra)
        if isinstance(body, bytes):
            if has_body:
                lines.append(f"Content-Length: {len(body)}")
        elif version >= (1, 1):
            chunked = True
            lines.append("Transfer-Encoding: chunked")
        else:
            keep_alive = False  # HTTP/1.0 has no chunking: the body ends at close
        if keep_alive:
            lines.append("Connection: keep-alive")
            if self._keepalive_timeout >= 1:  # tells clients when to stop reusing it
                lines.append(f"Keep-Alive: timeout={int(self._keepalive_timeout)}")
        else:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

        if isinstance(body, bytes):
            writer.writelines((head, body) if has_body and not head_only else (head,))
            await writer.drain()
            return keep_alive
        if head_only or not has_body:
            await _close_stream(body)
            writer.write(head)
            await writer.drain()
            return keep_alive
        writer.write(head)
        return await self._stream(writer, body, chunked=chunked) and keep_alive

    async def _stream(
        self, writer: asyncio.StreamWriter, body: AsyncIterable[bytes], *, chunked: bool
    ) -> bool:
        """Send a streamed body; returns False when it did not end cleanly."""
        iterator = aiter(body)
        try:
            await writer.drain()
            while True:
                try:
                    chunk = await anext(iterator)
                except StopAsyncIteration:
                    break
                except Exception:
                    # Headers are gone already: log, then cut the connection without
                    # the last chunk so the client sees a truncated body, not a whole one.
                    _log.exception("http streaming body failed")
                    return False
                if not chunk:
                    continue  # an empty chunk would end the body
                if chunked:
                    writer.writelines((b"%x\r\n" % len(chunk), chunk, b"\r\n"))
                else:
                    writer.write(chunk)
                await writer.drain()
            if chunked:
                writer.write(b"0\r\n\r\n")
                await writer.drain()
            return True
        finally:
            await _close_stream(iterator)


def _template(path: str) -> re.Pattern[str] | None:
    """The regex of a template route (``/a/{name}/b``), or None for an exact path."""
    if "{" not in path and "}" not in path:
        return None
    parts = _PARAM.split(path)  # literal, name, literal, name, ..., literal
    names = parts[1::2]
    literals = parts[0::2]
    if any("{" in text or "}" in text for text in literals):
        raise ValueError(f"malformed route template: {path!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"repeated parameter in route template: {path!r}")
    regex = "".join(
        re.escape(part) if index % 2 == 0 else f"(?P<{part}>[^/]+)"
        for index, part in enumerate(parts)
    )
    return re.compile(regex)


def _parse_request_line(line: bytes) -> tuple[str, str, tuple[int, int]]:
    parts = line.rstrip(b"\r\n").split(b" ")
    if len(parts) != 3:
        raise _Reject(HTTPStatus.BAD_REQUEST, "malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise _Reject(HTTPStatus.BAD_REQUEST, "malformed method")
    matched = _VERSION.fullmatch(version)
    if matched is None:
        raise _Reject(HTTPStatus.BAD_REQUEST, "malformed HTTP version")
    major, minor = int(matched[1]), int(matched[2])
    if major != 1:
        raise _Reject(HTTPStatus.HTTP_VERSION_NOT_SUPPORTED, "only HTTP/1.x is served")
    if not target or not all(0x21 <= byte < 0x7F for byte in target):
        raise _Reject(HTTPStatus.BAD_REQUEST, "malformed request target")
    return method.decode("ascii"), target.decode("ascii"), (major, minor)


def _parse_target(target: str) -> tuple[str, dict[str, str]]:
    if target.startswith("/"):
        raw_path, _, raw_query = target.partition("?")
        raw_path = raw_path.partition("#")[0]
    elif target.startswith(("http://", "https://")):  # absolute-form, RFC 9112 3.2.2
        parts = urlsplit(target)
        raw_path, raw_query = parts.path or "/", parts.query
    elif target == "*":
        return "*", {}
    else:
        raise _Reject(HTTPStatus.BAD_REQUEST, "malformed request target")
    query: dict[str, str] = {}
    try:
        pairs = parse_qsl(raw_query.partition("#")[0], keep_blank_values=True, errors="strict")
        for name, value in pairs:
            query.setdefault(name, value)
        path = unquote(raw_path, errors="strict")
    except (UnicodeDecodeError, ValueError) as exc:
        raise _Reject(HTTPStatus.BAD_REQUEST, "malformed request target") from exc
    return path, query


def _parse_header(line: bytes) -> tuple[str, str]:
    if line[:1] in (b" ", b"\t"):
        raise _Reject(HTTPStatus.BAD_REQUEST, "obsolete header line folding")
    name, colon, value = line.rstrip(b"\r\n").partition(b":")
    if not colon or not _TOKEN.fullmatch(name):
        raise _Reject(HTTPStatus.BAD_REQUEST, "malformed header field")
    text = value.strip(b" \t").decode("latin-1")
    if _BAD_VALUE.search(text):
        raise _Reject(HTTPStatus.BAD_REQUEST, "malformed header value")
    return name.decode("ascii").lower(), text


def _keep_alive(version: tuple[int, int], connection: str) -> bool:
    tokens = {token.strip().lower() for token in connection.split(",")}
    if version >= (1, 1):
        return "close" not in tokens
    return "keep-alive" in tokens


def _checked_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    checked: list[tuple[str, str]] = []
    for name, value in headers.items():
        if not _TOKEN.fullmatch(name.encode("latin-1", "replace")) or _BAD_VALUE.search(value):
            raise ValueError(f"invalid response header {name!r}")
        if name.lower() not in _FRAMING:
            checked.append((name, value))
    return checked


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


async def _close_stream(stream: AsyncIterable[bytes]) -> None:
    """Close an async generator body (runs its ``finally``); ignore other iterables."""
    if isinstance(stream, AsyncGenerator):
        with contextlib.suppress(Exception):
            await stream.aclose()
