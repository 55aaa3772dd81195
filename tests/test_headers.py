"""Strict parsing of message data: line endings, fields, body offset."""

from __future__ import annotations

import email.errors
import email.policy

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from relay.core.errors import BadData, HeaderDefect
from relay.core.headers import check_line_endings, parse_message, plain_mailbox


@pytest.mark.parametrize(
    "data",
    [b"a\nb\r\n", b"a\rb\r\n", b"a\r\r\n", b"a\r\n\n", b"a\n\r", b"a\x00b\r\n"],
    ids=["bare-lf", "bare-cr", "cr-crlf", "crlf-lf", "lf-cr", "nul"],
)
def test_bad_line_endings_are_550_5_5_2(data: bytes) -> None:
    """Any bare CR, bare LF or NUL is refused without normalize."""
    with pytest.raises(BadData) as info:
        check_line_endings(data, normalize=False)
    assert (info.value.reply.code, info.value.reply.enhanced) == (550, "5.5.2")


def test_clean_data_is_returned_as_the_same_object() -> None:
    """CRLF-only data costs no copy."""
    data = b"a\r\nb\r\n"
    assert check_line_endings(data, normalize=False) is data


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"a\nb\n", b"a\r\nb\r\n"),
        (b"a\rb\r\n", b"a b\r\n"),
        (b"a\r\r\n", b"a \r\n"),
        (b"a\n\r", b"a\r\n "),
    ],
)
def test_normalize_turns_bare_lf_into_crlf_and_stray_cr_into_space(
    data: bytes, expected: bytes
) -> None:
    """Postfix's cleanup_replace_stray_cr_lf, before any parsing."""
    assert check_line_endings(data, normalize=True) == expected


def test_fields_keep_exact_bytes_and_body_is_a_view() -> None:
    """Folded fields keep their folding; the body starts after the first blank line."""
    data = b"Subject: one\r\n two\r\nX-A:b\r\n\r\nbody\r\n\r\nmore\r\n"
    parsed = parse_message(data, smtputf8=False, max_header_octets=1000)
    assert [(f.name, f.raw) for f in parsed.fields] == [
        ("subject", b"Subject: one\r\n two\r\n"),
        ("x-a", b"X-A:b\r\n"),
    ]
    assert parsed.fields[0].value == b" one two"
    assert bytes(parsed.body) == b"body\r\n\r\nmore\r\n"
    assert parsed.body.obj is data


def test_empty_header_section() -> None:
    """Data starting with a blank line has no fields and all body."""
    parsed = parse_message(b"\r\nbody\r\n", smtputf8=False, max_header_octets=1000)
    assert parsed.fields == ()
    assert bytes(parsed.body) == b"body\r\n"


def test_header_limit_counts_the_section_only() -> None:
    """A big body does not count against the header limit; a big header does."""
    body = b"x" * 5000 + b"\r\n"
    parse_message(b"A: b\r\n\r\n" + body, smtputf8=False, max_header_octets=100)
    with pytest.raises(HeaderDefect):
        parse_message(b"A: " + b"b" * 200 + b"\r\n\r\n", smtputf8=False, max_header_octets=100)


def test_mailboxes_of_a_malformed_list_are_not_trusted() -> None:
    """An address list with an invalid mailbox yields nothing to trust."""
    parsed = parse_message(
        b"From: bob@example.com via News <news@example.org>\r\nTo: A <a@example.com>\r\n\r\n",
        smtputf8=False,
        max_header_octets=1000,
    )
    assert parsed.fields[0].mailboxes() == []
    assert parsed.fields[1].mailboxes() == [("A", "a@example.com")]


# -- plain_mailbox: the fast path must agree with the email package wherever it answers ----

_MAILBOX_CHARS = st.sampled_from(list("abcXYZ09.-_'+ \"=<>@,;:()\\!#é\t"))
_MAILBOX_PART = st.text(alphabet=_MAILBOX_CHARS, max_size=12)


@settings(max_examples=400, deadline=None)
@given(
    _MAILBOX_PART,
    _MAILBOX_PART,
    _MAILBOX_PART,
    st.sampled_from(["{n} <{l}@{d}>", '"{n}" <{l}@{d}>', "{l}@{d}", " {l}@{d} ", "{n}<{l}@{d}>"]),
)
def test_plain_mailbox_agrees_with_the_email_package(
    name: str, local: str, domain: str, form: str
) -> None:
    text = form.format(n=name, l=local, d=domain)
    fast = plain_mailbox(text)
    if fast is None:
        return  # not a plain form: the email package decides
    header = email.policy.default.header_factory("from", text)
    assert all(isinstance(d, email.errors.ObsoleteHeaderDefect) for d in header.defects), text
    slow = [(" ".join(str(m.display_name).split()), str(m.addr_spec)) for m in header.addresses]
    assert slow == [fast], text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("news@example.org", ("", "news@example.org")),
        ("News Desk <news@example.org>", ("News Desk", "news@example.org")),
        ('"Desk, News" <news@example.org>', ("Desk, News", "news@example.org")),
        ("=?utf-8?q?N=C3=A9ws?= <news@example.org>", None),  # encoded word: the full parser
        ("news@example.org (comment)", None),
        ("a@example.org, b@example.org", None),
        ("<0@.>", None),
    ],
)
def test_plain_mailbox_forms(text: str, expected: tuple[str, str] | None) -> None:
    assert plain_mailbox(text) == expected
