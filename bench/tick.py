"""The job bodies every system runs, so that all of them do exactly the same work.

``noop`` returns a small value (some peers store nothing for ``None``, and a
client waiting for a result must have one to see). ``tick`` appends one byte
to a counter file: the drain of a fire-and-forget run is seen as that file
reaching N bytes, the same way for every system, whatever its broker can or
cannot report. The file is opened once per process, so a tick costs one
``write`` system call.
"""

from __future__ import annotations

import os
import time

_counters: dict[str, int] = {}


def noop() -> bool:
    return True


def tick(path: str, seconds: float = 0.0) -> None:
    """Sleep ``seconds`` (0: not at all), then append one byte to ``path``."""
    if seconds:
        time.sleep(seconds)
    fd = _counters.get(path)
    if fd is None:
        # O_APPEND makes concurrent one-byte writes from many processes add up exactly.
        fd = _counters[path] = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, b".")
