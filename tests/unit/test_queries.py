"""Answers to QUERY ops: a client reads what it was just told, even before the store has it."""

from __future__ import annotations

import asyncio

from corral.broker.core import job_record
from corral.broker.server import BrokerServer
from corral.store.memory import MemoryStore
from tests.unit.test_broker_core import Harness


def _server(h: Harness) -> tuple[BrokerServer, MemoryStore]:
    store = MemoryStore()
    server = BrokerServer(h.core, frontend="", backend="", admin="", store=store)
    return server, store


def _commit(h: Harness, store: MemoryStore) -> None:
    store.commit(*h.core.take_changes())


def test_a_finished_job_reads_finished_before_its_commit():
    h = Harness()
    server, store = _server(h)
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit(headers="reply-requested,label:x")
    _commit(h, store)  # the store has it running
    h.reply(b"w1", job)  # finished: forwarded at once, not yet stored
    assert store.get_job(job).state == "running"

    async def ask():
        one = await server.queries.op_job(job)
        listed = await server.queries.op_jobs(state="succeeded", label="x")
        running = await server.queries.op_jobs(state="running")
        outcomes = await server.queries.op_outcomes([job])
        return one, listed, running, outcomes

    one, listed, running, outcomes = asyncio.run(ask())
    assert one["state"] == "succeeded" and one["result"] == 42
    assert [j["id"] for j in listed] == [job] and running == []
    assert outcomes == {"finished": {job: {"value": 42}}, "unknown": []}


def test_records_in_a_commit_that_has_not_landed_are_read_from_it():
    h = Harness()
    server, store = _server(h)
    job = h.submit(headers="reply-requested")
    jobs, _, _ = h.core.take_changes()  # taken for a commit still in the writer thread
    server._uncommitted.update((rec.id, rec) for rec in jobs)
    del h.core.jobs[job]  # as if it had finished since

    one = asyncio.run(server.queries.op_job(job))
    assert one["state"] == "queued"
    assert asyncio.run(server.queries.op_outcomes([job, "nope"])) == {
        "finished": {},
        "unknown": ["nope"],
    }


def test_outcomes_leave_out_unfinished_jobs():
    h = Harness()
    server, store = _server(h)
    job = h.submit()
    store.commit([job_record(h.core.jobs[job])], [], {})
    assert asyncio.run(server.queries.op_outcomes([job])) == {"finished": {}, "unknown": []}
