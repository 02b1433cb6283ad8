"""The JSON-RPC gateway against a real broker, with clients and nodes in other processes.

The client and node programs (rpc_client.py, rpc_node.py) use nothing but
pyzmq, json and urllib: they speak zerotask's protocol as any language would.
"""

from __future__ import annotations

import json
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import zmq

import corral
from tests.integration.procs import Cluster, Proc, corral_cmd, free_addr, wait_for
from tests.integration.rpc_client import HttpRpc, RpcFailed, ZmqRpc

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
B = "zerotask.broker."
QUEUED, ASSIGNED, RUNNING, FINISHED, FAILED = 1000, 3000, 5000, 7000, 9000
NODE_TIMEOUT = 1.5


@dataclass
class Gateway:
    rpc: str = field(default_factory=free_addr)
    pub: str = field(default_factory=free_addr)
    http: str = field(default_factory=lambda: free_addr().removeprefix("tcp://"))

    @property
    def url(self) -> str:
        return f"http://{self.http}/rpc"

    def args(self, *extra: str) -> list[str]:
        return [
            "--rpc",
            self.rpc,
            "--rpc-pub",
            self.pub,
            "--rpc-http",
            self.http,
            "--node-timeout",
            str(NODE_TIMEOUT),
            *extra,
        ]

    def answers(self) -> bool:
        rpc = ZmqRpc(self.rpc, timeout=0.3)
        try:
            rpc.call("corral.no_such_method")
        except RpcFailed:
            return True
        except zmq.Again:
            return False
        finally:
            rpc.close()
        return False


def start_gateway(cluster: Cluster, gw: Gateway, *extra: str) -> Proc:
    args = ["gateway", "--broker", cluster.addrs.frontend, "--backend", cluster.addrs.backend]
    args += ["--heartbeat", str(cluster.heartbeat), *gw.args(*extra)]
    proc = cluster.start("gateway", corral_cmd(*args))
    wait_for(gw.answers, what="the gateway to answer", procs=[proc])
    return proc


def start_node(cluster: Cluster, gw: Gateway, node_id: str, *extra: str) -> Proc:
    args = [sys.executable, str(HERE / "rpc_node.py"), gw.rpc, gw.pub, node_id, *extra]
    proc = cluster.start(f"node-{node_id}", args)
    wait_for(lambda: '"connected"' in proc.output(), what=f"node {node_id}", procs=[proc])
    return proc


def events(proc: Proc) -> list[dict[str, Any]]:
    out = []
    for line in proc.output().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def run_client(*args: str) -> dict[str, Any]:
    import subprocess

    done = subprocess.run(
        [sys.executable, str(HERE / "rpc_client.py"), *args],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


@pytest.fixture
def gw(cluster):
    cluster.broker()
    gateway = Gateway()
    start_gateway(cluster, gateway)
    return gateway


@pytest.fixture
def rpc(gw):
    client = ZmqRpc(gw.rpc)
    yield client
    client.close()


def test_client_and_node_round_trip(cluster, gw):
    start_node(cluster, gw, "n1")
    args = ["echo=[1, 2]", 'add={"a": 1, "b": 2}', "add=[1, 2, 3]", 'fail=["x"]']
    out = run_client("--zmq", gw.rpc, *args)
    echo, add_named, add, fail = out["tasks"]
    assert (echo["status"], echo["result"]) == (FINISHED, [1, 2])
    assert (add_named["status"], add_named["result"]) == (FINISHED, 3)
    assert (add["status"], add["result"]) == (FINISHED, 6)
    assert fail["status"] == FAILED
    assert fail["result"] == {"code": 17, "message": "n1 refuses", "data": ["x"]}
    assert all(t["again"] == t["result"] for t in out["tasks"])  # reading is not destructive
    # They are ordinary corral jobs, in the broker's job table.
    with corral.Client(cluster.addrs.frontend) as client:
        record = client.job_info(echo["id"])
        assert record["queue"] == "echo" and record["state"] == "succeeded"
        assert f"owner:{out['client']}" in record["headers"].split(",")
        assert record["worker_uuid"] == "rpc-node:n1"
        listed = {job["id"] for job in client.jobs(queue="add")}
        assert {add["id"], add_named["id"]} <= listed


def test_http_round_trip(cluster, gw):
    start_node(cluster, gw, "n1")
    out = run_client("--http", gw.url, "echo=[3]")
    assert out["tasks"][0]["result"] == [3]
    http = HttpRpc(gw.url)
    assert http.post(b'{"jsonrpc":"2.0","method":"x"}') == (204, b"")
    status, body = http.post(b"{nope")
    assert status == 200 and json.loads(body)["error"]["code"] == -32700
    status, body = http.post(b"\xff\xfe")
    assert status == 200 and json.loads(body)["error"]["code"] == -32700
    assert http.post(b"{}", path="/../other")[0] == 404
    batch = [
        {"jsonrpc": "2.0", "method": B + "client_connect", "params": ["h1"], "id": 1},
        {"jsonrpc": "2.0", "method": B + "client_task_status", "params": ["h1", "x"], "id": 2},
    ]
    first, second = http.message(batch)
    assert first["result"] == "h1" and second["error"]["code"] == -32020
    import urllib.request

    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(gw.url, timeout=5)
    assert info.value.code == 405
    assert http.call(B + "client_connect") != "h1"  # still serving


def test_a_node_with_the_specs_arity(cluster, gw, rpc):
    """node_task_request(task_id), node_task_finished(task_id, result), node_task_failed(
    task_id, error): the gateway knows the node by the socket that connected it, and no
    other socket (nor HTTP) can speak for it."""
    node = start_node(cluster, gw, "s1", "--spec")
    out = run_client("--zmq", gw.rpc, "echo=[1, 2]", 'fail=["x"]')
    echo, fail = out["tasks"]
    assert (echo["status"], echo["result"]) == (FINISHED, [1, 2])
    assert fail["status"] == FAILED
    assert fail["result"] == {"code": 17, "message": "s1 refuses", "data": ["x"]}
    assert [e["event"] for e in events(node)].count("claimed") == 2

    client = rpc.call(B + "client_connect")
    task = rpc.call(B + "client_new_task", [client, "sleep", [2.0]])
    wait_for(lambda: any(e.get("task") == task for e in events(node)), procs=[node])

    def refused(transport: Any, params: list[Any]) -> int:
        with pytest.raises(RpcFailed) as info:
            transport.call(B + "node_task_finished", params)
        return info.value.code

    http = HttpRpc(gw.url)
    assert refused(rpc, ["s1", task, "forged"]) == -32030  # not this socket's node
    assert refused(http, ["s1", task, "forged"]) == -32030
    assert refused(rpc, [task, "forged"]) == -32030  # this socket connected no node
    assert refused(http, [task, "forged"]) == -32602  # HTTP must name the node
    assert rpc.call(B + "node_connect", {"node_id": "intruder", "methods": ["other"]})
    assert refused(rpc, [task, "forged"]) == -32020  # held by another node
    assert refused(rpc, ["intruder", task, "forged"]) == -32020
    with pytest.raises(RpcFailed) as info:
        rpc.call(B + "node_task_failed", [task, {"code": 1, "message": "forged"}])
    assert info.value.code == -32020
    assert rpc.call(B + "client_task_status", [client, task]) == RUNNING
    wait_for(
        lambda: rpc.call(B + "client_task_status", [client, task]) == FINISHED,
        what="the node to finish its task",
        procs=[node],
    )
    assert rpc.call(B + "client_task_result", [client, task]) == "s1"
    assert not [e for e in events(node) if e["event"] == "refused"]


def test_node_dies_mid_task_and_another_node_runs_it(cluster, gw, rpc):
    nodes = {name: start_node(cluster, gw, name, "--methods", "sleep") for name in ("a", "b")}
    client = rpc.call(B + "client_connect")
    task = rpc.call(
        B + "client_new_task",
        {"client_id": client, "method": "sleep", "params": [1.0], "guarantee": True},
    )

    def claimer() -> str | None:
        for name, proc in nodes.items():
            if any(e["event"] == "claimed" for e in events(proc)):
                return name
        return None

    first = wait_for(claimer, what="a node to claim the task")
    nodes[first].kill_group(signal.SIGKILL)
    assert rpc.call(B + "client_task_status", [client, task]) in (ASSIGNED, RUNNING)
    other = "b" if first == "a" else "a"
    wait_for(
        lambda: rpc.call(B + "client_task_status", [client, task]) == FINISHED,
        timeout=30,
        what="the task to finish on the other node",
    )
    assert rpc.call(B + "client_task_result", [client, task]) == other
    info = rpc.call("corral.task_info", [client, task])
    assert info["attempts"] == 2 and info["worker_uuid"] == f"rpc-node:{other}"
    assert info["status"] == FINISHED and info["state"] == "succeeded"


def test_cancelling_a_nodes_task(cluster, gw, rpc):
    node = start_node(cluster, gw, "n1", "--methods", "sleep")
    client = rpc.call(B + "client_connect")
    task = rpc.call(B + "client_new_task", [client, "sleep", [1.0]])
    wait_for(lambda: any(e["event"] == "claimed" for e in events(node)), procs=[node])
    with corral.Client(cluster.addrs.frontend) as corral_client:
        assert corral_client.cancel(task)["was"] == "running"
    assert rpc.call(B + "client_task_status", [client, task]) == FAILED
    error = rpc.call(B + "client_task_result", [client, task])
    assert error["code"] == -32000 and error["data"]["type"] == "JobCancelled"
    refused = wait_for(lambda: [e for e in events(node) if e["event"] == "refused"], procs=[node])
    assert "cancelled" in refused[0]["error"]


def test_client_errors_and_ownership(cluster, gw, rpc):
    def error(method: str, params: Any) -> dict[str, Any]:
        with pytest.raises(RpcFailed) as info:
            rpc.call(method, params)
        return info.value.error

    assert rpc.call(B + "client_connect", ["alice"]) == "alice"
    assert rpc.call(B + "client_connect", {"client_id": "bob"}) == "bob"
    assert error(B + "client_connect", ["alice"])["code"] == -32010  # taken
    for bad in ("bad id", "", 5, "a,b", "x" * 200):
        assert error(B + "client_connect", [bad])["code"] == -32010
    assert error(B + "client_new_task", ["carol", "echo", []])["code"] == -32010

    # No node serves "echo" here: the task waits in its queue.
    task = rpc.call(B + "client_new_task", ["alice", "echo", [1], "t-own"])
    assert task == "t-own"
    assert rpc.call(B + "client_task_status", ["alice", task]) == QUEUED
    not_done = error(B + "client_task_result", ["alice", task])
    assert not_done["code"] == -32050
    assert not_done["data"] == {"task_id": task, "status": QUEUED, "state": "queued"}
    # bob cannot see alice's task, nor take its id
    assert error(B + "client_task_status", ["bob", task])["code"] == -32020
    assert error(B + "client_task_result", ["bob", task])["code"] == -32020
    assert error("corral.task_info", ["bob", task])["code"] == -32020
    taken = error(B + "client_new_task", ["bob", "echo", [], task])
    assert taken["code"] == -32020 and taken["data"] == {"task_id": task}
    taken = error(B + "client_new_task", ["alice", "echo", [], task])
    assert taken["code"] == -32020
    assert taken["data"] == {"task_id": task, "yours": True, "state": "queued"}
    for bad_task in ("no such", "", 7, "-x"):
        assert error(B + "client_task_status", ["alice", bad_task])["code"] == -32020
    assert error(B + "client_task_status", ["alice", "never-submitted"])["code"] == -32020

    # wrong params, unknown methods
    assert error(B + "client_new_task", ["alice", "echo", "notalist"])["code"] == -32602
    assert error(B + "client_new_task", ["alice", 5, []])["code"] == -32602
    assert error(B + "client_new_task", ["alice", "echo"])["code"] == -32602
    assert error(B + "client_new_task", {"client_id": "alice", "x": 1})["code"] == -32602
    assert error(B + "client_task_status", ["alice", task, "extra"])["code"] == -32602
    named = {"client_id": "alice", "method": "echo", "params": [], "retries": -1}
    assert error(B + "client_new_task", named)["code"] == -32602
    assert error(B + "no_such_method", [])["code"] == -32601

    # nodes
    assert error(B + "node_heartbeat", ["ghost"])["code"] == -32030
    assert error(B + "node_task_finished", ["ghost", task, 1])["code"] == -32030
    assert error(B + "node_connect", ["bad id"])["code"] == -32030
    assert rpc.call(B + "node_connect", {"node_id": "n9", "methods": ["other"]}) == "n9"
    assert error(B + "node_connect", ["n9"])["code"] == -32030  # taken
    assert error(B + "node_task_finished", ["n9", task, 1])["code"] == -32020
    assert rpc.call(B + "node_task_request", ["n9", task]) == {}  # not given to n9
    assert error(B + "node_task_request", ["n9", "never-submitted"])["code"] == -32020
    assert rpc.call(B + "node_disconnect", ["n9"]) is True

    # garbage gets an answer and the gateway goes on
    assert json.loads(rpc.send_raw(b"\xff\x00"))["error"]["code"] == -32700
    assert json.loads(rpc.send_raw(b'{"jsonrpc":'))["error"]["code"] == -32700
    assert json.loads(rpc.send_raw(b"[]"))["error"]["code"] == -32600
    assert rpc.send_raw(b'{"jsonrpc":"2.0","method":"' + B.encode() + b'node_heartbeat"}') == b""
    ctx = zmq.Context.instance()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.setsockopt(zmq.RCVTIMEO, 5000)
    dealer.connect(gw.rpc)
    dealer.send_multipart([b"{}", b"{}"])
    assert json.loads(dealer.recv())["error"]["code"] == -32600
    dealer.send(b'{"jsonrpc":"2.0","method":"x","id":"d"}')  # no delimiter: a DEALER client
    assert json.loads(dealer.recv())["id"] == "d"
    dealer.send(b'{"jsonrpc":"2.0","method":"' + b"x" * (5 * 1024 * 1024) + b'","id":1}')
    assert json.loads(dealer.recv())["error"]["code"] == -32600
    dealer.close()

    # disconnecting forgets the client, not its tasks
    assert rpc.call(B + "client_disconnect", ["alice"]) is True
    assert error(B + "client_task_status", ["alice", task])["code"] == -32010
    assert error(B + "client_disconnect", ["alice"])["code"] == -32010
    assert rpc.call(B + "client_connect", ["alice"]) == "alice"
    assert rpc.call(B + "client_task_status", ["alice", task]) == QUEUED


def test_python_job_through_the_gateway_in_the_broker(tmp_path):
    cluster = Cluster(tmp_path)
    gw = Gateway()
    try:
        cluster.broker("--gateway", *gw.args())
        wait_for(gw.answers, what="the gateway in the broker")
        cluster.worker(imports=("corral.examples",))
        rpc = ZmqRpc(gw.rpc)
        sub = zmq.Context.instance().socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVTIMEO, 500)
        sub.connect(gw.pub)
        client = rpc.call(B + "client_connect")
        sub.setsockopt(zmq.SUBSCRIBE, f"client:{client}:".encode())
        # A SUB socket hears nothing until its subscription reached the PUB socket.
        wait_for(
            lambda: _notice_for(
                sub, rpc.call(B + "client_new_task", [client, "corral.examples:noop", []])
            ),
            what="the subscription to be active",
        )
        sub.setsockopt(zmq.RCVTIMEO, 10_000)
        add = rpc.call(B + "client_new_task", [client, "corral.examples:add", [2, 3]])
        assert _notice_for(sub, add) == {
            "jsonrpc": "2.0",
            "method": "zerotask.client.task_result_ready",
            "params": {"task_id": add, "status": FINISHED},
        }
        assert rpc.call(B + "client_task_result", [client, add]) == 5
        named = rpc.call(
            B + "client_new_task", [client, "corral.examples:echo", {"a": 1}, "py-named"]
        )
        fail = rpc.call(B + "client_new_task", [client, "corral.examples:fail", ["boom"]])
        refused = rpc.call(B + "client_new_task", [client, "os:system", ["true"]])
        for task in (named, fail, refused):
            wait_for(lambda t=task: rpc.call(B + "client_task_status", [client, t]) >= FINISHED)
        assert rpc.call(B + "client_task_result", [client, named]) == {
            "args": [],
            "kwargs": {"a": 1},
        }
        error = rpc.call(B + "client_task_result", [client, fail])
        assert error["code"] == -32000 and error["message"] == "RuntimeError: boom"
        assert "Traceback" in error["data"]["traceback"]
        assert rpc.call(B + "client_task_status", [client, refused]) == FAILED
        error = rpc.call(B + "client_task_result", [client, refused])
        assert error["data"]["type"] == "NotAllowed"
        rpc.close()
        sub.close()
        with corral.Client(cluster.addrs.frontend) as corral_client:
            assert corral_client.job_info(add)["result"] == 5
    finally:
        cluster.close()


def _notice_for(sub: zmq.Socket, task: str) -> dict[str, Any] | None:
    """The next notice about ``task`` (others are skipped); None once none comes."""
    try:
        while True:
            notice = json.loads(sub.recv_multipart()[1])
            if notice["params"]["task_id"] == task:
                return notice
    except zmq.Again:
        return None


def test_ownership_survives_a_gateway_restart(cluster):
    cluster.broker()
    cluster.worker(imports=("corral.examples",))
    gw = Gateway()
    proc = start_gateway(cluster, gw)
    rpc = ZmqRpc(gw.rpc)
    rpc.call(B + "client_connect", ["dora"])
    task = rpc.call(B + "client_new_task", ["dora", "corral.examples:add", [20, 22]])
    wait_for(lambda: rpc.call(B + "client_task_status", ["dora", task]) == FINISHED)
    rpc.close()
    proc.stop()
    start_gateway(cluster, gw)
    rpc = ZmqRpc(gw.rpc)
    try:
        with pytest.raises(RpcFailed) as info:
            rpc.call(B + "client_task_result", ["dora", task])
        assert info.value.code == -32010
        rpc.call(B + "client_connect", ["dora"])
        assert rpc.call(B + "client_task_result", ["dora", task]) == 42
        rpc.call(B + "client_connect", ["eve"])
        with pytest.raises(RpcFailed) as info:
            rpc.call(B + "client_task_result", ["eve", task])
        assert info.value.code == -32020
    finally:
        rpc.close()


def test_http_details(gw):
    import socket

    host, port = gw.http.rsplit(":", 1)

    def exchange(data: bytes, sock: socket.socket | None = None) -> bytes:
        own = sock is None
        sock = sock or socket.create_connection((host, int(port)), timeout=5)
        try:
            sock.sendall(data)
            out = b""
            while b"\r\n\r\n" not in out:
                out += sock.recv(65536)
            head, _, body = out.partition(b"\r\n\r\n")
            length = next(
                (
                    int(h.split(b":")[1])
                    for h in head.split(b"\r\n")
                    if h.lower().startswith(b"content-length")
                ),
                0,
            )
            while len(body) < length:
                body += sock.recv(65536)
            return head.split(b"\r\n")[0] + b"\n" + body
        finally:
            if own:
                sock.close()

    call = b'{"jsonrpc":"2.0","method":"zerotask.broker.client_connect","id":1}'
    post = b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
    # two requests on one connection (keep-alive)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        for _ in range(2):
            answer = exchange(post % (len(call), call), sock)
            assert answer.startswith(b"HTTP/1.1 200") and b'"result"' in answer
    assert exchange(b"POST /rpc HTTP/1.1\r\nHost: x\r\n\r\n").startswith(b"HTTP/1.1 411")
    big = b"POST /rpc HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n"
    assert exchange(big).startswith(b"HTTP/1.1 413")
    assert exchange(b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400")
    assert exchange(b"\xff\xfe / HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")
    # what curl sends for a large body
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        head = b"POST /rpc HTTP/1.1\r\nContent-Length: %d\r\nExpect: 100-continue\r\n\r\n"
        sock.sendall(head % len(call))
        assert sock.recv(100).startswith(b"HTTP/1.1 100 Continue")
        assert exchange(call, sock).startswith(b"HTTP/1.1 200")
    # and curl itself, as in the README
    import shutil
    import subprocess

    curl = shutil.which("curl")
    if curl:
        done = subprocess.run(
            [
                curl,
                "-s",
                "-d",
                '{"jsonrpc":"2.0","method":"zerotask.broker.client_connect",'
                '"params":["curly"],"id":1}',
                gw.url,
            ],
            capture_output=True,
            timeout=30,
        )
        assert json.loads(done.stdout) == {"jsonrpc": "2.0", "result": "curly", "id": 1}
