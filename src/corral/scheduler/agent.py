"""The protocol of a ``corral scheduler`` process, without I/O.

The agent registers with a broker's frontend (INFORM ``scheduler`` with
corral's meta frame), receives a copy of every schedule the broker's pool
fires (SCHEDULE with meta: anchor, last tick, time zone) and every change,
and sends each due tick as a REQUEST whose id names the schedule and the
tick. Any number of agents (and the broker's built-in scheduler) may fire the
same tick: the broker keeps the first and refuses the others, so running two
gives redundancy, never a second run. A tick is re-sent until the broker
answers it, because a broker that died while receiving it may not have it.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections import Counter
from dataclasses import dataclass, field

from corral.protocol import (
    DEFAULT_FRONTEND,
    Ack,
    Error,
    Heartbeat,
    Inform,
    Kbye,
    ProtocolError,
    Reply,
    Request,
    Unschedule,
    new_msgid,
    parse,
)
from corral.protocol import Schedule as ScheduleMessage
from corral.scheduler.cadence import zone
from corral.scheduler.ids import schedule_id, tick_id
from corral.scheduler.model import Schedule, from_message
from corral.scheduler.timetable import Timetable

log = logging.getLogger("corral.scheduler")


@dataclass(slots=True)
class AgentConfig:
    """``broker``: the frontend to connect to; ``identity``: kept for the process's life."""

    broker: str = DEFAULT_FRONTEND
    identity: str = field(default_factory=lambda: str(uuid.uuid4()))
    heartbeat_interval: float = 3.0
    heartbeat_liveness: int = 3
    #: Seconds between sends of a tick the broker has not answered yet.
    resend_interval: float = 3.0


class SchedulerAgent:
    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.table = Timetable()
        #: Messages to send (frames after the identity).
        self.out: list[list[bytes]] = []
        self.joined = False
        #: Add to a monotonic ``now`` to get wall-clock seconds (set by the shell).
        self.wall_offset = 0.0
        #: Ticks sent and not yet answered: id -> (frames, when last sent).
        self.pending: dict[str, tuple[list[bytes], float]] = {}
        self._pending_by_schedule: dict[str, str] = {}
        self.stats: Counter[str] = Counter()
        self._inform_id = ""
        self._inform_sent = -math.inf
        self._last_heard = 0.0
        self._last_heartbeat = -math.inf

    # ------------------------------------------------------------ driving

    def start(self, now: float) -> None:
        self._last_heard = now
        self._inform(now)

    def stop(self) -> None:
        self.out.append(Kbye(new_msgid()).to_frames())

    def tick(self, now: float) -> float:
        """Send due ticks, re-sends and heartbeats; return when to call again (monotonic)."""
        cfg = self.config
        # Also while registering again: tick ids carry all the broker needs.
        for s, tick in self.table.due(self._wall(now)):
            self._fire(s, tick, now)
        for tid, (frames, sent) in list(self.pending.items()):
            if now - sent >= cfg.resend_interval:
                self.out.append(frames)
                self.pending[tid] = (frames, now)
                self.stats["resent"] += 1
        if now - self._last_heartbeat >= cfg.heartbeat_interval:
            self._last_heartbeat = now
            self.out.append(Heartbeat(new_msgid(), now + self.wall_offset).to_frames())
        silent = now - self._last_heard
        if self.joined and silent > cfg.heartbeat_interval * cfg.heartbeat_liveness:
            log.warning("no word from the broker for %.1f s; registering again", silent)
            self._inform(now)
        elif not self.joined and now - self._inform_sent > cfg.heartbeat_interval:
            self._inform(now)
        wake = now + cfg.heartbeat_interval / 3
        due = self.table.next_due()
        if due is not None:
            wake = min(wake, (due + 1) / 1000 - self.wall_offset)
        if self.pending:
            wake = min(wake, min(sent for _, sent in self.pending.values()) + cfg.resend_interval)
        return wake

    def on_message(self, frames: list[bytes], now: float) -> None:
        self._last_heard = now
        try:
            msg = parse(frames)
        except ProtocolError as exc:
            log.warning("bad message from the broker: %s", exc)
            return
        if isinstance(msg, Unschedule):
            self._drop(schedule_id(msg.body))
        elif isinstance(msg, ScheduleMessage):
            self._on_schedule(msg, now)
        elif isinstance(msg, Ack):
            if msg.acked == self._inform_id and not self.joined:
                self.joined = True
                # The broker follows this ACK with every schedule this process fires.
                self.table = Timetable()
                log.info("registered with the broker at %s", self.config.broker)
        elif isinstance(msg, Reply):
            if self.pending.pop(msg.ref, None) is not None:
                self.stats["accepted"] += 1
        elif isinstance(msg, Error):
            self._on_error(msg)
        elif isinstance(msg, Kbye):
            log.warning("the broker is shutting down; waiting for it to come back")
            self.joined = False
        elif not isinstance(msg, Heartbeat):
            log.debug("ignored %s from the broker", msg.command.value)

    # ------------------------------------------------------------ internals

    def _wall(self, now: float) -> int:
        return round((now + self.wall_offset) * 1000)

    def _inform(self, now: float) -> None:
        self.joined = False
        self._inform_id = new_msgid()
        self._inform_sent = now
        self.out.append(Inform(self._inform_id, None, "scheduler", {"corral": 1}).to_frames())

    def _on_schedule(self, msg: ScheduleMessage, now: float) -> None:
        meta = msg.meta
        if meta is None:
            log.warning("a SCHEDULE without corral's meta frame is ignored (not from a broker?)")
            return
        try:
            s = from_message(msg, zone(str(meta.get("tz", "UTC"))), int(meta["anchor"]))
            last = meta.get("last_tick")
            s.last_tick = None if last is None else int(last)
        except (ProtocolError, ValueError, KeyError, TypeError) as exc:
            log.warning("cannot run schedule from the broker: %s", exc)
            return
        if meta.get("sync") and meta.get("missed") == "skip":
            # Ticks that fell due while no scheduler ran are skipped, as the broker would.
            missed = s.latest_due(self._wall(now))
            if missed is not None:
                s.last_tick = missed
        self.table.add(s)

    def _fire(self, s: Schedule, tick: int, now: float) -> None:
        tid = tick_id(s.id, tick)
        frames = Request(tid, s.queue, s.job_headers(), s.body).to_frames()
        older = self._pending_by_schedule.pop(s.id, None)
        if older is not None:
            self.pending.pop(older, None)  # a newer tick supersedes it
        self.pending[tid] = (frames, now)
        self._pending_by_schedule[s.id] = tid
        self.out.append(frames)
        self.stats["sent"] += 1
        log.debug("tick %s sent", tid)

    def _drop(self, sched_id: str) -> None:
        self.table.remove(sched_id)
        tid = self._pending_by_schedule.pop(sched_id, None)
        if tid is not None:
            self.pending.pop(tid, None)

    def _on_error(self, msg: Error) -> None:
        if self.pending.pop(msg.ref, None) is None:
            log.warning("the broker refused a message: %s (%s)", msg.reason, msg.detail)
            return
        self.stats[f"refused:{msg.reason}"] += 1
        sched_id = msg.ref.partition("@")[0]
        if self._pending_by_schedule.get(sched_id) == msg.ref:
            del self._pending_by_schedule[sched_id]
        if msg.reason == "duplicate-id":
            log.debug("tick %s already ran", msg.ref)
        elif msg.reason in ("unknown-schedule", "not-owner"):
            log.info("schedule %s is not this process's to run: %s", sched_id, msg.detail)
            self._drop(sched_id)
        else:
            log.warning("tick %s refused: %s (%s)", msg.ref, msg.reason, msg.detail)
