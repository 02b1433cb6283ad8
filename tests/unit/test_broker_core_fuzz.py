"""Random traffic against the broker core: it never raises and its books stay consistent."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from corral.broker.core import BrokerConfig, BrokerCore
from corral.protocol import PROTOCOL, RunParams, encode_body
from corral.scheduler.ids import schedule_id

BODY = encode_body(RunParams("m", "f"))
SID = schedule_id(BODY).encode()
PEERS = [b"w1", b"w2", b"\xff\xfe", b"c1"]

valid = st.sampled_from(
    [
        ("backend", [b"", PROTOCOL, b"INFORM", b"i", b'[[10,"default"],[5,"q"]]', b"worker"]),
        ("backend", [b"", PROTOCOL, b"INFORM", b"i", b"", b"worker"]),
        ("backend", [b"", PROTOCOL, b"READY", b"r"]),
        ("backend", [b"", PROTOCOL, b"KBYE", b"k"]),
        ("backend", [b"", PROTOCOL, b"HEARTBEAT", b"h", b"1.0"]),
        ("frontend", [b"", PROTOCOL, b"REQUEST", b"J", b"default", b"reply-requested", BODY]),
        ("frontend", [b"", PROTOCOL, b"REQUEST", b"J", b"q", b"guarantee", BODY]),
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
    now = 0.0
    for peer, (where, frames), n, dt in ops_:
        now += dt
        if where == "tick":
            core.tick(now)
            continue
        if frames[2:3] == [b"REQUEST"] and frames[3:4] == [b"J"]:
            frames = [*frames[:3], str(n).encode(), *frames[4:]]
        handler = {
            "frontend": core.on_frontend,
            "backend": core.on_backend,
            "admin": core.on_admin,
        }[where]
        handler(peer, frames, now)
        # Workers answer a random running job now and then.
        for worker in list(core.workers.values()):
            if worker.running and n % 3 == 0:
                job_id = next(iter(worker.running))
                core.on_backend(
                    worker.identity,
                    [b"", PROTOCOL, b"REPLY", b"x", b'{"value": 1}', job_id.encode()],
                    now,
                )
        # The server commits, releases what waited for the store, and sends.
        core.take_changes()
        core.take_schedule_changes()
        core.released(core.acks)
        core.committed(now)
        core.acks.clear()
        core.outbox.clear()
        _check(core)


def _check(core: BrokerCore) -> None:
    running = {jid for w in core.workers.values() for jid in w.running}
    waiting = {j.id for q in core.queues.values() for j in q.waiting}
    assert running.isdisjoint(waiting)
    assert running | waiting == set(core.jobs)
    for w in core.workers.values():
        assert w.slots >= 0
    for q in core.queues.values():
        members = [w for _, ms in q.levels for w in ms]
        assert q.ready == sum(1 for w in members if w.slots > 0)
        assert all(w.identity in core.workers for w in members)
        if q.waiting:
            assert q.ready == 0
