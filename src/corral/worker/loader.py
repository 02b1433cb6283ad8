"""Decide whether a job may run, and resolve it to a callable.

A job body names code by module path and attribute, so resolving it naively
is "import anything, call anything". The :class:`Loader` only imports a module
once it has been shown to be allowed: either the job is a task registered by
the deployment's own modules (imported at start), or its module lies under an
allowed prefix. Everything else is refused before any import happens, so a
refused request cannot run module-level code either.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from corral.errors import BadRequest, NotAllowed, NotFound
from corral.tasks import lookup

__all__ = ["Loader", "check_prefixes", "is_allowed"]


def _is_dotted_name(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def check_prefixes(allow: Sequence[str]) -> tuple[str, ...]:
    """Validate allow prefixes and return them as a tuple.

    Parameters:
        allow: entries such as ``"pkg"`` (``pkg`` and ``pkg.*``) or ``"pkg."``
            (``pkg.*`` only).

    Raises ``ValueError`` for anything that is not a dotted module name,
    optionally with one trailing dot.
    """
    if isinstance(allow, str):
        # A bare string would otherwise be taken letter by letter.
        raise ValueError("allow must be a sequence of prefixes, not a single string")
    out = []
    for prefix in allow:
        if not isinstance(prefix, str) or not _is_dotted_name(prefix.removesuffix(".")):
            raise ValueError(
                f"invalid allow prefix {prefix!r}: expected 'pkg', 'pkg.' or 'pkg.sub'"
            )
        out.append(prefix)
    return tuple(out)


def is_allowed(module: str, allow: Sequence[str]) -> bool:
    """Whether ``module`` lies under one of the ``allow`` prefixes.

    ``"pkg"`` allows ``pkg`` and ``pkg.x``; ``"pkg."`` allows ``pkg.x`` but not
    ``pkg``; neither allows ``pkgfoo``.
    """
    for prefix in allow:
        if prefix.endswith("."):
            if module.startswith(prefix):
                return True
        elif module == prefix or module.startswith(prefix + "."):
            return True
    return False


def _check_list(params: Mapping[str, Any], key: str) -> list[Any]:
    value = params.get(key)
    if value is None:
        return []
    if not isinstance(value, list | tuple):
        raise BadRequest(f"{key!r} must be a list, not {type(value).__name__}")
    return list(value)


def _check_dict(params: Mapping[str, Any], key: str) -> dict[str, Any]:
    value = params.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadRequest(f"{key!r} must be an object, not {type(value).__name__}")
    for k in value:
        if not isinstance(k, str):
            raise BadRequest(f"{key!r} keys must be strings, got {type(k).__name__}")
    return dict(value)


def _check_attr_name(name: str, what: str) -> None:
    if not name.isidentifier():
        raise BadRequest(f"{what} {name!r} must be a plain attribute name (no dots)")
    if name.startswith("_"):
        # Private and dunder names (__class__, __globals__, __import__...) are
        # the usual ways out of a sandbox of attribute lookups.
        raise NotAllowed(f"{what} {name!r} is private: names starting with '_' are never run")


class Loader:
    """Resolve eMQP job bodies to callables, under an allowlist.

    Parameters:
        imports: modules imported now, so the tasks they register become
            runnable (the deployment's own modules); default none.
        allow: module prefixes whose plain functions and classes may also be
            run (see :func:`is_allowed`); default none, i.e. only registered
            tasks run.

    Importing ``imports`` happens in the constructor; its errors propagate,
    because a worker missing its own code should not start.
    """

    def __init__(self, imports: Sequence[str] = (), allow: Sequence[str] = ()) -> None:
        if isinstance(imports, str):
            raise ValueError("imports must be a sequence of module names, not a single string")
        self.imports: tuple[str, ...] = tuple(imports)
        self.allow: tuple[str, ...] = check_prefixes(allow)
        for name in self.imports:
            importlib.import_module(name)

    def resolve(self, params: Mapping[str, Any]) -> Callable[[], Any]:
        """Turn a job body into a zero-argument callable that runs the job.

        Parameters:
            params: ``{"path": "pkg.mod" | "pkg.mod:Class", "callable": name,
                "args": [...], "kwargs": {...}, "class_args": [...],
                "class_kwargs": {...}}``; all but ``path`` and ``callable``
                are optional.

        Raises ``BadRequest`` for malformed bodies, ``NotAllowed`` (before
        importing anything) for code outside the registry and the allowlist,
        ``NotFound`` for a missing module or attribute. Errors raised while
        importing an allowed module propagate unchanged.
        """
        if not isinstance(params, Mapping):
            raise BadRequest(f"job params must be an object, not {type(params).__name__}")
        path = params.get("path")
        name = params.get("callable")
        if not isinstance(path, str) or not path:
            raise BadRequest("'path' must be a non-empty string")
        if not isinstance(name, str) or not name:
            raise BadRequest("'callable' must be a non-empty string")
        args = _check_list(params, "args")
        kwargs = _check_dict(params, "kwargs")
        module_name, colon, class_name = path.partition(":")
        if not _is_dotted_name(module_name) or (colon and not class_name):
            raise BadRequest(f"'path' {path!r} must look like 'pkg.mod' or 'pkg.mod:Class'")

        if not class_name:
            registered = lookup(path, name)
            if registered is not None:
                return functools.partial(registered.fn, *args, **kwargs)

        if class_name:
            _check_attr_name(class_name, "class")
        _check_attr_name(name, "callable")
        self._check_allowed(module_name, f"{path}.{name}" if class_name else f"{path}:{name}")

        module = self._import(module_name)
        if not class_name:
            fn = self._getattr(module, name, module_name)
            self._check_owner(fn, module_name, f"{path}:{name}")
            if not callable(fn):
                raise BadRequest(f"{path}:{name} is not callable")
            return functools.partial(fn, *args, **kwargs)

        cls = self._getattr(module, class_name, module_name)
        if not isinstance(cls, type):
            raise BadRequest(f"{module_name}:{class_name} is not a class")
        self._check_owner(cls, module_name, path)
        # The class's own methods are its author's choice, inherited ones
        # included, so there is no owner check past the class itself.
        method = self._getattr(cls, name, path)
        if not callable(method):
            raise BadRequest(f"{path}.{name} is not callable")
        class_args = _check_list(params, "class_args")
        class_kwargs = _check_dict(params, "class_kwargs")

        def run_method() -> Any:
            # Built at run time so a failing constructor is the job's error.
            instance = cls(*class_args, **class_kwargs)
            return getattr(instance, name)(*args, **kwargs)

        return run_method

    def _check_allowed(self, module_name: str, target: str) -> None:
        if is_allowed(module_name, self.allow):
            return
        allowed = ", ".join(repr(p) for p in self.allow) or "none"
        raise NotAllowed(
            f"refused to run {target}: it is not a registered task and module "
            f"{module_name!r} is not under an allowed prefix (allowed: {allowed}). "
            f"To allow it, decorate it with @corral.task in a module the worker imports, "
            f"or add {module_name!r} (or a parent package) to the worker's allow list."
        )

    def _check_owner(self, obj: Any, module_name: str, target: str) -> None:
        # An allowed module may have imported dangerous names (`from os import
        # system`); only objects defined under an allowed prefix are run.
        owner = getattr(obj, "__module__", None)
        if isinstance(owner, str) and owner != module_name and not is_allowed(owner, self.allow):
            raise NotAllowed(
                f"refused to run {target}: it is defined in module {owner!r}, "
                f"which is not under an allowed prefix"
            )

    @staticmethod
    def _import(module_name: str) -> Any:
        try:
            return importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # Only the target (or one of its parents) missing is "not found";
            # a missing dependency of an existing module is the module's bug.
            missing = exc.name or ""
            if module_name == missing or module_name.startswith(missing + "."):
                raise NotFound(f"no module named {module_name!r}") from None
            raise

    @staticmethod
    def _getattr(obj: Any, name: str, where: str) -> Any:
        try:
            return getattr(obj, name)
        except AttributeError:
            raise NotFound(f"{where!r} has no attribute {name!r}") from None
