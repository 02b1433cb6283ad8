"""The Huey instance the benchmark runs: ``huey_consumer bench.peers.huey_app.huey``.

``RedisHuey`` with its defaults: the consumer blocks on the queue (BRPOP)
rather than polling, and a client waiting for a result polls for it with
Huey's default backoff (``notify_result`` is off by default).
"""

from __future__ import annotations

import os

from huey import RedisHuey

from bench import tick as jobs

huey = RedisHuey(os.environ["BENCH_QUEUE"], url=os.environ["BENCH_REDIS_URL"])


@huey.task(name="bench_tick")
def tick(path: str, seconds: float = 0.0) -> None:
    jobs.tick(path, seconds)


@huey.task(name="bench_noop")
def noop() -> bool:
    return jobs.noop()
