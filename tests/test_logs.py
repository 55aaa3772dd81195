"""Logs: JSON lines or text, keyed address tokens, redaction, quiet libraries, the key file."""

from __future__ import annotations

import io
import json
import logging
import os
import select
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from relay.config import LogConfig, LogFormat
from relay.core.errors import ConfigError
from relay.ops import logs
from relay.ops.logs import (
    KEY_FILE,
    QUIET_LOGGERS,
    AddressTokens,
    load_key,
    setup_logging,
    token,
)

KEY = b"k" * 32
OTHER_KEY = b"o" * 32


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Put the process-wide logging state back as it was after each test."""
    root = logging.getLogger()
    level = root.level
    quiet = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    tokens = logs._tokens
    yield
    for handler in list(root.handlers):
        if getattr(handler, logs._HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()
    root.setLevel(level)
    for name, old in quiet.items():
        logging.getLogger(name).setLevel(old)
    logs._tokens = tokens


def configure(stream: io.StringIO, **options: Any) -> AddressTokens:
    options.setdefault("format", LogFormat.JSON)
    options.setdefault("level", "debug")
    return setup_logging(LogConfig(**options), key=KEY, stream=stream)


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_json_lines_have_ts_level_logger_event_and_fields() -> None:
    """Each record is one JSON object on one line: ts, level, logger, event, then its fields."""
    stream = io.StringIO()
    configure(stream)
    log = logging.getLogger("relay.inbound")
    log.info("message received", extra={"fields": {"id": "q1", "size": 1200, "copies": 2}})
    log.warning("copy deferred\nsecond line", extra={"fields": {"id": "q1", "event": "x"}})
    first, second = lines(stream)
    assert list(first)[:4] == ["ts", "level", "logger", "event"]
    assert first["ts"].endswith("Z")
    assert first["level"] == "info"
    assert first["logger"] == "relay.inbound"
    assert first["event"] == "message received"
    assert (first["id"], first["size"], first["copies"]) == ("q1", 1200, 2)
    assert second["event"] == "copy deferred\nsecond line"
    assert second["field_event"] == "x"  # a field never overwrites a fixed key


def test_json_line_carries_an_exception() -> None:
    """An exception's traceback goes in the line's exc key, still one line."""
    stream = io.StringIO()
    configure(stream)
    try:
        raise RuntimeError("disk full")
    except RuntimeError:
        logging.getLogger("relay.spool").exception("cannot write copy")
    (line,) = lines(stream)
    assert "RuntimeError: disk full" in line["exc"]


def test_auto_format_is_json_off_a_terminal_and_text_on_one() -> None:
    """format = auto writes JSON to a pipe or file and text to a terminal."""
    piped, terminal = io.StringIO(), Terminal()
    configure(piped, format=LogFormat.AUTO)
    logging.getLogger("relay").info("started", extra={"fields": {"port": 2525}})
    configure(terminal, format=LogFormat.AUTO)
    logging.getLogger("relay").info("started", extra={"fields": {"port": 2525, "mode": "a b"}})
    assert json.loads(piped.getvalue())["event"] == "started"
    text = terminal.getvalue()
    assert " INFO relay: started port=2525 mode=" in text
    assert text.rstrip().endswith('mode="a b"')


def test_setup_is_idempotent() -> None:
    """A second setup replaces the relay's handler instead of adding another."""
    first, second = io.StringIO(), io.StringIO()
    configure(first)
    configure(second)
    logging.getLogger("relay").info("once")
    assert first.getvalue() == ""
    assert len(lines(second)) == 1


def test_tokens_are_stable_per_key_and_case_insensitive() -> None:
    """The same address gives the same token under one key, another under another key."""
    tokens, other = AddressTokens(KEY), AddressTokens(OTHER_KEY)
    bob = tokens("bob@example.com")
    assert bob.startswith("a_")
    assert len(bob) == 2 + 16
    assert tokens("Bob@Example.COM") == tokens("<bob@example.com>") == bob
    assert tokens.token("bob@example.com") == bob
    assert tokens("carol@example.com") != bob
    assert other("bob@example.com") != bob
    assert tokens("") == "<>"


def test_show_addresses_logs_them_in_clear() -> None:
    """With show_addresses the token is the address, and nothing is redacted."""
    stream = io.StringIO()
    tokens = configure(stream, show_addresses=True)
    assert tokens("bob@example.com") == "bob@example.com"
    logging.getLogger("relay").info("to %s", "bob@example.com")
    assert lines(stream)[0]["event"] == "to bob@example.com"


def test_token_function_uses_the_installed_key() -> None:
    """token() gives the tokens of the key setup_logging installed."""
    configure(io.StringIO())
    assert token("bob@example.com") == AddressTokens(KEY)("bob@example.com")


def test_addresses_in_message_fields_and_traceback_are_redacted_at_debug() -> None:
    """A DEBUG record naming addresses in message, args, fields and exception has none left."""
    stream = io.StringIO()
    tokens = configure(stream)
    log = logging.getLogger("relay.upstream")
    fields = {
        "rcpt": "Bob@Example.com",
        "reply": "550 5.1.1 <carol@example.net>: unknown",
        "all": ["dave@example.org", ("erin@sub.example.test",)],
        "by": {"frank@example.com": "<grace@example.com>"},
        "count": 3,
    }
    try:
        raise ValueError("refused henry@example.org")
    except ValueError:
        log.debug(
            "copy for %s refused", "ivan@example.net", exc_info=True, extra={"fields": fields}
        )
    out = stream.getvalue()
    assert "@" not in out
    assert "example" not in out
    (line,) = lines(stream)
    assert line["event"] == f"copy for {tokens('ivan@example.net')} refused"
    assert line["rcpt"] == tokens("bob@example.com")
    assert line["reply"] == f"550 5.1.1 <{tokens('carol@example.net')}>: unknown"
    assert line["all"] == [tokens("dave@example.org"), [tokens("erin@sub.example.test")]]
    assert line["by"] == {tokens("frank@example.com"): f"<{tokens('grace@example.com')}>"}
    assert line["count"] == 3
    assert tokens("henry@example.org") in line["exc"]


def test_library_loggers_are_redacted_and_held_at_warning() -> None:
    """aiosmtpd's mail.log is at WARNING after setup; what it does log names no address."""
    stream = io.StringIO()
    configure(stream, level="debug")
    mail_log = logging.getLogger("mail.log")
    assert mail_log.getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("aiosmtplib").getEffectiveLevel() == logging.WARNING
    mail_log.info("('127.0.0.1', 5000) RCPT TO:<bob@example.com>")
    mail_log.warning("('127.0.0.1', 5000) bad RCPT <bob@example.com>")
    (line,) = lines(stream)
    assert line["logger"] == "mail.log"
    assert "@" not in line["event"]


def test_level_comes_from_the_config() -> None:
    """level = warning drops the relay's info lines."""
    stream = io.StringIO()
    configure(stream, level="warning")
    logging.getLogger("relay").info("quiet")
    logging.getLogger("relay").warning("loud")
    assert [line["event"] for line in lines(stream)] == ["loud"]


def test_key_file_is_created_0600_and_reused(tmp_path: Path) -> None:
    """Without hash_key a 32-byte key is created once at mode 0600, then read back."""
    spool = tmp_path / "spool"
    key = load_key(LogConfig(), spool)
    path = spool / KEY_FILE
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_key(LogConfig(), spool) == key
    assert sorted(p.name for p in spool.iterdir()) == [KEY_FILE]  # no temporary left


def test_configured_hash_key_wins_and_must_be_long_enough(tmp_path: Path) -> None:
    """hash_key, when set, is the key and no file is made; a short one is a ConfigError."""
    assert load_key(LogConfig(hash_key="s" * 20), tmp_path) == b"s" * 20
    assert not (tmp_path / KEY_FILE).exists()
    with pytest.raises(ConfigError, match=r"log\.hash_key"):
        load_key(LogConfig(hash_key="short"), tmp_path)


def test_an_empty_key_file_is_refused(tmp_path: Path) -> None:
    """A truncated key file stops the start rather than hashing with a weak key."""
    (tmp_path / KEY_FILE).write_bytes(b"")
    with pytest.raises(ConfigError, match="no usable key"):
        load_key(LogConfig(), tmp_path)


class CountingStream(io.StringIO):
    """Counts flushes: each one is a system call on a real stream."""

    def __init__(self) -> None:
        super().__init__()
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_info_lines_are_flushed_in_batches_warnings_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Below WARNING a line waits for the next flush (periodic); a warning flushes at once."""
    now = [1000.0]
    monkeypatch.setattr(logs.time, "monotonic", lambda: now[0])
    stream = CountingStream()
    configure(stream, format=LogFormat.JSON)
    log = logging.getLogger("relay.delivery")
    for _ in range(50):
        log.info("copy delivered")
    assert stream.flushes == 0  # 50 lines, no flush yet
    log.warning("copy failed")
    assert stream.flushes == 1
    log.info("copy delivered")
    now[0] += logs.FLUSH_SECONDS  # the period has passed: this line flushes
    log.info("copy delivered")
    assert stream.flushes == 2
    log.info("copy delivered")
    logs.flush()  # what the server runs every FLUSH_SECONDS
    assert stream.flushes == 3
    assert len(lines(stream)) == 54


def test_buffered_lines_go_out_in_whole_lines_of_at_most_pipe_buf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Workers share one stderr pipe: each write is whole lines, small enough to stay whole."""
    written: list[bytes] = []
    real_write = os.write

    def record(descriptor: int, data: Any) -> int:
        count = real_write(descriptor, data)
        written.append(bytes(data[:count]))
        return count

    monkeypatch.setattr(logs.os, "write", record)
    read_end, write_end = os.pipe()
    received = bytearray()
    reader = threading.Thread(target=lambda: received.extend(iter_pipe(read_end)))
    reader.start()
    stream = io.TextIOWrapper(
        io.BufferedWriter(logs._WholeLines(write_end), 1 << 16), encoding="utf-8"
    )
    text = "".join(f"line {n:05d} " + "x" * (n % 300) + "\n" for n in range(600))
    stream.write(text)
    stream.flush()
    os.close(write_end)
    reader.join(timeout=10)
    os.close(read_end)
    assert received.decode() == text
    assert b"".join(written).decode() == text
    assert len(written) < 600  # batched: far fewer writes than lines
    assert all(len(piece) <= select.PIPE_BUF and piece.endswith(b"\n") for piece in written)


def iter_pipe(descriptor: int) -> Iterator[int]:
    while chunk := os.read(descriptor, 65536):
        yield from chunk
