"""Bar chart of a benchmark's results: ``python -m bench.chart RESULTS.json OUT.png``.

One panel per figure (throughput, with results, p50 latency, mixed); one bar
per system at its median, with a min-max whisker. Runs in the peers'
environment, where matplotlib is installed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [
    ("throughput", "jobs_per_s", "1. throughput, results not awaited (jobs/s, higher is better)"),
    ("results", "jobs_per_s", "2. throughput, each result fetched (jobs/s, higher is better)"),
    ("latency", "p50_ms", "3. latency p50, one job at a time (ms, log scale, lower is better)"),
    ("mixed", "jobs_per_s", "4. mixed: 10 ms jobs on 8 slots (jobs/s, higher is better)"),
]


def draw(results: dict[str, Any], out: Path) -> None:
    systems = results["systems"]
    labels = [s["label"] for s in systems]
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(11, 3.2 * len(PANELS)))
    for ax, (workload, metric, title) in zip(axes, PANELS, strict=True):
        values, lows, highs, colors, notes = [], [], [], [], []
        for s in systems:
            entry = s.get("workloads", {}).get(workload) or {}
            figure = entry.get("summary", {}).get(metric)
            corral = s["system"].startswith("corral")
            colors.append("#2a7ab0" if corral else "#9a9a9a")
            if figure is None:
                values.append(0.0)
                lows.append(0.0)
                highs.append(0.0)
                notes.append("n/a" if entry.get("status") == "unsupported" else "not measured")
            else:
                m = figure["median"]
                values.append(m)
                lows.append(m - figure["min"])
                highs.append(figure["max"] - m)
                notes.append("*" if entry["summary"].get("capped_runs") else "")
        y = range(len(systems))
        ax.barh(y, values, xerr=[lows, highs], color=colors, capsize=3)
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(title, fontsize=10, loc="left")
        if metric.endswith("_ms"):
            ax.set_xscale("log")
        left = ax.get_xlim()[0]
        for i, (v, high, note) in enumerate(zip(values, highs, notes, strict=True)):
            text = f"{v:,.2f}" if metric.endswith("_ms") else f"{v:,.0f}"
            if v == 0:
                text = note
            elif note:
                text += " " + note
            # Past the whisker, so the label never sits on it.
            ax.text(v + high if v else left, i, "  " + text, va="center", fontsize=7)
        ax.margins(x=0.12)
        ax.grid(axis="x", alpha=0.3)
    machine = results.get("machine", {})
    fig.suptitle(
        f"corral and its peers, {machine.get('cpus', '?')} CPUs, median of "
        f"{results.get('runs', 3)} runs (whiskers: min-max; * cut at the time cap)",
        fontsize=11,
    )
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: python -m bench.chart RESULTS.json OUT.png")
    draw(json.loads(Path(sys.argv[1]).read_text()), Path(sys.argv[2]))


if __name__ == "__main__":
    main()
