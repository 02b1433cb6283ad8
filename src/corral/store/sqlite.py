"""The embedded default store: one SQLite file in WAL mode.

Writes come in batches from the broker (one transaction per batch), so the
cost of a commit is shared by every job in it. ``synchronous=NORMAL`` (the
default) survives a crash of the broker process; ``fsync=True`` sets
``synchronous=FULL`` and survives a power loss too.

Checkpoints (copying the write-ahead log into the database file, with its
fsyncs) run in a thread of their own, never in a commit: SQLite's automatic
checkpoint made one commit in a few hundred take 15-90 ms, on the broker's
loop or in its writer thread. Every ``checkpoint_interval`` seconds, if
anything was committed, the thread copies what the log holds while commits
go on (``PASSIVE``); after a checkpoint that found little new, the next one
waits twice as long, up to 4 s, unless the log file grows by 1 MiB, so that
a quiet store does few fsyncs. The log starts over from its beginning only
at a commit after a complete copy, which steady commits never leave time
for; so once it holds ``wal_limit`` bytes, the thread copies the last few
commits' pages while no commit runs (``RESTART``, under the lock commits
take) and the next commit starts the log again. The file keeps its largest
size, about ``wal_limit`` plus one interval's commits.
"""

from __future__ import annotations

import fcntl
import logging
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from typing import Any

import msgspec

from corral.store import streams as stream_store
from corral.store.base import (
    JOB_CHANGING_FIELDS,
    JobQuery,
    JobRecord,
    ScheduleRecord,
    Snapshot,
    StoreError,
    WorkerRecord,
)
from corral.store.streams import StreamBatch, StreamRecord

#: 2: jobs.owner, the key that submitted a job.
SCHEMA_VERSION = 2

log = logging.getLogger(__name__)

#: Seconds between background checkpoints while commits keep coming (see _BUSY_BYTES).
CHECKPOINT_INTERVAL = 0.25
#: A log this big is started over (see the module doc).
WAL_LIMIT = 16 << 20
#: Less than this committed between two checkpoints: the next one comes later,
#: up to _QUIET_INTERVAL seconds (or once the log file grew by this much).
_BUSY_BYTES = 1 << 20
_QUIET_INTERVAL = 4.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    queue TEXT NOT NULL,
    state TEXT NOT NULL,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    submitter BLOB NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    worker_uuid TEXT,
    worker_id INTEGER,
    submitted REAL NOT NULL,
    started REAL,
    completed REAL,
    received REAL,
    not_before REAL,
    result BLOB,
    label TEXT,
    error_type TEXT,
    owner TEXT
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, submitted);
CREATE INDEX IF NOT EXISTS jobs_queue ON jobs (queue, submitted);
CREATE INDEX IF NOT EXISTS jobs_submitted ON jobs (submitted);
CREATE TABLE IF NOT EXISTS workers (
    uuid TEXT PRIMARY KEY,
    id INTEGER NOT NULL UNIQUE,
    queues TEXT NOT NULL,
    registered REAL NOT NULL,
    last_seen REAL NOT NULL,
    active INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS schedules (
    id TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    queue TEXT NOT NULL,
    headers TEXT NOT NULL,
    interval INTEGER NOT NULL,
    cron TEXT NOT NULL,
    body BLOB NOT NULL,
    anchor INTEGER NOT NULL,
    last_tick INTEGER,
    last_run INTEGER,
    runs INTEGER NOT NULL DEFAULT 0,
    owner TEXT,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
"""

_JOB_FIELDS = JobRecord.__struct_fields__
_JOB_UPSERT = (
    f"INSERT INTO jobs ({', '.join(_JOB_FIELDS)}) VALUES ({', '.join('?' * len(_JOB_FIELDS))}) "
    f"ON CONFLICT(id) DO UPDATE SET "
    + ", ".join(f"{f} = excluded.{f}" for f in _JOB_FIELDS if f != "id")
)
# Only the changing columns: an UPDATE rewrites just the indexes on the columns
# it sets (here jobs_state), where the upsert above rewrites all three.
_JOB_UPDATE = f"UPDATE jobs SET {', '.join(f'{f} = ?' for f in JOB_CHANGING_FIELDS)} WHERE id = ?"
_update_row = operator.attrgetter(*JOB_CHANGING_FIELDS, "id")
_WORKER_FIELDS = WorkerRecord.__struct_fields__
_WORKER_UPSERT = (
    f"INSERT INTO workers ({', '.join(_WORKER_FIELDS)}) "
    f"VALUES ({', '.join('?' * len(_WORKER_FIELDS))}) ON CONFLICT(uuid) DO UPDATE SET "
    + ", ".join(f"{f} = excluded.{f}" for f in _WORKER_FIELDS if f != "uuid")
)
_SCHEDULE_FIELDS = ScheduleRecord.__struct_fields__
_SCHEDULE_UPSERT = (
    f"INSERT INTO schedules ({', '.join(_SCHEDULE_FIELDS)}) "
    f"VALUES ({', '.join('?' * len(_SCHEDULE_FIELDS))}) ON CONFLICT(id) DO UPDATE SET "
    + ", ".join(f"{f} = excluded.{f}" for f in _SCHEDULE_FIELDS if f != "id")
)
_FINISHED = ("succeeded", "failed", "cancelled", "dead")


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    """Bring a store written by an older corral up to SCHEMA_VERSION, in one transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if version < 2:
            columns = {r[1] for r in conn.execute("PRAGMA table_info(jobs)")}
            if "owner" not in columns:
                conn.execute("ALTER TABLE jobs ADD COLUMN owner TEXT")
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema'", (str(SCHEMA_VERSION),))
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    log.info("store schema upgraded from %d to %d", version, SCHEMA_VERSION)


#: A record as a row: its fields in declaration order, which is _JOB_FIELDS'.
_job_row = msgspec.structs.astuple


def _job(row: Sequence[Any]) -> JobRecord:
    return JobRecord(**dict(zip(_JOB_FIELDS, row, strict=True)))


class SQLiteStore:
    """Jobs, workers, schedules and counters in one SQLite database file."""

    def __init__(
        self,
        path: str,
        *,
        fsync: bool = False,
        checkpoint_interval: float = CHECKPOINT_INTERVAL,
        wal_limit: int = WAL_LIMIT,
    ) -> None:
        self.path = path
        self.url = f"sqlite:///{path}"
        self.fsync = fsync
        self.checkpoint_interval = checkpoint_interval
        self.wal_limit = wal_limit
        self._checkpointer: _Checkpointer | None = None
        #: Held by each commit, and by a checkpoint that must not overlap one.
        self._commit_lock = threading.Lock()
        self._write: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        # Reads (job queries) come from other threads than the writer's.
        self._local = threading.local()

    def _connect(self) -> sqlite3.Connection:
        if self.path != ":memory:":
            folder = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(folder, exist_ok=True)
        try:
            conn = sqlite3.connect(
                self.path, timeout=2.0, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={'FULL' if self.fsync else 'NORMAL'}")
            conn.execute("PRAGMA foreign_keys=OFF")
        except sqlite3.DatabaseError as exc:
            raise self._explain(exc) from None
        return conn

    def _explain(self, exc: sqlite3.Error) -> StoreError:
        text = str(exc)
        if "locked" in text or "busy" in text:
            return StoreError(
                f"the store {self.path} is locked by another process (another broker on the "
                f"same data directory?); stop it or choose another --store"
            )
        if "not a database" in text or "malformed" in text or "corrupt" in text:
            return StoreError(
                f"the store {self.path} is not a readable SQLite database ({text}); move it "
                f"aside to start empty, or point --store at a good copy"
            )
        return StoreError(f"the store {self.path} cannot be used: {text}")

    def _take_lock(self) -> None:
        """Hold ``PATH.lock`` for as long as the store is open: one broker per store.

        The kernel drops the lock when the process dies, even by SIGKILL, so a
        restarted broker gets it back at once.
        """
        if self.path == ":memory:" or self._lock_fd is not None:
            return
        lock_path = self.path + ".lock"
        os.makedirs(os.path.dirname(os.path.abspath(lock_path)), exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StoreError(
                f"the store {self.path} is in use by another broker (pid {holder}); stop it, "
                f"or give this one another --data-dir or --store"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def open(self, recent: int = 100_000) -> Snapshot:
        self._take_lock()
        try:
            return self._open(recent)
        except BaseException:
            self._release_lock()
            raise

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _open(self, recent: int) -> Snapshot:
        conn = self._connect()
        try:
            conn.executescript(_SCHEMA)
            conn.executescript(stream_store.SCHEMA)
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
            if row is None:
                conn.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(
                    f"the store {self.path} was written by a newer corral "
                    f"(schema {row[0]}); upgrade corral to use it"
                )
            elif int(row[0]) < SCHEMA_VERSION:
                _migrate(conn, int(row[0]))
            # Take the write lock now so a second broker on the same file fails at
            # start with a clear message instead of stalling later.
            conn.execute("BEGIN IMMEDIATE")
            conn.execute("COMMIT")
            jobs = [
                _job(r)
                for r in conn.execute(
                    f"SELECT {', '.join(_JOB_FIELDS)} FROM jobs WHERE state NOT IN "
                    f"({', '.join('?' * len(_FINISHED))}) ORDER BY submitted",
                    _FINISHED,
                )
            ]
            workers = [
                WorkerRecord(**dict(zip(_WORKER_FIELDS, r, strict=True)))
                for r in conn.execute(f"SELECT {', '.join(_WORKER_FIELDS)} FROM workers")
            ]
            for w in workers:
                w.active = bool(w.active)
            row = conn.execute("SELECT value FROM meta WHERE key = 'next_worker_id'").fetchone()
            # rowid order is insertion (submission) order; an upsert keeps the rowid.
            finished = [
                r[0]
                for r in conn.execute(
                    f"SELECT id FROM jobs WHERE state IN ({', '.join('?' * len(_FINISHED))}) "
                    f"ORDER BY rowid DESC LIMIT ?",
                    (*_FINISHED, recent),
                )
            ]
            finished.reverse()
            schedules = [
                ScheduleRecord(**dict(zip(_SCHEDULE_FIELDS, r, strict=True)))
                for r in conn.execute(
                    f"SELECT {', '.join(_SCHEDULE_FIELDS)} FROM schedules "
                    f"WHERE state = 'active' ORDER BY created"
                )
            ]
        except sqlite3.DatabaseError as exc:
            conn.close()
            raise self._explain(exc) from None
        except StoreError:
            conn.close()
            raise
        if self.path != ":memory:":
            # Commits never checkpoint: the checkpointer thread does (see the module doc).
            conn.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = _Checkpointer(self)
            self._checkpointer.start()
        self._write = conn
        return Snapshot(
            jobs=jobs,
            workers=workers,
            next_worker_id=int(row[0]) if row else 1,
            finished_ids=finished,
            schedules=schedules,
        )

    def commit(
        self,
        jobs: Sequence[JobRecord],
        workers: Sequence[WorkerRecord],
        meta: dict[str, Any],
        schedules: Sequence[ScheduleRecord] = (),
        streams: StreamBatch | None = None,
        updates: Sequence[JobRecord] = (),
    ) -> None:
        conn = self._write
        assert conn is not None, "open() first"
        with self._commit_lock:
            self._commit(conn, jobs, workers, meta, schedules, streams, updates)

    def _commit(
        self,
        conn: sqlite3.Connection,
        jobs: Sequence[JobRecord],
        workers: Sequence[WorkerRecord],
        meta: dict[str, Any],
        schedules: Sequence[ScheduleRecord],
        streams: StreamBatch | None,
        updates: Sequence[JobRecord],
    ) -> None:
        try:
            conn.execute("BEGIN")
            if jobs:
                conn.executemany(_JOB_UPSERT, [_job_row(j) for j in jobs])
            if updates:
                conn.executemany(_JOB_UPDATE, [_update_row(j) for j in updates])
            if workers:
                conn.executemany(
                    _WORKER_UPSERT, [tuple(getattr(w, f) for f in _WORKER_FIELDS) for w in workers]
                )
            if schedules:
                conn.executemany(
                    _SCHEDULE_UPSERT,
                    [tuple(getattr(r, f) for f in _SCHEDULE_FIELDS) for r in schedules],
                )
            for key, value in meta.items():
                conn.execute(
                    "INSERT INTO meta VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET "
                    "value = excluded.value",
                    (key, str(value)),
                )
            if streams:
                stream_store.write(conn, streams)
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise self._explain(exc) from None

    def load_streams(self) -> tuple[list[StreamRecord], str | None]:
        """Open job streams and the stream-token secret (at start, after :meth:`open`)."""
        assert self._write is not None, "open() first"
        return stream_store.load_open(self._write)

    def get_stream(self, name: str) -> StreamRecord | None:
        return stream_store.get(self._reader(), name)

    def _reader(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = self._connect()
        return conn

    def get_job(self, job_id: str) -> JobRecord | None:
        row = (
            self._reader()
            .execute(f"SELECT {', '.join(_JOB_FIELDS)} FROM jobs WHERE id = ?", (job_id,))
            .fetchone()
        )
        return _job(row) if row else None

    def get_jobs(self, job_ids: Sequence[str]) -> list[JobRecord]:
        found: list[JobRecord] = []
        conn = self._reader()
        for i in range(0, len(job_ids), 500):  # below SQLite's limit of bound parameters
            chunk = list(job_ids[i : i + 500])
            found.extend(
                _job(r)
                for r in conn.execute(
                    f"SELECT {', '.join(_JOB_FIELDS)} FROM jobs "
                    f"WHERE id IN ({', '.join('?' * len(chunk))})",
                    chunk,
                )
            )
        return found

    def query_jobs(self, query: JobQuery) -> list[JobRecord]:
        where: list[str] = []
        args: list[Any] = []
        if query.states:
            where.append(f"state IN ({', '.join('?' * len(query.states))})")
            args.extend(query.states)
        for column, value in (
            ("queue", query.queue),
            ("worker_id", query.worker_id),
            ("label", query.label),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if query.owners is not None:
            where.append(f"owner IN ({', '.join('?' * len(query.owners))})")
            args.extend(query.owners)
        if query.since is not None:
            where.append("submitted >= ?")
            args.append(query.since)
        if query.until is not None:
            where.append("submitted < ?")
            args.append(query.until)
        sql = f"SELECT {', '.join(_JOB_FIELDS)} FROM jobs"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY submitted DESC LIMIT ?"
        args.append(query.limit)
        return [_job(r) for r in self._reader().execute(sql, args)]

    def purge(self, finished_before: float, limit: int = 5000) -> int:
        conn = self._write
        assert conn is not None
        # A job completes after it is submitted: "submitted <" lets the (state,
        # submitted) index find candidates without reading every finished row.
        try:
            with self._commit_lock:  # like a commit (see _Checkpointer)
                cur = conn.execute(
                    f"DELETE FROM jobs WHERE rowid IN (SELECT rowid FROM jobs "
                    f"WHERE state IN ({', '.join('?' * len(_FINISHED))}) AND submitted < ? "
                    f"AND COALESCE(completed, submitted) < ? LIMIT ?)",
                    (*_FINISHED, finished_before, finished_before, limit),
                )
                # The streams of those jobs go with them.
                stream_store.purge(conn, limit)
        except sqlite3.Error as exc:
            raise self._explain(exc) from None
        return cur.rowcount

    def close(self) -> None:
        if self._checkpointer is not None:
            self._checkpointer.stop()
            self._checkpointer = None
        if self._write is not None:
            self._write.close()
            self._write = None
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
        self._release_lock()


class _Checkpointer(threading.Thread):
    """Checkpoints the store's write-ahead log off the commit path (see the module doc)."""

    def __init__(self, store: SQLiteStore) -> None:
        super().__init__(name="corral-store-checkpoint", daemon=True)
        self.store = store
        self.wal = store.path + "-wal"
        self._stopping = threading.Event()
        #: Checkpoints run, by mode (for tests and diagnostics).
        self.runs = {"PASSIVE": 0, "RESTART": 0}  # a RESTART follows a PASSIVE
        # What the last checkpoint saw (the log file's mtime and size, its frames),
        # and when a quiet store's next one is due.
        self._seen: int | None = None
        self._size = self._frames = 0
        self._backoff = self._next = 0.0

    def stop(self) -> None:
        self._stopping.set()
        self.join(10.0)

    def run(self) -> None:
        store = self.store
        try:
            conn = store._connect()
            page = conn.execute("PRAGMA page_size").fetchone()[0]
            # RESTART waits for readers on an older snapshot, while commits wait
            # for it: give up soon (it says busy) and try at the next round.
            conn.execute("PRAGMA busy_timeout=100")
        except (StoreError, sqlite3.Error) as exc:
            log.error("store checkpoints cannot run (%s); the write-ahead log will grow", exc)
            return
        try:
            while not self._stopping.wait(store.checkpoint_interval):
                if self._due():
                    self._checkpoint(conn, page)
        finally:
            conn.close()

    def _due(self) -> bool:
        """Whether anything was committed since the last checkpoint, and it is time."""
        try:
            st = os.stat(self.wal)
        except OSError:
            return False
        if st.st_mtime_ns == self._seen:
            return False
        if time.monotonic() < self._next and st.st_size < self._size + _BUSY_BYTES:
            return False  # a quiet store waits longer, unless its log file grows
        self._seen, self._size = st.st_mtime_ns, st.st_size
        return True

    def _checkpoint(self, conn: sqlite3.Connection, page: int) -> None:
        store, mode = self.store, "PASSIVE"
        try:
            _, frames, _ = conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            # Frames committed since the last one (the log may have started over).
            new = frames - self._frames if frames >= self._frames else frames
            self._frames = frames
            interval = store.checkpoint_interval
            quiet = new * page < _BUSY_BYTES
            self._backoff = (
                min(max(self._backoff, interval) * 2, _QUIET_INTERVAL) if quiet else interval
            )
            self._next = time.monotonic() + self._backoff
            if frames * page >= store.wal_limit:
                # All but what was committed during that checkpoint is copied: copy
                # the rest while no commit runs, so that the next commit starts the
                # log again. One that comes meanwhile waits for the lock (not for
                # SQLite's busy back-off).
                mode = "RESTART"
                with store._commit_lock:
                    conn.execute("PRAGMA wal_checkpoint(RESTART)").fetchone()
        except sqlite3.Error as exc:
            log.warning("store checkpoint (%s) failed: %s", mode.lower(), exc)
            return
        self.runs[mode] += 1
