"""Job-stream messages: what producers send, what listeners receive, and their JSON.

Every item of a stream is a JSON object with a ``kind``:

* ``progress`` ``{"done", "total", "units"}``, ``log`` ``{"text", "level",
  "logger", "source", "time"}``, ``partial`` ``{"value"}``: put by the job
  (or a network producer); each gets the next ``seq`` of its stream.
* ``header`` ``{"seq", "progress", "partial", "value", "close"}``: the state of
  the stream as of ``seq`` (latest progress, latest partial, the value set
  with ``set_header``, the final close). A listener receives it first; a
  ``set_header`` also puts a new header in the stream.
* ``close`` ``{"seq", "reason", "state", "outcome"}``: the end of the stream
  (``seq`` set: the job ended, ``outcome`` as in a REPLY) or of one listener
  (``seq`` null: ``overflow``, ``deleted``, ``unknown``...).
* ``gap`` ``{"after", "first"}``: items after ``after`` and before ``first``
  are no longer kept; a header follows.

Values (``partial``, header ``value``) are JSON produced by
:mod:`corral.codec`; the broker never decodes them. The typed classes at the
end (:class:`Header`, :class:`Progress`, ...) are what Python listeners get.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import msgspec

from corral.codec import Codec
from corral.codec import default as default_codec

#: Largest encoded producer entry the broker accepts (bytes).
MAX_ENTRY = 64 * 1024
#: JSON ``null`` as a raw value (msgspec cannot take ``Raw | None``).
NULL = msgspec.Raw(b"null")
LEVELS = ("debug", "info", "warning", "error", "critical")


class ProgressEntry(msgspec.Struct, tag="progress", tag_field="kind", kw_only=True):
    seq: int | None = None
    done: int | float
    total: int | float | None = None
    units: str | None = None


class LogEntry(msgspec.Struct, tag="log", tag_field="kind", kw_only=True):
    seq: int | None = None
    text: str
    level: str = "info"
    logger: str | None = None
    #: ``log`` (corral.runtime.log or a logging record), ``stdout`` or ``stderr``.
    source: str = "log"
    time: float | None = None


class PartialEntry(msgspec.Struct, tag="partial", tag_field="kind", kw_only=True):
    seq: int | None = None
    value: msgspec.Raw


class HeaderEntry(msgspec.Struct, tag="header", tag_field="kind", kw_only=True):
    """A producer's ``set_header(value)``."""

    seq: int | None = None
    value: msgspec.Raw


Entry = ProgressEntry | LogEntry | PartialEntry | HeaderEntry


class CloseItem(msgspec.Struct, tag="close", tag_field="kind", kw_only=True):
    seq: int | None = None
    reason: str
    state: str | None = None
    outcome: msgspec.Raw = NULL


class HeaderItem(msgspec.Struct, tag="header", tag_field="kind", kw_only=True):
    seq: int
    progress: ProgressEntry | None = None
    partial: msgspec.Raw = NULL
    value: msgspec.Raw = NULL
    close: CloseItem | None = None


class GapItem(msgspec.Struct, tag="gap", tag_field="kind", kw_only=True):
    after: int
    first: int


class EntryError(ValueError):
    """A producer entry that is not valid (the text says why)."""


encode = msgspec.json.Encoder().encode
_entry_decoder = msgspec.json.Decoder(Entry)
#: A worker's STREAM batch: ``[[job_id, run, first_pseq, [entry, ...]], ...]``.
_batch_decoder = msgspec.json.Decoder(list[tuple[str, str, int, list[msgspec.Raw]]])


def check_entry(entry: Entry) -> Entry:
    """Validate the fields msgspec cannot (ranges, sizes); returns ``entry``."""
    if isinstance(entry, ProgressEntry):
        for name in ("done", "total"):
            value = getattr(entry, name)
            if value is not None and (not math.isfinite(value) or value < 0):
                raise EntryError(f"progress {name} must be a finite number >= 0")
        if entry.units is not None and len(entry.units) > 64:
            raise EntryError("progress units are at most 64 characters")
    elif isinstance(entry, LogEntry):
        if entry.level not in LEVELS:
            raise EntryError(f"log level must be one of {', '.join(LEVELS)}")
        if entry.source not in ("log", "stdout", "stderr"):
            raise EntryError("log source must be log, stdout or stderr")
        if entry.logger is not None and len(entry.logger) > 256:
            raise EntryError("logger names are at most 256 characters")
    entry.seq = None
    return entry


def decode_entry(raw: bytes | msgspec.Raw) -> Entry:
    """One producer entry from JSON; raises :class:`EntryError`."""
    if len(raw) > MAX_ENTRY:
        raise EntryError(f"an entry of {len(raw)} bytes exceeds {MAX_ENTRY}")
    try:
        return check_entry(_entry_decoder.decode(raw))
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise EntryError(f"not a stream entry: {exc}") from None


def decode_batch(raw: bytes) -> list[tuple[str, str, int, list[Entry]]]:
    """A worker's STREAM batch; raises :class:`EntryError` if any part is bad."""
    try:
        groups = _batch_decoder.decode(raw)
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError) as exc:
        raise EntryError(f"not a stream batch: {exc}") from None
    out = []
    for job_id, run, pseq, entries in groups:
        if not job_id or len(job_id) > 256 or len(run) > 64 or pseq < 1:
            raise EntryError("a batch group needs a job id, a run id and a pseq >= 1")
        out.append((job_id, run, pseq, [decode_entry(e) for e in entries]))
    return out


# ---------------------------------------------------------------- typed messages


@dataclass(frozen=True, slots=True)
class Progress:
    seq: int
    done: float
    total: float | None
    units: str | None

    @property
    def fraction(self) -> float | None:
        """``done / total`` (``None`` without a positive total)."""
        return self.done / self.total if self.total else None


@dataclass(frozen=True, slots=True)
class Log:
    seq: int
    text: str
    level: str
    logger: str | None
    source: str
    time: float | None


@dataclass(frozen=True, slots=True)
class Partial:
    seq: int
    value: Any


@dataclass(frozen=True, slots=True)
class Close:
    """The end: of the stream (``seq`` set; the job's ``state`` and ``outcome``)
    or of this listener only (``seq`` ``None``; ``reason`` ``overflow``, ``deleted``...)."""

    seq: int | None
    reason: str
    state: str | None
    outcome: dict[str, Any] | None

    @property
    def ok(self) -> bool:
        """Whether the job succeeded."""
        return self.state == "succeeded"


@dataclass(frozen=True, slots=True)
class Header:
    """The stream's state as of ``seq``."""

    seq: int
    progress: Progress | None
    partial: Any
    value: Any
    close: Close | None


@dataclass(frozen=True, slots=True)
class Gap:
    """Items after ``after`` and before ``first`` were not kept; a :class:`Header` follows."""

    after: int
    first: int


Message = Header | Progress | Log | Partial | Close | Gap

_item_decoder = msgspec.json.Decoder(
    ProgressEntry | LogEntry | PartialEntry | HeaderItem | CloseItem | GapItem
)
_items_decoder = msgspec.json.Decoder(
    list[ProgressEntry | LogEntry | PartialEntry | HeaderItem | CloseItem | GapItem]
)
_plain = msgspec.json.Decoder()


def _value(raw: msgspec.Raw, codec: Codec) -> Any:
    return codec.decode(bytes(raw))


def _progress(p: ProgressEntry, seq: int) -> Progress:
    return Progress(seq, p.done, p.total, p.units)


def _close(c: CloseItem) -> Close:
    outcome = _plain.decode(c.outcome)
    return Close(c.seq, c.reason, c.state, outcome)


def to_message(item: Any, codec: Codec | None = None) -> Message:
    """A decoded wire item as its typed message (values decoded with ``codec``)."""
    codec = codec or default_codec
    if isinstance(item, ProgressEntry):
        return _progress(item, item.seq or 0)
    if isinstance(item, LogEntry):
        return Log(item.seq or 0, item.text, item.level, item.logger, item.source, item.time)
    if isinstance(item, PartialEntry):
        return Partial(item.seq or 0, _value(item.value, codec))
    if isinstance(item, HeaderItem):
        return Header(
            item.seq,
            None if item.progress is None else _progress(item.progress, item.seq),
            _value(item.partial, codec),
            _value(item.value, codec),
            None if item.close is None else _close(item.close),
        )
    if isinstance(item, CloseItem):
        return _close(item)
    return Gap(item.after, item.first)


def decode_items(raw: bytes, codec: Codec | None = None) -> list[Message]:
    """A broker delivery (a JSON list of items) as typed messages."""
    return [to_message(item, codec) for item in _items_decoder.decode(raw)]


def decode_item(raw: bytes, codec: Codec | None = None) -> Message:
    return to_message(_item_decoder.decode(raw), codec)
