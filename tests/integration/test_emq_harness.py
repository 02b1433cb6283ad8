"""The EventMQ harness works against EventMQ's own router, job manager and scheduler.

If these fail, a failing corral-vs-EventMQ test says nothing about corral.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import zmq

from tests.integration.emq import (
    EmqCluster,
    emq_cli,
    emq_cluster,
    emq_sender,
    parse_cli_output,
    router_status,
    submit_job,
    submit_schedule,
    wait_until,
)

pytestmark = pytest.mark.integration

JOB_WAIT = 20.0  # seconds; a job normally lands in well under one


# Named emq, not cluster: conftest.py has a corral `cluster` fixture.
@pytest.fixture(scope="module")
def emq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmqCluster]:
    # One cluster for the module: starting a job manager costs ~3-4 s because it
    # forks its processes only on the router's first heartbeat.
    with emq_cluster(tmp_path_factory.mktemp("emq"), concurrent_jobs=2, scheduler=True) as running:
        yield running


def test_defer_job_runs_on_real_jobmanager(emq: EmqCluster, tmp_path: Path) -> None:
    marker = tmp_path / "marker.txt"
    with emq_sender(emq.addrs.frontend) as sender:
        msgid = submit_job(
            sender, "emq_jobs.write_marker", args=[str(marker)], kwargs={"content": "ran"}
        )
        # A free slot means immediate dispatch, which is the only case in which
        # EventMQ's router acknowledges: REPLY with the client's msgid in F4.
        assert sender.zsocket.poll(int(JOB_WAIT * 1000)), "no submit acknowledgement"
        frames = [f.decode() for f in sender.zsocket.recv_multipart()]
    assert frames[:3] == ["", "eMQP/1.0", "REPLY"]
    assert frames[3] != msgid
    assert frames[4:] == [msgid]

    wait_until(marker.exists, JOB_WAIT, procs=emq.procs, what="marker file")
    assert marker.read_text() == "ran"


def test_class_method_path(emq: EmqCluster, tmp_path: Path) -> None:
    marker = tmp_path / "greeting.txt"
    with emq_sender(emq.addrs.frontend) as sender:
        submit_job(
            sender,
            "emq_jobs:Greeter.greet",
            class_args=["hi"],
            args=["corral"],
            kwargs={"path": str(marker)},
        )
    wait_until(marker.exists, JOB_WAIT, procs=emq.procs, what="greeting file")
    assert marker.read_text() == "hi corral"


def test_emq_cli_status_parses(emq: EmqCluster) -> None:
    out = emq_cli(emq.addrs.admin, ["status", "show_workers", "show_schedulers"])
    status, workers, schedulers = parse_cli_output(out)

    assert set(status) == {
        "inflight_messages_by_queue",
        "latency_messages_by_queue",
        "max_latency_messages_by_queue",
        "waiting_messages_by_queue",
        "processed_messages_by_queue",
        "processed_messages_by_worker",
    }
    (worker,) = workers["connected_workers"].values()
    assert worker["queues"] == [[10, "default"]]
    assert set(worker) == {"queues", "hb", "available_slots"}
    assert [w[0] for w in workers["connected_queues"]["default"]] == [10]
    (sched,) = schedulers["connected_schedulers"].values()
    assert set(sched) == {"hb"}


def test_emq_cli_matches_direct_admin_request(emq: EmqCluster) -> None:
    (via_cli,) = parse_cli_output(emq_cli(emq.addrs.admin, ["status"]))
    direct = router_status(emq.addrs.admin)
    assert direct is not None
    assert set(direct) == set(via_cli)


def test_schedule_runs_once_immediately(emq: EmqCluster, tmp_path: Path) -> None:
    marker = tmp_path / "scheduled.txt"
    with emq_sender(emq.addrs.frontend) as sender:
        # Without "nohaste" EventMQ's scheduler runs the job as soon as it is scheduled.
        submit_schedule(
            sender,
            "emq_jobs.write_marker",
            interval_secs=3600,
            args=[str(marker)],
            kwargs={"content": "scheduled"},
        )
        wait_until(marker.exists, JOB_WAIT, procs=emq.procs, what="scheduled marker")
        submit_schedule(
            sender,
            "emq_jobs.write_marker",
            interval_secs=3600,
            args=[str(marker)],
            kwargs={"content": "scheduled"},
            unschedule=True,
        )
    assert marker.read_text() == "scheduled"


def test_sender_keeps_pipelined_jobs_beyond_default_hwm(tmp_path: Path) -> None:
    # A router with no job manager buffers every REQUEST, and its STATUS counts
    # each received one as in flight, so this checks delivery without waiting
    # for EventMQ's job manager, which runs a pipelined backlog at a crawl.
    n = 1500  # more than ZeroMQ's default SNDHWM of 1000
    with emq_cluster(tmp_path, jobmanagers=0) as router_only:
        admin = router_only.addrs.admin

        def all_received() -> dict[str, Any] | None:
            status = router_status(admin)
            if status and status["inflight_messages_by_queue"] == {"default": n}:
                return status
            return None

        with emq_sender(router_only.addrs.frontend) as sender:
            assert sender.zsocket.getsockopt(zmq.SNDHWM) == 0
            for _ in range(n):
                submit_job(sender, "emq_jobs.noop")
            status = wait_until(
                all_received, JOB_WAIT, procs=router_only.procs, what=f"{n} REQUESTs at the router"
            )
    assert status["waiting_messages_by_queue"] == {"default": n}
    assert status["processed_messages_by_queue"] == {}
