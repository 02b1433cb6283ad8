"""The ``corral`` command: broker, worker, up, gateway, submit, status, job records, schedules."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
from typing import Any

import click

from corral.gateway.command import BROKER_OPTIONS as GATEWAY_OPTIONS
from corral.gateway.command import beside as gateway_beside
from corral.gateway.command import gateway_command, gateway_for_broker
from corral.protocol import DEFAULT_ADMIN, DEFAULT_BACKEND, DEFAULT_FRONTEND
from corral.security.cli import (
    BROKER_SECURITY_OPTIONS,
    PEER_KEYS_OPTION,
    keys_group,
    security_config,
)
from corral.security.curve import KEYS_ENV

DEFAULT_NOTIFY = "tcp://127.0.0.1:47294"
DEFAULT_STREAMS = "tcp://127.0.0.1:47295"

log = logging.getLogger("corral")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}


def parse_duration(text: str, option: str = "duration") -> float:
    """``"90"`` or ``"90s"``, ``"30m"``, ``"12h"``, ``"7d"``, ``"2w"`` -> seconds."""
    value = text.strip().lower()
    scale = _UNITS.get(value[-1:], None)
    number = value[:-1] if scale is not None else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise click.BadParameter(
            f"{text!r}: use a number of seconds or e.g. 30m, 12h, 7d", param_hint=option
        ) from None
    if not 0 <= seconds < float("inf"):
        raise click.BadParameter(f"{text!r} must be >= 0", param_hint=option)
    return seconds


def parse_queues(text: str) -> tuple[tuple[int, str], ...]:
    """``"high:20,default:10"`` -> ``((20, "high"), (10, "default"))``; weight defaults to 10."""
    queues: list[tuple[int, str]] = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        name, sep, weight = item.rpartition(":")
        if not sep:
            name, weight = item, "10"
        try:
            queues.append((int(weight), name))
        except ValueError:
            raise click.BadParameter(f"{item!r}: use NAME or NAME:WEIGHT") from None
    if not queues:
        raise click.BadParameter("name at least one queue")
    return tuple(queues)


_BROKER_OPTIONS = [
    click.option(
        "--frontend",
        default=DEFAULT_FRONTEND,
        show_default=True,
        help="Frontend ROUTER endpoint (clients connect here).",
    ),
    click.option(
        "--backend",
        default=DEFAULT_BACKEND,
        show_default=True,
        help="Backend ROUTER endpoint (workers connect here).",
    ),
    click.option(
        "--admin",
        default=DEFAULT_ADMIN,
        show_default=True,
        help="Admin ROUTER endpoint (STATUS, workers).",
    ),
    click.option(
        "--notify",
        default=DEFAULT_NOTIFY,
        show_default=True,
        help="PUB endpoint for worker registered/unregistered notices ('' = none).",
    ),
    click.option("--heartbeat", default=3.0, show_default=True, help="Seconds between heartbeats."),
    click.option(
        "--liveness",
        default=3,
        show_default=True,
        help="Missed heartbeat intervals before a peer is dead.",
    ),
    click.option(
        "--max-frame",
        default=8 * 1024 * 1024,
        show_default=True,
        help="Largest frame accepted, in bytes.",
    ),
    click.option(
        "--store",
        "store_url",
        default=None,
        envvar="CORRAL_STORE",
        help="sqlite:///PATH or memory:// [default: sqlite in --data-dir].",
    ),
    click.option(
        "--data-dir",
        default=None,
        envvar="CORRAL_DATA",
        help="Where the default store lives [default: $CORRAL_DATA, else ~/.local/share/corral].",
    ),
    click.option(
        "--fsync", is_flag=True, help="Survive power loss too (SQLite synchronous=FULL); slower."
    ),
    click.option(
        "--commit-delay",
        default=2.0,
        show_default=True,
        metavar="MS",
        help="Milliseconds store writes that nobody waits for (dispatches, outcomes) may be "
        "held to share a transaction; acknowledgements are written at once.",
    ),
    click.option(
        "--retry-backoff",
        default=1.0,
        show_default=True,
        help="Seconds before a failed job's first retry; doubles each attempt (with jitter).",
    ),
    click.option(
        "--retry-backoff-cap",
        default=300.0,
        show_default=True,
        help="Longest wait between retries, in seconds.",
    ),
    click.option(
        "--restore-grace",
        type=float,
        default=None,
        help="Seconds a restarted broker waits for a worker that was running jobs to come "
        "back before those jobs count as lost [default: --liveness heartbeat intervals].",
    ),
    click.option(
        "--retention",
        default="7d",
        show_default=True,
        metavar="DURATION",
        help="How long records and results of finished jobs are kept (e.g. 12h, 7d; "
        "'forever' keeps them).",
    ),
    click.option(
        "--streams",
        default=DEFAULT_STREAMS,
        show_default=True,
        help="TCP endpoint of the job-stream line server ('' = none).",
    ),
    click.option(
        "--stream-history",
        default=1000,
        show_default=True,
        help="Messages of each job stream kept (in the store too) for late listeners.",
    ),
    click.option(
        "--stream-queue",
        default=10_000,
        show_default=True,
        help="Messages one stream listener may fall behind before it is cut off (overflow).",
    ),
    click.option(
        "--stream-token",
        default=None,
        envvar="CORRAL_STREAM_TOKEN",
        help="A token that lets network clients put to any stream [default: $CORRAL_STREAM_TOKEN; "
        "without it only a job's own token works].",
    ),
    click.option(
        "--restore",
        is_flag=True,
        help="Insist on taking back an earlier run's state: refuse to start on a store "
        "that holds none. (A broker always takes back what its store holds.)",
    ),
    click.option(
        "--builtin-scheduler/--no-builtin-scheduler",
        default=True,
        show_default=True,
        help="Fire schedules in the broker itself (else only `corral scheduler` processes do).",
    ),
    click.option(
        "--timezone",
        default="UTC",
        show_default=True,
        envvar="CORRAL_TIMEZONE",
        help="Time zone in which cron schedules read the clock (IANA name).",
    ),
    *BROKER_SECURITY_OPTIONS,
    click.option(
        "--missed-ticks",
        type=click.Choice(["coalesce", "skip"]),
        default="coalesce",
        show_default=True,
        help="Ticks missed while the broker was down: run once at start, or skip them.",
    ),
]

_WORKER_OPTIONS = [
    click.option(
        "--queues",
        "-Q",
        default="default:10",
        show_default=True,
        help="Queues to serve as NAME:WEIGHT,... (higher weight first).",
    ),
    click.option(
        "--concurrency",
        "-c",
        type=int,
        default=None,
        help="Processes in the pool [default: number of cores].",
    ),
    click.option(
        "--import",
        "imports",
        multiple=True,
        help="Module with @corral.task functions to load (repeatable).",
    ),
    click.option(
        "--allow",
        multiple=True,
        help="Module prefix whose callables may run, e.g. 'myapp.' (repeatable).",
    ),
    click.option(
        "--max-jobs-per-child",
        type=int,
        default=None,
        help="Replace a pool process after this many jobs.",
    ),
    click.option(
        "--prefetch",
        type=click.IntRange(min=0),
        default=None,
        help="Jobs held beyond the number of processes, so a process that finishes "
        "starts the next job at once [default: with a corral broker, as many per process "
        "as run in 5 ms at the recent run time, 1 to 16 (4 to start with); none with "
        "EventMQ's router]. A corral broker takes a prefetched job back as soon as a "
        "process elsewhere is idle; 0 holds none.",
    ),
    click.option(
        "--grace",
        default=30.0,
        show_default=True,
        help="Seconds running jobs get to finish on SIGTERM.",
    ),
    click.option(
        "--capture-output",
        is_flag=True,
        help="Put each job's stdout/stderr lines on its stream too.",
    ),
    click.option(
        "--stream-log-level",
        default="info",
        show_default=True,
        type=click.Choice(["debug", "info", "warning", "error", "none"]),
        help="Lowest level of a job's logging records put on its stream.",
    ),
    click.option(
        "--stream-buffer",
        default=10_000,
        show_default=True,
        help="Stream messages a job's process (and the worker, while the broker is away) "
        "holds; past it log lines are dropped first and partial results coalesce to the "
        "latest (both counted on the stream).",
    ),
]

_LOG_OPTION = click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)


def _options(options: list):  # noqa: ANN202 - a decorator
    def apply(f):  # noqa: ANN001, ANN202
        for option in reversed(options):
            f = option(f)
        return f

    return apply


def default_data_dir() -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return os.path.join(base, "corral")


def _make_broker(
    *,
    frontend: str,
    backend: str,
    admin: str,
    notify: str,
    heartbeat: float,
    liveness: int,
    max_frame: int,
    store_url: str | None,
    data_dir: str | None,
    fsync: bool,
    restore: bool,
    commit_delay: float,
    retry_backoff: float,
    retry_backoff_cap: float,
    restore_grace: float | None,
    retention: str,
    builtin_scheduler: bool,
    timezone: str,
    missed_ticks: str,
    streams: str = DEFAULT_STREAMS,
    stream_history: int = 1000,
    stream_queue: int = 10_000,
    stream_token: str | None = None,
    keys: str | None = None,
    open_endpoints: str = "",
    insecure: bool = False,
):
    """Open the store, take back its state and bind; exit with a clear message on failure."""
    from corral.broker.core import BrokerConfig, BrokerCore
    from corral.broker.security import InsecureBind
    from corral.broker.server import AddressInUse, BrokerServer
    from corral.broker.streams import BrokerStreams
    from corral.scheduler import SchedulerConfig
    from corral.store import StoreError, open_store
    from corral.streams.hub import HubConfig

    security = security_config(keys, open_endpoints, insecure)
    if keys:
        # The broker's own key has every role: its gateway and `corral up`'s worker use it.
        os.environ[KEYS_ENV] = keys
    if store_url is None:
        store_url = "sqlite:///" + os.path.join(data_dir or default_data_dir(), "broker.db")
    try:
        store = open_store(store_url, fsync=fsync)
    except StoreError as exc:
        raise click.ClickException(str(exc)) from None
    if not 0 <= commit_delay <= 1000:
        raise click.BadParameter("--commit-delay must be 0-1000 ms")
    if not 0 < retry_backoff <= retry_backoff_cap:
        raise click.BadParameter("need 0 < --retry-backoff <= --retry-backoff-cap")
    schedules = SchedulerConfig(builtin=builtin_scheduler, timezone=timezone, missed=missed_ticks)
    try:
        core = BrokerCore(
            BrokerConfig(
                heartbeat_interval=heartbeat,
                heartbeat_liveness=liveness,
                max_frame=max_frame,
                retry_backoff_base=retry_backoff,
                retry_backoff_cap=retry_backoff_cap,
                restore_grace=restore_grace,
                schedules=schedules,
            )
        )
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--timezone") from None
    keep = (
        None if retention.strip().lower() == "forever" else parse_duration(retention, "--retention")
    )
    if stream_history < 1 or stream_queue < 1:
        raise click.BadParameter("--stream-history and --stream-queue must be >= 1")
    server = BrokerServer(
        core,
        frontend=frontend,
        backend=backend,
        admin=admin,
        notify=notify or None,
        store=store,
        commit_delay=commit_delay / 1000.0,
        retention=keep,
        streams=BrokerStreams(
            core, HubConfig(history=stream_history, listener_queue=stream_queue), stream_token
        ),
        stream_lines=streams or None,
        security=security,
    )
    try:
        server.open_store(require_state=restore)
        server.bind()
    except (StoreError, AddressInUse, InsecureBind) as exc:
        server.close()
        raise click.ClickException(str(exc)) from None
    log.info("store: %s", store.url)
    return server


def _make_worker(
    *,
    backend: str,
    queues: str,
    concurrency: int | None,
    imports: tuple[str, ...],
    allow: tuple[str, ...],
    max_jobs_per_child: int | None,
    prefetch: int | None,
    grace: float,
    heartbeat: float,
    identity: str | None = None,
    capture_output: bool = False,
    stream_log_level: str = "info",
    stream_buffer: int = 10_000,
):
    from corral.worker.manager import WorkerConfig, WorkerManager

    config = WorkerConfig(
        backend=backend,
        queues=parse_queues(queues),
        imports=tuple(imports),
        allow=tuple(allow),
        max_jobs_per_child=max_jobs_per_child,
        prefetch=prefetch,
        grace=grace,
        heartbeat_interval=heartbeat,
        capture_output=capture_output,
        stream_log_level=None if stream_log_level == "none" else stream_log_level,
        stream_buffer=max(1, stream_buffer),
    )
    if concurrency:
        config.concurrency = concurrency
    if identity:
        config.identity = identity
    return WorkerManager(config)


async def _run_worker(worker) -> None:  # noqa: ANN001
    import signal

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    await worker.run()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="corral")
def main() -> None:
    """corral: a distributed job broker for Python on ZeroMQ (eMQP)."""


@main.command()
@_options([*_BROKER_OPTIONS, *GATEWAY_OPTIONS, _LOG_OPTION])
def broker(log_level: str, **opts: Any) -> None:
    """Run a broker (with --gateway, also the JSON-RPC gateway)."""
    _setup_logging(log_level)
    gateway = gateway_for_broker(opts, max_frame=opts["max_frame"])
    server = _make_broker(**opts)
    log.info(
        "broker ready: frontend %s, backend %s, admin %s",
        opts["frontend"],
        opts["backend"],
        opts["admin"],
    )

    async def serve() -> None:
        async with gateway_beside(gateway, server):
            await server.serve()

    asyncio.run(serve())


@main.command()
@click.option(
    "--backend", default=DEFAULT_BACKEND, show_default=True, help="The broker's backend endpoint."
)
@_options(_WORKER_OPTIONS)
@click.option("--heartbeat", default=3.0, show_default=True, help="Seconds between heartbeats.")
@click.option("--uuid", "identity", default=None, help="Worker identity [default: a new uuid4].")
@PEER_KEYS_OPTION
@_options([_LOG_OPTION])
def worker(log_level: str, **opts: Any) -> None:
    """Run a worker that serves jobs from a broker."""
    _setup_logging(log_level)
    sys.path.insert(0, os.getcwd())
    asyncio.run(_run_worker(_make_worker(**opts)))


_BROKER_KEYS = {
    "frontend",
    "backend",
    "admin",
    "notify",
    "heartbeat",
    "liveness",
    "max_frame",
    "store_url",
    "data_dir",
    "fsync",
    "restore",
    "commit_delay",
    "retry_backoff",
    "retry_backoff_cap",
    "restore_grace",
    "retention",
    "builtin_scheduler",
    "timezone",
    "missed_ticks",
    "streams",
    "stream_history",
    "stream_queue",
    "stream_token",
    "keys",
    "open_endpoints",
    "insecure",
}
_WORKER_KEYS = {
    "backend",
    "queues",
    "concurrency",
    "imports",
    "allow",
    "max_jobs_per_child",
    "prefetch",
    "grace",
    "heartbeat",
    "capture_output",
    "stream_log_level",
    "stream_buffer",
}


@main.command()
@_options([*_BROKER_OPTIONS, *_WORKER_OPTIONS, *GATEWAY_OPTIONS, _LOG_OPTION])
def up(log_level: str, **opts: Any) -> None:
    """Run a broker and a worker together (the quickest way to start)."""
    _setup_logging(log_level)
    sys.path.insert(0, os.getcwd())
    opts["imports"] = ("corral.examples", *opts["imports"])
    gateway = gateway_for_broker(opts, max_frame=opts["max_frame"])
    server = _make_broker(**{k: v for k, v in opts.items() if k in _BROKER_KEYS})
    w = _make_worker(**{k: v for k, v in opts.items() if k in _WORKER_KEYS})
    click.echo(_banner(opts["frontend"], opts["admin"], server.store.url))

    async def both() -> None:
        worker_task = asyncio.ensure_future(w.run())
        try:
            async with gateway_beside(gateway, server):
                await server.serve()
        finally:
            w.stop()
            await worker_task

    asyncio.run(both())


def _banner(frontend: str, admin: str, store: str) -> str:
    env = "" if frontend == DEFAULT_FRONTEND else f"CORRAL_BROKER={frontend} "
    status = "corral status" if admin == DEFAULT_ADMIN else f"corral status --admin {admin}"
    return (
        f"corral is up: broker on {frontend} (admin {admin}) with one worker; "
        f"jobs are kept in {store}.\n"
        f"Submit a job from another terminal:\n"
        f"    {env}corral submit corral.examples:add 2 3 --wait\n"
        f"or from Python:\n"
        f"    import corral; print(corral.Client({frontend!r})"
        f".submit('corral.examples:add', 2, 3).result())\n"
        f"See the queues and workers with `{status}`. Stop with Ctrl-C."
    )


@main.command()
@click.argument("target")
@click.argument("args", nargs=-1)
@click.option(
    "--kw", "kwargs", multiple=True, metavar="NAME=JSON", help="A keyword argument (repeatable)."
)
@click.option("--queue", "-q", default="default", show_default=True)
@click.option("--timeout", type=float, default=None, help="Hard time limit in seconds.")
@click.option("--retries", type=int, default=0, show_default=True)
@click.option("--wait", is_flag=True, help="Wait for the job and print its result.")
@click.option(
    "--broker",
    "address",
    default=None,
    envvar="CORRAL_BROKER",
    help=f"Frontend endpoint [default: {DEFAULT_FRONTEND}, or $CORRAL_BROKER].",
)
@PEER_KEYS_OPTION
def submit(
    target: str,
    args: tuple[str, ...],
    kwargs: tuple[str, ...],
    queue: str,
    timeout: float | None,
    retries: int,
    wait: bool,
    address: str | None,
) -> None:
    """Submit TARGET (module:function) with ARGS given as JSON values."""
    from corral.client import Client
    from corral.errors import CorralError, JobFailed

    values = [_json_arg(a) for a in args]
    named: dict[str, Any] = {}
    for item in kwargs:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: use NAME=JSON", param_hint="--kw")
        named[name] = _json_arg(value)
    with Client(address or DEFAULT_FRONTEND) as client:
        try:
            job = client.submit_with(
                target, args=values, kwargs=named, queue=queue, timeout=timeout, retries=retries
            )
            if not wait:
                job.wait_acknowledged() if hasattr(job, "wait_acknowledged") else None
                click.echo(job.id)
                return
            value = job.result()
        except JobFailed as exc:
            click.echo(f"job failed: {exc.type}: {exc.message}", err=True)
            if exc.traceback:
                click.echo(exc.traceback.rstrip(), err=True)
            sys.exit(1)
        except CorralError as exc:
            raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(value))


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise click.BadParameter(
            f"{text!r} is not a JSON value (quote strings: '\"text\"')"
        ) from None


@main.command()
@click.option("--admin", default=DEFAULT_ADMIN, show_default=True, envvar="CORRAL_ADMIN")
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
@click.option("--timeout", default=5.0, show_default=True)
@PEER_KEYS_OPTION
def status(admin: str, as_json: bool, timeout: float) -> None:
    """Show the broker's queues and workers."""
    from corral.admin import AdminError, admin_request

    try:
        stats = admin_request("STATUS", admin, timeout=timeout)
        workers = admin_request("ROUTER_SHOW_WORKERS", admin, timeout=timeout)
    except AdminError as exc:
        raise click.ClickException(str(exc)) from None
    if as_json:
        click.echo(json.dumps({"status": stats, "workers": workers}, indent=2, sort_keys=True))
        return
    from corral.display import print_status

    print_status(stats, workers)


def _client_call(address: str | None, method: str, *args: Any, **kwargs: Any) -> Any:
    from corral.client import Client
    from corral.errors import CorralError

    with Client(address or DEFAULT_FRONTEND) as client:
        try:
            return getattr(client, method)(*args, **kwargs)
        except CorralError as exc:
            raise click.ClickException(str(exc)) from None
        except TimeoutError:
            raise click.ClickException("no answer from the broker: is it running?") from None


_BROKER_OPTION = click.option(
    "--broker",
    "address",
    default=None,
    envvar="CORRAL_BROKER",
    help=f"Frontend endpoint [default: {DEFAULT_FRONTEND}, or $CORRAL_BROKER].",
)
_JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")


@main.command("job")
@click.argument("job_id")
@_BROKER_OPTION
@PEER_KEYS_OPTION
@_JSON_OPTION
def job_cmd(job_id: str, address: str | None, as_json: bool) -> None:
    """Show one job's record."""
    info = _client_call(address, "job_info", job_id)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    from corral.display import print_job

    print_job(info)


@main.command("jobs")
@click.option(
    "--state",
    "-s",
    multiple=True,
    help="queued, running, succeeded, failed, retrying, cancelled or dead (repeatable).",
)
@click.option("--dead", is_flag=True, help="Only dead jobs (the dead-letter set).")
@click.option("--queue", "-q", default=None)
@click.option("--label", default=None, help="Only jobs submitted with this label.")
@click.option("--worker", "worker_id", type=int, default=None, help="Only jobs of this worker id.")
@click.option(
    "--since", default=None, metavar="DURATION", help="Only jobs submitted this long ago or since."
)
@click.option("--limit", "-n", default=50, show_default=True)
@_BROKER_OPTION
@PEER_KEYS_OPTION
@_JSON_OPTION
def jobs_cmd(
    state: tuple[str, ...],
    dead: bool,
    queue: str | None,
    label: str | None,
    worker_id: int | None,
    since: str | None,
    limit: int,
    address: str | None,
    as_json: bool,
) -> None:
    """List jobs, newest first."""
    import time

    states = [*state, *(["dead"] if dead else [])]
    found = _client_call(
        address,
        "jobs",
        state=states or None,
        queue=queue,
        label=label,
        worker_id=worker_id,
        since=None if since is None else time.time() - parse_duration(since, "--since"),
        limit=limit,
    )
    if as_json:
        click.echo(json.dumps(found, indent=2, sort_keys=True))
        return
    from corral.display import print_jobs

    print_jobs(found)


@main.command("cancel")
@click.argument("job_id")
@_BROKER_OPTION
@PEER_KEYS_OPTION
@_JSON_OPTION
def cancel_cmd(job_id: str, address: str | None, as_json: bool) -> None:
    """Cancel a job: a queued one never runs, a running one's process is killed."""
    answer = _client_call(address, "cancel", job_id)
    if as_json:
        click.echo(json.dumps(answer, indent=2, sort_keys=True))
    elif answer["cancelled"]:
        click.echo(f"job {answer['id']} cancelled (it was {answer['was']})")
    else:
        click.echo(answer["detail"])


@main.command("purge")
@click.option(
    "--older-than",
    default="7d",
    show_default=True,
    metavar="DURATION",
    help="Delete records of jobs that ended longer ago than this (e.g. 90s, 30m, 12h, 7d).",
)
@_BROKER_OPTION
@PEER_KEYS_OPTION
@_JSON_OPTION
def purge_cmd(older_than: str, address: str | None, as_json: bool) -> None:
    """Delete the records (and results) of jobs that ended long ago."""
    seconds = parse_duration(older_than, "--older-than")
    answer = _client_call(address, "query", "purge", older_than=seconds)
    if as_json:
        click.echo(json.dumps(answer, indent=2, sort_keys=True))
        return
    click.echo(f"purged {answer['purged']} job record(s) that ended over {older_than} ago")


@main.command("retry")
@click.argument("job_id")
@_BROKER_OPTION
@PEER_KEYS_OPTION
@_JSON_OPTION
def retry_cmd(job_id: str, address: str | None, as_json: bool) -> None:
    """Put a dead, failed or cancelled job back in its queue."""
    info = _client_call(address, "retry", job_id)
    if as_json:
        click.echo(json.dumps(info, indent=2, sort_keys=True))
        return
    click.echo(f"job {info['id']} is {info['state']} again")


@main.command("tail")
@click.argument("job_id")
@click.option("--after", type=int, default=None, help="Start after this sequence number.")
@_BROKER_OPTION
@PEER_KEYS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print each message as a JSON line.")
def tail_cmd(job_id: str, after: int | None, address: str | None, as_json: bool) -> None:
    """Follow JOB_ID's stream (progress bar and log lines); exit 0 if it succeeds, 1 if not."""
    from corral.errors import CorralError
    from corral.tail import follow

    try:
        code = follow(address or DEFAULT_FRONTEND, job_id, after, as_json)
    except CorralError as exc:
        raise click.ClickException(str(exc)) from None
    sys.exit(code)


def _register_schedule_commands() -> None:
    from corral.scheduler.cli import register

    register(main)


_register_schedule_commands()
main.add_command(gateway_command)
main.add_command(keys_group)
