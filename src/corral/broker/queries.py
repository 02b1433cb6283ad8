"""Answers to clients' QUERY messages: job records and lists, retry, cancel, purge, workers.

Jobs in flight are answered from the core (newest state); finished ones from
the store, read in a thread so a slow query never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import msgspec

from corral.broker import access
from corral.broker.core import BrokerCore, Dest, job_record
from corral.broker.model import JobState
from corral.protocol import PROTOCOL, Query, encode_outcome_error, new_msgid
from corral.security.principal import TRUSTED, Principal
from corral.store.base import JobQuery, JobRecord, Store
from corral.store.query import FINISHED_STATES, matches

log = logging.getLogger("corral.broker")

_outcome = msgspec.json.Decoder()
MAX_LIMIT = 10_000
_STATES = frozenset(state.value for state in JobState)
#: The identity of the client whose QUERY the current task answers, and its principal.
_caller: ContextVar[bytes] = ContextVar("caller", default=b"")
_peer: ContextVar[Principal] = ContextVar("peer", default=TRUSTED)


class QueryError(Exception):
    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_


def job_view(
    rec: JobRecord, *, with_result: bool = True, gateway_owner: bool = True
) -> dict[str, Any]:
    """The public shape of a job record (what clients, the CLI and the gateway see).

    Without ``gateway_owner`` the ``owner:<client_id>`` header token the gateway
    names its clients by is left out: only admins (a gateway is one) see it.
    """
    headers = rec.headers
    if not gateway_owner and "owner:" in headers:
        headers = ",".join(t for t in headers.split(",") if not t.startswith("owner:"))
    view: dict[str, Any] = {
        "id": rec.id,
        "queue": rec.queue,
        "state": rec.state,
        "attempts": rec.attempts,
        "worker_id": rec.worker_id,
        "worker_uuid": rec.worker_uuid,
        "submitted": rec.submitted,
        "started": rec.started,
        "completed": rec.completed,
        "received": rec.received,
        "label": rec.label,
        "headers": headers,
        "owner": rec.owner,
        "error": None,
    }
    after = [t[6:] for t in rec.headers.split(",") if t.startswith("after:")]
    if after:
        view["after"] = after
    if rec.result is not None:
        try:
            outcome = _outcome.decode(rec.result)
        except msgspec.DecodeError:
            outcome = {}
        if isinstance(outcome, dict):
            view["error"] = outcome.get("error")
            if with_result and "error" not in outcome:
                view["result"] = outcome.get("value")
    return view


class QueryHandler:
    """Runs QUERY ops against the core and the store; answers go to the frontend."""

    def __init__(
        self,
        core: BrokerCore,
        store: Store,
        run_in_thread: Callable[..., Any],
        send: Callable[[list[tuple[Dest, bytes, list[bytes]]]], None],
        now: Callable[[], float],
        unstored: Callable[[], dict[str, JobRecord]] = dict,
        notify: str | None = None,
        purge: Callable[[float], Awaitable[int]] | None = None,
    ) -> None:
        self.core = core
        self.unstored = unstored
        #: The notification PUB endpoint, for clients that watch workers.
        self.notify = notify
        #: Deletes records of jobs that ended more than N seconds ago (in the writer thread).
        self.purge = purge
        self.store = store
        self.run_in_thread = run_in_thread
        self.send = send
        self.now = now

    def handle(self, identity: bytes, query: Query, peer: Principal = TRUSTED) -> None:
        op = getattr(self, f"op_{query.op}", None)
        if op is None:
            self._answer_error(identity, query, "BadRequest", f"unknown query op {query.op!r}")
            return
        asyncio.ensure_future(self._run(op, identity, query, peer))

    async def _run(
        self, op: Callable[..., Any], identity: bytes, query: Query, peer: Principal
    ) -> None:
        try:
            inspect.signature(op).bind(**query.params)
        except TypeError as exc:
            self._answer_error(
                identity, query, "BadRequest", f"bad arguments for {query.op}: {exc}"
            )
            return
        _caller.set(identity)  # this task's own context: concurrent queries do not mix
        _peer.set(peer)
        try:
            value = await op(**query.params)
        except QueryError as exc:
            self._answer_error(identity, query, exc.type, str(exc))
        except Exception as exc:  # noqa: BLE001 - a failed query must still be answered
            log.exception("query %s failed", query.op)
            self._answer_error(identity, query, "InternalError", str(exc))
        else:
            self._answer(identity, query, msgspec.json.encode({"value": value}))

    def _answer(self, identity: bytes, query: Query, outcome: bytes) -> None:
        self.send(
            [
                (
                    Dest.FRONTEND,
                    identity,
                    [b"", PROTOCOL, b"REPLY", new_msgid().encode(), outcome, query.msgid.encode()],
                )
            ]
        )

    def _answer_error(self, identity: bytes, query: Query, type_: str, message: str) -> None:
        self._answer(identity, query, encode_outcome_error(type_, message))

    async def _record(self, job_id: str) -> JobRecord | None:
        """The newest record of ``job_id``, if the caller may see it."""
        job = self.core.jobs.get(job_id)
        if job is not None:
            rec: JobRecord | None = job_record(job, self.core.wall_offset)
        else:
            # Whatever is not newer in memory now is in the store before the read below.
            rec = self.unstored().get(job_id)
            if rec is None:
                rec = await self.run_in_thread(self.store.get_job, job_id)
        if rec is not None and not self._visible(rec.owner):
            return None  # as if it did not exist: nobody learns of others' jobs
        return rec

    def _visible(self, owner: str | None) -> bool:
        return self.core.visibility.can_see(_peer.get(), owner)

    def _may_change(self, job_id: str, owner: str | None, what: str) -> None:
        peer = _peer.get()
        if not self.core.visibility.can_change(peer, owner):
            raise QueryError(
                access.NOT_AUTHORIZED,
                f"{what} of job {job_id} needs the admin role: it was submitted by "
                f"another client, and {peer.describe()} may change only its own jobs",
            )

    # ------------------------------------------------------------ ops

    async def op_job(self, id: str, with_result: bool = True) -> dict[str, Any]:  # noqa: A002
        rec = await self._record(_job_id(id))
        if rec is None:
            raise QueryError("NotFound", f"no job {id!r} (never submitted, or purged)")
        return job_view(rec, with_result=with_result, gateway_owner=_peer.get().admin)

    async def op_jobs(
        self,
        state: str | list[str] | None = None,
        queue: str | None = None,
        worker_id: int | None = None,
        label: str | None = None,
        since: float | None = None,
        until: float | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        states = [state] if isinstance(state, str) else state or []
        if not isinstance(states, list) or not all(
            isinstance(s, str) and s in _STATES for s in states
        ):
            raise QueryError("BadRequest", f"state must be one or a list of {sorted(_STATES)}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= MAX_LIMIT:
            raise QueryError("BadRequest", f"limit must be 1..{MAX_LIMIT}")
        for name, value, kind in (
            ("queue", queue, str),
            ("label", label, str),
            ("worker_id", worker_id, int),
            ("since", since, int | float),
            ("until", until, int | float),
        ):
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
                raise QueryError("BadRequest", f"{name} has the wrong type")
        owners = self.core.visibility.owners_seen_by(_peer.get())
        query = JobQuery(
            states=states,
            queue=queue,
            worker_id=worker_id,
            label=label,
            since=since,
            until=until,
            limit=limit,
            owners=None if owners is None else sorted(owners),
        )
        # The store lags the core by at most one commit: taken before the read,
        # these records cover every change the read may miss.
        newer = self.unstored()
        found = await self.run_in_thread(self.store.query_jobs, query)
        merged = {rec.id: rec for rec in found}
        merged.update(newer)
        for job_id in merged:
            live = self.core.jobs.get(job_id)
            if live is not None:
                merged[job_id] = job_record(live, self.core.wall_offset)
        records = sorted(
            (rec for rec in merged.values() if matches(rec, query)),
            key=lambda rec: rec.submitted,
            reverse=True,
        )
        reveal = _peer.get().admin
        return [job_view(r, with_result=False, gateway_owner=reveal) for r in records[:limit]]

    async def op_outcomes(self, ids: list[str], listen: bool = False) -> dict[str, Any]:
        """How these jobs ended, for a client catching up after a reconnect or attaching to a job.

        ``finished`` maps the ids of finished jobs to their outcome; ids of jobs
        still queued, running or retrying are left out: their outcome will be
        sent to their submitter as usual, and with ``listen`` to the caller too.
        ``unknown`` lists ids the broker has no record of.
        """
        if not isinstance(ids, list) or len(ids) > MAX_LIMIT:
            raise QueryError("BadRequest", f"ids must be a list of at most {MAX_LIMIT} job ids")
        for job_id in ids:
            _job_id(job_id)
        # Jobs the caller may not see are as good as unknown to it.
        hidden = {
            i for i in ids if i in self.core.jobs and not self._visible(self.core.jobs[i].owner)
        }
        ids = [i for i in ids if i not in hidden]
        wanted = [i for i in ids if i not in self.core.jobs]
        newer = self.unstored()
        records = {rec.id: rec for rec in await self.run_in_thread(self.store.get_jobs, wanted)}
        records.update((i, newer[i]) for i in wanted if i in newer)
        finished: dict[str, Any] = {}
        unknown: list[str] = []
        if listen:
            # After the read: a job that arrived or came back meanwhile is listened to too.
            caller = _caller.get()
            for job_id in ids:
                job = self.core.jobs.get(job_id)
                if job is not None and self._visible(job.owner):
                    self.core.listen(job_id, caller)
        # Jobs that ended during the read: too late to listen to, so read them as well.
        late = [i for i in ids if i not in records and i not in self.core.jobs and i not in wanted]
        if late:
            newer = self.unstored()
            records.update((i, newer[i]) for i in late if i in newer)
            stored = [i for i in late if i not in records]
            if stored:
                records.update(
                    (rec.id, rec) for rec in await self.run_in_thread(self.store.get_jobs, stored)
                )
            wanted += late
        for job_id in wanted:
            if job_id in self.core.jobs:
                continue  # submitted, restored or retried meanwhile: it is not over
            rec = records.get(job_id)
            if rec is None or not self._visible(rec.owner):
                unknown.append(job_id)
            elif rec.state in FINISHED_STATES and rec.result is not None:
                try:
                    finished[job_id] = _outcome.decode(rec.result)
                except msgspec.DecodeError:
                    finished[job_id] = {"error": {"type": "BadResult", "message": "unreadable"}}
        return {"finished": finished, "unknown": unknown + sorted(hidden)}

    async def op_retry(self, id: str) -> dict[str, Any]:  # noqa: A002
        rec = await self._record(_job_id(id))
        if rec is None:
            raise QueryError("NotFound", f"no job {id!r}")
        self._may_change(rec.id, rec.owner, "a retry")
        if not self.core.retry(rec, self.now()):
            raise QueryError(
                "NotRetryable",
                f"job {id} is {rec.state}; only dead, failed or cancelled jobs can be retried",
            )
        return {"id": rec.id, "state": self.core.jobs[rec.id].state.value}

    async def op_cancel(self, id: str) -> dict[str, Any]:  # noqa: A002
        """Cancel a job that has not ended; say so, and in what state it is, if it has."""
        job_id = _job_id(id)
        live = self.core.jobs.get(job_id)
        if live is not None:
            if not self._visible(live.owner):
                raise QueryError("NotFound", f"no job {id!r} (never submitted, or purged)")
            self._may_change(job_id, live.owner, "cancelling")
        was = self.core.cancel(job_id, self.now())
        if was is not None:
            return {"id": job_id, "state": "cancelled", "cancelled": True, "was": was}
        rec = await self._record(job_id)
        if rec is None:
            raise QueryError("NotFound", f"no job {id!r} (never submitted, or purged)")
        return {
            "id": job_id,
            "state": rec.state,
            "cancelled": False,
            "detail": f"job {job_id} has already ended ({rec.state}); nothing was changed",
        }

    async def op_purge(self, older_than: float) -> dict[str, Any]:
        """Delete the records of jobs that ended more than ``older_than`` seconds ago."""
        if isinstance(older_than, bool) or not isinstance(older_than, int | float):
            raise QueryError("BadRequest", "older_than is a number of seconds")
        if not 0 <= older_than < 1e10:
            raise QueryError("BadRequest", "older_than must be >= 0 seconds")
        peer = _peer.get()
        if not peer.has(access.ADMIN):
            raise QueryError(
                access.NOT_AUTHORIZED, f"purge needs the admin role; {peer.describe()}"
            )
        if self.purge is None:
            raise QueryError("NotAvailable", "this broker cannot purge its store")
        return {"purged": await self.purge(older_than)}

    async def op_workers(self, probe: str | None = None) -> dict[str, Any]:
        """The worker map; with ``probe``, also publish that topic in the same step.

        A watcher that receives its probe on the notification socket knows its
        subscription was active when this map was taken (see
        :class:`corral.client.events.WorkerEvents`).
        """
        if probe is not None:
            if not isinstance(probe, str) or not probe.startswith("probe:") or len(probe) > 100:
                raise QueryError("BadRequest", "a probe is a string 'probe:...' of <= 100 chars")
            if self.notify is None:
                raise QueryError("NotAvailable", "this broker publishes no notices (--notify '')")
            self.core.notifications.append((probe, {}))
        return {**self.core.worker_map(), "notify": self.notify}


def _job_id(value: Any) -> str:
    if not isinstance(value, str) or not value or len(value) > 256:
        raise QueryError("BadRequest", "a job id is a non-empty string")
    return value
