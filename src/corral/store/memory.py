"""A store that keeps everything in this process: for tests and throwaway brokers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from corral.store.base import JobQuery, JobRecord, ScheduleRecord, Snapshot, WorkerRecord
from corral.store.query import FINISHED_STATES, matches
from corral.store.streams import MemoryStreams, StreamBatch, StreamRecord


class MemoryStore:
    url = "memory://"

    def __init__(self) -> None:
        self.jobs: dict[str, JobRecord] = {}
        self.workers: dict[str, WorkerRecord] = {}
        self.meta: dict[str, Any] = {}
        self.schedules: dict[str, ScheduleRecord] = {}
        self.streams = MemoryStreams()

    def open(self, recent: int = 100_000) -> Snapshot:
        finished = [j.id for j in self.jobs.values() if j.state in FINISHED_STATES]
        return Snapshot(
            jobs=[j for j in self.jobs.values() if j.state not in FINISHED_STATES],
            workers=list(self.workers.values()),
            next_worker_id=int(self.meta.get("next_worker_id", 1)),
            finished_ids=finished[-recent:] if recent > 0 else [],
            schedules=[s for s in self.schedules.values() if s.state == "active"],
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
        for job in jobs:
            self.jobs[job.id] = job
        for job in updates:
            self.jobs[job.id] = job  # the whole record: its unchanging fields are the same
        for worker in workers:
            self.workers[worker.uuid] = worker
        self.meta.update(meta)
        for sched in schedules:
            self.schedules[sched.id] = sched
        if streams:
            self.streams.write(streams)

    def load_streams(self) -> tuple[list[StreamRecord], str | None]:
        return self.streams.load_open()

    def get_stream(self, name: str) -> StreamRecord | None:
        return self.streams.get(name)

    def get_job(self, job_id: str) -> JobRecord | None:
        return self.jobs.get(job_id)

    def get_jobs(self, job_ids: Sequence[str]) -> list[JobRecord]:
        return [self.jobs[j] for j in job_ids if j in self.jobs]

    def query_jobs(self, query: JobQuery) -> list[JobRecord]:
        found = [j for j in self.jobs.values() if matches(j, query)]
        found.sort(key=lambda j: j.submitted, reverse=True)
        return found[: query.limit]

    def purge(self, finished_before: float, limit: int = 5000) -> int:
        old = [
            j.id
            for j in self.jobs.values()
            if j.state in FINISHED_STATES and (j.completed or j.submitted) < finished_before
        ][:limit]
        for job_id in old:
            del self.jobs[job_id]
            self.streams.streams.pop(job_id, None)
        return len(old)

    def close(self) -> None:
        pass
