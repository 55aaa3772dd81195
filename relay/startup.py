"""Start-up validation: every check ``serve`` makes before it opens a port.

Rule 1: ``solo-relay serve`` and ``solo-relay check`` both run ``prepare``, so
``check`` says OK exactly when ``serve`` would start (short of a port being
taken, which only binding it can tell).
Rule 2: it changes nothing: no spool, key file or outbox is created here.
Rule 3: every failure is one ``ConfigError`` naming the key, and the path or
the value at fault; the command line prints it as one line and exits 2.

Not here: the pure checks of single values (``relay.config.validate`` runs them
when the configuration is loaded), and the spool itself (opened by the server).
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path

from relay.config import AuthMode, Config, StartTLS
from relay.core.errors import ConfigError
from relay.core.model import IsolationOptions
from relay.files import check_readable
from relay.inbound.auth import Users
from relay.inbound.tls import server_context
from relay.ops.logs import check_key
from relay.upstream.target import (
    Target,
    configured_credentials,
    dsn_credentials,
    parse_upstream_url,
    tls_context,
)


@dataclass(frozen=True, slots=True)
class Prepared:
    """What start-up validation produced: the parsed upstream and the isolation options."""

    target: Target
    options: IsolationOptions
    tls: ssl.SSLContext | None
    users: Users


def prepare(config: Config) -> Prepared:
    """Run every start-up check on ``config``; raise ``ConfigError`` at the first failure."""
    smtp = config.smtp
    if smtp.starttls is StartTLS.CERTIFICATE:
        check_readable("smtp.tls_cert_file", smtp.tls_cert_file)
        check_readable("smtp.tls_key_file", smtp.tls_key_file)
    tls = server_context(smtp)
    users = Users.load(smtp.users_file) if smtp.auth is AuthMode.USERS else Users({})
    options = config.isolation_options()  # loads and tries the DKIM key
    upstream = config.upstream
    target = parse_upstream_url(upstream.url, insecure=upstream.insecure)
    if target.scheme == "outbox":
        _writable_directory("upstream.url", target.outbox_dir)
    else:
        if upstream.password_file:
            check_readable("upstream.password_file", upstream.password_file)
        configured_credentials(upstream, target)
        dsn_credentials(config.delivery)  # the bounce login's password file, if any
        if target.scheme != "smtp+plain":
            if upstream.ca_file:
                check_readable("upstream.ca_file", upstream.ca_file)
            tls_context(upstream.ca_file)
    _writable_directory("spool.dir", config.spool.dir)
    check_key(config.log, Path(config.spool.dir))
    return Prepared(target, options, tls, users)


def _writable_directory(key: str, directory: str) -> None:
    """``directory`` is a writable directory, or can be made in the nearest one that exists."""
    path = Path(directory).absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(key, f"{existing} is not a directory (for {directory})")
    if not os.access(existing, os.W_OK | os.X_OK):
        shown = directory if existing == path else f"{existing} (to create {directory})"
        raise ConfigError(key, f"cannot write to {shown}: permission denied")
