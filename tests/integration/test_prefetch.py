"""Prefetch on real processes: a job held by a busy worker moves to an idle process."""

from __future__ import annotations

import signal

import pytest

import corral
from tests.integration.procs import wait_for

pytestmark = pytest.mark.integration


def _held_by_one_worker(cluster, jobs: int) -> bool:
    status = cluster.status() or {}
    return status.get("inflight_messages_by_queue", {}).get("default") == jobs


def _worker_ids(cluster) -> set[int]:
    return {w["id"] for w in cluster.workers()["connected_workers"].values()}


def test_a_prefetched_job_moves_to_a_worker_that_joins_while_it_waits(cluster):
    cluster.broker()
    cluster.worker(concurrency=1, imports=("corral.examples",))  # default prefetch
    first = _worker_ids(cluster)
    with corral.Client(cluster.addrs.frontend) as client:
        long = client.submit("corral.examples:sleep", 30.0)
        short = client.submit("corral.examples:add", 1, 2)
        # Both went to the only worker: one runs, one waits behind it in that worker.
        wait_for(lambda: _held_by_one_worker(cluster, 2), what="both jobs sent to the worker")
        cluster.worker(concurrency=1, imports=("corral.examples",))
        (second,) = _worker_ids(cluster) - first
        assert short.result(timeout=15) == 3  # long before the 30 s job could end
        assert client.job(short.id).info()["worker_id"] == second
        assert client.job(short.id).info()["attempts"] == 1
        assert client.job(long.id).state == "running"
        status = cluster.status()
        assert status["jobs_recalled"] == 1 and status["jobs_released"] == 1
        client.cancel(long.id)


def test_a_leaving_worker_hands_back_the_jobs_it_has_not_started(cluster):
    cluster.broker()
    leaving = cluster.worker(concurrency=1, imports=("corral.examples",))
    first = _worker_ids(cluster)
    with corral.Client(cluster.addrs.frontend) as client:
        long = client.submit("corral.examples:sleep", 3.0)
        short = client.submit("corral.examples:add", 2, 2)
        wait_for(lambda: _held_by_one_worker(cluster, 2), what="both jobs sent to the worker")
        leaving.send_signal(signal.SIGTERM)
        # The leaving worker gave the job back: it is waiting in the broker's queue
        # (it would otherwise run there after the 3 s job, within the grace period).
        wait_for(
            lambda: (
                (cluster.status() or {}).get("waiting_messages_by_queue", {}).get("default") == 1
            ),
            what="the prefetched job back in its queue",
        )
        cluster.worker(concurrency=1, imports=("corral.examples",))
        (second,) = _worker_ids(cluster) - first
        assert short.result(timeout=15) == 4
        assert client.job(short.id).info()["worker_id"] == second
        assert long.result(timeout=15) == 3.0  # the running one finished where it was
        assert leaving.wait(15) == 0


def test_a_killed_workers_prefetched_job_runs_elsewhere_and_its_running_one_fails(cluster):
    cluster.broker()
    victim = cluster.worker(concurrency=1, imports=("corral.examples",))
    with corral.Client(cluster.addrs.frontend) as client:
        running = client.submit("corral.examples:sleep", 30.0)  # no guarantee, no retries
        prefetched = client.submit("corral.examples:add", 3, 4)
        wait_for(lambda: _held_by_one_worker(cluster, 2), what="both jobs sent to the worker")
        victim.kill_group(signal.SIGKILL)
        with pytest.raises(corral.JobFailed) as info:
            running.result(timeout=15)
        assert info.value.type == "WorkerLost"
        cluster.worker(concurrency=1, imports=("corral.examples",))
        assert prefetched.result(timeout=15) == 7  # it never ran: it runs, not fails
        assert client.job(prefetched.id).info()["attempts"] == 1
