"""Reading the files the configuration names: keys, certificates, users, passwords.

Rule 1: every configured file is read through here, at start-up (and the OAuth
token, which rotates, at each connection), so every failure is the same kind
of answer: one ``ConfigError`` naming the setting and the path, and the
operating system's reason.
Rule 2: the message never holds the file's content (a secret): a file that is
not UTF-8 text is said to be so, nothing more.
"""

from __future__ import annotations

from pathlib import Path

from relay.core.errors import ConfigError


def read_bytes(key: str, path: str | Path) -> bytes:
    """The file's bytes; ``ConfigError(key, "cannot read PATH: reason")`` if unreadable."""
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None


def read_text(key: str, path: str | Path) -> str:
    """The file as UTF-8 text; ``ConfigError`` if unreadable or not UTF-8."""
    try:
        return read_bytes(key, path).decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text") from None


def read_secret(key: str, path: str | Path) -> str:
    """A one-line secret file (a password, a token): its text without the final newline."""
    return read_text(key, path).rstrip("\r\n")


def check_readable(key: str, path: str | Path) -> None:
    """Raise ``ConfigError`` unless ``path`` can be opened for reading."""
    try:
        with open(path, "rb"):
            pass
    except OSError as exc:
        raise ConfigError(key, f"cannot read {path}: {exc.strerror or exc}") from None
