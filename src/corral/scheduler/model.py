"""A schedule: what to run, where, and when its ticks fall; and its stored form.

A schedule's *valid ticks* are its anchor (the instant it was scheduled) unless
it has ``nohaste``, and every instant of its cadence after the anchor. It
fires each valid tick after ``last_tick`` once; ticks that fell due together
(the broker was down, the loop was stalled) fire as one, at the latest of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo

import msgspec

from corral.protocol import Headers, ProtocolError, RunParams, decode_body, parse_headers
from corral.protocol import Schedule as ScheduleMessage
from corral.scheduler.cadence import Cadence, CronCadence, IntervalCadence
from corral.scheduler.ids import schedule_id
from corral.store.base import ScheduleRecord

#: ``owner`` of schedules the broker's own pool fires (its built-in scheduler
#: and corral's scheduler processes); else the identity of an EventMQ scheduler.
POOL = b""

ACTIVE = "active"
UNSCHEDULED = "unscheduled"
FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Schedule:
    id: str
    queue: str
    headers: Headers
    #: Seconds between ticks, or -1 for a cron schedule.
    interval: int
    cron: str
    body: bytes
    tz: ZoneInfo
    #: When it was scheduled (or last redefined), ms since the epoch.
    anchor: int
    #: The latest tick fired or skipped, ms; ``None`` before the first.
    last_tick: int | None = None
    #: The latest tick fired, ms.
    last_run: int | None = None
    runs: int = 0
    owner: bytes = POOL
    state: str = ACTIVE
    #: Wall-clock seconds of creation and of the last change.
    created: float = 0.0
    updated: float = 0.0
    #: The next valid tick after ``last_tick``, while the schedule is planned.
    next_tick: int | None = None
    #: Bumped on every (re)planning, so stale timetable entries are recognised.
    version: int = 0
    cadence: Cadence | None = None

    def __post_init__(self) -> None:
        if self.cadence is None:
            self.cadence = (
                CronCadence(self.cron, self.tz)
                if self.interval == -1
                else IntervalCadence(self.anchor, self.interval * 1000)
            )

    # ------------------------------------------------------------ ticks

    @property
    def haste(self) -> bool:
        return not self.headers.nohaste

    def next_valid(self, after: int | None) -> int | None:
        """The first valid tick strictly after ``after`` (``None``: the first of all)."""
        if self.haste and (after is None or self.anchor > after):
            return self.anchor
        assert self.cadence is not None
        return self.cadence.after(self.anchor if after is None else max(after, self.anchor))

    def latest_due(self, now: int) -> int | None:
        """The latest valid tick at or before ``now`` not yet fired or skipped."""
        assert self.cadence is not None
        tick = self.cadence.at_or_before(now)
        if tick is None or tick <= self.anchor:
            tick = self.anchor if self.haste and self.anchor <= now else None
        if tick is None or (self.last_tick is not None and tick <= self.last_tick):
            return None
        return tick

    def is_tick(self, t: int) -> bool:
        assert self.cadence is not None
        if t == self.anchor:
            return self.haste
        return t > self.anchor and self.cadence.contains(t)

    @property
    def exhausted(self) -> bool:
        limit = self.headers.run_count
        return limit is not None and self.runs >= limit

    def reanchor(self, anchor: int) -> None:
        """Continue the interval grid from ``anchor`` (a tick that already ran)."""
        self.anchor = anchor
        if self.interval != -1:
            self.cadence = IntervalCadence(anchor, self.interval * 1000)

    # ------------------------------------------------------------ what it runs

    def job_headers(self) -> Headers:
        """Headers of the jobs it emits: its own, without the scheduling-only ones.

        Nobody waits for a tick's outcome, so ``reply-requested`` is dropped too.
        """
        h = self.headers
        return Headers(
            guarantee=h.guarantee, retry_count=h.retry_count, timeout=h.timeout, extra=h.extra
        )

    def params(self) -> RunParams:
        return decode_body(self.body)

    def same_definition(self, other: Schedule) -> bool:
        return (
            self.queue == other.queue
            and self.headers == other.headers
            and self.interval == other.interval
            and self.cron == other.cron
            and self.params() == other.params()
        )

    def message(self, msgid: str, *, meta: dict[str, Any] | None = None) -> ScheduleMessage:
        return ScheduleMessage(
            msgid, self.queue, self.headers, self.interval, self.body, self.cron, meta
        )

    # ------------------------------------------------------------ views

    def view(self, run_by: str) -> dict[str, Any]:
        """The public shape of a schedule (clients, the CLI)."""
        p = self.params()
        target = f"{p.path}.{p.callable}" if ":" in p.path else f"{p.path}:{p.callable}"
        return {
            "id": self.id,
            "target": target,
            "args": p.args,
            "kwargs": p.kwargs,
            "queue": self.queue,
            "every": None if self.interval == -1 else self.interval,
            "cron": self.cron or None,
            "timezone": self.tz.key if self.interval == -1 else None,
            "headers": self.headers.encode(),
            "nohaste": self.headers.nohaste,
            "run_count": self.headers.run_count,
            "runs": self.runs,
            "last_run": None if self.last_run is None else self.last_run / 1000,
            "next_run": None if self.next_tick is None else self.next_tick / 1000,
            "run_by": run_by,
            "state": self.state,
            "created": self.created,
            "updated": self.updated,
        }


def from_message(msg: ScheduleMessage, tz: ZoneInfo, anchor: int) -> Schedule:
    """A new schedule from a SCHEDULE; ProtocolError ``bad-schedule`` if it can never run."""
    if msg.interval == -1:
        if not msg.cron:
            raise ProtocolError("bad-schedule", "interval -1 needs a cron string", msg.msgid)
    elif msg.interval <= 0 or msg.cron:
        raise ProtocolError(
            "bad-schedule", "give a positive interval, or -1 with a cron string", msg.msgid
        )
    try:
        return Schedule(
            id=schedule_id(msg.body),
            queue=msg.queue,
            headers=msg.headers,
            interval=msg.interval,
            cron=msg.cron,
            body=msg.body,
            tz=tz,
            anchor=anchor,
            created=anchor / 1000,
            updated=anchor / 1000,
        )
    except ProtocolError as exc:
        exc.msgid = msg.msgid
        raise


def to_record(s: Schedule) -> ScheduleRecord:
    return ScheduleRecord(
        id=s.id,
        state=s.state,
        queue=s.queue,
        headers=s.headers.encode(),
        interval=s.interval,
        cron=s.cron,
        body=s.body,
        anchor=s.anchor,
        last_tick=s.last_tick,
        last_run=s.last_run,
        runs=s.runs,
        owner=None if s.owner == POOL else s.owner.decode("utf-8", "backslashreplace"),
        created=s.created,
        updated=s.updated,
    )


def from_record(rec: ScheduleRecord, tz: ZoneInfo) -> Schedule:
    return Schedule(
        id=rec.id,
        queue=rec.queue,
        headers=parse_headers(rec.headers),
        interval=rec.interval,
        cron=rec.cron,
        body=rec.body,
        tz=tz,
        anchor=rec.anchor,
        last_tick=rec.last_tick,
        last_run=rec.last_run,
        runs=rec.runs,
        owner=POOL if rec.owner is None else rec.owner.encode(),
        state=rec.state,
        created=rec.created,
        updated=rec.updated,
    )


def args_view(value: Any) -> str:
    """Compact JSON of arguments, for tables."""
    return msgspec.json.encode(value).decode()
