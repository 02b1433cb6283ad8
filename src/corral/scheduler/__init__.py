"""Interval and cron schedules: their ids, their ticks, and who fires them.

* :mod:`~corral.scheduler.ids` names schedules (EventMQ's hash) and ticks;
* :mod:`~corral.scheduler.cadence` says when ticks fall (interval grid, cron);
* :mod:`~corral.scheduler.model` and :mod:`~corral.scheduler.timetable` say
  which tick is due at a given time;
* :mod:`~corral.scheduler.desk` is the broker's side: the schedule table,
  routing to scheduler peers, and which tick counts;
* :mod:`~corral.scheduler.agent` and :mod:`~corral.scheduler.process` are
  the ``corral scheduler`` process.

All but the last are sans-IO: they are given the time and return decisions.
"""

from corral.scheduler.desk import SchedulerConfig

__all__ = ["SchedulerConfig"]
