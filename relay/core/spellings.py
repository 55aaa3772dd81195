"""Every address a piece of text spells, in any of the ways mail spells one.

Rule 1: a spelling is found raw, after RFC 2047 decoding, after percent
decoding (up to three rounds: ``%2540`` is ``%40`` is ``@``), in URL and
template syntax (``?who=bob@x``), and in VERP form (``bounce+bob=x@list``);
in a header field also unfolded wherever a fold falls (inside an address
too), with RFC 2231 parameters reassembled and decoded, with the blanks of
an RFC 2369 URL list (``<mailto:bob@exa mple.org>``) removed, and with HTML
entities decoded; in any text NFC- and NFKC-normalised with every
Default_Ignorable_Code_Point removed (from the Unicode data, via ``regex``);
case never matters and a domain matches in every UTS 46 form (U-label,
A-label, fullwidth, decomposed) alike.
Rule 2: an address is the longest run of local-part characters before its
``@``: ``sal@x`` never reads as ``al@x`` and ``x.bob@x`` never as ``bob@x``
(both may be customers); ``.bob@x`` does read as ``bob@x``.
Rule 3: the scan is linear in the text: it jumps from one ``@`` (or ``=``)
to the next and walks back at most ``MAX_RUN`` characters, so no input, not
even a megabyte of ``a``, makes it slow; no view of a large text is made
unless the text holds a marker for it.
Rule 4: each spelling found is tied to the whole address it was read from
(its *primary*): ``o'brien@x`` also reads as ``brien@x`` (a URL break), and
the guard must know that such a reading came from inside another address,
so that a copy's own address never hides a different one that is its tail.

Used by the leak guard (``guard``); returns comparison keys, never prints them.
"""

from __future__ import annotations

import email.errors
import email.header
import html
import re
import unicodedata
import urllib.parse
from collections.abc import Iterator

import regex

from relay.core.addresses import Address, domain_key

# What a spelling was read from: each key, and the whole addresses it was read in (rule 4).
Spellings = dict[str, set[str]]

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
_VERP_TAIL_BREAKS = _VERP_BREAKS | _URL_BREAKS
_DOMAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-.")
# The same sets as strings, for str.rstrip and a regular expression (ASCII text).
_ASCII_RUNS = {chars: "".join(sorted(chars)) for chars in (_LOCAL, _VERP_LOCAL)}
_ASCII_DOMAIN = re.compile(r"[A-Za-z0-9.\-]*")
# UTS 46 maps these to ".": "bob@example。org" is bob@example.org.
_IDEOGRAPHIC_DOTS = {"\u3002": ".", "\uff0e": ".", "\uff61": "."}
# Characters that render as nothing (zero-width ones, joiners, variation selectors, bidi
# controls, tags, the soft hyphen, fillers): Unicode's own list, not a hand-picked one.
_INVISIBLE = regex.compile(r"\p{Default_Ignorable_Code_Point}+")
# A header's fold: CRLF and the blank after it. Unfolding (RFC 5322 2.2.3) keeps the
# blank; a fold placed inside an address ("bob@exa<CRLF> mple.org") is read without it.
_FOLD = re.compile(r"\r\n[ \t]+")
# What a word beside a fold must hold to spell an address in some view: "@", or the
# "%40", "=" (VERP, RFC 2047) or "&#64;" forms of it, or their fullwidth forms (NFKC).
_ADDRESS_MARKS = ("@", "%", "=", "&", "\uff20", "\ufe6b", "\uff05", "\uff1d", "\uff06")
# RFC 2369 2: whitespace inside the angle brackets of a URL list is to be ignored.
_BRACKETED = re.compile(r"<[^<>]*>")
_BLANKS = re.compile(r"\s+")
# RFC 2231 3 and 4: "name*0=", "name*1*=", "name*=charset'lang'value".
_RFC2231 = re.compile(r"\*(?:\d+\*?)?\s*=")
# One parameter section: name*N*=value, name*N=value or name*=value, quoted or bare.
# A name starts the value or follows a blank or ";" (so no run is scanned twice).
_PARAMETER = re.compile(
    r'(?<![^\s;])([^\s;=*"]+)\*(\d+)?(\*)?\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))'
)
# Comments and folding whitespace around "@" and "." are allowed inside an address
# (RFC 5322 3.4.1): "bob (sales) @ example.org" is bob@example.org.
_COMMENT = re.compile(r"\([^()]*\)")
# What makes some view of an ASCII text differ from the text (see ``spellings``).
_MAY_VARY = re.compile(r'[&("\r\n]|=\?|\*(?:\d+\*?)?\s*=|%[0-9A-Fa-f]{2}|\s[.@]|[.@]\s|<[^<>\s]*\s')
# A blank beside a dot or "@": only then can blanks stand inside an address.
_OBSOLETE_SPACE = re.compile(r"\s[.@]|[.@]\s")
# Blanks around "@" and ".": the first blank of a run only (no backtracking over a run).
_SPACE_AROUND = re.compile(r"(?<!\s)\s*([@.])\s*")
_VERP_AT = re.compile(r"=(?=[^\s=@]+\.[^\s=@])")
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[QqBb]\?[^?\s]*\?=")
_BETWEEN_WORDS = re.compile(r"(?<=\?=)[ \t]+(?==\?)")


def key(local: str, domain: str) -> str:
    """The comparison form: local part case-folded and unquoted, domain as lower-case A-label."""
    if local.startswith('"') and local.endswith('"') and len(local) >= 2:
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    local = local.strip(".")
    if not local.isascii():  # one form for what looks the same: composed, nothing invisible
        local = unicodedata.normalize("NFC", _INVISIBLE.sub("", local))
    domain = domain.strip(".-")
    return f"{local.lower()}@{domain_key(domain)}" if local and domain else ""


def address_key(address: Address) -> str:
    return key(address.local, address.domain)


def addresses_in(text: str, *, comments: bool = True) -> set[str]:
    """Every address key ``text`` spells, in any of its views (rule 1)."""
    return set(spellings(text, comments=comments))


def spellings(text: str, *, comments: bool = True, field: bool = False) -> Spellings:
    """Every address key ``text`` spells, each with the primaries it was read in (rule 4).

    ``field``: ``text`` is one header field's value with its folds (CRLF and a
    blank) still in it, read in the header views of rule 1 too.
    """
    found: Spellings = {}
    plain: str | None = text
    split = False
    if field and "\r\n" in text:
        # Unfolded, unless a fold may fall inside an address (then every view is made):
        # beside a word that may spell one, or anywhere among RFC 2231 sections, whose
        # values are joined (a fold at a section's end is inside the joined address).
        split = _RFC2231.search(text) is not None or any(
            _splits_address(text, m) for m in _FOLD.finditer(text)
        )
        plain = None if split else text.replace("\r\n", "")
    if plain is not None and plain.isascii() and not _MAY_VARY.search(plain):
        # No view differs from the text itself: no fold inside a word, no encoded word,
        # RFC 2231 section, escape, comment, quote, blank inside brackets or beside "."
        # or "@"; the text is read as it is.
        if "@" in plain:
            _at_forms(plain, found)
        if "=" in plain:
            _verp_forms(plain, found)
        found.pop("", None)
        return found
    bases = _field_views(text, split=split) if field else [text]
    for view in _views(bases, comments=comments):
        if "@" in view:
            _at_forms(view, found)
        if "=" in view:
            _verp_forms(view, found)
    found.pop("", None)
    return found


def primaries(found: Spellings) -> set[str]:
    """The whole addresses of ``found``: those read in nothing longer than themselves."""
    return {p for parents in found.values() for p in parents}


def _field_views(text: str, *, split: bool) -> list[str]:
    """A header field's value unfolded, and in each header-only view that it calls for.

    Every view is made in one linear pass (no pattern that backtracks over a run), so a
    field of a megabyte costs a few passes over a megabyte, whatever its shape.
    """
    views = [text.replace("\r\n", "")]
    if split:  # a fold may fall inside an address (``_splits_address``)
        views.append(_FOLD.sub("", text))
    for view in list(views):
        if "<" in view:
            bracketed = _BRACKETED.sub(_without_blanks, view)
            if bracketed != view:
                views.append(bracketed)
        if "&" in view:
            views.append(html.unescape(view))
        if "=" in view and _RFC2231.search(view):
            views.extend(_parameters(view))
        if "@" in view and ('"' in view or _OBSOLETE_SPACE.search(view)):
            # Obsolete syntax (RFC 5322 4.4) allows blanks and quoted words around the dots
            # of an address: "bob . smith @ y . org", '"bob".smith@y.org'.
            views.append(_SPACE_AROUND.sub(_mark_only, view.replace('"', "")))
    return views


def _splits_address(text: str, fold: re.Match[str]) -> bool:
    """Whether ``fold`` may fall inside an address: a word beside it holds an address mark.

    Only the words that touch the fold are read, each at most an address long.
    """
    start = fold.start()
    before, after = text[start - 1 : start], text[fold.end() : fold.end() + 1]
    # ";" may follow a fold inside an entity ("&#64" fold ";"), never end an address part.
    if not (_joins(before) and (_joins(after) or after == ";")):
        return False  # a blank, a bracket or a comma beside it: no address runs across
    left = text[max(0, start - MAX_RUN - MAX_DOMAIN) : start]
    right = text[fold.end() : fold.end() + MAX_RUN + MAX_DOMAIN]
    words = left.rsplit(None, 1)[-1:] + right.split(None, 1)[:1]
    return any(mark in word for word in words for mark in _ADDRESS_MARKS)


def _joins(c: str) -> bool:
    """Whether ``c`` can stand inside an address, or beside a fold that splits one."""
    return bool(c) and (c in _LOCAL or c == "@" or (c >= "\x80" and not c.isspace()))


def _without_blanks(match: re.Match[str]) -> str:
    return _BLANKS.sub("", match.group())


def _parameters(value: str) -> list[str]:
    """RFC 2231 parameters of ``value`` reassembled and decoded (RFC 2231 3, 4).

    Sections are joined in their numeric order, extended ones percent-decoded in the
    charset of their first section; a second view also drops the angle brackets of
    each section, as some readers do. A parser of our own: one linear pass.
    """
    sections: dict[str, dict[int, tuple[bool, str]]] = {}
    for m in _PARAMETER.finditer(value):
        name, number, star, quoted, bare = m.groups()
        text = re.sub(r"\\(.)", r"\1", quoted) if quoted is not None else bare
        extended = star is not None or number is None  # "name*=" is extended (RFC 2231 4)
        sections.setdefault(name.lower(), {})[int(number or 0)] = (extended, text)
    joined: list[str] = []
    stripped: list[str] = []
    for name, parts in sections.items():
        charset = "utf-8"
        pieces: list[bytes] = []
        for number in sorted(parts):
            extended, text = parts[number]
            if extended and number == 0 and text.count("'") >= 2:
                charset, _, text = text.split("'", 2)
            # The charset is the whole value's (RFC 2231 4.1): decoded once, joined.
            pieces.append(urllib.parse.unquote_to_bytes(text) if extended else text.encode())
        joined.append(f"{name}={_decoded(b''.join(pieces), charset)}")
        bare = b"".join(p.strip(b"<>") for p in pieces)
        stripped.append(f"{name}={_decoded(bare, charset)}")
    return [" ".join(joined), " ".join(stripped)]


def _decoded(value: bytes, charset: str) -> str:
    try:
        return value.decode(charset or "utf-8", "replace")
    except LookupError:
        return value.decode("latin-1")


def _views(bases: list[str], *, comments: bool) -> Iterator[str]:
    seen: set[str] = set()
    for text in bases:
        if text not in seen:
            seen.add(text)
            yield text
    for text in bases:
        decoded = _decode_words(text) if "=?" in text else text
        if decoded not in seen:
            seen.add(decoded)
            yield decoded
    for view in list(seen):
        current = view
        for _ in range(_MAX_UNQUOTE_ROUNDS):
            if not _PERCENT.search(current):
                break
            current = urllib.parse.unquote(current)
            if current not in seen:
                seen.add(current)
                yield current
    for view in list(seen):
        # What a reader sees: no invisible characters; composed (NFC) and compatibility
        # (NFKC: fullwidth letters, the fullwidth at sign) forms; no comments or spaces
        # in an address.
        if view.isascii():
            forms = [view]
        else:
            visible = _INVISIBLE.sub("", view)
            forms = [unicodedata.normalize("NFC", visible), unicodedata.normalize("NFKC", visible)]
        for form in forms:
            plain = form
            for _ in range(3 if comments else 0):  # comments nest; three levels is plenty
                if "(" not in plain:
                    break
                plain = _COMMENT.sub("", plain)
            # In a header, blanks may stand around any dot of an address (RFC 5322 4.4),
            # a comment removed leaves one; in body text only blanks beside "@" count.
            if _spaced_at(plain) or (comments and "@" in plain and _OBSOLETE_SPACE.search(plain)):
                plain = _SPACE_AROUND.sub(_mark_only, plain)
            for out in (form, plain):
                if out not in seen:
                    seen.add(out)
                    yield out


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
    return c in chars or (c >= "\x80" and _is_word(c))


def _is_word(c: str) -> bool:
    """A non-ASCII letter, digit or combining mark (a decomposed "ü" is "u" and a mark)."""
    return c.isalnum() or unicodedata.category(c)[0] == "M"


def _run_before(text: str, at: int, floor: int, chars: frozenset[str]) -> str:
    """The run of ``chars`` that ends at ``at``, going back no further than ``floor``."""
    limit = max(floor, at - MAX_RUN)
    window = text[limit:at]
    if window.isascii():  # the common case, at C speed
        return window[len(window.rstrip(_ASCII_RUNS[chars])) :]
    start = at
    while start > limit and _is_local(text[start - 1], chars):
        start -= 1
    return text[start:at]


def _domain_after(text: str, start: int) -> tuple[str, int]:
    """The domain that starts at ``start`` (ideographic dots read as dots), and its end."""
    limit = min(len(text), start + MAX_DOMAIN)
    ascii_run = _ASCII_DOMAIN.match(text, start, limit)
    end = ascii_run.end() if ascii_run else start
    if end < limit and text[end] >= "\x80":
        while end < limit:
            c = text[end]
            if not (c in _DOMAIN or c in _IDEOGRAPHIC_DOTS or (c >= "\x80" and _is_word(c))):
                break
            end += 1
    domain = text[start:end]
    if not domain.isascii():
        for dot, ascii_dot in _IDEOGRAPHIC_DOTS.items():
            domain = domain.replace(dot, ascii_dot)
    return domain, end


def _found(found: Spellings, local: str, domain: str, breaks: frozenset[str]) -> None:
    """Record the address ``local@domain``, and what it reads as inside it (rule 4).

    Inside it: each tail of the local part after a break, and the domain cut at
    each of its dots while two labels are left (``bob@y.org.pdf``, an
    attachment's name, shows ``bob@y.org``).
    """
    primary = key(local, domain)
    if not primary:
        return
    found.setdefault(primary, set()).add(primary)
    locals_ = [local, *(local[i + 1 :] for i, c in enumerate(local) if c in breaks)]
    domains = [domain]
    cut = domain.rfind(".")
    while cut > 0 and "." in domain[:cut].strip("."):
        domains.append(domain[:cut])
        cut = domain.rfind(".", 0, cut)
    for inner_local in locals_:
        for inner_domain in domains:
            inner = key(inner_local, inner_domain)
            if inner and inner != primary:
                found.setdefault(inner, set()).add(primary)


def _at_forms(text: str, found: Spellings) -> None:
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
            _found(found, local, domain, _URL_BREAKS)
            floor = end
        at = text.find("@", at + 1)


def _verp_forms(text: str, found: Spellings) -> None:
    floor = 0
    for m in _VERP_AT.finditer(text):
        at = m.start()
        if at < floor:
            continue
        domain, end = _domain_after(text, at + 1)
        if "." not in domain.strip("."):
            continue
        # "bounces-bob=example.com": bob after the separator.
        _found(found, _run_before(text, at, floor, _VERP_LOCAL), domain, _VERP_TAIL_BREAKS)
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
