"""Job streams in the broker, sans-IO: who may put, who listens, and what goes where.

:class:`BrokerStreams` joins the :class:`~corral.streams.hub.StreamHub` to the
broker's core. It registers the corral commands it serves with the core:

* ``STREAM`` on the backend: a worker's batch of entries for the jobs it runs.
  Only the worker that holds a job may put to its stream; an unknown worker is
  refused (it then registers again); entries a worker sends twice (after a
  reconnect) are recognised by their producer position and taken once.
* ``LISTEN`` on the frontend: ``listen``, ``credit``, ``hangup`` and ``token``
  from Python clients; deliveries go back as ``STREAM`` messages.

and serves the TCP line protocol through :meth:`line_request`. The shell
calls :meth:`note_jobs` with the job records of each group commit (a job that
ended closes its stream in the same transaction), takes :meth:`take_changes`
for the store, hands back :meth:`committed`, and sends what :meth:`pump`
produces. Finished streams that are no longer in memory are read from the
store when a listener asks: :attr:`loads` names them, :meth:`loaded` takes them.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from typing import Any

import msgspec

from corral.broker.core import BrokerCore, Dest
from corral.protocol import (
    PROTOCOL,
    Command,
    Listen,
    Message,
    ProtocolError,
    Stream,
    new_msgid,
    new_tag,
)
from corral.security.principal import TRUSTED, Principal
from corral.store.base import JobRecord
from corral.store.query import FINISHED_STATES
from corral.store.streams import StreamBatch, StreamRecord
from corral.streams.hub import (
    BadAfter,
    Delivery,
    HubConfig,
    StreamClosed,
    StreamHub,
    listener_close,
)
from corral.streams.lines import Framer, LineError, Request, error_line
from corral.streams.messages import (
    CloseItem,
    EntryError,
    HeaderItem,
    LogEntry,
    decode_batch,
    encode,
)

log = logging.getLogger("corral.broker")

_STREAM = b"STREAM"
_REPLY = b"REPLY"
#: Largest STREAM delivery message, in bytes (bigger ones are split).
MAX_DELIVERY = 1 << 20
MAX_WINDOW = 100_000
#: Items handed to a TCP connection at a time (refilled while its socket keeps up).
TCP_CREDIT = 1024

_Pending = Callable[[], None]


class BrokerStreams:
    """The broker's job streams (see the module docstring).

    ``token``: the configured token that lets a network client put to any
    stream (``None``: only a job's own token, see :meth:`job_token`).
    """

    def __init__(
        self, core: BrokerCore, config: HubConfig | None = None, token: str | None = None
    ) -> None:
        self.core = core
        self.hub = StreamHub(config)
        self.token = token or None
        self.secret = secrets.token_hex(32)
        self._secret_unsaved = True
        self.stats: Counter[str] = Counter()
        #: zmq listeners: (identity, LISTEN msgid) -> hub listener id.
        self.zmq: dict[tuple[bytes, str], int] = {}
        self._by_identity: dict[bytes, set[int]] = defaultdict(set)
        #: TCP connections: conn id -> {stream: hub listener id}, and bytes to write.
        self.conns: dict[int, dict[str, int]] = {}
        self.tcp_out: dict[int, list[bytes]] = {}
        self._paused: set[int] = set()
        self._framers: dict[str, Framer] = {}
        #: Streams to read from the store (for the shell), and requests waiting on them.
        self.loads: list[str] = []
        self._waiting: dict[str, list[_Pending]] = {}
        #: Whether the store keeps streams (otherwise they live in memory only).
        self.persistent = True
        core.extensions[Command.STREAM] = self.on_stream
        core.extensions[Command.LISTEN] = self.on_listen
        core.worker_ack_meta["streams"] = 1

    # ------------------------------------------------------------ tokens

    def job_token(self, name: str) -> str:
        """The token that lets a network client put to stream ``name``."""
        return hmac.new(self.secret.encode(), name.encode(), hashlib.sha256).hexdigest()[:40]

    def _authorized(self, name: str, token: str | None, *, job_ok: bool = True) -> bool:
        if not token:
            return False
        given = token.encode("utf-8", "surrogateescape")
        if self.token and hmac.compare_digest(given, self.token.encode()):
            return True
        return job_ok and hmac.compare_digest(given, self.job_token(name).encode())

    # ------------------------------------------------------------ persistence

    def restore(self, records: Iterable[StreamRecord], secret: str | None) -> None:
        """Take back the open streams (and the token secret) a store holds."""
        if secret:
            self.secret, self._secret_unsaved = secret, False
        count = 0
        for rec in records:
            self.hub.restore(rec)
            count += 1
        if count:
            log.info("restored %d open job stream(s)", count)

    def note_jobs(self, records: Iterable[JobRecord]) -> None:
        """Jobs about to be committed: a finished one closes its stream with its outcome."""
        hub = self.hub
        for rec in records:
            stream = hub.streams.get(rec.id)
            if stream is None or stream.closed:
                continue
            if rec.state in FINISHED_STATES:
                hub.close(rec.id, rec.state, rec.state, rec.result)
            elif rec.state == "retrying":
                hub.put(
                    rec.id,
                    LogEntry(
                        text=f"attempt {rec.attempts} failed ({rec.error_type}); retrying",
                        level="warning",
                        logger="corral.broker",
                    ),
                )

    @property
    def dirty(self) -> bool:
        return bool(self.hub.dirty or self.hub.deleted or self._secret_unsaved)

    def take_changes(self) -> tuple[StreamBatch, list]:
        batch, marks = self.hub.take_changes()
        if self._secret_unsaved and self.persistent:
            batch.secret = self.secret
            self._secret_unsaved = False
        return batch, marks

    def committed(self, marks: list) -> None:
        self.hub.committed(marks)

    def loaded(self, name: str, record: StreamRecord | None, job: JobRecord | None) -> None:
        """The store's answer for a stream the hub did not have; runs the waiting requests."""
        hub = self.hub
        if hub.get(name) is None:
            if record is not None:
                hub.restore(record)
            elif name in self.core.jobs:
                hub.open(name)
            elif job is not None and job.state in FINISHED_STATES:
                hub.restore(_finished(job))
        for request in self._waiting.pop(name, []):
            request()

    def _with_stream(self, name: str, request: _Pending, missing: _Pending) -> None:
        """Run ``request`` once stream ``name`` is in the hub, else ``missing``."""
        if self.hub.get(name) is not None:
            request()
            return
        if name in self.core.jobs:
            self.hub.open(name)
            request()
            return
        if not self.persistent:
            missing()
            return

        def retry() -> None:
            (request if self.hub.get(name) is not None else missing)()

        waiting = self._waiting.get(name)
        if waiting is None:
            self._waiting[name] = [retry]
            self.loads.append(name)
        else:
            waiting.append(retry)

    # ------------------------------------------------------------ workers

    def on_stream(
        self, dest: Dest, identity: bytes, msg: Message, now: float, peer: Principal = TRUSTED
    ) -> None:
        core = self.core
        assert isinstance(msg, Stream)
        if dest is not Dest.BACKEND or msg.ref:
            core._refuse(
                dest, identity, "unexpected-command", "STREAM is sent by workers", msg.msgid
            )
            return
        worker = core.workers.get(identity)
        if worker is None:
            detail = "STREAM from a worker that has not INFORMed"
            core._refuse(dest, identity, "unknown-worker", detail, msg.msgid)
            return
        try:
            groups = decode_batch(msg.batch)
        except EntryError as exc:
            error = ProtocolError("bad-stream", str(exc), msg.msgid)
            core._bad_input(dest, identity, error, [b"", PROTOCOL, _STREAM])
            return
        hub = self.hub
        for job_id, run, pseq, entries in groups:
            job = core.jobs.get(job_id)
            if job is None or job.worker is not worker:
                # A job that ended, or a copy running on a worker given up for lost.
                self.stats["entries_not_holder"] += len(entries)
                continue
            stream = hub.open(job_id)
            if stream.closed:
                self.stats["entries_after_close"] += len(entries)
                continue
            if stream.producer == run:
                skip = stream.pseq - pseq + 1
                if skip > 0:
                    self.stats["entries_resent"] += min(skip, len(entries))
                    entries, pseq = entries[skip:], pseq + skip
                elif skip < 0 and entries:
                    hub.put(
                        job_id,
                        LogEntry(
                            text=f"{-skip} stream message(s) of this job were lost on the way",
                            level="warning",
                            logger="corral.broker",
                        ),
                    )
            for entry in entries:
                hub.put(job_id, entry)
            if entries:
                stream.producer, stream.pseq = run, pseq + len(entries) - 1

    # ------------------------------------------------------------ python listeners

    def on_listen(
        self, dest: Dest, identity: bytes, msg: Message, now: float, peer: Principal = TRUSTED
    ) -> None:
        assert isinstance(msg, Listen)
        if dest is not Dest.FRONTEND:
            self.core._refuse(
                dest, identity, "unexpected-command", "LISTEN is sent by clients", msg.msgid
            )
            return
        try:
            getattr(self, f"_op_{msg.op}")(identity, msg)
        except (TypeError, ValueError) as exc:
            error = ProtocolError("bad-listen", str(exc), msg.msgid)
            self.core._bad_input(dest, identity, error, [b"", PROTOCOL, b"LISTEN"])

    def _op_listen(self, identity: bytes, msg: Listen) -> None:
        name = _name(msg.params.get("stream"))
        after = _seq(msg.params.get("after"))
        window = msg.params.get("window", 1000)
        if isinstance(window, bool) or not isinstance(window, int) or not 0 < window <= MAX_WINDOW:
            raise ValueError(f"'window' must be 1..{MAX_WINDOW}")
        key = (identity, msg.msgid)
        old = self.zmq.pop(key, None)
        if old is not None:
            self.hub.hangup(old)

        def start() -> None:
            try:
                listener = self.hub.listen(name, after, window, ("z", identity, msg.msgid))
            except BadAfter as exc:
                self._zmq_close(identity, msg.msgid, "bad-after", str(exc))
                return
            if listener.id in self.hub.listeners:
                self.zmq[key] = listener.id
                self._by_identity[identity].add(listener.id)

        self._with_stream(
            name,
            start,
            lambda: self._zmq_close(identity, msg.msgid, "unknown", f"no stream {name}"),
        )

    def _op_credit(self, identity: bytes, msg: Listen) -> None:
        n = msg.params.get("n")
        if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= MAX_WINDOW:
            raise ValueError(f"'n' must be 1..{MAX_WINDOW}")
        lid = self.zmq.get((identity, _ref(msg.params.get("ref"))))
        if lid is not None:
            self.hub.grant(lid, n)

    def _op_hangup(self, identity: bytes, msg: Listen) -> None:
        lid = self.zmq.pop((identity, _ref(msg.params.get("ref"))), None)
        if lid is not None:
            self.hub.hangup(lid)
            self._by_identity[identity].discard(lid)

    def _op_token(self, identity: bytes, msg: Listen) -> None:
        name = _name(msg.params.get("stream"))
        job = self.core.jobs.get(name)
        if job is not None and job.submitter == identity:
            outcome = msgspec.json.encode({"value": self.job_token(name)})
        else:
            text = f"job {name} is not running or queued, or was submitted by another client"
            outcome = msgspec.json.encode({"error": {"type": "NotOwner", "message": text}})
        frames = [b"", PROTOCOL, _REPLY, new_tag(), outcome, msg.msgid.encode()]
        self.core.outbox.append((Dest.FRONTEND, identity, frames))

    def _zmq_close(self, identity: bytes, ref: str, reason: str, detail: str) -> None:
        log.debug("listener %s of %r closed: %s", ref, identity[:64], detail)
        batch = b"[" + listener_close(reason) + b"]"
        self.core.outbox.append(
            (Dest.FRONTEND, identity, Stream(new_msgid(), ref, batch).to_frames())
        )

    def unreachable(self, identity: bytes) -> None:
        """A client went away (the frontend could not route to it): drop its listeners."""
        for lid in self._by_identity.pop(identity, ()):
            self.hub.hangup(lid)
        for key in [k for k in self.zmq if k[0] == identity]:
            del self.zmq[key]

    # ------------------------------------------------------------ TCP listeners and producers

    def connection_made(self, conn: int) -> None:
        self.conns[conn] = {}

    def connection_lost(self, conn: int) -> None:
        for lid in self.conns.pop(conn, {}).values():
            self.hub.hangup(lid)
        self.tcp_out.pop(conn, None)
        self._paused.discard(conn)

    def pause(self, conn: int, paused: bool) -> None:
        """The connection's socket buffer is full (``True``) or drained (``False``)."""
        if paused:
            self._paused.add(conn)
        else:
            self._paused.discard(conn)
        for lid in self.conns.get(conn, {}).values():
            self.hub.set_credit(lid, 0 if paused else TCP_CREDIT)

    def refill(self, conn: int) -> None:
        """What was written to ``conn`` went out: its listeners may have more."""
        if conn not in self._paused:
            for lid in list(self.conns.get(conn, {}).values()):
                self.hub.set_credit(lid, TCP_CREDIT)

    def bad_line(self, conn: int, error: LineError, line: int) -> None:
        self.core.stats.malformed[f"line-{error.reason}"] += 1
        self._write(conn, error_line(error.reason, error.detail, line, error.stream))

    def line_request(self, conn: int, request: Request, line: int) -> None:
        """One parsed request from TCP connection ``conn`` (its ``line`` number, for errors)."""
        self._line_request(conn, request, line)
        self.pump()  # replies in the order of the requests

    def _line_request(self, conn: int, request: Request, line: int) -> None:
        name = request.stream
        action = request.action
        if action == "hangup":
            listeners = self.conns.get(conn, {})
            names = list(listeners) if name is None else [name]
            for stream in names:
                lid = listeners.pop(stream, None)
                if lid is not None:
                    self.hub.hangup(lid)
            return
        assert name is not None
        if action == "listen":
            self._tcp_listen(conn, name, request.after, line)
            return
        in_flight = name in self.core.jobs
        job_ok = in_flight or name in self.hub.streams
        if not self._authorized(name, request.token, job_ok=job_ok):
            self.stats["refused_puts"] += 1
            self._refuse_line(
                conn, "not-allowed", f"{action} on {name} needs its token", line, name
            )
            return
        if action in ("put", "header"):
            assert request.entry is not None
            stream = self.hub.get(name)
            if stream is None:
                if in_flight or self._authorized(name, request.token, job_ok=False):
                    if not in_flight and name in self.core._recent:
                        self._refuse_line(conn, "closed", f"job {name} has ended", line, name)
                        return
                    stream = self.hub.open(name)
                else:
                    self._refuse_line(conn, "unknown", f"no stream {name}", line, name)
                    return
            try:
                self.hub.put(name, request.entry)
            except StreamClosed:
                self._refuse_line(conn, "closed", f"stream {name} has ended", line, name)
        elif action == "close":
            if in_flight:
                self._refuse_line(
                    conn, "job-stream", "a job's stream closes when the job ends", line, name
                )
            elif self.hub.get(name) is not None:
                self.hub.close(name, "closed")
        elif action == "delete":
            if in_flight:
                self._refuse_line(
                    conn, "job-stream", "a running job's stream cannot be deleted", line, name
                )
            else:
                self.hub.delete(name)

    def _tcp_listen(self, conn: int, name: str, after: int | None, line: int) -> None:
        listeners = self.conns.get(conn)
        if listeners is None:
            return
        old = listeners.pop(name, None)
        if old is not None:
            self.hub.hangup(old)

        def start() -> None:
            if conn not in self.conns:
                return  # gone while the stream was read from the store
            try:
                credit = 0 if conn in self._paused else TCP_CREDIT
                listener = self.hub.listen(name, after, credit, ("t", conn, name))
            except BadAfter as exc:
                self._refuse_line(conn, "bad-after", str(exc), line, name)
                return
            if listener.id in self.hub.listeners:
                self.conns[conn][name] = listener.id

        def missing() -> None:
            self._write(conn, self._framer(name).lines([], [], listener_close("unknown")))

        self._with_stream(name, start, missing)

    def _refuse_line(self, conn: int, reason: str, detail: str, line: int, name: str) -> None:
        self.stats[f"line_{reason}"] += 1
        self._write(conn, error_line(reason, detail, line, name))

    def _write(self, conn: int, data: bytes) -> None:
        if conn in self.conns:
            self.tcp_out.setdefault(conn, []).append(data)

    def _framer(self, name: str) -> Framer:
        framer = self._framers.get(name)
        if framer is None:
            if len(self._framers) > 10_000:
                self._framers.clear()
            framer = self._framers[name] = Framer(name)
        return framer

    # ------------------------------------------------------------ output

    def pump(self) -> None:
        """Turn the hub's deliveries into frontend messages and TCP bytes."""
        out = self.hub.out
        if not out:
            return
        self.hub.out = []
        outbox = self.core.outbox
        for delivery in out:
            kind, where, ref = delivery.listener.tag
            if kind == "z":
                for batch in _batches(delivery):
                    frames = [b"", PROTOCOL, _STREAM, new_tag(), ref.encode(), batch]
                    outbox.append((Dest.FRONTEND, where, frames))
                if delivery.ended:
                    self.zmq.pop((where, ref), None)
                    self._by_identity.get(where, set()).discard(delivery.listener.id)
            else:
                lines = self._framer(ref).lines(delivery.head, delivery.items, delivery.tail)
                self._write(where, lines)
                if delivery.ended:
                    self.conns.get(where, {}).pop(ref, None)


def merge_batches(old: StreamBatch, new: StreamBatch) -> StreamBatch:
    """Two batches as one (a commit that failed is retried with the next one's changes)."""
    deleted = set(new.deleted)
    return StreamBatch(
        writes=[w for w in old.writes if w.name not in deleted] + new.writes,
        deleted=old.deleted + new.deleted,
        secret=new.secret or old.secret,
    )


def _batches(delivery: Delivery) -> list[bytes]:
    parts = [*delivery.head, *delivery.items]
    if delivery.tail is not None:
        parts.append(delivery.tail)
    out: list[bytes] = []
    start, size = 0, 0
    for i, part in enumerate(parts):
        if size + len(part) > MAX_DELIVERY and i > start:
            out.append(b"[" + b",".join(parts[start:i]) + b"]")
            start, size = i, 0
        size += len(part) + 1
    out.append(b"[" + b",".join(parts[start:]) + b"]")
    return out


def _finished(job: JobRecord) -> StreamRecord:
    """The stream of a job that ended without ever putting to it: just its close."""
    close = CloseItem(
        seq=1,
        reason=job.state,
        state=job.state,
        outcome=msgspec.Raw(job.result) if job.result is not None else msgspec.Raw(b"null"),
    )
    return StreamRecord(
        name=job.id,
        seq=1,
        header=encode(HeaderItem(seq=1, close=close)),
        closed=encode(close),
        first=1,
    )


def _name(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 256 or not value.isprintable():
        raise ValueError("'stream' must be 1-256 printable characters")
    return value


def _ref(value: Any) -> str:
    if not isinstance(value, str) or len(value) > 256:
        raise ValueError("'ref' must be the LISTEN message's id")
    return value


def _seq(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62:
        raise ValueError("'after' must be a sequence number >= 0 or null")
    return value
