"""What a broker's message means to a client, shared by the sync and asyncio clients."""

from __future__ import annotations

import logging
from typing import Any, Literal

from corral.errors import JobFailed, Rejected
from corral.protocol import Error, Heartbeat, ProtocolError, Reply, parse

log = logging.getLogger("corral.client")

Kind = Literal["ack", "value", "failed", "refused"]


def read_answer(frames: list[bytes]) -> tuple[str, Kind, Any] | None:
    """``(job_id, kind, payload)`` for an acknowledgement, an outcome or a refusal.

    ``payload`` is the value (``"value"``), the exception to raise
    (``"failed"``, ``"refused"``) or ``None`` (``"ack"``). Anything else
    (heartbeats, malformed or unknown messages) gives ``None``.
    """
    try:
        msg = parse(frames)
    except ProtocolError as exc:
        log.warning("dropped a malformed message from the broker: %s", exc)
        return None
    if type(msg) is Reply:
        if msg.result is None:
            return msg.ref, "ack", None
        outcome = msg.outcome()
        if outcome.error is None:
            return msg.ref, "value", outcome.value
        err = outcome.error
        return (
            msg.ref,
            "failed",
            JobFailed.from_error(err.type, err.message, err.traceback, msg.ref),
        )
    if type(msg) is Error:
        return msg.ref, "refused", Rejected(msg.reason, msg.detail, msg.ref)
    if type(msg) is not Heartbeat:
        log.debug("ignored %s from the broker", msg.command.value)
    return None


def deliver(pending: dict[str, Any], frames: list[bytes]) -> bool:
    """Hand a broker message to the job it is about (a ``Job`` or ``AsyncJob``).

    An acknowledgement leaves the job in ``pending``, unless the job did not
    ask for its outcome: then nothing more will come, and the acknowledgement
    settles it with ``None``. An outcome or a refusal settles the job and
    takes it out. Returns whether a job was told anything.
    """
    answer = read_answer(frames)
    if answer is None:
        return False
    job_id, kind, payload = answer
    job = pending.get(job_id) if kind == "ack" else pending.pop(job_id, None)
    if job is None:
        unknown(job_id, kind, payload)
        return False
    if kind != "ack":
        job._settle(kind, payload)
    elif job._reply:
        job._mark_acknowledged()
    else:
        del pending[job_id]
        job._settle("value", None)
    return True


def unknown(job_id: str, kind: Kind, payload: Any) -> None:
    """Log an answer about a job this client no longer waits for."""
    if kind == "refused":
        log.warning("broker refused a message: %s", payload)
    else:
        log.debug("%s for unknown or finished job %s", kind, job_id)
