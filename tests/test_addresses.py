"""Envelope address validation and duplicate keys (SPEC 4; SPEC 9 "Envelope addresses")."""

from __future__ import annotations

import pytest

from relay.core.addresses import domain_key, parse_address
from relay.core.errors import BadAddress


@pytest.mark.parametrize(
    "text",
    [
        "alice\r@example.com",
        "alice@example.com\r\nRCPT TO:<victim@example.net>",
        "ali\nce@example.com",
        "alice\x00@example.com",
        "ali\tce@example.com",
        '"x\rBcc: y"@example.com',
        '"a,b@evil"@example.com',
        '"<evil@x>"@example.com',
        '"a\\"b"@example.com',
        "@relay.example.net:alice@example.com",
        "@a.example,@b.example:alice@example.com",
        "alice@[192.0.2.1]",
        "alice@[IPv6:2001:db8::1]",
        "alice(comment)@example.com",
        "alice@example.com(comment)",
        "alice@(comment)example.com",
        "a" * 65 + "@example.com",
        "alice@",
        "@example.com",
        "alice",
        "alice@localhost",
        "alice@example..com",
        "alice@-example.com",
        "alice@example.com.",
        ".alice@example.com",
        "alice.@example.com",
        "al..ice@example.com",
        "alice@exa_mple.com",
        "alice@xn--zz.example",
        "alice@" + "a" * 64 + ".example",
    ],
)
def test_bad_addresses_are_refused_with_553_5_1_3(text: str) -> None:
    """Each hostile or malformed envelope address is 553 5.1.3."""
    with pytest.raises(BadAddress) as info:
        parse_address(text, smtputf8=True)
    assert (info.value.reply.code, info.value.reply.enhanced) == (553, "5.1.3")


@pytest.mark.parametrize("text", ["jörg@example.com", "alice@bücher.example"])
def test_non_ascii_without_smtputf8_is_553_5_6_7(text: str) -> None:
    """Non-ASCII addresses need SMTPUTF8: 553 5.6.7 without it, accepted with it."""
    with pytest.raises(BadAddress) as info:
        parse_address(text, smtputf8=False)
    assert (info.value.reply.code, info.value.reply.enhanced) == (553, "5.6.7")
    address = parse_address(text, smtputf8=True)
    assert address is not None and address.text == text


@pytest.mark.parametrize(
    "text",
    [
        "alice@example.com",
        "first.last+tag@mail.example.org",
        "o'brien@example.net",
        "x!#$%&'*+/=?^_`{|}~-@example.com",
        '"john doe"@example.com',
        "a" * 64 + "@example.com",
        "alice@xn--bcher-kva.example",
        "ALICE@EXAMPLE.COM",
    ],
)
def test_good_addresses_are_kept_exactly(text: str) -> None:
    """Valid addresses pass, and what is accepted is exactly what will be sent."""
    address = parse_address(text, smtputf8=False)
    assert address is not None and address.text == text


def test_null_sender_only_where_allowed() -> None:
    """<> is a valid MAIL FROM (None) but never a recipient."""
    assert parse_address("", smtputf8=False, allow_null=True) is None
    with pytest.raises(BadAddress):
        parse_address("", smtputf8=False)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("bob@example.com", "bob@EXAMPLE.COM"),
        ("x@bücher.example", "x@xn--bcher-kva.example"),
        ("x@BÜCHER.example", "x@XN--BCHER-KVA.EXAMPLE"),
    ],
)
def test_duplicate_keys_fold_domain_case_and_idna_form(a: str, b: str) -> None:
    """Domains compare case-insensitively and IDNA-normalised; the key says so."""
    pa, pb = parse_address(a, smtputf8=True), parse_address(b, smtputf8=True)
    assert pa is not None and pb is not None and pa.key == pb.key


def test_local_part_case_is_significant() -> None:
    """RFC 5321 2.4: Bob@ and bob@ are different mailboxes."""
    pa, pb = (
        parse_address("Bob@example.com", smtputf8=False),
        parse_address("bob@example.com", smtputf8=False),
    )
    assert pa is not None and pb is not None and pa.key != pb.key


def test_domain_key_is_the_lower_case_a_label() -> None:
    """U-labels map to A-labels; invalid IDNA falls back to lower case."""
    assert domain_key("Bücher.Example") == "xn--bcher-kva.example"
    assert domain_key("EXAMPLE.COM") == "example.com"
