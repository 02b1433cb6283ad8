"""EventMQ 0.3.13's own throughput on this machine: the baseline corral is compared with.

One emq-router and one emq-jobmanager with ``processes`` worker processes run on
free loopback ports; one client pipelines ``n_jobs`` no-op jobs with EventMQ's
``defer_job`` as fast as it can, and the clock runs until every job has executed.

Completion is counted by a side effect, not by the router: each job
(``emq_jobs.tick``) appends one byte to a shared file, and the run ends when the
file holds ``n_jobs`` bytes. The router cannot tell us: it drops the job
manager's REPLYs, and its STATUS ``processed`` counters only count requests it
dispatched the moment they arrived, not ones it buffered and sent later.

    python -m bench.emq_baseline [--jobs 2000] [--processes 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make `tests` importable from the repo root
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.integration.emq import (  # noqa: E402
    emq_cluster,
    emq_sender,
    router_status,
    submit_job,
    wait_until,
)

METHOD = "executed jobs counted by a 1-byte O_APPEND side effect per job"


def _default_timeout(n_jobs: int) -> float:
    # EventMQ's job manager can sit in a 1 s poll while its slots are done, so
    # the worst case is about one second per `processes` jobs; bound it anyway.
    return 60.0 + 0.5 * n_jobs


def measure_eventmq(
    n_jobs: int,
    processes: int,
    *,
    timeout: float | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Run ``n_jobs`` no-op jobs through a fresh EventMQ and return the measured rate.

    Keys: ``jobs_per_s`` (executed jobs / seconds from the first submit to the last
    execution), ``seconds``, ``submit_seconds`` (time to hand all jobs to ZeroMQ),
    ``completed`` (less than ``n_jobs`` only if ``timed_out``), ``worker_recycles``
    (EventMQ restarts a worker process after 1024 jobs), ``router_status`` and
    ``method``. Processes are always killed, also on error.
    """
    if n_jobs <= 0 or processes <= 0:
        raise ValueError("n_jobs and processes must be positive")
    limit = _default_timeout(n_jobs) if timeout is None else timeout
    with tempfile.TemporaryDirectory(prefix="emq-bench-", dir=workdir) as tmp:
        directory = Path(tmp)
        counter = directory / "ticks"
        counter.touch()
        with emq_cluster(directory, concurrent_jobs=processes) as cluster:
            with emq_sender(cluster.addrs.frontend) as sender:
                start = time.perf_counter()
                for _ in range(n_jobs):
                    submit_job(sender, "emq_jobs.tick", args=[str(counter)])
                submitted = time.perf_counter()

                def executed() -> int:
                    return counter.stat().st_size

                timed_out = False
                try:
                    wait_until(
                        lambda: executed() >= n_jobs,
                        limit,
                        interval=0.005,
                        procs=cluster.procs,
                        what=f"{n_jobs} executed jobs",
                    )
                except TimeoutError:
                    timed_out = True
                end = time.perf_counter()
                completed = executed()
            status = router_status(cluster.addrs.admin)
            recycles = sum(
                p.stderr_path.read_text(errors="replace").count("Worker reached job limit")
                for p in cluster.procs
                if p.name.startswith("emq-jobmanager")
            )
    seconds = end - start
    return {
        "n_jobs": n_jobs,
        "processes": processes,
        "completed": completed,
        "timed_out": timed_out,
        "seconds": seconds,
        "submit_seconds": submitted - start,
        "jobs_per_s": completed / seconds,
        "worker_recycles": recycles,
        "router_status": status,
        "method": METHOD,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=None)
    args = parser.parse_args(argv)
    result = measure_eventmq(args.jobs, args.processes, timeout=args.timeout)
    print(json.dumps(result, indent=2))
    print(
        f"eventmq: {result['completed']}/{result['n_jobs']} jobs in {result['seconds']:.2f}s"
        f" -> {result['jobs_per_s']:.1f} jobs/s ({args.processes} processes)"
    )


if __name__ == "__main__":
    main()
