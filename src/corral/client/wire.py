"""What a broker's message means to a client, shared by the sync and asyncio clients."""

from __future__ import annotations

import logging
from typing import Any, Literal

from corral.errors import JobFailed, Rejected
from corral.protocol import Error, Heartbeat, ProtocolError, Query, Reply, new_msgid, parse

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
    if kind == "refused" and payload.reason == "duplicate-id":
        job = pending.get(job_id)
        if job is not None and job._resent:
            # Sent again after a reconnect, and the broker already had it.
            kind = "ack"
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


#: Job ids per ``outcomes`` QUERY when a client catches up after a reconnect.
RESYNC_BATCH = 2000


def resync_queries(job_ids: list[str]) -> list[Query]:
    """QUERYs asking the broker how these jobs ended (the answers may have been lost).

    A client sends them right after it reconnected to a broker (which may have
    restarted meanwhile): an outcome the broker produced while the client was
    away could not be routed to it.
    """
    # ``listen``: jobs this client did not submit (``client.job(id)``) are sent here
    # when they end; a restarted broker has forgotten who listened.
    return [
        Query(new_msgid(), "outcomes", {"ids": job_ids[i : i + RESYNC_BATCH], "listen": True})
        for i in range(0, len(job_ids), RESYNC_BATCH)
    ]


def apply_outcomes(pending: dict[str, Any], answer: Any) -> int:
    """Settle the jobs an ``outcomes`` answer reports finished; return how many."""
    settled = 0
    if not isinstance(answer, dict):
        return 0
    for job_id, outcome in (answer.get("finished") or {}).items():
        job = pending.pop(job_id, None)
        if job is None or not isinstance(outcome, dict):
            continue
        err = outcome.get("error")
        if isinstance(err, dict):
            job._settle(
                "failed",
                JobFailed.from_error(
                    str(err.get("type", "Error")),
                    str(err.get("message", "")),
                    str(err.get("traceback", "")),
                    job_id,
                ),
            )
        else:
            job._settle("value", outcome.get("value"))
        settled += 1
    for job_id in answer.get("unknown") or ():
        job = pending.pop(job_id, None)
        if job is not None:
            job._settle(
                "failed",
                JobFailed.from_error(
                    "NotFound", f"the broker has no record of job {job_id} (purged?)", "", job_id
                ),
            )
            settled += 1
    return settled
