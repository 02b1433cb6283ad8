"""A worker's connection to the broker: INFORM, READY per free slot, run, REPLY.

The worker keeps one DEALER socket with a stable identity for its whole
life. ZeroMQ reconnects the TCP connection by itself (with exponential
backoff up to ``reconnect_max``); the worker's job is to notice a broker that
went silent or forgot it and to announce itself again with the same uuid and
the ids of the jobs it still runs, so the broker can keep them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import zmq

from corral._loop import SocketWatcher, send_frames
from corral.protocol import (
    DEFAULT_BACKEND,
    PROTOCOL,
    READY_FLAG,
    Abort,
    Ack,
    Error,
    Heartbeat,
    Inform,
    Kbye,
    Message,
    ProtocolError,
    Recall,
    Request,
    encode_outcome_error,
    new_msgid,
    new_tag,
    parse,
)
from corral.security.curve import client_keys, connect_curve
from corral.security.keys import PeerKeys
from corral.worker.pool import Pool
from corral.worker.streams import StreamOutbox

log = logging.getLogger("corral.worker")

#: Default prefetch with a corral broker, per process, until the jobs' run time
#: is known. A busy broker answers a finished job's READY later than a process
#: takes to run a short job; held jobs keep every process fed through that wait.
#: Held jobs are never stuck: the broker recalls them for an idle process.
PREFETCH_PER_PROCESS = 4
#: Then each process holds as many jobs as run in PREFETCH_WINDOW seconds at
#: the recent run time, from 1 to PREFETCH_MAX_PER_PROCESS: short jobs get a
#: deep pipeline (two processes on no-op jobs: about 6,800 jobs/s holding 4
#: each, 7,800 holding 16), while a job arriving for a busier queue waits
#: behind held ones for about the window at most.
PREFETCH_WINDOW = 0.005
PREFETCH_MAX_PER_PROCESS = 16
#: The depth changes only once the run time is this factor past what fits it:
#: the average of no-op jobs wanders, and each change sends or withholds READYs.
PREFETCH_HYSTERESIS = 1.25


@dataclass(slots=True)
class WorkerConfig:
    """Settings of one worker process.

    ``queues`` are ``(weight, name)`` pairs (higher weight is served first);
    ``concurrency`` is the number of pool processes (default: CPU count);
    ``imports`` are the deployment's modules with ``@corral.task`` functions;
    ``allow`` are module prefixes whose callables may run as well.
    """

    backend: str = DEFAULT_BACKEND
    queues: tuple[tuple[int, str], ...] = ((10, "default"),)
    concurrency: int = field(default_factory=lambda: os.cpu_count() or 1)
    imports: tuple[str, ...] = ()
    allow: tuple[str, ...] = ()
    max_jobs_per_child: int | None = None
    #: Jobs accepted beyond the number of processes, so a process that finishes
    #: finds its next job already here instead of waiting a round trip to the
    #: broker. A corral broker asks a prefetched job back (RECALL) as soon as a
    #: process elsewhere is idle, so it does not wait behind a long job while
    #: another worker could run it. ``None``: with a corral broker, as many per
    #: process as run in PREFETCH_WINDOW (PREFETCH_PER_PROCESS to start with);
    #: none with EventMQ's router (it cannot take a job back).
    prefetch: int | None = None
    heartbeat_interval: float = 3.0
    heartbeat_liveness: int = 3
    reconnect_max: float = 5.0
    grace: float = 30.0
    identity: str = field(default_factory=lambda: str(uuid.uuid4()))
    #: Outcomes kept after sending, re-sent after a reconnect in case the
    #: broker that should have received them died first.
    resend_window: int = 1000
    #: Job streams (corral.runtime): put the job's stdout/stderr lines on its
    #: stream too; the lowest ``logging`` level put there (None: no records);
    #: how many messages a job's process buffers before it drops log lines.
    capture_output: bool = False
    stream_log_level: str | None = "info"
    stream_buffer: int = 10_000
    #: With a corral broker, a job that starts at once on an idle process has its
    #: outcome sent by that process straight to the broker (over a connection of
    #: its own to ``backend``): one hop fewer for a client waiting on it. Jobs
    #: that queue behind others, and jobs that put messages on their stream,
    #: report through the worker as always.
    direct_outcomes: bool = True
    #: This worker's CURVE keys (``corral keys add --role worker``), for a broker
    #: with keys; ``None``: connect without (a broker on loopback without keys).
    keys: PeerKeys | None = None


class WorkerManager:
    def __init__(self, config: WorkerConfig, *, context: zmq.Context | None = None) -> None:
        self.config = config
        self.context = context or zmq.Context.instance()
        # What waits for the broker (away, say) is bounded like a job's own buffer.
        self.streams = StreamOutbox(self._send, max_pending=config.stream_buffer)
        self.pool = Pool(
            config.concurrency,
            imports=config.imports,
            allow=config.allow,
            max_jobs_per_child=config.max_jobs_per_child,
            on_stream=self.streams.add,
            stream_options={
                "max_entries": config.stream_buffer,
                "log_level": config.stream_log_level,
                "capture": config.capture_output,
            },
            direct_to=(
                (config.backend, config.identity, client_keys(config.keys))
                if config.direct_outcomes
                else None
            ),
            resend=self._resend_outcome,
        )
        self.running: dict[str, asyncio.Future[bytes]] = {}
        self.processed = 0
        #: Outcomes the job's process sent to the broker itself (direct_outcomes),
        #: and the jobs whose process is to send READY for their slot with it.
        self.delivered = 0
        self._offered: set[str] = set()
        self._recent: OrderedDict[str, bytes] = OrderedDict()
        self._sock: zmq.Socket | None = None
        self._watcher: SocketWatcher | None = None
        self._informed = False
        self._inform_id = ""
        self._inform_sent = 0.0
        self._last_heard = 0.0
        self._last_sent = 0.0
        self._draining = False
        #: False once the grace period is over: jobs that arrive are left to the broker.
        self._accepting = True
        #: The broker is corral (not EventMQ's router): it knows corral's commands.
        self._corral_broker = False
        #: The broker takes READY as a third frame of REPLY (one message per job).
        self._reply_ready = False
        #: The broker takes outcomes from this worker's processes (see direct_outcomes).
        self._direct = False
        #: Jobs held per process when prefetch adapts to the run time (see
        #: PREFETCH_WINDOW), and slots not offered again after it went down.
        self._depth = PREFETCH_PER_PROCESS
        self._withheld = 0
        self._leave_id = ""
        self._leave_acked: asyncio.Future[None] | None = None
        self._stopped: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def identity(self) -> str:
        return self.config.identity

    # ------------------------------------------------------------ lifecycle

    async def run(self) -> None:
        """Start the pool, connect, serve until :meth:`stop`, then drain and say KBYE."""
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        await self.pool.start()
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity.encode())
        sock.setsockopt(zmq.LINGER, 2000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, int(self.config.reconnect_max * 1000))
        sock.setsockopt(zmq.SNDHWM, 100_000)
        connect_curve(sock, self.config.keys)
        sock.connect(self.config.backend)
        self._sock = sock
        self._watcher = SocketWatcher(sock, self._on_message)
        self._last_heard = time.monotonic()
        self._send_inform()
        ticker = asyncio.ensure_future(self._ticker())
        log.info(
            "worker %s: %d process(es), queues %s, broker %s",
            self.identity,
            self.config.concurrency,
            ",".join(f"{n}:{w}" for w, n in self.config.queues),
            self.config.backend,
        )
        try:
            await self._stopped.wait()
        finally:
            # Heartbeats go on while running jobs finish: the broker would otherwise
            # give this worker up for lost during a long job's grace period.
            try:
                await self._drain()
            finally:
                ticker.cancel()

    def stop(self) -> None:
        """Begin an orderly stop: no new jobs, finish running ones within the grace period."""
        self._draining = True
        if self._stopped is not None:
            self._stopped.set()

    async def _drain(self) -> None:
        assert self._loop is not None
        deadline = self._loop.time() + self.config.grace
        if self._informed and self._corral_broker:
            # Step one of the goodbye: the broker stops sending jobs and answers once
            # every job it sent us is on its way, so those we then have are all of them.
            self._leave_acked = self._loop.create_future()
            self._leave_id = new_msgid()
            self._send_msg(Kbye(self._leave_id, draining=True))
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._leave_acked),
                    min(self.config.grace, self.config.heartbeat_interval * 2),
                )
            except TimeoutError:
                log.warning("the broker did not answer our goodbye; leaving all the same")
            # Prefetched jobs go back at once: another worker can start them now.
            released = sum(self._release(job_id) for job_id in self.pool.waiting)
            if released:
                log.info("handed %d job(s) not started yet back to the broker", released)
        if self.running:
            log.info(
                "draining: waiting up to %.0f s for %d running job(s)",
                max(0.0, deadline - self._loop.time()),
                len(self.running),
            )
        while self.running and (left := deadline - self._loop.time()) > 0:
            await asyncio.wait(
                list(self.running.values()), timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
        self._accepting = False
        abandoned = list(self.running)
        if abandoned:
            log.warning("grace period over; %d job(s) abandoned to the broker", len(abandoned))
        self._send([b"KBYE"])
        self.running.clear()
        self._offered.clear()
        await self.pool.close(grace=0)
        if self._watcher:
            self._watcher.close()
        if self._sock is not None:
            self._sock.close(linger=2000)

    # ------------------------------------------------------------ sending

    def _send(self, frames: Sequence[bytes]) -> None:
        cmd, *rest = frames
        assert self._sock is not None
        try:
            send_frames(self._sock, [b"", PROTOCOL, cmd, new_tag(), *rest])
        except zmq.Again:
            log.warning("send queue to the broker is full; %s dropped", cmd.decode())
        self._last_sent = time.monotonic()
        if self._watcher:
            self._watcher.kick()

    def _send_msg(self, msg: Message) -> None:
        assert self._sock is not None
        try:
            send_frames(self._sock, msg.to_frames())
        except zmq.Again:
            log.warning("send queue to the broker is full; %s dropped", msg.command.value)
        self._last_sent = time.monotonic()
        if self._watcher:
            self._watcher.kick()

    def _send_inform(self) -> None:
        self._informed = False
        self.streams.registering()
        self._inform_id = new_msgid()
        self._inform_sent = time.monotonic()
        msg = Inform(
            self._inform_id,
            self.config.queues,
            "worker",
            {
                "running": list(self.running),
                # Outcomes the broker may not have: it keeps their jobs for us until
                # we send them again (see _resend_recent).
                "outcomes": list(self._recent) if self._reconnected else [],
                "concurrency": self.config.concurrency,
                "pid": os.getpid(),
            },
        )
        assert self._sock is not None
        self._sock.send_multipart(msg.to_frames(), zmq.NOBLOCK)

    def _send_ready(self, count: int) -> None:
        for _ in range(count):
            self._send([b"READY"])

    @property
    def prefetch(self) -> int:
        p = self.config.prefetch
        if p is None:
            return self.config.concurrency * self._depth if self._corral_broker else 0
        return p

    @property
    def free_slots(self) -> int:
        return self.config.concurrency + self.prefetch - len(self.running)

    # ------------------------------------------------------------ receiving

    def _on_message(self, frames: list[bytes]) -> None:
        self._last_heard = time.monotonic()
        try:
            msg = parse(frames)
        except ProtocolError as exc:
            log.warning("bad message from the broker: %s", exc)
            if len(frames) > 3 and frames[2] == b"REQUEST" and exc.msgid:
                # A job we cannot run (EventMQ's router forwards any body): say why,
                # and the slot it took is free again.
                if exc.msgid not in self.running:
                    error = encode_outcome_error("BadRequest", exc.detail)
                    self._reply(exc.msgid, error, self._reoffer_slot())
            return
        if isinstance(msg, Request):
            self._on_request(msg)
        elif isinstance(msg, Ack):
            if self._leave_acked is not None and msg.acked == self._leave_id:
                if not self._leave_acked.done():
                    self._leave_acked.set_result(None)
            elif msg.acked == self._inform_id and not self._informed:
                self._informed = True
                log.info("registered with the broker")
                # Only a corral broker sends ACK meta: EventMQ's router knows no
                # corral commands (streams, the two-step goodbye).
                self._corral_broker = msg.meta is not None
                self._reply_ready = bool((msg.meta or {}).get("reply_ready"))
                # Outcomes from our processes count only with the proof the broker gave.
                proof = str((msg.meta or {}).get("proof") or "").encode()
                self._direct = bool((msg.meta or {}).get("direct_outcomes")) and bool(proof)
                self.pool.direct_proof = proof if self._direct else None
                self.streams.registered(bool((msg.meta or {}).get("streams")), self._reconnected)
                self._resend_recent()
                self._withheld = 0  # the broker counts this worker's slots from zero
                if not self._draining:
                    self._send_ready(self.free_slots)
        elif isinstance(msg, Heartbeat):
            pass
        elif isinstance(msg, Abort):
            self._on_abort(msg)
        elif isinstance(msg, Recall):
            if self._release(msg.ref) and self._reoffer_slot():
                self._send_ready(1)
        elif isinstance(msg, Kbye):
            self._informed = False
            if self._draining:
                log.info("the broker is shutting down too")
                if self._leave_acked is not None and not self._leave_acked.done():
                    self._leave_acked.set_result(None)  # no answer to our goodbye will come
            else:
                log.warning("the broker is shutting down; waiting for it to come back")
        elif isinstance(msg, Error):
            if msg.reason == "unknown-worker":
                if self._draining:
                    pass  # leaving anyway
                elif self._informed or time.monotonic() - self._inform_sent > 1.0:
                    log.warning("the broker does not know this worker (restarted?); re-registering")
                    self._reconnected = True
                    self._send_inform()
            else:
                log.warning("the broker refused a message: %s (%s)", msg.reason, msg.detail)

    def _on_request(self, msg: Request) -> None:
        job_id = msg.msgid
        # While draining a job may still arrive: the broker sent it before it heard we
        # are leaving. It runs within the grace period like the others; after that the
        # goodbye tells the broker it is lost.
        if not self._accepting:
            log.warning("job %s arrived after the grace period; left to the broker", job_id)
            return
        if job_id in self.running:
            return  # the broker re-sent a job we already run
        timeout = msg.headers.timeout or None
        self.streams.start(job_id)
        # A job that starts now, with nothing queued before it, is most likely one a
        # client waits for: its process sends the outcome to the broker itself. Under
        # load (jobs queued here) outcomes come through this process.
        direct = (
            self._direct
            and self._informed
            and not self._draining
            and self.pool.free_slots > 0
            and not self.pool.waiting
        )
        # READY for the slot goes with that outcome unless a slot is being withheld
        # (then _on_done decides, as for any job).
        offer = direct and self._reply_ready and not self._withheld
        if offer:
            self._offered.add(job_id)
        # The body goes to the pool as it came; the child decodes it (and refuses a
        # malformed one with BadRequest).
        self.running[job_id] = self.pool.run_body(
            job_id, msg.body, timeout, self._on_done, direct, offer
        )

    def _on_abort(self, msg: Abort) -> None:
        if msg.ref not in self.running:
            return  # already finished: the broker ignores what we sent
        log.warning("job %s aborted by the broker (%s)", msg.ref, msg.reason or "no reason given")
        # The pool kills the job's process and resolves it as JobCancelled, which
        # _on_done reports like any outcome (the broker expects it), freeing the slot.
        self.pool.cancel(msg.ref)

    def _release(self, job_id: str) -> bool:
        """Hand a job we have not started back to the broker (RELEASE)."""
        if job_id not in self.running or not self.pool.withdraw(job_id):
            return False  # started (or ended) already: its outcome will tell
        del self.running[job_id]
        self._offered.discard(job_id)
        self.streams.finish(job_id)
        self._send([b"RELEASE", job_id.encode()])
        return True

    def _on_done(self, job_id: str, outcome: bytes, delivered: bool = False) -> None:
        self.streams.finish(job_id)  # its stream messages go before its outcome
        offered = job_id in self._offered
        self._offered.discard(job_id)
        if self.running.pop(job_id, None) is None:
            return
        self.processed += 1
        if delivered:
            # Its process sent the outcome to the broker (kept here for re-sending),
            # with READY for the slot if it was offered.
            self.delivered += 1
            self._keep(job_id, outcome)
            if not offered and self._reoffer_slot():
                self._send_ready(1)
        else:
            self._reply(job_id, outcome, self._reoffer_slot())
        self._adapt_prefetch()

    def _reoffer_slot(self) -> bool:
        """A slot just freed: whether to offer it to the broker again (READY).

        After prefetch went down, the freed slot is kept instead (one fewer withheld).
        """
        if not self._informed or self._draining:
            return False
        if self._withheld:
            self._withheld -= 1  # prefetch went down: this slot is not offered again
            return False
        return True

    def _adapt_prefetch(self) -> None:
        """Hold about PREFETCH_WINDOW of work per process, at the recent run time.

        Depth ``d`` fits ``d - 1 < window / run time <= d``; it is kept until that
        ratio is more than PREFETCH_HYSTERESIS outside, so that a run time near a
        boundary does not flip it back and forth.
        """
        run_time = self.pool.run_time
        if self.config.prefetch is not None or not self._corral_broker or not run_time:
            return
        ideal = PREFETCH_WINDOW / run_time
        if (self._depth - 1) / PREFETCH_HYSTERESIS <= ideal <= self._depth * PREFETCH_HYSTERESIS:
            return
        depth = min(PREFETCH_MAX_PER_PROCESS, max(1, math.ceil(ideal)))
        change = (depth - self._depth) * self.config.concurrency
        if not change:
            return
        self._depth = depth
        if change < 0:
            self._withheld -= change
            return
        taken_back = min(self._withheld, change)
        self._withheld -= taken_back
        if change > taken_back and self._informed and not self._draining:
            self._send_ready(change - taken_back)

    def _keep(self, job_id: str, outcome: bytes) -> None:
        self._recent[job_id] = outcome
        if len(self._recent) > self.config.resend_window:
            self._recent.popitem(last=False)

    def _resend_outcome(self, job_id: str, outcome: bytes) -> None:
        """An outcome a process sent the broker itself, then died: it may not have left."""
        log.info("the process that ran job %s died just after sending its outcome; re-sent", job_id)
        if self._sock is not None:
            self._send([b"REPLY", outcome, job_id.encode()])

    def _reply(self, job_id: str, outcome: bytes, ready: bool) -> None:
        """Send a job's outcome, and READY for its slot when ``ready``."""
        self._keep(job_id, outcome)
        if ready and self._reply_ready:
            self._send([b"REPLY", outcome, job_id.encode(), READY_FLAG])
            return
        self._send([b"REPLY", outcome, job_id.encode()])
        if ready:
            self._send_ready(1)

    def _resend_recent(self) -> None:
        # After a reconnect the outcomes sent just before may have died with
        # the old broker. The broker records the first outcome of a job and
        # counts the rest, so re-sending is safe.
        if self._recent and self._reconnected:
            for job_id, outcome in self._recent.items():
                self._send([b"REPLY", outcome, job_id.encode()])
        self._reconnected = False

    _reconnected = False

    # ------------------------------------------------------------ heartbeats

    async def _ticker(self) -> None:
        interval = self.config.heartbeat_interval
        while True:
            await asyncio.sleep(min(interval / 3, 1.0))
            now = time.monotonic()
            if self._draining:
                # Leaving: heartbeats only (none after the goodbye), no registering again.
                if self._accepting and now - self._last_sent >= interval:
                    self._send([b"HEARTBEAT", repr(time.time()).encode()])
                continue
            if now - self._last_sent >= interval:
                self._send([b"HEARTBEAT", repr(time.time()).encode()])
            silent = now - self._last_heard
            if self._informed and silent > interval * self.config.heartbeat_liveness:
                log.warning("no word from the broker for %.1f s; re-registering", silent)
                self._reconnected = True
                self._send_inform()
            elif not self._informed and now - self._inform_sent > interval:
                self._reconnected = True
                self._send_inform()
