"""Which node makes a call: the spec's arity, the node-first arity, and who may speak for a node.

Calls go through the whole sans-IO path (the JSON-RPC envelope, the method
table, the gateway, the node book) to a real broker core, with the caller
identity given as the ZeroMQ shell gives it (its routing frames) or
``None`` as HTTP does.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from corral.gateway import rpc, zerotask
from corral.gateway.link import QueryFailed
from corral.gateway.service import Gateway
from corral.protocol import Headers, Request
from tests.unit.test_gateway_nodes import CLIENT, Harness

B = "zerotask.broker."
A_SOCKET = (b"\x00\x00\x00\x00\x01",)
B_SOCKET = (b"\x00\x00\x00\x00\x02",)
HTTP = None


class FakeLink:
    """The broker's frontend, as far as node calls need it: which jobs exist."""

    def __init__(self, h: Harness) -> None:
        self.h = h
        self.on_outcome = None

    async def query(self, op: str, **params: Any) -> Any:
        job = self.h.core.jobs.get(params["id"])
        if job is None:
            raise QueryFailed("NotFound", "no such job")
        return {"id": params["id"], "state": job.state.value, "headers": ""}


class Setup:
    def __init__(self) -> None:
        self.h = Harness()
        self.gateway = Gateway(
            FakeLink(self.h), self.h.book, flush=self.h.pump, clock=lambda: self.h.now
        )

    def call(self, caller: Any, method: str, params: Any) -> dict[str, Any]:
        name = method if "." in method else B + method
        message = {"jsonrpc": "2.0", "method": name, "params": params, "id": 1}
        raw = json.dumps(message).encode()
        out = asyncio.run(rpc.handle(raw, self.gateway.dispatch, caller=caller))
        return json.loads(out)

    def ok(self, caller: Any, method: str, params: Any) -> Any:
        answer = self.call(caller, method, params)
        assert "result" in answer, answer
        return answer["result"]

    def error(self, caller: Any, method: str, params: Any) -> dict[str, Any]:
        answer = self.call(caller, method, params)
        assert "error" in answer, answer
        return answer["error"]

    def node(self, caller: Any, node_id: str, methods: list[str]) -> str:
        return self.ok(caller, "node_connect", {"node_id": node_id, "methods": methods})

    def submit(self, method: str, task_id: str | None = None) -> str:
        if task_id is None:
            return self.h.submit(method, [1])
        body = zerotask.encode_task(method, [1])
        msg = Request(task_id, method, Headers(reply_requested=True), body)
        self.h.core.on_frontend(CLIENT, msg.to_frames(), self.h.now)
        self.h.pump()
        return task_id


def test_the_specs_arity_over_a_connection():
    s = Setup()
    s.node(A_SOCKET, "n1", ["echo"])
    task = s.submit("echo")
    assert s.ok(A_SOCKET, "node_task_request", [task]) == {
        "method": "echo",
        "params": [1],
        "id": task,
    }
    assert s.ok(A_SOCKET, "node_task_finished", [task, {"done": True}]) is True
    assert s.h.outcomes[task] == [{"value": {"done": True}}]
    # by name, with the spec's own names
    task = s.submit("echo")
    assert s.ok(A_SOCKET, "node_task_request", {"task_id": task})["id"] == task
    assert s.ok(A_SOCKET, "node_task_finished", {"task_id": task, "task_result": 5}) is True
    assert s.h.outcomes[task] == [{"value": 5}]
    task = s.submit("echo")
    s.ok(A_SOCKET, "node_task_request", [task])
    assert s.ok(A_SOCKET, "node_task_failed", [task, {"code": 7, "message": "no"}]) is True
    error = s.h.outcomes[task][0]["error"]
    assert (error["type"], error["code"], error["message"]) == ("NodeError", 7, "no")
    # unknown tasks and missing params are still told apart
    assert s.error(A_SOCKET, "node_task_request", ["never-submitted"])["code"] == -32020
    assert s.error(A_SOCKET, "node_task_finished", [task])["code"] == -32602
    assert s.error(A_SOCKET, "node_task_request", [])["code"] == -32602
    both = {"task_id": task, "task_result": 1, "result": 2}
    assert s.error(A_SOCKET, "node_task_finished", both)["code"] == -32602


def test_the_node_first_arity_still_works():
    s = Setup()
    s.node(A_SOCKET, "n1", ["echo"])
    task = s.submit("echo")
    assert s.ok(A_SOCKET, "node_task_request", ["n1", task])["id"] == task
    assert s.ok(A_SOCKET, "node_task_finished", ["n1", task, "r"]) is True
    task = s.submit("echo")
    assert s.ok(A_SOCKET, "node_task_request", {"node_id": "n1", "task_id": task})["id"] == task
    assert s.ok(A_SOCKET, "node_task_failed", {"node_id": "n1", "task_id": task, "error": "x"})
    assert s.h.outcomes[task][0]["error"]["message"] == "x"
    # over HTTP (no connection identity) a node names itself, as before
    s.node(HTTP, "h1", ["resize"])
    task = s.submit("resize")
    assert s.ok(HTTP, "node_task_request", ["h1", task])["id"] == task
    assert s.ok(HTTP, "task_status", ["h1", task, zerotask.RUNNING, {"p": 1}]) is True
    assert s.ok(HTTP, "node_task_finished", ["h1", task, "done"]) is True
    assert s.h.outcomes[task] == [{"value": "done"}]
    assert s.ok(HTTP, "node_heartbeat", ["h1"]) is True
    assert s.ok(HTTP, "node_disconnect", ["h1"]) is True


def test_the_specs_arity_needs_a_caller_with_a_node():
    s = Setup()
    s.node(HTTP, "h1", ["echo"])
    task = s.submit("echo")
    error = s.error(HTTP, "node_task_request", [task])
    assert error["code"] == -32602 and "node_id first" in error["message"]
    assert s.error(HTTP, "node_task_finished", [task, 1])["code"] == -32602
    assert not s.h.book.holder(task)[1].claimed
    # a ZeroMQ connection that connected no node
    error = s.error(B_SOCKET, "node_task_request", [task])
    assert error["code"] == -32030 and "node_connect" in error["message"]
    assert s.error(B_SOCKET, "node_task_failed", [task, "x"])["code"] == -32030
    assert task not in s.h.outcomes


def test_the_count_decides_not_the_values():
    s = Setup()
    s.node(A_SOCKET, "n1", ["echo"])
    s.node(B_SOCKET, "n2", ["other"])
    # a task whose id is also a connected node's id
    task = s.submit("echo", task_id="n2")
    assert s.ok(A_SOCKET, "node_task_request", ["n2"])["id"] == "n2"
    assert s.ok(A_SOCKET, "node_task_finished", ["n2", "n2"]) is True  # (task_id, result)
    assert s.h.outcomes[task] == [{"value": "n2"}]
    # a null node id is a (bad) node id, not "the caller's node"
    task = s.submit("echo")
    assert s.error(A_SOCKET, "node_task_request", [None, task])["code"] == -32030
    assert (
        s.error(A_SOCKET, "node_task_finished", {"node_id": None, "task_id": task, "result": 1})[
            "code"
        ]
        == -32030
    )


def test_several_nodes_on_one_connection():
    s = Setup()
    s.node(A_SOCKET, "n1", ["echo"])
    s.node(A_SOCKET, "n3", ["resize"])
    task = s.submit("resize")
    assert s.h.book.holder(task)[0].id == "n3"
    assert s.ok(A_SOCKET, "node_task_request", [task])["id"] == task
    assert s.ok(A_SOCKET, "node_task_finished", [task, 3]) is True
    assert s.h.outcomes[task] == [{"value": 3}]
    assert s.h.worker("n3").slots == 1


def _held_by_n1() -> tuple[Setup, str]:
    s = Setup()
    s.node(A_SOCKET, "n1", ["echo"])
    s.node(B_SOCKET, "n2", ["other"])
    task = s.submit("echo")
    s.ok(A_SOCKET, "node_task_request", [task])
    s.ok(A_SOCKET, "task_status", ["n1", task, zerotask.RUNNING, {"progress": 0.5}])
    return s, task


def _unchanged(s: Setup, task: str) -> None:
    node, offer = s.h.book.holder(task)
    assert node.id == "n1" and offer.claimed and offer.status == zerotask.RUNNING
    assert offer.fields == {"progress": 0.5}
    assert task not in s.h.outcomes
    assert s.h.core.jobs[task].state.value == "running"


def test_a_node_cannot_finish_or_fail_another_nodes_task():
    s, task = _held_by_n1()
    calls = [
        ("node_task_finished", [task, "forged"]),
        ("node_task_failed", [task, {"code": 1, "message": "forged"}]),
        ("node_task_finished", ["n2", task, "forged"]),
        ("node_task_failed", ["n2", task, "forged"]),
        ("task_status", ["n2", task, zerotask.ASSIGNED]),
    ]
    for method, params in calls:
        error = s.error(B_SOCKET, method, params)
        assert error["code"] == -32020, (method, error)
        assert error["data"] == {"task_id": task, "held_by": "another node"}
        assert "held by another node" in error["message"]
        _unchanged(s, task)
    assert s.ok(B_SOCKET, "node_task_request", [task]) == {}  # already assigned
    _unchanged(s, task)
    assert s.ok(A_SOCKET, "node_task_finished", [task, "mine"]) is True
    assert s.h.outcomes[task] == [{"value": "mine"}]


def test_a_node_id_of_another_connection_is_refused():
    s, task = _held_by_n1()
    n1 = s.h.book.nodes["n1"]
    s.h.now += 3.0
    calls = [
        ("node_task_request", ["n1", task]),
        ("node_task_finished", ["n1", task, "forged"]),
        ("node_task_failed", ["n1", task, "forged"]),
        ("task_status", ["n1", task, zerotask.ASSIGNED]),
        ("node_heartbeat", ["n1"]),
        ("node_disconnect", ["n1"]),
        ("node_task_finished", {"node_id": "n1", "task_id": task, "task_result": 0}),
    ]
    for caller in (B_SOCKET, HTTP):
        for method, params in calls:
            error = s.error(caller, method, params)
            assert error["code"] == -32030, (caller, method, error)
            assert error["data"] == {"node_id": "n1", "connection": "another"}
            _unchanged(s, task)
    assert s.error(B_SOCKET, "corral.node_tasks", ["n1"])["code"] == -32030  # an extension too
    assert s.h.book.nodes["n1"] is n1 and n1.last_seen == s.h.now - 3.0  # not a sign of life
    assert s.ok(A_SOCKET, "corral.node_tasks", ["n1"]) == [
        {"method": "echo", "id": task, "claimed": True}
    ]
    # a node connected over HTTP is not driven over ZeroMQ either
    s.node(HTTP, "h1", ["echo"])
    assert s.error(A_SOCKET, "node_heartbeat", ["h1"])["code"] == -32030
    assert s.ok(A_SOCKET, "node_task_finished", ["n1", task, "mine"]) is True
    assert s.h.outcomes[task] == [{"value": "mine"}]


def test_a_disconnected_connections_node_is_forgotten():
    s = Setup()
    s.node(A_SOCKET, "n1", ["echo"])
    assert s.ok(A_SOCKET, "node_disconnect", ["n1"]) is True
    task = s.submit("echo")
    assert s.error(A_SOCKET, "node_task_request", [task])["code"] == -32030
    # the id is free again, for any connection, which then owns it
    s.node(B_SOCKET, "n1", ["echo"])
    assert s.h.book.holder(task)[0].id == "n1"
    assert s.error(A_SOCKET, "node_task_request", ["n1", task])["code"] == -32030
    assert s.ok(B_SOCKET, "node_task_request", [task])["id"] == task
