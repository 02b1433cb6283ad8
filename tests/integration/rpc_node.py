"""A zerotask node written with nothing but pyzmq and json (no corral imports).

It connects, subscribes to its offers on the PUB socket, claims each offered
task, runs it and reports the end; it heartbeats between calls. It prints
one JSON line per event (``connected``, ``claimed``, ``finished``, ``failed``,
``refused`` when the gateway no longer wants the outcome).

    python rpc_node.py RPC PUB NODE_ID [--methods echo,add,fail,sleep] [--slots N] [--spec]

With ``--spec`` it calls ``node_task_request``, ``node_task_finished`` and
``node_task_failed`` with the spec's params (no node id: the gateway knows
the node by the socket that connected it); without, with the node id first.

Methods: ``echo`` returns its params, ``add`` sums them (or their values), ``fail`` fails with
code 17, ``sleep`` sleeps params[0] seconds (heartbeating meanwhile) and
returns the node id.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from typing import Any

import zmq

BROKER = "zerotask.broker."


class Node:
    def __init__(
        self, rpc: str, pub: str, node_id: str, heartbeat: float, spec: bool = False
    ) -> None:
        self.context = zmq.Context()
        self.req = self.context.socket(zmq.REQ)
        self.req.setsockopt(zmq.RCVTIMEO, 15_000)
        self.req.setsockopt(zmq.LINGER, 0)
        self.req.connect(rpc)
        self.sub = self.context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.LINGER, 0)
        self.sub.connect(pub)
        self.sub.setsockopt(zmq.SUBSCRIBE, f"node:{node_id}:".encode())
        self.node_id = node_id
        self.heartbeat = heartbeat
        self.me = [] if spec else [node_id]  # what leads the task calls' params
        self.last_call = 0.0
        self.ids = itertools.count(1)

    def call(self, method: str, params: Any) -> Any:
        request = {"jsonrpc": "2.0", "method": BROKER + method, "params": params}
        request["id"] = next(self.ids)
        self.req.send(json.dumps(request).encode())
        answer = json.loads(self.req.recv())
        self.last_call = time.monotonic()
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def beat(self) -> None:
        if time.monotonic() - self.last_call >= self.heartbeat:
            self.call("node_heartbeat", [self.node_id])

    def run_task(self, method: str, params: Any) -> tuple[bool, Any]:
        if method == "echo":
            return True, params
        if method == "add":
            return True, sum(params.values() if isinstance(params, dict) else params)
        if method == "fail":
            return False, {"code": 17, "message": f"{self.node_id} refuses", "data": params}
        if method == "sleep":
            end = time.monotonic() + float(params[0])
            while time.monotonic() < end:
                time.sleep(0.05)
                self.beat()
            return True, self.node_id
        return False, {"code": -32601, "message": f"no method {method}"}

    def serve(self, methods: list[str], slots: int) -> None:
        named = {"node_id": self.node_id, "methods": methods, "slots": slots}
        self.call("node_connect", named)
        emit("connected", node=self.node_id)
        poller = zmq.Poller()
        poller.register(self.sub, zmq.POLLIN)
        while True:
            events = dict(poller.poll(int(self.heartbeat * 1000)))
            self.beat()
            if self.sub not in events:
                continue
            _topic, payload = self.sub.recv_multipart()
            notice = json.loads(payload)
            if notice.get("method") != "zerotask.node.broker_new_task":
                continue
            method, task_id = notice["params"]
            task = self.call("node_task_request", [*self.me, task_id])
            if not task:
                continue  # another node has it, or an offer we already took
            emit("claimed", task=task_id, method=task["method"])
            try:
                ok, value = self.run_task(task["method"], task["params"])
            except Exception as exc:  # noqa: BLE001 - the client hears about it
                ok, value = False, {"code": -32000, "message": repr(exc)}
            try:
                if ok:
                    self.call("node_task_finished", [*self.me, task_id, value])
                    emit("finished", task=task_id)
                else:
                    self.call("node_task_failed", [*self.me, task_id, value])
                    emit("failed", task=task_id)
            except RuntimeError as exc:  # taken back meanwhile (cancelled, say)
                emit("refused", task=task_id, error=str(exc))


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rpc")
    parser.add_argument("pub")
    parser.add_argument("node_id")
    parser.add_argument("--methods", default="echo,add,fail,sleep")
    parser.add_argument("--slots", type=int, default=1)
    parser.add_argument("--heartbeat", type=float, default=0.3)
    parser.add_argument("--spec", action="store_true", help="the spec's arity (no node id)")
    args = parser.parse_args()
    node = Node(args.rpc, args.pub, args.node_id, args.heartbeat, args.spec)
    node.serve(args.methods.split(","), args.slots)


if __name__ == "__main__":
    sys.exit(main())
