"""The one configuration object: TOML file, then ``RELAY_*`` environment over it.

Rule 1: every key has a default, so no file at all gives a working relay
(listen on 127.0.0.1:2525, write copies to ./outbox).
Rule 2: the environment name of a key is ``RELAY_`` and its TOML path joined
with ``_`` in upper case (``[smtp] max_recipients`` is
``RELAY_SMTP_MAX_RECIPIENTS``); ``RELAY_UPSTREAM`` is also accepted for
``[upstream] url``, and ``RELAY_CONFIG`` names the file. An unknown TOML key
is an error. An unknown ``RELAY_*`` name is not fatal: Kubernetes sets
``RELAY_PORT=tcp://...`` and friends for a Service named ``relay`` in the
namespace, so names shaped like service links are ignored (``env_notices``
says so at debug level), and any other is a warning naming the closest known
name (``env_notices`` too; the caller logs them once logging is set up).
Rule 3: bad configuration raises ``ConfigError`` naming the key, once, at
start; nothing else in the relay re-validates it.

``config/solo-relay.toml`` documents every key; a test keeps the two equal.
"""

from __future__ import annotations

import difflib
import enum
import ipaddress
import os
import re
import tomllib
import zoneinfo
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from relay import files
from relay.core.dkim import DkimAction, signer_for
from relay.core.errors import ConfigError
from relay.core.model import (
    MAX_FANOUT_OCTETS,
    MAX_HEADER_OCTETS,
    MAX_HOPS,
    MIME_NESTING_LIMIT,
    BodyCheck,
    IsolationOptions,
)
from relay.core.routing import Role
from relay.core.senders import SenderPolicy, parse_policy

ENV_PREFIX = "RELAY_"
ENV_ALIASES = {"RELAY_UPSTREAM": ("upstream", "url")}
ENV_NOT_KEYS = frozenset({"RELAY_CONFIG"})
# What Kubernetes injects for each Service in the namespace (enableServiceLinks, the
# Docker links convention): FOO_SERVICE_HOST=10.0.0.1, FOO_SERVICE_PORT[_NAME]=25,
# FOO_PORT=tcp://10.0.0.1:25, FOO_PORT_25_TCP[_PROTO|_PORT|_ADDR]. Name and value both
# have to fit, so RELAY_SMTP_PORT=2525 (a mistake) is still a warning.
_LINK_URL = r"(?:tcp|udp|sctp)://[0-9a-fA-F.:\[\]]+:\d+"
_SERVICE_LINKS = (
    (re.compile(r"[A-Z0-9_]+_SERVICE_HOST"), re.compile(r"[0-9a-fA-F.:]+")),
    (re.compile(r"[A-Z0-9_]+_SERVICE_PORT(?:_[A-Z0-9_]+)?"), re.compile(r"\d+")),
    (re.compile(r"[A-Z0-9_]+_PORT(?:_\d+_(?:TCP|UDP|SCTP))?"), re.compile(_LINK_URL)),
    (re.compile(r"[A-Z0-9_]+_PORT_\d+_(?:TCP|UDP|SCTP)_PROTO"), re.compile(r"tcp|udp|sctp")),
    (re.compile(r"[A-Z0-9_]+_PORT_\d+_(?:TCP|UDP|SCTP)_PORT"), re.compile(r"\d+")),
    (re.compile(r"[A-Z0-9_]+_PORT_\d+_(?:TCP|UDP|SCTP)_ADDR"), re.compile(r"[0-9a-fA-F.:]+")),
)
MAX_WORKERS = 64
SHUTDOWN_GRACE = 30.0  # seconds for SMTP sessions in progress after SIGTERM
LISTEN_BACKLOG = 1024  # pending connections the SMTP listener queues

# RFC 5321 4.1.3 and 2.3.5: what EHLO and the greeting may name. LDH labels of 1-63
# octets (a single label too: a pod's name), or an address literal.
_HELO_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
MAX_DOMAIN_OCTETS = 253  # RFC 1035 2.3.4, less the root's length octet and final dot

# Loopback addresses: the only networks a relay may serve with no allow-list or AUTH.
LOOPBACK = ("127.0.0.0/8", "::1/128")
# Networks no Internet host sends from: loopback, RFC 1918, RFC 6598 shared space
# (Kubernetes pod ranges often live there), link-local, IPv6 unique local
# (RFC 4193). Without AUTH, smtp.allow_networks must stay inside them.
NON_PUBLIC = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)


class Mode(enum.Enum):
    QUEUE = "queue"  # answer after the spool write, deliver in the background
    DIRECT = "direct"  # try the copies before answering; spool what could not go


class LogFormat(enum.Enum):
    AUTO = "auto"  # JSON when stderr is not a terminal, text when it is
    JSON = "json"
    TEXT = "text"


class StartTLS(enum.Enum):
    OFF = "off"
    SELF_SIGNED = "self-signed"
    CERTIFICATE = "certificate"


class TlsProfile(enum.Enum):
    INTERMEDIATE = "intermediate"  # Mozilla's: TLS 1.2 (ECDHE, AEAD) and 1.3
    MODERN = "modern"  # Mozilla's: TLS 1.3 only


class AuthMode(enum.Enum):
    OFF = "off"
    USERS = "users"
    PASSTHROUGH = "passthrough"


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


@dataclass(frozen=True, slots=True)
class SmtpConfig:
    hostname: str = "solo-relay.localhost"
    max_message_size: int = 36_700_160  # 35 MiB: what large providers accept (Gmail: 35 MB)
    max_recipients: int = 1000
    max_connections: int = 100
    max_connections_per_client: int = 50  # off loopback only (Postfix's anvil default)
    overload_threshold: float = 0.8  # of max_connections: overload (stress) mode from here
    overload_idle_timeout: float = 10.0  # idle before MAIL under overload (Postfix stress: 10 s)
    idle_timeout: float = 300.0  # RFC 5321 4.5.3.2.7: at least 5 minutes
    data_timeout: float = 600.0  # RFC 5321 4.5.3.2.6: 10 minutes for the whole DATA phase
    allow_networks: tuple[str, ...] = LOOPBACK
    # Single-label recipient domains to accept (``user@intranet``); lower case.
    local_domains: tuple[str, ...] = ()
    starttls: StartTLS = StartTLS.OFF
    tls_cert_file: str = ""
    tls_key_file: str = ""
    tls_profile: TlsProfile = TlsProfile.INTERMEDIATE
    auth: AuthMode = AuthMode.OFF
    users_file: str = ""  # lines of "user:password" or "user:bcrypt hash"; auth = "users"
    # Seconds before the first failed AUTH's reply (Postfix smtpd_error_sleep_time).
    auth_failure_delay: float = 1.0
    auth_failure_delay_max: float = 30.0  # the delay doubles per failure from one client, to this
    auth_failure_limit: int = 3  # failures in one session, then 421 4.7.0 and the session ends


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    url: str = "outbox:./outbox"
    password: str = ""
    password_file: str = ""
    oauth_token_file: str = ""  # XOAUTH2 bearer token, read at each connection
    ca_file: str = ""  # extra CA bundle; the system store otherwise
    insecure: bool = False  # allow smtp+plain:// to a non-loopback host
    pool_size: int = 4
    max_messages_per_connection: int = 100
    connect_timeout: float = 30.0
    command_timeout: float = 300.0  # RFC 5321 4.5.3.2: 5 minutes per command
    data_timeout: float = 600.0  # RFC 5321 4.5.3.2.6: 10 minutes after the final dot


@dataclass(frozen=True, slots=True)
class RouteConfig(UpstreamConfig):
    """One of several upstreams (``[[upstreams]]``): ``[upstream]``'s keys and its routing."""

    name: str = ""  # [a-z0-9-]: in metrics, logs, the shared store's keys and RELAY_UPSTREAMS_*
    url: str = ""  # required: no upstream of a list writes to ./outbox unless told to
    role: Role = Role.PRIMARY
    rate_per_second: float = 0.0  # this upstream's copies per second; 0: no limit
    rate_per_day: int = 0  # its daily quota; 0: none
    day_resets_at: str = "00:00"  # when the provider's day begins, in time_zone
    time_zone: str = "UTC"  # the provider's (IANA name: "America/Los_Angeles")
    # Envelope-sender domains this upstream sends for (DKIM alignment); empty: all.
    sender_domains: tuple[str, ...] = ()
    # Takes the copies an application sent with its own login (smtp.auth = "passthrough").
    passthrough: bool = False


@dataclass(frozen=True, slots=True)
class FleetConfig:
    """The limits every relay of a fleet shares (relay/limits/shared.py)."""

    store: str = ""  # redis://host:6379/0 or rediss:// (TLS); Valkey too. "": local limits
    password_file: str = ""  # the store's AUTH password (or in the URL: redis://:pw@host)
    ca_file: str = ""  # CA bundle for rediss://
    name: str = "default"  # the fleet's namespace in the store (one per quota holder)
    expected_replicas: int = 1  # while the store is away each relay takes quota / this
    timeout: float = 0.05  # seconds a grant may take before the store counts as away
    batch: int = 8  # copies' tokens taken in one round trip


@dataclass(frozen=True, slots=True)
class IsolationConfig:
    remove_headers: tuple[str, ...] = ()
    body_check: BodyCheck = BodyCheck.WARN
    embedded_check: BodyCheck = BodyCheck.REJECT
    normalize_line_endings: bool = False
    max_header_size: int = MAX_HEADER_OCTETS
    max_hops: int = MAX_HOPS
    mime_nesting_limit: int = MIME_NESTING_LIMIT
    max_fanout_size: int = MAX_FANOUT_OCTETS

    def options(self) -> IsolationOptions:
        return IsolationOptions(
            removed_headers=frozenset(self.remove_headers),
            body_check=self.body_check,
            embedded_check=self.embedded_check,
            normalize=self.normalize_line_endings,
            max_header_octets=self.max_header_size,
            max_hops=self.max_hops,
            mime_nesting_limit=self.mime_nesting_limit,
            max_fanout_octets=self.max_fanout_size,
        )


@dataclass(frozen=True, slots=True)
class SendersConfig:
    # Envelope senders and From: domains every client may use ("a@example.com",
    # "@example.com", "<>"); empty with no by_user: anyone may send as anyone.
    allow: tuple[str, ...] = ()
    # "USER: PATTERN PATTERN ..." per AUTH user, used instead of allow for that user.
    by_user: tuple[str, ...] = ()
    # Named envelope senders whose copies keep To: and Cc: as written (a team thread).
    keep_recipients: tuple[str, ...] = ()

    def policy(self) -> SenderPolicy:
        """The policy (``ConfigError`` naming the key of a malformed entry)."""
        for key, entries in (
            ("senders.allow", self.allow),
            ("senders.by_user", self.by_user),
            ("senders.keep_recipients", self.keep_recipients),
        ):
            try:
                parse_policy(*(entries if k == key else () for k in _SENDER_KEYS))
            except ValueError as exc:
                raise ConfigError(key, str(exc)) from exc
        return parse_policy(self.allow, self.by_user, self.keep_recipients)


_SENDER_KEYS = ("senders.allow", "senders.by_user", "senders.keep_recipients")


@dataclass(frozen=True, slots=True)
class DkimConfig:
    action: DkimAction = DkimAction.STRIP  # an app signature over a changed header
    sign_all: bool = False  # sign every copy with the relay's key
    domain: str = ""
    selector: str = ""
    key_file: str = ""  # PEM RSA private key (a mounted secret)

    @property
    def signs(self) -> bool:
        return self.action is DkimAction.RESIGN or self.sign_all


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    direct_deadline: float = 120.0  # well under a client's 10-minute DATA timeout
    concurrency: int = 0  # copies in flight at once; 0: upstream.pool_size
    retry_initial: float = 60.0  # first retry after a transient failure (seconds)
    retry_max: float = 3600.0  # the delay doubles up to this
    retry_jitter: float = 0.2  # +/- this fraction, so retries do not arrive in step
    lifetime: float = 172_800.0  # 2 days, then the copy fails and its sender is told
    soft_bounce: bool = False  # treat permanent failures as transient (careful rollouts)
    dsn: bool = True  # RFC 3464 notifications to the sender (never to <>)
    # The DSN's From: ""; MAILER-DAEMON@smtp.hostname when that is a public domain,
    # else MAILER-DAEMON@ the original sender's domain (relay.core.dsn.dsn_from_address).
    dsn_from: str = ""
    # The upstream login for DSNs; "": the message's own (passthrough), else upstream's.
    dsn_user: str = ""
    dsn_password: str = ""
    dsn_password_file: str = ""
    auth_pause: float = 300.0  # after the upstream refuses our credentials (535)
    rate_per_second: float = 0.0  # copies per second to the upstream; 0: no limit
    rate_per_day: int = 0  # copies per UTC day; 0: no limit
    max_queued: int = 100_000  # live copies in the spool before new mail gets 451 4.3.2
    drain_grace: float = 30.0  # seconds deliveries may finish after SIGTERM


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str = "127.0.0.1:9925"


@dataclass(frozen=True, slots=True)
class SpoolConfig:
    dir: str = "./spool"
    fsync: bool = True  # off only to measure what durability costs
    min_free_bytes: int = 100 * 1024 * 1024  # below this, MAIL gets 452 4.3.1
    reserve_bytes: int = (
        16 * 1024 * 1024
    )  # held for outcomes on a full disk (relay.custody.reserve)
    max_bytes: int = 0  # cap on the database; 0: the disk is the limit
    history_days: float = 0.0  # keep delivered and failed copies this long (queue list --delivered)


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: LogFormat = LogFormat.AUTO
    level: str = "info"
    hash_key: str = ""  # key of the address tokens; default: one kept in the spool directory
    hash_key_file: str = ""  # the same key read from a file (a mounted Secret); wins over hash_key
    show_addresses: bool = False  # log addresses in clear (debugging only)


@dataclass(frozen=True, slots=True)
class Config:
    listen: str = "127.0.0.1:2525"
    mode: Mode = Mode.QUEUE
    workers: int = (
        1  # processes sharing the listener, each with its own spool (relay/ops/workers.py)
    )
    smtp: SmtpConfig = field(default_factory=SmtpConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    # Several upstreams, in order of preference; empty: [upstream] alone (README
    # "Many pods, one quota").
    upstreams: tuple[RouteConfig, ...] = ()
    fleet: FleetConfig = field(default_factory=FleetConfig)
    isolation: IsolationConfig = field(default_factory=IsolationConfig)
    dkim: DkimConfig = field(default_factory=DkimConfig)
    senders: SendersConfig = field(default_factory=SendersConfig)
    delivery: DeliveryConfig = field(default_factory=DeliveryConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    spool: SpoolConfig = field(default_factory=SpoolConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def isolation_options(self) -> IsolationOptions:
        """The isolation core's options, with the DKIM key loaded and tried (``ConfigError``)."""
        options = self.isolation.options()
        signer = None
        if self.dkim.signs:
            dkim = self.dkim
            signer = signer_for(dkim.domain, dkim.selector, dkim.key_file, _read_dkim_key)
        return replace(
            options,
            dkim_action=self.dkim.action,
            signer=signer,
            sign_all=self.dkim.sign_all,
            keep_recipients_for=self.senders.policy().keep_recipients,
        )

    @property
    def routes(self) -> tuple[RouteConfig, ...]:
        """The upstreams copies may go to, in order: ``[[upstreams]]``, or ``[upstream]``
        alone as the primary named ``default`` (with ``delivery.rate_per_*``)."""
        if self.upstreams:
            return self.upstreams
        values = {f.name: getattr(self.upstream, f.name) for f in fields(UpstreamConfig)}
        single = RouteConfig(
            **values,
            name="default",
            rate_per_second=self.delivery.rate_per_second,
            rate_per_day=self.delivery.rate_per_day,
            passthrough=True,
        )
        return (single,)

    @property
    def listen_address(self) -> HostPort:
        return parse_host_port("listen", self.listen)

    @property
    def metrics_address(self) -> HostPort:
        return parse_host_port("metrics.listen", self.metrics.listen)


def _read_dkim_key(path: str) -> bytes:
    return files.read_bytes("dkim.key_file", path)


def load(environ: Mapping[str, str] | None = None, path: str | Path | None = None) -> Config:
    """Build the configuration: defaults, then the TOML file, then the environment.

    The file is ``path``, else ``$RELAY_CONFIG``, else none. Raises ``ConfigError``.
    """
    env = dict(os.environ if environ is None else environ)
    path = path or env.get("RELAY_CONFIG") or None
    raw: dict[str, Any] = {}
    if path is not None:
        text = files.read_text("RELAY_CONFIG", path)
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("RELAY_CONFIG", f"{path} is not valid TOML: {exc}") from exc
    config = _apply(Config(), raw, ())
    config = _apply_env(config, env)
    validate(config)
    return config


@dataclass(frozen=True, slots=True)
class EnvNotice:
    """An unknown ``RELAY_*`` variable that ``load`` ignored, and what to tell the operator."""

    name: str
    service_link: bool  # set by Kubernetes for a Service: worth a debug line only
    suggestion: str = ""  # the closest known name, when one is close

    def __str__(self) -> str:
        if self.service_link:
            return f"{self.name}: ignored, a Kubernetes service link (enableServiceLinks: false)"
        hint = f"; did you mean {self.suggestion}?" if self.suggestion else ""
        return f"{self.name}: unknown setting, ignored{hint} (see config/solo-relay.toml)"


def is_service_link(name: str, value: str) -> bool:
    """Whether ``name=value`` is what Kubernetes injects for a Service (not a setting)."""
    return any(
        shape.fullmatch(name) and form.fullmatch(value.strip()) for shape, form in _SERVICE_LINKS
    )


def env_notices(environ: Mapping[str, str] | None = None) -> list[EnvNotice]:
    """The ``RELAY_*`` variables ``load`` ignores, sorted by name, each with its notice."""
    env = os.environ if environ is None else environ
    names = env_names()
    notices = []
    for name, value in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_KEYS or name in names:
            continue
        if is_route_setting(name, env):
            continue
        if is_service_link(name, value):
            notices.append(EnvNotice(name, service_link=True))
        else:
            close = difflib.get_close_matches(name, names, n=1, cutoff=0.6)
            notices.append(EnvNotice(name, service_link=False, suggestion="".join(close)))
    return notices


def env_names(config: Config | None = None) -> dict[str, tuple[str, ...]]:
    """Every ``RELAY_*`` name and the key path it sets."""
    names: dict[str, tuple[str, ...]] = {}

    def walk(obj: Any, prefix: tuple[str, ...]) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if hasattr(value, "__dataclass_fields__"):
                walk(value, (*prefix, f.name))
            else:
                path = (*prefix, f.name)
                names[ENV_PREFIX + "_".join(path).upper()] = path

    walk(config or Config(), ())
    names.update(ENV_ALIASES)
    return names


def _apply(obj: Any, raw: Mapping[str, Any], prefix: tuple[str, ...]) -> Any:
    known = {f.name: f for f in fields(obj)}
    changes: dict[str, Any] = {}
    for name, value in raw.items():
        dotted = ".".join((*prefix, name))
        if name not in known:
            raise ConfigError(dotted, "unknown key")
        current = getattr(obj, name)
        if isinstance(obj, Config) and name == "upstreams":
            changes[name] = _routes_from_toml(value)
        elif hasattr(current, "__dataclass_fields__"):
            if not isinstance(value, dict):
                raise ConfigError(dotted, "must be a table")
            changes[name] = _apply(current, value, (*prefix, name))
        else:
            changes[name] = _convert(dotted, current, value)
    return replace(obj, **changes)


def _apply_env(config: Config, env: Mapping[str, str]) -> Config:
    names = env_names(config)
    for name, text in sorted(env.items()):
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_KEYS:
            continue
        if name not in names:
            continue  # env_notices: a service link (debug) or a warning with a suggestion
        path = names[name]
        if path == ("upstreams",):
            continue  # _routes_from_env
        nested: dict[str, Any] = {path[-1]: _from_env(name, _get(config, path), text)}
        for part in reversed(path[:-1]):
            nested = {part: nested}
        config = _apply(config, nested, ())
    return _routes_from_env(config, env)


# -- several upstreams: [[upstreams]] and RELAY_UPSTREAMS -------------------------------

_ROUTE_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,31}")
_DAY_START = re.compile(r"([01]\d|2[0-3]):[0-5]\d")
_ROUTE_FIELDS = tuple(f.name for f in fields(RouteConfig) if f.name != "name")


def _routes_from_toml(value: Any) -> tuple[RouteConfig, ...]:
    """``[[upstreams]]``: a list of tables, each naming itself."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError("upstreams", "must be a list of tables ([[upstreams]])")
    routes = []
    for index, table in enumerate(value):
        name = table.get("name")
        key = f"upstreams[{index}]"
        if not isinstance(name, str) or not _ROUTE_NAME.fullmatch(name):
            raise ConfigError(f"{key}.name", "must be 1-32 of a-z, 0-9 and '-'")
        routes.append(_apply(RouteConfig(name=name), table, (f"upstreams.{name}",)))
    return tuple(routes)


def route_env_prefix(name: str) -> str:
    """``RELAY_UPSTREAMS_SES_EU_`` for the upstream named ``ses-eu``."""
    return f"{ENV_PREFIX}UPSTREAMS_{name.upper().replace('-', '_')}_"


def _routes_from_env(config: Config, env: Mapping[str, str]) -> Config:
    """``RELAY_UPSTREAMS=ses,sendgrid`` names the list (in order); then each
    ``RELAY_UPSTREAMS_<NAME>_<KEY>`` sets a key of the upstream of that name."""
    routes = {route.name: route for route in config.upstreams}
    order = list(routes)
    listed = env.get(f"{ENV_PREFIX}UPSTREAMS")
    if listed is not None:
        order = [n.strip() for n in listed.split(",") if n.strip()]
        for name in order:
            if not _ROUTE_NAME.fullmatch(name):
                raise ConfigError("RELAY_UPSTREAMS", f"{name!r}: names are a-z, 0-9 and '-'")
    built = []
    for name in order:
        route = routes.get(name, RouteConfig(name=name))
        prefix = route_env_prefix(name)
        for key in _ROUTE_FIELDS:
            text = env.get(prefix + key.upper())
            if text is not None:
                value = _from_env(prefix + key.upper(), getattr(route, key), text)
                route = _apply(route, {key: value}, (f"upstreams.{name}",))
        built.append(route)
    return replace(config, upstreams=tuple(built))


def is_route_setting(name: str, environ: Mapping[str, str]) -> bool:
    """Whether ``name`` is ``RELAY_UPSTREAMS_<NAME>_<KEY>`` for a listed upstream."""
    listed = environ.get(f"{ENV_PREFIX}UPSTREAMS", "")
    for route in (n.strip() for n in listed.split(",") if n.strip()):
        rest = name.removeprefix(route_env_prefix(route))
        if rest != name and rest.lower() in _ROUTE_FIELDS:
            return True
    return False


def _get(config: Config, path: tuple[str, ...]) -> Any:
    obj: Any = config
    for part in path:
        obj = getattr(obj, part)
    return obj


def _from_env(name: str, current: Any, text: str) -> Any:
    """Environment values are strings; lists are comma-separated."""
    if isinstance(current, bool):
        lowered = text.strip().lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(name, f"must be true or false, not {text!r}")
        return lowered in ("true", "1", "yes")
    if isinstance(current, tuple):
        return [item.strip() for item in text.split(",") if item.strip()]
    if isinstance(current, int | float):
        try:
            return type(current)(text)
        except ValueError as exc:
            raise ConfigError(name, f"must be a number, not {text!r}") from exc
    return text


def _convert(key: str, current: Any, value: Any) -> Any:
    if isinstance(current, enum.Enum):
        try:
            return type(current)(value)
        except ValueError as exc:
            allowed = ", ".join(repr(m.value) for m in type(current))
            raise ConfigError(key, f"must be one of {allowed}, not {value!r}") from exc
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise ConfigError(key, f"must be true or false, not {value!r}")
        return value
    if isinstance(current, int) and not isinstance(current, bool):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, f"must be a whole number, not {value!r}")
        return value
    if isinstance(current, float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(key, f"must be a number, not {value!r}")
        return float(value)
    if isinstance(current, tuple):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(key, "must be a list of strings")
        return tuple(value)
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, not {value!r}")
    return value


def parse_host_port(key: str, text: str) -> HostPort:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(key, f"must be host:port, not {text!r}")
    return HostPort(host, int(port))


def valid_helo_name(name: str) -> bool:
    """Whether ``name`` may follow EHLO: a DNS name in A-labels or an address literal."""
    if name.startswith("[") and name.endswith("]"):
        literal = name[1:-1]  # RFC 5321 4.1.3: IPv4 bare, IPv6 tagged "IPv6:"
        version = 6 if literal[:5].lower() == "ipv6:" else 4
        try:
            return ipaddress.ip_address(literal[5:] if version == 6 else literal).version == version
        except ValueError:
            return False
    labels = name.removesuffix(".").split(".")
    return len(name) <= MAX_DOMAIN_OCTETS and all(_HELO_LABEL.fullmatch(x) for x in labels)


def _validate_open_relay(
    config: Config, listen: HostPort, networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network]
) -> None:
    """SPEC 4: never an open relay. Off loopback, name the clients or require AUTH.

    The allowed networks send without AUTH, so their union must not cover a whole
    address family (``0.0.0.0/1`` and ``128.0.0.0/1`` are ``0.0.0.0/0``), with
    AUTH or without; and without AUTH none may hold a public address.
    """
    v4 = [n for n in networks if isinstance(n, ipaddress.IPv4Network)]
    v6 = [n for n in networks if isinstance(n, ipaddress.IPv6Network)]
    for version, everything, covered in (
        (4, "0.0.0.0/0", list(ipaddress.collapse_addresses(v4))),
        (6, "::/0", list(ipaddress.collapse_addresses(v6))),
    ):
        if any(n.prefixlen == 0 for n in covered):
            raise ConfigError(
                "smtp.allow_networks",
                f"together these networks are all of IPv{version} ({everything}):"
                " any client could send without AUTH, an open relay",
            )
    if config.smtp.auth is AuthMode.OFF:
        if config.smtp.allow_networks == LOOPBACK:
            raise ConfigError(
                "smtp.allow_networks",
                f"listening on {listen} needs the client networks listed here, or smtp.auth",
            )
        for network in networks:
            if not any(
                network.version == private.version and network.subnet_of(private)  # type: ignore[arg-type]
                for private in NON_PUBLIC
            ):
                raise ConfigError(
                    "smtp.allow_networks",
                    f"{network} holds public addresses: without smtp.auth only private,"
                    " shared or link-local networks may send (an open relay otherwise)",
                )
    elif config.smtp.starttls is StartTLS.OFF:
        raise ConfigError(
            "smtp.starttls",
            f"smtp.auth on {listen} needs STARTTLS (a certificate): off loopback AUTH is"
            " offered only inside TLS, so no client could ever authenticate",
        )


def validate(config: Config) -> None:
    """Checks that involve more than one key, or a value's range."""
    listen = config.listen_address
    if not valid_helo_name(config.smtp.hostname):
        raise ConfigError(
            "smtp.hostname",
            f"must be a DNS name (A-labels for IDN) or an address literal, "
            f"not {config.smtp.hostname!r}",
        )
    config.metrics_address  # noqa: B018 - parses, raising ConfigError when malformed
    _validate_ranges(config)
    networks = []
    for text in config.smtp.allow_networks:
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError as exc:
            raise ConfigError("smtp.allow_networks", f"{text!r} is not a network") from exc
    if not listen.is_loopback:
        _validate_open_relay(config, listen, networks)
    if config.smtp.starttls is StartTLS.CERTIFICATE and not (
        config.smtp.tls_cert_file and config.smtp.tls_key_file
    ):
        raise ConfigError("smtp.tls_cert_file", "starttls = 'certificate' needs cert and key files")
    if config.smtp.auth is AuthMode.USERS and not config.smtp.users_file:
        raise ConfigError("smtp.users_file", "auth = 'users' needs a users file")
    _validate_dsn(config.delivery)
    _validate_routes(config)
    _validate_fleet(config.fleet)
    config.senders.policy()  # raises ConfigError naming the [senders] key at fault
    if config.log.level.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(
            "log.level", f"must be debug, info, warning or error: {config.log.level!r}"
        )


def _validate_ranges(config: Config) -> None:
    """Each number in its range: counts at least 1, durations above 0, amounts not negative."""
    for key, value in (
        ("smtp.max_message_size", config.smtp.max_message_size),
        ("smtp.max_recipients", config.smtp.max_recipients),
        ("smtp.max_connections", config.smtp.max_connections),
        ("smtp.auth_failure_limit", config.smtp.auth_failure_limit),
        ("smtp.max_connections_per_client", config.smtp.max_connections_per_client),
        ("upstream.pool_size", config.upstream.pool_size),
        ("upstream.max_messages_per_connection", config.upstream.max_messages_per_connection),
        ("isolation.max_header_size", config.isolation.max_header_size),
        ("isolation.max_fanout_size", config.isolation.max_fanout_size),
        ("delivery.max_queued", config.delivery.max_queued),
        ("workers", config.workers),
    ):
        if value < 1:
            raise ConfigError(key, "must be at least 1")
    if config.workers > MAX_WORKERS:
        raise ConfigError("workers", f"must be at most {MAX_WORKERS}")
    for key, seconds in (
        ("smtp.idle_timeout", config.smtp.idle_timeout),
        ("smtp.data_timeout", config.smtp.data_timeout),
        ("smtp.overload_idle_timeout", config.smtp.overload_idle_timeout),
        ("upstream.connect_timeout", config.upstream.connect_timeout),
        ("upstream.command_timeout", config.upstream.command_timeout),
        ("upstream.data_timeout", config.upstream.data_timeout),
        ("delivery.direct_deadline", config.delivery.direct_deadline),
        ("delivery.retry_initial", config.delivery.retry_initial),
        ("delivery.retry_max", config.delivery.retry_max),
        ("delivery.lifetime", config.delivery.lifetime),
        ("delivery.auth_pause", config.delivery.auth_pause),
        ("delivery.drain_grace", config.delivery.drain_grace),
    ):
        if seconds <= 0:
            raise ConfigError(key, "must be more than 0 seconds")
    if not 0 < config.smtp.overload_threshold <= 1:
        raise ConfigError("smtp.overload_threshold", "must be more than 0 and at most 1")
    if not 0 <= config.delivery.retry_jitter < 1:
        raise ConfigError("delivery.retry_jitter", "must be at least 0 and less than 1")
    signed: tuple[tuple[str, float], ...] = (
        ("delivery.concurrency", config.delivery.concurrency),
        ("smtp.auth_failure_delay", config.smtp.auth_failure_delay),
        ("smtp.auth_failure_delay_max", config.smtp.auth_failure_delay_max),
        ("delivery.rate_per_second", config.delivery.rate_per_second),
        ("delivery.rate_per_day", config.delivery.rate_per_day),
        ("spool.min_free_bytes", config.spool.min_free_bytes),
        ("spool.reserve_bytes", config.spool.reserve_bytes),
        ("spool.max_bytes", config.spool.max_bytes),
        ("spool.history_days", config.spool.history_days),
    )
    for key, amount in signed:
        if amount < 0:
            raise ConfigError(key, "must not be negative")


def _validate_routes(config: Config) -> None:
    """``[[upstreams]]``: unique names, a primary first, each value in its range."""
    if not config.upstreams:
        return
    if config.upstream != UpstreamConfig():
        raise ConfigError("upstream", "set either [upstream] or [[upstreams]], not both")
    for key in ("rate_per_second", "rate_per_day"):
        if getattr(config.delivery, key):
            raise ConfigError(f"delivery.{key}", "with [[upstreams]], set it on each upstream")
    names = [route.name for route in config.upstreams]
    if len(set(names)) != len(names):
        raise ConfigError("upstreams", f"names must differ: {', '.join(names)}")
    if config.upstreams[0].role is not Role.PRIMARY:
        raise ConfigError(f"upstreams.{names[0]}.role", "the first upstream must be a primary")
    for route in config.upstreams:
        key = f"upstreams.{route.name}"
        if not route.url:
            raise ConfigError(f"{key}.url", "is required")
        for name in ("pool_size", "max_messages_per_connection"):
            if getattr(route, name) < 1:
                raise ConfigError(f"{key}.{name}", "must be at least 1")
        for name in ("connect_timeout", "command_timeout", "data_timeout"):
            if getattr(route, name) <= 0:
                raise ConfigError(f"{key}.{name}", "must be more than 0 seconds")
        if route.rate_per_second < 0 or route.rate_per_day < 0:
            raise ConfigError(f"{key}.rate_per_second", "rates must not be negative")
        if _DAY_START.fullmatch(route.day_resets_at) is None:
            raise ConfigError(f"{key}.day_resets_at", f"must be HH:MM, not {route.day_resets_at!r}")
        try:
            zoneinfo.ZoneInfo(route.time_zone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError(
                f"{key}.time_zone", f"unknown time zone {route.time_zone!r}"
            ) from None
        for domain in route.sender_domains:
            if domain != domain.lower() or not valid_helo_name(domain) or domain.startswith("["):
                raise ConfigError(f"{key}.sender_domains", f"{domain!r} is not a lower-case domain")


def _validate_fleet(fleet: FleetConfig) -> None:
    if fleet.store and not fleet.store.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("fleet.store", "must be a redis://, rediss:// or unix:// URL")
    if not _ROUTE_NAME.fullmatch(fleet.name):
        raise ConfigError("fleet.name", "must be 1-32 of a-z, 0-9 and '-'")
    if fleet.expected_replicas < 1 or fleet.batch < 1:
        raise ConfigError("fleet.expected_replicas", "expected_replicas and batch: at least 1")
    if fleet.timeout <= 0:
        raise ConfigError("fleet.timeout", "must be more than 0 seconds")


def _validate_dsn(delivery: DeliveryConfig) -> None:
    """``delivery.dsn_from`` is a plain address; a DSN login has a user and a password."""
    author = delivery.dsn_from
    if author:
        local, at, domain = author.rpartition("@")
        plain = author.isascii() and author.isprintable() and not any(c in author for c in " <>")
        if not (plain and at and local and domain) or len(author) > 254:
            raise ConfigError(
                "delivery.dsn_from", f"must be a plain address like bounces@example.com: {author!r}"
            )
    secret = delivery.dsn_password or delivery.dsn_password_file
    if secret and not delivery.dsn_user:
        raise ConfigError("delivery.dsn_user", "a DSN password is set but no dsn_user")
    if delivery.dsn_user and not secret:
        raise ConfigError(
            "delivery.dsn_password", "dsn_user is set but no dsn_password or dsn_password_file"
        )
