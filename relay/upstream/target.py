"""The upstream as configured: its URL, its credentials, its TLS context.

Rule 1: ``parse_upstream_url`` accepts the four forms SPEC 6 names and
nothing else; ``smtp+plain://`` only to a loopback host unless ``insecure``.
Rule 2: a password comes from ``password_file``, else ``password``, else the
URL, and is never part of a repr: ``Target.redacted()`` is the form for logs.
Rule 3: TLS verifies certificates (system store plus ``ca_file``) and host
names, TLS 1.2 or newer (RFC 8314).

Everything here runs once, at start, and raises ``ConfigError`` naming the key.
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

from relay.config import DeliveryConfig, HostPort, UpstreamConfig
from relay.core.errors import ConfigError
from relay.core.model import Credentials
from relay.files import read_secret, read_text

DEFAULT_PORTS = {"smtps": 465, "smtp": 587, "smtp+plain": 25}  # RFC 8314 3.3, RFC 6409, RFC 5321
URL_FORMS = "smtps://user@host:465, smtp://user@host:587, smtp+plain://host:25 or outbox:DIR"
_HOST = re.compile(r"(?:[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.)*[a-z0-9](?:[a-z0-9-]*[a-z0-9])?\.?")
REDACTED = "***"  # what a password in the URL becomes wherever the URL is shown
_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f]")


@dataclass(frozen=True, slots=True)
class Target:
    """A parsed ``upstream.url``; ``redacted()`` is the only form fit for logs."""

    scheme: str  # "smtps", "smtp", "smtp+plain" or "outbox"
    host: str = ""
    port: int = 0
    username: str = ""
    password_in_url: str = field(default="", repr=False)
    outbox_dir: str = ""

    @property
    def is_loopback(self) -> bool:
        return HostPort(self.host, self.port).is_loopback

    def redacted(self) -> str:
        """The URL with only a password in it replaced (``***``); the user stays, encoded."""
        if self.scheme == "outbox":
            return f"outbox:{self.outbox_dir}"
        user = quote(self.username, safe="")
        if self.password_in_url:
            user += ":" + REDACTED
        return f"{self.scheme}://{user + '@' if user else ''}{HostPort(self.host, self.port)}"


def parse_upstream_url(url: str, *, insecure: bool) -> Target:
    """Parse ``upstream.url``; raise ``ConfigError("upstream.url", ...)`` for anything else.

    User and password may be percent-encoded. ``smtp+plain://`` is refused to a
    host that is not loopback unless ``insecure``.
    """
    key = "upstream.url"
    scheme, _, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme == "outbox":
        if not rest.strip():
            raise ConfigError(key, "outbox: needs a directory, for example outbox:./outbox")
        return Target("outbox", outbox_dir=rest)
    if scheme not in DEFAULT_PORTS or not rest.startswith("//"):
        shown = f"scheme {scheme!r}" if rest.startswith("//") else "the value"
        raise ConfigError(key, f"{shown} is not one of {URL_FORMS}")
    if _CONTROL_OR_SPACE.search(url):
        raise ConfigError(key, "contains a space or a control character")
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # for example a bad [IPv6] literal
        raise ConfigError(key, f"is not a valid URL ({exc})") from None
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(key, f"must be {scheme}://[user@]host[:port] with nothing after the port")
    try:
        port = DEFAULT_PORTS[scheme] if parts.port is None else parts.port
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise ConfigError(key, "the port must be a number from 1 to 65535")
    host = parts.hostname or ""
    if not host:
        raise ConfigError(key, "names no host")
    if not (_HOST.fullmatch(host) or _is_ip(host)):
        raise ConfigError(key, "the host must be a DNS name (A-labels for IDN) or an IP address")
    target = Target(
        scheme, host, port, unquote(parts.username or ""), unquote(parts.password or "")
    )
    if scheme == "smtp+plain" and not insecure and not target.is_loopback:
        raise ConfigError(
            key,
            "smtp+plain:// sends mail in clear: only to a loopback host, unless upstream.insecure",
        )
    return target


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def configured_credentials(config: UpstreamConfig, target: Target) -> Credentials | None:
    password = ""
    if config.password_file:
        password = read_secret("upstream.password_file", config.password_file)
    password = password or config.password or target.password_in_url
    if config.oauth_token_file:
        if not target.username:
            raise ConfigError("upstream.oauth_token_file", "XOAUTH2 needs the user in upstream.url")
        read_secret("upstream.oauth_token_file", config.oauth_token_file)
        return Credentials(target.username, "")  # the token is read at each connection
    if not target.username:
        if password:
            raise ConfigError("upstream.url", "a password is set but the URL names no user")
        return None  # no AUTH, or passthrough credentials per send
    if not password:
        raise ConfigError(
            "upstream.password", "the URL names a user but no password or password_file is set"
        )
    if target.scheme == "smtp+plain" and not target.is_loopback:
        raise ConfigError("upstream.url", "smtp+plain:// would send the password in clear")
    return Credentials(target.username, password)


def dsn_credentials(delivery: DeliveryConfig) -> Credentials | None:
    """The login for delivery status notifications (``delivery.dsn_user``), or None.

    None: a DSN goes with the credentials of the message it reports on. Raises
    ``ConfigError`` when the password file cannot be read.
    """
    if not delivery.dsn_user:
        return None
    password = ""
    if delivery.dsn_password_file:
        password = read_secret("delivery.dsn_password_file", delivery.dsn_password_file)
    return Credentials(delivery.dsn_user, password or delivery.dsn_password)


def tls_context(ca_file: str) -> ssl.SSLContext:
    context = ssl.create_default_context()  # system store, CERT_REQUIRED, host name checked
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file:
        pem = read_text("upstream.ca_file", ca_file)  # an unreadable file: relay.files says so
        try:
            context.load_verify_locations(cadata=pem)  # in addition to the system store
        except ssl.SSLError as exc:
            raise ConfigError("upstream.ca_file", f"cannot load {ca_file}: {exc}") from None
    return context
