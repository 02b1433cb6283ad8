"""Job streams: messages per second from one job to 1 and to 100 listeners, and the
latency a listener sees (from the job's call to the listener's receipt).

One broker, one worker with one process. The job puts log lines as fast as it
can (its buffer holds the whole burst, so nothing is dropped); TCP listeners
(the line protocol) count what they receive, from the job's start to the close. Latency is
measured with a Python listener (``client.stream``) on paced messages.

    python -m bench.streams [--messages 50000] [--latency-messages 500] [--store sqlite|memory]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from tests.integration.procs import Cluster

import corral
from corral.streams import Log


def _tcp(cluster: Cluster) -> tuple[str, int]:
    host, port = cluster.addrs.streams.removeprefix("tcp://").rsplit(":", 1)
    return host, int(port)


async def _listeners(cluster: Cluster, job_id: str, count: int, start: Path) -> list[dict]:
    host, port = _tcp(cluster)
    request = b'{"action": "listen", "stream": "' + job_id.encode() + b'"}\n'

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request)
        await reader.readline()  # the header
        return reader, writer

    async def drain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict:
        lines = 0
        last = 0.0
        tail = b""
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            last = time.perf_counter()
            lines += data.count(b"\n")
            tail = (tail + data)[-400:]
            if b'"action":"close"' in tail:
                break
        writer.close()
        overflow = b'"reason":"overflow"' in tail
        return {"messages": lines - 1, "seconds": last - began, "overflow": overflow}

    conns = await asyncio.gather(*(connect() for _ in range(count)))
    began = time.perf_counter()
    start.touch()
    return await asyncio.gather(*(drain(r, w) for r, w in conns))


def throughput(cluster: Cluster, client: corral.Client, n: int, listeners: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = Path(tmp) / "start"
        job = client.submit("bench.stream_jobs:burst", n, str(start))
        job.wait_acknowledged(30)
        results = asyncio.run(_listeners(cluster, job.id, listeners, start))
        produced = job.result(timeout=600)
    info = client.job_info(job.id)
    # Each got every message but the drops the job's own buffer reported (a log line).
    delivered = [r["messages"] for r in results if not r["overflow"]]
    seconds = max(r["seconds"] for r in results)
    per_listener = statistics.median(delivered) if delivered else 0
    return {
        "job_msgs_per_s": n / produced["seconds"],
        "per_listener_msgs": per_listener,
        "per_listener_msgs_per_s": per_listener / seconds if seconds else 0.0,
        "total_msgs_per_s": sum(delivered) / seconds if seconds else 0.0,
        "overflowed": sum(1 for r in results if r["overflow"]),
        "state": info["state"],
    }


def latency(cluster: Cluster, client: corral.Client, n: int, interval: float) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        start = Path(tmp) / "start"
        job = client.submit("bench.stream_jobs:paced", n, interval, str(start))
        samples = []
        with client.stream(job, timeout=60) as stream:
            next(stream)  # the header: listening
            start.touch()
            for message in stream:
                if isinstance(message, Log) and message.time:
                    samples.append((time.time() - message.time) * 1000)
        job.result(timeout=60)
    samples.sort()
    return {
        "p50_ms": samples[len(samples) // 2],
        "p99_ms": samples[min(len(samples) - 1, int(len(samples) * 0.99))],
        "samples": len(samples),
    }


def run(store: str, messages: int, latency_messages: int) -> None:
    extra = ("--store", "memory://") if store == "memory" else ()
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp), heartbeat=3.0)
        try:
            cluster.broker("--log-level", "warning", "--stream-queue", "100000", *extra)
            # The job's buffer holds the whole burst (the default, 10,000, would drop
            # log lines whenever the job outruns the broker: that is measured nowhere here).
            cluster.worker(
                "--log-level",
                "warning",
                "--stream-buffer",
                str(messages + 1000),
                concurrency=1,
                imports=("bench.stream_jobs",),
            )
            with corral.Client(cluster.addrs.frontend) as client:
                throughput(cluster, client, min(5000, messages), 1)  # warm-up
                for listeners in (1, 100):
                    r = throughput(cluster, client, messages, listeners)
                    print(
                        f"  streams/{store:6} {listeners:3} listener(s): "
                        f"{r['per_listener_msgs_per_s']:8.0f} msgs/s to each "
                        f"({r['total_msgs_per_s']:9.0f} msgs/s delivered in all; "
                        f"{r['per_listener_msgs']:.0f} of {messages} received each, "
                        f"{r['overflowed']} listener(s) overflowed; the job's calls ran at "
                        f"{r['job_msgs_per_s']:.0f} msgs/s)",
                        flush=True,
                    )
                lat = latency(cluster, client, latency_messages, 0.005)
                print(
                    f"  streams/{store:6} latency job -> listener: p50 {lat['p50_ms']:.2f} ms, "
                    f"p99 {lat['p99_ms']:.2f} ms ({lat['samples']} messages, one every 5 ms)",
                    flush=True,
                )
        finally:
            cluster.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.streams",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--latency-messages", type=int, default=500)
    parser.add_argument("--store", choices=("sqlite", "memory", "both"), default="both")
    args = parser.parse_args(argv)
    print("job streams: 1 broker, 1 worker x 1 process; TCP listeners count what they get")
    for store in ("sqlite", "memory") if args.store == "both" else (args.store,):
        run(store, args.messages, args.latency_messages)


if __name__ == "__main__":
    main()
