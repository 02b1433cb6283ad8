"""The asyncio client: the same protocol as :class:`corral.Client`, on ``zmq.asyncio``.

Everything runs on the event loop's thread, so there are no locks: one
receiver task resolves jobs' futures, and one timer (not one per job) fails
jobs whose acknowledgement is overdue.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import AsyncIterable, AsyncIterator, Iterable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from corral._loop import recv_frames
from corral.client.job import AsyncJob
from corral.client.options import broker_address, make_headers, make_request, queue_for
from corral.client.schedules import schedule_params
from corral.client.streams import AsyncJobStream
from corral.client.sync import configure_socket
from corral.client.wire import apply_outcomes, deliver, resync_queries
from corral.errors import ClientClosed, NotAcknowledged
from corral.protocol import Listen, Query, new_msgid
from corral.security.keys import PeerKeys

log = logging.getLogger(__name__)

#: Messages taken per wake-up without awaiting between them.
_RECV_BATCH = 1024


class AsyncClient:
    """An asyncio connection to a corral (or EventMQ) broker's frontend.

    ``address`` defaults to ``$CORRAL_BROKER``, else ``tcp://127.0.0.1:47291``;
    ``identity`` (default: a fresh uuid4 text) is the socket identity;
    ``ack_timeout`` (default 10 s) bounds the wait for the broker's
    acknowledgement (then the job raises :class:`~corral.errors.NotAcknowledged`);
    ``context`` defaults to ``zmq.asyncio.Context.instance()``.

    Use from one event loop. ``async with AsyncClient() as client:``, or
    ``await client.close()``.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        identity: str | None = None,
        ack_timeout: float = 10.0,
        context: zmq.asyncio.Context | None = None,
        keys: PeerKeys | str | None = None,
    ) -> None:
        if not ack_timeout > 0:
            raise ValueError(f"ack_timeout must be > 0 seconds, not {ack_timeout!r}")
        self.address = broker_address(address)
        self.identity = identity or new_msgid()
        self.ack_timeout = float(ack_timeout)
        ctx = context or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket = ctx.socket(zmq.DEALER)
        try:
            configure_socket(self._sock, self.identity, keys)
            self._sock.connect(self.address)
        except BaseException:
            self._sock.close(linger=0)
            raise
        self._pending: dict[str, AsyncJob] = {}
        #: Sent jobs in send order, which is ack-deadline order.
        self._unacked: deque[tuple[float, AsyncJob]] = deque()
        self._ack_timer: asyncio.TimerHandle | None = None
        self._receiver: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._all_acked: asyncio.Event | None = None
        self._closing = False

    # ------------------------------------------------------------ submitting

    async def submit(
        self,
        fn: Any,
        /,
        *args: Any,
        queue: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        guarantee: bool = False,
        label: str | None = None,
        after: Iterable[Any] = (),
        **kwargs: Any,
    ) -> AsyncJob:
        """Send ``fn(*args, **kwargs)`` and return its :class:`AsyncJob` (await it for the value).

        Options as in :meth:`corral.Client.submit`: ``queue`` (default: the
        task's queue, else ``"default"``), ``timeout`` (default no limit),
        ``retries`` (default 0), ``guarantee`` (default ``False``), ``label``
        (default none), ``after`` (default none: jobs that must succeed first).
        Raises :class:`TypeError`/:class:`ValueError` before sending for an
        unusable target, arguments or option.
        """
        return await self.submit_with(
            fn,
            args,
            kwargs,
            queue=queue,
            timeout=timeout,
            retries=retries,
            guarantee=guarantee,
            label=label,
            after=after,
        )

    async def submit_with(
        self,
        fn: Any,
        args: Iterable[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        queue: str | None = None,
        timeout: float | None = None,
        retries: int = 0,
        guarantee: bool = False,
        label: str | None = None,
        headers: Sequence[str] = (),
        after: Iterable[Any] = (),
        reply: bool = True,
    ) -> AsyncJob:
        """Like :meth:`submit` with ``args`` (default none) and ``kwargs`` (default none) as values.

        ``headers`` (default none) adds raw header tokens. ``reply=False``
        (default ``True``) does not ask for the outcome: awaiting the job gives
        ``None`` once the broker has stored it.
        """
        if self._closing:
            raise ClientClosed("the client is closed")
        queue = queue_for(fn, queue)
        hdrs = make_headers(
            timeout=timeout,
            retries=retries,
            guarantee=guarantee,
            label=label,
            extra=headers,
            after=after,
            reply=reply,
        )
        request = make_request(fn, args, kwargs, queue, hdrs)
        loop = asyncio.get_running_loop()
        job = AsyncJob(request.msgid, queue, loop.create_future())
        job._client = self
        job._reply = hdrs.reply_requested
        await self._send(job, request.to_frames())
        return job

    async def _send(self, job: AsyncJob, frames: list[bytes]) -> None:
        loop = asyncio.get_running_loop()
        self._start(loop)
        job._frames = frames  # until the broker answers: _resync may send them again
        # Registered before sending: the answer may beat our return from send.
        self._pending[job.id] = job
        deadline = loop.time() + self.ack_timeout
        self._unacked.append((deadline, job))
        if self._ack_timer is None:
            self._ack_timer = loop.call_at(deadline, self._expire)
        try:
            await self._sock.send_multipart(frames)
        except BaseException:
            self._pending.pop(job.id, None)
            job._future.cancel()
            raise

    # ------------------------------------------------------------ job records

    async def query(self, op: str, *, timeout: float | None = 30.0, **params: Any) -> Any:
        """Ask the broker (a QUERY ``op``) and return its answer; as :meth:`Client.query`."""
        if self._closing:
            raise ClientClosed("the client is closed")
        msg = Query(new_msgid(), op, params)
        job = AsyncJob(msg.msgid, "", asyncio.get_running_loop().create_future())
        await self._send(job, msg.to_frames())
        return await asyncio.wait_for(job, timeout)

    async def job_info(self, job_id: str) -> dict[str, Any]:
        """A job's record: state, queue, attempts, worker, timestamps, result or error."""
        return await self.query("job", id=job_id)

    async def jobs(self, **filters: Any) -> list[dict[str, Any]]:
        """Job records, newest first; the filters of :meth:`Client.jobs`."""
        if isinstance(filters.get("state"), tuple | set):
            filters["state"] = list(filters["state"])
        return await self.query("jobs", **{k: v for k, v in filters.items() if v is not None})

    async def retry(self, job_id: str) -> dict[str, Any]:
        """Put a dead, failed or cancelled job back in its queue (attempts start over)."""
        return await self.query("retry", id=job_id)

    async def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job; as :meth:`Client.cancel`."""
        return await self.query("cancel", id=job_id)

    async def purge(self, older_than: float) -> int:
        """Delete the records of jobs that ended more than ``older_than`` seconds ago."""
        return int((await self.query("purge", older_than=older_than))["purged"])

    async def workers(self) -> dict[str, Any]:
        """Connected workers by integer id, and every uuid ever registered with its id."""
        return await self.query("workers")

    async def job(self, job_id: str) -> AsyncJob:
        """A handle to any job by id; ``await`` it for the outcome (see :meth:`Client.job`)."""
        if not isinstance(job_id, str) or not job_id:
            raise ValueError(f"a job id is a non-empty string, not {job_id!r}")
        own = self._pending.get(job_id)
        if own is not None and own._is_job:
            return own
        handle = AsyncJob(job_id, "", asyncio.get_running_loop().create_future())
        handle._is_job = True
        handle._acked = True
        handle._client = self
        self._pending[job_id] = handle
        try:
            answer = await self.query("outcomes", ids=[job_id], listen=True)
        except BaseException as exc:
            self._pending.pop(job_id, None)
            _settle_error(handle, exc)
            raise
        apply_outcomes(self._pending, answer)
        return handle

    def map(
        self,
        fn: Any,
        /,
        *iterables: Iterable[Any] | AsyncIterable[Any],
        window: int = 64,
        queue: str | None = None,
        timeout: float | None = None,
        result_timeout: float | None = None,
        **options: Any,
    ) -> AsyncIterator[Any]:
        """``async for`` over ``fn`` applied to the zipped items of ``iterables``, in order.

        A single async iterable is accepted too. At most ``window`` (default
        64) jobs are in flight; the first failure in input order is raised when
        reached. ``queue``, ``timeout`` (the job's time limit) and ``options``
        are as in :meth:`submit_with`; ``result_timeout`` (default ``None``)
        bounds each wait for a result.
        """
        if window < 1:
            raise ValueError(f"window must be >= 1, not {window!r}")
        if not iterables:
            raise TypeError("map() needs at least one iterable")
        return self._map(
            fn, iterables, window, result_timeout, dict(options, queue=queue, timeout=timeout)
        )

    async def _map(
        self,
        fn: Any,
        iterables: tuple[Any, ...],
        window: int,
        result_timeout: float | None,
        options: dict[str, Any],
    ) -> AsyncIterator[Any]:
        in_flight: deque[AsyncJob] = deque()
        try:
            async for args in _calls(iterables):
                in_flight.append(await self.submit_with(fn, args, None, **options))
                if len(in_flight) >= window:
                    yield await asyncio.wait_for(in_flight.popleft(), result_timeout)
            while in_flight:
                yield await asyncio.wait_for(in_flight.popleft(), result_timeout)
        finally:
            for job in in_flight:
                job.cancel()

    # ------------------------------------------------------------ job streams

    async def stream(
        self,
        job_id: str | AsyncJob,
        after: int | None = None,
        *,
        window: int = 1000,
        timeout: float | None = None,
        codec: Any = None,
    ) -> AsyncJobStream:
        """``async for message in await client.stream(job)``: as :meth:`corral.Client.stream`."""
        if self._closing:
            raise ClientClosed("the client is closed")
        if isinstance(job_id, AsyncJob):
            await asyncio.wait_for(job_id.wait_acknowledged(), self.ack_timeout)
            job_id = job_id.id
        return AsyncJobStream(
            self.address, job_id, after, window=window, timeout=timeout, codec=codec
        )

    async def stream_token(self, job_id: str) -> str:
        """As :meth:`corral.Client.stream_token`."""
        if self._closing:
            raise ClientClosed("the client is closed")
        loop = asyncio.get_running_loop()
        self._start(loop)
        msg = Listen(new_msgid(), "token", {"stream": job_id})
        job = AsyncJob(msg.msgid, "", loop.create_future())
        job._acked = True  # answered, never acknowledged
        self._pending[job.id] = job
        try:
            await self._sock.send_multipart(msg.to_frames())
            return await asyncio.wait_for(job, self.ack_timeout * 3)
        finally:
            self._pending.pop(job.id, None)

    # ------------------------------------------------------------ schedules

    async def schedule(
        self,
        fn: Any,
        /,
        *args: Any,
        every: timedelta | float | None = None,
        cron: str | None = None,
        queue: str | None = None,
        run_count: int | None = None,
        nohaste: bool = False,
        timeout: float | None = None,
        retries: int = 0,
        guarantee: bool = False,
        label: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Schedule ``fn(*args, **kwargs)``; the schedule's id once stored.

        Arguments and defaults as in :meth:`corral.Client.schedule`.
        """
        params = schedule_params(
            fn,
            args,
            kwargs,
            every=every,
            cron=cron,
            queue=queue,
            run_count=run_count,
            nohaste=nohaste,
            timeout=timeout,
            retries=retries,
            guarantee=guarantee,
            label=label,
        )
        return (await self.query("schedule", **params))["id"]

    async def unschedule(self, schedule_id: str) -> dict[str, Any]:
        """Stop a schedule for good; returns its last record. Raises NotFound if unknown."""
        return await self.query("unschedule", id=schedule_id)

    async def schedules(self) -> list[dict[str, Any]]:
        """Every active schedule (see :meth:`corral.Client.schedules`)."""
        return await self.query("schedules")

    # ------------------------------------------------------------ lifecycle

    async def close(self, timeout: float | None = None) -> None:
        """Wait up to ``timeout`` s (default ``None``: up to ``ack_timeout``) for
        acknowledgements of sent jobs, then fail unfinished jobs with
        :class:`~corral.errors.ClientClosed` and close the socket. Idempotent.
        """
        if self._closing:
            return
        self._closing = True
        wait = self.ack_timeout if timeout is None else max(0.0, timeout)
        if self._waiting_for_acks():
            self._all_acked = asyncio.Event()
            try:
                await asyncio.wait_for(self._all_acked.wait(), wait)
            except TimeoutError:
                pass
        for task in (self._receiver, self._watcher):
            if task is not None:
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if self._ack_timer is not None:
            self._ack_timer.cancel()
            self._ack_timer = None
        for job in self._pending.values():
            _settle_error(
                job, ClientClosed("the client was closed before the job's outcome arrived")
            )
        self._pending.clear()
        self._unacked.clear()
        self._sock.close()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closing

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<AsyncClient {self.address} identity={self.identity}>"

    # ------------------------------------------------------------ receiving

    def _start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._receiver is None:
            self._receiver = loop.create_task(self._receive(), name="corral-async-client")
            self._watcher = loop.create_task(
                self._watch_connection(), name="corral-async-client-connection"
            )

    async def _watch_connection(self) -> None:
        """Catch up after a reconnect, as the sync client does (see ``_IOLoop._resync``)."""
        monitor = self._sock.get_monitor_socket(
            zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED
        )
        disconnected = False
        try:
            while True:
                event = parse_monitor_message(await monitor.recv_multipart())["event"]
                if event == zmq.EVENT_DISCONNECTED:
                    disconnected = True
                elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED and disconnected:
                    disconnected = False
                    await self._resync()
        finally:
            self._sock.disable_monitor()
            monitor.close(0)

    async def _resync(self) -> None:
        deadline = asyncio.get_running_loop().time() + self.ack_timeout
        resent = 0
        unacked = sorted(self._unacked, key=lambda item: item[0])
        self._unacked.clear()
        for old_deadline, job in unacked:
            if job._frames is not None and not job._acked and not job.done():
                job._resent = True
                self._unacked.append((deadline, job))
                await self._sock.send_multipart(job._frames)
                resent += 1
            else:
                self._unacked.append((old_deadline, job))
        waiting = [jid for jid, job in self._pending.items() if job._is_job and job._acked]
        for query in resync_queries(waiting):
            answer = AsyncJob(query.msgid, "", asyncio.get_running_loop().create_future())
            answer.future.add_done_callback(self._on_outcomes)
            await self._send(answer, query.to_frames())
        log.info(
            "reconnected to %s: sent %d unanswered message(s) again, asked about %d job(s)",
            self.address,
            resent,
            len(waiting),
        )

    def _on_outcomes(self, answer: asyncio.Future[Any]) -> None:
        if answer.cancelled() or answer.exception() is not None:
            log.warning("could not catch up after a reconnect: %s", answer)
            return
        apply_outcomes(self._pending, answer.result())

    async def _receive(self) -> None:
        sock = self._sock
        # A plain (non-asyncio) view of the same socket: no future per message.
        # Awaiting recv checks EVENTS first, so draining behind its back loses no wake-up.
        plain = zmq.Socket.shadow(sock.underlying)
        while True:
            self._on_frames(await sock.recv_multipart())
            # Take what has already arrived without a round through the loop each.
            for _ in range(_RECV_BATCH):
                try:
                    frames = recv_frames(plain)
                except zmq.Again:
                    break
                self._on_frames(frames)

    def _on_frames(self, frames: list[bytes]) -> None:
        if deliver(self._pending, frames):
            self._check_all_acked()

    # ------------------------------------------------------------ ack deadlines

    def _expire(self) -> None:
        self._ack_timer = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        unacked = self._unacked
        while unacked:
            deadline, job = unacked[0]
            if job._acked or job.done():
                unacked.popleft()
                continue
            if deadline > now:
                self._ack_timer = loop.call_at(deadline, self._expire)
                break
            unacked.popleft()
            self._pending.pop(job.id, None)
            _settle_error(job, NotAcknowledged(job.id, self.ack_timeout))
        self._check_all_acked()

    def _waiting_for_acks(self) -> bool:
        # Acknowledgements come back roughly in send order, so trimming the front is enough.
        unacked = self._unacked
        while unacked and (unacked[0][1]._acked or unacked[0][1].done()):
            unacked.popleft()
        return bool(unacked)

    def _check_all_acked(self) -> None:
        if self._all_acked is not None and not self._waiting_for_acks():
            self._all_acked.set()


async def _calls(iterables: tuple[Any, ...]) -> AsyncIterator[tuple[Any, ...]]:
    if len(iterables) == 1 and isinstance(iterables[0], AsyncIterable):
        async for item in iterables[0]:
            yield (item,)
        return
    if any(isinstance(it, AsyncIterable) for it in iterables):
        raise TypeError("map() takes one async iterable, or any number of plain iterables")
    for args in zip(*iterables, strict=False):
        yield args


def _settle_error(job: AsyncJob, exc: BaseException) -> None:
    if not job._future.done():
        job._future.set_exception(exc)
