"""Golden tests: SPEC.md section 9, "Header sections" and "Bodies", one case each.

Each test gives an envelope and exact message bytes and asserts the exact
copies (header sections byte for byte) or the exact rejection.
"""

from __future__ import annotations

import base64
import email.header

import pytest

from relay.core.errors import Rejected
from relay.core.isolation import isolate
from relay.core.model import REMOVED_HEADERS, BodyCheck, Envelope, IsolationOptions, Plan
from tests.conftest import copy_headers, message

SENDER = "news@example.org"
FROM = "From: Example News <news@example.org>"
SUBJECT = "Subject: Your November update"
MSGID = "Message-ID: <20261121.0001@mail.example.org>"


def run(
    rcpts: list[str],
    data: bytes,
    *,
    smtputf8: bool = False,
    sender: str = SENDER,
    **options: object,
) -> Plan:
    envelope = Envelope.parse(sender, rcpts, smtputf8=smtputf8)
    return isolate(envelope, data, IsolationOptions(**options))  # type: ignore[arg-type]


def rejected(rcpts: list[str], data: bytes, **kwargs: object) -> Rejected:
    with pytest.raises(Rejected) as info:
        run(rcpts, data, **kwargs)  # type: ignore[arg-type]
    return info.value


def headers_of(plan: Plan) -> dict[str, bytes]:
    return {c.recipient.text: c.headers for c in plan.copies}


# --- To: the exchange's mistake, and its variants ---------------------------------------


def test_concatenated_to_of_hundreds_gives_each_their_own_copy() -> None:
    """A folded To: naming 300 customers becomes 300 copies, each To: naming one."""
    rcpts = [f"customer{i:03d}@example.com" for i in range(300)]
    to = "To: " + ",\r\n ".join(rcpts)
    plan = run(rcpts, message(FROM, to, SUBJECT, MSGID))
    assert [c.recipient.text for c in plan.copies] == rcpts
    for rcpt, headers in headers_of(plan).items():
        assert headers == copy_headers(rcpt, FROM, f"To: {rcpt}", SUBJECT, MSGID)


def test_concatenated_to_on_one_5000_octet_line_is_isolated() -> None:
    """An unfolded To: of 250 customers (over 5,000 octets on one line) is the mistake itself:
    it is replaced, so each copy's To: names one customer and no line is long."""
    rcpts = [f"customer{i:03d}@example.com" for i in range(250)]
    to = "To: " + ", ".join(rcpts)
    assert len(to) > 5000
    plan = run(rcpts, message(FROM, to, SUBJECT))
    assert [c.recipient.text for c in plan.copies] == rcpts
    for rcpt, headers in headers_of(plan).items():
        assert headers == copy_headers(rcpt, FROM, f"To: {rcpt}", SUBJECT)


def test_folded_to_with_tabs_and_spaces() -> None:
    """A To: folded with tabs and spaces is replaced whole by one mailbox."""
    data = message(
        FROM,
        "To: Alice <alice@example.com>,",
        "\tbob@example.com,",
        "   carol@example.net",
        SUBJECT,
    )
    plan = run(["alice@example.com", "carol@example.net"], data)
    assert headers_of(plan) == {
        "alice@example.com": copy_headers(
            "alice@example.com", FROM, "To: Alice <alice@example.com>", SUBJECT
        ),
        "carol@example.net": copy_headers(
            "carol@example.net", FROM, "To: carol@example.net", SUBJECT
        ),
    }


def test_several_to_fields_in_different_case() -> None:
    """TO:, to: and To: all go; one new To: stands where the first one stood."""
    data = message(
        FROM, "TO: alice@example.com", SUBJECT, "to: bob@example.com", "To: carol@example.net"
    )
    plan = run(["alice@example.com", "bob@example.com"], data)
    assert headers_of(plan)["bob@example.com"] == copy_headers(
        "bob@example.com", FROM, "To: bob@example.com", SUBJECT
    )


def test_whitespace_before_colon_is_a_defect() -> None:
    """`To :` is refused with 554 5.6.0 (RFC 5322 forbids it; parsers disagree on it)."""
    err = rejected(["alice@example.com"], message(FROM, "To : alice@example.com, bob@example.com"))
    assert (err.reply.code, err.reply.enhanced) == (554, "5.6.0")
    assert "whitespace before the colon" in err.reason


@pytest.mark.parametrize("split", [b"\n", b"\r"])
def test_header_line_split_by_bare_cr_or_lf_is_refused(split: bytes) -> None:
    """A To: line broken by a bare LF or CR is 550 5.5.2, whatever follows it."""
    data = (
        b"From: news@example.org\r\nTo: alice@example.com,"
        + split
        + b"Bcc: bob@example.com\r\n\r\nHi\r\n"
    )
    err = rejected(["alice@example.com", "bob@example.com"], data)
    assert (err.reply.code, err.reply.enhanced) == (550, "5.5.2")


def test_header_line_split_by_bare_lf_with_normalize_is_then_parsed_strictly() -> None:
    """With normalize, the bare LF becomes CRLF and the orphan line is a 554 5.6.0 defect."""
    data = b"From: news@example.org\r\nTo: alice@example.com,\nbob@example.com\r\n\r\nHi\r\n"
    err = rejected(["alice@example.com", "bob@example.com"], data, normalize=True)
    assert (err.reply.code, err.reply.enhanced) == (554, "5.6.0")
    assert "no colon" in err.reason


def test_normalize_repairs_bare_lf_and_stray_cr_in_the_body() -> None:
    """With normalize, bare LF becomes CRLF and a stray CR a space, before parsing."""
    data = b"From: news@example.org\nTo: alice@example.com\n\nline one\nline\rtwo\n"
    plan = run(["alice@example.com"], data, normalize=True)
    assert bytes(plan.copies[0].body) == b"line one\r\nline two\r\n"


def test_nul_is_refused_even_with_normalize() -> None:
    """NUL anywhere is 550 5.5.2, normalize or not."""
    data = message(FROM, "To: alice@example.com", body=b"a\x00b\r\n")
    for normalize in (False, True):
        err = rejected(["alice@example.com"], data, normalize=normalize)
        assert (err.reply.code, err.reply.enhanced) == (550, "5.5.2")


# --- Cc, Bcc, groups ---------------------------------------------------------------------


def test_cc_bcc_and_empty_bcc_are_removed_and_bcc_recipients_get_a_copy() -> None:
    """Cc and Bcc (even empty) are gone; the Bcc'd envelope recipient gets an ordinary copy."""
    data = message(
        FROM,
        "To: alice@example.com",
        "Cc: Bob <bob@example.com>",
        "Bcc:",
        "Bcc: dave@example.net",
        SUBJECT,
    )
    plan = run(["alice@example.com", "bob@example.com", "dave@example.net"], data)
    assert headers_of(plan) == {
        "alice@example.com": copy_headers(
            "alice@example.com", FROM, "To: alice@example.com", SUBJECT
        ),
        "bob@example.com": copy_headers(
            "bob@example.com", FROM, "To: Bob <bob@example.com>", SUBJECT
        ),
        "dave@example.net": copy_headers("dave@example.net", FROM, "To: dave@example.net", SUBJECT),
    }
    removed = {c.header for c in plan.copies[0].changes if c.kind.value == "removed"}
    assert removed == {"Cc", "Bcc"}


def test_undisclosed_recipients_group() -> None:
    """`To: undisclosed-recipients:;` is replaced by the copy's recipient."""
    plan = run(["alice@example.com"], message(FROM, "To: undisclosed-recipients:;", SUBJECT))
    assert plan.copies[0].headers == copy_headers(
        "alice@example.com", FROM, "To: alice@example.com", SUBJECT
    )


def test_group_syntax_lists_recipients_and_is_replaced() -> None:
    """A group `Customers: a, b;` is removed whole; its display names still pair correctly."""
    data = message(FROM, 'To: Customers: "Alice A." <alice@example.com>, bob@example.com;', SUBJECT)
    plan = run(["alice@example.com", "bob@example.com"], data)
    assert headers_of(plan) == {
        "alice@example.com": copy_headers(
            "alice@example.com", FROM, 'To: "Alice A." <alice@example.com>', SUBJECT
        ),
        "bob@example.com": copy_headers("bob@example.com", FROM, "To: bob@example.com", SUBJECT),
    }


def test_header_only_addresses_get_no_copy() -> None:
    """Addresses in To/Cc that are not in the envelope get no copy; one recipient still isolated."""
    data = message(FROM, "To: alice@example.com, bob@example.com", "Cc: carol@example.net", SUBJECT)
    plan = run(["alice@example.com"], data)
    assert len(plan.copies) == 1
    assert plan.copies[0].headers == copy_headers(
        "alice@example.com", FROM, "To: alice@example.com", SUBJECT
    )


# --- another recipient hidden in comments and display names ------------------------------


def test_other_recipient_in_a_to_comment_is_dropped_with_the_to() -> None:
    """`alice@x (bob@y)` in To: is rebuilt: the comment, and bob, are gone from alice's copy."""
    data = message(FROM, "To: alice@example.com (bob@example.com), bob@example.com", SUBJECT)
    plan = run(["alice@example.com", "bob@example.com"], data)
    assert headers_of(plan)["alice@example.com"] == copy_headers(
        "alice@example.com", FROM, "To: alice@example.com", SUBJECT
    )


@pytest.mark.parametrize(
    "name",
    [
        '"bob@example.com"',
        email.header.Header("bob@example.com", "utf-8").encode(),  # B encoding
        "=?utf-8?q?bob=40example=2Ecom?=",  # Q encoding
    ],
    ids=["plain", "rfc2047-b", "rfc2047-q"],
)
def test_display_name_that_is_another_recipient_is_not_kept(name: str) -> None:
    """A display name holding an address (raw or RFC 2047 encoded) is dropped from To:."""
    data = message(FROM, f"To: {name} <alice@example.com>, bob@example.com", SUBJECT)
    plan = run(["alice@example.com", "bob@example.com"], data)
    assert headers_of(plan)["alice@example.com"] == copy_headers(
        "alice@example.com", FROM, "To: alice@example.com", SUBJECT
    )


def test_encoded_display_name_is_kept_when_it_names_no_address() -> None:
    """A non-ASCII display name paired with exactly this address is kept, RFC 2047 encoded."""
    data = message(FROM, "To: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <jorg@example.com>", SUBJECT)
    plan = run(["jorg@example.com"], data)
    assert plan.copies[0].headers == copy_headers(
        "jorg@example.com", FROM, "To: =?utf-8?b?SsO2cmcgTcO8bGxlcg==?= <jorg@example.com>", SUBJECT
    )


@pytest.mark.parametrize(
    "field",
    [
        "Reply-To: support@example.org (or bob@example.com)",
        'Reply-To: "bob@example.com" <support@example.org>',
        "Reply-To: =?utf-8?b?"
        + base64.b64encode(b"bob@example.com").decode()
        + "?= <support@example.org>",
        "Reply-To: =?iso-8859-1?q?Bob_=3Cbob=40example=2Ecom=3E?= <support@example.org>",
        "From: bob@example.com via News <news@example.org>",
    ],
    ids=["comment", "display-name", "rfc2047-b", "rfc2047-q", "from-display-name"],
)
def test_other_recipient_hidden_in_a_kept_field_rejects_the_message(field: str) -> None:
    """A kept field naming another recipient in a comment or display name is 550 5.7.1."""
    lines = [FROM, "To: alice@example.com", field] if not field.startswith("From:") else [field]
    err = rejected(["alice@example.com", "bob@example.com"], message(*lines, SUBJECT))
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")


# --- Resent-* and the whole removal list --------------------------------------------------


def test_resent_block_keeps_trace_fields_and_drops_recipient_fields() -> None:
    """Resent-From/Date/Message-ID stay; Resent-To/Cc/Bcc go."""
    data = message(
        "Resent-From: desk@example.org",
        "Resent-Date: Sat, 21 Nov 2026 10:00:00 +0000",
        "Resent-To: alice@example.com, bob@example.com",
        "Resent-Cc: carol@example.net",
        "Resent-Bcc: dave@example.net",
        "Resent-Message-ID: <resent.1@example.org>",
        FROM,
        "To: alice@example.com",
        SUBJECT,
    )
    plan = run(["alice@example.com", "bob@example.com"], data)
    assert headers_of(plan)["bob@example.com"] == copy_headers(
        "bob@example.com",
        "Resent-From: desk@example.org",
        "Resent-Date: Sat, 21 Nov 2026 10:00:00 +0000",
        "Resent-Message-ID: <resent.1@example.org>",
        FROM,
        "To: bob@example.com",
        SUBJECT,
    )


def test_every_removal_list_field_carrying_another_recipient_is_removed() -> None:
    """Each field on SPEC 3's removal list, naming bob, is absent from alice's copy."""
    names = sorted(REMOVED_HEADERS)
    fields = [f"{n.title()}: bob@example.com" for n in names]
    plan = run(
        ["alice@example.com", "bob@example.com"],
        message(FROM, "To: alice@example.com", *fields, SUBJECT),
    )
    for rcpt, headers in headers_of(plan).items():
        assert headers == copy_headers(rcpt, FROM, f"To: {rcpt}", SUBJECT)
    assert {c.header.lower() for c in plan.copies[0].changes if c.kind.value == "removed"} == set(
        names
    )


def test_configured_removal_adds_to_the_list_and_never_shortens_it() -> None:
    """An extra configured name is removed too; the built-in names stay removed."""
    options = IsolationOptions(removed_headers=frozenset({"X-Customer-List"}))
    assert options.removed_headers >= REMOVED_HEADERS
    data = message(
        FROM, "To: alice@example.com", "X-Customer-List: bob@example.com", "Cc: bob@example.com"
    )
    plan = isolate(Envelope.parse(SENDER, ["alice@example.com", "bob@example.com"]), data, options)
    assert plan.copies[0].headers == copy_headers(
        "alice@example.com", FROM, "To: alice@example.com"
    )


# --- kept fields that name another recipient ---------------------------------------------


@pytest.mark.parametrize(
    "field",
    [
        "Reply-To: alice@example.com, bob@example.com",
        "Mail-Followup-To: bob@example.com",
        "Disposition-Notification-To: Bob <bob@example.com>",
        "List-Unsubscribe: <mailto:unsubscribe@list.example.net?subject=bob@example.com>",
        "List-Unsubscribe: <https://list.example.net/u?who=bob%40example.com>",
        "List-Unsubscribe: <https://list.example.net/u?who=bob%2540example.com>",
        "List-Unsubscribe: <mailto:unsub+bob=example.com@list.example.net>",
        "List-Unsubscribe: <mailto:bounces-bob=example.com@list.example.net>",
        "Message-ID: <bob@example.com>",
        "X-Mailer-Recipient: BOB@EXAMPLE.COM",
    ],
)
def test_kept_field_naming_another_recipient_rejects_the_whole_message(field: str) -> None:
    """A kept field naming bob in any spelling rejects with 550 5.7.1, and no copy is made."""
    err = rejected(
        ["alice@example.com", "bob@example.com"],
        message(FROM, "To: alice@example.com", field, SUBJECT),
    )
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")
    assert "bob" not in err.reason  # reasons name fields, never addresses


def test_kept_field_naming_a_header_only_recipient_is_rejected() -> None:
    """Cc'd-but-not-enveloped carol still counts as a recipient for the guard (SPEC 3)."""
    data = message(
        FROM, "To: alice@example.com", "Cc: carol@example.net", "Reply-To: carol@example.net"
    )
    err = rejected(["alice@example.com"], data)
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")


def test_kept_field_naming_the_copys_own_recipient_or_a_stranger_is_fine() -> None:
    """List-Unsubscribe with the copy's own address, and Reply-To to support, are kept."""
    data = message(
        FROM,
        "To: alice@example.com",
        "Reply-To: support@example.org",
        "List-Unsubscribe: <mailto:unsub+alice=example.com@list.example.net>",
        MSGID,
    )
    plan = run(["alice@example.com"], data)
    assert plan.copies[0].headers == copy_headers(
        "alice@example.com",
        FROM,
        "To: alice@example.com",
        "Reply-To: support@example.org",
        "List-Unsubscribe: <mailto:unsub+alice=example.com@list.example.net>",
        MSGID,
    )


def test_message_id_shaped_like_an_address_is_kept_identical_on_every_copy() -> None:
    """A Message-ID that looks like an address (but names nobody) is the same on all copies."""
    data = message(FROM, "To: alice@example.com", "Message-ID: <a1b2c3@mail.example.org>")
    plan = run(["alice@example.com", "bob@example.com"], data)
    for c in plan.copies:
        assert b"\r\nMessage-ID: <a1b2c3@mail.example.org>\r\n" in c.headers


def test_addresses_that_merely_contain_another_are_not_confused() -> None:
    """Copy for sal@ names sal@, which contains "al@": no false leak for al@."""
    plan = run(
        ["al@example.com", "sal@example.com"], message(FROM, "To: al@example.com, sal@example.com")
    )
    assert len(plan.copies) == 2


def test_sender_who_is_also_a_recipient_may_be_shown_as_sender() -> None:
    """From: and MAIL FROM name the sender, who also gets a copy; that is no leak."""
    data = message("From: Boss <boss@example.org>", "To: alice@example.com", "Cc: boss@example.org")
    plan = run(["alice@example.com", "boss@example.org"], data, sender="boss@example.org")
    assert len(plan.copies) == 2


# --- 8-bit and IDN -----------------------------------------------------------------------


def test_8bit_header_without_smtputf8_is_a_defect() -> None:
    """A raw UTF-8 Subject without SMTPUTF8 is 554 5.6.0."""
    err = rejected(["alice@example.com"], message(FROM, "To: alice@example.com", "Subject: Grüße"))
    assert (err.reply.code, err.reply.enhanced) == (554, "5.6.0")


def test_8bit_header_with_smtputf8_is_kept_byte_for_byte() -> None:
    """With SMTPUTF8, UTF-8 header fields are kept exactly."""
    data = message(FROM, "To: jörg@bücher.example", "Subject: Grüße")
    plan = run(["jörg@bücher.example"], data, smtputf8=True)
    assert plan.copies[0].headers == copy_headers(
        "jörg@bücher.example", FROM, "To: jörg@bücher.example", "Subject: Grüße"
    )


def test_invalid_utf8_header_with_smtputf8_is_a_defect() -> None:
    """SMTPUTF8 allows UTF-8, not arbitrary bytes."""
    err = rejected(
        ["alice@example.com"],
        message(FROM, "To: alice@example.com", b"Subject: \xff\xfe"),
        smtputf8=True,
    )
    assert (err.reply.code, err.reply.enhanced) == (554, "5.6.0")


def test_idn_forms_are_one_recipient_and_one_address() -> None:
    """U-label and A-label envelope forms merge; the header form of either counts as the same."""
    rcpts = ["x@xn--bcher-kva.example", "x@BÜCHER.example", "y@bücher.example"]
    data = message(FROM, "To: x@bücher.example, y@xn--bcher-kva.example")
    plan = run(rcpts, data, smtputf8=True)
    assert [c.recipient.text for c in plan.copies] == [
        "x@xn--bcher-kva.example",
        "y@bücher.example",
    ]
    assert plan.merged_duplicates == 1


def test_idn_other_form_in_a_kept_field_is_a_leak() -> None:
    """y@ in U-label form in Reply-To leaks y@ given in A-label form in the envelope."""
    data = message(FROM, "To: x@xn--bcher-kva.example", "Reply-To: y@bücher.example")
    err = rejected(["x@xn--bcher-kva.example", "y@xn--bcher-kva.example"], data, smtputf8=True)
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")


def test_duplicates_differing_in_domain_case_are_merged_but_local_case_is_not() -> None:
    """bob@EXAMPLE.com is bob@example.com; Bob@example.com is a different mailbox (RFC 5321 2.4)."""
    plan = run(
        ["bob@example.com", "bob@EXAMPLE.COM", "Bob@example.com"],
        message(FROM, "To: bob@example.com"),
    )
    assert [c.recipient.text for c in plan.copies] == ["bob@example.com", "Bob@example.com"]
    assert plan.merged_duplicates == 1


# --- structural defects ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        ((" folded: first", FROM), "starts with a continuation line"),
        (
            ("From news@example.org Sat Nov 21 10:00:00 2026", FROM),
            "forbidden character in its name",
        ),
        (("X-Bad\x01Name: v", FROM), "forbidden character in its name"),
        (("X-Bad\x7fName: v", FROM), "forbidden character in its name"),
        ((FROM, "no colon here"), "has no colon"),
        ((FROM, ": empty name"), "empty field name"),
        ((FROM, "Subject: x", " "), "whitespace only"),
    ],
    ids=[
        "leading-continuation",
        "mbox-from",
        "control-char",
        "del-char",
        "no-colon",
        "empty-name",
        "blank-cont",
    ],
)
def test_header_defects_are_refused(lines: tuple[str, ...], reason: str) -> None:
    """Each malformed header section is 554 5.6.0 with a reason naming the defect."""
    err = rejected(["alice@example.com"], message(*lines))
    assert (err.reply.code, err.reply.enhanced) == (554, "5.6.0")
    assert reason in err.reason


@pytest.mark.parametrize(("length", "ok"), [(998, True), (999, False), (5000, False)])
def test_header_line_length_limit(length: int, ok: bool) -> None:
    """Header lines up to 998 octets pass; 999 and 5,000 are 554 5.6.0."""
    line = "X-Long: " + "a" * (length - len("X-Long: "))
    assert len(line) == length
    data = message(FROM, "To: alice@example.com", line)
    if ok:
        assert f"\r\n{line}\r\n".encode() in run(["alice@example.com"], data).copies[0].headers
    else:
        assert rejected(["alice@example.com"], data).reply.code == 554


@pytest.mark.parametrize("length", [998, 999, 5000])
def test_long_body_lines_pass_unchanged(length: int) -> None:
    """Body lines of any length are passed through byte for byte."""
    body = b"<p>" + b"x" * (length - 3) + b"\r\n"
    plan = run(["alice@example.com"], message(FROM, "To: alice@example.com", body=body))
    assert bytes(plan.copies[0].body) == body


def test_header_section_over_the_size_limit_is_a_defect() -> None:
    """A header section over max_header_octets is 554 5.6.0."""
    data = message(FROM, "To: alice@example.com", *[f"X-Pad-{i}: {'p' * 90}" for i in range(20)])
    err = rejected(["alice@example.com"], data, max_header_octets=1024)
    assert (err.reply.code, err.reply.enhanced) == (554, "5.6.0")


@pytest.mark.parametrize(("hops", "ok"), [(50, True), (51, False)])
def test_hop_count(hops: int, ok: bool) -> None:
    """50 Received fields pass; 51 are 554 5.4.0 (a loop)."""
    trace = [
        f"Received: from h{i}.example.net by h{i + 1}.example.net; Sat, 21 Nov 2026 10:00:00 +0000"
        for i in range(hops)
    ]
    data = message(*trace, FROM, "To: alice@example.com")
    if ok:
        assert len(run(["alice@example.com"], data).copies) == 1
    else:
        err = rejected(["alice@example.com"], data)
        assert (err.reply.code, err.reply.enhanced) == (554, "5.4.0")


def test_message_with_no_body_and_no_blank_line() -> None:
    """Data that is all header section yields copies with an empty body."""
    data = b"From: news@example.org\r\nTo: alice@example.com\r\nSubject: ping\r\n"
    plan = run(["alice@example.com"], data)
    assert bytes(plan.copies[0]) == copy_headers(
        "alice@example.com", "From: news@example.org", "To: alice@example.com", "Subject: ping"
    )


# --- DKIM --------------------------------------------------------------------------------

DKIM_TO_CC = (
    "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org; s=app;\r\n"
    "\th=from:to:cc:subject; bh=AAAA; b=BBBB"
)
DKIM_FROM_SUBJECT = (
    "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=example.org; s=esp;\r\n"
    "\th=from:subject:cc:cc; bh=AAAA; b=CCCC"
)


def test_app_dkim_signature_over_to_and_cc_is_stripped_and_said_so() -> None:
    """A signature whose h= covers to:cc is removed, and the change names it."""
    data = message(
        DKIM_TO_CC, FROM, "To: alice@example.com, bob@example.com", "Cc: carol@example.net", SUBJECT
    )
    plan = run(["alice@example.com", "bob@example.com"], data)
    copy = plan.copies[0]
    assert copy.headers == copy_headers("alice@example.com", FROM, "To: alice@example.com", SUBJECT)
    stripped = [c for c in copy.changes if c.kind.value == "dkim-stripped"]
    assert len(stripped) == 1
    assert "d=example.org s=app" in stripped[0].reason and "to" in stripped[0].reason


def test_dkim_signature_over_unchanged_fields_is_kept_even_with_oversigned_cc() -> None:
    """h=from:subject:cc:cc with no Cc: in the original covers nothing changed: kept."""
    data = message(DKIM_FROM_SUBJECT, FROM, "To: alice@example.com, bob@example.com", SUBJECT)
    plan = run(["alice@example.com", "bob@example.com"], data)
    assert plan.copies[0].headers == copy_headers(
        "alice@example.com", DKIM_FROM_SUBJECT, FROM, "To: alice@example.com", SUBJECT
    )
    assert [c.kind.value for c in plan.copies[0].changes if c.header == "DKIM-Signature"] == [
        "dkim-kept"
    ]


def test_dkim_signature_over_a_removed_cc_is_stripped() -> None:
    """h= naming cc when the original had a Cc: (now removed) breaks: stripped."""
    data = message(DKIM_FROM_SUBJECT, FROM, "To: alice@example.com", "Cc: bob@example.com", SUBJECT)
    plan = run(["alice@example.com"], data)
    assert b"DKIM-Signature" not in plan.copies[0].headers


def test_dkim_signature_over_an_unchanged_to_is_kept() -> None:
    """One recipient whose original To: is exactly the rebuilt one: the signature stands."""
    dkim = "DKIM-Signature: v=1; d=example.org; s=app; h=from:to:subject; bh=AAAA; b=BBBB"
    data = message(dkim, FROM, "To: alice@example.com", SUBJECT)
    plan = run(["alice@example.com"], data)
    assert plan.copies[0].headers == copy_headers(
        "alice@example.com", dkim, FROM, "To: alice@example.com", SUBJECT
    )


# --- bodies ------------------------------------------------------------------------------

RCPTS = ["alice@example.com", "bob@example.com", "carol@example.net"]


def multipart(*parts: tuple[str, bytes], boundary: str = "b1") -> bytes:
    body = b""
    for headers, content in parts:
        body += f"--{boundary}\r\n{headers}\r\n\r\n".encode() + content + b"\r\n"
    body += f"--{boundary}--\r\n".encode()
    return message(
        FROM,
        "To: alice@example.com",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/mixed; boundary="{boundary}"',
        body=body,
    )


def crlf(data: bytes) -> bytes:
    """The standard library's encoders end lines with LF; SMTP data has CRLF."""
    return data.replace(b"\n", b"\r\n")


def body_cases() -> dict[str, bytes]:
    return {
        "plain": message(FROM, "To: alice@example.com", body=b"Thanks, bob@example.com!\r\n"),
        "quoted-printable": multipart(
            (
                "Content-Type: text/plain\r\nContent-Transfer-Encoding: quoted-printable",
                b"Write to bob=\r\n=40example.com today",
            ),
        ),
        "base64": multipart(
            (
                "Content-Type: text/html\r\nContent-Transfer-Encoding: base64",
                crlf(base64.encodebytes(b"<a href='mailto:bob@example.com'>x</a>")),
            ),
        ),
        "html-entity": multipart(("Content-Type: text/html", b"bob&#64;example.com")),
        "message/rfc822 body": multipart(
            ("Content-Type: text/plain", b"see attached"),
            ("Content-Type: message/rfc822", b"From: news@example.org\r\n\r\nbob@example.com\r\n"),
        ),
    }


def embedded_cases() -> dict[str, bytes]:
    """A forwarded mail whose own header section names the other recipients."""
    nested = (
        b"From: news@example.org\r\n"
        b"To: alice@example.com, bob@example.com, carol@example.net\r\n"
        b"Subject: fwd\r\n\r\nhi\r\n"
    )
    return {
        "message/rfc822": multipart(
            ("Content-Type: text/plain", b"see attached"), ("Content-Type: message/rfc822", nested)
        ),
        "message/global": multipart(("Content-Type: message/global", nested)),
        "message/global base64": multipart(
            (
                "Content-Type: message/global\r\nContent-Transfer-Encoding: base64",
                crlf(base64.encodebytes(nested)),
            ),
        ),
        "text/rfc822-headers": multipart(
            ("Content-Type: text/rfc822-headers", nested.partition(b"\r\n\r\n")[0] + b"\r\n")
        ),
        "folded inside nested": multipart(
            (
                "Content-Type: message/rfc822",
                b"From: news@example.org\r\nReply-To: bob@exa\r\n mple.com\r\n\r\nhi\r\n",
            ),
        ),
    }


@pytest.mark.parametrize("case", list(embedded_cases()))
def test_embedded_headers_naming_other_recipients_are_refused_by_default(case: str) -> None:
    """A forwarded message's header section naming other recipients: 550 5.7.1, naming the part."""
    err = rejected(RCPTS, embedded_cases()[case])
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")
    assert "part " in err.reason and "embedded message" in err.reason
    assert "@" not in err.reason


@pytest.mark.parametrize("case", list(embedded_cases()))
def test_embedded_check_can_be_relaxed_to_a_warning(case: str) -> None:
    """embedded_check=warn: the copies are made, with a warning naming the part."""
    plan = run(RCPTS, embedded_cases()[case], embedded_check=BodyCheck.WARN)
    assert len(plan.copies) == 3
    assert plan.warnings and "embedded message" in plan.warnings[0]


@pytest.mark.parametrize("case", list(embedded_cases()))
def test_embedded_check_off_ignores_embedded_headers(case: str) -> None:
    """embedded_check=off (and body_check=off): nothing is read, nothing is said."""
    options = {"embedded_check": BodyCheck.OFF, "body_check": BodyCheck.OFF}
    assert run(RCPTS, embedded_cases()[case], **options).warnings == ()


def test_embedded_headers_naming_only_the_own_recipient_pass() -> None:
    """A forwarded mail to alice, attached to alice's only copy, discloses nobody."""
    nested = b"From: news@example.org\r\nTo: alice@example.com\r\n\r\nhi\r\n"
    data = multipart(("Content-Type: message/rfc822", nested))
    assert run(["alice@example.com"], data).warnings == ()


@pytest.mark.parametrize("case", list(body_cases()))
def test_body_leak_warns_by_default(case: str) -> None:
    """Another recipient in a text part or nested headers: copies made, with a warning."""
    plan = run(RCPTS, body_cases()[case])
    assert len(plan.copies) == 3
    assert plan.warnings and "body names other recipients" in plan.warnings[0]


@pytest.mark.parametrize("case", list(body_cases()))
def test_body_leak_rejects_when_configured(case: str) -> None:
    """With body_check=reject the same message is 550 5.7.1."""
    err = rejected(RCPTS, body_cases()[case], body_check=BodyCheck.REJECT)
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")


@pytest.mark.parametrize("case", list(body_cases()))
def test_body_check_off_ignores_the_body(case: str) -> None:
    """With body_check=off the body is not read for addresses."""
    assert run(RCPTS, body_cases()[case], body_check=BodyCheck.OFF).warnings == ()


def test_body_naming_only_the_single_recipient_is_no_leak() -> None:
    """ "Hello alice@example.com" sent to alice alone discloses nobody."""
    plan = run(
        ["alice@example.com"],
        message(FROM, "To: alice@example.com", body=b"Hello alice@example.com\r\n"),
        body_check=BodyCheck.REJECT,
    )
    assert plan.warnings == ()


def test_base64_attachment_is_not_read_as_text() -> None:
    """A non-text part is not scanned: an address inside an application/pdf is no warning."""
    data = multipart(
        (
            "Content-Type: application/pdf\r\nContent-Transfer-Encoding: base64",
            crlf(base64.encodebytes(b"bob@example.com")),
        )
    )
    assert run(RCPTS, data, body_check=BodyCheck.REJECT).warnings == ()


def nested_multipart(depth: int) -> bytes:
    """``depth`` multipart containers, each holding the next, the innermost a text part."""
    body = b"--n1\r\nContent-Type: text/plain\r\n\r\ninnermost\r\n--n1--\r\n"
    for level in range(2, depth + 1):
        head = f'--n{level}\r\nContent-Type: multipart/mixed; boundary="n{level - 1}"\r\n\r\n'
        body = head.encode() + body + f"--n{level}--\r\n".encode()
    top = f'Content-Type: multipart/mixed; boundary="n{depth}"'
    return message(FROM, "To: alice@example.com", "MIME-Version: 1.0", top, body=body)


@pytest.mark.parametrize("body_check", list(BodyCheck))
def test_mime_nesting_101_deep_is_refused(body_check: BodyCheck) -> None:
    """101 nested multiparts are 554 5.6.0 whatever the body check; 100 pass."""
    err = rejected(["alice@example.com"], nested_multipart(101), body_check=body_check)
    assert (err.reply.code, err.reply.enhanced) == (554, "5.6.0")
    assert "MIME nesting" in err.reason
    assert len(run(["alice@example.com"], nested_multipart(100), body_check=body_check).copies) == 1


def test_body_bytes_are_shared_and_untouched() -> None:
    """Every copy's body is the same memory and equals the original body bytes."""
    body = b"line\r\n..dot-stuffed stays as given\r\n" + bytes(range(32, 127)) + b"\r\n"
    plan = run(RCPTS, message(FROM, "To: alice@example.com", body=body), body_check=BodyCheck.OFF)
    assert all(bytes(c.body) == body for c in plan.copies)
    assert len({id(c.body.obj) for c in plan.copies}) == 1


# --- found in review: spellings that once slipped past the guard -------------------------


@pytest.mark.parametrize(
    ("field", "smtputf8"),
    [
        ("X-Note: Account \u201cbob@example.com\u201d is ready", True),
        ("X-Note: =?utf-8?q?Account_=E2=80=9Cbob@example.com=E2=80=9D_ready?=", False),
        ("Subject: =?utf-8?q?Compte_=C2=ABbob@example.com=C2=BB?=", False),
        (
            "X-Participants: =?utf-8?b?"
            + base64.b64encode("carol@example.net\u3001bob@example.com".encode()).decode()
            + "?=",
            False,
        ),
        ("X-Note: =?utf-8?q?=FFbob@example.com?=", False),
        ("List-Unsubscribe: <https://shop.example.org/u?who=%C2%A0bob%40example.com>", False),
        ("X-Note: \u9023\u7d61\u5148 bob@example\u3002com", True),
        ("X-Note: b\u200bob@example.com", True),
        ("Reply-To: bob(sales)@example.com", False),
        ("Reply-To: bob @ example.com", False),
        ("Reply-To: bob@(x)example.com", False),
        ("X-Note: *bob@example.com*", False),
    ],
    ids=[
        "curly-quotes",
        "curly-quotes-2047",
        "guillemets-2047",
        "ideographic-comma",
        "invalid-byte",
        "nbsp-percent",
        "ideographic-dot",
        "zero-width",
        "comment-local",
        "spaces-at",
        "comment-domain",
        "markdown-bold",
    ],
)
def test_spellings_that_hid_an_address_are_caught(field: str, smtputf8: bool) -> None:
    """Punctuation, invisible characters, comments or spaces around an address do not hide it."""
    data = message(FROM, "To: alice@example.com", field, SUBJECT)
    err = rejected(
        ["alice@example.com", "bob@example.com", "carol@example.net"], data, smtputf8=smtputf8
    )
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")


def test_verp_form_of_a_plus_addressed_recipient_is_caught() -> None:
    """unsub-bob+news=example.com spells bob+news@example.com."""
    field = "List-Unsubscribe: <mailto:unsub-bob+news=example.com@list.example.org>"
    err = rejected(
        ["alice@example.com", "bob+news@example.com"], message(FROM, "To: alice@example.com", field)
    )
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")


@pytest.mark.parametrize("local", ["o'brien", "sales/emea", "a=b", "r&d", "x{y}"])
def test_recipients_with_url_like_characters_are_not_false_leaks(local: str) -> None:
    """A local part holding ' / = & { } is its own address, not another recipient's."""
    rcpts = ["alice@example.com", f"{local}@example.com"]
    plan = run(rcpts, message(FROM, "To: alice@example.com", SUBJECT, MSGID))
    assert [c.recipient.text for c in plan.copies] == rcpts


def test_from_listing_several_mailboxes_without_sender_is_refused() -> None:
    """From: with several mailboxes and no Sender: (RFC 5322 3.6.2) is refused 554 5.6.0:
    more likely a pasted customer list than the message's authors."""
    data = message(
        "From: news@example.org, bob@example.com, carol@example.net", "To: alice@example.com"
    )
    err = rejected(["alice@example.com", "bob@example.com", "carol@example.net"], data)
    assert (err.reply.code, err.reply.enhanced) == (554, "5.6.0")
    assert "Sender" in err.reason


def test_from_with_several_authors_and_a_sender_is_shown_to_every_copy() -> None:
    """From: naming two authors, with Sender: naming one: the authors are the sender's,
    kept byte for byte in every copy, even the copy of an author who also receives it."""
    authors = "From: Ann <ann@example.org>, Ben <ben@example.org>"
    data = message(authors, "Sender: ann@example.org", "To: alice@example.com")
    plan = run(["alice@example.com", "ben@example.org"], data)
    for rcpt, headers in headers_of(plan).items():
        assert headers == copy_headers(rcpt, authors, "Sender: ann@example.org", f"To: {rcpt}")


def test_idna_charset_in_an_encoded_word_does_not_crash() -> None:
    """=?idna?q?...?= (the codec raises) is read as Latin-1, not a crash."""
    plan = run(
        ["alice@example.com"], message(FROM, "To: alice@example.com", "Subject: =?idna?q?hello?=")
    )
    assert len(plan.copies) == 1


def test_deeply_nested_comments_do_not_crash() -> None:
    """3,000 nested comments in Sender: give copies or a refusal, never a crash."""
    nested = "(" * 3000 + ")" * 3000
    folded = "\r\n ".join(nested[i : i + 900] for i in range(0, len(nested), 900))
    data = message(FROM, "To: alice@example.com", f"Sender: x {folded}")
    try:
        plan = run(["alice@example.com"], data)
    except Rejected as exc:
        assert exc.reply.code >= 500
    else:
        assert len(plan.copies) == 1


def test_header_bytes_times_copies_over_the_budget_is_552() -> None:
    """1,000 copies of 900 KB of kept headers would cost 900 MB: refused with 552 5.3.4."""
    pad = [f"X-Pad-{i}: {'a' * 900}" for i in range(1000)]
    rcpts = [f"c{i}@example.com" for i in range(1000)]
    err = rejected(rcpts, message(FROM, "To: c0@example.com", *pad))
    assert (err.reply.code, err.reply.enhanced) == (552, "5.3.4")


@pytest.mark.parametrize(
    ("entry", "kept"),
    [
        ("Alice Example <alice@example.com>", "Alice Example"),
        ('"Example, Alice" <alice@example.com>', '"Example, Alice"'),
        ("Alice Q. Example <alice@example.com>", '"Alice Q. Example"'),
        ("O'Neil <alice@example.com>", "O'Neil"),
        ("=?utf-8?q?J=C3=B6rg?= <alice@example.com>", "=?utf-8?b?SsO2cmc=?="),
        ("<alice@example.com>", None),
    ],
)
def test_display_names_from_a_long_list_pair_element_by_element(
    entry: str, kept: str | None
) -> None:
    """In a 500-name To:, each copy keeps exactly the name paired with its own address."""
    others = [f"Customer {i} <c{i}@example.net>" for i in range(500)]
    to = "To: " + ",\r\n ".join([*others[:250], entry, *others[250:]])
    rcpts = ["alice@example.com", "c7@example.net"]
    plan = run(rcpts, message(FROM, to, SUBJECT))
    headers = headers_of(plan)
    expected = f"To: {kept} <alice@example.com>" if kept else "To: alice@example.com"
    assert headers["alice@example.com"] == copy_headers(
        "alice@example.com", FROM, expected, SUBJECT
    )
    assert headers["c7@example.net"] == copy_headers(
        "c7@example.net", FROM, "To: Customer 7 <c7@example.net>", SUBJECT
    )
