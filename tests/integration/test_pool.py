"""The process pool, with real child processes."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import psutil
import pytest
import zmq

from corral.protocol import PROTOCOL
from corral.worker.pool import Pool

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def async_test(fn: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test in a fresh event loop (keeps fixtures working)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        asyncio.run(fn(*args, **kwargs))

    return wrapper


@asynccontextmanager
async def started(concurrency: int = 1, **options: Any) -> AsyncIterator[Pool]:
    options.setdefault("imports", ["tests.jobs"])
    options.setdefault("allow", ["tests"])
    options.setdefault("log_level", "WARNING")
    pool = Pool(concurrency, **options)
    # What the worker takes from the broker's ACK: the proof its processes show.
    pool.direct_proof = b"proof-1"
    await pool.start()
    try:
        yield pool
    finally:
        await pool.close(grace=0)


def job(name: str, *args: Any, path: str = "tests.jobs", **extra: Any) -> dict[str, Any]:
    return {"path": path, "callable": name, "args": list(args), **extra}


def value(outcome: bytes) -> Any:
    decoded = json.loads(outcome)
    assert "value" in decoded, decoded
    return decoded["value"]


def error(outcome: bytes) -> dict[str, str]:
    decoded = json.loads(outcome)
    assert "error" in decoded, decoded
    return decoded["error"]


async def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def stray_descendants() -> list[psutil.Process]:
    """Our descendants other than multiprocessing's forkserver and resource tracker."""
    strays = []
    for proc in psutil.Process().children(recursive=True):
        try:
            cmdline = " ".join(proc.cmdline())
            if proc.status() == psutil.STATUS_ZOMBIE:
                continue
        except psutil.NoSuchProcess:
            continue
        if "multiprocessing.forkserver" in cmdline or "multiprocessing.resource_tracker" in cmdline:
            continue
        strays.append(proc)
    return strays


@async_test
async def test_runs_tasks_functions_and_methods() -> None:
    async with started(2) as pool:
        assert value(await pool.run("a", job("add", 1, 2), None)) == 3
        assert value(await pool.run("b", job("plain_add", 2, 3), None)) == 5
        method = job("add", 2, path="tests.jobs:Counter", class_kwargs={"start": 40})
        assert value(await pool.run("c", method, None)) == 42
        assert value(await pool.run("d", job("noop"), 0)) is None


@async_test
async def test_a_body_is_run_as_received_and_a_malformed_one_is_a_bad_request() -> None:
    async with started() as pool:
        seen: list[tuple[str, bytes, bool]] = []
        body = json.dumps(["run", job("add", 2, 5)]).encode()
        outcome = await pool.run_body("ok", body, None, lambda *done: seen.append(done))
        # Called with the outcome; it came back through the pool (no direct_to).
        assert value(outcome) == 7 and seen == [("ok", outcome, False)]
        for bad in (b"{not json", b'["stop", {}]', b'["run", [1]]', b"[" * 5000 + b"]" * 5000):
            err = error(await pool.run_body("bad", bad, None))
            assert err["type"] == "BadRequest", err
        assert value(await pool.run("after", job("add", 1, 1), None)) == 2  # still serving


@async_test
async def test_job_exception_becomes_error_outcome_with_traceback() -> None:
    async with started() as pool:
        err = error(await pool.run("f", job("fail"), None))
        assert err["type"] == "ZeroDivisionError"
        assert err["message"] == "division by zero"
        assert "1 / 0" in err["traceback"] and "jobs.py" in err["traceback"]
        assert "_run_job" not in err["traceback"]
        # the child survives a failing job
        assert value(await pool.run("g", job("add", 1, 1), None)) == 2


@async_test
async def test_refused_module_is_not_imported_in_the_child() -> None:
    sentinel = "tests.jobs_sentinel"
    async with started(1, allow=["tests.jobs"]) as pool:
        pid = value(await pool.run("pid", job("getpid"), None))
        err = error(await pool.run("r", job("run", path=sentinel), None))
        assert err["type"] == "NotAllowed" and sentinel in err["message"]
        assert value(await pool.run("check", job("is_imported", sentinel), None)) is False
        assert value(await pool.run("pid2", job("getpid"), None)) == pid  # same child
    # Control: the check does see the module once it is allowed and run.
    async with started(1, allow=["tests"]) as pool:
        assert value(await pool.run("r", job("run", path=sentinel), None)) == "ran"
        assert value(await pool.run("check", job("is_imported", sentinel), None)) is True


@async_test
async def test_loader_errors_become_typed_outcomes() -> None:
    async with started(1, allow=[]) as pool:
        assert error(await pool.run("a", job("plain_add", 1, 2), None))["type"] == "NotAllowed"
        assert error(await pool.run("b", job("__class__"), None))["type"] == "NotAllowed"
        assert error(await pool.run("c", job("os.system"), None))["type"] == "BadRequest"
        assert error(await pool.run("d", {"path": "tests.jobs"}, None))["type"] == "BadRequest"
        # not registered, and tests is not allowed here: refused, not "not found"
        assert error(await pool.run("e", job("nope"), None))["type"] == "NotAllowed"
    async with started(1) as pool:
        assert error(await pool.run("f", job("nope"), None))["type"] == "NotFound"


@async_test
async def test_unserializable_return_value() -> None:
    async with started() as pool:
        err = error(await pool.run("u", job("unserializable"), None))
        assert err["type"] == "SerializationError" and "object" in err["message"]
        # params that cannot be sent at all never reach a child
        err = error(await pool.run("p", job("echo", object()), None))
        assert err["type"] == "SerializationError"


@async_test
async def test_large_payloads_round_trip() -> None:
    big = "x" * (4 << 20)  # far more than a socket buffer: partial writes
    async with started() as pool:
        assert value(await pool.run("big", job("echo", big), None)) == big


@async_test
async def test_time_limit_kills_sleeping_job_and_pool_recovers() -> None:
    async with started(1) as pool:
        (old,) = pool.pids
        t0 = time.monotonic()
        err = error(await pool.run("slow", job("sleep", 60), 0.3))
        assert time.monotonic() - t0 < 3
        assert err["type"] == "TimeLimitExceeded" and "0.3s" in err["message"]
        await wait_until(lambda: gone(old))
        assert value(await pool.run("next", job("add", 1, 2), None)) == 3
        assert pool.pids != [old]


@async_test
async def test_time_limit_kills_job_stuck_in_c_code() -> None:
    async with started(1) as pool:
        t0 = time.monotonic()
        err = error(await pool.run("regex", job("stuck_in_c"), 0.3))
        assert err["type"] == "TimeLimitExceeded"
        assert time.monotonic() - t0 < 3
        assert value(await pool.run("next", job("add", 2, 2), None)) == 4


@async_test
async def test_crash_is_worker_lost_and_pool_recovers() -> None:
    async with started(2) as pool:
        err = error(await pool.run("exit", job("crash", 3), None))
        assert err["type"] == "WorkerLost" and "code 3" in err["message"]
        err = error(await pool.run("segv", job("segfault"), None))
        assert err["type"] == "WorkerLost" and "SIGSEGV" in err["message"]
        results = await asyncio.gather(
            *(pool.run(f"n{i}", job("add", i, 1), None) for i in range(20))
        )
        assert [value(r) for r in results] == [i + 1 for i in range(20)]
        await wait_until(lambda: len(pool.pids) == 2)


@async_test
async def test_recycling_replaces_children(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="corral.worker.pool")
    async with started(1, max_jobs_per_child=3) as pool:
        pids = [value(await pool.run(f"p{i}", job("getpid"), None)) for i in range(7)]
        assert pids[0] == pids[1] == pids[2]
        assert pids[3] == pids[4] == pids[5]
        assert len({pids[0], pids[3], pids[6]}) == 3
        await wait_until(lambda: gone(pids[0]) and gone(pids[3]))
    # Retiring is a clean exit, not a lost worker.
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@async_test
async def test_cancel_queued_and_running_jobs(tmp_path: Path) -> None:
    started_flag = tmp_path / "started"
    async with started(1) as pool:
        (old,) = pool.pids
        running = pool.run("long", job("touch_and_sleep", str(started_flag), 60), None)
        queued = pool.run("queued", job("add", 1, 2), None)
        assert pool.free_slots == 0
        assert pool.cancel("queued") is True
        assert error(await queued)["type"] == "JobCancelled"
        await wait_until(started_flag.exists)
        t0 = time.monotonic()
        assert pool.cancel("long") is True
        err = error(await running)
        assert err["type"] == "JobCancelled" and time.monotonic() - t0 < 2
        assert pool.cancel("long") is False
        assert pool.cancel("never-submitted") is False
        await wait_until(lambda: gone(old))
        assert value(await pool.run("after", job("add", 2, 3), None)) == 5
        assert pool.free_slots == 1


@async_test
async def test_free_slots_and_bad_calls() -> None:
    pool = Pool(2, imports=["tests.jobs"], log_level="WARNING")
    assert pool.free_slots == 0
    with pytest.raises(RuntimeError):
        pool.run("early", job("add", 1, 2), None)
    await pool.start()
    try:
        assert pool.free_slots == 2
        a = pool.run("a", job("sleep", 60), None)
        assert pool.free_slots == 1
        with pytest.raises(ValueError):
            pool.run("a", job("add", 1, 2), None)
        b = pool.run("b", job("sleep", 60), None)
        c = pool.run("c", job("add", 1, 2), None)  # queued
        assert pool.free_slots == 0
        for job_id in ("a", "b", "c"):
            pool.cancel(job_id)
        await asyncio.gather(a, b, c)
        assert pool.free_slots == 2
    finally:
        await pool.close(grace=0)
    assert pool.free_slots == 0
    with pytest.raises(RuntimeError):
        pool.run("late", job("add", 1, 2), None)


@async_test
async def test_children_ignore_sigint() -> None:
    async with started(1) as pool:
        (pid,) = pool.pids
        os.kill(pid, signal.SIGINT)
        assert value(await pool.run("pid", job("getpid"), None)) == pid


@async_test
async def test_pipelined_noop_jobs() -> None:
    async with started(2) as pool:
        outcomes = await asyncio.gather(*(pool.run(f"n{i}", job("noop"), 30) for i in range(2000)))
        assert set(outcomes) == {b'{"value":null}'}


@async_test
async def test_close_waits_for_running_jobs_then_kills() -> None:
    pool = Pool(2, imports=["tests.jobs"], allow=["tests"], log_level="WARNING")
    await pool.start()
    pids = pool.pids
    short = pool.run("short", job("sleep", 0.2), None)
    long = pool.run("long", job("sleep", 60), None)
    queued = pool.run("queued", job("add", 1, 2), None)
    t0 = time.monotonic()
    await pool.close(grace=1.0)
    assert time.monotonic() - t0 < 5
    assert value(await short) == 0.2
    err = error(await long)
    assert err["type"] == "WorkerLost" and "grace" in err["message"]
    assert error(await queued)["type"] == "JobCancelled"
    assert all(gone(pid) for pid in pids)
    assert stray_descendants() == []
    await pool.close()  # idempotent


@async_test
async def test_failed_start_raises_and_leaves_nothing() -> None:
    pool = Pool(2, imports=["tests.no_such_module"], log_level="WARNING")
    with pytest.raises(RuntimeError, match="ModuleNotFoundError"):
        await pool.start()
    assert stray_descendants() == []


PARENT_SCRIPT = """
import asyncio, sys
from corral.worker.pool import Pool

async def main():
    pool = Pool(2, imports=["tests.jobs"], allow=["tests"], log_level="WARNING")
    await pool.start()
    params = {"path": "tests.jobs", "callable": "touch_and_sleep", "args": [sys.argv[1], 60]}
    pool.run("sleeper", params, None)
    print(*pool.pids, flush=True)
    await asyncio.sleep(60)

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_children_exit_when_the_parent_dies(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    flag = tmp_path / "started"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    parent = subprocess.Popen(
        [sys.executable, str(script), str(flag)], cwd=ROOT, env=env, stdout=subprocess.PIPE
    )
    try:
        assert parent.stdout is not None
        ready, _, _ = select.select([parent.stdout], [], [], 30)
        assert ready, "the parent script did not start its pool"
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert len(pids) == 2
        deadline = time.monotonic() + 10
        while not flag.exists():
            assert time.monotonic() < deadline, "the job never started"
            time.sleep(0.01)
    finally:
        parent.kill()
        parent.wait()
    deadline = time.monotonic() + 10
    while not all(gone(pid) for pid in pids):
        assert time.monotonic() < deadline, "children outlived their parent"
        time.sleep(0.02)


# -- outcomes a child sends the broker itself --------------------------------


@asynccontextmanager
async def broker_socket() -> AsyncIterator[tuple[zmq.Socket, str]]:
    """A ROUTER standing in for the broker's backend, on a free loopback port."""
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind("tcp://127.0.0.1:0")
    try:
        yield sock, sock.getsockopt(zmq.LAST_ENDPOINT).decode()
    finally:
        sock.close()


def body_of(name: str, *args: Any, path: str = "tests.jobs") -> bytes:
    return json.dumps(["run", job(name, *args, path=path)]).encode()


async def run_direct(
    pool: Pool, job_id: str, body: bytes, offer_slot: bool = True
) -> tuple[bytes, bool]:
    seen: list[tuple[str, bytes, bool]] = []
    outcome = await pool.run_body(
        job_id, body, None, lambda *done: seen.append(done), direct=True, offer_slot=offer_slot
    )
    [(done_id, done_outcome, delivered)] = seen
    assert done_id == job_id and done_outcome == outcome
    return outcome, delivered


async def until_delivered(pool: Pool, deadline: float = 15.0) -> tuple[str, bytes]:
    """Run direct jobs until one's outcome was sent by its process.

    A process connects on its first direct job, whose outcome comes through the
    pool like the next ones until the connection is up."""
    end = time.monotonic() + deadline
    n = 0
    while time.monotonic() < end:
        n += 1
        outcome, delivered = await run_direct(pool, f"warm-{n}", body_of("add", n, 1))
        assert value(outcome) == n + 1
        if delivered:
            return f"warm-{n}", outcome
        await asyncio.sleep(0.02)
    raise AssertionError("no outcome was sent by its process in time")


def received(sock: zmq.Socket, timeout_ms: int = 5000) -> list[bytes]:
    assert sock.poll(timeout_ms), "nothing reached the broker"
    return sock.recv_multipart()


@async_test
async def test_a_direct_jobs_process_sends_its_outcome_to_the_broker_itself() -> None:
    async with broker_socket() as (sock, address):
        async with started(1, direct_to=(address, "worker-1")) as pool:
            job_id, outcome = await until_delivered(pool)
            identity, *frames = received(sock)
            assert identity == f"worker-1/{pool.pids[0]}/proof-1".encode()
            assert frames[:3] == [b"", PROTOCOL, b"REPLY"]
            # The outcome, the job, and READY for its slot: one message, as from a worker.
            assert frames[4:] == [outcome, job_id.encode(), b"ready"]
            # Without the slot: no READY frame (the worker decides about that slot).
            outcome, delivered = await run_direct(pool, "no-slot", body_of("add", 2, 2), False)
            assert delivered and value(outcome) == 4
            assert received(sock)[5:] == [outcome, b"no-slot"]
            # A job not marked direct reports through the pool only.
            assert value(await pool.run("plain", job("add", 3, 3), None)) == 6
            assert not sock.poll(200)


@async_test
async def test_without_direct_to_a_direct_job_reports_through_the_pool() -> None:
    async with started(1) as pool:
        for n in range(3):
            outcome, delivered = await run_direct(pool, f"j{n}", body_of("add", n, n))
            assert value(outcome) == 2 * n and not delivered


@async_test
async def test_a_direct_job_that_put_messages_on_its_stream_reports_through_the_pool() -> None:
    streamed: list[tuple[str, float]] = []

    def on_stream(job_id: str, entries: list[bytes]) -> None:
        streamed.append((job_id, time.monotonic()))

    async with broker_socket() as (sock, address):
        async with started(
            1,
            allow=["tests", "corral.examples"],
            direct_to=(address, "worker-1"),
            on_stream=on_stream,
            stream_options={},
        ) as pool:
            await until_delivered(pool)
            received(sock)
            outcome, delivered = await run_direct(
                pool, "counts", body_of("count", 2, 0, path="corral.examples")
            )
            # Its stream messages reach the worker before its outcome, which follows
            # them the same way, so none can be overtaken.
            assert value(outcome) == 2 and not delivered
            assert streamed and {job_id for job_id, _ in streamed} == {"counts"}
            assert not sock.poll(200)


@async_test
async def test_a_process_killed_just_after_sending_an_outcome_itself_has_it_resent() -> None:
    resent: list[tuple[str, bytes]] = []
    async with broker_socket() as (sock, address):
        async with started(
            1, direct_to=(address, "worker-1"), resend=lambda *r: resent.append(r)
        ) as pool:
            job_id, outcome = await until_delivered(pool)
            pid = pool.pids[0]
            os.kill(pid, signal.SIGKILL)  # it may have died before the outcome left
            end = time.monotonic() + 10
            while not resent and time.monotonic() < end:
                await asyncio.sleep(0.01)
            assert resent == [(job_id, outcome)]
            # The replacement runs jobs as before; a clean exit re-sends nothing.
            assert value(await pool.run("after", job("add", 1, 1), None)) == 2
        assert resent == [(job_id, outcome)]
