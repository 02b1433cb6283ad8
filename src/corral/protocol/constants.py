"""eMQP constants: the protocol tag, command names and EventMQ's default endpoints."""

from __future__ import annotations

from enum import StrEnum

PROTOCOL = b"eMQP/1.0"

DEFAULT_FRONTEND = "tcp://127.0.0.1:47291"
DEFAULT_BACKEND = "tcp://127.0.0.1:47290"
DEFAULT_ADMIN = "tcp://127.0.0.1:47293"
DEFAULT_QUEUE = "default"

#: Largest single frame accepted before a message is refused as oversized.
DEFAULT_MAX_FRAME = 8 * 1024 * 1024


class Command(StrEnum):
    INFORM = "INFORM"
    ACK = "ACK"
    READY = "READY"
    REQUEST = "REQUEST"
    REPLY = "REPLY"
    HEARTBEAT = "HEARTBEAT"
    DISCONNECT = "DISCONNECT"
    KBYE = "KBYE"
    SCHEDULE = "SCHEDULE"
    UNSCHEDULE = "UNSCHEDULE"
    PUBLISH = "PUBLISH"
    STATUS = "STATUS"
    ROUTER_SHOW_WORKERS = "ROUTER_SHOW_WORKERS"
    ROUTER_SHOW_SCHEDULERS = "ROUTER_SHOW_SCHEDULERS"
    #: sent by ``emq-cli`` when it connects; never answered (it would take the
    #: answer for the reply to its next command).
    HELLO = "HELLO"
    # corral extensions.
    #: the broker tells a sender why its message was refused.
    ERROR = "ERROR"
    #: a client asks about jobs or workers, or acts on a job (retry, cancel);
    #: answered by a REPLY whose outcome carries the answer.
    QUERY = "QUERY"
    #: the broker tells a corral worker to stop running a job and drop it
    #: (cancelled, or given to another worker while this one was lost).
    ABORT = "ABORT"
    #: job streams: a corral worker's batch of stream messages (backend), or the
    #: broker's delivery of stream items to one listener (frontend).
    STREAM = "STREAM"
    #: job streams: a client starts, paces or stops listening to a stream.
    LISTEN = "LISTEN"
    #: the broker asks a corral worker to hand back a prefetched job it has not
    #: started (a process elsewhere is free for it).
    RECALL = "RECALL"
    #: a corral worker hands back a job it was sent and has not started (recalled,
    #: or it is leaving): the broker queues it again, at the front.
    RELEASE = "RELEASE"
    #: an admin asks the broker to read its authorised keys again (as on SIGHUP).
    RELOAD_KEYS = "RELOAD_KEYS"


COMMANDS: dict[bytes, Command] = {c.value.encode(): c for c in Command}
