"""The stream hub's rules, tested sans-IO: numbering, headers, history, listeners, commits."""

from __future__ import annotations

import random

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.store.streams import MemoryStreams
from corral.streams.hub import UNLIMITED, BadAfter, HubConfig, StreamClosed, StreamHub
from corral.streams.messages import (
    CloseItem,
    GapItem,
    HeaderEntry,
    HeaderItem,
    LogEntry,
    PartialEntry,
    ProgressEntry,
)

_items = msgspec.json.Decoder(
    ProgressEntry | LogEntry | PartialEntry | HeaderItem | CloseItem | GapItem
)


def log(text: str) -> LogEntry:
    return LogEntry(text=text)


class Seen:
    """One listener's view, checking the contract as deliveries arrive."""

    def __init__(self, after: int | None = None) -> None:
        self.header: HeaderItem | None = None
        self.next = None if after is None else after + 1
        self.seqs: list[int] = []
        self.texts: list[str] = []
        self.gaps: list[GapItem] = []
        self.close: CloseItem | None = None
        self._expect_header = after is None

    def feed(self, delivery) -> None:
        assert self.close is None, "nothing may follow a close"
        for raw in delivery.head:
            item = _items.decode(raw)
            if isinstance(item, GapItem):
                self.gaps.append(item)
                if self.header is not None or not self._expect_header:
                    self._expect_header = self.header is None
                if self.next is not None and self._expect_header is False:
                    self.next = item.first
            else:
                assert isinstance(item, HeaderItem)
                self.header = item
                self._expect_header = False
                self.next = item.seq + 1
        for raw in delivery.items:
            item = _items.decode(raw)
            assert not self._expect_header, "an item before the header"
            assert item.seq == self.next, f"expected seq {self.next}, got {item.seq}"
            self.seqs.append(item.seq)
            if isinstance(item, LogEntry):
                self.texts.append(item.text)
            self.next += 1
        if delivery.tail is not None:
            self.close = _items.decode(delivery.tail)
            if self.close.seq is not None and self.next is not None:
                assert self.close.seq <= self.next


class Rig:
    """A hub with a store: :meth:`commit` is the shell's group commit."""

    def __init__(self, **config) -> None:
        self.hub = StreamHub(HubConfig(**config))
        self.store = MemoryStreams()
        self.seen: dict[int, Seen] = {}

    def listen(self, name="job", after=None, credit=UNLIMITED) -> int:
        listener = self.hub.listen(name, after, credit)
        self.seen[listener.id] = Seen(after)
        self.pump()
        return listener.id

    def pump(self) -> None:
        out, self.hub.out = self.hub.out, []
        for delivery in out:
            self.seen[delivery.listener.id].feed(delivery)

    def commit(self) -> None:
        batch, marks = self.hub.take_changes()
        self.store.write(batch)
        self.hub.committed(marks)
        self.pump()


def test_a_listener_gets_the_header_then_every_item_in_order():
    rig = Rig()
    rig.hub.open("job")
    lid = rig.listen()
    seen = rig.seen[lid]
    assert seen.header is not None and seen.header.seq == 0
    for i in range(5):
        rig.hub.put("job", log(f"line {i}"))
    rig.commit()
    assert seen.seqs == [1, 2, 3, 4, 5]
    assert seen.texts == [f"line {i}" for i in range(5)]


def test_nothing_is_delivered_before_the_store_has_it():
    rig = Rig()
    rig.hub.open("job")
    lid = rig.listen()
    rig.hub.put("job", log("a"))
    rig.pump()
    assert rig.seen[lid].seqs == []
    rig.commit()
    assert rig.seen[lid].seqs == [1]


def test_a_late_joiner_gets_the_committed_header_and_no_gap():
    rig = Rig()
    rig.hub.open("job")
    rig.hub.put("job", ProgressEntry(done=1, total=10))
    rig.commit()
    rig.hub.put("job", ProgressEntry(done=2, total=10))  # not committed yet
    lid = rig.listen()
    seen = rig.seen[lid]
    assert seen.header.seq == 1 and seen.header.progress.done == 1
    rig.commit()
    assert seen.seqs == [2]


def test_header_reflects_progress_partial_and_value_at_its_seq():
    rig = Rig()
    rig.hub.open("job")
    rig.hub.put("job", ProgressEntry(done=3, total=4, units="files"))
    rig.hub.put("job", PartialEntry(value=msgspec.Raw(b'{"best":1}')))
    rig.hub.put("job", HeaderEntry(value=msgspec.Raw(b'"phase 2"')))
    rig.commit()
    lid = rig.listen()
    header = rig.seen[lid].header
    assert header.seq == 3
    assert (header.progress.done, header.progress.total, header.progress.units) == (3, 4, "files")
    assert bytes(header.partial) == b'{"best":1}' and bytes(header.value) == b'"phase 2"'


def test_set_header_is_an_item_current_listeners_receive():
    rig = Rig()
    rig.hub.open("job")
    lid = rig.listen()
    rig.hub.put("job", HeaderEntry(value=msgspec.Raw(b"7")))
    rig.commit()
    assert rig.seen[lid].seqs == [1]


def test_after_resumes_without_gap_or_duplicate():
    rig = Rig()
    rig.hub.open("job")
    for i in range(10):
        rig.hub.put("job", log(str(i)))
    rig.commit()
    lid = rig.listen(after=4)
    assert rig.seen[lid].header is None
    assert rig.seen[lid].seqs == [5, 6, 7, 8, 9, 10]


def test_after_too_far_behind_the_history_is_told_so_with_a_gap_then_the_header():
    rig = Rig(history=10)
    rig.hub.open("job")
    for i in range(100):
        rig.hub.put("job", log(str(i)))
    rig.commit()
    lid = rig.listen(after=3)
    seen = rig.seen[lid]
    assert len(seen.gaps) == 1 and seen.gaps[0].after == 3
    assert seen.header.seq == 100
    rig.hub.put("job", log("more"))
    rig.commit()
    assert seen.seqs == [101]


def test_after_beyond_the_stream_is_refused():
    rig = Rig()
    rig.hub.open("job")
    rig.hub.put("job", log("a"))
    with pytest.raises(BadAfter):
        rig.hub.listen("job", after=1)  # seq 1 is not committed yet
    rig.commit()
    rig.listen(after=1)
    with pytest.raises(BadAfter):
        rig.hub.listen("job", after=-1)


def test_unknown_stream_is_a_key_error():
    with pytest.raises(KeyError):
        StreamHub().listen("nope")
    with pytest.raises(KeyError):
        StreamHub().put("nope", log("x"))


def test_close_reaches_every_listener_after_the_last_item_and_ends_them():
    rig = Rig()
    rig.hub.open("job")
    lids = [rig.listen() for _ in range(3)]
    rig.hub.put("job", log("last"))
    seq = rig.hub.close("job", "succeeded", "succeeded", b'{"value":5}')
    assert seq == 2
    rig.commit()
    for lid in lids:
        seen = rig.seen[lid]
        assert seen.seqs == [1]
        assert seen.close.seq == 2 and seen.close.reason == "succeeded"
        assert bytes(seen.close.outcome) == b'{"value":5}'
    assert not rig.hub.listeners
    with pytest.raises(StreamClosed):
        rig.hub.put("job", log("late"))
    assert rig.hub.close("job", "again") is None


def test_a_listener_joining_a_closed_stream_gets_header_with_close_then_close():
    rig = Rig()
    rig.hub.open("job")
    rig.hub.put("job", log("x"))
    rig.hub.close("job", "failed", "failed", b'{"error":{"type":"E"}}')
    rig.commit()
    lid = rig.listen()
    seen = rig.seen[lid]
    assert seen.header.close.reason == "failed"
    assert seen.close.seq == 2
    lid = rig.listen(after=1)
    assert rig.seen[lid].close.seq == 2 and rig.seen[lid].seqs == []
    lid = rig.listen(after=0)
    assert rig.seen[lid].seqs == [1] and rig.seen[lid].close.seq == 2


def test_credit_paces_a_listener_and_grant_resumes_it():
    rig = Rig()
    rig.hub.open("job")
    lid = rig.listen(credit=3)
    for i in range(10):
        rig.hub.put("job", log(str(i)))
    rig.commit()
    assert rig.seen[lid].seqs == [1, 2, 3]
    rig.hub.grant(lid, 4)
    rig.pump()
    assert rig.seen[lid].seqs == list(range(1, 8))
    rig.hub.set_credit(lid, UNLIMITED)
    rig.pump()
    assert rig.seen[lid].seqs == list(range(1, 11))


def test_a_stalled_listener_overflows_while_a_normal_one_keeps_up():
    rig = Rig(listener_queue=50, history=20)
    rig.hub.open("job")
    stalled = rig.listen(credit=0)
    normal = rig.listen()
    for i in range(200):
        rig.hub.put("job", log(str(i)))
        if i % 7 == 0:
            rig.commit()
    rig.commit()
    assert rig.seen[stalled].close.reason == "overflow" and rig.seen[stalled].close.seq is None
    assert rig.seen[normal].seqs == list(range(1, 201))
    assert rig.seen[normal].close is None
    assert rig.hub.stats.overflows == 1
    assert stalled not in rig.hub.listeners


def test_history_is_bounded_but_kept_while_a_slow_listener_needs_it():
    rig = Rig(history=100, listener_queue=1000)
    rig.hub.open("job")
    slow = rig.listen(credit=10)
    for i in range(600):
        rig.hub.put("job", log(str(i)))
        rig.commit()
    stream = rig.hub.get("job")
    assert stream.first <= 11  # still holds what the slow listener has not had
    rig.hub.grant(slow, 10_000)
    rig.pump()
    assert rig.seen[slow].seqs == list(range(1, 601))
    rig.hub.put("job", log("x"))
    rig.commit()
    assert len(stream.items) <= 100 + rig.hub._chunk
    assert len(rig.store.streams["job"].items) == 100


def test_history_bytes_bound():
    rig = Rig(history=1000, history_bytes=2000)
    rig.hub.open("job")
    for _ in range(200):
        rig.hub.put("job", log("y" * 100))
        rig.commit()
    assert rig.hub.get("job").nbytes <= 2000 + 200


def test_delete_closes_listeners_with_reason_deleted():
    rig = Rig()
    rig.hub.open("job")
    lid = rig.listen()
    assert rig.hub.delete("job")
    rig.pump()
    assert rig.seen[lid].close.reason == "deleted"
    assert not rig.hub.delete("job")
    batch, _ = rig.hub.take_changes()
    assert batch.deleted == ["job"]


def test_hangup_removes_silently():
    rig = Rig()
    rig.hub.open("job")
    lid = rig.listen()
    assert rig.hub.hangup(lid)
    assert not rig.hub.hangup(lid)
    rig.hub.put("job", log("a"))
    rig.commit()
    assert rig.seen[lid].seqs == []


def test_restore_from_the_store_continues_numbering_and_resumes():
    rig = Rig(history=50)
    rig.hub.open("job")
    rig.hub.put("job", ProgressEntry(done=1, total=2))
    for i in range(120):
        rig.hub.put("job", log(str(i)))
    rig.hub.get("job").producer, rig.hub.get("job").pseq = "run1", 121
    rig.commit()
    records, _ = rig.store.load_open()
    hub2 = StreamHub(HubConfig(history=50))
    stream = hub2.restore(records[0])
    assert stream.seq == 121 and stream.first == 72 and stream.producer == "run1"
    assert stream.progress.done == 1
    rig.hub = hub2
    lid = rig.listen(after=100)
    assert rig.seen[lid].seqs == list(range(101, 122))
    assert hub2.put("job", log("next")) == 122
    lid = rig.listen(after=5)
    assert rig.seen[lid].gaps and rig.seen[lid].header.seq == 121


def test_closed_streams_are_evicted_past_the_bound_and_restorable():
    rig = Rig(closed_kept=2)
    for name in ("a", "b", "c"):
        rig.hub.open(name)
        rig.hub.put(name, log(name))
        rig.hub.close(name, "succeeded", "succeeded")
        rig.commit()
    assert "a" not in rig.hub.streams and {"b", "c"} <= set(rig.hub.streams)
    rig.hub.restore(rig.store.get("a"))
    lid = rig.listen("a", after=0)
    assert rig.seen[lid].seqs == [1] and rig.seen[lid].close.seq == 2


def test_a_thousand_listeners_on_one_stream():
    rig = Rig()
    rig.hub.open("job")
    lids = [rig.listen() for _ in range(1000)]
    for i in range(500):
        rig.hub.put("job", log(str(i)))
        if i % 50 == 49:
            rig.commit()
    rig.hub.close("job", "succeeded", "succeeded")
    rig.commit()
    for lid in lids:
        assert rig.seen[lid].seqs == list(range(1, 501))
        assert rig.seen[lid].close.seq == 501
    assert not rig.hub.listeners


def test_late_joiners_under_four_producers_over_100k_messages():
    """4 producers interleave 100,000 puts on one stream, driven in-process on the hub;
    listeners join at random moments (fresh, or resuming with ``after``) and each one
    receives the header and then every later item: no gap, no duplicate (checked by
    sequence numbers) and every producer's own items in its order. The same contract
    over real sockets is tested on a smaller scale in tests/integration/test_streams.py.
    """
    rng = random.Random(6)
    rig = Rig()
    rig.hub.open("job")
    counters = [0, 0, 0, 0]
    joiners: list[int] = []
    total = 100_000
    for _ in range(total):
        producer = rng.randrange(4)
        rig.hub.put("job", LogEntry(text=f"{producer}:{counters[producer]}"))
        counters[producer] += 1
        if rng.random() < 0.01:
            rig.commit()
        if rng.random() < 0.0005:
            stream = rig.hub.get("job")
            after = rng.choice([None, rng.randint(stream.first - 1, stream.committed)])
            joiners.append(rig.listen(after=after))
    rig.hub.close("job", "succeeded", "succeeded")
    rig.commit()
    assert len(joiners) > 20
    for lid in joiners:
        seen = rig.seen[lid]
        assert not seen.gaps
        start = seen.header.seq + 1 if seen.header else seen.seqs[0]
        assert seen.seqs == list(range(start, total + 1))
        assert seen.close.seq == total + 1
        last = [-1, -1, -1, -1]
        for text in seen.texts:
            producer, k = map(int, text.split(":"))
            assert k == last[producer] + 1 or last[producer] == -1
            last[producer] = k


ops = st.lists(
    st.one_of(
        st.tuples(st.just("put"), st.integers(0, 3)),
        st.tuples(st.just("commit"), st.just(0)),
        st.tuples(st.just("listen"), st.integers(-1, 40)),
        st.tuples(st.just("grant"), st.integers(0, 20)),
        st.tuples(st.just("hangup"), st.integers(0, 20)),
        st.tuples(st.just("close"), st.just(0)),
    ),
    max_size=150,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.integers(3, 12), st.integers(2, 30))
def test_any_interleaving_keeps_the_contract(script, history, queue):
    """Whatever the order of puts, commits, joins, credit and hangups: every listener
    sees a header or its resume point, then contiguous seqs (with an explicit gap only
    when it asked for what is no longer kept), and ends with overflow or the close."""
    rig = Rig(history=history, listener_queue=queue)
    rig.hub.open("job")
    lids: list[int] = []
    closed = False
    for op, arg in script:
        stream = rig.hub.get("job")
        if op == "put" and not closed:
            kind = [log("x"), ProgressEntry(done=arg), PartialEntry(value=msgspec.Raw(b"1"))]
            rig.hub.put("job", kind[arg % 3] if arg < 3 else HeaderEntry(value=msgspec.Raw(b"2")))
        elif op == "commit":
            rig.commit()
        elif op == "listen":
            after = None if arg < 0 else min(arg, stream.committed)
            lids.append(rig.listen(after=after, credit=rng_credit(arg)))
        elif op == "grant" and lids:
            rig.hub.grant(lids[arg % len(lids)], arg + 1)
            rig.pump()
        elif op == "hangup" and lids:
            rig.hub.hangup(lids[arg % len(lids)])
        elif op == "close" and not closed:
            rig.hub.close("job", "succeeded", "succeeded")
            closed = True
    rig.hub.close("job", "succeeded", "succeeded")
    rig.commit()
    for lid in list(rig.hub.listeners):
        rig.hub.set_credit(lid, UNLIMITED)
    rig.pump()
    final = rig.hub.get("job").seq
    for lid in lids:
        seen = rig.seen[lid]
        if lid in rig.hub.listeners:
            continue  # hung up: it simply stopped
        if seen.close is None:
            continue  # hung up before the end
        if seen.close.reason == "overflow":
            continue
        assert seen.close.seq == final
        if seen.seqs:
            assert seen.seqs[-1] == final - 1
    assert all(lid not in rig.hub.listeners for lid in lids)
    assert len(rig.store.streams["job"].items) <= history


def rng_credit(arg: int) -> int:
    return UNLIMITED if arg % 3 else arg % 5
