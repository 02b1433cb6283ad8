"""Cancelling, waiting for other jobs (``after:``) and listening to any job, on the core."""

from __future__ import annotations

import json

from corral.broker.core import Dest
from corral.store import Snapshot
from tests.unit.test_broker_core import CORRAL, Harness, aborts, outcomes

FAIL = b'{"error": {"type": "ValueError", "message": "no", "traceback": ""}}'


def errors(messages):
    return {m.ref: json.loads(m.result)["error"]["type"] for m in outcomes(messages)}


def test_cancel_a_queued_job():
    h = Harness()
    job = h.submit()
    h.sent()
    assert h.core.cancel(job, h.now) == "queued"
    assert errors(h.sent()) == {job: "JobCancelled"}
    assert not h.core.queues["default"].waiting
    h.inform(b"w1")
    h.ready(b"w1")
    assert h.dispatched(h.sent()) == []
    jobs, _, _ = h.core.take_changes()
    assert {j.id: j.state for j in jobs}[job] == "cancelled"


def test_cancel_a_running_job_aborts_it_on_its_worker():
    h = Harness()
    h.inform(b"w1", meta=CORRAL)
    h.ready(b"w1")
    job = h.submit()
    h.sent()
    assert h.core.cancel(job, h.now) == "running"
    out = h.sent()
    assert aborts(out) == [(b"w1", job)] and errors(out) == {job: "JobCancelled"}
    # The worker answers the ABORT with its own JobCancelled outcome: not recorded twice.
    h.reply(b"w1", job, b'{"error": {"type": "JobCancelled", "message": "killed"}}')
    assert outcomes(h.sent()) == [] and h.core.stats.completed == 1


def test_cancel_a_finished_or_unknown_job_does_nothing():
    h = Harness()
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit()
    h.reply(b"w1", job)
    assert h.core.cancel(job, h.now) is None and h.core.cancel("nope", h.now) is None


def test_cancel_a_retrying_job():
    h = Harness()
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit(headers="reply-requested,retry-count:3")
    h.reply(b"w1", job, FAIL)
    h.sent()
    assert h.core.cancel(job, h.now) == "retrying"
    assert errors(h.sent()) == {job: "JobCancelled"}
    h.ready(b"w1")
    h.core.tick(h.now + 1000)
    assert h.dispatched(h.sent()) == []


def test_a_job_runs_after_the_jobs_it_waits_for_succeed():
    h = Harness()
    first, second = h.submit(), h.submit()
    child = h.submit(headers=f"reply-requested,after:{first},after:{second}")
    h.inform(b"w1")
    h.ready(b"w1", 3)
    assert sorted(i for _, i in h.dispatched(h.sent())) == sorted([first, second])
    assert h.core.jobs[child].state.value == "queued"
    h.reply(b"w1", first)
    assert h.dispatched(h.sent()) == []
    h.reply(b"w1", second)
    assert h.dispatched(h.sent()) == [(b"w1", child)]


def test_a_failed_dependency_fails_the_whole_chain_at_once():
    h = Harness()
    h.inform(b"w1")
    h.ready(b"w1")
    root = h.submit()
    chain = [root]
    for _ in range(2000):  # deeper than Python's recursion limit
        chain.append(h.submit(headers=f"reply-requested,after:{chain[-1]}"))
    h.sent()
    h.reply(b"w1", root, FAIL)
    failed = errors(h.sent())
    assert failed[root] == "ValueError" and len(failed) == len(chain)
    assert {failed[j] for j in chain[1:]} == {"DependencyFailed"}
    assert not h.core.jobs and not h.core.dependents


def test_waiting_for_a_job_that_ended_or_never_was():
    h = Harness()
    h.inform(b"w1")
    h.ready(b"w1", 2)
    ok = h.submit()
    bad = h.submit()
    h.reply(b"w1", ok)
    h.reply(b"w1", bad, FAIL)
    h.sent()
    runs = h.submit(headers=f"reply-requested,after:{ok}")
    fails = h.submit(headers=f"reply-requested,after:{bad}")
    out = h.sent()
    assert errors(out) == {fails: "DependencyFailed"}
    h.ready(b"w1")
    assert h.dispatched(h.sent()) == [(b"w1", runs)]
    # Not remembered: the shell is asked to look it up in the store.
    old = h.submit(headers="reply-requested,after:long-ago")
    ghost = h.submit(headers="reply-requested,after:never-was")
    assert h.core.lookups == ["long-ago", "never-was"]
    h.core.resolve_dependency("long-ago", "succeeded", h.now)
    h.core.resolve_dependency("never-was", None, h.now)
    out = h.sent()
    assert errors(out) == {ghost: "DependencyFailed"}
    assert "no such job" in json.loads(outcomes(out)[0].result)["error"]["message"]
    h.ready(b"w1")
    assert h.dispatched(h.sent()) == [(b"w1", old)]


def test_a_job_may_not_wait_for_itself():
    h = Harness()
    h.submit(msgid="me", headers="reply-requested,after:me")
    out = h.sent()
    assert [m.reason for _, _, m in out] == ["bad-header"] and "me" not in h.core.jobs


def test_cancelling_a_dependency_fails_its_dependents():
    h = Harness()
    dep = h.submit()
    child = h.submit(headers=f"reply-requested,after:{dep}")
    h.core.cancel(dep, h.now)
    assert errors(h.sent()) == {dep: "JobCancelled", child: "DependencyFailed"}


def test_restored_dependents_wait_again():
    h = Harness()
    dep = h.submit()
    child = h.submit(headers=f"reply-requested,after:{dep}")
    jobs, _, _ = h.core.take_changes()
    h2 = Harness()
    h2.core.restore(Snapshot(jobs=jobs, workers=[]), h2.now)
    assert [j.id for j in h2.core.queues["default"].waiting] == [dep]
    h2.inform(b"w1")
    h2.ready(b"w1", 2)
    assert h2.dispatched(h2.sent()) == [(b"w1", dep)]
    h2.reply(b"w1", dep)
    assert h2.dispatched(h2.sent()) == [(b"w1", child)]


def test_listeners_get_the_outcome_too():
    h = Harness()
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit(client=b"submitter")
    assert h.core.listen(job, b"watcher") and h.core.listen(job, b"submitter")
    h.sent()
    h.reply(b"w1", job)
    got = sorted(i for d, i, m in h.sent() if d is Dest.FRONTEND and m.result)
    assert got == [b"submitter", b"watcher"]  # the submitter once
    assert not h.core.listen(job, b"late")
