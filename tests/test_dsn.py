"""Delivery status notifications: exact bytes, RFC 3464 fields, one recipient only."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import re
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage, Message
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config import load
from relay.core import dsn
from relay.core.dsn import Failure, build_dsn, dsn_recipient_ok
from relay.core.errors import ConfigError
from relay.upstream.target import dsn_credentials

ARRIVED = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
NOW = ARRIVED + timedelta(days=2, minutes=1)
ADDRESS = re.compile(r"""[^\s<>()\[\]",;:]+@[^\s<>()\[\]",;:]+""")
# The failed copy for bob of a message sent to bob and carol: its To names bob only.
COPY_HEADERS = (
    b"Received: from app by relay.example.org for <bob@example.com>\r\n"
    b"From: App <app@example.com>\r\n"
    b"To: Bob <bob@example.com>\r\n"
    b"Subject: Your order\r\n"
    b"Message-ID: <order-1@example.com>\r\n"
    b"\r\n"
)


def make_failure(**changes: Any) -> Failure:
    base = Failure(
        queue_id="Q7F3A",
        sender="app@example.com",
        recipient="bob@example.com",
        status="5.1.1",
        diagnostic="550 5.1.1 <bob@example.com>: user unknown",
        remote_mta="mx.example.net",
        arrival_date=ARRIVED,
        last_attempt=ARRIVED + timedelta(minutes=1),
        expired=False,
        original_headers=COPY_HEADERS,
    )
    return dataclasses.replace(base, **changes)


def build(failure: Failure | None = None) -> bytes:
    return build_dsn(
        failure or make_failure(),
        reporting_mta="relay.example.org",
        now=NOW,
        message_id="dsn.Q7F3A@relay.example.org",
    )


def parse(data: bytes) -> EmailMessage:
    msg = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def parts(msg: EmailMessage) -> list[EmailMessage]:
    found = [part for part in msg.iter_parts() if isinstance(part, EmailMessage)]
    assert len(found) == len(list(msg.iter_parts()))
    return found


def report_blocks(msg: EmailMessage) -> list[Message]:
    payload = parts(msg)[1].get_payload()
    assert isinstance(payload, list)
    return [block for block in payload if isinstance(block, Message)]


def flat(text: str) -> str:
    """``text`` with line wrapping undone."""
    return " ".join(text.split())


def assert_no_defects(msg: EmailMessage) -> None:
    for part in msg.walk():
        assert part.defects == []
        for name, value in part.items():
            assert getattr(value, "defects", ()) == (), name


def assert_exact_lines(data: bytes) -> None:
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\0" not in data
    assert data.endswith(b"\r\n")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_top_level_header_fields() -> None:
    """The DSN comes from MAILER-DAEMON, goes to the sender and says it is automatic."""
    msg = parse(build())
    assert_no_defects(msg)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.org>"
    assert msg["To"] == "app@example.com"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Date"].datetime == NOW
    assert msg["Message-ID"] == "<dsn.Q7F3A@relay.example.org>"
    assert msg["MIME-Version"] == "1.0"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert [p.get_content_type() for p in parts(msg)] == [
        "text/plain",
        "message/delivery-status",
        "text/rfc822-headers",
    ]


def test_the_legacy_email_parser_agrees() -> None:
    """The compat32 parser sees the same three parts with no defects."""
    msg = email.message_from_bytes(build())
    assert msg.get_content_type() == "multipart/report"
    assert msg.defects == []
    payload = msg.get_payload()
    assert isinstance(payload, list)
    assert len(payload) == 3


def test_delivery_status_fields() -> None:
    """Per-message fields, a blank line, then the per-recipient fields of RFC 3464."""
    blocks = report_blocks(parse(build()))
    assert len(blocks) == 2
    per_message, per_recipient = blocks
    assert per_message["Reporting-MTA"] == "dns; relay.example.org"
    assert per_message["X-Queue-ID"] == "Q7F3A"
    assert per_message["Arrival-Date"] == "Wed, 01 May 2024 12:00:00 +0000"
    assert dict(per_recipient) == {
        "Final-Recipient": "rfc822; bob@example.com",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.example.net",
        "Diagnostic-Code": "smtp; 550 5.1.1 <bob@example.com>: user unknown",
        "Last-Attempt-Date": "Wed, 01 May 2024 12:01:00 +0000",
    }


def test_unknown_remote_and_diagnostic_are_left_out() -> None:
    """No Remote-MTA or Diagnostic-Code field is invented when there was none."""
    blocks = report_blocks(parse(build(make_failure(remote_mta="", diagnostic=""))))
    assert "Remote-MTA" not in blocks[1]
    assert "Diagnostic-Code" not in blocks[1]
    human = parts(parse(build(make_failure(remote_mta="", diagnostic=""))))[0].get_content()
    assert "status 5.1.1" in human


def test_a_diagnostic_that_is_no_smtp_reply_gets_its_own_type() -> None:
    """Only an SMTP reply is labelled smtp (RFC 3464 2.3.6)."""
    failure = make_failure(diagnostic="connection refused", status="4.4.1", expired=True)
    blocks = report_blocks(parse(build(failure)))
    assert blocks[1]["Diagnostic-Code"] == "X-Solo-Relay; connection refused"


def test_only_the_failed_recipient_is_named() -> None:
    """The text parts name bob and no other recipient; the header part adds only the sender."""
    failure = make_failure(diagnostic="550 5.1.1 bob@example.com unknown; carol@example.com too")
    data = build(failure)
    assert b"carol" not in data
    human, report, headers = parts(parse(data))
    assert set(ADDRESS.findall(human.get_content())) == {"bob@example.com"}
    assert set(ADDRESS.findall(report.as_string())) == {"bob@example.com"}
    header_lines = headers.get_content().splitlines()
    named = {
        a
        for line in header_lines
        if not line.startswith("Message-ID:")
        for a in ADDRESS.findall(line)
    }
    assert named == {"bob@example.com", "app@example.com"}
    assert "[address removed]" in human.get_content()


def test_original_headers_are_crlf_without_the_blank_line() -> None:
    """Bare LF and CR become CRLF, NUL goes, and nothing after the header section is kept."""
    original = b"From: App <app@example.com>\nTo: <bob@example.com>\rSubject: x\x00y\n\nbody line\n"
    data = build(make_failure(original_headers=original))
    headers = parts(parse(data))[2]
    assert headers.get_content() == (
        "From: App <app@example.com>\r\nTo: <bob@example.com>\r\nSubject: xy\r\n"
    )
    assert b"body line" not in data
    assert_exact_lines(data)


def test_lines_are_crlf_and_at_most_998_octets() -> None:
    """A huge diagnostic and a huge original header line cannot make a long line."""
    failure = make_failure(
        diagnostic="550 " + "x" * 5000 + " " + "word " * 400,
        original_headers=b"Subject: " + "\u00e9".encode() * 1500 + b"\r\nTo: <bob@example.com>\r\n",
    )
    data = build(failure)
    assert_exact_lines(data)
    msg = parse(data)
    assert_no_defects(msg)
    diagnostic = report_blocks(msg)[1]["Diagnostic-Code"]
    assert diagnostic.endswith("...")
    assert len(diagnostic) <= len("smtp; ") + dsn.DIAGNOSTIC_MAX
    headers = parts(msg)[2].get_content()
    assert headers.startswith("Subject: \u00e9")  # cut on a character boundary
    assert "\ufffd" not in headers


def test_permanent_failure_wording() -> None:
    """A permanent refusal says it will not be retried."""
    human = parts(parse(build()))[0].get_content()
    assert "refused it permanently" in human
    assert "lifetime" not in human
    assert "<bob@example.com>:" in human
    assert "550 5.1.1" in human
    assert "mx.example.net" in human


def test_expiry_wording_and_status() -> None:
    """An expired copy says its lifetime ended and reports action failed with 4.4.7."""
    failure = make_failure(
        status="4.4.7",
        diagnostic="451 4.3.0 try again later",
        expired=True,
        last_attempt=NOW,
    )
    msg = parse(build(failure))
    human = parts(msg)[0].get_content()
    assert "lifetime" in human
    assert "permanently" not in human
    assert "retried until Fri, 03 May 2024 12:01:00 +0000" in flat(human)
    per_recipient = report_blocks(msg)[1]
    assert (per_recipient["Action"], per_recipient["Status"]) == ("failed", "4.4.7")
    assert "Will-Retry-Until" not in per_recipient


@pytest.mark.parametrize(
    ("status", "expired", "expected"),
    [
        ("", True, "4.4.7"),
        ("", False, "5.0.0"),
        ("2.0.0", False, "5.0.0"),
        ("5.7.1", False, "5.7.1"),
    ],
)
def test_a_missing_or_impossible_status_gets_a_default(
    status: str, expired: bool, expected: str
) -> None:
    """Status is always a 4.x.x or 5.x.x code (RFC 3464 2.3.4)."""
    per_recipient = report_blocks(parse(build(make_failure(status=status, expired=expired))))[1]
    assert per_recipient["Status"] == expected


def test_non_ascii_recipient_uses_the_utf8_address_type() -> None:
    """RFC 6533: utf-8 address type in 7-bit xtext form; the text parts carry UTF-8."""
    recipient = "j\u00f6rg+news@b\u00fccher.example"
    failure = make_failure(
        recipient=recipient,
        diagnostic=f"550 5.1.1 <{recipient}> unknown",
        original_headers=f"From: <app@example.com>\r\nTo: <{recipient}>\r\n".encode(),
    )
    data = build(failure)
    assert_exact_lines(data)
    msg = parse(data)
    assert_no_defects(msg)
    assert msg["Content-Transfer-Encoding"] == "8bit"
    human, report, headers = parts(msg)
    assert report.as_bytes().isascii()
    assert report_blocks(msg)[1]["Final-Recipient"] == (
        "utf-8; j\\x{F6}rg\\x{2B}news@b\\x{FC}cher.example"
    )
    assert f"<{recipient}>:" in human.get_content()
    assert human.get_content_charset() == "utf-8"
    assert f"To: <{recipient}>" in headers.get_content()
    # The diagnostic is ASCII-only, but its spelling of the recipient is kept.
    assert "550 5.1.1 <j?rg+news@b?cher.example> unknown" in flat(human.get_content())


def test_injected_crlf_in_the_diagnostic_cannot_make_a_header() -> None:
    """CR, LF and NUL in the upstream's reply become spaces inside one field."""
    data = build(make_failure(diagnostic="550 x\r\nBcc: evil@example.net\x00\nX-Evil: 1"))
    assert_exact_lines(data)
    assert not re.search(rb"(?im)^(bcc|x-evil):", data)
    assert b"evil@example.net" not in data
    msg = parse(data)
    assert_no_defects(msg)
    for part in msg.walk():
        assert "Bcc" not in part
        assert "X-Evil" not in part
    assert (
        report_blocks(msg)[1]["Diagnostic-Code"] == "smtp; 550 x Bcc: [address removed] X-Evil: 1"
    )


def test_boundary_is_safe_and_absent_from_the_content() -> None:
    """The boundary is made of bchars, at most 70 long, and in no part (RFC 2046 5.1.1)."""
    data = build(make_failure(queue_id='Q "1"\r\n;x'))
    msg = parse(data)
    boundary = msg.get_boundary()
    assert boundary is not None
    assert re.fullmatch(r"[A-Za-z0-9'()+_,\-./:=?]{1,70}", boundary)
    assert boundary.startswith("=_dsn.Q1x.")
    body = data.partition(b"\r\n\r\n")[2]
    assert body.count(boundary.encode()) == 4  # three openings and the close
    assert body.endswith(b"--" + boundary.encode() + b"--\r\n")


def test_a_boundary_found_in_the_content_is_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    """When the first candidate occurs in the headers, the next one is used."""

    class Digest:
        def __init__(self, data: bytes) -> None:
            self.data = data

        def hexdigest(self) -> str:
            return ("0" if self.data.startswith(b"0") else "1") * 64

    monkeypatch.setattr(dsn, "hashlib", SimpleNamespace(sha256=Digest))
    trap = "=_dsn.Q7F3A." + "0" * 24
    original = COPY_HEADERS.replace(b"Subject:", b"X-Trap: --" + trap.encode() + b"\r\nSubject:")
    msg = parse(build(make_failure(original_headers=original)))
    assert msg.get_boundary() == "=_dsn.Q7F3A." + "1" * 24
    assert_no_defects(msg)
    assert trap in parts(msg)[2].get_content()


def test_the_same_inputs_give_the_same_bytes() -> None:
    """The builder is pure: no clock, no randomness."""
    assert build() == build()


@pytest.mark.parametrize(
    ("sender", "ok"),
    [
        ("", False),
        ("<>", False),
        ("MAILER-DAEMON@example.org", False),
        ("mailer-daemon@example.org", False),
        ("<Mailer-Daemon@example.org>", False),
        ("app@example.com", True),
        ("<app@example.com>", True),
        ("daemon@example.com", True),
    ],
)
def test_dsn_recipient_ok(sender: str, ok: bool) -> None:
    """Never a DSN to the null sender or to another system's MAILER-DAEMON."""
    assert dsn_recipient_ok(sender) is ok


@pytest.mark.parametrize("sender", ["", "<>", "MAILER-DAEMON@example.org"])
def test_build_refuses_a_sender_that_gets_no_dsn(sender: str) -> None:
    """Asking for a DSN to the null sender is the caller's mistake."""
    with pytest.raises(ValueError, match="null sender"):
        build(make_failure(sender=sender))


@pytest.mark.parametrize(
    ("changes", "kwargs", "problem"),
    [
        ({"recipient": "bob@example.com\r\nBcc: evil@example.net"}, {}, "recipient"),
        ({"sender": "app@example.com>"}, {}, "sender"),
        ({"recipient": "b" * 250 + "@example.com"}, {}, "254 octets"),
        ({"arrival_date": datetime(2024, 5, 1)}, {}, "arrival_date has no time zone"),
        ({"remote_mta": "mx.example.net\r\nX: y"}, {}, "remote_mta"),
        ({}, {"now": datetime(2024, 5, 1)}, "now has no time zone"),
        ({}, {"message_id": "<dsn@relay.example.org>"}, "message_id"),
        ({}, {"message_id": "dsn@relay.example.org\r\nBcc: evil@example.net"}, "message_id"),
        ({}, {"reporting_mta": ""}, "reporting_mta"),
        ({}, {"reporting_mta": "relay.example.org>\r\nBcc: x"}, "reporting_mta"),
    ],
)
def test_arguments_that_cannot_be_written_safely_raise(
    changes: dict[str, Any], kwargs: dict[str, Any], problem: str
) -> None:
    """Caller mistakes fail loudly instead of producing a broken or injected message."""
    arguments: dict[str, Any] = {
        "reporting_mta": "relay.example.org",
        "now": NOW,
        "message_id": "dsn@relay.example.org",
        **kwargs,
    }
    with pytest.raises(ValueError, match=problem):
        build_dsn(make_failure(**changes), **arguments)


@given(diagnostic=st.text(max_size=2000), remote=st.sampled_from(["", "mx.example.net"]))
def test_any_diagnostic_gives_a_clean_message(diagnostic: str, remote: str) -> None:
    """Whatever the upstream said, the DSN parses cleanly with exactly the expected fields."""
    data = build(make_failure(diagnostic=diagnostic, remote_mta=remote))
    assert_exact_lines(data)
    msg = parse(data)
    assert_no_defects(msg)
    assert msg.get_content_type() == "multipart/report"
    assert len(parts(msg)) == 3
    fields = set(report_blocks(msg)[1].keys())
    assert {"Final-Recipient", "Action", "Status", "Last-Attempt-Date"} <= fields
    assert fields <= {
        "Final-Recipient",
        "Action",
        "Status",
        "Remote-MTA",
        "Diagnostic-Code",
        "Last-Attempt-Date",
    }


# -- the From: address (Rule 5) and its configuration -------------------------------------


@pytest.mark.parametrize(
    ("name", "public"),
    [
        ("mail.example.com", True),
        ("example.org", True),
        ("relay.example.net.", True),  # a trailing dot is the root
        ("solo-relay.localhost", False),  # the default smtp.hostname
        ("solo-relay-7d9f8c6b5-x2x4q", False),  # a Kubernetes pod name: one label
        ("relay.local", False),
        ("relay.internal", False),
        ("relay.example.test", False),
        ("host.lan", False),
        ("printer.home.arpa", False),
        ("10.0.0.1", False),
        ("[192.0.2.1]", False),
        ("-bad.example.com", False),
        ("a..example.com", False),
        ("", False),
    ],
)
def test_is_public_domain(name: str, public: bool) -> None:
    """Two or more RFC 1123 labels under a top-level name that is no private or special one."""
    assert dsn.is_public_domain(name) is public


@pytest.mark.parametrize(
    ("configured", "hostname", "sender", "author"),
    [
        ("bounces@example.net", "mail.example.com", "app@example.org", "bounces@example.net"),
        ("", "mail.example.com", "app@example.org", "MAILER-DAEMON@mail.example.com"),
        ("", "solo-relay.localhost", "app@example.org", "MAILER-DAEMON@example.org"),
        ("", "pod-7d9f8", "App@Mail.Example.org", "MAILER-DAEMON@Mail.Example.org"),
        ("", "solo-relay.localhost", "app@[192.0.2.1]", "MAILER-DAEMON@solo-relay.localhost"),
    ],
)
def test_dsn_from_address(configured: str, hostname: str, sender: str, author: str) -> None:
    """Configured, else MAILER-DAEMON@ a public host name, else @ the sender's own domain."""
    assert dsn.dsn_from_address(configured, hostname, sender) == author


def test_the_from_address_is_written_and_checked() -> None:
    """build_dsn writes the From: it is given, and refuses one that could inject a header."""
    msg = parse(build_dsn(make_failure(), **ARGS, from_address="bounces@example.net"))
    assert msg["From"] == "Mail Delivery System <bounces@example.net>"
    with pytest.raises(ValueError, match="from_address"):
        build_dsn(make_failure(), **ARGS, from_address="x@example.net>\r\nBcc: y@example.com")


ARGS: dict[str, Any] = {
    "reporting_mta": "relay.example.org",
    "now": NOW,
    "message_id": "dsn.Q7F3A@relay.example.org",
}


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"RELAY_DELIVERY_DSN_FROM": "MAILER-DAEMON"}, "delivery.dsn_from"),
        ({"RELAY_DELIVERY_DSN_FROM": "Bounces <b@example.net>"}, "delivery.dsn_from"),
        ({"RELAY_DELIVERY_DSN_USER": "bounces@example.net"}, "delivery.dsn_password"),
        ({"RELAY_DELIVERY_DSN_PASSWORD": "secret"}, "delivery.dsn_user"),
    ],
)
def test_dsn_settings_that_cannot_work_stop_the_start(env: dict[str, str], key: str) -> None:
    """A From that is no plain address, or half a bounce login, is a ConfigError naming the key."""
    with pytest.raises(ConfigError) as caught:
        load(environ=env)
    assert caught.value.key == key


def test_an_unreadable_bounce_password_file_stops_the_start(tmp_path: Path) -> None:
    """delivery.dsn_password_file that cannot be read: ConfigError naming it, at start."""
    config = load(
        environ={
            "RELAY_DELIVERY_DSN_USER": "bounces@example.net",
            "RELAY_DELIVERY_DSN_PASSWORD_FILE": str(tmp_path / "missing"),
        }
    )
    with pytest.raises(ConfigError) as caught:
        dsn_credentials(config.delivery)
    assert caught.value.key == "delivery.dsn_password_file"
