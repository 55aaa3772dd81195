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

Pure: no I/O. Reuses the splitter's and the guard's helpers; changes neither.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace

from relay.core.errors import BadAddress, LeakDetected, TooBig, TooManyHops
from relay.core.guard import LeakGuard, _field_spellings, _leaks, _senders
from relay.core.headers import Field, ParsedMessage
from relay.core.model import Change, ChangeKind, Copy, Envelope, IsolationOptions, Plan, Trace
from relay.core.signatures import parse_signature
from relay.core.spellings import address_key
from relay.core.split import (
    PER_COPY_OCTETS,
    Normalized,
    _check_authors,
    _fold_long,
    _received_line,
    _unique,
    finish_copy,
)

VISIBLE = frozenset({"to", "cc"})  # what a named sender's copies keep (Rule 2)


def keep_visible(
    message: ParsedMessage, envelope: Envelope, options: IsolationOptions, trace: Trace
) -> Plan:
    """One copy per unique recipient, ``To:`` and ``Cc:`` kept; raises ``Rejected``."""
    if not envelope.recipients:
        raise BadAddress("no recipients")
    hops = sum(1 for f in message.fields if f.name == "received")
    if hops > options.max_hops:
        raise TooManyHops(f"{hops} Received fields, limit {options.max_hops}")
    _check_authors(message, utf8=envelope.smtputf8)
    removed = options.removed_headers - VISIBLE
    unique = _unique(envelope.recipients)
    kept, folded = _fold_long([f for f in message.fields if f.name not in removed])
    fanout = (sum(len(f.raw) for f in kept) + PER_COPY_OCTETS) * len(unique)
    if fanout > options.max_fanout_octets:
        raise TooBig(f"{fanout} octets of header sections for {len(unique)} copies")
    first = {f.name: f for f in reversed(message.fields) if f.name in removed}
    shared = [
        Change(ChangeKind.REMOVED, f.display_name, "recipient-bearing header")
        for f in message.fields
        if first.get(f.name) is f
    ]
    shared += folded
    signatures = [parse_signature(f) for f in kept if f.name == "dkim-signature"]
    normalized = Normalized(message.normalized_fields(), message.body_normalized)
    hidden = _hidden(message, envelope, removed)
    body = message.body  # one view, shared by every copy
    copies = []
    for number, rcpt in enumerate(unique, start=1):
        fields = [Field("received", _received_line(trace, rcpt)), *kept]
        changes = [
            Change(ChangeKind.ADDED, "Received", "the relay's trace line for this copy"),
            *shared,
        ]
        own = address_key(rcpt)
        copies.append(
            finish_copy(
                rcpt,
                fields,
                changes,
                signatures=signatures,
                message=message,
                body=body,
                normalized=normalized,
                options=options,
                check=functools.partial(_check_hidden, number, own=own, hidden=hidden),
            )
        )
    warnings = _check_body(message, envelope, options, copies, hidden[0])
    merged = len(envelope.recipients) - len(unique)
    return Plan(tuple(copies), merged, warnings, kept_recipients=True)


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
    return guard._check_body(copies, scan=True)


def _hidden(
    message: ParsedMessage, envelope: Envelope, removed: frozenset[str]
) -> tuple[frozenset[str], frozenset[str]]:
    """The hidden recipients' keys (Rule 3), and the addresses a copy may show anyway."""
    visible: set[str] = set()
    secret: set[str] = {address_key(r) for r in envelope.recipients}
    for f in message.fields:
        if f.name in VISIBLE:
            visible |= set(_field_spellings(f.raw))
        elif f.name in removed:
            secret |= set(_field_spellings(f.raw))
    shown = frozenset(visible | _senders(message, envelope, removed))
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
        found = _field_spellings(f.raw)
        hits = {form: frozenset(found[form]) for form in found.keys() & secret}
        if hits and _leaks(hits, own, exempt):
            raise LeakDetected(f"copy {number}: {f.display_name} names a hidden recipient")
