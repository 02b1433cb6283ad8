"""Names of schedules and of their ticks.

A schedule is named by EventMQ's rule, so that corral and EventMQ peers agree
on which SCHEDULE an UNSCHEDULE means: the sha1 of the run body's six fields
as ``json.dumps(..., sort_keys=True)`` writes them (queue, interval and cron
are not part of it). A tick -- one run of a schedule -- is named by its
schedule and its instant, so every scheduler that fires the same tick sends
the same job id and the broker can refuse all but the first.
"""

from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta

from corral.protocol import ProtocolError

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_TICK_ID = re.compile(r"([0-9a-f]{40})@(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3})Z")


def schedule_id(body: bytes) -> str:
    """The id of the schedule whose REQUEST body is ``body`` (a valid ``["run", {...}]``).

    Fields missing from the body count with their defaults (``[]`` and ``{}``);
    EventMQ requires all six, so for its messages this is exactly its hash.
    """
    try:
        _, params = json.loads(body)
        fields = {
            "args": params.get("args", []),
            "kwargs": params.get("kwargs", {}),
            "class_args": params.get("class_args", []),
            "class_kwargs": params.get("class_kwargs", {}),
            "path": params["path"],
            "callable": params["callable"],
        }
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ProtocolError("bad-body", f"not a run body: {exc}") from None
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()


def ms_to_iso(ms: int) -> str:
    """``1743296400000`` -> ``"2025-03-30T01:00:00.000Z"`` (exact, UTC)."""
    dt = _EPOCH + ms * _MS
    return f"{dt:%Y-%m-%dT%H:%M:%S}.{dt.microsecond // 1000:03d}Z"


def tick_id(sched_id: str, tick: int) -> str:
    """The job id of ``sched_id``'s tick at ``tick`` (milliseconds since the epoch)."""
    return f"{sched_id}@{ms_to_iso(tick)}"


def parse_tick_id(text: str) -> tuple[str, int] | None:
    """``(schedule id, tick ms)`` for a tick's job id, else ``None``."""
    if "@" not in text:
        return None
    match = _TICK_ID.fullmatch(text)
    if match is None:
        return None
    try:
        dt = datetime.strptime(match[2], "%Y-%m-%dT%H:%M:%S.%f").replace(tzinfo=UTC)
    except ValueError:
        return None
    ms = (dt - _EPOCH) // _MS
    return (match[1], ms) if ms_to_iso(ms) == match[2] + "Z" else None
