"""The broker purges the records of jobs that ended longer ago than its retention, by itself.

The broker runs in this process (so that its purge timer, a minute then an
hour in production, can be made short); the worker is a real one, and the
records are those of jobs it ran, in a SQLite store.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

import corral
import corral.broker.server as server_mod
from corral.broker.core import BrokerConfig, BrokerCore
from corral.broker.server import BrokerServer
from corral.errors import JobFailed
from corral.store.sqlite import SQLiteStore
from tests.integration.procs import wait_for

pytestmark = pytest.mark.integration


class Broker:
    """A broker serving on the cluster's addresses from an event loop in a thread."""

    def __init__(self, cluster, retention: float) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = BrokerServer(
            BrokerCore(BrokerConfig(heartbeat_interval=cluster.heartbeat)),
            frontend=cluster.addrs.frontend,
            backend=cluster.addrs.backend,
            admin=cluster.addrs.admin,
            store=SQLiteStore(str(cluster.tmp / "corral.db")),
            retention=retention,
        )
        #: The retention each automatic purge was run with.
        self.purges: list[float] = []
        purge = self.server.purge

        async def counted(older_than: float) -> int:
            self.purges.append(older_than)
            return await purge(older_than)

        self.server.purge = counted  # type: ignore[method-assign]
        self.server.open_store()
        self.server.bind()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.serving = asyncio.run_coroutine_threadsafe(self.server.serve(), self.loop)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.stop)
        self.serving.result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def state(client: corral.Client, job_id: str) -> Any:
    """The job's state, or None once its record is gone."""
    try:
        return client.job_info(job_id)["state"]
    except JobFailed as exc:
        assert exc.type == "NotFound", exc
        return None


def test_records_older_than_the_retention_are_purged_on_a_timer(cluster, monkeypatch):
    monkeypatch.setattr(server_mod, "PURGE_FIRST", 0.1)
    monkeypatch.setattr(server_mod, "PURGE_EVERY", 0.2)
    retention = 3.0
    broker = Broker(cluster, retention)
    try:
        cluster.worker(concurrency=1, imports=("corral.examples",))
        with corral.Client(cluster.addrs.frontend) as client:
            waiting = client.submit("corral.examples:add", 1, 1, queue="nobody")
            done = client.submit("corral.examples:add", 1, 1)
            failed = client.submit("corral.examples:fail", "on purpose")
            assert done.result(timeout=20) == 2
            with pytest.raises(JobFailed):
                failed.result(timeout=20)
            assert waiting.wait_acknowledged(10)
            ended = [client.job_info(job.id)["completed"] for job in (done, failed)]
            # Purges run meanwhile, but the records are younger than the retention.
            runs = len(broker.purges)
            wait_for(lambda: len(broker.purges) >= runs + 2, what="two more purge runs")
            if time.time() < min(ended) + retention - 0.1:
                assert (state(client, done.id), state(client, failed.id)) == (
                    "succeeded",
                    "failed",
                )
            # Once older than the retention, a later run deletes them; a queued job stays.
            wait_for(
                lambda: state(client, done.id) is None and state(client, failed.id) is None,
                timeout=30,
                what="the finished jobs' records to be purged",
            )
            assert time.time() >= max(ended) + retention  # not before their time
            assert state(client, waiting.id) == "queued"
            assert set(broker.purges) == {retention}
            client.cancel(waiting.id)
    finally:
        broker.close()
