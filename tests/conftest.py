"""Shared builders for message bytes and expected copies."""

from __future__ import annotations

import base64

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from relay.core.model import Trace

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


def dkim_keypair() -> tuple[bytes, bytes]:
    """A fresh RSA private key (PEM) and its DKIM DNS TXT record."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
