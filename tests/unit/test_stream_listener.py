"""A Python listener's credit against the broker's hub, sans-IO.

The hub counts the items it sends against the listener's credit; the
listener (:class:`corral.client.streams.ListenerState`) must count exactly
the same ones when it grants more, or credit leaks away until the broker
sends nothing more, not even the close. Here a hub's deliveries are framed as
the broker frames them and fed to a ``ListenerState``, which consumes them
one by one as ``JobStream`` does, its grants going back to the hub; after
every step the hub's credit plus what the listener has consumed but not yet
granted must be the window.
"""

from __future__ import annotations

import msgspec

from corral.broker.streams import _batches
from corral.client.streams import ListenerState
from corral.protocol import Stream, new_msgid, parse
from corral.store.streams import MemoryStreams
from corral.streams import Close, Gap, Header, Log
from corral.streams.hub import HubConfig, StreamHub
from corral.streams.messages import HeaderEntry, LogEntry


class Wire:
    """A hub, its store and one Python listener, connected as the broker connects them."""

    def __init__(self, window: int, **config) -> None:
        self.hub = StreamHub(HubConfig(**config))
        self.store = MemoryStreams()
        self.window = window
        self.state: ListenerState | None = None
        self.lid = 0
        self.got: list = []

    def listen(self, name: str = "job", after: int | None = None) -> None:
        if self.state is None:
            self.state = ListenerState(name, after, self.window)
        else:  # a reconnect: the same state listens again from where it was
            self.hub.hangup(self.lid)
            after = self.state.last
        self.state.listen_frames()
        self.lid = self.hub.listen(name, after, self.window).id
        self.pump()

    def commit(self) -> None:
        batch, marks = self.hub.take_changes()
        self.store.write(batch)
        self.hub.committed(marks)
        self.pump()

    def pump(self) -> None:
        """Deliver, consume and grant until nothing moves."""
        while self.hub.out and self.state is not None:
            out, self.hub.out = self.hub.out, []
            ready = []
            for delivery in out:
                for batch in _batches(delivery):
                    frames = Stream(new_msgid(), self.state.ref, batch).to_frames()
                    ready += self.state.feed(frames)
            for message in ready:
                self.got.append(message)
                credit = self.state.credit_frames()
                if credit is not None:
                    grant = parse(credit)
                    self.hub.grant(self.lid, grant.params["n"])
            self.check()

    def check(self) -> None:
        listener = self.hub.listeners.get(self.lid)
        if listener is not None:
            assert listener.credit + self.state.consumed == self.window, (
                f"broker credit {listener.credit} + consumed {self.state.consumed} "
                f"!= window {self.window}"
            )


def header(i: int) -> HeaderEntry:
    return HeaderEntry(value=msgspec.Raw(b'{"i":%d}' % i))


def test_set_header_items_take_credit_so_the_listener_reaches_the_close():
    wire = Wire(window=10)
    wire.hub.open("job")
    wire.listen()
    for i in range(50):  # five windows of set_header and nothing else
        wire.hub.put("job", header(i))
        if i % 7 == 0:
            wire.commit()
    wire.commit()
    wire.hub.close("job", "succeeded", "succeeded")
    wire.commit()
    kinds = [type(m) for m in wire.got]
    assert kinds == [Header] * 51 + [Close]
    assert [m.value for m in wire.got[1:-1]] == [{"i": i} for i in range(50)]
    assert wire.got[-1].seq == 51


def test_credit_matches_with_logs_and_headers_mixed_and_a_reconnect():
    wire = Wire(window=6)
    wire.hub.open("job")
    wire.listen()
    seq = 0
    for i in range(40):
        wire.hub.put("job", header(i) if i % 3 else LogEntry(text=str(i)))
        seq += 1
        if i == 20:
            wire.commit()
            wire.listen()  # reconnects: listens again after the last seq it saw
        if i % 4 == 0:
            wire.commit()
    wire.hub.close("job", "succeeded", "succeeded")
    wire.commit()
    assert isinstance(wire.got[0], Header) and isinstance(wire.got[-1], Close)
    assert [m.seq for m in wire.got[1:-1]] == list(range(1, seq + 1))  # no gap, no duplicate


def test_the_header_after_a_gap_takes_no_credit_but_later_set_headers_do():
    wire = Wire(window=4, history=5, listener_queue=1)
    wire.hub.open("job")
    for i in range(30):
        wire.hub.put("job", LogEntry(text=str(i)))
    wire.commit()
    wire.listen(after=2)  # long gone: a gap, then the header
    assert [type(m) for m in wire.got] == [Gap, Header]
    for i in range(20):
        wire.hub.put("job", header(i))
        wire.commit()
    wire.hub.close("job", "succeeded", "succeeded")
    wire.commit()
    assert [type(m) for m in wire.got] == [Gap, Header] + [Header] * 20 + [Close]


def test_a_gap_right_after_the_header_is_not_followed_by_another_header():
    # A store that fails for long: the hub drops uncommitted items, so the kept
    # items begin after the committed header, and a listener is told so by a
    # gap that follows the header. What comes next are items, headers included.
    wire = Wire(window=100, history=2, listener_queue=1)
    wire.hub.open("job")
    for i in range(40):
        wire.hub.put("job", header(i))
    wire.listen()
    assert [type(m) for m in wire.got] == [Header, Gap]
    assert wire.got[0].seq == 0 and wire.got[1].first > 1
    first = wire.got[1].first
    wire.commit()
    items = wire.got[2:]
    assert [m.seq for m in items] == list(range(first, 41))
    assert all(isinstance(m, Header) for m in items)
    assert wire.state.consumed == len(items)  # every one of them counted
    wire.hub.put("job", LogEntry(text="after"))
    wire.hub.close("job", "succeeded", "succeeded")
    wire.commit()
    assert isinstance(wire.got[-2], Log) and isinstance(wire.got[-1], Close)
