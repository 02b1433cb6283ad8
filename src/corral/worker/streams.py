"""A worker's job-stream messages on their way to the broker: numbering, batching, resending.

Entries arrive from the pool (what jobs put with :mod:`corral.runtime`) and
leave as one ``STREAM`` message per turn of the event loop, grouped by job.
Each run of a job on this worker gets a random run id, and its entries a
producer sequence number (``pseq``), so that the broker can take an entry sent
twice only once. The last ``retain`` entries of each running job (and of the
few that ended last) are kept and sent again after the worker registers
anew, because a broker that restarted may have lost the ones it had not
stored yet.

Nothing is sent between a (re-)INFORM and its ACK: a broker that restarted
would take new entries before the resent ones and leave a gap. A broker that
does not say it takes streams (EventMQ's router) is sent none: the entries
are counted as dropped.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable

import msgspec

log = logging.getLogger("corral.worker")

_encode = msgspec.json.encode


class _Run:
    __slots__ = ("id", "next", "kept")

    def __init__(self, retain: int) -> None:
        self.id = uuid.uuid4().hex[:16]
        self.next = 1
        self.kept: deque[tuple[int, bytes]] = deque(maxlen=retain)


class StreamOutbox:
    """Numbers, batches and (after a reconnect) resends job-stream entries."""

    def __init__(
        self,
        send: Callable[[list[bytes]], None],
        *,
        retain: int = 1000,
        keep_finished: int = 16,
    ) -> None:
        self.send = send
        self.retain = retain
        self.keep_finished = keep_finished
        #: Whether the broker takes streams (it said so in its ACK).
        self.enabled = False
        #: Registered: False from an INFORM until its ACK (entries wait meanwhile).
        self.ready = False
        self.runs: dict[str, _Run] = {}
        self.finished: OrderedDict[str, _Run] = OrderedDict()
        self.pending: dict[str, list[tuple[int, bytes]]] = {}
        self.dropped = 0
        self.sent = 0
        self._scheduled = False
        self._warned = False

    def start(self, job_id: str) -> None:
        self.runs[job_id] = _Run(self.retain)

    def add(self, job_id: str, entries: list[bytes]) -> None:
        run = self.runs.get(job_id)
        if run is None:
            return
        if self.ready and not self.enabled:
            self.dropped += len(entries)
            if not self._warned:
                self._warned = True
                log.warning("the broker takes no job streams; stream messages are dropped")
            return
        pending = self.pending.setdefault(job_id, [])
        for entry in entries:
            item = (run.next, entry)
            run.next += 1
            run.kept.append(item)
            pending.append(item)
        if not self._scheduled and self.ready:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def registering(self) -> None:
        """An INFORM went out: hold entries until its ACK."""
        self.ready = False

    def registered(self, enabled: bool, again: bool) -> None:
        """The broker acknowledged the INFORM; ``again``: after losing it (resend all kept)."""
        self.ready, self.enabled = True, enabled
        if not enabled:
            self.dropped += sum(len(items) for items in self.pending.values())
            self.pending = {}
        elif again:
            self.resend()
        else:
            self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not self.pending or not self.ready:
            return
        pending, self.pending = self.pending, {}
        groups = []
        for job_id, items in pending.items():
            run = self.runs.get(job_id) or self.finished.get(job_id)
            if run is not None and items:
                groups.append(self._group(job_id, run, items))
        self._send(groups)

    def finish(self, job_id: str) -> None:
        """The job ended: send its entries now (before its outcome); keep a few for resending."""
        if job_id in self.pending:
            self.flush()
        run = self.runs.pop(job_id, None)
        if run is not None and run.kept:
            self.finished[job_id] = run
            while len(self.finished) > self.keep_finished:
                self.finished.popitem(last=False)

    def resend(self) -> None:
        """After registering anew: send every kept entry again (the broker drops what it has)."""
        pending, self.pending = self.pending, {}
        groups = []
        for job_id, run in [*self.finished.items(), *self.runs.items()]:
            # Entries held while registering may be more than the kept ones: send both.
            items = dict(pending.get(job_id, ()))
            items.update(run.kept)
            if items:
                groups.append(self._group(job_id, run, sorted(items.items())))
        if groups and self.enabled:
            log.info("sending the kept stream messages of %d job(s) again", len(groups))
            self._send(groups)

    def _group(self, job_id: str, run: _Run, items: list[tuple[int, bytes]]) -> list:
        return [job_id, run.id, items[0][0], [msgspec.Raw(entry) for _, entry in items]]

    def _send(self, groups: list) -> None:
        # Keep each message well below the broker's frame limit.
        batch: list = []
        size = 0
        for group in groups:
            group_size = sum(len(e) for e in group[3])
            if batch and size + group_size > 1 << 20:
                self._send_one(batch)
                batch, size = [], 0
            batch.append(group)
            size += group_size
        if batch:
            self._send_one(batch)

    def _send_one(self, batch: list) -> None:
        self.sent += sum(len(group[3]) for group in batch)
        self.send([b"STREAM", _encode(batch)])
