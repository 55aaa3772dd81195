"""Metrics: a closed, pre-initialised series set, and each method moves its series."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from relay import __version__
from relay.core.dkim import DkimAction, Signer
from relay.core.isolation import isolate
from relay.core.model import (
    REMOVED_HEADERS,
    Change,
    ChangeKind,
    Envelope,
    IsolationOptions,
    Outcome,
    Stage,
    Status,
)
from relay.ops.metrics import (
    HEADER_CHANGES,
    HEADER_LABELS,
    REPLY_CLASSES,
    AuthFailure,
    ConnectionResult,
    MessageResult,
    Metrics,
    Refusal,
    SessionClosed,
    SpoolState,
    TlsFailure,
    header_label,
)
from tests.conftest import dkim_keypair
from tests.relay_harness import running_relay

Series = frozenset[tuple[str, frozenset[tuple[str, str]]]]

EXTRA_HEADER = "X-Customer-List"
FOLD = ",\r\n "
OPTIONS = IsolationOptions(removed_headers=frozenset({EXTRA_HEADER}))


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry)


def series(registry: CollectorRegistry) -> Series:
    """Every exported sample's name and label set (values ignored)."""
    text = generate_latest(registry).decode()
    return frozenset(
        (sample.name, frozenset(sample.labels.items()))
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    )


def recipients(n: int) -> list[str]:
    return [f"customer{i}@shop{i}.example.com" for i in range(n)]


def message(rcpts: list[str]) -> bytes:
    lines = [
        "From: App <app@example.org>",
        f"To: {rcpts[0]}",
        f"Cc: {', '.join(rcpts[1:3]) or rcpts[0]}",
        f"Bcc: {rcpts[-1]}",
        f"{EXTRA_HEADER}: " + FOLD.join(rcpts),  # folded: lines stay under 998 octets
        "Message-ID: <order-7@mail.example.org>",
        "Subject: Your order",
    ]
    return ("\r\n".join(lines) + "\r\n\r\nThanks.\r\n").encode()


OUTCOMES = (
    Outcome(Status.DELIVERED, Stage.DOT, 250, "2.0.0", "OK queued for <x@example.net>"),
    Outcome(Status.TRANSIENT, Stage.RCPT, 451, "4.7.1", "try later, example.net greylists"),
    Outcome(Status.PERMANENT, Stage.RCPT, 550, "5.1.1", "<nobody@example.net> unknown"),
    Outcome(Status.TRANSIENT, Stage.DOT, 0, ambiguous=True),
    Outcome(Status.TRANSIENT, Stage.AUTH, 535, "5.7.8", "bad credentials", auth_failed=True),
    Outcome(Status.PERMANENT, Stage.DATA, 354, "", "a 3xx where none belongs"),
    Outcome(Status.TRANSIENT, Stage.CONNECT, 0, "", "connection refused by example.net"),
)


def traffic(metrics: Metrics, n: int) -> bytes:
    """Drive every method with a message to ``n`` distinct recipients; return its bytes."""
    rcpts = recipients(n)
    data = message(rcpts)
    plan = isolate(Envelope.parse("app@example.org", rcpts), data, OPTIONS)
    metrics.connection(ConnectionResult.ACCEPTED)
    metrics.connection(ConnectionResult.REFUSED_LIMIT)
    metrics.connection(ConnectionResult.REFUSED_NETWORK)
    metrics.refused(Refusal.NETWORK)
    metrics.message_received(MessageResult.ACCEPTED, len(data), n)
    metrics.message_received(MessageResult.REJECTED_LEAK, len(data), n)
    metrics.leak_rejected()
    metrics.body_warning()
    for i, copy in enumerate(plan.copies):
        metrics.header_changes(copy.changes)
        metrics.copy_outcome(OUTCOMES[i % len(OUTCOMES)], latency=0.05 * i)
    metrics.header_changes([Change(ChangeKind.REMOVED, f"X-Tenant-{n}", "configured")])
    metrics.header_changes([Change(ChangeKind.REBUILT, "Cc", "a pair split.py never makes")])
    metrics.quarantined(n)
    metrics.quarantine_present(n)
    metrics.upstream_auth_failed()
    metrics.upstream_auth_paused(True)
    metrics.spool_copies({SpoolState.QUEUED: n, SpoolState.DEFERRED: 1})
    metrics.oldest_queued_age(float(n))
    metrics.connection_closed()
    return data


def test_series_set_is_the_same_for_1_and_500_recipients() -> None:
    """The exported series (names and label sets) do not depend on the traffic."""
    idle, one, many = CollectorRegistry(), CollectorRegistry(), CollectorRegistry()
    Metrics(idle)
    traffic(Metrics(one), 1)
    traffic(Metrics(many), 500)
    assert series(one) == series(many) == series(idle)


def test_exposition_names_no_address_domain_or_message_id(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """No address, domain, Message-ID or reply text reaches the exposition."""
    traffic(metrics, 50)
    text = generate_latest(registry).decode()
    for needle in ("@", "example", "customer", "shop", "order-7", "greylists", "unknown"):
        assert needle not in text


def test_label_values_come_from_the_closed_sets(registry: CollectorRegistry) -> None:
    """Every label value exported is a member of its documented closed set."""
    traffic(Metrics(registry), 20)
    allowed: dict[str, set[str] | None] = {
        "result": {r.value for r in MessageResult} | {c.value for c in ConnectionResult},
        "outcome": {s.value for s in Status},
        "class": set(REPLY_CLASSES),
        "stage": {s.value for s in Stage},
        "state": {s.value for s in SpoolState},
        "header": set(HEADER_LABELS),
        "change": {k.value for k in ChangeKind},
        "version": {__version__},
        "reason": {r.value for e in (TlsFailure, AuthFailure, SessionClosed, Refusal) for r in e},
        "le": None,
    }
    for _, labels in series(registry):
        for name, value in labels:
            assert name in allowed
            values = allowed[name]
            assert values is None or value in values


def test_header_labels_are_the_removal_list_plus_four() -> None:
    """The header label set is REMOVED_HEADERS plus to, received, dkim-signature, other."""
    assert REMOVED_HEADERS | {"to", "received", "dkim-signature", "other"} == HEADER_LABELS
    assert header_label("Resent-Bcc") == "resent-bcc"
    assert header_label("X-Customer-List") == "other"


def test_message_received_counts_result_and_observes_size_and_recipients(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """message_received counts by result and observes size and recipients when known."""
    metrics.message_received(MessageResult.ACCEPTED, 2000, 3)
    metrics.message_received(MessageResult.REJECTED_SIZE, 0, 0)
    get = registry.get_sample_value
    assert get("solo_relay_messages_received_total", {"result": "accepted"}) == 1
    assert get("solo_relay_messages_received_total", {"result": "rejected_size"}) == 1
    assert get("solo_relay_messages_received_total", {"result": "deferred"}) == 0
    assert get("solo_relay_message_size_bytes_count") == 1
    assert get("solo_relay_message_size_bytes_sum") == 2000
    assert get("solo_relay_message_size_bytes_bucket", {"le": "1024.0"}) == 0
    assert get("solo_relay_message_size_bytes_bucket", {"le": "4096.0"}) == 1
    assert get("solo_relay_message_recipients_count") == 1
    assert get("solo_relay_message_recipients_sum") == 3


def test_copy_outcome_counts_outcome_reply_class_stage_and_latency(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """copy_outcome moves copies, replies by class and stage, and the latency histogram."""
    metrics.copy_outcome(Outcome(Status.DELIVERED, Stage.DOT, 250), 0.3)
    metrics.copy_outcome(Outcome(Status.TRANSIENT, Stage.CONNECT), 30.0)
    metrics.copy_outcome(Outcome(Status.PERMANENT, Stage.MAIL, 354), 1.0)
    get = registry.get_sample_value
    assert get("solo_relay_copies_total", {"outcome": "delivered"}) == 1
    assert get("solo_relay_copies_total", {"outcome": "transient"}) == 1
    assert get("solo_relay_copies_total", {"outcome": "permanent"}) == 1
    assert get("solo_relay_upstream_replies_total", {"class": "2xx", "stage": "dot"}) == 1
    assert get("solo_relay_upstream_replies_total", {"class": "none", "stage": "connect"}) == 1
    assert get("solo_relay_upstream_replies_total", {"class": "other", "stage": "mail"}) == 1
    assert get("solo_relay_upstream_replies_total", {"class": "5xx", "stage": "rcpt"}) == 0
    latency = "solo_relay_delivery_latency_seconds"
    assert get(f"{latency}_count", {"outcome": "delivered"}) == 1
    assert get(f"{latency}_sum", {"outcome": "delivered"}) == pytest.approx(0.3)
    assert get(f"{latency}_bucket", {"outcome": "delivered", "le": "0.25"}) == 0
    assert get(f"{latency}_bucket", {"outcome": "delivered", "le": "0.5"}) == 1
    assert get(f"{latency}_sum", {"outcome": "transient"}) == 30.0


def test_copy_outcome_counts_ambiguous_and_auth_failures(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """An ambiguous outcome and an auth-failed outcome each move their own counter."""
    metrics.copy_outcome(Outcome(Status.TRANSIENT, Stage.DOT, ambiguous=True), 600.0)
    metrics.copy_outcome(Outcome(Status.TRANSIENT, Stage.AUTH, 535, auth_failed=True), 0.1)
    metrics.upstream_auth_failed()
    get = registry.get_sample_value
    assert get("solo_relay_copies_ambiguous_total") == 1
    assert get("solo_relay_upstream_auth_failures_total") == 2


def test_header_changes_count_by_header_and_kind(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """header_changes counts each change under its closed header name and kind."""
    plan = isolate(
        Envelope.parse("app@example.org", recipients(3)), message(recipients(3)), OPTIONS
    )
    for copy in plan.copies:
        metrics.header_changes(copy.changes)
    get = registry.get_sample_value
    name = "solo_relay_header_changes_total"
    assert get(name, {"header": "cc", "change": "removed"}) == 3
    assert get(name, {"header": "bcc", "change": "removed"}) == 3
    assert get(name, {"header": "other", "change": "removed"}) == 3
    assert get(name, {"header": "to", "change": "rebuilt"}) == 3
    assert get(name, {"header": "received", "change": "added"}) == 3
    assert get(name, {"header": "dkim-signature", "change": "dkim-stripped"}) == 0


def test_leak_and_body_warning_counters(metrics: Metrics, registry: CollectorRegistry) -> None:
    """leak_rejected and body_warning each add one to their counter."""
    metrics.leak_rejected()
    metrics.body_warning()
    metrics.body_warning()
    assert registry.get_sample_value("solo_relay_leak_guard_rejections_total") == 1
    assert registry.get_sample_value("solo_relay_body_check_warnings_total") == 2


def test_connections_count_by_result_and_track_open(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """connection counts by result; only accepted ones are open until connection_closed."""
    metrics.connection(ConnectionResult.ACCEPTED)
    metrics.connection(ConnectionResult.ACCEPTED)
    metrics.connection(ConnectionResult.REFUSED_NETWORK)
    metrics.connection_closed()
    get = registry.get_sample_value
    assert get("solo_relay_inbound_connections_total", {"result": "accepted"}) == 2
    assert get("solo_relay_inbound_connections_total", {"result": "refused_network"}) == 1
    assert get("solo_relay_inbound_connections_total", {"result": "refused_limit"}) == 0
    assert get("solo_relay_inbound_connections_open") == 1


def test_spool_gauges_start_at_zero_and_are_set_whole(
    metrics: Metrics, registry: CollectorRegistry
) -> None:
    """Spool gauges exist at 0 for every state; spool_copies sets all states at once."""
    get = registry.get_sample_value
    assert all(get("solo_relay_spool_copies", {"state": s.value}) == 0 for s in SpoolState)
    metrics.spool_copies({SpoolState.QUEUED: 4, SpoolState.FAILED: 1})
    metrics.spool_copies({SpoolState.QUEUED: 2})
    assert get("solo_relay_spool_copies", {"state": "queued"}) == 2
    assert get("solo_relay_spool_copies", {"state": "failed"}) == 0
    metrics.oldest_queued_age(12.5)
    assert get("solo_relay_spool_oldest_queued_age_seconds") == 12.5


def test_auth_paused_gauge_and_build_info(metrics: Metrics, registry: CollectorRegistry) -> None:
    """The auth-paused gauge is 0 or 1; build_info is 1 with the running version."""
    get = registry.get_sample_value
    assert get("solo_relay_upstream_auth_paused") == 0
    metrics.upstream_auth_paused(True)
    assert get("solo_relay_upstream_auth_paused") == 1
    metrics.upstream_auth_paused(False)
    assert get("solo_relay_upstream_auth_paused") == 0
    assert get("solo_relay_build_info", {"version": __version__}) == 1


def test_header_changes_export_only_the_pairs_that_can_happen(registry: CollectorRegistry) -> None:
    """One series per possible (header, change): removals, To rebuilt, Received added, DKIM,
    and a kept field folded."""
    Metrics(registry)
    exported = {
        (labels["header"], labels["change"])
        for name, label_set in series(registry)
        if name == "solo_relay_header_changes_total"
        for labels in [dict(label_set)]
    }
    assert exported == HEADER_CHANGES
    assert len(exported) == len(REMOVED_HEADERS) + 1 + 2 + 3 + 3
    assert ("to", "removed") not in exported and ("cc", "rebuilt") not in exported
    assert ("cc", "folded") not in exported and ("to", "folded") not in exported


@pytest.mark.parametrize("dkim", [DkimAction.STRIP, DkimAction.RESIGN])
def test_every_change_isolation_makes_is_a_listed_pair(dkim: DkimAction) -> None:
    """What split.py produces (removals, To, Received, DKIM kept/stripped/signed) is listed."""
    private, _ = dkim_keypair()
    signer = Signer("example.org", "s1", private)
    options = replace(OPTIONS, dkim_action=dkim, signer=signer)
    rcpts = recipients(3)
    signed = (
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=app; h=from:to:cc; bh=x; b=y\r\n"
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=keep; h=from:subject; bh=x; b=y\r\n"
    )
    long_fields = (
        b"Received: from a.example.org by b.example.org; " + b"x " * 600 + b"\r\n"
        b"X-Long: " + b"y " * 600 + b"\r\n"
    )
    data = signed + long_fields + message(rcpts)
    plan = isolate(Envelope.parse("app@example.org", rcpts), data, options)
    pairs = {
        (header_label(change.header), change.kind.value)
        for copy in plan.copies
        for change in copy.changes
    }
    assert pairs <= HEADER_CHANGES, pairs - HEADER_CHANGES
    assert ("dkim-signature", "dkim-kept") in pairs
    assert ("dkim-signature", "dkim-stripped") in pairs
    assert {("received", "folded"), ("other", "folded")} <= pairs


def test_no_counter_exports_a_created_series(registry: CollectorRegistry) -> None:
    """No *_created series: timestamps per label set that no rule or panel reads."""
    traffic(Metrics(registry), 3)
    names = {name for name, _ in series(registry)}
    assert not [name for name in names if name.endswith("_created")]
    assert "solo_relay_copies_total" in names


def test_quarantine_present_gauge(metrics: Metrics, registry: CollectorRegistry) -> None:
    """The gauge says what lies in quarantine now; it starts at 0."""
    name = "solo_relay_spool_quarantine_present"
    assert registry.get_sample_value(name) == 0
    metrics.quarantine_present(2)
    assert registry.get_sample_value(name) == 2


async def test_a_database_quarantined_at_start_shows_in_the_first_scrape(tmp_path: Path) -> None:
    """An unreadable spool.db set aside at start: the gauge is 1 before any traffic."""
    spool = tmp_path / "spool"
    spool.mkdir()
    (spool / "spool.db").write_bytes(b"this is not a SQLite database" * 100)
    async with running_relay(tmp_path, f"outbox:{tmp_path / 'outbox'}") as relay:
        get = relay.registry.get_sample_value
        assert get("solo_relay_spool_quarantine_present") == 1
        assert get("solo_relay_spool_quarantined_total") == 1


EXPOSITION = Path(__file__).with_name("metrics_exposition.txt")


def canonical_exposition(text: str) -> str:
    """The exposition with each family's samples sorted (label children follow set order)."""
    families: list[list[str]] = []
    for line in text.splitlines():
        if line.startswith("# HELP ") or not families:
            families.append([])
        families[-1].append(line)
    out = []
    for family in families:
        comments = [line for line in family if line.startswith("#")]
        out += [*comments, *sorted(line for line in family if not line.startswith("#"))]
    return "\n".join(out) + "\n"


def test_exposition_of_a_fresh_registry_is_pinned(registry: CollectorRegistry) -> None:
    """Every family's name, help, type, labels and buckets, byte for byte, in order.

    A dashboard or alert reads these names: a change here is a change to them
    (regenerate tests/metrics_exposition.txt only on purpose).
    """
    Metrics(registry, version="0.0.0-pinned")
    assert canonical_exposition(generate_latest(registry).decode()) == EXPOSITION.read_text()
