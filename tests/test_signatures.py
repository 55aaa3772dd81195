"""DKIM coverage: which application signatures a copy breaks, checked with real signatures."""

from __future__ import annotations

from collections.abc import Callable

import dkim
import pytest

from relay.core.headers import Field, parse_message
from relay.core.isolation import isolate
from relay.core.model import Envelope
from relay.core.signatures import changed_names, parse_signature
from tests.conftest import dkim_keypair, message


@pytest.fixture(scope="module")
def keys() -> tuple[bytes, bytes]:
    return dkim_keypair()


def dns(record: bytes) -> Callable[..., bytes]:
    def lookup(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"app._domainkey.example.org."
        return record

    return lookup


def signed(private: bytes, headers: list[bytes], data: bytes) -> bytes:
    signature = dkim.sign(data, b"app", b"example.org", private, include_headers=headers)
    # dkimpy folds its field with bare LF; SMTP data wants CRLF.
    return signature.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + data


DATA = message(
    "From: News <news@example.org>",
    "To: alice@example.com, bob@example.com",
    "Cc: carol@example.net",
    "Subject: November",
    body=b"Body that must verify.\r\n",
)
RCPTS = ["alice@example.com", "bob@example.com", "carol@example.net"]


def test_signature_over_unchanged_fields_still_verifies_on_every_copy(
    keys: tuple[bytes, bytes],
) -> None:
    """h=from:subject survives isolation: kept fields and body bytes are untouched."""
    private, record = keys
    data = signed(private, [b"from", b"subject"], DATA)
    assert dkim.verify(data, dnsfunc=dns(record))
    plan = isolate(Envelope.parse("news@example.org", RCPTS), data)
    for copy in plan.copies:
        assert b"DKIM-Signature" in copy.headers
        assert dkim.verify(bytes(copy), dnsfunc=dns(record))


def test_oversigned_absent_cc_still_verifies(keys: tuple[bytes, bytes]) -> None:
    """h=from:subject:cc with no Cc: in the original: the copy has none either, so it verifies."""
    private, record = keys
    data = signed(
        private, [b"from", b"subject", b"cc"], DATA.replace(b"Cc: carol@example.net\r\n", b"")
    )
    plan = isolate(Envelope.parse("news@example.org", RCPTS[:2]), data)
    for copy in plan.copies:
        assert dkim.verify(bytes(copy), dnsfunc=dns(record))


def test_signature_over_to_and_cc_is_stripped_leaving_no_broken_signature(
    keys: tuple[bytes, bytes],
) -> None:
    """h=from:to:cc is stripped from every copy: no copy carries a signature that fails."""
    private, _ = keys
    data = signed(private, [b"from", b"to", b"cc", b"subject"], DATA)
    plan = isolate(Envelope.parse("news@example.org", RCPTS), data)
    for copy in plan.copies:
        assert b"DKIM-Signature" not in copy.headers
        assert any(c.kind.value == "dkim-stripped" for c in copy.changes)


def fields(*lines: str) -> tuple[Field, ...]:
    return parse_message(message(*lines), smtputf8=False, max_header_octets=10_000).fields


def test_changed_names_follow_bottom_up_selection() -> None:
    """A Received: added on top changes nothing h=received selects, unless it was oversigned."""
    sig = parse_signature(fields("DKIM-Signature: d=example.org; s=s; h=received:from; b=x")[0])
    before = fields("Received: from a", "From: x@example.org")
    after = fields("Received: by relay", "Received: from a", "From: x@example.org")
    assert changed_names(sig, before, after) == ()
    oversigned = parse_signature(
        fields("DKIM-Signature: d=example.org; s=s; h=received:received; b=x")[0]
    )
    assert changed_names(oversigned, before, after) == ("received",)


def test_signature_without_h_is_treated_as_covering_everything() -> None:
    """A malformed signature with no h= breaks on any change."""
    sig = parse_signature(fields("DKIM-Signature: d=example.org; s=s; b=x")[0])
    assert sig.covered == ("*",)
    assert changed_names(sig, fields("A: 1"), fields("A: 2")) == ("*",)
