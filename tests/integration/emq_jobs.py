"""Jobs that EventMQ (and corral) worker processes run in integration tests and benches.

Workers import these by dotted path (``emq_jobs.write_marker``), so this module must
stay importable on its own: standard library only, no test-suite imports.
Their effects are files because a worker runs in another process and EventMQ's
router never hands results back to the submitter.
"""

from __future__ import annotations

import os
import time


def write_marker(path: str, content: str = "done") -> str:
    """Create ``path`` atomically so a poller never sees a half-written file."""
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(content)
    os.replace(tmp, path)
    return content


def tick(path: str) -> None:
    """Append one byte to ``path``: the file size counts executed jobs.

    O_APPEND writes this small are atomic, so concurrent worker processes can
    share the file without losing counts.
    """
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, b".")
    finally:
        os.close(fd)


def noop() -> None:
    return None


def add(a: float, b: float) -> float:
    return a + b


def echo(*args: object, **kwargs: object) -> dict[str, object]:
    return {"args": list(args), "kwargs": kwargs}


class Greeter:
    """For ``pkg.mod:Class`` paths: the worker builds ``Greeter(*class_args)`` first."""

    def __init__(self, greeting: str = "hello") -> None:
        self.greeting = greeting

    def greet(self, name: str, path: str | None = None) -> str:
        text = f"{self.greeting} {name}"
        if path:
            write_marker(path, text)
        return text


def sleep(seconds: float, path: str | None = None) -> float:
    """Run for ``seconds`` (time limits, busy slots); mark ``path`` when done."""
    time.sleep(seconds)
    if path:
        write_marker(path, str(seconds))
    return seconds


def fail(message: str = "boom") -> None:
    raise RuntimeError(message)
