"""The team-thread opt-out (SPEC 3): copies that keep ``To:`` and ``Cc:`` as written.

Only for envelope senders named in ``[senders] keep_recipients``
(``IsolationOptions.keep_recipients_for``): configuration, never a header.

Rule 1: still one copy per unique envelope recipient, each with the relay's
own ``Received:`` line for that recipient; body bytes shared and unchanged.
Rule 2: ``To:`` and ``Cc:`` are kept byte for byte; every other field of the
removal list (``Bcc``, ``Resent-*``, ``Delivered-To``, ...) is removed as usual.
Rule 3: the hidden recipients (envelope recipients that ``To:`` and ``Cc:``
do not name, and every address of a removed field) appear in no copy but
their own: each copy's final header section is read in every spelling the
leak guard reads, and a hit refuses the whole message (``550 5.7.1``); the
guard's body and embedded-header checks watch them with the configured
``body_check`` and ``embedded_check``.
Rule 4: the rest is as for any message: the hop limit, the authors check,
long kept lines folded, application DKIM signatures settled, the relay's key.

Pure: no I/O. A mode of the split (``split_message(keep_visible=True)``) with
the guard's public readings (``field_spellings``, ``leaks``, ``sender_keys``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import replace

from relay.core.addresses import Address
from relay.core.errors import LeakDetected
from relay.core.guard import LeakGuard, field_spellings, leaks, sender_keys
from relay.core.headers import Field, ParsedMessage
from relay.core.model import Copy, Envelope, IsolationOptions, Plan, Trace
from relay.core.spellings import address_key
from relay.core.split import VISIBLE, split_message


def keep_visible(
    message: ParsedMessage, envelope: Envelope, options: IsolationOptions, trace: Trace
) -> Plan:
    """One copy per unique recipient, ``To:`` and ``Cc:`` kept; raises ``Rejected``."""
    hidden = _hidden(message, envelope, options.removed_headers - VISIBLE)

    def check(number: int, rcpt: Address) -> Callable[[list[Field]], None]:
        return functools.partial(_check_hidden, number, own=address_key(rcpt), hidden=hidden)

    copies, merged = split_message(
        message, envelope, options, trace, keep_visible=True, check=check
    )
    warnings = _check_body(message, envelope, options, copies, hidden[0])
    return Plan(copies, merged, warnings, kept_recipients=True)


def _check_body(
    message: ParsedMessage,
    envelope: Envelope,
    options: IsolationOptions,
    copies: Sequence[Copy],
    secret: frozenset[str],
) -> tuple[str, ...]:
    """The guard's body and embedded-header checks, watching the hidden recipients only.

    The guard is given the message without its To: and Cc: (visible to all, so
    never "another recipient" here) and an envelope of the hidden recipients:
    what it watches is then exactly Rule 3's set, and ``body_check`` and
    ``embedded_check`` apply as for any message.
    """
    hidden_rcpts = tuple(r for r in envelope.recipients if address_key(r) in secret)
    if not hidden_rcpts and not any(f.name in options.removed_headers for f in message.fields):
        return ()
    shadow = replace(message, fields=tuple(f for f in message.fields if f.name not in VISIBLE))
    guard = LeakGuard(shadow, replace(envelope, recipients=hidden_rcpts), options)
    return guard.check_body(copies, scan=True)


def _hidden(
    message: ParsedMessage, envelope: Envelope, removed: frozenset[str]
) -> tuple[frozenset[str], frozenset[str]]:
    """The hidden recipients' keys (Rule 3), and the addresses a copy may show anyway."""
    visible: set[str] = set()
    secret: set[str] = {address_key(r) for r in envelope.recipients}
    for f in message.fields:
        if f.name in VISIBLE:
            visible |= set(field_spellings(f.raw))
        elif f.name in removed:
            secret |= set(field_spellings(f.raw))
    shown = frozenset(visible | sender_keys(message, envelope, removed))
    return frozenset(secret - shown), shown


def _check_hidden(
    number: int,
    fields: list[Field],
    own: str,
    hidden: tuple[frozenset[str], frozenset[str]],
) -> None:
    """``LeakDetected`` when a field of copy ``number`` names a hidden recipient not its own."""
    secret, shown = hidden
    if not secret - {own}:
        return
    exempt = shown | {own}
    for f in fields:
        found = field_spellings(f.raw)
        hits = {form: frozenset(found[form]) for form in found.keys() & secret}
        if hits and leaks(hits, own, exempt):
            raise LeakDetected(f"copy {number}: {f.display_name} names a hidden recipient")
