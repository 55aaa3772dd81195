"""Frozen values that pass between the core and the shell.

Envelope and trace information go into the isolation core; a ``Plan`` of
``Copy`` values comes out. Nothing here does I/O or holds a socket.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from relay.core.addresses import Address, parse_address, parse_recipient
from relay.core.dkim import DkimAction, Signer

# SPEC 3: removed from every copy. Configuration may add names, never remove these.
REMOVED_HEADERS: frozenset[str] = frozenset(
    {
        "cc",
        "bcc",
        "resent-to",
        "resent-cc",
        "resent-bcc",
        "delivered-to",
        "x-original-to",
        "envelope-to",
        "x-envelope-to",
        "apparently-to",
        "x-apparently-to",
        "x-forwarded-to",
        "x-forwarded-for",
        "x-rcpt-to",
        "x-original-recipient",
        "x-real-to",
        "return-path",
        "content-length",
    }
)

MAX_HEADER_OCTETS = 1 << 20  # a concatenated To: for 10,000 customers must still parse
MAX_HOPS = 50  # SPEC 4; RFC 5321 6.3 suggests at least 100 for MTAs, 50 is Postfix's hopcount_limit
MIME_NESTING_LIMIT = 100  # Postfix's mime_nesting_limit
# Each copy carries its own header section (the body is shared): header bytes
# times copies is what one message costs in memory and spool.
MAX_FANOUT_OCTETS = 256 * 1024 * 1024


class BodyCheck(enum.Enum):
    """What another recipient's address in the body of a copy does (SPEC 3)."""

    OFF = "off"
    WARN = "warn"
    REJECT = "reject"


class ChangeKind(enum.Enum):
    REMOVED = "removed"
    REBUILT = "rebuilt"
    ADDED = "added"
    FOLDED = "folded"  # a kept field had a line over 998 octets (RFC 5322 2.1.1)
    DKIM_STRIPPED = "dkim-stripped"
    DKIM_KEPT = "dkim-kept"
    DKIM_SIGNED = "dkim-signed"


@dataclass(frozen=True, slots=True)
class Change:
    """One thing the relay did to a copy's header section, and why."""

    kind: ChangeKind
    header: str  # canonical field name, for example "Cc"
    reason: str


@dataclass(frozen=True, slots=True)
class IsolationOptions:
    """The isolation core's configuration (one slice of the relay's config)."""

    removed_headers: frozenset[str] = REMOVED_HEADERS
    body_check: BodyCheck = BodyCheck.WARN
    # Another recipient in the header section of an embedded message (a forwarded mail).
    embedded_check: BodyCheck = BodyCheck.REJECT
    normalize: bool = False
    max_header_octets: int = MAX_HEADER_OCTETS
    max_hops: int = MAX_HOPS
    mime_nesting_limit: int = MIME_NESTING_LIMIT
    max_fanout_octets: int = MAX_FANOUT_OCTETS
    dkim_action: DkimAction = DkimAction.STRIP
    signer: Signer | None = None  # the relay's key: for ``resign``, and for ``sign_all``
    sign_all: bool = False  # sign every copy, signed by the application or not
    # Envelope senders (``Address.key`` in lower case) whose copies keep To: and Cc: as written: the
    # team-thread opt-out of SPEC 3, from configuration only (relay.core.senders, Rule 3).
    keep_recipients_for: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        lowered = frozenset(name.lower() for name in self.removed_headers)
        # SPEC 3: never emptier than the built-in list, whatever the config says.
        object.__setattr__(self, "removed_headers", lowered | REMOVED_HEADERS)


@dataclass(frozen=True, slots=True)
class Envelope:
    """MAIL FROM (``None`` for ``<>``), the RCPT TO list as given, and SMTPUTF8."""

    sender: Address | None
    recipients: tuple[Address, ...]
    smtputf8: bool = False

    @classmethod
    def parse(
        cls,
        sender: str,
        recipients: Iterable[str],
        *,
        smtputf8: bool = False,
        local_domains: frozenset[str] = frozenset(),
    ) -> Envelope:
        """Validate every address as RCPT and MAIL would (``BadAddress`` on the first bad one)."""
        rcpts = tuple(
            parse_recipient(text, smtputf8=smtputf8, local_domains=local_domains)
            for text in recipients
        )
        mail_from = parse_address(sender, smtputf8=smtputf8, allow_null=True, single_label=True)
        return cls(mail_from, rcpts, smtputf8)


@dataclass(frozen=True, slots=True)
class Trace:
    """What the relay's own ``Received:`` line says (RFC 5321 4.4)."""

    by_host: str = "solo-relay.invalid"
    helo: str = "unknown"
    client_ip: str = "127.0.0.1"
    protocol: str = "ESMTP"
    queue_id: str = "preview"
    date: str = "Thu, 01 Jan 1970 00:00:00 +0000"


@dataclass(frozen=True, slots=True, repr=False)
class Copy:
    """One recipient's copy: its own header section, and the message's shared body.

    Its ``repr`` shows sizes only, so a copy that reaches a log names nobody.
    """

    recipient: Address
    headers: bytes  # the final header section, ending with the blank line
    body: memoryview  # the same object for every copy of a message
    changes: tuple[Change, ...]

    def __bytes__(self) -> bytes:
        return self.headers + bytes(self.body)

    @property
    def size(self) -> int:
        return len(self.headers) + len(self.body)

    def __repr__(self) -> str:
        sizes = f"headers={len(self.headers)}B body={len(self.body)}B"
        return f"<Copy {sizes} changes={len(self.changes)}>"


@dataclass(frozen=True, slots=True)
class Plan:
    """The copies of one message, after the leak guard passed them."""

    copies: tuple[Copy, ...]
    merged_duplicates: int = 0
    warnings: tuple[str, ...] = field(default=())
    # The team-thread opt-out made these copies: To: and Cc: kept (relay.core.teamthread).
    kept_recipients: bool = False


class Status(enum.Enum):
    """What happened to one copy at the upstream (SPEC 5: transient retries, permanent bounces)."""

    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


class Stage(enum.Enum):
    """Where in the upstream transaction an outcome was decided (a metric label)."""

    CONNECT = "connect"
    TLS = "tls"
    AUTH = "auth"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    DOT = "dot"  # the reply after the final dot
    WRITE = "write"  # the outbox upstream's file write


@dataclass(frozen=True, slots=True)
class Outcome:
    """The upstream's answer for one copy, already classified.

    ``text`` is the upstream's own reply text: it may name the recipient, so it
    is never logged by default nor used as a metric label.
    """

    status: Status
    stage: Stage
    code: int = 0  # 0: no reply at all (connection error, timeout)
    enhanced: str = ""
    text: str = ""
    ambiguous: bool = False  # no reply after the final dot: the copy may have arrived
    auth_failed: bool = False  # the upstream refused our credentials (535)

    @property
    def reply_class(self) -> str:
        return f"{self.code // 100}xx" if self.code else "none"


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and secret for upstream AUTH; the secret never shows in a repr."""

    username: str
    password: str = field(repr=False)
