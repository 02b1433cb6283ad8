"""The broker's decisions, tested on the sans-IO core: no sockets, no clock."""

from __future__ import annotations

import json

import pytest

from corral.broker.core import BrokerConfig, BrokerCore, Dest
from corral.protocol import (
    PROTOCOL,
    Inform,
    Kbye,
    RunParams,
    encode_body,
    new_msgid,
    parse,
)
from corral.store import JobRecord, Snapshot

BODY = encode_body(RunParams("pkg.mod", "fn"))


class Harness:
    def __init__(self, **config):
        self.core = BrokerCore(BrokerConfig(**config))
        self.now = 1000.0

    def sent(self):
        # As the shell does: the acknowledgements once stored, then what they released.
        acks = self.core.take_acks()
        self.core.released(acks)
        out = acks + self.core.outbox
        self.core.outbox = []
        return [(dest, ident, parse(frames)) for dest, ident, frames in out]

    def submit(self, client=b"client", queue="default", headers="reply-requested", msgid=None):
        msgid = msgid or new_msgid()
        self.core.on_frontend(
            client,
            [b"", PROTOCOL, b"REQUEST", msgid.encode(), queue.encode(), headers.encode(), BODY],
            self.now,
        )
        return msgid

    def inform(self, ident, queues=((10, "default"),), meta=None):
        self.core.on_backend(
            ident, Inform(new_msgid(), queues, "worker", meta).to_frames(), self.now
        )

    def ready(self, ident, n=1):
        for _ in range(n):
            self.core.on_backend(ident, [b"", PROTOCOL, b"READY", b"r"], self.now)

    def reply(self, ident, job_id, result=b'{"value": 42}'):
        self.core.on_backend(
            ident, [b"", PROTOCOL, b"REPLY", b"x", result, job_id.encode()], self.now
        )

    def dispatched(self, messages):
        return [
            (ident, m.msgid)
            for dest, ident, m in messages
            if dest is Dest.BACKEND and m.command.value == "REQUEST"
        ]


@pytest.fixture
def h():
    return Harness()


def test_request_is_acknowledged_at_once_even_without_workers(h):
    job = h.submit()
    out = h.sent()
    acks = [m for d, i, m in out if d is Dest.FRONTEND and m.command.value == "REPLY"]
    assert len(acks) == 1 and acks[0].ref == job and acks[0].result is None
    assert h.core.queues["default"].waiting[0].id == job


def test_inform_gets_ack_and_heartbeat(h):
    h.inform(b"w1")
    out = h.sent()
    assert [m.command.value for _, _, m in out] == ["ACK", "HEARTBEAT"]


def test_dispatch_on_ready_and_result_forwarded(h):
    h.inform(b"w1")
    h.sent()
    h.ready(b"w1")
    job = h.submit()
    out = h.sent()
    assert h.dispatched(out) == [(b"w1", job)]
    forwarded = [m for d, i, m in out if d is Dest.BACKEND][0]
    assert forwarded.msgid == job  # the client's MSGID is kept
    h.reply(b"w1", job)
    out = h.sent()
    results = [m for d, i, m in out if d is Dest.FRONTEND]
    assert len(results) == 1 and results[0].ref == job
    assert json.loads(results[0].result) == {"value": 42}
    assert job not in h.core.jobs


def test_no_reply_forwarded_without_reply_requested(h):
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit(headers="")
    h.sent()
    h.reply(b"w1", job)
    assert [m for d, i, m in h.sent() if d is Dest.FRONTEND] == []


def test_waiting_jobs_fifo_per_queue_on_ready(h):
    jobs = [h.submit() for _ in range(3)]
    h.inform(b"w1")
    h.sent()
    for expected in jobs:
        h.ready(b"w1")
        assert h.dispatched(h.sent()) == [(b"w1", expected)]


def test_requests_never_rerouted_to_another_queue(h):
    h.inform(b"w1", queues=((10, "default"),))
    h.ready(b"w1")
    job = h.submit(queue="other")
    assert h.dispatched(h.sent()) == []
    assert [j.id for j in h.core.queues["other"].waiting] == [job]


def test_highest_weight_first_then_round_robin(h):
    h.inform(b"heavy", queues=((20, "default"),))
    h.inform(b"a", queues=((10, "default"),))
    h.inform(b"b", queues=((10, "default"),))
    for w in (b"heavy", b"a", b"b"):
        h.ready(w, 2)
    h.sent()
    got = []
    for _ in range(6):
        h.submit()
        got += [ident for ident, _ in h.dispatched(h.sent())]
    assert got[:2] == [b"heavy", b"heavy"]
    assert sorted(got[2:4]) == [b"a", b"b"] and got[2] != got[3]


def test_ready_walks_worker_queues_in_inform_order(h):
    low = h.submit(queue="low")
    high = h.submit(queue="high")
    h.inform(b"w", queues=((20, "high"), (5, "low")))
    h.sent()
    h.ready(b"w")
    assert h.dispatched(h.sent()) == [(b"w", high)]
    h.ready(b"w")
    assert h.dispatched(h.sent()) == [(b"w", low)]


def test_inform_without_queues_gets_default(h):
    h.core.on_backend(b"emq", [b"", PROTOCOL, b"INFORM", b"i", b"", b"worker"], h.now)
    assert h.core.workers[b"emq"].queues == ((10, "default"),)


def test_dead_worker_removed_after_missed_heartbeats():
    h = Harness(heartbeat_interval=1.0, heartbeat_liveness=3)
    h.inform(b"w1")
    h.ready(b"w1")
    h.core.tick(h.now)
    h.now += 2.5
    h.core.tick(h.now)
    assert b"w1" in h.core.workers
    h.now += 1.0
    h.core.tick(h.now)
    assert b"w1" not in h.core.workers
    assert h.core.queues["default"].ready == 0


def test_heartbeats_sent_each_interval():
    h = Harness(heartbeat_interval=1.0)
    h.inform(b"w1")
    h.sent()
    h.core.tick(h.now)
    assert [m.command.value for _, _, m in h.sent()] == ["HEARTBEAT"]
    h.now += 0.5
    h.core.tick(h.now)
    assert h.sent() == []


def test_lost_worker_job_without_guarantee_fails_with_worker_lost(h):
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit()
    h.sent()
    h.core.on_backend(b"w1", [b"", PROTOCOL, b"KBYE", b"k"], h.now)
    results = [m for d, i, m in h.sent() if d is Dest.FRONTEND]
    assert results[0].ref == job
    assert json.loads(results[0].result)["error"]["type"] == "WorkerLost"


def test_lost_worker_guaranteed_job_requeued_at_front(h):
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit(headers="reply-requested,guarantee")
    later = h.submit()
    h.sent()
    h.core.on_backend(b"w1", [b"", PROTOCOL, b"KBYE", b"k"], h.now)
    assert [j.id for j in h.core.queues["default"].waiting] == [job, later]
    h.inform(b"w2")
    h.ready(b"w2")
    assert h.dispatched(h.sent()) == [(b"w2", job)]
    assert h.core.jobs[job].attempts == 2


def test_late_reply_from_a_worker_that_left_is_refused_and_the_holder_wins(h):
    # Only the worker holding a job may report it: w1 left, the job went to w2.
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit(headers="reply-requested,guarantee")
    h.core.on_backend(b"w1", [b"", PROTOCOL, b"KBYE", b"k"], h.now)
    h.inform(b"w2")
    h.ready(b"w2")
    h.sent()
    h.reply(b"w1", job)
    out = h.sent()
    assert outcomes(out) == [] and h.core.stats.forged_outcomes == 1
    assert [(i, m.reason) for _, i, m in out if m.command.value == "ERROR"] == [
        (b"w1", "unknown-worker")
    ]
    h.reply(b"w2", job, b'{"value": 7}')
    assert [json.loads(m.result) for m in outcomes(h.sent())] == [{"value": 7}]
    assert h.core.stats.duplicate_outcomes == 0 and h.core.stats.unknown_replies == 0


CORRAL = {"running": []}  # the INFORM meta that marks a corral worker
CANCELLED = b'{"error": {"type": "JobCancelled", "message": "killed", "traceback": ""}}'


def aborts(messages):
    return [(ident, m.ref) for dest, ident, m in messages if m.command.value == "ABORT"]


def outcomes(messages):
    return [m for d, i, m in messages if d is Dest.FRONTEND and m.result]


def test_late_outcome_from_a_lost_worker_is_refused_while_another_runs_the_job(h):
    h.inform(b"w1", meta=CORRAL)
    h.ready(b"w1")
    job = h.submit(headers="reply-requested,guarantee")
    h.sent()
    h.core.tick(h.now + 100)  # w1 stopped heartbeating: the job is requeued
    h.inform(b"w2", meta=CORRAL)
    h.ready(b"w2")
    assert h.dispatched(h.sent()) == [(b"w2", job)]
    h.reply(b"w1", job, b'{"value": 1}')  # w1 is not registered: not its job any more
    out = h.sent()
    assert aborts(out) == [] and outcomes(out) == []
    assert h.core.stats.forged_outcomes == 1
    # Back and registered, w1 still may not report a job that runs on w2.
    h.inform(b"w1", meta=CORRAL)
    h.reply(b"w1", job, b'{"value": 1}')
    out = h.sent()
    assert outcomes(out) == [] and h.core.stats.forged_outcomes == 2
    assert [(i, m.reason) for _, i, m in out if m.command.value == "ERROR"] == [
        (b"w1", "NotHolder")
    ]
    h.reply(b"w2", job, b'{"value": 2}')
    assert [json.loads(m.result) for m in outcomes(h.sent())] == [{"value": 2}]
    assert h.core.stats.duplicate_outcomes == 0 and not h.core.workers[b"w2"].aborted


def test_returning_worker_keeps_its_job_if_nobody_started_it(h):
    h.inform(b"w1", meta=CORRAL)
    h.ready(b"w1")
    job = h.submit(headers="reply-requested,guarantee")
    h.sent()
    h.core.tick(h.now + 100)  # lost: requeued, no other worker
    assert h.core.jobs[job].state.value == "queued"
    h.inform(b"w1", meta={"running": [job]})
    h.ready(b"w1")
    out = h.sent()
    assert h.dispatched(out) == [] and aborts(out) == []
    assert h.core.jobs[job].state.value == "running" and not h.core.queues["default"].waiting
    h.reply(b"w1", job)
    assert [json.loads(m.result) for m in outcomes(h.sent())] == [{"value": 42}]


def test_returning_worker_is_told_to_drop_a_job_running_elsewhere(h):
    h.inform(b"w1", meta=CORRAL)
    h.ready(b"w1")
    job = h.submit(headers="reply-requested,guarantee")
    h.sent()
    h.core.tick(h.now + 100)
    h.inform(b"w2", meta=CORRAL)
    h.ready(b"w2")
    h.sent()
    h.inform(b"w1", meta={"running": [job]})
    assert aborts(h.sent()) == [(b"w1", job)]
    assert h.core.jobs[job].worker.identity == b"w2"
    h.reply(b"w1", job, CANCELLED)
    h.reply(b"w2", job, b'{"value": 2}')
    assert [json.loads(m.result) for m in outcomes(h.sent())] == [{"value": 2}]


def test_returning_worker_is_told_to_drop_finished_and_unknown_jobs(h):
    h.inform(b"w1", meta=CORRAL)
    h.ready(b"w1")
    job = h.submit()
    h.reply(b"w1", job)
    h.sent()
    h.inform(b"w1", meta={"running": [job, "never-seen"]})
    assert sorted(aborts(h.sent())) == sorted([(b"w1", job), (b"w1", "never-seen")])


def test_eventmq_worker_is_never_sent_abort(h):
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit(headers="reply-requested,guarantee")
    h.sent()
    h.core.tick(h.now + 100)
    h.inform(b"w2")
    h.ready(b"w2")
    h.sent()
    h.reply(b"w1", job)  # refused: w1 was given up for lost, w2 holds the job
    out = h.sent()
    assert aborts(out) == [] and outcomes(out) == []
    h.reply(b"w2", job)
    assert len(outcomes(h.sent())) == 1 and h.core.stats.forged_outcomes == 1


def test_reinform_keeps_jobs_the_worker_still_holds(h):
    h.inform(b"w1")
    h.ready(b"w1", 2)
    kept, lost = h.submit(), h.submit(headers="reply-requested,guarantee")
    h.sent()
    h.inform(b"w1", meta={"running": [kept]})
    assert kept in h.core.workers[b"w1"].running
    assert [j.id for j in h.core.queues["default"].waiting] == [lost]
    h.reply(b"w1", kept)
    assert kept not in h.core.jobs


def test_ready_from_unknown_worker_gets_error(h):
    h.ready(b"ghost")
    out = h.sent()
    assert out[0][2].command.value == "ERROR" and out[0][2].reason == "unknown-worker"


class TestAdmin:
    def test_status_shape(self, h):
        h.inform(b"w1")
        h.ready(b"w1")
        h.submit()
        h.submit(queue="q2")
        h.sent()
        h.core.on_admin(b"adm", [b"", PROTOCOL, b"STATUS", b"admin:1"], h.now)
        ((dest, ident, msg),) = h.sent()
        status = json.loads(msg.ref)
        for key in (
            "inflight_messages_by_queue",
            "latency_messages_by_queue",
            "max_latency_messages_by_queue",
            "waiting_messages_by_queue",
            "processed_messages_by_queue",
            "processed_messages_by_worker",
        ):
            assert key in status
        assert status["waiting_messages_by_queue"] == {"default": 0, "q2": 1}
        assert status["inflight_messages_by_queue"]["default"] == 1

    def test_show_workers_shape(self, h):
        h.inform(b"w1", queues=((20, "a"), (10, "b")))
        h.ready(b"w1")
        h.sent()
        h.core.on_admin(b"adm", [b"", PROTOCOL, b"ROUTER_SHOW_WORKERS", b"admin:1"], h.now)
        info = json.loads(h.sent()[0][2].ref)
        assert info["connected_workers"]["w1"]["available_slots"] == 1
        assert info["connected_workers"]["w1"]["queues"] == [[20, "a"], [10, "b"]]
        assert info["connected_queues"]["a"] == [[20, "w1"]]

    def test_show_schedulers_and_disconnect(self, h):
        h.core.on_frontend(b"s1", Inform("i", None, "scheduler").to_frames(), h.now)
        h.sent()
        h.core.on_admin(b"adm", [b"", PROTOCOL, b"ROUTER_SHOW_SCHEDULERS", b"a"], h.now)
        assert "s1" in json.loads(h.sent()[0][2].ref)["connected_schedulers"]
        h.core.on_admin(b"adm", [b"", PROTOCOL, b"DISCONNECT", b"a2"], h.now)
        assert h.sent()[0][2].command.value == "ACK"
        assert h.core.stopping


class TestBadInput:
    def test_counted_answered_and_logged_once(self, h, caplog):
        for _ in range(5):
            h.core.on_frontend(b"bad", [b"", PROTOCOL, b"REQUEST", b"id", b"q", b"", b"{"], h.now)
        out = h.sent()
        assert len(out) == 5
        assert all(
            m.command.value == "ERROR" and m.reason == "bad-body" and m.ref == "id"
            for _, _, m in out
        )
        assert h.core.stats.malformed["bad-body"] == 5
        assert sum("bad message" in r.message for r in caplog.records) == 1

    def test_non_utf8_identity_is_fine(self, h):
        ident = b"\xff\xfe\x00w"
        h.inform(ident)
        h.ready(ident)
        job = h.submit()
        assert h.dispatched(h.sent()) == [(ident, job)]
        h.core.on_admin(b"adm", [b"", PROTOCOL, b"ROUTER_SHOW_WORKERS", b"a"], h.now)
        assert h.sent()  # shown, not crashed

    def test_error_is_never_answered_with_error(self, h):
        h.core.on_frontend(b"x", [b"", PROTOCOL, b"ERROR", b"id", b"\xff"], h.now)
        assert h.sent() == []

    def test_memory_bounded_under_garbage_flood(self):
        h = Harness(bad_input_memory=100)
        for i in range(5000):
            h.core.on_frontend(i.to_bytes(4, "big"), [b"garbage", bytes([i % 256])], h.now)
            h.sent()
        assert len(h.core._logged) <= 100
        assert h.core.stats.malformed["bad-frames"] == 5000
        assert not h.core.jobs and not h.core.queues

    def test_unexpected_commands_refused(self, h):
        h.core.on_frontend(b"c", [b"", PROTOCOL, b"READY", b"r"], h.now)
        h.core.on_admin(b"a", [b"", PROTOCOL, b"REQUEST", b"r", b"q", b"", BODY], h.now)
        assert [m.reason for _, _, m in h.sent()] == ["unexpected-command"] * 2

    def test_duplicate_job_id_refused(self, h):
        h.submit(msgid="same")
        h.submit(msgid="same")
        out = h.sent()
        assert [m.command.value for _, _, m in out] == ["REPLY", "ERROR"]
        assert len(h.core.jobs) == 1


def test_eventmq_worker_is_always_asked_for_the_outcome(h):
    h.inform(b"emq")  # no corral meta: an EventMQ job manager
    h.inform(b"corral", meta={"running": []})
    h.ready(b"emq")
    h.submit(headers="guarantee")
    (sent,) = [m for d, i, m in h.sent() if d is Dest.BACKEND and m.command.value == "REQUEST"]
    assert sent.headers.reply_requested and sent.headers.guarantee
    h.ready(b"corral")
    h.ready(b"corral")
    h.submit(headers="")
    (sent,) = [m for d, i, m in h.sent() if d is Dest.BACKEND and m.command.value == "REQUEST"]
    assert not sent.headers.reply_requested


def test_hello_from_emq_cli_is_not_answered(h):
    h.core.on_admin(b"cli", [b"", PROTOCOL, b"HELLO", b"admin:1"], h.now)
    assert h.sent() == []


def test_outcome_never_overtakes_the_acknowledgement(h):
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit()
    h.reply(b"w1", job)  # the outcome arrives before the store committed the job
    assert h.core.outbox == [] or all(m[2][2] != b"REPLY" for m in h.core.outbox)
    replies = [m for d, i, m in h.sent() if d is Dest.FRONTEND]
    assert [m.result is None for m in replies] == [True, False]
    assert not h.core.unacked


def test_outcome_after_its_acknowledgement_was_taken_for_the_store(h):
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit()
    taken = h.core.take_acks()  # a commit with the acknowledgement is under way
    h.reply(b"w1", job)
    assert [len(frames) for _, _, frames in taken] == [5]
    outcome = [f for d, _, f in h.core.outbox if d is Dest.FRONTEND]
    assert outcome == [] and h.core.acks == []  # held, and needs no commit of its own
    h.core.released(taken)  # that commit landed and the acknowledgement went out
    ((_, _, frames),) = [m for m in h.core.outbox if m[0] is Dest.FRONTEND]
    assert frames[2] == b"REPLY" and frames[-1] == job.encode() and len(frames) == 6


def test_a_leaving_worker_finishes_its_jobs_and_gets_no_new_ones(h):
    h.inform(b"w1", meta=CORRAL)
    h.ready(b"w1", 2)
    running = h.submit()
    h.sent()
    h.core.on_backend(b"w1", Kbye(new_msgid(), draining=True).to_frames(), h.now)
    out = h.sent()
    assert [m.command.value for _, _, m in out] == ["ACK"]
    waiting = h.submit()
    h.ready(b"w1")  # ignored: it is leaving
    assert h.dispatched(h.sent()) == []
    h.reply(b"w1", running)
    assert [m.ref for m in outcomes(h.sent())] == [running]
    h.core.on_backend(b"w1", Kbye(new_msgid()).to_frames(), h.now)
    assert b"w1" not in h.core.workers and h.core.stats.workers_lost == 1
    h.inform(b"w2", meta=CORRAL)
    h.ready(b"w2")
    assert h.dispatched(h.sent()) == [(b"w2", waiting)]


def reply_ready(h, ident, job_id, result=b'{"value": 42}'):
    h.core.on_backend(
        ident, [b"", PROTOCOL, b"REPLY", b"x", result, job_id.encode(), b"ready"], h.now
    )


def test_corral_workers_are_offered_ready_with_the_reply(h):
    h.inform(b"w1", meta=CORRAL)
    h.inform(b"emq")
    acks = {i: m.meta for _, i, m in h.sent() if m.command.value == "ACK"}
    assert acks[b"w1"]["reply_ready"] == 1
    assert acks[b"emq"] is None  # EventMQ's job managers get a plain ACK


def test_a_reply_with_ready_frees_its_slot_for_the_next_job(h):
    h.inform(b"w1", meta=CORRAL)
    h.ready(b"w1")
    first, second = h.submit(), h.submit()
    assert h.dispatched(h.sent()) == [(b"w1", first)]
    reply_ready(h, b"w1", first)
    out = h.sent()
    assert [m.ref for m in outcomes(out)] == [first]
    assert h.dispatched(out) == [(b"w1", second)]
    reply_ready(h, b"w1", second)
    assert h.core.workers[b"w1"].slots == 1  # one slot, as READY after REPLY would give


def test_a_reply_with_ready_from_a_leaving_worker_gives_no_slot(h):
    h.inform(b"w1", meta=CORRAL)
    h.ready(b"w1")
    running, waiting = h.submit(), h.submit()
    h.sent()
    h.core.on_backend(b"w1", Kbye(new_msgid(), draining=True).to_frames(), h.now)
    reply_ready(h, b"w1", running)
    out = h.sent()
    assert [m.ref for m in outcomes(out)] == [running] and h.dispatched(out) == []
    assert [j.id for j in h.core.queues["default"].waiting] == [waiting]


def test_a_reply_with_ready_from_an_unknown_worker_asks_it_to_register(h):
    reply_ready(h, b"ghost", new_msgid())
    errors = [m for _, _, m in h.sent() if m.command.value == "ERROR"]
    assert [e.reason for e in errors] == ["unknown-worker"]


def test_an_eventmq_worker_saying_draining_just_leaves(h):
    h.inform(b"w1")
    h.ready(b"w1")
    h.submit()
    h.core.on_backend(b"w1", Kbye(new_msgid(), draining=True).to_frames(), h.now)
    assert b"w1" not in h.core.workers


# ---------------------------------------------------------------- prefetch and recall


def corral_worker(h, ident, processes, slots):
    h.inform(ident, meta={"running": [], "concurrency": processes})
    h.ready(ident, slots)


def recalls(messages):
    return [(i, m.ref) for d, i, m in messages if m.command.value == "RECALL"]


def release(h, ident, job_id):
    h.core.on_backend(ident, [b"", PROTOCOL, b"RELEASE", b"x", job_id.encode()], h.now)


def test_a_job_goes_to_an_idle_process_before_a_prefetch_slot(h):
    corral_worker(h, b"w1", 1, 2)
    first = h.submit()
    assert h.dispatched(h.sent()) == [(b"w1", first)]
    corral_worker(h, b"w2", 1, 2)
    h.sent()
    # w1 has a free slot, but only a prefetch one: w2's idle process comes first.
    second = h.submit()
    assert h.dispatched(h.sent()) == [(b"w2", second)]
    third = h.submit()  # now both are busy: a prefetch slot it is
    assert [j for _, j in h.dispatched(h.sent())] == [third]


def test_an_idle_process_recalls_a_job_prefetched_behind_a_long_one(h):
    corral_worker(h, b"w1", 1, 2)
    long_job, short_job = h.submit(), h.submit()
    assert h.dispatched(h.sent()) == [(b"w1", long_job), (b"w1", short_job)]
    corral_worker(h, b"w2", 1, 1)  # nothing waits in the queue for it...
    out = h.sent()
    assert recalls(out) == [(b"w1", short_job)]  # ...but w1 holds one it cannot start
    corral_worker(h, b"w3", 1, 1)
    assert recalls(h.sent()) == []  # one job to give, already asked for
    release(h, b"w1", short_job)
    out = h.sent()
    moved = h.dispatched(out)
    assert len(moved) == 1 and moved[0][1] == short_job and moved[0][0] in (b"w2", b"w3")
    job = h.core.jobs[short_job]
    assert job.attempts == 1 and short_job not in h.core.workers[b"w1"].running
    assert h.core.stats.recalled == 1 and h.core.stats.released == 1
    reply_ready(h, moved[0][0], short_job)
    assert [m.ref for m in outcomes(h.sent())] == [short_job]


def test_a_recalled_job_that_had_started_just_finishes_where_it_is(h):
    corral_worker(h, b"w1", 1, 2)
    first, second = h.submit(), h.submit()
    h.sent()
    corral_worker(h, b"w2", 1, 1)
    assert recalls(h.sent()) == [(b"w1", second)]
    reply_ready(h, b"w1", first)
    h.sent()
    reply_ready(h, b"w1", second)  # it had started by the time the recall came
    assert [m.ref for m in outcomes(h.sent())] == [second]
    release(h, b"w1", second)  # a late or stray release changes nothing
    assert second not in h.core.jobs and h.core.stats.released == 0
    assert not h.core._recalling


def test_a_leaving_worker_hands_back_what_it_has_not_started(h):
    corral_worker(h, b"w1", 1, 2)
    running, waiting = h.submit(), h.submit()
    h.sent()
    h.core.on_backend(b"w1", Kbye(new_msgid(), draining=True).to_frames(), h.now)
    release(h, b"w1", waiting)
    assert [j.id for j in h.core.queues["default"].waiting] == [waiting]
    corral_worker(h, b"w2", 1, 1)
    assert h.dispatched(h.sent()) == [(b"w2", waiting)]
    assert h.core.jobs[running].worker is h.core.workers[b"w1"]


def test_workers_that_do_not_say_their_processes_are_never_asked_back(h):
    h.inform(b"emq")  # an EventMQ job manager
    h.ready(b"emq", 2)
    h.submit(), h.submit()
    h.sent()
    corral_worker(h, b"w2", 1, 1)
    assert recalls(h.sent()) == []


def test_a_prefetched_job_starts_when_the_job_ahead_of_it_ends(h):
    corral_worker(h, b"w1", 1, 2)
    first, second = h.submit(), h.submit()
    h.sent()
    jobs = h.core.jobs
    assert jobs[first].started == h.now and jobs[second].started is None
    h.now += 5
    reply_ready(h, b"w1", first)
    assert jobs[second].started == h.now
    assert h.core.cancel(second, h.now) == "running"  # it had started by then


def test_cancelling_a_prefetched_job_says_it_never_started(h):
    corral_worker(h, b"w1", 1, 2)
    h.submit()
    waiting = h.submit()
    h.sent()
    assert h.core.cancel(waiting, h.now) == "queued"
    assert [(i, m.ref) for d, i, m in h.sent() if m.command.value == "ABORT"] == [(b"w1", waiting)]


def test_a_lost_workers_prefetched_job_runs_elsewhere_without_guarantee(h):
    corral_worker(h, b"w1", 1, 2)
    running, prefetched = h.submit(), h.submit()
    h.sent()
    h.core.on_backend(b"w1", Kbye(new_msgid()).to_frames(), h.now)  # gone, both lost
    out = h.sent()
    assert [(m.ref, json.loads(m.result)["error"]["type"]) for m in outcomes(out)] == [
        (running, "WorkerLost")  # it had started: without guarantee it failed
    ]
    assert [j.id for j in h.core.queues["default"].waiting] == [prefetched]
    assert h.core.jobs[prefetched].attempts == 0
    corral_worker(h, b"w2", 1, 1)
    assert h.dispatched(h.sent()) == [(b"w2", prefetched)]


def test_a_restored_running_job_keeps_its_start_time(h):
    recs = [
        JobRecord(
            id=i,
            queue="default",
            state="running",
            headers="",
            body=BODY,
            submitter=b"c",
            submitted=1.0,
            started=started,
            attempts=1,
            worker_uuid="w1",
        )  # fmt: skip
        for i, started in (("r1", 2.0), ("r2", 3.0))
    ]
    h.core.restore(Snapshot(jobs=recs, workers=[]), h.now)
    h.inform(b"w1", meta={"running": ["r1", "r2"], "concurrency": 2})
    reply_ready(h, b"w1", "r2")  # a job ends: the ones it holds are looked at (_promote)
    h.sent()
    assert h.core.jobs["r1"].started_at == 2.0  # restored with it, not a new start


def test_a_jobs_first_record_is_new_to_the_store_and_later_ones_are_updates(h):
    h.inform(b"w1")
    h.ready(b"w1")
    job = h.submit()
    new, updates, _, _ = h.core.take_job_changes()
    assert ([r.id for r in new], updates) == ([job], [])
    h.sent()
    h.reply(b"w1", job)
    new, updates, _, _ = h.core.take_job_changes()
    assert (new, [(r.id, r.state) for r in updates]) == ([], [(job, "succeeded")])
    # The same id sent again once it is forgotten is a new job: its record is written whole.
    h.core._recent.clear()
    again = h.submit(msgid=job)
    new, updates, _, _ = h.core.take_job_changes()
    assert ([r.id for r in new], updates) == ([again], [])


def test_a_corral_worker_is_told_its_processes_may_send_outcomes(h):
    h.inform(b"w1", meta=CORRAL)
    h.inform(b"emq")
    acks = {i: m.meta for _, i, m in h.sent() if m.command.value == "ACK"}
    assert acks[b"w1"]["direct_outcomes"] == 1
    assert acks[b"emq"] is None


def worker_proof(h, ident):
    """Register ``ident`` as a corral worker; return the proof its ACK gives it."""
    h.inform(ident, meta=CORRAL)
    acks = [m for _, i, m in h.sent() if i == ident and m.command.value == "ACK"]
    return acks[-1].meta["proof"].encode()


def test_an_outcome_from_a_workers_process_counts_as_the_workers(h):
    proof = worker_proof(h, b"w1")
    h.ready(b"w1")
    first, second = h.submit(), h.submit()
    assert h.dispatched(h.sent()) == [(b"w1", first)]
    h.now += 5
    # The job's process, with its worker's proof and READY for the slot.
    reply_ready(h, b"w1/4242/" + proof, first)
    out = h.sent()
    assert [m.ref for m in outcomes(out)] == [first]
    # The slot came back to w1 (not to a peer of its own): the next job goes there.
    assert h.dispatched(out) == [(b"w1", second)]
    worker = h.core.workers[b"w1"]
    assert worker.last_seen == h.now and worker.processed == 1
    assert b"w1/4242/" + proof not in h.core.workers
    status = h.core.status(h.now)
    assert status["direct_outcomes"] == 1 and status["unknown_replies"] == 0
    # A second copy of that outcome (the worker re-sends it) is a counted duplicate.
    h.reply(b"w1", first)
    assert outcomes(h.sent()) == [] and h.core.stats.duplicate_outcomes == 1


def test_an_outcome_from_a_process_of_an_unknown_or_eventmq_worker_is_not_credited(h):
    h.inform(b"emq")  # an EventMQ job manager: its REPLYs come from itself only
    h.ready(b"emq")
    job = h.submit()
    assert h.dispatched(h.sent()) == [(b"emq", job)]
    reply_ready(h, b"emq/1", job)
    reply_ready(h, b"ghost/1", new_msgid())
    assert h.core.stats.direct_outcomes == 0
    assert h.core.workers[b"emq"].processed == 0
    # As any REPLY from a peer that never registered: the sender is asked to.
    errors = [(i, m.reason) for _, i, m in h.sent() if m.command.value == "ERROR"]
    assert (b"ghost/1", "unknown-worker") in errors
