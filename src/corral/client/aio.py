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
from typing import Any

import zmq
import zmq.asyncio

from corral.client.job import AsyncJob
from corral.client.options import broker_address, make_headers, make_request, queue_for
from corral.client.streams import AsyncJobStream
from corral.client.sync import configure_socket
from corral.client.wire import deliver
from corral.errors import ClientClosed, NotAcknowledged
from corral.protocol import Listen, new_msgid

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
    ) -> None:
        if not ack_timeout > 0:
            raise ValueError(f"ack_timeout must be > 0 seconds, not {ack_timeout!r}")
        self.address = broker_address(address)
        self.identity = identity or new_msgid()
        self.ack_timeout = float(ack_timeout)
        ctx = context or zmq.asyncio.Context.instance()
        self._sock: zmq.asyncio.Socket = ctx.socket(zmq.DEALER)
        try:
            configure_socket(self._sock, self.identity)
            self._sock.connect(self.address)
        except BaseException:
            self._sock.close(linger=0)
            raise
        self._pending: dict[str, AsyncJob] = {}
        #: Sent jobs in send order, which is ack-deadline order.
        self._unacked: deque[tuple[float, AsyncJob]] = deque()
        self._ack_timer: asyncio.TimerHandle | None = None
        self._receiver: asyncio.Task[None] | None = None
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
        **kwargs: Any,
    ) -> AsyncJob:
        """Send ``fn(*args, **kwargs)`` and return its :class:`AsyncJob` (await it for the value).

        Options as in :meth:`corral.Client.submit`: ``queue`` (default: the
        task's queue, else ``"default"``), ``timeout`` (default no limit),
        ``retries`` (default 0), ``guarantee`` (default ``False``), ``label``
        (default none). Raises :class:`TypeError`/:class:`ValueError` before
        sending for an unusable target, arguments or option.
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
    ) -> AsyncJob:
        """Like :meth:`submit` with ``args`` (default none) and ``kwargs`` (default none) as values.

        ``headers`` (default none) adds raw header tokens.
        """
        if self._closing:
            raise ClientClosed("the client is closed")
        queue = queue_for(fn, queue)
        hdrs = make_headers(
            timeout=timeout, retries=retries, guarantee=guarantee, label=label, extra=headers
        )
        request = make_request(fn, args, kwargs, queue, hdrs)
        loop = asyncio.get_running_loop()
        self._start(loop)
        job = AsyncJob(request.msgid, queue, loop.create_future())
        # Registered before sending: the acknowledgement may beat our return from send.
        self._pending[job.id] = job
        deadline = loop.time() + self.ack_timeout
        self._unacked.append((deadline, job))
        if self._ack_timer is None:
            self._ack_timer = loop.call_at(deadline, self._expire)
        try:
            await self._sock.send_multipart(request.to_frames())
        except BaseException:
            self._pending.pop(job.id, None)
            job._future.cancel()
            raise
        return job

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
        if self._receiver is not None:
            self._receiver.cancel()
            try:
                await self._receiver
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
                    frames = plain.recv_multipart(zmq.NOBLOCK)
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
