"""The split plan: one copy per unique envelope recipient, headers rebuilt.

Rule 1: the envelope is the only source of recipients; header addresses get
no copy, Bcc recipients get one, duplicates (same local part, same domain by
case and IDNA form) get one between them.
Rule 2: ``To:`` is rebuilt from scratch as exactly the copy's recipient; the
removal list is dropped whole; every other field is kept byte for byte and in
order; nothing is ever filtered in place.
Rule 3: body bytes pass through unchanged and are shared by every copy.
Rule 4: an application ``DKIM-Signature`` whose ``h=`` covers a field that
changed, or bytes that line-ending normalisation replaced (in a covered field,
or anywhere in the body), gets the configured action (strip, resign, reject);
one that covers nothing that changed is kept.
Rule 5: the length of a field the split rebuilds or removes does not matter; a
kept field with a line over 998 octets is folded at its whitespace, or the
message is refused (554 5.6.0, naming the field) where it cannot be.

Not here: the leak guard (``guard``), which checks the result on its own.
Pure: no I/O.
"""

from __future__ import annotations

import email.charset
import email.header
import email.utils
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from relay.core.addresses import Address, parse_address
from relay.core.dkim import DkimAction
from relay.core.errors import BadAddress, DkimRejected, HeaderDefect, TooBig, TooManyHops
from relay.core.headers import CRLF, Field, ParsedMessage, fold, plain_mailbox
from relay.core.model import Change, ChangeKind, Copy, Envelope, IsolationOptions, Trace
from relay.core.signatures import Signature, changed_names, parse_signature

MAX_DISPLAY_NAME_CHARS = 200  # a longer "name" is more likely a pasted list than a name
# A mailbox longer than this holds no display name a copy may keep (200 characters,
# RFC 2047-encoded about four times over, and an address).
MAX_ELEMENT_CHARS = 4 * MAX_DISPLAY_NAME_CHARS + 400
MAX_AUTHORS = 100  # a From: of more is a list, not a message's authors (and parses slowly)
PER_COPY_OCTETS = 512  # the Received: and To: lines each copy adds (about)

# Header fields whose display names may be carried to the rebuilt To:.
_ADDRESS_LISTS = ("to", "cc", "bcc")
_TRACE_TOKEN = re.compile(r"[^A-Za-z0-9.\-:\[\]_]")
_PHRASE_SPECIALS = re.compile(r'[][\\()<>@,:;".]')
# The plain forms mass mail uses: `Name <addr>` (letters, digits, spaces, . ' -) or
# `"Quoted name" <addr>` with no escapes and no encoded words; anything else is parsed.
_UTF8 = email.charset.Charset("utf-8")


# What a sender named in ``[senders] keep_recipients`` keeps (``relay.core.teamthread``).
VISIBLE = frozenset({"to", "cc"})

# Given a copy's number (from 1) and recipient, the check its final fields must pass.
CopyCheck = Callable[[int, Address], Callable[[list[Field]], None]]


def split_message(
    message: ParsedMessage,
    envelope: Envelope,
    options: IsolationOptions,
    trace: Trace,
    *,
    keep_visible: bool = False,
    check: CopyCheck | None = None,
) -> tuple[tuple[Copy, ...], int]:
    """Build one copy per unique recipient; return the copies and how many were merged.

    ``keep_visible``: the team-thread mode, ``To:`` and ``Cc:`` kept as written
    (``VISIBLE``) instead of ``To:`` rebuilt and ``Cc:`` removed; ``check`` makes
    each copy's own check of its final fields (``relay.core.teamthread``).

    Raises ``TooManyHops`` (554 5.4.0), ``TooBig`` (552 5.3.4: header sections
    times copies over ``max_fanout_octets``) and ``BadAddress`` (553 5.1.3, no
    recipient at all).
    """
    _check_message(message, envelope, options)
    removed = options.removed_headers - VISIBLE if keep_visible else options.removed_headers
    unique = _unique(envelope.recipients)
    names, kept, to_at = _plan_fields(message, removed, keep_visible, utf8=envelope.smtputf8)
    kept, folded = _fold_long(kept)
    fanout = (sum(len(f.raw) for f in kept) + PER_COPY_OCTETS) * len(unique)
    if fanout > options.max_fanout_octets:
        raise TooBig(f"{fanout} octets of header sections for {len(unique)} copies")
    shared = _shared_changes(message.fields, removed) + folded
    signatures = [parse_signature(f) for f in kept if f.name == "dkim-signature"]
    normalized = Normalized(message.normalized_fields(), message.body_normalized)
    body = message.body  # one view, shared by every copy (rule 3)
    copies = []
    for number, rcpt in enumerate(unique, start=1):
        fields = [Field("received", _received_line(trace, rcpt))]
        changes = [
            Change(ChangeKind.ADDED, "Received", "the relay's trace line for this copy"),
            *shared,
        ]
        if keep_visible:
            fields += kept
        else:
            fields += _with_own_to(rcpt, kept, to_at, names, changes)
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
                check=None if check is None else check(number, rcpt),
            )
        )
    return tuple(copies), len(envelope.recipients) - len(unique)


def _check_message(message: ParsedMessage, envelope: Envelope, options: IsolationOptions) -> None:
    """The refusals before any copy is built: no recipient, too many hops, a bad author."""
    if not envelope.recipients:
        raise BadAddress("no recipients")
    hops = sum(1 for f in message.fields if f.name == "received")
    if hops > options.max_hops:
        raise TooManyHops(f"{hops} Received fields, limit {options.max_hops}")
    _check_authors(message, utf8=envelope.smtputf8)


def _plan_fields(
    message: ParsedMessage, removed: frozenset[str], keep_visible: bool, *, utf8: bool
) -> tuple[dict[str, tuple[str | None, str]], list[Field], int]:
    """The display names to pair, the fields every copy keeps, and where ``To:`` goes."""
    if keep_visible:
        return {}, [f for f in message.fields if f.name not in removed], -1
    kept, to_at = _kept_fields(message.fields, removed)
    return _display_names(message.fields, utf8), kept, to_at


def _with_own_to(
    rcpt: Address,
    kept: list[Field],
    to_at: int,
    names: dict[str, tuple[str | None, str]],
    changes: list[Change],
) -> list[Field]:
    """``kept`` with the copy's own ``To:`` at ``to_at``; the change it makes is appended."""
    name, why = names.get(rcpt.key, (None, "no display name was paired with this address"))
    changes.append(Change(ChangeKind.REBUILT, "To", f"one mailbox: the copy's recipient; {why}"))
    return [*kept[:to_at], Field("to", _to_line(rcpt, name)), *kept[to_at:]]


def finish_copy(
    rcpt: Address,
    fields: list[Field],
    changes: list[Change],
    *,
    signatures: Sequence[Signature],
    message: ParsedMessage,
    body: memoryview,
    normalized: Normalized,
    options: IsolationOptions,
    check: Callable[[list[Field]], None] | None = None,
) -> Copy:
    """A copy's last steps: application signatures settled, ``check`` run on the final
    fields, then the relay's own signature over the final bytes. ``body`` is the
    message's one body view, which every copy shares.

    Raises ``DkimRejected`` (``dkim.action = reject``) and whatever ``check`` raises.
    """
    sign = options.sign_all
    if signatures:
        fields, dkim, broken = _settle_signatures(signatures, message.fields, fields, normalized)
        if broken and options.dkim_action is DkimAction.REJECT:
            raise DkimRejected(dkim[0].reason)
        sign = sign or (broken and options.dkim_action is DkimAction.RESIGN)
        changes.extend(dkim)
    if check is not None:
        check(fields)
    headers = b"".join([*(f.raw for f in fields), CRLF])
    if sign and options.signer is not None:
        # Last, over the final bytes: the copy verifies as its recipient receives it.
        headers = options.signer.sign(headers, body) + headers
        changes.append(
            Change(
                ChangeKind.DKIM_SIGNED,
                "DKIM-Signature",
                f"d={options.signer.domain} s={options.signer.selector}: signed by the relay",
            )
        )
    return Copy(rcpt, headers, body, tuple(changes))


def _check_authors(message: ParsedMessage, *, utf8: bool) -> None:
    """RFC 5322 3.6: one From:, at most one Sender: naming one mailbox, and a From: of
    several mailboxes only with that Sender: (3.6.2).

    Every mailbox of From: and Sender: is the sender's, which every copy may
    show (the guard exempts them), so these are refused (554 5.6.0) rather than
    shown to everyone: a From: listing many mailboxes with no Sender:, or over
    ``MAX_AUTHORS``, is more likely a recipient list pasted into the wrong field.
    """
    froms = message.named("from")
    senders = message.named("sender")
    if len(froms) > 1 or len(senders) > 1:
        raise HeaderDefect("more than one From: or Sender: field (RFC 5322 3.6)")
    if senders and len(senders[0].mailboxes(utf8=utf8)) != 1:
        raise HeaderDefect("Sender: does not name exactly one mailbox (RFC 5322 3.6.2)")
    if not froms or "," not in froms[0].text():
        return
    if len(_elements(froms[0].text())) > MAX_AUTHORS:
        raise HeaderDefect(f"From: names more than {MAX_AUTHORS} mailboxes")
    if len(froms[0].mailboxes(utf8=utf8)) > 1 and not senders:
        raise HeaderDefect("From: names several mailboxes and no single Sender: (RFC 5322 3.6.2)")


def _unique(recipients: Sequence[Address]) -> list[Address]:
    seen: set[str] = set()
    unique = []
    for rcpt in recipients:
        if rcpt.key not in seen:
            seen.add(rcpt.key)
            unique.append(rcpt)
    return unique


def _kept_fields(fields: Sequence[Field], removed: frozenset[str]) -> tuple[list[Field], int]:
    """Fields that survive whole, and where the new ``To:`` goes (first old ``To:``, or last)."""
    kept: list[Field] = []
    to_at = -1
    for f in fields:
        if f.name == "to":
            if to_at < 0:
                to_at = len(kept)
        elif f.name not in removed:
            kept.append(f)
    return kept, (to_at if to_at >= 0 else len(kept))


def _fold_long(kept: list[Field]) -> tuple[list[Field], list[Change]]:
    """Kept fields with no line over 998 octets, and a change for each one folded."""
    folded = [fold(f) for f in kept]
    changes = [
        Change(ChangeKind.FOLDED, f.display_name, "a line over 998 octets, folded at its spaces")
        for f, new in zip(kept, folded, strict=True)
        if new is not f
    ]
    return folded, changes


def _shared_changes(fields: Sequence[Field], removed: frozenset[str]) -> list[Change]:
    changes = []
    seen: set[str] = set()
    for f in fields:
        if f.name in removed and f.name not in seen:
            seen.add(f.name)
            changes.append(Change(ChangeKind.REMOVED, f.display_name, "recipient-bearing header"))
    return changes


def _display_names(fields: Sequence[Field], smtputf8: bool) -> dict[str, tuple[str | None, str]]:
    """Map each address key to the display name its copy may keep, with the reason.

    SPEC 3: a name is kept only if the original paired it with exactly that
    address, the pairing is unambiguous, and it holds no ``@`` (raw or after
    RFC 2047 decoding); ``%`` and ``=`` are refused too, since they spell an
    address in URL and VERP form.
    """
    seen: dict[str, set[str]] = {}
    for f in fields:
        if f.name not in _ADDRESS_LISTS or b"<" not in f.raw:
            continue  # a display name needs a name-addr (RFC 5322 3.4): no "<", no name
        for display_name, addr_spec in _named_mailboxes(f):
            try:
                address = parse_address(addr_spec, smtputf8=True)
            except BadAddress:
                continue
            if address is not None:
                seen.setdefault(address.key, set()).add(display_name)
    result: dict[str, tuple[str | None, str]] = {}
    for key, found in seen.items():
        names = {n for n in found if n}
        if len(names) != 1:
            why = "the original gave it several names" if names else "none in the original"
            result[key] = (None, f"display name dropped: {why}")
            continue
        (name,) = names
        spells_address = any(c in name for c in "@%=")
        if spells_address or len(name) > MAX_DISPLAY_NAME_CHARS or not name.isprintable():
            result[key] = (None, "display name dropped: it could spell an address")
        else:
            result[key] = (name, "display name kept: paired with exactly this address")
    return result


def _named_mailboxes(f: Field) -> Iterator[tuple[str, str]]:
    """(display name, addr-spec) of each ``name <addr>`` in an address list, one element at a time.

    Parsing a 10,000-name ``To:`` whole with ``email.headerregistry`` costs
    seconds and a hundred megabytes; element by element, the plain forms take a
    regular expression and the rest a parse of a few dozen characters each.
    """
    for element in _elements(f.text()):
        if "<" not in element or len(element) > MAX_ELEMENT_CHARS:
            continue  # no name-addr, or longer than any name the copy may keep
        plain = plain_mailbox(element)
        if plain is not None:
            yield plain
            continue
        yield from Field(
            f.name, f"{f.name}: {element}\r\n".encode("utf-8", "surrogateescape")
        ).mailboxes()


def _elements(value: str) -> list[str]:
    """Split an address list at top-level commas, and at a group's ":" and ";" (RFC 5322 3.4)."""
    elements = []
    start = depth = angle = 0
    quoted = escaped = False
    for i, c in enumerate(value):
        if escaped:
            escaped = False
        elif c == "\\" and (quoted or depth):
            escaped = True
        elif quoted:
            quoted = c != '"'
        elif c == '"':
            quoted = True
        elif c == "(":
            depth += 1
        elif c == ")" and depth:
            depth -= 1
        elif depth:
            continue
        elif c == "<":
            angle += 1
        elif c == ">" and angle:
            angle -= 1
        elif c in ",:;" and not angle:
            elements.append(value[start:i])
            start = i + 1
    elements.append(value[start:])
    return [e.strip() for e in elements if e.strip()]


def _to_line(rcpt: Address, name: str | None) -> bytes:
    if name is None:
        return b"To: " + rcpt.text.encode("utf-8") + CRLF
    return b"To: " + _phrase(name).encode("ascii") + b" <" + rcpt.text.encode("utf-8") + b">" + CRLF


def _phrase(name: str) -> str:
    """A display name as RFC 5322 wants it: atoms, a quoted string, or RFC 2047 words.

    Non-ASCII names become encoded words of at most 75 characters, folded
    (RFC 2047 2), so the rebuilt ``To:`` never nears the 998-octet line limit.
    """
    if not name.isascii():
        # maxlinelen 75: continuation words otherwise reach 76 characters (RFC 2047 2: 75).
        return email.header.Header(name, _UTF8, header_name="To", maxlinelen=75).encode(
            linesep="\r\n"
        )
    if _PHRASE_SPECIALS.search(name):
        return '"' + email.utils.quote(name) + '"'
    return name


def _received_line(trace: Trace, rcpt: Address) -> bytes:
    """RFC 5321 4.4 trace line; client-supplied parts are reduced to safe characters."""
    helo, ip, host, protocol, queue_id = (
        _TRACE_TOKEN.sub("?", part)[:255] or "unknown"
        for part in (trace.helo, trace.client_ip, trace.by_host, trace.protocol, trace.queue_id)
    )
    line = (
        f"Received: from {helo} ([{ip}])\r\n"
        f"\tby {host} (solo-relay) with {protocol} id {queue_id}\r\n"
        f"\tfor <{rcpt.text}>; {trace.date}\r\n"
    )
    return line.encode("utf-8")


@dataclass(frozen=True, slots=True)
class Normalized:
    """What line-ending normalisation replaced: bytes of these fields, and of the body."""

    fields: frozenset[str]
    body: bool

    def covered(self, sig: Signature) -> tuple[str, ...]:
        """The parts of ``sig``'s input that normalisation changed, for its reason.

        A signature covers its own field too (RFC 6376 3.7), so a normalised
        ``DKIM-Signature`` field counts for every signature, fail safe.
        """
        signed = set(sig.covered) | {"dkim-signature"}
        names = sorted(self.fields) if "*" in sig.covered else sorted(self.fields & signed)
        return (*names, *(("body",) if self.body else ()))


def _settle_signatures(
    signatures: Sequence[Signature],
    originals: Sequence[Field],
    fields: list[Field],
    normalized: Normalized,
) -> tuple[list[Field], list[Change], bool]:
    """Strip each signature the copy breaks; repeat, since a strip is itself a change.

    A signature is broken by a change to a field its ``h=`` picks, and by any
    byte that normalisation replaced in such a field or in the body (its body
    hash covers the body as the application sent it). Returns the fields, the
    changes (stripped ones first) and whether any was broken.
    """
    changes: list[Change] = []
    live = list(signatures)
    while True:
        broken = []
        for sig in live:
            why = []
            parts = normalized.covered(sig)
            if parts:
                why.append(f"line-ending normalisation changed {', '.join(parts)}")
            if sig.field not in originals:  # a signature covers its own field (RFC 6376 3.7)
                why.append("its own field was folded")
            if why:
                broken.append(sig)
                changes.append(
                    Change(
                        ChangeKind.DKIM_STRIPPED,
                        "DKIM-Signature",
                        f"d={sig.domain} s={sig.selector}: {'; '.join(why)}",
                    )
                )
                continue
            changed = changed_names(sig, originals, fields)
            if changed:
                broken.append(sig)
                changes.append(
                    Change(
                        ChangeKind.DKIM_STRIPPED,
                        "DKIM-Signature",
                        f"d={sig.domain} s={sig.selector}: h= covers changed {', '.join(changed)}",
                    )
                )
        if not broken:
            break
        gone = {id(sig.field) for sig in broken}
        fields = [f for f in fields if id(f) not in gone]
        live = [sig for sig in live if id(sig.field) not in gone]
    broken_any = bool(changes)
    changes.extend(
        Change(
            ChangeKind.DKIM_KEPT, "DKIM-Signature", f"d={s.domain} s={s.selector}: nothing changed"
        )
        for s in live
    )
    return fields, changes, broken_any
