"""What the spool raises, and Rule 6 of ``relay.custody.spool``: which errors are damage."""

from __future__ import annotations

import errno
import sqlite3

from relay.core.errors import RelayError, Reply

# Rule 6: SQLite's primary result codes that say the file itself is damaged.
_DAMAGE_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class SpoolError(RelayError):
    """The spool could not take or change a record; the application gets ``451 4.3.0``."""

    reply = Reply(451, "4.3.0", "Temporary storage failure, try again later")


class SpoolFull(SpoolError):
    """The spool's file system (or ``spool.max_bytes``) is full: ``452 4.3.1`` (RFC 3463)."""

    reply = Reply(452, "4.3.1", "Insufficient system storage, try again later")


class Damaged(Exception):
    """Rule 6: a positive verdict that the database is damaged (the reason is the message)."""


def damage(exc: BaseException) -> bool:
    """Rule 6: whether an error reading the spool is a verdict that the file is damaged."""
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is None:  # the module's own: text that a column's type cannot hold
            return "could not decode" in str(exc).lower()
        return code & 0xFF in _DAMAGE_CODES
    # A value no healthy spool holds: text that is not UTF-8, a number out of range.
    return isinstance(exc, ValueError | TypeError | OverflowError)


def full(exc: BaseException) -> bool:
    """A full file system or quota (or SQLite's own limit, ``spool.max_bytes``)."""
    if isinstance(exc, OSError):
        return exc.errno in _FULL_ERRNOS
    code = getattr(exc, "sqlite_errorcode", None)
    return (
        isinstance(exc, sqlite3.Error) and code is not None and code & 0xFF == sqlite3.SQLITE_FULL
    )


def environment_error(exc: BaseException) -> SpoolError:
    """Rule 6: trouble that is not damage, as the one line an operator needs."""
    if isinstance(exc, SpoolError):
        return exc
    text = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    if full(exc):
        return SpoolFull(f"cannot open the spool: {text} (free space, then start again)")
    return SpoolError(f"cannot open the spool: {text}")
