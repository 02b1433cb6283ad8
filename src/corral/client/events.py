"""Worker notices: a subscription to the broker's ``registered`` / ``unregistered`` feed.

The broker publishes one notice each time a worker joins (``registered``) or
is given up for gone (``unregistered``) on its notification PUB socket
(``--notify``). :meth:`corral.Client.watch_workers` connects to it and
returns a :class:`WorkerEvents`, which also holds the worker map as it was
when the notices started.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec
import zmq

from corral.security.curve import connect_curve
from corral.security.keys import PeerKeys

TOPICS = ("registered", "unregistered")


@dataclass(frozen=True, slots=True)
class WorkerEvent:
    """One notice: ``kind`` is ``"registered"`` or ``"unregistered"``."""

    kind: str
    id: int
    uuid: str
    queues: tuple[tuple[int, str], ...]


def notify_address(endpoint: str, broker: str) -> str:
    """Where to connect for ``endpoint`` as the broker bound it (``*`` or 0.0.0.0 -> its host)."""
    parts = urlsplit(endpoint)
    host = parts.hostname
    if parts.scheme != "tcp" or host not in ("*", "0.0.0.0", "::", ""):
        return endpoint
    broker_host = urlsplit(broker).hostname or "127.0.0.1"
    return f"tcp://{broker_host}:{endpoint.rsplit(':', 1)[1]}"


class WorkerEvents:
    """An iterator of :class:`WorkerEvent` from a broker's notification socket.

    Made by :meth:`corral.Client.watch_workers`. ``workers`` is the map of
    connected workers (id -> record) at the moment the notices start: every
    notice received afterwards happened after that map was taken, and none
    is missed. Iterating blocks until the next notice; :meth:`get` waits at
    most ``timeout`` seconds. Close it (or use ``with``) when done.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        context: zmq.Context | None = None,
        keys: PeerKeys | str | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.workers: dict[str, Any] = {}
        ctx = context or zmq.Context.instance()
        self._sock = ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        connect_curve(self._sock, keys)
        for topic in TOPICS:
            self._sock.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._decode = msgspec.json.Decoder(dict[str, Any])

    def join(self, ask_map: Callable[[str], dict[str, Any]], timeout: float = 10.0) -> None:
        """Connect, then take the worker map so that it and the notices join without a gap.

        A SUB socket hears only what is published after the broker applied its
        subscriptions, which happens some time after connecting. So a probe
        topic is subscribed last, and ``ask_map(probe)`` asks the broker for the
        map *and* to publish that probe in the same step. The probe's arrival
        proves the earlier subscriptions are in place; notices that came before
        it are already part of the map and are dropped.
        """
        probe = f"probe:{uuid.uuid4()}"
        self._sock.setsockopt(zmq.SUBSCRIBE, probe.encode())
        self._sock.connect(self.endpoint)
        deadline = time.monotonic() + timeout
        wait = 0.02
        while True:
            answer = ask_map(probe)
            if self._await_probe(probe.encode(), wait):
                self.workers = answer.get("workers", {})
                self._sock.setsockopt(zmq.UNSUBSCRIBE, probe.encode())
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"no notices from {self.endpoint} within {timeout:g} s")
            wait = min(wait * 2, 0.5)

    def _await_probe(self, probe: bytes, wait: float) -> bool:
        until = time.monotonic() + wait
        while (left := until - time.monotonic()) > 0:
            if not self._sock.poll(int(left * 1000) + 1):
                return False
            if self._sock.recv_multipart()[0] == probe:
                return True
        return False

    def get(self, timeout: float | None = None) -> WorkerEvent | None:
        """The next notice, or ``None`` after ``timeout`` seconds (default: wait forever)."""
        while True:
            if not self._sock.poll(None if timeout is None else int(timeout * 1000)):
                return None
            topic, payload = self._sock.recv_multipart()
            if topic.startswith(b"probe:"):
                continue  # a late copy of our own probe
            data = self._decode.decode(payload)
            return WorkerEvent(
                kind=topic.decode(),
                id=int(data["id"]),
                uuid=str(data["uuid"]),
                queues=tuple((int(w), str(n)) for w, n in data.get("queues", [])),
            )

    def __iter__(self) -> Iterator[WorkerEvent]:
        while not self._sock.closed:
            event = self.get()
            if event is not None:
                yield event

    def close(self) -> None:
        self._sock.close(0)

    def __enter__(self) -> WorkerEvents:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
