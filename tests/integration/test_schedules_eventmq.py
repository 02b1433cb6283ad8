"""A real EventMQ scheduler sharing corral's broker with the built-in scheduler.

EventMQ's client schedules a job through corral's broker; the broker hands it
to the connected ``emq-scheduler`` (as EventMQ's router would), which alone
fires it; when that scheduler dies the broker takes the schedule back and
continues its cadence; EventMQ's UNSCHEDULE ends it. Throughout, each tick
runs exactly once. An UNSCHEDULE sent while the emq-scheduler is alive reaches
it, and it stops firing.
"""

from __future__ import annotations

import os
import signal
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

import corral
from corral.admin import admin_request
from corral.scheduler.ids import parse_tick_id
from tests.integration.emq import emq_sender, start_scheduler, submit_schedule, write_config
from tests.integration.procs import Cluster
from tests.integration.test_interop import JOBS_ENV, corral_emq_addrs, wait

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

#: 10 x 0.5 s: longer than EventMQ's 3 s heartbeat, short enough to notice its death soon.
LIVENESS = ("--liveness", "10")


def test_eventmq_scheduler_runs_its_schedule_and_the_broker_takes_it_back(cluster, tmp_path):
    broker = cluster.broker(*LIVENESS)
    worker = cluster.worker("--allow", "emq_jobs", imports=(), env=JOBS_ENV)
    emq_dir = tmp_path / "emq"
    config = write_config(emq_dir, corral_emq_addrs(cluster))
    ticks = tmp_path / "ticks"
    with ExitStack() as stack, corral.Client(cluster.addrs.frontend) as client:
        sched = stack.enter_context(start_scheduler(config, emq_dir))
        procs = [broker, worker, sched]
        wait(
            lambda: admin_request("ROUTER_SHOW_SCHEDULERS", cluster.addrs.admin)[
                "connected_schedulers"
            ],
            "emq-scheduler registered",
            procs=procs,
        )
        sender = stack.enter_context(emq_sender(cluster.addrs.frontend))
        submit_schedule(sender, "emq_jobs.tick", interval_secs=2, args=[str(ticks)], headers=())

        def schedule() -> dict[str, Any]:
            found = client.schedules()
            return found[0] if found else {}

        first = wait(lambda: schedule().get("runs", 0) >= 2 and schedule(), "2 runs", procs=procs)
        assert first["run_by"].startswith("EventMQ scheduler"), first
        sid = first["id"]

        os.killpg(sched.pid, signal.SIGKILL)
        killed = time.time()
        procs = [broker, worker]
        wait(
            lambda: schedule().get("run_by") == "broker", "the broker to take it back", procs=procs
        )
        wait(
            lambda: any(t / 1000 > killed for t in tick_times(client, sid)),
            "a run by the broker",
            procs=procs,
        )
        submit_schedule(
            sender, "emq_jobs.tick", interval_secs=2, args=[str(ticks)], unschedule=True
        )
        wait(lambda: client.schedules() == [], "EventMQ's UNSCHEDULE", procs=procs)
        jobs = wait(lambda: finished(client, sid), "every tick's job to finish", procs=procs)

    times = sorted(parse_tick_id(j["id"])[1] for j in jobs)
    assert len(ticks.read_text()) == len(jobs), "a tick's job ran more than once"
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # A tick fired twice (by EventMQ and by the broker) would be milliseconds from its twin.
    assert all(g > 1000 for g in gaps), gaps
    # Taken back, it keeps the cadence from its last run by EventMQ.
    after = [g for t, g in zip(times[1:], gaps, strict=False) if t / 1000 > killed]
    assert after and all(g % 2000 == 0 for g in after), gaps


def test_live_eventmq_scheduler_stops_on_unschedule(cluster, tmp_path):
    # Without the built-in scheduler nothing but the emq-scheduler can fire it.
    broker = cluster.broker(*LIVENESS, "--no-builtin-scheduler")
    worker = cluster.worker("--allow", "emq_jobs", imports=(), env=JOBS_ENV)
    emq_dir = tmp_path / "emq"
    config = write_config(emq_dir, corral_emq_addrs(cluster))
    ticks = tmp_path / "ticks"
    interval = 1
    with ExitStack() as stack, corral.Client(cluster.addrs.frontend) as client:
        sched = stack.enter_context(start_scheduler(config, emq_dir))
        procs = [broker, worker, sched]
        wait(lambda: emq_schedulers(cluster), "emq-scheduler registered", procs=procs)
        sender = stack.enter_context(emq_sender(cluster.addrs.frontend))
        submit_schedule(
            sender, "emq_jobs.tick", interval_secs=interval, args=[str(ticks)], headers=()
        )
        first = wait(
            lambda: (found := client.schedules()) and found[0]["runs"] >= 2 and found[0],
            "2 runs",
            procs=procs,
        )
        assert first["run_by"].startswith("EventMQ scheduler"), first
        sid = first["id"]
        refused_before = sum(cluster.status()["ticks_refused"].values())

        submit_schedule(
            sender, "emq_jobs.tick", interval_secs=interval, args=[str(ticks)], unschedule=True
        )
        wait(lambda: client.schedules() == [], "EventMQ's UNSCHEDULE", procs=procs)
        jobs = wait(lambda: finished(client, sid), "every tick's job to finish", procs=procs)
        assert len(jobs) >= 2 and len(ran(ticks)) == len(jobs), (jobs, ran(ticks))

        def counters() -> dict[str, Any]:
            st = cluster.status()
            assert st is not None, "the broker stopped answering STATUS"
            return {
                "ticks_fired": st["ticks_fired"],
                "ticks_refused": sum(st["ticks_refused"].values()),
                "jobs_accepted": st["jobs_accepted"],
                "processed": st["processed_messages_by_queue"].get("default", 0),
                "eventmq_schedulers": st["eventmq_schedulers"],
                "jobs": len(tick_times(client, sid)),
                "runs": len(ran(ticks)),
            }

        base = counters()
        # Runs ended by the UNSCHEDULE, not by the scheduler being gone or refused.
        assert base["eventmq_schedulers"] == 1, base
        assert base["ticks_refused"] == refused_before, base
        # Told while alive, the emq-scheduler fires no more: were the UNSCHEDULE not
        # forwarded, it would keep firing and its ticks would be refused (or run).
        quiet = 3 * interval + 0.5
        start = time.monotonic()
        while time.monotonic() - start < quiet:
            assert sched.alive(), f"emq-scheduler exited\n{sched.output()}"
            now = counters()
            assert now == base, (
                f"{time.monotonic() - start:.1f} s after UNSCHEDULE: {base} -> {now}"
            )
            time.sleep(0.1)
        assert sched.alive() and emq_schedulers(cluster), "emq-scheduler left"


def emq_schedulers(cluster: Cluster) -> dict[str, Any]:
    return admin_request("ROUTER_SHOW_SCHEDULERS", cluster.addrs.admin)["connected_schedulers"]


def ran(ticks: Path) -> str:
    return ticks.read_text() if ticks.exists() else ""


def tick_times(client: corral.Client, sid: str) -> list[int]:
    ids = [j["id"] for j in client.jobs(limit=1000) if j["id"].startswith(sid + "@")]
    return [parse_tick_id(i)[1] for i in ids]


def finished(client: corral.Client, sid: str) -> list[dict[str, Any]]:
    jobs = [j for j in client.jobs(limit=1000) if j["id"].startswith(sid + "@")]
    return jobs if jobs and all(j["state"] == "succeeded" for j in jobs) else []
