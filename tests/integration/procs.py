"""Start corral's own processes (broker, worker, up) on free loopback ports, and stop them.

Every process gets its own process group and its output in a file; stopping
kills the whole group, so a failing test leaves no pool processes behind.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from corral.admin import AdminError, admin_request

ROOT = Path(__file__).resolve().parents[2]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


#: Ports the tests bind come from below the kernel's ephemeral range: a port the
#: kernel hands out can be taken by any outgoing connection (another test's client)
#: between the moment it is picked here and the moment a broker binds it.
_LOW, _HIGH = 20000, max(20001, min(_ephemeral_range()[0], 32768))
_picked: set[int] = set()


def free_addr() -> str:
    """A loopback address nothing listens on, not from the ephemeral range."""
    for _ in range(1000):
        port = random.randrange(_LOW, _HIGH)
        if port in _picked:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _picked.add(port)
        return f"tcp://127.0.0.1:{port}"
    raise RuntimeError("no free loopback port found")


def wait_for(
    predicate: Callable[[], Any],
    timeout: float = 15.0,
    interval: float = 0.02,
    what: str = "condition",
    procs: Sequence[Proc] = (),
) -> Any:
    """Poll ``predicate`` until it returns something truthy or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for proc in procs:
            if not proc.alive:
                raise AssertionError(f"{proc.name} exited early:\n{proc.output()}")
        if time.monotonic() > deadline:
            details = "\n".join(f"--- {p.name}\n{p.output()}" for p in procs)
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{details}")
        time.sleep(interval)


@dataclass
class Proc:
    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
            start_new_session=True,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def output(self, tail: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""

    def send_signal(self, sig: int) -> None:
        if self.alive:
            os.kill(self.pid, sig)

    def kill_group(self, sig: int = signal.SIGKILL) -> None:
        if self.popen is None:
            return
        try:
            os.killpg(self.popen.pid, sig)
        except ProcessLookupError:
            pass

    def wait(self, timeout: float) -> int | None:
        assert self.popen is not None
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM, then SIGKILL the whole group after ``grace`` seconds."""
        if self.popen is None:
            return
        if self.alive:
            self.send_signal(signal.SIGTERM)
            if self.wait(grace) is None:
                self.kill_group(signal.SIGKILL)
                self.wait(5)
        self.kill_group(signal.SIGKILL)  # stray children (pool processes)
        self._log.close()


@dataclass
class BrokerAddrs:
    frontend: str = field(default_factory=free_addr)
    backend: str = field(default_factory=free_addr)
    admin: str = field(default_factory=free_addr)
    notify: str = field(default_factory=free_addr)
    streams: str = field(default_factory=free_addr)

    def args(self) -> list[str]:
        return [
            "--frontend",
            self.frontend,
            "--backend",
            self.backend,
            "--admin",
            self.admin,
            "--notify",
            self.notify,
            "--streams",
            self.streams,
        ]


def corral_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "corral", *args]


def broker_refuses_to_start(data_dir: Path, *extra: str) -> str:
    """Run a broker that must exit at once with a clear message; return that message.

    Its ports are fresh, so only what is wrong with ``data_dir`` can stop it.
    """
    addrs = BrokerAddrs()
    out = subprocess.run(
        corral_cmd(
            "broker",
            "--data-dir",
            str(data_dir),
            "--frontend",
            addrs.frontend,
            "--backend",
            addrs.backend,
            "--admin",
            addrs.admin,
            "--notify",
            "",
            *extra,
        ),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode != 0, f"the broker started:\n{out.stderr}"
    assert "Traceback" not in out.stderr, out.stderr
    return out.stderr


class Cluster:
    """A set of corral processes for one test; :meth:`close` stops them all."""

    def __init__(self, tmp: Path, heartbeat: float = 0.5) -> None:
        self.tmp = tmp
        self.addrs = BrokerAddrs()
        self.heartbeat = heartbeat
        self.procs: list[Proc] = []
        #: Keys the test's own admin requests use, for a broker with --keys.
        self.admin_keys: str | None = None

    def start(self, name: str, args: Sequence[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(name, list(args), self.tmp / f"{name}-{len(self.procs)}.log", env or {})
        self.procs.append(proc.start())
        return proc

    def broker(self, *extra: str) -> Proc:
        proc = self.start(
            "broker",
            corral_cmd(
                "broker",
                *self.addrs.args(),
                "--heartbeat",
                str(self.heartbeat),
                "--data-dir",
                str(self.tmp / "data"),
                *extra,
            ),
        )
        wait_for(lambda: self.status(timeout=0.3), what="broker to answer STATUS", procs=[proc])
        return proc

    def worker(
        self,
        *extra: str,
        concurrency: int = 2,
        wait: bool = True,
        imports: Sequence[str] = ("tests.jobs",),
        env: dict[str, str] | None = None,
    ) -> Proc:
        args = [
            "worker",
            "--backend",
            self.addrs.backend,
            "--heartbeat",
            str(self.heartbeat),
            "-c",
            str(concurrency),
        ]
        for mod in imports:
            args += ["--import", mod]
        before = self.worker_count()
        proc = self.start("worker", corral_cmd(*args, *extra), env=env)
        if wait:
            wait_for(
                lambda: self.free_slots() >= concurrency and self.worker_count() > before,
                what="worker to register and offer its slots",
                procs=[proc],
            )
        return proc

    def status(self, timeout: float = 2.0) -> dict[str, Any] | None:
        try:
            return admin_request("STATUS", self.addrs.admin, timeout=timeout, keys=self.admin_keys)
        except AdminError:
            return None

    def workers(self, timeout: float = 2.0) -> dict[str, Any]:
        try:
            return admin_request(
                "ROUTER_SHOW_WORKERS", self.addrs.admin, timeout=timeout, keys=self.admin_keys
            )
        except AdminError:
            return {"connected_workers": {}, "connected_queues": {}}

    def worker_count(self) -> int:
        return len(self.workers()["connected_workers"])

    def free_slots(self) -> int:
        return sum(w["available_slots"] for w in self.workers()["connected_workers"].values())

    def output(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log_path.name})\n{p.output()}" for p in self.procs)

    def close(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
