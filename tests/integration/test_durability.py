"""Losing and regaining parts: workers that die or vanish, brokers killed and restored, clients
that reconnect. Real processes on loopback throughout."""

from __future__ import annotations

import json
import signal
import time

import pytest
import zmq

import corral
from corral.errors import JobFailed
from corral.protocol import PROTOCOL, Error, Query, Reply, Request, new_msgid, parse
from tests.integration.procs import broker_refuses_to_start, corral_cmd, free_addr, wait_for

pytestmark = pytest.mark.integration


def lines(path) -> list[str]:
    return path.read_text().split("\n")[:-1] if path.exists() else []


def test_clients_watch_workers_join_and_leave(cluster):
    cluster.broker()
    first = cluster.worker(concurrency=1, imports=("corral.examples",))
    with corral.Client(cluster.addrs.frontend) as client, client.watch_workers() as events:
        assert [w["id"] for w in events.workers.values()] == [1]
        second = cluster.worker("--queues", "io:5", concurrency=1, imports=("corral.examples",))
        joined = events.get(timeout=10)
        assert joined is not None and joined.kind == "registered"
        assert joined.id == 2 and joined.queues == ((5, "io"),)
        second.send_signal(signal.SIGTERM)
        left = events.get(timeout=10)
        assert left is not None and left.kind == "unregistered" and left.uuid == joined.uuid
        first.kill_group(signal.SIGKILL)  # no goodbye: noticed by its silence
        left = events.get(timeout=10)
        assert left is not None and left.kind == "unregistered" and left.id == 1


def test_worker_that_died_while_the_broker_was_down(cluster, tmp_path):
    """Its jobs wait for it after the restore, then run elsewhere or fail with WorkerLost."""
    steps = tmp_path / "steps.log"
    broker = cluster.broker()
    worker = cluster.worker(concurrency=2, imports=("tests.jobs",))
    with corral.Client(cluster.addrs.frontend) as client:
        kept = client.submit("tests.jobs:start_sleep_end", str(steps), 1.0, guarantee=True)
        plain = client.submit("tests.jobs:start_sleep_end", str(steps), 1.0)
        wait_for(lambda: len(lines(steps)) == 2, what="both jobs to start")
        # A job starts before its record is stored; only acknowledged ones must survive.
        assert kept.wait_acknowledged(10) and plain.wait_acknowledged(10)
        broker.kill_group(signal.SIGKILL)
        broker.wait(5)
        worker.kill_group(signal.SIGKILL)
        worker.wait(5)
        cluster.broker("--restore")
        with pytest.raises(JobFailed) as info:
            plain.result(timeout=20)
        assert info.value.type == "WorkerLost"
        assert client.job_info(kept.id)["state"] == "queued"
        cluster.worker(concurrency=1, imports=("tests.jobs",))
        assert kept.result(timeout=20) > 0
        record = client.job_info(kept.id)
        assert record["state"] == "succeeded" and record["attempts"] == 2
        assert record["worker_id"] == 2
    assert cluster.status()["workers_awaited_after_restore"] == 0


def test_worker_still_running_its_jobs_keeps_them_across_a_broker_restart(cluster, tmp_path):
    steps = tmp_path / "steps.log"
    broker = cluster.broker()
    cluster.worker(concurrency=1, imports=("tests.jobs",))
    with corral.Client(cluster.addrs.frontend) as client:
        job = client.submit("tests.jobs:start_sleep_end", str(steps), 2.0)
        wait_for(lambda: len(lines(steps)) == 1, what="the job to start")
        assert job.wait_acknowledged(10)  # stored, so the restored broker knows it
        broker.kill_group(signal.SIGKILL)
        broker.wait(5)
        cluster.broker("--restore")
        # The result reaches the client although it was sent to the broker that died.
        pid = job.result(timeout=20)
    assert lines(steps) == [f"start {pid}", f"end {pid}"]


def test_lost_worker_that_comes_back_drops_the_job_another_worker_took(cluster, tmp_path):
    """A worker frozen past its liveness (a paused machine) is given up and its job runs
    elsewhere; when it wakes up it is told to abort its copy, which never finishes."""
    steps = tmp_path / "steps.log"
    cluster.broker()
    frozen = cluster.worker(concurrency=1, imports=("tests.jobs",))
    with corral.Client(cluster.addrs.frontend) as client:
        # Long enough to outlast the freeze: a frozen sleep still ends on time.
        job = client.submit("tests.jobs:start_sleep_end", str(steps), 4.0, guarantee=True)
        wait_for(lambda: len(lines(steps)) == 1, what="the job to start")
        first_pid = int(lines(steps)[0].split()[1])
        frozen.kill_group(signal.SIGSTOP)  # the worker and its pool process
        wait_for(lambda: cluster.status()["workers_lost"] == 1, timeout=20, what="worker given up")
        cluster.worker(concurrency=1, imports=("tests.jobs",), wait=False)
        wait_for(
            lambda: sum(line.startswith("start") for line in lines(steps)) == 2,
            timeout=20,
            what="the job to start again",
        )
        frozen.kill_group(signal.SIGCONT)
        wait_for(
            lambda: "aborted by the broker" in frozen.output(),
            timeout=20,
            what="the returning worker to abort its copy",
        )
        pid = job.result(timeout=30)
        assert pid != first_pid
        assert lines(steps)[-1] == f"end {pid}"
        assert f"end {first_pid}" not in lines(steps)
        record = client.job_info(job.id)
        assert record["state"] == "succeeded" and record["result"] == pid


def test_store_in_use_by_another_broker_is_a_clear_error(cluster):
    cluster.broker()
    message = broker_refuses_to_start(cluster.tmp / "data")
    assert "in use by another broker (pid" in message


def test_restore_refuses_a_store_without_state(tmp_path):
    message = broker_refuses_to_start(tmp_path / "nothing-here", "--restore")
    assert "holds nothing from an earlier run" in message


def test_corral_up_killed_with_sigkill_restarts_on_the_same_ports_at_once(cluster):
    """No child of the dead process (pool, forkserver) keeps its ports or its store."""
    args = corral_cmd(
        "up",
        *cluster.addrs.args(),
        "--data-dir",
        str(cluster.tmp / "data"),
        "--heartbeat",
        "0.5",
        "-c",
        "2",
    )
    up = cluster.start("up", args)
    wait_for(lambda: cluster.free_slots() >= 2, what="corral up to serve", procs=[up])
    with corral.Client(cluster.addrs.frontend) as client:
        assert client.submit("corral.examples:add", 1, 1).result(timeout=10) == 2
    up.send_signal(signal.SIGKILL)  # the main process only, not its group
    up.wait(5)
    again = cluster.start("up", args)
    wait_for(lambda: cluster.free_slots() >= 2, timeout=20, what="a new corral up", procs=[again])
    with corral.Client(cluster.addrs.frontend) as client:
        assert client.submit("corral.examples:add", 2, 2).result(timeout=10) == 4


# ---------------------------------------------------------------- a client that reconnects


def _bind(ctx: zmq.Context, address: str) -> zmq.Socket:
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    deadline = time.monotonic() + 10
    while True:
        try:
            router.bind(address)
            return router
        except zmq.ZMQError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)  # the old socket's port is being released


def _recv(router: zmq.Socket, timeout: float = 10.0) -> tuple[bytes, object]:
    assert router.poll(int(timeout * 1000)), "nothing arrived"
    identity, *frames = router.recv_multipart()
    return identity, parse(frames)


def test_client_catches_up_after_the_broker_comes_back():
    """Outcomes produced while a client was away are fetched; unacknowledged jobs resent."""
    ctx = zmq.Context.instance()
    address = free_addr()
    router = _bind(ctx, address)
    with corral.Client(address, ack_timeout=30) as client:
        done_meanwhile = client.submit("corral.examples:add", 1, 2)
        identity, request = _recv(router)
        assert isinstance(request, Request)
        router.send_multipart(
            [identity, *Reply(new_msgid(), request.msgid).to_frames()]
        )  # acknowledged
        assert done_meanwhile.wait_acknowledged(5)
        router.close(0)  # the broker dies; its outcome for the job never reaches the client
        in_the_gap = client.submit("corral.examples:add", 3, 4)
        router = _bind(ctx, address)  # and comes back
        asked: set[str] = set()
        resent = False
        deadline = time.monotonic() + 15
        while not (asked and resent) and time.monotonic() < deadline:
            identity, msg = _recv(router)
            if isinstance(msg, Query):
                assert msg.op == "outcomes"
                asked.update(msg.params["ids"])
                answer = {"value": {"finished": {done_meanwhile.id: {"value": 3}}, "unknown": []}}
                router.send_multipart(
                    [identity, b"", PROTOCOL, b"REPLY", new_msgid().encode(),
                     json.dumps(answer).encode(), msg.msgid.encode()]
                )  # fmt: skip
            elif isinstance(msg, Request) and msg.msgid == in_the_gap.id:
                resent = True
                refusal = Error(new_msgid(), "duplicate-id", "already submitted", msg.msgid)
                router.send_multipart([identity, *refusal.to_frames()])
        assert asked == {done_meanwhile.id}
        assert done_meanwhile.result(timeout=5) == 3
        assert in_the_gap.wait_acknowledged(5) and not in_the_gap.done()
    router.close(0)
