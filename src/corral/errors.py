"""Exceptions shared across corral.

The class name of each is what travels on the wire as a job outcome's
``error.type`` (e.g. ``{"error": {"type": "TimeLimitExceeded", ...}}``), so
renaming one is a protocol change.
"""

from __future__ import annotations


class CorralError(Exception):
    """Base class of every error corral itself raises."""


class NotAllowed(CorralError):
    """A job named code that this worker's allowlist does not permit."""


class NotFound(CorralError, LookupError):
    """A job named a module or attribute that does not exist."""


class BadRequest(CorralError, ValueError):
    """A job's parameters are malformed (wrong types, bad names)."""


class TimeLimitExceeded(CorralError):
    """A job ran past its hard time limit and its process was killed."""


class WorkerLost(CorralError):
    """The process running a job died before reporting an outcome."""


class JobCancelled(CorralError):
    """A job was cancelled; if it was running, its process was killed."""


class DependencyFailed(CorralError):
    """A job submitted with ``after=`` cannot run: a job it waits for failed or was cancelled."""


class SerializationError(CorralError):
    """A value could not be encoded for the wire (e.g. not JSON-serializable)."""


# ---------------------------------------------------------------- client side
#
# These are raised by corral's client to the code that submitted a job; they
# never travel on the wire themselves.


class Rejected(CorralError):
    """The broker refused a submitted job with an ERROR (bad queue, bad body, ...).

    ``reason`` is the broker's short, stable code, ``detail`` its explanation
    for people and ``job_id`` the refused job's id.
    """

    def __init__(self, reason: str, detail: str = "", job_id: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        self.job_id = job_id

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.reason, self.detail, self.job_id))


class NotAcknowledged(CorralError):
    """The broker did not acknowledge a job within the client's ``ack_timeout``.

    The job may or may not have reached the broker: it may still run.
    """

    def __init__(self, job_id: str = "", timeout: float = 0.0) -> None:
        super().__init__(f"job {job_id} was not acknowledged by the broker within {timeout:g} s")
        self.job_id = job_id
        self.timeout = timeout

    def __reduce__(self) -> tuple[object, ...]:
        return (type(self), (self.job_id, self.timeout))


class ClientClosed(CorralError):
    """The client was closed (or forked away from) before the job's outcome arrived."""


class JobFailed(CorralError):
    """A job ran and raised: the remote exception's ``type``, ``message`` and ``traceback``.

    ``str()`` gives ``"type: message"``; the remote traceback is attached as a
    note, so it is printed under the local one. When ``type`` names one of
    corral's own errors (``TimeLimitExceeded``, ``WorkerLost``, ...) the raised
    object is also an instance of that class: use :meth:`from_error` to build one.
    """

    def __init__(self, type: str, message: str = "", traceback: str = "", job_id: str = "") -> None:
        super().__init__(f"{type}: {message}" if message else type)
        self.type = type
        self.message = message
        self.traceback = traceback
        self.job_id = job_id
        if traceback:
            self.add_note(f"Remote traceback (job {job_id}):\n{traceback.rstrip()}")

    @classmethod
    def from_error(
        cls, type: str, message: str = "", traceback: str = "", job_id: str = ""
    ) -> JobFailed:
        """Build the exception for a remote error, mixing in corral's class named ``type``."""
        return _remote_class(type)(type, message, traceback, job_id)

    def __reduce__(self) -> tuple[object, ...]:
        return (JobFailed.from_error, (self.type, self.message, self.traceback, self.job_id))


#: Remote error types that also raise as corral's own class of that name.
_WIRE_TYPES = (
    "NotAllowed",
    "NotFound",
    "BadRequest",
    "TimeLimitExceeded",
    "WorkerLost",
    "JobCancelled",
    "DependencyFailed",
    "SerializationError",
)
_remote_classes: dict[str, type[JobFailed]] = {}


def _remote_class(type_name: str) -> type[JobFailed]:
    if type_name not in _WIRE_TYPES:
        return JobFailed
    cls = _remote_classes.get(type_name)
    if cls is None:
        base = globals()[type_name]
        # A subclass of both, so `except JobFailed` and `except TimeLimitExceeded` both work.
        cls = type(
            type_name,
            (JobFailed, base),
            {"__module__": __name__, "__qualname__": f"JobFailed[{type_name}]"},
        )
        _remote_classes[type_name] = cls
    return cls
