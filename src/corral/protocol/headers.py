"""REQUEST / SCHEDULE headers: comma-separated tokens, parsed as tokens.

EventMQ matched headers by substring (so ``retry-count:3`` also "contained"
``retry``); here every token is split on ``,`` and on its first ``:`` and
checked against the known names, and unknown tokens are kept so that a
message forwarded through the broker keeps what its sender put in it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from corral.protocol.errors import ProtocolError

_FLAGS = {"reply-requested", "guarantee", "nohaste"}
_INTS = {"retry-count", "run_count"}
_NUMBERS = {"timeout"}


@dataclass(frozen=True, slots=True)
class Headers:
    reply_requested: bool = False
    guarantee: bool = False
    nohaste: bool = False
    retry_count: int = 0
    #: Seconds; 0 means no limit (EventMQ's meaning of ``timeout:0``).
    timeout: float = 0.0
    #: ``None`` for "forever" (EventMQ's ``-1``).
    run_count: int | None = None
    #: Tokens this version does not interpret, kept in order.
    extra: tuple[str, ...] = field(default_factory=tuple)

    def get(self, name: str) -> str | None:
        """Value of an unknown ``name:value`` token, or ``""`` for a bare flag."""
        for token in self.extra:
            key, sep, value = token.partition(":")
            if key == name:
                return value if sep else ""
        return None

    def get_all(self, name: str) -> list[str]:
        """Values of every ``name:value`` token, in order (e.g. the ids of ``after:ID``)."""
        values = []
        for token in self.extra:
            key, sep, value = token.partition(":")
            if key == name and sep:
                values.append(value)
        return values

    def encode(self) -> str:
        tokens: list[str] = []
        if self.reply_requested:
            tokens.append("reply-requested")
        if self.guarantee:
            tokens.append("guarantee")
        if self.nohaste:
            tokens.append("nohaste")
        if self.retry_count:
            tokens.append(f"retry-count:{self.retry_count}")
        if self.timeout:
            t = self.timeout
            tokens.append(f"timeout:{int(t) if t == int(t) else t}")
        if self.run_count is not None:
            tokens.append(f"run_count:{self.run_count}")
        tokens.extend(self.extra)
        return ",".join(tokens)


EMPTY = Headers()


def parse_headers(text: str) -> Headers:
    """Parse a header frame; raise :class:`ProtocolError` on a malformed token."""
    if not text:
        return EMPTY
    values: dict[str, object] = {}
    extra: list[str] = []
    for raw in text.split(","):
        token = raw.strip()
        if not token:
            continue
        name, sep, value = token.partition(":")
        if name in _FLAGS:
            if sep:
                raise ProtocolError("bad-header", f"header {name!r} takes no value")
            values[name.replace("-", "_")] = True
        elif name in _INTS:
            try:
                number = int(value)
            except ValueError:
                raise ProtocolError(
                    "bad-header", f"header {name!r} needs an integer, got {value!r}"
                ) from None
            if name == "retry-count":
                if number < 0:
                    raise ProtocolError("bad-header", "retry-count must be >= 0")
                values["retry_count"] = number
            else:
                if number == 0 or number < -1:
                    raise ProtocolError("bad-header", "run_count must be -1 or > 0")
                values["run_count"] = None if number == -1 else number
        elif name in _NUMBERS:
            try:
                seconds = float(value)
            except ValueError:
                raise ProtocolError(
                    "bad-header", f"header {name!r} needs a number, got {value!r}"
                ) from None
            if not (0 <= seconds < float("inf")):
                raise ProtocolError("bad-header", "timeout must be a finite number >= 0")
            values["timeout"] = seconds
        else:
            extra.append(token)
    return Headers(extra=tuple(extra), **values)  # type: ignore[arg-type]
