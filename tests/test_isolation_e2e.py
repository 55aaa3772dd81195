"""Issue 12 end to end: the same answers through a running relay and through preview.

A real client (smtplib) sends to a relay in the test's loop with a recording
upstream; `solo-relay preview` runs as a subprocess on a real file.
"""

from __future__ import annotations

import asyncio
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.relay_harness import running_relay
from tests.upstream_server import UpstreamServer

RCPTS = ["alice@example.com", "bob@example.net"]
LEAKS = {
    "fold inside the address": b"Reply-To: bob@exa\r\n mple.net\r\n",
    "RFC 2231 segments": b"Content-Type: text/plain; n*0*=utf-8''bob%40exa; n*1*=mple.net\r\n",
    "URL list blanks": b"List-Unsubscribe: <mailto:bob@example .net>\r\n",
    "zero-width joiner": "Reply-To: bo\u200db@example.net\r\n".encode(),
}
FORWARDED = (
    b"MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=B\r\n\r\n"
    b"--B\r\nContent-Type: message/rfc822\r\n\r\n"
    b"From: news@example.org\r\nTo: alice@example.com, bob@example.net\r\n\r\nhi\r\n--B--\r\n"
)


def sendmail(port: int, sender: str, rcpts: list[str], data: bytes) -> object:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        options = [] if data.isascii() else ["SMTPUTF8"]
        try:
            return client.sendmail(sender, rcpts, data, mail_options=options)
        except smtplib.SMTPResponseException as exc:
            return exc.smtp_code, exc.smtp_error.decode()
        except smtplib.SMTPRecipientsRefused as exc:
            return exc.recipients


def campaign(*fields: bytes, body: bytes = b"\r\nHello.\r\n") -> bytes:
    return (
        b"From: news@example.org\r\nTo: alice@example.com, bob@example.net\r\n"
        + b"".join(fields)
        + body
    )


@pytest.mark.parametrize("case", list(LEAKS))
async def test_a_leaking_spelling_is_refused_on_the_wire_and_nothing_is_sent(
    tmp_path: Path, plain_server: UpstreamServer, case: str
) -> None:
    """The client gets 550 5.7.1 at the end of DATA; the upstream sees no transaction."""
    async with running_relay(tmp_path, plain_server.url()) as relay:
        result = await asyncio.to_thread(
            sendmail, relay.smtp_port, "news@example.org", RCPTS, campaign(LEAKS[case])
        )
    assert isinstance(result, tuple) and result[0] == 550
    assert str(result[1]).startswith("5.7.1")
    assert plain_server.transactions == []


async def test_a_forwarded_message_naming_the_others_is_refused_on_the_wire(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """An attached message/rfc822 whose To: names every recipient: 550 5.7.1, nothing sent."""
    async with running_relay(tmp_path, plain_server.url()) as relay:
        result = await asyncio.to_thread(
            sendmail, relay.smtp_port, "news@example.org", RCPTS, campaign(body=FORWARDED)
        )
    assert isinstance(result, tuple) and result[0] == 550
    assert plain_server.transactions == []


async def test_a_long_to_line_and_a_long_subject_arrive_isolated_and_folded(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """A 1,000-address To: on one line is replaced; a 3,000-octet Subject: arrives folded."""
    rcpts = [f"c{i:04d}@example.com" for i in range(1000)]
    subject = "Subject: " + " ".join(f"word{i}" for i in range(400))
    data = (
        b"From: news@example.org\r\nTo: "
        + ", ".join(rcpts).encode()
        + b"\r\n"
        + subject.encode()
        + b"\r\n\r\nHello.\r\n"
    )
    async with running_relay(tmp_path, plain_server.url()) as relay:
        result = await asyncio.to_thread(sendmail, relay.smtp_port, "news@example.org", rcpts, data)
    assert result == {}
    assert sorted(t.rcpt_tos[0] for t in plain_server.transactions) == rcpts
    for t in plain_server.transactions:
        section = t.content.split(b"\r\n\r\n")[0]
        assert max(len(line) for line in section.split(b"\r\n")) <= 78 + 20
        assert f"\r\nTo: {t.rcpt_tos[0]}\r\n".encode() in section
        assert section.count(b"@example.com") == 2  # the Received "for" and the To:


async def test_single_label_sender_accepted_and_recipient_refused_saying_why(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """MAIL FROM:<root@localhost> is 250; RCPT TO:<root@localhost> is 553 5.1.3 with the why."""
    async with running_relay(tmp_path, plain_server.url()) as relay:

        def session(port: int) -> tuple[tuple[int, bytes], tuple[int, bytes]]:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
                client.ehlo("cron.example.org")
                return client.mail("root@localhost"), client.rcpt("root@localhost")

        mail, rcpt = await asyncio.to_thread(session, relay.smtp_port)
    assert mail[0] == 250
    assert rcpt[0] == 553
    assert rcpt[1].startswith(b"5.1.3 Recipient domain must be fully qualified")


async def test_a_listed_local_domain_is_delivered(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """smtp.local_domains = localhost: root@localhost gets its copy, sent upstream as given."""
    env = {"RELAY_SMTP_LOCAL_DOMAINS": "localhost"}
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        result = await asyncio.to_thread(
            sendmail,
            relay.smtp_port,
            "root@localhost",
            ["root@localhost"],
            b"From: root@localhost\r\nTo: root@localhost\r\nSubject: cron\r\n\r\nok\r\n",
        )
    assert result == {}
    assert [(t.mail_from, t.rcpt_tos) for t in plain_server.transactions] == [
        ("root@localhost", ["root@localhost"])
    ]


def preview(tmp_path: Path, data: bytes, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "campaign.eml"
    path.write_bytes(data)
    return subprocess.run(
        [sys.executable, "-m", "relay", "preview", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize("case", list(LEAKS))
def test_preview_refuses_the_same_spellings(tmp_path: Path, case: str) -> None:
    """preview exits 1 with 550 5.7.1 and a reason naming the field, never the address."""
    result = preview(tmp_path, campaign(LEAKS[case]), "--rcpt", RCPTS[0], "--rcpt", RCPTS[1])
    assert result.returncode == 1
    assert "rejected: 550 5.7.1" in result.stderr
    assert "bob@" not in result.stderr.split("reason:")[1]


def test_preview_shows_the_fold_of_a_long_kept_field(tmp_path: Path) -> None:
    """preview of a campaign with a 3,000-octet Subject: lists it as folded."""
    subject = b"Subject: " + b" ".join(b"w%d" % i for i in range(700)) + b"\r\n"
    result = preview(tmp_path, campaign(subject))
    assert result.returncode == 0, result.stderr
    assert "folded        Subject" in result.stdout


def test_preview_normalize_says_a_dkim_signature_was_stripped(tmp_path: Path) -> None:
    """preview --normalize on a signed message with a stray CR in its body: dkim-stripped."""
    data = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=s1; h=from:subject; bh=x; b=y\r\n"
        b"From: news@example.org\r\nTo: alice@example.com\r\nSubject: hi\r\n\r\nA\rB\r\n"
    )
    result = preview(tmp_path, data, "--raw", "--normalize", "--rcpt", "alice@example.com")
    assert result.returncode == 0, result.stderr
    assert "dkim-stripped" in result.stdout and "normalisation changed body" in result.stdout


def test_preview_follows_the_local_domains_of_its_configuration(tmp_path: Path) -> None:
    """preview refuses root@localhost as RCPT would, and makes its copy with local_domains."""
    data = b"From: root@localhost\r\nTo: root@localhost, ops@example.org\r\n\r\nok\r\n"
    refused = preview(tmp_path, data, "--summary")
    assert refused.returncode == 0, refused.stderr
    assert "553 5.1.3 Recipient domain must be fully qualified" in refused.stdout
    config = tmp_path / "relay.toml"
    config.write_text('[smtp]\nlocal_domains = ["localhost"]\n')
    allowed = preview(tmp_path, data, "--config", str(config))
    assert allowed.returncode == 0, allowed.stderr
    assert "=== copy 1 of 2: for <root@localhost> ===" in allowed.stdout
