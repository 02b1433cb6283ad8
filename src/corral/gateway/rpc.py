"""JSON-RPC 2.0, the envelope: one message in, the answer out, no I/O.

:func:`handle` is the whole server side of the protocol: it parses a message
(one request or a batch), runs each call through ``dispatch``, and encodes
the answer -- or ``None`` when nothing is owed (only notifications).
Anything at all may come in; what goes out is always a valid JSON-RPC
response (or batch of them): bad JSON is a parse error (-32700), a
malformed request an invalid request (-32600), and a call that raises
something other than :class:`RpcError` an internal error (-32603), logged.

:class:`Methods` binds positional or named params to a handler's parameters
and answers -32601 / -32602 for unknown methods and params that do not fit.

The transport says who calls: ``handle(raw, dispatch, caller=...)`` puts an
opaque, hashable ``caller`` (the ZeroMQ routing envelope, or ``None`` when
the transport has no connection identity, as HTTP) on each :class:`Call`,
and a method added with ``caller=True`` receives it as its ``caller``
argument. It is never taken from the params.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

log = logging.getLogger("corral.gateway")

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

#: Default bounds of one message: its size in bytes and the calls in a batch.
MAX_REQUEST = 4 * 1024 * 1024
MAX_BATCH = 1000

_decode = msgspec.json.decode
_encode = msgspec.json.encode
_DECODE_ERRORS = (msgspec.MsgspecError, UnicodeDecodeError, RecursionError, ValueError)


class RpcError(Exception):
    """An error answer: ``code``, ``message`` and optional ``data`` (any JSON value)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            error["data"] = self.data
        return error


@dataclass(frozen=True, slots=True)
class Call:
    """One well-formed request. ``params`` is ``[]`` when the request had none;
    ``caller`` names the connection it came on (``None`` when unknown)."""

    method: str
    params: list[Any] | dict[str, Any]
    id: str | int | float | None = None
    notification: bool = False
    caller: Any = None


@dataclass(slots=True)
class Parsed:
    """A message taken apart: calls to run, and answers already known (errors)."""

    batch: bool
    #: In message order: a :class:`Call`, or the error response for a bad request.
    items: list[Call | dict[str, Any]]


def result_response(id_: Any, result: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "result": result, "id": id_}


def error_response(id_: Any, error: RpcError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": error.to_dict(), "id": id_}


def _valid_id(value: Any) -> bool:
    # bool is an int in Python, but not a JSON-RPC id.
    return value is None or (isinstance(value, str | int | float) and not isinstance(value, bool))


def _request(obj: Any, caller: Any = None) -> Call | dict[str, Any]:
    if not isinstance(obj, dict):
        return error_response(
            None, RpcError(INVALID_REQUEST, "invalid request: a request is a JSON object")
        )
    has_id = "id" in obj
    id_ = obj.get("id")
    if not _valid_id(id_):
        return error_response(
            None,
            RpcError(INVALID_REQUEST, "invalid request: 'id' must be a string, a number or null"),
        )
    if obj.get("jsonrpc") != "2.0":
        return error_response(
            id_, RpcError(INVALID_REQUEST, "invalid request: 'jsonrpc' must be \"2.0\"")
        )
    method = obj.get("method")
    if not isinstance(method, str):
        return error_response(
            id_, RpcError(INVALID_REQUEST, "invalid request: 'method' must be a string")
        )
    params = obj.get("params", [])
    if not isinstance(params, list | dict):
        return error_response(
            id_,
            RpcError(INVALID_REQUEST, "invalid request: 'params' must be an array or an object"),
        )
    return Call(method, params, id_, notification=not has_id, caller=caller)


def parse(
    raw: bytes, *, max_size: int = MAX_REQUEST, max_batch: int = MAX_BATCH, caller: Any = None
) -> Parsed:
    """Take one message apart (its calls made by ``caller``); never raises."""
    if len(raw) > max_size:
        error = RpcError(
            INVALID_REQUEST,
            f"invalid request: {len(raw)} bytes exceed the limit of {max_size}",
            {"limit": max_size},
        )
        return Parsed(False, [error_response(None, error)])
    try:
        obj = _decode(raw)
    except _DECODE_ERRORS as exc:
        detail = "not UTF-8" if isinstance(exc, UnicodeDecodeError) else str(exc)[:200]
        return Parsed(
            False, [error_response(None, RpcError(PARSE_ERROR, f"parse error: {detail}"))]
        )
    if isinstance(obj, list):
        if not obj:
            error = RpcError(INVALID_REQUEST, "invalid request: an empty batch")
            return Parsed(False, [error_response(None, error)])
        if len(obj) > max_batch:
            error = RpcError(
                INVALID_REQUEST,
                f"invalid request: a batch of {len(obj)} calls exceeds the limit of {max_batch}",
                {"limit": max_batch},
            )
            return Parsed(False, [error_response(None, error)])
        return Parsed(True, [_request(item, caller) for item in obj])
    return Parsed(False, [_request(obj, caller)])


def _encode_response(response: dict[str, Any]) -> bytes:
    try:
        return _encode(response)
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError) as exc:
        log.error("could not encode the answer to call %r: %s", response.get("id"), exc)
        error = RpcError(INTERNAL_ERROR, "internal error: the answer is not valid JSON")
        return _encode(error_response(response.get("id"), error))


def encode(parsed: Parsed, responses: Sequence[dict[str, Any] | None]) -> bytes | None:
    """The answer to send for ``parsed`` given each item's response (``None`` for
    notifications), or ``None`` when nothing is owed."""
    parts = [_encode_response(r) for r in responses if r is not None]
    if not parts:
        return None
    if parsed.batch:
        return b"[" + b",".join(parts) + b"]"
    return parts[0]


Dispatch = Callable[[Call], Awaitable[Any]]


async def _answer(call: Call, dispatch: Dispatch) -> dict[str, Any] | None:
    try:
        result = await dispatch(call)
    except RpcError as exc:
        response = error_response(call.id, exc)
    except Exception as exc:  # noqa: BLE001 - every call gets an answer
        log.exception("internal error in %s", call.method[:100])
        response = error_response(
            call.id, RpcError(INTERNAL_ERROR, f"internal error ({type(exc).__name__})")
        )
    else:
        response = result_response(call.id, result)
    return None if call.notification else response


async def handle(
    raw: bytes,
    dispatch: Dispatch,
    *,
    max_size: int = MAX_REQUEST,
    max_batch: int = MAX_BATCH,
    caller: Any = None,
) -> bytes | None:
    """Answer one JSON-RPC message from ``caller`` (the calls of a batch run concurrently)."""
    parsed = parse(raw, max_size=max_size, max_batch=max_batch, caller=caller)
    calls = [item for item in parsed.items if isinstance(item, Call)]
    if len(calls) == 1:
        answers = [await _answer(calls[0], dispatch)]
    else:
        answers = list(await asyncio.gather(*(_answer(c, dispatch) for c in calls)))
    it = iter(answers)
    responses = [next(it) if isinstance(item, Call) else item for item in parsed.items]
    return encode(parsed, responses)


# ---------------------------------------------------------------- methods


@dataclass(frozen=True, slots=True)
class Signature:
    """What params a method takes.

    ``positional`` names may be given by position or by name, the first
    ``required`` of them must be; ``named`` ones only by name (extensions of a
    fixed positional interface). With ``rest``, unknown named params (or one
    object after the positional ones) are collected into that parameter.

    With ``optional_first``, the first positional param may be left out, and
    only by count: an array of fewer than ``required`` params binds to the
    positional names after the first (an object simply omits it). What the
    values are never decides which name they bind to. ``aliases`` are
    ``(other, name)`` pairs: ``other`` is accepted by name for ``name``.
    """

    positional: tuple[str, ...] = ()
    required: int = 0
    named: tuple[str, ...] = ()
    rest: str | None = None
    optional_first: bool = False
    aliases: tuple[tuple[str, str], ...] = ()

    def bind(self, params: list[Any] | dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments for the handler; :class:`RpcError` (-32602) if they do not fit."""
        if isinstance(params, list):
            return self._bind_list(params)
        return self._bind_dict(params)

    def _bind_list(self, params: list[Any]) -> dict[str, Any]:
        names, required = self.positional, self.required
        if self.optional_first and len(params) < required:
            names, required = names[1:], required - 1
        extra: dict[str, Any] = {}
        if len(params) > len(names):
            if self.rest is not None and len(params) == len(names) + 1:
                last = params[-1]
                if not isinstance(last, dict):
                    raise RpcError(
                        INVALID_PARAMS,
                        f"invalid params: the parameter after {names[-1]!r} must be an object",
                    )
                extra = last
                params = params[:-1]
            else:
                raise RpcError(
                    INVALID_PARAMS,
                    f"invalid params: takes at most {len(names)} positional params, "
                    f"got {len(params)}",
                )
        if len(params) < required:
            missing = ", ".join(names[len(params) : required])
            raise RpcError(INVALID_PARAMS, f"invalid params: missing {missing}")
        bound = dict(zip(names, params, strict=False))
        if self.rest is not None:
            bound[self.rest] = extra
        return bound

    def _bind_dict(self, params: dict[str, Any]) -> dict[str, Any]:
        known = set(self.positional) | set(self.named)
        aliases = dict(self.aliases)
        bound: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in params.items():
            name = aliases.get(key, key)
            if name in bound:
                raise RpcError(INVALID_PARAMS, f"invalid params: {name!r} is given twice")
            if name in known:
                bound[name] = value
            elif self.rest is not None:
                extra[key] = value
            else:
                raise RpcError(INVALID_PARAMS, f"invalid params: unknown param {key[:100]!r}")
        start = 1 if self.optional_first else 0
        missing = [n for n in self.positional[start : self.required] if n not in bound]
        if missing:
            raise RpcError(INVALID_PARAMS, f"invalid params: missing {', '.join(missing)}")
        if self.rest is not None:
            bound[self.rest] = extra
        return bound


Handler = Callable[..., Awaitable[Any]]


class Methods:
    """A table of methods: name -> (signature, async handler).

    A handler added with ``caller=True`` is also given the call's ``caller``.
    """

    def __init__(self) -> None:
        self._table: dict[str, tuple[Signature, Handler, bool]] = {}

    def add(
        self, name: str, signature: Signature, handler: Handler, *, caller: bool = False
    ) -> None:
        self._table[name] = (signature, handler, caller)

    def __contains__(self, name: object) -> bool:
        return name in self._table

    @property
    def names(self) -> list[str]:
        return sorted(self._table)

    async def dispatch(self, call: Call) -> Any:
        entry = self._table.get(call.method)
        if entry is None:
            raise RpcError(
                METHOD_NOT_FOUND,
                f"method not found: {call.method[:200]!r}",
                {"method": call.method[:200]},
            )
        signature, handler, wants_caller = entry
        kwargs = signature.bind(call.params)
        if wants_caller:
            kwargs["caller"] = call.caller
        return await handler(**kwargs)
