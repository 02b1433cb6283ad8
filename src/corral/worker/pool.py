"""A pool of long-lived processes that run jobs for the worker's event loop.

The worker's main process runs asyncio with pyzmq sockets, so it must never
``fork()`` itself: children come from the multiprocessing ``"forkserver"``
(the default: a clean single-threaded server, started once, forks each
child in milliseconds) or ``"spawn"`` (a fresh interpreter per child, several
times slower, which matters when children are replaced after a time limit, a
crash or recycling). As with any of those two, the main script needs an
``if __name__ == "__main__":`` guard.

Each child owns one end of a socketpair. The parent sends one job at a time
to an idle child as a length-prefixed frame (flags, the job's id, its eMQP
body) and gets back one frame: the job's outcome, already encoded as the JSON
that goes on the wire. A job marked *direct* has its outcome sent by the child
straight to the broker (one hop fewer on a job someone waits for), with READY
for its slot if the parent says so, and the frame back says it was sent; the
parent keeps it for re-sending as it keeps its own. The parent watches the
sockets and each child's sentinel with ``loop.add_reader``, so it never
blocks and needs no thread per job. Time limits, cancellation and shutdown
are enforced from the parent with SIGKILL, which works whatever the child is
doing (``time.sleep``, C code, a deadlock).
"""

from __future__ import annotations

import asyncio
import collections
import ctypes
import enum
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import struct
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import msgspec
import zmq

from corral import runtime
from corral.errors import CorralError
from corral.protocol import Reply, new_tag
from corral.security.curve import connect_curve
from corral.security.keys import PeerKeys
from corral.worker.loader import Loader, check_prefixes

__all__ = ["Pool", "error_outcome"]

log = logging.getLogger(__name__)

# Frame = 8-byte big-endian length + payload, both directions.
_HEADER = struct.Struct("!Q")
_RECV_SIZE = 1 << 18
# First frame from a child: it imported everything and serves, or it failed.
_READY = b"R"
_FAILED = b"E"
# A batch of the running job's stream messages (see corral.runtime); outcomes are JSON.
_STREAM = b"S"[0]
# An outcome the child has sent to the broker itself (a direct job), then the outcome.
_DELIVERED = b"D"

_json = msgspec.json.Encoder()
_msgpack_decode = msgspec.msgpack.Decoder().decode
# A job for a child: flags, 2-byte length of its id, the id, the body JSON.
_JOB_HEAD = struct.Struct("!BH")
_FLAG_DIRECT = 1
_FLAG_READY = 2  # ... with READY for the job's slot
#: Seconds after a child sent an outcome itself within which its death (a kill,
#: a crash) may have kept it from leaving the process: the parent re-sends it.
_RESEND_AFTER_DEATH = 1.0
_body_decode = msgspec.json.Decoder(tuple[str, dict[str, Any]]).decode
#: Where a child sends the outcomes of direct jobs: the broker's backend address,
#: the worker's identity and, if the broker wants them, the worker's CURVE keys.
DirectTo = tuple[str, str] | tuple[str, str, PeerKeys | None]


class _Frames:
    """Reassembles length-prefixed frames from a byte stream."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        buf = self._buf
        buf += data
        frames = []
        pos, end = 0, len(buf)
        while end - pos >= _HEADER.size:
            (size,) = _HEADER.unpack_from(buf, pos)
            stop = pos + _HEADER.size + size
            if stop > end:
                break
            frames.append(bytes(buf[pos + _HEADER.size : stop]))
            pos = stop
        if pos:
            del buf[:pos]
        return frames


def _frame(payload: bytes) -> bytes:
    return _HEADER.pack(len(payload)) + payload


def _clean(text: str) -> str:
    # Lone surrogates (from odd exception messages) cannot be encoded as UTF-8.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def error_outcome(type_name: str, message: str, tb: str = "") -> bytes:
    """Encode an error outcome as wire JSON.

    Parameters:
        type_name: the error's type, e.g. ``"ZeroDivisionError"``.
        message: human-readable text.
        tb: formatted traceback; default ``""`` (none, for errors that are not
            exceptions raised by job code).
    """
    error = {"type": type_name, "message": message, "traceback": tb}
    try:
        return _json.encode({"error": error})
    except (UnicodeEncodeError, ValueError):
        return _json.encode({"error": {k: _clean(v) for k, v in error.items()}})


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (exit status unknown)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    return f"exited with code {code}"


# --------------------------------------------------------------------------
# Child side
# --------------------------------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _exit_with_parent() -> None:
    """Make sure this child does not outlive the pool's process."""
    # Forkserver children inherit the server's "alive" fd, which keeps the
    # server running while any child lives. Dropping it lets the server exit
    # with the pool's process, and PDEATHSIG below then kills us.
    server = getattr(sys.modules.get("multiprocessing.forkserver"), "_forkserver", None)
    alive_fd = getattr(server, "_forkserver_alive_fd", None)
    if isinstance(alive_fd, int):
        try:
            os.close(alive_fd)
        except OSError:
            pass
        server._forkserver_alive_fd = None  # type: ignore[union-attr]
    if sys.platform.startswith("linux"):
        # Kernel-enforced, so it also works while a job holds the GIL in C code.
        # It fires when our kernel parent exits: the pool process under
        # "spawn" (processes are started from the loop's thread, which lives
        # as long as the process), the forkserver under "forkserver".
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    # Portable fallback, and it covers a parent that died before prctl: the
    # parent sentinel reads EOF once the pool's process is gone.
    parent = multiprocessing.parent_process()
    sentinel = getattr(parent, "sentinel", None)
    if sentinel is not None:
        watcher = threading.Thread(
            target=_die_with_parent, args=(sentinel,), name="corral-parent-watch", daemon=True
        )
        watcher.start()


def _die_with_parent(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])
    os._exit(1)


def _job_payload(job_id: str, body: bytes, flags: int = 0, proof: bytes = b"") -> bytes:
    """What the parent sends a child for one job: flags, the id, the proof, the eMQP body.

    The proof (see :class:`_Direct`) is there for a direct job only.
    """
    raw_id = job_id.encode()
    head = _JOB_HEAD.pack(flags, len(raw_id)) + raw_id
    if flags & _FLAG_DIRECT:
        head += bytes([len(proof)]) + proof
    return head + body


def _job_frame(payload: bytes) -> tuple[str, bytes, int, bytes]:
    flags, size = _JOB_HEAD.unpack_from(payload)
    end = _JOB_HEAD.size + size
    job_id = payload[_JOB_HEAD.size : end].decode()
    proof = b""
    if flags & _FLAG_DIRECT:
        proof = payload[end + 1 : end + 1 + payload[end]]
        end += 1 + len(proof)
    return job_id, payload[end:], flags, proof


class _Direct:
    """A child's own connection to the broker's backend, for the outcomes of direct jobs.

    Its identity is the worker's, the child's pid and the proof the broker gave
    the worker in its ACK, joined by ``/``: the broker credits what comes from
    it to that worker only if the proof is the one it gave (a pid is easy to
    guess, the proof is not). With keys, it connects with the worker's CURVE
    key. Connected on the first direct job (and again when the proof changes,
    after the broker restarted with another secret); until the connection is
    up (and whenever the broker is away) :meth:`send` says no and the outcome
    goes the usual way, through the parent.
    """

    #: Milliseconds a child that exits gives its last outcome to leave.
    LINGER_MS = 5000

    def __init__(self, address: str, identity: str, keys: PeerKeys | None = None) -> None:
        self.address = address
        self.prefix = f"{identity}/{os.getpid()}/".encode()
        self.keys = keys
        self.proof = b""
        self.ctx: zmq.Context | None = None
        self.sock: zmq.Socket | None = None

    def send(self, job_id: str, outcome: bytes, ready: bool, proof: bytes) -> bool:
        if proof != self.proof:
            self.close()
            self.proof = proof
        if self.sock is None:
            self._connect()
            return False  # the connection is not up yet
        # With ``ready`` the job's slot is offered again in the same message.
        frames = Reply(new_tag().decode(), job_id, outcome, ready).to_frames()
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def _connect(self) -> None:
        self.ctx = zmq.Context(io_threads=1)
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.prefix + self.proof)
        # Only onto a connection that is up: otherwise the parent sends it.
        sock.setsockopt(zmq.IMMEDIATE, 1)
        sock.setsockopt(zmq.LINGER, self.LINGER_MS)
        sock.setsockopt(zmq.RCVHWM, 16)  # nothing is ever read from it
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 5000)
        connect_curve(sock, self.keys)
        sock.connect(self.address)
        self.sock = sock

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()  # with its linger: what was sent leaves first
            assert self.ctx is not None
            self.ctx.term()
            self.sock = self.ctx = None


def _run_body(loader: Loader, body: bytes) -> bytes:
    """Decode an eMQP ``["run", {...}]`` body and run it; never raises."""
    try:
        cmd, params = _body_decode(body)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError) as exc:
        return error_outcome("BadRequest", f"body is not a valid run body: {exc}")
    if cmd != "run":
        return error_outcome("BadRequest", f"unknown body subcommand {cmd!r}")
    return _run_job(loader, params)


def _run_job(loader: Loader, params: Any) -> bytes:
    """Run one job and return its outcome frame payload; never raises."""
    try:
        call = loader.resolve(params)
    except CorralError as exc:
        return error_outcome(type(exc).__name__, str(exc))
    except BaseException as exc:
        # e.g. an allowed module that fails to import: that is its own bug.
        return error_outcome(type(exc).__name__, _safe_str(exc), traceback.format_exc())
    try:
        value = call()
    except BaseException as exc:
        # SystemExit and KeyboardInterrupt too: a job must not end the child.
        tb = exc.__traceback__
        text = "".join(traceback.format_exception(type(exc), exc, tb.tb_next if tb else None))
        return error_outcome(type(exc).__name__, _safe_str(exc), text)
    try:
        return _json.encode({"value": value})
    except Exception as exc:
        return error_outcome(
            "SerializationError",
            f"the job returned a value of type {type(value).__name__!r}, "
            f"which cannot be encoded as JSON: {exc}",
        )


def _safe_str(exc: BaseException) -> str:
    try:
        return str(exc)
    except Exception:
        return f"<unprintable {type(exc).__name__}>"


def _send(sock: socket.socket, payload: bytes) -> None:
    if len(payload) < 65536:
        sock.sendall(_frame(payload))
    else:
        sock.sendall(_HEADER.pack(len(payload)))
        sock.sendall(payload)


def _child_main(
    sock: socket.socket,
    imports: tuple[str, ...],
    allow: tuple[str, ...],
    max_jobs: int | None,
    log_level: int | str,
    stream_options: dict[str, Any] | None = None,
    direct_to: DirectTo | None = None,
) -> None:
    """Entry point of a pool child: import, say ready, then serve jobs."""
    # Ctrl-C reaches the whole process group; shutdown is the parent's call.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _exit_with_parent()
    # Started as daemonic so the parent's interpreter exit cannot hang joining
    # us; undo it here so that jobs may start processes of their own.
    multiprocessing.current_process().daemon = False
    logging.basicConfig(
        level=log_level, format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
    )
    sock.setblocking(True)
    # The job's stream thread writes to the same socket between outcomes.
    lock = threading.Lock()
    if stream_options is not None:
        runtime.setup(sock, lock, _frame, **stream_options)
    direct = _Direct(*direct_to) if direct_to is not None else None
    try:
        try:
            loader = Loader(imports, allow)
        except BaseException:
            _send(sock, _FAILED + traceback.format_exc().encode("utf-8", "backslashreplace"))
            sys.exit(1)
        _send(sock, _READY)
        frames = _Frames()
        queued: collections.deque[bytes] = collections.deque()
        done = 0
        while max_jobs is None or done < max_jobs:
            while not queued:
                data = sock.recv(_RECV_SIZE)
                if not data:
                    return  # the parent closed our pipe: shut down cleanly
                queued.extend(frames.feed(data))
            job_id, body, flags, proof = _job_frame(queued.popleft())
            runtime.begin(job_id)
            outcome = _run_body(loader, body)
            # What the job put on its stream goes before its outcome, through the
            # parent: an outcome sent directly could overtake it.
            streamed = runtime.end()
            if (
                flags & _FLAG_DIRECT
                and not streamed
                and direct is not None
                and direct.send(job_id, outcome, bool(flags & _FLAG_READY), proof)
            ):
                outcome = _DELIVERED + outcome
            with lock:
                _send(sock, outcome)
            done += 1
    except (BrokenPipeError, ConnectionResetError):
        return  # the parent is gone; nobody is left to tell
    finally:
        if direct is not None:
            direct.close()


# --------------------------------------------------------------------------
# Parent side
# --------------------------------------------------------------------------


class _State(enum.Enum):
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    LEAVING = "leaving"  # out of service (retiring, killed, closing), not yet reaped
    DEAD = "dead"


_SERVING = (_State.STARTING, _State.IDLE, _State.BUSY)


class _Job:
    __slots__ = ("id", "frame", "timeout", "future", "done", "timer", "child", "sent_at")

    def __init__(
        self,
        job_id: str,
        frame: bytes,
        timeout: float | None,
        future: asyncio.Future[bytes],
        done: Callable[[str, bytes, bool], None] | None = None,
    ) -> None:
        self.id = job_id
        self.frame = frame
        self.timeout = timeout
        self.future = future
        self.done = done
        self.timer: asyncio.TimerHandle | None = None
        self.sent_at = 0.0
        self.child: _Child | None = None


class _Child:
    __slots__ = (
        "proc", "sock", "fd", "pid", "pidfd", "frames", "state", "job", "jobs_done",
        "ready", "exited", "reading", "exiting", "wbuf", "delivered",
    )  # fmt: skip

    def __init__(self, proc: Any, sock: socket.socket, loop: asyncio.AbstractEventLoop) -> None:
        self.proc = proc
        self.sock = sock
        self.fd = sock.fileno()
        self.pid: int = proc.pid
        self.pidfd: int | None = _open_pidfd(proc.pid)
        self.frames = _Frames()
        self.state = _State.STARTING
        self.job: _Job | None = None
        self.jobs_done = 0
        self.ready: asyncio.Future[None] = loop.create_future()
        self.exited: asyncio.Future[int | None] = loop.create_future()
        self.reading = True
        self.exiting = False
        self.wbuf = bytearray()
        #: The last outcome this child sent the broker itself: (job id, outcome, when).
        self.delivered: tuple[str, bytes, float] | None = None


def _open_pidfd(pid: int) -> int | None:
    # A pidfd keeps naming this process even after it is reaped, so a kill
    # can never hit an unrelated process that reused the pid.
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def _context(method: str) -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        # Loaded once in the server, so each child is a bare fork instead of
        # re-importing the main script and corral. This sets the process-wide
        # preload list; it only matters before the server first starts.
        ctx.set_forkserver_preload(["__main__", __name__])
    return ctx


class Pool:
    """Pre-started, long-lived child processes that run jobs.

    Parameters:
        concurrency: number of children, i.e. jobs run at once (>= 1).
        imports: modules each child imports at start so their tasks
            register; default none.
        allow: module prefixes whose plain functions may run too (see
            :class:`corral.worker.loader.Loader`); default none.
        max_jobs_per_child: a child exits cleanly after this many jobs and is
            replaced, bounding memory growth; default ``None`` (never).
        log_level: logging level configured in the children; default INFO.
        start_method: ``"forkserver"`` (default) or ``"spawn"``.
        start_timeout: seconds a child may take to import ``imports`` and
            report ready before :meth:`start` fails; default 60.
        direct_to: ``(backend address, worker identity[, keys])``: children
            may send the outcomes of jobs run with ``direct=True`` to the
            broker themselves, once :attr:`direct_proof` is set to the proof
            the broker gave; default ``None`` (every outcome comes to the parent).
        resend: called with ``(job_id, outcome)`` when a child dies right
            after sending an outcome itself, which may not have left: the
            caller sends it again (the broker ignores a second copy).

    All methods must be called from the event loop's thread.
    """

    def __init__(
        self,
        concurrency: int,
        *,
        imports: Sequence[str] = (),
        allow: Sequence[str] = (),
        max_jobs_per_child: int | None = None,
        log_level: int | str = logging.INFO,
        start_method: str = "forkserver",
        start_timeout: float = 60.0,
        on_stream: Callable[[str, list[bytes]], None] | None = None,
        stream_options: dict[str, Any] | None = None,
        direct_to: DirectTo | None = None,
        resend: Callable[[str, bytes], None] | None = None,
    ) -> None:
        if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
            raise ValueError(f"concurrency must be an int >= 1, not {concurrency!r}")
        if max_jobs_per_child is not None and max_jobs_per_child < 1:
            raise ValueError("max_jobs_per_child must be >= 1 or None")
        if isinstance(imports, str):
            raise ValueError("imports must be a sequence of module names, not a single string")
        if start_method not in ("forkserver", "spawn"):
            # "fork" would copy the parent's zmq context and threads.
            raise ValueError(f"start_method must be 'forkserver' or 'spawn', not {start_method!r}")
        self._concurrency = concurrency
        self._imports = tuple(imports)
        self._allow = check_prefixes(allow)
        self._max_jobs = max_jobs_per_child
        self._log_level = log_level
        self._start_method = start_method
        self._start_timeout = start_timeout
        #: Called with (job id, [entry JSON, ...]) for what a running job puts on its
        #: stream; ``stream_options`` go to corral.runtime.setup in each child.
        self._on_stream = on_stream
        self._stream_options = stream_options if on_stream is not None else None
        self._direct_to = direct_to
        #: The proof the broker gave this worker (its ACK's ``proof``); until it
        #: is set, every outcome comes through the parent.
        self.direct_proof: bytes | None = None
        self._resend = resend
        self._ctx = _context(start_method)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._children: dict[int, _Child] = {}
        self._idle: collections.deque[_Child] = collections.deque()
        self._pending: collections.deque[_Job] = collections.deque()
        self._jobs: dict[str, _Job] = {}
        self._closing = False
        self._closed: asyncio.Future[None] | None = None
        #: Seconds from handing a job to a process to its outcome, a moving average
        #: (a fifth of each new job; None until one has ended). One long job
        #: weighs enough to bring it up at once.
        self.run_time: float | None = None

    # -- public API --------------------------------------------------------

    async def start(self) -> None:
        """Start ``concurrency`` children and wait until each is ready.

        Raises ``RuntimeError`` (with the child's traceback) if a child
        cannot import ``imports``; no child is left running then.
        """
        if self._loop is not None:
            raise RuntimeError("Pool.start() was already called")
        self._loop = asyncio.get_running_loop()
        if self._start_method == "forkserver":
            # Starting the server takes an interpreter start; keep it off the loop.
            from multiprocessing import forkserver

            await asyncio.to_thread(forkserver.ensure_running)
        children: list[_Child] = []
        try:
            for _ in range(self._concurrency):
                children.append(self._spawn())
            async with asyncio.timeout(self._start_timeout):
                await asyncio.gather(*(c.ready for c in children))
        except BaseException:
            self._closing = True
            for child in children:
                if not child.ready.done():
                    child.ready.cancel()
                elif not child.ready.cancelled():
                    child.ready.exception()  # mark retrieved: gather raised only the first
                self._leave(child, kill=True)
            await self._reap(5.0)
            raise

    @property
    def free_slots(self) -> int:
        """How many more jobs would start right away (0 once closing)."""
        if self._loop is None or self._closing:
            return 0
        return max(0, self._concurrency - len(self._jobs))

    @property
    def pids(self) -> list[int]:
        """Process ids of the children currently in service."""
        return [c.pid for c in self._children.values() if c.state in _SERVING]

    def run(
        self, job_id: str, params: Mapping[str, Any], timeout: float | None
    ) -> asyncio.Future[bytes]:
        """Queue a job; the future resolves to its outcome as wire JSON.

        Parameters:
            job_id: unique among the pool's unfinished jobs.
            params: the eMQP body (``path``, ``callable``, ``args``, ...).
            timeout: hard time limit in seconds, counted from when a child
                starts the job; ``None`` or ``0`` for none.

        The outcome is ``{"value": ...}`` or ``{"error": {"type", "message",
        "traceback"}}``; job failures never raise. Cancelling the returned
        future does not stop the job: use :meth:`cancel`.
        """
        loop = self._admit(job_id, timeout)
        try:
            body = _json.encode(("run", params))
        except (TypeError, ValueError, OverflowError) as exc:
            future: asyncio.Future[bytes] = loop.create_future()
            future.set_result(
                error_outcome("SerializationError", f"job params cannot be sent to a child: {exc}")
            )
            return future
        return self.run_body(job_id, body, timeout)

    def run_body(
        self,
        job_id: str,
        body: bytes,
        timeout: float | None,
        done: Callable[[str, bytes, bool], None] | None = None,
        direct: bool = False,
        offer_slot: bool = False,
    ) -> asyncio.Future[bytes]:
        """Like :meth:`run` with the eMQP body as received (``["run", {...}]`` JSON).

        ``done(job_id, outcome, delivered)`` is called the moment the outcome is
        known (the future resolves too); not for a job taken back with
        :meth:`withdraw`. ``delivered``: the child sent the outcome to the
        broker itself, which it may do for a ``direct`` job (see ``direct_to``)
        that put nothing on its stream; with READY for the job's slot in the
        same message if ``offer_slot``. A body that is not a valid run body
        gets a ``BadRequest`` outcome.
        """
        future: asyncio.Future[bytes] = self._admit(job_id, timeout).create_future()
        flags = 0
        proof = self.direct_proof
        if direct and self._direct_to is not None and proof:
            flags = _FLAG_DIRECT | (_FLAG_READY if offer_slot else 0)
        frame = _frame(_job_payload(job_id, body, flags, proof or b""))
        job = _Job(job_id, frame, timeout or None, future, done)
        self._jobs[job_id] = job
        self._pending.append(job)
        self._dispatch()
        return future

    def _admit(self, job_id: str, timeout: float | None) -> asyncio.AbstractEventLoop:
        """Check that a new job can be queued; return the loop."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("Pool.run() before Pool.start()")
        if self._closing:
            raise RuntimeError("the pool is closed")
        if job_id in self._jobs:
            raise ValueError(f"job {job_id!r} is already in the pool")
        if timeout is not None and timeout < 0:
            raise ValueError(f"timeout must be >= 0 or None, not {timeout!r}")
        return loop

    def withdraw(self, job_id: str) -> bool:
        """Take back a job no child has started; ``False`` if it started or is unknown.

        The job's future is cancelled: it has no outcome.
        """
        job = self._jobs.get(job_id)
        if job is None or job.child is not None:
            return False
        self._pending.remove(job)
        del self._jobs[job_id]
        job.future.cancel()
        return True

    @property
    def waiting(self) -> list[str]:
        """Ids of the jobs no child has started yet, oldest first."""
        return [job.id for job in self._pending]

    def cancel(self, job_id: str) -> bool:
        """Cancel a queued or running job; ``False`` if it is not in the pool.

        A running job's child is killed with SIGKILL and replaced. The job's
        outcome becomes a ``JobCancelled`` error.
        """
        job = self._jobs.get(job_id)
        if job is None:
            return False
        if job.child is None:
            self._pending.remove(job)
            self._finish(
                job, error_outcome("JobCancelled", f"job {job_id} was cancelled before it started")
            )
        else:
            pid = job.child.pid
            self._abort(
                job.child,
                error_outcome(
                    "JobCancelled", f"job {job_id} was cancelled; its process {pid} was killed"
                ),
            )
        return True

    async def close(self, grace: float = 30.0) -> None:
        """Stop accepting jobs, let running ones finish, then stop every child.

        Parameters:
            grace: seconds running jobs get to finish; default 30. Jobs still
                running then are killed and get a ``WorkerLost`` outcome.

        Queued jobs that have not started get a ``JobCancelled`` outcome at
        once, so the caller can hand them back. Returns once every child has
        exited and been reaped. Safe to call more than once.
        """
        if self._closed is not None:
            await asyncio.shield(self._closed)
            return
        if self._loop is None:
            self._closing = True
            return
        self._closed = self._loop.create_future()
        try:
            await self._shutdown(grace)
        finally:
            self._closed.set_result(None)

    # -- internals -----------------------------------------------------------

    async def _shutdown(self, grace: float) -> None:
        self._closing = True
        while self._pending:
            job = self._pending.popleft()
            self._finish(
                job, error_outcome("JobCancelled", f"the pool closed before job {job.id} started")
            )
        running = [job.future for job in self._jobs.values()]
        interrupted = False
        if running and grace > 0:
            try:
                await asyncio.wait(running, timeout=grace)
            except asyncio.CancelledError:
                # Cut the grace short, but still leave no process behind.
                interrupted = True
        for child in list(self._children.values()):
            if child.job is not None:
                self._abort(
                    child,
                    error_outcome(
                        "WorkerLost",
                        f"job {child.job.id} was still running when the pool closed "
                        f"(grace {grace:g}s); its process {child.pid} was killed",
                    ),
                )
            elif child.state is _State.IDLE:
                self._leave(child, kill=False)
                # EOF on its pipe is an idle child's signal to exit cleanly.
                try:
                    child.sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already gone; its sentinel reports it
            elif child.state is _State.STARTING:
                self._leave(child, kill=True)
        if not await self._reap(5.0):
            for child in self._children.values():
                log.warning("child %d did not exit; killing it", child.pid)
                self._kill(child)
            await self._reap(5.0)
        if interrupted:
            raise asyncio.CancelledError

    async def _reap(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for every child to be reaped."""
        waiting = [c.exited for c in self._children.values()]
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)
        return not self._children

    def _spawn(self) -> _Child:
        assert self._loop is not None
        parent_sock, child_sock = socket.socketpair()
        try:
            proc = self._ctx.Process(  # type: ignore[attr-defined]
                target=_child_main,
                args=(
                    child_sock,
                    self._imports,
                    self._allow,
                    self._max_jobs,
                    self._log_level,
                    self._stream_options,
                    self._direct_to,
                ),
                name="corral-pool-child",
                daemon=True,
            )
            proc.start()
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        parent_sock.setblocking(False)
        child = _Child(proc, parent_sock, self._loop)
        self._children[child.pid] = child
        self._loop.add_reader(child.fd, self._on_readable, child)
        self._loop.add_reader(proc.sentinel, self._on_exit, child)
        log.debug("started child %d", child.pid)
        return child

    def _replace(self) -> None:
        if self._closing:
            return
        assert self._loop is not None
        try:
            child = self._spawn()
        except Exception:
            log.exception("could not start a replacement child; retrying in 1s")
            self._loop.call_later(1.0, self._replace)
            return
        child.ready.add_done_callback(self._on_replacement_ready)

    def _on_replacement_ready(self, ready: asyncio.Future[None]) -> None:
        if ready.cancelled() or ready.exception() is None:
            return
        # The imports worked at start, so this is likely transient (e.g. out
        # of memory); retry slowly rather than in a tight loop.
        log.error("a replacement child failed to start; retrying in 1s: %s", ready.exception())
        if not self._closing and self._loop is not None:
            self._loop.call_later(1.0, self._replace)

    def _dispatch(self) -> None:
        pending, idle = self._pending, self._idle
        while pending and idle:
            child = idle.popleft()
            if child.state is not _State.IDLE:
                continue
            job = pending.popleft()
            child.state = _State.BUSY
            child.job = job
            job.child = child
            job.sent_at = time.monotonic()
            self._write(child, job.frame)
            job.frame = b""  # sent (or copied to wbuf); do not hold big params
            if job.timeout is not None:
                assert self._loop is not None
                job.timer = self._loop.call_later(job.timeout, self._expire, job)

    def _write(self, child: _Child, data: bytes) -> None:
        if child.wbuf:
            child.wbuf += data
            return
        try:
            sent = child.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            return  # the child is gone; its sentinel will report the job lost
        if sent < len(data):
            child.wbuf += data[sent:]
            assert self._loop is not None
            self._loop.add_writer(child.fd, self._on_writable, child)

    def _on_writable(self, child: _Child) -> None:
        assert self._loop is not None
        try:
            sent = child.sock.send(child.wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            sent = len(child.wbuf)
        del child.wbuf[:sent]
        if not child.wbuf:
            self._loop.remove_writer(child.fd)

    def _on_readable(self, child: _Child) -> None:
        try:
            data = child.sock.recv(_RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._stop_reading(child)
            # Normally the process is exiting and its sentinel reports how.
            # One that closed its pipe yet lives on can never report: end it.
            if child.state in _SERVING:
                self._kill(child)
            return
        for frame in child.frames.feed(data):
            self._on_frame(child, frame)

    def _on_frame(self, child: _Child, frame: bytes) -> None:
        if child.state is _State.STARTING:
            if frame == _READY:
                child.state = _State.IDLE
                if not child.ready.done():
                    child.ready.set_result(None)
                if not child.exiting:
                    self._idle.append(child)
                    self._dispatch()
            else:
                child.state = _State.LEAVING
                error = frame[len(_FAILED) :].decode("utf-8", "replace")
                if not child.ready.done():
                    child.ready.set_exception(
                        RuntimeError(f"pool child {child.pid} failed to start:\n{error}")
                    )
            return
        if frame and frame[0] == _STREAM:
            self._stream_frame(child, frame)
            return
        job = child.job
        if job is None:
            log.warning("child %d sent an outcome with no job running; ignored", child.pid)
            return
        child.job = None
        job.child = None
        child.jobs_done += 1
        took = time.monotonic() - job.sent_at
        self.run_time = took if self.run_time is None else 0.8 * self.run_time + 0.2 * took
        delivered = frame.startswith(_DELIVERED)
        if delivered:
            frame = frame[len(_DELIVERED) :]
            child.delivered = (job.id, frame, time.monotonic())
        self._finish(job, frame, delivered)
        if child.exiting or (self._max_jobs is not None and child.jobs_done >= self._max_jobs):
            # The child exits by itself after its last job; replace it now.
            self._leave(child, kill=False)
        elif child.state is _State.BUSY:
            child.state = _State.IDLE
            self._idle.append(child)
            self._dispatch()

    def _stream_frame(self, child: _Child, frame: bytes) -> None:
        if self._on_stream is None or child.job is None:
            return
        try:
            job_id, entries = _msgpack_decode(memoryview(frame)[1:])
        except (msgspec.DecodeError, ValueError, TypeError):
            log.warning("child %d sent an unreadable stream frame; ignored", child.pid)
            return
        if job_id == child.job.id and entries:
            try:
                self._on_stream(job_id, entries)
            except Exception:  # noqa: BLE001 - a stream problem must not lose the job
                log.exception("could not forward job %s's stream messages", job_id)

    def _finish(self, job: _Job, outcome: bytes, delivered: bool = False) -> None:
        if job.timer is not None:
            job.timer.cancel()
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]
        if not job.future.done():
            job.future.set_result(outcome)
            if job.done is not None:
                job.done(job.id, outcome, delivered)

    def _expire(self, job: _Job) -> None:
        child = job.child
        if child is None or child.job is not job:
            return
        self._abort(
            child,
            error_outcome(
                "TimeLimitExceeded",
                f"job {job.id} exceeded its time limit of {job.timeout:g}s; "
                f"its process {child.pid} was killed",
            ),
        )

    def _abort(self, child: _Child, outcome: bytes) -> None:
        """Resolve the child's running job with ``outcome`` and kill it."""
        job = child.job
        if job is not None:
            child.job = None
            job.child = None
            self._finish(job, outcome)
        self._leave(child, kill=True)

    def _leave(self, child: _Child, *, kill: bool) -> None:
        """Take a child out of service (replacing it) and optionally kill it."""
        if child.state is _State.DEAD:
            return
        was_serving = child.state in _SERVING
        if was_serving:
            child.state = _State.LEAVING
        if child in self._idle:
            self._idle.remove(child)
        self._stop_reading(child)
        if kill:
            self._kill(child)
        if was_serving:
            self._replace()

    def _stop_reading(self, child: _Child) -> None:
        if child.reading:
            child.reading = False
            assert self._loop is not None
            self._loop.remove_reader(child.fd)
        if child.wbuf:
            child.wbuf.clear()
            assert self._loop is not None
            self._loop.remove_writer(child.fd)

    def _kill(self, child: _Child) -> None:
        if child.state is _State.DEAD:
            return  # reaped: its pid may belong to someone else by now
        try:
            if child.pidfd is not None:
                signal.pidfd_send_signal(child.pidfd, signal.SIGKILL)
            elif child.proc.exitcode is None:
                os.kill(child.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def _on_exit(self, child: _Child) -> None:
        """The child's sentinel fired: it exited. Report, clean up, replace."""
        assert self._loop is not None
        code = child.proc.exitcode
        if code is None:
            return  # spurious wake-up: the status is not readable yet
        self._loop.remove_reader(child.proc.sentinel)
        child.exiting = True
        # Its last outcome may still sit in the socket: read it first.
        while child.reading:
            try:
                data = child.sock.recv(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                break
            for frame in child.frames.feed(data):
                self._on_frame(child, frame)
        self._stop_reading(child)
        last = child.delivered
        if code != 0 and last is not None and time.monotonic() - last[2] < _RESEND_AFTER_DEATH:
            # Killed (or crashed) just after sending an outcome itself, it may
            # have taken the outcome down with it: the parent sends it again.
            if self._resend is not None:
                self._resend(last[0], last[1])
        how = _describe_exit(code)
        if child.state is _State.STARTING and not child.ready.done():
            child.ready.set_exception(RuntimeError(f"pool child {child.pid} {how} while starting"))
        was_serving = child.state in (_State.IDLE, _State.BUSY)
        if child.job is not None:
            job = child.job
            child.job = None
            job.child = None
            self._finish(
                job,
                error_outcome(
                    "WorkerLost", f"the process running job {job.id} (pid {child.pid}) {how}"
                ),
            )
        if child in self._idle:
            self._idle.remove(child)
        if was_serving or child.state is _State.STARTING:
            log.warning("pool child %d %s", child.pid, how)
        child.state = _State.DEAD
        child.sock.close()
        if child.pidfd is not None:
            os.close(child.pidfd)
            child.pidfd = None
        child.proc.close()
        self._children.pop(child.pid, None)
        child.exited.set_result(code)
        # A child dying during start-up is retried by _on_replacement_ready
        # (slowly), not here, so a crash on import cannot spin.
        if was_serving:
            self._replace()
