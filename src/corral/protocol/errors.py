"""The one exception protocol parsing raises."""

from __future__ import annotations


class ProtocolError(Exception):
    """A message that is not valid eMQP.

    ``reason`` is a short, stable code (used as a counter key and in the
    ERROR reply); ``detail`` is for people.
    """

    def __init__(self, reason: str, detail: str = "", msgid: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail
        #: The offending message's id, when it could be read.
        self.msgid = msgid
