"""Schedules in the broker core, on an injected clock with a real (in-memory) store.

:class:`Sim` drives a :class:`BrokerCore` as the server would -- tick at the
time the core asks for, commit, then release what waited for the commit --
and can "crash" and restart it on the same store, so minutes, days and
restarts take no time.
"""

from __future__ import annotations

import json
from datetime import datetime
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.broker.core import BrokerConfig, BrokerCore, Dest
from corral.protocol import (
    PROTOCOL,
    Inform,
    Kbye,
    Message,
    Query,
    Request,
    RunParams,
    Schedule,
    Unschedule,
    encode_body,
    new_msgid,
    parse,
    parse_headers,
)
from corral.scheduler import SchedulerConfig
from corral.scheduler.ids import parse_tick_id, schedule_id, tick_id
from corral.store.memory import MemoryStore

UTC = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")
BODY = encode_body(RunParams("pkg.mod", "fn", [1]))
SID = schedule_id(BODY)


def ms(text: str, tz: ZoneInfo = UTC) -> int:
    return round(datetime.fromisoformat(text).replace(tzinfo=tz).timestamp() * 1000)


def iso(t: int, tz: ZoneInfo = UTC) -> str:
    return datetime.fromtimestamp(t / 1000, tz).isoformat(timespec="milliseconds")


class Sim:
    def __init__(
        self, start: str, store: MemoryStore | None = None, heartbeat: float = 60.0, **sched: object
    ) -> None:
        self.store = store or MemoryStore()
        self.sched = sched
        self.heartbeat = heartbeat
        self.sent: list[tuple[Dest, bytes, Message]] = []
        #: Scheduler peers that heartbeat at every step of :meth:`run_until`.
        self.alive: set[bytes] = set()
        self._boot(ms(start))

    def _boot(self, wall: int) -> None:
        self.core = BrokerCore(
            BrokerConfig(heartbeat_interval=self.heartbeat, schedules=SchedulerConfig(**self.sched))
        )
        self.now = 500.0  # a monotonic clock that starts over at every boot
        self.core.wall_offset = wall / 1000 - self.now
        self.core.restore(self.store.open(), self.now)

    @property
    def wall(self) -> int:
        return round((self.now + self.core.wall_offset) * 1000)

    def at(self, when: str | int) -> None:
        wall = ms(when) if isinstance(when, str) else when
        self.now = wall / 1000 - self.core.wall_offset

    def commit(self) -> None:
        core = self.core
        jobs, workers, meta = core.take_changes()
        self.store.commit(jobs, workers, meta, core.take_schedule_changes())
        acks, core.acks = core.acks, []
        core.released(acks)
        core.committed(self.now)
        out, core.outbox = acks + core.outbox, []
        self.sent += [(d, i, parse(f)) for d, i, f in out]

    def run_until(self, when: str | int, lateness: float = 0.0) -> None:
        """Tick whenever the core asks (``lateness`` s late), committing after each step."""
        end = ms(when) if isinstance(when, str) else when
        while True:
            for peer in self.alive:
                self.core.on_frontend(peer, [b"", PROTOCOL, b"HEARTBEAT", b"h", b"0"], self.now)
            due = self.core.tick(self.now)
            self.commit()
            nxt = due + lateness
            if round((nxt + self.core.wall_offset) * 1000) > end:
                self.at(end)
                self.core.tick(self.now)
                self.commit()
                return
            self.now = max(nxt, self.now)

    def crash(self, restart_at: str | int) -> None:
        """Lose everything not committed; start a new core on the store at ``restart_at``."""
        self._boot(ms(restart_at) if isinstance(restart_at, str) else restart_at)

    def frontend(self, ident: bytes, msg: Message) -> None:
        self.core.on_frontend(ident, msg.to_frames(), self.now)

    def schedule(self, interval=10, cron="", headers="", queue="default", body=BODY, who=b"c"):
        msg = Schedule(new_msgid(), queue, parse_headers(headers), interval, body, cron)
        self.frontend(who, msg)
        return msg.msgid

    def unschedule(self, body=BODY, who=b"c"):
        self.frontend(who, Unschedule(new_msgid(), "default", parse_headers(""), -1, body, ""))

    def query(self, op, who=b"c", **params):
        msgid = new_msgid()
        self.frontend(who, Query(msgid, op, params))
        self.commit()
        for _, _, m in self.taken(who):
            if m.command.value == "REPLY" and m.ref == msgid:
                return json.loads(m.result)
        raise AssertionError(f"no answer to {op}")

    def taken(self, who: bytes | None = None) -> list[tuple[Dest, bytes, Message]]:
        """Messages sent so far (to ``who``), forgotten once taken."""
        keep, out = [], []
        for item in self.sent:
            (out if who is None or item[1] == who else keep).append(item)
        self.sent = keep
        return out

    def ticks(self, sid: str = SID, tz: ZoneInfo = UTC) -> list[str]:
        """Every tick stored as a job, in order, as ISO times."""
        found = [parse_tick_id(j) for j in self.store.jobs]
        return sorted(iso(t, tz) for s, t in filter(None, found) if s == sid)

    def record(self, sid: str = SID):
        return self.store.schedules.get(sid)


# ---------------------------------------------------------------- intervals


def test_interval_runs_at_once_then_on_a_fixed_cadence_without_drift():
    sim = Sim("2025-01-01T00:00:00.250")
    sim.schedule(interval=10)
    # Every wake-up comes 0.3 s late; the ticks stay on the grid anyway.
    sim.run_until("2025-01-01T00:01:00", lateness=0.3)
    assert sim.ticks() == [f"2025-01-01T00:00:{s:02d}.250+00:00" for s in range(0, 60, 10)]
    assert sim.record().runs == 6


def test_nohaste_first_run_is_one_interval_later():
    sim = Sim("2025-01-01T00:00:00")
    sim.schedule(interval=30, headers="nohaste")
    sim.run_until("2025-01-01T00:01:10")
    assert sim.ticks() == ["2025-01-01T00:00:30.000+00:00", "2025-01-01T00:01:00.000+00:00"]


@pytest.mark.parametrize(("headers", "first"), [("run_count:3", 0), ("nohaste,run_count:3", 10)])
def test_run_count_runs_n_times_then_drops_the_schedule(headers, first):
    sim = Sim("2025-01-01T00:00:00")
    sim.schedule(interval=10, headers=headers)
    sim.run_until("2025-01-01T00:10:00")
    assert sim.ticks() == [f"2025-01-01T00:00:{first + s:02d}.000+00:00" for s in (0, 10, 20)]
    assert sim.record().state == "finished"
    assert sim.query("schedules")["value"] == []


def test_tick_jobs_carry_the_schedules_job_headers_and_queue():
    sim = Sim("2025-01-01T00:00:00")
    sim.schedule(interval=10, headers="guarantee,retry-count:2,timeout:5,run_count:9,label:x")
    sim.commit()
    (job,) = [j for j in sim.store.jobs.values() if "@" in j.id]
    assert parse_headers(job.headers) == parse_headers("guarantee,retry-count:2,timeout:5,label:x")
    assert job.label == "x" and job.queue == "default" and job.body == BODY


# ---------------------------------------------------------------- cron


def test_cron_keeps_its_queue_and_wall_clock():
    sim = Sim("2025-01-01T10:02:00")
    sim.schedule(interval=-1, cron="*/5 * * * *", headers="nohaste", queue="reports")
    sim.run_until("2025-01-01T10:16:00")
    assert sim.ticks() == [f"2025-01-01T10:{m}:00.000+00:00" for m in ("05", "10", "15")]
    assert {j.queue for j in sim.store.jobs.values()} == {"reports"}
    sim.crash("2025-01-01T10:17:00")
    sim.run_until("2025-01-01T10:21:00")
    assert sim.ticks()[-1] == "2025-01-01T10:20:00.000+00:00"
    assert {j.queue for j in sim.store.jobs.values()} == {"reports"}


def test_cron_without_nohaste_also_runs_when_scheduled():
    sim = Sim("2025-01-01T10:02:30")
    sim.schedule(interval=-1, cron="*/5 * * * *")
    sim.run_until("2025-01-01T10:06:00")
    assert sim.ticks() == ["2025-01-01T10:02:30.000+00:00", "2025-01-01T10:05:00.000+00:00"]


def test_cron_daily_in_a_zone_across_both_dst_changes():
    sim = Sim("2025-03-28T12:00:00", heartbeat=3600, timezone="Europe/Berlin")
    sim.schedule(interval=-1, cron="30 2 * * *", headers="nohaste")
    sim.run_until("2025-04-01T00:00:00")
    sim.run_until("2025-10-24T12:00:00")
    spring = [t for t in sim.ticks(tz=BERLIN) if t.startswith("2025-03")]
    assert spring == [
        "2025-03-29T02:30:00.000+01:00",
        "2025-03-30T03:00:00.000+02:00",
        "2025-03-31T02:30:00.000+02:00",
    ]
    before = len(sim.ticks())
    sim.run_until("2025-10-28T00:00:00")
    assert sim.ticks(tz=BERLIN)[before:] == [
        "2025-10-25T02:30:00.000+02:00",
        "2025-10-26T02:30:00.000+02:00",
        "2025-10-27T02:30:00.000+01:00",
    ]
    days = [t[:10] for t in sim.ticks(tz=BERLIN)]
    assert len(days) == len(set(days)), "a day ran twice"


def test_cron_hourly_runs_25_times_on_the_long_day():
    sim = Sim("2025-10-25T21:30:00", timezone="Europe/Berlin")  # 23:30 local
    sim.schedule(interval=-1, cron="0 * * * *", headers="nohaste")
    sim.run_until(ms("2025-10-27T00:00:00", BERLIN) - 1)
    ticks = sim.ticks(tz=BERLIN)
    assert len(ticks) == 25 and len(set(ticks)) == 25  # 00:00 ... 23:00, and 02:00 twice
    assert all(t.startswith("2025-10-26") for t in ticks)
    assert "2025-10-26T02:00:00.000+02:00" in ticks and "2025-10-26T02:00:00.000+01:00" in ticks


# ---------------------------------------------------------------- unschedule and updates


@pytest.mark.parametrize(("interval", "cron"), [(10, ""), (-1, "* * * * *")])
def test_unscheduled_never_fires_again_even_after_a_restart(interval, cron):
    sim = Sim("2025-01-01T00:00:00")
    sim.schedule(interval=interval, cron=cron)
    sim.run_until("2025-01-01T00:02:30")
    sim.unschedule()
    sim.commit()
    count = len(sim.ticks())
    assert sim.record().state == "unscheduled"
    sim.run_until("2025-01-01T00:10:00")
    sim.crash("2025-01-01T00:11:00")
    sim.run_until("2025-01-01T00:20:00")
    assert len(sim.ticks()) == count
    assert sim.query("schedules")["value"] == []


def test_same_schedule_again_changes_nothing_a_changed_one_starts_over():
    sim = Sim("2025-01-01T00:00:00")
    sim.schedule(interval=10)
    sim.run_until("2025-01-01T00:00:15")
    sim.schedule(interval=10)  # a client resending: no extra run, same cadence
    sim.run_until("2025-01-01T00:00:25")
    assert sim.ticks() == [f"2025-01-01T00:00:{s:02d}.000+00:00" for s in (0, 10, 20)]
    sim.schedule(interval=60)  # a new definition: runs now, then every 60 s from now
    sim.run_until("2025-01-01T00:01:30")
    assert sim.ticks()[3:] == ["2025-01-01T00:00:25.000+00:00", "2025-01-01T00:01:25.000+00:00"]
    assert sim.record().interval == 60


def test_schedule_acknowledged_only_once_stored():
    sim = Sim("2025-01-01T00:00:00")
    msgid = sim.schedule(interval=10)
    assert [m for _, _, m in sim.core.outbox if m[2] == b"REPLY"] == []
    assert sim.store.schedules == {}
    sim.commit()
    (ack,) = [m for _, _, m in sim.taken(b"c") if m.command.value == "REPLY"]
    assert ack.ref == msgid and sim.record().state == "active"


# ---------------------------------------------------------------- restarts


def test_ticks_missed_while_down_are_coalesced_into_one_run():
    sim = Sim("2025-01-01T00:00:00")
    sim.schedule(interval=10, headers="nohaste")
    sim.run_until("2025-01-01T00:00:12")
    sim.crash("2025-01-01T00:00:47")  # down over the ticks at 20, 30 and 40
    sim.run_until("2025-01-01T00:01:05")
    assert sim.ticks() == [
        "2025-01-01T00:00:10.000+00:00",
        "2025-01-01T00:00:40.000+00:00",  # one run for the three missed ticks, at start
        "2025-01-01T00:00:50.000+00:00",
        "2025-01-01T00:01:00.000+00:00",
    ]


def test_ticks_missed_while_down_can_be_skipped():
    sim = Sim("2025-01-01T00:00:00", missed="skip")
    sim.schedule(interval=10, headers="nohaste")
    sim.run_until("2025-01-01T00:00:12")
    sim.crash("2025-01-01T00:00:47")
    sim.run_until("2025-01-01T00:01:05")
    assert sim.ticks() == [
        "2025-01-01T00:00:10.000+00:00",
        "2025-01-01T00:00:50.000+00:00",
        "2025-01-01T00:01:00.000+00:00",
    ]
    assert sim.record().runs == 3


def test_a_tick_fired_but_not_stored_fires_again_once_and_ran_nowhere_before():
    sim = Sim("2025-01-01T00:00:00")
    sim.core.on_backend(b"w", Inform("i", None, "worker").to_frames(), sim.now)
    sim.core.on_backend(b"w", [b"", PROTOCOL, b"READY", b"r"], sim.now)
    sim.schedule(interval=10, headers="nohaste")
    sim.commit()
    sim.taken()
    sim.at("2025-01-01T00:00:10")
    sim.core.tick(sim.now)
    # Fired, but the job waits for the store: nothing went to the worker yet.
    assert [m for d, _, m in sim.core.outbox if d is Dest.BACKEND and m[2] == b"REQUEST"] == []
    sim.crash("2025-01-01T00:00:10.5")  # the commit never happened
    sim.run_until("2025-01-01T00:00:15")
    assert sim.ticks() == ["2025-01-01T00:00:10.000+00:00"]
    sim.crash("2025-01-01T00:00:16")  # this time it was stored: not again
    sim.run_until("2025-01-01T00:00:19")
    assert sim.ticks() == ["2025-01-01T00:00:10.000+00:00"]


def test_tick_job_dispatched_after_its_commit():
    sim = Sim("2025-01-01T00:00:00")
    sim.core.on_backend(b"w", Inform("i", None, "worker").to_frames(), sim.now)
    sim.core.on_backend(b"w", [b"", PROTOCOL, b"READY", b"r"], sim.now)
    sim.schedule(interval=10)
    assert not [o for o in sim.core.outbox if o[0] is Dest.BACKEND and o[2][2] == b"REQUEST"]
    sim.commit()
    (req,) = [m for d, _, m in sim.taken() if d is Dest.BACKEND and isinstance(m, Request)]
    assert req.msgid == tick_id(SID, ms("2025-01-01T00:00:00"))


# ---------------------------------------------------------------- corral scheduler processes


def tick_request(sid: str, t: int, queue="default", body=BODY) -> Request:
    return Request(tick_id(sid, t), queue, parse_headers(""), body)


def refusals(sim: Sim, who: bytes) -> list[str]:
    return [m.reason for _, _, m in sim.taken(who) if m.command.value == "ERROR"]


def commands(sim: Sim, who: bytes) -> list[str]:
    """What ``who`` was sent (ERRORs with their reason), heartbeats left out."""
    return [
        f"ERROR {m.reason}" if m.command.value == "ERROR" else m.command.value
        for _, _, m in sim.taken(who)
        if m.command.value != "HEARTBEAT"
    ]


def test_two_schedulers_firing_the_same_tick_make_one_job():
    sim = Sim("2025-01-01T00:00:00", builtin=False)
    sim.schedule(interval=10, headers="nohaste")
    sim.commit()
    t = ms("2025-01-01T00:00:10")
    sim.at(t + 3)
    for who in (b"s1", b"s2", b"s1"):
        sim.frontend(who, tick_request(SID, t))
    sim.commit()
    assert sim.ticks() == ["2025-01-01T00:00:10.000+00:00"]
    assert refusals(sim, b"s1") == ["duplicate-id"] and refusals(sim, b"s2") == ["duplicate-id"]
    assert sim.core.status(sim.now)["ticks_refused"] == {"duplicate-id": 3 - 1}


def test_ticks_that_do_not_count_are_refused_with_reasons():
    sim = Sim("2025-01-01T00:00:00", builtin=False)
    sim.schedule(interval=10, headers="nohaste")
    sim.commit()
    sim.at("2025-01-01T00:00:31")
    cases = [
        (tick_request(SID, ms("2025-01-01T00:00:05")), "bad-tick"),  # off the grid
        (tick_request(SID, ms("2025-01-01T00:00:00")), "bad-tick"),  # nohaste: no anchor run
        (tick_request(SID, ms("2025-01-01T00:01:00")), "early-tick"),  # 29 s ahead
        (tick_request("f" * 40, ms("2025-01-01T00:00:30")), "unknown-schedule"),
    ]
    for req, reason in cases:
        sim.frontend(b"s1", req)
        sim.commit()
        assert refusals(sim, b"s1") == [reason], reason
    sim.frontend(b"s1", tick_request(SID, ms("2025-01-01T00:00:30")))
    sim.frontend(b"s1", tick_request(SID, ms("2025-01-01T00:00:20")))  # older than the last
    sim.commit()
    assert refusals(sim, b"s1") == ["duplicate-id"]
    assert sim.ticks() == ["2025-01-01T00:00:30.000+00:00"]


def test_builtin_and_process_agree_on_tick_ids():
    sim = Sim("2025-01-01T00:00:00")
    sim.schedule(interval=10)
    sim.run_until("2025-01-01T00:00:10")
    sim.frontend(b"s1", tick_request(SID, ms("2025-01-01T00:00:10")))
    sim.commit()
    assert refusals(sim, b"s1") == ["duplicate-id"]


def test_corral_scheduler_is_told_every_pool_schedule_and_changes():
    sim = Sim("2025-01-01T00:00:00", builtin=False)
    sim.schedule(interval=10)
    sim.commit()
    sim.frontend(b"s1", Inform("i", None, "scheduler", {"corral": 1}))
    sim.commit()
    got = [m for _, _, m in sim.taken(b"s1")]
    assert [m.command.value for m in got] == ["ACK", "HEARTBEAT", "SCHEDULE"]
    meta = got[2].meta
    assert meta["anchor"] == ms("2025-01-01T00:00:00") and meta["sync"] is True
    assert meta["tz"] == "UTC" and meta["last_tick"] is None
    sim.unschedule()
    sim.commit()
    assert [m.command.value for _, _, m in sim.taken(b"s1")] == ["UNSCHEDULE"]


# ---------------------------------------------------------------- EventMQ schedulers


def emq_join(sim: Sim, who: bytes) -> None:
    sim.alive.add(who)
    sim.frontend(who, Inform(new_msgid(), None, "scheduler"))
    sim.commit()
    sim.taken(who)


def emq_tick(sim: Sim, who: bytes, queue="default", body=BODY) -> None:
    """What EventMQ's scheduler sends: a REQUEST with a fresh uuid, cron jobs to ``default``."""
    sim.frontend(who, Request(new_msgid(), queue, parse_headers("reply-requested"), body))
    sim.commit()


def test_schedule_goes_to_one_eventmq_scheduler_which_alone_fires_it():
    sim = Sim("2025-01-01T00:00:00")
    emq_join(sim, b"e1")
    emq_join(sim, b"e2")
    sim.schedule(interval=-1, cron="* * * * *", queue="reports")
    sim.schedule(interval=10, body=encode_body(RunParams("pkg.mod", "other")))
    sim.commit()
    got = {who: [m for _, _, m in sim.taken(who)] for who in (b"e1", b"e2")}
    assert [len(v) for v in got.values()] == [1, 1], "one SCHEDULE each, round-robin"
    owner = next(who for who, v in got.items() if v[0].cron)
    other = b"e2" if owner == b"e1" else b"e1"
    sim.run_until("2025-01-01T00:05:00")
    assert sim.ticks() == [], "the built-in scheduler leaves it to its owner"
    emq_tick(sim, owner)  # EventMQ sends cron jobs to "default": the broker keeps the queue
    assert [j.queue for j in sim.store.jobs.values()] == ["reports"]
    assert len(sim.ticks()) == 1
    commands(sim, owner)
    emq_tick(sim, other)  # not its schedule: refused, and told to drop it
    assert commands(sim, other) == ["UNSCHEDULE", "ERROR not-owner"]
    assert len(sim.ticks()) == 1
    sim.unschedule()
    sim.commit()
    # UNSCHEDULE goes to every scheduler; the owner's later ticks are refused
    # (EventMQ keeps firing unscheduled cron jobs).
    assert commands(sim, b"e1") == ["UNSCHEDULE"]
    assert commands(sim, b"e2") == ["UNSCHEDULE"]
    emq_tick(sim, owner)
    assert commands(sim, owner) == ["ERROR unknown-schedule"]
    assert len(sim.ticks()) == 1


def test_a_leaving_eventmq_scheduler_hands_its_schedules_back():
    sim = Sim("2025-01-01T00:00:00")
    emq_join(sim, b"e1")
    sim.schedule(interval=10)
    sim.commit()
    for t in ("00:00:00.1", "00:00:10.2", "00:00:20.1"):
        sim.run_until(f"2025-01-01T{t}")
        emq_tick(sim, b"e1")
    sim.run_until("2025-01-01T00:00:25")
    sim.alive.clear()
    sim.frontend(b"e1", Kbye(new_msgid()))
    sim.run_until("2025-01-01T00:01:00")
    # The broker continues the cadence it ran at, from its last tick.
    assert sim.ticks() == [
        "2025-01-01T00:00:00.100+00:00",
        "2025-01-01T00:00:10.200+00:00",
        "2025-01-01T00:00:20.100+00:00",
        "2025-01-01T00:00:30.100+00:00",
        "2025-01-01T00:00:40.100+00:00",
        "2025-01-01T00:00:50.100+00:00",
    ]
    assert sim.query("schedules")["value"][0]["run_by"] == "broker"
    emq_tick(sim, b"e1")  # a late tick from the scheduler that left
    assert refusals(sim, b"e1") == ["not-owner"]


def test_a_restarted_broker_takes_back_eventmq_schedules_and_refuses_their_old_owner():
    sim = Sim("2025-01-01T00:00:00")
    emq_join(sim, b"e1")
    sim.schedule(interval=10)
    sim.commit()
    sim.run_until("2025-01-01T00:00:00.5")
    emq_tick(sim, b"e1")
    sim.crash("2025-01-01T00:00:03")
    sim.run_until("2025-01-01T00:00:12")
    emq_tick(sim, b"e1")  # still running, not knowing the broker restarted
    assert refusals(sim, b"e1") == ["not-owner"]
    assert sim.ticks() == ["2025-01-01T00:00:00.500+00:00", "2025-01-01T00:00:10.500+00:00"]


def test_without_builtin_and_without_processes_an_eventmq_scheduler_gets_waiting_schedules():
    sim = Sim("2025-01-01T00:00:00", builtin=False)
    sim.schedule(interval=10)
    sim.commit()
    sim.frontend(b"late", Inform(new_msgid(), None, "scheduler"))
    sim.commit()
    (msg,) = [m for _, _, m in sim.taken(b"late") if m.command.value == "SCHEDULE"]
    assert not msg.headers.nohaste, "it never ran: EventMQ may run it at once"


# ---------------------------------------------------------------- queries


def query_schedule(sim: Sim, **fields):
    params = {"queue": "default", "headers": "", "interval": 10, "cron": "", **fields}
    params.setdefault("body", msgspec.json.decode(BODY))
    return sim.query("schedule", **params)


def test_schedule_queries():
    sim = Sim("2025-01-01T00:00:00")
    answer = query_schedule(sim, headers="nohaste", interval=60)["value"]
    assert answer["id"] == SID and answer["status"] == "created" and answer["every"] == 60
    assert answer["next_run"] == ms("2025-01-01T00:01:00") / 1000
    assert answer["target"] == "pkg.mod:fn" and answer["args"] == [1]
    assert query_schedule(sim, headers="nohaste", interval=60)["value"]["status"] == "unchanged"
    (listed,) = sim.query("schedules")["value"]
    assert listed["run_by"] == "broker" and listed["runs"] == 0
    assert sim.query("unschedule", id=SID)["value"]["state"] == "unscheduled"
    # Sent again (a client whose answer was lost): the same answer.
    assert sim.query("unschedule", id=SID)["value"]["state"] == "unscheduled"
    assert sim.query("unschedule", id="f" * 40)["error"]["type"] == "NotFound"
    bad = query_schedule(sim, interval=-1, cron="99 * * * *")["error"]
    assert bad["type"] == "BadRequest" and "99 * * * *" in bad["message"]
    assert query_schedule(sim, body=["run", {"path": 3}])["error"]["type"] == "BadRequest"
    for wrong in ({"interval": "10"}, {"interval": True}, {"queue": 3}, {"color": "red"}):
        assert query_schedule(sim, **wrong)["error"]["type"] == "BadRequest", wrong
    assert sim.query("unschedule", id=3)["error"]["type"] == "BadRequest"
    assert sim.query("schedules", all=True)["error"]["type"] == "BadRequest"


def test_a_tick_job_cancelled_before_it_is_stored_never_runs():
    sim = Sim("2025-01-01T00:00:00")
    sim.schedule(interval=10, queue="fresh")
    (job_id,) = [j for j in sim.core.jobs if "@" in j]
    assert sim.core.cancel(job_id, sim.now) == "queued"
    sim.commit()
    assert sim.store.jobs[job_id].state == "cancelled"
    assert not sim.core.queues["fresh"].waiting


def test_schedule_query_answer_waits_for_the_store():
    sim = Sim("2025-01-01T00:00:00")
    sim.frontend(b"c", Query("q", "schedule", {"interval": 5, "body": ["run", {}]}))
    assert not sim.core.acks  # refused at once: nothing to store
    params = {"interval": 5, "body": msgspec.json.decode(BODY)}
    sim.frontend(b"c", Query("q2", "schedule", params))
    assert [f[-1] for _, _, f in sim.core.acks] == [b"q2"]
    assert not [f for _, _, f in sim.core.outbox if f[-1] == b"q2"]


# ---------------------------------------------------------------- bad input

schedule_frames = st.tuples(
    st.sampled_from([b"SCHEDULE", b"UNSCHEDULE"]),
    st.lists(
        st.one_of(
            st.binary(max_size=12),
            st.sampled_from(
                [b"default", b"", b"nohaste", b"run_count:x", b"run_count:0", b"-1", b"0", b"10"]
                + [b"* * * * *", b"61 * * * *", b"*/5", BODY, b'["run", {}]', b"{}", b"\xff"]
            ),
        ),
        max_size=8,
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(schedule_frames, min_size=1, max_size=5))
def test_bad_schedule_frames_are_refused_counted_and_the_broker_keeps_serving(messages):
    sim = Sim("2025-01-01T00:00:00")
    for command, rest in messages:
        frames = [b"", PROTOCOL, command, b"m", *rest]
        before = sum(sim.core.stats.malformed.values())
        sim.core.on_frontend(b"c", frames, sim.now)
        sim.commit()
        answers = [m for _, _, m in sim.taken(b"c") if m.command.value in ("REPLY", "ERROR")]
        assert len(answers) == 1, answers
        if answers[0].command.value == "ERROR":
            assert answers[0].reason and answers[0].detail
            assert sum(sim.core.stats.malformed.values()) == before + 1
        sim.run_until(sim.wall + 30_000)
    job = new_msgid()
    sim.frontend(b"c", Request(job, "default", parse_headers(""), BODY))
    sim.commit()
    assert [m.ref for _, _, m in sim.taken(b"c") if m.command.value == "REPLY"] == [job]
