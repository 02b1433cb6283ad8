"""The broker's I/O shell: three ROUTER sockets, an asyncio loop and a timer.

All decisions are the core's; this module receives frames, hands them to
:class:`~corral.broker.core.BrokerCore` and sends what the core produced.
Sockets are plain (non-asyncio) pyzmq sockets whose file descriptors are
watched by the loop, because draining a socket in a batch per wake-up is
several times cheaper than awaiting one message at a time.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import msgspec
import zmq

from corral._clock import follow_wall_clock
from corral._loop import has_input, send_frames
from corral.broker.core import BrokerCore, Dest, holds_answers, job_record
from corral.broker.lines import AddressInUse as LinesInUse
from corral.broker.lines import LineServer
from corral.broker.queries import QueryHandler
from corral.broker.security import BrokerGuard, InsecureBind, Reader, SecurityConfig, check_binds
from corral.broker.streams import BrokerStreams, merge_batches
from corral.protocol import PROTOCOL, new_tag
from corral.store.base import JobRecord, Store, StoreError, WorkerRecord
from corral.store.memory import MemoryStore
from corral.store.streams import StreamBatch

log = logging.getLogger("corral.broker")

#: Messages handled per socket before the loop gets a chance to do other work.
BATCH = 256
#: Seconds after start, and then between, purges of expired job records.
PURGE_FIRST = 60.0
PURGE_EVERY = 3600.0
#: Records deleted per store transaction by a purge.
PURGE_BATCH = 5000


def _log_purge_failure(task: asyncio.Future[int]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("could not purge expired job records: %s", task.exception())


#: Transactions of at most this many rows are written on the event loop itself.
INLINE_COMMIT_ROWS = 8


class AddressInUse(RuntimeError):
    pass


class BrokerServer:
    """Runs a :class:`BrokerCore` on real sockets until stopped.

    ``frontend``, ``backend`` and ``admin`` are ZeroMQ endpoints to bind.
    """

    def __init__(
        self,
        core: BrokerCore,
        *,
        frontend: str,
        backend: str,
        admin: str,
        notify: str | None = None,
        store: Store | None = None,
        commit_delay: float = 0.002,
        retention: float | None = 7 * 86400.0,
        context: zmq.Context | None = None,
        streams: BrokerStreams | None = None,
        stream_lines: str | None = None,
        security: SecurityConfig | None = None,
    ) -> None:
        self.core = core
        #: Job streams; ``stream_lines`` is the TCP line server's endpoint (None: none).
        self.streams = streams or BrokerStreams(core)
        self.lines = LineServer(self.streams, stream_lines, self._flush) if stream_lines else None
        self.endpoints = {Dest.FRONTEND: frontend, Dest.BACKEND: backend, Dest.ADMIN: admin}
        self.notify_endpoint = notify
        self.store: Store = store or MemoryStore()
        self._notify: zmq.Socket | None = None
        # One writer thread: commits happen in order, off the event loop.
        self._executor: ThreadPoolExecutor | None = None
        #: The writer thread is busy (a commit, a purge batch): a commit must wait.
        self._committing = False
        self._writer_waiters: list[asyncio.Future[None]] = []
        #: A batch whose commit failed:
        #: (new jobs, job updates, workers, meta, acks, schedules, streams, marks).
        self._unsaved: tuple | None = None
        self.commits = 0
        self.commit_failures = 0
        #: Seconds changes may wait to share a transaction (SQLite store only).
        self.commit_delay = commit_delay
        self.store_fsyncs = bool(getattr(self.store, "fsync", False))
        self._commit_timer: asyncio.TimerHandle | None = None
        self._readers: ThreadPoolExecutor | None = None
        #: Records taken from the core for a commit that has not succeeded yet.
        self._uncommitted: dict[str, JobRecord] = {}
        self.queries = QueryHandler(
            core,
            self.store,
            self._in_thread,
            self._answer,
            time.monotonic,
            self.unstored_records,
            notify,
            self.purge,
        )
        #: Seconds a finished job's record is kept (``None``: forever).
        self.retention = retention
        self._purge_timer: asyncio.TimerHandle | None = None
        self.context = context or zmq.Context.instance()
        #: CURVE, who sent each message, key reloads (see corral.broker.security).
        self.guard = BrokerGuard(security or SecurityConfig(), self.context, self._count_refused)
        #: Endpoints that listen beyond loopback without CURVE (allowed by --insecure).
        self.insecure_endpoints: list[str] = []
        self._recv: dict[Dest, Reader] = {}
        self.sockets: dict[Dest, zmq.Socket] = {}
        self.send_failures = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._pending_drain: set[Dest] = set()
        self._sent_on: set[Dest] = set()
        #: Called once the sockets are bound (the CLI prints its banner then).
        self.on_bound: Callable[[], None] | None = None

    # ------------------------------------------------------------ lifecycle

    def open_store(self, *, require_state: bool = False) -> None:
        """Open the store and take back its state (raises StoreError with advice).

        ``require_state`` (``--restore``): refuse a store that holds nothing
        from an earlier run, so a mistyped path does not start an empty broker.
        """
        snapshot = self.store.open(recent=self.core.config.recent_ids)
        held = snapshot.jobs or snapshot.workers or snapshot.finished_ids or snapshot.schedules
        if require_state and not held:
            self.store.close()
            raise StoreError(
                f"--restore: the store {self.store.url} holds nothing from an earlier run "
                f"(wrong --data-dir or --store?); start without --restore to begin empty"
            )
        self.core.wall_offset = time.time() - time.monotonic()
        self.core.restore(snapshot, time.monotonic())
        if hasattr(self.store, "load_streams"):
            self.streams.restore(*self.store.load_streams())
            # Workers' proofs come from the stored secret too, so they outlive a restart.
            self.core.secret = self.streams.secret.encode()
        else:
            self.streams.persistent = False
            log.warning("the store %s keeps no job streams; they live in memory", self.store.url)
        if not isinstance(self.store, MemoryStore):
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="corral-store")
            self._readers = ThreadPoolExecutor(2, thread_name_prefix="corral-query")

    async def _in_thread(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._readers is None:
            return fn(*args)
        assert self._loop is not None
        return await self._loop.run_in_executor(self._readers, fn, *args)

    def bind(self) -> None:
        """Bind every endpoint (raises AddressInUse or InsecureBind with advice)."""
        guard = self.guard
        try:
            self.insecure_endpoints = check_binds(
                guard.config,
                {
                    **{dest.name.lower(): ep for dest, ep in self.endpoints.items()},
                    "notify": self.notify_endpoint,
                    "streams": self.lines.endpoint if self.lines is not None else None,
                },
            )
        except InsecureBind:
            self.close()
            raise
        self.core.security = {**guard.status(), "insecure_endpoints": self.insecure_endpoints}
        if self.insecure_endpoints:
            log.warning(
                "--insecure: %s listen(s) beyond loopback without keys; anyone who reaches "
                "them may take jobs, forge results or stop the broker",
                ", ".join(self.insecure_endpoints),
            )
        if self.lines is not None and self.lines.sock is None:
            try:
                self.lines.bind()
            except LinesInUse as exc:
                raise AddressInUse(str(exc)) from None
        if self.notify_endpoint:
            self._notify = self.context.socket(zmq.PUB)
            self._notify.setsockopt(zmq.LINGER, 0)
            self._notify.setsockopt(zmq.SNDHWM, 10_000)
            guard.secure(self._notify, "notify")
            try:
                self._notify.bind(self.notify_endpoint)
            except zmq.ZMQError as exc:
                self._notify.close(0)
                self._notify = None
                if exc.errno == errno.EADDRINUSE:
                    raise AddressInUse(
                        f"{self.notify_endpoint} is already in use; choose "
                        f"another address with --notify"
                    ) from None
                raise
        for dest, endpoint in self.endpoints.items():
            sock = self.context.socket(zmq.ROUTER)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            # A peer whose single message is larger than this is disconnected by
            # libzmq before the message is ever buffered whole.
            sock.setsockopt(zmq.MAXMSGSIZE, self.core.config.max_frame * 4)
            guard.secure(sock, dest.name.lower())
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                sock.close(0)
                self.close()
                if exc.errno == errno.EADDRINUSE:
                    raise AddressInUse(
                        f"{endpoint} is already in use: another broker may be running "
                        f"(try `corral status`), or choose another address with "
                        f"--{dest.name.lower()}"
                    ) from None
                raise
            self.sockets[dest] = sock
            self._recv[dest] = guard.reader(dest.name.lower(), sock)

    def _count_refused(self, count: int) -> None:
        self.core.stats.auth_refused += count

    def reload_keys(self) -> dict[str, Any]:
        """Read the authorised keys again (SIGHUP, RELOAD_KEYS); drop peers of removed keys."""
        try:
            changes = self.guard.reload()
        except Exception as exc:  # noqa: BLE001 - a bad key file must not stop the broker
            log.error("could not reload the keys (the old ones stay in force): %s", exc)
            return {"error": str(exc)}
        self.core.visibility.reload(self.guard.roster)
        if self.guard.keyed:
            dropped = self.core.drop_revoked(set(self.guard.roster.by_key), time.monotonic())
            changes["dropped"] = dropped
        self.core.security = {**self.guard.status(), "insecure_endpoints": self.insecure_endpoints}
        self._flush()
        return changes

    async def serve(self) -> None:
        """Bind (if not yet), serve until :meth:`stop` or a DISCONNECT, then say KBYE."""
        if not self.sockets:
            self.bind()
        self._loop = asyncio.get_running_loop()
        self.core.wall_offset = time.time() - time.monotonic()
        self._stopped = asyncio.Event()
        for dest, sock in self.sockets.items():
            self._loop.add_reader(sock.getsockopt(zmq.FD), self._drain, dest)
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._loop.add_signal_handler(sig, self.stop)
            except (ValueError, RuntimeError):
                pass  # not the main thread: the owner stops us
        try:
            self._loop.add_signal_handler(signal.SIGHUP, self.reload_keys)
        except (ValueError, RuntimeError):
            pass
        self.core.visibility.reload(self.guard.roster)
        self.guard.watch(self._loop)
        if self.lines is not None:
            await self.lines.start()
        self._tick()
        if self.retention is not None:
            self._purge_timer = self._loop.call_later(PURGE_FIRST, self._purge_expired)
        for dest in self.sockets:
            self._drain(dest)
        if self.on_bound:
            self.on_bound()
        try:
            await self._stopped.wait()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    async def _shutdown(self) -> None:
        log.info("broker stopping: saying goodbye to %d worker(s)", len(self.core.workers))
        assert self._loop is not None
        if self._timer:
            self._timer.cancel()
        if self._purge_timer:
            self._purge_timer.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            try:
                self._loop.remove_signal_handler(sig)
            except (ValueError, RuntimeError):
                pass
        for sock in self.sockets.values():
            self._loop.remove_reader(sock.getsockopt(zmq.FD))
        self.core.shutdown()
        self._flush()
        while self._committing:
            await asyncio.sleep(0.005)
        self._commit(sync=True)
        self.close()

    def close(self) -> None:
        self.guard.close(self._loop)
        if self.lines is not None:
            self.lines.close()
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._readers is not None:
            self._readers.shutdown(wait=True, cancel_futures=True)
            self._readers = None
        self.store.close()

    # ------------------------------------------------------------ I/O

    def _drain(self, dest: Dest) -> None:
        self._pending_drain.discard(dest)
        sock = self.sockets.get(dest)
        if sock is None:
            return
        core = self.core
        handler = (core.on_frontend, core.on_backend, core.on_admin)[dest]
        recv = self._recv[dest]
        now = time.monotonic()
        for _ in range(BATCH):
            try:
                frames, peer = recv()
            except zmq.Again:
                break
            try:
                handler(frames[0], frames[1:], now, peer)
            except Exception:  # noqa: BLE001 - one bad message must not stop the broker
                core.internal_error(dest, frames)
        else:
            self._schedule_drain(dest)
        self._flush()
        if core.stopping:
            self.stop()

    def _schedule_drain(self, dest: Dest) -> None:
        if dest not in self._pending_drain and self._loop is not None:
            self._pending_drain.add(dest)
            self._loop.call_soon(self._drain, dest)

    def _flush(self) -> None:
        core = self.core
        streams = self.streams
        streams.pump()
        while core.outbox:
            batch = core.outbox
            core.outbox = []
            self._send(batch)
        if core.notifications and self._notify is not None:
            for topic, payload in core.notifications:
                self._notify.send_multipart([topic.encode(), msgspec.json.encode(payload)])
        core.notifications.clear()
        if core.queries:
            queries, core.queries = core.queries, []
            for identity, query, peer in queries:
                self.queries.handle(identity, query, peer)
        if core.reload_requests:
            requests, core.reload_requests = core.reload_requests, []
            for identity, _msgid in requests:
                changes = msgspec.json.encode(self.reload_keys())
                frames = [b"", PROTOCOL, b"REPLY", new_tag(), changes]
                self._send([(Dest.ADMIN, identity, frames)])
        if core.lookups:
            lookups, core.lookups = core.lookups, []
            asyncio.ensure_future(self._look_up(lookups))
        if core.acks or core.dirty or core.dirty_workers or core.desk.dirty or streams.dirty:
            self._schedule_commit()
        if streams.loads:
            names, streams.loads = streams.loads, []
            for name in names:
                asyncio.ensure_future(self._load_stream(name))
        if self.lines is not None:
            self.lines.write_out()
        # Sending may consume the edge of the sockets' edge-triggered FDs:
        # look again, or a message that arrived meanwhile would sit unread.
        for dest in self._sent_on:
            if dest not in self._pending_drain and has_input(self.sockets[dest]):
                self._schedule_drain(dest)
        self._sent_on.clear()

    def _send(self, batch: list[tuple[Dest, bytes, list[bytes]]]) -> None:
        core = self.core
        for dest, identity, frames in batch:
            sock = self.sockets.get(dest)
            if sock is None:
                continue
            self._sent_on.add(dest)
            try:
                send_frames(sock, [identity, *frames])
            except zmq.ZMQError as exc:
                self.send_failures += 1
                if exc.errno == errno.EHOSTUNREACH:
                    core.peer_unreachable(dest, identity, time.monotonic())
                    if dest is Dest.FRONTEND:
                        self.streams.unreachable(identity)
                else:
                    log.warning(
                        "could not send to %r on %s: %s", identity[:64], dest.name.lower(), exc
                    )

    def _answer(self, batch: list[tuple[Dest, bytes, list[bytes]]]) -> None:
        self._send(batch)
        self._flush()  # the query may have changed state (a retry)

    # ------------------------------------------------------------ group commit

    def _schedule_commit(self) -> None:
        # Somebody waits for what a commit releases (an acknowledgement, a schedule's
        # answer): commit now. The submits of one
        # loop turn share that transaction, and while it runs in the writer thread
        # the next turns' pile up for the one after, so a busy broker still writes
        # big batches. Changes nobody waits for (dispatches, outcomes of acknowledged
        # jobs) wait up to ``commit_delay`` to share a transaction.
        core = self.core
        if self._executor is None or self.commit_delay <= 0 or core.held_results or core.acks:
            self._commit()
        elif self._commit_timer is None and not self._committing and self._loop is not None:
            self._commit_timer = self._loop.call_later(self.commit_delay, self._commit)

    def _commit(self, sync: bool = False) -> None:
        """Write what changed in one transaction, then send the acks that wait for it.

        While one commit runs in the writer thread, changes accumulate in the
        core and go out together in the next: the busier the broker, the
        bigger (and cheaper per job) each transaction.
        """
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        if self._committing:
            return
        core = self.core
        new, updates, workers, meta = core.take_job_changes()
        schedules = core.take_schedule_changes()
        # A job that ended closes its stream in the same transaction.
        self.streams.note_jobs(new)
        self.streams.note_jobs(updates)
        streams, marks = self.streams.take_changes()
        acks = core.take_acks()
        if self._unsaved is not None:
            # A failed batch goes first: its full records before any update of them.
            (
                old_new, old_updates, old_workers, old_meta,
                old_acks, old_schedules, old_streams, old_marks,
            ) = self._unsaved  # fmt: skip
            self._unsaved = None
            if new:
                # A job sent again under a forgotten job's id: its whole record
                # replaces the row, and the old job's update must not follow it.
                fresh = {rec.id for rec in new}
                old_updates = [rec for rec in old_updates if rec.id not in fresh]
            new, updates = old_new + new, old_updates + updates
            workers, meta = old_workers + workers, {**old_meta, **meta}
            acks, schedules = old_acks + acks, old_schedules + schedules
            streams, marks = merge_batches(old_streams, streams), old_marks + marks
        if not (new or updates or workers or meta or acks or schedules or streams):
            return
        batch = (new, updates, workers, meta, acks, schedules, streams, marks)
        # Stores that keep no streams are not given any (they live in memory then).
        extra = {"streams": streams} if self.streams.persistent and streams else {}
        if updates:
            extra["updates"] = updates
        self._uncommitted.update((rec.id, rec) for rec in (*new, *updates))
        rows = len(new) + len(updates)
        if self._executor is None or sync or self._small(rows, workers, streams, acks):
            try:
                self.store.commit(new, workers, meta, schedules, **extra)
            except Exception as exc:  # noqa: BLE001 - any store failure is handled alike
                self._commit_failed(exc, batch)
                return
            self._committed(acks, marks)
            return
        self._committing = True
        assert self._loop is not None
        future = self._loop.run_in_executor(
            self._executor, lambda: self.store.commit(new, workers, meta, schedules, **extra)
        )
        future.add_done_callback(lambda f: self._commit_done(f, batch))

    def _small(
        self,
        job_rows: int,
        workers: list[WorkerRecord],
        streams: StreamBatch,
        acks: list,
    ) -> bool:
        # A transaction of a few rows takes ~50-100 us: less than handing it to the
        # writer thread and back (two thread wake-ups, ~0.3 ms on an idle machine).
        # That counts when an answer is already here and waits only for this commit
        # (an outcome behind its job's acknowledgement, a schedule's answer), and on
        # an idle broker for the one job just sent to a worker: its commit is done
        # before the job's outcome comes back, which would otherwise often wait for
        # the writer thread. Otherwise the writer thread commits while the jobs run
        # and the loop goes on serving; big batches and fsync'ed commits always go
        # there.
        if self.store_fsyncs:
            return False
        if not (self.core.after_ack or holds_answers(acks)):
            # One acknowledgement (and the update of an earlier job, at most), with
            # nothing else arrived meanwhile: a lone job, not a busy broker's batch.
            if len(acks) != 1 or job_rows > 2 or workers or streams.writes:
                return False
            waiting = False
            for dest, sock in self.sockets.items():
                # Looking consumes the edge of the socket's edge-triggered FD: a
                # message found must be drained now, or it would sit unread.
                if has_input(sock):
                    waiting = True
                    self._schedule_drain(dest)
            return not waiting
        rows = job_rows + len(workers) + sum(len(w.items) + 1 for w in streams.writes)
        return rows <= INLINE_COMMIT_ROWS

    def _writer_free(self) -> None:
        """The writer (the store's one write connection) is idle: wake who waits for it."""
        self._committing = False
        waiters, self._writer_waiters = self._writer_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _commit_done(self, future: asyncio.Future[None], batch: tuple) -> None:
        self._writer_free()
        exc = future.exception()
        if exc is not None:
            self._commit_failed(exc, batch)
            return
        self._committed(batch[4], batch[7])
        core = self.core
        if core.acks or core.dirty or core.dirty_workers or core.desk.dirty or self.streams.dirty:
            self._commit()

    def _committed(self, acks: list, marks: list) -> None:
        # Every record taken so far was in this batch: one commit runs at a time.
        self._uncommitted.clear()
        self.commits += 1
        self._send(acks)
        self.core.released(acks)
        self.core.committed(time.monotonic())
        self.streams.committed(marks)
        self._flush()

    def _commit_failed(self, exc: BaseException, batch: tuple) -> None:
        # Nothing is acknowledged until it is stored: keep the batch and try again.
        self.commit_failures += 1
        self._unsaved = batch
        log.error(
            "could not write to the store (%s); %d job(s) wait, retrying in 1 s",
            exc,
            len(batch[0]) + len(batch[1]),
        )
        if self._loop is not None:
            self._loop.call_later(1.0, self._commit)

    async def _load_stream(self, name: str) -> None:
        """Read a stream the hub does not hold (a job that ended a while ago) from the store."""
        record = job = None
        try:
            record = await self._in_thread(self.store.get_stream, name)
            if record is None:
                job = self.unstored_records().get(name)
                if job is None:
                    job = await self._in_thread(self.store.get_job, name)
        except Exception:  # noqa: BLE001 - the listener is told the stream is unknown
            log.exception("could not read stream %s from the store", name)
        self.streams.loaded(name, record, job)
        self._flush()

    # ------------------------------------------------------------ store reads and upkeep

    async def _look_up(self, job_ids: list[str]) -> None:
        """Tell the core how jobs it does not remember ended (for jobs waiting on them)."""
        newer = self.unstored_records()
        try:
            found = {rec.id: rec for rec in await self._in_thread(self.store.get_jobs, job_ids)}
        except Exception:  # noqa: BLE001 - retried: the dependents must not wait forever
            log.exception("could not read %d job(s) from the store; trying again", len(job_ids))
            assert self._loop is not None
            self._loop.call_later(1.0, lambda: asyncio.ensure_future(self._look_up(job_ids)))
            return
        found.update((i, newer[i]) for i in job_ids if i in newer)
        now = time.monotonic()
        for job_id in job_ids:
            rec = found.get(job_id)
            self.core.resolve_dependency(job_id, rec.state if rec else None, now)
        self._flush()

    async def purge(self, older_than: float) -> int:
        """Delete records of jobs that ended over ``older_than`` s ago; return how many.

        Runs in the writer thread, in batches, so commits go on in between.
        """
        cutoff = time.time() - older_than
        total = 0
        while True:
            if self._executor is None:
                count = self.store.purge(cutoff, PURGE_BATCH)
            else:
                count = await self._in_writer(self.store.purge, cutoff, PURGE_BATCH)
            total += count
            if count < PURGE_BATCH:
                break
        if total:
            log.info("purged %d job record(s) that ended over %.0f s ago", total, older_than)
        return total

    async def _in_writer(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn`` in the writer thread when no commit is running, as a commit would.

        The write connection is used by one thread at a time: commits take turns
        with this, and no small commit runs on the loop meanwhile (see _small).
        """
        assert self._loop is not None and self._executor is not None
        while self._committing:
            waiter = self._loop.create_future()
            self._writer_waiters.append(waiter)
            await waiter
        self._committing = True
        try:
            return await self._loop.run_in_executor(self._executor, fn, *args)
        finally:
            self._writer_free()
            core = self.core
            if (
                core.acks
                or core.dirty
                or core.dirty_workers
                or core.desk.dirty
                or self.streams.dirty
            ):
                self._commit()  # what waited for the writer

    def _purge_expired(self) -> None:
        assert self._loop is not None and self.retention is not None
        self._purge_timer = self._loop.call_later(PURGE_EVERY, self._purge_expired)
        task = asyncio.ensure_future(self.purge(self.retention))
        task.add_done_callback(_log_purge_failure)

    def unstored_records(self) -> dict[str, JobRecord]:
        """Jobs whose newest state the store does not have yet (it lags by one commit).

        Queries read the store in another thread; laying these over what they
        read lets a client that just received an outcome also read it back.
        """
        newer = dict(self._uncommitted)
        offset = self.core.wall_offset
        for job_id, job in self.core.dirty.items():
            newer[job_id] = job_record(job, offset)
        return newer

    def _tick(self) -> None:
        assert self._loop is not None
        now = time.monotonic()
        follow_wall_clock(self.core, now)
        due = self.core.tick(now)
        self._flush()
        delay = max(0.05, min(due - now, self.core.config.heartbeat_interval / 3))
        self._timer = self._loop.call_later(delay, self._tick)
