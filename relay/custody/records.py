"""The spool's records: copy states, what is stored, what a claim hands out, and the
checks a stored value must pass before it is used.
"""

from __future__ import annotations

import enum
import secrets
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from relay.core.addresses import Address


def new_queue_id() -> str:
    """Sortable by time, unique enough per deployment, and naming nobody."""
    return f"{int(time.time()):x}{secrets.token_hex(5)}".upper()


class CopyState(enum.Enum):
    QUEUED = "queued"
    DELIVERING = "delivering"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"


LIVE = (CopyState.QUEUED, CopyState.DELIVERING, CopyState.DEFERRED)
LIVE_VALUES = tuple(s.value for s in LIVE)
LIVE_BYTES = tuple(s.value.encode() for s in LIVE)
FINAL = (CopyState.DELIVERED, CopyState.FAILED)


@dataclass(frozen=True, slots=True)
class NewCopy:
    rcpt: str
    headers: bytes
    state: CopyState = CopyState.QUEUED
    next_try: float = 0.0
    attempts: int = 0
    last_code: int = 0
    last_enhanced: str = ""
    last_text: str = ""


@dataclass(frozen=True, slots=True)
class NewMessage:
    id: str
    sender: str  # "" for <>
    smtputf8: bool
    received: float
    expires: float
    body: bytes | memoryview
    copies: tuple[NewCopy, ...]
    auth_user: str = ""
    is_dsn: bool = False


@dataclass(frozen=True, slots=True)
class Job:
    """A copy claimed for delivery (now ``delivering``)."""

    copy_id: int
    message_id: str
    rcpt: str
    headers: bytes
    attempts: int
    sender: str
    smtputf8: bool
    auth_user: str
    received: float
    expires: float
    is_dsn: bool
    address: Address | None = None  # ``rcpt`` as already validated, when handed over


@dataclass(frozen=True, slots=True)
class CopyRow:
    """One copy as ``solo-relay queue`` shows it."""

    copy_id: int
    message_id: str
    rcpt: str
    state: CopyState
    attempts: int
    next_try: float
    last_code: int
    last_enhanced: str
    last_text: str
    received: float
    sender: str


def jobs_for(
    message: NewMessage, copy_ids: Sequence[int], addresses: Sequence[Address]
) -> list[Job]:
    """``message``'s copies, stored under ``copy_ids``, as jobs for the workers.

    For copies stored ``delivering`` and handed to the workers in memory: the same
    jobs a claim would have read back, without reading them back; ``addresses`` are
    the recipients as intake validated them, in the same order.
    """
    return [
        Job(
            copy_id,
            message.id,
            copy.rcpt,
            copy.headers,
            copy.attempts,
            message.sender,
            message.smtputf8,
            message.auth_user,
            message.received,
            message.expires,
            message.is_dsn,
            address,
        )
        for copy_id, copy, address in zip(copy_ids, message.copies, addresses, strict=True)
    ]


def utf8(*values: object) -> bool:
    """Every value is stored text that decodes (a column read ``CAST(... AS BLOB)``)."""
    try:
        for value in values:
            if isinstance(value, bytes):
                value.decode("utf-8")
            elif value is not None:
                return False
    except UnicodeDecodeError:
        return False
    return True


def sort_time(value: object) -> float:
    """A stored time for ordering; a damaged one (quarantined by the caller) sorts first."""
    return float(value) if numbers(value) else float("-inf")  # type: ignore[arg-type]


def numbers(*values: object) -> bool:
    """Every value is a real number (a damaged row can hold text where a time should be)."""
    return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def copy_crc(rcpt: object, headers: object) -> int | None:
    """The copy's checksum; None (never equal to a stored one) when a column has the wrong type.

    ``rcpt`` is the address, or its stored UTF-8 bytes (the recovery scan reads them raw).
    """
    if isinstance(rcpt, str):
        rcpt = rcpt.encode("utf-8")
    if not isinstance(rcpt, bytes) or not isinstance(headers, bytes):
        return None
    return zlib.crc32(headers, zlib.crc32(rcpt))


def body_crc(body: object) -> int | None:
    return zlib.crc32(body) if isinstance(body, bytes) else None


def message_size(message: NewMessage) -> int:
    return len(message.body) + sum(len(c.headers) + len(c.rcpt) for c in message.copies)
