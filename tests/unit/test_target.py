"""body_for / encode_call: how "what to run" becomes a ``run`` body."""

from __future__ import annotations

import datetime
import math
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from corral.client.target import body_for, encode_call
from corral.protocol import RunParams, decode_body

MODULE = __name__


def plain(a: int, b: int) -> int:
    return a + b


class Thing:
    def __init__(self, base: int = 0) -> None:
        self.base = base

    def method(self, x: int) -> int:
        return self.base + x

    @classmethod
    def make(cls) -> Thing:
        return cls()

    @staticmethod
    def helper() -> int:
        return 1

    class Inner:
        def deep(self) -> None:
            pass


def where(params: RunParams) -> tuple[str, str]:
    return params.path, params.callable


# ---------------------------------------------------------------- functions


def test_plain_function() -> None:
    params = body_for(plain, (1, 2), {"c": 3})
    assert where(params) == (MODULE, "plain")
    assert params.args == [1, 2] and params.kwargs == {"c": 3}
    assert params.class_args == [] and params.class_kwargs == {}


def test_method_through_its_class_becomes_class_path() -> None:
    assert where(body_for(Thing.method, (1,))) == (f"{MODULE}:Thing", "method")
    assert where(body_for(Thing.make)) == (f"{MODULE}:Thing", "make")
    assert where(body_for(Thing.helper)) == (f"{MODULE}:Thing", "helper")


def test_class_arguments_are_kept() -> None:
    params = body_for(Thing.method, [5], class_args=[10], class_kwargs={"k": 1})
    assert params.class_args == [10] and params.class_kwargs == {"k": 1}


def test_builtin_function() -> None:
    assert where(body_for(math.sqrt, [4])) == ("math", "sqrt")


def test_arguments_are_copied() -> None:
    args, kwargs = [1], {"a": 1}
    params = body_for(plain, args, kwargs)
    args.append(2)
    kwargs["b"] = 2
    assert params.args == [1] and params.kwargs == {"a": 1}


@pytest.mark.parametrize(
    "target, match",
    [
        (lambda: 1, "lambda"),
        (Thing(1).method, "instance"),
        (Thing.Inner.deep, "nested"),
        (Thing, "cannot submit"),  # a class is not a job; its methods are
        (42, "cannot submit"),
    ],
)
def test_unimportable_targets_raise_type_error(target: Any, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        body_for(target)


def test_local_function_refused() -> None:
    def local() -> None:
        pass

    with pytest.raises(TypeError, match="inside a function"):
        body_for(local)


def test_main_module_refused() -> None:
    def fn() -> None:
        pass

    fn.__module__ = "__main__"
    fn.__qualname__ = "fn"
    with pytest.raises(TypeError, match="__main__"):
        body_for(fn)


def test_callable_instances_and_partials_refused() -> None:
    import functools

    with pytest.raises(TypeError):
        body_for(functools.partial(plain, 1))


# ---------------------------------------------------------------- tasks


def test_task_uses_module_and_qualname_not_registry_name() -> None:
    task = SimpleNamespace(fn=plain, module="pkg.jobs", qualname="add", name="custom-name")
    assert where(body_for(task, [1, 2])) == ("pkg.jobs", "add")


def test_task_method_location() -> None:
    task = SimpleNamespace(fn=plain, module="pkg.jobs", qualname="Mailer.send", name="x")
    assert where(body_for(task)) == ("pkg.jobs:Mailer", "send")


def test_task_with_only_a_name() -> None:
    task = SimpleNamespace(fn=plain, name="pkg.jobs:add")
    assert where(body_for(task)) == ("pkg.jobs", "add")


def test_real_task_decorator() -> None:
    tasks = pytest.importorskip("corral.tasks")
    t = tasks.Task(plain, name="renamed")
    assert where(body_for(t, [1, 2])) == (MODULE, "plain")


# ---------------------------------------------------------------- strings


@pytest.mark.parametrize(
    "name, expected",
    [
        ("pkg.mod:fn", ("pkg.mod", "fn")),
        ("pkg.mod:Class.meth", ("pkg.mod:Class", "meth")),
        ("pkg.mod.fn", ("pkg.mod", "fn")),
        ("mod.fn", ("mod", "fn")),
        ("mod:fn", ("mod", "fn")),
        ("  pkg.mod:fn ", ("pkg.mod", "fn")),
    ],
)
def test_string_targets(name: str, expected: tuple[str, str]) -> None:
    assert where(body_for(name)) == expected


@pytest.mark.parametrize(
    "name",
    [
        "fn",
        "",
        ":fn",
        "pkg.mod:",
        "pkg..mod:fn",
        "pkg.mod:a.b.c",
        "pkg-mod:fn",
        "pkg.mod:1x",
        "pkg.mod.",
        "a:b:c",
    ],
)
def test_malformed_strings_raise_value_error(name: str) -> None:
    with pytest.raises(ValueError):
        body_for(name)


# ---------------------------------------------------------------- encoding


def test_encode_call_round_trips() -> None:
    raw = encode_call(plain, (1, "two", [3.5, None]), {"flag": True, "nested": {"k": [1]}})
    params = decode_body(raw)
    assert where(params) == (MODULE, "plain")
    assert params.args == [1, "two", [3.5, None]]
    assert params.kwargs == {"flag": True, "nested": {"k": [1]}}
    assert msgspec.json.decode(raw)[0] == "run"


def test_encode_call_omits_empty_fields() -> None:
    assert encode_call("m:f") == b'["run",{"path":"m","callable":"f"}]'


@pytest.mark.parametrize("bad", [object(), {1, 2}.__iter__(), plain, Thing()])
def test_unserializable_arguments_raise_type_error(bad: Any) -> None:
    with pytest.raises(TypeError, match="JSON-serializable"):
        encode_call(plain, (bad,))
    with pytest.raises(TypeError, match="JSON-serializable"):
        encode_call(plain, (), {"x": bad})


def test_msgspec_encodable_values_are_accepted() -> None:
    # msgspec decides what "JSON-serializable" means: dates travel as ISO strings.
    raw = encode_call(plain, (datetime.date(2024, 1, 2),))
    assert decode_body(raw).args == ["2024-01-02"]
