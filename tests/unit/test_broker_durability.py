"""Job records, retries, worker ids and restore, on the sans-IO core."""

from __future__ import annotations

import json

from corral.broker.model import JobState
from corral.store import JobRecord, Snapshot, StoreError, WorkerRecord
from corral.store.memory import MemoryStore
from corral.store.sqlite import SQLiteStore
from tests.unit.test_broker_core import BODY, Harness
from tests.unit.test_queries import _server

FAIL = b'{"error": {"type": "ValueError", "message": "no", "traceback": ""}}'


def records(h):
    jobs, workers, meta = h.core.take_changes()
    return {j.id: j for j in jobs}, {w.uuid: w for w in workers}, meta


def test_job_record_lifecycle():
    h = Harness()
    h.core.wall_offset = 1_000_000.0
    job = h.submit(headers="reply-requested,label:nightly")
    jobs, _, _ = records(h)
    assert jobs[job].state == "queued" and jobs[job].label == "nightly"
    assert jobs[job].submitted == h.now + 1_000_000.0
    h.inform(b"w1")
    h.ready(b"w1")
    jobs, workers, meta = records(h)
    assert jobs[job].state == "running" and jobs[job].worker_uuid == "w1"
    assert jobs[job].worker_id == 1 and jobs[job].attempts == 1
    assert workers["w1"].id == 1 and meta == {"next_worker_id": 2}
    h.now += 1
    h.reply(b"w1", job)
    jobs, _, _ = records(h)
    assert jobs[job].state == "succeeded" and json.loads(jobs[job].result) == {"value": 42}
    assert jobs[job].completed == h.now + 1_000_000.0


def test_retry_with_backoff_then_dead():
    h = Harness(retry_backoff_base=1.0, retry_backoff_cap=10.0, seed=1)
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit(headers="reply-requested,retry-count:2")
    h.sent()
    delays = []
    for _ in range(2):
        h.reply(b"w1", job, FAIL)
        assert h.core.jobs[job].state is JobState.RETRYING
        assert not [m for d, i, m in h.sent() if m.command.value == "REPLY"]
        due = h.core.jobs[job].not_before
        delays.append(due - h.now)
        h.ready(b"w1")
        h.core.tick(due - 0.01)
        assert h.dispatched(h.sent()) == []
        h.now = due
        h.core.tick(h.now)
        assert h.dispatched(h.sent()) == [(b"w1", job)]
    assert 0.5 <= delays[0] <= 1.0 and 1.0 <= delays[1] <= 2.0
    h.reply(b"w1", job, FAIL)
    out = [m for d, i, m in h.sent() if m.command.value == "REPLY"]
    assert json.loads(out[0].result)["error"]["type"] == "ValueError"
    jobs, _, _ = records(h)
    assert jobs[job].state == "dead" and jobs[job].attempts == 3


def test_failure_without_retries_is_failed_not_dead():
    h = Harness()
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit()
    h.reply(b"w1", job, FAIL)
    assert records(h)[0][job].state == "failed"


def test_not_allowed_is_never_retried():
    h = Harness()
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit(headers="reply-requested,retry-count:5")
    h.reply(b"w1", job, b'{"error": {"type": "NotAllowed", "message": "x"}}')
    assert job not in h.core.jobs


def test_worker_ids_stable_and_never_reused():
    h = Harness()
    h.inform(b"a")
    h.inform(b"b")
    h.core.on_backend(b"a", [b"", b"eMQP/1.0", b"KBYE", b"k"], h.now)
    h.inform(b"c")
    h.inform(b"a")
    ids = {w.name: w.id for w in h.core.workers.values()}
    assert ids == {"a": 1, "b": 2, "c": 3}
    topics = [t for t, _ in h.core.notifications]
    assert topics == ["registered", "registered", "unregistered", "registered", "registered"]
    assert h.core.notifications[0][1] == {"id": 1, "uuid": "a", "queues": [[10, "default"]]}


def _job(id_, state, worker=None, **kw):
    kw.setdefault("headers", "reply-requested")
    kw.setdefault("body", b"[]")
    if state == "running":
        kw.setdefault("started", 1.5)  # a prefetched job has none
    return JobRecord(
        id=id_,
        queue="default",
        state=state,
        submitter=b"c",
        submitted=1.0,
        worker_uuid=worker,
        **kw,
    )


def test_restore_requeues_and_awaits_workers():
    snap = Snapshot(
        jobs=[
            _job("q1", "queued"),
            _job("r1", "running", "w1", attempts=1),
            _job("r2", "running", "w1", attempts=1),
            _job("g1", "retrying", attempts=1),
            _job("x", "running", "gone", attempts=1),
        ],
        workers=[WorkerRecord(uuid="w1", id=7, queues="[]", registered=0, last_seen=0)],
        next_worker_id=9,
    )
    h = Harness(heartbeat_interval=1.0, heartbeat_liveness=3)
    h.core.restore(snap, h.now)
    assert [j.id for j in h.core.queues["default"].waiting] == ["q1"]
    assert set(h.core.orphans) == {"w1", "gone"}
    # w1 comes back holding r1 only: keeps r1, r2 is lost (failed: no guarantee).
    h.inform(b"w1", meta={"running": ["r1"]})
    assert h.core.workers[b"w1"].id == 7
    assert "r1" in h.core.workers[b"w1"].running
    assert "r2" not in h.core.jobs
    # The result of a restored job is accepted.
    h.reply(b"w1", "r1")
    assert "r1" not in h.core.jobs
    # "gone" never comes back: its job is given up after the grace period.
    h.inform(b"w9")
    assert h.core.workers[b"w9"].id == 9
    h.now += 3.5
    h.core.tick(h.now)
    assert "x" not in h.core.jobs and not h.core.orphans
    h.core.tick(h.now)  # the retrying job was due at once
    assert h.core.jobs["g1"].state in (JobState.QUEUED, JobState.RUNNING)
    assert h.core.jobs["q1"].state in (JobState.QUEUED, JobState.RUNNING)


def test_a_restored_prefetched_job_whose_worker_does_not_return_runs_again():
    snap = Snapshot(jobs=[_job("p1", "running", "w1", attempts=1, started=None)], workers=[])
    h = Harness(restore_grace=1.0)
    h.core.restore(snap, h.now)
    h.now += 2
    h.core.tick(h.now)  # w1 never came back; p1 had not started there
    assert [j.id for j in h.core.queues["default"].waiting] == ["p1"]
    assert h.core.jobs["p1"].attempts == 0


def test_an_outcome_kept_over_a_restart_is_recorded_once_its_worker_is_back():
    snap = Snapshot(jobs=[_job("r1", "running", "w1", attempts=1)], workers=[])
    h = Harness()
    h.core.restore(snap, h.now)
    h.reply(b"w1", "r1")  # before it registers again: not a worker of ours yet
    assert h.core.jobs["r1"].state is JobState.RUNNING
    assert h.core.stats.forged_outcomes == 1
    # It registers again, naming the outcome it will re-send, and re-sends it.
    h.inform(b"w1", meta={"running": [], "outcomes": ["r1"]})
    h.reply(b"w1", "r1")
    h.now += 100
    h.core.tick(h.now)
    jobs, _, _ = records(h)
    assert jobs["r1"].state == "succeeded"
    assert h.core.stats.requeued == 0


def test_guaranteed_orphan_requeued():
    snap = Snapshot(jobs=[_job("r1", "running", "w1", attempts=1, headers="guarantee")], workers=[])
    h = Harness(restore_grace=1.0)
    h.core.restore(snap, h.now)
    h.now += 2
    h.core.tick(h.now)
    assert [j.id for j in h.core.queues["default"].waiting] == ["r1"]


def test_retry_puts_dead_job_back():
    h = Harness()
    rec = _job("d1", "dead", attempts=3, result=FAIL, error_type="ValueError")
    assert h.core.retry(rec, h.now)
    assert h.core.jobs["d1"].attempts == 0
    assert not h.core.retry(_job("s", "succeeded"), h.now)


def test_duplicate_of_finished_job_refused():
    h = Harness()
    h.inform(b"w1")
    h.ready(b"w1")
    h.submit(msgid="tick-1")
    h.reply(b"w1", "tick-1")
    h.sent()
    h.submit(msgid="tick-1")
    assert [m.command.value for _, _, m in h.sent()] == ["ERROR"]


def test_restored_broker_refuses_a_finished_jobs_id():
    h = Harness()
    h.core.restore(Snapshot(jobs=[], workers=[], finished_ids=["tick-1"]), h.now)
    h.submit(msgid="tick-1")
    out = h.sent()
    assert [m.command.value for _, _, m in out] == ["ERROR"] and out[0][2].reason == "duplicate-id"
    assert "tick-1" not in h.core.jobs


def test_memory_store_round_trip():
    store = MemoryStore()
    h = Harness()
    h.core.wall_offset = 0.0
    h.submit(msgid="a")
    store.commit(*h.core.take_changes())
    snap = store.open()
    assert [j.id for j in snap.jobs] == ["a"]


def test_outcome_for_a_restored_queued_job_takes_it_out_of_its_queue():
    # The broker died after the job ran but before its dispatch was stored.
    h = Harness()
    h.core.restore(Snapshot(jobs=[_job("q1", "queued")], workers=[]), h.now)
    h.inform(b"w1", meta={"running": [], "outcomes": ["q1"]})
    assert not h.core.queues["default"].waiting
    h.reply(b"w1", "q1")  # the worker re-sends the outcome it kept
    h.ready(b"w1")
    assert h.dispatched(h.sent()) == []
    jobs, _, _ = records(h)
    assert jobs["q1"].state == "succeeded"


def test_late_failure_of_a_lost_worker_waits_out_its_backoff_not_in_the_queue():
    h = Harness(heartbeat_interval=1.0, heartbeat_liveness=3, retry_backoff_base=5.0)
    h.inform(b"w1", meta={"running": []})
    h.ready(b"w1")
    job = h.submit(headers="reply-requested,retry-count:2")
    h.sent()
    h.now += 4
    h.core.tick(h.now)  # w1 went silent: its job is queued again (retries left)
    assert [j.id for j in h.core.queues["default"].waiting] == [job]
    h.reply(b"w1", job, FAIL)  # its failure, while it is not registered: refused
    assert h.core.jobs[job].state is JobState.QUEUED
    # It registers again naming the outcome it kept, and re-sends it.
    h.inform(b"w1", meta={"running": [], "outcomes": [job]})
    h.reply(b"w1", job, FAIL)
    assert h.core.jobs[job].state is JobState.RETRYING
    assert list(h.core.queues["default"].waiting) == []
    h.inform(b"w2", meta={"running": []})
    h.ready(b"w2")
    assert h.dispatched(h.sent()) == []  # the backoff first
    assert h.core.cancel(job, h.now) == "retrying"
    h.now += 60
    h.core.tick(h.now)
    assert h.dispatched(h.sent()) == [] and job not in h.core.jobs


def test_a_duplicate_refusal_is_held_while_the_job_is_unstored():
    # A client re-sending a job takes "duplicate-id" as its acknowledgement.
    h = Harness()
    job = h.submit()
    h.submit(msgid=job)
    assert h.core.outbox == []
    assert [f[2] for _, _, f in h.core.acks] == [b"REPLY", b"ERROR"]
    h.sent()  # committed and sent
    h.submit(msgid=job)  # stored by now: refused at once
    assert [f[2] for _, _, f in h.core.outbox] == [b"ERROR"] and h.core.acks == []


def test_restored_retrying_job_keeps_its_backoff():
    h = Harness(heartbeat_interval=100.0)
    h.core.wall_offset = 1_000_000.0
    due_wall = h.now + h.core.wall_offset + 100.0
    rec = _job("g1", "retrying", attempts=1, body=BODY)
    rec.not_before = due_wall
    h.core.restore(Snapshot(jobs=[rec], workers=[]), h.now)
    h.inform(b"w1")
    h.ready(b"w1")
    h.core.tick(h.now + 99)
    assert h.dispatched(h.sent()) == []
    h.core.tick(h.now + 100)
    assert h.dispatched(h.sent()) == [(b"w1", "g1")]


def test_a_worker_record_keeps_its_registration_time_and_a_corral_worker_hears_its_id():
    h = Harness()
    h.inform(b"w1", meta={"running": []})
    ack = [m for _, _, m in h.sent() if m.command.value == "ACK"][0]
    assert ack.meta["id"] == 1
    registered = h.now
    h.now += 50
    h.ready(b"w1")
    h.core.dirty_workers["w1"] = h.core.workers[b"w1"]
    _, workers, _ = records(h)
    assert workers["w1"].registered == registered


def _failing_store(path, fail_on: int) -> SQLiteStore:
    """A SQLite store whose ``fail_on``-th commit fails (as a full disk would)."""

    class FailsOnce(SQLiteStore):
        calls = 0

        def commit(self, *args, **kwargs):
            self.calls += 1
            if self.calls == fail_on:
                raise StoreError("disk full")
            super().commit(*args, **kwargs)

    store = FailsOnce(str(path))
    store.open()
    return store


def test_a_failed_commit_is_written_again_before_the_updates_that_follow_it(tmp_path):
    store = _failing_store(tmp_path / "b.db", fail_on=1)
    h = Harness()
    server, _ = _server(h, store)
    job = h.submit(headers="reply-requested,label:x")
    server._commit(sync=True)  # the job's first, full record: not written
    assert server.commit_failures == 1 and store.get_job(job) is None
    h.inform(b"w1")
    h.ready(b"w1")
    h.reply(b"w1", job)  # dispatched and finished: updates of a record never stored
    server._commit(sync=True)
    got = store.get_job(job)
    assert (got.state, got.label, got.body, got.worker_uuid) == ("succeeded", "x", BODY, "w1")
    store.close()


def test_a_failed_update_does_not_follow_a_new_job_under_the_same_id(tmp_path):
    store = _failing_store(tmp_path / "b.db", fail_on=2)
    h = Harness()
    server, _ = _server(h, store)
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit(headers="reply-requested")
    server._commit(sync=True)
    h.reply(b"w1", job)
    server._commit(sync=True)  # its "succeeded" update fails and waits
    assert server.commit_failures == 1
    h.core._recent.clear()  # forgotten: the id may be used again
    h.submit(headers="label:again", msgid=job)
    server._commit(sync=True)
    got = store.get_job(job)
    assert (got.state, got.label, got.result) == ("queued", "again", None)
    store.close()
