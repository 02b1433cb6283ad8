"""The ``corral scheduler`` agent, alone and with a broker core, on an injected clock."""

from __future__ import annotations

from datetime import datetime
from zoneinfo import ZoneInfo

from corral.broker.core import BrokerConfig, BrokerCore, Dest
from corral.protocol import (
    Ack,
    Error,
    Inform,
    Reply,
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
from corral.scheduler.agent import AgentConfig, SchedulerAgent
from corral.scheduler.ids import parse_tick_id, schedule_id, tick_id
from corral.store.memory import MemoryStore

BODY = encode_body(RunParams("pkg.mod", "fn"))
SID = schedule_id(BODY)
T0 = round(datetime(2025, 1, 1, tzinfo=ZoneInfo("UTC")).timestamp() * 1000)


def agent_at(wall_ms: int = T0) -> tuple[SchedulerAgent, float]:
    agent = SchedulerAgent(AgentConfig(identity="a1", heartbeat_interval=1.0, resend_interval=2.0))
    now = 100.0
    agent.wall_offset = wall_ms / 1000 - now
    agent.start(now)
    return agent, now


def taken(agent: SchedulerAgent) -> list:
    out, agent.out = agent.out, []
    return [parse(f) for f in out]


def join(agent: SchedulerAgent, now: float) -> None:
    (inform,) = [m for m in taken(agent) if isinstance(m, Inform)]
    assert inform.kind == "scheduler" and inform.meta == {"corral": 1}
    agent.on_message(Ack(new_msgid(), inform.msgid).to_frames(), now)
    assert agent.joined


def sync(agent: SchedulerAgent, now: float, **meta) -> None:
    meta = {"anchor": T0, "last_tick": None, "tz": "UTC", "missed": "coalesce", **meta}
    msg = Schedule(new_msgid(), "q", parse_headers("nohaste,guarantee"), 10, BODY, "", meta)
    agent.on_message(msg.to_frames(), now)


def requests(agent: SchedulerAgent) -> list[Request]:
    return [m for m in taken(agent) if isinstance(m, Request)]


def test_agent_fires_named_ticks_and_resends_until_answered():
    agent, now = agent_at()
    join(agent, now)
    sync(agent, now)
    agent.tick(now)
    assert requests(agent) == []
    now += 10.0
    agent.tick(now)
    (req,) = requests(agent)
    assert req.msgid == tick_id(SID, T0 + 10_000)
    assert req.queue == "q" and req.headers == parse_headers("guarantee") and req.body == BODY
    agent.tick(now + 1.0)
    assert requests(agent) == []
    agent.tick(now + 2.0)
    assert [r.msgid for r in requests(agent)] == [req.msgid]  # no answer yet: sent again
    agent.on_message(Reply(new_msgid(), req.msgid).to_frames(), now + 2.1)
    agent.tick(now + 9.0)
    assert requests(agent) == [] and agent.stats["accepted"] == 1


def test_agent_wakes_for_the_next_tick():
    agent, now = agent_at(T0 + 3_000)
    join(agent, now)
    sync(agent, now)
    wake = agent.tick(now)
    assert abs((wake - now) - min(7.0, 1.0 / 3)) < 0.01
    agent.config.heartbeat_interval = 60.0
    assert abs(agent.tick(now) - (now + 7.001)) < 0.01


def test_agent_drops_what_the_broker_says_is_not_its_to_run():
    agent, now = agent_at()
    join(agent, now)
    sync(agent, now)
    now += 10.0
    agent.tick(now)
    (req,) = requests(agent)
    refusal = Error(new_msgid(), "unknown-schedule", "gone", req.msgid)
    agent.on_message(refusal.to_frames(), now)
    assert len(agent.table) == 0 and not agent.pending
    agent.tick(now + 30)
    assert requests(agent) == []


def test_agent_unschedule_and_duplicate_answers():
    agent, now = agent_at()
    join(agent, now)
    sync(agent, now)
    now += 10.0
    agent.tick(now)
    (req,) = requests(agent)
    agent.on_message(Error(new_msgid(), "duplicate-id", "ran", req.msgid).to_frames(), now)
    assert not agent.pending and len(agent.table) == 1
    unsched = Unschedule(new_msgid(), "q", parse_headers(""), -1, BODY, "")
    agent.on_message(unsched.to_frames(), now)
    assert len(agent.table) == 0


def test_agent_skips_ticks_missed_before_it_joined_when_told_to():
    agent, now = agent_at(T0 + 35_000)
    join(agent, now)
    sync(agent, now, missed="skip", sync=True)
    agent.tick(now)
    assert requests(agent) == []
    agent, now = agent_at(T0 + 35_000)
    join(agent, now)
    sync(agent, now, sync=True)  # coalesce: the latest missed tick runs once
    agent.tick(now)
    assert [r.msgid for r in requests(agent)] == [tick_id(SID, T0 + 30_000)]


def test_agent_heartbeats_and_registers_again_when_the_broker_is_silent():
    agent, now = agent_at()
    join(agent, now)
    agent.tick(now)
    assert [m.command.value for m in taken(agent)] == ["HEARTBEAT"]
    agent.tick(now + 3.5)  # 3 intervals of silence
    assert [m.command.value for m in taken(agent)] == ["HEARTBEAT", "INFORM"]
    assert not agent.joined


def test_agent_ignores_a_schedule_without_meta():
    agent, now = agent_at()
    join(agent, now)
    agent.on_message(Schedule(new_msgid(), "q", parse_headers(""), 10, BODY, "").to_frames(), now)
    assert len(agent.table) == 0


# ---------------------------------------------------------------- agents and a core together


class Wire:
    """A broker core and scheduler agents exchanging frames in memory, on one clock."""

    def __init__(self, agents: int) -> None:
        self.store = MemoryStore()
        self.core = BrokerCore(BrokerConfig(schedules=SchedulerConfig(builtin=False)))
        self.now = 100.0
        self.core.wall_offset = T0 / 1000 - self.now
        self.agents = {}
        for i in range(agents):
            agent = SchedulerAgent(AgentConfig(identity=f"s{i}"))
            agent.wall_offset = self.core.wall_offset
            agent.start(self.now)
            self.agents[f"s{i}".encode()] = agent
        self.deliver()

    def deliver(self) -> None:
        """Pass messages both ways (committing in between) until all is quiet."""
        moved = True
        while moved:
            moved = False
            for ident, agent in self.agents.items():
                out, agent.out = agent.out, []
                for frames in out:
                    self.core.on_frontend(ident, frames, self.now)
                    moved = True
            core = self.core
            jobs, workers, meta = core.take_changes()
            self.store.commit(jobs, workers, meta, core.take_schedule_changes())
            acks, core.acks = core.acks, []
            core.released(acks)
            core.committed(self.now)
            out, core.outbox = acks + core.outbox, []
            for dest, ident, frames in out:
                if dest is Dest.FRONTEND and ident in self.agents:
                    self.agents[ident].on_message(frames, self.now)
                    moved = True

    def run(self, seconds: float, step: float) -> None:
        end = self.now + seconds
        while self.now < end:
            self.now += step
            self.core.tick(self.now)
            for agent in self.agents.values():
                agent.tick(self.now)
            self.deliver()

    def ticks(self) -> list[int]:
        found = [parse_tick_id(j) for j in self.store.jobs]
        return sorted(t for s, t in filter(None, found) if s == SID)


def test_two_agents_one_job_per_tick_even_when_one_stops():
    wire = Wire(agents=2)
    client = Schedule(new_msgid(), "default", parse_headers(""), 5, BODY, "")
    wire.core.on_frontend(b"c", client.to_frames(), wire.now)
    wire.deliver()
    wire.run(21.0, step=0.25)
    assert wire.ticks() == [T0 + k * 5_000 for k in range(5)]
    refused = wire.core.status(wire.now)["ticks_refused"]
    assert refused == {"duplicate-id": 5}, "both fired every tick; one of each pair counted"
    del wire.agents[b"s0"]  # gone without a word
    wire.run(10.0, step=0.25)
    assert wire.ticks() == [T0 + k * 5_000 for k in range(7)]
