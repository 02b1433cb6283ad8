"""zerotask's vocabulary in corral's terms: ids, statuses, task bodies, errors."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.gateway import zerotask
from corral.gateway.rpc import RpcError
from corral.protocol import ProtocolError, decode_body, encode_body
from corral.protocol.messages import RunParams


def test_status_values_and_states():
    assert (zerotask.QUEUED, zerotask.ASSIGNED, zerotask.RUNNING) == (1000, 3000, 5000)
    assert (zerotask.FINISHED, zerotask.FAILED) == (7000, 9000)
    expected = {
        "queued": 1000,
        "retrying": 1000,
        "running": 5000,
        "succeeded": 7000,
        "failed": 9000,
        "dead": 9000,
        "cancelled": 9000,
        "some-future-state": 1000,
    }
    assert {state: zerotask.status_of(state) for state in expected} == expected


def test_error_codes():
    codes = (zerotask.INVALID_CLIENT, zerotask.INVALID_TASK, zerotask.INVALID_NODE)
    assert codes == (-32010, -32020, -32030)
    assert zerotask.TASK_NOT_COMPLETE == -32050


@pytest.mark.parametrize(
    ("check", "code"),
    [(zerotask.client_id, -32010), (zerotask.node_id, -32030), (zerotask.task_id, -32020)],
)
def test_ids(check, code):
    assert check("a-1.b_2") == "a-1.b_2"
    for bad in ("", "-a", "a b", "a,b", "é", "x" * 300, 5, None, ["a"], "a\n"):
        with pytest.raises(RpcError) as info:
            check(bad)
        assert info.value.code == code
    for name in ("a:b",):
        # colons would break header tokens and PUB topics, but are fine in job ids
        if check is zerotask.task_id:
            assert check(name) == name
        else:
            with pytest.raises(RpcError):
                check(name)


def test_python_targets():
    assert zerotask.python_target("pkg.mod:fn") == ("pkg.mod", "fn")
    assert zerotask.python_target("pkg.mod:Class.meth") == ("pkg.mod:Class", "meth")
    for name in ("echo", "pkg.mod.fn", "pkg.mod:", ":fn", "pkg mod:fn", "a:b.c.d", "1a:fn"):
        assert zerotask.python_target(name) is None


def test_bodies():
    body = zerotask.encode_task("corral.examples:add", [2, 3])
    params = decode_body(body)
    assert (params.path, params.callable, params.args) == ("corral.examples", "add", [2, 3])
    params = decode_body(zerotask.encode_task("resize", {"w": 2}))
    assert (params.path, params.callable, params.kwargs) == (zerotask.NODE_PATH, "resize", {"w": 2})
    # a Python client's job, handed to a node, names its target
    body = encode_body(RunParams(path="pkg.mod:Class", callable="meth", args=[1]))
    assert zerotask.decode_task(body) == ("pkg.mod:Class.meth", [1])
    body = encode_body(RunParams(path="x", callable="y", args=[1], kwargs={"a": 1}))
    with pytest.raises(ProtocolError):
        zerotask.decode_task(body)
    with pytest.raises(ProtocolError):
        zerotask.decode_task(b'["run", 1]')


json_leaf = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=10)
json_values = st.recursive(
    json_leaf,
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=8,
)
methods = st.sampled_from(["echo", "a.b.c", "pkg.mod:fn", "pkg:C.m", "x y", "@jsonrpc"]) | st.text(
    min_size=1, max_size=20
)


@given(
    methods,
    st.lists(json_values, max_size=4)
    | st.dictionaries(st.text(max_size=5), json_values, min_size=1, max_size=3),
)
def test_bodies_round_trip(method, params):
    assert zerotask.decode_task(zerotask.encode_task(method, params)) == (method, params)


def test_owner():
    assert zerotask.owner_of("reply-requested,owner:alice,label:x") == "alice"
    assert zerotask.owner_of("reply-requested") is None
    assert zerotask.owner_of("retry-count:x") is None


def test_task_errors():
    error = {"type": "ZeroDivisionError", "message": "division by zero", "traceback": "tb"}
    assert zerotask.task_error(error) == {
        "code": -32000,
        "message": "ZeroDivisionError: division by zero",
        "data": {"type": "ZeroDivisionError", "message": "division by zero", "traceback": "tb"},
    }
    outcome = json.loads(zerotask.node_error({"code": 42, "message": "no", "data": [1]}))
    assert outcome["error"]["type"] == "NodeError"
    assert zerotask.task_error(outcome["error"]) == {"code": 42, "message": "no", "data": [1]}
    outcome = json.loads(zerotask.node_error("just text"))
    assert zerotask.task_error(outcome["error"]) == {"code": -32000, "message": "just text"}
    for bad in (5, {"code": "x"}, {"message": 5}, {"code": True}):
        with pytest.raises(RpcError) as info:
            zerotask.node_error(bad)
        assert info.value.code == -32602
    assert zerotask.task_error(None)["code"] == -32000
