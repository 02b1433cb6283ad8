"""Job functions that the loader, task and pool tests run.

Some are registered tasks, some plain functions reachable only through an
allow prefix, so tests can exercise both ways a job is resolved.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
import time
from os import system  # noqa: F401 - a re-exported name the loader must refuse
from pathlib import Path

from corral.tasks import task


@task
def add(a: int, b: int) -> int:
    """Registered with default options."""
    return a + b


@task(name="tests.custom-mul", queue="math", timeout=5, retries=2)
def mul(a: int, b: int) -> int:
    """Registered under a custom name with non-default options."""
    return a * b


def plain_add(a: int, b: int) -> int:
    """Not registered: runs only where ``tests`` is allowed."""
    return a + b


def fail() -> float:
    """Raises ZeroDivisionError."""
    return 1 / 0


def sleep(seconds: float) -> float:
    """Blocks in ``time.sleep``, which a time limit must still interrupt."""
    time.sleep(seconds)
    return seconds


def touch_and_sleep(path: str, seconds: float) -> float:
    """Creates ``path`` (so a test knows the job started), then sleeps."""
    Path(path).touch()
    time.sleep(seconds)
    return seconds


def stuck_in_c() -> bool:
    """Backtracks for ages inside the regex engine, holding the GIL."""
    return re.match(r"(a+)+$", "a" * 64 + "b") is not None


def crash(code: int = 3) -> None:
    """Ends the process at once, as a crash in C code would."""
    os._exit(code)


def segfault() -> None:
    """Dies of SIGSEGV by reading address 0."""
    ctypes.string_at(0)


def unserializable() -> object:
    """Returns something JSON cannot encode."""
    return object()


def noop() -> None:
    """Does nothing, to measure overhead."""


def getpid() -> int:
    """The pid of the process running the job."""
    return os.getpid()


def is_imported(module: str) -> bool:
    """Whether ``module`` has been imported in the process running the job."""
    return module in sys.modules


class Counter:
    """A class whose method a job can name as ``tests.jobs:Counter``."""

    def __init__(self, start: int = 0) -> None:
        self.start = start

    def add(self, n: int) -> int:
        return self.start + n

    def _secret(self) -> str:
        return "private"


def echo(value: object) -> object:
    """Returns its argument (large payloads exercise partial pipe writes)."""
    return value


@task
def stamp() -> float:
    """When it ran (wall clock), to check the order jobs ran in."""
    import time

    return time.time()


@task
def record(path: str, n: int) -> int:
    """Append ``n`` to ``path`` (one line per execution), to count how often a job ran."""
    import os

    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{n}\n".encode())
    finally:
        os.close(fd)
    return n


@task
def start_sleep_end(path: str, seconds: float) -> int:
    """Log ``start PID`` to ``path``, sleep, then log ``end PID``: who ran it, and who finished."""
    import os
    import time

    def note(word: str) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{word} {os.getpid()}\n".encode())
        finally:
            os.close(fd)

    note("start")
    time.sleep(seconds)
    note("end")
    return os.getpid()


@task
def chatter(n: int, every: int = 1, sleep: float = 0.0, fail: bool = False, pad: int = 0) -> int:
    """Put ``n`` log lines (``pad`` spaces longer) on the job's stream, progress every
    ``every``, then end."""
    import time

    from corral import runtime

    runtime.set_header({"phase": "chatting", "of": n})
    for i in range(n):
        runtime.log(f"line {i}" + " " * pad)
        if i % every == 0:
            runtime.progress(i + 1, n, "lines")
        if sleep:
            time.sleep(sleep)
    runtime.emit({"said": n})
    if fail:
        raise ValueError("chatter failed on purpose")
    return n


@task
def chatter_until(path: str, pause: float = 0.01) -> int:
    """Log one numbered line every ``pause`` s until ``path`` exists; return how many."""
    import os
    import time

    from corral import runtime

    i = 0
    while not os.path.exists(path):
        runtime.log(f"tick {i}")
        i += 1
        time.sleep(pause)
    return i


@task
def loud(n: int) -> int:
    """Print and log through ``logging`` (captured with --capture-output)."""
    import logging

    for i in range(n):
        print(f"printed {i}")
        logging.getLogger("tests.loud").warning("logged %d", i)
    return n


@task
def headers(n: int, pause: float = 0.01) -> int:
    """Call ``set_header({"i": i})`` for i in 0..n-1, ``pause`` s apart (so that
    each is sent on its own rather than coalesced with the next), then end."""
    from corral import runtime

    for i in range(n):
        runtime.set_header({"i": i})
        time.sleep(pause)
    return n
