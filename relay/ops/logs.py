"""Logging for the relay: JSON lines or text, with addresses as keyed tokens.

Rule 1: an address never reaches a log line in clear unless the operator
asked for it (``[log] show_addresses``). Code logs ``token(address)``: an
HMAC-SHA256 of the lower-cased address under the deployment's key, so the
same address gives the same token within one deployment (lines can be
correlated) and nobody without the key can test a guess.
Rule 2: as a last line of defence, a filter on the relay's handler replaces
anything that looks like an address in each record's message, fields and
traceback with its token, whichever logger wrote it.
A value the code has already made safe (the upstream URL, whose user name
looks like an address to the filter) is passed as ``Verbatim`` and left as it is.
Rule 3: aiosmtpd's ``mail.log`` (which logs every ``RCPT TO`` and the peer)
and its ``mail.debug``, and aiosmtplib's logger, are held at WARNING.

Structured fields go in ``extra={"fields": {...}}``; the JSON formatter puts
them beside ``ts``, ``level``, ``logger`` and ``event``. This module formats
and redacts; it does not decide what is logged, nor where logs are shipped.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import datetime
import hashlib
import hmac
import io
import json
import logging
import os
import re
import secrets
import select
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TextIO

from relay import files
from relay.config import LogConfig, LogFormat
from relay.core.errors import ConfigError

KEY_FILE = "log-hash.key"
KEY_BYTES = 32  # HMAC-SHA256's block-size-safe key length (RFC 2104 2: at least L=32)
MIN_KEY_BYTES = 16  # a configured or stored key shorter than this is refused
TOKEN_HEX = 16  # 64 bits: collisions stay unlikely across millions of addresses
TOKEN_PREFIX = "a_"
NULL_SENDER = "<>"

# Loggers of the libraries underneath: chatty at INFO/DEBUG, and they name addresses.
QUIET_LOGGERS = ("mail.log", "mail.debug", "aiosmtplib")

# Something that looks like an address: a dot-atom or quoted local part, "@", and a
# domain of dot-separated labels or an address literal. Broad on purpose (Unicode
# letters for SMTPUTF8): a false hit costs a token, a miss costs an address in a log.
ADDRESS_PATTERN = re.compile(
    r"""(?:"[^"\r\n]{0,64}"|[\w!#$%&*+/=?^`{|}~-][\w.!#$%&'*+/=?^`{|}~-]*)"""
    r"""@(?:\[[^\]\s]{1,64}\]|[\w-]+(?:\.[\w-]+)*)"""
)

# Attributes every LogRecord has; anything else came in through ``extra``.
_RECORD_ATTRS = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_HANDLER_MARK = "_solo_relay_handler"
# Lines below WARNING wait in a buffer at most this long (``flush`` runs on this period
# too): a busy relay writes a line per copy, and one system call for each line cost more
# than the rest of the logging. Warnings and errors are written at once.
FLUSH_SECONDS = 0.2
_PLAIN = frozenset({int, float, bool})  # field values with nothing to redact


class Verbatim(str):
    """A field value that names no one and is logged as it is (Rule 2's one exception).

    Only for values the relay builds itself from its configuration, such as
    ``Target.redacted()``: an upstream login ``apikey@smtp.example.net`` is not
    an address, and a token in its place would hide which account is in use.
    """

    __slots__ = ()


class AddressTokens:
    """Turns addresses into stable, keyed tokens (or leaves them, when asked).

    ``tokens("Bob@Example.COM")`` and ``tokens("bob@example.com")`` give the
    same ``a_`` + 16 hex digits under one key, and different ones under another.
    """

    __slots__ = ("_key", "show")

    def __init__(self, key: bytes, *, show: bool = False) -> None:
        if len(key) < MIN_KEY_BYTES:
            raise ValueError(f"the address token key needs at least {MIN_KEY_BYTES} bytes")
        self._key = key
        self.show = show

    def __repr__(self) -> str:
        return f"<AddressTokens show={self.show}>"  # never the key

    def __call__(self, address: str) -> str:
        """The token of ``address`` (the address itself when ``show`` is set)."""
        if self.show:
            return address
        normalised = address.strip().removeprefix("<").removesuffix(">").strip().lower()
        if not normalised:
            return NULL_SENDER  # the null reverse-path names nobody
        digest = hmac.new(self._key, normalised.encode("utf-8", "surrogatepass"), hashlib.sha256)
        return TOKEN_PREFIX + digest.hexdigest()[:TOKEN_HEX]

    def token(self, address: str) -> str:
        """The same as calling the instance: the token of ``address``."""
        return self(address)

    def redact(self, text: str) -> str:
        """``text`` with everything that looks like an address replaced by its token."""
        if self.show or "@" not in text:
            return text
        return ADDRESS_PATTERN.sub(lambda m: self(m.group(0)), text)

    def redact_value(self, value: Any) -> Any:
        """A field value with every string in it redacted (dicts, lists, tuples, sets)."""
        kind = type(value)
        if kind is Verbatim:
            return value
        if kind is str:
            return self.redact(value)
        if kind in _PLAIN or value is None:
            return value
        if isinstance(value, str):
            return self.redact(value)
        if isinstance(value, Mapping):
            return {self.redact(str(k)): self.redact_value(v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.redact_value(v) for v in value]
        if isinstance(value, bool | int | float):
            return value
        return self.redact(str(value))  # an object's str() can name anyone


# Until setup_logging runs, tokens use a key that lives only as long as the process.
_tokens = AddressTokens(secrets.token_bytes(KEY_BYTES))


def token(address: str) -> str:
    """The token of ``address`` under the key ``setup_logging`` installed."""
    return _tokens(address)


class RedactAddresses(logging.Filter):
    """Rewrites a record in place so no address survives in it (Rule 2).

    The message is formatted (``msg % args``) and redacted; ``fields``, any
    other ``extra`` attribute, the traceback and the stack are redacted too.
    A record passes through once per handler; tokens do not match the
    pattern, so a second pass changes nothing.
    """

    def __init__(self, tokens: AddressTokens) -> None:
        super().__init__()
        self.tokens = tokens

    def filter(self, record: logging.LogRecord) -> bool:
        if self.tokens.show:
            return True
        redact = self.tokens.redact
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the line, nor leak its args
            message = f"{record.msg!s} {record.args!r}"
        record.msg = redact(message)
        record.args = None
        for name in record.__dict__.keys() - _RECORD_ATTRS:  # what came in through ``extra``
            setattr(record, name, self.tokens.redact_value(getattr(record, name)))
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = getattr(record, "fields", None)
    return dict(fields) if isinstance(fields, Mapping) else {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, event, then the record's fields.

    A field named like one of the four fixed keys is written as ``field_<name>``.
    """

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        for name, value in _fields(record).items():
            line[f"field_{name}" if name in line else str(name)] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line["exc"] = record.exc_text
        if record.stack_info:
            line["stack"] = record.stack_info
        return json.dumps(line, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``ts LEVEL logger: event key=value ...`` for a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, f"{record.name}:", record.getMessage()]
        parts.extend(
            f"{name}={json.dumps(value, ensure_ascii=False, default=str)}"
            if not isinstance(value, str) or not value or any(c.isspace() for c in value)
            else f"{name}={value}"
            for name, value in _fields(record).items()
        )
        text = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            text += "\n" + record.exc_text
        if record.stack_info:
            text += "\n" + record.stack_info
        return text


def wants_json(fmt: LogFormat, stream: TextIO) -> bool:
    """JSON for ``json``, text for ``text``; ``auto``: JSON unless ``stream`` is a terminal."""
    if fmt is LogFormat.AUTO:
        isatty = getattr(stream, "isatty", None)
        return not (callable(isatty) and isatty())
    return fmt is LogFormat.JSON


class _BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that flushes per ``FLUSH_SECONDS``, or at once from WARNING up."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._flushed = time.monotonic()
        self._urgent = False

    def emit(self, record: logging.LogRecord) -> None:
        self._urgent = record.levelno >= logging.WARNING
        super().emit(record)  # writes, then calls flush()

    def flush(self) -> None:
        if self._urgent or time.monotonic() - self._flushed >= FLUSH_SECONDS:
            self.flush_now()

    def flush_now(self) -> None:
        super().flush()
        self._flushed = time.monotonic()


_handler: _BatchingHandler | None = None


def flush() -> None:
    """Write out buffered log lines (the server calls this every ``FLUSH_SECONDS``)."""
    if _handler is not None:
        _handler.flush_now()


async def flush_periodically() -> None:
    """Write out buffered lines every ``FLUSH_SECONDS``, busy or quiet (a task of the server)."""
    while True:
        await asyncio.sleep(FLUSH_SECONDS)
        with contextlib.suppress(OSError):  # a full or closed pipe: try again next time
            flush()


class _WholeLines(io.RawIOBase):
    """Writes to a file descriptor in pieces of at most ``PIPE_BUF`` bytes that end a line.

    A pipe takes a write of up to ``PIPE_BUF`` (4096 on Linux) in one piece: the
    workers of one supervisor share standard error, and no line of one must land
    inside a line of another. A longer line goes out in pieces, as it would anyway.
    """

    def __init__(self, descriptor: int) -> None:
        super().__init__()
        self._descriptor = descriptor

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:  # the buffered writer retries the rest
        piece = memoryview(data)[: select.PIPE_BUF]
        end = bytes(piece).rfind(b"\n") + 1
        return os.write(self._descriptor, piece[: end or len(piece)])


def _buffered_stderr() -> TextIO:
    """Standard error with a 64 KiB buffer (Python's own is line-buffered: a call a line)."""
    raw = _WholeLines(sys.stderr.fileno())
    return io.TextIOWrapper(
        io.BufferedWriter(raw, 1 << 16), encoding="utf-8", errors="backslashreplace"
    )


def setup_logging(config: LogConfig, *, key: bytes, stream: TextIO | None = None) -> AddressTokens:
    """Install the relay's one handler on the root logger and return its tokens.

    Idempotent: a handler an earlier call installed is replaced; handlers
    others installed are left alone. Also makes ``token()`` use ``key``.
    Raises ``ValueError`` for a key shorter than 16 bytes.
    """
    global _tokens, _handler  # noqa: PLW0603 - logging is process-wide
    tokens = AddressTokens(key, show=config.show_addresses)
    out = sys.stderr if stream is None else stream
    if stream is None and not sys.stderr.isatty():
        out = _buffered_stderr()  # a terminal keeps its lines as they come
    handler = _BatchingHandler(out)
    handler.setFormatter(JsonFormatter() if wants_json(config.format, out) else TextFormatter())
    handler.addFilter(RedactAddresses(tokens))
    setattr(handler, _HANDLER_MARK, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_MARK, False):
            if isinstance(old, _BatchingHandler):
                old.flush_now()
            root.removeHandler(old)
            old.close()
    root.addHandler(handler)
    root.setLevel(config.level.upper())
    # Nothing the formatters write needs the caller's frame, thread or process: the
    # logging HOWTO's "Optimization" settings, which spare each record that work.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    _tokens = tokens
    _handler = handler
    return tokens


atexit.register(flush)


def load_key(config: LogConfig, spool_dir: Path) -> bytes:
    """The deployment's token key: ``[log] hash_key_file``, else ``hash_key``, else the
    one kept in the spool.

    The stored key is 32 random bytes at ``spool_dir / "log-hash.key"``, created
    once with mode 0600 (written to a temporary file, then linked into place, so
    two starting relays agree on one key and a crash leaves no half key).
    Raises ``ConfigError`` (key ``log.hash_key_file`` or ``log.hash_key``) when
    the key is too short or the file cannot be read or created.
    """
    configured = configured_key(config)
    if configured is not None:
        return configured
    path = spool_dir / KEY_FILE
    try:
        return _read_key(path)
    except FileNotFoundError:
        pass
    try:
        spool_dir.mkdir(parents=True, exist_ok=True)
        _create_key(path)
        return _read_key(path)
    except OSError as exc:
        raise ConfigError("log.hash_key", f"cannot create {path}: {exc.strerror}") from exc


def check_key(config: LogConfig, spool_dir: Path) -> None:
    """What ``load_key`` checks, creating nothing: ``solo-relay check`` runs this."""
    if configured_key(config) is None:
        with contextlib.suppress(FileNotFoundError):  # made at the first start
            _read_key(spool_dir / KEY_FILE)


def configured_key(config: LogConfig) -> bytes | None:
    """The key from ``hash_key_file`` or ``hash_key``; None when neither is set."""
    if config.hash_key_file:
        key_name = "log.hash_key_file"
        key = files.read_bytes(key_name, config.hash_key_file).rstrip(b"\r\n")
    elif config.hash_key:
        key_name, key = "log.hash_key", config.hash_key.encode("utf-8")
    else:
        return None
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(key_name, f"must be at least {MIN_KEY_BYTES} bytes long")
    return key


def _read_key(path: Path) -> bytes:
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise ConfigError("log.hash_key", f"cannot read {path}: {exc.strerror}") from exc
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError("log.hash_key", f"{path} holds no usable key; remove it to make one")
    return key


def _create_key(path: Path) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, secrets.token_bytes(KEY_BYTES))
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(temporary, path)  # fails if another process made the key first: use theirs
    except FileExistsError:
        pass
    finally:
        temporary.unlink()
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
