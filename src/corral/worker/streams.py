"""A worker's job-stream messages on their way to the broker: numbering, batching, resending.

Entries arrive from the pool (what jobs put with :mod:`corral.runtime`) and
leave as one ``STREAM`` message per turn of the event loop, grouped by job.
Each run of a job on this worker gets a unique run id, and its entries a
producer sequence number (``pseq``), so that the broker can take an entry sent
twice only once. The last ``retain`` entries of each running job (and of the
few that ended last) are kept and sent again after the worker registers
anew, because a broker that restarted may have lost the ones it had not
stored yet.

Nothing is sent between a (re-)INFORM and its ACK: a broker that restarted
would take new entries before the resent ones and leave a gap. Entries get
their ``pseq`` only as they leave, so what waits meanwhile (the broker away
for long, jobs going on) is bounded: past ``max_pending`` entries (or
``max_pending_bytes``) for all jobs, the oldest log lines are dropped first,
then the oldest entries of any kind, and each job's stream is told how many
of its messages were dropped (a warning log line ahead of the rest). A
broker that does not say it takes streams (EventMQ's router) is sent none:
the entries are counted as dropped.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

import msgspec

from corral.protocol import new_tag

log = logging.getLogger("corral.worker")

_encode = msgspec.json.encode
#: Entries (and bytes of them) held for the broker at most, for all jobs together.
MAX_PENDING = 10_000
MAX_PENDING_BYTES = 64 << 20
_LOG_ENTRY = b'{"kind":"log"'


class _Run:
    __slots__ = ("id", "next", "kept")

    def __init__(self, retain: int) -> None:
        self.id = new_tag().decode()  # a random prefix per process and a counter
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
        max_pending: int = MAX_PENDING,
        max_pending_bytes: int = MAX_PENDING_BYTES,
    ) -> None:
        self.send = send
        self.retain = retain
        self.keep_finished = keep_finished
        self.max_pending = max(1, max_pending)
        self.max_pending_bytes = max_pending_bytes
        #: Whether the broker takes streams (it said so in its ACK).
        self.enabled = False
        #: Registered: False from an INFORM until its ACK (entries wait meanwhile).
        self.ready = False
        self.runs: dict[str, _Run] = {}
        self.finished: OrderedDict[str, _Run] = OrderedDict()
        #: Entries not sent yet, oldest first, as ``[job_id, run, entry]``; the
        #: entry is None once dropped.
        self.pending: deque[list[Any]] = deque()
        #: The log lines among them, oldest first (the first to be dropped).
        self._logs: deque[list[Any]] = deque()
        #: How many entries (and bytes) of ``pending`` are not dropped, and are.
        self.held = 0
        self.held_bytes = 0
        self._dead = 0
        #: Per run id: [job_id, run, entries dropped that its stream was not told of].
        self._lost: dict[str, list[Any]] = {}
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
        for entry in entries:
            item = [job_id, run, entry]
            self.pending.append(item)
            if entry.startswith(_LOG_ENTRY):
                self._logs.append(item)
            self.held += 1
            self.held_bytes += len(entry)
        while self.held > self.max_pending or self.held_bytes > self.max_pending_bytes:
            self._drop_oldest()
        if not self._scheduled and self.ready:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self.flush)

    def _drop_oldest(self) -> None:
        """Drop the oldest held log line, or the oldest held entry if there is none."""
        if self._logs:
            item = self._logs.popleft()
            self._dead += 1  # its place in ``pending`` goes at the next compaction
        else:
            item = self.pending.popleft()
            while item[2] is None:
                self._dead -= 1
                item = self.pending.popleft()
        job_id, run, entry = item
        item[2] = None
        self.held -= 1
        self.held_bytes -= len(entry)
        self.dropped += 1
        lost = self._lost.get(run.id)
        if lost is None:
            self._lost[run.id] = [job_id, run, 1]
        else:
            lost[2] += 1
        if self._dead > 1024 and self._dead > self.held:
            self.pending = deque(i for i in self.pending if i[2] is not None)
            self._dead = 0

    def _take(self) -> list[tuple[str, _Run, list[tuple[int, bytes]]]]:
        """The held entries by run, numbered now (they leave), each run's notice of
        what was dropped first; they are kept for resending too."""
        groups: dict[str, tuple[str, _Run, list[bytes]]] = {}
        for job_id, run, _ in self._lost.values():
            groups[run.id] = (job_id, run, [])
        for job_id, run, entry in self.pending:
            if entry is not None:
                group = groups.get(run.id)
                if group is None:
                    group = groups[run.id] = (job_id, run, [])
                group[2].append(entry)
        lost = self._lost
        self._clear()
        if lost:
            log.warning(
                "%d stream message(s) of %d job(s) dropped while the broker could not be reached",
                sum(n for _, _, n in lost.values()),
                len({job_id for job_id, _, _ in lost.values()}),
            )
        out = []
        for run_id, (job_id, run, entries) in groups.items():
            if run_id in lost:
                entries.insert(0, _dropped_notice(lost[run_id][2]))
            items = []
            for entry in entries:
                item = (run.next, entry)
                run.next += 1
                run.kept.append(item)
                items.append(item)
            out.append((job_id, run, items))
        return out

    def _clear(self) -> None:
        self.pending, self._logs, self._lost = deque(), deque(), {}
        self.held = self.held_bytes = self._dead = 0

    def registering(self) -> None:
        """An INFORM went out: hold entries until its ACK."""
        self.ready = False

    def registered(self, enabled: bool, again: bool) -> None:
        """The broker acknowledged the INFORM; ``again``: after losing it (resend all kept)."""
        self.ready, self.enabled = True, enabled
        if not enabled:
            self.dropped += self.held
            self._clear()
        elif again:
            self.resend()
        else:
            self.flush()

    def flush(self) -> None:
        self._scheduled = False
        if not (self.pending or self._lost) or not self.ready:
            return
        self._send([self._group(job_id, run, items) for job_id, run, items in self._take()])

    def finish(self, job_id: str) -> None:
        """The job ended: send its entries now (before its outcome); keep a few for resending."""
        if self.pending:
            self.flush()
        run = self.runs.pop(job_id, None)
        if run is not None and run.kept:
            self.finished[job_id] = run
            while len(self.finished) > self.keep_finished:
                self.finished.popitem(last=False)

    def resend(self) -> None:
        """After registering anew: send every kept entry again (the broker drops what it has)."""
        taken = {run.id: (job_id, run, items) for job_id, run, items in self._take()}
        groups = []
        for job_id, run in [*self.finished.items(), *self.runs.items()]:
            # Entries held while registering may be more than the kept ones: send both.
            items = dict(taken.pop(run.id, (None, None, ()))[2])
            items.update(run.kept)
            if items:
                groups.append(self._group(job_id, run, sorted(items.items())))
        # Runs that ended while the broker was away and are no longer kept.
        groups += [self._group(job_id, run, items) for job_id, run, items in taken.values()]
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


def _dropped_notice(count: int) -> bytes:
    """The warning put on a job's stream ahead of what is left of its held entries."""
    return _encode(
        {
            "kind": "log",
            "text": f"{count} stream message(s) dropped: the worker held more than "
            f"it may while it could not reach the broker",
            "level": "warning",
            "logger": "corral.worker",
            "time": time.time(),
        }
    )
