"""A real broker and real workers on loopback, driven through the public client API."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import pytest

import corral
from corral.errors import JobFailed
from tests.integration.procs import corral_cmd, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def client(up):
    with corral.Client(up.addrs.frontend) as c:
        yield c


def test_submit_and_result(client):
    job = client.submit("corral.examples:add", 2, 3)
    assert job.result(timeout=10) == 5
    assert job.id


def test_call_runs_one_job_and_returns_its_value(client):
    assert [client.call("corral.examples:add", i, i, result_timeout=10) for i in range(20)] == [
        2 * i for i in range(20)
    ]
    with pytest.raises(JobFailed) as info:
        client.call("corral.examples:fail", "boom", result_timeout=10)
    assert info.value.type == "RuntimeError"
    # The client is still usable the usual way afterwards, and queries go the quick way too.
    job = client.submit("corral.examples:add", 1, 2)
    assert job.result(timeout=10) == 3
    assert client.job_info(job.id)["state"] == "succeeded"


def test_outcomes_of_jobs_run_one_at_a_time_come_from_their_processes(up, client):
    # A job that starts at once on an idle process has its outcome sent by that
    # process to the broker (its first one connects first, and goes the usual way).
    for i in range(30):
        assert client.call("corral.examples:add", i, 1, result_timeout=10) == i + 1
    status = up.status()
    assert 0 < status["direct_outcomes"] <= status["jobs_completed"]
    assert status["unknown_replies"] == 0 and status["duplicate_outcomes"] == 0
    # Their jobs' records are those of jobs run by the worker.
    job = client.submit("corral.examples:add", 1, 1)
    assert job.result(timeout=10) == 2
    info = client.job_info(job.id)
    assert info["state"] == "succeeded" and info["worker_uuid"]


def test_remote_error_is_job_failed_with_traceback(client):
    job = client.submit("corral.examples:fail", "boom")
    with pytest.raises(JobFailed) as info:
        job.result(timeout=10)
    assert info.value.type == "RuntimeError"
    assert info.value.message == "boom"
    assert "RuntimeError" in info.value.traceback


def test_not_allowed_target_is_refused_without_import(client):
    with pytest.raises(JobFailed) as info:
        client.submit("os:getcwd").result(timeout=10)
    assert info.value.type == "NotAllowed"


def test_map_in_order(client):
    values = list(client.map("corral.examples:add", range(200), range(200), window=16))
    assert values == [2 * i for i in range(200)]


def test_time_limit_kills_job_and_pool_recovers(client):
    job = client.submit("corral.examples:sleep", 60, timeout=0.5)
    with pytest.raises(JobFailed) as info:
        job.result(timeout=15)
    assert info.value.type == "TimeLimitExceeded"
    assert client.submit("corral.examples:add", 1, 1).result(timeout=10) == 2


def test_jobs_wait_in_their_queue_until_a_worker_serves_it(up, client):
    job = client.submit("corral.examples:add", 1, 2, queue="later")
    wait_for(
        lambda: (up.status() or {}).get("waiting_messages_by_queue", {}).get("later") == 1,
        what="job waiting in queue 'later'",
    )
    assert not job.done()
    up.worker("--queues", "later:10", concurrency=1, imports=("corral.examples",))
    assert job.result(timeout=10) == 3


def test_job_without_reply_is_done_once_stored(up, client):
    # No worker serves "later", so only the broker's acknowledgement can end this job.
    job = client.submit_with("corral.examples:add", (1, 2), queue="later", reply=False)
    assert job.result(timeout=10) is None
    assert job.acknowledged
    assert client.job_info(job.id)["state"] == "queued"
    up.worker("--queues", "later:10", concurrency=1, imports=("corral.examples",))
    wait_for(
        lambda: client.job_info(job.id)["state"] == "succeeded",
        what="the job to run although nobody waits for it",
    )
    assert client.job_info(job.id)["result"] == 3


def test_async_job_without_reply_is_done_once_stored(up):
    async def main() -> None:
        async with corral.AsyncClient(up.addrs.frontend) as client:
            job = await client.submit_with(
                "corral.examples:add", (2, 2), queue="later", reply=False
            )
            assert await asyncio.wait_for(job, 10) is None
            assert job.acknowledged

    asyncio.run(main())


def test_higher_weight_queue_first(cluster):
    cluster.broker()
    up = cluster
    up.worker("--prefetch", "0", concurrency=2, imports=("corral.examples", "tests.jobs"))
    with corral.Client(up.addrs.frontend) as client:
        # Occupy both slots, queue low then high; the high one runs first.
        blockers = [client.submit("corral.examples:sleep", 0.5) for _ in range(2)]
        wait_for(lambda: up.free_slots() == 0, what="slots busy")
        low = client.submit("tests.jobs:stamp", queue="low")
        high = client.submit("tests.jobs:stamp", queue="high")
        up.worker(
            "--queues", "high:20,low:5", "--prefetch", "0", concurrency=1, imports=("tests.jobs",)
        )
        t_high, t_low = high.result(timeout=10), low.result(timeout=10)
        assert t_high < t_low
        for b in blockers:
            b.result(timeout=10)


def test_status_cli_table_and_json(up, client):
    client.submit("corral.examples:add", 1, 1).result(timeout=10)
    out = subprocess.run(
        corral_cmd("status", "--admin", up.addrs.admin), capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "default" in out.stdout and "workers" in out.stdout
    out = subprocess.run(
        corral_cmd("status", "--admin", up.addrs.admin, "--json"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert '"processed_messages_by_queue"' in out.stdout


def test_submit_cli_wait(up):
    env_cmd = corral_cmd(
        "submit", "corral.examples:add", "2", "3", "--wait", "--broker", up.addrs.frontend
    )
    out = subprocess.run(env_cmd, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5"
    out = subprocess.run(
        corral_cmd("submit", "corral.examples:fail", "--wait", "--broker", up.addrs.frontend),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 1 and "RuntimeError" in out.stderr


def test_submit_cli_rejects_non_json_args(up):
    out = subprocess.run(
        corral_cmd("submit", "corral.examples:add", "two", "--broker", up.addrs.frontend),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0 and "JSON" in out.stderr


def test_worker_killed_mid_job(up, client):
    """A guaranteed job survives its worker's death; a plain one fails with WorkerLost."""
    victim = up.procs[-1]
    guaranteed = client.submit("corral.examples:sleep", 1.0, guarantee=True)
    plain = client.submit("corral.examples:sleep", 1.0)
    wait_for(
        lambda: (up.status() or {}).get("inflight_messages_by_queue", {}).get("default") == 2,
        what="both jobs running",
    )
    victim.kill_group(signal.SIGKILL)
    with pytest.raises(JobFailed) as info:
        plain.result(timeout=15)
    assert info.value.type == "WorkerLost"
    up.worker(concurrency=1, imports=("corral.examples",))
    assert guaranteed.result(timeout=15) == 1.0


def test_worker_sigterm_drains(up, client):
    worker = up.procs[-1]
    job = client.submit("corral.examples:sleep", 0.5)
    wait_for(
        lambda: (up.status() or {}).get("inflight_messages_by_queue", {}).get("default") == 1,
        what="job running",
    )
    worker.send_signal(signal.SIGTERM)
    assert job.result(timeout=10) == 0.5
    assert worker.wait(15) == 0
    wait_for(lambda: up.worker_count() == 0, what="worker to say goodbye")


def test_worker_reconnects_after_broker_restart(cluster):
    broker = cluster.broker()
    cluster.worker(concurrency=1, imports=("corral.examples",))
    worker_name = next(iter(cluster.workers()["connected_workers"]))
    broker.kill_group(signal.SIGKILL)
    broker.wait(5)
    cluster.broker()
    wait_for(
        lambda: worker_name in cluster.workers()["connected_workers"],
        timeout=20,
        what="worker to re-register with the same uuid",
    )
    with corral.Client(cluster.addrs.frontend) as client:
        assert client.submit("corral.examples:add", 4, 4).result(timeout=10) == 8


def test_broker_sigterm_says_kbye_and_exits(cluster):
    broker = cluster.broker()
    cluster.worker(concurrency=1, imports=("corral.examples",))
    broker.send_signal(signal.SIGTERM)
    assert broker.wait(10) == 0


def test_garbage_does_not_stop_the_broker(up, client):
    import zmq

    ctx = zmq.Context.instance()
    for addr in (up.addrs.frontend, up.addrs.backend, up.addrs.admin):
        s = ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.IDENTITY, b"\xff\xfe-not-utf8")
        s.setsockopt(zmq.LINGER, 0)
        s.connect(addr)
        s.send_multipart([b"", b"eMQP/1.0", b"REQUEST", b"x", b"default", b"", b"{broken"])
        s.send_multipart([b"garbage"])
        assert s.poll(5000), "no ERROR reply"
        reply = s.recv_multipart()
        assert reply[2] == b"ERROR"
        s.close()
    status = up.status()
    assert sum(status["malformed_messages"].values()) >= 3
    assert client.submit("corral.examples:add", 1, 2).result(timeout=10) == 3


def test_python_dash_m_corral_help():
    out = subprocess.run(
        [sys.executable, "-m", "corral", "--help"], capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0 and "broker" in out.stdout and "submit" in out.stdout


def test_corral_up_prints_how_to_submit(tmp_path):
    from tests.integration.procs import BrokerAddrs, Proc

    addrs = BrokerAddrs()
    proc = Proc("up", corral_cmd("up", *addrs.args(), "-c", "1"), tmp_path / "up.log").start()
    try:
        wait_for(lambda: "corral submit" in proc.output(), what="banner", procs=[proc])
        assert "corral.examples:add" in proc.output()
        out = subprocess.run(
            corral_cmd(
                "submit", "corral.examples:add", "2", "3", "--wait", "--broker", addrs.frontend
            ),
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.stdout.strip() == "5", out.stderr
    finally:
        proc.stop()
