"""The stream line protocol, sans-IO: one JSON object per line, both ways.

Requests (client -> broker), streams named by job id::

    {"action": "listen", "stream": ID}                 header first, then every item
    {"action": "listen", "stream": ID, "after": SEQ}   the items after SEQ
    {"action": "hangup", "stream": ID}                 stop listening (no stream: all)
    {"action": "put", "stream": ID, "message": M, "token": T}
    {"action": "header", "stream": ID, "message": V, "token": T}
    {"action": "close", "stream": ID, "token": T}      end a stream that is not a job's
    {"action": "delete", "stream": ID, "token": T}     drop a stream (not a running job's)

``M`` is a stream entry (``{"kind": "progress"|"log"|"partial", ...}``) or
any other JSON value, which is put as a ``partial``. ``put``, ``header``,
``close`` and ``delete`` need the job's stream token or the broker's token.

Replies (broker -> client): ``{"action": "header"|"put"|"close"|"gap",
"stream": ID, "message": ITEM}`` (items as in :mod:`corral.streams.messages`)
and ``{"action": "error", "error": TEXT, "line": N}`` for a request that was
refused; the connection stays open.
"""

from __future__ import annotations

from typing import Any

import msgspec

from corral.streams.messages import (
    MAX_ENTRY,
    Entry,
    EntryError,
    HeaderEntry,
    PartialEntry,
    decode_entry,
)

#: Longest request line accepted (bytes); longer ones are refused and skipped.
MAX_LINE = 256 * 1024
ACTIONS = ("header", "delete", "put", "listen", "hangup", "close")

_encode = msgspec.json.Encoder().encode
_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_any = msgspec.json.Decoder()


class LineError(ValueError):
    """A request line that cannot be served; ``reason`` is a short stable code."""

    def __init__(self, reason: str, detail: str, stream: str | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.stream = stream


class Request(msgspec.Struct, kw_only=True):
    action: str
    stream: str | None = None
    after: int | None = None
    token: str | None = None
    #: For put: the entry; for header: a ``header`` entry with the value.
    entry: Entry | None = None


class LineBuffer:
    """Splits a byte stream into lines, refusing (and skipping) over-long ones."""

    __slots__ = ("_buf", "_skipping", "max_line")

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._skipping = False
        self.max_line = max_line

    def feed(self, data: bytes) -> list[bytes | LineError]:
        """Complete lines (without the newline) and errors, in arrival order."""
        out: list[bytes | LineError] = []
        buf = self._buf
        buf += data
        start = 0
        while True:
            end = buf.find(b"\n", start)
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            elif end - start > self.max_line:
                out.append(LineError("too-long", f"a line longer than {self.max_line} bytes"))
            else:
                out.append(bytes(buf[start:end]))
            start = end + 1
        del buf[:start]
        if len(buf) > self.max_line:
            buf.clear()
            if not self._skipping:
                self._skipping = True
                out.append(LineError("too-long", f"a line longer than {self.max_line} bytes"))
        return out


def _stream_name(raw: msgspec.Raw | None) -> str | None:
    if raw is None:
        return None
    name = _any.decode(raw)
    if not isinstance(name, str) or not name or len(name) > 256 or not name.isprintable():
        raise LineError("bad-stream", "'stream' must be 1-256 printable characters")
    return name


def parse_request(line: bytes) -> Request:
    """One request line; raises :class:`LineError` with a reason and a detail."""
    line = line.strip()
    try:
        fields = _decoder.decode(line)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
        raise LineError("bad-json", "a request is one JSON object per line") from None
    try:
        action = _any.decode(fields["action"]) if "action" in fields else None
        if action not in ACTIONS:
            raise LineError("bad-action", f"'action' must be one of {', '.join(ACTIONS)}")
        stream = _stream_name(fields.get("stream"))
    except msgspec.DecodeError:
        raise LineError("bad-json", "a request is one JSON object per line") from None
    if stream is None and action != "hangup":
        raise LineError("bad-stream", f"{action} needs a 'stream'")
    request = Request(action=action, stream=stream)
    token = fields.get("token")
    if token is not None:
        value = _any.decode(token)
        if not isinstance(value, str) or len(value) > 256:
            raise LineError("bad-token", "'token' must be a string", stream)
        request.token = value
    if action == "listen" and "after" in fields:
        after = _any.decode(fields["after"])
        if after is not None and (isinstance(after, bool) or not isinstance(after, int)):
            raise LineError("bad-after", "'after' must be a sequence number or null", stream)
        if after is not None and not 0 <= after < 1 << 62:
            raise LineError("bad-after", "'after' must be >= 0", stream)
        request.after = after
    if action in ("put", "header"):
        if "message" not in fields:
            raise LineError("bad-message", f"{action} needs a 'message'", stream)
        request.entry = _entry(action, fields["message"], stream)
    return request


def _entry(action: str, raw: msgspec.Raw, stream: str) -> Entry:
    if len(raw) > MAX_ENTRY:
        raise LineError("too-big", f"a message of {len(raw)} bytes exceeds {MAX_ENTRY}", stream)
    if action == "header":
        return HeaderEntry(value=raw)
    if bytes(raw).startswith(b"{") and _has_kind(raw):
        try:
            return decode_entry(raw)
        except EntryError as exc:
            raise LineError("bad-message", str(exc), stream) from None
    return PartialEntry(value=raw)


def _has_kind(raw: msgspec.Raw) -> bool:
    value = _any.decode(raw)
    return isinstance(value, dict) and "kind" in value


# ---------------------------------------------------------------- replies


def error_line(reason: str, detail: str, line: int, stream: str | None = None) -> bytes:
    reply: dict[str, Any] = {"action": "error", "error": f"{reason}: {detail}", "line": line}
    if stream is not None:
        reply["stream"] = stream
    return _encode(reply) + b"\n"


def _prefix(action: bytes, stream: str) -> bytes:
    return b'{"action":"' + action + b'","stream":' + _encode(stream) + b',"message":'


class Framer:
    """Turns hub deliveries for one stream into reply lines (no re-encoding of items)."""

    __slots__ = ("put", "header", "close", "gap")

    def __init__(self, stream: str) -> None:
        self.put = _prefix(b"put", stream)
        self.header = _prefix(b"header", stream)
        self.close = _prefix(b"close", stream)
        self.gap = _prefix(b"gap", stream)

    def lines(self, head: list[bytes], items: list[bytes], tail: bytes | None) -> bytes:
        parts: list[bytes] = []
        for item in head:
            prefix = self.gap if item.startswith(b'{"kind":"gap"') else self.header
            parts += (prefix, item, b"}\n")
        if items:
            parts += (self.put, (b"}\n" + self.put).join(items), b"}\n")
        if tail is not None:
            parts += (self.close, tail, b"}\n")
        return b"".join(parts)
