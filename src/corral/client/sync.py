"""The synchronous, thread-safe client.

One background I/O thread owns the DEALER socket. Submitting threads append
jobs to a deque and, only if the I/O thread is asleep and not yet woken,
write one byte to a socketpair it polls next to the DEALER: a submission is
sent as soon as the I/O thread is scheduled (no polling interval), and a
burst of submissions costs one wake-up and is sent in one pass.

Whoever runs the loop holds ``_io_lock``. With nothing in flight the I/O
thread lets go of it and sleeps on the socketpair alone, so a thread that
calls the broker and waits (:meth:`Client.call`, queries) runs the loop
itself: it sends and receives on the DEALER directly, without two thread
hand-overs per call.
"""

from __future__ import annotations

import logging
import math
import os
import select
import socket
import threading
import weakref
from collections import deque
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import InvalidStateError
from datetime import timedelta
from time import monotonic
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from corral._loop import recv_frames, send_frames
from corral.client.events import WorkerEvents, notify_address
from corral.client.job import Job
from corral.client.options import broker_address, make_headers, make_request, queue_for
from corral.client.schedules import schedule_params
from corral.client.streams import JobStream
from corral.client.wire import apply_outcomes, deliver, resync_queries
from corral.errors import ClientClosed, JobFailed, NotAcknowledged
from corral.protocol import Listen, Query, new_msgid
from corral.security.curve import connect_curve
from corral.security.keys import PeerKeys

log = logging.getLogger(__name__)

#: Messages received per pass before the I/O thread looks at its outbox again.
_RECV_BATCH = 1024
#: Outgoing messages zmq may buffer before the I/O thread keeps jobs in its own deque.
_SNDHWM = 100_000

# Bumped in a forked child: a client inherited through fork() has no I/O thread.
_fork_generation = 0
_live_clients: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    global _fork_generation
    _fork_generation += 1


os.register_at_fork(after_in_child=_after_fork_in_child)


def configure_socket(sock: zmq.Socket, identity: str, keys: PeerKeys | str | None = None) -> None:
    """Options every client DEALER gets: text identity, short linger, quick reconnects,
    CURVE with ``keys`` (or ``$CORRAL_KEYS``) if there are any."""
    sock.setsockopt(zmq.IDENTITY, identity.encode())
    connect_curve(sock, keys)
    # A closing client should not keep the process alive for long over unsent messages;
    # close() already waited for the broker to acknowledge what it sent.
    sock.setsockopt(zmq.LINGER, 500)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    # ZMTP heartbeats notice a dead TCP connection (a broker host gone) and reconnect.
    sock.setsockopt(zmq.HEARTBEAT_IVL, 3000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
    sock.setsockopt(zmq.SNDHWM, _SNDHWM)
    sock.setsockopt(zmq.RCVHWM, 0)


class Client:
    """A synchronous connection to a corral (or EventMQ) broker's frontend.

    ``address`` defaults to ``$CORRAL_BROKER``, else ``tcp://127.0.0.1:47291``.
    ``identity`` (default: a fresh uuid4 text) is the socket identity the
    broker sees. ``ack_timeout`` (default 10 s) bounds how long a job may wait
    for the broker's acknowledgement before failing with
    :class:`~corral.errors.NotAcknowledged`; results themselves may take as
    long as the job runs. ``context`` defaults to the process's shared
    ``zmq.Context.instance()``. ``keys``: this client's CURVE keys (a
    :class:`~corral.security.keys.PeerKeys` or the directory ``corral keys
    add`` made), default ``$CORRAL_KEYS``; needed by a broker with keys.

    Any number of threads may call :meth:`submit` at once. Use as a context
    manager, or call :meth:`close`.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        identity: str | None = None,
        ack_timeout: float = 10.0,
        context: zmq.Context | None = None,
        keys: PeerKeys | str | None = None,
    ) -> None:
        if not ack_timeout > 0:
            raise ValueError(f"ack_timeout must be > 0 seconds, not {ack_timeout!r}")
        self.address = broker_address(address)
        self.identity = identity or new_msgid()
        self.ack_timeout = float(ack_timeout)
        self._keys = keys
        self._generation = _fork_generation
        self._outbox: deque[Job] = deque()
        self._signalled = False
        self._closing = False
        self._close_deadline = math.inf
        self._stopped = False
        self._close_lock = threading.Lock()
        #: Held by the thread that runs the I/O loop (see the module docstring).
        self._io_lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        ctx = context or zmq.Context.instance()
        self._sock = ctx.socket(zmq.DEALER)
        try:
            configure_socket(self._sock, self.identity, keys)
            self._sock.connect(self.address)
        except BaseException:
            self._sock.close(linger=0)
            self._wake_r.close()
            self._wake_w.close()
            raise
        # The socket is created here, so a bad address raises in the caller; thread
        # start is the memory barrier that hands it over to the I/O thread.
        self._io: _IOLoop | None = None
        self._thread = threading.Thread(
            target=self._run, daemon=True, name=f"corral-client-{self.identity[:8]}"
        )
        self._thread.start()
        _live_clients.add(self)

    # ------------------------------------------------------------ submitting

    def submit(
        self,
        fn: Any,
        /,
        *args: Any,
        queue: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        guarantee: bool = False,
        label: str | None = None,
        after: Iterable[Any] = (),
        **kwargs: Any,
    ) -> Job:
        """Submit ``fn(*args, **kwargs)`` and return its :class:`Job` at once.

        ``fn`` is a task, an importable function or a ``"pkg.mod:fn"`` string
        (see :func:`corral.client.target.body_for`). Options: ``queue``
        (default: the task's own queue, else ``"default"``); ``timeout``
        seconds the job may run (default ``None``: no limit); ``retries`` runs
        after a failure (default 0); ``guarantee`` (default ``False``): finish
        even if its worker dies; ``label`` (default none): a free-form tag;
        ``after`` (default none): jobs (or ids) that must succeed before this
        one runs -- if one fails or is cancelled, this one fails at once with
        ``DependencyFailed``. Keyword arguments with those names go to the
        options, not to ``fn``:
        use :meth:`submit_with` when ``fn`` takes such a keyword.

        Raises :class:`TypeError` (target not importable, arguments not
        JSON-serializable) or :class:`ValueError` (bad option) before sending.
        """
        return self.submit_with(
            fn,
            args,
            kwargs,
            queue=queue,
            timeout=timeout,
            retries=retries,
            guarantee=guarantee,
            label=label,
            after=after,
        )

    def submit_with(
        self,
        fn: Any,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        guarantee: bool = False,
        label: str | None = None,
        headers: Sequence[str] = (),
        after: Iterable[Any] = (),
        reply: bool = True,
    ) -> Job:
        """Like :meth:`submit` with the call's ``args`` and ``kwargs`` passed as values.

        ``args`` defaults to none and ``kwargs`` to none; no keyword collides
        with the options. ``headers`` (default none) adds raw header tokens.
        ``reply=False`` (default ``True``) sends the job without asking for its
        outcome: the job is done, with ``None`` as its result, as soon as the
        broker has stored it; :meth:`job_info` reads the outcome later.
        """
        self._check_usable()
        job = self._new_job(
            fn,
            args,
            kwargs,
            queue=queue,
            timeout=timeout,
            retries=retries,
            guarantee=guarantee,
            label=label,
            headers=headers,
            after=after,
            reply=reply,
        )
        self._enqueue(job)
        return job

    def call(
        self,
        fn: Any,
        /,
        *args: Any,
        queue: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        guarantee: bool = False,
        label: str | None = None,
        after: Iterable[Any] = (),
        result_timeout: float | None = None,
        **kwargs: Any,
    ) -> Any:
        """Run ``fn(*args, **kwargs)`` on a worker and return its value.

        The same as ``submit(fn, *args, ...).result(result_timeout)``, with the
        same options, but quicker for one call at a time: when the client has
        nothing else in flight, the calling thread sends the job and receives
        its outcome itself instead of through the client's I/O thread.
        ``result_timeout`` (default ``None``) bounds the wait: then
        ``TimeoutError`` is raised, naming the job, which still runs
        (:meth:`job` or :meth:`job_info` with its id tell how it ended).
        Raises what :meth:`Job.result` raises.
        """
        self._check_usable()
        job = self._new_job(
            fn,
            args,
            kwargs,
            queue=queue,
            timeout=timeout,
            retries=retries,
            guarantee=guarantee,
            label=label,
            after=after,
        )
        try:
            return self._send_and_wait(job, result_timeout)
        except TimeoutError:
            if job.done():
                raise  # the job's own outcome (a TimeoutError it raised), not our wait
            raise TimeoutError(
                f"job {job.id} has no outcome after {result_timeout:g} s; it still runs"
            ) from None

    def _new_job(
        self,
        fn: Any,
        args: Iterable[Any],
        kwargs: Mapping[str, Any] | None,
        *,
        queue: str | None,
        timeout: float | None,
        retries: int,
        guarantee: bool,
        label: str | None,
        after: Iterable[Any],
        headers: Sequence[str] = (),
        reply: bool = True,
    ) -> Job:
        queue = queue_for(fn, queue)
        hdrs = make_headers(
            timeout=timeout,
            retries=retries,
            guarantee=guarantee,
            label=label,
            extra=headers,
            after=after,
            reply=reply,
        )
        request = make_request(fn, args, kwargs, queue, hdrs)
        job = Job(request.msgid, queue)
        job._reply = hdrs.reply_requested
        job._frames = request.to_frames()
        job._client = self
        return job

    # ------------------------------------------------------------ job records

    def query(self, op: str, *, timeout: float | None = 30.0, **params: Any) -> Any:
        """Ask the broker (a QUERY ``op``) and return its answer.

        Raises :class:`corral.errors.JobFailed` (or its subclass for corral's own
        errors, e.g. ``NotFound``) when the broker refuses, ``TimeoutError``
        after ``timeout`` seconds (default 30).
        """
        self._check_usable()
        msg = Query(new_msgid(), op, params)
        job = Job(msg.msgid, "")
        job._frames = msg.to_frames()
        return self._send_and_wait(job, timeout)

    def job_info(self, job_id: str) -> dict[str, Any]:
        """A job's record: state, queue, attempts, worker, timestamps, result or error."""
        return self.query("job", id=job_id)

    def job(self, job_id: str) -> Job:
        """A handle to any job by id (submitted by any client, also before a broker restart).

        ``result(timeout)`` waits for its outcome (the broker sends it here too),
        ``state`` and ``info()`` ask for its record. A job this client submitted
        and still waits for is returned as it is.
        """
        self._check_usable()
        if not isinstance(job_id, str) or not job_id:
            raise ValueError(f"a job id is a non-empty string, not {job_id!r}")
        io = self._io
        own = io.pending.get(job_id) if io is not None else None
        if own is not None and own._is_job:
            return own
        handle = Job(job_id, "")
        handle._is_job = True
        handle._acked = True
        handle._client = self
        handle.set_running_or_notify_cancel()
        query = Query(new_msgid(), "outcomes", {"ids": [job_id], "listen": True})
        attach = Job(query.msgid, "")
        attach._frames = query.to_frames()
        attach._attach = handle
        attach.add_done_callback(_attached)
        self._enqueue(attach)
        return handle

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job: a queued one never runs, a running one's process is killed.

        Returns ``{"id", "state", "cancelled": True, "was": ...}``, or for a job
        that has already ended ``{"id", "state", "cancelled": False, "detail"}``
        (nothing is changed). Raises ``JobFailed`` (``NotFound``) for an unknown id.
        """
        return self.query("cancel", id=job_id)

    def purge(self, older_than: float) -> int:
        """Delete the records of jobs that ended more than ``older_than`` seconds ago."""
        return int(self.query("purge", older_than=older_than)["purged"])

    def jobs(
        self,
        *,
        state: str | Sequence[str] | None = None,
        queue: str | None = None,
        worker_id: int | None = None,
        label: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Job records, newest first, filtered by state(s), queue, worker, label, time."""
        params = {
            "state": state if isinstance(state, str) or state is None else list(state),
            "queue": queue,
            "worker_id": worker_id,
            "label": label,
            "since": since,
            "until": until,
            "limit": limit,
        }
        return self.query("jobs", **{k: v for k, v in params.items() if v is not None})

    def retry(self, job_id: str) -> dict[str, Any]:
        """Put a dead, failed or cancelled job back in its queue (attempts start over)."""
        return self.query("retry", id=job_id)

    def workers(self) -> dict[str, Any]:
        """Connected workers by integer id, and every uuid ever registered with its id."""
        return self.query("workers")

    def stream(
        self,
        job_id: str | Job,
        after: int | None = None,
        *,
        window: int = 1000,
        timeout: float | None = None,
        codec: Any = None,
    ) -> JobStream:
        """Listen to job ``job_id``'s stream: an iterator of typed messages.

        Without ``after``: the stream's :class:`~corral.streams.Header` (its state
        now) first, then every later ``Progress``/``Log``/``Partial``, in order,
        ending with a :class:`~corral.streams.Close` carrying the outcome. With
        ``after=seq``: the messages after ``seq`` (a ``Gap`` and the header if the
        broker no longer keeps them). ``window`` (default 1000) messages may be
        in flight; ``timeout`` (default none) bounds each wait; ``codec``
        decodes values (default :data:`corral.codec.default`). See
        :class:`~corral.client.streams.JobStream`.

        Pass the :class:`Job` itself for a job just submitted: the stream is
        asked for once the broker has accepted the job (a stream the broker has
        never heard of ends at once with a ``Close`` of reason ``unknown``).
        """
        self._check_usable()
        if isinstance(job_id, Job):
            job_id.wait_acknowledged(self.ack_timeout)
            job_id = job_id.id
        return JobStream(self.address, job_id, after, window=window, timeout=timeout, codec=codec)

    def stream_token(self, job_id: str, *, timeout: float | None = 30.0) -> str:
        """The token that lets a network client put to the stream of a job this client
        submitted (``put``/``header`` on the TCP line protocol)."""
        self._check_usable()
        msg = Listen(new_msgid(), "token", {"stream": job_id})
        job = Job(msg.msgid, "")
        job._frames = msg.to_frames()
        return self._send_and_wait(job, timeout)

    def watch_workers(self, timeout: float = 10.0) -> WorkerEvents:
        """Subscribe to workers joining and leaving (see :class:`.WorkerEvents`).

        The result's ``workers`` is the map of connected workers when the
        notices start; iterate it (or call ``get(timeout)``) for each later
        ``registered`` / ``unregistered`` notice. Raises ``TimeoutError`` if
        the broker's notices cannot be reached within ``timeout`` seconds.
        """
        endpoint = self.workers().get("notify")
        if not endpoint:
            raise JobFailed("NotAvailable", "this broker publishes no notices (--notify '')")
        events = WorkerEvents(notify_address(endpoint, self.address), keys=self._keys)
        try:
            events.join(lambda probe: self.query("workers", probe=probe), timeout)
        except BaseException:
            events.close()
            raise
        return events

    # ------------------------------------------------------------ schedules

    def schedule(
        self,
        fn: Any,
        /,
        *args: Any,
        every: timedelta | float | None = None,
        cron: str | None = None,
        queue: str | None = None,
        run_count: int | None = None,
        nohaste: bool = False,
        timeout: float | None = None,
        retries: int = 0,
        guarantee: bool = False,
        label: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Run ``fn(*args, **kwargs)`` every ``every`` seconds (or ``timedelta``), or at ``cron``.

        Returns the schedule's id once the broker has stored it. Give exactly
        one of ``every`` and ``cron`` (5 fields, in the broker's time zone). It
        runs at once and then on each tick unless ``nohaste=True`` (default
        ``False``); ``run_count`` (default ``None``: forever) stops it after
        that many runs. ``queue`` (default: the task's queue, else
        ``"default"``), ``timeout``, ``retries``, ``guarantee`` and ``label``
        are as in :meth:`submit`, for every job it runs. Scheduling the same
        call again with the same options changes nothing; with other options
        it replaces the schedule (the id is that of the call: target and
        arguments). Raises ``TypeError``/``ValueError`` before sending and
        :class:`~corral.errors.BadRequest` for what the broker refuses.
        """
        params = schedule_params(
            fn,
            args,
            kwargs,
            every=every,
            cron=cron,
            queue=queue,
            run_count=run_count,
            nohaste=nohaste,
            timeout=timeout,
            retries=retries,
            guarantee=guarantee,
            label=label,
        )
        return self.query("schedule", **params)["id"]

    def unschedule(self, schedule_id: str) -> dict[str, Any]:
        """Stop a schedule for good; returns its last record. Raises NotFound if unknown."""
        return self.query("unschedule", id=schedule_id)

    def schedules(self) -> list[dict[str, Any]]:
        """Every active schedule: target, cadence, runs, last and next run, who runs it."""
        return self.query("schedules")

    def map(
        self,
        fn: Any,
        /,
        *iterables: Iterable[Any],
        window: int = 64,
        queue: str | None = None,
        timeout: float | None = None,
        result_timeout: float | None = None,
        **options: Any,
    ) -> Iterator[Any]:
        """Run ``fn`` over the zipped items of ``iterables`` (like ``map``); yield results in order.

        At most ``window`` (default 64) jobs are in flight at any time. The
        first failure, in input order, is raised when reached; jobs not yet
        sent are then cancelled. ``queue`` and ``timeout`` (the job's time
        limit) and further ``options`` (``retries``, ``guarantee``, ``label``,
        ``headers``) are as in :meth:`submit_with`. ``result_timeout`` (default
        ``None``) bounds each wait for a result.
        """
        if window < 1:
            raise ValueError(f"window must be >= 1, not {window!r}")
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        return self._map(
            fn,
            zip(*iterables, strict=False),
            window,
            result_timeout,
            dict(options, queue=queue, timeout=timeout),
        )

    def _map(
        self,
        fn: Any,
        calls: Iterator[tuple[Any, ...]],
        window: int,
        result_timeout: float | None,
        options: dict[str, Any],
    ) -> Iterator[Any]:
        in_flight: deque[Job] = deque()
        try:
            for args in calls:
                in_flight.append(self.submit_with(fn, args, None, **options))
                if len(in_flight) >= window:
                    yield in_flight.popleft().result(result_timeout)
            while in_flight:
                yield in_flight.popleft().result(result_timeout)
        finally:
            for job in in_flight:
                job.cancel()

    # ------------------------------------------------------------ lifecycle

    def close(self, timeout: float | None = None) -> None:
        """Stop the client: send what was submitted, then release the socket.

        Waits up to ``timeout`` seconds (default ``None``: up to
        ``ack_timeout``) for the broker to acknowledge jobs already sent, so
        that a program may submit and exit. Jobs still without an outcome then
        fail with :class:`~corral.errors.ClientClosed`; further submits raise it.
        Safe to call more than once and from any thread.
        """
        with self._close_lock:
            if self._closing:
                first = False
            else:
                first = True
                wait = self.ack_timeout if timeout is None else max(0.0, timeout)
                self._close_deadline = monotonic() + wait
                self._closing = True
        if first and self._generation == _fork_generation:
            self._wake()
        if threading.current_thread() is not self._thread and self._thread.is_alive():
            if self._generation == _fork_generation:
                self._thread.join()
        _live_clients.discard(self)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called (or the client was inherited through fork)."""
        return self._closing or self._generation != _fork_generation

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<Client {self.address} identity={self.identity} {state}>"

    def _check_usable(self) -> None:
        if self._generation != _fork_generation:
            raise ClientClosed(
                "this client was created before fork(); create a new one "
                "in the child (corral.client.default_client() does)"
            )
        if self._closing:
            raise ClientClosed("the client is closed")

    # ------------------------------------------------------------ hand-over

    def _enqueue(self, job: Job) -> None:
        job._deadline = monotonic() + self.ack_timeout
        self._outbox.append(job)
        if not self._signalled:
            self._signalled = True
            self._wake()
        if self._stopped:
            # close() won the race: the I/O thread is gone, fail what it cannot send.
            self._fail_outbox()

    def _send_and_wait(self, job: Job, timeout: float | None) -> Any:
        """Send ``job`` and return its result, running the I/O loop here if it is free.

        The loop is free when the I/O thread has nothing in flight and sleeps;
        otherwise the job goes the usual way, through the I/O thread.
        """
        io, lock = self._io, self._io_lock
        deadline = math.inf if timeout is None else monotonic() + timeout
        led = False
        if io is not None and lock.acquire(blocking=False):
            busy = True
            try:
                led = not self._stopped
                if led:
                    job._deadline = monotonic() + self.ack_timeout
                    self._outbox.append(job)
                    io.lead(job, deadline)
                # What is still in flight (this job after a timeout, other threads'
                # jobs) is the I/O thread's again. As in its own loop, the flag is
                # lowered before looking, so a submitter coming later writes a byte.
                self._signalled = False
                busy = not io.idle()
            finally:
                lock.release()
                if busy:
                    self._signalled = True
                    self._wake()
        if not led:
            # The I/O thread runs the loop (or has ended: then this fails the job).
            self._enqueue(job)
            return job.result(timeout)
        if timeout is None:
            return job.result()
        return job.result(max(0.0, deadline - monotonic()))

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except (BlockingIOError, InterruptedError):
            pass  # the buffer is full of wake-ups already
        except OSError:
            pass  # closed: the I/O thread has stopped and the caller handles that

    def _fail_outbox(self) -> None:
        while True:
            try:
                job = self._outbox.popleft()
            except IndexError:
                return
            _settle_error(job, ClientClosed("the client was closed before the job was sent"))

    # ------------------------------------------------------------ I/O thread

    def _run(self) -> None:
        io = self._io = _IOLoop(self)
        try:
            io.run()
        except Exception:
            log.exception("corral client I/O thread crashed")
        finally:
            # Taken so that a thread running the loop (Client.call) is out of it first.
            with self._io_lock:
                self._closing = True
                self._stopped = True
                self._fail_outbox()
                for job in io.pending.values():
                    _settle_error(
                        job, ClientClosed("the client was closed before the job's outcome arrived")
                    )
                io.pending.clear()
                self._sock.close()
                self._wake_r.close()
                self._wake_w.close()


class _IOLoop:
    """The I/O thread's state: what was sent, what awaits acknowledgement."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.sock = client._sock
        #: Sent jobs by id, until their outcome (or a refusal) arrives.
        self.pending: dict[str, Job] = {}
        #: Sent jobs in send order, which is ack-deadline order.
        self.unacked: deque[Job] = deque()
        self.blocked = False
        #: Connection events: after a reconnect the client catches up (see _resync).
        self.monitor = self.sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )
        self.disconnected = False
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        self.poller.register(client._wake_r, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.wake_fd = client._wake_r.fileno()  # zmq.Poller reports plain sockets by fd

    def run(self) -> None:
        try:
            self._run()
        finally:
            with self.client._io_lock:
                self.client._stopped = True
                self.sock.disable_monitor()
                self.monitor.close(0)

    def _run(self) -> None:
        client, lock = self.client, self.client._io_lock
        # With nothing in flight, sleep on the wake-up socket only and leave the
        # DEALER to a thread that wants to send and wait itself (Client.call).
        parking = select.poll()
        parking.register(self.wake_fd, select.POLLIN)
        while True:
            with lock:
                parked, limit = False, None
                if self.idle():
                    self._drain_wake()
                    client._signalled = False  # lowered before the last look, as below
                    parked = self.idle()
                    # What a drained byte announced is in plain sight now (a job, a
                    # close): deal with it without sleeping first.
                    limit = 0
                if not parked:
                    self.iterate(limit)
                    if client._closing and self._may_stop(monotonic()):
                        client._stopped = True  # before letting go: no one leads after this
                        return
            if parked:
                parking.poll()

    def iterate(self, limit: int | None) -> None:
        """One pass: wait for something (at most ``limit`` ms), receive, send, expire."""
        client, sock, poller = self.client, self.sock, self.poller
        # `_signalled` is False only while we sleep in poll: a submitter that finds it
        # False writes one wake-up byte. Lowered *before* the outbox is looked at, so a
        # job appended after that look is always followed by a byte; while we are awake
        # submitters make no system call (and so do not hand us the GIL once per job).
        client._signalled = False
        if client._outbox and not self.blocked:
            timeout: int | None = 0
        else:
            timeout = self._poll_timeout()
            if limit is not None and (timeout is None or timeout > limit):
                timeout = limit
        events = poller.poll(timeout)
        client._signalled = True
        for item, _ in events:
            if item == self.wake_fd:
                self._drain_wake()
            elif item is self.monitor:
                self._on_connection_events()
        if events and any(item is sock for item, _ in events):
            self._receive()
        was_blocked = self.blocked
        self._send()
        if self.blocked != was_blocked:
            poller.modify(sock, zmq.POLLIN | (zmq.POLLOUT if self.blocked else 0))
        self._expire(monotonic())

    def lead(self, job: Job, deadline: float) -> None:
        """Run the loop in the calling thread until ``job`` is done, ``deadline`` or close()."""
        client = self.client
        while not job.done() and not client._closing:
            left = deadline - monotonic()
            if left <= 0:
                return
            self.iterate(None if left == math.inf else math.ceil(left * 1000))

    def idle(self) -> bool:
        """Nothing to send, nothing awaiting an answer, not closing."""
        client = self.client
        if client._outbox or self.pending or client._closing:
            return False
        unacked = self.unacked
        while unacked and (unacked[0]._acked or unacked[0].done()):
            unacked.popleft()
        return not unacked

    def _poll_timeout(self) -> int | None:
        deadline = math.inf
        unacked = self.unacked
        while unacked and (unacked[0]._acked or unacked[0].done()):
            unacked.popleft()
        if unacked:
            deadline = unacked[0]._deadline
        outbox = self.client._outbox
        if outbox:
            deadline = min(deadline, outbox[0]._deadline)
        if self.client._closing:
            deadline = min(deadline, self.client._close_deadline)
        if deadline == math.inf:
            return None
        return max(0, math.ceil((deadline - monotonic()) * 1000))

    def _drain_wake(self) -> None:
        try:
            while self.client._wake_r.recv(4096):
                pass
        except (BlockingIOError, InterruptedError):
            pass

    def _send(self) -> None:
        outbox, sock, pending, unacked = self.client._outbox, self.sock, self.pending, self.unacked
        while outbox:
            job = outbox[0]
            if not job._started:
                if not job.set_running_or_notify_cancel():
                    outbox.popleft()  # cancelled before it was sent
                    continue
                job._started = True
            try:
                send_frames(sock, job._frames)  # type: ignore[arg-type]
            except zmq.Again:
                # zmq's queue is full (broker slow or away): keep the rest in our deque.
                self.blocked = True
                return
            outbox.popleft()
            # job._frames stay until the broker answers: _resync may send them again.
            pending[job.id] = job
            attach = job._attach
            if attach is not None and attach.id not in pending:
                pending[attach.id] = attach
            unacked.append(job)
        self.blocked = False

    def _receive(self) -> None:
        sock = self.sock
        for _ in range(_RECV_BATCH):
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                return
            self._on_frames(frames)

    def _on_frames(self, frames: list[bytes]) -> None:
        deliver(self.pending, frames)

    def _on_connection_events(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self.monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_DISCONNECTED:
                self.disconnected = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and self.disconnected:
                self.disconnected = False
                self._resync()

    def _resync(self) -> None:
        """Catch up after a reconnect: the broker may have restarted while we were away.

        What the broker has not answered yet -- jobs not acknowledged, queries --
        may have died with the old connection, so it is sent again (a job keeps
        its id: a broker that already had it refuses it as a duplicate, which
        counts as acknowledged) with a fresh deadline. Outcomes produced while we
        were away could not reach us, so the broker is asked how the other jobs
        ended. All of it goes out on the new connection ahead of anything else.
        """
        deadline = monotonic() + self.client.ack_timeout
        resent = 0
        for job in self.unacked:
            if job._frames is not None and not job._acked and not job.done():
                job._resent = True
                job._deadline = deadline
                self._send_now(job._frames)
                resent += 1
        waiting = [jid for jid, job in self.pending.items() if job._is_job and job._acked]
        for query in resync_queries(waiting):
            answer = Job(query.msgid, "")
            answer.add_done_callback(self._on_outcomes)
            answer.set_running_or_notify_cancel()
            self.pending[query.msgid] = answer
            self._send_now(query.to_frames())
        log.info(
            "reconnected to %s: sent %d unanswered message(s) again, asked about %d job(s)",
            self.client.address,
            resent,
            len(waiting),
        )

    def _send_now(self, frames: list[bytes]) -> None:
        try:
            self.sock.send_multipart(frames, zmq.NOBLOCK)
        except zmq.Again:
            log.warning("could not catch up after a reconnect: the send queue is full")

    def _on_outcomes(self, answer: Job) -> None:
        # Runs on this I/O thread, inside deliver().
        if answer.cancelled() or answer.exception() is not None:
            log.warning("could not catch up after a reconnect: %s", answer.exception())
            return
        apply_outcomes(self.pending, answer.result())

    def _expire(self, now: float) -> None:
        unacked, pending = self.unacked, self.pending
        timeout = self.client.ack_timeout
        while unacked:
            job = unacked[0]
            if job._acked or job.done():
                unacked.popleft()
                continue
            if job._deadline > now:
                break
            unacked.popleft()
            pending.pop(job.id, None)
            _settle_error(job, NotAcknowledged(job.id, timeout))
        outbox = self.client._outbox
        # Jobs zmq would not even take (broker away, queue full) time out the same way.
        while outbox and outbox[0]._deadline <= now:
            job = outbox.popleft()
            _settle_error(job, NotAcknowledged(job.id, timeout))

    def _may_stop(self, now: float) -> bool:
        if now >= self.client._close_deadline:
            return True
        if self.client._outbox:
            return False
        # Acknowledgements come back in send order, so trimming the front is enough.
        unacked = self.unacked
        while unacked and (unacked[0]._acked or unacked[0].done()):
            unacked.popleft()
        return not unacked


def _attached(query: Job) -> None:
    """The broker's answer to a ``job(id)`` handle's QUERY (on the I/O thread)."""
    handle = query._attach
    assert handle is not None and handle._client is not None
    io = handle._client._io
    if query.cancelled():
        return
    exc = query.exception()
    if exc is not None:
        if io is not None:
            io.pending.pop(handle.id, None)
        _settle_error(handle, exc)
    elif io is not None:
        apply_outcomes(io.pending, query.result())


def _settle_error(job: Job, exc: BaseException) -> None:
    try:
        job.set_exception(exc)
    except InvalidStateError:
        pass


def close_all_clients() -> None:
    """Close every open client of this process (at interpreter exit)."""
    for client in list(_live_clients):
        client.close()
