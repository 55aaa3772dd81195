"""The relay's error tree and the SMTP replies that errors carry.

Every error a peer can cause carries the reply the application should get
(h11's ``error_status_hint`` is the precedent), so the shell never invents a
reply code. This module holds values only: no I/O, no logging.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: basic code, enhanced status code (RFC 3463) and text."""

    code: int
    enhanced: str
    text: str

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced} {self.text}"


class RelayError(Exception):
    """Base of every error the relay raises on purpose."""


class ConfigError(RelayError):
    """Bad configuration: stops the start with one line naming the key."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


class Rejected(RelayError):
    """The message (or one envelope address) is refused; ``reply`` says how.

    ``reason`` is for the operator and for ``solo-relay preview``: it may name
    a header but never an address, so it is safe to log.
    """

    reply: Reply
    reason: str

    def __init__(self, reply: Reply, reason: str) -> None:
        super().__init__(f"{reply}: {reason}")
        self.reply = reply
        self.reason = reason


class BadData(Rejected):
    """Bare CR, bare LF or NUL in the message data (SPEC 4): 550 5.5.2."""

    def __init__(self, reason: str) -> None:
        super().__init__(Reply(550, "5.5.2", "Bare CR, LF or NUL in message data"), reason)


class HeaderDefect(Rejected):
    """A malformed header section: 554 5.6.0; the relay never guesses."""

    def __init__(self, reason: str) -> None:
        super().__init__(Reply(554, "5.6.0", "Malformed header section"), reason)


class TooManyHops(Rejected):
    """More ``Received:`` fields than the hop limit (RFC 5321 6.3): 554 5.4.0."""

    def __init__(self, reason: str) -> None:
        super().__init__(Reply(554, "5.4.0", "Too many hops"), reason)


class TooBig(Rejected):
    """More than the relay will take: 552 5.3.4 (RFC 3463: message too big for system)."""

    def __init__(self, reason: str) -> None:
        super().__init__(Reply(552, "5.3.4", "Message too big for this many recipients"), reason)


class BadAddress(Rejected):
    """An envelope address the relay will not carry: 553 5.1.3 (or 5.6.7)."""

    def __init__(
        self, reason: str, *, needs_smtputf8: bool = False, text: str = "Bad address syntax"
    ) -> None:
        if needs_smtputf8:
            reply = Reply(553, "5.6.7", "Non-ASCII address requires SMTPUTF8")
        else:
            reply = Reply(553, "5.1.3", text)
        super().__init__(reply, reason)


class DkimRejected(Rejected):
    """``dkim.action = reject``: an application signature covers a header the relay changes."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            Reply(
                550, "5.7.0", "DKIM signature covers headers the relay must change; sign after it"
            ),
            reason,
        )


class LeakDetected(Rejected):
    """A copy would disclose another recipient (SPEC 1, rule 1): 550 5.7.1."""

    def __init__(self, reason: str) -> None:
        super().__init__(
            Reply(550, "5.7.1", "Message would disclose other recipients; nothing was sent"),
            reason,
        )
