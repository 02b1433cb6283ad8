"""Schedules on real processes: real time, a broker killed with -9, two scheduler processes.

Each tick's job id is ``<schedule id>@<tick instant>``, so the broker's job
records tell which ticks ran; the job itself appends a line to a file per
execution, so the file tells how many times jobs really ran. Exactly one run
per tick means: tick instants strictly increasing on the schedule's grid, and
as many executions as tick jobs.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

import corral
from corral.scheduler.ids import parse_tick_id
from tests.integration.procs import Cluster, corral_cmd, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def tick_jobs(client: corral.Client, sched_id: str) -> list[dict[str, Any]]:
    """The schedule's tick jobs, oldest tick first."""
    found = [j for j in client.jobs(limit=10_000) if j["id"].startswith(sched_id + "@")]
    return sorted(found, key=lambda j: j["id"])


def tick_times(jobs: list[dict[str, Any]]) -> list[int]:
    return [parse_tick_id(j["id"])[1] for j in jobs]


def executions(path: Path) -> int:
    return len(path.read_text().split()) if path.exists() else 0


def all_succeeded(client: corral.Client, sched_id: str, at_least: int) -> list[dict[str, Any]]:
    jobs = tick_jobs(client, sched_id)
    ok = len(jobs) >= at_least and all(j["state"] == "succeeded" for j in jobs)
    return jobs if ok else []


def assert_one_run_per_tick(jobs: list[dict[str, Any]], path: Path, interval_ms: int) -> None:
    times = tick_times(jobs)
    assert times == sorted(set(times)), "tick jobs are not one per instant"
    anchor = times[0]
    assert all((t - anchor) % interval_ms == 0 for t in times), f"off the grid: {times}"
    assert executions(path) == len(jobs), "a tick's job ran more than once"


def test_one_second_interval_in_real_time_survives_kill_9(cluster: Cluster, tmp_path: Path):
    runs = tmp_path / "runs"
    broker = cluster.broker()
    cluster.worker(concurrency=1)
    with corral.Client(cluster.addrs.frontend) as client:
        sid = client.schedule("tests.jobs:record", str(runs), 1, every=1)
        first = wait_for(
            lambda: all_succeeded(client, sid, 3), timeout=20, what="3 ticks", procs=[broker]
        )
        # Real time: a second apart (a loop stalled by load would coalesce, never repeat).
        gaps = [b - a for a, b in zip(tick_times(first), tick_times(first)[1:], strict=False)]
        assert 1000 in gaps and all(g % 1000 == 0 for g in gaps), gaps
    broker.kill_group(signal.SIGKILL)
    broker.wait(5)
    killed_at = time.time()
    broker = cluster.broker()
    with corral.Client(cluster.addrs.frontend) as client:
        (listed,) = client.schedules()
        assert listed["id"] == sid and listed["every"] == 1 and listed["runs"] >= 3

        def resumed() -> list[dict[str, Any]]:
            jobs = all_succeeded(client, sid, 1)
            return jobs if jobs and tick_times(jobs)[-1] / 1000 > killed_at + 1 else []

        jobs = wait_for(resumed, timeout=30, what="ticks after the restart", procs=[broker])
        client.unschedule(sid)
        assert client.schedules() == []
        jobs = wait_for(lambda: all_succeeded(client, sid, len(jobs)), what="all ticks done")
    assert_one_run_per_tick(jobs, runs, 1000)


def test_two_scheduler_processes_make_exactly_one_job_per_tick(cluster: Cluster, tmp_path: Path):
    runs = tmp_path / "runs"
    broker = cluster.broker("--no-builtin-scheduler")
    cluster.worker(concurrency=1)
    schedulers = [
        cluster.start(
            f"scheduler-{i}",
            corral_cmd("scheduler", "--broker", cluster.addrs.frontend, "--heartbeat", "0.5"),
        )
        for i in range(2)
    ]
    procs = [broker, *schedulers]
    wait_for(
        lambda: (cluster.status() or {}).get("corral_schedulers") == 2,
        what="both schedulers registered",
        procs=procs,
    )
    with corral.Client(cluster.addrs.frontend) as client:
        sid = client.schedule("tests.jobs:record", str(runs), 2, every=1, nohaste=True)
        assert client.schedules()[0]["run_by"] == "scheduler processes"
        jobs = wait_for(lambda: all_succeeded(client, sid, 3), timeout=20, procs=procs)
        status = cluster.status()
        # Both fired every tick; the broker kept one of each pair.
        assert status["ticks_refused"].get("duplicate-id", 0) >= 2, status
        # One scheduler dies: the other goes on alone.
        schedulers[0].kill_group(signal.SIGKILL)
        more = len(jobs) + 2
        jobs = wait_for(
            lambda: all_succeeded(client, sid, more), timeout=20, procs=[broker, schedulers[1]]
        )
        client.unschedule(sid)
        jobs = wait_for(lambda: all_succeeded(client, sid, len(jobs)), what="all ticks done")
    assert_one_run_per_tick(jobs, runs, 1000)


def test_async_client_schedules(cluster: Cluster):
    cluster.broker()

    async def main() -> tuple[str, list[dict[str, Any]], dict[str, Any]]:
        async with corral.AsyncClient(cluster.addrs.frontend) as client:
            sid = await client.schedule(
                "tests.jobs:add", 1, 2, cron="0 4 * * 1", nohaste=True, queue="nightly"
            )
            listed = await client.schedules()
            gone = await client.unschedule(sid)
            return sid, listed, gone

    sid, listed, gone = asyncio.run(main())
    (s,) = listed
    assert s["id"] == sid and s["queue"] == "nightly" and s["cron"] == "0 4 * * 1"
    assert datetime.fromtimestamp(s["next_run"]).weekday() in (0, 1)  # Monday 04:00 UTC
    assert gone["state"] == "unscheduled"


def test_cli_schedule_list_unschedule(cluster: Cluster):
    cluster.broker()
    env_args = ["--broker", cluster.addrs.frontend]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "COLUMNS": "160"}
        return subprocess.run(
            corral_cmd(*args, *env_args), capture_output=True, text=True, timeout=30, env=env
        )

    done = run("schedule", "tests.jobs:add", "1", "2", "--every", "1h30m", "--nohaste")
    assert done.returncode == 0, done.stderr
    sid = done.stdout.strip()
    assert len(sid) == 40 and "every 1h30m" in done.stderr
    listed = json.loads(run("schedules", "--json").stdout)
    assert [(s["id"], s["every"], s["args"]) for s in listed] == [(sid, 5400, [1, 2])]
    table = run("schedules").stdout
    assert sid[:12] in table and "tests.jobs:add(1, 2)" in table
    bad = run("schedule", "tests.jobs:add", "--cron", "* * *")
    assert bad.returncode != 0 and "5 fields" in bad.stderr
    done = run("unschedule", sid[:8])
    assert done.returncode == 0 and sid in done.stdout, done.stderr
    assert json.loads(run("schedules", "--json").stdout) == []
