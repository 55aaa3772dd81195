"""Which application ``DKIM-Signature`` fields survive a copy's header surgery.

Rule 1: a signature is broken when, for any name in its ``h=`` list, the
fields a verifier would pick for that name differ between the original and
the copy (RFC 6376 5.4.2: instances are taken from the bottom up, and a name
listed more often than it occurs signs a null field, so "oversigning" ``cc``
with no ``Cc:`` stays valid as long as the copy has none either).
Rule 2: fields are compared by their exact bytes; a difference that relaxed
canonicalisation would forgive still counts as a change (fail safe: a
stripped signature costs less than a broken one).

Not here: what to do with a broken signature (``split``: strip), nor any
cryptography (the body hash holds because body bytes are never touched).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from relay.core.headers import Field


@dataclass(frozen=True, slots=True)
class Signature:
    """The parts of one ``DKIM-Signature`` field the relay reasons about."""

    field: Field
    domain: str
    selector: str
    covered: tuple[str, ...]  # ``h=`` names, lower case, in order, with repeats


def parse_signature(field: Field) -> Signature:
    """Read the tag list of a ``DKIM-Signature`` field (RFC 6376 3.2, 3.5).

    A field without a usable ``h=`` tag covers nothing that can be checked,
    so it is reported as covering every name it might (``*``) and treated as
    broken by any change.
    """
    tags: dict[str, str] = {}
    for part in field.text().split(";"):
        name, sep, value = part.partition("=")
        if sep:
            tags[name.strip().lower()] = "".join(value.split())
    covered = tuple(n.lower() for n in tags.get("h", "*").split(":") if n)
    return Signature(field, tags.get("d", "?"), tags.get("s", "?"), covered or ("*",))


def changed_names(
    signature: Signature, before: Sequence[Field], after: Sequence[Field]
) -> tuple[str, ...]:
    """Names in ``h=`` whose verifier-selected fields differ between the two sections."""
    if "*" in signature.covered:
        return ("*",) if [f.raw for f in before] != [f.raw for f in after] else ()
    counts: dict[str, int] = {}
    for name in signature.covered:
        counts[name] = counts.get(name, 0) + 1
    changed = []
    for name, wanted in counts.items():
        if _selected(name, wanted, before) != _selected(name, wanted, after):
            changed.append(name)
    return tuple(changed)


def _selected(name: str, wanted: int, fields: Sequence[Field]) -> list[bytes | None]:
    """The ``wanted`` bottom-most instances of ``name``; ``None`` for a null field."""
    instances = [f.raw for f in fields if f.name == name]
    picked: list[bytes | None] = list(reversed(instances[-wanted:]))
    return picked + [None] * (wanted - len(picked))
