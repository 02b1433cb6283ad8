"""corral against the real EventMQ 0.3.13, in both directions.

Every test starts real processes on loopback: corral's broker and worker (through
:class:`~tests.integration.procs.Cluster`) and EventMQ's console scripts (through
:mod:`tests.integration.emq`). Each proves that one kind of EventMQ peer works
with corral unchanged:

* an EventMQ job manager serving corral's broker, results back to a corral client;
* EventMQ's ``defer_job`` client submitting through corral's broker;
* ``emq-cli`` reading corral's admin socket and shutting corral's broker down;
* a corral worker serving EventMQ's own ``emq-router``;
* an EventMQ scheduler registered with corral's broker, its jobs run by corral.

EventMQ peers heartbeat every 3 s whatever the broker does, while the test
cluster's broker heartbeats every 0.5 s; the broker gets a longer ``--liveness``
so that it does not drop them between two of their heartbeats.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from typing import Any

import pytest
import zmq

import corral
from corral.admin import admin_request
from corral.client.target import body_for
from tests.integration.emq import (
    JOB_PYTHONPATH,
    EmqAddrs,
    EmqProcess,
    emq_cli,
    emq_sender,
    parse_cli_output,
    router_status,
    router_workers,
    start_jobmanager,
    start_router,
    start_scheduler,
    submit_job,
    submit_schedule,
    write_config,
)
from tests.integration.procs import Cluster, Proc, corral_cmd

pytestmark = pytest.mark.integration

#: 12 x the cluster's 0.5 s heartbeat = 6 s of silence allowed. EventMQ peers send a
#: HEARTBEAT only every 3 s, so the default liveness (1.5 s here) drops an idle job
#: manager or scheduler, and EventMQ never re-INFORMs after that.
EMQ_LIVENESS = ("--liveness", "12")
#: PYTHONPATH for a corral worker that must import ``emq_jobs`` by that name.
JOBS_ENV = {"PYTHONPATH": os.pathsep.join(str(p) for p in JOB_PYTHONPATH)}
START_TIMEOUT = 20.0


def wait(
    predicate: Callable[[], Any],
    what: str,
    *,
    timeout: float = START_TIMEOUT,
    procs: Iterable[Proc | EmqProcess] = (),
    interval: float = 0.05,
) -> Any:
    """Poll ``predicate`` until truthy; fail early if one of ``procs`` died, with its output."""
    procs = list(procs)

    def alive(p: Proc | EmqProcess) -> bool:
        return p.alive() if isinstance(p, EmqProcess) else p.alive

    def logs() -> str:
        return "\n".join(f"--- {p.name}\n{p.output()}" for p in procs)

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        dead = [p.name for p in procs if not alive(p)]
        if dead:
            raise AssertionError(f"waiting for {what}: {dead} exited\n{logs()}")
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s\n{logs()}")
        time.sleep(interval)


def corral_emq_addrs(cluster: Cluster) -> EmqAddrs:
    """corral's broker sockets, as an EventMQ config wants them."""
    a = cluster.addrs
    return EmqAddrs(frontend=a.frontend, backend=a.backend, admin=a.admin)


def recv_reply(sock: zmq.Socket, timeout: float = 10.0) -> list[str]:
    assert sock.poll(int(timeout * 1000)), f"no REPLY on the defer_job socket within {timeout} s"
    return [f.decode() for f in sock.recv_multipart()]


@pytest.fixture
def stack():
    with ExitStack() as s:
        yield s


# ------------------------------------------------------------------- 1. job manager


def test_eventmq_jobmanager_serves_corral_clients(cluster, tmp_path, stack):
    broker = cluster.broker(*EMQ_LIVENESS)
    emq_dir = tmp_path / "emq"
    config = write_config(emq_dir, corral_emq_addrs(cluster), concurrent_jobs=2)
    jm = stack.enter_context(start_jobmanager(config, emq_dir, broker_addr=cluster.addrs.backend))
    procs = [broker, jm]
    # INFORM, ACK, the broker's HEARTBEAT, then one READY per forked process.
    wait(lambda: cluster.free_slots() >= 2, "the job manager's 2 READY slots", procs=procs)

    # A corral client names the job "mod:fn"; EventMQ's worker reads path/callable.
    params = body_for("emq_jobs:add")
    assert (params.path, params.callable) == ("emq_jobs", "add")
    client = stack.enter_context(corral.Client(cluster.addrs.frontend))
    assert client.submit("emq_jobs:add", 2, 3).result(timeout=15) == 5
    assert client.submit("emq_jobs.echo", "x", k=1).result(timeout=15) == {
        "args": ["x"],
        "kwargs": {"k": 1},
    }
    jobs = [client.submit("emq_jobs:add", i, 1000) for i in range(50)]
    assert [j.result(timeout=30) for j in jobs] == [i + 1000 for i in range(50)]

    # The job manager is a worker of corral's broker, in the admin view and the CLI.
    shown = cluster.workers()["connected_workers"]
    assert len(shown) == 1, shown
    ((name, info),) = shown.items()
    assert info["queues"] == [[10, "default"]]
    assert info["processed"] == 52
    wait(lambda: cluster.free_slots() == 2, "both slots free again", procs=procs)
    done = subprocess.run(
        corral_cmd("status", "--json", "--admin", cluster.addrs.admin),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert list(status["workers"]["connected_workers"]) == [name]
    assert status["workers"]["connected_workers"][name]["available_slots"] == 2
    assert status["status"]["processed_messages_by_worker"] == {name: 52}
    assert status["status"]["processed_messages_by_queue"]["default"] == 52
    assert jm.alive() and broker.alive


# --------------------------------------------------------------- 2. defer_job client


def test_defer_job_through_corral_runs_on_corral_worker(cluster, tmp_path, stack):
    broker = cluster.broker(*EMQ_LIVENESS)
    worker = cluster.worker("--allow", "emq_jobs", imports=(), env=JOBS_ENV)
    procs = [broker, worker]
    markers = [tmp_path / f"marker-{i}" for i in range(5)]
    sender = stack.enter_context(emq_sender(cluster.addrs.frontend))
    for i, marker in enumerate(markers):
        submit_job(sender, "emq_jobs.write_marker", args=[str(marker), f"job {i}"])
    wait(lambda: all(m.exists() for m in markers), "all 5 markers", procs=procs)
    assert [m.read_text() for m in markers] == [f"job {i}" for i in range(5)]

    # Without reply-requested only the submit acknowledgement comes back.
    acks = [recv_reply(sender.zsocket) for _ in markers]
    assert all(a[:3] == ["", "eMQP/1.0", "REPLY"] and len(a) == 5 for a in acks), acks

    # With reply-requested: the acknowledgement, then the outcome.
    marker = tmp_path / "replied"
    msgid = submit_job(
        sender, "emq_jobs.write_marker", args=[str(marker), "hi"], reply_requested=True
    )
    ack = recv_reply(sender.zsocket)
    assert ack[:3] == ["", "eMQP/1.0", "REPLY"] and len(ack) == 5, ack
    assert ack[3] != msgid and ack[4] == msgid, ack
    outcome = recv_reply(sender.zsocket)
    assert outcome[:3] == ["", "eMQP/1.0", "REPLY"] and len(outcome) == 6, outcome
    assert json.loads(outcome[4]) == {"value": "hi"}
    assert outcome[5] == msgid
    assert marker.read_text() == "hi"


# ------------------------------------------------------------------------ 3. emq-cli


STATUS_KEYS = {
    "inflight_messages_by_queue",
    "latency_messages_by_queue",
    "max_latency_messages_by_queue",
    "waiting_messages_by_queue",
    "processed_messages_by_queue",
    "processed_messages_by_worker",
}


def test_emq_cli_reads_and_stops_corral_broker(cluster):
    broker = cluster.broker()
    # A fixed prefetch: by default it follows the jobs' run time.
    cluster.worker("--prefetch", "2", concurrency=1, imports=("corral.examples",))
    with corral.Client(cluster.addrs.frontend) as client:
        assert client.submit("corral.examples:add", 1, 2).result(timeout=10) == 3
    # One process and its two prefetch slots.
    wait(
        lambda: cluster.free_slots() == 3,
        "the worker's slots free again",
        procs=[broker],
    )

    out = emq_cli(cluster.addrs.admin, ["status", "show_workers", "show_schedulers"])
    assert "--- stderr" not in out, out
    values = parse_cli_output(out)
    assert len(values) == 3, out
    status, workers, schedulers = values
    # Each answer belongs to its own command: nothing answered HELLO to shift them.
    assert isinstance(status, dict) and STATUS_KEYS <= status.keys(), out
    assert status["processed_messages_by_queue"] == {"default": 1}
    assert list(status["processed_messages_by_worker"].values()) == [1]
    assert isinstance(workers, dict) and {"connected_workers", "connected_queues"} <= workers.keys()
    ((wid, winfo),) = workers["connected_workers"].items()
    assert {"queues", "hb", "available_slots"} <= winfo.keys()
    assert winfo["available_slots"] == 3 and winfo["queues"] == [[10, "default"]]
    assert workers["connected_queues"] == {"default": [[10, wid]]}
    assert schedulers == {"connected_schedulers": {}}

    # shutdown sends DISCONNECT and waits for the ACK; the broker then exits cleanly.
    out = emq_cli(cluster.addrs.admin, ["shutdown"])
    assert "--- stderr" not in out, out
    assert broker.wait(15) == 0, broker.output()


# --------------------------------------------------------------------- 4. emq-router


def test_corral_worker_serves_eventmq_router(cluster, tmp_path, stack):
    emq_dir = tmp_path / "emq"
    addrs = EmqAddrs.fresh()
    config = write_config(emq_dir, addrs)
    router = stack.enter_context(start_router(config, emq_dir))
    wait(lambda: router_status(addrs.admin, 0.3) is not None, "emq-router up", procs=[router])
    worker = cluster.start(
        "worker",
        corral_cmd(
            "worker",
            "--backend",
            addrs.backend,
            "--allow",
            "emq_jobs",
            "-c",
            "2",
            "--heartbeat",
            "2",
        ),
        env=JOBS_ENV,
    )
    procs = [router, worker]

    def corral_worker_slots() -> int:
        shown = (router_workers(addrs.admin, 0.5) or {}).get("connected_workers", {})
        return sum(w.get("available_slots", 0) for w in shown.values())

    wait(lambda: corral_worker_slots() >= 2, "the corral worker's 2 slots", procs=procs)
    shown = router_workers(addrs.admin)
    assert len(shown["connected_workers"]) == 1, shown
    ((wid, info),) = shown["connected_workers"].items()
    assert shown["connected_queues"]["default"] == [[10, wid]]

    markers = [tmp_path / f"marker-{i}" for i in range(6)]
    with emq_sender(addrs.frontend) as sender:
        for i, marker in enumerate(markers):
            submit_job(sender, "emq_jobs.write_marker", args=[str(marker), f"job {i}"])
        wait(lambda: all(m.exists() for m in markers), "all 6 markers", procs=procs)
    assert [m.read_text() for m in markers] == [f"job {i}" for i in range(6)]
    # Slots come back: the worker sends READY after each job.
    wait(lambda: corral_worker_slots() == 2, "both slots free again", procs=procs)


# ---------------------------------------------------------------------- 5. scheduler


def test_eventmq_scheduler_registers_and_its_jobs_run_on_corral(cluster, tmp_path, stack):
    broker = cluster.broker(*EMQ_LIVENESS)
    worker = cluster.worker("--allow", "emq_jobs", imports=(), env=JOBS_ENV)
    emq_dir = tmp_path / "emq"
    config = write_config(emq_dir, corral_emq_addrs(cluster))
    sched = stack.enter_context(start_scheduler(config, emq_dir))
    procs = [broker, worker, sched]

    def schedulers() -> dict[str, Any]:
        return admin_request("ROUTER_SHOW_SCHEDULERS", cluster.addrs.admin)["connected_schedulers"]

    wait(schedulers, "emq-scheduler registered with corral", procs=procs)
    assert len(schedulers()) == 1

    ticks = tmp_path / "ticks"
    with emq_sender(cluster.addrs.frontend) as sender:
        # Without nohaste EventMQ runs the job once at scheduling time, then every 60 s.
        submit_schedule(sender, "emq_jobs.tick", interval_secs=60, args=[str(ticks)], headers=())
        wait(ticks.exists, "a scheduled job to run on the corral worker", procs=procs)
        submit_schedule(
            sender, "emq_jobs.tick", interval_secs=60, args=[str(ticks)], unschedule=True
        )
    assert ticks.stat().st_size >= 1
    wait(
        lambda: (cluster.status() or {}).get("processed_messages_by_queue", {}).get("default"),
        "corral's broker to record the scheduled job's outcome",
        procs=procs,
    )
    assert len(schedulers()) == 1, "the scheduler stayed registered"
