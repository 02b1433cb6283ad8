"""EventMQ 0.3.13: one ``emq-router`` and one ``emq-jobmanager`` with SLOTS processes.

Its client, ``defer_job``, sends a REQUEST and reads nothing back, and its
router drops the job managers' REPLYs, so no result can be fetched: the
``results`` and ``latency`` workloads are reported as unsupported.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

from bench.procs import ROOT, wait_until
from bench.systems.base import Adapter, Context


class EventMqAdapter(Adapter):
    no_results = "EventMQ's router drops job results: a client cannot fetch them"

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        from tests.integration import emq

        self.emq = emq
        self.sender: Any = None

    def settings(self) -> dict[str, str]:
        return {
            "version": f"eventmq {metadata.version('eventmq')}",
            "broker": "emq-router (no WAL)",
            "worker": "one emq-jobmanager, concurrent_jobs=SLOTS (processes), "
            "default max_job_count (a process is replaced after 1024 jobs)",
            "client": "eventmq.client.messages.defer_job on a Sender (unbounded send queue)",
            "logging": "defaults",
        }

    def start(self, slots: int) -> None:
        emq = self.emq
        addrs = emq.EmqAddrs.fresh()
        directory = self.ctx.workdir / "eventmq"
        config = emq.write_config(directory, addrs, concurrent_jobs=slots)
        env = {
            "EVENTMQ_CONFIG_FILE": str(config),
        }
        router = self.services.start(
            "emq-router", [self.python, str(emq.emq_script("emq-router"))], env=env
        )
        wait_until(
            lambda: emq.router_status(addrs.admin, timeout=0.3) is not None,
            30,
            "emq-router answering STATUS",
            procs=[router],
        )
        jm = self.services.start(
            "emq-jobmanager",
            [self.python, str(emq.emq_script("emq-jobmanager"))],
            env={**env, "PYTHONPATH": str(ROOT)},
        )
        # The job manager forks its processes on the router's first HEARTBEAT (3 s).
        wait_until(
            lambda: emq.free_slots(addrs.admin) >= slots,
            60,
            f"{slots} READY slots",
            interval=0.05,
            procs=[router, jm],
        )
        self._sender_cm = emq.emq_sender(addrs.frontend, linger_ms=0)
        self.sender = self._sender_cm.__enter__()
        self.slots = slots

    def stop(self) -> None:
        if self.sender is not None:
            self._sender_cm.__exit__(None, None, None)
            self.sender = None
        super().stop()

    def send_tick(self, path: str, seconds: float) -> None:
        self.emq.submit_job(self.sender, "bench.tick.tick", args=[path, seconds])


ADAPTER = EventMqAdapter
