"""corral: one broker (SQLite store by default, or ``--store memory://``) and one worker."""

from __future__ import annotations

from importlib import metadata
from typing import Any

import corral
from bench.procs import LOOPBACK, free_port, wait_until
from bench.systems.base import Adapter, Context
from corral.admin import AdminError, admin_request

TICK = "bench.tick:tick"
NOOP = "bench.tick:noop"


class CorralAdapter(Adapter):
    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx)
        self.store = ctx.options.get("store")
        #: CURVE on every socket: the broker's key directory, its worker and client bundles.
        self.curve = bool(ctx.options.get("curve"))
        self.keys: dict[str, str | None] = {"broker": None, "worker": None, "client": None}
        self.client: corral.Client | None = None
        self.addrs: dict[str, str] = {}

    def settings(self) -> dict[str, str]:
        return {
            "version": f"corral {metadata.version('corral')}",
            "broker": "corral broker, "
            + (f"--store {self.store}" if self.store else "SQLite store (WAL, group commit)")
            + (", --keys (CURVE on every socket, a worker and a client key)" if self.curve else ""),
            "worker": "one `corral worker -c SLOTS` (process pool), default prefetch (per "
            "process as many jobs as run in 5 ms, 1 to 16; taken back for an idle process "
            "elsewhere)",
            "jobs": "bench.tick functions allowed with --allow bench.tick",
            "client": "corral.Client; throughput/mixed: submit_with(reply=False); "
            "results: submit(), Job.result(); latency: call()",
            "logging": "--log-level warning",
        }

    def start(self, slots: int) -> None:
        self.addrs = {
            name: f"tcp://{LOOPBACK}:{free_port()}" for name in ("frontend", "backend", "admin")
        }
        data = self.ctx.workdir / "corral-data"
        if self.curve:
            self._make_keys()
        broker_keys = ["--keys", self.keys["broker"]] if self.keys["broker"] else []
        worker_keys = ["--keys", self.keys["worker"]] if self.keys["worker"] else []
        broker = [
            self.python,
            "-m",
            "corral",
            "broker",
            "--frontend",
            self.addrs["frontend"],
            "--backend",
            self.addrs["backend"],
            "--admin",
            self.addrs["admin"],
            "--notify",
            "",
            "--streams",
            f"tcp://{LOOPBACK}:{free_port()}",
            "--data-dir",
            str(data),
            "--log-level",
            "warning",
            *broker_keys,
        ]
        if self.store:
            broker += ["--store", self.store]
        b = self.services.start("corral-broker", broker)
        wait_until(self._status, 30, "corral broker answering STATUS", procs=[b])
        w = self.services.start(
            "corral-worker",
            [
                self.python,
                "-m",
                "corral",
                "worker",
                "--backend",
                self.addrs["backend"],
                "-c",
                str(slots),
                "--allow",
                "bench.tick",
                "--log-level",
                "warning",
                *worker_keys,
            ],
        )
        wait_until(lambda: self._free_slots() >= slots, 60, "corral worker's slots", procs=[b, w])
        self.client = corral.Client(
            self.addrs["frontend"], ack_timeout=60, keys=self.keys["client"]
        )
        self.slots = slots

    def _make_keys(self) -> None:
        from corral.security.keys import add_peer, init_keys

        directory = self.ctx.workdir / "corral-keys"
        if not (directory / "broker.key_secret").exists():
            init_keys(str(directory))
        self.keys = {
            "broker": str(directory),
            "worker": add_peer(str(directory), "bench-worker", ["worker"]),
            "client": add_peer(str(directory), "bench-client", ["client"]),
        }

    def _status(self) -> Any:
        try:
            return admin_request(
                "STATUS", self.addrs["admin"], timeout=0.3, keys=self.keys["broker"]
            )
        except AdminError:
            return None

    def _free_slots(self) -> int:
        try:
            shown = admin_request(
                "ROUTER_SHOW_WORKERS", self.addrs["admin"], timeout=0.5, keys=self.keys["broker"]
            )
        except AdminError:
            return 0
        return sum(w["available_slots"] for w in shown["connected_workers"].values())

    def stop(self) -> None:
        if self.client is not None:
            self.client.close(timeout=1)
            self.client = None
        super().stop()

    def send_tick(self, path: str, seconds: float) -> None:
        assert self.client is not None
        self.client.submit_with(TICK, (path, seconds), reply=False)

    def submit_noop(self) -> Any:
        assert self.client is not None
        return self.client.submit_with(NOOP)

    def wait(self, handle: Any, timeout: float) -> Any:
        return handle.result(timeout)  # raises TimeoutError (concurrent.futures' is the same)

    def call_noop(self, timeout: float) -> Any:
        assert self.client is not None
        return self.client.call(NOOP, result_timeout=timeout)


ADAPTER = CorralAdapter
