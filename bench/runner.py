"""Measure one system on every workload: ``python -m bench.runner --system NAME --out FILE``.

The orchestrator (``python -m bench``) starts one runner per system, in the
environment that system needs, and reads its JSON report from ``--out``. The
report is rewritten after every run, so what was measured survives a runner
that is stopped at its time limit. SIGTERM and SIGINT stop the system's
processes before the runner exits.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
import traceback
from pathlib import Path
from typing import Any

from bench.procs import terminate_as_exit
from bench.systems import BY_NAME
from bench.systems.base import Adapter, Context
from bench.workloads import METRICS, Workload, run_once, summarise, workloads

#: Seconds a first job may take to come back after a system starts.
READY_TIMEOUT = 60.0


def write(path: Path, report: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, path)


def short(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:300]


class Runner:
    def __init__(self, adapter: Adapter, report: dict[str, Any], out: Path, args: Any) -> None:
        self.adapter = adapter
        self.report = report
        self.out = out
        self.runs = args.runs
        self.deadline = args.deadline
        self.counter = adapter.ctx.workdir / "ticks"

    def ready(self) -> None:
        """One job through the freshly started system proves it is up."""
        ready = Workload("ready", "", 1, self.adapter.slots, READY_TIMEOUT)
        out = run_once(self.adapter, ready, 1, self.counter)
        if out["capped"]:
            self.adapter.check()
            raise TimeoutError(f"a first job did not run within {READY_TIMEOUT:.0f} s")

    def ensure_started(self, slots: int) -> None:
        if self.adapter.slots == slots:
            return
        self.adapter.stop()
        self.adapter.start(slots)
        self.ready()

    def restart(self) -> None:
        slots = self.adapter.slots
        self.adapter.stop()
        self.adapter.start(slots)
        self.ready()

    def measure(self, w: Workload) -> dict[str, Any]:
        entry: dict[str, Any] = {"status": "ok", "jobs": w.jobs, "slots": w.slots, "runs": []}
        self.report["workloads"][w.name] = entry
        if (w.results or w.latency) and self.adapter.no_results:
            entry.update(status="unsupported", reason=self.adapter.no_results)
            return entry
        # A workload needs at most runs x (warm-up + run) caps; do not start what cannot end.
        need = (self.runs + 1) * w.cap + 30
        if self.deadline and time.time() + need > self.deadline:
            entry.update(status="not measured", reason="the overall time budget ran out")
            return entry
        try:
            self.ensure_started(w.slots)
            warm = run_once(self.adapter, w, w.warmup, self.counter)
            entry["warmup"] = warm
            if warm["capped"]:
                # A slow system: what the warm-up left queued must not count in run 1.
                self.restart()
            for i in range(self.runs):
                self.adapter.check()
                out = run_once(self.adapter, w, w.jobs, self.counter)
                entry["runs"].append(out)
                write(self.out, self.report)
                if out["capped"] and i + 1 < self.runs:
                    # Jobs left over from a cut-short run would count in the next one.
                    self.restart()
            self.adapter.check()
            if out["capped"]:
                self.adapter.stop()
        except Exception as exc:
            traceback.print_exc()
            entry.update(status="failed", reason=short(exc))
            self.adapter.stop()
        if entry["runs"]:
            entry["summary"] = summarise(entry["runs"], METRICS[w.name])
        return entry


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.runner", description=__doc__)
    parser.add_argument("--system", required=True, choices=sorted(BY_NAME))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help="comma-separated workload names")
    parser.add_argument("--deadline", type=float, default=0.0, help="epoch seconds")
    args = parser.parse_args(argv)

    spec = BY_NAME[args.system]
    args.workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "system": spec.name,
        "label": spec.label,
        "settings": {},
        "workloads": {},
        "error": None,
    }
    write(args.out, report)
    adapter: Adapter | None = None
    with terminate_as_exit():
        try:
            module = importlib.import_module(spec.module)
            adapter = module.ADAPTER(Context(args.workdir, dict(spec.options)))
            report["settings"] = adapter.settings()
            write(args.out, report)
            runner = Runner(adapter, report, args.out, args)
            only = {x for x in args.only.split(",") if x}
            for w in workloads(args.quick):
                if not only or w.name in only:
                    runner.measure(w)
                    write(args.out, report)
        except BaseException as exc:
            traceback.print_exc()
            report["error"] = short(exc)
            raise
        finally:
            if adapter is not None:
                adapter.close()
            write(args.out, report)


if __name__ == "__main__":
    main()
