"""The gateway's I/O shell: sockets, the HTTP server, a timer.

* RPC: a ROUTER at ``rpc`` (default ``tcp://127.0.0.1:5555``). A REQ client's
  message (``[identity, '', json]``) is always answered, with an empty frame
  when nothing is owed (a notification), so the REQ socket can go on; a
  DEALER that sends ``[json]`` with no delimiter gets an answer only when one
  is owed. Requests are answered concurrently, each as soon as it is done.
  The routing frames (the peer's routing id, and any a proxy added) are the
  call's caller: the nodes a socket connects are that socket's.
* HTTP: ``POST /rpc`` at ``http`` (default ``127.0.0.1:5557``), with no
  caller identity (``None``): a node names itself (``node_id`` first).
* PUB at ``pub`` (default ``tcp://127.0.0.1:5556``): two frames per notice,
  the topic (``node:<node_id>:`` or ``client:<client_id>:``) and the JSON-RPC
  notification.
* One DEALER to the broker's frontend (:class:`~corral.gateway.link.BrokerLink`)
  and one DEALER per connected node to its backend.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq

from corral._loop import SocketWatcher, send_frames
from corral.gateway import DEFAULT_HTTP, DEFAULT_PUB, DEFAULT_RPC
from corral.gateway.http import HttpServer, parse_address
from corral.gateway.link import BrokerLink
from corral.gateway.nodes import Node, NodeBook, NodeConfig
from corral.gateway.rpc import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    MAX_BATCH,
    MAX_REQUEST,
    RpcError,
    error_response,
)
from corral.gateway.rpc import handle as handle_rpc
from corral.gateway.service import Gateway
from corral.protocol import DEFAULT_BACKEND, DEFAULT_FRONTEND, DEFAULT_MAX_FRAME

log = logging.getLogger("corral.gateway")


class AddressInUse(RuntimeError):
    pass


@dataclass(slots=True)
class GatewayConfig:
    """Where the gateway listens and which broker it serves.

    ``broker`` and ``backend`` are the broker's frontend and backend to
    connect to; ``rpc`` (ZeroMQ), ``pub`` (ZeroMQ PUB) and ``http``
    (``HOST:PORT``) are where to listen, ``None`` for not at all.
    ``broker_timeout`` bounds each wait for the broker's answer;
    ``max_pending`` the requests being answered at once (more are refused
    with -32603 until some finish).
    """

    broker: str = DEFAULT_FRONTEND
    backend: str = DEFAULT_BACKEND
    rpc: str | None = DEFAULT_RPC
    pub: str | None = DEFAULT_PUB
    http: str | None = DEFAULT_HTTP
    nodes: NodeConfig = field(default_factory=NodeConfig)
    max_request: int = MAX_REQUEST
    max_batch: int = MAX_BATCH
    max_frame: int = DEFAULT_MAX_FRAME
    broker_timeout: float = 10.0
    max_pending: int = 10_000


_BUSY = msgspec.json.encode(
    error_response(None, RpcError(INTERNAL_ERROR, "the gateway is busy; try again shortly"))
)


class GatewayServer:
    def __init__(self, config: GatewayConfig, *, context: zmq.Context | None = None) -> None:
        self.config = config
        self.context = context or zmq.Context.instance()
        self.link = BrokerLink(config.broker, context=self.context, timeout=config.broker_timeout)
        self.nodes = NodeBook(config.nodes)
        self.gateway = Gateway(self.link, self.nodes, flush=self._flush, max_frame=config.max_frame)
        self.http = HttpServer(self._handle, max_body=config.max_request)
        self._router: zmq.Socket | None = None
        self._pub: zmq.Socket | None = None
        self._rpc_watcher: SocketWatcher | None = None
        self._node_sockets: dict[Node, tuple[zmq.Socket, SocketWatcher]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._timer: asyncio.TimerHandle | None = None
        self._stopped: asyncio.Event | None = None
        self._started = False
        self.pending = 0
        self.busy_refusals = 0
        self.send_failures = 0
        self.published = 0

    # ------------------------------------------------------------ lifecycle

    def bind(self) -> None:
        """Bind the ZeroMQ sockets (raises :class:`AddressInUse` with advice)."""
        cfg = self.config
        try:
            if cfg.rpc:
                self._router = self._bind(zmq.ROUTER, cfg.rpc, "--rpc")
                self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
                # Up to twice the limit a message is read and refused with -32600;
                # beyond that libzmq drops the connection before buffering it whole.
                self._router.setsockopt(zmq.MAXMSGSIZE, cfg.max_request * 2 + 4096)
            if cfg.pub:
                self._pub = self._bind(zmq.PUB, cfg.pub, "--rpc-pub")
        except BaseException:
            self._close_sockets()
            raise

    def _bind(self, kind: int, endpoint: str, option: str) -> zmq.Socket:
        sock = self.context.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        sock.setsockopt(zmq.RCVHWM, 100_000)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(0)
            if exc.errno == errno.EADDRINUSE:
                raise AddressInUse(
                    f"{endpoint} is already in use: another gateway may be running, "
                    f"or choose another address with {option}"
                ) from None
            raise
        return sock

    async def start(self) -> None:
        """Bind (if not yet), connect to the broker and begin serving."""
        if self._router is None and self._pub is None:
            self.bind()
        loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        self.link.open()
        if self.config.http:
            host, port = parse_address(self.config.http)
            try:
                await self.http.start(host, port)
            except OSError as exc:
                self.link.close()
                self._close_sockets()
                if exc.errno == errno.EADDRINUSE:
                    raise AddressInUse(
                        f"{self.config.http} is already in use; choose another "
                        f"address with --rpc-http"
                    ) from None
                raise
        if self._router is not None:
            self._rpc_watcher = SocketWatcher(self._router, self._on_rpc)
        self._started = True
        self._timer = loop.call_soon(self._tick)
        log.info(
            "JSON-RPC gateway: rpc %s, pub %s, http %s; broker %s, backend %s",
            self.config.rpc or "off",
            self.config.pub or "off",
            f"http://{self.config.http}/rpc" if self.config.http else "off",
            self.config.broker,
            self.config.backend,
        )

    async def serve(self, *, handle_signals: bool = True) -> None:
        """Serve until :meth:`stop` (or SIGTERM/SIGINT), then close."""
        await self.start()
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                try:
                    loop.add_signal_handler(sig, self.stop)
                except (ValueError, RuntimeError):
                    pass
        assert self._stopped is not None
        try:
            await self._stopped.wait()
        finally:
            await self.close()

    def stop(self) -> None:
        if self._stopped is not None:
            self._stopped.set()

    async def close(self) -> None:
        """Say KBYE for every node, stop listening and close every socket."""
        if not self._started:
            self._close_sockets()
            return
        self._started = False
        if self._timer is not None:
            self._timer.cancel()
        self.nodes.shutdown()
        self._flush()
        await self.http.close()
        for task in list(self._tasks):
            task.cancel()
        self.link.close()
        self._close_sockets()

    def _close_sockets(self) -> None:
        if self._rpc_watcher is not None:
            self._rpc_watcher.close()
            self._rpc_watcher = None
        for sock, watcher in self._node_sockets.values():
            watcher.close()
            sock.close(linger=1000)
        self._node_sockets.clear()
        for sock in (self._router, self._pub):
            if sock is not None:
                sock.close()
        self._router = self._pub = None

    # ------------------------------------------------------------ requests

    async def _handle(self, raw: bytes, caller: Any = None) -> bytes | None:
        return await handle_rpc(
            raw,
            self.gateway.dispatch,
            max_size=self.config.max_request,
            max_batch=self.config.max_batch,
            caller=caller,
        )

    def _on_rpc(self, frames: list[bytes]) -> None:
        # [identity, ..., '', body] from REQ (or a DEALER that adds the
        # delimiter), [identity, body] from a plain DEALER.
        try:
            delimiter = frames.index(b"", 1)
        except ValueError:
            envelope, body, always = frames[:1], frames[1:], False
        else:
            envelope, body, always = frames[: delimiter + 1], frames[delimiter + 1 :], True
        # The caller: the routing frames, without the delimiter.
        caller = tuple(envelope[:-1] if always else envelope)
        if self.pending >= self.config.max_pending:
            self.busy_refusals += 1
            self._send_rpc(envelope, _BUSY)
            return
        if len(body) > 1:
            error = RpcError(
                INVALID_REQUEST,
                f"invalid request: one JSON text per message, got {len(body)} frames",
            )
            self._send_rpc(envelope, msgspec.json.encode(error_response(None, error)))
            return
        self.pending += 1
        raw = body[0] if body else b""
        task = asyncio.ensure_future(self._answer_rpc(envelope, raw, always, caller))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _answer_rpc(
        self, envelope: list[bytes], raw: bytes, always: bool, caller: tuple[bytes, ...]
    ) -> None:
        try:
            answer = await self._handle(raw, caller)
        finally:
            self.pending -= 1
        if answer is not None or always:
            self._send_rpc(envelope, answer or b"")

    def _send_rpc(self, envelope: list[bytes], answer: bytes) -> None:
        if self._router is None:
            return
        try:
            send_frames(self._router, [*envelope, answer])
        except zmq.ZMQError as exc:
            # The client went away (or stopped reading): nobody is left to tell.
            self.send_failures += 1
            log.debug("could not answer %r: %s", envelope[0][:64], exc)
        if self._rpc_watcher is not None:
            self._rpc_watcher.kick()

    # ------------------------------------------------------------ nodes, notices

    def _flush(self) -> None:
        actions, self.nodes.actions = self.nodes.actions, []
        for action in actions:
            kind = action[0]
            if kind == "send":
                self._send_node(action[1], action[2])
            elif kind == "publish":
                self._publish(action[1], action[2])
            elif kind == "open":
                self._open_node(action[1])
            elif kind == "close":
                self._close_node(action[1])

    def _open_node(self, node: Node) -> None:
        sock = self.context.socket(zmq.DEALER)
        sock.setsockopt(zmq.IDENTITY, node.identity)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.setsockopt(zmq.RECONNECT_IVL, 100)
        sock.setsockopt(zmq.RECONNECT_IVL_MAX, 2000)
        sock.setsockopt(zmq.SNDHWM, 10_000)
        sock.connect(self.config.backend)
        watcher = SocketWatcher(sock, lambda frames, n=node: self._on_node_frames(n, frames))
        self._node_sockets[node] = (sock, watcher)

    def _on_node_frames(self, node: Node, frames: list[bytes]) -> None:
        try:
            self.nodes.on_broker(node, frames, time.monotonic())
        except Exception:  # noqa: BLE001 - one bad message must not stop the gateway
            log.exception("internal error on a message from the broker for node %s", node.id)
        self._flush()

    def _send_node(self, node: Node, frames: list[bytes]) -> None:
        entry = self._node_sockets.get(node)
        if entry is None:
            return
        sock, watcher = entry
        try:
            send_frames(sock, frames)
        except zmq.ZMQError as exc:
            self.send_failures += 1
            log.warning("could not send to the broker for node %s: %s", node.id, exc)
        watcher.kick()

    def _close_node(self, node: Node) -> None:
        entry = self._node_sockets.pop(node, None)
        if entry is not None:
            sock, watcher = entry
            watcher.close()
            sock.close(linger=1000)  # the KBYE just queued still goes out

    def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        if self._pub is None:
            return
        try:
            self._pub.send_multipart([topic.encode(), msgspec.json.encode(payload)], zmq.NOBLOCK)
            self.published += 1
        except zmq.ZMQError as exc:
            self.send_failures += 1
            log.warning("could not publish on %s: %s", topic, exc)

    def _tick(self) -> None:
        if not self._started:
            return
        self.gateway.tick(time.monotonic())
        self._flush()
        cfg = self.config.nodes
        delay = max(
            0.05, min(0.5, cfg.heartbeat_interval / 3, cfg.offer_repeat / 2, cfg.node_timeout / 10)
        )
        self._timer = asyncio.get_running_loop().call_later(delay, self._tick)
