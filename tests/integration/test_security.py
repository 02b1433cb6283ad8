"""Hostile peers against a real broker: keys, roles, groups, forged outcomes, safe binds.

Each test plays a peer that should not get what it asks for, over real
loopback sockets, and checks the broker refuses it, counts it and keeps serving.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import zmq

from corral import Client
from corral.admin import admin_request
from corral.errors import CorralError
from corral.protocol import (
    PROTOCOL,
    Disconnect,
    Error,
    Inform,
    Reply,
    Request,
    new_msgid,
    parse,
    parse_headers,
)
from corral.security.curve import connect_curve
from corral.security.keys import (
    KeyPair,
    PeerKeys,
    add_peer,
    init_keys,
    load_peer_keys,
    remove_peer,
)
from tests.integration.procs import broker_refuses_to_start, corral_cmd, free_addr, wait_for

pytestmark = pytest.mark.integration

BODY = json.dumps(["run", {"path": "tests.jobs", "callable": "add", "args": [1, 2]}]).encode()


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    """A broker's key directory with a worker, clients in two groups and an admin."""
    directory = tmp_path / "keys"
    init_keys(str(directory))
    add_peer(str(directory), "w1", ["worker"])
    add_peer(str(directory), "alice", ["client"], "g1")
    add_peer(str(directory), "bob", ["client"], "g1")
    add_peer(str(directory), "carol", ["client"], "g2")
    add_peer(str(directory), "ops", ["admin"])
    return directory


def bundle(keys: Path, name: str) -> str:
    return str(keys / "peers" / name)


@pytest.fixture
def secured(cluster, keys):
    """A broker with keys and one worker with the worker key."""
    cluster.admin_keys = bundle(keys, "ops")
    cluster.broker("--keys", str(keys))
    cluster.worker("--keys", bundle(keys, "w1"), "--allow", "tests", concurrency=2)
    return cluster


class Peer:
    """A raw DEALER that speaks eMQP, with or without a key: a hostile peer's tools."""

    def __init__(self, address: str, keys: Any = None, identity: bytes | None = None) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IDENTITY, identity or new_msgid().encode())
        connect_curve(self.sock, keys)
        self.sock.connect(address)

    def send(self, frames: list[bytes]) -> None:
        self.sock.send_multipart(frames)

    def recv(self, timeout: float = 5.0) -> Any:
        """The next message, or ``None`` after ``timeout`` seconds."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return parse(self.sock.recv_multipart())

    def until(self, kind: type, timeout: float = 10.0) -> Any:
        """The first message of ``kind`` (others, like HEARTBEATs, are skipped)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.recv(max(0.01, deadline - time.monotonic()))
            if isinstance(msg, kind):
                return msg
        return None

    def close(self) -> None:
        self.sock.close()


def refusal(peer: Peer) -> Error:
    msg = peer.until(Error)
    assert msg is not None, "no ERROR came back"
    return msg


def stat(cluster, name: str) -> int:
    return cluster.status()[name]


# ---------------------------------------------------------------- safe defaults


def test_a_broker_without_keys_refuses_to_listen_beyond_loopback(tmp_path: Path) -> None:
    port = free_addr().rsplit(":", 1)[1]
    message = broker_refuses_to_start(tmp_path / "d", "--frontend", f"tcp://0.0.0.0:{port}")
    assert "--frontend tcp://0.0.0.0" in message
    assert "corral keys init" in message and "--insecure" in message


def test_with_insecure_it_listens_and_says_so_in_status(cluster) -> None:
    port = free_addr().rsplit(":", 1)[1]
    cluster.addrs.frontend = f"tcp://0.0.0.0:{port}"
    proc = cluster.broker("--insecure")
    assert cluster.status()["security"]["insecure_endpoints"] == [
        f"--frontend tcp://0.0.0.0:{port}"
    ]
    assert "--insecure" in proc.output()
    out = subprocess.run(
        corral_cmd("status", "--admin", cluster.addrs.admin),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0 and "insecure" in out.stdout.lower(), out.stdout + out.stderr


# ---------------------------------------------------------------- keys


def test_a_peer_without_a_key_or_with_an_unknown_one_cannot_connect(secured) -> None:
    before = stat(secured, "auth_refused")
    public, secret = zmq.curve_keypair()
    alice = load_peer_keys(bundle(Path(secured.tmp / "keys"), "alice"))
    # A well-formed key pair for the right broker, that nobody authorised.
    stranger = PeerKeys("stranger", KeyPair(public, secret), alice.server, None, None)
    peers = [Peer(secured.addrs.frontend), Peer(secured.addrs.frontend, stranger)]
    try:
        for peer in peers:
            request = Request(new_msgid(), "default", parse_headers(""), BODY)
            peer.send(request.to_frames())
            assert peer.recv(timeout=1.0) is None  # not even a refusal: no connection
        wait_for(lambda: stat(secured, "auth_refused") >= before + 2, what="auth_refused")
        assert stat(secured, "jobs_accepted") == 0
    finally:
        for peer in peers:
            peer.close()


def test_a_worker_key_cannot_submit_and_a_client_key_cannot_be_a_worker(secured, keys) -> None:
    as_worker = Peer(secured.addrs.frontend, bundle(keys, "w1"))
    as_client = Peer(secured.addrs.backend, bundle(keys, "alice"))
    try:
        as_worker.send(Request(new_msgid(), "default", parse_headers(""), BODY).to_frames())
        error = refusal(as_worker)
        assert error.reason == "NotAuthorized" and "REQUEST" in error.detail
        assert "client" in error.detail
        as_client.send(Inform(new_msgid(), ((10, "default"),), "worker").to_frames())
        error = refusal(as_client)
        assert error.reason == "NotAuthorized" and "INFORM" in error.detail
        as_client.send([b"", PROTOCOL, b"READY", b"r"])
        as_client.send(Reply(new_msgid(), "some-job", b'{"value": 1337}').to_frames())
        assert refusal(as_client).reason == "NotAuthorized"
        # Only the real worker is registered, and the broker serves on.
        assert len(secured.workers()["connected_workers"]) == 1
        assert stat(secured, "not_authorized") >= 3
        with Client(secured.addrs.frontend, keys=bundle(keys, "alice")) as client:
            assert client.submit("tests.jobs:add", 2, 3).result(timeout=20) == 5
    finally:
        as_worker.close()
        as_client.close()


def test_clients_see_only_their_groups_jobs_and_change_only_their_own(secured, keys) -> None:
    with (
        Client(secured.addrs.frontend, keys=bundle(keys, "alice")) as alice,
        Client(secured.addrs.frontend, keys=bundle(keys, "bob")) as bob,
        Client(secured.addrs.frontend, keys=bundle(keys, "carol")) as carol,
        Client(secured.addrs.frontend, keys=bundle(keys, "ops")) as ops,
    ):
        job = alice.submit("tests.jobs:sleep", 30)
        wait_for(lambda: [j["id"] for j in alice.jobs()] == [job.id], what="alice's job")
        assert [j["id"] for j in bob.jobs()] == [job.id]  # same group
        assert bob.jobs()[0]["owner"] == "alice"
        assert carol.jobs() == []
        with pytest.raises(CorralError) as found:
            carol.job_info(job.id)
        assert "NotFound" in str(found.value)
        with pytest.raises(CorralError) as refused:
            bob.cancel(job.id)  # may see it, may not change it
        assert "NotAuthorized" in str(refused.value)
        with pytest.raises(CorralError) as refused:
            alice.query("purge", older_than=0)
        assert "NotAuthorized" in str(refused.value)
        assert ops.cancel(job.id)["cancelled"]  # an admin may
        assert len(ops.jobs()) == 1


def test_disconnect_stops_the_broker_only_from_an_admin_on_the_admin_endpoint(
    secured, keys
) -> None:
    front = Peer(secured.addrs.frontend, bundle(keys, "alice"))
    admin_as_client = Peer(secured.addrs.admin, bundle(keys, "alice"))
    try:
        front.send(Disconnect(new_msgid()).to_frames())
        assert refusal(front).reason in ("unexpected-command", "NotAuthorized")
        admin_as_client.send(Disconnect(new_msgid()).to_frames())
        assert refusal(admin_as_client).reason == "NotAuthorized"
        assert secured.status() is not None  # still serving
        broker = secured.procs[0]
        admin_request("DISCONNECT", secured.addrs.admin, keys=bundle(keys, "ops"))
        assert broker.wait(15) is not None, "an admin's DISCONNECT did not stop the broker"
    finally:
        front.close()
        admin_as_client.close()


def test_a_removed_key_is_cut_off_after_a_reload(secured, keys) -> None:
    carol_keys = load_peer_keys(bundle(keys, "carol"))
    with Client(secured.addrs.frontend, keys=carol_keys, ack_timeout=3) as carol:
        assert carol.submit("tests.jobs:add", 1, 1).result(timeout=20) == 2
        remove_peer(str(keys), "carol")
        reload = corral_cmd(
            "keys", "reload", "--admin", secured.addrs.admin, "--keys", bundle(keys, "ops")
        )
        out = subprocess.run(reload, capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "carol" in json.loads(out.stdout)["removed"]
        # Its open connection stays, but nothing it sends is taken any more.
        with pytest.raises(CorralError) as refused:
            carol.submit("tests.jobs:add", 1, 1).result(timeout=20)
        assert "NotAuthorized" in str(refused.value)
    # A new connection with that key is refused at the handshake.
    before = stat(secured, "auth_refused")
    peer = Peer(secured.addrs.frontend, carol_keys)
    try:
        peer.send(Request(new_msgid(), "default", parse_headers(""), BODY).to_frames())
        assert peer.recv(timeout=1.0) is None
        wait_for(lambda: stat(secured, "auth_refused") > before, what="auth_refused")
    finally:
        peer.close()


# ---------------------------------------------------------------- forged outcomes (no keys)


def _worker_uuid(cluster) -> str:
    return next(iter(cluster.workers()["connected_workers"]))


def test_forged_outcomes_never_reach_the_client_and_the_real_one_wins(cluster) -> None:
    cluster.broker()
    cluster.worker("--allow", "tests", concurrency=2)
    up = cluster
    before = stat(up, "forged_outcomes")
    uuid = _worker_uuid(up)
    with Client(up.addrs.frontend) as client:
        running = client.submit("tests.jobs:sleep", 1.5)
        queued = [client.submit("tests.jobs:sleep", 3) for _ in range(3)]  # the slots fill up
        wait_for(lambda: client.job_info(running.id)["state"] == "running", what="running")
        stranger = Peer(up.addrs.backend, identity=b"evil-worker")
        guessed = Peer(up.addrs.backend, identity=f"{uuid}/99999".encode())
        proofless = Peer(up.addrs.backend, identity=f"{uuid}/99999/{'0' * 40}".encode())
        try:
            for peer in (stranger, guessed, proofless):
                for job in (running, queued[-1]):
                    peer.send(Reply(new_msgid(), job.id, b'{"value": 1337}').to_frames())
            assert refusal(stranger).reason == "unknown-worker"
            wait_for(
                lambda: stat(up, "forged_outcomes") >= before + 6, what="forged outcomes counted"
            )
            assert running.result(timeout=20) == 1.5
            assert client.job_info(running.id)["result"] == 1.5
            assert queued[-1].result(timeout=30) == 3
        finally:
            for peer in (stranger, guessed, proofless):
                peer.close()


def test_a_frontend_disconnect_never_stops_the_broker(up) -> None:
    peer = Peer(up.addrs.frontend)
    try:
        peer.send(Disconnect(new_msgid()).to_frames())
        assert refusal(peer).reason == "unexpected-command"
        with Client(up.addrs.frontend) as client:
            assert client.submit("tests.jobs:add", 2, 2).result(timeout=20) == 4
    finally:
        peer.close()
