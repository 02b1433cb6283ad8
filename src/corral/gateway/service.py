"""The zerotask broker methods, served by corral: what each JSON-RPC call does.

:class:`Gateway` turns calls into eMQP traffic with the broker: tasks are
submitted as REQUESTs on the frontend (so they are ordinary corral jobs:
stored, listed by ``corral jobs``, retried, requeued), records are read with
QUERY ``job``, and nodes are driven through :class:`~corral.gateway.nodes.NodeBook`.
Transports (ZeroMQ, HTTP) live in :mod:`corral.gateway.server`.

Clients. ``client_connect`` admits a client id (made up if absent) for the
life of this gateway process; the other client methods need a connected id
(-32010 otherwise). Who owns a task is not kept here but in the job itself
(an ``owner:<client_id>`` header token), so after a gateway restart a client
connects again with the same id and finds its tasks. A client id is
therefore a bearer name: let the gateway make one up to keep it private.

Nodes. A node belongs to the connection that called ``node_connect`` for it
(:mod:`corral.gateway.callers`). ``node_task_request``, ``node_task_finished``
and ``node_task_failed`` take the spec's params, ``(task_id)``,
``(task_id, task_result)`` and ``(task_id, error)``, and the older forms
with the node first, ``(node_id, task_id[, ...])``. Which one a call is is
decided by the count of params alone, never by their values (a task id may
look like a node id): one fewer than the node-first form means the node is
left out and is the caller's node; by name, ``node_id`` is simply present or
not (``task_result`` may be given as ``result``). The node-first form is
refused (-32030) when that node was connected over another connection, and
the spec's form needs a transport that identifies connections (ZeroMQ, not
HTTP, where a node names itself). A node that reports, finishes or fails a
task it does not hold (another node's, say) gets -32020 and the task is left
as it was.
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec

from corral.gateway import zerotask
from corral.gateway.callers import CALLER
from corral.gateway.link import BrokerLink, BrokerUnavailable, QueryFailed, Refused
from corral.gateway.nodes import NodeBook, notice
from corral.gateway.rpc import INTERNAL_ERROR, INVALID_PARAMS, Call, Methods, RpcError, Signature
from corral.protocol import DEFAULT_MAX_FRAME, DEFAULT_QUEUE, Headers, Request

log = logging.getLogger("corral.gateway")

BROKER = "zerotask.broker."
RESULT_READY = "zerotask.client.task_result_ready"
#: Submitted tasks whose owner is remembered, to tell it when the result is ready.
OWNERS_KEPT = 100_000
#: A connected client that makes no call for this long is forgotten (it may connect again).
CLIENT_IDLE = 24 * 3600.0

_outcome = msgspec.json.Decoder()


def client_topic(client_id: str) -> str:
    """The PUB topic of a client's notices (the trailing ``:`` makes it exact)."""
    return f"client:{client_id}:"


class Gateway:
    """The method table and what each method does.

    ``link`` talks to the broker; ``nodes`` keeps the nodes' state; ``flush``
    is called after every call so the shell carries out the nodes' actions.
    """

    def __init__(
        self,
        link: BrokerLink,
        nodes: NodeBook,
        *,
        flush: Callable[[], None] = lambda: None,
        clock: Callable[[], float] = time.monotonic,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self.link = link
        self.nodes = nodes
        self.flush = flush
        self.clock = clock
        self.max_frame = max_frame
        self.clients: dict[str, float] = {}
        self.owners: OrderedDict[str, str] = OrderedDict()
        self.methods = Methods()
        self._register()
        link.on_outcome = self._on_outcome

    async def dispatch(self, call: Call) -> Any:
        try:
            return await self.methods.dispatch(call)
        finally:
            self.flush()

    def tick(self, now: float) -> None:
        self.nodes.tick(now)
        idle = [cid for cid, seen in self.clients.items() if now - seen > CLIENT_IDLE]
        for cid in idle:
            del self.clients[cid]
        if idle:
            log.info("%d client(s) idle for a day forgotten", len(idle))

    def _register(self) -> None:
        add, sig = self.methods.add, Signature
        add(BROKER + "client_connect", sig(("client_id",)), self.client_connect)
        add(BROKER + "client_disconnect", sig(("client_id",), 1), self.client_disconnect)
        add(
            BROKER + "client_new_task",
            sig(
                ("client_id", "method", "params", "task_id"),
                3,
                ("queue", "timeout", "retries", "guarantee", "label"),
            ),
            self.client_new_task,
        )
        add(
            BROKER + "client_task_status", sig(("client_id", "task_id"), 2), self.client_task_status
        )
        add(
            BROKER + "client_task_result", sig(("client_id", "task_id"), 2), self.client_task_result
        )
        # corral's extensions
        add("corral.task_info", sig(("client_id", "task_id"), 2), self.task_info)
        self._register_nodes()

    def _register_nodes(self) -> None:
        def add(name: str, signature: Signature, handler: Any) -> None:
            self.methods.add(name, signature, handler, caller=True)

        sig = Signature
        add(
            BROKER + "node_connect",
            sig(("node_id",), 0, ("queues", "methods", "slots")),
            self.node_connect,
        )
        add(BROKER + "node_heartbeat", sig(("node_id",), 1), self.node_heartbeat)
        add(BROKER + "node_disconnect", sig(("node_id",), 1), self.node_disconnect)
        add(
            BROKER + "node_task_request",
            sig(("node_id", "task_id"), 2, optional_first=True),
            self.node_task_request,
        )
        add(
            BROKER + "task_status",
            sig(("node_id", "task_id", "status"), 3, rest="fields"),
            self.task_status,
        )
        add(
            BROKER + "node_task_finished",
            sig(
                ("node_id", "task_id", "result"),
                3,
                optional_first=True,
                aliases=(("task_result", "result"),),
            ),
            self.node_task_finished,
        )
        add(
            BROKER + "node_task_failed",
            sig(("node_id", "task_id", "error"), 3, optional_first=True),
            self.node_task_failed,
        )
        add("corral.node_tasks", sig(("node_id",), 1), self.node_tasks)

    # ------------------------------------------------------------ clients

    async def client_connect(self, client_id: Any = None) -> str:
        cid = str(uuid.uuid4()) if client_id is None else zerotask.client_id(client_id)
        if cid in self.clients:
            raise RpcError(
                zerotask.INVALID_CLIENT,
                f"client id {cid!r} is taken by a connected client",
                {"client_id": cid},
            )
        self.clients[cid] = self.clock()
        return cid

    async def client_disconnect(self, client_id: Any) -> bool:
        del self.clients[self._client(client_id)]
        return True

    async def client_new_task(
        self,
        client_id: Any,
        method: Any,
        params: Any,
        task_id: Any = None,
        queue: Any = None,
        timeout: Any = None,
        retries: Any = None,
        guarantee: Any = None,
        label: Any = None,
    ) -> str:
        cid = self._client(client_id)
        if not isinstance(method, str) or not 0 < len(method) <= 256 or not method.isprintable():
            raise RpcError(INVALID_PARAMS, "invalid params: method must be 1-256 printable chars")
        if params is None:
            params = []
        if not isinstance(params, list | dict):
            raise RpcError(INVALID_PARAMS, "invalid params: params must be an array or an object")
        tid = str(uuid.uuid4()) if task_id is None else zerotask.task_id(task_id)
        if queue is None:
            queue = DEFAULT_QUEUE if zerotask.python_target(method) else method
        elif not isinstance(queue, str) or not 0 < len(queue) <= 256 or not queue.isprintable():
            raise RpcError(INVALID_PARAMS, "invalid params: queue must be 1-256 printable chars")
        headers = _headers(cid, timeout, retries, guarantee, label)
        try:
            body = zerotask.encode_task(method, params)
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
            raise RpcError(INVALID_PARAMS, "invalid params: params are not valid JSON") from None
        if len(body) > self.max_frame:
            raise RpcError(
                INVALID_PARAMS, f"invalid params: the task exceeds {self.max_frame} bytes"
            )
        if task_id is not None:
            # The broker refuses ids of jobs in flight or recently finished; a job
            # finished longer ago is only in the store, and its record must not be
            # overwritten by someone else's task.
            try:
                existing = await self.link.query("job", id=tid, with_result=False)
            except QueryFailed as exc:
                if exc.type != "NotFound":
                    raise _broker_error(exc) from None
            except BrokerUnavailable as exc:
                raise _unavailable(exc) from None
            else:
                raise _taken(tid, existing, cid)
        if tid in self.owners:
            raise _taken(tid)  # submitted through this gateway, not finished yet
        # Known before sending: the outcome of a short task may arrive right
        # behind its acknowledgement, before this call resumes.
        self.owners[tid] = cid
        if len(self.owners) > OWNERS_KEPT:
            self.owners.popitem(last=False)
        try:
            await self.link.submit(Request(tid, queue, headers, body))
        except Refused as exc:
            self.owners.pop(tid, None)
            if exc.reason == "duplicate-id":
                raise _taken(tid) from None
            raise RpcError(
                INVALID_PARAMS, f"invalid params: the broker refused the task: {exc.detail}"
            ) from None
        except BrokerUnavailable as exc:
            raise RpcError(
                INTERNAL_ERROR,
                f"{exc}; the task may or may not have been accepted: "
                f"ask client_task_status for task {tid}",
                {"task_id": tid},
            ) from None
        return tid

    async def client_task_status(self, client_id: Any, task_id: Any) -> int:
        view = await self._record(client_id, task_id)
        return self._status(view)

    async def client_task_result(self, client_id: Any, task_id: Any) -> Any:
        view = await self._record(client_id, task_id)
        state = view["state"]
        if not zerotask.is_finished(state):
            status = self._status(view)
            raise RpcError(
                zerotask.TASK_NOT_COMPLETE,
                f"task {view['id']} is not complete ({state})",
                {"task_id": view["id"], "status": status, "state": state},
            )
        if state == "succeeded":
            return view.get("result")
        return zerotask.task_error(view.get("error"))

    async def task_info(self, client_id: Any, task_id: Any) -> dict[str, Any]:
        view = await self._record(client_id, task_id)
        info = {**view, "status": self._status(view)}
        held = self.nodes.holder(view["id"])
        if held is not None:
            node, offer = held
            info["node"] = {"id": node.id, "claimed": offer.claimed, "fields": offer.fields}
        if info.get("error") is not None:
            info["error"] = zerotask.task_error(info["error"])
        return info

    def _client(self, value: Any) -> str:
        cid = zerotask.client_id(value)
        if cid not in self.clients:
            raise RpcError(
                zerotask.INVALID_CLIENT,
                f"unknown client id {cid!r}: not connected to this gateway (it may have "
                f"restarted); call client_connect with it again, its tasks are kept",
                {"client_id": cid},
            )
        self.clients[cid] = self.clock()
        return cid

    async def _record(self, client_id: Any, task_id: Any) -> dict[str, Any]:
        cid = self._client(client_id)
        tid = zerotask.task_id(task_id)
        try:
            view = await self.link.query("job", id=tid)
        except QueryFailed as exc:
            if exc.type == "NotFound":
                raise _unknown(tid) from None
            raise _broker_error(exc) from None
        except BrokerUnavailable as exc:
            raise _unavailable(exc) from None
        if not isinstance(view, dict) or zerotask.owner_of(str(view.get("headers", ""))) != cid:
            # Someone else's task looks exactly like no task at all.
            raise _unknown(tid)
        return view

    def _status(self, view: dict[str, Any]) -> int:
        status = zerotask.status_of(view["state"])
        if status == zerotask.RUNNING:
            held = self.nodes.holder(view["id"])
            if held is not None:
                return held[1].status
        return status

    def _on_outcome(self, task_id: str, raw: bytes) -> None:
        cid = self.owners.pop(task_id, None)
        if cid is None:
            return
        try:
            outcome = _outcome.decode(raw)
        except msgspec.DecodeError:
            outcome = {}
        failed = not isinstance(outcome, dict) or "error" in outcome
        status = zerotask.FAILED if failed else zerotask.FINISHED
        self.nodes.actions.append(
            (
                "publish",
                client_topic(cid),
                notice(RESULT_READY, {"task_id": task_id, "status": status}),
            )
        )
        self.flush()

    # ------------------------------------------------------------ nodes

    # Each takes ``caller``, the connection the call came on; ``node_id`` is
    # CALLER when the call left it out (see the module docstring).

    async def node_connect(
        self,
        node_id: Any = None,
        queues: Any = None,
        methods: Any = None,
        slots: Any = None,
        caller: Any = None,
    ) -> str:
        return self.nodes.connect(node_id, queues, methods, slots, self.clock(), caller).id

    async def node_heartbeat(self, node_id: Any, caller: Any = None) -> bool:
        self.nodes.seen(node_id, self.clock(), caller)
        return True

    async def node_disconnect(self, node_id: Any, caller: Any = None) -> bool:
        self.nodes.disconnect(node_id, self.clock(), caller)
        return True

    async def node_task_request(
        self, task_id: Any, node_id: Any = CALLER, caller: Any = None
    ) -> dict[str, Any]:
        task = self.nodes.claim(node_id, task_id, self.clock(), caller)
        tid = zerotask.task_id(task_id)
        if task is not None:
            return task
        if self.nodes.holder(tid) is not None:
            return {}  # another node has it
        try:
            await self.link.query("job", id=tid, with_result=False)
        except QueryFailed as exc:
            if exc.type == "NotFound":
                raise _unknown(tid) from None
            raise _broker_error(exc) from None
        except BrokerUnavailable as exc:
            raise _unavailable(exc) from None
        return {}

    async def task_status(
        self,
        node_id: Any,
        task_id: Any,
        status: Any,
        fields: dict[str, Any],
        caller: Any = None,
    ) -> bool:
        self.nodes.report(node_id, task_id, status, fields, self.clock(), caller)
        return True

    async def node_task_finished(
        self, task_id: Any, result: Any, node_id: Any = CALLER, caller: Any = None
    ) -> bool:
        self.nodes.finish(node_id, task_id, result, self.clock(), caller)
        return True

    async def node_task_failed(
        self, task_id: Any, error: Any, node_id: Any = CALLER, caller: Any = None
    ) -> bool:
        self.nodes.fail(node_id, task_id, error, self.clock(), caller)
        return True

    async def node_tasks(self, node_id: Any, caller: Any = None) -> list[dict[str, Any]]:
        return self.nodes.offers(node_id, self.clock(), caller)


def _headers(cid: str, timeout: Any, retries: Any, guarantee: Any, label: Any) -> Headers:
    if timeout is not None and (
        isinstance(timeout, bool)
        or not isinstance(timeout, int | float)
        or not 0 <= timeout < math.inf
    ):
        raise RpcError(INVALID_PARAMS, "invalid params: timeout must be a number of seconds >= 0")
    if retries is not None and (
        isinstance(retries, bool) or not isinstance(retries, int) or not 0 <= retries <= 1000
    ):
        raise RpcError(INVALID_PARAMS, "invalid params: retries must be an integer 0..1000")
    if guarantee is not None and not isinstance(guarantee, bool):
        raise RpcError(INVALID_PARAMS, "invalid params: guarantee must be true or false")
    extra = [f"{zerotask.OWNER}:{cid}"]
    if label is not None:
        if (
            not isinstance(label, str)
            or not 0 < len(label) <= 200
            or "," in label
            or not label.isprintable()
        ):
            raise RpcError(
                INVALID_PARAMS, "invalid params: label must be 1-200 printable chars, no commas"
            )
        extra.append(f"label:{label}")
    return Headers(
        reply_requested=True,
        guarantee=bool(guarantee),
        retry_count=retries or 0,
        timeout=float(timeout or 0),
        extra=tuple(extra),
    )


def _unknown(tid: str) -> RpcError:
    return RpcError(
        zerotask.INVALID_TASK,
        f"unknown task id {tid!r} (never submitted by this client, or purged)",
        {"task_id": tid},
    )


def _taken(tid: str, existing: Any = None, cid: str | None = None) -> RpcError:
    """-32020 for a task id in use; the caller's own task says so (and its state),
    so a client that re-sends after a timeout knows its first attempt went through."""
    if isinstance(existing, dict) and cid is not None:
        if zerotask.owner_of(str(existing.get("headers", ""))) == cid:
            state = existing.get("state")
            return RpcError(
                zerotask.INVALID_TASK,
                f"task id {tid!r} is taken by a task of yours ({state})",
                {"task_id": tid, "yours": True, "state": state},
            )
    return RpcError(zerotask.INVALID_TASK, f"task id {tid!r} is taken", {"task_id": tid})


def _unavailable(exc: BrokerUnavailable) -> RpcError:
    return RpcError(INTERNAL_ERROR, f"internal error: {exc}")


def _broker_error(exc: QueryFailed) -> RpcError:
    log.warning("the broker could not answer a query: %s", exc)
    return RpcError(INTERNAL_ERROR, f"internal error: the broker could not answer ({exc.type})")
