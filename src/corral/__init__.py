"""corral: a distributed job broker for Python on ZeroMQ, speaking EventMQ's eMQP.

The names below are imported on first use, so ``import corral`` stays cheap
(a worker process does not load the client) and never fails because an
optional part is missing.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from corral.client import AsyncClient, Client, Executor, Job
    from corral.errors import JobFailed
    from corral.tasks import task

__all__ = ["AsyncClient", "Client", "Executor", "Job", "JobFailed", "task"]

_LAZY = {
    "Client": "corral.client",
    "AsyncClient": "corral.client",
    "Executor": "corral.client",
    "Job": "corral.client",
    "JobFailed": "corral.errors",
    "task": "corral.tasks",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'corral' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
