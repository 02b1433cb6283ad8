"""What a broker persists, and the interface every store implements.

The broker's core marks what changed while it handles a batch of messages;
the server turns those into records and hands them to :meth:`Store.commit`
in one transaction (group commit), and only then sends the
acknowledgements that promised them. :meth:`Store.load` gives back
everything a restarted broker needs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import msgspec


class JobRecord(msgspec.Struct, kw_only=True):
    id: str
    queue: str
    state: str
    headers: str
    body: bytes
    submitter: bytes
    attempts: int = 0
    worker_uuid: str | None = None
    worker_id: int | None = None
    submitted: float
    started: float | None = None
    completed: float | None = None
    #: When the outcome reached the broker (``completed`` is when the worker finished).
    received: float | None = None
    #: When a job in ``retrying`` becomes due again.
    not_before: float | None = None
    result: bytes | None = None
    label: str | None = None
    error_type: str | None = None
    #: The name of the key that submitted it (``None``: a broker without keys).
    owner: str | None = None


#: The fields of a JobRecord that change after it is first written; ``queue``,
#: ``headers``, ``body``, ``submitter`` and ``submitted`` never do.
JOB_CHANGING_FIELDS = (
    "state",
    "attempts",
    "worker_uuid",
    "worker_id",
    "started",
    "completed",
    "received",
    "not_before",
    "result",
    "label",
    "error_type",
)


class WorkerRecord(msgspec.Struct, kw_only=True):
    uuid: str
    id: int
    queues: str
    registered: float
    last_seen: float
    active: bool = True


class ScheduleRecord(msgspec.Struct, kw_only=True):
    """A schedule and how far it has run; times in ms since the epoch unless noted."""

    id: str
    #: ``active``, ``unscheduled`` or ``finished`` (its run count is used up).
    state: str
    queue: str
    headers: str
    #: Seconds between ticks, or -1 for a cron schedule.
    interval: int
    cron: str
    body: bytes
    #: When it was scheduled or last redefined: its first tick and its interval grid.
    anchor: int
    #: The latest tick fired or skipped.
    last_tick: int | None = None
    #: The latest tick fired.
    last_run: int | None = None
    runs: int = 0
    #: The EventMQ scheduler that ran it, if one did.
    owner: str | None = None
    #: Seconds since the epoch.
    created: float
    updated: float


class Snapshot(msgspec.Struct, kw_only=True):
    """A store's content at start: unfinished jobs, the worker map, active schedules, counters."""

    jobs: list[JobRecord]
    workers: list[WorkerRecord]
    next_worker_id: int = 1
    #: Ids of the most recently submitted finished jobs, oldest first, so that a
    #: restarted broker still refuses a REQUEST that reuses one.
    finished_ids: list[str] = []
    schedules: list[ScheduleRecord] = []


class JobQuery(msgspec.Struct, kw_only=True):
    states: Sequence[str] = ()
    queue: str | None = None
    worker_id: int | None = None
    label: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100
    #: Only jobs of these owners (the submitter's key names); ``None``: everyone's.
    owners: Sequence[str] | None = None


class StoreError(RuntimeError):
    """The store cannot be opened or written; the message says why and what to do."""


class Store(Protocol):
    url: str

    def open(self, recent: int = 100_000) -> Snapshot:
        """Create or open the store and return what a (re)starting broker needs.

        ``recent`` bounds :attr:`Snapshot.finished_ids` (default 100,000).
        """

    def commit(
        self,
        jobs: Sequence[JobRecord],
        workers: Sequence[WorkerRecord],
        meta: dict[str, Any],
        schedules: Sequence[ScheduleRecord] = (),
        streams: Any = None,
        updates: Sequence[JobRecord] = (),
    ) -> None:
        """Write these records in one transaction (upserts by id / uuid).

        ``streams`` is a :class:`corral.store.streams.StreamBatch` for stores
        that keep job streams (they also have ``load_streams``/``get_stream``).
        ``updates`` are jobs whose full record an earlier commit wrote (or
        ``jobs`` of this one): only the fields a job's life changes need
        writing (:data:`JOB_CHANGING_FIELDS`); the others are as first written.
        """

    def get_job(self, job_id: str) -> JobRecord | None: ...

    def get_jobs(self, job_ids: Sequence[str]) -> list[JobRecord]:
        """The records of those of ``job_ids`` the store has, in no particular order."""

    def query_jobs(self, query: JobQuery) -> list[JobRecord]: ...

    def purge(self, finished_before: float, limit: int = 5000) -> int:
        """Delete up to ``limit`` finished jobs completed before this time; return how many.

        Called from the writer thread only, repeatedly until it returns less
        than ``limit``, so that commits go on between two batches.
        """

    def close(self) -> None: ...


def open_store(url: str, *, fsync: bool = False) -> Store:
    """``memory://`` or ``sqlite:///path/to/file.db`` (``sqlite:///:memory:`` too)."""
    if url in ("memory://", "memory:"):
        from corral.store.memory import MemoryStore

        return MemoryStore()
    if url.startswith("sqlite://"):
        from corral.store.sqlite import SQLiteStore

        path = url.removeprefix("sqlite://")
        path = path[1:] if path.startswith("/") else path
        return SQLiteStore(path or ":memory:", fsync=fsync)
    raise StoreError(f"unknown store {url!r}: use memory:// or sqlite:///PATH")
