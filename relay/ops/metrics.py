"""Every Prometheus series the relay exports, behind small typed methods.

Rule 1: every label value comes from a closed set defined here or in
``relay.core.model`` (an enum or a frozen set). Nothing a peer sends (an address, a
domain, a Message-ID, reply text, a header name outside the fixed list) can
become a label value, so the series count is bounded whatever the traffic.
Rule 2: every possible labelled child is created at construction, so the set of
series exported is the same after one message as after a million; a
dashboard never sees a series appear, and a rate over a fresh series is
never missing its zero.

Closed label sets:

- ``result`` of a received message: the values of ``MessageResult``.
- ``outcome`` of a copy: the values of ``relay.core.model.Status``.
- ``class`` of an upstream reply: ``REPLY_CLASSES`` (``2xx``, ``4xx``,
  ``5xx``, ``other`` for any other code, ``none`` for no reply at all).
- ``stage`` of an upstream reply: the values of ``relay.core.model.Stage``.
- ``state`` of a spooled copy: the values of ``SpoolState``.
- ``header`` that was changed: ``HEADER_LABELS`` (``REMOVED_HEADERS``, plus
  ``to``, ``received``, ``dkim-signature``, and ``other`` for the names a
  deployment adds to the removal list).
- ``change`` made to a header: the values of ``relay.core.model.ChangeKind``, and
  only in the pairs ``HEADER_CHANGES`` lists (a removed field is never rebuilt,
  ``To`` is only rebuilt, ``Received`` only added, a signature only stripped,
  kept or signed), so no series is exported that can never move.
- ``result`` of an inbound connection: the values of ``ConnectionResult``.
- ``reason`` of an inbound TLS, AUTH or session-close event: the values of
  ``TlsFailure``, ``AuthFailure`` and ``SessionClosed``.
- ``reason`` of a refusal in an SMTP session: the values of ``Refusal``.
- ``version`` of ``solo_relay_build_info``: the one running version.

With ``workers`` above 1 each worker process writes its series to files in
``PROMETHEUS_MULTIPROC_DIR`` (prometheus-client's multiprocess mode, set up by
``relay.ops.workers``), and the supervisor serves their sum: counters and
histograms add up, and each gauge says how (``multiprocess_mode``: copies and
connections add up over the live workers, ages and flags take the largest).

This module holds counters only: it does not serve them (``relay.ops.health``
does), log, or decide anything; readiness is not a metric. No counter has a
``_created`` series (``disable_created_metrics``): a timestamp series per
counter and label set doubled the exposition and no rule or panel reads it.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)

from relay import __version__
from relay.core.model import REMOVED_HEADERS, Change, ChangeKind, Outcome, Stage, Status

PREFIX = "solo_relay"
UPSTREAM_STATES = ("up", "down", "spent")  # relay.upstream.router.State's values

# Process-wide in prometheus-client: every registry, the relay's and a test's, loses them.
disable_created_metrics()  # type: ignore[no-untyped-call]


class MessageResult(enum.Enum):
    """What the relay told the application about one message (the ``result`` label)."""

    ACCEPTED = "accepted"  # 250: custody taken (direct mode: delivered to every recipient)
    REJECTED_POLICY = "rejected_policy"  # refused by policy: network, AUTH, limits, open relay
    REJECTED_LEAK = "rejected_leak"  # 550 5.7.1: the leak guard refused a copy
    REJECTED_HEADER = "rejected_header"  # 554: malformed header section or too many hops
    REJECTED_DATA = "rejected_data"  # 550 5.5.2: bare CR, bare LF or NUL
    REJECTED_SIZE = "rejected_size"  # 552: larger than smtp.max_message_size
    REJECTED_ADDRESS = "rejected_address"  # 553: an envelope address the relay will not carry
    DEFERRED = "deferred"  # 4xx to the application: it should retry
    ERROR = "error"  # the relay failed (a bug or a local fault): 451 4.3.0


class ConnectionResult(enum.Enum):
    """What happened to one inbound TCP connection (the ``result`` label)."""

    ACCEPTED = "accepted"
    REFUSED_LIMIT = "refused_limit"  # smtp.max_connections reached
    REFUSED_NETWORK = "refused_network"  # the peer is outside smtp.allow_networks
    REFUSED_CLIENT_LIMIT = "refused_client_limit"  # smtp.max_connections_per_client reached


class TlsFailure(enum.Enum):
    """Why an inbound TLS handshake failed (the ``reason`` label)."""

    HANDSHAKE = "handshake"  # not TLS, or no protocol, cipher or group in common
    ABORTED = "aborted"  # the client closed or reset the connection mid-handshake
    TIMEOUT = "timeout"  # the handshake took longer than smtp.idle_timeout

    @classmethod
    def of(cls, error: BaseException) -> TlsFailure:
        """The reason for the error a failed handshake raised."""
        if isinstance(error, TimeoutError) or (
            isinstance(error, ConnectionAbortedError) and "longer than" in str(error)
        ):
            return cls.TIMEOUT  # asyncio.sslproto's handshake timeout
        if isinstance(error, ConnectionError | EOFError):
            return cls.ABORTED
        return cls.HANDSHAKE


class AuthFailure(enum.Enum):
    """Why an inbound AUTH exchange failed (the ``reason`` label)."""

    CREDENTIALS = "credentials"  # unknown user or wrong password: 535 5.7.8
    AUTHZID = "authzid"  # PLAIN with an authorization identity not the user's own: 535 5.7.8
    TOO_LONG = "too_long"  # a line of the exchange over the limit: 500 5.5.6
    MALFORMED = "malformed"  # not base64, or PLAIN without its three parts: 501
    ABORTED = "aborted"  # the client answered a challenge with "*": 501


class SessionClosed(enum.Enum):
    """Why the relay closed an inbound session itself (the ``reason`` label)."""

    IDLE = "idle"  # the idle timeout (shorter under overload) ran out
    OVERLOAD = "overload"  # the longest-idle session, closed to make room at the limit
    AUTH_LIMIT = "auth_limit"  # smtp.auth_failure_limit failures in one session


class Refusal(enum.Enum):
    """Why the relay refused a connection, MAIL, RCPT or DATA in the session (``reason``)."""

    CONNECTION_LIMIT = "connection_limit"  # 421 4.7.0 at connect: smtp.max_connections
    CLIENT_LIMIT = "client_limit"  # 421 at connect: smtp.max_connections_per_client
    NETWORK = "network"  # 550 5.7.1 at MAIL: outside smtp.allow_networks, no AUTH
    AUTH_REQUIRED = "auth_required"  # 530 5.7.0 at MAIL: outside the networks, AUTH is on
    SPOOL_FULL = "spool_full"  # 452 4.3.1 at MAIL: spool.min_free_bytes
    QUEUE_FULL = "queue_full"  # 451 4.3.2 at MAIL: delivery.max_queued
    SHUTTING_DOWN = "shutting_down"  # 421 4.3.2 at MAIL: the relay is stopping (SIGTERM)
    UNAVAILABLE = "unavailable"  # any other 4xx that custody gives at MAIL
    TOO_BIG = "too_big"  # 552 5.3.4 at MAIL: SIZE= over smtp.max_message_size
    BAD_SENDER = "bad_sender"  # 553 at MAIL: an address the relay will not carry
    SENDER_NOT_ALLOWED = "sender_not_allowed"  # 550 5.7.1 at MAIL: [senders] allow-list
    BAD_RECIPIENT = "bad_recipient"  # 553 at RCPT
    TOO_MANY_RECIPIENTS = "too_many_recipients"  # 452 4.5.3 at RCPT: smtp.max_recipients
    FROM_NOT_ALLOWED = "from_not_allowed"  # 550 5.7.1 at DATA: From: domain not allowed


class SpoolState(enum.Enum):
    """The states a spooled copy can be in (the ``state`` label)."""

    QUEUED = "queued"
    DELIVERING = "delivering"
    DEFERRED = "deferred"
    DELIVERED = "delivered"
    FAILED = "failed"


# The ``class`` label: Outcome.reply_class folded into a closed set.
REPLY_CLASSES: frozenset[str] = frozenset({"2xx", "4xx", "5xx", "other", "none"})

OTHER_HEADER = "other"
# The ``header`` label: the built-in removal list, the fields the relay rebuilds or adds
# or strips, and "other" for names a deployment adds to the removal list.
HEADER_LABELS: frozenset[str] = REMOVED_HEADERS | {
    "to",
    "received",
    "dkim-signature",
    OTHER_HEADER,
}

# The (header, change) pairs the isolation core can produce (relay/core/split.py): removal
# of a listed or configured field; the rebuilt To; the added Received; a signature's fate;
# a kept field folded (never a removed one, nor the rebuilt To).
HEADER_CHANGES: frozenset[tuple[str, str]] = frozenset(
    {(header, ChangeKind.REMOVED.value) for header in REMOVED_HEADERS | {OTHER_HEADER}}
    | {("to", ChangeKind.REBUILT.value), ("received", ChangeKind.ADDED.value)}
    | {(header, ChangeKind.FOLDED.value) for header in ("received", "dkim-signature", OTHER_HEADER)}
    | {
        ("dkim-signature", kind.value)
        for kind in (ChangeKind.DKIM_STRIPPED, ChangeKind.DKIM_KEPT, ChangeKind.DKIM_SIGNED)
    }
)

# 1 to smtp.max_recipients' default (1000), roughly 1-2-5 per decade.
RECIPIENT_BUCKETS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000)
# 1 KiB to 35 MiB (smtp.max_message_size's default), powers of 4.
SIZE_BUCKETS = (
    1024,
    4096,
    16_384,
    65_536,
    262_144,
    1_048_576,
    4_194_304,
    16_777_216,
    36_700_160,
)
# 0.1 ms to 1 s: a grant on the shared store (fleet.timeout is 50 ms by default).
STORE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 1.0)
# 10 ms to 10 minutes: an upstream may take RFC 5321's full 10 minutes after the dot.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 600.0)


def reply_class(outcome: Outcome) -> str:
    """The ``class`` label for an outcome: one of ``REPLY_CLASSES``."""
    label = outcome.reply_class
    return label if label in REPLY_CLASSES else "other"


def header_label(name: str) -> str:
    """The ``header`` label for a field name: one of ``HEADER_LABELS``."""
    lowered = name.lower()
    return lowered if lowered in HEADER_LABELS else OTHER_HEADER


MultiprocessMode = Literal["livesum", "livemax", "livemin"]


@dataclass(frozen=True, slots=True)
class Series:
    """One exported family: the ``Metrics`` attribute that holds it, and how it is made."""

    attr: str
    kind: type[Counter] | type[Gauge] | type[Histogram]
    name: str  # after ``PREFIX`` and "_"
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms only
    mode: MultiprocessMode = "livesum"  # gauges only: how the supervisor adds up the workers

    def build(self, registry: CollectorRegistry) -> Counter | Gauge | Histogram:
        """The family, registered in ``registry``."""
        name = f"{PREFIX}_{self.name}"
        if self.kind is Histogram:
            return Histogram(name, self.help, self.labels, buckets=self.buckets, registry=registry)
        if self.kind is Gauge:
            return Gauge(
                name, self.help, self.labels, registry=registry, multiprocess_mode=self.mode
            )
        return Counter(name, self.help, self.labels, registry=registry)


# Every family, in the order the exposition lists them.
SERIES: tuple[Series, ...] = (
    Series(
        "_messages",
        Counter,
        "messages_received_total",
        "Messages received from the application, by what the relay replied.",
        ("result",),
    ),
    Series(
        "_recipients",
        Histogram,
        "message_recipients",
        "Envelope recipients per received message.",
        buckets=RECIPIENT_BUCKETS,
    ),
    Series(
        "_size",
        Histogram,
        "message_size_bytes",
        "Size of each received message's data, in bytes.",
        buckets=SIZE_BUCKETS,
    ),
    Series(
        "_copies",
        Counter,
        "copies_total",
        "Copy outcomes at the upstream, by outcome.",
        ("outcome",),
    ),
    Series(
        "_ambiguous",
        Counter,
        "copies_ambiguous_total",
        "Copies with no reply after the final dot: they may have arrived.",
    ),
    Series(
        "_replies",
        Counter,
        "upstream_replies_total",
        "Final upstream replies for copies, by reply class and transaction stage.",
        ("class", "stage"),
    ),
    Series(
        "_latency",
        Histogram,
        "delivery_latency_seconds",
        "Duration of each copy's delivery attempt, by outcome.",
        ("outcome",),
        buckets=LATENCY_BUCKETS,
    ),
    Series(
        "_spool",
        Gauge,
        "spool_copies",
        "Copies in the spool, by state.",
        ("state",),
        mode="livesum",
    ),
    Series(
        "_oldest",
        Gauge,
        "spool_oldest_queued_age_seconds",
        "Age of the oldest copy waiting for delivery (0 when none waits).",
        mode="livemax",
    ),
    Series(
        "_headers",
        Counter,
        "header_changes_total",
        "Header changes made to copies, by field name (closed set) and kind of change.",
        ("header", "change"),
    ),
    Series(
        "_leaks",
        Counter,
        "leak_guard_rejections_total",
        "Messages the leak guard refused (550 5.7.1): nothing of them was sent.",
    ),
    Series(
        "_kept_lists",
        Counter,
        "recipient_lists_kept_total",
        "Messages of a sender named in senders.keep_recipients: copies kept To: and Cc:.",
    ),
    Series(
        "_body_warnings",
        Counter,
        "body_check_warnings_total",
        "Messages whose body names a recipient of another copy (body_check = warn).",
    ),
    Series(
        "_connections",
        Counter,
        "inbound_connections_total",
        "Inbound SMTP connections, by result.",
        ("result",),
    ),
    Series(
        "_refusals",
        Counter,
        "smtp_refusals_total",
        "Connections, MAIL, RCPT and DATA commands the relay refused, by reason.",
        ("reason",),
    ),
    Series(
        "_open",
        Gauge,
        "inbound_connections_open",
        "Inbound SMTP connections open now.",
        mode="livesum",
    ),
    Series(
        "_inbound_tls",
        Counter,
        "inbound_tls_failures_total",
        "Inbound STARTTLS handshakes that failed, by reason.",
        ("reason",),
    ),
    Series(
        "_inbound_auth",
        Counter,
        "inbound_auth_failures_total",
        "Inbound AUTH exchanges that failed, by reason.",
        ("reason",),
    ),
    Series(
        "_inbound_closed",
        Counter,
        "inbound_sessions_closed_total",
        "Inbound sessions the relay closed itself, by reason.",
        ("reason",),
    ),
    Series(
        "_overload",
        Gauge,
        "inbound_overload",
        "1 while open sessions are near smtp.max_connections (shorter idle timeouts), else 0.",
        mode="livemax",
    ),
    Series(
        "_auth_failures",
        Counter,
        "upstream_auth_failures_total",
        "Times the upstream refused the relay's credentials.",
    ),
    Series(
        "_auth_paused",
        Gauge,
        "upstream_auth_paused",
        "1 while delivery is paused after the upstream refused the credentials, else 0.",
        mode="livemax",
    ),
    Series(
        "_retries",
        Counter,
        "retries_total",
        "Copies deferred for a later attempt after a transient failure.",
    ),
    Series(
        "_dsns",
        Counter,
        "dsn_sent_total",
        "Delivery status notifications the upstream accepted (failed or expired copies).",
    ),
    Series(
        "_quarantined",
        Counter,
        "spool_quarantined_total",
        "Spool records (or whole databases) set aside as unreadable.",
    ),
    Series(
        "_quarantine_present",
        Gauge,
        "spool_quarantine_present",
        "Spool records and whole databases in quarantine now (set aside at start too).",
        mode="livesum",
    ),
    Series(
        "_build",
        Gauge,
        "build_info",
        "Always 1; the label names the running version.",
        ("version",),
        mode="livemax",
    ),
    Series(
        "_upstream_copies",
        Counter,
        "upstream_copies_total",
        "Copies each upstream accepted (several upstreams or shared limits).",
        ("upstream",),
    ),
    Series(
        "_upstream_state",
        Gauge,
        "upstream_state",
        "1 for the state each upstream is in (up, down, spent), 0 for the others.",
        ("upstream", "state"),
        mode="livemax",
    ),
    Series(
        "_upstream_quota_left",
        Gauge,
        "upstream_quota_left",
        "Copies each upstream's daily quota still allows, as this relay last saw it.",
        ("upstream",),
        mode="livemin",
    ),
    Series(
        "_upstream_quota",
        Gauge,
        "upstream_quota",
        "Each upstream's daily quota as configured (only upstreams with one).",
        ("upstream",),
        mode="livemax",
    ),
    Series(
        "_failovers",
        Counter,
        "upstream_failovers_total",
        "Copies an upstream passed on to the next one: down, or it refused our account.",
        ("upstream",),
    ),
    Series(
        "_limiter_waits",
        Counter,
        "upstream_limiter_waits_total",
        "Times a copy waited for an upstream's rate before it could go.",
        ("upstream",),
    ),
    Series(
        "_store_degraded",
        Gauge,
        "fleet_store_degraded",
        "1 while the shared store is away and this relay sends at its local share, else 0.",
        mode="livemax",
    ),
    Series(
        "_store_latency",
        Histogram,
        "fleet_store_latency_seconds",
        "Round trips to the shared store for a grant of the fleet's limits.",
        buckets=STORE_BUCKETS,
    ),
)


class Metrics:
    """The relay's series, registered in ``registry`` (a fresh one per test).

    Methods are named for the event the caller saw; each moves only the
    series its docstring names.
    """

    _messages: Counter
    _recipients: Histogram
    _size: Histogram
    _copies: Counter
    _ambiguous: Counter
    _replies: Counter
    _latency: Histogram
    _spool: Gauge
    _oldest: Gauge
    _headers: Counter
    _leaks: Counter
    _kept_lists: Counter
    _body_warnings: Counter
    _connections: Counter
    _refusals: Counter
    _open: Gauge
    _inbound_tls: Counter
    _inbound_auth: Counter
    _inbound_closed: Counter
    _overload: Gauge
    _auth_failures: Counter
    _auth_paused: Gauge
    _retries: Counter
    _dsns: Counter
    _quarantined: Counter
    _quarantine_present: Gauge
    _build: Gauge
    _upstream_copies: Counter
    _upstream_state: Gauge
    _upstream_quota_left: Gauge
    _upstream_quota: Gauge
    _failovers: Counter
    _limiter_waits: Counter
    _store_degraded: Gauge
    _store_latency: Histogram

    def __init__(self, registry: CollectorRegistry, *, version: str = __version__) -> None:
        self.registry = registry
        for spec in SERIES:
            setattr(self, spec.attr, spec.build(registry))
        self._build.labels(version).set(1)
        self._preinitialise()

    def _preinitialise(self) -> None:
        for message in MessageResult:
            self._messages.labels(message.value)
        for status in Status:
            self._copies.labels(status.value)
            self._latency.labels(status.value)
        for cls in REPLY_CLASSES:
            for stage in Stage:
                self._replies.labels(cls, stage.value)
        for state in SpoolState:
            self._spool.labels(state.value).set(0)
        for header, change in HEADER_CHANGES:
            self._headers.labels(header, change)
        for connection in ConnectionResult:
            self._connections.labels(connection.value)
        for tls in TlsFailure:
            self._inbound_tls.labels(tls.value)
        for auth in AuthFailure:
            self._inbound_auth.labels(auth.value)
        for closed in SessionClosed:
            self._inbound_closed.labels(closed.value)
        for refusal in Refusal:
            self._refusals.labels(refusal.value)

    def message_received(self, result: MessageResult, size: int, recipients: int) -> None:
        """Count one message by ``result``; observe its size and recipient count.

        ``size`` (bytes of DATA) and ``recipients`` (envelope recipients) are
        observed only when more than 0: pass 0 when the message was refused
        before that was known (no DATA yet), so refusals do not skew the
        histograms toward zero.
        """
        self._messages.labels(result.value).inc()
        if size > 0:
            self._size.observe(size)
        if recipients > 0:
            self._recipients.observe(recipients)

    def copy_outcome(self, outcome: Outcome, latency: float) -> None:
        """Count one copy's outcome, its upstream reply (class, stage) and its latency.

        ``latency`` is the attempt's duration in seconds, measured by the caller
        on a monotonic clock. An ambiguous outcome also counts in
        ``copies_ambiguous_total``; one with ``auth_failed`` also counts as an
        upstream auth failure (do not call ``upstream_auth_failed`` for it too).
        """
        status = outcome.status.value
        self._copies.labels(status).inc()
        self._replies.labels(reply_class(outcome), outcome.stage.value).inc()
        self._latency.labels(status).observe(max(latency, 0.0))
        if outcome.ambiguous:
            self._ambiguous.inc()
        if outcome.auth_failed:
            self._auth_failures.inc()

    def header_changes(self, changes: Iterable[Change]) -> None:
        """Count each change to one copy's header section by field name and kind.

        A pair outside ``HEADER_CHANGES`` is not counted: it would be a series that
        appears with traffic (Rule 2); tests/test_metrics.py keeps the table whole.
        """
        for change in changes:
            pair = (header_label(change.header), change.kind.value)
            if pair in HEADER_CHANGES:
                self._headers.labels(*pair).inc()

    def leak_rejected(self) -> None:
        """Count one message the leak guard refused."""
        self._leaks.inc()

    def recipient_list_kept(self) -> None:
        """Count one message whose copies kept their visible recipient list (the opt-out)."""
        self._kept_lists.inc()

    def body_warning(self) -> None:
        """Count one message whose body check warned."""
        self._body_warnings.inc()

    def connection(self, result: ConnectionResult) -> None:
        """Count one inbound connection; an accepted one is also open until closed."""
        self._connections.labels(result.value).inc()
        if result is ConnectionResult.ACCEPTED:
            self._open.inc()

    def refused(self, reason: Refusal) -> None:
        """Count one refusal in an SMTP session (a connection, MAIL, RCPT or DATA)."""
        self._refusals.labels(reason.value).inc()

    def connection_closed(self) -> None:
        """An accepted connection closed (call once per ``connection(ACCEPTED)``)."""
        self._open.dec()

    def tls_failed(self, reason: TlsFailure) -> None:
        """Count one inbound TLS handshake that failed."""
        self._inbound_tls.labels(reason.value).inc()

    def auth_failed(self, reason: AuthFailure) -> None:
        """Count one inbound AUTH exchange that failed."""
        self._inbound_auth.labels(reason.value).inc()

    def session_closed(self, reason: SessionClosed) -> None:
        """Count one inbound session the relay closed itself."""
        self._inbound_closed.labels(reason.value).inc()

    def overload(self, on: bool) -> None:
        """Set the overload gauge: 1 while the listener is near its connection limit."""
        self._overload.set(1 if on else 0)

    def upstream_auth_failed(self) -> None:
        """Count an auth refusal that no copy's outcome carries (a probe, a pool warm-up)."""
        self._auth_failures.inc()

    def upstream_auth_paused(self, paused: bool) -> None:
        """Set the paused gauge: 1 while delivery waits for working credentials."""
        self._auth_paused.set(1 if paused else 0)

    def spool_copies(self, counts: Mapping[SpoolState, int]) -> None:
        """Set the spool gauge for every state; a state missing from ``counts`` is 0."""
        for state in SpoolState:
            self._spool.labels(state.value).set(counts.get(state, 0))

    def oldest_queued_age(self, seconds: float) -> None:
        """Set the age of the oldest waiting copy (0 when none waits)."""
        self._oldest.set(max(seconds, 0.0))

    def retry_scheduled(self) -> None:
        """Count one copy deferred for a retry."""
        self._retries.inc()

    def dsn_sent(self) -> None:
        """Count one delivery status notification the upstream accepted."""
        self._dsns.inc()

    def quarantined(self, count: int) -> None:
        """Count spool records set aside as unreadable."""
        if count > 0:
            self._quarantined.inc(count)

    def quarantine_present(self, count: int) -> None:
        """Set how many records and databases lie in the spool's quarantine now."""
        self._quarantine_present.set(max(count, 0))

    def upstreams(self, names: Iterable[str], *, quotas: Mapping[str, int] | None = None) -> None:
        """Make every upstream's series (Rule 2: names from the configuration only);
        ``quotas``: the daily quota of each upstream that has one."""
        for name in names:
            self._upstream_copies.labels(name)
            self._failovers.labels(name)
            self._limiter_waits.labels(name)
            self.upstream_state(name, "up")
        for name, quota in (quotas or {}).items():
            self._upstream_quota.labels(name).set(quota)
            self._upstream_quota_left.labels(name).set(quota)

    def upstream_state(self, name: str, state: str) -> None:
        """``upstream_state``: 1 for ``state`` (up, down or spent), 0 for the other two."""
        for each in UPSTREAM_STATES:
            self._upstream_state.labels(name, each).set(1 if each == state else 0)

    def upstream_sent(self, name: str, quota_left: int | None) -> None:
        """A copy the upstream accepted; its daily quota's remainder, if it has one."""
        self._upstream_copies.labels(name).inc()
        if quota_left is not None:
            self._upstream_quota_left.labels(name).set(quota_left)

    def failover(self, name: str) -> None:
        self._failovers.labels(name).inc()

    def limiter_waited(self, name: str) -> None:
        self._limiter_waits.labels(name).inc()

    def store(self, *, degraded: bool, latency: float | None) -> None:
        """The shared store's state after a grant, and the grant's round trip."""
        self._store_degraded.set(1 if degraded else 0)
        if latency is not None:
            self._store_latency.observe(latency)
