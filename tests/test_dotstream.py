"""The DATA collector on bytes: the real end of data, unstuffing, the size limit."""

from __future__ import annotations

import pytest

from relay.core.dotstream import DataCollector


def collect(blocks: list[bytes], limit: int = 10_000, *, normalize: bool = False) -> DataCollector:
    collector = DataCollector(limit, normalize=normalize)
    for block in blocks:
        if collector.feed(block) is not None:
            break
    return collector


@pytest.mark.parametrize("cut", range(1, 5))
def test_end_of_data_split_anywhere_is_found(cut: int) -> None:
    """CRLF . CRLF split across two blocks at any point still ends the data."""
    data = b"Subject: x\r\n\r\nbody\r\n.\r\n"
    at = len(data) - 5 + cut
    collector = collect([data[:at], data[at:]])
    assert collector.done and collector.content() == b"Subject: x\r\n\r\nbody\r\n"


def test_what_follows_the_end_is_handed_back() -> None:
    """Pipelined commands after the end of data are returned, not swallowed."""
    collector = DataCollector(1000)
    assert collector.feed(b"a\r\n.\r\nQUIT\r\n") == b"QUIT\r\n"


def test_first_line_and_later_lines_are_unstuffed_once() -> None:
    """A leading dot is removed once per line, the first line included (RFC 5321 4.5.2)."""
    collector = collect([b"..first\r\n...second\r\n..\r\n.\r\n"])
    assert collector.content() == b".first\r\n..second\r\n.\r\n"


def test_empty_message() -> None:
    """A lone dot right after DATA is an empty message."""
    assert collect([b".\r\n"]).content() == b""


@pytest.mark.parametrize(
    "blocks", [[b"x" * 3000 + b"\r\n.\r\n"], [b"x" * 1500, b"x" * 1500 + b"\r\n.\r\n"]]
)
def test_over_the_limit_is_too_big_whatever_the_blocks(blocks: list[bytes]) -> None:
    """Past the limit the data is dropped and marked too big, even in the block that ends it."""
    collector = collect(blocks, limit=2000)
    assert collector.done and collector.too_big


def test_normalize_unstuffs_after_a_bare_lf_too() -> None:
    """A legacy LF-only client's stuffed dots are unstuffed, not doubled on the way out."""
    collector = collect([b"a\n..dot\r\n.\r\n"], normalize=True)
    assert collector.content() == b"a\n.dot\r\n"
