"""Live job streams: typed messages, the broker's sans-IO hub and the line protocol.

A job publishes progress, log lines and partial results (see
:mod:`corral.runtime`); any number of listeners attach with
``client.stream(job_id)`` or over the TCP line protocol and receive the
stream's header first, then every later item in order.
"""

from corral.streams.messages import Close, Gap, Header, Log, Message, Partial, Progress

__all__ = ["Close", "Gap", "Header", "Log", "Message", "Partial", "Progress"]
