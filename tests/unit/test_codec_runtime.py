"""The object codec, corral.runtime outside a job, and the worker's stream outbox."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import threading
import time

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral import runtime
from corral.codec import Codec, CodecError
from corral.worker.pool import _frame, _Frames
from corral.worker.streams import StreamOutbox


@dataclasses.dataclass
class Point:
    x: int
    y: int


class Legacy:
    def __init__(self, name: str) -> None:
        self.name = name

    @classmethod
    def __codec_upgrade__(cls, state, version):
        return {"name": state["old_name"]}


def test_registered_classes_round_trip_and_nothing_else_decodes():
    codec = Codec()
    codec.register(Point, version="1.2")
    data = codec.encode({"points": [Point(1, 2), Point(3, 4)], "n": 2})
    assert json.loads(data)["points"][0] == {
        ".class": f"{__name__}.Point",
        ".version": "1.2",
        ".state": {"x": 1, "y": 2},
    }
    assert codec.decode(data) == {"points": [Point(1, 2), Point(3, 4)], "n": 2}
    with pytest.raises(CodecError, match="unknown class"):
        codec.decode(b'{".class": "os.system", ".version": "1.0", ".state": {}}')
    with pytest.raises(CodecError, match="newer"):
        codec.decode(data.replace(b'"1.2"', b'"1.10"'))
    with pytest.raises(CodecError, match="register"):
        codec.encode(object())
    with pytest.raises(CodecError, match="plain dict"):
        codec.encode({".class": "x"})


def test_an_older_version_is_upgraded():
    codec = Codec()
    codec.register(Legacy, version="2.0")
    old = b'{".class": "%s.Legacy", ".version": "1.0", ".state": {"old_name": "a"}}' % (
        __name__.encode()
    )
    assert codec.decode(old).name == "a"
    assert codec.decode(codec.encode(Legacy("b"))).name == "b"


class Pair(msgspec.Struct):
    a: int
    b: int = 0


def _message(name: str, version: str | None, state: object = None) -> bytes:
    value: dict = {".class": name, ".state": {"name": "x"} if state is None else state}
    if version is not None:
        value[".version"] = version
    return json.dumps(value).encode()


@pytest.mark.parametrize(
    ("registered", "sent"),
    [("2", "2.0"), ("2.0", "2"), ("1", None), ("1.0", None), ("1.2", "1.2.0"), ("3", "3.0.0.0")],
)
def test_versions_that_differ_only_by_trailing_zeros_are_the_same(registered, sent):
    codec = Codec()
    codec.register(Legacy, version=registered, name="legacy")
    obj = codec.decode(_message("legacy", sent))  # no upgrade: the state is current
    assert isinstance(obj, Legacy) and obj.name == "x"


@pytest.mark.parametrize(
    ("registered", "sent", "newer"),
    [("2", "2.0.1", True), ("2", "1.9", False), ("2.0", "1", False), ("1", "1.0.0.1", True)],
)
def test_versions_that_really_differ_are_newer_or_upgraded(registered, sent, newer):
    codec = Codec()
    codec.register(Legacy, version=registered, name="legacy")
    message = _message("legacy", sent, {"old_name": "y"})
    if newer:
        with pytest.raises(CodecError, match="newer"):
            codec.decode(message)
    else:
        assert codec.decode(message).name == "y"


@pytest.mark.parametrize("state", [[1, 2], "a", 3, None, {"a": 1, "c": 2}, {"b": 1}])
def test_a_struct_with_a_bad_state_is_a_codec_error(state):
    codec = Codec()
    codec.register(Pair, name="pair")
    assert codec.decode(codec.encode(Pair(1, 2))) == Pair(1, 2)
    value = {".class": "pair", ".version": "1.0", ".state": state}
    with pytest.raises(CodecError, match="Pair"):
        codec.decode(json.dumps(value).encode())


@given(st.binary(max_size=200))
def test_decoding_garbage_is_a_codec_error_or_a_plain_value(data):
    try:
        Codec().decode(data)
    except CodecError:
        pass


def test_runtime_calls_outside_a_job_are_harmless_no_ops():
    assert runtime.current_job() is None
    runtime.progress(1, 2, "things")
    runtime.log("nobody hears this")
    runtime.emit(object())  # not even encoded: there is no job
    runtime.set_header({"a": 1})


def test_runtime_buffer_sends_in_order_coalesces_progress_and_counts_drops():
    def job() -> None:  # while the worker is slow: the job must not wait for it
        for i in range(1, 3):
            runtime.progress(i, 10)
        for i in range(10):
            runtime.log(f"line {i}")

    got = _with_slow_sender(5, job)
    assert [e["done"] for e in got if e["kind"] == "progress"] == [2]  # only the latest
    assert [e["text"] for e in got[1:5]] == ["line 0", "line 1", "line 2", "line 3"]
    assert "6 log line(s) dropped" in got[-1]["text"]
    assert runtime.current_job() is None


def test_a_job_that_puts_nothing_leaves_the_sender_thread_asleep():
    # Waking the sender for nothing costs a thread switch (and the GIL) just
    # before every outcome; only what was put is worth waking it for.
    sent: list[bytes] = []
    sink = runtime._Sink(sent.append, max_entries=10)
    deadline = time.monotonic() + 10
    while sink.sending and time.monotonic() < deadline:
        time.sleep(0.001)
    woken = []
    notify_all = sink.cond.notify_all
    sink.cond.notify_all = lambda: (woken.append(1), notify_all())  # type: ignore[method-assign]
    old, runtime._sink = runtime._sink, sink
    try:
        for i in range(50):
            runtime.begin(f"job-{i}")
            runtime.end()
        assert woken == [] and sent == []
        runtime.begin("job-last")
        runtime.log("one line")
        runtime.end()  # waits until the line is sent
    finally:
        runtime._sink, runtime._current = old, None
    assert len(sent) == 1 and msgspec.msgpack.decode(sent[0])[0] == "job-last"


def _with_slow_sender(max_entries: int, job) -> list[dict]:
    """Run ``job`` in a sink whose sender is stuck on its first batch until ``job``
    returns; the entries sent, in order."""
    parent, child = socket.socketpair()
    frames = _Frames()
    gate = threading.Event()

    def send(payload: bytes) -> None:
        gate.wait(10)
        child.sendall(_frame(b"S" + payload))

    sink = runtime._Sink(send, max_entries=max_entries)
    old, runtime._sink = runtime._sink, sink
    try:
        runtime.begin("job-1")
        runtime.progress(0, 1)
        deadline = time.monotonic() + 10
        while (sink.buf or not sink.sending) and time.monotonic() < deadline:
            time.sleep(0.001)  # until the sender holds the first batch
        assert sink.sending and not sink.buf
        job()
        gate.set()
        runtime.end()
    finally:
        runtime._sink, runtime._current = old, None
    parent.setblocking(False)
    got = []
    while True:
        try:
            data = parent.recv(1 << 16)
        except BlockingIOError:
            break
        for frame in frames.feed(data):
            got += [json.loads(e) for e in msgspec.msgpack.decode(frame[1:])[1]]
    return got[1:]  # after the first progress


def test_a_full_buffer_drops_log_lines_for_partial_results_then_keeps_the_latest():
    def job():
        for i in range(4):
            runtime.log(f"line {i}")
        for i in range(8):  # the first fills the buffer, four take the lines' places
            runtime.emit({"i": i})
        runtime.log("late")  # full of partial results: a line is dropped

    got = _with_slow_sender(5, job)
    partials = [e["value"]["i"] for e in got if e["kind"] == "partial"]
    assert partials == [0, 1, 2, 3, 7]  # 4, 5 and 6 replaced by the latest
    notices = [e["text"] for e in got if e["kind"] == "log"]
    assert len(notices) == 2 and all(e["level"] == "warning" for e in got[-2:])
    assert notices[0].startswith("5 log line(s) dropped")
    assert notices[1].startswith("3 partial result(s) replaced by later ones")


def test_partial_results_are_all_sent_while_log_lines_can_give_way():
    def job():
        for i in range(20):
            runtime.log(f"line {i}")
            runtime.emit(i)
            runtime.progress(i, 20)

    # Room for 30: the 20 partial results and one progress, and what is left of
    # the lines: the oldest gave way to later partial results, the last were dropped.
    got = _with_slow_sender(30, job)
    assert [e["value"] for e in got if e["kind"] == "partial"] == list(range(20))
    assert [e["done"] for e in got if e["kind"] == "progress"] == [19]
    lines = [e["text"] for e in got if e["kind"] == "log"]
    assert lines[:-1] == [f"line {i}" for i in range(6, 15)]
    assert lines[-1].startswith("11 log line(s) dropped")
    assert "partial result(s) replaced" not in " ".join(lines)


def test_outbox_holds_entries_until_registered_and_resends_after_a_reconnect():
    sent: list[list[bytes]] = []

    async def run():
        box = StreamOutbox(sent.append, retain=3)
        box.registering()
        box.start("j")
        box.add("j", [b'{"kind":"log","text":"1"}'])
        await asyncio.sleep(0)
        assert sent == []  # not registered yet
        box.registered(True, again=False)
        box.add("j", [b'{"kind":"log","text":"2"}', b'{"kind":"log","text":"3"}'])
        await asyncio.sleep(0)
        box.registering()
        box.add("j", [b'{"kind":"log","text":"4"}'])
        await asyncio.sleep(0)
        box.registered(True, again=True)
        box.finish("j")

    asyncio.run(run())
    batches = [json.loads(frames[1]) for frames in sent]
    assert [(g[2], len(g[3])) for b in batches for g in b] == [(1, 1), (2, 2), (2, 3)]
    assert batches[-1][0][3][-1]["text"] == "4"


def test_outbox_drops_and_counts_for_a_broker_without_streams():
    sent = []

    async def run():
        box = StreamOutbox(sent.append)
        box.registered(False, again=False)
        box.start("j")
        box.add("j", [b"{}", b"{}"])
        return box

    box = asyncio.run(run())
    assert sent == [] and box.dropped == 2


def test_entries_held_while_registering_are_all_sent_even_past_the_kept_window():
    sent: list[list[bytes]] = []

    async def run():
        box = StreamOutbox(sent.append, retain=2)
        box.registered(True, again=False)
        box.start("j")
        box.registering()
        box.add("j", [b'{"kind":"log","text":"%d"}' % i for i in range(5)])
        box.registered(True, again=True)

    asyncio.run(run())
    (batch,) = [json.loads(frames[1]) for frames in sent]
    assert batch[0][2] == 1 and [e["text"] for e in batch[0][3]] == ["0", "1", "2", "3", "4"]


def _log(text: str) -> bytes:
    return b'{"kind":"log","text":"%s"}' % text.encode()


def _partial(value: str) -> bytes:
    return b'{"kind":"partial","value":"%s"}' % value.encode()


def _sent_groups(sent: list[list[bytes]]) -> list[list]:
    return [group for frames in sent for group in json.loads(frames[1])]


def _show(entry: dict) -> str:
    if entry["kind"] == "log" and entry.get("logger") == "corral.worker":
        return "dropped " + entry["text"].split()[0]
    return entry.get("text") or entry.get("value")


def test_outbox_held_for_a_broker_away_is_capped_dropping_the_oldest_log_lines_first():
    sent: list[list[bytes]] = []

    async def run():
        box = StreamOutbox(sent.append, max_pending=5)
        box.registered(True, again=False)
        box.start("j1")
        box.start("j2")
        box.add("j1", [_log("a")])
        await asyncio.sleep(0)  # sent: pseq 1 of j1
        box.registering()  # the broker is gone; the worker registers again and again
        box.add("j1", [_log("L0"), _log("L1")])
        box.add("j2", [_partial("P0")])
        box.add("j1", [_log("L2")])
        box.add("j2", [_log("L3")])
        box.add("j1", [_partial("X0"), _partial("X1")])  # the oldest two lines go
        assert box.held == 5 and box.dropped == 2
        box.add("j1", [_partial("X2"), _partial("X3")])  # the last two lines go
        box.add("j2", [_partial("P1")])  # no line left: the oldest entry goes
        assert box.held == 5 and box.dropped == 5
        await asyncio.sleep(0)
        assert len(sent) == 1  # nothing before the broker answers
        box.registered(True, again=True)
        return box

    box = asyncio.run(run())
    assert box.held == 0 and not box.pending
    first, (j1, j2) = _sent_groups(sent[:1]), _sent_groups(sent[1:])
    assert [g[2] for g in first] == [1]
    assert (j1[0], j1[2], j2[0], j2[2]) == ("j1", 1, "j2", 1)  # j1's kept "a" sent again
    assert [_show(e) for e in j1[3]] == ["a", "dropped 3", "X0", "X1", "X2", "X3"]
    assert [_show(e) for e in j2[3]] == ["dropped 2", "P1"]
    assert all(e["level"] == "warning" for e in (j1[3][1], j2[3][0]))


def test_outbox_stays_bounded_over_a_long_outage_and_numbers_what_is_left_in_order():
    sent: list[list[bytes]] = []
    longest = 0

    async def run():
        nonlocal longest
        box = StreamOutbox(sent.append, max_pending=100)
        box.registered(True, again=False)
        box.start("j")
        box.add("j", [_log(f"before {i}") for i in range(3)])
        await asyncio.sleep(0)
        box.registering()
        for i in range(20_000):
            box.add("j", [_log(str(i))])
            longest = max(longest, len(box.pending))
        box.registered(True, again=True)
        box.finish("j")
        return box

    box = asyncio.run(run())
    assert box.dropped == 20_000 - 100 and longest < 100 + 2 * 1024
    (group,) = _sent_groups(sent[1:])
    # Resent: the 3 kept from before (pseq 1-3), then the notice and the last 100 (4-104).
    assert group[2] == 1 and len(group[3]) == 3 + 1 + 100
    assert [_show(e) for e in group[3][:5]] == [
        "before 0",
        "before 1",
        "before 2",
        "dropped 19900",
        "19900",
    ]
    assert group[3][-1]["text"] == "19999"


def test_a_broker_takes_what_the_outbox_resends_after_drops_once_and_without_a_gap():
    from corral.protocol import Stream, new_msgid
    from tests.unit.test_broker_streams import Broker

    b = Broker()
    b.worker()
    job = b.submit()
    b.commit()

    def to_broker(frames: list[bytes]) -> None:
        assert frames[0] == b"STREAM"
        b.core.on_backend(b"w1", Stream(new_msgid(), "", frames[1]).to_frames(), b.now)

    async def run():
        box = StreamOutbox(to_broker, max_pending=3)
        box.registered(True, again=False)
        box.start(job)
        box.add(job, [_log("a"), _partial("b")])
        await asyncio.sleep(0)
        box.registering()
        box.add(job, [_log(str(i)) for i in range(10)] + [_partial("c")])
        box.registered(True, again=True)  # a, b again (taken once), the notice, 8, 9, c

    asyncio.run(run())
    b.commit()
    b.sent()
    b.listen(job, after=0)
    got = [m for m in b.deliveries() if type(m).__name__ in ("Log", "Partial")]
    texts = [getattr(m, "text", None) or getattr(m, "value", None) for m in got]
    assert texts[:2] == ["a", "b"] and texts[3:] == ["8", "9", "c"]
    assert texts[2].startswith("8 stream message(s) dropped")
    assert [m.seq for m in got] == [1, 2, 3, 4, 5, 6]  # no "lost on the way" warning
    assert b.streams.stats["entries_resent"] == 2
