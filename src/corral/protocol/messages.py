"""eMQP messages: typed objects, and the parse/build pair between them and frames.

A message on the wire, after the ROUTER identity frame (if any), is::

    F0 ''  F1 'eMQP/1.0'  F2 COMMAND  F3 MSGID  F4...

:func:`parse` turns any sequence of byte frames into one of the message
classes below or raises :class:`ProtocolError` -- never anything else.
Every class has ``to_frames()`` giving the frames to send (without identity).
"""

from __future__ import annotations

import itertools
import os
import threading
import uuid
from collections.abc import Sequence
from typing import Any

import msgspec

from corral.protocol.constants import COMMANDS, DEFAULT_MAX_FRAME, PROTOCOL, Command
from corral.protocol.errors import ProtocolError
from corral.protocol.headers import EMPTY, Headers, parse_headers

_json_encode = msgspec.json.encode

#: The third frame of a REPLY that also says "a slot is free" (see :class:`Reply`).
READY_FLAG = b"ready"


class _Ids:
    """uuid4 texts from the operating system's random source, made 256 at a time.

    As random as :func:`uuid.uuid4` (both read ``os.urandom``), so ids are
    neither guessable nor repeated, but with one system call per 256 ids instead
    of one each: a system call releases the GIL, and a thread submitting jobs
    then waits for the client's I/O thread to hand it back. Taking one is a
    ``list.pop()``, atomic under the GIL. A forked child starts empty, so it
    never repeats its parent's ids.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._lock = threading.Lock()
        self._ready: list[str] = []

    def __call__(self) -> str:
        while True:
            try:
                return self._ready.pop()
            except IndexError:
                with self._lock:
                    if not self._ready:
                        self._ready = _uuid4_texts(os.urandom(4096))


def _uuid4_texts(raw: bytes) -> list[str]:
    """One uuid4 text per 16 bytes: the version (4) and variant (10xx) replace 6 bits."""
    h = raw.hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-"
        f"{_VARIANT[int(h[i + 16], 16) & 3]}{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, len(h), 32)
    ]


_VARIANT = "89ab"

#: ``new_msgid()`` -> a fresh uuid4 text: for ids that must be unique everywhere
#: (a job's id is its MSGID). See :class:`_Ids`.
new_msgid = _Ids()
os.register_at_fork(after_in_child=new_msgid.reset)


class _Tags:
    """Message ids for messages nobody refers to by id (acknowledgements, heartbeats).

    A random prefix per process (re-drawn in a forked child) and a counter: unique
    like uuid4 for every practical purpose, at a tenth of its cost on the hot path.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.prefix = uuid.uuid4().hex[:16]
        self.counter = itertools.count()

    def __call__(self) -> bytes:
        return f"{self.prefix}-{next(self.counter):x}".encode()


#: ``new_tag()`` -> a fresh message id as bytes (see :class:`_Tags`).
new_tag = _Tags()
os.register_at_fork(after_in_child=new_tag.reset)


# ---------------------------------------------------------------- bodies


class RunParams(msgspec.Struct, omit_defaults=True):
    """The parameters of a ``run`` body: what to call and with what."""

    path: str
    callable: str
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    class_args: list[Any] = []
    class_kwargs: dict[str, Any] = {}


class ErrorInfo(msgspec.Struct):
    type: str
    message: str = ""
    traceback: str = ""


class Outcome(msgspec.Struct, omit_defaults=True):
    """A job's outcome: ``{"value": ...}`` or ``{"error": {...}}``."""

    value: Any = None
    error: ErrorInfo | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


_body_decoder = msgspec.json.Decoder(tuple[str, RunParams])
_outcome_decoder = msgspec.json.Decoder(Outcome)
_queues_decoder = msgspec.json.Decoder(list[tuple[int, str] | str])


def encode_body(params: RunParams) -> bytes:
    return _json_encode(("run", params))


def decode_body(raw: bytes) -> RunParams:
    try:
        cmd, params = _body_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("bad-body", f"body is not a valid run body: {exc}") from None
    if cmd != "run":
        raise ProtocolError("bad-body", f"unknown body subcommand {cmd!r}")
    return params


def decode_outcome(raw: bytes) -> Outcome:
    try:
        outcome = _outcome_decoder.decode(raw)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("bad-result", f"result is not a valid outcome: {exc}") from None
    return outcome


def encode_outcome_value(value: Any) -> bytes:
    return _json_encode({"value": value})


def encode_outcome_error(type_: str, message: str, traceback: str = "") -> bytes:
    return _json_encode({"error": {"type": type_, "message": message, "traceback": traceback}})


# ---------------------------------------------------------------- messages


class Message(msgspec.Struct):
    msgid: str
    command = Command.ERROR  # overridden per class

    def args(self) -> list[bytes]:
        return []

    def to_frames(self) -> list[bytes]:
        return [b"", PROTOCOL, self.command.value.encode(), self.msgid.encode(), *self.args()]


class Inform(Message):
    """A worker (on the backend) or a scheduler (on the frontend) announcing itself.

    ``queues`` is ``None`` when the peer sent ``''`` (use the broker's queues).
    ``meta`` is corral's optional sixth frame (a JSON object), e.g. the ids of
    jobs a reconnecting worker still runs; EventMQ peers never send it.
    """

    queues: tuple[tuple[int, str], ...] | None = None
    kind: str = "worker"
    meta: dict[str, Any] | None = None
    command = Command.INFORM

    def args(self) -> list[bytes]:
        queues = b"" if self.queues is None else _json_encode([list(q) for q in self.queues])
        frames = [queues, self.kind.encode()]
        if self.meta is not None:
            frames.append(_json_encode(self.meta))
        return frames


class Ack(Message):
    """ACK of ``acked``; ``meta`` is corral's optional JSON object (its broker's
    capabilities, sent only to corral workers)."""

    acked: str = ""
    meta: dict[str, Any] | None = None
    command = Command.ACK

    def args(self) -> list[bytes]:
        if self.meta is None:
            return [self.acked.encode()]
        return [self.acked.encode(), _json_encode(self.meta)]


class Ready(Message):
    command = Command.READY


class Request(Message):
    """A job. ``body`` is kept as raw JSON so the broker forwards it untouched."""

    queue: str = ""
    headers: Headers = EMPTY
    body: bytes = b""
    command = Command.REQUEST

    def args(self) -> list[bytes]:
        return [self.queue.encode(), self.headers.encode().encode(), self.body]

    def params(self) -> RunParams:
        return decode_body(self.body)


class Reply(Message):
    """REPLY in its two shapes.

    * acknowledgement (broker -> client): one frame, the acknowledged MSGID;
      ``result`` is ``None``.
    * outcome (worker -> broker, broker -> client): the outcome JSON, then the
      REQUEST's MSGID.

    ``ready`` (a corral worker to a corral broker that offered ``reply_ready`` in
    its ACK meta): a third frame ``ready`` stands for the READY that would
    follow, one message instead of two per job.
    """

    ref: str = ""
    result: bytes | None = None
    ready: bool = False
    command = Command.REPLY

    def args(self) -> list[bytes]:
        if self.result is None:
            return [self.ref.encode()]
        if self.ready:
            return [self.result, self.ref.encode(), READY_FLAG]
        return [self.result, self.ref.encode()]

    def outcome(self) -> Outcome:
        if self.result is None:
            raise ProtocolError("bad-result", "an acknowledgement has no outcome")
        return decode_outcome(self.result)


class Heartbeat(Message):
    ts: float = 0.0
    command = Command.HEARTBEAT

    def args(self) -> list[bytes]:
        return [repr(self.ts).encode()]


class Disconnect(Message):
    command = Command.DISCONNECT


class Kbye(Message):
    """Goodbye. A corral worker first says it is ``draining`` (corral's F4 frame):
    the broker stops sending it jobs, answers with an ACK, and keeps its running
    jobs until the plain goodbye that follows."""

    draining: bool = False
    command = Command.KBYE

    def args(self) -> list[bytes]:
        return [b"draining"] if self.draining else []


class Schedule(Message):
    """SCHEDULE: ``interval`` seconds, or ``-1`` with a 5-field ``cron``.

    ``meta`` is corral's optional sixth frame (a JSON object) with which a
    broker tells corral's scheduler processes a schedule's state (its anchor,
    last tick and time zone); EventMQ peers never send it.
    """

    queue: str = ""
    headers: Headers = EMPTY
    interval: int = -1
    body: bytes = b""
    cron: str = ""
    meta: dict[str, Any] | None = None
    command = Command.SCHEDULE

    def args(self) -> list[bytes]:
        frames = [
            self.queue.encode(),
            self.headers.encode().encode(),
            str(self.interval).encode(),
            self.body,
            self.cron.encode(),
        ]
        if self.meta is not None:
            frames.append(_json_encode(self.meta))
        return frames

    def params(self) -> RunParams:
        return decode_body(self.body)


class Unschedule(Schedule):
    command = Command.UNSCHEDULE


class Publish(Message):
    topic: str = ""
    message: bytes = b""
    command = Command.PUBLISH

    def args(self) -> list[bytes]:
        return [self.topic.encode(), self.message]


class Status(Message):
    command = Command.STATUS


class Hello(Message):
    command = Command.HELLO


class ShowWorkers(Message):
    command = Command.ROUTER_SHOW_WORKERS


class ShowSchedulers(Message):
    command = Command.ROUTER_SHOW_SCHEDULERS


class ReloadKeys(Message):
    """corral's admin command: read the authorised keys again; answered with what changed."""

    command = Command.RELOAD_KEYS


class Error(Message):
    """corral's refusal of a message: a stable ``reason``, a ``detail`` and the refused MSGID."""

    reason: str = ""
    detail: str = ""
    ref: str = ""
    command = Command.ERROR

    def args(self) -> list[bytes]:
        return [self.reason.encode(), self.detail.encode(), self.ref.encode()]


class Query(Message):
    """corral's question or command about jobs and workers: ``{"op": ..., ...}``."""

    op: str = ""
    params: dict[str, Any] = {}
    command = Command.QUERY

    def args(self) -> list[bytes]:
        return [_json_encode({**self.params, "op": self.op})]


class Abort(Message):
    """corral's order to a worker: stop job ``ref`` (kill its process) and drop it."""

    ref: str = ""
    reason: str = ""
    command = Command.ABORT

    def args(self) -> list[bytes]:
        return [self.ref.encode(), self.reason.encode()]


class Recall(Message):
    """corral's request to a worker: hand back job ``ref`` if it has not started."""

    ref: str = ""
    command = Command.RECALL

    def args(self) -> list[bytes]:
        return [self.ref.encode()]


class Release(Message):
    """A corral worker hands back job ``ref``, which it has not started."""

    ref: str = ""
    command = Command.RELEASE

    def args(self) -> list[bytes]:
        return [self.ref.encode()]


class Stream(Message):
    """corral's job-stream data, in two shapes.

    * worker -> broker (backend): ``batch``, a JSON list of
      ``[job_id, run, first_pseq, [entry, ...]]`` (see :mod:`corral.streams.messages`);
      ``ref`` is empty.
    * broker -> client (frontend): ``ref`` is the LISTEN MSGID that started the
      listener and ``batch`` a JSON list of stream items, in order.
    """

    ref: str = ""
    batch: bytes = b"[]"
    command = Command.STREAM

    def args(self) -> list[bytes]:
        if not self.ref:
            return [self.batch]
        return [self.ref.encode(), self.batch]


class Listen(Message):
    """corral's listener control: ``{"op": "listen"|"credit"|"hangup"|"token", ...}``."""

    op: str = ""
    params: dict[str, Any] = {}
    command = Command.LISTEN

    def args(self) -> list[bytes]:
        return [_json_encode({**self.params, "op": self.op})]


# ---------------------------------------------------------------- parsing


def _text(frame: bytes, what: str, msgid: str = "") -> str:
    try:
        return frame.decode("utf-8")
    except UnicodeDecodeError:
        raise ProtocolError("bad-utf8", f"{what} is not UTF-8", msgid) from None


def _arity(cmd: Command, rest: Sequence[bytes], low: int, high: int, msgid: str) -> None:
    if not (low <= len(rest) <= high):
        want = str(low) if low == high else f"{low}-{high}"
        raise ProtocolError(
            "bad-frames", f"{cmd.value} takes {want} frames after MSGID, got {len(rest)}", msgid
        )


def _json(frame: bytes, decoder: msgspec.json.Decoder, what: str, msgid: str) -> Any:
    try:
        return decoder.decode(frame)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        raise ProtocolError("bad-json", f"{what}: {exc}", msgid) from None


_any_json = msgspec.json.Decoder()
_object_json = msgspec.json.Decoder(dict[str, Any])


def _queue_name(frame: bytes, msgid: str) -> str:
    name = _text(frame, "queue name", msgid)
    if not name or len(name) > 256 or not name.isprintable():
        raise ProtocolError("bad-queue", "queue name must be 1-256 printable characters", msgid)
    return name


def _parse_queues(frame: bytes, msgid: str) -> tuple[tuple[int, str], ...] | None:
    if not frame:
        return None
    items = _json(frame, _queues_decoder, "INFORM queues", msgid)
    queues: list[tuple[int, str]] = []
    for item in items:
        weight, name = (10, item) if isinstance(item, str) else item
        if not name or len(name) > 256 or not name.isprintable():
            raise ProtocolError("bad-queue", "queue name must be 1-256 printable characters", msgid)
        queues.append((weight, name))
    if not queues:
        return None
    return tuple(queues)


def parse(frames: Sequence[bytes], max_frame: int = DEFAULT_MAX_FRAME) -> Message:
    """Parse one eMQP message (the frames after any ROUTER identity)."""
    if len(frames) < 4:
        raise ProtocolError(
            "bad-frames", f"an eMQP message has at least 4 frames, got {len(frames)}"
        )
    if len(frames) > 16:
        raise ProtocolError("bad-frames", f"too many frames ({len(frames)})")
    for frame in frames:
        if len(frame) > max_frame:
            raise ProtocolError("oversized", f"a frame of {len(frame)} bytes exceeds {max_frame}")
    if frames[0] != b"":
        raise ProtocolError("bad-frames", "the first frame must be empty")
    if frames[1] != PROTOCOL:
        raise ProtocolError("bad-version", f"unsupported protocol {frames[1][:32]!r}")
    msgid = _text(frames[3], "MSGID")
    if len(msgid) > 256:
        raise ProtocolError("bad-msgid", "MSGID longer than 256 characters")
    cmd = COMMANDS.get(frames[2])
    if cmd is None:
        raise ProtocolError("unknown-command", f"unknown command {frames[2][:32]!r}", msgid)
    parser = _PARSERS[cmd]
    return parser(cmd, msgid, frames[4:])


def _p_inform(cmd: Command, msgid: str, rest: Sequence[bytes]) -> Message:
    _arity(cmd, rest, 1, 3, msgid)
    queues = _parse_queues(rest[0], msgid)
    kind = _text(rest[1], "INFORM type", msgid) if len(rest) > 1 else "worker"
    if kind not in ("worker", "scheduler"):
        raise ProtocolError(
            "bad-inform", f"INFORM type must be worker or scheduler, not {kind!r}", msgid
        )
    meta = _json(rest[2], _object_json, "INFORM meta", msgid) if len(rest) > 2 and rest[2] else None
    if meta is not None:
        running = meta.get("running", [])
        if not isinstance(running, list) or not all(
            isinstance(job_id, str) and 0 < len(job_id) <= 256 for job_id in running
        ):
            raise ProtocolError(
                "bad-inform", "INFORM meta 'running' must be a list of job ids", msgid
            )
    return Inform(msgid, queues, kind, meta)


def _p_ack(cmd: Command, msgid: str, rest: Sequence[bytes]) -> Message:
    _arity(cmd, rest, 0, 2, msgid)
    meta = _json(rest[1], _object_json, "ACK meta", msgid) if len(rest) > 1 else None
    return Ack(msgid, _text(rest[0], "ACK id", msgid) if rest else "", meta)


def _p_bare(cls: type[Message]):  # noqa: ANN202 - small factory
    def parse_bare(cmd: Command, msgid: str, rest: Sequence[bytes]) -> Message:
        # EventMQ's admin tools and workers sometimes add trailing frames; tolerate a few.
        _arity(cmd, rest, 0, 2, msgid)
        return cls(msgid)

    return parse_bare


def _p_kbye(cmd: Command, msgid: str, rest: Sequence[bytes]) -> Message:
    _arity(cmd, rest, 0, 2, msgid)  # EventMQ's peers may add a trailing frame
    return Kbye(msgid, bool(rest) and rest[0] == b"draining")


def _p_request(cmd: Command, msgid: str, rest: Sequence[bytes]) -> Message:
    _arity(cmd, rest, 3, 3, msgid)
    queue = _queue_name(rest[0], msgid)
    headers = _headers(rest[1], msgid)
    decode_body_checked(rest[2], msgid)
    return Request(msgid, queue, headers, rest[2])


def decode_body_checked(raw: bytes, msgid: str) -> RunParams:
    try:
        return decode_body(raw)
    except ProtocolError as exc:
        exc.msgid = msgid
        raise


def _headers(frame: bytes, msgid: str) -> Headers:
    try:
        return parse_headers(_text(frame, "headers", msgid))
    except ProtocolError as exc:
        exc.msgid = msgid
        raise


def _p_reply(cmd: Command, msgid: str, rest: Sequence[bytes]) -> Message:
    _arity(cmd, rest, 1, 3, msgid)
    if len(rest) == 1:
        return Reply(msgid, _text(rest[0], "REPLY id", msgid), None)
    ref = _text(rest[1], "REPLY id", msgid)
    if len(rest) == 3 and rest[2] != READY_FLAG:
        raise ProtocolError("bad-frames", "a REPLY's third frame can only be 'ready'", msgid)
    try:
        decode_outcome(rest[0])
    except ProtocolError as exc:
        exc.msgid = msgid
        raise
    return Reply(msgid, ref, rest[0], len(rest) == 3)


def _p_heartbeat(cmd: Command, msgid: str, rest: Sequence[bytes]) -> Message:
    _arity(cmd, rest, 0, 1, msgid)
    ts = 0.0
    if rest and rest[0]:
        try:
            ts = float(_text(rest[0], "HEARTBEAT time", msgid))
        except ValueError:
            raise ProtocolError("bad-heartbeat", "HEARTBEAT time is not a number", msgid) from None
    return Heartbeat(msgid, ts)


def _p_schedule(cmd: Command, msgid: str, rest: Sequence[bytes]) -> Message:
    _arity(cmd, rest, 5, 6, msgid)
    queue = _queue_name(rest[0], msgid)
    headers = _headers(rest[1], msgid)
    try:
        interval = int(_text(rest[2], "interval", msgid))
    except ValueError:
        raise ProtocolError("bad-schedule", "interval must be an integer", msgid) from None
    cron = _text(rest[4], "cron", msgid).strip()
    cls = Schedule if cmd is Command.SCHEDULE else Unschedule
    if cmd is Command.SCHEDULE:
        if interval == -1 and not cron:
            raise ProtocolError("bad-schedule", "interval -1 needs a cron string", msgid)
        if interval != -1 and (interval <= 0 or cron):
            raise ProtocolError(
                "bad-schedule", "give a positive interval, or -1 with a cron string", msgid
            )
        if cron and len(cron.split()) != 5:
            raise ProtocolError("bad-schedule", "cron needs 5 fields", msgid)
    decode_body_checked(rest[3], msgid)
    meta = _json(rest[5], _object_json, "SCHEDULE meta", msgid) if len(rest) > 5 else None
    return cls(msgid, queue, headers, interval, rest[3], cron, meta)


def _p_publish(cmd: Command, msgid: str, rest: Sequence[bytes]) -> Message:
    _arity(cmd, rest, 2, 2, msgid)
    topic = _text(rest[0], "topic", msgid)
    _json(rest[1], _any_json, "PUBLISH message", msgid)
    return Publish(msgid, topic, rest[1])


def _p_error(cmd: Command, msgid: str, rest: Sequence[bytes]) -> Message:
    _arity(cmd, rest, 1, 3, msgid)
    texts = [_text(f, "ERROR frame", msgid) for f in rest] + ["", ""]
    return Error(msgid, texts[0], texts[1], texts[2])


def _p_abort(cmd: Command, msgid: str, rest: Sequence[bytes]) -> Message:
    _arity(cmd, rest, 1, 2, msgid)
    ref = _text(rest[0], "ABORT id", msgid)
    return Abort(msgid, ref, _text(rest[1], "ABORT reason", msgid) if len(rest) > 1 else "")


def _p_ref(cls: type[Recall] | type[Release]):  # noqa: ANN202 - small factory
    def parse_ref(cmd: Command, msgid: str, rest: Sequence[bytes]) -> Message:
        _arity(cmd, rest, 1, 1, msgid)
        ref = _text(rest[0], f"{cmd.value} id", msgid)
        if not 0 < len(ref) <= 256:
            raise ProtocolError("bad-frames", f"{cmd.value} needs a job id", msgid)
        return cls(msgid, ref)

    return parse_ref


def _p_query(cmd: Command, msgid: str, rest: Sequence[bytes]) -> Message:
    _arity(cmd, rest, 1, 1, msgid)
    request = _json(rest[0], _object_json, "QUERY", msgid)
    op = request.pop("op", None)
    if not isinstance(op, str) or not op:
        raise ProtocolError("bad-query", "a QUERY needs a string 'op'", msgid)
    return Query(msgid, op, request)


def _p_stream(cmd: Command, msgid: str, rest: Sequence[bytes]) -> Message:
    _arity(cmd, rest, 1, 2, msgid)
    if len(rest) == 1:
        return Stream(msgid, "", rest[0])
    return Stream(msgid, _text(rest[0], "STREAM ref", msgid), rest[1])


def _p_listen(cmd: Command, msgid: str, rest: Sequence[bytes]) -> Message:
    _arity(cmd, rest, 1, 1, msgid)
    request = _json(rest[0], _object_json, "LISTEN", msgid)
    op = request.pop("op", None)
    if op not in ("listen", "credit", "hangup", "token"):
        raise ProtocolError(
            "bad-listen", "a LISTEN needs 'op': listen, credit, hangup or token", msgid
        )
    return Listen(msgid, op, request)


_PARSERS = {
    Command.INFORM: _p_inform,
    Command.ACK: _p_ack,
    Command.READY: _p_bare(Ready),
    Command.REQUEST: _p_request,
    Command.REPLY: _p_reply,
    Command.HEARTBEAT: _p_heartbeat,
    Command.DISCONNECT: _p_bare(Disconnect),
    Command.KBYE: _p_kbye,
    Command.SCHEDULE: _p_schedule,
    Command.UNSCHEDULE: _p_schedule,
    Command.PUBLISH: _p_publish,
    Command.STATUS: _p_bare(Status),
    Command.HELLO: _p_bare(Hello),
    Command.ROUTER_SHOW_WORKERS: _p_bare(ShowWorkers),
    Command.ROUTER_SHOW_SCHEDULERS: _p_bare(ShowSchedulers),
    Command.RELOAD_KEYS: _p_bare(ReloadKeys),
    Command.ERROR: _p_error,
    Command.QUERY: _p_query,
    Command.ABORT: _p_abort,
    Command.RECALL: _p_ref(Recall),
    Command.RELEASE: _p_ref(Release),
    Command.STREAM: _p_stream,
    Command.LISTEN: _p_listen,
}
