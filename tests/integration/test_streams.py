"""Job streams over real sockets: a broker, a worker, Python and TCP listeners.

The 100,000-message late-joiner test runs in-process on the hub
(tests/unit/test_stream_hub.py); here the same contract is checked on a
smaller scale through every real path: job -> pool -> worker -> broker ->
store -> listeners.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import threading

import pytest

import corral
from corral.streams import Close, Header, Log, Partial, Progress
from tests.integration.procs import corral_cmd, wait_for

pytestmark = pytest.mark.integration

TOKEN = "the-broker-token"


def tcp_address(cluster) -> tuple[str, int]:
    host, port = cluster.addrs.streams.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


class LineClient:
    """A client of the TCP line protocol, as `nc` would be."""

    def __init__(self, cluster, rcvbuf: int | None = None) -> None:
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(tcp_address(cluster))
        self.sock.settimeout(20)
        self.file = self.sock.makefile("rb")

    def send(self, **request) -> None:
        self.sock.sendall(json.dumps(request).encode() + b"\n")

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> dict:
        raw = self.file.readline()
        assert raw, "the broker closed the connection"
        return json.loads(raw)

    def until_close(self) -> list[dict]:
        lines = []
        while True:
            line = self.line()
            lines.append(line)
            if line["action"] == "close":
                return lines

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def contiguous(messages) -> list[int]:
    """Check the contract on one listener's typed messages; return the item seqs."""
    assert isinstance(messages[0], Header), messages[:2]
    assert isinstance(messages[-1], Close), messages[-2:]
    seqs = [m.seq for m in messages[1:-1]]
    start = messages[0].seq + 1
    assert seqs == list(range(start, start + len(seqs))), "gap or duplicate"
    if messages[0].close is not None:  # joined after the end: the header has the close
        assert not seqs and messages[-1].seq == messages[0].seq
    else:
        assert messages[-1].seq == start + len(seqs)
    return seqs


def line_contiguous(lines: list[dict]) -> list[dict]:
    assert lines[0]["action"] == "header" and lines[-1]["action"] == "close"
    seqs = [x["message"]["seq"] for x in lines[1:-1]]
    start = lines[0]["message"]["seq"] + 1
    assert seqs == list(range(start, start + len(seqs))), "gap or duplicate"
    if lines[0]["message"]["close"] is not None:
        assert not seqs and lines[-1]["message"]["seq"] == lines[0]["message"]["seq"]
    else:
        assert lines[-1]["message"]["seq"] == start + len(seqs)
    return [x["message"] for x in lines[1:-1]]


@pytest.fixture
def broker(cluster):
    cluster.broker("--stream-token", TOKEN, "--stream-history", "20000")
    cluster.worker(concurrency=2, imports=("tests.jobs", "corral.examples"))
    return cluster


@pytest.fixture
def client(broker):
    with corral.Client(broker.addrs.frontend) as c:
        yield c


def test_a_job_streams_progress_logs_partials_and_its_outcome(client):
    job = client.submit("tests.jobs:chatter", 20, every=5, sleep=0.01)
    live = list(client.stream(job, timeout=20))
    contiguous(live)
    # From the start of the history, whenever the listener joined:
    messages = list(client.stream(job, after=0, timeout=20))
    assert [m.seq for m in messages] == list(range(1, live[-1].seq + 1))
    messages.insert(0, Header(0, None, None, None, None))
    logs = [m.text for m in messages if isinstance(m, Log)]
    assert logs == [f"line {i}" for i in range(20)]
    assert [m.done for m in messages if isinstance(m, Progress)][-1] == 16
    assert [m.value for m in messages if isinstance(m, Partial)] == [{"said": 20}]
    close = messages[-1]
    assert close.ok and close.outcome == {"value": 20}
    assert [m.value for m in messages if isinstance(m, Header)][-1] == {
        "phase": "chatting",
        "of": 20,
    }
    # After the end: the header has it all, then the close.
    late = list(client.stream(job, timeout=20))
    assert late[0].close is not None and late[0].partial == {"said": 20}
    assert late[0].value == {"phase": "chatting", "of": 20}
    assert late[-1].seq == close.seq
    again = list(client.stream(job, after=3, timeout=20))
    assert [m.seq for m in again] == list(range(4, close.seq + 1))


def test_asyncio_listener_and_a_failed_job(broker):
    async def run():
        async with corral.AsyncClient(broker.addrs.frontend) as client:
            job = await client.submit("tests.jobs:chatter", 5, fail=True)
            messages = [m async for m in await client.stream(job, timeout=20)]
            with pytest.raises(corral.JobFailed):
                await job
            return messages

    messages = asyncio.run(run())
    contiguous(messages)
    close = messages[-1]
    assert close.state == "failed" and not close.ok
    assert close.outcome["error"]["type"] == "ValueError"


class Reader(threading.Thread):
    """Consumes a listener in the background, as a real listener would."""

    def __init__(self, messages) -> None:
        super().__init__(daemon=True)
        self.source = messages
        self.got: list = []
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            for message in self.source:
                self.got.append(message)
        except BaseException as exc:  # noqa: BLE001 - reported by result()
            self.error = exc

    def result(self, timeout: float = 60) -> list:
        self.join(timeout)
        assert not self.is_alive(), "the listener did not end"
        if self.error is not None:
            raise self.error
        return self.got


def test_late_joiners_under_four_concurrent_producers(broker, client, tmp_path):
    """The job and three network producers (with the job's token) put at once; listeners
    that join late (fresh, resuming with ``after``, Python and TCP) each get the header
    and then every later message: checked by sequence numbers, and each producer's own
    messages arrive in the order it sent them, each exactly once."""
    stop = tmp_path / "stop"
    job = client.submit("tests.jobs:chatter_until", str(stop), 0.001)
    token = client.stream_token(job.id)
    per_producer = 3000
    first = Reader(client.stream(job, timeout=30))

    def produce(k: int) -> None:
        producer = LineClient(broker)
        for i in range(per_producer):
            producer.send(
                action="put",
                stream=job.id,
                token=token,
                message={"kind": "log", "text": f"p{k}:{i}"},
            )
        producer.close()

    threads = [threading.Thread(target=produce, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    # Join late: once the network producers' messages are flowing.
    wait_for(
        lambda: (
            first.error or any(isinstance(m, Log) and m.text[0] == "p" for m in first.got[-50:])
        ),
        what="the network producers' messages",
    )
    assert first.error is None and not isinstance(first.got[-1], Close), first.got[-1]
    late = client.stream(job, timeout=30)
    header = next(late)
    late_reader = Reader(late)
    late_tcp = LineClient(broker)
    late_tcp.send(action="listen", stream=job.id)

    def tcp_lines():
        yield from late_tcp.until_close()

    tcp_reader = Reader(tcp_lines())
    resume_at = max(0, header.seq - 50)
    resumed = Reader(client.stream(job, after=resume_at, timeout=30))
    for t in threads:
        t.join()

    def taken() -> int:
        return sum(1 for m in list(first.got) if isinstance(m, Log) and m.text[0] == "p")

    # The job may end only once the broker has taken every network put.
    wait_for(lambda: taken() == 3 * per_producer or first.error, timeout=60)
    stop.touch()
    assert job.result(timeout=30) > 0
    first_messages = first.result()
    late_messages = [header, *late_reader.result()]
    resumed_messages = resumed.result()
    tcp_lines = tcp_reader.result()
    late_tcp.close()
    contiguous(first_messages)
    contiguous(late_messages)
    assert header.seq > 0  # it did join late
    end = first_messages[-1].seq
    assert [m.seq for m in resumed_messages] == list(range(resume_at + 1, end + 1))
    tcp_items = line_contiguous(tcp_lines)
    assert late_messages[-1].seq == tcp_lines[-1]["message"]["seq"] == end
    for texts in (
        [m.text for m in first_messages if isinstance(m, Log)],
        [m.text for m in late_messages if isinstance(m, Log)],
        [m.text for m in resumed_messages if isinstance(m, Log)],
        [m["text"] for m in tcp_items if m["kind"] == "log"],
    ):
        last: dict[str, int] = {}
        for text in texts:
            if text.startswith("p"):
                k, i = text[1:].split(":")
                assert int(i) == last.get(k, int(i) - 1) + 1, "out of order or repeated"
                last[k] = int(i)
    produced = [m.text for m in first_messages if isinstance(m, Log) and m.text.startswith("p")]
    assert len(produced) == len(set(produced)) == 3 * per_producer


def test_a_thousand_listeners_on_one_stream(broker, client, tmp_path):
    stop = tmp_path / "stop"
    job = client.submit("tests.jobs:chatter_until", str(stop), 0.005)
    assert job.wait_acknowledged(10)  # the TCP listeners come on another connection
    host, port = tcp_address(broker)

    async def listen_all() -> list[list[dict]]:
        async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(json.dumps({"action": "listen", "stream": job.id}).encode() + b"\n")
            first = json.loads(await reader.readline())
            assert first["action"] == "header"
            return reader, writer, first

        async def rest(reader, writer, first) -> list[dict]:
            lines = [first]
            while lines[-1]["action"] != "close":
                lines.append(json.loads(await reader.readline()))
            writer.close()
            return lines

        conns = []
        for _ in range(10):  # in waves, so the accept backlog never overflows
            conns += await asyncio.gather(*(one() for _ in range(100)))
        await asyncio.sleep(0.5)  # all listening while the job goes on
        stop.touch()
        return await asyncio.wait_for(asyncio.gather(*(rest(*c) for c in conns)), 60)

    results = asyncio.run(listen_all())
    assert len(results) == 1000
    ends = set()
    for lines in results:
        line_contiguous(lines)
        ends.add(lines[-1]["message"]["seq"])
        assert lines[-1]["message"]["state"] == "succeeded"
    assert len(ends) == 1


def test_a_stalled_listener_is_cut_off_while_a_normal_one_keeps_up(cluster):
    cluster.broker("--stream-queue", "1000")
    cluster.worker(concurrency=1, imports=("tests.jobs",))
    with corral.Client(cluster.addrs.frontend) as client:
        stalled_and_normal(cluster, client)


def stalled_and_normal(broker, client) -> None:
    # Slow enough that a listener in this (busy) process keeps up, long enough that
    # the stalled ones pass their bound (the TCP one after its socket buffers fill).
    job = client.submit("tests.jobs:chatter", 5000, sleep=0.0005, pad=400)
    stalled_py = client.stream(job, window=10, timeout=20)
    assert job.wait_acknowledged(10)
    stalled_tcp = LineClient(broker, rcvbuf=4096)
    stalled_tcp.send(action="listen", stream=job.id)
    normal = list(client.stream(job, timeout=20))
    contiguous(normal)
    assert normal[-1].ok
    got = list(stalled_py)
    assert got[-1] == Close(None, "overflow", None, None)
    assert len(got) <= 12  # the header, its window of 10, the close
    lines = []
    while not lines or lines[-1]["action"] != "close":
        lines.append(stalled_tcp.line())
    assert lines[-1]["message"] == {"kind": "close", "seq": None, "reason": "overflow",
                                   "state": None, "outcome": None}  # fmt: skip
    stalled_tcp.close()
    status = broker.status()
    assert status["jobs_completed"] >= 1


def test_garbage_lines_get_an_error_line_and_the_server_keeps_serving(broker, client):
    job = client.submit("tests.jobs:chatter", 3)
    assert job.result(timeout=20) == 3
    bad = LineClient(broker)
    bad.send_raw(b"\xff\xfe\x00\n")
    bad.send_raw(b"not json at all\n")
    bad.send_raw(b"[1, 2, 3]\n")
    bad.send_raw(b'{"action": "subscribe", "stream": "x"}\n')
    bad.send_raw(b'{"action": "put", "stream": "x"}\n')
    bad.send_raw(b'{"action": "put", "stream": "x", "message": 1}\n')
    bad.send_raw(b"x" * (300 * 1024) + b"\n")
    errors = [bad.line() for _ in range(7)]
    assert all(e["action"] == "error" for e in errors)
    assert [e["line"] for e in errors] == [1, 2, 3, 4, 5, 6, 7]
    assert "not-allowed" in errors[5]["error"] and "too-long" in errors[6]["error"]
    bad.send(action="listen", stream=job.id)
    lines = bad.until_close()
    line_contiguous(lines)
    other = LineClient(broker)
    other.send(action="listen", stream="no-such-stream")
    assert other.line()["message"]["reason"] == "unknown"
    bad.close()
    other.close()
    malformed = broker.status()["malformed_messages"]
    assert malformed["line-bad-json"] >= 2 and malformed["line-too-long"] == 1


def test_network_producers_need_the_token(broker, client, tmp_path):
    stop = tmp_path / "stop"
    job = client.submit("tests.jobs:chatter_until", str(stop), 0.05)
    token = client.stream_token(job.id)
    producer = LineClient(broker)
    producer.send(action="put", stream=job.id, message={"kind": "log", "text": "no token"})
    assert "not-allowed" in producer.line()["error"]
    producer.send(action="put", stream=job.id, message="from outside", token=token)
    producer.send(action="header", stream=job.id, message={"who": "admin"}, token=TOKEN)
    messages = []
    for message in client.stream(job, after=0, timeout=20):
        messages.append(message)
        if isinstance(message, Header) and message.value == {"who": "admin"}:
            stop.touch()
    assert any(isinstance(m, Partial) and m.value == "from outside" for m in messages)
    assert messages[-1].ok
    with pytest.raises(corral.JobFailed):
        corral.Client(broker.addrs.frontend).stream_token(job.id)
    producer.close()


def test_kill_9_of_the_broker_mid_stream_then_after_seq_resumes(cluster, tmp_path):
    cluster.broker()
    cluster.worker(concurrency=1, imports=("tests.jobs",))
    stop = tmp_path / "stop"
    with corral.Client(cluster.addrs.frontend) as client:
        job = client.submit("tests.jobs:chatter_until", str(stop), 0.01)
        stream = client.stream(job, timeout=30)
        before = [next(stream) for _ in range(40)]
        assert isinstance(before[0], Header)
        broker = next(p for p in cluster.procs if p.name == "broker")
        broker.kill_group(signal.SIGKILL)
        broker.wait(5)
        seen_before_restart = stream.last_seq
        cluster.broker()
        after = []
        while len(after) < 60:
            after.append(next(stream))
        stop.touch()
        after += list(stream)
        messages = before + after
        contiguous(messages)
        assert messages[-1].ok
        notes = [m.text for m in messages if isinstance(m, Log) and not m.text.startswith("tick")]
        assert not notes, notes
        ticks = [int(m.text.split()[1]) for m in messages if isinstance(m, Log)]
        assert ticks == list(range(ticks[0], ticks[0] + len(ticks))), "a tick lost or repeated"
        # A new listener resumes from a seq seen before the restart, from the store.
        resumed = list(client.stream(job, after=seen_before_restart, timeout=30))
        assert [m.seq for m in resumed] == list(range(seen_before_restart + 1, after[-1].seq + 1))


def test_corral_tail_exit_codes_and_json(broker, client):
    good = client.submit("tests.jobs:chatter", 4)
    bad = client.submit("tests.jobs:chatter", 2, fail=True)
    for job, code in ((good, 0), (bad, 1)):
        run = subprocess.run(
            corral_cmd("tail", job.id, "--broker", broker.addrs.frontend),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == code, run.stderr
        assert ("succeeded" if code == 0 else "ValueError") in run.stdout
    run = subprocess.run(
        corral_cmd("tail", good.id, "--json", "--broker", broker.addrs.frontend),
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = [json.loads(x) for x in run.stdout.splitlines()]
    assert lines[0]["kind"] == "header" and lines[-1]["kind"] == "close"
    assert lines[-1]["outcome"] == {"value": 4} and run.returncode == 0


def test_stdout_and_logging_records_are_captured(cluster):
    cluster.broker()
    cluster.worker("--capture-output", concurrency=1, imports=("tests.jobs",))
    with corral.Client(cluster.addrs.frontend) as client:
        job = client.submit("tests.jobs:loud", 3)
        logs = [m for m in client.stream(job, after=0, timeout=20) if isinstance(m, Log)]
    printed = [m.text for m in logs if m.source == "stdout"]
    logged = [(m.text, m.level, m.logger) for m in logs if m.source == "log"]
    assert printed == ["printed 0", "printed 1", "printed 2"]
    assert logged == [(f"logged {i}", "warning", "tests.loud") for i in range(3)]
    wait_for(lambda: True)


def test_more_set_headers_than_the_window_do_not_stall_a_listener(client):
    window = 10
    job = client.submit("tests.jobs:headers", 60)
    live = client.stream(job, window=window, timeout=20)  # from the header on
    messages = list(client.stream(job, after=0, window=window, timeout=20))  # every item
    assert isinstance(messages[-1], Close) and messages[-1].outcome == {"value": 60}
    assert [m.seq for m in messages] == list(range(1, messages[-1].seq + 1))
    values = [m.value["i"] for m in messages if isinstance(m, Header)]
    assert len(values) > 2 * window, "too few set_header items to need fresh credit"
    assert values == sorted(values) and values[-1] == 59
    contiguous(list(live))
