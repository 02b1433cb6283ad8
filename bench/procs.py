"""Processes the benchmark starts: each in its own process group, each group recorded.

Every service (a broker, a worker, redis-server) is started with
``start_new_session`` so that killing its group also kills the pool processes
it forked. Each group id is appended to the file named by ``$BENCH_PGID_FILE``
before anything else happens, so the orchestrator can kill whatever a runner
left behind even when the runner itself was killed with SIGKILL.

Standard library only: this module runs in corral's environment and in the
peers' one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

#: The repository root: put on PYTHONPATH so workers can import ``bench.tick``.
ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
PGID_FILE_ENV = "BENCH_PGID_FILE"


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_until(
    predicate: Callable[[], Any],
    timeout: float,
    what: str,
    *,
    interval: float = 0.02,
    procs: Sequence[Service] = (),
) -> Any:
    """Poll ``predicate`` until it is truthy; fail early when one of ``procs`` died."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        for proc in procs:
            if not proc.alive:
                raise RuntimeError(f"{proc.name} exited while waiting for {what}:\n{proc.tail()}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not within {timeout:.0f} s")
        time.sleep(interval)


def record_group(pgid: int) -> None:
    path = os.environ.get(PGID_FILE_ENV)
    if path:
        with open(path, "a") as f:
            f.write(f"{pgid}\n")


def kill_group(pgid: int, grace: float) -> None:
    """SIGTERM a process group, then SIGKILL it if anything is left after ``grace`` s."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if not group_alive(pgid):
                return
            time.sleep(0.02)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A group whose only members are zombies of ours still "exists"; reap them.
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-pgid, os.WNOHANG)[0]:
            pass
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def kill_recorded_groups(pgid_file: Path, grace: float = 2.0) -> None:
    """Kill every group listed in ``pgid_file`` (the safety net after a runner ends)."""
    try:
        lines = pgid_file.read_text().split()
    except FileNotFoundError:
        return
    for pgid in {int(x) for x in lines if x.isdigit()}:
        if pgid > 1 and group_alive(pgid):
            kill_group(pgid, grace)


class Service:
    """One started command in its own process group, output in a log file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_dir: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        log_dir.mkdir(parents=True, exist_ok=True)
        child_env = dict(os.environ)
        child_env["PYTHONPATH"] = os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
        )
        child_env["PYTHONUNBUFFERED"] = "1"
        child_env.update(env or {})
        with open(self.log_path, "ab") as log:
            self.popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=child_env,
                cwd=cwd or log_dir,
                start_new_session=True,
            )
        record_group(self.popen.pid)

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except FileNotFoundError:
            return ""

    def stop(self, grace: float = 3.0) -> None:
        kill_group(self.popen.pid, grace)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(grace)


class Services:
    """The services of one system; :meth:`stop` ends them all, newest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.started: list[Service] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> Service:
        service = Service(name, argv, self.log_dir, env=env, cwd=cwd)
        self.started.append(service)
        return service

    def check(self) -> None:
        """Raise when a service died: its numbers would mean nothing."""
        for s in self.started:
            if not s.alive:
                raise RuntimeError(f"{s.name} exited (code {s.popen.returncode}):\n{s.tail()}")

    def stop(self) -> None:
        while self.started:
            self.started.pop().stop()


@contextlib.contextmanager
def terminate_as_exit() -> Iterator[None]:
    """Turn SIGTERM and SIGINT into SystemExit, so ``finally`` blocks stop the services."""

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    old = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
