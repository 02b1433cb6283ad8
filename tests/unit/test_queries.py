"""Answers to QUERY ops: a client reads what it was just told, even before the store has it."""

from __future__ import annotations

import asyncio
import tempfile
from typing import Any

import pytest

from corral.broker.core import job_record
from corral.broker.queries import QueryError
from corral.broker.server import BrokerServer
from corral.store.memory import MemoryStore
from tests.unit.test_broker_core import Harness


def _server(h: Harness, store: Any = None) -> tuple[BrokerServer, Any]:
    """A broker server around the harness's core, on no sockets (a memory store by default)."""
    store = store if store is not None else MemoryStore()
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


def test_purge_deletes_in_batches_and_only_old_finished_jobs(monkeypatch):
    import time

    import corral.broker.server as server_mod
    from corral.store import JobRecord

    monkeypatch.setattr(server_mod, "PURGE_BATCH", 2)
    h = Harness()
    server, store = _server(h)
    old = time.time() - 3600

    def rec(i, state, completed):
        return JobRecord(
            id=f"j{i}",
            queue="q",
            state=state,
            headers="",
            body=b"[]",
            submitter=b"c",
            submitted=old,
            completed=completed,
        )

    store.commit(
        [rec(i, "succeeded", old) for i in range(5)]
        + [rec(5, "queued", None), rec(6, "failed", time.time())],
        [],
        {},
    )
    assert asyncio.run(server.queries.op_purge(60)) == {"purged": 5}
    assert sorted(store.jobs) == ["j5", "j6"]


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "params",
    [
        {"state": {"a": 1}},
        {"state": ["queued", 3]},
        {"state": "sleeping"},
        {"limit": True},
        {"limit": 0},
        {"queue": 5},
        {"worker_id": "1"},
        {"since": "yesterday"},
    ],
)
def test_job_lists_refuse_wrong_types(params):
    h = Harness()
    server, _ = _server(h)
    with pytest.raises(QueryError) as info:
        asyncio.run(server.queries.op_jobs(**params))
    assert info.value.type == "BadRequest"


from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from corral.protocol import Query, new_msgid, parse  # noqa: E402
from corral.store import Store, open_store  # noqa: E402

#: One store per kind for all examples (hypothesis runs many in one test call).
_stores: dict[str, Store] = {}

_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=6,
)


@settings(max_examples=300, deadline=None)
@given(
    op=st.sampled_from(["job", "jobs", "outcomes", "cancel", "retry", "purge", "workers", "x"]),
    params=st.dictionaries(
        st.sampled_from(["id", "ids", "state", "limit", "listen", "older_than", "queue", "zz"]),
        _json_values,
        max_size=3,
    ),
)
@pytest.mark.parametrize("kind", ["memory", "sqlite"])
def test_any_query_gets_one_answer_and_never_an_exception(kind, op, params):
    h = Harness()
    store = _stores.get(kind)
    if store is None:
        url = "memory://" if kind == "memory" else f"sqlite:///{tempfile.mkdtemp()}/q.db"
        store = _stores[kind] = open_store(url)
        store.open()
    server = BrokerServer(h.core, frontend="", backend="", admin="", store=store)
    sent = []
    server.queries.send = sent.extend
    query = Query(new_msgid(), op, params)

    async def run():
        server.queries.handle(b"client", query)
        for _ in range(20):  # let the query's task finish
            await asyncio.sleep(0)

    asyncio.run(run())
    assert len(sent) == 1
    dest, identity, frames = sent[0]
    answer = parse(frames)
    assert identity == b"client" and answer.ref == query.msgid and answer.result is not None
    outcome = answer.outcome()
    assert outcome.error is None or outcome.error.type in (
        "BadRequest",
        "NotFound",
        "NotRetryable",
        "NotAvailable",
    )


def test_a_job_that_ends_while_its_outcome_is_looked_up_is_answered_finished():
    # The store read runs in another thread; a job can end meanwhile, too late to be
    # listened to. Its outcome must then be in the answer, or the caller waits forever.
    h = Harness()
    server, store = _server(h)
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit(headers="reply-requested")
    h.sent()
    queries = server.queries
    read = queries.run_in_thread

    async def read_while_the_job_ends(fn, *args):
        if job in h.core.jobs:
            h.reply(b"w1", job)
        return await read(fn, *args)

    queries.run_in_thread = read_while_the_job_ends
    answer = asyncio.run(queries.op_outcomes([job], listen=True))
    assert answer == {"finished": {job: {"value": 42}}, "unknown": []}
