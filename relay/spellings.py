"""Every address a piece of text spells, in any of the ways mail spells one.

Rule 1: a spelling is found raw, after RFC 2047 decoding, after percent
decoding (up to three rounds: ``%2540`` is ``%40`` is ``@``), in URL and
template syntax (``?who=bob@x``), and in VERP form (``bounce+bob=x@list``);
case never matters and a domain matches in U-label and A-label form alike.
Rule 2: an address is the longest run of local-part characters before its
``@``: ``sal@x`` never reads as ``al@x`` and ``x.bob@x`` never as ``bob@x``
(both may be customers); ``.bob@x`` does read as ``bob@x``.
Rule 3: the scan is linear in the text: it jumps from one ``@`` (or ``=``)
to the next and walks back at most ``MAX_RUN`` characters, so no input, not
even a megabyte of ``a``, makes it slow; no view of a large text is made
unless the text holds a marker for it.

Used by the leak guard (``guard``); returns comparison keys, never prints them.
"""

from __future__ import annotations

import email.errors
import email.header
import re
import urllib.parse
from collections.abc import Iterator

from relay.addresses import Address, domain_key

MAX_RUN = 256  # a local part is at most 64 octets (RFC 5321 4.5.3.1.1); a longer run is no address
MAX_DOMAIN = 300  # a domain is at most 255 octets (RFC 5321 4.5.3.1.2)
_MAX_UNQUOTE_ROUNDS = 3

# RFC 5322 atext and the dot; any non-ASCII character counts too (RFC 6531).
_LOCAL = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-."
)
# VERP local parts end at "+", "=" and "&": "unsub+bob=example.com" spells bob.
_VERP_LOCAL = _LOCAL - frozenset("+=&")
# Atext that in practice ends a URL or template part before an address. "-",
# "+" and "." are not among them (rule 2).
_URL_BREAKS = frozenset("?=/&#'`{}|")
_DOMAIN_RUN = re.compile(rf"[A-Za-z0-9\-.\u0080-\U0010ffff]{{1,{MAX_DOMAIN}}}")
_VERP_AT = re.compile(r"=(?=[A-Za-z0-9\-\u0080-\U0010ffff]+\.[A-Za-z0-9\u0080-\U0010ffff])")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[QqBb]\?[^?\s]*\?=")
_BETWEEN_WORDS = re.compile(r"(?<=\?=)[ \t]+(?==\?)")


def key(local: str, domain: str) -> str:
    """The comparison form: local part case-folded and unquoted, domain as lower-case A-label."""
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    local = local.strip(".")
    domain = domain.strip(".-")
    return f"{local.lower()}@{domain_key(domain)}" if local and domain else ""


def address_key(address: Address) -> str:
    return key(address.local, address.domain)


def addresses_in(text: str) -> set[str]:
    """Every address key ``text`` spells, in any of its views (rule 1)."""
    found: set[str] = set()
    for view in _views(text):
        if "@" in view:
            found.update(_at_forms(view))
        if "=" in view:
            found.update(_verp_forms(view))
    found.discard("")
    return found


def _views(text: str) -> Iterator[str]:
    yield text
    decoded = _decode_words(text) if "=?" in text else text
    if decoded is not text:
        yield decoded
    for view in {text, decoded}:
        current = view
        for _ in range(_MAX_UNQUOTE_ROUNDS):
            if not _PERCENT.search(current):
                break
            current = urllib.parse.unquote(current)
            yield current


def _is_local(c: str, chars: frozenset[str]) -> bool:
    return c in chars or c >= "\x80"


def _run_before(text: str, at: int, floor: int, chars: frozenset[str]) -> str:
    """The run of ``chars`` that ends at ``at``, going back no further than ``floor``."""
    start = at
    limit = max(floor, at - MAX_RUN)
    while start > limit and _is_local(text[start - 1], chars):
        start -= 1
    return text[start:at]


def _at_forms(text: str) -> Iterator[str]:
    floor = 0
    at = text.find("@")
    while at >= 0:
        domain = _DOMAIN_RUN.match(text, at + 1)
        if domain is not None:
            if text[at - 1 : at] == '"':
                opening = text.rfind('"', max(floor, at - MAX_RUN), at - 1)
                local = text[opening:at] if opening >= 0 else ""
            else:
                local = _run_before(text, at, floor, _LOCAL)
            yield key(local, domain.group())
            for i, c in enumerate(local):
                if c in _URL_BREAKS:
                    yield key(local[i + 1 :], domain.group())
            floor = domain.end()
        at = text.find("@", at + 1)


def _verp_forms(text: str) -> Iterator[str]:
    floor = 0
    for m in _VERP_AT.finditer(text):
        at = m.start()
        domain = _DOMAIN_RUN.match(text, at + 1)
        if domain is None or at < floor:
            continue
        local = _run_before(text, at, floor, _VERP_LOCAL)
        yield key(local, domain.group())
        for i, c in enumerate(local):  # "bounces-bob=example.com": bob after the separator
            if c in "-.":
                yield key(local[i + 1 :], domain.group())
        floor = domain.end()


def _decode_words(text: str) -> str:
    """RFC 2047 decoding of each encoded word in place; the text around them is untouched.

    Whitespace between two encoded words is dropped (RFC 2047 6.2), so a name
    split across words reads whole; an undecodable word stays as it was.
    """
    return _ENCODED_WORD.sub(_decode_word, _BETWEEN_WORDS.sub("", text))


def _decode_word(match: re.Match[str]) -> str:
    try:
        ((chunk, charset),) = email.header.decode_header(match.group())
    except (email.errors.HeaderParseError, ValueError):
        return match.group()
    if not isinstance(chunk, bytes):
        return match.group()
    try:
        return chunk.decode(str(charset or "ascii"), "replace")
    except LookupError:
        return chunk.decode("latin-1")
