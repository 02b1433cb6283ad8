"""What every system adapter has: its services, where it works, and the calls the drivers make."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from bench.procs import Services


class Context:
    """Where a runner works and which shared services it may use."""

    def __init__(self, workdir: Path, options: dict[str, str]) -> None:
        self.workdir = workdir
        self.options = options
        #: ``redis://127.0.0.1:PORT/0`` of the benchmark's own redis-server, or None.
        self.redis_url = os.environ.get("BENCH_REDIS_URL") or None
        #: ``amqp://guest:guest@127.0.0.1:5672//`` when RabbitMQ is reachable, or None.
        self.amqp_url = os.environ.get("BENCH_AMQP_URL") or None
        #: Prefix for every queue/exchange name created on the shared RabbitMQ.
        self.prefix = os.environ.get("BENCH_PREFIX", f"corral-bench-{os.getpid()}")


class Adapter:
    """Base class: starts and stops one system; subclasses fill in the job calls."""

    #: Why results cannot be fetched from this system (None: they can).
    no_results: str | None = None

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.services = Services(ctx.workdir / "logs")
        self.slots = 0

    @property
    def python(self) -> str:
        return sys.executable

    def script(self, name: str) -> str:
        """A console script installed next to this interpreter (celery, rq, ...)."""
        return str(Path(sys.executable).parent / name)

    def settings(self) -> dict[str, str]:
        raise NotImplementedError

    def start(self, slots: int) -> None:
        """Start the system with ``slots`` execution slots; return once it accepts jobs."""
        raise NotImplementedError

    def stop(self) -> None:
        """Stop every process and empty what this system queued in shared services."""
        self.services.stop()
        self.slots = 0

    def close(self) -> None:
        """Stop, then remove everything this system created in shared services."""
        self.stop()

    def check(self) -> None:
        self.services.check()

    def send_tick(self, path: str, seconds: float) -> None:
        raise NotImplementedError

    def submit_noop(self) -> Any:
        raise NotImplementedError

    def wait(self, handle: Any, timeout: float) -> Any:
        raise NotImplementedError

    def call_noop(self, timeout: float) -> Any:
        """Submit and wait: what a peer's synchronous client does for one call."""
        return self.wait(self.submit_noop(), timeout)
