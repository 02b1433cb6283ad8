"""The task registry: ``@corral.task`` and the lookup a worker uses.

A task is an ordinary function wrapped in :class:`Task`. Decorating it
registers it under its name in :data:`registry`, which is what lets a worker
run it without an allowlist entry: the deployment's own modules are imported
at worker start, so everything they decorate is known before any job arrives.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, overload

__all__ = ["Task", "lookup", "registry", "task"]

#: Every registered task, by name (``"pkg.mod:fn"`` unless given one).
registry: dict[str, Task] = {}

# The wire names a job by module path and callable, not by task name, so
# custom-named tasks need a second index to be found from a request body.
_by_location: dict[tuple[str, str], Task] = {}


class Task:
    """A registered job function.

    Calling the task runs the function here and now; :meth:`delay` and
    :meth:`apply_async` submit it to a broker instead.

    Parameters:
        fn: the function to wrap.
        name: registry key; defaults to ``"<fn.__module__>:<fn.__qualname__>"``.
        queue: queue jobs are submitted to; default ``"default"``.
        timeout: hard time limit in seconds for each run; default ``None`` (none).
        retries: how many times a failed job is retried; default ``0``.
    """

    fn: Callable[..., Any]
    name: str
    module: str
    qualname: str
    queue: str
    timeout: float | None
    retries: int

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        queue: str = "default",
        timeout: float | None = None,
        retries: int = 0,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"@task needs a callable, got {type(fn).__name__}")
        if not isinstance(queue, str) or not queue:
            raise ValueError("queue must be a non-empty string")
        if timeout is not None and (isinstance(timeout, bool) or not timeout > 0):
            raise ValueError(
                f"timeout must be a positive number of seconds or None, not {timeout!r}"
            )
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, not {retries!r}")
        # First, so that attributes copied from fn.__dict__ cannot shadow ours.
        functools.update_wrapper(self, fn)
        self.fn = fn
        self.module = fn.__module__
        self.qualname = fn.__qualname__
        self.name = name if name is not None else f"{self.module}:{self.qualname}"
        if not isinstance(self.name, str) or not self.name:
            raise ValueError("name must be a non-empty string")
        self.queue = queue
        self.timeout = timeout
        self.retries = retries

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run the function locally, in this process."""
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<Task {self.name} queue={self.queue!r}>"

    def delay(self, *args: Any, **kwargs: Any) -> Any:
        """Submit a job with these arguments and the task's default options.

        Returns whatever the default client's ``submit`` returns.
        """

        return self.apply_async(args, kwargs)

    def apply_async(
        self,
        args: tuple[Any, ...] | list[Any] = (),
        kwargs: dict[str, Any] | None = None,
        **options: Any,
    ) -> Any:
        """Submit a job, overriding the task's options.

        Parameters:
            args: positional arguments for the job; default none.
            kwargs: keyword arguments for the job; default none.
            **options: ``queue``, ``timeout``, ``retries`` or any other option
                the client's ``submit`` accepts; they replace the task's defaults.
        """
        from corral.client import default_client

        merged: dict[str, Any] = {
            "queue": self.queue,
            "timeout": self.timeout,
            "retries": self.retries,
            **options,
        }
        return default_client().submit_with(self, args, kwargs or {}, **merged)


def _register(t: Task) -> Task:
    # A later registration under the same name wins: that is what happens
    # when a module is reloaded, and refusing it would break reloads.
    old = registry.get(t.name)
    if old is not None:
        _by_location.pop((old.module, old.qualname), None)
    registry[t.name] = t
    _by_location[(t.module, t.qualname)] = t
    return t


@overload
def task(fn: Callable[..., Any]) -> Task: ...


@overload
def task(
    fn: None = None,
    *,
    name: str | None = None,
    queue: str = "default",
    timeout: float | None = None,
    retries: int = 0,
) -> Callable[[Callable[..., Any]], Task]: ...


def task(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    queue: str = "default",
    timeout: float | None = None,
    retries: int = 0,
) -> Task | Callable[[Callable[..., Any]], Task]:
    """Register a function as a task; use as ``@task`` or ``@task(...)``.

    Parameters:
        fn: the function, when used without parentheses.
        name: registry key; default ``"<module>:<qualname>"``.
        queue: default queue for submissions; default ``"default"``.
        timeout: default hard time limit in seconds; default ``None`` (none).
        retries: default retry count; default ``0``.
    """

    def wrap(f: Callable[..., Any]) -> Task:
        return _register(Task(f, name=name, queue=queue, timeout=timeout, retries=retries))

    return wrap(fn) if fn is not None else wrap


def lookup(path: str, callable_name: str) -> Task | None:
    """Find the registered task an eMQP request names, importing nothing.

    Parameters:
        path: the body's ``path``, a module such as ``"pkg.mod"``.
        callable_name: the body's ``callable``, such as ``"fn"``.

    Returns the task, or ``None`` when no registered task has that location
    (or, failing that, the name ``"<path>:<callable_name>"``).
    """
    found = _by_location.get((path, callable_name))
    if found is None:
        found = registry.get(f"{path}:{callable_name}")
    return found
