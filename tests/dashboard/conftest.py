"""Helpers for the dashboard tests: a real HTTP client, a real SSE client, and the
orchestrator tests' in-process control plane with step servers (``flow``)."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from tests.orchestrator.conftest import Flow, flow

__all__ = ["Event", "EventStream", "Flow", "flow", "get", "get_json"]


async def get(
    url: str, headers: dict[str, str] | None = None, *, method: str = "GET"
) -> tuple[int, dict[str, str], bytes]:
    """One request with urllib in a worker thread; redirects are not followed."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args: Any, **kwargs: Any) -> None:
            return None

    def call() -> tuple[int, dict[str, str], bytes]:
        opener = urllib.request.build_opener(NoRedirect)
        request = urllib.request.Request(url, headers=headers or {}, method=method)
        try:
            with opener.open(request, timeout=10) as response:
                return (
                    response.status,
                    {k.lower(): v for k, v in response.headers.items()},
                    response.read(),
                )
        except urllib.error.HTTPError as exc:
            return exc.code, {k.lower(): v for k, v in exc.headers.items()}, exc.read()

    return await asyncio.to_thread(call)


async def get_json(url: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """Status and decoded JSON body; fails when the answer is not JSON."""
    status, response_headers, body = await get(url, headers)
    assert response_headers["content-type"] == "application/json", (status, body)
    return status, json.loads(body)


@dataclass
class Event:
    """One server-sent event (``name`` "comment" for a comment line)."""

    name: str
    data: Any
    id: str | None = None


@dataclass
class EventStream:
    """A server-sent events client on a raw connection: chunked framing, event parsing."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int
    headers: dict[str, str]
    body: bytes = b""
    _buffer: bytes = field(default=b"", repr=False)
    ended: bool = False

    @classmethod
    async def open(cls, port: int, path: str, headers: dict[str, str] | None = None) -> EventStream:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Accept: text/event-stream"]
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        status_line, *rest = head.decode("latin-1").split("\r\n")
        response_headers = {}
        for line in rest:
            if line:
                name, _, value = line.partition(":")
                response_headers[name.strip().lower()] = value.strip()
        stream = cls(reader, writer, int(status_line.split(" ")[1]), response_headers)
        if "content-length" in response_headers:
            stream.body = await reader.readexactly(int(response_headers["content-length"]))
            stream.ended = True
        return stream

    async def _chunk(self) -> bytes:
        size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
        data = await self.reader.readexactly(size + 2)
        if size == 0:
            self.ended = True
        return data[:-2]

    async def next(self, within: float = 5.0, *, comments: bool = False) -> Event | None:
        """The next event within ``within`` s (None once the server ended the stream);
        comments are skipped unless asked for."""
        async with asyncio.timeout(within):
            while True:
                while b"\n\n" in self._buffer:
                    block, self._buffer = self._buffer.split(b"\n\n", 1)
                    event = _parse(block.decode())
                    if event is not None and (comments or event.name != "comment"):
                        return event
                if self.ended:
                    return None
                self._buffer += await self._chunk()

    async def until(self, name: str, within: float = 5.0) -> Event:
        """Skip events until one named ``name`` (within ``within`` s)."""
        async with asyncio.timeout(within):
            while True:
                event = await self.next(within)
                assert event is not None, f"stream ended before a {name!r} event"
                if event.name == name:
                    return event

    def close(self) -> None:
        self.writer.close()


def _parse(block: str) -> Event | None:
    name, data, event_id, comment = "message", [], None, None
    for line in block.split("\n"):
        if line.startswith(":"):
            comment = line[1:].strip()
            continue
        key, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if key == "event":
            name = value
        elif key == "data":
            data.append(value)
        elif key == "id":
            event_id = value
    if data:
        return Event(name, json.loads("\n".join(data)), event_id)
    if comment is not None:
        return Event("comment", comment)
    return None  # e.g. the "retry:" line
