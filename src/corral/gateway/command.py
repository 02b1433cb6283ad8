"""``corral gateway``, and the ``--gateway`` options of ``corral broker`` / ``corral up``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import click

from corral.gateway import DEFAULT_HTTP, DEFAULT_PUB, DEFAULT_RPC
from corral.gateway.rpc import MAX_REQUEST
from corral.protocol import DEFAULT_BACKEND, DEFAULT_FRONTEND

if TYPE_CHECKING:
    from corral.gateway.server import GatewayConfig, GatewayServer

log = logging.getLogger("corral.gateway")

#: Options shared by ``corral gateway`` and ``corral broker|up --gateway``.
LISTEN_OPTIONS = [
    click.option(
        "--rpc",
        default=DEFAULT_RPC,
        show_default=True,
        help="JSON-RPC over ZeroMQ (a ROUTER; REQ clients welcome) ('' = none).",
    ),
    click.option(
        "--rpc-pub",
        default=DEFAULT_PUB,
        show_default=True,
        help="PUB endpoint for notices to nodes and clients ('' = none).",
    ),
    click.option(
        "--rpc-http",
        default=DEFAULT_HTTP,
        show_default=True,
        help="HOST:PORT serving JSON-RPC at POST /rpc ('' = none).",
    ),
    click.option(
        "--node-timeout",
        default=10.0,
        show_default=True,
        help="Seconds without a call (node_heartbeat) after which a node is lost "
        "and its tasks go back to the broker.",
    ),
    click.option(
        "--claim-timeout",
        default=60.0,
        show_default=True,
        help="Seconds a node has to claim a task it was offered before the task is "
        "given back as failed (NotClaimed; retried if it has retries).",
    ),
    click.option(
        "--max-request",
        default=MAX_REQUEST,
        show_default=True,
        help="Largest JSON-RPC message accepted, in bytes.",
    ),
]

#: ``corral broker`` / ``corral up``: the flag, then the options above.
BROKER_OPTIONS = [
    click.option(
        "--gateway",
        is_flag=True,
        help="Also serve the JSON-RPC gateway (zerotask methods) in this process.",
    ),
    *LISTEN_OPTIONS,
]
BROKER_KEYS = {
    "gateway",
    "rpc",
    "rpc_pub",
    "rpc_http",
    "node_timeout",
    "claim_timeout",
    "max_request",
}


def connect_address(endpoint: str) -> str:
    """An address to connect to a socket bound at ``endpoint`` (``*`` -> loopback)."""
    scheme, sep, rest = endpoint.partition("://")
    if scheme != "tcp" or not sep:
        return endpoint
    host, _, port = rest.rpartition(":")
    if host in ("*", "0.0.0.0"):
        host = "127.0.0.1"
    elif host in ("[::]", "::"):
        host = "[::1]"
    return f"tcp://{host}:{port}"


def make_config(
    *,
    broker: str,
    backend: str,
    heartbeat: float,
    liveness: int,
    rpc: str,
    rpc_pub: str,
    rpc_http: str,
    node_timeout: float,
    claim_timeout: float,
    max_request: int,
    max_frame: int | None = None,
) -> GatewayConfig:
    from corral.gateway.http import parse_address
    from corral.gateway.nodes import NodeConfig
    from corral.gateway.server import GatewayConfig

    if not rpc and not rpc_http:
        raise click.BadParameter("serve JSON-RPC somewhere: give --rpc or --rpc-http")
    if rpc_http:
        try:
            parse_address(rpc_http)
        except ValueError:
            raise click.BadParameter(
                f"{rpc_http!r}: use HOST:PORT", param_hint="--rpc-http"
            ) from None
    if not node_timeout > 0 or not claim_timeout > 0:
        raise click.BadParameter("--node-timeout and --claim-timeout must be > 0")
    config = GatewayConfig(
        broker=connect_address(broker),
        backend=connect_address(backend),
        rpc=rpc or None,
        pub=rpc_pub or None,
        http=rpc_http or None,
        nodes=NodeConfig(
            heartbeat_interval=heartbeat,
            heartbeat_liveness=liveness,
            node_timeout=node_timeout,
            claim_timeout=claim_timeout,
        ),
        max_request=max_request,
    )
    if max_frame is not None:
        config.max_frame = config.nodes.max_frame = max_frame
    return config


def bound_gateway(config: GatewayConfig) -> GatewayServer:
    """A gateway with its ZeroMQ sockets bound; a clear error if an address is taken."""
    from corral.gateway.server import AddressInUse, GatewayServer

    server = GatewayServer(config)
    try:
        server.bind()
    except AddressInUse as exc:
        raise click.ClickException(str(exc)) from None
    return server


def gateway_for_broker(opts: dict[str, Any], *, max_frame: int) -> GatewayServer | None:
    """The in-broker gateway asked for by ``--gateway`` (pops the gateway options)."""
    values = {key: opts.pop(key) for key in BROKER_KEYS}
    if not values.pop("gateway"):
        return None
    config = make_config(
        broker=opts["frontend"],
        backend=opts["backend"],
        heartbeat=opts["heartbeat"],
        liveness=opts["liveness"],
        max_frame=max_frame,
        **values,
    )
    return bound_gateway(config)


@contextlib.asynccontextmanager
async def beside(gateway: GatewayServer | None, broker: Any) -> AsyncIterator[None]:
    """Run ``gateway`` (if any) in this event loop while the body serves ``broker``."""
    if gateway is None:
        yield
        return
    from corral.gateway.server import AddressInUse

    try:
        await gateway.start()
    except AddressInUse as exc:
        broker.close()
        raise click.ClickException(str(exc)) from None
    try:
        yield
    finally:
        await gateway.close()


def _options(options: list[Any]) -> Any:
    def apply(f: Any) -> Any:
        for option in reversed(options):
            f = option(f)
        return f

    return apply


@click.command("gateway")
@click.option(
    "--broker",
    default=DEFAULT_FRONTEND,
    show_default=True,
    envvar="CORRAL_BROKER",
    help="The broker's frontend (tasks are submitted and read here).",
)
@click.option(
    "--backend",
    default=DEFAULT_BACKEND,
    show_default=True,
    help="The broker's backend (nodes are registered here as workers).",
)
@click.option(
    "--heartbeat", default=3.0, show_default=True, help="The broker's heartbeat, in seconds."
)
@click.option(
    "--liveness", default=3, show_default=True, help="The broker's missed-heartbeat limit."
)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"]),
)
@_options(LISTEN_OPTIONS)
def gateway_command(log_level: str, **opts: Any) -> None:
    """Serve zerotask's JSON-RPC broker methods for a corral broker."""
    from corral.cli import _setup_logging
    from corral.gateway.server import AddressInUse

    _setup_logging(log_level)
    server = bound_gateway(make_config(**opts))
    try:
        asyncio.run(server.serve())
    except AddressInUse as exc:
        raise click.ClickException(str(exc)) from None
