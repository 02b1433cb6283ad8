"""When a schedule's ticks fall: a fixed interval grid, or a cron expression in a time zone.

Times are integer milliseconds since the epoch (UTC), so that every scheduler
computes bit-identical tick instants and so identical tick ids.

Cron follows croniter, including its handling of daylight-saving changes: a
time skipped when clocks go forward runs at the first instant after the gap.
When clocks go back, a wall-clock time that occurs twice runs once if the
expression names a fixed minute and hour (``30 2 * * *``), and at both
instants if its minute or hour field starts with ``*`` (``0 * * * *``,
``*/15 * * * *``): the rule classic cron daemons follow, so a daily job does
not run twice on that night and an hourly one does not leave a two-hour gap.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter
from croniter.croniter import CroniterError

from corral.protocol import ProtocolError

#: How far cron searches for a next instant before calling an expression empty.
_CRON_SEARCH_LIMIT = 64


class Cadence(Protocol):
    def after(self, t: int) -> int | None:
        """The first instant strictly after ``t``."""

    def at_or_before(self, t: int) -> int | None:
        """The last instant at or before ``t``."""

    def contains(self, t: int) -> bool: ...


class IntervalCadence:
    """Instants ``anchor + k * step`` for every integer ``k`` (milliseconds)."""

    __slots__ = ("anchor", "step")

    def __init__(self, anchor: int, step: int) -> None:
        if step <= 0:
            raise ValueError("an interval must be positive")
        self.anchor = anchor
        self.step = step

    def after(self, t: int) -> int:
        return self.anchor + ((t - self.anchor) // self.step + 1) * self.step

    def at_or_before(self, t: int) -> int:
        return self.anchor + ((t - self.anchor) // self.step) * self.step

    def contains(self, t: int) -> bool:
        return (t - self.anchor) % self.step == 0


def zone(name: str) -> ZoneInfo:
    """The time zone ``name`` (``UTC``, ``Europe/Paris``); ValueError with advice if unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(
            f"unknown time zone {name!r}: use an IANA name such as UTC or Europe/Paris"
        ) from None


class CronCadence:
    """The instants a 5-field cron expression names, read as wall-clock time in ``tz``."""

    __slots__ = ("expr", "tz", "_wild")

    def __init__(self, expr: str, tz: ZoneInfo) -> None:
        fields = expr.split()
        if len(fields) != 5:
            raise ProtocolError("bad-schedule", f"cron {expr!r} needs 5 fields")
        if not croniter.is_valid(expr):
            raise ProtocolError("bad-schedule", f"cron {expr!r} is not a valid expression")
        self.expr = " ".join(fields)
        self.tz = tz
        self._wild = fields[0].startswith("*") or fields[1].startswith("*")
        try:
            croniter(self.expr, datetime.now(tz)).get_next(float)
        except CroniterError:
            raise ProtocolError("bad-schedule", f"cron {expr!r} never fires") from None

    def _repeated(self, ts: float) -> bool:
        # The second pass through a wall-clock hour that occurs twice (clocks went back).
        local = datetime.fromtimestamp(ts, self.tz)
        return (
            local.fold == 1
            and local.replace(fold=0).utcoffset() != local.utcoffset()
            and not self._wild
        )

    def after(self, t: int) -> int | None:
        it = croniter(self.expr, datetime.fromtimestamp(t / 1000, self.tz))
        for _ in range(_CRON_SEARCH_LIMIT):
            try:
                ts = it.get_next(float)
            except CroniterError:
                return None
            if not self._repeated(ts):
                return round(ts * 1000)
        return None

    def at_or_before(self, t: int) -> int | None:
        it = croniter(self.expr, datetime.fromtimestamp((t + 1) / 1000, self.tz))
        for _ in range(_CRON_SEARCH_LIMIT):
            try:
                ts = it.get_prev(float)
            except CroniterError:
                return None
            if not self._repeated(ts):
                return round(ts * 1000)
        return None

    def contains(self, t: int) -> bool:
        return self.after(t - 1) == t
