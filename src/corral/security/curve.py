"""CURVE on ZeroMQ sockets: server and client options, the ZAP handler, who sent a message.

The broker's ROUTER sockets (and the gateway's) are CURVE servers under a
ZAP domain named for the endpoint. libzmq asks the ZAP handler of the
socket's context about every new connection; :class:`KeyGuard` (pyzmq's
``ThreadAuthenticator`` in a thread of its own) accepts a key only if the
roster authorises it for a role that endpoint serves. libzmq then stamps
every message of that connection with the peer's public key as its
``User-Id``, which is how the broker tells, per message, who sent it.
Reloading the keys swaps the roster: new connections are checked against
it at once, and messages on connections of a removed key are refused from
then on (libzmq cannot close one peer's connection of a bound socket).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable
from urllib.parse import urlsplit

import zmq
from zmq.auth.thread import ThreadAuthenticator

from corral.security.keys import PeerKeys, ServerKeys, load_peer_keys
from corral.security.principal import Roster

log = logging.getLogger("corral.security")

#: The ZAP domains of the endpoints. Any authorised key may connect to any of
#: them: what a peer may do there is decided per message, by its roles, so that
#: a peer out of its role gets an ``ERROR NotAuthorized`` rather than silence.
DOMAINS = ("frontend", "backend", "admin", "notify", "rpc", "rpc-pub")
_ZAP_PREFIX = "corral."
#: Seconds between two log lines about refused connections of one kind.
_LOG_EVERY = 60.0


def serve_curve(sock: zmq.Socket, keys: ServerKeys, domain: str) -> None:
    """Make ``sock`` (before it binds) a CURVE server checked by the ZAP ``domain``."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown ZAP domain {domain!r}")
    sock.setsockopt(zmq.CURVE_SERVER, 1)
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.pair.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.pair.public)
    sock.setsockopt(zmq.ZAP_DOMAIN, (_ZAP_PREFIX + domain).encode())


#: The environment variable that names a process's keys (a peer bundle or a broker's directory).
KEYS_ENV = "CORRAL_KEYS"
_env_keys: dict[str, PeerKeys] = {}


def client_keys(keys: PeerKeys | str | None = None) -> PeerKeys | None:
    """The keys a connecting socket uses: ``keys`` (a :class:`PeerKeys` or its
    directory), else those ``$CORRAL_KEYS`` names, else ``None`` (no CURVE)."""
    if isinstance(keys, PeerKeys):
        return keys
    path = keys or os.environ.get(KEYS_ENV)
    if not path:
        return None
    found = _env_keys.get(path)
    if found is None:
        found = _env_keys[path] = load_peer_keys(path)
    return found


def connect_curve(sock: zmq.Socket, keys: PeerKeys | str | None) -> None:
    """Make ``sock`` (before it connects) a CURVE client with ``keys`` (see
    :func:`client_keys`); without keys anywhere it is left as it is."""
    keys = client_keys(keys)
    if keys is None:
        return
    sock.setsockopt(zmq.CURVE_SECRETKEY, keys.pair.secret)
    sock.setsockopt(zmq.CURVE_PUBLICKEY, keys.pair.public)
    sock.setsockopt(zmq.CURVE_SERVERKEY, keys.server)


def is_local(endpoint: str) -> bool:
    """Whether ``endpoint`` is reachable from this machine only (loopback, ipc, inproc)."""
    parts = urlsplit(endpoint)
    if parts.scheme in ("ipc", "inproc"):
        return True
    host = (parts.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # '*', a host name or an interface: any of them may face a network


def is_loopback_address(address: str) -> bool:
    """Whether a message's ``Peer-Address`` is this machine's (empty for ipc and inproc)."""
    if not address:
        return True
    try:
        return ipaddress.ip_address(address.strip("[]").split("%")[0]).is_loopback
    except ValueError:
        return False


class KeyGuard:
    """The ZAP handler of one context: which keys may connect where, and who was refused.

    ``reload(roster)`` swaps the authorised keys. ``refused`` counts
    connections refused by key (a CURVE peer with an unknown key, or one
    whose key serves no role of that endpoint); connections without CURVE
    are refused by libzmq itself and counted by the server's socket monitor.
    """

    def __init__(self, context: zmq.Context, roster: Roster) -> None:
        self.roster = roster
        self.refused = 0
        self._lock = threading.Lock()
        self._logged: dict[tuple[str, str], float] = {}
        self._address = ""
        guard = self

        class _Authenticator(ThreadAuthenticator):
            async def handle_zap_message(self, msg: list[bytes]) -> None:
                # The callback is told the domain and the key; keep the address for its log.
                guard._address = msg[3].decode("utf-8", "replace") if len(msg) > 3 else ""
                await super().handle_zap_message(msg)

        self._auth = _Authenticator(context, log=logging.getLogger("corral.security.zap"))
        self._auth.log.setLevel(logging.WARNING)

    def start(self) -> None:
        self._auth.start()
        for domain in DOMAINS:
            self._auth.configure_curve_callback(_ZAP_PREFIX + domain, credentials_provider=self)

    def stop(self) -> None:
        self._auth.stop()

    def reload(self, roster: Roster) -> None:
        self.roster = roster

    def callback(self, domain: str, key: bytes) -> bool:
        """pyzmq's credentials-provider hook: may ``key`` (z85) connect in ``domain``?"""
        text = key.decode("ascii", "replace")
        if self.roster.principal(text) is not None:
            return True
        with self._lock:
            self.refused += 1
        why = f"an unknown key ({text[:8]}...)"
        self.log_refusal(domain.removeprefix(_ZAP_PREFIX), why, self._address)
        return False

    def log_refusal(self, endpoint: str, why: str, address: str = "") -> None:
        """One line per endpoint and reason a minute, however many peers are refused."""
        now = time.monotonic()
        key = (endpoint, why)
        with self._lock:
            if now - self._logged.get(key, -_LOG_EVERY) < _LOG_EVERY:
                return
            self._logged[key] = now
            if len(self._logged) > 10_000:
                self._logged.clear()
        where = f" from {address}" if address else ""
        log.warning(
            "refused a connection to the %s%s: %s (refusals are logged once a minute, "
            "counted in `corral status` as auth_refused)",
            endpoint,
            where,
            why,
        )


_guards: weakref.WeakKeyDictionary[zmq.Context, tuple[KeyGuard, int]] = weakref.WeakKeyDictionary()
_guards_lock = threading.Lock()


def guard_for(context: zmq.Context, roster_of: Callable[[], Roster]) -> KeyGuard:
    """The context's one ZAP handler (libzmq allows one per context), started on first use.

    Each call takes a reference, which :func:`release_guard` gives back; the
    handler stops with the last one (a broker and a gateway may share it).
    """
    with _guards_lock:
        guard, users = _guards.get(context, (None, 0))
        if guard is None:
            guard = KeyGuard(context, roster_of())
            guard.start()
        _guards[context] = (guard, users + 1)
        return guard


def release_guard(context: zmq.Context) -> None:
    with _guards_lock:
        guard, users = _guards.get(context, (None, 0))
        if guard is None:
            return
        if users > 1:
            _guards[context] = (guard, users - 1)
            return
        del _guards[context]
    guard.stop()


#: Monitor events that mean a connection was refused during its handshake.
HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)
