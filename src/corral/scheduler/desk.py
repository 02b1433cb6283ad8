"""The broker's side of scheduling: the schedule table, who fires what, and which tick counts.

The broker is the arbiter of every tick. A schedule is fired either by the
broker's *pool* -- its built-in scheduler and any number of corral scheduler
processes, which all compute the same tick ids so the broker keeps the first
and refuses the rest -- or by exactly one EventMQ scheduler, which cannot name
its ticks and so must be the only one firing that schedule:

* a SCHEDULE goes to one connected EventMQ scheduler (round-robin, as EventMQ
  routes it), which then owns it; with none connected the pool owns it;
* an UNSCHEDULE goes to every EventMQ scheduler and every corral scheduler;
* an EventMQ scheduler that leaves (goodbye, silence) gives its schedules
  back to the pool, which continues their cadence from their last tick;
* a tick is accepted only from the schedule's owner, only once, and only if
  the schedule is still scheduled, so a tick of a schedule that was
  unscheduled, finished or taken back is refused whoever sends it.

Everything here is sans-IO: times are milliseconds since the epoch given by
the caller, messages for scheduler peers go through ``send``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec

from corral.protocol import (
    PROTOCOL,
    Headers,
    ProtocolError,
    Request,
    Unschedule,
    encode_outcome_error,
    new_msgid,
    parse,
)
from corral.protocol import Schedule as ScheduleMessage
from corral.scheduler.cadence import zone
from corral.scheduler.ids import ms_to_iso, parse_tick_id, schedule_id
from corral.scheduler.model import (
    FINISHED,
    POOL,
    UNSCHEDULED,
    Schedule,
    from_message,
    from_record,
    to_record,
)
from corral.scheduler.timetable import Timetable
from corral.store.base import ScheduleRecord

log = logging.getLogger("corral.scheduler")

MISSED_POLICIES = ("coalesce", "skip")
#: QUERY ops about schedules, answered by the desk.
OPS = frozenset({"schedule", "unschedule", "schedules"})


@dataclass(slots=True)
class SchedulerConfig:
    """How a broker runs schedules.

    ``builtin``: the broker fires the pool's schedules itself (default); without
    it only connected scheduler processes do. ``timezone``: how cron
    expressions read wall-clock time (default ``UTC``). ``missed``: what to do
    with ticks that fell due while the broker was down: ``coalesce`` them into
    one run at start (default) or ``skip`` them. ``max_skew``: seconds a
    scheduler process's tick may be ahead of the broker's clock.
    """

    builtin: bool = True
    timezone: str = "UTC"
    missed: str = "coalesce"
    max_skew: float = 5.0
    #: EventMQ schedulers remembered after they left, to refuse their late ticks.
    former_memory: int = 1024


class Claim(NamedTuple):
    schedule: Schedule
    tick: int


class Refusal(NamedTuple):
    reason: str
    detail: str


class ScheduleDesk:
    def __init__(self, config: SchedulerConfig, send: Callable[[bytes, list[bytes]], None]) -> None:
        if config.missed not in MISSED_POLICIES:
            raise ValueError(f"missed ticks policy must be coalesce or skip, not {config.missed!r}")
        self.config = config
        self.tz = zone(config.timezone)
        self.table = Timetable()
        self.send = send
        #: Connected EventMQ schedulers, in the order they joined.
        self.eventmq: list[bytes] = []
        #: Connected corral scheduler processes.
        self.corral: list[bytes] = []
        self.former: OrderedDict[bytes, None] = OrderedDict()
        #: Schedules changed since the last :meth:`take_changes`.
        self.dirty: dict[str, Schedule] = {}
        self.fired = 0
        self.refused: Counter[str] = Counter()
        self._rr = -1
        self._warned: OrderedDict[tuple[bytes, str], None] = OrderedDict()
        #: Views of schedules recently unscheduled or finished, so that an
        #: ``unschedule`` sent again (its answer was lost) gets the same answer.
        self._retired: OrderedDict[str, dict[str, Any]] = OrderedDict()

    # ------------------------------------------------------------ definitions

    def define(self, msg: ScheduleMessage, now: int) -> tuple[Schedule, str]:
        """Create or change a schedule; ``(schedule, "created" | "updated" | "unchanged")``.

        Scheduling the same definition again changes nothing (a client may
        resend a SCHEDULE it got no answer to); a changed definition starts
        over from ``now``, and runs at once unless it has ``nohaste``.
        """
        new = from_message(msg, self.tz, now)
        old = self.table.get(new.id)
        if old is not None and old.same_definition(new):
            return old, "unchanged"
        owner: bytes | None = None
        if old is not None:
            new.created = old.created
            # Ticks of the old definition stay fired: none of them may run again.
            new.last_tick, new.last_run = old.last_tick, old.last_run
            if old.owner in self.eventmq:
                owner = old.owner
        if owner is None:
            owner = self._next_eventmq()
        new.owner = owner
        self.table.add(new, planned=owner == POOL)
        self.dirty[new.id] = new
        if owner == POOL:
            self._tell_corral(new)
        else:
            self._hand(new, owner, resume=False)
            if old is not None and old.owner == POOL:
                self._untell_corral(new)
        status = "updated" if old is not None else "created"
        log.info("schedule %s %s (%s), run by %s", new.id, status, _when(new), self.run_by(new))
        return new, status

    def undefine(
        self, sched_id: str, now: int, forward: list[bytes] | None = None
    ) -> Schedule | None:
        """Unschedule ``sched_id`` and tell every scheduler peer (``forward``: frames to send)."""
        s = self.table.remove(sched_id)
        if s is not None:
            s.state = UNSCHEDULED
            s.updated = now / 1000
            self.dirty[s.id] = s
            self._retire(s)
            log.info("schedule %s unscheduled after %d run(s)", s.id, s.runs)
            if forward is None:
                forward = _unschedule_frames(s.queue, s.body)
        if forward is not None:
            for peer in [*self.eventmq, *self.corral]:
                self.send(peer, forward)
        return s

    def _finish(self, s: Schedule, now: int) -> None:
        self.table.remove(s.id)
        s.state = FINISHED
        s.updated = now / 1000
        self.dirty[s.id] = s
        self._retire(s)
        log.info("schedule %s finished: it ran its %d time(s)", s.id, s.runs)
        frames = _unschedule_frames(s.queue, s.body)
        for peer in [*([s.owner] if s.owner != POOL else []), *self.corral]:
            self.send(peer, frames)

    # ------------------------------------------------------------ scheduler peers

    def joined(self, identity: bytes, *, corral: bool) -> None:
        """A scheduler INFORMed (it was acknowledged just before)."""
        self.left(identity, quiet=True)
        if corral:
            self.corral.append(identity)
            for s in self.table:
                if s.owner == POOL:
                    self._tell_corral(s, to=[identity], sync=True)
            return
        self.eventmq.append(identity)
        self.former.pop(identity, None)
        if not self._pool_fires():
            for s in self.table:
                if s.owner == POOL:
                    self._hand(s, identity, resume=True)

    def left(self, identity: bytes, *, quiet: bool = False) -> None:
        """A scheduler said goodbye, went silent or re-INFORMed."""
        if identity in self.corral:
            self.corral.remove(identity)
        if identity not in self.eventmq:
            return
        self.eventmq.remove(identity)
        self._remember(identity)
        owned = [s for s in self.table if s.owner == identity]
        if owned and not quiet:
            log.warning(
                "EventMQ scheduler %s left; %d schedule(s) it ran go back to %s",
                _name(identity),
                len(owned),
                "the broker" if self._pool_fires() or not self.eventmq else "another scheduler",
            )
        for s in owned:
            self._take_back(s)

    def _take_back(self, s: Schedule) -> None:
        if s.last_tick is not None:
            # Continue the cadence it ran at: the next tick one interval after its last.
            s.reanchor(s.last_tick)
        s.owner = POOL
        self.dirty[s.id] = s
        if not self._pool_fires() and self.eventmq:
            self._hand(s, self._next_eventmq(), resume=True)
            return
        self.table.plan(s)
        self._tell_corral(s)

    def _hand(self, s: Schedule, to: bytes, *, resume: bool) -> None:
        """Give ``s`` to the EventMQ scheduler ``to``, which fires it from now on.

        ``resume``: ``s`` is not new, so if it already ran it must not run at once.
        """
        if s.owner == POOL:
            self.table.unplan(s)
            self._untell_corral(s)
        s.owner = to
        self.dirty[s.id] = s
        headers = s.headers
        if resume and s.last_tick is not None and not headers.nohaste:
            # EventMQ runs a schedule on receipt unless told not to.
            headers = dataclasses.replace(headers, nohaste=True)
        if headers.run_count is not None:
            headers = dataclasses.replace(headers, run_count=headers.run_count - s.runs)
        msg = ScheduleMessage(new_msgid(), s.queue, headers, s.interval, s.body, s.cron)
        self.send(to, msg.to_frames())

    def _pool_fires(self) -> bool:
        return self.config.builtin or bool(self.corral)

    def _next_eventmq(self) -> bytes:
        if not self.eventmq:
            return POOL
        self._rr = (self._rr + 1) % len(self.eventmq)
        return self.eventmq[self._rr]

    def _retire(self, s: Schedule) -> None:
        self._retired[s.id] = self._view(s)
        self._retired.move_to_end(s.id)
        if len(self._retired) > self.config.former_memory:
            self._retired.popitem(last=False)

    def _remember(self, identity: bytes) -> None:
        self.former[identity] = None
        if len(self.former) > self.config.former_memory:
            self.former.popitem(last=False)

    def _tell_corral(self, s: Schedule, to: list[bytes] | None = None, sync: bool = False) -> None:
        meta = {
            "anchor": s.anchor,
            "last_tick": s.last_tick,
            "tz": s.tz.key,
            "missed": self.config.missed,
            "sync": sync,
        }
        frames = s.message(new_msgid(), meta=meta).to_frames()
        for peer in self.corral if to is None else to:
            self.send(peer, frames)

    def _untell_corral(self, s: Schedule) -> None:
        frames = _unschedule_frames(s.queue, s.body)
        for peer in self.corral:
            self.send(peer, frames)

    def run_by(self, s: Schedule) -> str:
        if s.owner != POOL:
            return f"EventMQ scheduler {_name(s.owner)}"
        return "broker" if self.config.builtin else "scheduler processes"

    # ------------------------------------------------------------ ticks

    def due(self, now: int) -> list[Claim]:
        """Ticks the built-in scheduler fires now (each recorded as fired)."""
        if not self.config.builtin:
            return []
        claims = [Claim(s, tick) for s, tick in self.table.due(now)]
        for claim in claims:
            self._fired(claim.schedule, now)
        return claims

    def next_due(self) -> int | None:
        return self.table.next_due() if self.config.builtin else None

    def is_tick(self, identity: bytes, msgid: str) -> bool:
        """Whether a REQUEST is a scheduler's tick (and so needs :meth:`claim`)."""
        return (
            identity in self.former
            or identity in self.eventmq
            or ("@" in msgid and parse_tick_id(msgid) is not None)
        )

    def claim(self, identity: bytes, msg: Request, now: int) -> Claim | Refusal:
        """Accept (and record) or refuse a tick sent by a scheduler."""
        parsed = parse_tick_id(msg.msgid)
        if parsed is not None:
            answer = self._claim_named(*parsed, now)
        else:
            answer = self._claim_eventmq(identity, msg, now)
        if isinstance(answer, Refusal):
            self.refused[answer.reason] += 1
        return answer

    def _claim_named(self, sched_id: str, tick: int, now: int) -> Claim | Refusal:
        s = self.table.get(sched_id)
        when = ms_to_iso(tick)
        if s is None:
            return _gone(sched_id)
        if s.owner != POOL:
            return Refusal("not-owner", f"schedule {sched_id} is run by {self.run_by(s)}")
        if not s.is_tick(tick):
            return Refusal("bad-tick", f"{when} is not a tick of schedule {sched_id}")
        if s.last_tick is not None and tick <= s.last_tick:
            return Refusal(
                "duplicate-id", f"tick {when} of schedule {sched_id} has run (or was skipped)"
            )
        ahead = (tick - now) / 1000
        if ahead > self.config.max_skew:
            return Refusal(
                "early-tick",
                f"tick {when} is {ahead:.1f} s ahead of the broker's clock: check the clocks",
            )
        self.table.record(s, tick)
        self._fired(s, now)
        return Claim(s, tick)

    def _claim_eventmq(self, identity: bytes, msg: Request, now: int) -> Claim | Refusal:
        sched_id = schedule_id(msg.body)
        s = self.table.get(sched_id)
        if s is None:
            if (identity, sched_id) not in self._warned:
                self._warned[(identity, sched_id)] = None
                if len(self._warned) > self.config.former_memory:
                    self._warned.popitem(last=False)
                log.warning(
                    "EventMQ scheduler %s fires schedule %s, which this broker does not have "
                    "(unscheduled, finished, or restored by that scheduler from its own store): "
                    "its runs are refused; schedule it through the broker to run it",
                    _name(identity),
                    sched_id,
                )
            return _gone(sched_id)
        if s.owner != identity:
            if identity in self.eventmq:
                # Another one runs it (or the broker does): this one must stop.
                self.send(identity, _unschedule_frames(msg.queue, msg.body))
            return Refusal("not-owner", f"schedule {sched_id} is run by {self.run_by(s)}")
        tick = now if s.last_tick is None or now > s.last_tick else s.last_tick + 1
        self.table.record(s, tick)
        self._fired(s, now)
        return Claim(s, tick)

    def _fired(self, s: Schedule, now: int) -> None:
        self.fired += 1
        self.dirty[s.id] = s
        if s.exhausted:
            self._finish(s, now)

    # ------------------------------------------------------------ store

    def take_changes(self) -> list[ScheduleRecord]:
        records = [to_record(s) for s in self.dirty.values()]
        self.dirty = {}
        return records

    def restore(self, records: list[ScheduleRecord], now: int) -> None:
        """Take back stored schedules at start, applying the missed-ticks policy."""
        for rec in records:
            try:
                s = from_record(rec, self.tz)
            except (ProtocolError, ValueError) as exc:
                log.error("stored schedule %s cannot be read (%s); it is not run", rec.id, exc)
                continue
            if s.owner != POOL:
                # Its EventMQ scheduler will come back under a new name, if at all.
                self._remember(s.owner)
                s.owner = POOL
                if s.last_tick is not None:
                    s.reanchor(s.last_tick)
                self.dirty[s.id] = s
            self.table.add(s)
        skipped = self.table.skip_missed(now) if self.config.missed == "skip" else []
        for s, _ in skipped:
            self.dirty[s.id] = s
        if records:
            due = sum(1 for s in self.table if s.next_tick is not None and s.next_tick <= now)
            log.info(
                "restored %d schedule(s); %d with missed ticks %s",
                len(self.table),
                len(skipped) if skipped else due,
                "skipped" if skipped else "to run once now",
            )

    # ------------------------------------------------------------ queries

    def answer(self, op: str, params: dict[str, Any], now: int) -> tuple[bytes, bool]:
        """The outcome for a schedule QUERY, and whether it waits for the store."""
        try:
            if op == "schedules":
                msgspec.convert(params, _NoParams)
                return _value([self._view(s) for s in self.table]), False
            if op == "unschedule":
                sched_id = msgspec.convert(params, _UnscheduleParams).id
                s = self.undefine(sched_id, now)
                if s is not None:
                    return _value(self._view(s)), True
                if sched_id in self._retired:
                    return _value(self._retired[sched_id]), True
                raise _BadQuery("NotFound", f"no schedule {sched_id!r}")
            if op == "schedule":
                s, status = self.define(_schedule_message(params), now)
                # Even "unchanged" waits: an identical definition may not be stored yet.
                return _value({**self._view(s), "status": status}), True
        except _BadQuery as exc:
            return encode_outcome_error(exc.type, str(exc)), False
        except msgspec.ValidationError as exc:
            return encode_outcome_error("BadRequest", f"bad arguments for {op}: {exc}"), False
        except ProtocolError as exc:
            return encode_outcome_error("BadRequest", exc.detail), False
        return encode_outcome_error("BadRequest", f"unknown query op {op!r}"), False

    def _view(self, s: Schedule) -> dict[str, Any]:
        return s.view(self.run_by(s))

    def status(self) -> dict[str, Any]:
        return {
            "schedules": len(self.table),
            "ticks_fired": self.fired,
            "ticks_refused": dict(self.refused),
            "eventmq_schedulers": len(self.eventmq),
            "corral_schedulers": len(self.corral),
        }


class _BadQuery(Exception):
    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_


class _NoParams(msgspec.Struct, forbid_unknown_fields=True):
    pass


class _UnscheduleParams(msgspec.Struct, forbid_unknown_fields=True):
    id: str


class _ScheduleParams(msgspec.Struct, forbid_unknown_fields=True):
    """A ``schedule`` QUERY: SCHEDULE's fields, the body as JSON rather than text."""

    body: list[Any]
    queue: str = "default"
    headers: str = ""
    interval: int = -1
    cron: str = ""


def _schedule_message(params: dict[str, Any]) -> ScheduleMessage:
    """The SCHEDULE a ``schedule`` QUERY stands for, validated exactly as one from the wire."""
    p = msgspec.convert(params, _ScheduleParams)
    frames = [
        b"",
        PROTOCOL,
        b"SCHEDULE",
        new_msgid().encode(),
        p.queue.encode(),
        p.headers.encode(),
        str(p.interval).encode(),
        msgspec.json.encode(p.body),
        p.cron.encode(),
    ]
    msg = parse(frames)
    assert isinstance(msg, ScheduleMessage)
    return msg


def _unschedule_frames(queue: str, body: bytes) -> list[bytes]:
    return Unschedule(new_msgid(), queue, Headers(), -1, body, "").to_frames()


def _gone(sched_id: str) -> Refusal:
    return Refusal(
        "unknown-schedule",
        f"schedule {sched_id} is not scheduled here (unscheduled, finished or never scheduled)",
    )


def _value(value: Any) -> bytes:
    return msgspec.json.encode({"value": value})


def _name(identity: bytes) -> str:
    return identity.decode("utf-8", "backslashreplace")


def _when(s: Schedule) -> str:
    return f"every {s.interval} s" if s.interval != -1 else f"cron {s.cron!r} {s.tz.key}"
