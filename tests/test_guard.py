"""The leak guard on its own: it trusts nothing the splitter did."""

from __future__ import annotations

import pytest

from relay.core.addresses import parse_address
from relay.core.errors import LeakDetected
from relay.core.guard import LeakGuard
from relay.core.headers import parse_message
from relay.core.model import Copy, Envelope, IsolationOptions
from relay.core.spellings import addresses_in, primaries, spellings
from tests.conftest import copy_headers, message, received

ENVELOPE = Envelope.parse("news@example.org", ["alice@example.com", "bob@example.com"])
ORIGINAL = message(
    "From: news@example.org", "To: alice@example.com, bob@example.com", "Subject: hi"
)


def guard_one(headers: bytes) -> None:
    parsed = parse_message(ORIGINAL, smtputf8=False, max_header_octets=10_000)
    rcpt = parse_address("alice@example.com", smtputf8=False)
    assert rcpt is not None
    copy = Copy(rcpt, headers, parsed.body, ())
    LeakGuard(parsed, ENVELOPE, IsolationOptions()).check([copy])


def test_a_correct_copy_passes() -> None:
    """The copy the splitter would make is accepted."""
    guard_one(copy_headers("alice@example.com", "From: news@example.org", "To: alice@example.com"))


@pytest.mark.parametrize(
    "headers",
    [
        copy_headers("alice@example.com", "To: alice@example.com", "To: alice@example.com"),
        copy_headers("alice@example.com", "Subject: no To at all"),
        copy_headers("alice@example.com", "To: bob@example.com"),
        copy_headers("alice@example.com", "To: alice@example.com, stranger@example.net"),
        copy_headers("alice@example.com", "To: alice@example.com", "Cc: nobody@example.net"),
        copy_headers("alice@example.com", "To: alice@example.com", "bcc: "),
        copy_headers("bob@example.com", "To: alice@example.com"),
        copy_headers("alice@example.com", "To: alice@example.com", "X-Note: b\nob@example.com"),
        copy_headers("alice@example.com", "To: alice@example.com", "", "Reply-To: bob@example.com"),
        received("alice@example.com") + b"To: alice@example.com\r\n",
        copy_headers("alice@example.com", "To: alice@example.com", "X-Long: " + "a" * 995),
    ],
    ids=[
        "two-to",
        "no-to",
        "to-other",
        "to-extra",
        "cc-left",
        "empty-bcc-left",
        "received-for-other",
        "bare-lf",
        "inner-blank-line",
        "no-blank-line",
        "long-line",
    ],
)
def test_tampered_copies_fail_closed(headers: bytes) -> None:
    """Any copy that is not exactly right rejects the message with 550 5.7.1."""
    with pytest.raises(LeakDetected) as info:
        guard_one(headers)
    assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.7.1")


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("Bob <BOB@Example.COM>", "bob@example.com"),
        ("=?utf-8?b?Ym9iQGV4YW1wbGUuY29t?=", "bob@example.com"),
        ("=?utf-8?q?bob=40example.com?=", "bob@example.com"),
        ("=?utf-8?q?bob?= =?utf-8?q?=40example.com?=", "bob@example.com"),
        ("https://x.example.net/u?e=bob%40example.com", "bob@example.com"),
        ("https://x.example.net/u?e=bob%2540example.com", "bob@example.com"),
        ("<mailto:u+bob=example.com@list.example.net>", "bob@example.com"),
        ("<mailto:bounces-bob=example.com@list.example.net>", "bob@example.com"),
        ("x@bücher.example", "x@xn--bcher-kva.example"),
        ("x@XN--BCHER-KVA.example", "x@xn--bcher-kva.example"),
        ('"bob"@example.com', "bob@example.com"),
        ("see .bob@example.com.", "bob@example.com"),
        ("/u/bob@example.com", "bob@example.com"),
    ],
)
def test_addresses_in_reads_every_spelling(text: str, found: str) -> None:
    """Raw, RFC 2047, percent-encoded, VERP, IDNA and quoted spellings all count."""
    assert found in addresses_in(text)


@pytest.mark.parametrize(
    ("text", "absent"),
    [
        ("sal@example.com", "al@example.com"),
        ("x.bob@example.com", "bob@example.com"),
        ("bob@example.com.evil.example", "bob@example.com"),
        ("bob@example.community", "bob@example.com"),
    ],
)
def test_addresses_in_respects_address_boundaries(text: str, absent: str) -> None:
    """An address that merely contains another is not that other address: at most a
    reading inside it (rule 4), which a copy to the longer address may show."""
    found = spellings(text)
    assert absent not in primaries(found)
    assert found.get(absent, {text}) == {text}


def test_an_address_with_more_domain_after_it_reads_as_the_shorter_inside_it() -> None:
    """An attachment named bob@y.org.pdf shows bob@y.org: a reading inside the longer."""
    assert spellings("bob@y.org.pdf")["bob@y.org"] == {"bob@y.org.pdf"}


def test_body_check_counts_only_copies_that_see_someone_else() -> None:
    """A body naming bob warns, since alice's copy would show bob (bob's own copy would not)."""
    data = message(
        "From: news@example.org", "To: alice@example.com", body=b"hi bob@example.com\r\n"
    )
    parsed = parse_message(data, smtputf8=False, max_header_octets=10_000)
    copies = [
        Copy(r, copy_headers(r.text, "From: news@example.org", f"To: {r.text}"), parsed.body, ())
        for r in ENVELOPE.recipients
    ]
    warnings = LeakGuard(parsed, ENVELOPE, IsolationOptions()).check(copies)
    assert warnings == ("the body names other recipients in 1 of 2 copies",)


SOLO_ENVELOPE = Envelope.parse("news@example.org", ["alice@example.com"])
SOLO = message("From: news@example.org", "To: alice@example.com", "Subject: hi")


@pytest.mark.parametrize(
    ("headers", "passes"),
    [
        (copy_headers("alice@example.com", "To: alice@example.com", "X-Note: bob@x.test"), 1),
        (
            copy_headers("alice@example.com", "To: alice@example.com", "To: alice@example.com"),
            False,
        ),
        (copy_headers("alice@example.com", "To: alice@example.com", "Cc: bob@example.com"), 0),
        (copy_headers("alice@example.com", "To: alice@example.com, bob@example.com"), 0),
        (copy_headers("alice@example.com", "Subject: no To"), 0),
    ],
    ids=["unwatched-address", "two-to", "cc-left", "to-extra", "no-to"],
)
def test_a_single_recipient_copy_still_gets_every_structural_check(
    headers: bytes, passes: int
) -> None:
    """With nobody else to hide, the address search is skipped; the rest still holds."""
    parsed = parse_message(SOLO, smtputf8=False, max_header_octets=10_000)
    rcpt = parse_address("alice@example.com", smtputf8=False)
    assert rcpt is not None
    guard = LeakGuard(parsed, SOLO_ENVELOPE, IsolationOptions())
    if passes:
        guard.check([Copy(rcpt, headers, parsed.body, ())])
    else:
        with pytest.raises(LeakDetected):
            guard.check([Copy(rcpt, headers, parsed.body, ())])
