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

# RFC 5322 atext and the dot; a non-ASCII letter or digit counts too (RFC 6531), but
# not non-ASCII punctuation, symbols or spaces: "“bob@x”" and "«bob@x»" are bob@x.
_LOCAL = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+/=?^_`{|}~-."
)
# VERP local parts end at "=" and "&": "unsub-bob+news=example.com" spells bob+news.
_VERP_LOCAL = _LOCAL - frozenset("=&")
# Atext that in practice ends a URL, template or markup part before an address.
# "-", "+", "_" and "." are not among them (rule 2).
_URL_BREAKS = frozenset("?=/&#'`{}|*!^~$")
_VERP_BREAKS = frozenset("-.+")
_DOMAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")
# UTS 46 maps these to ".": "bob@example。org" is bob@example.org.
_IDEOGRAPHIC_DOTS = {"\u3002": ".", "\uff0e": ".", "\uff61": "."}
# Invisible format characters (zero-width space, joiners, BOM) vanish on screen.
_INVISIBLE = re.compile(r"[\u00ad\u200b-\u200f\u2060-\u2064\ufeff]")
# Comments and folding whitespace around "@" and "." are allowed inside an address
# (RFC 5322 3.4.1): "bob (sales) @ example.org" is bob@example.org.
_COMMENT = re.compile(r"\([^()]*\)")
_SPACE_AROUND = re.compile(r"\s*([@.])\s*")
_VERP_AT = re.compile(r"=(?=[^\s=@]+\.[^\s=@])")
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


def addresses_in(text: str, *, comments: bool = True) -> set[str]:
    """Every address key ``text`` spells, in any of its views (rule 1)."""
    found: set[str] = set()
    for view in _views(text, comments=comments):
        if "@" in view:
            found.update(_at_forms(view))
        if "=" in view:
            found.update(_verp_forms(view))
    found.discard("")
    return found


def _views(text: str, *, comments: bool) -> Iterator[str]:
    seen = {text}
    yield text
    decoded = _decode_words(text) if "=?" in text else text
    if decoded not in seen:
        seen.add(decoded)
        yield decoded
    for view in (text, decoded):
        current = view
        for _ in range(_MAX_UNQUOTE_ROUNDS):
            if not _PERCENT.search(current):
                break
            current = urllib.parse.unquote(current)
            if current not in seen:
                seen.add(current)
                yield current
    for view in list(seen):
        # What a reader sees: no invisible characters, no comments or spaces in an address.
        invisible = not view.isascii() and _INVISIBLE.search(view) is not None
        plain = _INVISIBLE.sub("", view) if invisible else view
        for _ in range(3 if comments else 0):  # comments nest; three levels is plenty
            if "(" not in plain:
                break
            plain = _COMMENT.sub("", plain)
        if _spaced_at(plain):
            plain = _SPACE_AROUND.sub(_mark_only, plain)
        if plain not in seen:
            seen.add(plain)
            yield plain


def _spaced_at(text: str) -> bool:
    """Whether some "@" has white space beside it (checked at each "@", not by a scan)."""
    at = text.find("@")
    while at >= 0:
        if (at > 0 and text[at - 1].isspace()) or text[at + 1 : at + 2].isspace():
            return True
        at = text.find("@", at + 1)
    return False


def _mark_only(match: re.Match[str]) -> str:
    return match.group(1)


def _is_local(c: str, chars: frozenset[str]) -> bool:
    return c in chars or (c >= "\x80" and c.isalnum())


def _run_before(text: str, at: int, floor: int, chars: frozenset[str]) -> str:
    """The run of ``chars`` that ends at ``at``, going back no further than ``floor``."""
    start = at
    limit = max(floor, at - MAX_RUN)
    while start > limit and _is_local(text[start - 1], chars):
        start -= 1
    return text[start:at]


def _domain_after(text: str, start: int) -> tuple[str, int]:
    """The domain that starts at ``start`` (ideographic dots read as dots), and its end."""
    end = start
    limit = min(len(text), start + MAX_DOMAIN)
    while end < limit:
        c = text[end]
        if not (c in _DOMAIN or c in _IDEOGRAPHIC_DOTS or (c >= "\x80" and c.isalnum())):
            break
        end += 1
    domain = text[start:end]
    for dot, ascii_dot in _IDEOGRAPHIC_DOTS.items():
        domain = domain.replace(dot, ascii_dot)
    return domain, end


def _at_forms(text: str) -> Iterator[str]:
    floor = 0
    at = text.find("@")
    while at >= 0:
        domain, end = _domain_after(text, at + 1)
        if domain:
            if text[at - 1 : at] == '"':
                opening = text.rfind('"', max(floor, at - MAX_RUN), at - 1)
                local = text[opening:at] if opening >= 0 else ""
            else:
                local = _run_before(text, at, floor, _LOCAL)
            yield key(local, domain)
            for i, c in enumerate(local):
                if c in _URL_BREAKS:
                    yield key(local[i + 1 :], domain)
            floor = end
        at = text.find("@", at + 1)


def _verp_forms(text: str) -> Iterator[str]:
    floor = 0
    for m in _VERP_AT.finditer(text):
        at = m.start()
        if at < floor:
            continue
        domain, end = _domain_after(text, at + 1)
        if "." not in domain.strip("."):
            continue
        local = _run_before(text, at, floor, _VERP_LOCAL)
        yield key(local, domain)
        for i, c in enumerate(local):  # "bounces-bob=example.com": bob after the separator
            if c in _VERP_BREAKS or c in _URL_BREAKS:
                yield key(local[i + 1 :], domain)
        floor = end


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
    except (LookupError, UnicodeError, ValueError):  # unknown charsets, and "idna" raises
        return chunk.decode("latin-1")
