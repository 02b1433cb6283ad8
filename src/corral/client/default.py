"""The process-wide client that ``Task.delay`` and friends use."""

from __future__ import annotations

import atexit
import os
import threading

from corral.client.sync import Client, close_all_clients

_lock = threading.Lock()
_client: Client | None = None


def default_client() -> Client:
    """The process's shared :class:`Client`, created on first use.

    It connects to ``$CORRAL_BROKER`` (default ``tcp://127.0.0.1:47291``).
    Creation is thread-safe; a forked child gets a fresh client of its own;
    a closed one is replaced. At interpreter exit every open client is
    closed, which waits (up to its ``ack_timeout``) for the broker to
    acknowledge jobs already submitted, so ``task.delay(...)`` right before
    exiting is not lost.
    """
    global _client
    client = _client
    if client is not None and not client.closed:
        return client
    with _lock:
        if _client is None or _client.closed:
            _client = Client()
        return _client


def _reset_after_fork() -> None:
    global _client, _lock
    # The parent's client has no I/O thread here, and the lock may have been held at fork.
    _client = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_reset_after_fork)
atexit.register(close_all_clients)
