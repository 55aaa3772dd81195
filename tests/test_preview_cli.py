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
