"""Listening to a job's stream from Python: ``client.stream(job_id)``.

Each reader has its own DEALER connection to the broker's frontend, so a
stream is read at the pace of the code iterating it: the reader grants the
broker credit for ``window`` items at a time, and a reader that stops
iterating simply stops granting; the broker cuts it off (``close`` with
reason ``overflow``) once its backlog passes the broker's bound, and
nothing else slows down. When the connection comes back after a broker
restart, the reader listens again after the last sequence number it saw:
no gap, no duplicate.

:class:`ListenerState` is the sans-IO part (what to send, what a delivery
means); :class:`JobStream` and :class:`AsyncJobStream` are its shells.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Iterator
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message, recv_monitor_message

from corral.codec import Codec
from corral.errors import Rejected
from corral.protocol import Error, Listen, ProtocolError, Stream, new_msgid, parse
from corral.security.curve import connect_curve
from corral.streams.messages import Close, Gap, Header, Message, decode_items

_EVENTS = zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED


class ListenerState:
    """One listener's position and credit, and the meaning of what the broker sends."""

    def __init__(
        self, job_id: str, after: int | None, window: int, codec: Codec | None = None
    ) -> None:
        if not 0 < window <= 100_000:
            raise ValueError(f"window must be 1..100000, not {window!r}")
        if after is not None and (isinstance(after, bool) or not isinstance(after, int)):
            raise TypeError("after must be a sequence number or None")
        self.job_id = job_id
        self.ref = new_msgid()
        #: The last sequence number received (a header's, or an item's).
        self.last = after
        self.window = window
        self.codec = codec
        #: Items received since the last credit grant (what the broker counted).
        self.consumed = 0
        self.closed: Close | None = None
        #: The next Header is the stream's state (sent ahead of the items, no credit),
        #: not an item put by ``set_header``: after a fresh listen, and after a gap.
        self._head = after is None
        #: A gap was received and its header has not come yet.
        self._gap = False
        #: The last thing received was that state header (a gap now is the one after it).
        self._after_head = False

    def listen_frames(self) -> list[bytes]:
        """LISTEN (again, after a reconnect: from the last seq seen, under the same ref)."""
        self.consumed = 0
        self._head, self._gap, self._after_head = self.last is None, False, False
        params = {"stream": self.job_id, "after": self.last, "window": self.window}
        return Listen(self.ref, "listen", params).to_frames()

    def credit_frames(self) -> list[bytes] | None:
        """A credit grant once half the window was consumed (else ``None``)."""
        if self.consumed * 2 < self.window or self.closed is not None:
            return None
        n, self.consumed = self.consumed, 0
        return Listen(new_msgid(), "credit", {"ref": self.ref, "n": n}).to_frames()

    def hangup_frames(self) -> list[bytes]:
        return Listen(new_msgid(), "hangup", {"ref": self.ref}).to_frames()

    def feed(self, frames: list[bytes]) -> list[Message]:
        """Messages for the caller from one broker message (duplicates dropped)."""
        try:
            msg = parse(frames)
        except ProtocolError:
            return []
        if isinstance(msg, Error) and msg.ref == self.ref:
            raise Rejected(msg.reason, msg.detail, self.job_id)
        if not isinstance(msg, Stream) or msg.ref != self.ref or self.closed is not None:
            return []
        # The broker sends a listener, each time it starts or restarts it: a gap
        # (if the items asked for are no longer kept), the header (the stream's
        # state), and a gap again if the kept items begin later than that header;
        # then items. Only the items take credit, and a Header put by set_header
        # is one of them: counting it keeps this side's count equal to the broker's.
        out: list[Message] = []
        for item in decode_items(msg.batch, self.codec):
            after_head, self._after_head = self._after_head, False
            if isinstance(item, Gap):
                if not after_head:
                    self._head = self._gap = True  # the header follows
                out.append(item)
            elif isinstance(item, Header) and self._head:
                gap, self._head, self._gap, self._after_head = self._gap, False, False, True
                if self.last is not None and item.seq <= self.last and not gap:
                    continue  # a second start after a reconnect
                self.last = item.seq
                out.append(item)
            elif isinstance(item, Close):
                self.closed = item
                out.append(item)
                break
            else:
                seq = item.seq
                if self.last is not None and seq <= self.last:
                    continue
                self.last = seq
                self.consumed += 1
                out.append(item)
        return out


def _socket(ctx: zmq.Context, address: str) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, new_msgid().encode())
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RECONNECT_IVL, 100)
    sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 3000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
    connect_curve(sock, None)  # $CORRAL_KEYS, if set
    sock.connect(address)
    return sock


class JobStream:
    """An iterator of a job's stream: :class:`~corral.streams.Header` first, then
    ``Progress``, ``Log``, ``Partial`` (and ``Header`` for each ``set_header``)
    in order, ending with :class:`~corral.streams.Close` (the job's outcome, or
    ``overflow`` if this reader fell too far behind). Made by
    :meth:`corral.Client.stream`; close it (or use ``with``) when done early.

    ``timeout`` (default ``None``) bounds each wait for the next message
    (``TimeoutError``). :attr:`last_seq` is where to resume with ``after=``.
    """

    def __init__(
        self,
        address: str,
        job_id: str,
        after: int | None = None,
        *,
        window: int = 1000,
        timeout: float | None = None,
        codec: Codec | None = None,
        context: zmq.Context | None = None,
    ) -> None:
        self.state = ListenerState(job_id, after, window, codec)
        self.timeout = timeout
        self._ready: deque[Message] = deque()
        self._sock = _socket(context or zmq.Context.instance(), address)
        self._monitor = self._sock.get_monitor_socket(_EVENTS)
        self._disconnected = False
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._sock.send_multipart(self.state.listen_frames())

    @property
    def last_seq(self) -> int | None:
        """The last sequence number received (resume with ``after=last_seq``)."""
        return self.state.last

    def get(self, timeout: float | None = None) -> Message | None:
        """The next message, or ``None`` after ``timeout`` seconds (default: wait)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            if self.state.closed is not None or self._sock.closed:
                return None
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            events = dict(self._poller.poll(None if wait is None else int(wait * 1000) + 1))
            if self._monitor in events:
                self._connection_events()
            if self._sock in events:
                while True:
                    try:
                        frames = self._sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._ready.extend(self.state.feed(frames))
            if not events and deadline is not None and time.monotonic() >= deadline:
                return None
        message = self._ready.popleft()
        credit = self.state.credit_frames()
        if credit is not None:
            self._sock.send_multipart(credit)
        return message

    def _connection_events(self) -> None:
        while True:
            try:
                event = recv_monitor_message(self._monitor, zmq.NOBLOCK)["event"]
            except zmq.Again:
                return
            if event == zmq.EVENT_DISCONNECTED:
                self._disconnected = True
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and self._disconnected:
                self._disconnected = False
                self._sock.send_multipart(self.state.listen_frames())

    def __iter__(self) -> Iterator[Message]:
        return self

    def __next__(self) -> Message:
        message = self.get(self.timeout)
        if message is None:
            if self.state.closed is not None or self._sock.closed:
                self.close()
                raise StopIteration
            raise TimeoutError(f"no message on stream {self.state.job_id} for {self.timeout} s")
        return message

    def close(self) -> None:
        """Stop listening (tells the broker if the stream has not ended)."""
        if self._sock.closed:
            return
        if self.state.closed is None:
            try:
                self._sock.send_multipart(self.state.hangup_frames(), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(100)

    def __enter__(self) -> JobStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            if not self._sock.closed:
                self._monitor.close(0)
                self._sock.close(0)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class AsyncJobStream:
    """:class:`JobStream` for asyncio: ``async for message in client.stream(job_id)``."""

    def __init__(
        self,
        address: str,
        job_id: str,
        after: int | None = None,
        *,
        window: int = 1000,
        timeout: float | None = None,
        codec: Codec | None = None,
        context: zmq.asyncio.Context | None = None,
    ) -> None:
        self.state = ListenerState(job_id, after, window, codec)
        self.timeout = timeout
        self._ready: deque[Message] = deque()
        self._sock: Any = _socket(context or zmq.asyncio.Context.instance(), address)
        self._monitor: Any = self._sock.get_monitor_socket(_EVENTS)
        self._disconnected = False
        self._started = False

    @property
    def last_seq(self) -> int | None:
        return self.state.last

    async def get(self) -> Message | None:
        """The next message, or ``None`` once the stream has ended."""
        if not self._started:
            self._started = True
            await self._sock.send_multipart(self.state.listen_frames())
        while not self._ready:
            if self.state.closed is not None or self._sock.closed:
                return None
            recv = asyncio.ensure_future(self._sock.recv_multipart())
            event = asyncio.ensure_future(self._monitor.recv_multipart())
            try:
                done, _ = await asyncio.wait({recv, event}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for fut in (recv, event):
                    if not fut.done():
                        fut.cancel()
            if event in done:
                await self._connection_event(parse_monitor_message(event.result())["event"])
            if recv in done:
                self._ready.extend(self.state.feed(recv.result()))
        message = self._ready.popleft()
        credit = self.state.credit_frames()
        if credit is not None:
            await self._sock.send_multipart(credit)
        return message

    async def _connection_event(self, event: int) -> None:
        if event == zmq.EVENT_DISCONNECTED:
            self._disconnected = True
        elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and self._disconnected:
            self._disconnected = False
            await self._sock.send_multipart(self.state.listen_frames())

    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        try:
            message = await asyncio.wait_for(self.get(), self.timeout)
        except TimeoutError:
            raise TimeoutError(
                f"no message on stream {self.state.job_id} for {self.timeout} s"
            ) from None
        if message is None:
            await self.close()
            raise StopAsyncIteration
        return message

    async def close(self) -> None:
        if self._sock.closed:
            return
        if self.state.closed is None and self._started:
            try:
                await self._sock.send_multipart(self.state.hangup_frames(), zmq.NOBLOCK)
            except zmq.ZMQError:
                pass
        self._sock.disable_monitor()
        self._monitor.close(0)
        self._sock.close(100)

    async def __aenter__(self) -> AsyncJobStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
