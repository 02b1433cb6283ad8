"""RQ with Redis: SLOTS separate ``rq worker`` processes, RQ's default worker class.

The default worker forks a "work horse" process for every job, which is what
keeps one job from affecting the next, and what sets RQ's pace.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from bench.systems.base import Adapter, Context
from bench.systems.shared import flush_redis


class RqAdapter(Adapter):
    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        if not ctx.redis_url:
            raise RuntimeError("no Redis server for RQ")
        from redis import Redis
        from rq import Queue

        self.redis = Redis.from_url(ctx.redis_url)
        self.queue = Queue(f"{ctx.prefix}-rq", connection=self.redis)

    def settings(self) -> dict[str, str]:
        return {
            "version": f"rq {metadata.version('rq')}",
            "broker": "Redis",
            "worker": "SLOTS x `rq worker` (default Worker: one forked work horse per job)",
            "safety": "defaults",
            "jobs": "tick: enqueue(..., result_ttl=0) (keeps no result); noop: result kept",
            "client": "queue.enqueue(); results: job.latest_result(timeout) (blocking read)",
            "logging": "--logging_level WARNING",
        }

    def start(self, slots: int) -> None:
        for i in range(slots):
            self.services.start(
                f"rq-worker-{i}",
                [
                    self.script("rq"),
                    "worker",
                    "--url",
                    self.ctx.redis_url or "",
                    "--logging_level",
                    "WARNING",
                    "--name",
                    f"{self.queue.name}-{i}",
                    self.queue.name,
                ],
            )
        self.slots = slots

    def stop(self) -> None:
        super().stop()
        flush_redis(self.ctx.redis_url)

    def close(self) -> None:
        super().close()
        self.redis.close()

    def send_tick(self, path: str, seconds: float) -> None:
        self.queue.enqueue("bench.tick.tick", path, seconds, result_ttl=0)

    def submit_noop(self) -> Any:
        return self.queue.enqueue("bench.tick.noop")

    def wait(self, handle: Any, timeout: float) -> Any:
        # RQ blocks in whole seconds; 0 would mean "do not block at all".
        result = handle.latest_result(timeout=max(1, int(timeout)))
        if result is None:
            raise TimeoutError("no result in time")
        if result.type != result.Type.SUCCESSFUL:
            raise RuntimeError(f"RQ job ended {result.type}: {result.exc_string}")
        return result.return_value


ADAPTER = RqAdapter
