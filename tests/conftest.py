"""Shared builders for message bytes and expected copies."""

from __future__ import annotations

from relay.model import Trace

pytest_plugins = ["tests.upstream_server"]

CRLF = b"\r\n"


def message(*header_lines: str | bytes, body: bytes = b"Hello.\r\n") -> bytes:
    """Header lines (without line ends) joined with CRLF, a blank line, then ``body``."""
    encoded = [h.encode("utf-8") if isinstance(h, str) else h for h in header_lines]
    return b"".join(h + CRLF for h in encoded) + CRLF + body


def received(rcpt: str, trace: Trace | None = None) -> bytes:
    """The Received line the relay adds for ``rcpt`` with the default (preview) trace."""
    t = trace or Trace()
    return (
        f"Received: from {t.helo} ([{t.client_ip}])\r\n"
        f"\tby {t.by_host} (solo-relay) with {t.protocol} id {t.queue_id}\r\n"
        f"\tfor <{rcpt}>; {t.date}\r\n"
    ).encode()


def copy_headers(rcpt: str, *header_lines: str) -> bytes:
    """The exact header section expected for ``rcpt``: Received, the given lines, blank line."""
    return received(rcpt) + b"".join(h.encode("utf-8") + CRLF for h in header_lines) + CRLF
