"""What the ``queue`` views share: printing what a spool holds.

Rule 1: a spool database is opened as it is, never created, and waits for the
relay's writer (``relay.custody.admin``, as ``relay.cli.queue`` opens it).
Rule 2: whatever the spool holds is escaped before it is printed (control and
bidirectional formatting characters), so a header cannot drive the terminal.
Rule 3: the Message-ID is shown as the application wrote it (an operator looks
it up in the application's own logs), except that one naming an address of its
own message (``<bob@example.com>``) is shown as a token like the address.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from relay.custody import history
from relay.custody.spool import LIVE, CopyState
from relay.ops.logs import AddressTokens

EXIT_OK = 0
EXIT_NOT_FOUND = 1  # an unknown queue id, or a spool that cannot be read
EXIT_CONFIG = 2
LISTED = (
    *LIVE,
    CopyState.FAILED,
)  # what queue list shows: live copies and failed ones (delivered copies are history, not work)
RETRYABLE = frozenset(s.value for s in (CopyState.QUEUED, CopyState.DEFERRED))

# C0 controls but tab, DEL, C1 controls, line/paragraph separators, bidi overrides/isolates.
_UNSAFE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def shown_message_id(header_id: str, addresses: Sequence[str], tokens: AddressTokens) -> str:
    """Rule 3: the Message-ID in clear, unless it names an address of its own message."""
    lowered = header_id.lower()
    if any(a and a.lower() in lowered for a in addresses):
        return tokens.redact(header_id)
    return header_id


def redact_headers(text: str, addresses: Sequence[str], tokens: AddressTokens) -> str:
    """A header section with addresses as tokens, its Message-ID line as Rule 3 says."""
    lines = text.split("\r\n")
    for number, line in enumerate(lines):
        name, colon, value = line.partition(":")
        if colon and name.strip().lower() == "message-id":
            lines[number] = f"{name}:{shown_message_id(value, addresses, tokens)}"
        else:
            lines[number] = tokens.redact(line)
    return "\r\n".join(lines)


def message_id_line(
    headers: Sequence[bytes], addresses: Sequence[str], tokens: AddressTokens
) -> str:
    """The ``message-id`` line of ``queue show`` (Rule 3)."""
    header_id = next((history.message_id(h) for h in headers if h), "")
    return f"message-id {safe(shown_message_id(header_id, addresses, tokens)) or '-'}"


def safe(text: str) -> str:
    """``text`` with control and bidi formatting characters escaped (Rule 2)."""
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group(0)):04x}", text)


def sender_text(sender: str, tokens: Callable[[str], str]) -> str:
    return "<>" if not sender else tokens(sender)


def span(seconds: float) -> str:
    """A duration in its two largest units: ``45s``, ``4m``, ``2h5m``, ``3d4h``."""
    total = max(int(seconds), 0)
    if total < 60:
        return f"{total}s"
    minutes = total // 60
    if minutes < 60:
        return f"{minutes}m"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes}m" if minutes else f"{hours}h"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours}h" if hours else f"{days}d"


def when(moment: float) -> str:
    return datetime.fromtimestamp(moment, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
