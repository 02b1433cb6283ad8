"""The broker's live streams, sans-IO: sequence numbers, headers, history and listeners.

:class:`StreamHub` takes producer entries, listener requests and commit
notices, and appends what each listener must be sent to :attr:`StreamHub.out`
as :class:`Delivery` objects; it never touches a socket, a clock or a thread.

The rules it keeps:

* Every item of a stream gets the next sequence number, and the header (the
  stream's state) is updated in the same step: there is no moment at which a
  listener could see one without the other.
* Nothing is delivered before the store has it. Items are numbered at once
  but delivered only after :meth:`StreamHub.committed` reports the commit
  that wrote them, and a joining listener gets the header *as committed*.
  A broker that dies and restarts therefore never takes back a message that
  someone has seen, and ``after=seq`` resumes exactly where a listener was.
* A listener joins with the header then every later item, or with
  ``after=seq`` the items after ``seq``; one too far behind the kept history
  is sent a ``gap`` and the header, explicitly.
* Each listener's backlog (committed items it has not been sent, because its
  transport gave no credit) is bounded: once it reaches more than
  ``listener_queue`` items past the kept history, the listener is sent a
  ``close`` with reason ``overflow`` and dropped. The backlog is a window into
  the shared history, so a thousand listeners cost a thousand cursors, not a
  thousand copies, and a stalled one never slows the others or the producer.
* The history keeps at least the last ``history`` items (and at most
  ``history_bytes``), more only while a listener still needs them, never
  more than ``history + listener_queue`` committed ones.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgspec

from corral.store.streams import StreamBatch, StreamRecord, StreamWrite
from corral.streams.messages import (
    NULL,
    CloseItem,
    Entry,
    GapItem,
    HeaderEntry,
    HeaderItem,
    PartialEntry,
    ProgressEntry,
    encode,
)

log = logging.getLogger("corral.streams")

_header_decoder = msgspec.json.Decoder(HeaderItem)
_close_decoder = msgspec.json.Decoder(CloseItem)


@dataclass(slots=True)
class HubConfig:
    """Bounds of the hub. ``history`` items (default 1,000) and ``history_bytes``
    (default 4 MiB) are kept per stream; ``listener_queue`` (default 10,000)
    bounds one listener's backlog; ``closed_kept`` closed streams (default
    1,000) stay in memory for late listeners (older ones are read back from
    the store)."""

    history: int = 1000
    history_bytes: int = 4 * 1024 * 1024
    #: Items a listener may lag behind the kept history before it is cut off.
    listener_queue: int = 10_000
    closed_kept: int = 1000


class StreamClosed(Exception):
    """A put to a stream that has ended."""


class BadAfter(ValueError):
    """``after`` names a sequence number the stream never reached."""


@dataclass(slots=True)
class HubStats:
    puts: int = 0
    listens: int = 0
    overflows: int = 0
    gaps: int = 0
    deliveries: int = 0


class Stream:
    """One stream: its numbering, header state, kept items and listeners."""

    __slots__ = (
        "name", "seq", "committed", "first", "items", "nbytes", "progress", "partial",
        "value", "close", "close_bytes", "header_bytes", "header_seq", "listeners",
        "written", "producer", "pseq", "dirty", "trim_at",
    )  # fmt: skip

    def __init__(self, name: str) -> None:
        self.name = name
        #: The last sequence number given out.
        self.seq = 0
        #: The last sequence number the store has (and listeners may see).
        self.committed = 0
        #: The seq of ``items[0]``.
        self.first = 1
        self.items: list[bytes] = []
        self.nbytes = 0
        self.progress: ProgressEntry | None = None
        self.partial: msgspec.Raw = NULL
        self.value: msgspec.Raw = NULL
        self.close: CloseItem | None = None
        self.close_bytes = b""
        #: The header as committed, and the seq it reflects.
        self.header_bytes = encode(HeaderItem(seq=0))
        self.header_seq = 0
        self.listeners: dict[int, Listener] = {}
        #: The last seq handed to the store.
        self.written = 0
        #: The producer run whose entries were last taken, and its last pseq.
        self.producer: str | None = None
        self.pseq = 0
        self.dirty = False
        #: Item count at which trimming is tried next (so a put costs O(1) amortised).
        self.trim_at = 0

    @property
    def closed(self) -> bool:
        return self.close is not None

    @property
    def last_item(self) -> int:
        """The seq of the last kept item (the close is not an item)."""
        return self.first + len(self.items) - 1

    def header_item(self) -> HeaderItem:
        return HeaderItem(
            seq=self.seq,
            progress=self.progress,
            partial=self.partial,
            value=self.value,
            close=self.close,
        )


class Listener:
    """One listener's cursor into a stream; ``tag`` is the shell's (where to send)."""

    __slots__ = ("id", "stream", "next", "credit", "fresh", "gap_after", "tag")

    def __init__(self, lid: int, stream: Stream, credit: int, tag: Any) -> None:
        self.id = lid
        self.stream = stream
        self.next = 0
        self.credit = credit
        #: The header is still to be sent (then items from its seq on).
        self.fresh = True
        self.gap_after: int | None = None
        self.tag = tag


@dataclass(slots=True)
class Delivery:
    """What to send to one listener now, in order: ``head`` (a gap and/or the
    header), ``items`` (stream items), then ``tail`` (a close) if ``ended``."""

    listener: Listener
    head: list[bytes] = field(default_factory=list)
    items: list[bytes] = field(default_factory=list)
    tail: bytes | None = None

    @property
    def ended(self) -> bool:
        return self.tail is not None


#: Credit meaning "no flow control" (a transport that pushes back by itself).
UNLIMITED = 1 << 62


def listener_close(reason: str) -> bytes:
    return encode(CloseItem(seq=None, reason=reason))


class StreamHub:
    """Every live stream of a broker."""

    def __init__(self, config: HubConfig | None = None) -> None:
        self.config = config or HubConfig()
        self.streams: dict[str, Stream] = {}
        self.listeners: dict[int, Listener] = {}
        self.out: list[Delivery] = []
        self.dirty: dict[str, Stream] = {}
        self.deleted: set[str] = set()
        self.stats = HubStats()
        self._next_lid = 1
        #: Closed streams with no listeners left, oldest first (evicted past closed_kept).
        self._closed: OrderedDict[str, None] = OrderedDict()
        self._chunk = max(1, self.config.history // 16)

    # ------------------------------------------------------------ producers

    def get(self, name: str) -> Stream | None:
        return self.streams.get(name)

    def open(self, name: str) -> Stream:
        """The stream ``name``, created empty (seq 0) if there is none."""
        stream = self.streams.get(name)
        if stream is None:
            stream = self.streams[name] = Stream(name)
        return stream

    def put(self, name: str, entry: Entry) -> int:
        """Append ``entry`` (and update the header with it); return its seq.

        Raises ``KeyError`` for an unknown stream and :class:`StreamClosed`
        for an ended one.
        """
        stream = self.streams[name]
        if stream.close is not None:
            raise StreamClosed(f"stream {name} is closed")
        stream.seq += 1
        entry.seq = stream.seq
        if isinstance(entry, ProgressEntry):
            stream.progress = entry
        elif isinstance(entry, PartialEntry):
            stream.partial = entry.value
        elif isinstance(entry, HeaderEntry):
            stream.value = entry.value
            data = encode(stream.header_item())
        if not isinstance(entry, HeaderEntry):
            data = encode(entry)
        stream.items.append(data)
        stream.nbytes += len(data)
        self.stats.puts += 1
        self._mark(stream)
        if len(stream.items) >= stream.trim_at:
            self._trim(stream)
        return stream.seq

    def close(
        self, name: str, reason: str, state: str | None = None, outcome: bytes | None = None
    ) -> int | None:
        """End stream ``name`` with a final close (its seq), or ``None`` if it had ended."""
        stream = self.streams[name]
        if stream.close is not None:
            return None
        stream.seq += 1
        stream.close = CloseItem(
            seq=stream.seq,
            reason=reason,
            state=state,
            outcome=NULL if outcome is None else msgspec.Raw(outcome),
        )
        stream.close_bytes = encode(stream.close)
        self._mark(stream)
        return stream.seq

    def delete(self, name: str) -> bool:
        """Drop stream ``name`` and its history; its listeners get a close ``deleted``."""
        stream = self.streams.pop(name, None)
        if stream is None:
            return False
        self.dirty.pop(name, None)
        self._closed.pop(name, None)
        self.deleted.add(name)
        tail = listener_close("deleted")
        for listener in list(stream.listeners.values()):
            self._remove(listener)
            self.out.append(Delivery(listener, tail=tail))
        return True

    def _mark(self, stream: Stream) -> None:
        if not stream.dirty:
            stream.dirty = True
            self.dirty[stream.name] = stream

    def _overflow(self, listener: Listener) -> None:
        self.stats.overflows += 1
        self._remove(listener)
        self.out.append(Delivery(listener, tail=listener_close("overflow")))

    def _trim(self, stream: Stream) -> None:
        cfg = self.config
        items = stream.items
        count = len(items)
        stream.trim_at = count + self._chunk
        # What the history bounds allow to drop...
        drop = max(0, count - cfg.history)
        if stream.nbytes > cfg.history_bytes:
            kept_bytes = stream.nbytes - sum(len(i) for i in items[:drop])
            while kept_bytes > cfg.history_bytes and drop < count - 1:
                kept_bytes -= len(items[drop])
                drop += 1
        # ...but not what a listener or the store still needs, up to a hard bound.
        need = stream.committed + 1
        for listener in stream.listeners.values():
            if not listener.fresh and listener.next < need:
                need = listener.next
        drop = min(drop, max(0, need - stream.first))
        # Committed items beyond what any listener may still be owed are dropped; items
        # not yet committed only if the store has been failing for very long.
        bound = cfg.history + cfg.listener_queue
        drop = max(drop, stream.committed - stream.first + 1 - bound, count - 10 * bound)
        if drop <= 0:
            return
        for listener in list(stream.listeners.values()):
            if not listener.fresh and listener.next < stream.first + drop:
                self._overflow(listener)
        stream.nbytes -= sum(len(i) for i in items[:drop])
        del items[:drop]
        stream.first += drop

    # ------------------------------------------------------------ listeners

    def listen(
        self, name: str, after: int | None = None, credit: int = UNLIMITED, tag: Any = None
    ) -> Listener:
        """Start a listener on stream ``name`` (``KeyError`` if there is none).

        ``after=None`` starts with the header; ``after=seq`` with the items
        after ``seq`` (a gap and the header if those are no longer kept).
        ``credit`` is how many items may be sent before :meth:`grant` allows
        more (default: no limit). Raises :class:`BadAfter` for a seq the
        stream never reached.
        """
        stream = self.streams[name]
        if after is not None and (after < 0 or after > stream.committed):
            raise BadAfter(f"after={after}, but stream {name} has reached seq {stream.committed}")
        listener = Listener(self._next_lid, stream, credit, tag)
        self._next_lid += 1
        if after is not None:
            if after + 1 >= stream.first or (stream.closed and after >= stream.close.seq):
                listener.fresh = False
                listener.next = after + 1
            else:
                listener.gap_after = after
                self.stats.gaps += 1
        self.listeners[listener.id] = listener
        stream.listeners[listener.id] = listener
        self._closed.pop(name, None)
        self.stats.listens += 1
        self._service(listener)
        return listener

    def grant(self, lid: int, n: int) -> None:
        """Allow ``n`` more items to listener ``lid`` (no-op for an unknown one)."""
        listener = self.listeners.get(lid)
        if listener is not None and n > 0:
            listener.credit = min(UNLIMITED, listener.credit + n)
            self._service(listener)

    def set_credit(self, lid: int, credit: int) -> None:
        """Set listener ``lid``'s credit (0 pauses it; :data:`UNLIMITED` resumes)."""
        listener = self.listeners.get(lid)
        if listener is not None:
            listener.credit = credit
            if credit > 0:
                self._service(listener)

    def hangup(self, lid: int) -> bool:
        """Remove listener ``lid`` without a message; ``False`` if it was gone."""
        listener = self.listeners.get(lid)
        if listener is None:
            return False
        self._remove(listener)
        return True

    def _remove(self, listener: Listener) -> None:
        self.listeners.pop(listener.id, None)
        stream = listener.stream
        stream.listeners.pop(listener.id, None)
        if stream.closed and not stream.listeners and stream.committed >= stream.seq:
            self._retire(stream)

    def _retire(self, stream: Stream) -> None:
        closed = self._closed
        closed[stream.name] = None
        closed.move_to_end(stream.name)
        while len(closed) > self.config.closed_kept:
            name, _ = closed.popitem(last=False)
            old = self.streams.get(name)
            if old is not None and not old.listeners and not old.dirty:
                del self.streams[name]

    def _service(self, listener: Listener) -> None:
        stream = listener.stream
        cfg = self.config
        head: list[bytes] = []
        if not listener.fresh and listener.next < stream.first:
            # Fell out of what is kept (only when the store was down for long).
            listener.gap_after = listener.next - 1
            listener.fresh = True
            self.stats.gaps += 1
        if listener.fresh:
            if listener.gap_after is not None:
                head.append(encode(GapItem(after=listener.gap_after, first=stream.first)))
                listener.gap_after = None
            head.append(stream.header_bytes)
            listener.next = stream.header_seq + 1
            listener.fresh = False
            if listener.next < stream.first:
                head.append(encode(GapItem(after=listener.next - 1, first=stream.first)))
                listener.next = stream.first
                self.stats.gaps += 1
        close = stream.close
        closing = close is not None and close.seq is not None and close.seq <= stream.committed
        last = close.seq - 1 if closing and close is not None and close.seq else stream.committed
        last = min(last, stream.last_item)
        backlog = last - listener.next + 1
        n = min(backlog, listener.credit) if backlog > 0 else 0
        if backlog - n > cfg.history + cfg.listener_queue:
            # What its transport cannot take now reaches past the history by more than
            # its queue: it would hold items no one else needs. Cut it off.
            self._overflow(listener)
            return
        items: list[bytes] = []
        if n > 0:
            start = listener.next - stream.first
            items = stream.items[start : start + n]
            listener.next += n
            listener.credit -= n
        tail = None
        if closing and listener.next > last:
            tail = stream.close_bytes
            self._remove(listener)
        if head or items or tail is not None:
            self.stats.deliveries += 1
            self.out.append(Delivery(listener, head, items, tail))

    # ------------------------------------------------------------ persistence

    def take_changes(self) -> tuple[StreamBatch, list[tuple[Stream, int, bytes]]]:
        """What to write with the next commit, and the marks to pass to :meth:`committed`."""
        history = self.config.history
        writes: list[StreamWrite] = []
        marks: list[tuple[Stream, int, bytes]] = []
        for stream in self.dirty.values():
            stream.dirty = False
            header = encode(stream.header_item())
            start = max(stream.written + 1, stream.seq - history + 1, stream.first)
            end = stream.last_item
            base = stream.first
            items = [(s, stream.items[s - base]) for s in range(start, end + 1)]
            writes.append(
                StreamWrite(
                    name=stream.name,
                    seq=stream.seq,
                    header=header,
                    closed=stream.close_bytes or None,
                    producer=stream.producer,
                    pseq=stream.pseq,
                    items=items,
                    keep_from=max(1, stream.first, stream.seq - history + 1),
                )
            )
            stream.written = stream.seq
            marks.append((stream, stream.seq, header))
        self.dirty = {}
        batch = StreamBatch(writes=writes, deleted=sorted(self.deleted))
        self.deleted = set()
        return batch, marks

    def committed(self, marks: list[tuple[Stream, int, bytes]]) -> None:
        """The store has what :meth:`take_changes` gave with ``marks``: deliver it."""
        for stream, seq, header in marks:
            if self.streams.get(stream.name) is not stream or seq <= stream.committed:
                continue
            stream.committed = seq
            stream.header_bytes, stream.header_seq = header, seq
            for listener in list(stream.listeners.values()):
                self._service(listener)
            if len(stream.items) > self.config.history or (
                stream.nbytes > self.config.history_bytes
            ):
                self._trim(stream)
            if stream.closed and not stream.listeners and seq >= stream.seq:
                self._retire(stream)

    def restore(self, record: StreamRecord) -> Stream:
        """Take back a stream from the store (at start, or on demand for a closed one)."""
        stream = Stream(record.name)
        stream.seq = stream.committed = stream.written = stream.header_seq = record.seq
        stream.header_bytes = record.header
        header = _header_decoder.decode(record.header)
        stream.progress = header.progress
        stream.partial, stream.value = header.partial, header.value
        if record.closed is not None:
            stream.close = _close_decoder.decode(record.closed)
            stream.close_bytes = record.closed
        stream.items = list(record.items)
        stream.nbytes = sum(len(i) for i in stream.items)
        stream.first = record.first
        stream.producer, stream.pseq = record.producer, record.pseq
        self.streams[record.name] = stream
        if stream.closed:
            self._retire(stream)
        return stream
