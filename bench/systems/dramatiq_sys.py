"""Dramatiq with RabbitMQ or Redis as its broker (results in Redis either way)."""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any

from bench.systems.base import Adapter, Context
from bench.systems.shared import delete_amqp, flush_redis, pika_url

#: Dramatiq's worker threads per process (its default).
THREADS = 8


class DramatiqAdapter(Adapter):
    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.kind = ctx.options["broker"]
        # Dramatiq allows only letters, digits, '.', '_' and '-' in queue names.
        self.queue = f"{ctx.prefix}-dramatiq"
        if not ctx.redis_url or (self.kind == "rabbitmq" and not ctx.amqp_url):
            raise RuntimeError(f"no {self.kind} server for Dramatiq")
        self.env = {
            "BENCH_QUEUE": self.queue,
            "BENCH_DRAMATIQ_BROKER": self.kind,
            "BENCH_REDIS_URL": ctx.redis_url,
            "BENCH_AMQP_URL": pika_url(ctx.amqp_url or ""),
        }
        os.environ.update(self.env)
        from bench.peers import dramatiq_app

        self.app = dramatiq_app

    def settings(self) -> dict[str, str]:
        broker = "RabbitMQ" if self.kind == "rabbitmq" else "Redis"
        return {
            "version": f"dramatiq {metadata.version('dramatiq')}",
            "broker": f"{broker}; results: Redis (Results middleware)",
            "worker": f"`dramatiq --processes 2 --threads {THREADS}` (defaults: one process "
            "per core, 8 threads); mixed: --threads 4 (2 x 4 = 8 slots)",
            "safety": "defaults (messages acked after the actor ran)",
            "client": "actor.send(); results: message.get_result(block=True)",
            "logging": "default (nothing per job)",
        }

    def start(self, slots: int) -> None:
        # Two processes as everyone else; threads are Dramatiq's default unless the
        # workload fixes the number of slots.
        threads = THREADS if slots == 2 else max(1, slots // 2)
        self.services.start(
            "dramatiq-worker",
            [
                self.script("dramatiq"),
                "bench.peers.dramatiq_app",
                "--processes",
                "2",
                "--threads",
                str(threads),
                "--queues",
                self.queue,
            ],
            env=self.env,
        )
        self.slots = slots

    def stop(self) -> None:
        super().stop()
        flush_redis(self.ctx.redis_url)
        if self.kind == "rabbitmq":
            delete_amqp(self.ctx.amqp_url, self._queues(), purge=True)

    def close(self) -> None:
        super().close()
        if self.kind == "rabbitmq":
            delete_amqp(self.ctx.amqp_url, self._queues())
        self.app.broker.close()

    def _queues(self) -> list[str]:
        return [self.queue, f"{self.queue}.DQ", f"{self.queue}.XQ"]

    def send_tick(self, path: str, seconds: float) -> None:
        self.app.tick.send(path, seconds)

    def submit_noop(self) -> Any:
        return self.app.noop.send()

    def wait(self, handle: Any, timeout: float) -> Any:
        from dramatiq.results import ResultTimeout

        try:
            return handle.get_result(block=True, timeout=max(1, int(timeout * 1000)))
        except ResultTimeout as exc:
            raise TimeoutError(str(exc)) from exc


ADAPTER = DramatiqAdapter
