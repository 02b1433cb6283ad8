"""Jobs the stream benchmark runs (imported by its worker)."""

from __future__ import annotations

import os
import time

from corral import runtime
from corral.tasks import task


def _wait_for(path: str) -> None:
    while not os.path.exists(path):
        time.sleep(0.001)


@task
def burst(n: int, start: str) -> dict[str, float]:
    """Once ``start`` exists, put ``n`` log lines on the stream as fast as possible."""
    _wait_for(start)
    t0 = time.perf_counter()
    for i in range(n):
        runtime.log(f"message {i}")
    return {"seconds": time.perf_counter() - t0}


@task
def paced(n: int, interval: float, start: str) -> int:
    """Once ``start`` exists, put ``n`` log lines ``interval`` seconds apart (each is timed)."""
    _wait_for(start)
    for i in range(n):
        runtime.log(f"message {i}")
        time.sleep(interval)
    return n
