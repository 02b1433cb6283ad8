"""JSON-RPC nodes as corral workers: the bookkeeping, with no I/O.

Each node is registered with the broker as its own eMQP worker, through a
DEALER socket (owned by the shell) whose identity is ``rpc-node:<node_id>``:
INFORM with the node's queues (and corral's meta frame, since ABORT is
honoured), READY per free slot, HEARTBEATs while the node calls
``node_heartbeat``. So the broker dispatches to a node exactly as to any
worker, and when a node falls silent the gateway says KBYE for it and the
broker requeues (or fails) its jobs by the usual rules.

A job the broker hands to a node's worker becomes an *offer*: the gateway
publishes ``zerotask.node.broker_new_task(method, task_id)`` on the node's
PUB topic (again every ``offer_repeat`` seconds until it is claimed, so a
lost notice costs a second, not a task), the node claims it with
``node_task_request`` and reports the end with ``node_task_finished`` or
``node_task_failed``, which become the job's REPLY.

Every node call takes the caller (the connection it came on) as well: a node
belongs to the caller that connected it, and a call that names no node is
the caller's node's (see :mod:`corral.gateway.callers`).

:class:`NodeBook` takes calls and broker messages and queues :attr:`actions`
for the shell: open or close a node's socket, send frames on it, publish a
notice.
"""

from __future__ import annotations

import logging
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgspec

from corral.gateway import zerotask
from corral.gateway.callers import CALLER, Callers, check
from corral.gateway.rpc import INVALID_PARAMS, RpcError
from corral.protocol import (
    Abort,
    Ack,
    Error,
    Heartbeat,
    Inform,
    Kbye,
    ProtocolError,
    Request,
    encode_outcome_error,
    new_msgid,
    parse,
)
from corral.protocol.constants import DEFAULT_MAX_FRAME

log = logging.getLogger("corral.gateway")

IDENTITY_PREFIX = "rpc-node:"
NODE_METHOD = "zerotask.node.broker_new_task"
ABORTED_METHOD = "corral.node.task_aborted"

_PROTOCOL = b"eMQP/1.0"


@dataclass(slots=True)
class NodeConfig:
    """Timing and bounds of node bookkeeping (seconds unless said otherwise).

    ``heartbeat_interval``/``heartbeat_liveness`` are the eMQP heartbeats with
    the broker (match the broker's). A node that makes no call for
    ``node_timeout`` is lost. An offer not claimed within ``claim_timeout``
    is given back to the broker as a failure (``NotClaimed``, retried if the
    job has retries), so no task waits forever on a node that ignores it.
    """

    heartbeat_interval: float = 3.0
    heartbeat_liveness: int = 3
    node_timeout: float = 10.0
    claim_timeout: float = 60.0
    offer_repeat: float = 1.0
    max_slots: int = 256
    max_queues: int = 64
    max_frame: int = DEFAULT_MAX_FRAME
    #: Progress fields kept per task (``task_status``), in encoded bytes.
    max_fields: int = 64 * 1024
    #: Tasks taken back from a node remembered, to tell it why if it asks.
    aborted_memory: int = 1000
    #: Outcomes kept per node, sent again after the broker forgot the node.
    resend_window: int = 100


@dataclass(slots=True, eq=False)
class Offer:
    """A job the broker gave to a node's worker."""

    task_id: str
    method: str
    params: Any
    offered: float
    published: float
    #: Monotonic deadline from the job's ``timeout`` header, if any.
    deadline: float | None = None
    claimed: bool = False
    status: int = zerotask.ASSIGNED
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(slots=True, eq=False)
class Node:
    id: str
    queues: tuple[tuple[int, str], ...]
    slots: int
    last_seen: float
    offers: dict[str, Offer] = field(default_factory=dict)
    aborted: OrderedDict[str, str] = field(default_factory=OrderedDict)
    recent: OrderedDict[str, bytes] = field(default_factory=OrderedDict)
    informed: bool = False
    inform_id: str = ""
    inform_sent: float = 0.0
    broker_heard: float = 0.0
    broker_sent: float = 0.0
    #: The broker may have lost outcomes sent before it forgot this node.
    resend: bool = False
    #: The connection that connected it (``None``: a transport without identity).
    caller: Any = None

    @property
    def identity(self) -> bytes:
        return (IDENTITY_PREFIX + self.id).encode()

    @property
    def topic(self) -> str:
        return node_topic(self.id)

    @property
    def free(self) -> int:
        return self.slots - len(self.offers)


def node_topic(node_id: str) -> str:
    """The PUB topic of a node's notices (the trailing ``:`` makes it exact)."""
    return f"node:{node_id}:"


def notice(method: str, params: list[Any] | dict[str, Any]) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "method": method, "params": params}


#: ``("open", node)``, ``("send", node, frames)``, ``("close", node)``,
#: ``("publish", topic, notification)``.
Action = tuple[Any, ...]


class NodeBook:
    def __init__(self, config: NodeConfig | None = None) -> None:
        self.config = config or NodeConfig()
        self.nodes: dict[str, Node] = {}
        #: Which node holds each offered task.
        self.holders: dict[str, Node] = {}
        self.callers = Callers()
        self.actions: list[Action] = []
        self.bad_messages = 0
        self.lost = 0

    # ------------------------------------------------------------ node calls

    def connect(
        self,
        node_id: str | None,
        queues: Any,
        methods: Any,
        slots: Any,
        now: float,
        caller: Any = None,
    ) -> Node:
        node_id = str(uuid.uuid4()) if node_id is None else zerotask.node_id(node_id)
        if node_id in self.nodes:
            raise RpcError(
                zerotask.INVALID_NODE,
                f"node id {node_id!r} is taken by a connected node (it is free again once "
                f"that node disconnects or is silent for {self.config.node_timeout:g} s)",
                {"node_id": node_id},
            )
        node = Node(node_id, self._queues(queues, methods), self._slots(slots), now)
        node.caller = caller
        self.nodes[node_id] = node
        self.callers.add(node)
        self.actions.append(("open", node))
        self._inform(node, now)
        log.info(
            "node %s connected: queues %s, %d slot(s)",
            node_id,
            ",".join(name for _, name in node.queues),
            node.slots,
        )
        return node

    def seen(self, node_id: Any, now: float, caller: Any = None) -> Node:
        """The node making a call (any call is a sign of life); -32030 if unknown
        or connected by another caller."""
        node = self.nodes.get(zerotask.node_id(node_id))
        if node is None:
            raise RpcError(
                zerotask.INVALID_NODE,
                f"unknown node id {node_id!r}: not connected, or lost after "
                f"{self.config.node_timeout:g} s without a heartbeat; call node_connect",
                {"node_id": node_id},
            )
        check(node, caller)
        node.last_seen = now
        return node

    def node_for(self, node_id: Any, task_id: Any, now: float, caller: Any) -> tuple[Node, str]:
        """The node making a call about a task, and the task id (both checked).

        ``node_id`` is the one named, or :data:`CALLER` when the call left it out.
        """
        if node_id is not CALLER:
            node = self.seen(node_id, now, caller)
            return node, zerotask.task_id(task_id)
        tid = zerotask.task_id(task_id)
        node = self.callers.of(caller, tid, self.holders.get(tid))
        node.last_seen = now
        return node, tid

    def disconnect(self, node_id: Any, now: float, caller: Any = None) -> None:
        node = self.seen(node_id, now, caller)
        self._drop(node, "disconnected")

    def claim(
        self, node_id: Any, task_id: Any, now: float, caller: Any = None
    ) -> dict[str, Any] | None:
        """The task for ``node_task_request``; ``None`` if this node does not hold it."""
        node, task_id = self.node_for(node_id, task_id, now, caller)
        offer = node.offers.get(task_id)
        if offer is None:
            self._check_aborted(node, task_id)
            return None
        if not offer.claimed:
            offer.claimed = True
            offer.status = zerotask.RUNNING
        return {"method": offer.method, "params": offer.params, "id": task_id}

    def report(
        self,
        node_id: Any,
        task_id: Any,
        status: Any,
        fields: dict[str, Any],
        now: float,
        caller: Any = None,
    ) -> None:
        """``task_status``: a node says it runs a task, with progress fields."""
        node, task_id = self.node_for(node_id, task_id, now, caller)
        offer = self._offer(node, task_id)
        if status not in (zerotask.ASSIGNED, zerotask.RUNNING) or isinstance(status, bool):
            raise RpcError(
                INVALID_PARAMS,
                f"invalid params: status must be {zerotask.ASSIGNED} (ASSIGNED) or "
                f"{zerotask.RUNNING} (RUNNING); report the end of a task with "
                f"node_task_finished or node_task_failed",
            )
        if fields:
            try:
                size = len(msgspec.json.encode(fields))
            except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
                size = self.config.max_fields + 1
            if size > self.config.max_fields:
                raise RpcError(
                    INVALID_PARAMS,
                    f"invalid params: status fields exceed {self.config.max_fields} bytes",
                )
            offer.fields = fields
        offer.status = status
        offer.claimed = True

    def finish(
        self, node_id: Any, task_id: Any, result: Any, now: float, caller: Any = None
    ) -> None:
        node, task_id = self.node_for(node_id, task_id, now, caller)
        self._offer(node, task_id)
        try:
            outcome = msgspec.json.encode({"value": result})
        except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
            raise RpcError(INVALID_PARAMS, "invalid params: result is not valid JSON") from None
        self._check_size(outcome, "result")
        self._reply(node, task_id, outcome, now)

    def fail(self, node_id: Any, task_id: Any, error: Any, now: float, caller: Any = None) -> None:
        node, task_id = self.node_for(node_id, task_id, now, caller)
        self._offer(node, task_id)
        outcome = zerotask.node_error(error)
        self._check_size(outcome, "error")
        self._reply(node, task_id, outcome, now)

    def offers(self, node_id: Any, now: float, caller: Any = None) -> list[dict[str, Any]]:
        node = self.seen(node_id, now, caller)
        return [
            {"method": o.method, "id": o.task_id, "claimed": o.claimed}
            for o in node.offers.values()
        ]

    def holder(self, task_id: str) -> tuple[Node, Offer] | None:
        node = self.holders.get(task_id)
        if node is None:
            return None
        return node, node.offers[task_id]

    # ------------------------------------------------------------ the broker

    def on_broker(self, node: Node, frames: list[bytes], now: float) -> None:
        """A message from the broker on ``node``'s socket."""
        if self.nodes.get(node.id) is not node:
            return  # dropped; its socket is being closed
        node.broker_heard = now
        try:
            msg = parse(frames, self.config.max_frame)
        except ProtocolError as exc:
            self.bad_messages += 1
            log.warning("bad message from the broker for node %s: %s", node.id, exc)
            return
        if isinstance(msg, Request):
            self._on_request(node, msg, now)
        elif isinstance(msg, Ack):
            if msg.acked == node.inform_id and not node.informed:
                node.informed = True
                log.info("node %s registered with the broker", node.id)
                if node.resend:
                    for task_id, outcome in node.recent.items():
                        self._send(node, [b"REPLY", outcome, task_id.encode()], now)
                    node.resend = False
                for _ in range(node.free):
                    self._send(node, [b"READY"], now)
        elif isinstance(msg, Abort):
            self._on_abort(node, msg, now)
        elif isinstance(msg, Kbye):
            log.warning("the broker said goodbye to node %s; registering again", node.id)
            node.informed = False
            node.resend = True
        elif isinstance(msg, Error):
            if msg.reason == "unknown-worker":
                if node.informed or now - node.inform_sent > 1.0:
                    node.resend = True
                    self._inform(node, now)
            else:
                log.warning(
                    "the broker refused a message for node %s: %s (%s)",
                    node.id,
                    msg.reason,
                    msg.detail,
                )
        elif not isinstance(msg, Heartbeat):
            log.debug("ignored %s for node %s", msg.command.value, node.id)

    def _on_request(self, node: Node, msg: Request, now: float) -> None:
        task_id = msg.msgid
        if task_id in node.offers:
            return  # sent again: the node has it
        try:
            method, params = zerotask.decode_task(msg.body)
        except ProtocolError as exc:
            outcome = encode_outcome_error(
                "BadRequest", f"not a task for a JSON-RPC node: {exc.detail}"
            )
            self._reply(node, task_id, outcome, now, hold=False)
            return
        timeout = msg.headers.timeout
        offer = Offer(task_id, method, params, now, now, now + timeout if timeout else None)
        node.offers[task_id] = offer
        self.holders[task_id] = node
        node.aborted.pop(task_id, None)
        self._publish(node, NODE_METHOD, [method, task_id])

    def _on_abort(self, node: Node, msg: Abort, now: float) -> None:
        if msg.ref not in node.offers:
            return  # finished already: the broker ignores what was sent
        reason = msg.reason or "aborted by the broker"
        log.warning("task %s taken back from node %s (%s)", msg.ref, node.id, reason)
        self._take_back(node, msg.ref, reason, encode_outcome_error("JobCancelled", reason), now)

    # ------------------------------------------------------------ time

    def tick(self, now: float) -> None:
        cfg = self.config
        for node in list(self.nodes.values()):
            if now - node.last_seen > cfg.node_timeout:
                self.lost += 1
                self._drop(node, f"lost (no call for {now - node.last_seen:.1f} s)")
                continue
            if node.informed:
                silent = now - node.broker_heard
                if silent > cfg.heartbeat_interval * cfg.heartbeat_liveness:
                    log.warning(
                        "no word from the broker for node %s in %.1f s; registering again",
                        node.id,
                        silent,
                    )
                    node.resend = True
                    self._inform(node, now)
            elif now - node.inform_sent > cfg.heartbeat_interval:
                node.resend = True
                self._inform(node, now)
            if now - node.broker_sent >= cfg.heartbeat_interval:
                self._send(node, [b"HEARTBEAT", repr(now).encode()], now)
            for offer in list(node.offers.values()):
                if offer.deadline is not None and now >= offer.deadline:
                    reason = "time limit exceeded"
                    outcome = encode_outcome_error(
                        "TimeLimitExceeded",
                        f"node {node.id} did not finish task {offer.task_id} in time",
                    )
                    self._take_back(node, offer.task_id, reason, outcome, now)
                elif not offer.claimed and now - offer.offered > cfg.claim_timeout:
                    reason = f"not claimed within {cfg.claim_timeout:g} s"
                    outcome = encode_outcome_error(
                        "NotClaimed", f"node {node.id} did not claim task {offer.task_id}: {reason}"
                    )
                    self._take_back(node, offer.task_id, reason, outcome, now)
                elif not offer.claimed and now - offer.published >= cfg.offer_repeat:
                    offer.published = now
                    self._publish(node, NODE_METHOD, [offer.method, offer.task_id])

    def shutdown(self) -> None:
        """Say KBYE for every node (the gateway is stopping)."""
        for node in list(self.nodes.values()):
            self._drop(node, "the gateway is stopping")

    # ------------------------------------------------------------ internals

    def _queues(self, queues: Any, methods: Any) -> tuple[tuple[int, str], ...]:
        out: list[tuple[int, str]] = []
        for name in _list(methods, "methods"):
            if not isinstance(name, str):
                raise RpcError(INVALID_PARAMS, "invalid params: methods must be strings")
            out.append((10, _queue_name(name)))
        for item in _list(queues, "queues"):
            if isinstance(item, str):
                out.append((10, _queue_name(item)))
            elif (
                isinstance(item, list)
                and len(item) == 2
                and isinstance(item[0], str)
                and isinstance(item[1], int)
                and not isinstance(item[1], bool)
                and 0 < item[1] <= 1_000_000
            ):
                out.append((item[1], _queue_name(item[0])))
            else:
                raise RpcError(
                    INVALID_PARAMS,
                    "invalid params: a queue is a name or [name, weight] with weight > 0",
                )
        if len(out) > self.config.max_queues:
            raise RpcError(
                INVALID_PARAMS, f"invalid params: at most {self.config.max_queues} queues"
            )
        seen: dict[str, int] = {}
        for weight, name in out:
            seen[name] = max(weight, seen.get(name, 0))
        return tuple((w, n) for n, w in seen.items()) or ((10, "default"),)

    def _slots(self, slots: Any) -> int:
        if slots is None:
            return 1
        if (
            not isinstance(slots, int)
            or isinstance(slots, bool)
            or not 0 < slots <= self.config.max_slots
        ):
            raise RpcError(
                INVALID_PARAMS,
                f"invalid params: slots must be an integer 1..{self.config.max_slots}",
            )
        return slots

    def _offer(self, node: Node, task_id: str) -> Offer:
        """The offer of a task ``node`` holds; -32020 for any other (it is left alone)."""
        offer = node.offers.get(task_id)
        if offer is None:
            self._check_aborted(node, task_id)
            if task_id in self.holders:
                raise RpcError(
                    zerotask.INVALID_TASK,
                    f"task {task_id} is held by another node: node {node.id} can report, "
                    f"finish or fail only the tasks it holds",
                    {"task_id": task_id, "held_by": "another node"},
                )
            raise RpcError(
                zerotask.INVALID_TASK,
                f"node {node.id} does not hold task {task_id}",
                {"task_id": task_id},
            )
        return offer

    def _check_aborted(self, node: Node, task_id: str) -> None:
        reason = node.aborted.get(task_id)
        if reason is not None:
            raise RpcError(
                zerotask.INVALID_TASK,
                f"task {task_id} was taken back from node {node.id}: {reason}",
                {"task_id": task_id, "aborted": reason},
            )

    def _check_size(self, outcome: bytes, what: str) -> None:
        if len(outcome) > self.config.max_frame:
            raise RpcError(
                INVALID_PARAMS,
                f"invalid params: the {what} exceeds {self.config.max_frame} bytes",
            )

    def _take_back(self, node: Node, task_id: str, reason: str, outcome: bytes, now: float) -> None:
        node.aborted[task_id] = reason
        if len(node.aborted) > self.config.aborted_memory:
            node.aborted.popitem(last=False)
        self._publish(node, ABORTED_METHOD, [task_id, reason])
        self._reply(node, task_id, outcome, now)

    def _reply(
        self, node: Node, task_id: str, outcome: bytes, now: float, *, hold: bool = True
    ) -> None:
        node.offers.pop(task_id, None)
        if self.holders.get(task_id) is node:
            del self.holders[task_id]
        if hold:
            node.recent[task_id] = outcome
            if len(node.recent) > self.config.resend_window:
                node.recent.popitem(last=False)
        self._send(node, [b"REPLY", outcome, task_id.encode()], now)
        if node.informed:
            self._send(node, [b"READY"], now)

    def _send(self, node: Node, frames: list[bytes], now: float) -> None:
        cmd, *rest = frames
        node.broker_sent = max(node.broker_sent, now)
        self.actions.append(("send", node, [b"", _PROTOCOL, cmd, new_msgid().encode(), *rest]))

    def _inform(self, node: Node, now: float) -> None:
        node.informed = False
        node.inform_id = new_msgid()
        node.inform_sent = now
        node.broker_heard = now
        meta = {"running": list(node.offers), "concurrency": node.slots, "node": node.id}
        frames = Inform(node.inform_id, node.queues, "worker", meta).to_frames()
        node.broker_sent = max(node.broker_sent, now)
        self.actions.append(("send", node, frames))

    def _publish(self, node: Node, method: str, params: list[Any]) -> None:
        self.actions.append(("publish", node.topic, notice(method, params)))

    def _drop(self, node: Node, reason: str) -> None:
        if self.nodes.get(node.id) is not node:
            return
        del self.nodes[node.id]
        self.callers.remove(node)
        for task_id in node.offers:
            if self.holders.get(task_id) is node:
                del self.holders[task_id]
        log_ = log.warning if node.offers else log.info
        log_(
            "node %s: %s; %d task(s) it held go back to the broker",
            node.id,
            reason,
            len(node.offers),
        )
        self._send(node, [b"KBYE"], node.broker_sent)
        self.actions.append(("close", node))


def _list(value: Any, what: str) -> list[Any]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise RpcError(INVALID_PARAMS, f"invalid params: {what} must be an array")
    return value


def _queue_name(name: str) -> str:
    if not name or len(name) > 256 or not name.isprintable():
        raise RpcError(
            INVALID_PARAMS,
            f"invalid params: queue name {name[:100]!r} must be 1-256 printable chars",
        )
    return name
