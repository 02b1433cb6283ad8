"""Huey with Redis: one consumer with worker processes."""

from __future__ import annotations

import os
from importlib import metadata
from typing import Any

from bench.systems.base import Adapter, Context
from bench.systems.shared import flush_redis


class HueyAdapter(Adapter):
    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        if not ctx.redis_url:
            raise RuntimeError("no Redis server for Huey")
        self.queue = f"{ctx.prefix}-huey"
        self.env = {"BENCH_QUEUE": self.queue, "BENCH_REDIS_URL": ctx.redis_url}
        os.environ.update(self.env)
        from bench.peers import huey_app

        self.app = huey_app

    def settings(self) -> dict[str, str]:
        return {
            "version": f"huey {metadata.version('huey')}",
            "broker": "Redis (RedisHuey defaults: blocking dequeue)",
            "worker": "`huey_consumer -k process -w SLOTS` (one consumer, worker processes)",
            "safety": "defaults",
            "client": "task(); results: Result.get(blocking=True) (default polling backoff)",
            "logging": "-q (warnings only)",
        }

    def start(self, slots: int) -> None:
        self.services.start(
            "huey-consumer",
            [
                self.script("huey_consumer"),
                "bench.peers.huey_app.huey",
                "-k",
                "process",
                "-w",
                str(slots),
                "-q",
            ],
            env=self.env,
        )
        self.slots = slots

    def stop(self) -> None:
        super().stop()
        flush_redis(self.ctx.redis_url)

    def send_tick(self, path: str, seconds: float) -> None:
        self.app.tick(path, seconds)

    def submit_noop(self) -> Any:
        return self.app.noop()

    def wait(self, handle: Any, timeout: float) -> Any:
        from huey.exceptions import ResultTimeout

        try:
            return handle.get(blocking=True, timeout=timeout)
        except ResultTimeout as exc:
            raise TimeoutError(str(exc)) from exc


ADAPTER = HueyAdapter
