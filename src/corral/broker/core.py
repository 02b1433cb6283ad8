"""The broker's state machine: messages in, messages out, no I/O.

:class:`BrokerCore` owns queues, workers, schedulers and the table of jobs in
flight; its :class:`~corral.scheduler.desk.ScheduleDesk` owns the schedules.
The shell (:mod:`corral.broker.server`) feeds it every message it
receives with the time, and sends what the core appended to :attr:`outbox`.
Acknowledgements of accepted jobs go to :attr:`acks` instead, so that a shell
with a store can hold them until the job is durably recorded.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import logging
import random
import secrets
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

import msgspec

from corral.broker import access
from corral.broker.model import Job, JobState, Queue, Scheduler, Worker, peer_name
from corral.protocol import (
    DEFAULT_MAX_FRAME,
    DEFAULT_QUEUE,
    PROTOCOL,
    Abort,
    Ack,
    Command,
    Disconnect,
    Error,
    Heartbeat,
    Hello,
    Inform,
    Kbye,
    Message,
    ProtocolError,
    Query,
    Ready,
    Recall,
    Release,
    ReloadKeys,
    Reply,
    Request,
    Schedule,
    ShowSchedulers,
    ShowWorkers,
    Status,
    Unschedule,
    encode_outcome_error,
    new_msgid,
    new_tag,
    parse,
)
from corral.scheduler.desk import OPS as SCHEDULE_OPS
from corral.scheduler.desk import Claim, Refusal, ScheduleDesk, SchedulerConfig
from corral.scheduler.ids import schedule_id, tick_id
from corral.security.principal import SCHEDULER, TRUSTED, Principal, Visibility
from corral.store.base import JobRecord, ScheduleRecord, Snapshot, WorkerRecord

log = logging.getLogger("corral.broker")

_REPLY = b"REPLY"
_REQUEST = b"REQUEST"


class Dest(IntEnum):
    FRONTEND = 0
    BACKEND = 1
    ADMIN = 2


Outgoing = tuple[Dest, bytes, list[bytes]]
#: A handler of a corral command the core leaves to another part (job streams):
#: ``(socket, identity, message, now, sender)``.
Extension = Callable[[Dest, bytes, Message, float, Principal], None]


@dataclass(slots=True)
class BrokerConfig:
    """Broker settings that the core's decisions depend on.

    ``heartbeat_interval`` seconds between HEARTBEATs to workers and
    schedulers (EventMQ: 3); a peer silent for ``heartbeat_liveness``
    intervals is dead. ``default_queues`` serve workers that INFORM with no
    queues. ``max_frame`` bounds a single frame's size in bytes.
    """

    heartbeat_interval: float = 3.0
    heartbeat_liveness: int = 3
    default_queues: tuple[tuple[int, str], ...] = ((10, DEFAULT_QUEUE),)
    max_frame: int = DEFAULT_MAX_FRAME
    #: How many distinct (peer, reason) pairs of bad input are remembered for log-once.
    bad_input_memory: int = 4096
    #: Retry backoff: ``base * 2**(attempt-1)`` seconds, at most ``cap``, times a
    #: random factor in [0.5, 1] so that retries of many jobs spread out.
    retry_backoff_base: float = 1.0
    retry_backoff_cap: float = 300.0
    #: Seconds a restored broker waits for a worker that was running jobs to
    #: come back before those jobs count as lost (default: 3 heartbeat intervals).
    restore_grace: float | None = None
    #: Ids of recently finished jobs remembered to refuse a duplicate REQUEST.
    recent_ids: int = 100_000
    seed: int | None = None
    schedules: SchedulerConfig = field(default_factory=SchedulerConfig)


@dataclass(slots=True)
class Stats:
    malformed: Counter[str] = field(default_factory=Counter)
    accepted: int = 0
    completed: int = 0
    unknown_replies: int = 0
    duplicate_outcomes: int = 0
    #: Outcomes sent by a corral worker's job process itself (direct_outcomes).
    direct_outcomes: int = 0
    internal_errors: int = 0
    workers_lost: int = 0
    requeued: int = 0
    retried: int = 0
    dead: int = 0
    #: Prefetched jobs asked back from a worker for an idle process elsewhere,
    #: and jobs workers handed back unstarted (recalled, or leaving).
    recalled: int = 0
    released: int = 0
    #: Messages refused because their sender's role does not allow them.
    not_authorized: int = 0
    #: Outcomes refused because their sender does not hold the job.
    forged_outcomes: int = 0
    #: Connections refused during their handshake (no key, or a key not authorised
    #: there); counted by the shell's socket monitors.
    auth_refused: int = 0


class BrokerCore:
    """Routing, dispatch and the in-flight job table of one broker."""

    def __init__(self, config: BrokerConfig | None = None) -> None:
        self.config = config or BrokerConfig()
        self.queues: dict[str, Queue] = {}
        self.workers: dict[bytes, Worker] = {}
        self.schedulers: dict[bytes, Scheduler] = {}
        #: Jobs accepted and not yet finished, by id.
        self.jobs: dict[str, Job] = {}
        self.outbox: list[Outgoing] = []
        self.acks: list[Outgoing] = []
        self.stats = Stats()
        self.stopping = False
        self._next_heartbeat = 0.0
        self._logged: OrderedDict[tuple[bytes, str], None] = OrderedDict()
        #: Schedules, who fires them, and which of their ticks count.
        self.desk = ScheduleDesk(self.config.schedules, self._to_scheduler)
        #: Jobs of ticks, dispatched only once stored (a broker restarted at a
        #: tick fires it again under the same id, so it must not have run yet).
        self._ticks_unsaved: list[Job] = []
        self._ticks_saving: list[Job] = []
        #: Add to a monotonic ``now`` to get wall-clock time (set by the shell).
        self.wall_offset = 0.0
        #: Jobs and workers changed since the last :meth:`take_changes`.
        self.dirty: dict[str, Job] = {}
        self.dirty_workers: dict[str, Worker] = {}
        self.worker_ids: dict[str, int] = {}
        self.next_worker_id = 1
        #: ``(topic, payload)`` pairs for the notification socket.
        self.notifications: list[tuple[str, dict[str, Any]]] = []
        self._retry_heap: list[tuple[float, int, Job]] = []
        self._retry_seq = 0
        self._rng = random.Random(self.config.seed)
        #: Jobs restored as running, by the uuid of the worker that had them,
        #: with the time by which that worker must be back.
        self.orphans: dict[str, tuple[float, list[Job]]] = {}
        #: Workers that may hold prefetched jobs (more running than processes), and
        #: jobs asked back from them (RECALL) with no answer yet.
        self._overbooked: set[Worker] = set()
        self._recalling: dict[str, Worker] = {}
        #: Recently finished jobs: id -> final state (``None`` when restored from the
        #: store by id only). Refuses reused ids and answers dependency checks.
        self._recent: OrderedDict[str, str | None] = OrderedDict()
        #: Identities (besides the submitter) that want a job's outcome, by job id.
        self.listeners: dict[str, set[bytes]] = {}
        #: Jobs waiting for a job (``after:ID``) to end, by that job's id.
        self.dependents: dict[str, list[Job]] = {}
        #: Ids of finished jobs whose final state the shell must read from the store
        #: and hand to :meth:`resolve_dependency`.
        self.lookups: list[str] = []
        self._looking_up: set[str] = set()
        #: Jobs that just ended, whose dependents are still to be told (see _finish).
        self._ended: list[Job] = []
        self._settling = False
        self._duplicates_reported = 0
        #: Jobs whose acknowledgement waits in :attr:`acks` (for the store).
        self.unacked: set[str] = set()

        #: An answer waits in :attr:`acks` for its own change to be stored (a schedule's).
        self.held_results = False
        #: Outcomes of jobs that ended before their acknowledgement went out, by job id.
        self.after_ack: dict[str, Outgoing] = {}
        #: QUERY messages for the shell to answer (they may need the store).
        self.queries: list[tuple[bytes, Query]] = []
        #: Commands handled outside the core, e.g. STREAM and LISTEN (job streams).
        self.extensions: dict[Command, Extension] = {}
        #: What the ACK to a corral worker's INFORM tells it (a corral broker always sends
        #: one, so the worker knows it may use corral's commands); extensions add to it.
        #: reply_ready: REPLY may carry READY; direct_outcomes: outcomes may come from
        #: the worker's job processes (see on_backend).
        self.worker_ack_meta: dict[str, Any] = {"reply_ready": 1, "direct_outcomes": 1}
        #: Which jobs a principal may see and change (the shell reloads its roster).
        self.visibility = Visibility()
        #: The secret from which each corral worker's proof is derived: its job
        #: processes show it to send outcomes themselves. The shell sets the one its
        #: store keeps, so proofs outlive a restart.
        self.secret = secrets.token_bytes(32)
        #: Identities of job processes whose proof was checked, with their worker's.
        self._proven: dict[bytes, bytes] = {}
        #: What the shell says of the broker's security (keys, open endpoints), for STATUS.
        self.security: dict[str, Any] = {"keys": False}
        #: RELOAD_KEYS commands for the shell to carry out: (admin identity, msgid).
        self.reload_requests: list[tuple[bytes, str]] = []

    # ------------------------------------------------------------ entry points

    def on_frontend(
        self, identity: bytes, frames: Sequence[bytes], now: float, peer: Principal = TRUSTED
    ) -> None:
        """A message on the frontend; ``peer``: who sent it (see :mod:`corral.broker.access`)."""
        msg = self._parse(Dest.FRONTEND, identity, frames)
        if msg is None:
            return
        if not peer.trusted and not self._permitted(Dest.FRONTEND, identity, msg, peer):
            return
        sched = self.schedulers.get(identity)
        if sched is not None:
            sched.last_seen = now  # any message from a scheduler counts as a heartbeat
        if isinstance(msg, Request):
            self._on_request(identity, msg, frames, now, peer)
        elif isinstance(msg, Query):
            if msg.op in SCHEDULE_OPS:
                self._on_schedule_query(identity, msg, now)
            else:
                self.queries.append((identity, msg, peer))
        elif isinstance(msg, Inform):
            self._on_scheduler_inform(identity, msg, now, peer)
        elif isinstance(msg, Schedule):  # and Unschedule
            self._on_schedule(identity, msg, frames, now)
        elif isinstance(msg, Kbye):
            self._drop_scheduler(identity)
        elif isinstance(msg, Ack | Reply | Error | Heartbeat):
            pass  # schedulers answer us and heartbeat (their liveness is noted above)
        elif msg.command in self.extensions:
            self.extensions[msg.command](Dest.FRONTEND, identity, msg, now, peer)
        else:
            # DISCONNECT too: only an admin on the admin socket stops the broker.
            detail = f"{msg.command.value} is not accepted on the frontend"
            if isinstance(msg, Disconnect):
                detail += " (send it to the admin socket, with an admin key)"
            self._refuse(Dest.FRONTEND, identity, "unexpected-command", detail, msg.msgid)

    def on_backend(
        self, identity: bytes, frames: Sequence[bytes], now: float, peer: Principal = TRUSTED
    ) -> None:
        """A message on the backend; ``peer``: who sent it (see :mod:`corral.broker.access`)."""
        msg = self._parse(Dest.BACKEND, identity, frames)
        if msg is None:
            return
        worker = self.workers.get(identity)
        if worker is None and isinstance(msg, Reply) and identity.count(b"/") >= 2:
            # A corral worker's job process sends outcomes itself as
            # "<worker>/<pid>/<proof>": with the worker's proof they count as its own.
            worker = self._process_owner(identity)
            if worker is None:
                return
            identity = worker.identity
        if not peer.trusted and not self._permitted(Dest.BACKEND, identity, msg, peer):
            return
        if worker is not None:
            worker.last_seen = now
        if isinstance(msg, Ready):
            self._ready_from(identity, worker, msg.msgid, now)
        elif isinstance(msg, Reply):
            self._on_result(identity, worker, msg, now)
            if msg.ready and worker is not None:  # the READY that came with the outcome
                self._ready_from(identity, worker, msg.msgid, now)
        elif isinstance(msg, Inform):
            self._on_worker_inform(identity, msg, now, peer)
        elif isinstance(msg, Heartbeat):
            if worker is None:
                self._refuse(
                    Dest.BACKEND,
                    identity,
                    "unknown-worker",
                    "HEARTBEAT from a worker that has not INFORMed",
                    msg.msgid,
                )
        elif isinstance(msg, Release):
            self._on_release(identity, worker, msg, now)
        elif isinstance(msg, Kbye):
            if worker is not None and msg.draining and worker.corral:
                self._drain_worker(worker, msg)
            elif worker is not None:
                self._remove_worker(worker, now, reason="said goodbye")
        elif isinstance(msg, Ack | Error):
            pass
        elif msg.command in self.extensions:
            self.extensions[msg.command](Dest.BACKEND, identity, msg, now, peer)
        else:
            self._refuse(
                Dest.BACKEND,
                identity,
                "unexpected-command",
                f"{msg.command.value} is not accepted on the backend",
                msg.msgid,
            )

    def on_admin(
        self, identity: bytes, frames: Sequence[bytes], now: float, peer: Principal = TRUSTED
    ) -> None:
        """A message on the admin socket; ``peer``: who sent it."""
        msg = self._parse(Dest.ADMIN, identity, frames)
        if msg is None:
            return
        if isinstance(msg, Hello):
            return  # emq-cli's greeting: never answered
        if not peer.trusted and not self._permitted(Dest.ADMIN, identity, msg, peer):
            return
        if isinstance(msg, Status):
            self._send_json(Dest.ADMIN, identity, self.status(now))
        elif isinstance(msg, ShowWorkers):
            self._send_json(Dest.ADMIN, identity, self.show_workers(now))
        elif isinstance(msg, ShowSchedulers):
            self._send_json(Dest.ADMIN, identity, self.show_schedulers(now))
        elif isinstance(msg, Disconnect):
            why = access.may_disconnect(peer)
            if why is not None:
                self._not_authorized(Dest.ADMIN, identity, msg, peer, why)
                return
            log.warning("DISCONNECT from %s on the admin socket: stopping", peer.describe())
            self.outbox.append((Dest.ADMIN, identity, Ack(new_msgid(), msg.msgid).to_frames()))
            self.stopping = True
        elif isinstance(msg, ReloadKeys):
            self.reload_requests.append((identity, msg.msgid))
        else:
            self._refuse(
                Dest.ADMIN,
                identity,
                "unexpected-command",
                f"{msg.command.value} is not accepted on the admin socket",
                msg.msgid,
            )

    # ------------------------------------------------------------ who may send what

    def _permitted(self, dest: Dest, identity: bytes, msg: Message, peer: Principal) -> bool:
        """Whether ``peer``'s role allows ``msg`` here; refuse it (NotAuthorized) if not."""
        table = (access.FRONTEND, access.BACKEND, access.ADMIN_SOCKET)[dest]
        role = table.get(msg.command)
        if role is None:
            return True  # not a command of this socket: refused for that, whoever sent it
        registered: Worker | Scheduler | None = None
        if dest is Dest.FRONTEND:
            registered = self.schedulers.get(identity)
            if registered is not None and isinstance(msg, Request):
                role = SCHEDULER  # a scheduler's tick
        elif dest is Dest.BACKEND:
            registered = self.workers.get(identity)
        why = access.refusal(peer, msg.command.value, role)
        if why is None and isinstance(msg, Query) and msg.op in access.ADMIN_OPS:
            why = access.refusal(peer, f"QUERY {msg.op}", access.ADMIN)
        if why is None and registered is not None and registered.principal.name != peer.name:
            why = (
                f"identity {peer_name(identity[:64])} was registered by key "
                f"{registered.principal.name!r}, not by {peer.describe()}"
            )
        if why is None:
            return True
        self._not_authorized(dest, identity, msg, peer, why)
        return False

    def _not_authorized(
        self, dest: Dest, identity: bytes, msg: Message, peer: Principal, why: str
    ) -> None:
        self.stats.not_authorized += 1
        key = (peer.name.encode() + b"\0" + identity[:64], f"not-authorized:{msg.command}")
        if key not in self._logged:
            self._remember_logged(key)
            log.warning(
                "refused %s from %s on the %s: %s (further ones are counted, not logged)",
                msg.command.value,
                peer_name(identity[:64]),
                dest.name.lower(),
                why,
            )
        if not isinstance(msg, Error):  # never answer an ERROR with an ERROR
            self._refuse(dest, identity, access.NOT_AUTHORIZED, why, msg.msgid, log_it=False)

    def _process_owner(self, identity: bytes) -> Worker | None:
        """The worker whose job process sent an outcome as ``identity``, if its proof holds."""
        name = self._proven.get(identity)
        if name is None:
            # The worker's uuid may hold a "/" of its own: the pid and proof are last.
            name, pid, proof = identity.rsplit(b"/", 2)
            if not (pid.isdigit() and hmac.compare_digest(proof, self.worker_proof(name))):
                self._forged_outcome(identity, None, "a job process without its worker's proof")
                return None
            if len(self._proven) > 10_000:
                self._proven.clear()
            self._proven[identity] = name
        worker = self.workers.get(name)
        if worker is None or not worker.corral:
            # Its worker has not registered (again) yet, after a restart: the worker
            # sends the outcome again once it has.
            log.debug("outcome from %s before its worker registered; ignored", peer_name(identity))
            return None
        self.stats.direct_outcomes += 1
        return worker

    def worker_proof(self, worker: bytes) -> bytes:
        """What a corral worker's job processes show to send outcomes themselves."""
        mac = hmac.new(self.secret, b"corral-worker-proof\0" + worker, hashlib.sha256)
        return mac.hexdigest()[:40].encode()

    def tick(self, now: float) -> float:
        """Send due heartbeats and drop silent peers; return when to tick next."""
        interval = self.config.heartbeat_interval
        if now >= self._next_heartbeat:
            self._next_heartbeat = now + interval
            ts = repr(now).encode()
            for worker in self.workers.values():
                self.outbox.append((Dest.BACKEND, worker.identity, _heartbeat(ts)))
            for sched in self.schedulers.values():
                self.outbox.append((Dest.FRONTEND, sched.identity, _heartbeat(ts)))
        deadline = now - interval * self.config.heartbeat_liveness
        for worker in [w for w in self.workers.values() if w.last_seen < deadline]:
            self._remove_worker(worker, now, reason="stopped heartbeating")
        for sched in [s for s in self.schedulers.values() if s.last_seen < deadline]:
            log.warning("scheduler %s stopped heartbeating; dropped", sched.name)
            self._drop_scheduler(sched.identity)
        self._fire_due(now)
        if self.stats.duplicate_outcomes != self._duplicates_reported:
            log.info(
                "%d second outcome(s) of finished jobs ignored (first outcome wins)",
                self.stats.duplicate_outcomes - self._duplicates_reported,
            )
            self._duplicates_reported = self.stats.duplicate_outcomes
        heap = self._retry_heap
        while heap and heap[0][0] <= now:
            _, _, job = heapq.heappop(heap)
            if job.state is JobState.RETRYING:
                self._enqueue(job, now)
        for uuid, (due, jobs) in list(self.orphans.items()):
            if due <= now:
                del self.orphans[uuid]
                log.warning(
                    "worker %s did not come back after the restart; %d job(s) it ran are lost",
                    uuid,
                    len(jobs),
                )
                for job in jobs:
                    self._job_lost(job, uuid, now)
        due = self._next_heartbeat
        if heap:
            due = min(due, heap[0][0])
        tick = self.desk.next_due()
        if tick is not None:
            due = min(due, (tick + 1) / 1000 - self.wall_offset)
        return due

    def shutdown(self) -> None:
        """Say KBYE to every worker and scheduler (orderly shutdown)."""
        for worker in self.workers.values():
            self.outbox.append((Dest.BACKEND, worker.identity, Kbye(new_msgid()).to_frames()))
        for sched in self.schedulers.values():
            self.outbox.append((Dest.FRONTEND, sched.identity, Kbye(new_msgid()).to_frames()))

    def peer_unreachable(self, dest: Dest, identity: bytes, now: float) -> None:
        """The shell could not route to ``identity`` (it disconnected)."""
        if dest is Dest.BACKEND and identity in self.workers:
            self._remove_worker(self.workers[identity], now, reason="is unreachable")
        elif dest is Dest.FRONTEND and identity in self.schedulers:
            self._drop_scheduler(identity)

    # ------------------------------------------------------------ jobs

    def _on_request(
        self,
        identity: bytes,
        msg: Request,
        frames: Sequence[bytes],
        now: float,
        peer: Principal = TRUSTED,
    ) -> None:
        if self.desk.is_tick(identity, msg.msgid):
            self._on_tick(identity, msg, frames, now)
            return
        if msg.msgid in self.jobs or msg.msgid in self._recent:
            self._refuse(
                Dest.FRONTEND,
                identity,
                "duplicate-id",
                f"job {msg.msgid} was already submitted",
                msg.msgid,
                # A client re-sending a job takes this answer as its acknowledgement:
                # like the acknowledgement, it waits until the job is stored.
                held=msg.msgid in self.unacked,
            )
            return
        after = msg.headers.get_all("after")
        if after and (msg.msgid in after or len(after) > MAX_DEPENDENCIES):
            self._refuse(
                Dest.FRONTEND,
                identity,
                "bad-header",
                f"a job waits for 1-{MAX_DEPENDENCIES} other jobs, never for itself",
                msg.msgid,
            )
            return
        job = Job(msg.msgid, msg.queue, msg.headers, list(frames[4:7]), identity, now)
        job.submitted_at = now + self.wall_offset
        job.label = msg.headers.get("label")
        job.owner = peer.owner
        self.jobs[job.id] = job
        self.dirty[job.id] = job
        self.stats.accepted += 1
        self.unacked.add(job.id)
        self.acks.append((Dest.FRONTEND, identity, [b"", PROTOCOL, _REPLY, new_tag(), frames[3]]))
        if after:
            self._wait_for(job, after, now)
        else:
            self._enqueue(job, now)

    # ------------------------------------------------------------ dependencies

    def _wait_for(self, job: Job, after: list[str], now: float) -> None:
        """Hold ``job`` until every job in ``after`` succeeded; fail it if one cannot."""
        job.state = JobState.QUEUED
        job.waiting_on = set()
        for dep in after:
            if dep in self.jobs:
                pass  # still to run, or running
            elif self._recent.get(dep) == JobState.SUCCEEDED.value:
                continue
            elif self._recent.get(dep) is not None:
                self._dependency_failed(job, dep, self._recent[dep], now)
                return
            elif dep not in self._looking_up:
                # Finished too long ago to be remembered, or never submitted: ask the store.
                self._looking_up.add(dep)
                self.lookups.append(dep)
            job.waiting_on.add(dep)
            self.dependents.setdefault(dep, []).append(job)
        if not job.waiting_on:
            job.waiting_on = None
            self._enqueue(job, now)

    def resolve_dependency(self, dep: str, state: str | None, now: float) -> None:
        """The store's answer to a lookup: ``dep``'s final state, or ``None`` (no such job)."""
        self._looking_up.discard(dep)
        if dep in self.jobs:
            return  # it arrived (or was retried) meanwhile: its end will settle its dependents
        if state is not None:
            self._recent.setdefault(dep, state)
        self._settle_dependents(dep, state or "unknown", now)

    def _settle_dependents(self, dep: str, state: str, now: float) -> None:
        for job in self.dependents.pop(dep, ()):
            if self.jobs.get(job.id) is not job or job.waiting_on is None:
                continue  # ended meanwhile (cancelled, or another dependency failed)
            if state == JobState.SUCCEEDED.value:
                job.waiting_on.discard(dep)
                if not job.waiting_on:
                    job.waiting_on = None
                    self._enqueue(job, now)
            else:
                self._dependency_failed(job, dep, state, now)

    def _dependency_failed(self, job: Job, dep: str, state: str, now: float) -> None:
        why = "there is no such job" if state == "unknown" else f"it ended {state}"
        result = encode_outcome_error(
            "DependencyFailed", f"job {job.id} waited for job {dep}, but {why}"
        )
        self._finish(job, result, "DependencyFailed", now)

    # ------------------------------------------------------------ listeners and cancelling

    def listen(self, job_id: str, identity: bytes) -> bool:
        """Send ``job_id``'s outcome to ``identity`` too when it ends; ``False`` if it has ended."""
        job = self.jobs.get(job_id)
        if job is None:
            return False
        if identity != job.submitter or not job.headers.reply_requested:
            self.listeners.setdefault(job_id, set()).add(identity)
        return True

    def cancel(self, job_id: str, now: float) -> str | None:
        """Cancel a job that has not ended; return the state it was in, or ``None``.

        A queued or retrying job never runs; a running one is aborted on its
        worker (its process is killed). Either way it ends ``cancelled`` at once.
        """
        job = self.jobs.get(job_id)
        if job is None:
            return None
        previous = job.state.value
        if job.state is JobState.RUNNING and job.started_at is None:
            previous = "queued"  # prefetched: waiting in its worker, never started
        if job.state is JobState.RUNNING and job.worker is not None:
            worker = job.worker
            self._abort(worker, job.id, "cancelled")
            self._promote(worker, now)
            job.worker = None
        result = encode_outcome_error("JobCancelled", f"job {job.id} was cancelled ({previous})")
        self._finish(job, result, "JobCancelled", now)
        log.info("job %s cancelled (it was %s)", job.id, previous)
        return previous

    def _enqueue(self, job: Job, now: float, front: bool = False) -> None:
        queue = self._queue(job.queue)
        job.state = JobState.QUEUED
        job.worker = None
        job.not_before = None
        self.dirty[job.id] = job
        if not queue.waiting:
            worker = queue.pick()
            if worker is not None:
                self._dispatch(job, worker, queue, now)
                return
        if front:
            queue.waiting.appendleft(job)
        else:
            queue.waiting.append(job)

    def _unqueue(self, job: Job) -> None:
        """Take a job out of its queue's waiting line (rare, so a linear removal is fine)."""
        queue = self.queues.get(job.queue)
        if queue is not None and job in queue.waiting:
            queue.waiting.remove(job)

    def _dispatch(self, job: Job, worker: Worker, queue: Queue, now: float) -> None:
        self._take_slot(worker)
        job.state = JobState.RUNNING
        job.worker = worker
        job.worker_uuid = worker.name
        job.worker_id = worker.id
        job.attempts += 1
        if worker.concurrency and len(worker.running) >= worker.concurrency:
            # Prefetched: it starts when a job ahead of it ends (see _promote).
            job.started = job.started_at = None
            self._overbooked.add(worker)
        else:
            job.started = now
            job.started_at = now + self.wall_offset
        worker.running[job.id] = job
        self.dirty[job.id] = job
        frames = job.frames
        if not worker.corral and not job.headers.reply_requested:
            # Without it an EventMQ job manager never says how the job ended.
            headers = b"reply-requested," + frames[1] if frames[1] else b"reply-requested"
            frames = [frames[0], headers, frames[2]]
        self.outbox.append(
            (Dest.BACKEND, worker.identity, [b"", PROTOCOL, _REQUEST, job.id.encode(), *frames])
        )

    def _ready_from(self, identity: bytes, worker: Worker | None, msgid: str, now: float) -> None:
        if worker is None:
            self._refuse(
                Dest.BACKEND,
                identity,
                "unknown-worker",
                "READY before INFORM; send INFORM first",
                msgid,
            )
        elif not worker.draining:
            self._on_ready(worker, now)

    def _on_ready(self, worker: Worker, now: float) -> None:
        self._give_slot(worker)
        while worker.slots > 0:
            for _, name in worker.queues:
                queue = self.queues[name]
                if queue.waiting:
                    self._dispatch(queue.waiting.popleft(), worker, queue, now)
                    break
            else:
                if self._overbooked and worker.idle_processes > 0:
                    self._recall_for(worker)
                return

    # ------------------------------------------------------------ prefetch

    def _recall_for(self, idle: Worker) -> None:
        """``idle`` has a process with nothing to do: ask prefetched jobs of its queues back.

        A job prefetched by a busy worker waits behind that worker's running jobs;
        while a process elsewhere is idle, it should run there. The worker hands
        back the jobs it has not started (RELEASE) and they go to the front of
        their queue, so the idle worker gets them.
        """
        budget = idle.idle_processes - len(self._recalling)
        if budget <= 0:
            return
        names = {name for _, name in idle.queues}
        for holder in list(self._overbooked):
            if (
                holder is idle
                or self.workers.get(holder.identity) is not holder
                or len(holder.running) <= holder.concurrency
            ):
                self._overbooked.discard(holder)
                continue
            # The newest jobs sent are the ones behind the others (a worker runs in order).
            extra = len(holder.running) - holder.concurrency
            for job in reversed(list(holder.running.values())):
                if extra <= 0 or budget <= 0:
                    break
                extra -= 1
                if job.queue not in names or job.id in self._recalling:
                    continue
                self._recalling[job.id] = holder
                self.stats.recalled += 1
                budget -= 1
                self.outbox.append(
                    (Dest.BACKEND, holder.identity, Recall(new_tag().decode(), job.id).to_frames())
                )
            if budget <= 0:
                return

    def _on_release(self, identity: bytes, worker: Worker | None, msg: Release, now: float) -> None:
        """A worker hands back a job it had not started: queue it again, at the front."""
        self._recalling.pop(msg.ref, None)
        job = self.jobs.get(msg.ref)
        if worker is None or job is None or job.worker is not worker:
            # It ended or went elsewhere meanwhile (the worker was given up for lost).
            log.debug("release of job %s from %s ignored", msg.ref, peer_name(identity))
            return
        del worker.running[job.id]
        self._promote(worker, now)
        self.stats.released += 1
        self._unsend(job, now)

    def _unsend(self, job: Job, now: float) -> None:
        """A job its worker never started goes back to the front of its queue, as if unsent."""
        job.attempts -= 1
        job.started = job.started_at = None
        job.worker_uuid = job.worker_id = None
        self._enqueue(job, now, front=True)

    def _on_result(self, identity: bytes, worker: Worker | None, msg: Reply, now: float) -> None:
        """An outcome: recorded only from the worker that holds the job (see :meth:`_holds`)."""
        if msg.result is None:
            return  # a worker acknowledging something: nothing to route
        if worker is None:
            # Also a worker that lost us (we restarted): told so, it registers again,
            # saying which outcomes it will send, and sends them.
            self._forged_outcome(identity, msg, "a peer that is not a registered worker")
            return
        if msg.ref in worker.aborted:
            # The JobCancelled outcome of a job we told this worker to drop.
            worker.aborted.discard(msg.ref)
            return
        job = self.jobs.get(msg.ref)
        if job is None:
            if msg.ref in self._recent:
                # A second outcome (a worker given up for lost finished it too,
                # or re-sent it after a reconnect): the first one stands.
                # Counted, logged one by one at debug level and summed up by tick():
                # a worker that reconnects re-sends its recent outcomes.
                self.stats.duplicate_outcomes += 1
                log.debug(
                    "second outcome for finished job %s from %s ignored",
                    msg.ref,
                    peer_name(identity),
                )
            else:
                self.stats.unknown_replies += 1
                log.info("result for unknown job %s from %s ignored", msg.ref, peer_name(identity))
            return
        holds = self._holds(worker, job)
        if holds is None:
            self.stats.duplicate_outcomes += 1  # a failure re-sent while the job waits to retry
            return
        if not holds:
            where = f"it runs on {job.worker.name}" if job.worker else f"it is {job.state.value}"
            self._forged_outcome(
                identity, msg, f"worker {worker.name}, which does not hold it ({where})"
            )
            return
        outcome = msg.outcome()
        error_type = outcome.error.type if outcome.error is not None else None
        if job.worker is None:
            # The job was requeued after this worker was given up for lost, and no
            # one else started it: the outcome of the run it was dispatched for counts.
            log.info(
                "job %s finished on worker %s, which was given up for lost", job.id, worker.name
            )
        worker.processed += 1
        if error_type is not None and error_type not in _FINAL_ERRORS and self._retries_left(job):
            self._retry_later(job, msg.result, error_type, now)
        else:
            self._finish(job, msg.result, error_type, now)

    @staticmethod
    def _holds(worker: Worker, job: Job) -> bool | None:
        """Whether ``worker`` may report ``job``'s outcome (``None``: it did, already).

        It may if it holds the job, or if the job was last dispatched to it and
        is still waiting for that run to be accounted for: restored as running,
        or requeued after the worker was given up for lost and not started by
        another. Nobody else may: not another worker, not a peer that never had it.
        """
        if job.worker is worker:
            return True
        if job.worker is not None or job.worker_uuid != worker.name:
            return False
        if job.state is JobState.RETRYING:
            return None
        return job.state in (JobState.RUNNING, JobState.QUEUED) and job.waiting_on is None

    def _forged_outcome(self, identity: bytes, msg: Reply | None, sender: str) -> None:
        """Refuse an outcome its sender may not give: log once per peer, count, answer."""
        self.stats.forged_outcomes += 1
        ref = msg.ref if msg is not None else "?"
        key = (identity[:64], "forged-outcome")
        if key not in self._logged:
            self._remember_logged(key)
            log.warning(
                "refused an outcome for job %s from %s: %s (further ones from this peer "
                "are counted as forged_outcomes, not logged)",
                ref,
                peer_name(identity[:64]),
                sender,
            )
        if msg is not None:
            detail = f"outcome for job {ref} refused: it comes from {sender}"
            # A peer that never registered is asked to (a worker that lost us does so).
            reason = "unknown-worker" if identity not in self.workers else "NotHolder"
            self._refuse(Dest.BACKEND, identity, reason, detail, msg.msgid, log_it=False)

    def _promote(self, worker: Worker, now: float) -> None:
        """A job of ``worker`` ended: the next one it holds has started (it runs in order).

        Prefetched jobs have no start time until then, so ``started`` is when a
        process took the job, not when it reached the worker.
        """
        free = worker.concurrency
        if not free or not worker.running:
            return
        for job in worker.running.values():
            if job.started_at is None:
                job.started = now
                job.started_at = now + self.wall_offset
                self.dirty[job.id] = job
            free -= 1
            if free <= 0:
                return

    def _abort(self, worker: Worker, job_id: str, reason: str) -> None:
        """Tell a corral worker to stop running ``job_id``; its outcome will be ignored."""
        worker.running.pop(job_id, None)
        if not worker.corral:
            return  # EventMQ job managers cannot stop a job; its outcome counts as a duplicate
        worker.aborted.add(job_id)
        self.outbox.append(
            (Dest.BACKEND, worker.identity, Abort(new_msgid(), job_id, reason).to_frames())
        )

    def _retries_left(self, job: Job) -> bool:
        return job.attempts <= job.headers.retry_count

    def _retry_later(self, job: Job, result: bytes, error_type: str, now: float) -> None:
        if job.worker is not None:
            job.worker.running.pop(job.id, None)
            self._promote(job.worker, now)
            job.worker = None
        elif job.state is JobState.QUEUED and job.waiting_on is None:
            # Requeued when its worker was lost, whose late failure this is: it waits
            # out the backoff now, not in its queue.
            self._unqueue(job)
        cfg = self.config
        delay = min(cfg.retry_backoff_cap, cfg.retry_backoff_base * 2 ** (job.attempts - 1))
        delay *= self._rng.uniform(0.5, 1.0)
        job.state = JobState.RETRYING
        job.not_before = now + delay
        job.result = result
        job.error_type = error_type
        self.dirty[job.id] = job
        self.stats.retried += 1
        self._retry_seq += 1
        heapq.heappush(self._retry_heap, (job.not_before, self._retry_seq, job))
        log.info(
            "job %s failed with %s (attempt %d of %d); retrying in %.2f s",
            job.id,
            error_type,
            job.attempts,
            job.headers.retry_count + 1,
            delay,
        )

    def _finish(self, job: Job, result: bytes, error_type: str | None, now: float) -> None:
        del self.jobs[job.id]
        if self._recalling:
            self._recalling.pop(job.id, None)
        if job.state is JobState.QUEUED and job.waiting_on is None:
            # Cancelled, or after a restart: the store said "queued" but the job had run
            # and its worker re-sent the outcome.
            self._unqueue(job)
        worker = job.worker
        if worker is not None:
            worker.running.pop(job.id, None)
            self._promote(worker, now)
            job.worker = None
        if error_type is None:
            job.state = JobState.SUCCEEDED
        elif error_type == "JobCancelled":
            job.state = JobState.CANCELLED
        elif job.headers.retry_count > 0:
            job.state = JobState.DEAD
            self.stats.dead += 1
        else:
            job.state = JobState.FAILED
        self._recent[job.id] = job.state.value
        if len(self._recent) > self.config.recent_ids:
            self._recent.popitem(last=False)
        job.waiting_on = None
        job.completed = now
        job.received_at = job.completed_at = now + self.wall_offset
        job.result = result
        job.error_type = error_type
        self.dirty[job.id] = job
        self.stats.completed += 1
        queue = self.queues.get(job.queue) or self._queue(job.queue)
        queue.processed += 1
        latency = (now - job.submitted) * 1000.0
        queue.last_latency_ms = latency
        if latency > queue.max_latency_ms:
            queue.max_latency_ms = latency
        if job.headers.reply_requested:
            reply = (
                Dest.FRONTEND,
                job.submitter,
                [b"", PROTOCOL, _REPLY, new_tag(), result, job.id.encode()],
            )
            # A submitter hears "accepted" before it hears the outcome (EventMQ's
            # clients wait for the acknowledgement first): it goes right after it.
            if job.id in self.unacked:
                self.after_ack[job.id] = reply
            else:
                self.outbox.append(reply)
        for identity in self.listeners.pop(job.id, ()):
            self.outbox.append(
                (
                    Dest.FRONTEND,
                    identity,
                    [b"", PROTOCOL, _REPLY, new_tag(), result, job.id.encode()],
                )
            )
        # Dependents are told in a loop, not by recursion: a failure can run down a
        # long chain of jobs that wait for each other.
        self._ended.append(job)
        if not self._settling:
            self._settling = True
            try:
                while self._ended:
                    ended = self._ended.pop()
                    if ended.id in self.dependents:
                        self._settle_dependents(ended.id, ended.state.value, now)
            finally:
                self._settling = False

    # ------------------------------------------------------------ workers

    def _on_worker_inform(
        self, identity: bytes, msg: Inform, now: float, peer: Principal = TRUSTED
    ) -> None:
        if msg.kind != "worker":
            self._refuse(
                Dest.BACKEND, identity, "bad-inform", "schedulers INFORM on the frontend", msg.msgid
            )
            return
        queues = msg.queues or self.config.default_queues
        #: Jobs the worker says it still runs (corral workers; EventMQ's never say).
        claims: list[str] = _ids((msg.meta or {}).get("running"))
        #: Jobs whose outcome it holds and will send again (it lost us before we had it).
        outcomes = _ids((msg.meta or {}).get("outcomes"))
        old = self.workers.get(identity)
        if old is not None:
            # A worker re-announcing itself (it lost us, or we lost it): its
            # slots start over; jobs it no longer holds are lost.
            self._remove_worker(old, now, reason="re-informed", keep={*claims, *outcomes})
        worker = Worker(
            identity,
            queues,
            now,
            id=self._worker_id(peer_name(identity)),
            corral=msg.meta is not None,
            registered=now,
            concurrency=_concurrency(msg.meta),
            principal=peer,
        )
        self.workers[identity] = worker
        self.dirty_workers[worker.name] = worker
        if old is None:
            self.notifications.append(("registered", self._worker_info(worker)))
        else:
            worker.aborted = old.aborted
        orphaned = self.orphans.pop(worker.name, None)
        held = {job.id: job for job in orphaned[1]} if orphaned else {}
        if old is not None:
            held.update(old.running)
        kept = 0
        for job_id in claims:
            if self._adopt(worker, held.pop(job_id, None) or self.jobs.get(job_id), job_id):
                kept += 1
        for job_id in outcomes:
            job = held.pop(job_id, None) or self.jobs.get(job_id)
            if job is not None and self._adopt(worker, job, job_id, abort=False):
                kept += 1  # it holds the job until that outcome comes
        for job in held.values():
            # Restored as running on this worker, which no longer has it.
            self._job_lost(job, worker.name, now)
        if orphaned is not None:
            log.info("worker %s is back after the restart and keeps %d job(s)", worker.name, kept)
        for weight, name in queues:
            self._queue(name).add(weight, worker)
        meta = None
        if worker.corral:
            proof = self.worker_proof(identity).decode()
            meta = {**self.worker_ack_meta, "id": worker.id, "proof": proof}
        self.outbox.append((Dest.BACKEND, identity, Ack(new_msgid(), msg.msgid, meta).to_frames()))
        # EventMQ job managers start their processes on the first HEARTBEAT.
        self.outbox.append((Dest.BACKEND, identity, _heartbeat(repr(now).encode())))
        log.info(
            "worker %s joined, queues %s", worker.name, ",".join(f"{n}:{w}" for w, n in queues)
        )

    def _adopt(self, worker: Worker, job: Job | None, job_id: str, *, abort: bool = True) -> bool:
        """A (re)joining worker says it runs ``job_id``: let it keep the job, or abort its copy.

        It keeps the job if the job is still running on it (or on nobody, after
        a restart) or waits in its queue (it was requeued when the worker was
        given up for lost, but no one has started it). A job that is running
        elsewhere, waiting out a retry, or finished is aborted on this worker,
        so that no job runs twice because a lost worker came back. Without
        ``abort`` (a job whose outcome the worker will send again) nothing is
        aborted: the outcome is refused if the worker does not hold the job.
        """
        identity = worker.identity
        if job is not None and self.jobs.get(job_id) is job:
            holder = job.worker
            if job.state is JobState.RUNNING and (holder is None or holder.identity == identity):
                job.worker = worker
                if job.worker_uuid != worker.name:
                    # The store named another worker (it lagged): that one no longer
                    # waits for this job.
                    self._disown(job)
                    job.worker_uuid, job.worker_id = worker.name, worker.id
                    self.dirty[job.id] = job
                worker.running[job_id] = job
                return True
            queue = self.queues.get(job.queue)
            if job.state is JobState.QUEUED and queue is not None and job in queue.waiting:
                queue.waiting.remove(job)  # rare: only for a worker that comes back
                job.state = JobState.RUNNING
                job.worker = worker
                job.worker_uuid, job.worker_id = worker.name, worker.id
                worker.running[job_id] = job
                self.dirty[job.id] = job
                log.info("job %s stays with worker %s, which came back", job_id, worker.name)
                return True
        if not abort:
            return False
        if job_id in self._recent:
            where = "finished"
        elif job is None or job_id not in self.jobs:
            where = "unknown"
        elif job.worker is not None:
            where = f"running on {job.worker.name}"
        else:
            where = job.state.value
        log.warning(
            "worker %s came back still running job %s, which is %s; aborting its copy",
            worker.name,
            job_id,
            where,
        )
        self._abort(worker, job_id, f"the job is {where}")
        return False

    def _drain_worker(self, worker: Worker, msg: Kbye) -> None:
        """A corral worker is leaving: no more jobs for it, it finishes what it has.

        The ACK tells it that every job sent to it is already on its way, so the
        ones it has are all it will get. Its plain KBYE follows when it is done.
        """
        if not worker.draining:
            worker.draining = True
            for _, name in worker.queues:
                self.queues[name].remove(worker)  # takes its free slots out of dispatch
            worker.slots = 0
            log.info(
                "worker %s is leaving; it finishes its %d running job(s)",
                worker.name,
                len(worker.running),
            )
        self.outbox.append((Dest.BACKEND, worker.identity, Ack(new_msgid(), msg.msgid).to_frames()))

    def _disown(self, job: Job) -> None:
        """Take ``job`` off the list of a restored worker that is still awaited."""
        orphaned = self.orphans.get(job.worker_uuid or "")
        if orphaned is not None and job in orphaned[1]:
            orphaned[1].remove(job)
            if not orphaned[1]:
                del self.orphans[job.worker_uuid or ""]

    def _remove_worker(
        self, worker: Worker, now: float, *, reason: str, keep: set[str] | None = None
    ) -> None:
        self.workers.pop(worker.identity, None)
        self._overbooked.discard(worker)
        for _, name in worker.queues:
            self.queues[name].remove(worker)
        lost = [job for jid, job in worker.running.items() if keep is None or jid not in keep]
        for job in lost:
            del worker.running[job.id]
        if keep is None:
            self.stats.workers_lost += 1
            self.dirty_workers[worker.name] = worker
            self.notifications.append(("unregistered", self._worker_info(worker)))
            log.warning("worker %s %s; %d job(s) it held are lost", worker.name, reason, len(lost))
        for job in lost:
            self._job_lost(job, worker.name, now)

    def drop_revoked(self, keys: set[str], now: float) -> list[str]:
        """Forget workers and schedulers whose key is no longer authorised; return their names.

        A worker's jobs go as when a worker is lost (run again elsewhere, or fail).
        """
        dropped = []
        for worker in [w for w in self.workers.values() if _revoked(w.principal, keys)]:
            dropped.append(worker.name)
            self._remove_worker(worker, now, reason=f"lost its key ({worker.principal.name})")
        for sched in [s for s in self.schedulers.values() if _revoked(s.principal, keys)]:
            dropped.append(sched.name)
            log.warning("scheduler %s lost its key (%s); dropped", sched.name, sched.principal.name)
            self._drop_scheduler(sched.identity)
        return dropped

    def _job_lost(self, job: Job, worker_name: str, now: float) -> None:
        self._recalling.pop(job.id, None)
        if self.jobs.get(job.id) is not job or job.state is not JobState.RUNNING:
            return  # finished meanwhile (its outcome arrived first)
        if job.worker is not None and job.worker.name != worker_name:
            return  # another worker has it (it said so when it came back)
        job.worker = None
        if job.started_at is None:
            # Prefetched and not started (as far as we know): it did not run, so it
            # runs elsewhere whatever its options, and the attempt does not count.
            self.stats.requeued += 1
            self._unsend(job, now)
            return
        if job.headers.guarantee or self._retries_left(job):
            self.stats.requeued += 1
            self._enqueue(job, now, front=True)
            return
        result = encode_outcome_error(
            "WorkerLost", f"worker {worker_name} was lost while running job {job.id}"
        )
        self._finish(job, result, "WorkerLost", now)

    def _worker_id(self, uuid: str) -> int:
        wid = self.worker_ids.get(uuid)
        if wid is None:
            wid = self.worker_ids[uuid] = self.next_worker_id
            self.next_worker_id += 1
        return wid

    @staticmethod
    def _worker_info(worker: Worker) -> dict[str, Any]:
        return {"id": worker.id, "uuid": worker.name, "queues": [list(q) for q in worker.queues]}

    def _take_slot(self, worker: Worker) -> None:
        worker.slots -= 1
        if worker.slots == 0:
            for _, name in worker.queues:
                self.queues[name].ready -= 1

    def _give_slot(self, worker: Worker) -> None:
        worker.slots += 1
        if worker.slots == 1:
            for _, name in worker.queues:
                self.queues[name].ready += 1

    def _queue(self, name: str) -> Queue:
        queue = self.queues.get(name)
        if queue is None:
            queue = self.queues[name] = Queue(name)
        return queue

    # ------------------------------------------------------------ schedulers

    def _on_scheduler_inform(
        self, identity: bytes, msg: Inform, now: float, peer: Principal = TRUSTED
    ) -> None:
        if msg.kind != "scheduler":
            self._refuse(
                Dest.FRONTEND, identity, "bad-inform", "workers INFORM on the backend", msg.msgid
            )
            return
        corral = msg.meta is not None
        self.schedulers[identity] = Scheduler(identity, now, corral=corral, principal=peer)
        self.outbox.append((Dest.FRONTEND, identity, Ack(new_msgid(), msg.msgid).to_frames()))
        self.outbox.append((Dest.FRONTEND, identity, _heartbeat(repr(now).encode())))
        log.info("%s scheduler %s joined", "corral" if corral else "EventMQ", peer_name(identity))
        self.desk.joined(identity, corral=corral)

    def _drop_scheduler(self, identity: bytes) -> None:
        if self.schedulers.pop(identity, None) is not None:
            self.desk.left(identity)

    def _to_scheduler(self, identity: bytes, frames: list[bytes]) -> None:
        self.outbox.append((Dest.FRONTEND, identity, frames))

    def _wall_ms(self, now: float) -> int:
        return round((now + self.wall_offset) * 1000)

    def _on_schedule(
        self, identity: bytes, msg: Schedule, frames: Sequence[bytes], now: float
    ) -> None:
        wall = self._wall_ms(now)
        try:
            if isinstance(msg, Unschedule):
                self.desk.undefine(schedule_id(msg.body), wall, forward=list(frames))
            else:
                self.desk.define(msg, wall)
        except ProtocolError as exc:
            self._bad_input(Dest.FRONTEND, identity, exc, frames)
            return
        # Acknowledged once stored, like a job.
        self.acks.append((Dest.FRONTEND, identity, [b"", PROTOCOL, _REPLY, new_tag(), frames[3]]))
        self._fire_due(now)

    def _on_schedule_query(self, identity: bytes, msg: Query, now: float) -> None:
        outcome, held = self.desk.answer(msg.op, msg.params, self._wall_ms(now))
        reply = (
            Dest.FRONTEND,
            identity,
            [b"", PROTOCOL, _REPLY, new_tag(), outcome, msg.msgid.encode()],
        )
        if held:
            self.acks.append(reply)
            self.held_results = True
        else:
            self.outbox.append(reply)
        self._fire_due(now)

    def _on_tick(self, identity: bytes, msg: Request, frames: Sequence[bytes], now: float) -> None:
        """A scheduler sent a tick: the desk decides whether it counts."""
        answer = self.desk.claim(identity, msg, self._wall_ms(now))
        if isinstance(answer, Refusal):
            # Routine with two schedulers racing: the loser is told, not logged.
            log.debug("tick %s from %s refused: %s", msg.msgid, peer_name(identity), answer.detail)
            self._refuse(
                Dest.FRONTEND, identity, answer.reason, answer.detail, msg.msgid, log_it=False
            )
            return
        self._start_tick(answer, now, identity)
        self.acks.append((Dest.FRONTEND, identity, [b"", PROTOCOL, _REPLY, new_tag(), frames[3]]))

    def _fire_due(self, now: float) -> None:
        for claim in self.desk.due(self._wall_ms(now)):
            self._start_tick(claim, now, b"")

    def _start_tick(self, claim: Claim, now: float, submitter: bytes) -> None:
        s, tick = claim
        job_id = tick_id(s.id, tick)
        if job_id in self.jobs or job_id in self._recent:
            return
        headers = s.job_headers()
        frames = [s.queue.encode(), headers.encode().encode(), s.body]
        self._queue(s.queue)  # it is counted (and may be cancelled) before it is queued
        job = Job(job_id, s.queue, headers, frames, submitter, now)
        job.submitted_at = now + self.wall_offset
        job.label = headers.get("label")
        self.jobs[job_id] = job
        self.dirty[job_id] = job
        self.stats.accepted += 1
        self._ticks_unsaved.append(job)

    # ------------------------------------------------------------ admin views

    def status(self, now: float) -> dict[str, Any]:
        queues = self.queues.values()
        inflight: Counter[str] = Counter(
            job.queue for job in self.jobs.values() if job.state is JobState.RUNNING
        )
        by_worker = {w.name: w.processed for w in self.workers.values()}
        return {
            "inflight_messages_by_queue": {q.name: inflight.get(q.name, 0) for q in queues},
            "latency_messages_by_queue": {q.name: round(q.last_latency_ms, 3) for q in queues},
            "max_latency_messages_by_queue": {q.name: round(q.max_latency_ms, 3) for q in queues},
            "waiting_messages_by_queue": {q.name: len(q.waiting) for q in queues},
            "processed_messages_by_queue": {q.name: q.processed for q in queues},
            "processed_messages_by_worker": by_worker,
            "workers_by_queue": {q.name: q.worker_count for q in queues},
            "jobs_in_flight": len(self.jobs),
            "jobs_accepted": self.stats.accepted,
            "jobs_completed": self.stats.completed,
            "workers": len(self.workers),
            "schedulers": len(self.schedulers),
            **self.desk.status(),
            "workers_lost": self.stats.workers_lost,
            "jobs_requeued": self.stats.requeued,
            "jobs_retried": self.stats.retried,
            "jobs_dead": self.stats.dead,
            "jobs_recalled": self.stats.recalled,
            "jobs_released": self.stats.released,
            "jobs_retrying": len(self._retry_heap),
            "workers_awaited_after_restore": len(self.orphans),
            "unknown_replies": self.stats.unknown_replies,
            "duplicate_outcomes": self.stats.duplicate_outcomes,
            "direct_outcomes": self.stats.direct_outcomes,
            "forged_outcomes": self.stats.forged_outcomes,
            "not_authorized": self.stats.not_authorized,
            "auth_refused": self.stats.auth_refused,
            "security": self.security,
            "internal_errors": self.stats.internal_errors,
            "malformed_messages": dict(self.stats.malformed),
        }

    def show_workers(self, now: float) -> dict[str, Any]:
        return {
            "connected_workers": {
                w.name: {
                    "queues": [list(q) for q in w.queues],
                    "hb": w.last_seen,
                    "available_slots": w.slots,
                    "running": len(w.running),
                    "processed": w.processed,
                    "id": w.id,
                    "draining": w.draining,
                }
                for w in self.workers.values()
            },
            "connected_queues": {
                q.name: [[weight, w.name] for weight, members in q.levels for w in members]
                for q in self.queues.values()
            },
        }

    def worker_map(self) -> dict[str, Any]:
        """Connected workers by id, and every uuid ever registered with its id."""
        return {
            "workers": {str(w.id): self._worker_info(w) for w in self.workers.values()},
            "registered": {uuid: wid for uuid, wid in self.worker_ids.items()},
        }

    def show_schedulers(self, now: float) -> dict[str, Any]:
        return {
            "connected_schedulers": {s.name: {"hb": s.last_seen} for s in self.schedulers.values()}
        }

    # ------------------------------------------------------------ bad input

    def internal_error(self, dest: Dest, frames: Sequence[bytes]) -> None:
        """A handler raised (a bug): log it with its traceback, count it, tell the sender."""
        self.stats.internal_errors += 1
        log.exception(
            "internal error while handling a message from %s on %s; the broker goes on",
            peer_name(frames[0][:64]) if frames else "?",
            dest.name.lower(),
        )
        if len(frames) > 4 and frames[3] != b"ERROR":
            ref = frames[4].decode("utf-8", "replace")[:256]
            error = Error(new_msgid(), "internal-error", "the broker failed on it", ref)
            self.outbox.append((dest, frames[0], error.to_frames()))

    def _parse(self, dest: Dest, identity: bytes, frames: Sequence[bytes]) -> Message | None:
        try:
            return parse(frames, self.config.max_frame)
        except ProtocolError as exc:
            self._bad_input(dest, identity, exc, frames)
            return None

    def _bad_input(
        self, dest: Dest, identity: bytes, exc: ProtocolError, frames: Sequence[bytes]
    ) -> None:
        self.stats.malformed[exc.reason] += 1
        key = (identity[:64], exc.reason)
        if key not in self._logged:
            self._remember_logged(key)
            log.warning(
                "bad message from %s on %s: %s (further ones from this peer "
                "for this reason are counted, not logged)",
                peer_name(identity[:64]),
                dest.name.lower(),
                exc,
            )
        # Never answer an ERROR with an ERROR: two confused peers would loop.
        if len(frames) > 2 and frames[2] == b"ERROR":
            return
        self._refuse(dest, identity, exc.reason, exc.detail, exc.msgid, log_it=False)

    def _remember_logged(self, key: tuple[bytes, str]) -> None:
        """Note that ``key`` (a peer and a reason) was logged: log once, count the rest."""
        self._logged[key] = None
        if len(self._logged) > self.config.bad_input_memory:
            self._logged.popitem(last=False)

    def _refuse(
        self,
        dest: Dest,
        identity: bytes,
        reason: str,
        detail: str,
        ref: str,
        *,
        log_it: bool = True,
        held: bool = False,
    ) -> None:
        """Answer with an ERROR; ``held``: send it with the acknowledgements of the next commit."""
        if log_it:
            log.info("refused a message from %s: %s (%s)", peer_name(identity[:64]), reason, detail)
        error = (dest, identity, Error(new_msgid(), reason, detail, ref).to_frames())
        (self.acks if held else self.outbox).append(error)

    def _send_json(self, dest: Dest, identity: bytes, payload: Any) -> None:
        self.outbox.append(
            (
                dest,
                identity,
                [b"", PROTOCOL, _REPLY, new_tag(), msgspec.json.encode(payload)],
            )
        )

    # ------------------------------------------------------------ persistence

    def take_acks(self) -> list[Outgoing]:
        """The held messages, for the shell to send once the store has what they promise."""
        acks, self.acks = self.acks, []
        return acks

    def released(self, sent: list[Outgoing]) -> None:
        """The shell sent these held messages (the store has what they promise).

        Outcomes that waited for their job's acknowledgement follow it now.
        """
        after_ack = self.after_ack
        for _, _, frames in sent:
            ref = frames[-1].decode()
            self.unacked.discard(ref)
            if after_ack:
                outcome = after_ack.pop(ref, None)
                if outcome is not None:
                    self.outbox.append(outcome)
        self.held_results = holds_answers(self.acks)

    def take_changes(self) -> tuple[list[JobRecord], list[WorkerRecord], dict[str, Any]]:
        """Records of what changed since the last call, for one store transaction."""
        new, updates, workers, meta = self.take_job_changes()
        return new + updates, workers, meta

    def take_job_changes(
        self,
    ) -> tuple[list[JobRecord], list[JobRecord], list[WorkerRecord], dict[str, Any]]:
        """Like :meth:`take_changes`, with the jobs whose record is already in a batch
        taken before (``updates``: a store writes only their changing fields) apart
        from those new to the store. Returns ``(new, updates, workers, meta)``.

        A batch that fails is written again before any later one, so an update
        never reaches a store before the full record it updates.
        """
        new: list[JobRecord] = []
        updates: list[JobRecord] = []
        offset = self.wall_offset
        for j in self.dirty.values():
            if j.written:
                updates.append(job_record(j, offset))
            else:
                j.written = True
                new.append(job_record(j, offset))
        workers = [
            WorkerRecord(
                uuid=w.name,
                id=w.id,
                queues=msgspec.json.encode(w.queues).decode(),
                registered=w.registered + self.wall_offset,
                last_seen=w.last_seen + self.wall_offset,
                active=w.identity in self.workers,
            )
            for w in self.dirty_workers.values()
        ]
        meta = {"next_worker_id": self.next_worker_id} if workers else {}
        self.dirty = {}
        self.dirty_workers = {}
        self._ticks_saving.extend(self._ticks_unsaved)
        self._ticks_unsaved = []
        return new, updates, workers, meta

    def take_schedule_changes(self) -> list[ScheduleRecord]:
        """Schedules changed since the last call, for the same transaction as the jobs."""
        return self.desk.take_changes()

    def committed(self, now: float) -> None:
        """The store has everything taken so far: ticks' jobs may run now."""
        ticks, self._ticks_saving = self._ticks_saving, []
        for job in ticks:
            if self.jobs.get(job.id) is job and job.state is JobState.QUEUED:
                self._enqueue(job, now)

    def restore(self, snapshot: Snapshot, now: float) -> None:
        """Take back a store's state at start: worker ids, queues, retries, running jobs.

        Jobs that were running wait for their worker to re-announce itself
        within ``restore_grace`` seconds; it keeps those it still runs.
        """
        self.next_worker_id = max(self.next_worker_id, snapshot.next_worker_id)
        self.desk.restore(snapshot.schedules, self._wall_ms(now))
        for w in snapshot.workers:
            self.worker_ids[w.uuid] = w.id
            self.next_worker_id = max(self.next_worker_id, w.id + 1)
        for job_id in snapshot.finished_ids:
            self._recent[job_id] = None
        grace = self.config.restore_grace
        if grace is None:
            grace = self.config.heartbeat_interval * self.config.heartbeat_liveness
        counts: Counter[str] = Counter()
        blocked: list[Job] = []
        for rec in snapshot.jobs:
            job = job_from_record(rec, now, self.wall_offset)
            self.jobs[job.id] = job
            counts[job.state.value] += 1
            if job.state is JobState.RUNNING and job.worker_uuid:
                due, jobs = self.orphans.get(job.worker_uuid, (now + grace, []))
                jobs.append(job)
                self.orphans[job.worker_uuid] = (due, jobs)
            elif job.state is JobState.RETRYING:
                # The backoff goes on where it was (a broker down for longer: due now).
                due = now if rec.not_before is None else rec.not_before - self.wall_offset
                job.not_before = due
                self._retry_seq += 1
                heapq.heappush(self._retry_heap, (due, self._retry_seq, job))
            elif job.state is JobState.QUEUED and job.headers.get_all("after"):
                blocked.append(job)  # its dependencies are checked once all jobs are back
            else:
                self._enqueue(job, now)
        for job in blocked:
            self._wait_for(job, job.headers.get_all("after"), now)
        if snapshot.jobs or snapshot.workers:
            log.info(
                "restored %d unfinished job(s)%s and %d worker id(s); "
                "waiting up to %.0f s for %d worker(s) that were running jobs",
                len(snapshot.jobs),
                f" ({', '.join(f'{n} {s}' for s, n in sorted(counts.items()))})" if counts else "",
                len(snapshot.workers),
                grace,
                len(self.orphans),
            )

    def retry(self, rec: JobRecord, now: float) -> bool:
        """Put a finished (dead, failed or cancelled) job back in its queue, attempts reset."""
        if rec.id in self.jobs or rec.state not in ("dead", "failed", "cancelled"):
            return False
        job = job_from_record(rec, now, self.wall_offset)
        job.attempts = 0
        job.result = None
        job.error_type = None
        self._recent.pop(job.id, None)
        self.jobs[job.id] = job
        after = job.headers.get_all("after")
        if after:
            self._wait_for(job, after, now)  # retry what it waits for first
        else:
            self._enqueue(job, now)
        return True


#: Errors that no retry can mend.
_FINAL_ERRORS = frozenset(
    {"NotAllowed", "NotFound", "BadRequest", "JobCancelled", "DependencyFailed"}
)
#: Most jobs one job may wait for (``after:ID`` headers).
MAX_DEPENDENCIES = 1000


def job_record(job: Job, wall_offset: float = 0.0) -> JobRecord:
    return JobRecord(
        id=job.id,
        queue=job.queue,
        state=job.state.value,
        headers=job.frames[1].decode(),
        body=job.frames[2],
        submitter=job.submitter,
        attempts=job.attempts,
        worker_uuid=job.worker_uuid,
        worker_id=job.worker_id,
        submitted=job.submitted_at,
        started=job.started_at,
        completed=job.completed_at,
        received=job.received_at,
        not_before=None if job.not_before is None else job.not_before + wall_offset,
        result=job.result,
        label=job.label,
        error_type=job.error_type,
        owner=job.owner,
    )


def job_from_record(rec: JobRecord, now: float, wall_offset: float) -> Job:
    from corral.protocol import parse_headers

    frames = [rec.queue.encode(), rec.headers.encode(), rec.body]
    job = Job(
        rec.id,
        rec.queue,
        parse_headers(rec.headers),
        frames,
        rec.submitter,
        rec.submitted - wall_offset,
    )
    job.state = JobState(rec.state)
    job.attempts = rec.attempts
    job.worker_uuid, job.worker_id = rec.worker_uuid, rec.worker_id
    job.submitted_at, job.started_at = rec.submitted, rec.started
    job.label, job.result, job.error_type = rec.label, rec.result, rec.error_type
    job.owner = rec.owner
    return job


def holds_answers(held: list[Outgoing]) -> bool:
    """Whether held messages include answers that wait for their own change to be stored
    (a schedule's), not only acknowledgements: answers have six frames, acks five."""
    return any(len(frames) == 6 for _, _, frames in held)


def _ids(value: Any) -> list[str]:
    """The job ids of an INFORM meta list (anything else in it is ignored)."""
    if not isinstance(value, list):
        return []
    return [v for v in value[:100_000] if isinstance(v, str) and 0 < len(v) <= 256]


def _revoked(principal: Principal, keys: set[str]) -> bool:
    return bool(principal.key) and principal.key not in keys


def _concurrency(meta: dict[str, Any] | None) -> int:
    """The process count a corral worker's INFORM meta gives (0: not said)."""
    value = (meta or {}).get("concurrency")
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value <= 100_000:
        return value
    return 0


def _heartbeat(ts: bytes) -> list[bytes]:
    return [b"", PROTOCOL, b"HEARTBEAT", new_tag(), ts]
