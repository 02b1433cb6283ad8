"""Celery with Redis or RabbitMQ as its broker; results in Redis either way."""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any

from bench.systems.base import Adapter, Context
from bench.systems.shared import delete_amqp, flush_redis


class CeleryAdapter(Adapter):
    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.kind = ctx.options["broker"]
        self.queue = f"{ctx.prefix}-celery"
        # Results go to Redis with either broker, as for Dramatiq: Celery's rpc://
        # backend slowed each submit to milliseconds with thousands of results pending.
        broker = ctx.redis_url if self.kind == "redis" else ctx.amqp_url
        backend = ctx.redis_url
        if not broker or not backend:
            raise RuntimeError(f"no {self.kind} server for Celery")
        self.env = {
            "BENCH_QUEUE": self.queue,
            "BENCH_CELERY_BROKER": broker,
            "BENCH_CELERY_BACKEND": backend or "",
        }
        os.environ.update(self.env)  # the client side imports the same app
        from bench.peers import celery_app

        self.app = celery_app

    def settings(self) -> dict[str, str]:
        broker = "Redis" if self.kind == "redis" else "RabbitMQ"
        return {
            "version": f"celery {metadata.version('celery')}, kombu {metadata.version('kombu')}",
            "broker": f"{broker}; results: Redis",
            "worker": "`celery worker --pool prefork --concurrency SLOTS` --without-gossip "
            "--without-mingle --without-heartbeat, remote control off",
            "safety": "task_acks_late=True, worker_prefetch_multiplier=1",
            "jobs": "tick: ignore_result=True; noop: result stored",
            "client": "task.delay(); results: AsyncResult.get()",
            "logging": "--loglevel WARNING",
        }

    def start(self, slots: int) -> None:
        self.services.start(
            "celery-worker",
            [
                self.script("celery"),
                "-A",
                "bench.peers.celery_app",
                "worker",
                "--pool",
                "prefork",
                "--concurrency",
                str(slots),
                "-Q",
                self.queue,
                "-n",
                f"{self.queue}@%h",
                "--without-gossip",
                "--without-mingle",
                "--without-heartbeat",
                "--loglevel",
                "WARNING",
            ],
            env=self.env,
        )
        self.slots = slots

    def stop(self) -> None:
        super().stop()
        flush_redis(self.ctx.redis_url)
        if self.kind == "rabbitmq":
            delete_amqp(self.ctx.amqp_url, [self.queue], purge=True)

    def close(self) -> None:
        super().close()
        if self.kind == "rabbitmq":
            delete_amqp(self.ctx.amqp_url, [self.queue], [self.queue])

    def send_tick(self, path: str, seconds: float) -> None:
        self.app.tick.delay(path, seconds)

    def submit_noop(self) -> Any:
        return self.app.noop.delay()

    def wait(self, handle: Any, timeout: float) -> Any:
        from celery.exceptions import TimeoutError as CeleryTimeout

        try:
            return handle.get(timeout=timeout)
        except CeleryTimeout as exc:
            raise TimeoutError(str(exc)) from exc


ADAPTER = CeleryAdapter
