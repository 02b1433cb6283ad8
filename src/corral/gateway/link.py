"""The gateway's client connection to the broker's frontend (one DEALER).

Jobs are submitted as eMQP REQUESTs and records read with corral's QUERY
messages; each call waits for its own answer (matched by MSGID) up to
``timeout`` seconds. Outcomes of submitted jobs (the gateway asks for them,
to tell clients a result is ready) go to :attr:`BrokerLink.on_outcome`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

from corral._loop import SocketWatcher, send_frames
from corral.protocol import Error, ProtocolError, Query, Reply, Request, new_msgid, parse

log = logging.getLogger("corral.gateway")

_outcome = msgspec.json.Decoder()


class BrokerUnavailable(Exception):
    """The broker did not answer in time (or the link is closed)."""


class Refused(Exception):
    """The broker refused a REQUEST with an ERROR (``reason``, ``detail``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class QueryFailed(Exception):
    """A QUERY answered with an error (``type`` such as ``NotFound``)."""

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(f"{type_}: {message}")
        self.type = type_
        self.message = message


class BrokerLink:
    def __init__(
        self,
        address: str,
        *,
        context: zmq.Context,
        timeout: float = 10.0,
        identity: str | None = None,
    ) -> None:
        self.address = address
        self.context = context
        self.timeout = timeout
        self.identity = identity or f"rpc-gateway:{new_msgid()}"
        self.on_outcome: Callable[[str, bytes], None] | None = None
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._sock: zmq.Socket | None = None
        self._watcher: SocketWatcher | None = None

    def open(self) -> None:
        """Connect (call from the event loop that will await the answers)."""
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, self.identity.encode())
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        sock.connect(self.address)
        self._sock = sock
        self._watcher = SocketWatcher(sock, self._on_frames)

    def close(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.set_exception(BrokerUnavailable("the gateway is stopping"))
        self._pending.clear()
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    async def submit(self, request: Request) -> None:
        """Send a job; return once the broker acknowledged it (it is stored)."""
        await self._call(request.msgid, request.to_frames())

    async def query(self, op: str, **params: Any) -> Any:
        """Ask the broker a QUERY ``op``; its answer, or :class:`QueryFailed`."""
        msg = Query(new_msgid(), op, params)
        try:
            raw = await self._call(msg.msgid, msg.to_frames())
        except Refused as exc:
            raise QueryFailed("Refused", str(exc)) from None
        if raw is None:
            raise QueryFailed("BadAnswer", "the broker acknowledged a QUERY instead of answering")
        try:
            outcome = _outcome.decode(raw)
        except msgspec.DecodeError:
            raise QueryFailed("BadAnswer", "the broker's answer is not JSON") from None
        if not isinstance(outcome, dict):
            raise QueryFailed("BadAnswer", "the broker's answer is not an object")
        error = outcome.get("error")
        if isinstance(error, dict):
            raise QueryFailed(str(error.get("type", "Error")), str(error.get("message", "")))
        return outcome.get("value")

    async def _call(self, msgid: str, frames: list[bytes]) -> Any:
        if self._sock is None:
            raise BrokerUnavailable("the link to the broker is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending[msgid] = future
        # A timer per call rather than asyncio.wait_for, which wraps each wait in a task.
        timer = loop.call_later(self.timeout, self._expire, future)
        try:
            try:
                send_frames(self._sock, frames)
            except zmq.ZMQError as exc:
                raise BrokerUnavailable(f"could not send to the broker: {exc}") from None
            if self._watcher is not None:
                self._watcher.kick()
            return await future
        finally:
            timer.cancel()
            self._pending.pop(msgid, None)

    def _expire(self, future: asyncio.Future[Any]) -> None:
        if not future.done():
            future.set_exception(
                BrokerUnavailable(
                    f"the broker at {self.address} did not answer within {self.timeout:g} s"
                )
            )

    def _on_frames(self, frames: list[bytes]) -> None:
        try:
            msg = parse(frames)
        except ProtocolError as exc:
            log.warning("bad message from the broker: %s", exc)
            return
        if isinstance(msg, Reply):
            # Taken out at once: a job's outcome may follow its acknowledgement
            # in the same batch, before the waiting call resumes.
            future = self._pending.pop(msg.ref, None)
            if future is not None:
                if not future.done():
                    future.set_result(msg.result)
            elif msg.result is not None and self.on_outcome is not None:
                self.on_outcome(msg.ref, msg.result)
        elif isinstance(msg, Error):
            future = self._pending.pop(msg.ref, None)
            if future is not None and not future.done():
                future.set_exception(Refused(msg.reason, msg.detail))
            elif future is None:
                log.warning("the broker refused a message: %s (%s)", msg.reason, msg.detail)
