"""Draining pyzmq sockets from an asyncio loop without per-message awaits.

A ZeroMQ socket's FD is edge-triggered and also signals on send-side
activity, so the rule is: on wake-up, drain until EAGAIN (a bounded batch,
then yield to the loop), and after sending, look at ``EVENTS`` again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import zmq
from zmq.backend import Socket as _RawSocket

# pyzmq's convenience layer wraps every flag in an enum and every frame in a
# per-call type check; on the broker's hot path that costs more than libzmq.
_NOBLOCK = int(zmq.NOBLOCK)
_MORE_NOBLOCK = int(zmq.SNDMORE | zmq.NOBLOCK)
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
_raw_send = _RawSocket.send
_raw_recv = _RawSocket.recv
_raw_get = _RawSocket.get


def send_frames(sock: zmq.Socket, frames: Sequence[bytes]) -> None:
    """``sock.send_multipart(frames, NOBLOCK)`` without the per-frame overhead.

    Raises ``zmq.Again`` / ``zmq.ZMQError`` like ``send_multipart``.
    """
    last = len(frames) - 1
    for i, frame in enumerate(frames):
        _raw_send(sock, frame, _MORE_NOBLOCK if i < last else _NOBLOCK)


def recv_frames(sock: zmq.Socket) -> list[bytes]:
    """``sock.recv_multipart(NOBLOCK)`` without the per-frame overhead.

    (Asking the socket for ``RCVMORE`` turns every answer into an enum, even on
    the raw backend; a received frame's ``more`` does not.)
    Raises ``zmq.Again`` when no message is waiting.
    """
    frame = _raw_recv(sock, _NOBLOCK, False)
    frames = [frame.bytes]
    while frame.more:
        frame = _raw_recv(sock, _NOBLOCK, False)
        frames.append(frame.bytes)
    return frames


def has_input(sock: zmq.Socket) -> bool:
    """Whether a message is waiting (also re-arms the edge-triggered FD)."""
    return bool(_raw_get(sock, _EVENTS) & _POLLIN)


class SocketWatcher:
    """Calls ``handler(frames)`` for each message arriving on ``sock``."""

    def __init__(
        self,
        sock: zmq.Socket,
        handler: Callable[[list[bytes]], None],
        *,
        batch: int = 256,
        after_batch: Callable[[], None] | None = None,
    ) -> None:
        self.sock = sock
        self.handler = handler
        self.batch = batch
        self.after_batch = after_batch
        self._loop = asyncio.get_running_loop()
        self._fd = sock.getsockopt(zmq.FD)
        self._scheduled = False
        self._loop.add_reader(self._fd, self.drain)
        self.kick()

    def drain(self) -> None:
        self._scheduled = False
        sock = self.sock
        if sock.closed:
            return
        for _ in range(self.batch):
            try:
                frames = recv_frames(sock)
            except zmq.Again:
                break
            self.handler(frames)
        else:
            self.kick(force=True)
        if self.after_batch:
            self.after_batch()

    def kick(self, force: bool = False) -> None:
        """Schedule a drain if messages are waiting (call after sending)."""
        if self._scheduled or self.sock.closed:
            return
        if force or has_input(self.sock):
            self._scheduled = True
            self._loop.call_soon(self.drain)

    def close(self) -> None:
        try:
            self._loop.remove_reader(self._fd)
        except (ValueError, OSError):
            pass


def recv_frames_from(sock: zmq.Socket, prop: str) -> tuple[list[bytes], str]:
    """Like :func:`recv_frames`, with the message property ``prop`` (``User-Id``, say)."""
    frame = _raw_recv(sock, _NOBLOCK, False)
    value = frame.get(prop)
    frames = [frame.bytes]
    while frame.more:
        frame = _raw_recv(sock, _NOBLOCK, False)
        frames.append(frame.bytes)
    return frames, value
