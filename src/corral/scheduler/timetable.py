"""Which schedules are due when: a heap of next ticks, given the time from outside.

The timetable never reads a clock: :meth:`Timetable.due` is told ``now`` and
answers with the ticks to fire, each already recorded as fired, so calling it
twice with the same time never gives the same tick twice. Only *planned*
schedules (those this process fires) are in the heap; others are kept for
bookkeeping and arbitration.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

from corral.scheduler.model import Schedule


class Timetable:
    def __init__(self) -> None:
        self.schedules: dict[str, Schedule] = {}
        self._heap: list[tuple[int, int, str]] = []
        self._versions = 0

    def __len__(self) -> int:
        return len(self.schedules)

    def __iter__(self) -> Iterator[Schedule]:
        return iter(list(self.schedules.values()))

    def get(self, sched_id: str) -> Schedule | None:
        return self.schedules.get(sched_id)

    def add(self, s: Schedule, *, planned: bool = True) -> None:
        """Add or replace ``s`` (by id); ``planned``: this process fires its ticks."""
        self.schedules[s.id] = s
        if planned:
            self.plan(s)
        else:
            self.unplan(s)

    def remove(self, sched_id: str) -> Schedule | None:
        s = self.schedules.pop(sched_id, None)
        if s is not None:
            self.unplan(s)
        return s

    def plan(self, s: Schedule) -> None:
        """(Re)compute ``s``'s next tick and put it in the heap."""
        self._versions += 1
        s.version = self._versions
        s.next_tick = s.next_valid(s.last_tick)
        if s.next_tick is not None:
            heapq.heappush(self._heap, (s.next_tick, s.version, s.id))

    def unplan(self, s: Schedule) -> None:
        """Stop firing ``s`` here (its heap entry goes stale)."""
        self._versions += 1
        s.version = self._versions
        s.next_tick = None

    def record(self, s: Schedule, tick: int, *, fired: bool = True) -> None:
        """``tick`` of ``s`` ran (or, ``fired=False``, was skipped); plan the next one."""
        s.last_tick = tick
        if fired:
            s.last_run = tick
            s.runs += 1
        if s.next_tick is not None:
            self.plan(s)

    def due(self, now: int) -> list[tuple[Schedule, int]]:
        """Planned schedules due at ``now``, each with its latest due tick, recorded as fired."""
        fired: list[tuple[Schedule, int]] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, version, sched_id = heapq.heappop(heap)
            s = self.schedules.get(sched_id)
            if s is None or s.version != version:
                continue
            tick = s.latest_due(now)
            if tick is None:
                # Only a cadence that stops (a cron date that never comes) gets here.
                s.next_tick = s.next_valid(now)
                if s.next_tick is not None:
                    heapq.heappush(heap, (s.next_tick, s.version, s.id))
                continue
            self.record(s, tick)
            fired.append((s, tick))
        return fired

    def skip_missed(self, now: int) -> list[tuple[Schedule, int]]:
        """Record every planned schedule's due ticks as skipped; return ``(schedule, latest)``."""
        skipped = []
        for s in self.schedules.values():
            if s.next_tick is None or s.next_tick > now:
                continue
            tick = s.latest_due(now)
            if tick is not None:
                self.record(s, tick, fired=False)
                skipped.append((s, tick))
        return skipped

    def next_due(self) -> int | None:
        """When the earliest planned tick falls (ms), or ``None``."""
        heap = self._heap
        while heap:
            tick, version, sched_id = heap[0]
            s = self.schedules.get(sched_id)
            if s is not None and s.version == version:
                return tick
            heapq.heappop(heap)
        return None
