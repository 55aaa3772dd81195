"""Sender policy (SPEC 3, issue 14.15), end to end: allow-lists, AUTH users, the opt-out.

Real ``smtplib`` clients as the application, the in-loop relay, the recording upstream.
"""

from __future__ import annotations

import asyncio
import smtplib
from pathlib import Path
from typing import Any

import pytest

from relay.config import load
from relay.core.errors import ConfigError
from relay.core.senders import parse_policy
from relay.server import Relay
from tests.relay_harness import running_relay
from tests.test_operator_logs import TOKENS, json_logs, lines
from tests.upstream_server import UpstreamServer

ALICE, BOB, CAROL, DAVE = (
    "alice@example.com",
    "bob@example.net",
    "carol@example.org",
    "dave@example.test",
)


def message(sender: str, to: str, cc: str = "", extra: str = "") -> str:
    lines = [f"From: <{sender}>", f"To: {to}", *([f"Cc: {cc}"] if cc else [])]
    lines += [*([extra] if extra else []), "Subject: plans", "Message-ID: <t1@example.org>"]
    return "\r\n".join(lines) + "\r\n\r\nSee you at ten.\r\n"


def submit(
    port: int,
    sender: str,
    rcpts: list[str],
    data: str,
    login: tuple[str, str] | None = None,
) -> Any:
    """Send one message; the refused-recipients dict, or the SMTP exception raised."""
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.ehlo("app.example.org")
            if login is not None:
                client.login(*login)
            return client.sendmail(sender, rcpts, data)
    except smtplib.SMTPException as exc:
        return exc


def count(relay: Relay, name: str, **labels: str) -> float:
    value = relay.registry.get_sample_value(f"solo_relay_{name}", labels)
    assert value is not None, name
    return value


@pytest.fixture
def users_file(tmp_path: Path) -> str:
    path = tmp_path / "users"
    path.write_text("shop:shop-secret\nblog:blog-secret\n")
    return str(path)


async def test_auth_users_may_send_only_as_their_own_senders(
    tmp_path: Path, plain_server: UpstreamServer, users_file: str
) -> None:
    """by_user: 'shop' may use @shop.example.com only; 'blog' (no entry, no allow) nothing."""
    env = {
        "RELAY_SMTP_AUTH": "users",
        "RELAY_SMTP_USERS_FILE": users_file,
        "RELAY_SENDERS_BY_USER": "shop: @shop.example.com noreply@example.org",
    }
    shop, blog = ("shop", "shop-secret"), ("blog", "blog-secret")
    orders = "orders@shop.example.com"
    with json_logs() as stream:
        async with running_relay(tmp_path, plain_server.url(), env) as relay:
            port = relay.smtp_port
            ok = await asyncio.to_thread(submit, port, orders, [BOB], message(orders, BOB), shop)
            # A whole address allows its domain in From: (noreply@ -> any @example.org).
            other_from = message(f"news@{'example.org'}", BOB)
            ok2 = await asyncio.to_thread(
                submit, port, "noreply@example.org", [BOB], other_from, shop
            )
            as_ceo = await asyncio.to_thread(
                submit, port, "ceo@example.com", [BOB], message("ceo@example.com", BOB), shop
            )
            from_ceo = await asyncio.to_thread(
                submit, port, orders, [BOB], message("ceo@example.com", BOB), shop
            )
            no_entry = await asyncio.to_thread(
                submit, port, orders, [BOB], message(orders, BOB), blog
            )
            anonymous = await asyncio.to_thread(submit, port, orders, [BOB], message(orders, BOB))
            counts = (
                count(relay, "smtp_refusals_total", reason="sender_not_allowed"),
                count(relay, "smtp_refusals_total", reason="from_not_allowed"),
                count(relay, "messages_received_total", result="rejected_policy"),
            )
        received = lines(stream, "message received")
        refused = lines(stream, "refused")
    assert ok == {} and ok2 == {}
    for refusal in (as_ceo, no_entry, anonymous):
        assert isinstance(refusal, smtplib.SMTPSenderRefused)
        assert refusal.smtp_code == 550 and refusal.smtp_error.startswith(b"5.7.1")
    assert isinstance(from_ceo, smtplib.SMTPDataError) and from_ceo.smtp_code == 550
    assert from_ceo.smtp_error.startswith(b"5.7.1 From:")
    assert counts == (3, 1, 1)
    assert len(plain_server.transactions) == 2
    # SPEC 3: the AUTH user of each message, as a token.
    assert [line["auth_user"] for line in received] == [TOKENS("shop"), TOKENS("shop")]
    reasons = sorted(line["reason"] for line in refused)
    assert reasons == ["from_not_allowed", *["sender_not_allowed"] * 3]
    assert {line["detail"] for line in refused} == {"AUTH user shop", "AUTH user blog", "no AUTH"}


async def test_allow_list_without_auth(tmp_path: Path, plain_server: UpstreamServer) -> None:
    """senders.allow with no AUTH: the envelope sender and the From: domain must be on it."""
    env = {"RELAY_SENDERS_ALLOW": "@example.org, <>"}
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        port = relay.smtp_port
        good = await asyncio.to_thread(submit, port, CAROL, [BOB], message(CAROL, BOB))
        bounce = await asyncio.to_thread(submit, port, "", [BOB], message(CAROL, BOB))
        bad = await asyncio.to_thread(submit, port, ALICE, [BOB], message(ALICE, BOB))
        spoofed = await asyncio.to_thread(submit, port, CAROL, [BOB], message(ALICE, BOB))
        no_from = await asyncio.to_thread(
            submit, port, CAROL, [BOB], "To: bob@example.net\r\nSubject: x\r\n\r\nhi\r\n"
        )
    assert good == {} and bounce == {}
    assert isinstance(bad, smtplib.SMTPSenderRefused) and bad.smtp_code == 550
    assert isinstance(spoofed, smtplib.SMTPDataError) and spoofed.smtp_code == 550
    assert isinstance(no_from, smtplib.SMTPDataError) and no_from.smtp_code == 550
    assert len(plain_server.transactions) == 2


async def test_without_a_policy_anyone_may_send_as_anyone(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """Off by default: no [senders] setting, no refusal (the behaviour before the policy)."""
    async with running_relay(tmp_path, plain_server.url()) as relay:
        sent = await asyncio.to_thread(
            submit, relay.smtp_port, ALICE, [BOB], message("ceo@example.net", BOB)
        )
    assert sent == {}


# -- the opt-out: a team thread keeps its visible recipient list ---------------------------


async def test_a_named_sender_keeps_to_and_cc_and_bcc_stays_hidden(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """keep_recipients: every copy keeps To: and Cc:; the Bcc recipient is in no other copy."""
    team = "team@example.org"
    env = {"RELAY_SENDERS_KEEP_RECIPIENTS": team}
    data = message(team, f"<{ALICE}>, <{BOB}>", f"<{CAROL}>", extra=f"Bcc: <{DAVE}>")
    with json_logs() as stream:
        async with running_relay(tmp_path, plain_server.url(), env) as relay:
            sent = await asyncio.to_thread(
                submit, relay.smtp_port, team, [ALICE, BOB, CAROL, DAVE], data
            )
            kept = count(relay, "recipient_lists_kept_total")
        (line,) = lines(stream, "recipient list kept")
    assert sent == {}
    copies = {t.rcpt_tos[0]: t.content for t in plain_server.transactions}
    assert sorted(copies) == sorted([ALICE, BOB, CAROL, DAVE])
    for rcpt, content in copies.items():
        head = content.split(b"\r\n\r\n", 1)[0]
        assert f"\r\nTo: <{ALICE}>, <{BOB}>\r\nCc: <{CAROL}>\r\n".encode() in head
        assert b"Bcc" not in head
        assert (DAVE.encode() in head) is (rcpt == DAVE)  # only in Dave's own Received line
    assert kept == 1
    assert line["sender"] == TOKENS(team) and line["copies"] == 4


async def test_the_opt_out_still_refuses_a_hidden_recipient_shown(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """A named sender's Reply-To naming the Bcc recipient: 550 5.7.1, nothing delivered."""
    team = "team@example.org"
    env = {"RELAY_SENDERS_KEEP_RECIPIENTS": team}
    data = message(team, f"<{ALICE}>", extra=f"Reply-To: <{DAVE}>")
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        refused = await asyncio.to_thread(submit, relay.smtp_port, team, [ALICE, DAVE], data)
    assert isinstance(refused, smtplib.SMTPDataError) and refused.smtp_code == 550
    assert plain_server.transactions == []


async def test_the_opt_out_body_check_watches_the_hidden_recipients_only(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """body_check = reject: a body naming a To: member passes, one naming the Bcc one is refused."""
    team = "team@example.org"
    env = {"RELAY_SENDERS_KEEP_RECIPIENTS": team, "RELAY_ISOLATION_BODY_CHECK": "reject"}
    visible = message(team, f"<{ALICE}>").replace("See you", f"{ALICE}: see you")
    hidden = message(team, f"<{ALICE}>").replace("See you", f"{DAVE}: see you")
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        sent = await asyncio.to_thread(submit, relay.smtp_port, team, [ALICE, DAVE], visible)
        refused = await asyncio.to_thread(submit, relay.smtp_port, team, [ALICE, DAVE], hidden)
    assert sent == {}
    assert isinstance(refused, smtplib.SMTPDataError) and refused.smtp_code == 550
    assert len(plain_server.transactions) == 2  # the first message's two copies only


async def test_no_header_can_switch_the_opt_out_on(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """Another sender, with any header claiming the team list: copies are isolated as always."""
    env = {"RELAY_SENDERS_KEEP_RECIPIENTS": "team@example.org"}
    data = message(
        "team@example.org",
        f"<{ALICE}>, <{BOB}>",
        extra="X-Keep-Recipients: yes\r\nSender: <team@example.org>",
    )
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        sent = await asyncio.to_thread(submit, relay.smtp_port, CAROL, [ALICE, BOB], data)
        kept = count(relay, "recipient_lists_kept_total")
    assert sent == {} and kept == 0
    for t in plain_server.transactions:
        head = t.content.split(b"\r\n\r\n", 1)[0]
        assert f"\r\nTo: {t.rcpt_tos[0]}\r\n".encode() in head
        other = ({ALICE, BOB} - {t.rcpt_tos[0]}).pop()
        assert other.encode() not in head


@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("RELAY_SENDERS_ALLOW", "not an address", "senders.allow"),
        ("RELAY_SENDERS_BY_USER", "shop @example.com", "senders.by_user"),
        ("RELAY_SENDERS_BY_USER", "shop:", "senders.by_user"),
        ("RELAY_SENDERS_KEEP_RECIPIENTS", "@example.org", "senders.keep_recipients"),
    ],
)
def test_a_malformed_sender_setting_names_its_key(variable: str, value: str, key: str) -> None:
    """Every [senders] entry is checked at start; the error names the key."""
    with pytest.raises(ConfigError) as caught:
        load(environ={variable: value})
    assert caught.value.key == key


# -- the pure policy ------------------------------------------------------------------


def test_patterns_compare_domains_in_any_case_and_idna_form() -> None:
    """A domain pattern matches in any case and in U-label or A-label form; local parts exact."""
    policy = parse_policy(["@Bücher.example", "Billing@Example.com"], [])
    assert policy.check_sender("", "orders@xn--bcher-kva.example") is None
    assert policy.check_sender("", "orders@BÜCHER.example") is None
    assert policy.check_sender("", "Billing@EXAMPLE.COM") is None
    assert policy.check_sender("", "billing@example.com") is None  # any case, as Postfix
    assert policy.check_sender("", "billing2@example.com") is not None
    assert policy.check_sender("", "") is not None  # <> only when listed
    assert policy.check_from("", ["anyone@example.com"]) is None  # an address allows its domain
    assert policy.check_from("", []) is not None


def test_by_user_replaces_allow_for_that_user_only() -> None:
    """A user's entry is its whole list; others fall back to allow."""
    policy = parse_policy(["@example.org"], ["shop: @shop.example.com"])
    assert policy.check_sender("shop", "news@example.org") is not None
    assert policy.check_sender("shop", "a@shop.example.com") is None
    assert policy.check_sender("blog", "news@example.org") is None
    assert policy.check_sender("", "news@example.org") is None
    assert not parse_policy([], []).on


def test_keep_recipients_names_whole_addresses_only() -> None:
    policy = parse_policy([], [], ["Team@Example.ORG"])
    assert policy.keeps_recipients("Team@example.org")
    assert policy.keeps_recipients("team@example.org")
    assert not policy.keeps_recipients("team2@example.org")
    assert not policy.keeps_recipients("")
    with pytest.raises(ValueError, match="not an address"):
        parse_policy([], [], ["@example.org"])
