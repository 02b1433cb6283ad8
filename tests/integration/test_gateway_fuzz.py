"""Random calls to every gateway method, through a real broker (in this process, on loopback).

Whatever the params, each call is answered with a valid JSON-RPC response and
never with an internal error (which would mean a handler bug), and the
gateway and the broker keep serving.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from corral.broker.core import BrokerConfig, BrokerCore
from corral.broker.server import BrokerServer
from corral.gateway.nodes import NodeConfig
from corral.gateway.rpc import handle
from corral.gateway.server import GatewayConfig, GatewayServer
from corral.store.memory import MemoryStore
from tests.integration.procs import free_addr
from tests.unit.test_gateway_rpc import check_answer

pytestmark = pytest.mark.integration


class Stack:
    """A broker and a gateway (no listening sockets) on one event loop in a thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        frontend, backend = free_addr(), free_addr()
        self.broker = BrokerServer(
            BrokerCore(BrokerConfig(heartbeat_interval=0.5)),
            frontend=frontend,
            backend=backend,
            admin=free_addr(),
            store=MemoryStore(),
        )
        self.broker.open_store()
        self.broker.bind()
        self.gateway = GatewayServer(
            GatewayConfig(
                broker=frontend,
                backend=backend,
                rpc=None,
                pub=None,
                http=None,
                nodes=NodeConfig(heartbeat_interval=0.5),
                broker_timeout=5.0,
            )
        )
        self.serving = asyncio.run_coroutine_threadsafe(self.broker.serve(), self.loop)
        self.run(self.gateway.start())

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def call(self, raw: bytes) -> Any:
        out = self.run(handle(raw, self.gateway.gateway.dispatch))
        return None if out is None else json.loads(out)

    def close(self) -> None:
        self.run(self.gateway.close())
        self.loop.call_soon_threadsafe(self.broker.stop)
        self.serving.result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    s = Stack()
    yield s
    s.close()


def _msg(method: str, params: Any, id_: Any = 1) -> bytes:
    return json.dumps({"jsonrpc": "2.0", "method": method, "params": params, "id": id_}).encode()


METHODS = [
    f"zerotask.broker.{name}"
    for name in (
        "client_connect",
        "client_disconnect",
        "client_new_task",
        "client_task_status",
        "client_task_result",
        "node_connect",
        "node_heartbeat",
        "node_disconnect",
        "node_task_request",
        "task_status",
        "node_task_finished",
        "node_task_failed",
    )
] + ["corral.task_info", "corral.node_tasks"]

leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.sampled_from(["c1", "c2", "n1", "echo", "t1", "corral.examples:add", "", "a,b", "é"])
    | st.text(max_size=12)
)
values = st.recursive(
    leaf,
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c, max_size=3),
    max_leaves=10,
)
names = st.sampled_from(
    [
        "client_id",
        "node_id",
        "task_id",
        "method",
        "params",
        "queue",
        "timeout",
        "retries",
        "guarantee",
        "label",
        "queues",
        "methods",
        "slots",
        "status",
        "result",
        "error",
        "other",
    ]
)
params = st.lists(values, max_size=5) | st.dictionaries(names, values, max_size=6)

#: Values that get past the first checks, so calls reach the broker and the nodes.
likely = {
    "client_id": st.sampled_from(["c1", "c2", "c3"]),
    "node_id": st.sampled_from(["n1", "n2"]),
    "task_id": st.sampled_from(["t1", "t2", "t3"]),
    "method": st.sampled_from(["echo", "corral.examples:add", "os:system", "q:r.s"]),
    "params": st.lists(values, max_size=3) | st.dictionaries(st.text(max_size=4), values),
    "status": st.sampled_from([1000, 3000, 5000, 7000, 9000]),
    "error": st.fixed_dictionaries({"code": st.integers(), "message": st.text(max_size=5)}),
    "queues": st.lists(st.sampled_from(["echo", "default"]) | st.tuples(st.text(), st.integers())),
    "methods": st.lists(st.sampled_from(["echo", "other"])),
    "slots": st.integers(0, 3),
    "timeout": st.sampled_from([None, 0, 0.5, 10]),
    "retries": st.integers(0, 2),
}
POSITIONAL = {
    "client_connect": ["client_id"],
    "client_disconnect": ["client_id"],
    "client_new_task": ["client_id", "method", "params", "task_id"],
    "client_task_status": ["client_id", "task_id"],
    "client_task_result": ["client_id", "task_id"],
    "node_connect": ["node_id"],
    "node_heartbeat": ["node_id"],
    "node_disconnect": ["node_id"],
    "node_task_request": ["node_id", "task_id"],
    "task_status": ["node_id", "task_id", "status"],
    "node_task_finished": ["node_id", "task_id", "result"],
    "node_task_failed": ["node_id", "task_id", "error"],
    "task_info": ["client_id", "task_id"],
    "node_tasks": ["node_id"],
}
EXTRA = {
    "client_new_task": ["queue", "timeout", "retries", "guarantee", "label"],
    "node_connect": ["queues", "methods", "slots"],
    "task_status": ["progress"],
}


@st.composite
def shaped(draw: st.DrawFn, method: str) -> Any:
    """Params of the right shape for ``method``, mostly with plausible values."""
    names_ = POSITIONAL[method.rsplit(".", 1)[-1]]
    chosen = {
        name: draw(likely.get(name, values) if draw(st.integers(0, 4)) else values)
        for name in names_
    }
    if draw(st.booleans()):
        return list(chosen.values())
    for name in EXTRA.get(method.rsplit(".", 1)[-1], []):
        if draw(st.booleans()):
            chosen[name] = draw(likely.get(name, values))
    return chosen


@settings(
    max_examples=250,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(st.data(), st.sampled_from(METHODS), st.booleans())
def test_any_params_to_any_method(stack, data, method, notification):
    for cid in ("c1", "c2"):
        stack.call(_msg("zerotask.broker.client_connect", [cid]))  # again, if disconnected
    stack.call(_msg("zerotask.broker.node_connect", {"node_id": "n1", "methods": ["echo"]}))
    params_ = data.draw(shaped(method) if data.draw(st.integers(0, 3)) else params)
    request: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "params": params_}
    if not notification:
        request["id"] = 7
    out = stack.call(json.dumps(request).encode())
    if notification:
        assert out is None
        return
    check_answer(out)
    assert out["id"] == 7
    if "error" in out:
        assert out["error"]["code"] != -32603, out  # a handler bug, or the broker gone


def test_still_serving_after_the_fuzz(stack):
    out = stack.call(_msg("zerotask.broker.client_connect", []))
    cid = out["result"]
    out = stack.call(_msg("zerotask.broker.client_new_task", [cid, "echo", [1]]))
    task = out["result"]
    out = stack.call(_msg("zerotask.broker.client_task_status", [cid, task]))
    assert out["result"] in (1000, 3000, 5000, 7000, 9000)
