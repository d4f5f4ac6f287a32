"""A TCP proxy on loopback whose connections a test can cut abruptly.

It sits between gRPC clients and a real control plane and copies bytes both ways;
:meth:`TcpProxy.cut` aborts every proxied connection at once (both sockets closed with
RST, no FIN, nothing flushed), as a network failure or a crashed middlebox would.
New connections are accepted again right away, so clients reconnect through it.
``source_host`` makes the upstream connections come from another loopback address
(e.g. ``127.0.0.2``), so the control plane sees a different client address.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct


class TcpProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream``; :meth:`cut` drops every connection."""

    def __init__(self, upstream_host: str, upstream_port: int, *, source_host: str = "") -> None:
        self.upstream = (upstream_host, upstream_port)
        self.source_host = source_host
        self.port = 0
        self.connections = 0
        self.cuts = 0
        self._server: asyncio.Server | None = None
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        """``127.0.0.1:port`` to point clients at."""
        return f"127.0.0.1:{self.port}"

    async def start(self) -> TcpProxy:
        """Listen on a free loopback port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        """Stop listening and drop every connection."""
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def __aenter__(self) -> TcpProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def open_connections(self) -> int:
        """Connections being proxied now."""
        return len(self._pairs)

    def cut(self) -> int:
        """Abort every proxied connection now (RST both ways); returns how many."""
        pairs, self._pairs = self._pairs, set()
        for client, upstream in pairs:
            for writer in (client, upstream):
                _reset(writer)
        self.cuts += 1
        return len(pairs)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        local = (self.source_host, 0) if self.source_host else None
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.upstream, local_addr=local)
        except OSError:
            _reset(writer)
            return
        self.connections += 1
        pair = (writer, up_writer)
        self._pairs.add(pair)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
        finally:
            self._tasks.discard(task)
            if pair in self._pairs:
                self._pairs.discard(pair)
                for w in pair:
                    w.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until EOF or error; an orderly EOF is passed on as a half-close."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER 0, then abort (no FIN, buffered bytes discarded)."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
