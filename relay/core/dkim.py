"""Signing each copy with the relay's DKIM key (dkimpy), after its headers are final.

Rule 1: a copy is signed last, over its final header section and its
untouched body, so the signature verifies as the recipient receives it.
Rule 2: ``From`` is signed twice (oversigned, RFC 6376 8.15) and ``Cc`` is
signed although no copy has one, so neither can be added in transit; ``Bcc``
and trace fields are never signed.
Rule 3: the key is loaded and tried once at start: a bad file, selector or
domain stops the start with one line naming the key.

Pure: the key file is read by the reader ``signer_for`` is given (``relay.files``).
The one clock is dkimpy's own, for the signature's ``t=`` tag.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import dkim

from relay.core.errors import ConfigError

# RFC 6376 5.4.1's recommended set, plus the list and threading fields mass mail carries.
SIGNED_HEADERS = (
    "from",
    "from",  # oversigned: a second From cannot be added
    "to",
    "cc",  # signed as absent: a Cc cannot be added
    "subject",
    "date",
    "message-id",
    "reply-to",
    "in-reply-to",
    "references",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
    "list-id",
    "list-unsubscribe",
    "list-unsubscribe-post",
)
_SELECTOR = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
_PROBE = b"From: probe@example.org\r\nSubject: probe\r\n\r\nprobe\r\n"


class DkimAction(enum.Enum):
    """What an application signature that covers a changed header becomes (SPEC 3)."""

    STRIP = "strip"
    RESIGN = "resign"
    REJECT = "reject"


@dataclass(frozen=True, slots=True)
class Signer:
    """The relay's DKIM identity: domain, selector and private key (PEM)."""

    domain: str
    selector: str
    key: bytes = field(repr=False)

    def sign(self, headers: bytes, body: bytes | memoryview) -> bytes:
        """The ``DKIM-Signature`` field (CRLF-terminated) for a copy with these bytes."""
        field_bytes: bytes = dkim.sign(
            headers + bytes(body),
            self.selector.encode("ascii"),
            self.domain.encode("ascii"),
            self.key,
            canonicalize=(b"relaxed", b"relaxed"),
            include_headers=[name.encode("ascii") for name in SIGNED_HEADERS],
            linesep=b"\r\n",
        )
        # dkimpy folds with the line separator it is given; make sure of CRLF only.
        return field_bytes.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def signer_for(domain: str, selector: str, key_file: str, read: Callable[[str], bytes]) -> Signer:
    """Check the names, read the key with ``read`` and try it once.

    Raises ``ConfigError`` naming ``dkim.*`` when anything is wrong; ``read`` is the
    shell's file reader (``relay.files``), which raises its own ``ConfigError``.
    """
    if not domain or not re.fullmatch(_SELECTOR, domain) or "." not in domain:
        raise ConfigError("dkim.domain", f"must be a DNS domain (A-labels), not {domain!r}")
    if not selector or not re.fullmatch(_SELECTOR, selector):
        raise ConfigError("dkim.selector", f"must be a DNS label, not {selector!r}")
    if not key_file:
        raise ConfigError("dkim.key_file", "is needed to sign")
    signer = Signer(domain, selector, read(key_file))
    try:
        signer.sign(_PROBE.split(b"\r\n\r\n")[0] + b"\r\n\r\n", b"probe\r\n")
    except (dkim.DKIMException, ValueError, TypeError) as exc:
        raise ConfigError("dkim.key_file", f"is not a usable RSA private key: {exc}") from exc
    return signer
