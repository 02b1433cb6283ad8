"""What a running job can call to publish on its stream: progress, log, emit, set_header.

Inside a job run by a corral worker::

    from corral import runtime

    def crunch(paths):
        for i, path in enumerate(paths):
            runtime.progress(i, len(paths), "files")
            runtime.log(f"reading {path}")
            runtime.emit({"path": path, "size": size(path)})   # a partial result
        runtime.set_header({"phase": "done"})

Every call is cheap and never blocks the job: it encodes the message and puts
it in a bounded buffer that a thread of the job's process sends on to the
worker (and the worker to the broker), so a slow broker or listener never
slows the job. What happens when the job produces faster than that:

* ``progress`` keeps only the latest value until it is sent, and so does
  ``set_header``: they take one place in the buffer each.
* ``log`` lines are what gives way. A line put when the buffer is full is
  dropped, and so is the oldest buffered line when an ``emit`` needs its
  place.
* ``emit`` partial results are never dropped for log lines. Only when the
  buffer is full and holds no log line to give way does a new partial result
  take the place of the latest one still waiting (as ``progress`` does): the
  latest partial result always reaches the stream.

Both are counted and the stream is told (a warning log line saying how many
log lines were dropped, and how many partial results were replaced by later
ones). Values go through :mod:`corral.codec` (JSON, or registered classes);
one it cannot encode raises :class:`corral.codec.CodecError` in the job.

Outside a job (a plain call, a test, a process the job started) every call
is a no-op and :func:`current_job` returns ``None``.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec

from corral import codec

__all__ = ["current_job", "emit", "log", "progress", "set_header"]

LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
_LEVEL_NAMES = {v: k for k, v in LEVELS.items()}
_encode = msgspec.json.Encoder().encode
#: Seconds between two sends while messages keep coming (they are batched meanwhile).
FLUSH_INTERVAL = 0.002


class _Sink:
    """The job process's buffer and the thread that sends it to the worker."""

    def __init__(self, send: Callable[[bytes], None], max_entries: int) -> None:
        self.send = send
        self.max_entries = max_entries
        self.cond = threading.Condition(threading.Lock())
        #: ``[kind, entry]`` items in order; a log line that gave way has entry None.
        self.buf: deque[list[Any]] = deque()
        #: Entries in ``buf`` (not counting the log lines that gave way).
        self.live = 0
        #: The log lines in ``buf``, oldest first (the first to give way to a partial).
        self.logs: deque[list[Any]] = deque()
        self.job: str | None = None
        #: The pending progress (or header, or latest partial) entry, updated in
        #: place until sent.
        self.progress: list[Any] | None = None
        self.header: list[Any] | None = None
        self.partial: list[Any] | None = None
        #: Log lines dropped, and partial results replaced by later ones, not told yet.
        self.dropped = 0
        self.coalesced = 0
        self.sending = False
        self.closing = False
        #: The current job put something (its outcome must follow it, in order).
        self.used = False
        self.pid = os.getpid()
        self.thread = threading.Thread(target=self._run, name="corral-stream", daemon=True)
        self.thread.start()

    def begin(self, job_id: str) -> None:
        with self.cond:
            self.job = job_id
            self.dropped = self.coalesced = 0
            self.used = False

    def end(self) -> bool:
        """Stop taking messages and wait until everything taken is sent.

        Returns whether the job put anything on its stream (kept or dropped).
        """
        with self.cond:
            used = self.used
            if not (self.buf or self.sending):
                # Nothing left to send: the sender sleeps with nothing to do. Waking
                # it would cost a thread switch (and the GIL) just before the outcome.
                self.job = None
                return used
            self.closing = True
            self.cond.notify_all()
            while self.buf or self.sending:
                self.cond.wait(1.0)
            self.job = None
            self.closing = False
            return used

    def put(self, kind: str, entry: bytes) -> None:
        with self.cond:
            if self.job is None or self.closing:
                return
            self.used = True
            if kind == "progress" and self.progress is not None:
                self.progress[1] = entry
                return
            if kind == "header" and self.header is not None:
                self.header[1] = entry
                return
            if self.live >= self.max_entries:
                if kind == "log":
                    self.dropped += 1
                    return
                if kind == "partial" and not self._give_way():
                    if self.partial is not None:
                        self.partial[1] = entry
                        self.coalesced += 1
                        return
            item = [kind, entry]
            if kind == "progress":
                self.progress = item
            elif kind == "header":
                self.header = item
            elif kind == "partial":
                self.partial = item
            else:
                self.logs.append(item)
            self.buf.append(item)
            self.live += 1
            if not self.sending:
                self.cond.notify()

    def _give_way(self) -> bool:
        """Drop the oldest buffered log line (``False`` if there is none)."""
        while self.logs:
            item = self.logs.popleft()
            if item[1] is not None:
                item[1] = None
                self.live -= 1
                self.dropped += 1
                return True
        return False

    def _run(self) -> None:
        cond = self.cond
        while True:
            with cond:
                while not self.buf:
                    self.sending = False
                    cond.notify_all()
                    cond.wait()
                self.sending = True
                job = self.job
                entries = [item[1] for item in self.buf if item[1] is not None]
                self.buf.clear()
                self.logs.clear()
                self.live = 0
                self.progress = self.header = self.partial = None
                dropped, self.dropped = self.dropped, 0
                coalesced, self.coalesced = self.coalesced, 0
            if dropped:
                entries.append(
                    _notice(
                        f"{dropped} log line(s) dropped: the job produced them "
                        f"faster than they could be sent"
                    )
                )
            if coalesced:
                entries.append(
                    _notice(
                        f"{coalesced} partial result(s) replaced by later ones: the job "
                        f"emitted them faster than they could be sent"
                    )
                )
            try:
                self.send(msgspec.msgpack.encode([job or "", entries]))
            except OSError:
                return  # the worker is gone; so is this process soon
            with cond:
                if not self.closing:
                    # Let messages gather into the next batch; end() cuts this short.
                    cond.wait(FLUSH_INTERVAL)


def _notice(text: str) -> bytes:
    """A warning log entry of this module's (what was dropped or replaced)."""
    entry = {
        "kind": "log",
        "text": text,
        "level": "warning",
        "logger": "corral.runtime",
        "time": time.time(),
    }
    return _encode(entry)


_sink: _Sink | None = None
_current: str | None = None


def _active() -> _Sink | None:
    sink = _sink
    if sink is None or _current is None or sink.pid != os.getpid():
        return None
    return sink


def current_job() -> str | None:
    """The id of the job this process is running, or ``None`` outside a job."""
    return _current if _active() is not None else None


def progress(done: float, total: float | None = None, units: str | None = None) -> None:
    """Report progress: ``done`` of ``total`` (optional) ``units`` (e.g. ``"files"``)."""
    sink = _active()
    if sink is not None:
        entry = {"kind": "progress", "done": done, "total": total, "units": units}
        sink.put("progress", _encode(entry))


def log(message: str, level: str = "info", logger: str | None = None) -> None:
    """Put a log line on the job's stream (``level``: debug, info, warning, error, critical)."""
    sink = _active()
    if sink is not None:
        if level not in LEVELS:
            raise ValueError(f"level must be one of {', '.join(LEVELS)}, not {level!r}")
        entry = {
            "kind": "log",
            "text": str(message),
            "level": level,
            "logger": logger,
            "time": time.time(),
        }
        sink.put("log", _encode(entry))


def _source_line(text: str, source: str) -> None:
    sink = _active()
    if sink is not None:
        level = "error" if source == "stderr" else "info"
        entry = {"kind": "log", "text": text, "level": level, "source": source, "time": time.time()}
        sink.put("log", _encode(entry))


def emit(value: Any) -> None:
    """Publish a partial result (any value :mod:`corral.codec` can encode).

    Never dropped to make room for log lines; when the buffer is full of
    partial results, the latest one replaces the one still waiting (counted
    and told on the stream).
    """
    sink = _active()
    if sink is not None:
        sink.put("partial", b'{"kind":"partial","value":' + codec.encode(value) + b"}")


def set_header(value: Any) -> None:
    """Set the value listeners find in the stream's header (and announce it)."""
    sink = _active()
    if sink is not None:
        sink.put("header", b'{"kind":"header","value":' + codec.encode(value) + b"}")


# ---------------------------------------------------------------- the worker's side


class _Handler(logging.Handler):
    """Puts the job's ``logging`` records on its stream."""

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith("corral.") or _active() is None:
            return
        try:
            text = self.format(record)
        except Exception:  # noqa: BLE001 - a bad record must not fail the job
            return
        level = _LEVEL_NAMES.get(record.levelno - record.levelno % 10, "info")
        log(text, "critical" if record.levelno >= 50 else level, record.name)


class _Capture:
    """A text stream that also puts each complete line on the job's stream."""

    def __init__(self, inner: Any, source: str) -> None:
        self.inner = inner
        self.source = source
        self.partial = ""

    def write(self, text: str) -> int:
        if _active() is not None:
            lines = (self.partial + text).split("\n")
            self.partial = lines.pop()
            for line in lines:
                _source_line(line, self.source)
            if len(self.partial) > 8192:
                _source_line(self.partial, self.source)
                self.partial = ""
        return self.inner.write(text)

    def end(self) -> None:
        if self.partial:
            _source_line(self.partial, self.source)
            self.partial = ""

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def setup(
    sock: socket.socket,
    lock: threading.Lock,
    frame: Callable[[bytes], bytes],
    *,
    max_entries: int = 10_000,
    log_level: str | None = "info",
    capture: bool = False,
) -> None:
    """Called once by a pool child: where stream messages go, and what else is captured."""
    global _sink

    def send(payload: bytes) -> None:
        data = frame(b"S" + payload)
        with lock:
            sock.sendall(data)

    _sink = _Sink(send, max_entries)
    if log_level:
        handler = _Handler(LEVELS[log_level])
        handler.setFormatter(logging.Formatter("%(message)s"))
        root = logging.getLogger()
        root.addHandler(handler)
        if root.level > LEVELS[log_level]:
            for other in root.handlers:
                if other is not handler and other.level < root.level:
                    other.setLevel(root.level)
            root.setLevel(LEVELS[log_level])
    if capture:
        sys.stdout = _Capture(sys.stdout, "stdout")
        sys.stderr = _Capture(sys.stderr, "stderr")


def begin(job_id: str) -> None:
    """A job starts in this process."""
    global _current
    if _sink is not None:
        _sink.begin(job_id)
        _current = job_id


def end() -> bool:
    """The job ended: send what it put before its outcome is sent.

    Returns whether the job put anything on its stream.
    """
    global _current
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, _Capture):
            stream.end()
    _current = None
    return _sink.end() if _sink is not None else False
