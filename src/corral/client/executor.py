"""``concurrent.futures.Executor`` on top of :class:`corral.Client`."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from concurrent import futures
from typing import Any

from corral.client.job import Job
from corral.client.options import make_headers, make_request, queue_for
from corral.client.sync import Client


class Executor(futures.Executor):
    """Runs calls on corral workers instead of local threads or processes.

    ``address`` (default ``$CORRAL_BROKER``, else ``tcp://127.0.0.1:47291``)
    and ``ack_timeout`` (default 10 s) configure the :class:`Client` made for
    this executor, unless ``client`` (default none) is given: then that one is
    used and left open at shutdown. ``queue`` (default ``"default"``),
    ``timeout`` (default no limit), ``retries`` (default 0), ``guarantee``
    (default ``False``) and ``label`` (default none) apply to every job.
    ``max_in_flight`` (default ``None``: unbounded) caps how many jobs are at
    the broker at once; :meth:`submit` never blocks, later calls wait in a
    local backlog and can still be cancelled there.
    """

    def __init__(
        self,
        address: str | None = None,
        *,
        queue: str = "default",
        max_in_flight: int | None = None,
        timeout: float | None = None,
        retries: int = 0,
        guarantee: bool = False,
        label: str | None = None,
        ack_timeout: float = 10.0,
        client: Client | None = None,
    ) -> None:
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1 or None, not {max_in_flight!r}")
        self._headers = make_headers(
            timeout=timeout, retries=retries, guarantee=guarantee, label=label
        )
        self._queue = queue
        self._own_client = client is None
        self._client = client if client is not None else Client(address, ack_timeout=ack_timeout)
        self._max_in_flight = max_in_flight
        self._lock = threading.Lock()
        self._in_flight = 0
        self._backlog: deque[Job] = deque()
        self._outstanding: set[Job] = set()
        self._shutdown = False

    @property
    def client(self) -> Client:
        """The client jobs go through."""
        return self._client

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> Job:
        """Schedule ``fn(*args, **kwargs)`` on a worker; return its future (a :class:`Job`).

        Raises :class:`RuntimeError` after :meth:`shutdown`, and
        :class:`TypeError` for a target or arguments that cannot be sent.
        """
        request = make_request(fn, args, kwargs, queue_for(fn, self._queue), self._headers)
        job = Job(request.msgid, request.queue)
        job._frames = request.to_frames()
        with self._lock:
            if self._shutdown:
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._client._check_usable()
            self._outstanding.add(job)
            send_now = self._max_in_flight is None or self._in_flight < self._max_in_flight
            if send_now:
                self._in_flight += 1
            else:
                job._held = True
                self._backlog.append(job)
        job.add_done_callback(self._on_done)
        if send_now:
            self._client._enqueue(job)
        return job

    def map(
        self,
        fn: Callable[..., Any],
        *iterables: Any,
        timeout: float | None = None,
        chunksize: int = 1,
    ) -> Any:
        """Like ``concurrent.futures.Executor.map``: results in order; ``timeout``
        (default ``None``) bounds the whole iteration; ``chunksize`` is ignored."""
        return super().map(fn, *iterables, timeout=timeout, chunksize=chunksize)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Refuse new work; optionally cancel what has not been sent and wait for the rest.

        ``wait`` (default ``True``) blocks until every submitted job is done;
        ``cancel_futures`` (default ``False``) cancels jobs still in the
        backlog (jobs already sent run to their end). Closes the client if the
        executor made it.
        """
        with self._lock:
            self._shutdown = True
            backlog = list(self._backlog) if cancel_futures else []
            if cancel_futures:
                self._backlog.clear()
        for job in backlog:
            job.cancel()
        if wait:
            with self._lock:
                outstanding = list(self._outstanding)
            futures.wait(outstanding)
        if self._own_client:
            self._client.close(timeout=None if wait else 0.0)

    def _on_done(self, job: futures.Future[Any]) -> None:
        # Runs on the client's I/O thread (or the cancelling thread): keep it short.
        release: list[Job] = []
        with self._lock:
            self._outstanding.discard(job)  # type: ignore[arg-type]
            if getattr(job, "_held", False):
                return  # cancelled in the backlog: it never took a slot
            self._in_flight -= 1
            # Cancelled jobs stay in the backlog until they reach its front (O(1) removal).
            while self._backlog:
                nxt = self._backlog.popleft()
                if not nxt.done():
                    nxt._held = False
                    self._in_flight += 1
                    release.append(nxt)
                    break
        for nxt in release:
            self._client._enqueue(nxt)
