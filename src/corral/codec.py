"""The object codec of job streams: JSON values plus registered classes, nothing else.

A value travels as plain JSON. An instance of a class registered with
:func:`register` travels as ``{".class": NAME, ".version": "X.Y", ".state": STATE}``
where ``NAME`` is the name it was registered under (default ``module.QualName``)
and ``STATE`` is itself encoded by these rules. Decoding looks ``NAME`` up in the
registry and nowhere else: a name that was not registered, or a version newer
than the one registered here, raises :class:`CodecError`, and no module is ever
imported because of what a message says. Versions compare part by part, missing
parts counting as zeros (``"2"``, ``"2.0"`` and ``"2.0.0"`` are the same version;
a message without ``.version`` is ``"1.0"``).

A class controls its state with ``__getstate__``/``__setstate__`` (or a
dataclass / ``__dict__`` is used), and may migrate older states in a
classmethod ``__codec_upgrade__(state, version) -> state``.

A :class:`Codec` is replaceable: anything with ``encode(value) -> bytes`` and
``decode(bytes) -> value`` may be handed to the stream readers instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import msgspec

__all__ = ["Codec", "CodecError", "decode", "default", "encode", "register"]

_CLASS, _VERSION, _STATE = ".class", ".version", ".state"


class CodecError(ValueError):
    """A value cannot be encoded, or a message names a class this reader does not accept."""


def _version(text: str) -> tuple[int, ...]:
    try:
        parts = tuple(int(p) for p in text.split("."))
    except ValueError:
        raise CodecError(f"version {text!r} is not of the form 1 or 1.2 or 1.2.3") from None
    if not parts or any(p < 0 for p in parts) or len(parts) > 4:
        raise CodecError(f"version {text!r} is not of the form 1 or 1.2 or 1.2.3")
    return parts


def _compare(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """-1, 0 or 1 as version ``a`` is older than, the same as or newer than ``b``
    (missing parts are zeros: ``2`` is ``2.0`` is ``2.0.0``)."""
    width = max(len(a), len(b))
    a, b = a + (0,) * (width - len(a)), b + (0,) * (width - len(b))
    return (a > b) - (a < b)


@dataclasses.dataclass(frozen=True, slots=True)
class _Entry:
    cls: type
    name: str
    version: str
    parts: tuple[int, ...]


class Codec:
    """A registry of classes and the encode/decode pair that uses it."""

    def __init__(self) -> None:
        self._by_class: dict[type, _Entry] = {}
        self._by_name: dict[str, _Entry] = {}
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder()

    def register(self, cls: type, *, version: str = "1.0", name: str | None = None) -> type:
        """Accept ``cls`` on the wire at ``version`` (default ``"1.0"``); returns ``cls``.

        ``name`` defaults to ``module.QualName``. Usable as a decorator:
        ``@codec.register`` or ``register(cls, version="2.0")``.
        """
        if not isinstance(cls, type):
            raise TypeError(f"register() takes a class, not {cls!r}")
        wire = name or f"{cls.__module__}.{cls.__qualname__}"
        entry = _Entry(cls, wire, version, _version(version))
        other = self._by_name.get(wire)
        if other is not None and other.cls is not cls:
            raise CodecError(f"{wire!r} is already registered for {other.cls!r}")
        self._by_class[cls] = entry
        self._by_name[wire] = entry
        return cls

    # ------------------------------------------------------------ values

    def to_json(self, value: Any) -> Any:
        """``value`` as plain JSON values (lists, dicts, str, numbers, bool, None)."""
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, list | tuple):
            return [self.to_json(v) for v in value]
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise CodecError(f"object keys must be strings, not {type(key).__name__}")
                if key == _CLASS:
                    raise CodecError(f"a plain dict may not use the key {_CLASS!r}")
                out[key] = self.to_json(item)
            return out
        entry = self._by_class.get(type(value))
        if entry is None:
            raise CodecError(
                f"cannot encode a {type(value).__module__}.{type(value).__qualname__}: "
                f"register its class with corral.codec.register()"
            )
        return {_CLASS: entry.name, _VERSION: entry.version, _STATE: self.to_json(_state(value))}

    def from_json(self, value: Any) -> Any:
        """The inverse of :meth:`to_json`: rebuild registered objects, reject unknown ones."""
        if isinstance(value, list):
            return [self.from_json(v) for v in value]
        if not isinstance(value, dict):
            return value
        if _CLASS not in value:
            return {k: self.from_json(v) for k, v in value.items()}
        name, version = value.get(_CLASS), value.get(_VERSION, "1.0")
        if not isinstance(name, str) or not isinstance(version, str):
            raise CodecError(f"{_CLASS} and {_VERSION} must be strings")
        entry = self._by_name.get(name)
        if entry is None:
            raise CodecError(
                f"unknown class {name[:200]!r}: only classes registered with "
                f"corral.codec.register() are decoded (nothing is imported)"
            )
        order = _compare(_version(version), entry.parts)
        if order > 0:
            raise CodecError(
                f"{name} version {version} is newer than the version this reader "
                f"knows ({entry.version}); upgrade the reader"
            )
        state = self.from_json(value.get(_STATE))
        if order < 0:
            upgrade: Callable[[Any, str], Any] | None = getattr(
                entry.cls, "__codec_upgrade__", None
            )
            if upgrade is not None:
                state = upgrade(state, version)
        return _build(entry.cls, state)

    # ------------------------------------------------------------ bytes

    def encode(self, value: Any) -> bytes:
        """``value`` as JSON bytes (raises :class:`CodecError` for what it cannot encode)."""
        try:
            return self._encoder.encode(self.to_json(value))
        except (TypeError, ValueError, OverflowError) as exc:
            if isinstance(exc, CodecError):
                raise
            raise CodecError(f"cannot encode {type(value).__name__}: {exc}") from None

    def decode(self, data: bytes | str) -> Any:
        """JSON bytes back to a value (raises :class:`CodecError` for bad input)."""
        try:
            raw = self._decoder.decode(data)
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            raise CodecError(f"not JSON: {exc}") from None
        return self.from_json(raw)


def _state(obj: Any) -> Any:
    getstate = getattr(obj, "__getstate__", None)
    if getstate is not None:
        state = getstate()
        if state is not None and not (
            isinstance(state, tuple) and len(state) == 2 and state[0] is None
        ):
            return state
    if dataclasses.is_dataclass(obj):
        return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    if isinstance(obj, msgspec.Struct):
        return {f: getattr(obj, f) for f in obj.__struct_fields__}
    return dict(vars(obj))


def _build(cls: type, state: Any) -> Any:
    if isinstance(cls, type) and issubclass(cls, msgspec.Struct):
        if not isinstance(state, dict):
            raise CodecError(f"the state of a {cls.__qualname__} must be an object")
        try:
            return cls(**state)
        except TypeError as exc:  # a missing or unexpected field
            raise CodecError(f"bad state for a {cls.__qualname__}: {exc}") from None
    obj = cls.__new__(cls)
    setstate = getattr(obj, "__setstate__", None)
    if setstate is not None:
        setstate(state)
        return obj
    if not isinstance(state, dict):
        raise CodecError(f"the state of a {cls.__qualname__} must be an object")
    for key, value in state.items():
        object.__setattr__(obj, key, value)
    return obj


#: The process-wide codec used by ``corral.runtime`` and the stream readers.
default = Codec()
register = default.register
encode = default.encode
decode = default.decode
to_json = default.to_json
from_json = default.from_json
