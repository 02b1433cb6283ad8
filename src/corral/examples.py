"""Small tasks that `corral up` allows out of the box, so a first job just works.

corral submit corral.examples:add 2 3 --wait
"""

from __future__ import annotations

import time

from corral.tasks import task


@task
def add(a: float, b: float) -> float:
    return a + b


@task
def noop(*args: object, **kwargs: object) -> None:
    return None


@task
def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


@task
def echo(*args: object, **kwargs: object) -> dict[str, object]:
    return {"args": list(args), "kwargs": kwargs}


@task
def fail(message: str = "this job fails on purpose") -> None:
    raise RuntimeError(message)


@task
def count(n: int = 10, delay: float = 0.2) -> int:
    """Count to ``n``, publishing progress, a log line and a partial result at each step.

    corral submit corral.examples:count 20     then     corral tail JOB_ID
    """
    from corral import runtime

    for i in range(1, n + 1):
        time.sleep(delay)
        runtime.progress(i, n, "steps")
        runtime.log(f"step {i} of {n}")
        runtime.emit(i * i)
    return n
