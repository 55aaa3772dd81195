"""`solo-relay preview` as a user runs it: a real subprocess on a real file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

TEMPLATE = (
    "From: Example News <news@example.org>\n"
    "To: Alice <alice@example.com>, bob@example.com\n"
    "Cc: carol@example.net\n"
    "Bcc: dave@example.net\n"
    "Subject: November update\n"
    "\n"
    "Hello!\n"
)


def preview(tmp_path: Path, text: str, *args: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "campaign.eml"
    path.write_text(text)
    return subprocess.run(
        [sys.executable, "-m", "relay", "preview", str(path), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_preview_prints_each_copy_with_its_changes(tmp_path: Path) -> None:
    """Each envelope recipient's copy shows its header section and what changed, exit 0."""
    result = preview(
        tmp_path, TEMPLATE, "--rcpt", "alice@example.com", "--rcpt", "dave@example.net"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "=== copy 1 of 2: for <alice@example.com> ===" in out
    assert "=== copy 2 of 2: for <dave@example.net> ===" in out
    assert "  | To: Alice <alice@example.com>\n" in out
    assert "  | To: dave@example.net\n" in out
    assert "removed       Cc" in out and "removed       Bcc" in out
    assert "rebuilt       To" in out
    assert "carol@example.net" not in out and "bob@example.com" not in out
    assert out.rstrip().endswith("2 copies")


def test_preview_takes_recipients_from_headers_when_none_are_given(tmp_path: Path) -> None:
    """Without --rcpt, To, Cc and Bcc give the recipients, and the output says so."""
    result = preview(tmp_path, TEMPLATE)
    assert result.returncode == 0, result.stderr
    assert "recipients taken from To, Cc and Bcc" in result.stdout
    assert result.stdout.count("=== copy ") == 4


def test_preview_of_a_leaking_template_exits_1_with_the_reply(tmp_path: Path) -> None:
    """A Reply-To naming another recipient: exit 1, the 550 5.7.1 reply and the field named."""
    text = TEMPLATE.replace("Subject:", "Reply-To: bob@example.com\nSubject:")
    result = preview(tmp_path, text, "--rcpt", "alice@example.com", "--rcpt", "bob@example.com")
    assert result.returncode == 1
    assert "rejected: 550 5.7.1" in result.stderr
    assert "Reply-To names another recipient" in result.stderr


def test_preview_raw_keeps_bare_lf_and_reports_550_5_5_2(tmp_path: Path) -> None:
    """--raw sends the file's bytes as they are: LF line ends are bare LF."""
    result = preview(tmp_path, TEMPLATE, "--raw", "--rcpt", "alice@example.com")
    assert result.returncode == 1
    assert "rejected: 550 5.5.2" in result.stderr


def test_preview_body_check_reject(tmp_path: Path) -> None:
    """--body-check reject turns a body mention of another recipient into exit 1."""
    text = TEMPLATE.replace("Hello!", "Hello, say hi to bob@example.com")
    args = ["--rcpt", "alice@example.com", "--rcpt", "bob@example.com"]
    assert preview(tmp_path, text, *args).returncode == 0
    result = preview(tmp_path, text, *args, "--body-check", "reject")
    assert result.returncode == 1 and "550 5.7.1" in result.stderr


def test_preview_missing_file_exits_2(tmp_path: Path) -> None:
    """A file that is not there is a usage error, not a traceback."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "relay",
            "preview",
            str(tmp_path / "nope.eml"),
            "--rcpt",
            "a@example.com",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "No such file" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("command", [["preview", "--help"], ["--help"]])
def test_help_texts(command: list[str]) -> None:
    """--help explains the command and its exit statuses."""
    result = subprocess.run(
        [sys.executable, "-m", "relay", *command],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert "preview" in result.stdout


def test_preview_dkim_resign_without_a_key_refuses_clearly(tmp_path: Path) -> None:
    """--dkim resign with no signing key would silently strip: exit 2 and say what is missing."""
    result = preview(tmp_path, TEMPLATE, "--dkim", "resign", "--rcpt", "alice@example.com")
    assert result.returncode == 2
    assert "--dkim resign needs the relay's signing key" in result.stderr
    assert "key_file" in result.stderr and not result.stdout


UTF8_TEMPLATE = (
    "From: news@example.org\n"
    "To: j\u00f6rg@example.com, ascii@example.com\n"
    'Cc: "Ren\u00e9" <ren\u00e9@b\u00fccher.example>\n'
    "Subject: hello\n"
    "\n"
    "Hello!\n"
)


def test_preview_keeps_utf8_addresses_from_to_and_cc(tmp_path: Path) -> None:
    """Without --rcpt, UTF-8 addresses in To and Cc are recipients (SMTPUTF8), not dropped."""
    result = preview(tmp_path, UTF8_TEMPLATE)
    assert result.returncode == 0, result.stderr
    for address in ("j\u00f6rg@example.com", "ascii@example.com", "ren\u00e9@b\u00fccher.example"):
        assert f": for <{address}> ===" in result.stdout
    assert result.stdout.count("=== copy ") == 3


def test_preview_raw_still_takes_the_sender_from_from(tmp_path: Path) -> None:
    """--raw with LF line ends: the MAIL FROM line names the From address, not <>."""
    result = preview(tmp_path, TEMPLATE, "--raw", "--rcpt", "alice@example.com")
    assert result.returncode == 1
    assert "MAIL FROM <news@example.org> taken from From" in result.stderr
    assert "MAIL FROM <>" not in result.stderr


def test_preview_summary_counts_only(tmp_path: Path) -> None:
    """--summary: copies, refusals and header changes as counts; no address, no header section."""
    args = ["--summary", "--rcpt", "alice@example.com", "--rcpt", "alice@EXAMPLE.com"]
    result = preview(tmp_path, TEMPLATE, *args, "--rcpt", "bad<x>@example.com")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "@" not in out and "| " not in out
    assert "the relay would accept it" in out
    assert "  copies                 1\n" in out
    assert "  duplicates merged      1\n" in out
    assert "  refused at RCPT        1\n    1  553 5.1.3 Bad address syntax\n" in out
    assert "    removed       Cc               1\n" in out
    assert "    rebuilt       To               1\n" in out
    leaking = TEMPLATE.replace("Subject:", "Reply-To: bob@example.com\nSubject:")
    refused = preview(tmp_path, leaking, "--summary")
    assert refused.returncode == 1
    assert "the relay would refuse it" in refused.stderr
    assert "rejected: 550 5.7.1" in refused.stderr


def test_preview_out_writes_each_copy_as_eml(tmp_path: Path) -> None:
    """--out DIR: one .eml per copy, its exact bytes, each To naming only its recipient."""
    out = tmp_path / "copies"
    result = preview(tmp_path, TEMPLATE, "--out", str(out))
    assert result.returncode == 0, result.stderr
    files = sorted(out.glob("*.eml"))
    assert [f.name for f in files] == [f"copy-000{n}.eml" for n in range(1, 5)]
    assert f"wrote 4 .eml file(s) to {out}" in result.stdout
    to_lines = [
        line for f in files for line in f.read_bytes().split(b"\r\n") if line.startswith(b"To:")
    ]
    assert to_lines == [
        b"To: Alice <alice@example.com>",
        b"To: bob@example.com",
        b"To: carol@example.net",
        b"To: dave@example.net",
    ]
    assert all(f.read_bytes().endswith(b"\r\n\r\nHello!\r\n") for f in files)


def test_preview_refuses_a_bad_recipient_alone(tmp_path: Path) -> None:
    """A recipient RCPT would refuse (553) is listed and left out; the others get copies."""
    result = preview(
        tmp_path, TEMPLATE, "--rcpt", "bad<x>@example.com", "--rcpt", "alice@example.com"
    )
    assert result.returncode == 0, result.stderr
    assert "refused at RCPT: <bad<x>@example.com>: 553 5.1.3" in result.stdout
    assert result.stdout.count("=== copy ") == 1
    only_bad = preview(tmp_path, TEMPLATE, "--rcpt", "bad<x>@example.com")
    assert only_bad.returncode == 1 and "every recipient was refused" in only_bad.stderr
