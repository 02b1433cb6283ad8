"""Job streams in the store: each stream's header and the tail of its history.

A stream is one row in ``streams`` (the header as of ``seq``, the final close,
the producer's position for de-duplication) and up to the configured history
of rows in ``stream_items``. :class:`StreamBatch` is what the broker's hub hands
over with each group commit; the SQLite store writes it in the same
transaction as the job records, so a job's final state and its stream's
``close`` are stored together or not at all.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import msgspec


class StreamRecord(msgspec.Struct, kw_only=True):
    """A stream as stored: header at ``seq``, items ``first .. first+len(items)-1``."""

    name: str
    seq: int
    header: bytes
    closed: bytes | None = None
    producer: str | None = None
    pseq: int = 0
    first: int = 1
    items: list[bytes] = []


class StreamWrite(msgspec.Struct, kw_only=True):
    """What changed in one stream since the last commit."""

    name: str
    seq: int
    header: bytes
    closed: bytes | None = None
    producer: str | None = None
    pseq: int = 0
    #: New items as ``(seq, item)``, oldest first.
    items: list[tuple[int, bytes]] = []
    #: Items with a smaller seq are no longer kept.
    keep_from: int = 1


class StreamBatch(msgspec.Struct, kw_only=True):
    writes: list[StreamWrite] = []
    deleted: list[str] = []
    #: Set once: the broker's secret for per-job stream tokens.
    secret: str | None = None

    def __bool__(self) -> bool:
        return bool(self.writes or self.deleted or self.secret)


SCHEMA = """
CREATE TABLE IF NOT EXISTS streams (
    name TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    header BLOB NOT NULL,
    closed BLOB,
    producer TEXT,
    pseq INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS stream_items (
    name TEXT NOT NULL,
    seq INTEGER NOT NULL,
    item BLOB NOT NULL,
    PRIMARY KEY (name, seq)
) WITHOUT ROWID;
"""


def write(conn: sqlite3.Connection, batch: StreamBatch) -> None:
    """Apply ``batch`` inside the caller's transaction."""
    for name in batch.deleted:
        conn.execute("DELETE FROM streams WHERE name = ?", (name,))
        conn.execute("DELETE FROM stream_items WHERE name = ?", (name,))
    for w in batch.writes:
        conn.execute(
            "INSERT INTO streams (name, seq, header, closed, producer, pseq) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET seq = excluded.seq, "
            "header = excluded.header, closed = excluded.closed, "
            "producer = excluded.producer, pseq = excluded.pseq",
            (w.name, w.seq, w.header, w.closed, w.producer, w.pseq),
        )
        if w.items:
            conn.executemany(
                "INSERT OR REPLACE INTO stream_items (name, seq, item) VALUES (?, ?, ?)",
                [(w.name, seq, item) for seq, item in w.items],
            )
        conn.execute("DELETE FROM stream_items WHERE name = ? AND seq < ?", (w.name, w.keep_from))
    if batch.secret is not None:
        conn.execute(
            "INSERT INTO meta VALUES ('stream_secret', ?) ON CONFLICT(key) DO NOTHING",
            (batch.secret,),
        )


def purge(conn: sqlite3.Connection, limit: int) -> int:
    """Delete up to ``limit`` ended streams whose job record is gone (purged)."""
    names = [
        (r[0],)
        for r in conn.execute(
            "SELECT name FROM streams s WHERE closed IS NOT NULL "
            "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.id = s.name) LIMIT ?",
            (limit,),
        )
    ]
    conn.executemany("DELETE FROM stream_items WHERE name = ?", names)
    conn.executemany("DELETE FROM streams WHERE name = ?", names)
    return len(names)


def _record(conn: sqlite3.Connection, row: tuple[Any, ...]) -> StreamRecord:
    name, seq, header, closed, producer, pseq = row
    items = conn.execute(
        "SELECT seq, item FROM stream_items WHERE name = ? ORDER BY seq", (name,)
    ).fetchall()
    # Only a contiguous tail is usable (a gap cannot arise, but never trust it).
    # The close (if any) has the stream's last seq and is kept apart from the items.
    kept: list[bytes] = []
    first = (seq if closed is None else seq - 1) + 1
    for item_seq, item in reversed(items):
        if item_seq != first - 1:
            break
        kept.append(bytes(item))
        first = item_seq
    kept.reverse()
    return StreamRecord(
        name=name,
        seq=seq,
        header=bytes(header),
        closed=None if closed is None else bytes(closed),
        producer=producer,
        pseq=pseq,
        first=first,
        items=kept,
    )


_COLUMNS = "name, seq, header, closed, producer, pseq"


def load_open(conn: sqlite3.Connection) -> tuple[list[StreamRecord], str | None]:
    """Every stream not yet closed, and the stored token secret."""
    rows = conn.execute(f"SELECT {_COLUMNS} FROM streams WHERE closed IS NULL").fetchall()
    secret = conn.execute("SELECT value FROM meta WHERE key = 'stream_secret'").fetchone()
    return [_record(conn, row) for row in rows], (secret[0] if secret else None)


def get(conn: sqlite3.Connection, name: str) -> StreamRecord | None:
    row = conn.execute(f"SELECT {_COLUMNS} FROM streams WHERE name = ?", (name,)).fetchone()
    return None if row is None else _record(conn, row)


class MemoryStreams:
    """The same, for :class:`corral.store.memory.MemoryStore`."""

    def __init__(self) -> None:
        self.streams: dict[str, StreamRecord] = {}
        self.secret: str | None = None

    def write(self, batch: StreamBatch) -> None:
        for name in batch.deleted:
            self.streams.pop(name, None)
        for w in batch.writes:
            rec = self.streams.get(w.name)
            items: dict[int, bytes] = {}
            if rec is not None:
                items = {rec.first + i: item for i, item in enumerate(rec.items)}
            items.update(w.items)
            top = w.seq if w.closed is None else w.seq - 1
            kept = sorted((s, i) for s, i in items.items() if w.keep_from <= s <= top)
            self.streams[w.name] = StreamRecord(
                name=w.name,
                seq=w.seq,
                header=w.header,
                closed=w.closed,
                producer=w.producer,
                pseq=w.pseq,
                first=kept[0][0] if kept else top + 1,
                items=[i for _, i in kept],
            )
        if batch.secret is not None and self.secret is None:
            self.secret = batch.secret

    def load_open(self) -> tuple[list[StreamRecord], str | None]:
        return [r for r in self.streams.values() if r.closed is None], self.secret

    def get(self, name: str) -> StreamRecord | None:
        return self.streams.get(name)
