"""The control plane's HTTP port (``/metrics``, the dashboard and its JSON API): aiohttp's
server, run on the gRPC server's event loop.

Routes are ``GET`` (and so ``HEAD``) handlers keyed by path, or ``POST`` handlers keyed
by ``"POST "`` and the path; a path may hold ``{name}`` parts, each matching one
segment (``request.match_info["name"]``). What the server answers by itself is JSON in
the dashboard's error document, like the API's own errors::

    404 NOT_FOUND          no route for the path
    405 UNIMPLEMENTED      a method the path does not answer (with ``Allow``)
    411 INVALID_ARGUMENT   a request body without Content-Length
    413 RESOURCE_EXHAUSTED a request body over ``max_body_bytes``
    500 INTERNAL           the handler raised (logged once; serving goes on)

A request aiohttp cannot parse (a malformed line, a line or header over
``max_head_bytes``, over 100 header fields) gets aiohttp's plain-text 400, logged at
debug level only: a client's garbage is not the server's error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl as ssl_module
from collections.abc import AsyncGenerator, Mapping
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.typedefs import Handler

from flext_mesh.dashboard.assets import SECURITY_HEADERS

__all__ = ["API_HEADERS", "POST", "WebServer", "error_response", "json_response", "send_stream"]

_log = logging.getLogger("flext_mesh.http")

#: Headers of every JSON answer: the security headers, and never cached.
API_HEADERS: Final = {**SECURITY_HEADERS, "Cache-Control": "no-store"}
#: The prefix of a POST route's key (``"POST /api/v1/..."``).
POST: Final = "POST "
#: Set when the server starts stopping: open streams end then.
_STOPPING: Final = web.AppKey("stopping", asyncio.Event)
#: The gRPC status name of each HTTP error the server answers by itself.
_STATUS_NAMES: Final = {
    400: "INVALID_ARGUMENT",
    404: "NOT_FOUND",
    405: "UNIMPLEMENTED",
    411: "INVALID_ARGUMENT",
    413: "RESOURCE_EXHAUSTED",
}
_MAX_HEADER_FIELDS: Final = 100


def json_response(
    document: object, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    """An ``application/json`` response of ``document`` (compact, UTF-8)."""
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
    return web.Response(
        status=status,
        body=body,
        headers={**API_HEADERS, **(headers or {}), "Content-Type": "application/json"},
    )


def error_response(
    status: int, code: str, message: str, *, headers: Mapping[str, str] | None = None
) -> web.Response:
    """The error document ``{"error": {"code", "status", "message"}}`` with ``status``."""
    document = {"error": {"code": status, "status": code, "message": message}}
    return json_response(document, status=status, headers=headers)


async def send_stream(
    request: web.Request, body: AsyncGenerator[bytes, None], *, headers: Mapping[str, str]
) -> web.StreamResponse:
    """Send ``body`` as it is produced (chunked) until it ends, the client goes away or
    the server stops (the stream then ends with its last chunk); ``body`` is closed in
    every case.

    A body that raises cuts the connection without the last chunk (logged once), so the
    client sees a truncated stream rather than a whole one. A gone client is noticed on
    the next write: a long-lived stream should send something every few seconds.
    """
    response = web.StreamResponse(headers=headers)
    async with contextlib.aclosing(body):
        if request.method == "HEAD":
            return response
        await response.prepare(request)
        sending = asyncio.create_task(_send(response, body), name="http-stream")
        stopping = asyncio.create_task(request.app[_STOPPING].wait(), name="http-stopping")
        try:
            await asyncio.wait((sending, stopping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            sending.cancel()
            stopping.cancel()
            await asyncio.wait((sending, stopping))
        error = None if sending.cancelled() else sending.exception()
        if error is not None and not isinstance(error, ConnectionError):
            _log.error("http stream failed path=%s", request.path, exc_info=error)
            if request.transport is not None:
                request.transport.close()
    return response


async def _send(response: web.StreamResponse, body: AsyncGenerator[bytes, None]) -> None:
    async for chunk in body:
        if chunk:  # an empty chunk would end the body
            await response.write(chunk)


@web.middleware
async def _answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse request bodies over the limit, answer HTTP errors with the JSON error
    document, and turn a handler's exception into a 500 logged once."""
    try:
        if request.body_exists:
            length = request.content_length
            if length is None:
                raise web.HTTPLengthRequired(text="request bodies need a Content-Length")
            if length > request.client_max_size:
                raise web.HTTPRequestEntityTooLarge(
                    max_size=request.client_max_size, actual_size=length
                )
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        code = _STATUS_NAMES.get(exc.status, "UNKNOWN")
        return error_response(exc.status, code, _message(request, exc), headers=headers)
    except ConnectionError:
        raise  # the client went away: nobody to answer
    except Exception:
        _log.exception("http handler failed method=%s path=%s", request.method, request.path)
        return error_response(500, "INTERNAL", "internal error; the server log says more")


def _message(request: web.Request, exc: web.HTTPException) -> str:
    if isinstance(exc, web.HTTPNotFound):
        return f"nothing is served at {request.path}"
    if isinstance(exc, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(exc.allowed_methods))
        return f"method {request.method} is not allowed at {request.path}: it answers {allowed}"
    return exc.text or exc.reason


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers["Server"] = "flext-mesh"


class _ClientFaultsAtDebug(logging.LoggerAdapter[logging.Logger]):
    """aiohttp's connection logger: a malformed request or a client that left is logged
    at debug level, not as the server's error with a traceback."""

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if isinstance(kwargs.get("exc_info"), HttpProcessingError | ConnectionError):
            level = min(level, logging.DEBUG)
        super().log(level, msg, *args, **kwargs)


class WebServer:
    """aiohttp serving ``routes`` on ``host:port``, optionally HTTPS."""

    def __init__(
        self,
        host: str,
        port: int,
        routes: Mapping[str, Handler],
        *,
        ssl: ssl_module.SSLContext | None = None,
        keepalive_timeout: float = 75.0,
        max_head_bytes: int = 8190,
        max_body_bytes: int = 64 * 1024,
        shutdown_timeout: float = 2.0,
    ) -> None:
        """Configure; nothing is bound until ``start()``.

        ``keepalive_timeout``: seconds a connection may stay without a whole request
        (idle between requests, or sending its head too slowly) before it is closed; 75 s
        outlives a 15-60 s Prometheus scrape interval. ``max_head_bytes``: limit of the
        request line and of each header line. ``shutdown_timeout``: seconds ``stop()``
        lets requests in flight finish before cancelling them (open streams end at once).
        """
        self.host = host.strip("[]")
        self.port = port
        self._routes = dict(routes)
        self._ssl = ssl
        self._keepalive_timeout = keepalive_timeout
        self._max_head_bytes = max_head_bytes
        self._max_body_bytes = max_body_bytes
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Bind and start serving; returns the bound port (port 0 picks a free one).

        Raises ``OSError`` when the address cannot be bound.
        """
        if self._runner is not None:
            raise RuntimeError("WebServer.start() called twice")
        app = web.Application(client_max_size=self._max_body_bytes, middlewares=[_answer_errors])
        for path, handler in self._routes.items():
            if path.startswith(POST):
                app.router.add_post(path.removeprefix(POST), handler)
            else:
                app.router.add_get(path, handler)
        stopping = app[_STOPPING] = asyncio.Event()

        async def on_shutdown(app: web.Application) -> None:
            stopping.set()

        app.on_shutdown.append(on_shutdown)
        app.on_response_prepare.append(_server_header)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            logger=_ClientFaultsAtDebug(logging.getLogger("flext_mesh.http.protocol")),
            keepalive_timeout=self._keepalive_timeout,
            max_line_size=self._max_head_bytes,
            max_field_size=self._max_head_bytes,
            max_headers=_MAX_HEADER_FIELDS,
            # After refusing a body, read what the client still sends for this long
            # before closing, so that it reads the answer rather than a reset.
            lingering_time=1.0,
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port, ssl_context=self._ssl).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        """Stop accepting, end open streams, let requests in flight finish within
        ``shutdown_timeout`` and close every connection. Idempotent."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> WebServer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
