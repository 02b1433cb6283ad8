"""Readable terminal output (rich) for the CLI."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table


def print_status(
    stats: dict[str, Any], workers: dict[str, Any], console: Console | None = None
) -> None:
    console = console or Console()
    exposed = (stats.get("security") or {}).get("insecure_endpoints") or []
    if exposed:
        console.print(
            f"[bold red]insecure:[/] {', '.join(exposed)} listen beyond loopback without keys "
            "(--insecure): anyone who reaches them may take jobs, forge results or stop the broker"
        )
    queues = sorted(
        set(stats.get("waiting_messages_by_queue", {})) | set(workers.get("connected_queues", {}))
    )
    table = Table(title="queues", title_justify="left")
    for column in ("queue", "waiting", "running", "done", "workers", "last ms", "max ms"):
        table.add_column(column, justify="left" if column == "queue" else "right")
    for name in queues:
        table.add_row(
            name,
            str(stats.get("waiting_messages_by_queue", {}).get(name, 0)),
            str(stats.get("inflight_messages_by_queue", {}).get(name, 0)),
            str(stats.get("processed_messages_by_queue", {}).get(name, 0)),
            str(len(workers.get("connected_queues", {}).get(name, []))),
            f"{stats.get('latency_messages_by_queue', {}).get(name, 0):.1f}",
            f"{stats.get('max_latency_messages_by_queue', {}).get(name, 0):.1f}",
        )
    console.print(table)
    wtable = Table(title="workers", title_justify="left")
    for column in ("worker", "queues", "free slots", "running", "done"):
        wtable.add_column(column, justify="left" if column in ("worker", "queues") else "right")
    for name, info in sorted(workers.get("connected_workers", {}).items()):
        wtable.add_row(
            name,
            ",".join(f"{q[1]}:{q[0]}" for q in info.get("queues", [])),
            str(info.get("available_slots", 0)),
            str(info.get("running", "")),
            str(info.get("processed", "")),
        )
    console.print(wtable)
    bad = stats.get("malformed_messages") or {}
    line = (
        f"jobs in flight {stats.get('jobs_in_flight', 0)}, "
        f"accepted {stats.get('jobs_accepted', 0)}, "
        f"completed {stats.get('jobs_completed', 0)}, "
        f"workers lost {stats.get('workers_lost', 0)}"
    )
    if stats.get("schedules") or stats.get("ticks_fired"):
        line += f", schedules {stats.get('schedules', 0)} (ticks run {stats.get('ticks_fired', 0)})"
    if bad:
        line += ", malformed messages " + ", ".join(f"{k} {v}" for k, v in sorted(bad.items()))
    console.print(line)


def _when(ts: float | None) -> str:
    import datetime

    if ts is None:
        return "-"
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def print_jobs(jobs: list[dict[str, Any]], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"jobs ({len(jobs)})", title_justify="left")
    for column in ("id", "queue", "state", "attempts", "worker", "submitted", "error"):
        table.add_column(column)
    for job in jobs:
        error = job.get("error") or {}
        table.add_row(
            job["id"],
            job["queue"],
            job["state"],
            str(job["attempts"]),
            str(job.get("worker_id") or "-"),
            _when(job.get("submitted")),
            f"{error.get('type', '')}: {error.get('message', '')}" if error else "",
        )
    console.print(table)


def print_job(job: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(show_header=False, title=f"job {job['id']}", title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value")
    for key in ("state", "queue", "attempts", "worker_id", "worker_uuid", "label"):
        table.add_row(key, str(job.get(key)))
    for key in ("submitted", "started", "completed", "received"):
        table.add_row(key, _when(job.get(key)))
    if job.get("after"):
        table.add_row("after", ", ".join(job["after"]))
    if job.get("error"):
        error = job["error"]
        table.add_row("error", f"{error.get('type')}: {error.get('message')}")
    elif "result" in job:
        table.add_row("result", repr(job["result"]))
    console.print(table)
    if job.get("error") and job["error"].get("traceback"):
        console.print(job["error"]["traceback"].rstrip())
