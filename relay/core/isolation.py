"""The isolation core's one entry point: envelope and bytes in, a guarded plan out.

Rule 1: a copy never contains another recipient's address.
Rule 2: body bytes pass through unchanged.
Rule 3: the leak guard runs after the split, on the final bytes of every
copy, and a single failure rejects the whole message: either every copy is
safe or none is made.

The one exception to Rule 1 is configuration's, never a header's: a sender
named in ``[senders] keep_recipients`` keeps To: and Cc: (``relay.core.teamthread``).

Pure: no sockets, no event loop, no files, no logging. Every refusal is a
``Rejected`` carrying the reply the application should get.
"""

from __future__ import annotations

from relay.core.guard import LeakGuard
from relay.core.headers import parse_message
from relay.core.model import Envelope, IsolationOptions, Plan, Trace
from relay.core.split import split_message
from relay.core.teamthread import keep_visible


def isolate(
    envelope: Envelope,
    data: bytes,
    options: IsolationOptions | None = None,
    trace: Trace | None = None,
) -> Plan:
    """Split ``data`` (the dot-unstuffed DATA content) into one guarded copy per recipient.

    Raises ``Rejected`` (``BadData`` 550 5.5.2, ``HeaderDefect`` 554 5.6.0,
    ``TooManyHops`` 554 5.4.0, ``BadAddress`` 553, ``LeakDetected`` 550 5.7.1).
    """
    options = options or IsolationOptions()
    message = parse_message(
        data,
        smtputf8=envelope.smtputf8,
        normalize=options.normalize,
        max_header_octets=options.max_header_octets,
    )
    sender = envelope.sender
    if sender is not None and sender.key.lower() in options.keep_recipients_for:
        # SPEC 3's opt-out for a named sender (configuration only): To: and Cc: kept,
        # hidden recipients still checked on every copy's final bytes.
        return keep_visible(message, envelope, options, trace or Trace())
    copies, merged = split_message(message, envelope, options, trace or Trace())
    warnings = LeakGuard(message, envelope, options).check(copies)
    return Plan(copies, merged, warnings)
