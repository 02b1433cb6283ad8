"""The Dramatiq actors the benchmark runs: ``dramatiq bench.peers.dramatiq_app``.

Dramatiq's defaults (its default middleware: retries, time limits, age
limits...), plus the Results middleware for the no-op job whose result the
client fetches. Dramatiq keeps results only in Redis or Memcached, so results
go to the benchmark's Redis whichever broker carries the messages.
"""

from __future__ import annotations

import os

import dramatiq
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from bench import tick as jobs

QUEUE = os.environ["BENCH_QUEUE"]
REDIS_URL = os.environ["BENCH_REDIS_URL"]

if os.environ["BENCH_DRAMATIQ_BROKER"] == "rabbitmq":
    from dramatiq.brokers.rabbitmq import RabbitmqBroker

    broker: dramatiq.Broker = RabbitmqBroker(url=os.environ["BENCH_AMQP_URL"])
else:
    from dramatiq.brokers.redis import RedisBroker

    broker = RedisBroker(url=REDIS_URL)

broker.add_middleware(Results(backend=RedisBackend(url=REDIS_URL)))
dramatiq.set_broker(broker)


@dramatiq.actor(queue_name=QUEUE, actor_name="bench_tick")
def tick(path: str, seconds: float = 0.0) -> None:
    jobs.tick(path, seconds)


@dramatiq.actor(queue_name=QUEUE, actor_name="bench_noop", store_results=True)
def noop() -> bool:
    return jobs.noop()
