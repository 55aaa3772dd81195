"""What the listener answers, and the one log line per refusal.

Rule 4 of ``relay.inbound.smtp``: every reply has an enhanced status code;
``with_enhanced_code`` adds the one a bare aiosmtpd reply lacks. The AUTH
exchange's replies and STARTTLS's live with their code
(``relay.inbound.session_auth``, ``relay.inbound.session_tls``).
"""

from __future__ import annotations

import logging
import re
from typing import Any

from relay.core.errors import Reply
from relay.ops.metrics import Refusal

log = logging.getLogger("relay.inbound")

NULL_SENDER = "<>"

# RFC 2034 3: the greeting and 354 carry no enhanced code; RFC 3463 gives the rest.
_NO_ENHANCED = frozenset({"220", "354"})
_DEFAULT_ENHANCED = {
    "221": "2.0.0",
    "250": "2.0.0",
    "252": "2.5.0",
    "421": "4.3.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "554": "5.7.0",
    "555": "5.5.4",
}
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")

IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
DATA_TIMEOUT = Reply(421, "4.4.2", "Timeout during DATA, closing connection")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
NOT_ALLOWED = Reply(550, "5.7.1", "Relaying not allowed from your network")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
TOO_LONG_STATUS = "500 Command line too long"  # what aiosmtpd's command loop says
INTERNAL = Reply(451, "4.3.0", "Internal error, try again later")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")


def log_refusal(
    stage: str,
    reply: Reply,
    reason: Refusal,
    client: str,
    *,
    detail: str = "",
    addresses: dict[str, str] | None = None,
) -> None:
    """One line per refusal: where, the reply, why; addresses already tokens (issue 14.6)."""
    fields = {"stage": stage, "reply": str(reply), "reason": reason.value, "client": client}
    if detail:
        fields["detail"] = detail
    log.info("refused", extra={"fields": {**fields, **(addresses or {})}})


def with_enhanced_code(status: str) -> str:
    """Add the RFC 3463 code a bare aiosmtpd reply lacks ("503 Error: ..." -> "503 5.5.1 ...")."""
    code, sep, text = status.partition(" ")
    if not sep or not code.isdigit() or _ENHANCED.match(text) or code in _NO_ENHANCED:
        return status
    enhanced = _DEFAULT_ENHANCED.get(code, f"{code[0]}.0.0")
    return f"{code} {enhanced} {text}"


def peer_ip(peer: Any) -> str:
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"
