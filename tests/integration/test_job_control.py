"""Any client can follow, cancel and chain any job; records are kept, then purged."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess

import pytest

import corral
from corral.errors import JobFailed
from corral.worker.manager import PREFETCH_PER_PROCESS
from tests.integration.procs import corral_cmd, wait_for

pytestmark = pytest.mark.integration


def cli(cluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        corral_cmd(*args, "--broker", cluster.addrs.frontend),
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_another_client_follows_a_job_by_id(up):
    with corral.Client(up.addrs.frontend) as submitter, corral.Client(up.addrs.frontend) as other:
        job = submitter.submit("corral.examples:sleep", 0.5, label="followed")
        assert job.wait_acknowledged(10)  # before that, another client may not find it
        handle = other.job(job.id)
        assert handle.state in ("queued", "running")
        assert handle.result(timeout=10) == 0.5
        info = handle.info()
        assert info["state"] == "succeeded" and info["attempts"] == 1 and info["worker_id"] == 1
        assert info["submitted"] <= info["started"] <= info["completed"] <= info["received"]
        # A finished job: the handle is settled at once, and reading is not destructive.
        again = other.job(job.id)
        assert again.result(timeout=5) == 0.5 and other.job_info(job.id)["result"] == 0.5
        failed = submitter.submit("corral.examples:fail", "nope")
        assert failed.wait_acknowledged(10)  # another client cannot know of it before
        with pytest.raises(JobFailed) as info:
            other.job(failed.id).result(timeout=10)
        assert info.value.type == "RuntimeError"
        with pytest.raises(JobFailed) as info:
            other.job("no-such-job").result(timeout=10)
        assert info.value.type == "NotFound"


def test_a_handle_survives_a_broker_restart(cluster):
    broker = cluster.broker()
    cluster.worker(concurrency=1, imports=("corral.examples",))
    with (
        corral.Client(cluster.addrs.frontend) as submitter,
        corral.Client(cluster.addrs.frontend) as other,
    ):
        job = submitter.submit("corral.examples:sleep", 2.0)
        # Acknowledged means stored: what a broker killed later still knows.
        assert job.wait_acknowledged(10)
        handle = other.job(job.id)
        wait_for(lambda: handle.state == "running", what="the job to run")
        broker.kill_group(signal.SIGKILL)
        broker.wait(5)
        cluster.broker("--restore")
        assert handle.result(timeout=20) == 2.0
        assert job.result(timeout=5) == 2.0


def test_cancel_queued_running_and_finished_jobs(up):
    with corral.Client(up.addrs.frontend) as client:
        # Two processes run two jobs, more wait in the worker (prefetched), one in
        # the broker's queue.
        running = [client.submit("corral.examples:sleep", 30) for _ in range(2)]
        prefetched = [
            client.submit("corral.examples:sleep", 30) for _ in range(2 * PREFETCH_PER_PROCESS)
        ]
        queued = client.submit("corral.examples:sleep", 30)
        wait_for(lambda: all(j.state == "running" for j in running), what="both slots busy")
        wait_for(lambda: up.free_slots() == 0, what="the prefetch slots taken")
        assert client.job_info(queued.id)["state"] == "queued"
        assert [client.job_info(j.id)["started"] for j in prefetched] == [None] * len(prefetched)
        answer = client.cancel(queued.id)
        assert answer["cancelled"] and answer["was"] == "queued"
        with pytest.raises(JobFailed) as info:
            queued.result(timeout=5)
        assert info.value.type == "JobCancelled"
        for job in prefetched:
            answer = client.cancel(job.id)  # never started: no process to kill
            assert answer["cancelled"] and answer["was"] == "queued"
            with pytest.raises(JobFailed) as info:
                job.result(timeout=5)
            assert info.value.type == "JobCancelled"
        out = cli(up, "cancel", running[0].id)
        assert out.returncode == 0 and "cancelled" in out.stdout, out.stderr
        with pytest.raises(JobFailed) as info:
            running[0].result(timeout=10)
        assert info.value.type == "JobCancelled"
        # The slot is free again: its process was killed, not left to sleep.
        assert client.submit("corral.examples:add", 1, 2).result(timeout=10) == 3
        assert client.job_info(running[0].id)["state"] == "cancelled"
        finished = client.cancel(queued.id)
        assert not finished["cancelled"] and "already ended" in finished["detail"]
        out = cli(up, "cancel", queued.id)
        assert out.returncode == 0 and "already ended" in out.stdout
        out = cli(up, "cancel", "no-such-job")
        assert out.returncode != 0 and "NotFound" in out.stderr
        client.cancel(running[1].id)


def test_dependencies_run_in_order_and_fail_at_once(up):
    with corral.Client(up.addrs.frontend) as client:
        first = client.submit("corral.examples:sleep", 0.3)
        second = client.submit("tests.jobs:stamp", after=[first])
        assert second.result(timeout=10) >= client.job_info(first.id)["completed"]
        bad = client.submit("corral.examples:fail", "upstream")
        downstream = client.submit("corral.examples:add", 1, 1, after=[bad.id])
        chained = client.submit("corral.examples:add", 2, 2, after=[downstream])
        for job in (downstream, chained):
            with pytest.raises(JobFailed) as info:
                job.result(timeout=10)
            assert info.value.type == "DependencyFailed"
        assert client.job_info(chained.id)["after"] == [downstream.id]
        ghost = client.submit("corral.examples:add", 1, 1, after=["never-submitted"])
        with pytest.raises(JobFailed) as info:
            ghost.result(timeout=10)
        assert info.value.type == "DependencyFailed" and "no such job" in info.value.message


def test_job_lists_and_records_from_the_cli(up):
    with corral.Client(up.addrs.frontend) as client:
        jobs = [client.submit("corral.examples:add", i, i, label="cli") for i in range(3)]
        assert [j.result(timeout=10) for j in jobs] == [0, 2, 4]
    out = cli(up, "jobs", "--state", "succeeded", "--limit", "2", "--json")
    listed = json.loads(out.stdout)
    assert out.returncode == 0 and len(listed) == 2
    assert {j["id"] for j in listed} <= {j.id for j in jobs}
    out = cli(up, "jobs", "--queue", "default")
    assert out.returncode == 0 and jobs[0].id[:8] in out.stdout
    out = cli(up, "job", jobs[1].id)
    assert out.returncode == 0 and "succeeded" in out.stdout
    out = cli(up, "job", jobs[1].id, "--json")
    assert json.loads(out.stdout)["result"] == 2


def test_purge_removes_old_records_only(up):
    with corral.Client(up.addrs.frontend) as client:
        done = client.submit("corral.examples:add", 1, 1)
        assert done.result(timeout=10) == 2
        waiting = client.submit("corral.examples:add", 1, 1, queue="nobody")
        assert waiting.wait_acknowledged(10)
        out = cli(up, "purge", "--older-than", "1h")
        assert out.returncode == 0 and "purged 0" in out.stdout
        out = cli(up, "purge", "--older-than", "1h", "--json")
        assert out.returncode == 0 and json.loads(out.stdout) == {"purged": 0}, out.stdout
        assert client.job_info(done.id)["state"] == "succeeded"
        out = cli(up, "purge", "--older-than", "0s")
        assert out.returncode == 0 and "purged 1" in out.stdout, out.stdout
        assert client.job_info(waiting.id)["state"] == "queued"
        done = client.submit("corral.examples:add", 1, 1)
        assert done.result(timeout=10) == 2
        out = cli(up, "purge", "--older-than", "0s", "--json")
        assert out.returncode == 0 and json.loads(out.stdout) == {"purged": 1}, out.stdout
        with pytest.raises(JobFailed) as info:
            client.job_info(done.id)
        assert info.value.type == "NotFound"
        assert client.job_info(waiting.id)["state"] == "queued"
        client.cancel(waiting.id)


def test_async_client_records_and_control(up):
    async def main() -> None:
        async with corral.AsyncClient(up.addrs.frontend) as client:
            job = await client.submit("corral.examples:add", 20, 22)
            assert await job == 42
            handle = await client.job(job.id)
            assert await handle == 42 and await handle.state() == "succeeded"
            assert (await client.job_info(job.id))["result"] == 42
            assert job.id in {j["id"] for j in await client.jobs(state="succeeded")}
            slow = await client.submit("corral.examples:sleep", 30)
            assert (await client.cancel(slow.id))["cancelled"]
            with pytest.raises(JobFailed):
                await slow
            after = await client.submit("corral.examples:add", 1, 2, after=[job.id])
            assert await after == 3
            assert "registered" in await client.workers()

    asyncio.run(main())
