"""Who sent a message, and what that one may do: principals, roles and the roster.

A *principal* is a peer known by its key: its name (the file name of its
public key), its roles and its group. The broker learns which principal
sent a message from the ZAP User-Id that libzmq attaches to every message
of a CURVE connection (the peer's public key), never from the ZeroMQ
identity, which a peer chooses itself.

Roles:

* ``client``: submits, schedules, queries and cancels its own jobs and
  listens to their streams; clients of one group see each other's jobs.
* ``worker``: registers, receives jobs, sends outcomes for the jobs it holds.
* ``scheduler``: fires schedule ticks.
* ``admin``: everything (STATUS, DISCONNECT, purge, retry and cancel of any job).

Without keys nobody is authenticated and every peer is :data:`TRUSTED`, as
on a machine whose every user may run jobs; an endpoint left open next to
keyed ones (``--open``) gives its anonymous peers the roles it serves.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

CLIENT = "client"
WORKER = "worker"
SCHEDULER = "scheduler"
ADMIN = "admin"
ROLES = (CLIENT, WORKER, SCHEDULER, ADMIN)
#: Folder of a key directory holding the public keys authorised for each role.
ROLE_FOLDERS = {CLIENT: "clients", WORKER: "workers", SCHEDULER: "schedulers", ADMIN: "admins"}


@dataclass(frozen=True, slots=True)
class Principal:
    """A peer as the broker knows it: ``name``, ``roles`` and ``group``.

    ``trusted`` marks the peers of a broker without keys: no one is
    authenticated there, so every role is granted and jobs have no owner.
    ``remote`` marks an unauthenticated peer whose address is not this
    machine's (it may not stop the broker).
    """

    name: str
    roles: frozenset[str]
    group: str | None = None
    trusted: bool = False
    remote: bool = False
    #: Its public key (z85 text); empty for peers without one.
    key: str = ""

    def has(self, role: str) -> bool:
        """Whether this principal may act in ``role`` (an admin may act in any)."""
        return role in self.roles or ADMIN in self.roles

    @property
    def admin(self) -> bool:
        return ADMIN in self.roles

    @property
    def owner(self) -> str | None:
        """What a job this principal submits records as its owner (``None``: nobody)."""
        return None if self.trusted else self.name

    def describe(self) -> str:
        roles = ",".join(sorted(self.roles)) or "no role"
        return "an unauthenticated peer" if self.trusted else f"key {self.name!r} ({roles})"


#: Every peer of a broker that runs without keys.
TRUSTED = Principal("anonymous", frozenset(ROLES), trusted=True)
#: ... and one of them whose address is not this machine's.
TRUSTED_REMOTE = Principal("anonymous", frozenset(ROLES), trusted=True, remote=True)


def anonymous(roles: Iterable[str], *, remote: bool = False) -> Principal:
    """The principal of a peer on an endpoint left open (no CURVE) beside keyed ones."""
    return Principal("anonymous", frozenset(roles), group="anonymous", remote=remote)


@dataclass(frozen=True, slots=True)
class Roster:
    """The authorised keys of one broker: by public key (z85 text) and by token digest.

    Built by :func:`corral.security.keys.load_roster`; replaced whole when the
    keys are reloaded, so a reader never sees half of an update.
    """

    by_key: Mapping[str, Principal] = field(default_factory=dict)
    #: sha256 hex digest of an HTTP bearer token -> its principal.
    by_token: Mapping[str, Principal] = field(default_factory=dict)

    def principal(self, key: str) -> Principal | None:
        return self.by_key.get(key)

    def for_token(self, token: str) -> Principal | None:
        if not token:
            return None
        digest = token_digest(token)
        for known, principal in self.by_token.items():
            if hmac.compare_digest(known, digest):
                return principal
        return None

    def group_of(self, name: str) -> str | None:
        for principal in self.by_key.values():
            if principal.name == name:
                return principal.group
        return None

    def members(self, group: str) -> frozenset[str]:
        """Names of the principals in ``group``."""
        return frozenset(p.name for p in self.by_key.values() if p.group == group)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(p.name for p in self.by_key.values())


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


class Visibility:
    """Which jobs a principal may see and change, given the roster's groups.

    A job's owner is the name of the principal that submitted it (``None``
    without keys). Admins and trusted peers see and change every job; a
    client sees its own jobs and those of its group's members, and changes
    (cancels, retries) only its own.
    """

    def __init__(self, roster: Roster | None = None) -> None:
        self.roster = roster or Roster()
        self._groups: dict[str, frozenset[str]] = {}

    def reload(self, roster: Roster) -> None:
        self.roster = roster
        self._groups = {}

    def owners_seen_by(self, principal: Principal) -> frozenset[str] | None:
        """The owners whose jobs ``principal`` sees; ``None``: all of them."""
        if principal.trusted or principal.admin:
            return None
        if principal.group is None:
            return frozenset({principal.name})
        members = self._groups.get(principal.group)
        if members is None:
            members = self._groups[principal.group] = self.roster.members(principal.group)
        return members | {principal.name}

    def can_see(self, principal: Principal, owner: str | None) -> bool:
        seen = self.owners_seen_by(principal)
        return seen is None or (owner is not None and owner in seen)

    def can_change(self, principal: Principal, owner: str | None) -> bool:
        if principal.trusted or principal.admin:
            return True
        return owner is not None and owner == principal.name
