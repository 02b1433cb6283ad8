"""A zerotask client written with nothing but pyzmq, json and urllib (no corral imports).

As a program it connects, submits the tasks named on the command line, polls
their status until they end, reads each result twice and prints one JSON
object; tests also use its two small transport classes directly.

    python rpc_client.py (--zmq ENDPOINT | --http URL) [--guarantee] METHOD=JSON_PARAMS...
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import urllib.request
from typing import Any

import zmq

FINISHED, FAILED = 7000, 9000


class RpcFailed(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(f"{error.get('code')}: {error.get('message')}")
        self.code = error.get("code")
        self.error = error


class ZmqRpc:
    """JSON-RPC over a REQ socket."""

    def __init__(self, endpoint: str, timeout: float = 15.0) -> None:
        self.context = zmq.Context()
        self.sock = self.context.socket(zmq.REQ)
        self.sock.setsockopt(zmq.RCVTIMEO, int(timeout * 1000))
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(endpoint)
        self.ids = itertools.count(1)

    def send_raw(self, data: bytes) -> bytes:
        self.sock.send(data)
        return self.sock.recv()

    def message(self, message: Any) -> Any:
        answer = self.send_raw(json.dumps(message).encode())
        return json.loads(answer) if answer else None

    def call(self, method: str, params: Any = ()) -> Any:
        return _result(self.message(_request(method, params, next(self.ids))))

    def close(self) -> None:
        self.sock.close()
        self.context.term()


class HttpRpc:
    """JSON-RPC over HTTP POST."""

    def __init__(self, url: str, timeout: float = 15.0) -> None:
        self.url = url
        self.timeout = timeout
        self.ids = itertools.count(1)

    def post(self, data: bytes, path: str = "") -> tuple[int, bytes]:
        url = self.url + path
        request = urllib.request.Request(
            url, data=data, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read()

    def message(self, message: Any) -> Any:
        status, body = self.post(json.dumps(message).encode())
        assert status in (200, 204), (status, body)
        return json.loads(body) if body else None

    def call(self, method: str, params: Any = ()) -> Any:
        return _result(self.message(_request(method, params, next(self.ids))))

    def close(self) -> None:
        pass


def _request(method: str, params: Any, id_: int) -> dict[str, Any]:
    if isinstance(params, tuple):
        params = list(params)
    return {"jsonrpc": "2.0", "method": method, "params": params, "id": id_}


def _result(answer: dict[str, Any]) -> Any:
    if "error" in answer:
        raise RpcFailed(answer["error"])
    return answer["result"]


def run(rpc: ZmqRpc | HttpRpc, tasks: list[tuple[str, Any]], guarantee: bool) -> dict[str, Any]:
    broker = "zerotask.broker."
    client = rpc.call(broker + "client_connect")
    ids = []
    for method, params in tasks:
        named = {"client_id": client, "method": method, "params": params}
        if guarantee:
            named["guarantee"] = True
        ids.append(rpc.call(broker + "client_new_task", named))
    print(json.dumps({"submitted": ids}), flush=True)
    deadline = time.monotonic() + 60
    statuses: dict[str, int] = {}
    while time.monotonic() < deadline:
        statuses = {t: rpc.call(broker + "client_task_status", [client, t]) for t in ids}
        if all(s in (FINISHED, FAILED) for s in statuses.values()):
            break
        time.sleep(0.05)
    results = []
    for task in ids:
        first = rpc.call(broker + "client_task_result", [client, task])
        again = rpc.call(broker + "client_task_result", [client, task])
        results.append({"id": task, "status": statuses[task], "result": first, "again": again})
    return {"client": client, "tasks": results}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--zmq")
    parser.add_argument("--http")
    parser.add_argument("--guarantee", action="store_true")
    parser.add_argument("tasks", nargs="+")
    args = parser.parse_args()
    rpc = ZmqRpc(args.zmq) if args.zmq else HttpRpc(args.http)
    tasks = []
    for item in args.tasks:
        method, _, params = item.partition("=")
        tasks.append((method, json.loads(params or "[]")))
    try:
        print(json.dumps(run(rpc, tasks, args.guarantee)), flush=True)
    finally:
        rpc.close()


if __name__ == "__main__":
    sys.exit(main())
