"""The JSON-RPC gateway: what a client that speaks only JSON over ZeroMQ gets.

A broker (SQLite store), one Python worker with 2 processes, a gateway and
one JSON-RPC node (tests/integration/rpc_node.py, pyzmq only):

* submit rate: one DEALER client sends ``client_new_task`` batches of 100
  no-op Python tasks, up to 10 batches in flight, until ``--tasks`` are accepted;
* done rate: the same tasks, from the first submit until the client heard
  ``task_result_ready`` for every one on the PUB socket;
* Python round trip: one REQ client submits a no-op and polls its status
  until FINISHED, one task at a time (p50/p99);
* node round trip: the same with an ``echo`` task that the node claims and
  finishes.

    python -m bench.gateway [--tasks 10000] [--round-trips 300]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import zmq
from tests.integration.procs import Cluster, corral_cmd, free_addr, wait_for
from tests.integration.rpc_client import ZmqRpc

from bench.core import pct

B = "zerotask.broker."
FINISHED = 7000


def submit_and_finish(endpoint: str, pub: str, client: str, n: int) -> tuple[float, float]:
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(pub)
    sub.setsockopt(zmq.SUBSCRIBE, f"client:{client}:".encode())
    probe = ZmqRpc(endpoint)
    sub.setsockopt(zmq.RCVTIMEO, 500)
    while True:  # until the subscription is active
        probe.call(B + "client_new_task", [client, "corral.examples:noop", []])
        try:
            sub.recv_multipart()
            break
        except zmq.Again:
            continue
    probe.close()
    sub.setsockopt(zmq.RCVTIMEO, 0)
    batches = [
        [
            {
                "jsonrpc": "2.0",
                "method": B + "client_new_task",
                "params": [client, "corral.examples:noop", []],
                "id": i,
            }
            for i in range(start, min(n, start + 100))
        ]
        for start in range(0, n, 100)
    ]
    ids: set[str] = set()
    ready: set[str] = set()
    poller = zmq.Poller()
    poller.register(sock, zmq.POLLIN)
    poller.register(sub, zmq.POLLIN)
    start = time.perf_counter()
    submitted = 0.0
    sent = in_flight = 0
    deadline = time.monotonic() + 120
    while (len(ids) < n or not ids <= ready) and time.monotonic() < deadline:
        while sent < len(batches) and in_flight < 10:
            sock.send(json.dumps(batches[sent]).encode())
            sent += 1
            in_flight += 1
        events = dict(poller.poll(1000))
        if sock in events:
            in_flight -= 1
            ids.update(answer["result"] for answer in json.loads(sock.recv()))
            if len(ids) == n:
                submitted = time.perf_counter() - start
        if sub in events:
            while True:
                try:
                    notice = json.loads(sub.recv_multipart()[1])
                except zmq.Again:
                    break
                assert notice["params"]["status"] == FINISHED
                ready.add(notice["params"]["task_id"])
    done = time.perf_counter() - start
    assert ids <= ready, f"{len(ids - ready)} result notices missing"
    sock.close()
    sub.close()
    return n / submitted, n / done


def round_trips(rpc: ZmqRpc, client: str, method: str, n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        task = rpc.call(B + "client_new_task", [client, method, []])
        while rpc.call(B + "client_task_status", [client, task]) != FINISHED:
            pass
        samples.append((time.perf_counter() - t0) * 1e3)
    return samples


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gateway", description=__doc__)
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--round-trips", type=int, default=300)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cluster = Cluster(Path(tmp), heartbeat=3.0)
        rpc_addr, pub_addr = free_addr(), free_addr()
        try:
            cluster.broker("--log-level", "warning")
            cluster.worker("--log-level", "warning", concurrency=2, imports=("corral.examples",))
            gateway = [
                "gateway",
                "--broker",
                cluster.addrs.frontend,
                "--backend",
                cluster.addrs.backend,
                "--rpc",
                rpc_addr,
                "--rpc-pub",
                pub_addr,
                "--rpc-http",
                "",
                "--log-level",
                "warning",
            ]
            cluster.start("gateway", corral_cmd(*gateway))
            node = Path(__file__).resolve().parents[1] / "tests" / "integration" / "rpc_node.py"
            proc = cluster.start(
                "node", [sys.executable, str(node), rpc_addr, pub_addr, "bench-node"]
            )
            wait_for(lambda: '"connected"' in proc.output(), what="the node")
            rpc = ZmqRpc(rpc_addr)
            client = rpc.call(B + "client_connect")
            round_trips(rpc, client, "corral.examples:noop", 50)  # warm-up
            submit_rate, done_rate = submit_and_finish(rpc_addr, pub_addr, client, args.tasks)
            python = round_trips(rpc, client, "corral.examples:noop", args.round_trips)
            node_rt = round_trips(rpc, client, "echo", args.round_trips)
            rpc.close()
        finally:
            cluster.close()
    print(f"JSON-RPC gateway, {args.tasks} no-op Python tasks in batches of 100:")
    print(f"  submitted  {submit_rate:8,.0f} tasks/s")
    print(f"  finished   {done_rate:8,.0f} tasks/s (first submit to last result notice)")
    print("round trip, one task at a time (submit, poll status until FINISHED):")
    print(f"  Python worker  p50 {pct(python, 0.5):6.2f} ms  p99 {pct(python, 0.99):6.2f} ms")
    print(f"  JSON-RPC node  p50 {pct(node_rt, 0.5):6.2f} ms  p99 {pct(node_rt, 0.99):6.2f} ms")


if __name__ == "__main__":
    main()
