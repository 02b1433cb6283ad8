"""The Celery app the benchmark runs: ``celery -A bench.peers.celery_app worker``.

Safe settings as Celery recommends them for work that must not be lost:
``task_acks_late`` and ``worker_prefetch_multiplier = 1``. Remote control is
off so that nothing but the benchmark's own queue is created on the broker.
"""

from __future__ import annotations

import os

from celery import Celery

from bench import tick as jobs

QUEUE = os.environ["BENCH_QUEUE"]

app = Celery(
    "corral_bench",
    broker=os.environ["BENCH_CELERY_BROKER"],
    backend=os.environ["BENCH_CELERY_BACKEND"],
)
app.conf.update(
    task_acks_late=True,
    worker_prefetch_multiplier=1,
    task_default_queue=QUEUE,
    task_default_exchange=QUEUE,
    task_default_routing_key=QUEUE,
    worker_enable_remote_control=False,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)


@app.task(name="bench.tick", ignore_result=True)
def tick(path: str, seconds: float = 0.0) -> None:
    jobs.tick(path, seconds)


@app.task(name="bench.noop")
def noop() -> bool:
    return jobs.noop()
