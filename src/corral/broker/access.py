"""Who may send what: the broker's access rules, decided per message from its principal.

The shell tells the core, with every message, which principal sent it (see
:mod:`corral.security.principal`). These tables say which role each command
needs on each socket, and which QUERY operations only an admin may run. A
message outside its sender's role is refused with ``ERROR NotAuthorized``,
logged once per principal and command, counted, and changes nothing.
"""

from __future__ import annotations

from corral.protocol import Command
from corral.security.principal import ADMIN, CLIENT, SCHEDULER, WORKER, Principal

#: The role a command needs, by socket. Commands missing here are refused for
#: what they are (an unexpected command), whoever sends them.
FRONTEND = {
    Command.REQUEST: CLIENT,
    Command.QUERY: CLIENT,
    Command.LISTEN: CLIENT,
    Command.SCHEDULE: CLIENT,
    Command.UNSCHEDULE: CLIENT,
    Command.INFORM: SCHEDULER,
    Command.KBYE: SCHEDULER,
    # A scheduler's answers and heartbeats (they only count as signs of life).
    Command.ACK: SCHEDULER,
    Command.REPLY: SCHEDULER,
    Command.ERROR: SCHEDULER,
    Command.HEARTBEAT: SCHEDULER,
}
BACKEND = {
    Command.INFORM: WORKER,
    Command.READY: WORKER,
    Command.REPLY: WORKER,
    Command.HEARTBEAT: WORKER,
    Command.RELEASE: WORKER,
    Command.KBYE: WORKER,
    Command.STREAM: WORKER,
    Command.ACK: WORKER,
    Command.ERROR: WORKER,
}
ADMIN_SOCKET = {
    Command.STATUS: ADMIN,
    Command.ROUTER_SHOW_WORKERS: ADMIN,
    Command.ROUTER_SHOW_SCHEDULERS: ADMIN,
    Command.DISCONNECT: ADMIN,
    Command.RELOAD_KEYS: ADMIN,
}
#: QUERY operations that act on every client's jobs.
ADMIN_OPS = frozenset({"purge"})

#: The reason of the ERROR that refuses a message outside its sender's role.
NOT_AUTHORIZED = "NotAuthorized"


def required_role(table: dict[Command, str], command: Command) -> str | None:
    return table.get(command)


def refusal(principal: Principal, command: str, role: str) -> str | None:
    """Why ``principal`` may not send ``command`` (which needs ``role``), or ``None``."""
    if principal.has(role):
        return None
    return f"{command} needs the {role} role; {principal.describe()} does not have it"


def may_disconnect(principal: Principal) -> str | None:
    """Why ``principal`` may not stop the broker, or ``None``.

    Only admins may; without CURVE nobody is authenticated, so then only a
    peer on this machine may (``remote`` marks one that is not).
    """
    if not principal.has(ADMIN):
        return refusal(principal, "DISCONNECT", ADMIN)
    if principal.remote:
        return (
            "DISCONNECT from another machine needs an admin key: without CURVE only "
            "a peer on the broker's own machine may stop it"
        )
    return None
