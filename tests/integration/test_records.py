"""Job records, retries and dead letters through a real broker, store and worker."""

from __future__ import annotations

import json
import signal
import subprocess

import pytest

import corral
from corral.errors import JobFailed
from tests.integration.procs import broker_refuses_to_start, corral_cmd, wait_for

pytestmark = pytest.mark.integration


@pytest.fixture
def client(cluster):
    cluster.broker("--retry-backoff", "0.05")
    cluster.worker(concurrency=2, imports=("corral.examples", "tests.jobs"))
    with corral.Client(cluster.addrs.frontend) as c:
        yield c


def test_record_of_a_finished_job(client):
    job = client.submit("corral.examples:add", 2, 3, label="sums")
    assert job.result(timeout=10) == 5
    info = client.job_info(job.id)
    assert info["state"] == "succeeded" and info["result"] == 5
    assert info["attempts"] == 1 and info["worker_id"] == 1 and info["label"] == "sums"
    assert info["submitted"] <= info["started"] <= info["completed"]
    assert [j["id"] for j in client.jobs(label="sums")] == [job.id]


def test_unknown_job_is_not_found(client):
    with pytest.raises(JobFailed) as info:
        client.job_info("no-such-job")
    assert info.value.type == "NotFound"


def test_retries_then_dead_then_retry(cluster, client):
    job = client.submit("corral.examples:fail", "again", retries=2)
    with pytest.raises(JobFailed) as info:
        job.result(timeout=30)
    assert info.value.message == "again"
    record = client.job_info(job.id)
    assert record["state"] == "dead" and record["attempts"] == 3
    assert record["error"]["type"] == "RuntimeError"
    assert job.id in [j["id"] for j in client.jobs(state="dead")]
    out = subprocess.run(
        corral_cmd("jobs", "--dead", "--broker", cluster.addrs.frontend),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and job.id[:8] in out.stdout
    out = subprocess.run(
        corral_cmd("retry", job.id, "--broker", cluster.addrs.frontend),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in (f"job {job.id} is {s} again" for s in ("queued", "running"))

    def dead_again() -> bool:
        info = client.job_info(job.id)
        return info["state"] == "dead" and info["attempts"] == 3

    wait_for(dead_again, timeout=30, what="retried job dead again")
    out = subprocess.run(
        corral_cmd("retry", job.id, "--json", "--broker", cluster.addrs.frontend),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["id"] == job.id and answer["state"] in ("queued", "running"), answer
    wait_for(dead_again, timeout=30, what="retried job dead once more")
    with pytest.raises(JobFailed) as info:
        client.retry(client.submit("corral.examples:add", 1, 1).id)
    assert info.value.type in ("NotRetryable", "NotFound")


def test_records_and_worker_ids_survive_a_broker_kill(cluster):
    broker = cluster.broker()
    cluster.worker(concurrency=1, imports=("corral.examples",))
    with corral.Client(cluster.addrs.frontend) as client:
        done = client.submit("corral.examples:add", 1, 2)
        assert done.result(timeout=10) == 3
        waiting = client.submit("corral.examples:add", 5, 5, queue="nobody")
        assert waiting.wait_acknowledged(10)
    wait_for(lambda: cluster.status()["jobs_accepted"] == 2, what="both accepted")
    broker.kill_group(signal.SIGKILL)
    broker.wait(5)
    cluster.broker()  # same data directory: restores
    with corral.Client(cluster.addrs.frontend) as client:
        assert client.job_info(done.id)["result"] == 3
        assert client.job_info(waiting.id)["state"] == "queued"
        wait_for(
            lambda: "1" in client.workers()["workers"], timeout=20, what="worker back with its id"
        )
        cluster.worker("--queues", "nobody", concurrency=1, imports=("corral.examples",))
        wait_for(
            lambda: client.job_info(waiting.id)["state"] == "succeeded",
            timeout=20,
            what="the restored job to run",
        )
        assert client.job_info(waiting.id)["result"] == 10
        assert sorted(client.workers()["registered"].values()) == [1, 2]


def test_corrupt_store_is_a_clear_error_at_start(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "broker.db").write_bytes(b"garbage" * 1000)
    assert "not a readable SQLite database" in broker_refuses_to_start(data)
