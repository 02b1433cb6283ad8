"""Submission options and the REQUEST they turn into (shared by every client flavour)."""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from corral.client.target import encode_call
from corral.protocol import DEFAULT_FRONTEND, DEFAULT_QUEUE, Headers, Request, new_msgid

#: Environment variable naming the broker's frontend when no address is given.
BROKER_ENV = "CORRAL_BROKER"


def broker_address(address: str | None) -> str:
    """``address``, else ``$CORRAL_BROKER``, else EventMQ's ``tcp://127.0.0.1:47291``."""
    return address or os.environ.get(BROKER_ENV) or DEFAULT_FRONTEND


def queue_for(target: Any, queue: str | None) -> str:
    """The queue to use: ``queue`` if given, else a task's own ``queue``, else ``default``."""
    if queue is not None:
        return queue
    if hasattr(target, "fn"):
        own = getattr(target, "queue", None)
        if isinstance(own, str) and own:
            return own
    return DEFAULT_QUEUE


def make_headers(
    *,
    timeout: float | None = None,
    retries: int = 0,
    guarantee: bool = False,
    label: str | None = None,
    extra: Sequence[str] = (),
    after: Iterable[Any] = (),
    reply: bool = True,
) -> Headers:
    """Headers for a REQUEST; its outcome comes back to the submitter unless ``reply`` is off.

    ``timeout`` seconds (default ``None``: no limit) becomes ``timeout:N``;
    ``retries`` (default 0) becomes ``retry-count:N``; ``guarantee`` (default
    off) the ``guarantee`` flag; ``label`` (default none) a ``label:...`` token;
    ``extra`` (default none) are further raw tokens passed through unchanged;
    ``after`` (default none) are jobs (or their ids) that must succeed first,
    each an ``after:ID`` token; ``reply`` (default on) asks for the outcome
    (``reply-requested``). Raises :class:`ValueError` for values the broker
    would refuse.
    """
    if timeout is not None:
        timeout = float(timeout)
        if not (0 <= timeout < math.inf):
            raise ValueError(f"timeout must be a finite number of seconds >= 0, not {timeout!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise ValueError(f"retries must be an integer >= 0, not {retries!r}")
    tokens: list[str] = []
    if label is not None:
        tokens.append(f"label:{_token(label, 'label')}")
    if isinstance(after, str) or hasattr(after, "id"):
        after = [after]  # one job on its own
    for dep in after:
        tokens.append(f"after:{_token(getattr(dep, 'id', dep), 'a job id in after')}")
    tokens.extend(_token(t, "header") for t in extra)
    return Headers(
        reply_requested=bool(reply),
        guarantee=bool(guarantee),
        retry_count=retries,
        timeout=timeout or 0.0,
        extra=tuple(tokens),
    )


def make_request(
    target: Any, args: Iterable[Any], kwargs: Mapping[str, Any] | None, queue: str, headers: Headers
) -> Request:
    """A REQUEST with a fresh MSGID (which is also the job's id)."""
    if not isinstance(queue, str) or not (0 < len(queue) <= 256) or not queue.isprintable():
        raise ValueError(f"queue must be 1-256 printable characters, not {queue!r}")
    body = encode_call(target, args, kwargs)
    return Request(new_msgid(), queue, headers, body)


def _token(value: str, what: str) -> str:
    if not isinstance(value, str) or not value or "," in value or not value.isprintable():
        raise ValueError(f"{what} must be non-empty printable text without commas, not {value!r}")
    return value
