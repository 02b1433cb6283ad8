"""The JSON-RPC 2.0 envelope: the spec's examples, binding, and garbage in (hypothesis)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from corral.gateway import rpc
from corral.gateway.rpc import Call, Methods, RpcError, Signature


def _methods() -> Methods:
    methods = Methods()

    async def subtract(minuend: Any, subtrahend: Any) -> Any:
        if not all(isinstance(v, int | float) for v in (minuend, subtrahend)):
            raise RpcError(rpc.INVALID_PARAMS, "numbers please")
        return minuend - subtrahend

    async def update(**_: Any) -> None:
        return None

    async def boom() -> None:
        raise KeyError("a bug")

    async def fields(name: Any, rest: dict[str, Any]) -> Any:
        return {"name": name, "rest": rest}

    methods.add("subtract", Signature(("minuend", "subtrahend"), 2), subtract)
    methods.add("update", Signature(("a", "b", "c", "d", "e")), update)
    methods.add("boom", Signature(), boom)
    methods.add("fields", Signature(("name",), 1, rest="rest"), fields)
    return methods


METHODS = _methods()


def answer(raw: bytes | str, **limits: int) -> Any:
    data = raw.encode() if isinstance(raw, str) else raw
    out = asyncio.run(rpc.handle(data, METHODS.dispatch, **limits))
    return None if out is None else json.loads(out)


# ---------------------------------------------------------------- the spec's examples


def test_positional_and_named_params():
    assert answer('{"jsonrpc":"2.0","method":"subtract","params":[42,23],"id":1}') == {
        "jsonrpc": "2.0",
        "result": 19,
        "id": 1,
    }
    got = answer(
        '{"jsonrpc":"2.0","method":"subtract","params":{"subtrahend":23,"minuend":42},"id":"x"}'
    )
    assert got == {"jsonrpc": "2.0", "result": 19, "id": "x"}


def test_notifications_get_no_answer():
    assert answer('{"jsonrpc":"2.0","method":"update","params":[1,2,3,4,5]}') is None
    assert answer('{"jsonrpc":"2.0","method":"nope"}') is None
    # an id of null is a request, not a notification
    got = answer('{"jsonrpc":"2.0","method":"nope","id":null}')
    assert got["error"]["code"] == rpc.METHOD_NOT_FOUND and got["id"] is None


def test_errors():
    got = answer('{"jsonrpc":"2.0","method":"foobar","id":"1"}')
    assert got["error"]["code"] == -32601 and got["id"] == "1"
    got = answer('{"jsonrpc":"2.0","method":"foobar,"params":"bar","baz]')
    assert got["error"]["code"] == -32700 and got["id"] is None
    got = answer('{"jsonrpc":"2.0","method":1,"params":"bar"}')
    assert got["error"]["code"] == -32600 and got["id"] is None
    got = answer('{"jsonrpc":"2.0","method":"subtract","params":[1],"id":2}')
    assert got["error"]["code"] == -32602 and got["id"] == 2
    got = answer('{"jsonrpc":"2.0","method":"subtract","params":{"x":1},"id":3}')
    assert got["error"]["code"] == -32602
    got = answer('{"jsonrpc":"2.0","method":"subtract","params":[1,2,3],"id":4}')
    assert got["error"]["code"] == -32602
    got = answer('{"jsonrpc":"1.0","method":"subtract","params":[1,2],"id":5}')
    assert got["error"]["code"] == -32600 and got["id"] == 5
    got = answer('{"jsonrpc":"2.0","method":"subtract","params":[1,2],"id":{"a":1}}')
    assert got["error"]["code"] == -32600 and got["id"] is None
    got = answer('{"jsonrpc":"2.0","method":"subtract","params":[1,2],"id":true}')
    assert got["error"]["code"] == -32600


def test_a_failing_handler_is_an_internal_error():
    got = answer('{"jsonrpc":"2.0","method":"boom","id":9}')
    assert got == {
        "jsonrpc": "2.0",
        "error": {"code": -32603, "message": "internal error (KeyError)"},
        "id": 9,
    }


def test_batches():
    got = answer(
        '[{"jsonrpc":"2.0","method":"subtract","params":[1,2],"id":"1"},'
        '{"jsonrpc":"2.0","method":"update","params":[7]},'
        '{"jsonrpc":"2.0","method":"subtract","params":[42,23],"id":"2"},'
        '{"foo":"boo"},'
        '{"jsonrpc":"2.0","method":"foo.get","params":{"name":"myself"},"id":"5"}]'
    )
    assert [r.get("id") for r in got] == ["1", "2", None, "5"]
    assert got[0]["result"] == -1 and got[1]["result"] == 19
    assert got[2]["error"]["code"] == -32600 and got[3]["error"]["code"] == -32601
    assert answer('[{"jsonrpc":"2.0","method":"update"},{"jsonrpc":"2.0","method":"x"}]') is None
    got = answer("[]")
    assert isinstance(got, dict) and got["error"]["code"] == -32600
    got = answer("[1]")
    assert isinstance(got, list) and got[0]["error"]["code"] == -32600
    got = answer("[1,2,3]")
    assert [r["error"]["code"] for r in got] == [-32600] * 3
    got = answer('[{"jsonrpc":"2.0","method":"sum","params":[1,2,4],"id":"1"},{"jsonrpc":"2.0"')
    assert got["error"]["code"] == -32700


def test_limits():
    call = '{"jsonrpc":"2.0","method":"subtract","params":[2,1],"id":1}'
    got = answer(call, max_size=len(call) - 1)
    assert got["error"]["code"] == -32600 and "exceed" in got["error"]["message"]
    got = answer(f"[{call},{call},{call}]", max_batch=2)
    assert got["error"]["code"] == -32600 and "batch" in got["error"]["message"]
    assert answer(b'"\xff"')["error"]["code"] == -32700
    assert answer(b"[" * 100_000)["error"]["code"] == -32700


def test_rest_params():
    got = answer('{"jsonrpc":"2.0","method":"fields","params":["n",{"p":1}],"id":1}')
    assert got["result"] == {"name": "n", "rest": {"p": 1}}
    got = answer('{"jsonrpc":"2.0","method":"fields","params":{"name":"n","p":1,"q":2},"id":1}')
    assert got["result"] == {"name": "n", "rest": {"p": 1, "q": 2}}
    got = answer('{"jsonrpc":"2.0","method":"fields","params":["n",3],"id":1}')
    assert got["error"]["code"] == -32602


def test_signature_binding():
    sig = Signature(("a", "b", "c"), 1, ("x",))
    assert sig.bind([1]) == {"a": 1}
    assert sig.bind({"a": 1, "x": 2}) == {"a": 1, "x": 2}
    for bad in ([], [1, 2, 3, 4], {"b": 1}, {"a": 1, "y": 2}):
        with pytest.raises(RpcError) as info:
            sig.bind(bad)
        assert info.value.code == rpc.INVALID_PARAMS


# ---------------------------------------------------------------- anything at all


def check_response(obj: Any, ids: set[Any] | None = None) -> None:
    assert isinstance(obj, dict)
    assert obj["jsonrpc"] == "2.0"
    assert "id" in obj
    assert ("result" in obj) != ("error" in obj)
    assert set(obj) <= {"jsonrpc", "result", "error", "id"}
    if "error" in obj:
        error = obj["error"]
        assert isinstance(error["code"], int) and isinstance(error["message"], str)
        assert set(error) <= {"code", "message", "data"}
    if ids is not None:
        assert obj["id"] in ids or obj["id"] is None


def check_answer(out: Any) -> None:
    if out is None:
        return
    if isinstance(out, list):
        assert out
        for item in out:
            check_response(item)
    else:
        check_response(out)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
ids = st.none() | st.integers() | st.text(max_size=10) | st.booleans() | st.lists(st.integers())
methods = st.sampled_from(["subtract", "update", "boom", "fields", "nope", "rpc.x"]) | st.text(
    max_size=10
)
requests = st.fixed_dictionaries(
    {},
    optional={
        "jsonrpc": st.sampled_from(["2.0", "2.0", "1.0", 2]),
        "method": methods | json_values,
        "params": st.lists(json_values, max_size=6)
        | st.dictionaries(
            st.sampled_from(["minuend", "subtrahend", "a", "name", "x"]), json_values, max_size=4
        )
        | json_values,
        "id": ids,
    },
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_get_a_valid_answer(raw):
    check_answer(answer(raw))


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_gets_a_valid_answer(value):
    check_answer(answer(json.dumps(value)))


@settings(max_examples=300, deadline=None)
@given(st.one_of(requests, st.lists(requests | json_values, max_size=6)))
def test_requests_get_one_answer_per_call(message):
    out = answer(json.dumps(message))
    items = message if isinstance(message, list) else [message]
    owed = [
        item
        for item in items
        if not (
            isinstance(item, dict)
            and "id" not in item
            and item.get("jsonrpc") == "2.0"
            and isinstance(item.get("method"), str)
            and isinstance(item.get("params", []), list | dict)
        )
    ]
    if isinstance(message, list) and not message:
        assert out["error"]["code"] == -32600
        return
    if not owed:
        assert out is None
        return
    check_answer(out)
    got = out if isinstance(message, list) else [out]
    assert isinstance(got, list) and len(got) == len(owed)
    for item, response in zip(owed, got, strict=True):
        if isinstance(item, dict) and rpc._valid_id(item.get("id")):
            assert response["id"] == item.get("id")
        else:
            assert response["id"] is None


def test_call_defaults():
    parsed = rpc.parse(b'{"jsonrpc":"2.0","method":"m"}')
    assert parsed.items == [Call("m", [], None, notification=True)]


def test_optional_first_binds_by_count_only():
    sig = Signature(
        ("node", "task", "result"), 3, optional_first=True, aliases=(("out", "result"),)
    )
    assert sig.bind(["n", "t", "r"]) == {"node": "n", "task": "t", "result": "r"}
    assert sig.bind(["t", "r"]) == {"task": "t", "result": "r"}
    assert sig.bind(["n", "n"]) == {"task": "n", "result": "n"}  # values never decide
    assert sig.bind({"task": "t", "out": 1}) == {"task": "t", "result": 1}
    assert sig.bind({"node": None, "task": "t", "result": 1})["node"] is None
    for bad in (
        ["t"],
        [],
        ["a", "b", "c", "d"],
        {"node": "n"},
        {"task": "t", "out": 1, "result": 2},
    ):
        with pytest.raises(RpcError) as info:
            sig.bind(bad)
        assert info.value.code == rpc.INVALID_PARAMS, bad
    with pytest.raises(RpcError, match="missing result"):
        sig.bind(["t"])
    # without optional_first nothing moves
    with pytest.raises(RpcError, match="missing result"):
        Signature(("node", "task", "result"), 3).bind(["t", "r"])


def test_the_caller_comes_from_the_transport_not_the_params():
    methods = Methods()

    async def who(x: Any = None, caller: Any = None) -> Any:
        return [x, caller]

    async def plain(x: Any = None) -> Any:
        return x

    methods.add("who", Signature(("x",)), who, caller=True)
    methods.add("plain", Signature(("x",)), plain)

    def run(raw: bytes, caller: Any = None) -> Any:
        return json.loads(asyncio.run(rpc.handle(raw, methods.dispatch, caller=caller)))

    assert run(b'{"jsonrpc":"2.0","method":"who","params":[1],"id":1}', ("peer",))["result"] == [
        1,
        ["peer"],
    ]
    assert run(b'{"jsonrpc":"2.0","method":"who","id":1}')["result"] == [None, None]
    forged = b'{"jsonrpc":"2.0","method":"who","params":{"caller":"x"},"id":1}'
    assert run(forged, ("peer",))["error"]["code"] == rpc.INVALID_PARAMS
    assert run(b'{"jsonrpc":"2.0","method":"plain","params":[2],"id":1}', ("p",))["result"] == 2
    batch = b'[{"jsonrpc":"2.0","method":"who","id":1},{"jsonrpc":"2.0","method":"who","id":2}]'
    assert [a["result"][1] for a in run(batch, ("b",))] == [["b"], ["b"]]
    assert rpc.parse(b'{"jsonrpc":"2.0","method":"m"}', caller="c").items[0].caller == "c"
