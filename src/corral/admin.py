"""Asking a broker's admin socket (STATUS, ROUTER_SHOW_WORKERS, ...) from Python."""

from __future__ import annotations

from typing import Any

import msgspec
import zmq

from corral.protocol import (
    DEFAULT_ADMIN,
    PROTOCOL,
    Ack,
    Error,
    ProtocolError,
    Reply,
    new_msgid,
    parse,
)
from corral.security.curve import connect_curve
from corral.security.keys import PeerKeys


class AdminError(RuntimeError):
    pass


def admin_request(
    command: str,
    address: str = DEFAULT_ADMIN,
    *,
    timeout: float = 5.0,
    context: zmq.Context | None = None,
    keys: PeerKeys | str | None = None,
) -> Any:
    """Send one admin ``command`` and return the decoded JSON reply.

    DISCONNECT returns ``None`` once the broker acknowledged it. Raises
    :class:`AdminError` when nothing answers within ``timeout`` seconds.
    """
    ctx = context or zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IDENTITY, f"admin:{new_msgid()}".encode())
    connect_curve(sock, keys)  # an admin key (or $CORRAL_KEYS) for a broker with keys
    try:
        sock.connect(address)
        sock.send_multipart([b"", PROTOCOL, command.encode(), f"admin:{new_msgid()}".encode()])
        if not sock.poll(int(timeout * 1000)):
            raise AdminError(
                f"no answer from the broker's admin socket at {address} "
                f"within {timeout:g} s: is the broker running?"
            )
        frames = sock.recv_multipart()
    finally:
        sock.close()
    try:
        msg = parse(frames)
    except ProtocolError as exc:
        raise AdminError(f"the broker sent an unreadable answer: {exc}") from None
    if isinstance(msg, Error):
        raise AdminError(f"the broker refused {command}: {msg.reason} ({msg.detail})")
    if isinstance(msg, Ack):
        return None
    if isinstance(msg, Reply):
        try:
            return msgspec.json.decode(msg.ref.encode())
        except msgspec.DecodeError as exc:
            raise AdminError(f"the broker's answer is not JSON: {exc}") from None
    raise AdminError(f"unexpected answer {msg.command.value}")
