"""The broker's TCP line server for job streams: sockets only, decisions elsewhere.

Each connection's bytes go through a :class:`~corral.streams.lines.LineBuffer`
and :func:`~corral.streams.lines.parse_request`; requests and bad lines go to
:class:`~corral.broker.streams.BrokerStreams`, which answers through its
``tcp_out``. A connection whose socket buffer fills pauses its listeners
(they overflow in the hub, never here); one that keeps sending without
reading its error lines is closed once its unread output passes a bound.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import logging
import socket
from collections.abc import Callable
from urllib.parse import urlsplit

from corral.broker.streams import BrokerStreams
from corral.streams.lines import LineBuffer, LineError, parse_request

log = logging.getLogger("corral.broker")

DEFAULT_STREAMS = "tcp://127.0.0.1:47295"
#: Unread output (bytes) after which a connection is dropped.
MAX_UNREAD = 8 * 1024 * 1024
SNDBUF = 256 * 1024


class AddressInUse(RuntimeError):
    pass


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    parts = urlsplit(endpoint)
    if parts.scheme != "tcp" or not parts.hostname or parts.port is None:
        raise ValueError(f"{endpoint!r}: give the stream server as tcp://HOST:PORT")
    host = "0.0.0.0" if parts.hostname == "*" else parts.hostname
    return host, parts.port


class LineServer:
    """Serves the line protocol on ``endpoint`` for ``streams``; ``flush`` sends output."""

    def __init__(self, streams: BrokerStreams, endpoint: str, flush: Callable[[], None]) -> None:
        self.streams = streams
        self.endpoint = endpoint
        self.flush = flush
        self.sock: socket.socket | None = None
        self.server: asyncio.AbstractServer | None = None
        self.transports: dict[int, asyncio.Transport] = {}
        self._ids = itertools.count(1)

    def bind(self) -> None:
        host, port = parse_endpoint(self.endpoint)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(
                    f"{self.endpoint} is already in use: another broker may be running, "
                    f"or choose another address with --streams"
                ) from None
            raise
        sock.listen(512)
        sock.setblocking(False)
        self.sock = sock

    async def start(self) -> None:
        if self.sock is None:
            self.bind()
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(lambda: _Connection(self), sock=self.sock)

    def write_out(self) -> None:
        streams = self.streams
        # Listeners get their items in chunks of credit, refilled while the socket takes
        # them; a full socket pauses its listeners (see _Connection.pause_writing).
        while streams.tcp_out:
            out, streams.tcp_out = streams.tcp_out, {}
            for conn, chunks in out.items():
                transport = self.transports.get(conn)
                if transport is None or transport.is_closing():
                    continue
                transport.write(b"".join(chunks))
                if transport.get_write_buffer_size() > MAX_UNREAD:
                    log.warning("stream connection %d does not read its replies; closed", conn)
                    transport.abort()
                    continue
                streams.refill(conn)
            streams.pump()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        elif self.sock is not None:
            self.sock.close()
        self.sock = None
        for transport in list(self.transports.values()):
            transport.abort()


class _Connection(asyncio.Protocol):
    def __init__(self, server: LineServer) -> None:
        self.server = server
        self.id = next(server._ids)
        self.lines = LineBuffer()
        self.count = 0
        self.logged: set[str] = set()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Bound what the kernel holds for a listener that stops reading, so that its
            # backlog shows in the hub (and overflows there) instead of in socket buffers.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        self.server.transports[self.id] = transport
        self.server.streams.connection_made(self.id)

    def data_received(self, data: bytes) -> None:
        streams = self.server.streams
        for item in self.lines.feed(data):
            self.count += 1
            if isinstance(item, LineError):
                self._bad(item)
                continue
            if not item.strip():
                continue
            try:
                request = parse_request(item)
            except LineError as exc:
                self._bad(exc)
                continue
            try:
                streams.line_request(self.id, request, self.count)
            except Exception:  # noqa: BLE001 - one bad request must not end the server
                log.exception("stream request on connection %d failed", self.id)
                self._bad(LineError("internal-error", "the broker failed on it"))
        self.server.flush()

    def _bad(self, error: LineError) -> None:
        if error.reason not in self.logged:
            self.logged.add(error.reason)
            peer = self.transport.get_extra_info("peername") if self.transport else None
            log.info(
                "bad line %d from stream connection %s: %s: %s (further ones are counted)",
                self.count,
                peer,
                error.reason,
                error.detail,
            )
        self.server.streams.bad_line(self.id, error, self.count)

    def pause_writing(self) -> None:
        self.server.streams.pause(self.id, True)

    def resume_writing(self) -> None:
        self.server.streams.pause(self.id, False)
        self.server.flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.transports.pop(self.id, None)
        self.server.streams.connection_lost(self.id)
