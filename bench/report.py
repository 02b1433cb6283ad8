"""Turning runner reports into what a person reads: progress lines, tables, targets, the chart."""

from __future__ import annotations

import os
import platform
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.procs import ROOT

#: Table columns: (workload, metric, heading, better when higher).
COLUMNS = [
    ("throughput", "jobs_per_s", "1 throughput jobs/s", True),
    ("results", "jobs_per_s", "2 with results jobs/s", True),
    ("latency", "p50_ms", "3 latency p50 ms", False),
    ("latency", "p99_ms", "3 latency p99 ms", False),
    ("mixed", "jobs_per_s", "4 mixed jobs/s", True),
]
CORRAL = ("corral", "corral-memory")


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def print_header(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(f"machine: {m['cpus']} CPUs, {m['platform']}, load {m['load_average_at_start']}")
    print(f"corral: {results.get('corral', '?')}")
    for name, what in results.get("services", {}).items():
        print(f"{name}: {what}")
    print(f"workloads (each figure: median of {results['runs']} runs, min-max):")
    for w in results["workloads"]:
        extra = f", {w['sleep'] * 1000:.0f} ms sleep" if w["sleep"] else ""
        print(
            f"  {w['name']:10} {w['jobs']:>6} jobs, {w['slots']} slots{extra}, "
            f"cap {w['cap']:.0f} s per run: {w['title']}"
        )


def _num(value: float, metric: str) -> str:
    if metric.endswith("_ms"):
        return f"{value:.2f}" if value < 100 else f"{value:,.0f}"
    return f"{value:,.0f}"


def cell(result: dict[str, Any], workload: str, metric: str) -> str:
    """``median (min-max)`` with ``*`` when a run was cut at its cap, or why there is none."""
    entry = result.get("workloads", {}).get(workload)
    if entry is None:
        error = result.get("error") or ""
        for kind in ("not set up", "not measured", "interrupted"):
            if error.startswith(kind):
                return kind
        return "failed" if error else "-"
    if entry["status"] == "unsupported":
        return "n/a"
    figure = entry.get("summary", {}).get(metric)
    if figure is None:
        return "failed" if entry["status"] == "failed" else "-"
    star = "*" if entry["summary"].get("capped_runs") else ""
    if entry["status"] == "failed":
        star += "!"
    return (
        f"{_num(figure['median'], metric)}{star} "
        f"({_num(figure['min'], metric)}-{_num(figure['max'], metric)})"
    )


def median(result: dict[str, Any], workload: str, metric: str) -> float | None:
    entry = result.get("workloads", {}).get(workload) or {}
    figure = entry.get("summary", {}).get(metric)
    return None if figure is None else float(figure["median"])


def print_system(result: dict[str, Any]) -> None:
    for key, value in result.get("settings", {}).items():
        print(f"  {key:9} {value}")
    for workload, metric, heading, _ in COLUMNS:
        print(f"  {heading:24} {cell(result, workload, metric)}")
    for name, entry in result.get("workloads", {}).items():
        if entry.get("reason"):
            print(f"  {name}: {entry['status']}: {entry['reason']}")
    if result.get("error"):
        print(f"  error: {result['error']}")
    print(f"  ({result.get('seconds', 0):.0f} s)", flush=True)


@dataclass
class Tables:
    text: str
    markdown: str


def _ratio(corral: float | None, peer: float | None, higher: bool) -> str:
    if corral is None or peer is None or corral <= 0 or peer <= 0:
        return "-"
    r = corral / peer if higher else peer / corral
    return f"{r:.2f}x"


def tables(results: dict[str, Any]) -> Tables:
    systems = results["systems"]
    head = ["system", *(c[2] for c in COLUMNS)]
    rows = [[s["label"], *(cell(s, w, m) for w, m, _, _ in COLUMNS)] for s in systems]

    by_name = {s["system"]: s for s in systems}
    ratio_head = ["corral / peer", *(c[2].rsplit(" ", 1)[0] for c in COLUMNS)]
    ratio_rows = []
    for s in systems:
        if s["system"] in CORRAL:
            continue
        row = [s["label"]]
        for w, m, _, higher in COLUMNS:
            peer = median(s, w, m)
            parts = [_ratio(median(by_name[c], w, m), peer, higher) for c in CORRAL if c in by_name]
            row.append(" / ".join(parts))
        ratio_rows.append(row)

    notes = _notes(results)
    targets = _targets(systems)
    text = "\n".join(
        [
            _text_table(head, rows),
            "",
            "corral's ratio to each peer (SQLite / memory store; above 1x corral is ahead: "
            "jobs/s corral/peer, latency peer/corral):",
            _text_table(ratio_head, ratio_rows),
            "",
            *notes,
            "",
            *targets,
        ]
    )
    markdown = "\n".join(
        [
            _md_table(head, rows),
            "",
            "corral's ratio to each peer (SQLite / memory store; above 1x corral is ahead):",
            "",
            _md_table(ratio_head, ratio_rows),
            "",
            *(f"{n}  " for n in notes),
        ]
    )
    return Tables(text, markdown)


def _notes(results: dict[str, Any]) -> list[str]:
    notes = [
        f"Each cell: median of {results['runs']} runs (min-max). * a run reached its time cap; "
        "the rate counts the jobs completed until then. n/a: the system cannot do this."
    ]
    for s in results["systems"]:
        if s.get("error"):
            notes.append(f"{s['label']}: {s['error']}")
        for name, entry in s.get("workloads", {}).items():
            if entry.get("reason"):
                notes.append(f"{s['label']}, {name}: {entry['status']}: {entry['reason']}")
    return notes


def _targets(systems: list[dict[str, Any]]) -> list[str]:
    corral = next((s for s in systems if s["system"] == "corral"), None)
    if corral is None:
        return []
    lines = ["targets for corral (SQLite store) against every peer measured:"]
    for w, m, heading, higher in (COLUMNS[0], COLUMNS[1], COLUMNS[2]):
        mine = median(corral, w, m)
        peers = [(median(s, w, m), s["label"]) for s in systems if s["system"] not in CORRAL]
        peers = [(v, label) for v, label in peers if v is not None]
        if mine is None or not peers:
            lines.append(f"  {heading}: not measured")
            continue
        best, label = max(peers) if higher else min(peers)
        met = mine > best if higher else mine < best
        lines.append(
            f"  {heading}: corral {_num(mine, m)}, best peer {label} {_num(best, m)}: "
            + ("met" if met else "MISSED")
        )
    return lines


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)), line]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


class Made:
    def __init__(self, ok: bool, reason: str = "") -> None:
        self.ok, self.reason = ok, reason

    def __bool__(self) -> bool:
        return self.ok


def chart(python: str, results: Path, png: Path) -> Made:
    """Draw the bar chart with matplotlib, which lives in the peers' environment."""
    if not Path(python).exists():
        return Made(False, f"{python} not found")
    done = subprocess.run(
        [python, "-m", "bench.chart", str(results), str(png)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"},
        timeout=120,
    )
    if done.returncode != 0:
        return Made(False, done.stderr.strip().splitlines()[-1] if done.stderr else "failed")
    return Made(True)
