"""Where the broker commits: a lone job on its loop, batches in the writer thread.

Either way a job is acknowledged only once its record is stored.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import zmq

import corral
from corral.broker.core import BrokerConfig, BrokerCore, Dest
from corral.broker.server import BrokerServer
from corral.store.sqlite import SQLiteStore
from corral.store.streams import StreamBatch, StreamWrite

pytestmark = pytest.mark.integration


class RecordingStore(SQLiteStore):
    """A SQLite store that notes, for each commit, its thread and the job ids in it."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.commits: list[tuple[str, set[str]]] = []

    def commit(self, jobs: Any, workers: Any, meta: Any, *args: Any, **kwargs: Any) -> None:
        super().commit(jobs, workers, meta, *args, **kwargs)
        ids = {rec.id for rec in jobs} | {rec.id for rec in kwargs.get("updates", ())}
        self.commits.append((threading.current_thread().name, ids))


def test_a_lone_job_is_stored_on_the_loop_before_its_acknowledgement(cluster):
    store = RecordingStore(str(cluster.tmp / "corral.db"))
    loop = asyncio.new_event_loop()
    server = BrokerServer(
        BrokerCore(BrokerConfig(heartbeat_interval=cluster.heartbeat)),
        frontend=cluster.addrs.frontend,
        backend=cluster.addrs.backend,
        admin=cluster.addrs.admin,
        store=store,
    )
    server.open_store()
    server.bind()
    thread = threading.Thread(target=loop.run_forever, name="broker-loop", daemon=True)
    thread.start()
    serving = asyncio.run_coroutine_threadsafe(server.serve(), loop)
    try:
        with corral.Client(cluster.addrs.frontend) as client:
            for _ in range(3):
                job = client.submit("corral.examples:add", 1, 2)  # no worker: it waits
                assert job.wait_acknowledged(timeout=10)
                # Acknowledged: stored already, by the loop itself (no thread hand-off).
                assert ("broker-loop", {job.id}) in store.commits
    finally:
        loop.call_soon_threadsafe(server.stop)
        serving.result(30)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _server(tmp_path, **store_options: Any) -> BrokerServer:
    store = SQLiteStore(str(tmp_path / "corral.db"), **store_options)
    return BrokerServer(
        BrokerCore(BrokerConfig()),
        frontend="inproc://f",
        backend="inproc://b",
        admin="inproc://a",
        store=store,
    )


ACK = ("frontend", b"client", [b"", b"eMQP/1.0", b"REPLY", b"t", b"id"])


def test_only_a_lone_acknowledgement_is_committed_on_the_loop(tmp_path):
    server = _server(tmp_path)
    nothing = StreamBatch()
    assert server._small(1, [], nothing, [ACK])
    assert server._small(2, [], nothing, [ACK])  # with the update of an earlier job
    # A busy broker's batch, or one with more than jobs in it, goes to the writer.
    assert not server._small(3, [], nothing, [ACK])
    assert not server._small(2, [], nothing, [ACK, ACK])
    assert not server._small(0, [], nothing, [])
    streamed = StreamBatch(writes=[StreamWrite(name="s", seq=1, header=b"{}")])
    assert not server._small(1, [], streamed, [ACK])


def test_a_lone_acknowledgement_goes_to_the_writer_while_messages_wait(tmp_path):
    server = _server(tmp_path)
    ctx = zmq.Context.instance()
    receiver, sender = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    receiver.bind("inproc://commit-path-waiting")
    sender.connect("inproc://commit-path-waiting")
    try:
        server.sockets[Dest.FRONTEND] = receiver
        server._loop = loop = asyncio.new_event_loop()
        assert server._small(1, [], StreamBatch(), [ACK])
        sender.send(b"another job")
        assert receiver.poll(5000)
        assert not server._small(1, [], StreamBatch(), [ACK])
        # Looking took the edge of the socket's FD, so the loop would not wake for
        # that message: a drain of the socket is on its way instead.
        assert server._pending_drain == {Dest.FRONTEND}
        loop.close()
    finally:
        server.sockets.clear()
        receiver.close(0)
        sender.close(0)


def test_an_fsyncing_store_always_commits_in_the_writer(tmp_path):
    server = _server(tmp_path, fsync=True)
    assert not server._small(1, [], StreamBatch(), [ACK])
