"""The broker's I/O shell: three ROUTER sockets, an asyncio loop and a timer.

All decisions are the core's; this module receives frames, hands them to
:class:`~corral.broker.core.BrokerCore` and sends what the core produced.
Sockets are plain (non-asyncio) pyzmq sockets whose file descriptors are
watched by the loop, because draining a socket in a batch per wake-up is
several times cheaper than awaiting one message at a time.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import time
from collections.abc import Callable

import zmq

from corral.broker.core import BrokerCore, Dest

log = logging.getLogger("corral.broker")

#: Messages handled per socket before the loop gets a chance to do other work.
BATCH = 256


class AddressInUse(RuntimeError):
    pass


class BrokerServer:
    """Runs a :class:`BrokerCore` on real sockets until stopped.

    ``frontend``, ``backend`` and ``admin`` are ZeroMQ endpoints to bind.
    """

    def __init__(
        self,
        core: BrokerCore,
        *,
        frontend: str,
        backend: str,
        admin: str,
        context: zmq.Context | None = None,
    ) -> None:
        self.core = core
        self.endpoints = {Dest.FRONTEND: frontend, Dest.BACKEND: backend, Dest.ADMIN: admin}
        self.context = context or zmq.Context.instance()
        self.sockets: dict[Dest, zmq.Socket] = {}
        self.send_failures = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._pending_drain: set[Dest] = set()
        #: Called once the sockets are bound (the CLI prints its banner then).
        self.on_bound: Callable[[], None] | None = None

    # ------------------------------------------------------------ lifecycle

    def bind(self) -> None:
        for dest, endpoint in self.endpoints.items():
            sock = self.context.socket(zmq.ROUTER)
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
            sock.setsockopt(zmq.LINGER, 1000)
            sock.setsockopt(zmq.SNDHWM, 100_000)
            sock.setsockopt(zmq.RCVHWM, 100_000)
            # A peer whose single message is larger than this is disconnected by
            # libzmq before the message is ever buffered whole.
            sock.setsockopt(zmq.MAXMSGSIZE, self.core.config.max_frame * 4)
            try:
                sock.bind(endpoint)
            except zmq.ZMQError as exc:
                sock.close(0)
                self.close()
                if exc.errno == errno.EADDRINUSE:
                    raise AddressInUse(
                        f"{endpoint} is already in use: another broker may be running "
                        f"(try `corral status`), or choose another address with "
                        f"--{dest.name.lower()}"
                    ) from None
                raise
            self.sockets[dest] = sock

    async def serve(self) -> None:
        """Bind (if not yet), serve until :meth:`stop` or a DISCONNECT, then say KBYE."""
        if not self.sockets:
            self.bind()
        self._loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        for dest, sock in self.sockets.items():
            self._loop.add_reader(sock.getsockopt(zmq.FD), self._drain, dest)
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._loop.add_signal_handler(sig, self.stop)
            except (ValueError, RuntimeError):
                pass  # not the main thread: the owner stops us
        self._tick()
        for dest in self.sockets:
            self._drain(dest)
        if self.on_bound:
            self.on_bound()
        try:
            await self._stopped.wait()
        finally:
            await self._shutdown()

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    async def _shutdown(self) -> None:
        log.info("broker stopping: saying goodbye to %d worker(s)", len(self.core.workers))
        assert self._loop is not None
        if self._timer:
            self._timer.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._loop.remove_signal_handler(sig)
            except (ValueError, RuntimeError):
                pass
        for sock in self.sockets.values():
            self._loop.remove_reader(sock.getsockopt(zmq.FD))
        self.core.shutdown()
        self._flush()
        self.close()

    def close(self) -> None:
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()

    # ------------------------------------------------------------ I/O

    def _drain(self, dest: Dest) -> None:
        self._pending_drain.discard(dest)
        sock = self.sockets.get(dest)
        if sock is None:
            return
        core = self.core
        handler = (core.on_frontend, core.on_backend, core.on_admin)[dest]
        now = time.monotonic()
        for _ in range(BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            handler(frames[0], frames[1:], now)
        else:
            self._schedule_drain(dest)
        self._flush()
        if core.stopping:
            self.stop()

    def _schedule_drain(self, dest: Dest) -> None:
        if dest not in self._pending_drain and self._loop is not None:
            self._pending_drain.add(dest)
            self._loop.call_soon(self._drain, dest)

    def _flush(self) -> None:
        core = self.core
        while core.acks or core.outbox:
            batch = core.acks + core.outbox
            core.acks = []
            core.outbox = []
            for dest, identity, frames in batch:
                sock = self.sockets.get(dest)
                if sock is None:
                    continue
                try:
                    sock.send_multipart([identity, *frames], zmq.NOBLOCK)
                except zmq.ZMQError as exc:
                    self.send_failures += 1
                    if exc.errno == errno.EHOSTUNREACH:
                        core.peer_unreachable(dest, identity, time.monotonic())
                    else:
                        log.warning(
                            "could not send to %r on %s: %s", identity[:64], dest.name.lower(), exc
                        )
        # Sending may consume the edge of the sockets' edge-triggered FDs:
        # look again, or a message that arrived meanwhile would sit unread.
        for dest, sock in self.sockets.items():
            if sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                self._schedule_drain(dest)

    def _tick(self) -> None:
        assert self._loop is not None
        now = time.monotonic()
        due = self.core.tick(now)
        self._flush()
        delay = max(0.05, min(due - now, self.core.config.heartbeat_interval / 3))
        self._timer = self._loop.call_later(delay, self._tick)
