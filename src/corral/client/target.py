"""What to run: turning a task, a function or a dotted name into a ``run`` body.

A worker imports ``path`` and calls ``callable`` on it, so only things that
can be found again by name in another process are accepted; everything else
(lambdas, closures, bound instance methods, ``__main__`` code) is refused here,
before anything is sent, rather than failing later on a worker.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec

from corral.protocol import RunParams, encode_body

#: Anything :func:`body_for` accepts as "what to run".
Target = Callable[..., Any] | str


def body_for(
    target: Any,
    args: Iterable[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    *,
    class_args: Iterable[Any] = (),
    class_kwargs: Mapping[str, Any] | None = None,
) -> RunParams:
    """The :class:`RunParams` for calling ``target(*args, **kwargs)`` on a worker.

    ``target`` is one of:

    * a ``corral.tasks.Task`` (anything with a ``fn`` attribute: its
      ``module`` and ``qualname``, else its ``name`` such as ``"pkg.mod:fn"``);
    * a module-level function, or a method reached through its class
      (``Class.meth`` becomes path ``"pkg.mod:Class"``, callable ``"meth"``: the
      worker builds ``Class(*class_args, **class_kwargs)`` and calls ``meth``);
    * a string ``"pkg.mod:fn"``, ``"pkg.mod:Class.meth"`` or EventMQ's
      ``"pkg.mod.fn"`` (the last dot splits module from callable).

    ``args`` (default none) and ``kwargs`` (default none) are copied;
    ``class_args``/``class_kwargs`` (default none) are for class targets.
    Raises :class:`TypeError` for a target no worker could import and
    :class:`ValueError` for a malformed name. JSON-encodability of the
    arguments is checked by :func:`encode_call`, not here.
    """
    path, name = _resolve(target)
    return RunParams(
        path=path,
        callable=name,
        args=list(args),
        kwargs=dict(kwargs) if kwargs else {},
        class_args=list(class_args),
        class_kwargs=dict(class_kwargs) if class_kwargs else {},
    )


def encode_call(
    target: Any, args: Iterable[Any] = (), kwargs: Mapping[str, Any] | None = None
) -> bytes:
    """The REQUEST body (JSON bytes) for ``target(*args, **kwargs)``.

    Raises :class:`TypeError` when an argument cannot be encoded as JSON, so a
    bad call fails in the submitting code instead of on a worker.
    """
    params = body_for(target, args, kwargs)
    try:
        return encode_body(params)
    except (TypeError, ValueError, msgspec.EncodeError) as exc:
        raise TypeError(
            f"arguments for {params.path}:{params.callable} are not JSON-serializable: {exc}"
        ) from exc


def _resolve(target: Any) -> tuple[str, str]:
    if isinstance(target, str):
        return _parse_name(target)
    if hasattr(target, "fn"):
        # A Task: the wire names its function's location; a custom task name is only
        # a registry key, so .module/.qualname come first and .name is the fallback.
        module, qualname = getattr(target, "module", None), getattr(target, "qualname", None)
        if isinstance(module, str) and isinstance(qualname, str):
            return _from_qualname(target, module, qualname)
        if isinstance(getattr(target, "name", None), str):
            return _parse_name(target.name)
    if inspect.ismethod(target):
        owner = target.__self__
        if not isinstance(owner, type):
            raise TypeError(
                f"{target!r} is bound to an instance, which cannot be sent to a worker; "
                "submit the method through its class and pass constructor arguments instead"
            )
        return _from_qualname(
            target.__func__, owner.__module__, f"{owner.__qualname__}.{target.__name__}"
        )
    if inspect.isfunction(target) or inspect.isbuiltin(target):
        return _from_qualname(target, target.__module__, target.__qualname__)
    raise TypeError(
        f"cannot submit {target!r}: give a task, a module-level function or a 'pkg.mod:fn' string"
    )


def _from_qualname(fn: Any, module: str | None, qualname: str) -> tuple[str, str]:
    if "<lambda>" in qualname:
        raise TypeError(
            f"cannot submit a lambda ({fn!r}): workers import targets by name; "
            "define it at module level"
        )
    if "<locals>" in qualname:
        raise TypeError(
            f"cannot submit {qualname!r}: it is defined inside a function, so "
            "workers cannot import it; define it at module level"
        )
    if not module or module == "__main__":
        raise TypeError(
            f"cannot submit {qualname!r} from {module or 'an unknown module'!r}: "
            "workers cannot import it; move it into an importable module"
        )
    try:
        return _split(module, qualname, f"{module}:{qualname}")
    except ValueError as exc:
        raise TypeError(str(exc)) from None


@functools.lru_cache(maxsize=1024)  # a client submits the same few targets over and over
def _parse_name(name: str) -> tuple[str, str]:
    module, sep, qualname = name.strip().partition(":")
    if not sep:
        # EventMQ style "pkg.mod.fn": everything before the last dot is the module.
        module, dot, qualname = module.rpartition(".")
        if not dot:
            raise ValueError(f"target {name!r} needs a module: 'pkg.mod:fn' or 'pkg.mod.fn'")
    return _split(module, qualname, name)


def _split(module: str, qualname: str, shown: str) -> tuple[str, str]:
    parts = qualname.split(".")
    if not _dotted(module) or not all(p.isidentifier() for p in parts):
        raise ValueError(f"target {shown!r} is not a valid 'pkg.mod:name'")
    if len(parts) == 1:
        return module, parts[0]
    if len(parts) == 2:
        return f"{module}:{parts[0]}", parts[1]
    # eMQP's path names one class at most: "pkg.mod:Class".
    raise ValueError(
        f"target {shown!r} is nested too deeply: use a module-level function "
        "or a method of a module-level class"
    )


def _dotted(module: str) -> bool:
    return bool(module) and all(p.isidentifier() for p in module.split("."))
