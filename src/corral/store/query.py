"""Job-query semantics shared by the stores (the SQL store mirrors them in SQL)."""

from __future__ import annotations

from corral.store.base import JobQuery, JobRecord

FINISHED_STATES = frozenset({"succeeded", "failed", "cancelled", "dead"})


def matches(job: JobRecord, q: JobQuery) -> bool:
    return (
        (not q.states or job.state in q.states)
        and (q.queue is None or job.queue == q.queue)
        and (q.worker_id is None or job.worker_id == q.worker_id)
        and (q.label is None or job.label == q.label)
        and (q.since is None or job.submitted >= q.since)
        and (q.until is None or job.submitted < q.until)
        and (q.owners is None or job.owner in q.owners)
    )
