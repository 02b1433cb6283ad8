"""The loader's allowlist and resolution, in-process."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from corral.errors import BadRequest, NotAllowed, NotFound
from corral.worker.loader import Loader, check_prefixes, is_allowed

SENTINEL = "tests.jobs_sentinel"


@pytest.fixture(autouse=True)
def _sentinel_not_imported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(sys.modules, SENTINEL, raising=False)


def job(path: str, name: str, **extra: Any) -> dict[str, Any]:
    return {"path": path, "callable": name, **extra}


def test_registered_task_runs_without_allow() -> None:
    loader = Loader(imports=["tests.jobs"])
    assert loader.resolve(job("tests.jobs", "add", args=[1, 2]))() == 3
    # found by location even though it is registered under a custom name
    assert loader.resolve(job("tests.jobs", "mul", kwargs={"a": 6, "b": 7}))() == 42


def test_unregistered_function_is_refused_before_import() -> None:
    loader = Loader(imports=["tests.jobs"], allow=["tests.jobs"])
    with pytest.raises(NotAllowed) as info:
        loader.resolve(job(SENTINEL, "run"))
    assert SENTINEL not in sys.modules
    message = str(info.value)
    assert SENTINEL in message and "allow" in message and "@corral.task" in message
    # the same module is fine once allowed (and only then imported)
    assert Loader(allow=["tests"]).resolve(job(SENTINEL, "run"))() == "ran"
    assert SENTINEL in sys.modules


def test_plain_function_needs_allow() -> None:
    with pytest.raises(NotAllowed):
        Loader().resolve(job("tests.jobs", "plain_add", args=[1, 2]))
    assert Loader(allow=["tests"]).resolve(job("tests.jobs", "plain_add", args=[1, 2]))() == 3


@pytest.mark.parametrize(
    ("allow", "module", "allowed"),
    [
        (["tests"], "tests", True),
        (["tests"], "tests.jobs", True),
        (["tests."], "tests.jobs", True),
        (["tests."], "tests", False),
        (["tests.jobs"], "tests.jobs", True),
        (["tests.jobs."], "tests.jobs", False),
        (["test"], "tests.jobs", False),  # never a plain string prefix
        (["tests"], "testsfoo", False),
        ([], "tests", False),
    ],
)
def test_prefix_rules(allow: list[str], module: str, allowed: bool) -> None:
    assert is_allowed(module, allow) is allowed


names = st.from_regex(r"[a-z][a-z0-9_]{0,6}", fullmatch=True)


@given(prefix=names, module=st.lists(names, min_size=1, max_size=3).map(".".join))
def test_prefix_matches_whole_components(prefix: str, module: str) -> None:
    expected = module == prefix or module.startswith(prefix + ".")
    assert is_allowed(module, [prefix]) is expected
    assert is_allowed(module, [prefix + "."]) is module.startswith(prefix + ".")


@pytest.mark.parametrize("name", ["__class__", "__import__", "__init__", "_private", "__globals__"])
def test_private_and_dunder_callables_are_refused(name: str) -> None:
    loader = Loader(allow=["tests"])
    with pytest.raises(NotAllowed):
        loader.resolve(job(SENTINEL, name))
    assert SENTINEL not in sys.modules
    with pytest.raises(NotAllowed):
        loader.resolve(job("tests.jobs:Counter", name))


@pytest.mark.parametrize("name", ["os.system", "add.__globals__", "a b", "1x", ""])
def test_dotted_or_odd_callables_are_bad_requests(name: str) -> None:
    with pytest.raises(BadRequest):
        Loader(allow=["tests"]).resolve(job(SENTINEL, name))
    assert SENTINEL not in sys.modules


@pytest.mark.parametrize(
    "path", ["", "tests..jobs", ".jobs", "tests/jobs", ":Counter", "tests.jobs:Counter.add", "x:"]
)
def test_malformed_paths_are_bad_requests(path: str) -> None:
    with pytest.raises(BadRequest):
        Loader(allow=["tests", "x"]).resolve(job(path, "add"))


def test_reexported_names_are_refused() -> None:
    # tests.jobs does `from os import system`; allowing tests must not allow os.
    with pytest.raises(NotAllowed, match="posix|nt"):
        Loader(allow=["tests"]).resolve(job("tests.jobs", "system", args=["true"]))


def test_class_path_builds_instance_and_calls_method() -> None:
    loader = Loader(allow=["tests"])
    run = loader.resolve(job("tests.jobs:Counter", "add", args=[2], class_args=[40]))
    assert run() == 42
    run = loader.resolve(
        job("tests.jobs:Counter", "add", kwargs={"n": 1}, class_kwargs={"start": 9})
    )
    assert run() == 10


def test_class_path_needs_allow_and_a_class() -> None:
    with pytest.raises(NotAllowed):
        Loader().resolve(job("tests.jobs:Counter", "add"))
    with pytest.raises(BadRequest):
        Loader(allow=["tests"]).resolve(job("tests.jobs:plain_add", "add"))


def test_missing_things_are_not_found() -> None:
    loader = Loader(allow=["tests"])
    with pytest.raises(NotFound):
        loader.resolve(job("tests.no_such_module", "fn"))
    with pytest.raises(NotFound):
        loader.resolve(job("tests.jobs", "no_such_function"))
    with pytest.raises(NotFound):
        loader.resolve(job("tests.jobs:NoSuchClass", "add"))
    with pytest.raises(LookupError):  # NotFound is a LookupError
        loader.resolve(job("tests.jobs:Counter", "no_such_method"))


def test_missing_dependency_is_not_not_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The module exists but its own import fails: that is its bug, reported as such.
    (tmp_path / "corral_test_broken.py").write_text("import corral_test_missing_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as info:
        Loader(allow=["corral_test_broken"]).resolve(job("corral_test_broken", "fn"))
    assert not isinstance(info.value, NotFound)
    assert info.value.name == "corral_test_missing_dep"


@pytest.mark.parametrize(
    "params",
    [
        ["tests.jobs", "add"],
        {"callable": "add"},
        {"path": 3, "callable": "add"},
        {"path": "tests.jobs", "callable": None},
        {"path": "tests.jobs", "callable": "add", "args": {"a": 1}},
        {"path": "tests.jobs", "callable": "add", "args": "12"},
        {"path": "tests.jobs", "callable": "add", "kwargs": [1, 2]},
        {"path": "tests.jobs", "callable": "add", "kwargs": {1: 2}},
        {"path": "tests.jobs:Counter", "callable": "add", "class_args": "x"},
        {"path": "tests.jobs:Counter", "callable": "add", "class_kwargs": [1]},
    ],
)
def test_bad_params_are_bad_requests(params: Any) -> None:
    with pytest.raises(BadRequest):
        Loader(imports=["tests.jobs"], allow=["tests"]).resolve(params)


def test_none_args_mean_empty() -> None:
    run = Loader(allow=["tests"]).resolve(job("tests.jobs", "noop", args=None, kwargs=None))
    assert run() is None


def test_imports_errors_propagate() -> None:
    with pytest.raises(ModuleNotFoundError):
        Loader(imports=["tests.no_such_module"])


@pytest.mark.parametrize("allow", [[""], ["a b"], ["pkg.."], [".pkg"], "pkg", [3]])
def test_invalid_prefixes_are_rejected(allow: Any) -> None:
    with pytest.raises(ValueError):
        check_prefixes(allow)
