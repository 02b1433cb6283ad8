"""Wall-clock time for the I/O shells, which hand the sans-IO objects a monotonic ``now``.

Each object that needs wall-clock time (job timestamps, schedule ticks) keeps
a ``wall_offset`` to add to the monotonic clock; the shells keep it current.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

log = logging.getLogger("corral")


class HasWallOffset(Protocol):
    wall_offset: float


def follow_wall_clock(holder: HasWallOffset, now: float, tolerance: float = 1.0) -> None:
    """Re-read ``holder.wall_offset`` if the wall clock was stepped by more than ``tolerance`` s.

    Cron schedules follow wall-clock time; a clock set by hand, an NTP step
    or a resumed VM moves it against the monotonic clock ``now`` comes from.
    Smaller differences are left alone so that intervals keep their cadence.
    """
    offset = time.time() - now
    moved = offset - holder.wall_offset
    if abs(moved) > tolerance:
        log.warning("the wall clock moved by %+.1f s; schedules follow it", moved)
        holder.wall_offset = offset
