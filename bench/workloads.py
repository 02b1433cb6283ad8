"""The four workloads, and how one run of each is driven and timed, the same for every system.

1. ``throughput``: N no-op jobs sent without asking for results; the clock runs
   from the first submit until all N have executed.
2. ``results``: N no-op jobs, all submitted, then each result fetched by the
   client in submit order; the clock stops at the last result.
3. ``latency``: one synchronous client sends one job, waits for its result,
   and sends the next; p50 and p99 of submit-to-result.
4. ``mixed``: N jobs that sleep 10 ms, sent without asking for results, on 8
   execution slots; the ideal is ``8 / 10 ms = 800`` jobs/s.

Execution is counted the same way for every system in 1 and 4: each job
appends one byte to a counter file (:mod:`bench.tick`), and the run is over
when the file holds N bytes. In 2 and 3 the client sees every result.

A run that reaches its time cap stops there and counts what completed
(``capped``); its rate is what the system sustained until then. Standard
library only.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    jobs: int
    slots: int
    #: Seconds one measured run may take before it is cut short.
    cap: float
    #: Sleep per job (``mixed``), 0 for no-op jobs.
    sleep: float = 0.0
    results: bool = False
    latency: bool = False

    @property
    def warmup(self) -> int:
        return min(self.jobs, 50 if self.latency else 200)


def workloads(quick: bool = False) -> list[Workload]:
    """The four workloads at full size, or small ones for development (``quick``)."""
    n = 2_000 if quick else 20_000
    m = 300 if quick else 2_000
    cap = 15.0 if quick else 40.0
    return [
        Workload("throughput", "no-op jobs, results not awaited", n, 2, cap),
        Workload("results", "no-op jobs, each result fetched", n, 2, cap, results=True),
        Workload("latency", "one job at a time, submit to result", m, 2, cap / 2, latency=True),
        Workload("mixed", "jobs sleeping 10 ms, 8 slots", m, 8, cap / 2, sleep=0.010),
    ]


class System(Protocol):
    """What a system adapter offers the drivers below (see bench/systems/)."""

    #: Why results cannot be fetched from this system, or None when they can.
    no_results: str | None

    def send_tick(self, path: str, seconds: float) -> None:
        """Submit ``bench.tick.tick(path, seconds)`` without asking for its result."""

    def submit_noop(self) -> Any:
        """Submit ``bench.tick.noop()``; return what :meth:`wait` takes."""

    def wait(self, handle: Any, timeout: float) -> Any:
        """The job's result; raise on failure, on timeout raise ``TimeoutError``."""

    def call_noop(self, timeout: float) -> Any:
        """Run ``bench.tick.noop()`` and return its result: submit and wait in one call,
        the system's own way of calling a job synchronously where it has one."""


class Capped(Exception):
    """A run reached its time cap."""


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def fire_and_forget(system: System, w: Workload, n: int, counter: Path) -> dict[str, Any]:
    """Send ``n`` ticks, then wait until the counter file holds ``n`` bytes (or the cap)."""
    with open(counter, "wb"):
        pass  # truncate: workers keep their O_APPEND descriptor, so the count restarts at 0
    path = str(counter)
    start = time.perf_counter()
    deadline = start + w.cap
    sent = 0
    for sent in range(1, n + 1):
        system.send_tick(path, w.sleep)
        if sent % 256 == 0 and time.perf_counter() > deadline:
            break
    submitted = time.perf_counter()
    while True:
        done = _size(counter)
        now = time.perf_counter()
        if done >= n or now > deadline:
            break
        time.sleep(0.002)
    return _outcome(n, done, now - start, submitted - start)


def results(system: System, w: Workload, n: int) -> dict[str, Any]:
    """Submit ``n`` no-op jobs, then fetch each result in submit order (or until the cap)."""
    start = time.perf_counter()
    deadline = start + w.cap
    handles = []
    for i in range(n):
        handles.append(system.submit_noop())
        if i % 256 == 255 and time.perf_counter() > deadline:
            break
    submitted = time.perf_counter()
    done = 0
    for handle in handles:
        remaining = deadline - time.perf_counter()
        if remaining <= 0:
            break
        try:
            value = system.wait(handle, remaining)
        except TimeoutError:
            break
        if value is not True:
            raise RuntimeError(f"a no-op job returned {value!r}, not True")
        done += 1
    end = time.perf_counter()
    return _outcome(n, done, end - start, submitted - start)


def latency(system: System, w: Workload, n: int) -> dict[str, Any]:
    """One job at a time; submit-to-result times in ms, p50 and p99."""
    start = time.perf_counter()
    deadline = start + w.cap
    samples: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        remaining = deadline - t0
        if remaining <= 0:
            break
        try:
            value = system.call_noop(remaining)
        except TimeoutError:
            break
        samples.append((time.perf_counter() - t0) * 1e3)
        if value is not True:
            raise RuntimeError(f"a no-op job returned {value!r}, not True")
    end = time.perf_counter()
    out = _outcome(n, len(samples), end - start, None)
    if samples:
        out["p50_ms"] = percentile(samples, 0.50)
        out["p99_ms"] = percentile(samples, 0.99)
    return out


def _outcome(n: int, done: int, seconds: float, submit_seconds: float | None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "jobs": n,
        "completed": done,
        "seconds": round(seconds, 4),
        "jobs_per_s": done / seconds if seconds > 0 else 0.0,
        "capped": done < n,
    }
    if submit_seconds is not None:
        out["submit_seconds"] = round(submit_seconds, 4)
    return out


def run_once(system: System, w: Workload, n: int, counter: Path) -> dict[str, Any]:
    """One run of ``w`` with ``n`` jobs."""
    if w.latency:
        return latency(system, w, n)
    if w.results:
        return results(system, w, n)
    return fire_and_forget(system, w, n, counter)


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


#: The figures summarised per workload: (key in a run, better when higher).
METRICS: dict[str, tuple[str, ...]] = {
    "throughput": ("jobs_per_s",),
    "results": ("jobs_per_s",),
    "latency": ("p50_ms", "p99_ms", "jobs_per_s"),
    "mixed": ("jobs_per_s",),
}


def summarise(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, Any]:
    """Median, min and max over runs for each of ``keys``."""
    out: dict[str, Any] = {"runs": len(runs), "capped_runs": sum(bool(r["capped"]) for r in runs)}
    for key in keys:
        values = [r[key] for r in runs if key in r]
        if values:
            out[key] = {
                "median": statistics.median(values),
                "min": min(values),
                "max": max(values),
            }
    return out
