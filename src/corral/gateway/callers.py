"""Which node makes a call: nodes belong to the connection that connected them. No I/O.

The transport names the caller of each call (see :mod:`corral.gateway.rpc`):
over ZeroMQ its routing envelope on the RPC socket (one per connected
socket), over HTTP ``None`` (HTTP has no connection identity here). A node
belongs to the caller that called ``node_connect`` for it, and then:

* A call that leaves the node out (the spec's ``node_task_request(task_id)``,
  ``node_task_finished(task_id, task_result)``, ``node_task_failed(task_id,
  error)``; :data:`CALLER` in the code) is made by the caller's node; when one
  connection connected several nodes, by the one of them that holds the task
  (or had it taken back), else by the first it connected. With no caller
  identity (HTTP) such a call is refused (-32602): name the node.
* A call that names a node (``node_id`` first) is refused (-32030) unless
  that node belongs to the same caller. So over ZeroMQ a node id is not a
  bearer secret: only the socket that connected a node can speak for it.
  Over HTTP nodes connected over HTTP are named, as before; a node connected
  over ZeroMQ cannot be driven over HTTP, nor the other way round.

An auto-assigned ZeroMQ routing id lasts as long as the TCP connection; a
node that must survive a reconnection sets its own (``ZMQ_ROUTING_ID``).
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import TYPE_CHECKING, Any, Final

from corral.gateway import zerotask
from corral.gateway.rpc import INVALID_PARAMS, RpcError

if TYPE_CHECKING:
    from corral.gateway.nodes import Node


class _Caller:
    def __repr__(self) -> str:
        return "CALLER"


#: ``node_id`` of a call that left it out: the node of the calling connection.
CALLER: Final = _Caller()


class Callers:
    """The connected nodes of each caller (callers without identity are not kept)."""

    def __init__(self) -> None:
        self._nodes: dict[Hashable, dict[str, Node]] = {}

    def add(self, node: Node) -> None:
        if node.caller is not None:
            self._nodes.setdefault(node.caller, {})[node.id] = node

    def remove(self, node: Node) -> None:
        mine = self._nodes.get(node.caller)
        if mine is not None and mine.get(node.id) is node:
            del mine[node.id]
            if not mine:
                del self._nodes[node.caller]

    def of(self, caller: Any, task_id: str, holder: Node | None) -> Node:
        """The node of ``caller`` that makes a call about ``task_id`` (see the module)."""
        if caller is None:
            raise RpcError(
                INVALID_PARAMS,
                "invalid params: this transport does not tell which node calls (no "
                "connection identity over HTTP): name the node, node_id first",
            )
        mine = self._nodes.get(caller)
        if not mine:
            raise RpcError(
                zerotask.INVALID_NODE,
                "no node is connected on this connection: call node_connect on this "
                "socket first (or it was lost or disconnected)",
            )
        if holder is not None and mine.get(holder.id) is holder:
            return holder
        for node in mine.values():
            if task_id in node.aborted:
                return node
        return next(iter(mine.values()))


def check(node: Node, caller: Any) -> None:
    """Refuse a call naming ``node`` that does not come from the caller that connected it."""
    if node.caller != caller:
        raise RpcError(
            zerotask.INVALID_NODE,
            f"node {node.id!r} was not connected on this connection: a node's calls must "
            f"come over the connection (socket) that called node_connect for it",
            {"node_id": node.id, "connection": "another"},
        )
