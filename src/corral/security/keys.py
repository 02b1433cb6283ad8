"""Key directories: the broker's key pair, the authorised keys by role, and peers' bundles.

A broker's key directory (``corral keys init DIR``)::

    DIR/broker.key           the broker's public key: every peer needs a copy
    DIR/broker.key_secret    the broker's key pair (0600, never leaves the machine)
    DIR/clients/NAME.key     public keys authorised as clients
    DIR/workers/NAME.key     ... as workers
    DIR/schedulers/NAME.key  ... as schedulers
    DIR/admins/NAME.key      ... as admins
    DIR/peers/NAME/          a peer's bundle, made by ``corral keys add``: its key
                             pair NAME.key_secret, NAME.key, broker.key, the
                             broker's TLS certificate broker.pem and its HTTP bearer
                             token NAME.token; copy it to the peer's machine
    DIR/tls/cert.pem, key.pem  a self-signed TLS pair for the line and HTTP servers

Every key file is a ``zmq.auth`` certificate (any ZeroMQ library reads it);
a public key authorised for a role carries the peer's ``group`` and the
digest of its bearer token in its metadata. One key may be authorised for
several roles (a gateway is a client and a worker). The broker's own key is
authorised for every role, so a process on the broker's machine may use
the broker's directory as its keys (``corral up --keys DIR``).

A peer's ``--keys`` names either such a bundle or the broker's directory.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from dataclasses import dataclass

import zmq
import zmq.auth

from corral.security.principal import (
    ADMIN,
    ROLE_FOLDERS,
    ROLES,
    Principal,
    Roster,
    token_digest,
)

BROKER = "broker"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_RESERVED = {BROKER, "anonymous"}


class KeysError(Exception):
    """A key directory or file is missing, malformed or unsafe (the message says what)."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A CURVE key pair, z85-encoded as ``zmq`` takes them."""

    public: bytes
    secret: bytes


@dataclass(frozen=True, slots=True)
class PeerKeys:
    """What a peer needs to connect to a keyed broker: its own pair and the broker's key."""

    name: str
    pair: KeyPair
    server: bytes
    #: Its HTTP bearer token, when the bundle holds one.
    token: str | None = None
    #: The broker's TLS certificate, to verify the line and HTTP servers by.
    tls_ca: str | None = None


@dataclass(frozen=True, slots=True)
class ServerKeys:
    """What a broker (or a gateway beside it) needs: its pair, the roster, the TLS pair."""

    directory: str
    pair: KeyPair
    tls_cert: str | None = None
    tls_key: str | None = None

    def roster(self) -> Roster:
        return load_roster(self.directory)

    def as_peer(self) -> PeerKeys:
        """This machine's own processes may connect with the broker's key (all roles)."""
        return PeerKeys(BROKER, self.pair, self.pair.public, tls_ca=self.tls_cert)


# ------------------------------------------------------------------ reading


def is_server_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, f"{BROKER}.key_secret"))


def load_server_keys(path: str) -> ServerKeys:
    """The broker's keys in directory ``path`` (made by ``corral keys init``)."""
    path = os.path.abspath(path)
    if not os.path.isdir(path):
        raise KeysError(f"{path}: no such key directory (make one with `corral keys init {path}`)")
    if not is_server_dir(path):
        raise KeysError(
            f"{path} holds no {BROKER}.key_secret: give the broker the directory made by "
            f"`corral keys init`, not a peer's bundle"
        )
    pair = _load_pair(os.path.join(path, f"{BROKER}.key_secret"))
    cert, key = os.path.join(path, "tls", "cert.pem"), os.path.join(path, "tls", "key.pem")
    have_tls = os.path.isfile(cert) and os.path.isfile(key)
    return ServerKeys(path, pair, cert if have_tls else None, key if have_tls else None)


def load_peer_keys(path: str) -> PeerKeys:
    """A peer's keys: a bundle made by ``corral keys add``, or the broker's own directory."""
    path = os.path.abspath(path)
    if os.path.isfile(path) and path.endswith(".key_secret"):
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        raise KeysError(f"{path}: no such key directory (see `corral keys add --help`)")
    if is_server_dir(path):
        return load_server_keys(path).as_peer()
    secrets_found = sorted(f for f in os.listdir(path) if f.endswith(".key_secret"))
    if len(secrets_found) != 1:
        raise KeysError(
            f"{path} must hold exactly one NAME.key_secret (a bundle made by "
            f"`corral keys add`); it holds {len(secrets_found)}"
        )
    server_file = os.path.join(path, f"{BROKER}.key")
    if not os.path.isfile(server_file):
        raise KeysError(f"{path} has no {BROKER}.key: copy the broker's public key there")
    name = secrets_found[0][: -len(".key_secret")]
    pair = _load_pair(os.path.join(path, secrets_found[0]))
    server, _ = _load(server_file)
    token_file = os.path.join(path, f"{name}.token")
    token = None
    if os.path.isfile(token_file):
        _check_private(token_file)
        with open(token_file, encoding="ascii") as f:
            token = f.read().strip() or None
    ca = os.path.join(path, f"{BROKER}.pem")
    return PeerKeys(name, pair, server, token, ca if os.path.isfile(ca) else None)


def load_roster(path: str) -> Roster:
    """Every authorised key of the broker's directory ``path``, with its roles and group."""
    found: dict[str, tuple[str, set[str], str | None, str | None]] = {}
    for role in ROLES:
        folder = os.path.join(path, ROLE_FOLDERS[role])
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            if not entry.endswith(".key"):
                continue
            file = os.path.join(folder, entry)
            public, _ = _load(file)
            meta = read_metadata(file)
            key = public.decode("ascii")
            name = entry[: -len(".key")]
            _, roles, group, digest = found.get(key, (name, set(), None, None))
            roles.add(role)
            found[key] = (name, roles, meta.get("group") or group, meta.get("token") or digest)
    by_key: dict[str, Principal] = {}
    by_token: dict[str, Principal] = {}
    for key, (name, roles, group, digest) in found.items():
        principal = Principal(name, frozenset(roles), group, key=key)
        by_key[key] = principal
        if digest:
            by_token[digest] = principal
    if is_server_dir(path):
        own, _ = _load(os.path.join(path, f"{BROKER}.key"))
        by_key[own.decode("ascii")] = Principal(BROKER, frozenset(ROLES), key=own.decode("ascii"))
    return Roster(by_key, by_token)


def read_metadata(file: str) -> dict[str, str]:
    """The ``metadata`` section of a ZPL certificate file, as text values."""
    meta: dict[str, str] = {}
    section = None
    with open(file, encoding="utf-8") as f:
        for raw in f:
            line = raw.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            if not line[0].isspace():
                section = line.strip()
                continue
            if section == "metadata" and "=" in line:
                k, _, v = line.partition("=")
                meta[k.strip()] = v.strip().strip("\"'")
    return meta


def _load(file: str) -> tuple[bytes, bytes | None]:
    try:
        return zmq.auth.load_certificate(file)
    except (OSError, ValueError) as exc:
        raise KeysError(f"{file}: not a readable ZeroMQ certificate ({exc})") from None


def _load_pair(file: str) -> KeyPair:
    _check_private(file)
    public, secret = _load(file)
    if secret is None:
        raise KeysError(f"{file} holds no secret key")
    return KeyPair(public, secret)


def _check_private(file: str) -> None:
    mode = os.stat(file).st_mode & 0o777
    if mode & 0o077:
        raise KeysError(
            f"{file} is readable by others (mode {mode:04o}); it holds a secret: chmod 600 {file}"
        )


# ------------------------------------------------------------------ writing


@contextlib.contextmanager
def _private_files() -> Iterator[None]:
    """Files and folders made inside are readable by their owner only."""
    old = os.umask(0o077)
    try:
        yield
    finally:
        os.umask(old)


def check_name(name: str) -> str:
    if not _NAME.match(name) or name in _RESERVED:
        raise KeysError(
            f"{name!r} cannot name a key: use 1-64 letters, digits, '.', '_' or '-' "
            f"(not {' or '.join(sorted(_RESERVED))})"
        )
    return name


def init_keys(path: str, *, tls_host: str | None = None) -> ServerKeys:
    """Make a broker's key directory (its pair, the role folders, a TLS pair)."""
    path = os.path.abspath(path)
    if is_server_dir(path):
        raise KeysError(f"{path} already holds a broker's keys; nothing was changed")
    with _private_files():
        os.makedirs(path, exist_ok=True)
        os.chmod(path, 0o700)
        for folder in (*ROLE_FOLDERS.values(), "peers"):
            os.makedirs(os.path.join(path, folder), exist_ok=True)
        zmq.auth.create_certificates(path, BROKER)
        os.chmod(os.path.join(path, f"{BROKER}.key_secret"), 0o600)
        from corral.security.tls import make_self_signed

        make_self_signed(os.path.join(path, "tls"), tls_host)
    return load_server_keys(path)


def add_peer(path: str, name: str, roles: list[str], group: str | None = None) -> str:
    """Make ``name``'s key pair and token, authorise it for ``roles``; return its bundle.

    A name that exists already gets a new pair and token (the old ones stop
    working once the broker reloads its keys): that is how a key is rotated.
    """
    server = load_server_keys(path)
    check_name(name)
    if group is not None:
        check_name(group)
    unknown = [r for r in roles if r not in ROLES]
    if unknown or not roles:
        raise KeysError(f"roles are {', '.join(ROLES)}; got {', '.join(roles) or 'none'}")
    remove_peer(path, name, missing_ok=True)
    bundle = os.path.join(server.directory, "peers", name)
    with _private_files():
        os.makedirs(bundle, exist_ok=True)
        public_file, secret_file = zmq.auth.create_certificates(bundle, name)
        os.chmod(secret_file, 0o600)
        shutil.copyfile(
            os.path.join(server.directory, f"{BROKER}.key"), os.path.join(bundle, f"{BROKER}.key")
        )
        if server.tls_cert is not None:
            shutil.copyfile(server.tls_cert, os.path.join(bundle, f"{BROKER}.pem"))
        token = secrets.token_urlsafe(32)
        with open(os.path.join(bundle, f"{name}.token"), "w", encoding="ascii") as f:
            f.write(token + "\n")
        public, _ = _load(public_file)
        meta = {"token": token_digest(token), **({"group": group} if group else {})}
        for role in roles:
            folder = os.path.join(server.directory, ROLE_FOLDERS[role])
            os.makedirs(folder, exist_ok=True)
            _write_public(os.path.join(folder, f"{name}.key"), public, meta)
    return bundle


def remove_peer(path: str, name: str, *, missing_ok: bool = False) -> list[str]:
    """Take ``name``'s key out of every role folder and drop its bundle; return the roles."""
    server = load_server_keys(path)
    removed = []
    for role, folder in ROLE_FOLDERS.items():
        file = os.path.join(server.directory, folder, f"{name}.key")
        if os.path.exists(file):
            os.remove(file)
            removed.append(role)
    bundle = os.path.join(server.directory, "peers", name)
    if os.path.isdir(bundle):
        shutil.rmtree(bundle)
    if not removed and not missing_ok:
        raise KeysError(f"no key named {name!r} in {server.directory}")
    return removed


def list_peers(path: str) -> list[Principal]:
    roster = load_server_keys(path).roster()
    return sorted((p for p in roster.by_key.values() if p.name != BROKER), key=lambda p: p.name)


def _write_public(file: str, public: bytes, meta: dict[str, str]) -> None:
    lines = [
        f"#   ****  Generated on {datetime.datetime.now()} by corral  ****",
        "#   ZeroMQ CURVE Public Certificate, authorised by this broker",
        "",
        "metadata",
        *(f'    {k} = "{v}"' for k, v in meta.items()),
        "curve",
        f'    public-key = "{public.decode("ascii")}"',
        "",
    ]
    with open(file, "w", encoding="utf-8") as f:
        f.write("\n".join(lines))


__all__ = [
    "ADMIN",
    "BROKER",
    "KeysError",
    "KeyPair",
    "PeerKeys",
    "ServerKeys",
    "add_peer",
    "init_keys",
    "is_server_dir",
    "list_peers",
    "load_peer_keys",
    "load_roster",
    "load_server_keys",
    "remove_peer",
]
