"""The mistake's real shapes, and every spelling of another recipient (issue 12).

Long fields that the split replaces are accepted; long kept fields are folded;
the guard reads another recipient's address through folds, RFC 2231, URL
lists, entities, Unicode forms and invisible characters; a copy's own address
is matched whole; single-label domains follow one rule; a DKIM signature over
bytes that normalisation changed is treated as broken.
"""

from __future__ import annotations

import base64
import urllib.parse

import dkim
import pytest

from relay.core.addresses import parse_recipient
from relay.core.dkim import DkimAction
from relay.core.errors import BadAddress, Rejected
from relay.core.headers import MAX_LINE_OCTETS
from relay.core.isolation import isolate
from relay.core.model import BodyCheck, ChangeKind, Envelope, IsolationOptions, Plan
from tests.conftest import copy_headers, dkim_keypair, message

FROM = "From: Example News <news@example.org>"
RCPTS = ["alice@example.com", "bob@example.net"]


def run(rcpts: list[str], data: bytes, *, smtputf8: bool = False, **options: object) -> Plan:
    envelope = Envelope.parse("news@example.org", rcpts, smtputf8=smtputf8)
    return isolate(envelope, data, IsolationOptions(**options))  # type: ignore[arg-type]


def rejected(rcpts: list[str], data: bytes, **kwargs: object) -> Rejected:
    with pytest.raises(Rejected) as info:
        run(rcpts, data, **kwargs)  # type: ignore[arg-type]
    return info.value


def lines_of(headers: bytes) -> list[bytes]:
    return headers.split(b"\r\n")


# --- 1. Long lines in fields the split replaces or removes -----------------------------


@pytest.mark.parametrize(
    "field", ["To", "Cc", "Bcc", "Resent-To", "X-Forwarded-To", "Apparently-To"]
)
def test_a_thousand_addresses_on_one_line_of_a_replaced_field_are_accepted(field: str) -> None:
    """1,000 addresses on one unfolded line (about 25 KB) in a field the split drops: isolated."""
    rcpts = [f"customer{i:04d}@example.com" for i in range(1000)]
    line = f"{field}: " + ", ".join(rcpts)
    assert len(line) > 20 * MAX_LINE_OCTETS
    plan = run(rcpts, message(FROM, line, "Subject: hi"))
    assert len(plan.copies) == 1000
    to = "To: customer0000@example.com" if field == "To" else None
    first = plan.copies[0]
    expected = [FROM, *([to] if to else []), "Subject: hi"]
    if to is None:
        expected.append("To: customer0000@example.com")
    assert first.headers == copy_headers("customer0000@example.com", *expected)
    assert all(max(map(len, lines_of(c.headers))) <= MAX_LINE_OCTETS for c in plan.copies)


def test_a_configured_removal_is_accepted_however_long() -> None:
    """A field the deployment adds to the removal list is dropped, so its length is no defect."""
    line = "X-Campaign-List: " + " ".join(f"c{i}@example.com" for i in range(500))
    plan = run(
        RCPTS, message(FROM, "To: alice@example.com", line), removed_headers={"x-campaign-list"}
    )
    assert all(b"X-Campaign-List" not in c.headers for c in plan.copies)


def test_phpmailer_hard_wrap_inside_an_address_is_unfolded_and_replaced() -> None:
    """A To: wrapped at 997 octets with a fold inside an address (PHPMailer's wrap) is isolated."""
    rcpts = [f"member{i:03d}@example.com" for i in range(100)]
    flat = ", ".join(rcpts)
    wrapped = "\r\n ".join(flat[i : i + 990] for i in range(0, len(flat), 990))
    plan = run(rcpts, message(FROM, "To: " + wrapped))
    assert [c.recipient.text for c in plan.copies] == rcpts
    assert plan.copies[5].headers == copy_headers(rcpts[5], FROM, f"To: {rcpts[5]}")


# --- 1. Long lines in kept fields: folded, or refused ---------------------------------


def test_a_long_kept_field_is_folded_at_its_spaces_to_78_octets() -> None:
    """A 3,000-octet Subject: is folded before its own spaces; unfolded, it is the same value."""
    words = " ".join(f"word{i}" for i in range(400))
    plan = run(RCPTS, message(FROM, "To: alice@example.com", f"Subject: {words}"))
    for copy in plan.copies:
        subject = next(
            line for line in copy.headers.split(b"\r\n\r\n")[0].split(b"\r\nSubject:")[1:]
        )
        folded = b"Subject:" + subject
        assert folded.replace(b"\r\n", b"") == f"Subject: {words}".encode()
        assert max(len(line) for line in folded.split(b"\r\n")) <= 78
        assert [c.kind for c in copy.changes if c.header == "Subject"] == [ChangeKind.FOLDED]


def test_a_kept_field_of_998_octets_is_kept_byte_for_byte() -> None:
    """The limit itself is no reason to fold: a 998-octet line is kept as it is."""
    line = "X-Note: " + "a " * 494 + "ab"
    assert len(line) == MAX_LINE_OCTETS
    plan = run(RCPTS, message(FROM, "To: alice@example.com", line))
    assert f"\r\n{line}\r\n".encode() in plan.copies[0].headers
    assert not any(c.kind is ChangeKind.FOLDED for c in plan.copies[0].changes)


def test_a_long_word_is_kept_on_a_line_of_its_own_up_to_998_octets() -> None:
    """A 900-octet token (a long URL) cannot be cut: it gets a line of its own."""
    token = "https://example.org/" + "x" * 880
    line = f"X-Link: see {token} and more words here"
    plan = run(RCPTS, message(FROM, "To: alice@example.com", line + " " + "w " * 100))
    headers = plan.copies[0].headers
    assert max(map(len, lines_of(headers))) <= MAX_LINE_OCTETS
    assert f"\r\n {token}\r\n".encode() in headers


def test_a_long_kept_field_without_whitespace_is_refused_naming_it() -> None:
    """A kept field with 1,200 octets and no space cannot be folded: 554 5.6.0 naming it."""
    err = rejected(RCPTS, message(FROM, "To: alice@example.com", "X-Token: " + "z" * 1200))
    assert (err.reply.code, err.reply.enhanced) == (554, "5.6.0")
    assert "X-Token" in err.reason


def test_a_folded_field_under_a_dkim_signature_strips_it() -> None:
    """Folding changes the bytes a signature covers: the configured action applies (strip)."""
    words = " ".join(f"w{i}" for i in range(400))
    sig = "DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=s1; h=from:subject; bh=x; b=y"
    plan = run(RCPTS, message(FROM, sig, "To: alice@example.com", f"Subject: {words}"))
    assert all(b"DKIM-Signature" not in c.headers for c in plan.copies)
    assert any(c.kind is ChangeKind.DKIM_STRIPPED for c in plan.copies[0].changes)


# --- 2. Every spelling of another recipient in a kept field ---------------------------

SPELLINGS = {
    "fold inside the local part": "Reply-To: bo\r\n b@example.net",
    "fold inside the domain": "Reply-To: bob@exam\r\n ple.net",
    "fold before the @": "Reply-To: bob\r\n @example.net",
    "fold after the @": "Reply-To: bob@\r\n example.net",
    "fold around a dot": "Reply-To: bob@example\r\n\t.net",
    "RFC 2231 extended segments": (
        "Content-Type: text/plain; name*0*=utf-8''bob%40exa; name*1*=mple.net"
    ),
    "RFC 2231 plain segments": (
        'Content-Disposition: attachment; filename*0="bob@"; filename*1="example.net"'
    ),
    "RFC 2231 Latin-1 charset": "X-Info: x; who*=iso-8859-1'en'bob%40example.net",
    "List-Unsubscribe with blanks in the URL": "List-Unsubscribe: <mailto:bob@exa mple.net>",
    "List-Post folded inside the URL": "List-Post: <mailto:bob@example\r\n .net>",
    "List-Help with %40": "List-Help: <mailto:list@example.org?body=bob%40example.net>",
    "mailto with &amp;": (
        "List-Unsubscribe: <mailto:u@example.org?subject=x&amp;who=bob@example.net>"
    ),
    "entity-encoded @": "X-Note: bob&#64;example.net",
    "named entity @": "X-Note: bob&commat;example.net",
    "upper case": "Reply-To: BOB@EXAMPLE.NET",
    "fullwidth domain": "Reply-To: bob@\uff45xample.net",
    "fullwidth at sign": "Reply-To: bob\uff20example.net",
    "small commercial at": "Reply-To: bob\ufe6bexample.net",
    "ideographic full stop": "Reply-To: bob@example\u3002net",
    "RFC 2047 split across words": "Reply-To: =?utf-8?q?bo?= =?utf-8?q?b=40example=2Enet?=",
    "RFC 2047 base64": "Reply-To: =?utf-8?b?Ym9iQGV4YW1wbGUubmV0?=",
}
INVISIBLES = {
    "zero-width space": "\u200b",
    "zero-width joiner": "\u200d",
    "word joiner": "\u2060",
    "soft hyphen": "\u00ad",
    "combining grapheme joiner": "\u034f",
    "variation selector 16": "\ufe0f",
    "variation selector 256": "\U000e01ef",
    "right-to-left override": "\u202e",
    "first strong isolate": "\u2068",
    "tag letter A": "\U000e0041",
    "Hangul filler": "\u3164",
    "Mongolian vowel separator": "\u180e",
    "byte order mark": "\ufeff",
}


@pytest.mark.parametrize("case", list(SPELLINGS))
def test_every_spelling_of_another_recipient_is_refused(case: str) -> None:
    """Another recipient, spelled as a sender could spell it in a kept field: 550 5.7.1."""
    data = message(FROM, "To: alice@example.com", SPELLINGS[case])
    err = rejected(RCPTS, data, smtputf8=not data.isascii())
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")


@pytest.mark.parametrize("case", list(INVISIBLES))
@pytest.mark.parametrize("where", ["local", "domain"])
def test_invisible_characters_do_not_hide_another_recipient(case: str, where: str) -> None:
    """Every Default_Ignorable_Code_Point inside the address leaves it visible to the guard."""
    mark = INVISIBLES[case]
    spelled = f"bo{mark}b@example.net" if where == "local" else f"bob@exa{mark}mple.net"
    err = rejected(RCPTS, message(FROM, "To: x@example.com", f"Reply-To: {spelled}"), smtputf8=True)
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")


@pytest.mark.parametrize(
    ("envelope", "header"),
    [
        ("bob@b\u00fccher.example", "bob@xn--bcher-kva.example"),
        ("bob@xn--bcher-kva.example", "bob@b\u00fccher.example"),
        ("bob@b\u00fccher.example", "bob@bu\u0308cher.example"),  # decomposed (NFD)
        ("bob@b\u00fccher.example", "bob@B\u00dcCHER.example"),
        ("bob@b\u00fccher.example", "bob@XN--BCHER-KVA.EXAMPLE"),
    ],
)
def test_every_idna_form_of_a_domain_is_the_same_domain(envelope: str, header: str) -> None:
    """U-label, A-label, decomposed and case-folded forms of one domain all match."""
    data = message(FROM, "To: alice@example.com", f"Reply-To: {header}")
    err = rejected(["alice@example.com", envelope], data, smtputf8=True)
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")


# --- 3. A copy's own address, exactly ---------------------------------------------------


@pytest.mark.parametrize(
    ("own", "other"),
    [
        ("ann@example.com", "joann@example.com"),
        ("joann@example.com", "ann@example.com"),
        ("o'brien@example.com", "brien@example.com"),
        ("news+ann@example.com", "ann@example.com"),
        ("x.bob@example.com", "bob@example.com"),
    ],
)
def test_a_copy_never_hides_another_recipient_inside_its_own_address(own: str, other: str) -> None:
    """One recipient's address is another's tail: a kept field naming the other is refused."""
    data = message(FROM, f"To: {own}", f"Reply-To: {other}")
    err = rejected([own, other], data)
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")


@pytest.mark.parametrize("own", ["o'brien@example.com", "news?ann@example.com", "a/b@example.com"])
def test_a_copy_may_show_its_own_address_whose_tail_is_another_recipient(own: str) -> None:
    """Each copy's own unsubscribe link names it whole: no disclosure, so no refusal."""
    tail = own.replace("o'", "").replace("news?", "").replace("a/", "")
    plan = run([own, tail], message(FROM, "To: x@example.com"))
    assert len(plan.copies) == 2
    # The own address in a field shared by every copy would show it to the other: refused.
    shared = message(FROM, "To: x@example.com", f"List-Unsubscribe: <mailto:{own}>")
    assert rejected([own, tail], shared).reply.code == 550


# --- 6. Single-label and local domains --------------------------------------------------


def test_a_single_label_sender_is_accepted() -> None:
    """<root@localhost> (cron, msmtp/swaks defaults) is accepted: the provider decides."""
    plan = isolate(
        Envelope.parse("root@localhost", ["alice@example.com"]), message("To: x@example.com")
    )
    assert len(plan.copies) == 1


@pytest.mark.parametrize("rcpt", ["root@localhost", "user@host", "ops@INTRANET"])
def test_a_single_label_recipient_is_refused_saying_why(rcpt: str) -> None:
    """RCPT TO:<root@localhost>: 553 5.1.3 saying the domain must be fully qualified."""
    with pytest.raises(BadAddress) as info:
        parse_recipient(rcpt, smtputf8=False, local_domains=frozenset())
    assert (info.value.reply.code, info.value.reply.enhanced) == (553, "5.1.3")
    assert "fully qualified" in info.value.reply.text


def test_a_named_local_domain_is_accepted_for_recipients() -> None:
    """smtp.local_domains = ["localhost"]: RCPT TO:<root@localhost> is accepted."""
    address = parse_recipient(
        "root@LocalHost", smtputf8=False, local_domains=frozenset({"localhost"})
    )
    assert address.text == "root@LocalHost"


# --- 7. DKIM after normalisation --------------------------------------------------------


def signed(data: bytes, private: bytes, headers: list[bytes]) -> bytes:
    return dkim.sign(data, b"s1", b"example.org", private, include_headers=headers) + data


@pytest.mark.parametrize(
    ("headers", "body", "verifies"),
    [
        ([b"from", b"subject"], b"Hello.\rStray CR in the body.\r\n", False),
        ([b"from", b"x-note"], b"Hello.\r\n", False),
        # dkimpy signs a bare LF as CRLF (RFC 6376 5.3): fail safe, it is stripped all the same.
        ([b"from", b"subject"], b"Hello.\nBare LF in the body.\r\n", True),
    ],
)
def test_a_signature_over_bytes_normalisation_changed_gets_the_dkim_action(
    headers: list[bytes], body: bytes, verifies: bool
) -> None:
    """normalize_line_endings: a signature over a changed body or signed header is stripped
    (keeping it would send a signature that no longer verifies), or refused with reject."""
    private, public = dkim_keypair()
    note = b"X-Note: stray\rCR\r\n" if b"x-note" in headers else b"X-Note: clean\r\n"
    data = signed(
        b"From: news@example.org\r\nTo: alice@example.com\r\nSubject: hi\r\n"
        + note
        + b"\r\n"
        + body,
        private,
        headers,
    )
    plan = run(["alice@example.com"], data, normalize=True)
    copy = plan.copies[0]
    assert b"DKIM-Signature" not in copy.headers
    stripped = [c for c in copy.changes if c.kind is ChangeKind.DKIM_STRIPPED]
    assert stripped and "normalisation" in stripped[0].reason
    # What keeping it would have sent: the signature over the normalised bytes fails.
    kept = data[: data.index(b"From:")] + copy.headers + bytes(copy.body)
    assert dkim.verify(kept, dnsfunc=lambda *_, **__: public) is verifies
    with pytest.raises(Rejected):
        run(["alice@example.com"], data, normalize=True, dkim_action=DkimAction.REJECT)


def test_a_signature_over_nothing_normalisation_changed_is_kept() -> None:
    """A stray CR in an unsigned header only: the signature still verifies, so it is kept."""
    private, public = dkim_keypair()
    data = signed(
        b"From: news@example.org\r\nTo: alice@example.com\r\nSubject: hi\r\n\r\nHello.\r\n",
        private,
        [b"from", b"subject"],
    )
    data = data.replace(b"Subject: hi\r\n", b"Subject: hi\r\nX-Note: a\rb\r\n")
    copy = run(["alice@example.com"], data, normalize=True).copies[0]
    assert b"DKIM-Signature" in copy.headers
    assert dkim.verify(copy.headers + bytes(copy.body), dnsfunc=lambda *_, **__: public)


# --- 8. False positives: legitimate mail is delivered ----------------------------------


def test_a_legitimate_newsletter_is_delivered_to_everyone_unchanged() -> None:
    """List headers, a long folded Subject:, Unicode names, an address-shaped Message-ID,
    several authors with a Sender:, and a forwarded mail from the sender: all delivered."""
    fields = [
        "From: =?utf-8?q?Z=C3=BCrich_News?= <news@example.org>, Ann <ann@example.org>",
        "Sender: news@example.org",
        "Reply-To: Help Desk <help@example.org>",
        "To: undisclosed-recipients:;",
        "Subject: Your weekly digest: " + " ".join(f"topic{i}" for i in range(150)),
        "Message-ID: <20261202.digest@mail.example.org>",
        "References: <20261125.digest@mail.example.org>",
        "List-Id: Weekly digest <digest.example.org>",
        "List-Unsubscribe: <mailto:unsubscribe@example.org?subject=unsubscribe>,\r\n"
        " <https://example.org/unsubscribe?list=digest&amp;week=48>",
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
        "Content-Type: multipart/mixed; boundary=b1",
        "MIME-Version: 1.0",
    ]
    body = (
        b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nWrite to help@example.org.\r\n"
        b"--b1\r\nContent-Type: message/rfc822\r\n\r\n"
        b"From: news@example.org\r\nTo: news@example.org\r\nSubject: last week\r\n\r\nhi\r\n"
        b"--b1--\r\n"
    )
    rcpts = [f"reader{i}@example.com" for i in range(20)]
    plan = run(rcpts, message(*fields, body=body), body_check=BodyCheck.REJECT)
    assert len(plan.copies) == 20 and plan.warnings == ()
    for copy in plan.copies:
        for line in [*fields[:3], *fields[5:]]:  # To: rebuilt, Subject: folded
            assert line.encode() + b"\r\n" in copy.headers
        assert f"\r\nTo: {copy.recipient.text}\r\n".encode() in copy.headers


@pytest.mark.parametrize(
    "field",
    [
        "X-Pair: <alice@example.com><bob@example.net>",
        "X-Pair: <alice@example.com>bob@example.net",
        "Received: from a.example.org by b.example.org for <alice@example.com>,\r\n"
        " <bob@example.net>; Mon, 2 Nov 2026 10:00:00 +0000",
    ],
)
def test_a_bracketed_own_address_beside_another_recipient_is_still_refused(field: str) -> None:
    """The guard reads a field with the copy's own "<address>" set aside once for every copy;
    the other recipient next to it is still found in both copies."""
    err = rejected(RCPTS, message(FROM, "To: x@example.com", field))
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")


# --- Found by a second reader: each was delivered before its fix -----------------------

H = "From: me@shop.example\r\nTo: ann@x.example\r\nSubject: hi\r\n"
THREE = ["ann@x.example", "bob@y.example", "carol@z.example"]


def with_attachment(part_headers: str) -> bytes:
    return (
        H + "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=BB\r\n\r\n"
        "--BB\r\nContent-Type: text/plain\r\n\r\nhi\r\n"
        f"--BB\r\n{part_headers}\r\n\r\n%PDF\r\n--BB--\r\n"
    ).encode()


def refused(
    rcpts: list[str], data: bytes, *, sender: str = "me@shop.example", **kw: object
) -> Rejected:
    envelope = Envelope.parse(sender, rcpts, smtputf8=not data.isascii())
    with pytest.raises(Rejected) as info:
        isolate(envelope, data, IsolationOptions(**kw))  # type: ignore[arg-type]
    return info.value


@pytest.mark.parametrize(
    "part",
    [
        'Content-Disposition: attachment; filename="bob@y.example.pdf"',
        "Content-Disposition: attachment; filename*0*=utf-8''bob%40y; filename*1=.example.pdf",
        'Content-Type: application/pdf; name="bob@y.example"',
        "Content-Description: statement for bob@y.example",
    ],
)
def test_an_attachments_header_naming_another_recipient_is_refused(part: str) -> None:
    """A body part's own header fields (its file name) are shown to the recipient too."""
    err = refused(THREE, with_attachment(part))
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")
    assert "part 2" in err.reason


@pytest.mark.parametrize(
    "fields",
    [
        "Sender: ann@x.example, bob@y.example, carol@z.example\r\n",
        "From: bob@y.example\r\nFrom: carol@z.example\r\n",
        "Sender: bob@y.example\r\nSender: carol@z.example\r\n",
    ],
)
def test_a_sender_field_cannot_be_widened_to_exempt_recipients(fields: str) -> None:
    """Several Sender: mailboxes, or repeated From:/Sender: fields, are 554 5.6.0."""
    err = refused(THREE, (H + fields + "\r\nb\r\n").encode())
    assert (err.reply.code, err.reply.enhanced) == (554, "5.6.0")


def test_a_removed_sender_exempts_nobody() -> None:
    """With Sender: on the removal list, a Sender: naming bob does not let Reply-To show him."""
    data = (H + "Sender: bob@y.example\r\nReply-To: bob@y.example\r\n\r\nb\r\n").encode()
    err = refused(THREE, data, removed_headers=frozenset({"sender"}))
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")


def test_a_utf8_author_may_receive_a_copy_of_their_own_message() -> None:
    """From: Jörg <jörg@shop.example> (SMTPUTF8) sending to himself too: delivered."""
    data = "From: Jörg <jörg@shop.example>\r\nTo: ann@x.example\r\n\r\nhi\r\n".encode()
    envelope = Envelope.parse(
        "bounces@shop.example", ["ann@x.example", "jörg@shop.example"], smtputf8=True
    )
    assert len(isolate(envelope, data).copies) == 2


@pytest.mark.parametrize(
    "value",
    [
        "bob@y .example",
        "bob@y. example",
        "bob@y (c) .example",
        "bob .smith@y.example",
        '"bob".smith@y.example',
        'bob."smith"@y.example',
        "bob\uff20exa\r\n mple.com",
        "bob\ufe6bexa\r\n mple.com",
        "bob@exa\r\n  mple.com",
    ],
)
def test_obsolete_and_folded_spellings_are_read(value: str) -> None:
    """Blanks and quoted words around dots (RFC 5322 4.4), fullwidth at signs across a fold."""
    rcpts = [*THREE, "bob.smith@y.example", "bob@example.com"]
    err = refused(rcpts, (H + f"Reply-To: {value}\r\n\r\nb\r\n").encode())
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")


def test_a_decomposed_envelope_address_matches_its_composed_spelling() -> None:
    """RCPT bo\u0308b@y.example and a Reply-To of the composed b\u00f6b@y.example: refused."""
    data = (H + "Reply-To: b\u00f6b@y.example\r\n\r\nb\r\n").encode()
    err = refused(["ann@x.example", "bo\u0308b@y.example"], data)
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")


@pytest.mark.parametrize("ending", ["\r\n", "\n"])
def test_a_forwarded_mail_inside_an_encoded_message_is_an_embedded_message(ending: str) -> None:
    """message/rfc822 inside a base64 message/global, LF or CRLF inside: embedded check."""
    inner = (
        f"From: z@q.example{ending}Cc: bob@exa{ending} mple.com{ending}{ending}hello{ending}"
    ).encode()
    outer = b"Content-Type: message/rfc822\r\n\r\n" + inner
    data = (
        (
            H + "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=BB\r\n\r\n--BB\r\n"
            "Content-Type: message/global\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        ).encode()
        + base64.encodebytes(outer).replace(b"\n", b"\r\n")
        + b"--BB--\r\n"
    )
    err = refused(["ann@x.example", "bob@example.com"], data)
    assert "header section in the body" in err.reason


def test_rfc2231_sections_are_not_hidden_by_the_own_address_placeholder() -> None:
    """ann (the sender) and joann: ref*0=jo; ref*1=<ann@...> reads as joann in ann's copy."""
    data = (H + "X-Campaign: id; ref*0=jo; ref*1=<ann@x.example>\r\n\r\nb\r\n").encode()
    err = refused(["ann@x.example", "joann@x.example"], data, sender="ann@x.example")
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")


@pytest.mark.parametrize(
    "field",
    [
        "X-A: p*0=bob@exa; p*1=mple.com",
        # Cut inside a UTF-16 code unit: the charset is the whole value's, decoded once.
        "Content-Type: text/plain; name*0*=utf-16be''{}; name*1*={}".format(
            *(
                urllib.parse.quote(half, safe="")
                for half in (
                    "bob@example.com".encode("utf-16be")[:15],
                    "bob@example.com".encode("utf-16be")[15:],
                )
            )
        ),
    ],
)
def test_rfc2231_sections_are_joined_however_they_start_or_are_bracketed(field: str) -> None:
    """Sections joined before decoding, a first item that is a section, brackets dropped."""
    rcpts = ["ann@x.example", "joann@x.example", "bob@example.com"]
    err = refused(rcpts, (H + field + "\r\n\r\nb\r\n").encode(), sender="ann@x.example")
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")


@pytest.mark.parametrize(
    "signature",
    [
        "DKIM-Signature: v=1; a=rsa-sha256; c=simple/simple; d=example.org; s=s1; h=from;"
        + " x-note="
        + "w " * 600
        + "; bh=x; b=y",
        "DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=s1; h=from:subject;\r bh=x; b=y",
    ],
)
def test_a_signature_whose_own_field_the_relay_changes_is_stripped(signature: str) -> None:
    """A signature signs its own field (RFC 6376 3.7): folded or normalised, it is stripped."""
    data = (signature + "\r\n" + H + "\r\nb\r\n").encode()
    plan = run(["ann@x.example"], data, normalize=True)
    assert b"DKIM-Signature" not in plan.copies[0].headers


def test_every_copy_shares_one_body_view() -> None:
    """The body is one memoryview shared by every copy (model.Copy), not one per copy."""
    plan = run(RCPTS, message(FROM, "To: alice@example.com", body=b"Hello.\r\n" * 100))
    assert all(c.body is plan.copies[0].body for c in plan.copies)


def test_a_fold_at_the_end_of_an_rfc2231_section_is_read_joined() -> None:
    """name*1="0x@e<fold> " (found by the property test): joined, the sections spell r0100x."""
    field = (
        'Content-Disposition: inline; name*0="r010"; name*1="0x@e\r\n "; name*2="xamp";'
        ' name*3="le.c"; name*4="om"'
    )
    rcpts = ["r0100x@example.com", "r1100x@example.com"]
    err = refused(rcpts, (H + field + "\r\n\r\nb\r\n").encode())
    assert (err.reply.code, err.reply.enhanced) == (550, "5.7.1")
