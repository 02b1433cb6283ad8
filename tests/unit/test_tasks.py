"""The task decorator, the registry and submission through the client."""

from __future__ import annotations

import sys
import types
from typing import Any

import pytest

from corral import tasks
from corral.tasks import Task, lookup, registry, task
from tests import jobs


def test_bare_decorator_wraps_and_registers() -> None:
    assert isinstance(jobs.add, Task)
    assert jobs.add(2, 3) == 5
    assert jobs.add.fn(2, 3) == 5
    assert jobs.add.name == "tests.jobs:add"
    assert (jobs.add.module, jobs.add.qualname) == ("tests.jobs", "add")
    assert (jobs.add.queue, jobs.add.timeout, jobs.add.retries) == ("default", None, 0)
    # functools.update_wrapper was applied
    assert jobs.add.__name__ == "add"
    assert jobs.add.__doc__ == "Registered with default options."
    assert jobs.add.__wrapped__ is jobs.add.fn
    assert registry["tests.jobs:add"] is jobs.add


def test_decorator_with_options_and_custom_name() -> None:
    assert jobs.mul.name == "tests.custom-mul"
    assert (jobs.mul.queue, jobs.mul.timeout, jobs.mul.retries) == ("math", 5, 2)
    assert registry["tests.custom-mul"] is jobs.mul
    assert jobs.mul(6, 7) == 42


def test_lookup_by_location_and_by_name() -> None:
    # The wire names module + callable, so a custom-named task is still found.
    assert lookup("tests.jobs", "mul") is jobs.mul
    assert lookup("tests.jobs", "add") is jobs.add
    assert lookup("tests.jobs", "plain_add") is None
    assert lookup("tests.jobs:Counter", "add") is None


def test_lookup_never_imports() -> None:
    name = "tests.never_imported_by_lookup"
    assert lookup(name, "fn") is None
    assert name not in sys.modules


def test_reregistering_a_name_replaces_it() -> None:
    def first() -> int:
        return 1

    def second() -> int:
        return 2

    a = task(name="tests.reregistered")(first)
    b = task(name="tests.reregistered")(second)
    try:
        assert registry["tests.reregistered"] is b
        assert lookup(a.module, a.qualname) is None
        assert lookup(b.module, b.qualname) is b
    finally:
        registry.pop("tests.reregistered", None)
        tasks._by_location.pop((b.module, b.qualname), None)


@pytest.mark.parametrize(
    "options",
    [{"queue": ""}, {"timeout": 0}, {"timeout": -1}, {"retries": -1}, {"retries": 1.5}],
)
def test_bad_options_are_rejected(options: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        task(**options)(lambda: None)


def test_non_callable_is_rejected() -> None:
    with pytest.raises(TypeError):
        Task(42)  # type: ignore[arg-type]


class FakeClient:
    def __init__(self) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def submit_with(self, fn: Any, args: Any = (), kwargs: Any = None, **options: Any) -> str:
        self.calls.append(((fn, *args), {**options, **(kwargs or {})}))
        self.split = (dict(kwargs or {}), options)
        return "job-1"


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    fake = FakeClient()
    module = types.ModuleType("corral.client")
    module.default_client = lambda: fake  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "corral.client", module)
    return fake


def test_delay_submits_with_task_defaults(client: FakeClient) -> None:
    assert jobs.mul.delay(2, b=3) == "job-1"
    assert client.calls == [
        ((jobs.mul, 2), {"queue": "math", "timeout": 5, "retries": 2, "b": 3}),
    ]


def test_apply_async_options_override_defaults(client: FakeClient) -> None:
    jobs.mul.apply_async((2,), {"b": 3}, queue="fast", retries=0, label="x")
    assert client.calls == [
        ((jobs.mul, 2), {"queue": "fast", "timeout": 5, "retries": 0, "label": "x", "b": 3}),
    ]


def test_job_kwargs_named_like_options_stay_job_kwargs(client: FakeClient) -> None:
    jobs.mul.delay(2, queue="not-an-option")
    job_kwargs, options = client.split
    assert job_kwargs == {"queue": "not-an-option"}
    assert options["queue"] == "math"
    client.calls.clear()
    jobs.add.apply_async()
    assert client.calls == [((jobs.add,), {"queue": "default", "timeout": None, "retries": 0})]
