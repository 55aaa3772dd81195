"""Envelope addresses: strict validation and the key that merges duplicates.

Rule 1: what is accepted is exactly what is sent upstream; the key is used
only to compare (RFC 5321 2.4: the local part is case-sensitive, the domain
is not).
Rule 2: anything the rules below do not name as valid is refused; the relay
never repairs an address.

Refused (SPEC 4): control characters, quoted local parts holding
``@ , < > " \\``, source routes, address literals, comments, a local part over
64 octets (RFC 5321 4.5.3.1.1), a domain over 255 octets, and non-ASCII
without SMTPUTF8 (RFC 6531).
Rule 3: a single-label domain (``root@localhost``, the default of cron,
msmtp and swaks) is accepted for the sender, whose provider decides about
it, and refused for a recipient, with a reply that says the domain must be
fully qualified, unless the deployment names it as a local domain.
Pure: no I/O.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import idna

from relay.core.errors import BadAddress

MAX_LOCAL_OCTETS = 64  # RFC 5321 4.5.3.1.1
MAX_DOMAIN_OCTETS = 255  # RFC 5321 4.5.3.1.2
MAX_LABEL_OCTETS = 63  # RFC 1035 2.3.4

# RFC 5322 atext, extended with any non-ASCII character (RFC 6531 3.3); the
# non-ASCII part is allowed only when the session negotiated SMTPUTF8.
_ATEXT = r"A-Za-z0-9!#$%&'*+/=?^_`{|}~\-\u0080-\U0010ffff"
_DOT_ATOM = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
# A quoted local part: printable characters and space, minus the ones SPEC 4
# refuses outright (they only ever serve to smuggle a second address).
_QUOTED = re.compile(r'"[^"\\@,<>\x00-\x1f\x7f]*"')
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True, slots=True)
class Address:
    """A validated envelope address; ``text`` is the form that was accepted."""

    local: str
    domain: str

    @property
    def text(self) -> str:
        return f"{self.local}@{self.domain}"

    @property
    def key(self) -> str:
        """Duplicates share a key: local part exact, domain as lower-case A-label."""
        return f"{self.local}@{domain_key(self.domain)}"


@functools.lru_cache(maxsize=65536)
def domain_key(domain: str) -> str:
    """The lower-case A-label form of ``domain``; the lower-case input if not IDNA-valid."""
    lowered = domain.lower().rstrip(".")
    if lowered.isascii() and "xn--" not in lowered:
        return lowered
    try:
        return idna.encode(lowered, uts46=True).decode("ascii")
    except idna.IDNAError:
        return lowered


def parse_address(
    text: str, *, smtputf8: bool, allow_null: bool = False, single_label: bool = False
) -> Address | None:
    """Validate an envelope address given without its angle brackets.

    Returns ``None`` for the null path ``<>`` when ``allow_null`` (MAIL FROM).
    ``single_label`` accepts a domain of one label (rule 3: the sender, and a
    recipient already judged by ``parse_recipient``). Raises ``BadAddress`` for
    anything else SPEC 4 refuses.
    """
    if text == "":
        if allow_null:
            return None
        raise BadAddress("empty address")
    if _CONTROL.search(text):
        raise BadAddress("control character in address")
    if not text.isascii() and not smtputf8:
        raise BadAddress("non-ASCII address without SMTPUTF8", needs_smtputf8=True)
    if text.startswith("@"):
        raise BadAddress("source route")
    at = text.rfind("@")
    if at <= 0:
        raise BadAddress("no domain")
    local, domain = text[:at], text[at + 1 :]
    _check_local(local)
    _check_domain(domain, single_label=single_label)
    return Address(local, domain)


def parse_recipient(text: str, *, smtputf8: bool, local_domains: frozenset[str]) -> Address:
    """Validate a RCPT TO address: ``parse_address``, and rule 3 for its domain.

    ``local_domains`` are the single-label domains (lower case) the deployment
    accepts for recipients. Raises ``BadAddress``.
    """
    address = parse_address(text, smtputf8=smtputf8, single_label=True)
    if address is None:  # pragma: no cover - not allow_null: "" is refused above
        raise BadAddress("empty address")
    if "." not in address.domain.rstrip(".") and address.domain.lower() not in local_domains:
        raise BadAddress("single-label recipient domain", text=UNQUALIFIED_TEXT)
    return address


UNQUALIFIED_TEXT = (
    "Recipient domain must be fully qualified (user@example.com); "
    "single-label domains need smtp.local_domains"
)


def _check_local(local: str) -> None:
    if len(local.encode("utf-8")) > MAX_LOCAL_OCTETS:
        raise BadAddress("local part over 64 octets")
    if local.startswith('"'):
        if not _QUOTED.fullmatch(local):
            raise BadAddress("quoted local part with a forbidden character")
        return
    if not _DOT_ATOM.fullmatch(local):
        raise BadAddress("local part is not a dot-atom")


def _check_domain(domain: str, *, single_label: bool) -> None:
    if domain.startswith("["):
        raise BadAddress("address literal")
    if len(domain.encode("utf-8")) > MAX_DOMAIN_OCTETS:
        raise BadAddress("domain over 255 octets")
    if domain.isascii():
        labels = domain.split(".")
        if len(labels) < (1 if single_label else 2) or not all(
            len(label) <= MAX_LABEL_OCTETS and _LDH_LABEL.fullmatch(label) for label in labels
        ):
            raise BadAddress("domain is not a host name")
        if "xn--" in domain.lower():
            try:
                idna.decode(domain)
            except idna.IDNAError as exc:
                raise BadAddress("invalid A-label in domain") from exc
        return
    try:
        ascii_form = idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError as exc:
        raise BadAddress("invalid internationalised domain") from exc
    if "." not in ascii_form and not single_label:
        raise BadAddress("domain is not a host name")
