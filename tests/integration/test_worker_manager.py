"""A worker manager against a broker played by the test: what it says, and when."""

from __future__ import annotations

import asyncio
import json

import pytest
import zmq
import zmq.asyncio

from corral.protocol import (
    Abort,
    Ack,
    Error,
    Inform,
    Kbye,
    Message,
    Ready,
    Reply,
    Request,
    RunParams,
    encode_body,
    new_msgid,
    parse,
    parse_headers,
)
from corral.worker.manager import (
    PREFETCH_HYSTERESIS,
    PREFETCH_MAX_PER_PROCESS,
    PREFETCH_PER_PROCESS,
    PREFETCH_WINDOW,
    WorkerConfig,
    WorkerManager,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class Broker:
    """The backend side of a broker, driven step by step by a test."""

    def __init__(self) -> None:
        self.ctx = zmq.asyncio.Context.instance()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.bind("tcp://127.0.0.1:0")
        self.address = self.sock.getsockopt(zmq.LAST_ENDPOINT).decode()
        self.worker = b""
        #: Who sent the last message returned by next(): the worker, or one of its
        #: job processes ("<worker>/<pid>", which only sends outcomes).
        self.sender = b""

    async def next(self, *kinds: type[Message], timeout: float = 10.0) -> Message:
        """The next message of one of ``kinds`` (others, e.g. heartbeats, are skipped)."""
        while True:
            identity, *frames = await asyncio.wait_for(self.sock.recv_multipart(), timeout)
            self.sender = identity
            if b"/" not in identity:
                self.worker = identity
            msg = parse(frames)
            if isinstance(msg, kinds):
                return msg

    async def send(self, msg: Message) -> None:
        await self.sock.send_multipart([self.worker, *msg.to_frames()])

    async def job(self, fn: str, *args: object) -> str:
        module, _, name = fn.partition(":")
        job_id = new_msgid()
        body = encode_body(RunParams(module, name, list(args)))
        await self.send(Request(job_id, "default", parse_headers("reply-requested"), body))
        return job_id


async def _started(
    heartbeat: float = 3.0, ack_meta: dict | None = None, prefetch: int | None = 0
) -> tuple[Broker, WorkerManager, asyncio.Task[None]]:
    broker = Broker()
    manager = WorkerManager(
        WorkerConfig(
            backend=broker.address,
            concurrency=1,
            imports=("corral.examples",),
            heartbeat_interval=heartbeat,
            prefetch=prefetch,
        )
    )
    task = asyncio.ensure_future(manager.run())
    inform = await broker.next(Inform, timeout=30)  # the pool starts first
    # Meta: a corral broker (by default one that takes READY only on its own).
    await broker.send(Ack(new_msgid(), inform.msgid, ack_meta or {}))
    for _ in range(1 + (PREFETCH_PER_PROCESS if prefetch is None else prefetch)):  # 1 process
        await broker.next(Ready)
    return broker, manager, task


def _value(msg: Message) -> object:
    assert isinstance(msg, Reply) and msg.result is not None
    return json.loads(msg.result)


async def _stop(broker: Broker, manager: WorkerManager, task: asyncio.Task[None]) -> None:
    manager.stop()
    await asyncio.wait_for(task, 30)
    broker.sock.close(0)


def test_an_outcome_carries_the_ready_for_its_slot_when_the_broker_offers_it() -> None:
    async def scenario() -> None:
        broker, manager, task = await _started(ack_meta={"reply_ready": 1})
        for n in range(3):
            job = await broker.job("corral.examples:add", n, 1)
            # Only REPLY and READY count here: the first one after the job must be
            # its outcome, with the READY folded into it.
            reply = await broker.next(Reply, Ready)
            assert isinstance(reply, Reply) and reply.ref == job and reply.ready
            assert _value(reply) == {"value": n + 1}
        await _stop(broker, manager, task)

    asyncio.run(scenario())


def test_without_the_offer_an_outcome_is_followed_by_ready() -> None:
    async def scenario() -> None:
        broker, manager, task = await _started()
        job = await broker.job("corral.examples:add", 2, 3)
        reply = await broker.next(Reply, Ready)
        assert isinstance(reply, Reply) and reply.ref == job and not reply.ready
        assert isinstance(await broker.next(Reply, Ready), Ready)
        await _stop(broker, manager, task)

    asyncio.run(scenario())


def test_a_job_it_cannot_parse_is_answered_bad_request_and_its_slot_offered_again() -> None:
    async def scenario() -> None:
        broker, manager, task = await _started()
        for body in (b"{not json", b'["stop", {}]', b'["run", {"path": 1}]'):
            job_id = new_msgid()
            await broker.sock.send_multipart(
                [broker.worker, b"", b"eMQP/1.0", b"REQUEST", job_id.encode(), b"default", b"",
                 body]
            )  # fmt: skip
            reply = await broker.next(Reply)
            assert reply.ref == job_id
            assert json.loads(reply.result)["error"]["type"] == "BadRequest"
            await broker.next(Ready)  # the slot it took
        job = await broker.job("corral.examples:add", 1, 1)  # and it still works
        reply = await broker.next(Reply)
        assert reply.ref == job and _value(reply) == {"value": 2}
        await _stop(broker, manager, task)

    asyncio.run(scenario())


def test_a_job_that_arrives_while_draining_still_runs_before_the_goodbye() -> None:
    async def main() -> None:
        broker, manager, task = await _started()
        manager.config.grace = 10.0
        manager.stop()  # SIGTERM: no READY any more, running jobs get the grace period
        # The broker sends a job before it reads the worker's first goodbye ...
        job = await broker.job("corral.examples:sleep", 0.2)
        leaving = await broker.next(Kbye)
        assert isinstance(leaving, Kbye) and leaving.draining
        await broker.send(Ack(new_msgid(), leaving.msgid))  # ... and then sends no more
        reply = await broker.next(Reply, Kbye)
        assert isinstance(reply, Reply) and reply.ref == job and _value(reply) == {"value": 0.2}
        final = await broker.next(Kbye, Ready)
        assert isinstance(final, Kbye) and not final.draining
        await asyncio.wait_for(task, 30)
        broker.sock.close(0)

    asyncio.run(main())


def test_without_an_answer_to_its_goodbye_a_worker_leaves_all_the_same() -> None:
    async def main() -> None:
        broker, manager, task = await _started()
        manager.config.heartbeat_interval = 0.2  # it waits for the answer up to 2 intervals
        manager.stop()
        assert (await broker.next(Kbye)).draining
        final = await broker.next(Kbye)  # an EventMQ router would not answer
        assert not final.draining
        await asyncio.wait_for(task, 30)
        broker.sock.close(0)

    asyncio.run(main())


def test_abort_kills_the_job_and_frees_its_slot() -> None:
    async def main() -> None:
        broker, manager, task = await _started()
        job = await broker.job("corral.examples:sleep", 30)
        await asyncio.sleep(0.3)  # let it start: the abort must kill a running process
        await broker.send(Abort(new_msgid(), job, "cancelled"))
        reply = await broker.next(Reply, timeout=10)
        assert reply.ref == job and _value(reply)["error"]["type"] == "JobCancelled"
        await broker.next(Ready)  # the slot is offered again
        other = await broker.job("corral.examples:add", 1, 2)
        reply = await broker.next(Reply)
        assert reply.ref == other and _value(reply) == {"value": 3}
        # An abort of a job the worker does not hold changes nothing.
        await broker.send(Abort(new_msgid(), "not-here", "cancelled"))
        await _stop(broker, manager, task)

    asyncio.run(main())


def test_a_worker_that_lost_its_broker_says_which_jobs_it_still_runs() -> None:
    async def main() -> None:
        broker, manager, task = await _started(heartbeat=0.2)  # a silent broker is lost soon
        job = await broker.job("corral.examples:sleep", 3)
        again = await broker.next(Inform, timeout=10)
        assert again.meta is not None and again.meta["running"] == [job]
        await broker.send(Ack(new_msgid(), again.msgid))
        await broker.send(Abort(new_msgid(), job, "given to another worker"))
        reply = await broker.next(Reply)
        assert reply.ref == job and _value(reply)["error"]["type"] == "JobCancelled"
        await _stop(broker, manager, task)

    asyncio.run(main())


def test_prefetch_follows_the_run_time_and_the_slots_offered_follow_it() -> None:
    async def main() -> None:
        # A corral broker (its ACK has meta), which takes READY on its own.
        broker, manager, task = await _started(ack_meta={"reply_ready": 0}, prefetch=None)
        offered = 1 + PREFETCH_PER_PROCESS  # READYs so far, minus jobs sent

        async def run(fn: str, *args: object) -> None:
            nonlocal offered
            job = await broker.job(fn, *args)
            offered -= 1
            while True:
                msg = await broker.next(Reply, Ready)
                if isinstance(msg, Ready):
                    offered += 1
                elif msg.ref == job:
                    return

        async def settled() -> None:
            # READYs sent after the last outcome may still be on their way.
            nonlocal offered
            while offered != 1 + manager.prefetch:
                await broker.next(Ready, timeout=5)
                offered += 1

        for i in range(30):  # short jobs: hold as many as run in the window
            await run("corral.examples:add", i, 1)
        await settled()
        run_time = manager.pool.run_time
        assert run_time is not None
        # The depth fits the run time, within the hysteresis band.
        ideal, depth = PREFETCH_WINDOW / run_time, manager.prefetch
        assert (depth - 1) / PREFETCH_HYSTERESIS <= ideal
        assert ideal <= depth * PREFETCH_HYSTERESIS or depth == PREFETCH_MAX_PER_PROCESS
        # Jobs longer than the window: hold one. Slots already offered cannot be
        # taken back; each ending job's slot is not offered again until they are used.
        for _ in range(2 * PREFETCH_MAX_PER_PROCESS):
            if offered == 2 and manager.prefetch == 1:
                break
            await run("corral.examples:sleep", 2 * PREFETCH_WINDOW)
        assert offered == 2 and manager.prefetch == 1
        for i in range(3):
            await run("corral.examples:add", i, 2)  # and it keeps serving
        await _stop(broker, manager, task)

    asyncio.run(main())


def test_a_run_time_wandering_near_a_boundary_does_not_move_the_prefetch() -> None:
    async def main() -> None:
        broker, manager, task = await _started(ack_meta={"reply_ready": 0}, prefetch=None)

        def at(ideal: float) -> int:
            """The depth after the run time makes ``ideal`` jobs fit in the window."""
            manager.pool.run_time = PREFETCH_WINDOW / ideal
            manager._adapt_prefetch()
            return manager.prefetch

        async def readies(n: int) -> None:
            for _ in range(n):
                await broker.next(Ready, timeout=5)
            with pytest.raises(asyncio.TimeoutError):
                await broker.next(Ready, timeout=0.3)  # and no more

        assert at(10.5) == 11
        await readies(11 - PREFETCH_PER_PROCESS)  # one process: one READY a job held
        # Around the boundaries of 11 (10 and 11 jobs in the window): it stays.
        assert [at(x) for x in (9.6, 11.4, 9.1, 13.2, 10.0, 11.0)] == [11] * 6
        await readies(0)
        assert at(7.5) == 8  # well below: down, slots withheld, nothing sent
        await readies(0)
        assert at(14.5) == 15  # well above: the 3 withheld count first, then 4 READYs
        await readies(4)
        assert at(1000) == PREFETCH_MAX_PER_PROCESS
        assert at(0.5) == 1
        await _stop(broker, manager, task)

    asyncio.run(main())


def test_a_fixed_prefetch_does_not_follow_the_run_time() -> None:
    async def main() -> None:
        broker, manager, task = await _started(ack_meta={"reply_ready": 0}, prefetch=2)
        for i in range(10):  # short jobs: an adaptive prefetch would offer more slots
            job = await broker.job("corral.examples:add", i, 1)
            reply = await broker.next(Reply, Ready)
            assert isinstance(reply, Reply) and reply.ref == job
            assert isinstance(await broker.next(Reply, Ready), Ready)  # its slot, once
        with pytest.raises(asyncio.TimeoutError):
            await broker.next(Ready, timeout=0.5)  # and no other
        assert manager.prefetch == 2
        await _stop(broker, manager, task)

    asyncio.run(main())


DIRECT = {"reply_ready": 1, "direct_outcomes": 1, "proof": "p-1"}


async def _until(predicate, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not predicate():
        assert loop.time() < end, "timed out"
        await asyncio.sleep(0.005)


async def _until_direct(broker: Broker) -> str:
    """Jobs one at a time until one's outcome comes from its process (connected by then)."""
    for n in range(200):
        job = await broker.job("corral.examples:add", n, 1)
        reply = await broker.next(Reply)
        assert reply.ref == job and _value(reply) == {"value": n + 1}
        if broker.sender != broker.worker:
            return job
        await asyncio.sleep(0.02)
    raise AssertionError("no outcome came from the job's process")


def test_with_the_offer_a_job_on_an_idle_process_has_its_outcome_sent_by_that_process() -> None:
    async def scenario() -> None:
        # A fixed prefetch: no READY of its own when the depth adapts to run times.
        broker, manager, task = await _started(ack_meta=DIRECT, prefetch=0)
        job = await _until_direct(broker)
        assert broker.sender == broker.worker + f"/{manager.pool.pids[0]}/p-1".encode()
        # The worker hears of it from its process (just after the broker did).
        await _until(lambda: job in manager._recent)  # kept for re-sending
        assert manager.delivered >= 1
        # The outcome came with READY for its slot, and the worker sent neither
        # again: the next REPLY or READY is the next job's outcome.
        nxt = await broker.job("corral.examples:add", 2, 2)
        reply = await broker.next(Reply, Ready)
        assert isinstance(reply, Reply) and reply.ref == nxt and reply.ready
        await _stop(broker, manager, task)

    asyncio.run(scenario())


def test_an_outcome_sent_by_its_process_is_sent_again_after_a_reconnect() -> None:
    async def scenario() -> None:
        broker, manager, task = await _started(ack_meta=DIRECT, heartbeat=0.3, prefetch=None)
        job = await _until_direct(broker)
        # The broker "restarts": it forgets the worker, which registers again
        # and re-sends its recent outcomes, this one among them.
        await broker.send(Error(new_msgid(), "unknown-worker", "restarted"))
        inform = await broker.next(Inform)
        await broker.send(Ack(new_msgid(), inform.msgid, DIRECT))
        resent = set()
        while job not in resent:
            msg = await broker.next(Reply)
            assert broker.sender == broker.worker
            resent.add(msg.ref)
        await _stop(broker, manager, task)

    asyncio.run(scenario())


def test_a_job_queued_behind_another_reports_through_the_worker() -> None:
    async def scenario() -> None:
        broker, manager, task = await _started(ack_meta=DIRECT, prefetch=None)
        await _until_direct(broker)
        # One process: the second job waits in the worker behind the first.
        first = await broker.job("corral.examples:sleep", 0.3)
        second = await broker.job("corral.examples:add", 1, 1)
        got = {}
        while len(got) < 2:
            msg = await broker.next(Reply)
            got[msg.ref] = broker.sender
        assert got[first] != broker.worker  # it started at once on the idle process
        assert got[second] == broker.worker
        await _stop(broker, manager, task)

    asyncio.run(scenario())
