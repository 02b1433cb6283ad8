"""What a ``schedule(...)`` call asks the broker for (shared by every client flavour).

A schedule is sent as a ``schedule`` QUERY whose fields are those of eMQP's
SCHEDULE (queue, headers, interval, body, cron): the broker validates it
exactly as a SCHEDULE from the wire and answers once it is stored, with the
schedule's id and next run.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from datetime import timedelta
from typing import Any

import msgspec

from corral.client.options import make_headers, queue_for
from corral.client.target import encode_call


def interval_seconds(every: timedelta | float) -> int:
    """Whole seconds >= 1 from a ``timedelta`` or a number of seconds (eMQP's unit)."""
    if isinstance(every, bool):
        raise TypeError("every is a number of seconds or a timedelta, not a bool")
    seconds = every.total_seconds() if isinstance(every, timedelta) else float(every)
    if not math.isfinite(seconds) or seconds < 1 or seconds != int(seconds):
        raise ValueError(f"every must be a whole number of seconds >= 1, not {every!r}")
    return int(seconds)


def schedule_params(
    fn: Any,
    args: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    every: timedelta | float | None = None,
    cron: str | None = None,
    queue: str | None = None,
    run_count: int | None = None,
    nohaste: bool = False,
    timeout: float | None = None,
    retries: int = 0,
    guarantee: bool = False,
    label: str | None = None,
) -> dict[str, Any]:
    """The ``schedule`` QUERY's parameters; TypeError/ValueError before anything is sent.

    Exactly one of ``every`` (seconds or a ``timedelta``) and ``cron`` (5
    fields, read in the broker's time zone). ``run_count`` (default ``None``:
    forever) runs it that many times; ``nohaste`` (default ``False``) waits
    for the first tick instead of running at once. ``timeout``, ``retries``,
    ``guarantee`` and ``label`` apply to every job it runs, as in ``submit``.
    """
    if (every is None) == (cron is None):
        raise ValueError("give exactly one of every= and cron=")
    interval = -1 if every is None else interval_seconds(every)
    if cron is not None and (not isinstance(cron, str) or len(cron.split()) != 5):
        raise ValueError(f"cron needs 5 fields (minute hour day month weekday), not {cron!r}")
    if run_count is not None and (
        isinstance(run_count, bool) or not isinstance(run_count, int) or run_count < 1
    ):
        raise ValueError(f"run_count must be an integer >= 1 (or None: forever), not {run_count!r}")
    headers = make_headers(timeout=timeout, retries=retries, guarantee=guarantee, label=label)
    headers = dataclasses.replace(
        headers, reply_requested=False, nohaste=bool(nohaste), run_count=run_count
    )
    return {
        "queue": queue_for(fn, queue),
        "headers": headers.encode(),
        "interval": interval,
        "cron": "" if cron is None else " ".join(cron.split()),
        "body": msgspec.json.decode(encode_call(fn, args, kwargs)),
    }
