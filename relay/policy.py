"""Pure classification of upstream replies (SPEC 5): transient or permanent, and why.

Rule 1: 4xx, no reply, any failure before MAIL, and ``552`` at RCPT (RFC 5321
4.5.3.1.10) are transient; other 5xx are permanent.
Rule 2: an AUTH refusal is transient, and a 5xx one (``535``) sets
``auth_failed``: bad credentials pause delivery instead of bouncing mail.
"""

from __future__ import annotations

import re

from relay.model import Outcome, Stage, Status

_ENHANCED = re.compile(r"([245])\.\d{1,3}\.\d{1,3}(?= |$)")  # RFC 3463


def split_enhanced(code: int, text: str) -> tuple[str, str]:
    """The RFC 3463 code leading the reply text (only if its class matches), and the rest."""
    lines = text.split("\n")
    match = _ENHANCED.match(lines[0])
    if match is None or int(match[1]) != code // 100:
        return "", " ".join(lines)
    enhanced = match[0]
    rest = [ln[len(enhanced) :].lstrip() if ln.startswith(enhanced) else ln for ln in lines]
    return enhanced, " ".join(rest)


def classify_reply(stage: Stage, code: int, text: str) -> Outcome:
    """A refusal (any reply but the one expected) at ``stage``, as an outcome."""
    enhanced, text = split_enhanced(code, text)
    if stage is Stage.AUTH:  # bad credentials: pause and alert, never bounce (SPEC 5)
        return Outcome(Status.TRANSIENT, stage, code, enhanced, text, auth_failed=code >= 500)
    permanent = (
        500 <= code < 600
        and stage not in (Stage.CONNECT, Stage.TLS)  # about the connection, not this copy
        and not (stage is Stage.RCPT and code == 552)  # RFC 5321 4.5.3.1.10
    )
    return Outcome(Status.PERMANENT if permanent else Status.TRANSIENT, stage, code, enhanced, text)
