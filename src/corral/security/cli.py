"""``corral keys``: make and authorise CURVE keys; the ``--keys`` option every process takes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import click

from corral.security.curve import KEYS_ENV
from corral.security.keys import (
    KeysError,
    PeerKeys,
    ServerKeys,
    add_peer,
    init_keys,
    list_peers,
    load_peer_keys,
    load_server_keys,
    remove_peer,
)
from corral.security.principal import ROLES


def _use_peer_keys(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    # Checked now (a one-line error), then every socket of this process uses them.
    if value:
        peer_keys(value)
        os.environ[KEYS_ENV] = value


#: ``--keys`` for a peer command (client, worker, scheduler, admin tool): its
#: bundle made by ``corral keys add``, or the broker's own directory. Every
#: socket the command opens connects with these keys.
PEER_KEYS_OPTION = click.option(
    "--keys",
    default=None,
    envvar=KEYS_ENV,
    metavar="DIR",
    expose_value=False,
    callback=_use_peer_keys,
    help=f"This peer's keys (a bundle made by `corral keys add`) for a broker with keys "
    f"[default: ${KEYS_ENV}; none: connect without CURVE].",
)

#: What a broker takes: its key directory, endpoints left open, --insecure.
BROKER_SECURITY_OPTIONS = [
    click.option(
        "--keys",
        "keys",
        default=None,
        envvar=KEYS_ENV,
        metavar="DIR",
        help=f"The broker's key directory (`corral keys init DIR`): CURVE on every ZeroMQ "
        f"endpoint, TLS and tokens on the stream and HTTP servers [default: ${KEYS_ENV}].",
    ),
    click.option(
        "--open",
        "open_endpoints",
        default="",
        metavar="KIND,...",
        help="With --keys: endpoints left without CURVE for peers that have none (EventMQ's), "
        "any of frontend, backend, admin, notify; their peers get that endpoint's role.",
    ),
    click.option(
        "--insecure",
        is_flag=True,
        help="Allow endpoints without keys beyond loopback: anyone who reaches them may "
        "submit, take jobs and stop the broker. Warned about at start and in `corral status`.",
    ),
]


def _loaded(load: Callable[[str], Any], path: str | None) -> Any:
    """``load(path)`` for a ``--keys`` option (``None`` without one), or a one-line error."""
    if not path:
        return None
    try:
        return load(path)
    except KeysError as exc:
        raise click.ClickException(str(exc)) from None


def server_keys(path: str | None) -> ServerKeys | None:
    """The broker's keys from ``--keys``, or a one-line error."""
    return _loaded(load_server_keys, path)


def peer_keys(path: str | None) -> PeerKeys | None:
    """A peer's keys from ``--keys``, or a one-line error."""
    return _loaded(load_peer_keys, path)


def security_config(keys: str | None, open_endpoints: str, insecure: bool) -> Any:
    """The broker's :class:`~corral.broker.security.SecurityConfig` from its options."""
    from corral.broker.security import OPEN_ROLES, SecurityConfig

    opened = frozenset(k.strip() for k in open_endpoints.split(",") if k.strip())
    unknown = sorted(opened - OPEN_ROLES.keys())
    if unknown:
        raise click.BadParameter(
            f"{', '.join(unknown)}: name any of {', '.join(OPEN_ROLES)}", param_hint="--open"
        )
    if opened and not keys:
        raise click.BadParameter("--open leaves endpoints of a broker with --keys without CURVE")
    return SecurityConfig(keys=server_keys(keys), open=opened, insecure=insecure)


@click.group("keys")
def keys_group() -> None:
    """Make and authorise CURVE keys (broker, clients, workers, schedulers, admins)."""


_DIR_ARG = click.option(
    "--keys",
    "directory",
    envvar=KEYS_ENV,
    required=True,
    metavar="DIR",
    help=f"The broker's key directory [default: ${KEYS_ENV}].",
)


def _fail(exc: KeysError) -> click.ClickException:
    return click.ClickException(str(exc))


@keys_group.command("init")
@click.argument("directory")
@click.option(
    "--tls-host",
    default=None,
    help="Host name the self-signed TLS certificate names besides localhost "
    "[default: this machine's name].",
)
def init_cmd(directory: str, tls_host: str | None) -> None:
    """Make a broker's key pair, the role folders and a self-signed TLS pair in DIRECTORY."""
    try:
        keys = init_keys(directory, tls_host=tls_host)
    except KeysError as exc:
        raise _fail(exc) from None
    click.echo(f"broker keys in {keys.directory}")
    click.echo(f"start the broker with: corral broker --keys {keys.directory} ...")
    click.echo(f"authorise a peer with: corral keys add --keys {keys.directory} --role worker NAME")


@keys_group.command("add")
@click.argument("name")
@_DIR_ARG
@click.option(
    "--role",
    "roles",
    multiple=True,
    required=True,
    type=click.Choice(list(ROLES)),
    help="A role of this key (repeatable: a gateway is a client and a worker).",
)
@click.option("--group", default=None, help="Clients of one group see each other's jobs.")
def add_cmd(name: str, directory: str, roles: tuple[str, ...], group: str | None) -> None:
    """Make NAME's key pair and token and authorise it (again: a new pair, the old one
    stops working when the broker reloads its keys)."""
    try:
        bundle = add_peer(directory, name, list(roles), group)
    except KeysError as exc:
        raise _fail(exc) from None
    click.echo(f"{name} ({', '.join(roles)}): its keys are in {bundle}")
    click.echo(f"copy that directory to {name}'s machine and give it --keys DIR there;")
    click.echo("a running broker takes the new key after `corral keys reload` (or SIGHUP).")


@keys_group.command("remove")
@click.argument("name")
@_DIR_ARG
def remove_cmd(name: str, directory: str) -> None:
    """Take NAME's key out of every role; its connections drop at the next reload."""
    try:
        roles = remove_peer(directory, name)
    except KeysError as exc:
        raise _fail(exc) from None
    click.echo(f"removed {name} ({', '.join(roles)}); run `corral keys reload` to cut it off")


@keys_group.command("list")
@_DIR_ARG
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(directory: str, as_json: bool) -> None:
    """List the authorised keys with their roles and groups."""
    try:
        peers = list_peers(directory)
    except KeysError as exc:
        raise _fail(exc) from None
    rows = [{"name": p.name, "roles": sorted(p.roles), "group": p.group} for p in peers]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        group = f"  group {row['group']}" if row["group"] else ""
        click.echo(f"{row['name']:<24} {','.join(row['roles'])}{group}")


@keys_group.command("reload")
@click.option("--admin", default=None, envvar="CORRAL_ADMIN", help="The broker's admin endpoint.")
@PEER_KEYS_OPTION
@click.option("--timeout", default=5.0, show_default=True)
def reload_cmd(admin: str | None, timeout: float) -> None:
    """Have a running broker read its authorised keys again (as SIGHUP does)."""
    from corral.admin import AdminError, admin_request
    from corral.protocol import DEFAULT_ADMIN

    try:
        changes = admin_request("RELOAD_KEYS", admin or DEFAULT_ADMIN, timeout=timeout)
    except AdminError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(changes, indent=2, sort_keys=True))
