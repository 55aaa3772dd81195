"""Sender policy (SPEC 3): who may send as whom, and who keeps a visible recipient list.

Rule 1: off unless configured. With ``[senders] allow`` or ``by_user`` set, an
envelope sender (MAIL FROM) must match one of the session's patterns, and
every mailbox of the message's ``From:`` must be at one of their domains;
otherwise ``550 5.7.1``. The session's patterns are its AUTH user's
``by_user`` entry when it has one, else ``allow``; a session with neither is
refused (fail closed), like Postfix's ``reject_sender_login_mismatch`` with
``smtpd_sender_login_maps`` and decke/smtprelay's ``allowed_sender``.
Rule 2: a pattern is a whole address (``billing@example.com``, in any case,
the domain in either IDNA form), a domain (``@example.com``: any
address at it), or ``<>`` for the null sender. A whole address also allows
its domain in ``From:``.
Rule 3: the opt-out from isolation (``keep_recipients``) names envelope
senders, whole addresses only, and nothing else turns it on: no header, no
parameter, nothing the application sends but the MAIL FROM itself, which
Rule 1 can tie to an AUTH user.

Pure: no I/O. Raises ``ValueError`` for a malformed entry (``relay.config``
turns it into ``ConfigError``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from relay.core.addresses import domain_key
from relay.core.errors import Reply

NULL_SENDER = "<>"
SENDER_REFUSED = Reply(550, "5.7.1", "Sender address not allowed for this client")
FROM_REFUSED = Reply(550, "5.7.1", "From: address not allowed for this client")


@dataclass(frozen=True, slots=True)
class Patterns:
    """One allow-list: whole addresses (by key), domains (A-label, lower case), null sender."""

    addresses: frozenset[str] = frozenset()
    domains: frozenset[str] = frozenset()
    null: bool = False

    def sender(self, address: str) -> bool:
        """Whether MAIL FROM ``address`` ("" or "<>" for the null sender) matches."""
        if address in ("", NULL_SENDER):
            return self.null
        key = address_key(address)
        return key is not None and (key in self.addresses or key.rpartition("@")[2] in self.domains)

    def from_domain(self, address: str) -> bool:
        """Whether a ``From:`` mailbox is at an allowed domain (of a domain or an address)."""
        key = address_key(address)
        if key is None:
            return False
        domain = key.rpartition("@")[2]
        return domain in self.domains or any(a.rpartition("@")[2] == domain for a in self.addresses)


@dataclass(frozen=True, slots=True)
class SenderPolicy:
    """The allow-lists of one deployment (Rule 1) and the opted-out senders (Rule 3)."""

    allow: Patterns | None = None  # None: no global list
    by_user: Mapping[str, Patterns] = field(default_factory=dict)
    keep_recipients: frozenset[str] = frozenset()  # address keys

    @property
    def on(self) -> bool:
        return self.allow is not None or bool(self.by_user)

    def patterns(self, user: str) -> Patterns:
        """The list that applies to a session of AUTH ``user`` ("" when not authenticated)."""
        if user and user in self.by_user:
            return self.by_user[user]
        return self.allow or Patterns()

    def check_sender(self, user: str, address: str) -> Reply | None:
        """None when ``user`` may use MAIL FROM ``address``, else the refusal."""
        if not self.on or self.patterns(user).sender(address):
            return None
        return SENDER_REFUSED

    def check_from(self, user: str, mailboxes: Sequence[str]) -> Reply | None:
        """None when every ``From:`` mailbox is at an allowed domain (and there is one)."""
        if not self.on:
            return None
        patterns = self.patterns(user)
        if mailboxes and all(patterns.from_domain(m) for m in mailboxes):
            return None
        return FROM_REFUSED

    def keeps_recipients(self, address: str) -> bool:
        """Whether mail from envelope sender ``address`` keeps its visible recipient list."""
        key = address_key(address) if address not in ("", NULL_SENDER) else None
        return key is not None and key in self.keep_recipients


def address_key(address: str) -> str | None:
    """``Address.key`` in lower case (the domain as its A-label); None if no "@".

    Lower case throughout, as Postfix's sender maps look addresses up: an
    allow-list that refused ``Billing@`` for ``billing@`` would only surprise.
    """
    text = address.strip().removeprefix("<").removesuffix(">")
    local, at, domain = text.rpartition("@")
    if not at or not local or not domain:
        return None
    return f"{local}@{domain_key(domain)}".lower()


def parse_patterns(entries: Iterable[str]) -> Patterns:
    """``allow`` entries as patterns (Rule 2); ``ValueError`` naming a malformed one."""
    addresses, domains, null = set(), set(), False
    for entry in entries:
        text = entry.strip()
        if text == NULL_SENDER:
            null = True
        elif text.startswith("@") and len(text) > 1 and "@" not in text[1:]:
            domains.add(domain_key(text[1:]))
        else:
            key = address_key(text)
            if key is None or " " in text:
                raise ValueError(f"{entry!r} is not an address, @domain or <>")
            addresses.add(key)
    return Patterns(frozenset(addresses), frozenset(domains), null)


def parse_policy(
    allow: Sequence[str], by_user: Sequence[str], keep_recipients: Sequence[str] = ()
) -> SenderPolicy:
    """The ``[senders]`` table as a policy. ``ValueError`` names the entry at fault.

    ``by_user`` entries are ``USER: PATTERN PATTERN ...`` (patterns separated by
    spaces, so a list survives a comma-separated ``RELAY_SENDERS_BY_USER``).
    """
    users: dict[str, Patterns] = {}
    for entry in by_user:
        user, sep, rest = entry.partition(":")
        if not sep or not user.strip() or not rest.split():
            raise ValueError(f"{entry!r} is not 'USER: PATTERN ...'")
        if user.strip() in users:
            raise ValueError(f"user {user.strip()!r} is listed twice")
        users[user.strip()] = parse_patterns(rest.split())
    kept = set()
    for entry in keep_recipients:
        key = address_key(entry)
        if key is None or entry.strip().startswith("@"):
            raise ValueError(f"{entry!r} is not an address (a named sender, not a domain)")
        kept.add(key)
    return SenderPolicy(parse_patterns(allow) if allow else None, users, frozenset(kept))
