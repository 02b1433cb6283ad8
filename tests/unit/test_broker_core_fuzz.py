"""Random traffic against the broker core: it never raises and its books stay consistent."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.broker.core import BrokerConfig, BrokerCore
from corral.broker.model import JobState
from corral.protocol import PROTOCOL, RunParams, encode_body
from corral.scheduler.ids import schedule_id
from corral.store.memory import MemoryStore

BODY = encode_body(RunParams("m", "f"))
SID = schedule_id(BODY).encode()
OUTCOMES = [
    b'{"value": 1}',
    b'{"error": {"type": "ValueError", "message": "m", "traceback": ""}}',
    b'{"error": {"type": "JobCancelled", "message": "m", "traceback": ""}}',
]
# With a job process of w1 ("w1/7"), and one of a peer that never registered.
PEERS = [b"w1", b"w2", b"\xff\xfe", b"c1", b"w1/7", b"ghost/1"]

valid = st.sampled_from(
    [
        ("backend", [b"", PROTOCOL, b"INFORM", b"i", b'[[10,"default"],[5,"q"]]', b"worker"]),
        ("backend", [b"", PROTOCOL, b"INFORM", b"i", b"", b"worker"]),
        ("backend", [b"", PROTOCOL, b"READY", b"r"]),
        ("backend", [b"", PROTOCOL, b"KBYE", b"k"]),
        ("backend", [b"", PROTOCOL, b"HEARTBEAT", b"h", b"1.0"]),
        ("frontend", [b"", PROTOCOL, b"REQUEST", b"J", b"default", b"reply-requested", BODY]),
        ("frontend", [b"", PROTOCOL, b"REQUEST", b"J", b"q", b"guarantee", BODY]),
        ("frontend", [b"", PROTOCOL, b"REQUEST", b"J", b"default", b"retry-count:2", BODY]),
        ("frontend", [b"", PROTOCOL, b"REQUEST", b"J", b"default", b"AFTER", BODY]),
        ("backend", [b"", PROTOCOL, b"INFORM", b"i", b"", b"worker", b"CLAIMS"]),
        ("backend", [b"", PROTOCOL, b"ABORT", b"a", b"J"]),
        ("cancel", []),
        ("restart", []),
        ("resolve", []),
        ("frontend", [b"", PROTOCOL, b"INFORM", b"i", b"", b"scheduler"]),
        ("frontend", [b"", PROTOCOL, b"INFORM", b"i", b"", b"scheduler", b"{}"]),
        ("frontend", [b"", PROTOCOL, b"SCHEDULE", b"s", b"q", b"", b"2", BODY, b""]),
        (
            "frontend",
            [b"", PROTOCOL, b"SCHEDULE", b"s", b"q", b"nohaste", b"-1", BODY, b"* * * * *"],
        ),
        ("frontend", [b"", PROTOCOL, b"UNSCHEDULE", b"s", b"q", b"", b"-1", BODY, b""]),
        (
            "frontend",
            [b"", PROTOCOL, b"REQUEST", SID + b"@1970-01-01T00:00:02.000Z", b"q", b"", BODY],
        ),
        ("frontend", [b"", PROTOCOL, b"QUERY", b"s", b'{"op": "schedules"}']),
        ("admin", [b"", PROTOCOL, b"STATUS", b"a"]),
        ("admin", [b"", PROTOCOL, b"ROUTER_SHOW_WORKERS", b"a"]),
        ("tick", []),
    ]
)
garbage = st.tuples(
    st.sampled_from(["frontend", "backend", "admin"]), st.lists(st.binary(max_size=20), max_size=8)
)
ops = st.lists(
    st.tuples(
        st.sampled_from(PEERS),
        st.one_of(valid, valid, garbage),
        st.integers(0, 10**6),
        st.floats(0, 5),
    ),
    max_size=60,
)


@settings(max_examples=400, deadline=None)
@given(ops)
def test_core_survives_any_traffic(ops_):
    core = BrokerCore(BrokerConfig(heartbeat_interval=1.0))
    store = MemoryStore()
    now = 0.0
    for peer, (where, frames), n, dt in ops_:
        now += dt
        if where == "restart":  # a crash: what was committed comes back
            core = BrokerCore(BrokerConfig(heartbeat_interval=1.0))
            core.restore(store.open(), now)
            _check(core)
            continue
        if where == "tick":
            core.tick(now)
            continue
        if where == "cancel":
            core.cancel(str(n % 50), now)
            continue
        if where == "resolve":
            for dep in core.lookups:
                core.resolve_dependency(dep, ["succeeded", "failed", None][n % 3], now)
            core.lookups.clear()
            continue
        if frames[2:3] == [b"REQUEST"] and frames[3:4] == [b"J"]:
            # Ids from a small range, so that duplicates and dependencies happen.
            frames = [*frames[:3], str(n % 50).encode(), *frames[4:]]
            if frames[5] == b"AFTER":
                frames[5] = f"reply-requested,after:{(n + 1) % 50},after:{n % 7}".encode()
        if frames[-1:] == [b"CLAIMS"]:
            claims = [str(i) for i in range(n % 5)] + [j for j in list(core.jobs)[:2]]
            frames = [*frames[:-1], json.dumps({"running": claims}).encode()]
        handler = {
            "frontend": core.on_frontend,
            "backend": core.on_backend,
            "admin": core.on_admin,
        }[where]
        handler(peer, frames, now)
        # Workers answer a random running job now and then, well or badly; every
        # other time the job's process does, with READY for its slot.
        for worker in list(core.workers.values()):
            if worker.running and n % 3 == 0:
                job_id = next(iter(worker.running))
                frames = [b"", PROTOCOL, b"REPLY", b"x", OUTCOMES[n % 3], job_id.encode()]
                sender = worker.identity
                if n % 2:
                    sender, frames = sender + b"/7", [*frames, b"ready"]
                core.on_backend(sender, frames, now)
        # The server commits, releases what waited for the store, and sends.
        store.commit(*core.take_changes(), core.take_schedule_changes())
        core.released(core.take_acks())
        core.committed(now)
        core.outbox.clear()
        _check(core)


def _check(core: BrokerCore) -> None:
    running = {jid for w in core.workers.values() for jid in w.running}
    waiting = {j.id for q in core.queues.values() for j in q.waiting}
    blocked = {j.id for j in core.jobs.values() if j.waiting_on is not None}
    retrying = {j.id for j in core.jobs.values() if j.state is JobState.RETRYING}
    orphaned = {j.id for _, jobs in core.orphans.values() for j in jobs}
    assert running.isdisjoint(waiting) and blocked.isdisjoint(waiting | running)
    assert running | waiting | blocked | retrying | orphaned == set(core.jobs)
    for w in core.workers.values():
        for job in w.running.values():
            assert core.jobs[job.id] is job and job.state is JobState.RUNNING and job.worker is w
    for job in core.jobs.values():
        assert (job.id in waiting or job.id in blocked) == (job.state is JobState.QUEUED)
    for w in core.workers.values():
        assert w.slots >= 0
    for q in core.queues.values():
        members = [w for _, ms in q.levels for w in ms]
        assert q.ready == sum(1 for w in members if w.slots > 0)
        assert all(w.identity in core.workers for w in members)
        if q.waiting:
            assert q.ready == 0
