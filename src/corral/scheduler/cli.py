"""``corral schedule``, ``corral schedules``, ``corral unschedule`` and ``corral scheduler``."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
from datetime import UTC, datetime
from typing import Any

import click

from corral.protocol import DEFAULT_FRONTEND
from corral.security.cli import PEER_KEYS_OPTION

_BROKER = click.option(
    "--broker",
    "address",
    default=None,
    envvar="CORRAL_BROKER",
    help=f"Frontend endpoint [default: {DEFAULT_FRONTEND}, or $CORRAL_BROKER].",
)
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_DURATION = re.compile(r"(?:(\d+)([smhd]))+")


def parse_every(text: str) -> int:
    """``"90"``, ``"90s"``, ``"5m"``, ``"1h30m"``, ``"1d"`` -> seconds."""
    text = text.strip().lower()
    if text.isdigit():
        seconds = int(text)
    elif _DURATION.fullmatch(text):
        seconds = sum(int(n) * _UNITS[u] for n, u in re.findall(r"(\d+)([smhd])", text))
    else:
        raise click.BadParameter(f"{text!r}: use seconds, or e.g. 90s, 5m, 1h30m, 1d")
    if seconds < 1:
        raise click.BadParameter("the interval must be at least 1 second")
    return seconds


def _query(address: str | None, op: str, **params: Any) -> Any:
    from corral.client import Client
    from corral.errors import CorralError

    with Client(address or DEFAULT_FRONTEND) as client:
        try:
            return client.query(op, **params)
        except CorralError as exc:
            raise click.ClickException(str(exc)) from None
        except TimeoutError:
            raise click.ClickException("no answer from the broker: is it running?") from None


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _cadence(s: dict[str, Any]) -> str:
    if s.get("every") is not None:
        every, parts = int(s["every"]), []
        for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
            if every >= size:
                parts.append(f"{every // size}{unit}")
                every %= size
        return "every " + "".join(parts)
    return f"cron {s['cron']} ({s.get('timezone') or 'UTC'})"


def print_schedules(schedules: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="schedules (times in UTC)", title_justify="left")
    table.add_column("id", no_wrap=True, min_width=12)
    for column in ("call", "when", "queue", "runs", "last run", "next run", "run by"):
        table.add_column(column, justify="right" if column == "runs" else "left", overflow="fold")
    for s in schedules:
        call = json.dumps(s.get("args", []))[1:-1]
        kwargs = ", ".join(f"{k}={json.dumps(v)}" for k, v in (s.get("kwargs") or {}).items())
        limit = s.get("run_count")
        table.add_row(
            s["id"][:12],
            f"{s['target']}({', '.join(filter(None, [call, kwargs]))})",
            _cadence(s),
            s["queue"],
            f"{s['runs']}/{limit}" if limit else str(s["runs"]),
            _when(s.get("last_run")),
            _when(s.get("next_run")),
            s.get("run_by", ""),
        )
    Console().print(table)
    if not schedules:
        click.echo("no schedules")


@click.command("schedule")
@click.argument("target")
@click.argument("args", nargs=-1)
@click.option("--every", "every", default=None, help="Interval: seconds, or 90s, 5m, 1h30m, 1d.")
@click.option("--cron", default=None, help="5-field cron expression, in the broker's time zone.")
@click.option(
    "--kw", "kwargs", multiple=True, metavar="NAME=JSON", help="A keyword argument (repeatable)."
)
@click.option("--queue", "-q", default=None, help="Queue of its jobs [default: default].")
@click.option("--run-count", type=int, default=None, help="Run this many times, then stop.")
@click.option("--nohaste", is_flag=True, help="Do not run now; first run at the first tick.")
@click.option("--timeout", type=float, default=None, help="Hard time limit of each run (s).")
@click.option("--retries", type=int, default=0, show_default=True, help="Retries of each run.")
@click.option("--guarantee", is_flag=True, help="Each run completes even if its worker dies.")
@_BROKER
@PEER_KEYS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the stored schedule as JSON.")
def schedule_cmd(
    target: str,
    args: tuple[str, ...],
    every: str | None,
    cron: str | None,
    kwargs: tuple[str, ...],
    queue: str | None,
    run_count: int | None,
    nohaste: bool,
    timeout: float | None,
    retries: int,
    guarantee: bool,
    address: str | None,
    as_json: bool,
) -> None:
    """Run TARGET (module:function) with ARGS (JSON values) on a schedule; print its id."""
    from corral.cli import _json_arg
    from corral.client.schedules import schedule_params

    named: dict[str, Any] = {}
    for item in kwargs:
        name, sep, value = item.partition("=")
        if not sep:
            raise click.BadParameter(f"{item!r}: use NAME=JSON", param_hint="--kw")
        named[name] = _json_arg(value)
    try:
        params = schedule_params(
            target,
            [_json_arg(a) for a in args],
            named,
            every=None if every is None else parse_every(every),
            cron=cron,
            queue=queue,
            run_count=run_count,
            nohaste=nohaste,
            timeout=timeout,
            retries=retries,
            guarantee=guarantee,
        )
    except (TypeError, ValueError) as exc:
        raise click.UsageError(str(exc)) from None
    stored = _query(address, "schedule", **params)
    if as_json:
        click.echo(json.dumps(stored, indent=2, sort_keys=True))
        return
    click.echo(stored["id"])
    click.echo(
        f"{stored['status']}: {_cadence(stored)}, next run {_when(stored.get('next_run'))} UTC, "
        f"run by {stored['run_by']}",
        err=True,
    )


@click.command("schedules")
@_BROKER
@PEER_KEYS_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON.")
def schedules_cmd(address: str | None, as_json: bool) -> None:
    """List the broker's schedules."""
    found = _query(address, "schedules")
    if as_json:
        click.echo(json.dumps(found, indent=2, sort_keys=True))
        return
    print_schedules(found)


@click.command("unschedule")
@click.argument("schedule_id")
@_BROKER
@PEER_KEYS_OPTION
def unschedule_cmd(schedule_id: str, address: str | None) -> None:
    """Stop a schedule for good (SCHEDULE_ID may be a unique prefix of at least 6 characters)."""
    sched_id = schedule_id.strip().lower()
    if len(sched_id) < 40:
        if len(sched_id) < 6:
            raise click.BadParameter("give at least 6 characters of the id")
        matches = [s["id"] for s in _query(address, "schedules") if s["id"].startswith(sched_id)]
        if len(matches) != 1:
            what = "no schedule" if not matches else f"{len(matches)} schedules"
            raise click.ClickException(f"{what} with an id starting {sched_id!r}")
        sched_id = matches[0]
    gone = _query(address, "unschedule", id=sched_id)
    click.echo(f"schedule {gone['id']} unscheduled after {gone['runs']} run(s)")


@click.command("scheduler")
@_BROKER
@PEER_KEYS_OPTION
@click.option("--heartbeat", default=3.0, show_default=True, help="Seconds between heartbeats.")
@click.option("--uuid", "identity", default=None, help="Scheduler identity [default: a uuid4].")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
def scheduler_cmd(
    address: str | None, heartbeat: float, identity: str | None, log_level: str
) -> None:
    """Run a scheduler process that fires a broker's schedules (any number may run)."""
    from corral.scheduler.agent import AgentConfig
    from corral.scheduler.process import SchedulerProcess

    logging.basicConfig(
        level=getattr(logging, log_level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    config = AgentConfig(broker=address or DEFAULT_FRONTEND, heartbeat_interval=heartbeat)
    if identity:
        config.identity = identity
    asyncio.run(SchedulerProcess(config).run())


def register(group: click.Group) -> None:
    for command in (schedule_cmd, schedules_cmd, unschedule_cmd, scheduler_cmd):
        group.add_command(command)
