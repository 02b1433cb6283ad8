"""Job handles: :class:`Job` (a ``concurrent.futures.Future``) and :class:`AsyncJob`."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Generator
from concurrent.futures import Future, InvalidStateError
from typing import Any

# Guards only the rare, lazy creation of a job's acknowledgement event.
_ack_event_lock = threading.Lock()


class Job(Future[Any]):
    """A submitted job; its id is the REQUEST's MSGID.

    ``result(timeout=None)`` returns the job's return value or raises
    :class:`corral.errors.JobFailed` (the job raised), ``Rejected`` (the broker
    refused it), ``NotAcknowledged`` (the broker never confirmed it) or
    ``ClientClosed``. ``cancel()`` succeeds only while the job has not been
    sent yet; a sent job runs to its end. Done-callbacks run on the thread
    that receives the outcome (the client's I/O thread, or one waiting in
    ``Client.call``), so they must be quick.
    """

    def __init__(self, job_id: str, queue: str) -> None:
        super().__init__()
        #: The job's id (the REQUEST's MSGID).
        self.id = job_id
        #: The queue it was submitted to.
        self.queue = queue
        self._acked = False
        # Whether the outcome was asked for; without it the acknowledgement ends the job.
        self._reply = True
        # Owned by the client's I/O thread from here on.
        self._frames: list[bytes] | None = None
        self._deadline = 0.0
        self._started = False
        # Waiting in an Executor's local backlog (not yet handed to the client).
        self._held = False
        self._ack_event: threading.Event | None = None
        #: Sent again after a reconnect (a duplicate-id refusal then means "accepted").
        self._resent = False
        #: A job the broker runs (not a QUERY): caught up on after a reconnect.
        self._is_job = bool(queue)
        #: The client that made it (for info() and state); set by the client.
        self._client: Any = None
        #: For a QUERY that attaches to a job: that job's handle, put in the
        #: client's table of pending jobs when the QUERY is sent.
        self._attach: Job | None = None

    @property
    def state(self) -> str:
        """The job's state now, asked of the broker (``queued``, ``running``, ...)."""
        return str(self.info()["state"])

    def info(self) -> dict[str, Any]:
        """The job's record from the broker: queue, state, attempts, worker, times, error."""
        if self._client is None:
            raise RuntimeError("this job is not bound to a client")
        return self._client.job_info(self.id)

    @property
    def acknowledged(self) -> bool:
        """Whether the broker has confirmed it accepted (stored) the job."""
        return self._acked

    def wait_acknowledged(self, timeout: float | None = None) -> bool:
        """Block until the broker acknowledges the job or the job ends.

        ``timeout`` is in seconds (default ``None``: no bound other than the
        client's ``ack_timeout``). Returns :attr:`acknowledged`.
        """
        with _ack_event_lock:
            event = self._ack_event
            if event is None:
                event = self._ack_event = threading.Event()
                self.add_done_callback(lambda _: event.set())
        # Checked after the event exists: an ack landing in between has set it, or is seen here.
        if not self._acked and not self.done():
            event.wait(timeout)
        return self._acked

    def _mark_acknowledged(self) -> None:
        # Not through the Future's condition: a notify there makes a concurrent
        # result(timeout) give up with TimeoutError, as it assumes a notify means "done".
        self._acked = True
        self._frames = None  # kept until now, to send again after a reconnect
        event = self._ack_event
        if event is not None:
            event.set()

    def _settle(self, kind: str, payload: Any) -> None:
        """Record the broker's answer: ``"value"``, ``"failed"`` or ``"refused"``."""
        # An outcome implies the broker had the job; a refusal says it did not.
        self._acked = kind != "refused"
        self._frames = None
        try:
            if kind == "value":
                self.set_result(payload)
            else:
                self.set_exception(payload)
        except InvalidStateError:
            pass  # cancelled locally or already failed (e.g. not acknowledged in time)

    def __repr__(self) -> str:
        return f"<Job {self.id} queue={self.queue!r} state={self._state}>"


class AsyncJob:
    """A job submitted through :class:`corral.AsyncClient`: ``await job`` gives its value.

    Awaiting raises what :class:`Job` raises. Awaiting is shielded: cancelling
    the awaiting task (e.g. ``asyncio.wait_for`` timing out) leaves the job
    waitable again; ``cancel()`` only stops waiting locally, the job still runs.
    """

    __slots__ = (
        "id", "queue", "_future", "_acked", "_ack_event", "_resent", "_frames", "_client",
        "_is_job", "_reply",
    )  # fmt: skip

    def __init__(self, job_id: str, queue: str, future: asyncio.Future[Any]) -> None:
        #: The job's id (the REQUEST's MSGID).
        self.id = job_id
        #: The queue it was submitted to.
        self.queue = queue
        self._future = future
        self._acked = False
        self._ack_event: asyncio.Event | None = None
        self._resent = False
        #: The REQUEST, kept until acknowledged (to send again after a reconnect).
        self._frames: list[bytes] | None = None
        self._client: Any = None
        self._is_job = bool(queue)
        self._reply = True

    def __await__(self) -> Generator[Any, None, Any]:
        return asyncio.shield(self._future).__await__()

    @property
    def future(self) -> asyncio.Future[Any]:
        """The underlying asyncio future (for ``asyncio.wait`` and callbacks)."""
        return self._future

    @property
    def acknowledged(self) -> bool:
        """Whether the broker has confirmed it accepted (stored) the job."""
        return self._acked

    async def wait_acknowledged(self) -> bool:
        """Wait for the broker's acknowledgement or the job's end; return :attr:`acknowledged`."""
        if not self._acked and not self._future.done():
            if self._ack_event is None:
                self._ack_event = asyncio.Event()
            ack = asyncio.ensure_future(self._ack_event.wait())
            try:
                await asyncio.wait({ack, self._future}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                ack.cancel()
        return self._acked

    def _mark_acknowledged(self) -> None:
        self._acked = True
        self._frames = None
        if self._ack_event is not None:
            self._ack_event.set()

    async def info(self) -> dict[str, Any]:
        """The job's record from the broker: queue, state, attempts, worker, times, error."""
        if self._client is None:
            raise RuntimeError("this job is not bound to a client")
        return await self._client.job_info(self.id)

    async def state(self) -> str:
        """The job's state now, asked of the broker (``queued``, ``running``, ...)."""
        return str((await self.info())["state"])

    def _settle(self, kind: str, payload: Any) -> None:
        """Record the broker's answer: ``"value"``, ``"failed"`` or ``"refused"``."""
        self._acked = kind != "refused"
        self._frames = None
        if self._future.done():
            return
        if kind == "value":
            self._future.set_result(payload)
        else:
            self._future.set_exception(payload)

    def done(self) -> bool:
        """Whether the outcome (or a failure) has arrived."""
        return self._future.done()

    def result(self) -> Any:
        """The value now; raises ``asyncio.InvalidStateError`` if not done yet."""
        return self._future.result()

    def exception(self) -> BaseException | None:
        """The failure now, or ``None``; raises ``asyncio.InvalidStateError`` if not done."""
        return self._future.exception()

    def cancel(self) -> bool:
        """Stop waiting for the outcome locally (the job itself is not stopped)."""
        return self._future.cancel()

    def __repr__(self) -> str:
        state = "done" if self._future.done() else "acked" if self._acked else "sent"
        return f"<AsyncJob {self.id} queue={self.queue!r} {state}>"
