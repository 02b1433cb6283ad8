"""The clients against a fake broker: a ROUTER in a thread that speaks the frontend's side.

The fake broker acknowledges each REQUEST and answers it with
``{"value": args[0] + args[1]}``, or with an error outcome when the callable
is named ``fail`` or the first argument is negative. Queue ``silent`` gets
no answer at all, queue ``unanswered`` only the acknowledgement, queue
``refused`` gets an ERROR. With ``hold_idle`` set it
keeps outcomes back until no message has arrived for that long and then
sends them newest first, so the client's ordering and in-flight window are
really exercised.
"""

from __future__ import annotations

import asyncio
import os
import select
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest
import zmq

import corral
from corral.client import AsyncClient, Client, Executor, Job, default_client
from corral.errors import ClientClosed, JobFailed, NotAcknowledged, Rejected
from corral.protocol import (
    Error,
    Reply,
    Request,
    encode_outcome_error,
    encode_outcome_value,
    new_msgid,
    parse,
)

pytestmark = pytest.mark.integration

REMOTE_TRACEBACK = 'Traceback (most recent call last):\n  File "x.py", line 1\nValueError: boom\n'


@dataclass
class FakeBroker:
    """Runs until :meth:`stop`; counters are read after the client is done with it."""

    hold_idle: float | None = None
    ctx: zmq.Context = field(default_factory=zmq.Context.instance)
    requests: list[Request] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    def __post_init__(self) -> None:
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.bind("tcp://127.0.0.1:0")
        self.address = self.router.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._control = f"inproc://fake-broker-{new_msgid()}"
        self._stop_tx = self.ctx.socket(zmq.PAIR)
        self._stop_tx.bind(self._control)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop_tx.send(b"stop")
        self._thread.join(timeout=5)
        assert not self._thread.is_alive()
        self._stop_tx.close(linger=0)

    def _run(self) -> None:
        stop_rx = self.ctx.socket(zmq.PAIR)
        stop_rx.connect(self._control)
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(stop_rx, zmq.POLLIN)
        held: list[tuple[bytes, list[bytes]]] = []
        try:
            while True:
                timeout = None if not held else int(self.hold_idle * 1000)  # type: ignore[operator]
                events = dict(poller.poll(timeout))
                if stop_rx in events:
                    return
                if not events:
                    # Idle: release held outcomes newest first.
                    for identity, frames in reversed(held):
                        self._send_outcome(identity, frames)
                    held.clear()
                    continue
                while True:
                    try:
                        identity, *frames = self.router.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    outcome = self._on_message(identity, frames)
                    if outcome is None:
                        continue
                    if self.hold_idle is None:
                        self._send_outcome(identity, outcome)
                    else:
                        held.append((identity, outcome))
        finally:
            stop_rx.close(linger=0)
            self.router.close(linger=0)

    def _on_message(self, identity: bytes, frames: list[bytes]) -> list[bytes] | None:
        msg = parse(frames)
        assert isinstance(msg, Request), msg
        self.requests.append(msg)
        if msg.queue == "silent":
            return None
        if msg.queue == "refused":
            error = Error(new_msgid(), "unknown-queue", f"no queue {msg.queue!r}", msg.msgid)
            self.router.send_multipart([identity, *error.to_frames()])
            return None
        self.router.send_multipart([identity, *Reply(new_msgid(), msg.msgid).to_frames()])
        if msg.queue == "unanswered":
            return None
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        params = msg.params()
        if params.callable == "fail" or params.args[0] < 0:
            result = encode_outcome_error("ValueError", "boom", REMOTE_TRACEBACK)
        else:
            result = encode_outcome_value(params.args[0] + params.args[1])
        return Reply(new_msgid(), msg.msgid, result).to_frames()

    def _send_outcome(self, identity: bytes, frames: list[bytes]) -> None:
        self.in_flight -= 1
        self.router.send_multipart([identity, *frames])


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    b = FakeBroker()
    yield b
    b.stop()


@pytest.fixture
def holding_broker() -> Iterator[FakeBroker]:
    b = FakeBroker(hold_idle=0.01)
    yield b
    b.stop()


@pytest.fixture
def client(broker: FakeBroker) -> Iterator[Client]:
    with Client(broker.address, ack_timeout=2.0) as c:
        yield c


def add(a: int, b: int) -> int:
    return a + b


# ---------------------------------------------------------------- sync client


def test_submit_result_and_headers(client: Client, broker: FakeBroker) -> None:
    job = client.submit(add, 2, 3, timeout=30, retries=2, guarantee=True, label="nightly")
    assert isinstance(job, Job)
    assert job.result(timeout=5) == 5
    assert job.acknowledged
    request = broker.requests[-1]
    assert request.msgid == job.id
    assert request.queue == "default" == job.queue
    assert request.headers.reply_requested and request.headers.guarantee
    assert request.headers.timeout == 30 and request.headers.retry_count == 2
    assert request.headers.get("label") == "nightly"
    params = request.params()
    assert (params.path, params.callable, params.args) == (add.__module__, "add", [2, 3])


def test_string_target_and_submit_with_has_no_collisions(
    client: Client, broker: FakeBroker
) -> None:
    job = client.submit_with(
        "pkg.mod:add", [1, 1], {"queue": "kw", "timeout": 1}, queue="q1", headers=["trace:abc"]
    )
    assert job.result(timeout=5) == 2
    request = broker.requests[-1]
    assert request.queue == "q1"
    assert request.params().kwargs == {"queue": "kw", "timeout": 1}
    assert request.headers.get("trace") == "abc" and not request.headers.timeout


def test_job_failed_carries_remote_error(client: Client) -> None:
    job = client.submit("pkg.mod:fail", 1, 2)
    with pytest.raises(JobFailed) as info:
        job.result(timeout=5)
    exc = info.value
    assert (exc.type, exc.message, exc.job_id) == ("ValueError", "boom", job.id)
    assert exc.traceback == REMOTE_TRACEBACK
    assert str(exc) == "ValueError: boom"
    assert any("ValueError: boom" in note for note in exc.__notes__)
    assert corral.JobFailed is JobFailed


def test_unserializable_args_refused_before_sending(client: Client, broker: FakeBroker) -> None:
    with pytest.raises(TypeError, match="JSON"):
        client.submit(add, object(), 1)
    with pytest.raises(TypeError, match="lambda"):
        client.submit(lambda: 1)
    # Nothing reached the broker: the next request is the first it sees.
    assert client.submit(add, 1, 2).result(timeout=5) == 3
    assert len(broker.requests) == 1


def test_map_preserves_order_within_window(holding_broker: FakeBroker) -> None:
    with Client(holding_broker.address) as c:
        results = list(c.map(add, range(300), range(300), window=32))
    assert results == [2 * i for i in range(300)]
    assert holding_broker.max_in_flight == 32


def test_map_raises_first_failure_in_order(holding_broker: FakeBroker) -> None:
    got = []
    with Client(holding_broker.address) as c:
        with pytest.raises(JobFailed) as info:
            for value in c.map(add, [0, 1, 2, -3, 4, -5], range(6), window=4):
                got.append(value)
    # Outcomes arrive newest first, yet results and the failure come in input order.
    assert got == [0, 2, 4]
    assert info.value.message == "boom"


def test_thread_safety_many_submitters(client: Client, broker: FakeBroker) -> None:
    def submit_many(t: int) -> list[tuple[Job, int]]:
        return [(client.submit(add, t, i), t + i) for i in range(200)]

    with ThreadPoolExecutor(8) as pool:
        batches = list(pool.map(submit_many, range(8)))
    jobs = [pair for batch in batches for pair in batch]
    for job, expected in jobs:
        assert job.result(timeout=10) == expected
    assert len({job.id for job, _ in jobs}) == 1600
    assert len(broker.requests) == 1600


def test_not_acknowledged_when_broker_is_silent(broker: FakeBroker) -> None:
    with Client(broker.address, ack_timeout=0.2) as c:
        job = c.submit(add, 1, 2, queue="silent")
        start = time.monotonic()
        with pytest.raises(NotAcknowledged) as info:
            job.result(timeout=5)
        assert time.monotonic() - start < 2
        assert info.value.job_id == job.id
        assert not job.wait_acknowledged(timeout=1)


def test_not_acknowledged_when_no_broker_listens() -> None:
    ctx = zmq.Context.instance()
    probe = ctx.socket(zmq.ROUTER)
    port = probe.bind_to_random_port("tcp://127.0.0.1")
    probe.close(linger=0)  # now nothing listens on that port
    c = Client(f"tcp://127.0.0.1:{port}", ack_timeout=0.2)
    try:
        with pytest.raises(NotAcknowledged):
            c.submit(add, 1, 2).result(timeout=5)
    finally:
        start = time.monotonic()
        c.close()
        assert time.monotonic() - start < 2


def test_rejected_on_error(client: Client) -> None:
    job = client.submit(add, 1, 2, queue="refused")
    with pytest.raises(Rejected) as info:
        job.result(timeout=5)
    assert info.value.reason == "unknown-queue"
    assert info.value.job_id == job.id


def test_close_fails_unfinished_jobs_and_refuses_new_ones(broker: FakeBroker) -> None:
    c = Client(broker.address, ack_timeout=0.2)
    job = c.submit(add, 1, 2, queue="silent")
    c.close(timeout=0)
    with pytest.raises((ClientClosed, NotAcknowledged)):
        job.result(timeout=5)
    with pytest.raises(ClientClosed):
        c.submit(add, 1, 2)
    c.close()  # idempotent


def test_close_waits_for_acknowledgement(broker: FakeBroker) -> None:
    c = Client(broker.address)
    jobs = [c.submit(add, i, i) for i in range(50)]
    c.close()
    assert all(job.acknowledged for job in jobs)
    assert len(broker.requests) == 50


def test_call_returns_the_value_or_raises_what_the_job_raised(
    client: Client, broker: FakeBroker
) -> None:
    assert client.call(add, 2, 3, timeout=30, label="once", queue="q1") == 5
    request = broker.requests[-1]
    assert request.queue == "q1" and request.headers.reply_requested
    assert request.headers.timeout == 30 and request.headers.get("label") == "once"
    with pytest.raises(JobFailed) as info:
        client.call("pkg.mod:fail", 1, 2)
    assert (info.value.type, info.value.job_id) == ("ValueError", broker.requests[-1].msgid)
    with pytest.raises(Rejected):
        client.call(add, 1, 2, queue="refused")


def _receiving_threads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    from corral.client import sync

    seen: list[int] = []
    on_frames = sync._IOLoop._on_frames

    def spy(self: sync._IOLoop, frames: list[bytes]) -> None:
        seen.append(threading.get_ident())
        on_frames(self, frames)

    monkeypatch.setattr(sync._IOLoop, "_on_frames", spy)
    return seen


def test_call_sends_and_receives_on_the_calling_thread_when_nothing_else_is_in_flight(
    client: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = _receiving_threads(monkeypatch)
    for i in range(20):
        assert client.call(add, i, 1) == i + 1
    me = threading.get_ident()
    assert len(seen) == 40  # an acknowledgement and an outcome each
    # The first call may find the I/O thread still starting; after it, none should.
    assert seen[4:] == [me] * 36
    seen.clear()
    assert client.submit(add, 1, 1).result(timeout=5) == 2  # the usual way
    assert seen and me not in seen


def test_call_with_jobs_in_flight_goes_through_the_io_thread(holding_broker: FakeBroker) -> None:
    with Client(holding_broker.address, ack_timeout=2.0) as c:
        pending = [c.submit(add, i, i) for i in range(20)]
        assert c.call(add, 5, 5, result_timeout=5) == 10
        assert [job.result(timeout=5) for job in pending] == [2 * i for i in range(20)]


def test_a_call_that_times_out_leaves_its_job_to_the_io_thread(broker: FakeBroker) -> None:
    with Client(broker.address, ack_timeout=2.0) as c:
        start = time.monotonic()
        with pytest.raises(TimeoutError) as info:
            c.call(add, 1, 2, queue="unanswered", result_timeout=0.2)
        assert 0.2 <= time.monotonic() - start < 2
        assert broker.requests[-1].msgid in str(info.value)
        # The client goes on: the unanswered job is the I/O thread's now.
        assert c.submit(add, 2, 2).result(timeout=5) == 4
        assert c.call(add, 3, 3, result_timeout=5) == 6


def test_call_not_acknowledged_and_after_close(broker: FakeBroker) -> None:
    c = Client(broker.address, ack_timeout=0.2)
    with pytest.raises(NotAcknowledged):
        c.call(add, 1, 2, queue="silent", result_timeout=5)
    assert c.call(add, 1, 2) == 3
    c.close()
    with pytest.raises(ClientClosed):
        c.call(add, 1, 2)


def test_close_ends_a_call_that_waits(broker: FakeBroker) -> None:
    c = Client(broker.address, ack_timeout=2.0)
    assert c.call(add, 0, 0) == 0  # the I/O thread is running and sleeps
    got: list[BaseException] = []
    started = threading.Event()

    def wait_forever() -> None:
        started.set()
        try:
            c.call(add, 1, 2, queue="unanswered")
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            got.append(exc)

    t = threading.Thread(target=wait_forever)
    t.start()
    started.wait(5)
    deadline = time.monotonic() + 5
    while not broker.requests[-1].queue == "unanswered" and time.monotonic() < deadline:
        time.sleep(0.01)
    c.close(timeout=0.5)
    t.join(timeout=5)
    assert not t.is_alive()
    assert len(got) == 1 and isinstance(got[0], ClientClosed)


def test_a_close_landing_as_the_io_thread_goes_to_sleep_is_not_slept_through(
    broker: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    from corral.client import sync

    c = Client(broker.address, ack_timeout=10.0)
    assert c.submit(add, 1, 1).result(timeout=5) == 2
    closer = threading.Thread(target=c.close)
    drain = sync._IOLoop._drain_wake
    fired = threading.Event()

    def close_meanwhile(self: sync._IOLoop) -> None:
        # On its way to sleep (nothing in flight), between its look and its drain:
        # close() sets the flag and writes its byte, which the drain then eats.
        if self.client is c and not fired.is_set() and self.idle():
            closer.start()
            fired.set()
            select.select([c._wake_r], [], [], 5)
        drain(self)

    monkeypatch.setattr(sync._IOLoop, "_drain_wake", close_meanwhile)
    assert c.submit(add, 2, 2).result(timeout=5) == 4
    assert fired.wait(5)
    start = time.monotonic()
    closer.join(timeout=15)
    assert not closer.is_alive() and time.monotonic() - start < 2  # not the 10 s ack_timeout


def test_calls_and_submits_from_many_threads(client: Client, broker: FakeBroker) -> None:
    def work(t: int) -> list[int]:
        out = []
        for i in range(60):
            if i % 3 == 0:
                out.append(client.submit(add, t, i).result(timeout=10))
            elif i % 3 == 1:
                client.submit_with(add, (t, i), reply=False)
                out.append(t + i)
            else:
                out.append(client.call(add, t, i, result_timeout=10))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    assert results == [[t + i for i in range(60)] for t in range(8)]
    client.close()
    assert len(broker.requests) == 480


# ---------------------------------------------------------------- asyncio client


def test_async_client_submit_and_map(holding_broker: FakeBroker) -> None:
    async def main() -> None:
        async with AsyncClient(holding_broker.address, ack_timeout=2.0) as c:
            job = await c.submit(add, 20, 22)
            assert await asyncio.wait_for(job, 5) == 42
            assert job.acknowledged and job.id
            failing = await c.submit("pkg.mod:fail", 0, 0)
            with pytest.raises(JobFailed, match="boom"):
                await asyncio.wait_for(failing, 5)
            values = [v async for v in c.map(add, range(100), range(100), window=16)]
            assert values == [2 * i for i in range(100)]
            refused = await c.submit(add, 1, 1, queue="refused")
            with pytest.raises(Rejected):
                await asyncio.wait_for(refused, 5)

    asyncio.run(main())
    assert holding_broker.max_in_flight == 16


def test_async_client_not_acknowledged(broker: FakeBroker) -> None:
    async def main() -> None:
        async with AsyncClient(broker.address, ack_timeout=0.2) as c:
            job = await c.submit(add, 1, 2, queue="silent")
            with pytest.raises(NotAcknowledged):
                await asyncio.wait_for(job, 5)
            assert not await asyncio.wait_for(job.wait_acknowledged(), 5)

    asyncio.run(main())


# ---------------------------------------------------------------- executor


def test_executor(broker: FakeBroker) -> None:
    with Executor(broker.address, queue="execq") as ex:
        future = ex.submit(add, 1, 2)
        assert future.result(timeout=5) == 3
        assert list(ex.map(add, range(50), range(50), timeout=10)) == [2 * i for i in range(50)]
        with pytest.raises(JobFailed):
            ex.submit("pkg.mod:fail", 1, 2).result(timeout=5)
    assert {r.queue for r in broker.requests} == {"execq"}
    with pytest.raises(RuntimeError):
        ex.submit(add, 1, 2)


def test_executor_max_in_flight(holding_broker: FakeBroker) -> None:
    ex = Executor(holding_broker.address, max_in_flight=5)
    futures = [ex.submit(add, i, 1) for i in range(40)]
    ex.shutdown(wait=True)
    assert [f.result(timeout=0) for f in futures] == [i + 1 for i in range(40)]
    assert holding_broker.max_in_flight == 5


def test_executor_cancels_backlog(holding_broker: FakeBroker) -> None:
    ex = Executor(holding_broker.address, max_in_flight=2)
    futures = [ex.submit(add, i, 1) for i in range(20)]
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in futures)
    assert sum(f.cancelled() for f in futures) >= 10
    assert all(f.result(timeout=0) == i + 1 for i, f in enumerate(futures) if not f.cancelled())


# ---------------------------------------------------------------- default client


def test_default_client_is_shared_and_fresh_after_fork(
    broker: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_BROKER", broker.address)
    first = default_client()
    assert default_client() is first
    assert first.address == broker.address
    assert first.submit(add, 2, 2).result(timeout=5) == 4
    if hasattr(os, "fork"):
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: report whether it got its own working client
            try:
                child = default_client()
                ok = child is not first and child.submit(add, 5, 5).result(timeout=5) == 10
                os.write(write_fd, b"ok" if ok else b"no")
            finally:
                os._exit(0)
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as r:
            assert r.read() == b"ok"
        os.waitpid(pid, 0)
    first.close()
    assert default_client() is not first
    default_client().close()
