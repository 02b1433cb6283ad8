"""JSON-RPC nodes as workers of a real (sans-IO) broker core: no sockets, a fake clock.

The node bookkeeping and the broker core exchange eMQP frames directly, so
every rule (dispatch, requeue when a node falls silent, ABORT, time limits)
is the broker's own, checked without a network.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.broker.core import BrokerConfig, BrokerCore, Dest
from corral.gateway import zerotask
from corral.gateway.nodes import ABORTED_METHOD, NODE_METHOD, Node, NodeBook, NodeConfig
from corral.gateway.rpc import RpcError
from corral.protocol import Headers, Request, new_msgid, parse
from corral.protocol.messages import Reply

CLIENT = b"client-1"


class Harness:
    """A broker core and a node book wired together, with one eMQP client."""

    def __init__(self, **config: Any) -> None:
        self.core = BrokerCore(BrokerConfig(heartbeat_interval=1.0, heartbeat_liveness=3))
        settings = {
            "heartbeat_interval": 1.0,
            "heartbeat_liveness": 3,
            "node_timeout": 5.0,
            "claim_timeout": 30.0,
            "offer_repeat": 1.0,
            **config,
        }
        self.book = NodeBook(NodeConfig(**settings))
        self.now = 100.0
        self.sockets: dict[bytes, Node] = {}
        self.published: list[tuple[str, dict[str, Any]]] = []
        self.outcomes: dict[str, list[Any]] = {}

    def pump(self) -> None:
        while True:
            actions, self.book.actions = self.book.actions, []
            out, self.core.outbox = self.core.outbox, []
            acks, self.core.acks = self.core.acks, []
            self.core.released(acks)
            if not (actions or out or acks):
                return
            for action in actions:
                if action[0] == "open":
                    self.sockets[action[1].identity] = action[1]
                elif action[0] == "close":
                    self.sockets.pop(action[1].identity, None)
                elif action[0] == "send":
                    if self.sockets.get(action[1].identity) is action[1]:
                        self.core.on_backend(action[1].identity, action[2], self.now)
                else:
                    self.published.append((action[1], action[2]))
            for dest, identity, frames in out + acks:
                if dest is Dest.BACKEND:
                    node = self.sockets.get(identity)
                    if node is not None:
                        self.book.on_broker(node, list(frames), self.now)
                elif dest is Dest.FRONTEND and identity == CLIENT:
                    msg = parse(frames)
                    if isinstance(msg, Reply) and msg.result is not None:
                        self.outcomes.setdefault(msg.ref, []).append(json.loads(msg.result))

    def connect(self, node_id: str, methods: list[str], slots: int = 1) -> Node:
        node = self.book.connect(node_id, None, methods, slots, self.now)
        self.pump()
        return node

    def submit(self, method: str, params: Any = (), queue: str | None = None, **headers) -> str:
        msg = Request(
            new_msgid(),
            queue or method,
            Headers(reply_requested=True, **headers),
            zerotask.encode_task(method, list(params)),
        )
        self.core.on_frontend(CLIENT, msg.to_frames(), self.now)
        self.pump()
        return msg.msgid

    def advance(self, seconds: float, *, alive: tuple[str, ...] = (), step: float = 0.25) -> None:
        """Let time pass; the nodes named in ``alive`` keep calling node_heartbeat."""
        end = self.now + seconds
        while self.now < end:
            self.now = min(end, self.now + step)
            for node_id in alive:
                if node_id in self.book.nodes:
                    self.book.seen(node_id, self.now)
            self.core.tick(self.now)
            self.book.tick(self.now)
            self.pump()

    def worker(self, node_id: str):  # noqa: ANN201
        return self.core.workers.get(f"rpc-node:{node_id}".encode())

    def offers_to(self, node_id: str) -> list[list[Any]]:
        return [
            p["params"]
            for topic, p in self.published
            if topic == f"node:{node_id}:" and p["method"] == NODE_METHOD
        ]


def test_a_node_is_a_worker_of_its_queues():
    h = Harness()
    h.connect("n1", ["echo", "resize"], slots=2)
    worker = h.worker("n1")
    assert worker is not None and worker.corral and worker.slots == 2
    assert {name for _, name in worker.queues} == {"echo", "resize"}
    task = h.submit("echo", ["hi"])
    assert h.offers_to("n1") == [["echo", task]]
    assert h.book.claim("n1", task, h.now) == {"method": "echo", "params": ["hi"], "id": task}
    assert h.book.holder(task)[1].status == zerotask.RUNNING
    h.book.finish("n1", task, {"said": "hi"}, h.now)
    h.pump()
    assert h.outcomes[task] == [{"value": {"said": "hi"}}]
    assert worker.slots == 2 and not worker.running


def test_a_node_without_methods_serves_default():
    h = Harness()
    node = h.book.connect(None, None, None, None, h.now)
    assert node.queues == ((10, "default"),) and node.slots == 1
    h.pump()
    task = h.submit("corral.examples:add", [1, 2], queue="default")
    assert h.book.claim(node.id, task, h.now)["method"] == "corral.examples:add"


def test_only_the_holder_gets_the_task():
    h = Harness()
    h.connect("n1", ["echo"])
    h.connect("n2", ["echo"])
    task = h.submit("echo")
    holder = h.book.holder(task)[0].id
    other = "n2" if holder == "n1" else "n1"
    assert h.book.claim(other, task, h.now) is None
    assert h.book.claim(holder, task, h.now)["id"] == task
    with pytest.raises(RpcError) as info:
        h.book.finish(other, task, 1, h.now)
    assert info.value.code == zerotask.INVALID_TASK


def test_failed_task_carries_the_nodes_error():
    h = Harness()
    h.connect("n1", ["echo"])
    task = h.submit("echo")
    h.book.fail("n1", task, {"code": 7, "message": "nope"}, h.now)
    h.pump()
    error = h.outcomes[task][0]["error"]
    assert (error["type"], error["code"], error["message"]) == ("NodeError", 7, "nope")


def test_silent_node_loses_its_task_to_another_node():
    h = Harness(node_timeout=3.0)
    h.connect("n1", ["echo"])
    task = h.submit("echo", guarantee=True)
    h.book.claim("n1", task, h.now)
    h.connect("n2", ["echo"])
    h.advance(4.0, alive=("n2",))
    assert "n1" not in h.book.nodes and h.worker("n1") is None
    assert h.offers_to("n2") == [["echo", task]]
    with pytest.raises(RpcError) as info:
        h.book.finish("n1", task, "late", h.now)
    assert info.value.code == zerotask.INVALID_NODE
    h.book.claim("n2", task, h.now)
    h.book.finish("n2", task, "done", h.now)
    h.pump()
    assert h.outcomes[task] == [{"value": "done"}]


def test_silent_node_without_guarantee_fails_the_task():
    h = Harness(node_timeout=3.0)
    h.connect("n1", ["echo"])
    task = h.submit("echo")
    h.advance(4.0)
    assert h.outcomes[task][0]["error"]["type"] == "WorkerLost"


def test_disconnect_gives_tasks_back():
    h = Harness()
    h.connect("n1", ["echo"])
    task = h.submit("echo", retry_count=1)
    h.book.disconnect("n1", h.now)
    h.pump()
    assert h.worker("n1") is None and h.core.jobs[task].state.value == "queued"
    h.connect("n1", ["echo"])  # the id is free again
    assert h.book.claim("n1", task, h.now)["id"] == task


def test_abort_from_the_broker_is_honoured():
    h = Harness()
    h.connect("n1", ["echo"])
    task = h.submit("echo", guarantee=True)
    h.book.claim("n1", task, h.now)
    # The broker gives n1 up (its heartbeats stopped reaching it) and requeues the task.
    h.now += 10
    h.core.tick(h.now)
    h.pump()
    assert h.worker("n1") is None
    h.book.seen("n1", h.now)
    h.connect("n2", ["echo"])
    h.book.claim("n2", task, h.now)
    # n1's next heartbeat is refused; it registers again, still holding the task,
    # which now runs on n2: the broker ABORTs n1's copy.
    h.advance(1.5, alive=("n1", "n2"))
    assert h.worker("n1") is not None
    assert [p["params"] for t, p in h.published if p["method"] == ABORTED_METHOD] == [
        [task, "the job is running on rpc-node:n2"]
    ]
    for call in (h.book.claim, lambda *a: h.book.finish(*a, "x")):
        with pytest.raises(RpcError) as info:
            call("n1", task, h.now)
        assert info.value.code == zerotask.INVALID_TASK
        assert "running on rpc-node:n2" in info.value.data["aborted"]
    h.pump()
    assert h.worker("n1").slots == 1  # its slot came back
    h.book.finish("n2", task, "n2 did it", h.now)
    h.pump()
    assert h.outcomes[task] == [{"value": "n2 did it"}]


def test_a_cancelled_task_is_taken_back_from_its_node():
    h = Harness()
    h.connect("n1", ["echo"])
    task = h.submit("echo")
    h.book.claim("n1", task, h.now)
    assert h.core.cancel(task, h.now) == "running"
    h.pump()
    assert h.outcomes[task][0]["error"]["type"] == "JobCancelled"
    assert h.book.holder(task) is None and h.worker("n1").slots == 1
    with pytest.raises(RpcError) as info:
        h.book.finish("n1", task, "too late", h.now)
    assert info.value.data == {"task_id": task, "aborted": "cancelled"}
    h.pump()
    assert len(h.outcomes[task]) == 1


def test_unclaimed_offers_are_published_again_then_given_back():
    h = Harness(claim_timeout=3.0, offer_repeat=1.0)
    h.connect("n1", ["echo"])
    task = h.submit("echo")
    h.advance(2.5, alive=("n1",))
    assert len(h.offers_to("n1")) == 3
    h.advance(1.0, alive=("n1",))
    assert h.outcomes[task][0]["error"]["type"] == "NotClaimed"
    assert h.worker("n1").slots == 1


def test_time_limit():
    h = Harness()
    h.connect("n1", ["echo"])
    task = h.submit("echo", timeout=2)
    h.book.claim("n1", task, h.now)
    h.advance(2.5, alive=("n1",))
    assert h.outcomes[task][0]["error"]["type"] == "TimeLimitExceeded"


def test_task_status_reports():
    h = Harness()
    h.connect("n1", ["echo"])
    task = h.submit("echo")
    assert h.book.holder(task)[1].status == zerotask.ASSIGNED
    h.book.report("n1", task, zerotask.RUNNING, {"progress": 0.5}, h.now)
    offer = h.book.holder(task)[1]
    assert offer.status == zerotask.RUNNING and offer.fields == {"progress": 0.5}
    for bad in (zerotask.FINISHED, 1, "5000", True):
        with pytest.raises(RpcError) as info:
            h.book.report("n1", task, bad, {}, h.now)
        assert info.value.code == -32602
    with pytest.raises(RpcError) as info:
        h.book.report("n1", task, zerotask.RUNNING, {"x": "y" * 100_000}, h.now)
    assert info.value.code == -32602


def test_connect_checks():
    h = Harness()
    h.connect("n1", ["echo"])
    with pytest.raises(RpcError) as info:
        h.book.connect("n1", None, None, None, h.now)
    assert info.value.code == zerotask.INVALID_NODE
    bad = [
        {"queues": "q"},
        {"queues": [["q", 0]]},
        {"queues": [["q"]]},
        {"queues": [""]},
        {"methods": [5]},
        {"slots": 0},
        {"slots": True},
        {"slots": 10_000},
        {"queues": [f"q{i}" for i in range(100)]},
    ]
    for params in bad:
        args = {"queues": None, "methods": None, "slots": None, **params}
        with pytest.raises(RpcError) as info:
            h.book.connect("n2", args["queues"], args["methods"], args["slots"], h.now)
        assert info.value.code == -32602, params
    node = h.book.connect("n2", ["a", ["b", 20]], ["a"], 3, h.now)
    assert node.queues == ((10, "a"), (20, "b")) and node.slots == 3
    with pytest.raises(RpcError) as info:
        h.book.seen("nobody", h.now)
    assert info.value.code == zerotask.INVALID_NODE


def test_node_registers_again_with_a_restarted_broker():
    h = Harness()
    h.connect("n1", ["echo"])
    task = h.submit("echo")
    h.book.claim("n1", task, h.now)
    h.book.finish("n1", task, 1, h.now)
    h.pump()
    h.core = BrokerCore(BrokerConfig(heartbeat_interval=1.0, heartbeat_liveness=3))
    h.advance(2.0, alive=("n1",))
    worker = h.worker("n1")
    assert worker is not None and worker.slots == 1
    assert h.core.stats.unknown_replies == 1  # the last outcome is sent again


def test_broker_kbye_then_register_again():
    h = Harness()
    h.connect("n1", ["echo"])
    h.core.shutdown()
    h.pump()
    assert not h.book.nodes["n1"].informed
    h.advance(1.5, alive=("n1",))
    assert h.book.nodes["n1"].informed


def test_bad_messages_from_the_broker_are_counted():
    h = Harness()
    node = h.connect("n1", ["echo"])
    h.book.on_broker(node, [b"garbage"], h.now)
    h.book.on_broker(node, [b"", b"eMQP/1.0", b"REQUEST", b"id1", b"echo", b"", b"[1]"], h.now)
    assert h.book.bad_messages == 2
    # a well-formed REQUEST whose body a node cannot take is answered, not dropped
    worker = h.worker("n1")
    body = b'["run",{"path":"m","callable":"f","args":[1],"kwargs":{"a":1}}]'
    frames = [b"", b"eMQP/1.0", b"REQUEST", b"j1", b"echo", b"reply-requested", body]
    h.core.on_frontend(CLIENT, frames, h.now)
    h.pump()
    assert h.outcomes["j1"][0]["error"]["type"] == "BadRequest" and worker.slots == 1


ops = st.lists(
    st.one_of(
        st.tuples(st.just("connect"), st.sampled_from(["a", "b", "c"]), st.integers(1, 3)),
        st.tuples(st.just("submit"), st.sampled_from(["m1", "m2"]), st.booleans()),
        st.tuples(st.just("claim"), st.sampled_from(["a", "b", "c"]), st.integers(0, 5)),
        st.tuples(st.just("finish"), st.sampled_from(["a", "b", "c"]), st.integers(0, 5)),
        st.tuples(st.just("fail"), st.sampled_from(["a", "b", "c"]), st.integers(0, 5)),
        st.tuples(st.just("disconnect"), st.sampled_from(["a", "b", "c"]), st.just(0)),
        st.tuples(st.just("advance"), st.sampled_from([0.5, 2.0, 7.0]), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops)
def test_every_task_ends_exactly_once(script):
    h = Harness(node_timeout=5.0, claim_timeout=30.0)
    tasks: list[str] = []
    for op, arg, n in script:
        try:
            if op == "connect":
                h.connect(arg, ["m1", "m2"] if n != 2 else ["m1"], slots=n)
            elif op == "submit":
                tasks.append(h.submit(arg, [len(tasks)], guarantee=n))
            elif op == "advance":
                h.advance(arg, alive=tuple(i for i in "ab" if i in h.book.nodes))
            elif tasks:
                task = tasks[n % len(tasks)]
                if op == "claim":
                    h.book.claim(arg, task, h.now)
                elif op == "finish":
                    h.book.finish(arg, task, "ok", h.now)
                elif op == "fail":
                    h.book.fail(arg, task, "no", h.now)
                elif op == "disconnect":
                    h.book.disconnect(arg, h.now)
        except RpcError:
            pass
        h.pump()
        check_consistent(h)
    # Drain: one node serving everything does whatever is left.
    if "d" not in h.book.nodes:
        h.connect("d", ["m1", "m2"], slots=4)
    for _ in range(200):
        if not h.core.jobs:
            break
        for node in list(h.book.nodes.values()):
            for task in list(node.offers):
                h.book.claim(node.id, task, h.now)
                h.book.finish(node.id, task, "drained", h.now)
        h.advance(0.5, alive=tuple(h.book.nodes))
        check_consistent(h)
    assert not h.core.jobs
    assert sorted(h.outcomes) == sorted(tasks)
    assert all(len(outcomes) == 1 for outcomes in h.outcomes.values())


def check_consistent(h: Harness) -> None:
    for node in h.book.nodes.values():
        assert len(node.offers) <= node.slots
        for task in node.offers:
            assert h.book.holders[task] is node
        worker = h.worker(node.id)
        if node.informed and worker is not None:
            assert set(worker.running) == set(node.offers)
            assert worker.slots + len(node.offers) == node.slots
    for task, node in h.book.holders.items():
        assert task in node.offers and h.book.nodes.get(node.id) is node
