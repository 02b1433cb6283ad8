"""The ``corral scheduler`` process: a :class:`SchedulerAgent` on a DEALER socket.

The socket keeps one identity for the process's life and ZeroMQ reconnects
it by itself; the agent decides what to send and when, this shell only
moves frames and sleeps until the agent's next deadline or a message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time

import zmq

from corral._clock import follow_wall_clock
from corral._loop import SocketWatcher, send_frames
from corral.scheduler.agent import AgentConfig, SchedulerAgent
from corral.security.curve import connect_curve

log = logging.getLogger("corral.scheduler")


class SchedulerProcess:
    def __init__(self, config: AgentConfig, *, context: zmq.Context | None = None) -> None:
        self.config = config
        self.agent = SchedulerAgent(config)
        self.context = context or zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._watcher: SocketWatcher | None = None
        self._stopped: asyncio.Event | None = None
        self._woken: asyncio.Event | None = None

    async def run(self) -> None:
        """Connect, fire ticks until :meth:`stop` (or SIGTERM/SIGINT), then say KBYE."""
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self._woken = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError, RuntimeError):
                loop.add_signal_handler(sig, self.stop)
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.config.identity.encode())
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        connect_curve(sock, None)  # a scheduler key from $CORRAL_KEYS, if set
        sock.connect(self.config.broker)
        self._sock = sock
        self._watcher = SocketWatcher(sock, self._on_frames)
        agent = self.agent
        agent.wall_offset = time.time() - time.monotonic()
        agent.start(time.monotonic())
        log.info("scheduler %s: broker %s", self.config.identity, self.config.broker)
        try:
            while not self._stopped.is_set():
                now = time.monotonic()
                follow_wall_clock(agent, now)
                wake = agent.tick(now)
                self._flush()
                self._woken.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._woken.wait(), max(0.001, wake - time.monotonic()))
        finally:
            agent.stop()
            self._flush()
            self._watcher.close()
            sock.close(linger=1000)
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(ValueError, RuntimeError):
                    loop.remove_signal_handler(sig)

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()
        if self._woken is not None:
            self._woken.set()

    def _on_frames(self, frames: list[bytes]) -> None:
        self.agent.on_message(frames, time.monotonic())
        self._flush()
        if self._woken is not None:
            self._woken.set()  # new schedules may be due now

    def _flush(self) -> None:
        out, self.agent.out = self.agent.out, []
        sock = self._sock
        if sock is None:
            return
        for frames in out:
            try:
                send_frames(sock, frames)
            except zmq.Again:
                # Ticks are re-sent until answered; heartbeats come again.
                log.warning("send queue to the broker is full; a message waits for the next try")
        if self._watcher is not None:
            self._watcher.kick()
