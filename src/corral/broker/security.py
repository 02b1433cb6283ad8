"""The broker's security shell: CURVE on its sockets, who sent each message, key reloads.

:class:`BrokerGuard` sets up the broker's ROUTER and PUB sockets as CURVE
servers (with ``--keys``), reads each message together with the key that
libzmq authenticated for its connection, and turns that key into the
:class:`~corral.security.principal.Principal` the core decides by. Endpoints
left open (``--open``, for EventMQ peers) and brokers without keys give
their unauthenticated peers the roles those endpoints serve.

:func:`check_binds` is the safe default: an endpoint without CURVE that a
network can reach is refused unless the operator says ``--insecure``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from corral._loop import recv_frames, recv_frames_from
from corral.security import curve
from corral.security.keys import ServerKeys
from corral.security.principal import (
    ADMIN,
    CLIENT,
    SCHEDULER,
    TRUSTED,
    TRUSTED_REMOTE,
    WORKER,
    Principal,
    Roster,
    anonymous,
)

log = logging.getLogger("corral.broker")

#: Endpoint kinds that ``--open`` may name, and the roles of their anonymous peers.
OPEN_ROLES: dict[str, frozenset[str]] = {
    "frontend": frozenset({CLIENT, SCHEDULER}),
    "backend": frozenset({WORKER}),
    "admin": frozenset({ADMIN}),
    "notify": frozenset({CLIENT}),
}

Reader = Callable[[], tuple[list[bytes], Principal]]


class InsecureBind(RuntimeError):
    """An endpoint without CURVE would face a network; the message says what to do."""


@dataclass(slots=True)
class SecurityConfig:
    """``keys``: the broker's key directory (``None``: no CURVE anywhere); ``open``:
    endpoint kinds left without CURVE beside keyed ones; ``insecure``: allow
    endpoints without CURVE beyond loopback."""

    keys: ServerKeys | None = None
    open: frozenset[str] = field(default_factory=frozenset)
    insecure: bool = False

    def keyed(self, kind: str) -> bool:
        return self.keys is not None and kind not in self.open


def check_binds(config: SecurityConfig, endpoints: dict[str, str | None]) -> list[str]:
    """The endpoints that listen beyond loopback without CURVE; refused unless ``insecure``.

    ``endpoints`` maps an option name (``frontend``, ``rpc-http``, ...) to its
    address; kinds whose security is not CURVE (the line and HTTP servers)
    count as keyed when keys are given (they then need TLS and tokens).
    """
    exposed = [
        f"--{kind} {address}"
        for kind, address in endpoints.items()
        if address and not config.keyed(kind) and not curve.is_local(address)
    ]
    if exposed and not config.insecure:
        raise InsecureBind(
            f"refusing to listen on {', '.join(exposed)} without keys: anyone who reaches "
            f"it could take jobs, forge results or stop the broker. Set up keys "
            f"(`corral keys init DIR`, then --keys DIR; see the README's Security section), "
            f"listen on 127.0.0.1 only, or pass --insecure on a network you trust"
        )
    return exposed


class BrokerGuard:
    """CURVE, principals and key reloads for one broker's sockets (see the module doc)."""

    def __init__(
        self,
        config: SecurityConfig,
        context: zmq.Context,
        on_refused: Callable[[int], None],
    ) -> None:
        self.config = config
        self.context = context
        #: Called with the number of connections refused at their handshake.
        self.on_refused = on_refused
        self.roster = config.keys.roster() if config.keys is not None else Roster()
        self._guard: curve.KeyGuard | None = None
        self._monitors: list[tuple[zmq.Socket, zmq.Socket, str]] = []
        self._revoked: dict[str, Principal] = {}

    @property
    def keyed(self) -> bool:
        return self.config.keys is not None

    def secure(self, sock: zmq.Socket, kind: str) -> None:
        """Make ``sock`` (before it binds) a CURVE server, unless ``kind`` stays open."""
        keys = self.config.keys
        if keys is None or kind in self.config.open:
            return
        if self._guard is None:
            self._guard = curve.guard_for(self.context, lambda: self.roster)
            self._guard.reload(self.roster)
        curve.serve_curve(sock, keys, kind)
        monitor = sock.get_monitor_socket(curve.HANDSHAKE_FAILED)
        self._monitors.append((sock, monitor, kind))

    def watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Count refused handshakes as they happen (the monitors' FDs in the loop)."""
        for _, monitor, kind in self._monitors:
            loop.add_reader(monitor.getsockopt(zmq.FD), self._read_monitor, monitor, kind)
            self._read_monitor(monitor, kind)

    def _read_monitor(self, monitor: zmq.Socket, kind: str) -> None:
        refused = 0
        while True:
            try:
                event = recv_monitor_message(monitor, zmq.NOBLOCK)
            except zmq.Again:
                break
            except zmq.ZMQError:
                return
            refused += 1
            if event["event"] != zmq.EVENT_HANDSHAKE_FAILED_AUTH and self._guard is not None:
                # Refused by key is logged by the ZAP handler, with the key.
                self._guard.log_refusal(kind, "a peer without a CURVE key (or of the wrong kind)")
        if refused:
            self.on_refused(refused)

    def reader(self, kind: str, sock: zmq.Socket) -> Reader:
        """A function that receives one message from ``sock`` with its sender's principal."""
        if self.config.keyed(kind):

            def keyed() -> tuple[list[bytes], Principal]:
                frames, user = recv_frames_from(sock, "User-Id")
                return frames, self.roster.by_key.get(user) or self._revoked_key(user)

            return keyed
        if kind == "admin":
            local = anonymous(OPEN_ROLES["admin"]) if self.keyed else TRUSTED
            remote = anonymous(OPEN_ROLES["admin"], remote=True) if self.keyed else TRUSTED_REMOTE

            def by_address() -> tuple[list[bytes], Principal]:
                frames, address = recv_frames_from(sock, "Peer-Address")
                return frames, local if curve.is_loopback_address(address) else remote

            return by_address
        peer = anonymous(OPEN_ROLES.get(kind, ())) if self.keyed else TRUSTED

        def plain() -> tuple[list[bytes], Principal]:
            return recv_frames(sock), peer

        return plain

    def _revoked_key(self, key: str) -> Principal:
        """A key that connected while it was authorised and is no longer: it may do nothing."""
        principal = self._revoked.get(key)
        if principal is None:
            if len(self._revoked) > 10_000:
                self._revoked.clear()
            principal = self._revoked[key] = Principal(f"revoked key {key[:8]}...", frozenset())
        return principal

    def reload(self) -> dict[str, Any]:
        """Read the authorised keys again; return what changed (names added and removed)."""
        keys = self.config.keys
        if keys is None:
            return {"keys": False, "detail": "this broker runs without keys"}
        old = self.roster
        new = keys.roster()
        self.roster = new
        if self._guard is not None:
            self._guard.reload(new)
        added = sorted(new.names - old.names)
        removed = sorted(old.names - new.names)
        changed = sorted(
            p.name for k, p in old.by_key.items() if k not in new.by_key and p.name in new.names
        )
        log.info(
            "keys reloaded from %s: %d key(s); added %s, removed %s, replaced %s",
            keys.directory,
            len(new.by_key),
            ", ".join(added) or "none",
            ", ".join(removed) or "none",
            ", ".join(changed) or "none",
        )
        return {"keys": len(new.by_key), "added": added, "removed": removed, "replaced": changed}

    def close(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        for sock, monitor, _ in self._monitors:
            if loop is not None:
                try:
                    loop.remove_reader(monitor.getsockopt(zmq.FD))
                except (ValueError, OSError, zmq.ZMQError):
                    pass
            if not sock.closed:
                try:
                    sock.disable_monitor()
                except zmq.ZMQError:
                    pass
            monitor.close(0)
        self._monitors.clear()
        if self._guard is not None:
            curve.release_guard(self.context)
            self._guard = None

    def status(self) -> dict[str, Any]:
        keys = self.config.keys
        return {
            "keys": keys is not None,
            "key_dir": keys.directory if keys is not None else None,
            "authorised_keys": len(self.roster.by_key),
            "open_endpoints": sorted(self.config.open) if keys is not None else [],
            "insecure": self.config.insecure,
        }
