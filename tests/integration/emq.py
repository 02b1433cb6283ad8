"""Run the real EventMQ 0.3.13 (router, job manager, scheduler, emq-cli) from tests and benches.

EventMQ is the reference peer corral must stay compatible with, so these helpers start
its real console scripts as subprocesses on free loopback ports, talk to them with
EventMQ's own client code, and always kill what they started.

Typical use::

    with emq_cluster(tmp_path, concurrent_jobs=2) as cluster:
        with emq_sender(cluster.addrs.frontend) as sender:
            submit_job(sender, "emq_jobs.write_marker", args=[str(marker)])
        wait_until(marker.exists, timeout=20, procs=cluster.procs)

To drive an EventMQ job manager against corral's broker instead, write a config with
:func:`write_config` and start it with :func:`start_jobmanager(..., broker_addr=...)`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import zmq

T = TypeVar("T")

#: Folder holding ``emq_jobs.py``; put it on a job manager's PYTHONPATH so it can
#: import the test jobs by their dotted path (``emq_jobs.write_marker``).
JOBS_DIR = Path(__file__).resolve().parent
#: The repository root, so a callable passed from the test process (whose
#: ``__module__`` is ``tests.integration.emq_jobs``) is importable as well.
REPO_ROOT = JOBS_DIR.parent.parent
JOB_PYTHONPATH: tuple[Path, ...] = (JOBS_DIR, REPO_ROOT)

PROTOCOL = "eMQP/1.0"
LOOPBACK = "127.0.0.1"

# Start-up normally takes ~4 s: the job manager forks its processes only on the
# router's first HEARTBEAT (every 3 s). Five times that means broken, not slow.
DEFAULT_START_TIMEOUT = 20.0


# --------------------------------------------------------------------------- ports


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nothing listens on right now.

    The port is only reserved until this returns; another process may grab it
    before EventMQ binds, which on a busy CI box shows up as a bind failure in
    the router's stderr rather than as a silent mix-up.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def free_addr(host: str = LOOPBACK) -> str:
    return f"tcp://{host}:{free_port(host)}"


@dataclass(frozen=True)
class EmqAddrs:
    """The three sockets an EventMQ router binds."""

    frontend: str
    backend: str
    admin: str

    @classmethod
    def fresh(cls) -> EmqAddrs:
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port())
        front, back, admin = (f"tcp://{LOOPBACK}:{p}" for p in sorted(ports))
        return cls(frontend=front, backend=back, admin=admin)


# -------------------------------------------------------------------------- config


def write_config(
    directory: Path,
    addrs: EmqAddrs,
    *,
    worker_addr: str | None = None,
    concurrent_jobs: int = 2,
    queues: Sequence[tuple[int, str]] | None = None,
    max_job_count: int | None = None,
    extra: Mapping[str, Mapping[str, object]] | None = None,
    name: str = "eventmq.conf",
) -> Path:
    """Write an EventMQ INI file for ``EVENTMQ_CONFIG_FILE`` and return its path.

    ``worker_addr`` defaults to the router's backend; point it at corral's backend
    to run an EventMQ job manager against corral. ``queues=None`` leaves EventMQ's
    default ``[(10, "default")]``. ``extra`` adds or overrides keys per section.
    Keys are EventMQ's ``conf`` names (case-insensitive).
    """
    directory.mkdir(parents=True, exist_ok=True)
    worker = worker_addr or addrs.backend
    sections: dict[str, dict[str, object]] = {
        "global": {
            "frontend_addr": addrs.frontend,
            "backend_addr": addrs.backend,
            "administrative_addr": addrs.admin,
            "worker_addr": worker,
            # A job manager that loses its broker flips WORKER_ADDR between these
            # two; left at EventMQ's defaults they would point at port 47290.
            "worker_addr_default": worker,
            "worker_addr_failover": worker,
            "scheduler_addr": addrs.frontend,
            # The router creates its WAL file at start even when disabled; the
            # default lives under /var/log.
            "wal": str(directory / "eventmq-wal.log"),
            "wal_enabled": "false",
        },
        "jobmanager": {"concurrent_jobs": concurrent_jobs},
        "scheduler": {
            "scheduler_addr": addrs.frontend,
            # Without the redis package the scheduler would exit(1) at start.
            "redis_startup_error_hard_kill": "false",
        },
    }
    if queues is not None:
        sections["jobmanager"]["queues"] = json.dumps([list(q) for q in queues])
    if max_job_count is not None:
        sections["jobmanager"]["max_job_count"] = max_job_count
    for section, values in (extra or {}).items():
        sections.setdefault(section, {}).update(values)

    lines: list[str] = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in values.items())
        lines.append("")
    path = directory / name
    path.write_text("\n".join(lines))
    return path


# ----------------------------------------------------------------------- processes


def emq_script(name: str) -> Path:
    """Path of an EventMQ console script (``emq-router`` ...).

    They are plain scripts, not entry-point modules, so ``python -m`` cannot run
    them; run the file with ``sys.executable`` so the shebang does not matter.
    """
    beside = Path(sys.executable).parent / name
    if beside.is_file():
        return beside
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found next to {sys.executable} or on PATH")
    return Path(found)


@dataclass
class EmqProcess:
    """A running EventMQ component with its output captured to files."""

    name: str
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int | None = 4000) -> str:
        """stdout + stderr so far (the last ``tail`` characters of each)."""
        parts = []
        for label, path in (("stdout", self.stdout_path), ("stderr", self.stderr_path)):
            text = path.read_text(errors="replace") if path.exists() else ""
            if tail is not None:
                text = text[-tail:]
            parts.append(f"--- {self.name} {label} ---\n{text}")
        return "\n".join(parts)


def _child_env(config: Path, pythonpath: Iterable[Path | str]) -> dict[str, str]:
    # EVENTMQ_<SETTING> variables override the config file, so a stray one in the
    # developer's shell must not leak into the test.
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTMQ_")}
    env["EVENTMQ_CONFIG_FILE"] = str(config)
    env["PYTHONUNBUFFERED"] = "1"
    paths = [str(p) for p in pythonpath]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    if paths:
        env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def _kill_group(proc: subprocess.Popen[bytes], grace: float) -> None:
    """SIGTERM the whole process group, then SIGKILL whatever is left.

    The job manager forks worker processes and a multiprocessing manager; they
    share the group, so killing the group is the only way not to leak them.
    """
    pgid = proc.pid  # start_new_session=True made the child its group leader
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            if proc.poll() is not None and not _group_alive(pgid):
                return
            time.sleep(0.02)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def run_emq(
    script: str,
    args: Sequence[str],
    *,
    config: Path,
    log_dir: Path,
    pythonpath: Iterable[Path | str] = (),
    name: str | None = None,
    kill_grace: float = 2.0,
) -> Iterator[EmqProcess]:
    """Start an EventMQ console script in its own process group; kill the group on exit."""
    label = name or script
    log_dir.mkdir(parents=True, exist_ok=True)
    stdout_path = log_dir / f"{label}.stdout.log"
    stderr_path = log_dir / f"{label}.stderr.log"
    with open(stdout_path, "wb") as out, open(stderr_path, "wb") as err:
        popen = subprocess.Popen(
            [sys.executable, str(emq_script(script)), *args],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=_child_env(config, pythonpath),
            cwd=log_dir,
            start_new_session=True,
        )
    proc = EmqProcess(label, popen, stdout_path, stderr_path)
    try:
        yield proc
    finally:
        _kill_group(popen, kill_grace)


def start_router(
    config: Path, log_dir: Path, *, name: str = "emq-router"
) -> AbstractContextManager[EmqProcess]:
    """Context manager running ``emq-router`` (addresses come from ``config``)."""
    return run_emq("emq-router", [], config=config, log_dir=log_dir, name=name)


def start_jobmanager(
    config: Path,
    log_dir: Path,
    *,
    broker_addr: str | None = None,
    jobs: int | None = None,
    queues: Sequence[str] | None = None,
    pythonpath: Iterable[Path | str] = JOB_PYTHONPATH,
    name: str = "emq-jobmanager",
) -> AbstractContextManager[EmqProcess]:
    """Context manager running ``emq-jobmanager``.

    ``broker_addr`` (``-B``) overrides the config's worker_addr, e.g. corral's
    backend. ``queues`` (``-Q``) makes EventMQ INFORM with an empty queue frame,
    because the script joins them into a string that ``send_inform`` discards; use
    ``write_config(queues=...)`` to INFORM with real weights.
    """
    args: list[str] = []
    if broker_addr:
        args += ["--broker-addr", broker_addr]
    if jobs is not None:
        args += ["--jobs", str(jobs)]
    if queues:
        args += ["--queues", *queues]
    return run_emq(
        "emq-jobmanager", args, config=config, log_dir=log_dir, pythonpath=pythonpath, name=name
    )


def start_scheduler(
    config: Path, log_dir: Path, *, name: str = "emq-scheduler"
) -> AbstractContextManager[EmqProcess]:
    """Context manager running ``emq-scheduler`` (connects to the config's scheduler_addr)."""
    return run_emq("emq-scheduler", [], config=config, log_dir=log_dir, name=name)


# --------------------------------------------------------------------------- waits


class ProcessDied(RuntimeError):
    pass


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    *,
    interval: float = 0.02,
    procs: Iterable[EmqProcess] = (),
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns something truthy or ``timeout`` passes.

    Fails fast with the processes' output when one of ``procs`` exits meanwhile,
    because then the condition can never become true.
    """
    procs = list(procs)
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        dead = [p for p in procs if not p.alive()]
        if dead:
            logs = "\n".join(p.output() for p in dead)
            raise ProcessDied(f"waiting for {what}: {[p.name for p in dead]} exited\n{logs}")
        if time.monotonic() >= deadline:
            logs = "\n".join(p.output() for p in procs)
            raise TimeoutError(f"{what} not reached within {timeout:.1f}s\n{logs}")
        time.sleep(interval)


# --------------------------------------------------------------------------- admin


def admin_request(admin_addr: str, command: str, timeout: float = 2.0) -> Any | None:
    """Send one admin command the way emq-cli does and return the decoded F4 JSON.

    Returns None when nothing answers within ``timeout`` (EventMQ's router ignores
    admin commands it does not know, and emq-cli then prints ``None``).
    """
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt_string(zmq.IDENTITY, str(uuid.uuid4()))
    try:
        sock.connect(admin_addr)
        sock.send_multipart(
            [b"", PROTOCOL.encode(), command.encode(), f"admin:{uuid.uuid4()}".encode()]
        )
        if not sock.poll(int(timeout * 1000)):
            return None
        frames = [f.decode() for f in sock.recv_multipart()]
        return json.loads(frames[4])
    finally:
        sock.close()


def router_status(admin_addr: str, timeout: float = 2.0) -> dict[str, Any] | None:
    return admin_request(admin_addr, "STATUS", timeout)


def router_workers(admin_addr: str, timeout: float = 2.0) -> dict[str, Any] | None:
    return admin_request(admin_addr, "ROUTER_SHOW_WORKERS", timeout)


def router_schedulers(admin_addr: str, timeout: float = 2.0) -> dict[str, Any] | None:
    return admin_request(admin_addr, "ROUTER_SHOW_SCHEDULERS", timeout)


def free_slots(admin_addr: str) -> int:
    """Sum of ``available_slots`` over the workers a router knows (0 if no answer)."""
    shown = router_workers(admin_addr, timeout=0.5) or {}
    return sum(w.get("available_slots", 0) for w in shown.get("connected_workers", {}).values())


#: emq-cli's interactive commands (``do_<name>`` methods of its ``Shell``).
CLI_COMMANDS = ("status", "show_workers", "show_schedulers", "shutdown", "disconnect", "quit")


def emq_cli(
    admin_addr: str,
    commands: Sequence[str],
    *,
    timeout: float = 20.0,
    config: Path | None = None,
) -> str:
    """Run ``emq-cli --addr <admin_addr>`` feeding ``commands`` on stdin; return stdout.

    emq-cli is an interactive ``cmd.Cmd`` shell: each line is one command, EOF quits.
    ``shutdown`` blocks until the broker answers DISCONNECT; ``timeout`` bounds it.
    stderr is appended after a marker line when it is not empty.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("EVENTMQ_")}
    if config is not None:
        env["EVENTMQ_CONFIG_FILE"] = str(config)
    done = subprocess.run(
        [sys.executable, str(emq_script("emq-cli")), "--addr", admin_addr],
        input="".join(f"{c}\n" for c in commands),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if done.returncode != 0 or done.stderr.strip():
        return f"{done.stdout}\n--- stderr (rc={done.returncode}) ---\n{done.stderr}"
    return done.stdout


def parse_cli_output(text: str) -> list[Any]:
    """Decode emq-cli's stdout into one Python value per command that printed one.

    emq-cli prints ``Connecting to <addr>...`` then, per command, the prompt ``> ``
    followed by ``pprint`` of the JSON-decoded reply (a Python literal, possibly
    over several lines), or ``None`` when no reply came within 1 s.
    """
    body = text.split("\n--- stderr", 1)[0]
    lines = body.splitlines()
    if lines and lines[0].startswith("Connecting to "):
        lines = lines[1:]
    values: list[Any] = []
    # The prompt only ever starts a line; "> " inside a value would not.
    for chunk in re.split(r"(?:^|\n)> ", "\n".join(lines)):
        chunk = chunk.strip()
        if chunk:
            values.append(ast.literal_eval(chunk))
    return values


# ---------------------------------------------------------------------- submitting


@contextmanager
def emq_sender(frontend_addr: str, *, sndhwm: int = 0, linger_ms: int = 2000) -> Iterator[Any]:
    """An ``eventmq.sender.Sender`` connected to ``frontend_addr``.

    EventMQ sends with NOBLOCK and silently drops a message on EAGAIN, so the
    default send high-water mark of 1000 would lose pipelined jobs; ``sndhwm=0``
    (unbounded) keeps them. On exit the socket lingers up to ``linger_ms`` so
    queued jobs still reach the broker.
    """
    from eventmq.sender import Sender

    sender = Sender()
    sender.zsocket.setsockopt(zmq.SNDHWM, sndhwm)
    sender.connect(frontend_addr)
    try:
        yield sender
    finally:
        sender.zsocket.close(linger=linger_ms)


def submit_job(
    sender: Any,
    func: str | Callable[..., Any],
    *,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    class_args: Sequence[Any] = (),
    class_kwargs: Mapping[str, Any] | None = None,
    queue: str = "default",
    reply_requested: bool = False,
    guarantee: bool = False,
    retry_count: int = 0,
    timeout: int = 0,
) -> str:
    """Send a REQUEST with ``eventmq.client.messages.defer_job``; return its MSGID.

    defer_job does not wait for or read the broker's REPLY; read ``sender`` if you
    need it. ``func`` is a dotted path (``pkg.mod.func``, ``pkg.mod:Class.method``)
    or a callable whose ``__module__`` the job manager can import.
    """
    from eventmq.client.messages import defer_job

    msgid = defer_job(
        sender,
        func,
        args=list(args),
        kwargs=dict(kwargs or {}),
        class_args=list(class_args),
        class_kwargs=dict(class_kwargs or {}),
        reply_requested=reply_requested,
        guarantee=guarantee,
        retry_count=retry_count,
        timeout=timeout,
        queue=queue,
    )
    if msgid is None:  # defer_job logs and returns None instead of raising
        raise ValueError(f"defer_job refused {func!r}")
    return msgid


def submit_schedule(
    sender: Any,
    func: str | Callable[..., Any],
    *,
    interval_secs: int | None = None,
    cron: str | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    class_args: Sequence[Any] = (),
    class_kwargs: Mapping[str, Any] | None = None,
    headers: Sequence[str] = ("guarantee",),
    queue: str = "default",
    unschedule: bool = False,
) -> str:
    """Send SCHEDULE (or UNSCHEDULE) with ``eventmq.client.messages.schedule``."""
    from eventmq.client.messages import schedule

    msgid = schedule(
        sender,
        func,
        interval_secs=interval_secs,
        args=list(args),
        kwargs=dict(kwargs or {}),
        class_args=list(class_args),
        class_kwargs=dict(class_kwargs or {}),
        headers=tuple(headers),
        queue=queue,
        unschedule=unschedule,
        cron=cron,
    )
    if msgid is None:
        raise ValueError(f"schedule refused {func!r} (interval_secs={interval_secs}, cron={cron})")
    return msgid


# ------------------------------------------------------------------------- cluster


@dataclass
class EmqCluster:
    addrs: EmqAddrs
    config: Path
    log_dir: Path
    procs: list[EmqProcess] = field(default_factory=list)

    def output(self) -> str:
        return "\n".join(p.output() for p in self.procs)


@contextmanager
def emq_cluster(
    directory: Path,
    *,
    jobmanagers: int = 1,
    concurrent_jobs: int = 2,
    queues: Sequence[tuple[int, str]] | None = None,
    scheduler: bool = False,
    pythonpath: Iterable[Path | str] = JOB_PYTHONPATH,
    max_job_count: int | None = None,
    timeout: float = DEFAULT_START_TIMEOUT,
) -> Iterator[EmqCluster]:
    """A real EventMQ router (+ job managers, + scheduler) on fresh ports, ready to use.

    Returns once the router answers STATUS, every job manager's processes have
    sent READY (the router shows all their slots free) and the scheduler, if any,
    is registered. Everything is killed on exit, also on failure.
    """
    addrs = EmqAddrs.fresh()
    config = write_config(
        directory,
        addrs,
        concurrent_jobs=concurrent_jobs,
        queues=queues,
        max_job_count=max_job_count,
    )
    cluster = EmqCluster(addrs=addrs, config=config, log_dir=directory)
    with ExitStack() as stack:
        router = stack.enter_context(start_router(config, directory))
        cluster.procs.append(router)
        wait_until(
            lambda: router_status(addrs.admin, timeout=0.3) is not None,
            timeout,
            procs=cluster.procs,
            what="emq-router answering STATUS",
        )
        paths = list(pythonpath)
        for i in range(jobmanagers):
            jm = stack.enter_context(
                start_jobmanager(config, directory, pythonpath=paths, name=f"emq-jobmanager-{i}")
            )
            cluster.procs.append(jm)
        if jobmanagers:
            # The job manager forks its processes only on the router's first
            # HEARTBEAT (sent every 3 s), and each process then sends READY.
            wanted = jobmanagers * concurrent_jobs
            wait_until(
                lambda: free_slots(addrs.admin) >= wanted,
                timeout,
                interval=0.05,
                procs=cluster.procs,
                what=f"{wanted} READY slots",
            )
        if scheduler:
            sched = stack.enter_context(start_scheduler(config, directory))
            cluster.procs.append(sched)
            wait_until(
                lambda: (router_schedulers(addrs.admin, 0.5) or {}).get("connected_schedulers"),
                timeout,
                interval=0.05,
                procs=cluster.procs,
                what="emq-scheduler registered",
            )
        yield cluster
