"""zerotask's vocabulary in corral's terms: error codes, status values, ids, task bodies.

Pure functions shared by the gateway's methods and its node bookkeeping.

* A task is an ordinary corral job. Its ``method`` becomes the eMQP body:
  ``pkg.mod:fn`` (or ``pkg.mod:Class.meth``) is a Python target that corral's
  workers run under their allow-list; any other name is a method for
  JSON-RPC nodes, stored as path ``@jsonrpc`` (which no Python worker will
  ever import) with the method as the callable.
* ``params`` travel as the call's ``args`` (an array) or ``kwargs`` (an object).
* The client that submitted a task is named by an ``owner:<client_id>``
  header token, stored with the job, so ownership outlives any gateway.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from corral.gateway.rpc import RpcError
from corral.protocol import RunParams, encode_body, parse_headers
from corral.protocol.errors import ProtocolError
from corral.protocol.messages import decode_body

INVALID_CLIENT = -32010
INVALID_TASK = -32020
INVALID_NODE = -32030
TASK_NOT_COMPLETE = -32050
#: The ``code`` of a failed task's error when its error carried none
#: (a Python exception, a lost worker, a time limit): a JSON-RPC server error.
TASK_FAILED = -32000

QUEUED = 1000
ASSIGNED = 3000
RUNNING = 5000
FINISHED = 7000
FAILED = 9000
STATUSES = (QUEUED, ASSIGNED, RUNNING, FINISHED, FAILED)

_FINISHED_STATES = {"succeeded": FINISHED, "failed": FAILED, "dead": FAILED, "cancelled": FAILED}

#: The path of a JSON-RPC node method's body: not a module name, so a Python
#: worker that is handed one refuses it (BadRequest) without importing anything.
NODE_PATH = "@jsonrpc"
#: The header token naming the client that submitted a task.
OWNER = "owner"

#: Client and node ids: they appear in header tokens and PUB topics, so no
#: commas, colons or spaces.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
#: Task ids are corral job ids (eMQP MSGIDs); corral's own are uuid4 text.
_TASK = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")
_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_QUALNAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")


def status_of(state: str) -> int:
    """zerotask's status value for a corral job state.

    ``queued`` and ``retrying`` (waiting to run again) are QUEUED; ``running``
    is RUNNING (the gateway reports ASSIGNED itself for a task a node has not
    claimed yet); ``succeeded`` is FINISHED; ``failed``, ``dead`` and
    ``cancelled`` are FAILED. A state this table does not know is taken as
    not finished (QUEUED).
    """
    if state == "running":
        return RUNNING
    return _FINISHED_STATES.get(state, QUEUED)


def is_finished(state: str) -> bool:
    return state in _FINISHED_STATES


def _id(value: Any, pattern: re.Pattern[str], code: int, what: str, rule: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        shown = value[:100] if isinstance(value, str) else value
        raise RpcError(
            code,
            f"invalid {what} {shown!r}: {rule}",
            {what.replace(" ", "_"): shown if isinstance(shown, str | int) else None},
        )
    return value


_NAME_RULE = "1-128 letters, digits, '.', '_' or '-', starting with a letter or digit"
_TASK_RULE = "1-200 letters, digits, '.', '_', '-' or ':', starting with a letter or digit"


def client_id(value: Any) -> str:
    return _id(value, _NAME, INVALID_CLIENT, "client id", _NAME_RULE)


def node_id(value: Any) -> str:
    return _id(value, _NAME, INVALID_NODE, "node id", _NAME_RULE)


def task_id(value: Any) -> str:
    return _id(value, _TASK, INVALID_TASK, "task id", _TASK_RULE)


def python_target(method: str) -> tuple[str, str] | None:
    """``(path, callable)`` when ``method`` names Python code (``pkg.mod:fn``), else ``None``."""
    module, sep, qualname = method.partition(":")
    if not sep or not _MODULE.fullmatch(module) or not _QUALNAME.fullmatch(qualname):
        return None
    owner, dot, name = qualname.rpartition(".")
    return (f"{module}:{owner}", name) if dot else (module, qualname)


def encode_task(method: str, params: list[Any] | dict[str, Any]) -> bytes:
    """The eMQP body of a task (see the module docstring)."""
    target = python_target(method)
    path, name = target if target is not None else (NODE_PATH, method)
    if isinstance(params, dict):
        return encode_body(RunParams(path=path, callable=name, kwargs=params))
    return encode_body(RunParams(path=path, callable=name, args=params))


def decode_task(body: bytes) -> tuple[str, list[Any] | dict[str, Any]]:
    """``(method, params)`` of a job body, for the node it is given to.

    Raises :class:`ProtocolError` for a body that is not a ``run`` body.
    """
    params = decode_body(body)
    if params.path == NODE_PATH:
        method = params.callable
    elif ":" in params.path:
        method = f"{params.path}.{params.callable}"
    else:
        method = f"{params.path}:{params.callable}"
    if params.kwargs:
        if params.args:
            raise ProtocolError("bad-body", "a JSON-RPC call has positional or named params")
        return method, params.kwargs
    return method, params.args


def owner_of(headers: str) -> str | None:
    """The client named by a job's ``owner:`` header token, if any."""
    try:
        return parse_headers(headers).get(OWNER)
    except ProtocolError:
        return None


def task_error(error: Any) -> dict[str, Any]:
    """A failed task's error as a JSON-RPC error object.

    A node's own error (``node_task_failed``) comes back as it was given;
    corral's errors (a Python exception, ``WorkerLost``, ``TimeLimitExceeded``)
    get code :data:`TASK_FAILED` and their type and traceback in ``data``.
    """
    if not isinstance(error, dict):
        return {"code": TASK_FAILED, "message": "the task failed", "data": {"type": "Unknown"}}
    code = error.get("code")
    if isinstance(code, int) and not isinstance(code, bool):
        out: dict[str, Any] = {"code": code, "message": str(error.get("message", ""))}
        if error.get("data") is not None:
            out["data"] = error["data"]
        return out
    type_ = str(error.get("type", "Error"))
    message = str(error.get("message", ""))
    data = {"type": type_, "message": message}
    if error.get("traceback"):
        data["traceback"] = str(error["traceback"])
    return {
        "code": TASK_FAILED,
        "message": f"{type_}: {message}" if message else type_,
        "data": data,
    }


def node_error(error: Any) -> bytes:
    """The eMQP outcome for ``node_task_failed``'s ``error`` (``{"code", "message"}``).

    A bare string is taken as the message. Raises :class:`RpcError` (-32602)
    for anything else.
    """
    if isinstance(error, str):
        error = {"message": error}
    if not isinstance(error, dict):
        raise RpcError(-32602, "invalid params: error must be an object {code, message}")
    code = error.get("code", TASK_FAILED)
    message = error.get("message", "")
    if not isinstance(code, int) or isinstance(code, bool) or not isinstance(message, str):
        raise RpcError(
            -32602, "invalid params: error.code must be an integer, error.message a string"
        )
    out: dict[str, Any] = {"type": "NodeError", "message": message, "traceback": "", "code": code}
    if error.get("data") is not None:
        out["data"] = error["data"]
    return msgspec.json.encode({"error": out})
