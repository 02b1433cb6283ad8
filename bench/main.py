"""corral side by side with the peers users would pick instead, on the same machine, in one run.

Systems: corral (SQLite store, and --store memory://), Celery (Redis; RabbitMQ),
Dramatiq (RabbitMQ; Redis), RQ, Huey and EventMQ 0.3.13. Workloads, each with
the same number of worker processes per system:

  throughput  20,000 no-op jobs, results not awaited, 2 worker processes
  results     20,000 no-op jobs, each result fetched by the client, 2 processes
  latency     one synchronous client, 2,000 jobs one at a time: p50/p99
  mixed       2,000 jobs sleeping 10 ms, 8 execution slots

Every figure is the median of 3 runs (min and max shown). Each system runs in
its own runner process (corral in corral's environment, the peers in
.venv-bench) with a time limit; a run that reaches its cap counts what
completed. The benchmark starts its own redis-server on a free loopback port
and uses RabbitMQ on 127.0.0.1:5672 (guest/guest) when it answers, with
queue names of its own that it deletes afterwards.

    python -m bench [--quick] [--systems corral,celery-redis,...] [--runs 3]

`make bench` installs the peers and runs the full sizes; --quick runs small
ones for development (results in bench/results/quick.*).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

from bench import report
from bench.procs import (
    LOOPBACK,
    ROOT,
    Service,
    free_port,
    kill_group,
    kill_recorded_groups,
    port_open,
    wait_until,
)
from bench.systems import SYSTEMS, Spec
from bench.workloads import workloads

RESULTS = ROOT / "bench" / "results"
PEER_PYTHON = ROOT / ".venv-bench" / "bin" / "python"
RABBITMQ = (LOOPBACK, 5672)
#: Seconds a runner gets beyond its workloads' caps: start-ups, restarts, warm-ups.
RUNNER_SLACK = 150.0


def start_redis(workdir: Path) -> tuple[Service | None, str]:
    """The benchmark's own redis-server on a free loopback port: (service, url or reason)."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None, "no redis-server on PATH"
    port = free_port()
    service = Service(
        "redis-server",
        [
            binary,
            "--bind",
            LOOPBACK,
            "--port",
            str(port),
            # In memory only, as a benchmark box is usually run: generous to the Redis peers.
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        workdir,
    )
    try:
        wait_until(lambda: port_open(LOOPBACK, port, 0.2), 15, "redis-server", procs=[service])
    except (RuntimeError, TimeoutError) as exc:
        service.stop()
        return None, f"redis-server did not start: {exc}"
    return service, f"redis://{LOOPBACK}:{port}/0"


def rabbitmq_version(host: str, port: int) -> str:
    """The server's version, read off the AMQP handshake (nothing is declared)."""
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.sendall(b"AMQP\x00\x00\x09\x01")
            data = s.recv(4096)
    except OSError:
        return "?"
    # Connection.Start's server-properties table: "version" as a long string.
    found = re.search(rb"versionS\x00\x00\x00.([0-9][0-9a-z.+-]*)", data, re.S)
    return found.group(1).decode() if found else "?"


def corral_revision() -> str:
    try:
        version = metadata.version("corral")
    except metadata.PackageNotFoundError:
        version = "?"
    done = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    )
    commit = done.stdout.strip() if done.returncode == 0 else "unknown"
    return f"{version} (commit {commit})"


def system_budget(runs: int, quick: bool) -> float:
    return sum((runs + 1) * w.cap for w in workloads(quick)) + RUNNER_SLACK


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.started = time.time()
        self.deadline = self.started + args.budget
        self.env: dict[str, str] = {}
        self.missing: dict[str, str] = {}
        self.redis: Service | None = None
        self.current: subprocess.Popen[bytes] | None = None
        self.current_pgids: Path | None = None

    def services(self) -> dict[str, str]:
        """Start Redis, look for RabbitMQ; returns what each is (for the report)."""
        found: dict[str, str] = {}
        self.redis, url = start_redis(self.workdir)
        if self.redis is None:
            self.missing["redis"] = url
            found["redis"] = f"not available: {url}"
        else:
            self.env["BENCH_REDIS_URL"] = url
            version = subprocess.run(
                ["redis-server", "--version"], capture_output=True, text=True
            ).stdout.split()
            found["redis"] = (
                f"{' '.join(version[:3])} on {url}, no persistence (--save '' --appendonly no)"
            )
        if port_open(*RABBITMQ):
            self.env["BENCH_AMQP_URL"] = f"amqp://guest:guest@{RABBITMQ[0]}:{RABBITMQ[1]}//"
            found["rabbitmq"] = (
                f"RabbitMQ {rabbitmq_version(*RABBITMQ)}, the machine's, on "
                f"{RABBITMQ[0]}:{RABBITMQ[1]} (guest); queues named corral-bench-*, deleted "
                "afterwards"
            )
        else:
            self.missing["rabbitmq"] = f"RabbitMQ not reachable on {RABBITMQ[0]}:{RABBITMQ[1]}"
            found["rabbitmq"] = f"not available: {self.missing['rabbitmq']}"
        return found

    def python_for(self, spec: Spec) -> tuple[str | None, str]:
        if spec.env == "corral":
            return sys.executable, ""
        peer = Path(self.args.peer_python)
        if not peer.exists():
            return None, f"{peer} not found: `make bench` installs the peers there"
        return str(peer), ""

    def run_system(self, spec: Spec) -> dict[str, Any]:
        base: dict[str, Any] = {"system": spec.name, "label": spec.label, "workloads": {}}
        for need in spec.needs:
            if need in self.missing:
                return {**base, "error": f"not set up: {self.missing[need]}"}
        python, why = self.python_for(spec)
        if python is None:
            return {**base, "error": f"not set up: {why}"}
        remaining = self.deadline - time.time()
        if remaining < 60:
            return {**base, "error": "not measured: the overall time budget ran out"}
        limit = min(system_budget(self.args.runs, self.args.quick), remaining)
        print(f"  (at most {limit:.0f} s)", flush=True)
        out = self.workdir / f"{spec.name}.json"
        pgids = self.workdir / f"{spec.name}.pgids"
        log = self.workdir / f"{spec.name}.runner.log"
        argv = [
            python,
            "-m",
            "bench.runner",
            "--system",
            spec.name,
            "--out",
            str(out),
            "--workdir",
            str(self.workdir / spec.name),
            "--runs",
            str(self.args.runs),
            "--deadline",
            str(time.time() + limit - 20),
        ]
        if self.args.quick:
            argv.append("--quick")
        env = {
            **os.environ,
            **self.env,
            "BENCH_PGID_FILE": str(pgids),
            "BENCH_PREFIX": f"corral-bench-{uuid.uuid4().hex[:8]}",
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
        }
        timed_out = False
        with open(log, "wb") as log_file:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=ROOT,
                start_new_session=True,
            )
            self.current, self.current_pgids = proc, pgids
            try:
                proc.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                self.stop_current()
        try:
            result = json.loads(out.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            tail = log.read_text(errors="replace")[-1500:] if log.exists() else ""
            return {**base, "error": f"runner failed (exit {proc.returncode}): {tail}"}
        if timed_out:
            result["error"] = result.get("error") or f"stopped at its time limit ({limit:.0f} s)"
        if proc.returncode not in (0, None) and not result.get("error"):
            result["error"] = f"runner exited with {proc.returncode}; see {log.name}"
        return result

    def stop_current(self) -> None:
        """Stop the running runner (it stops its services), then anything it left."""
        proc, pgids = self.current, self.current_pgids
        self.current = self.current_pgids = None
        if proc is not None:
            # SIGTERM lets the runner stop its services and write its report.
            kill_group(proc.pid, grace=20.0)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        if pgids is not None:
            kill_recorded_groups(pgids)

    def close(self) -> None:
        self.stop_current()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> None:
    # SIGTERM (a CI timeout, `kill`) stops like Ctrl-C: the services started in
    # sessions of their own (redis-server, the runners) are stopped, not left behind.
    signal.signal(signal.SIGTERM, _interrupted)
    names = [s.name for s in SYSTEMS]
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, for development")
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (default 3)")
    parser.add_argument(
        "--systems", default=",".join(names), help=f"comma-separated, of: {', '.join(names)}"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole benchmark (default 2400, quick 900)",
    )
    parser.add_argument("--peer-python", default=str(PEER_PYTHON))
    parser.add_argument("--out", type=Path, default=None, help="results file stem")
    args = parser.parse_args(argv)
    if args.runs < 3:
        parser.error("each figure is the median of at least 3 runs")
    if args.budget is None:
        args.budget = 900.0 if args.quick else 2400.0
    chosen = [x.strip() for x in args.systems.split(",") if x.strip()]
    unknown = [x for x in chosen if x not in names]
    if unknown:
        parser.error(f"unknown systems: {', '.join(unknown)}")
    stem = args.out or RESULTS / ("quick" if args.quick else "latest")
    stem.parent.mkdir(parents=True, exist_ok=True)

    specs = [s for s in SYSTEMS if s.name in chosen]
    with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
        bench = Bench(args, Path(tmp))
        results: dict[str, Any] = {
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "machine": report.machine(),
            "corral": corral_revision(),
            "quick": args.quick,
            "runs": args.runs,
            "workloads": [w.__dict__ for w in workloads(args.quick)],
            "systems": [],
        }
        try:
            results["services"] = bench.services()
            report.print_header(results)
            for spec in specs:
                print(f"\n== {spec.label} ({spec.name})", flush=True)
                t0 = time.monotonic()
                result = bench.run_system(spec)
                result["seconds"] = round(time.monotonic() - t0, 1)
                results["systems"].append(result)
                report.print_system(result)
        except KeyboardInterrupt:
            print("\ninterrupted: stopping what was started", file=sys.stderr)
            results["interrupted"] = True
            done = {r["system"] for r in results["systems"]}
            results["systems"] += [
                {"system": s.name, "label": s.label, "workloads": {}, "error": "interrupted"}
                for s in specs
                if s.name not in done
            ]
        finally:
            # A second Ctrl-C must not cut the clean-up short.
            previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
            bench.close()
            signal.signal(signal.SIGINT, previous)
            results["seconds"] = round(time.time() - bench.started, 1)
            stem.with_suffix(".json").write_text(json.dumps(results, indent=2))
        tables = report.tables(results)
        print("\n" + tables.text)
        stem.with_suffix(".md").write_text(tables.markdown)
        chart = stem.with_suffix(".png")
        made = report.chart(args.peer_python, stem.with_suffix(".json"), chart)
        print(f"\nresults: {stem.with_suffix('.json')}, {stem.with_suffix('.md')}", end="")
        print(f", {chart}" if made else f" (no chart: {made.reason})")
        print(f"total {results['seconds']:.0f} s")
        if results.get("interrupted"):
            raise SystemExit(130)
