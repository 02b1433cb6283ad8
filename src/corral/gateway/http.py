"""JSON-RPC over HTTP: ``POST /rpc`` on a small HTTP/1.1 server (asyncio streams only).

One JSON-RPC message per request body (``Content-Length`` required); the
answer is ``200`` with ``application/json``, or ``204`` when nothing is owed
(only notifications). JSON-RPC errors, parse errors included, are ``200``
answers carrying the error object, as the JSON-RPC-over-HTTP convention has
it; HTTP errors are for HTTP problems: ``404`` (another path), ``405``
(another method), ``411`` (no length), ``413`` (too large), ``400`` (a
malformed request). Connections are kept alive (HTTP/1.1) and closed after
``idle`` seconds of silence.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("corral.gateway")

PATH = "/rpc"
MAX_HEAD = 16 * 1024
MAX_HEADERS = 100

_REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    411: "Length Required",
    413: "Content Too Large",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    505: "HTTP Version Not Supported",
}


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_address(text: str) -> tuple[str, int]:
    """``"HOST:PORT"``, ``":PORT"`` or ``"PORT"`` (host 127.0.0.1); raises ValueError."""
    text = text.strip().removeprefix("http://").rstrip("/")
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = "", text
    host = host.strip("[]") or "127.0.0.1"
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} out of range")
    return host, number


class HttpServer:
    """Serves ``handle(body) -> answer | None`` at ``POST /rpc``."""

    def __init__(
        self,
        handle: Callable[[bytes], Awaitable[bytes | None]],
        *,
        max_body: int,
        idle: float = 60.0,
    ) -> None:
        self.handle = handle
        self.max_body = max_body
        self.idle = idle
        self.server: asyncio.Server | None = None
        self.requests = 0
        self.bad_requests = 0
        self._connections: set[asyncio.StreamWriter] = set()

    async def start(self, host: str, port: int) -> None:
        self.server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            for writer in list(self._connections):
                writer.close()
            await self.server.wait_closed()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._connections.add(writer)
        try:
            while await self._one(reader, writer):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        except _BadRequest as exc:
            self.bad_requests += 1
            await self._respond(writer, exc.status, str(exc).encode() + b"\n", "text/plain", False)
        except Exception:  # noqa: BLE001 - one connection must not take the server down
            log.exception("HTTP connection failed")
        finally:
            self._connections.discard(writer)
            writer.close()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; whether to keep the connection for another."""
        try:
            line = await asyncio.wait_for(reader.readline(), self.idle)
        except ValueError:
            raise _BadRequest(431, "request line too long") from None
        if not line:
            return False
        parts = line.decode("latin-1").strip().split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            if len(parts) == 3 and parts[2].startswith("HTTP/"):
                raise _BadRequest(505, "only HTTP/1.x is served")
            raise _BadRequest(400, "malformed request line")
        method, target, version = parts
        if not (method.isascii() and method.isalpha() and method.isupper()):
            raise _BadRequest(400, "malformed method")
        if not target.startswith("/"):
            raise _BadRequest(400, "malformed request target")
        headers = await self._headers(reader)
        keep = version == "HTTP/1.1"
        connection = headers.get("connection", "").lower()
        if "close" in connection:
            keep = False
        elif "keep-alive" in connection:
            keep = True
        if "transfer-encoding" in headers:
            raise _BadRequest(411, "send the body with a Content-Length")
        length_text = headers.get("content-length")
        if length_text is None:
            length = 0
        elif not length_text.isdigit():
            raise _BadRequest(400, "malformed Content-Length")
        else:
            length = int(length_text)
        self.requests += 1
        path = target.split("?", 1)[0]
        if path != PATH:
            await self._skip(reader, length)
            await self._respond(
                writer, 404, b"JSON-RPC is served at POST /rpc\n", "text/plain", keep
            )
            return keep
        if method != "POST":
            await self._skip(reader, length)
            await self._respond(
                writer, 405, b"use POST\n", "text/plain", keep, extra=b"Allow: POST\r\n"
            )
            return keep
        if length_text is None:
            raise _BadRequest(411, "send the body with a Content-Length")
        if length > self.max_body:
            raise _BadRequest(413, f"the body exceeds {self.max_body} bytes")
        expect = headers.get("expect", "").lower()
        if expect == "100-continue":
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        elif expect:
            raise _BadRequest(417, "unsupported Expect")
        body = await asyncio.wait_for(reader.readexactly(length), self.idle)
        answer = await self.handle(body)
        if answer is None:
            await self._respond(writer, 204, b"", None, keep)
        else:
            await self._respond(writer, 200, answer, "application/json", keep)
        return keep

    async def _headers(self, reader: asyncio.StreamReader) -> dict[str, str]:
        headers: dict[str, str] = {}
        size = 0
        for _ in range(MAX_HEADERS + 1):
            try:
                line = await asyncio.wait_for(reader.readline(), self.idle)
            except ValueError:
                raise _BadRequest(431, "header line too long") from None
            size += len(line)
            if size > MAX_HEAD:
                raise _BadRequest(431, "headers too large")
            if line in (b"\r\n", b"\n"):
                return headers
            if not line:
                raise asyncio.IncompleteReadError(b"", None)
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep or not name.strip() or name != name.strip():
                raise _BadRequest(400, "malformed header line")
            headers[name.lower()] = value.strip()
        raise _BadRequest(431, "too many headers")

    async def _skip(self, reader: asyncio.StreamReader, length: int) -> None:
        if length > self.max_body:
            raise _BadRequest(413, f"the body exceeds {self.max_body} bytes")
        if length:
            await asyncio.wait_for(reader.readexactly(length), self.idle)

    @staticmethod
    async def _respond(
        writer: asyncio.StreamWriter,
        status: int,
        body: bytes,
        content_type: str | None,
        keep: bool,
        extra: bytes = b"",
    ) -> None:
        head = f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\n".encode()
        if content_type is not None:
            head += f"Content-Type: {content_type}\r\n".encode()
        if status != 204:
            head += f"Content-Length: {len(body)}\r\n".encode()
        head += b"Connection: keep-alive\r\n" if keep else b"Connection: close\r\n"
        writer.write(head + extra + b"\r\n" + body)
        await writer.drain()
