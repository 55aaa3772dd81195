"""Property: another recipient's address, spelled any way a kept field can spell it, never
reaches a copy (issue 12, "Tests that can find the next hole").

Hypothesis writes a victim recipient's address into a kept field through a chain of
generated spellings: case, every IDNA form of the domain, fullwidth letters, invisible
characters, RFC 2047 words split anywhere, RFC 2231 parameter segments (plain or
percent-encoded with a charset), percent-encoding and entities in a mailto URL, and a
fold at any position, inside the address too. The message must be refused, or else no
copy may show the victim to anyone else, as judged by an oracle that reads each copy
with its own code: Python's ``email`` parser under ``policy.default`` (its header
registry decodes RFC 2047 and RFC 2231 on a path of its own), ``urllib``, ``html``,
``unicodedata`` (invisible characters by category and name, not by the guard's
``regex`` property) and ``idna``. It never imports ``relay.core.spellings`` or ``relay.core.guard``.
"""

from __future__ import annotations

import email
import email.policy
import html
import re
import unicodedata
import urllib.parse
from email.header import Header

import idna
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.core.errors import Rejected
from relay.core.isolation import isolate
from relay.core.model import Envelope, IsolationOptions

SETTINGS = {
    "max_examples": 300,
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
DOMAINS = ("example.com", "example.net", "bücher.example", "münchen.test")
# Characters that render as nothing, by the generator's own choice (a sample of
# Unicode's Default_Ignorable_Code_Point: format controls, selectors, fillers, tags).
INVISIBLE = (
    "\u00ad\u034f\u115f\u180e\u200b\u200c\u200d\u200e\u2060\u2062\u2066\u2069\u3164"
    "\ufe00\ufe0f\ufeff\uffa0\U000e0001\U000e0041\U000e0100\U000e01ef"
)
FIELDS = ("Reply-To", "X-Customer", "Comments", "In-Reply-To", "Mail-Followup-To")


# --- the oracle ---------------------------------------------------------------------------


def a_label(domain: str) -> str:
    return idna.encode(domain, uts46=True).decode("ascii")


def invisible(c: str) -> bool:
    """The oracle's own test for a character that shows nothing."""
    name = unicodedata.name(c, "")
    return (
        unicodedata.category(c) == "Cf"
        or "VARIATION SELECTOR" in name
        or "FILLER" in name
        or name in ("COMBINING GRAPHEME JOINER", "MONGOLIAN VOWEL SEPARATOR", "SOFT HYPHEN")
        or 0xE0000 <= ord(c) <= 0xE0FFF
    )


def readable(text: str) -> str:
    """What a reader of ``text`` sees, flattened for a substring search."""
    for _ in range(3):
        text = html.unescape(urllib.parse.unquote(text))
    text = unicodedata.normalize("NFKC", "".join(c for c in text if not invisible(c)))
    return re.sub(r"\s+", "", text).lower()


def oracle_views(section: bytes) -> list[str]:
    """Each field of a copy's header section as ``policy.default`` decodes it, and raw."""
    views = []
    parsed = email.message_from_bytes(section + b"\r\n", policy=email.policy.default)
    for value in parsed.values():
        views.append(str(value))
        params = getattr(value, "params", None)
        if params:
            views.extend(str(v) for v in params.values())
    text = section.decode("utf-8", "surrogateescape")
    views.append(text)
    views.append(re.sub(r"\r\n[ \t]", "", text))
    return [readable(v) for v in views]


def shows(section: bytes, local: str, domain: str) -> bool:
    forms = {f"{local}@{domain}".lower(), f"{local}@{a_label(domain)}".lower()}
    forms |= {readable(f) for f in forms}
    return any(form in view for view in oracle_views(section) for form in forms)


# --- the generator --------------------------------------------------------------------


@st.composite
def spelled_domain(draw: st.DrawFn, domain: str) -> str:
    how = draw(st.sampled_from(["as is", "a-label", "upper", "fullwidth", "nfd"]))
    if how == "a-label":
        return a_label(domain)
    if how == "upper":
        return domain.upper()
    if how == "fullwidth":
        return "".join(chr(ord(c) + 0xFEE0) if c.isascii() and c.isalpha() else c for c in domain)
    if how == "nfd":
        return unicodedata.normalize("NFD", domain)
    return domain


@st.composite
def with_invisibles(draw: st.DrawFn, text: str) -> str:
    chars = list(text)
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(chars)))
        chars.insert(at, draw(st.sampled_from(INVISIBLE)))
    return "".join(chars)


@st.composite
def spelled(draw: st.DrawFn, local: str, domain: str) -> str:
    """The victim's address with its case, domain form and invisible characters drawn."""
    if draw(st.booleans()):
        local = "".join(c.upper() if draw(st.booleans()) else c for c in local)
    address = f"{local}@{draw(spelled_domain(domain))}"
    return draw(with_invisibles(address))


def folded_at(value: str, at: int, blank: str) -> str:
    return value[:at] + "\r\n" + blank + value[at:]


@st.composite
def field_with_victim(draw: st.DrawFn, local: str, domain: str) -> tuple[str, bool]:
    """A kept header field spelling the victim; and whether it needs SMTPUTF8."""
    address = draw(spelled(local, domain))
    shape = draw(st.sampled_from(["plain", "rfc2047", "rfc2231", "mailto", "entity"]))
    if shape == "rfc2047":
        if draw(st.booleans()):  # base64 words, folded where the encoder folds them
            width = draw(st.integers(20, 76))
            value = Header(address, "utf-8", maxlinelen=width).encode(linesep="\r\n")
        else:  # quoted-printable words, the address cut in two at any character
            cut = draw(st.integers(1, max(1, len(address) - 1)))
            value = " ".join(
                "=?utf-8?q?" + "".join(f"={b:02X}" for b in part.encode("utf-8")) + "?="
                for part in (address[:cut], address[cut:])
                if part
            )
        field = f"{draw(st.sampled_from(FIELDS))}: {value}"
    elif shape == "rfc2231":
        extended = draw(st.booleans()) or not address.isascii()
        pieces = draw(st.integers(1, 4))
        size = max(1, len(address) // pieces)
        parts = [address[i : i + size] for i in range(0, len(address), size)]
        params = []
        for n, part in enumerate(parts):
            if extended:
                quoted = urllib.parse.quote(part, safe="" if draw(st.booleans()) else "@.")
                charset = "utf-8''" if n == 0 else ""
                params.append(f"name*{n}*={charset}{quoted}")
            else:
                params.append(f'name*{n}="{part}"')
        kind = draw(st.sampled_from(["Content-Type: text/plain", "Content-Disposition: inline"]))
        field = f"{kind}; " + "; ".join(params)
    elif shape == "mailto":
        quoted = (
            "".join(f"%{b:02X}" if draw(st.booleans()) else chr(b) for b in address.encode("utf-8"))
            if address.isascii()
            else urllib.parse.quote(address, safe="@")
        )
        query = draw(st.sampled_from(["", "?subject=x&amp;from=", "?to="]))
        url = f"mailto:list@example.org{query}{quoted}" if query else f"mailto:{quoted}"
        field = f"List-Unsubscribe: <{url}>"
    elif shape == "entity":
        field = "X-Customer: " + address.replace(
            "@", draw(st.sampled_from(["&#64;", "&commat;", "&#x40;"]))
        )
    else:
        field = f"{draw(st.sampled_from(FIELDS))}: {address}"
    if draw(st.booleans()):
        colon = field.index(":") + 2
        field = folded_at(
            field, draw(st.integers(colon, len(field))), draw(st.sampled_from([" ", "\t"]))
        )
    return field, not field.isascii()


@st.composite
def cases(draw: st.DrawFn) -> tuple[list[str], bytes, bool, str, str]:
    count = draw(st.integers(2, 4))
    rcpts = [
        f"r{i}{draw(st.integers(100, 999))}x@{draw(st.sampled_from(DOMAINS))}" for i in range(count)
    ]
    victim = draw(st.sampled_from(rcpts))
    local, _, domain = victim.partition("@")
    field, utf8 = draw(field_with_victim(local, domain))
    data = (
        b"From: News <news@example.org>\r\nTo: "
        + ", ".join(rcpts).encode()
        + b"\r\n"
        + b"Subject: hi\r\n"
        + field.encode("utf-8")
        + b"\r\n\r\nHello.\r\n"
    )
    smtputf8 = utf8 or not all(r.isascii() for r in rcpts)
    return rcpts, data, smtputf8, local, domain


@settings(**SETTINGS)
@given(cases())
def test_no_generated_spelling_of_another_recipient_reaches_a_copy(
    case: tuple[list[str], bytes, bool, str, str],
) -> None:
    """Refused, or no copy but the victim's own shows the victim (by the oracle)."""
    rcpts, data, smtputf8, local, domain = case
    envelope = Envelope.parse("news@example.org", rcpts, smtputf8=smtputf8)
    try:
        plan = isolate(envelope, data, IsolationOptions())
    except Rejected as exc:
        assert exc.reply.code in (550, 554), exc
        return
    victim = f"{local}@{domain}"
    for copy in plan.copies:
        if copy.recipient.text != victim:
            section = copy.headers.removesuffix(b"\r\n\r\n")
            assert not shows(section, local, domain), section.decode("utf-8", "replace")
