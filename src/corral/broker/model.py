"""The broker's domain objects: jobs, workers, schedulers and named queues."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum

from corral.protocol import Headers
from corral.security.principal import TRUSTED, Principal


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    RETRYING = "retrying"
    CANCELLED = "cancelled"
    DEAD = "dead"


def peer_name(identity: bytes) -> str:
    """A printable name for a ZeroMQ identity, which may be any bytes."""
    return identity.decode("utf-8", "backslashreplace")


@dataclass(slots=True, eq=False)
class Job:
    id: str
    queue: str
    headers: Headers
    #: The REQUEST frames after MSGID: queue, headers, body -- forwarded as sent.
    frames: list[bytes]
    submitter: bytes
    submitted: float
    state: JobState = JobState.QUEUED
    attempts: int = 0
    worker: Worker | None = None
    #: Monotonic times, for latency figures.
    started: float | None = None
    completed: float | None = None
    #: The last worker that ran it (kept after it finished or was lost).
    worker_uuid: str | None = None
    worker_id: int | None = None
    #: Wall-clock times (seconds since the epoch), as recorded in the store.
    submitted_at: float = 0.0
    started_at: float | None = None
    completed_at: float | None = None
    received_at: float | None = None
    #: Monotonic time before which a job in ``retrying`` is not run again.
    not_before: float | None = None
    label: str | None = None
    result: bytes | None = None
    error_type: str | None = None
    #: Ids of the jobs it waits for (``after:ID`` headers) that have not succeeded
    #: yet; ``None`` once it may run.
    waiting_on: set[str] | None = None
    #: Its record went to the store in full once: later writes carry only what changes.
    written: bool = False
    #: The name of the principal (key) that submitted it; ``None`` without keys.
    owner: str | None = None


@dataclass(slots=True, eq=False)
class Worker:
    identity: bytes
    queues: tuple[tuple[int, str], ...]
    last_seen: float
    #: The integer id the broker gave this uuid; never reused.
    id: int = 0
    slots: int = 0
    #: A corral worker (it sent corral's INFORM meta); EventMQ job managers
    #: reply only when asked to, so the broker always asks them.
    corral: bool = False
    running: dict[str, Job] = field(default_factory=dict)
    #: It said it is leaving: no more jobs for it; it finishes those it has.
    draining: bool = False
    #: Jobs this worker was told to ABORT: their (cancelled) outcomes are not the job's.
    aborted: set[str] = field(default_factory=set)
    processed: int = 0
    #: Monotonic time it (last) registered, i.e. sent INFORM.
    registered: float = 0.0
    #: Processes it runs jobs in (a corral worker's INFORM says); 0: unknown, and
    #: then every slot counts as a process. Slots beyond it are prefetch.
    concurrency: int = 0
    #: The key it registered with: every later message from its identity must carry it.
    principal: Principal = TRUSTED

    @property
    def idle_processes(self) -> int:
        """Processes that would start a job sent now (slots if it did not say)."""
        if not self.concurrency:
            return self.slots
        return min(self.slots, self.concurrency - len(self.running))

    @property
    def name(self) -> str:
        return peer_name(self.identity)


@dataclass(slots=True, eq=False)
class Scheduler:
    identity: bytes
    last_seen: float
    #: A corral scheduler process (it names its ticks); else an EventMQ scheduler.
    corral: bool = False
    #: The key it registered with (see Worker.principal).
    principal: Principal = TRUSTED

    @property
    def name(self) -> str:
        return peer_name(self.identity)


@dataclass(slots=True, eq=False)
class Queue:
    """A named queue: its waiting jobs and the workers serving it, by weight.

    ``levels`` holds one rotating deque of workers per weight, highest weight
    first, so dispatch tries heavier workers first and rotates among equals.
    ``ready`` counts the workers of this queue that have a free slot, so a
    REQUEST for a queue with no free worker is queued without a scan.
    """

    name: str
    waiting: deque[Job] = field(default_factory=deque)
    levels: list[tuple[int, deque[Worker]]] = field(default_factory=list)
    ready: int = 0
    processed: int = 0
    last_latency_ms: float = 0.0
    max_latency_ms: float = 0.0

    def add(self, weight: int, worker: Worker) -> None:
        for w, members in self.levels:
            if w == weight:
                members.append(worker)
                break
        else:
            self.levels.append((weight, deque([worker])))
            self.levels.sort(key=lambda level: -level[0])
        if worker.slots > 0:
            self.ready += 1

    def remove(self, worker: Worker) -> None:
        for level in self.levels:
            if worker in level[1]:
                level[1].remove(worker)
                if worker.slots > 0:
                    self.ready -= 1
        self.levels = [level for level in self.levels if level[1]]

    def pick(self) -> Worker | None:
        """The highest-weight worker with a free slot, round-robin among equals.

        A worker with an idle process comes before one whose free slots are all
        prefetch (the job would wait there behind a running one).
        """
        if not self.ready:
            return None
        prefetch = None
        for _, members in self.levels:
            for _ in range(len(members)):
                worker = members[0]
                members.rotate(-1)
                if worker.slots > 0:
                    if worker.idle_processes > 0:
                        return worker
                    if prefetch is None:
                        prefetch = worker
        return prefetch

    @property
    def worker_count(self) -> int:
        return sum(len(members) for _, members in self.levels)
