"""``corral tail JOB``: follow a job's stream in the terminal.

Shows a progress bar (rich) and the job's log lines as they come, then the
outcome; the exit code is 0 if the job succeeded and 1 otherwise. With
``--json`` every message is printed as one JSON object per line instead.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from corral.client.streams import JobStream
from corral.streams.messages import Close, Gap, Header, Log, Message, Partial
from corral.streams.messages import Progress as ProgressMessage

_STYLES = {"debug": "dim", "info": "", "warning": "yellow", "error": "red", "critical": "bold red"}


def as_json(message: Message) -> dict[str, Any]:
    """A message as a JSON object with its ``kind``."""
    data = dataclasses.asdict(message)
    return {"kind": type(message).__name__.lower(), **data}


def follow(address: str, job_id: str, after: int | None, raw: bool) -> int:
    """Print job ``job_id``'s stream until it ends; return the exit code (0: succeeded)."""
    console = Console(stderr=False, highlight=False)
    bar = None if raw else _bar(console)
    task = None if bar is None else bar.add_task(job_id[:12], total=None, units="")
    close: Close | None = None
    try:
        if bar is not None:
            bar.start()
        while close is None:
            with JobStream(address, job_id, after) as stream:
                for message in stream:
                    if raw:
                        print(json.dumps(as_json(message), default=str), flush=True)
                    else:
                        assert bar is not None and task is not None
                        _show(bar, task, message)
                    if isinstance(message, Close):
                        close = message
                after = stream.last_seq
            if close is not None and close.seq is None and close.reason == "overflow":
                # This terminal fell behind: listen again from where it was.
                if bar is not None:
                    bar.console.print("[yellow]fell behind the stream; catching up[/]")
                close = None
    except KeyboardInterrupt:
        return 130
    finally:
        if bar is not None:
            bar.stop()
    if not raw:
        _outcome(console, close)
    return 0 if close.state == "succeeded" else 1


def _bar(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[units]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def _set_progress(bar: Progress, task: Any, p: ProgressMessage | None) -> None:
    if p is not None:
        bar.update(task, completed=p.done, total=p.total, units=p.units or "")


def _show(bar: Progress, task: Any, message: Message) -> None:
    out = bar.console
    if isinstance(message, Header):
        _set_progress(bar, task, message.progress)
        if message.value is not None:
            out.print(f"[bold]header[/] {json.dumps(message.value, default=str)}")
    elif isinstance(message, ProgressMessage):
        _set_progress(bar, task, message)
    elif isinstance(message, Log):
        style = _STYLES.get(message.level, "")
        where = f"{message.logger}: " if message.logger else ""
        text = f"{where}{message.text}"
        out.print(f"[{style}]{text}[/]" if style else text, markup=bool(style))
    elif isinstance(message, Partial):
        out.print(f"[cyan]partial[/] {json.dumps(message.value, default=str)}")
    elif isinstance(message, Gap):
        out.print(f"[yellow]messages {message.after + 1}..{message.first - 1} are gone[/]")
    bar.refresh()


def _outcome(console: Console, close: Close | None) -> None:
    if close is None:
        return
    outcome = close.outcome or {}
    if close.state == "succeeded":
        console.print(f"[green]succeeded[/] {json.dumps(outcome.get('value'), default=str)}")
    elif close.seq is None:
        console.print(f"[red]stream closed: {close.reason}[/]")
    else:
        error = outcome.get("error") or {}
        console.print(
            f"[red]{close.state}[/] {error.get('type', '')}: {error.get('message', '')}",
            highlight=False,
        )
