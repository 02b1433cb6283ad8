"""corral against EventMQ 0.3.13 on the same machine, in one run.

Workload: no-op jobs with results returned, one client pipelining, one
worker with 2 processes. Plus the submit-to-result latency of one
synchronous client sending one job at a time.

    python -m bench [--jobs 20000] [--latency-jobs 2000] [--skip-eventmq]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tests.integration.procs import Cluster

import corral


def corral_throughput(client: corral.Client, n: int, window: int) -> float:
    start = time.perf_counter()
    done = sum(1 for _ in client.map("corral.examples:noop", range(n), window=window))
    elapsed = time.perf_counter() - start
    assert done == n
    return n / elapsed


def corral_latency(client: corral.Client, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.submit("corral.examples:noop").result(timeout=10)
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_corral(
    jobs: int, latency_jobs: int, window: int, store: tuple[str, ...] = ()
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp), heartbeat=3.0)
        try:
            cluster.broker("--log-level", "warning", *store)
            cluster.worker("--log-level", "warning", concurrency=2, imports=("corral.examples",))
            with corral.Client(cluster.addrs.frontend) as client:
                corral_throughput(client, min(2000, jobs), window)  # warm-up
                rates = [corral_throughput(client, jobs, window) for _ in range(3)]
                corral_latency(client, 200)  # warm-up
                lat = corral_latency(client, latency_jobs)
        finally:
            cluster.close()
    return {
        "jobs_per_s": statistics.median(rates),
        "jobs_per_s_min": min(rates),
        "jobs_per_s_max": max(rates),
        "p50_ms": pct(lat, 0.50),
        "p99_ms": pct(lat, 0.99),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--latency-jobs", type=int, default=2_000)
    parser.add_argument("--window", type=int, default=1_000)
    parser.add_argument("--eventmq-jobs", type=int, default=5_000)
    parser.add_argument("--skip-eventmq", action="store_true")
    args = parser.parse_args(argv)

    print(
        f"corral: {args.jobs} no-op jobs with results, 1 pipelining client "
        f"(window {args.window}), 1 worker x 2 processes"
    )
    results = {}
    for name, store in (("sqlite", ()), ("memory", ("--store", "memory://"))):
        c = results[name] = run_corral(args.jobs, args.latency_jobs, args.window, store)
        print(
            f"  corral/{name:6} throughput {c['jobs_per_s']:7.0f} jobs/s "
            f"(median of 3; min {c['jobs_per_s_min']:.0f}, max {c['jobs_per_s_max']:.0f}); "
            f"latency p50 {c['p50_ms']:.3f} ms, p99 {c['p99_ms']:.3f} ms "
            f"({args.latency_jobs} jobs, one synchronous client)"
        )
    ratio = results["sqlite"]["jobs_per_s"] / results["memory"]["jobs_per_s"]
    print(f"  sqlite store reaches {ratio:.0%} of the in-memory store's throughput")
    c = results["sqlite"]
    if args.skip_eventmq:
        return
    try:
        from bench.emq_baseline import measure_eventmq
    except ImportError as exc:
        print(f"  eventmq  not measured: {exc}", file=sys.stderr)
        return
    e = measure_eventmq(args.eventmq_jobs, processes=2)
    rate = e["jobs_per_s"]
    print(
        f"  eventmq  throughput {rate:9.0f} jobs/s ({args.eventmq_jobs} jobs; "
        f"{e.get('method', 'end to end')})"
    )
    print(f"  ratio    corral (sqlite) / eventmq = {c['jobs_per_s'] / rate:.1f}x")
