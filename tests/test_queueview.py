"""`solo-relay queue list` filters, JSON, Message-ID, history, and `solo-relay token` (14.14).

In-process (``relay.cli.main.main`` with the environment set), on spools built with
``relay.spool.Spool``; the delivered history end to end, through a real relay.
"""

from __future__ import annotations

import asyncio
import io
import json
import smtplib
import sqlite3
import time
from collections.abc import Iterator
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

import pytest

from relay.cli import main as cli
from relay.config import LogConfig
from relay.core.model import Outcome, Stage, Status
from relay.custody import history
from relay.custody.spool import CopyState, NewCopy, NewMessage, Spool
from relay.ops.logs import AddressTokens, load_key
from tests.relay_harness import running_relay, until
from tests.upstream_server import UpstreamServer

SENDER = "alice@example.org"
BOB, CAROL, DAVE = "bob@example.com", "carol@example.net", "dave@example.test"
HOUR = 3600.0


def headers(rcpt: str, message_id: str = "<invoice-42.1700000000@app.example.org>") -> bytes:
    lines = [
        f"Received: from app by relay.example.net for <{rcpt}>; now",
        f"From: <{SENDER}>",
        f"To: {rcpt}",
        f"Message-ID: {message_id}",
        "Subject: Invoice",
    ]
    return "".join(f"{line}\r\n" for line in lines).encode() + b"\r\n"


def store(directory: Path, *messages: NewMessage, history_days: float = 0.0) -> None:
    spool = Spool(directory, fsync=False, history_days=history_days)
    spool.open()
    try:
        for message in messages:
            asyncio.run(spool.store(message))
    finally:
        spool.close()


def sample(now: float) -> list[NewMessage]:
    """Q1 (10 minutes old): bob queued, carol deferred; Q2 (2 hours old): dave failed."""
    return [
        NewMessage(
            id="Q1",
            sender=SENDER,
            smtputf8=False,
            received=now - 600,
            expires=now + 86400,
            body=b"body\r\n",
            copies=(
                NewCopy(BOB, headers(BOB)),
                NewCopy(
                    CAROL,
                    headers(CAROL),
                    state=CopyState.DEFERRED,
                    next_try=now + HOUR,
                    attempts=1,
                    last_code=451,
                    last_enhanced="4.2.0",
                    last_text=f"<{CAROL}> mailbox busy",
                ),
            ),
            auth_user="shop",
        ),
        NewMessage(
            id="Q2",
            sender=SENDER,
            smtputf8=False,
            received=now - 2 * HOUR,
            expires=now + 86400,
            body=b"body\r\n",
            copies=(
                NewCopy(DAVE, headers(DAVE, f"<{DAVE}>"), next_try=now),  # an id naming its rcpt
                NewCopy(BOB, headers(BOB, f"<{DAVE}>"), state=CopyState.FAILED, last_code=550),
            ),
        ),
    ]


@pytest.fixture
def spool_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "spool"
    store(directory, *sample(time.time()))
    load_key(LogConfig(), directory)
    for name in ("RELAY_CONFIG", "RELAY_LOG_HASH_KEY", "RELAY_LOG_HASH_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("RELAY_SPOOL_DIR", str(directory))
    return directory


def run(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        try:
            status = cli.main(list(argv))
        except SystemExit as exc:  # argparse's usage errors
            status = int(exc.code or 0)
    return status, out.getvalue(), err.getvalue()


def listing(*argv: str) -> dict[str, Any]:
    status, out, err = run("queue", "list", "--json", *argv)
    assert status == 0, err
    result: dict[str, Any] = json.loads(out)
    return result


@pytest.fixture
def tokens(spool_dir: Path) -> AddressTokens:
    return AddressTokens(load_key(LogConfig(), spool_dir))


def test_list_json_has_every_copy_tokens_and_totals(spool_dir: Path, tokens: AddressTokens) -> None:
    """--json: one object, each copy with tokens for addresses, and the totals by state."""
    found = listing()
    copies = found["copies"]
    assert [(c["queue_id"], c["state"]) for c in copies] == [
        ("Q2", "queued"),
        ("Q2", "failed"),
        ("Q1", "queued"),
        ("Q1", "deferred"),
    ]
    carol = copies[3]
    assert carol["rcpt"] == tokens(CAROL) and carol["sender"] == tokens(SENDER)
    assert carol["last_reply"] == f"<{tokens(CAROL)}> mailbox busy"
    assert carol["auth_user"] == tokens("shop")
    assert (carol["last_code"], carol["last_enhanced"], carol["attempts"]) == (451, "4.2.0", 1)
    assert found["total"] == {
        "copies": 4,
        "messages": 2,
        "spools": 1,
        "by_state": {"queued": 2, "deferred": 1, "failed": 1},
    }
    text = json.dumps(found).replace("<invoice-42.1700000000@app.example.org>", "")
    assert "@" not in text


def test_list_filters_by_state_age_recipient_and_sender(
    spool_dir: Path, tokens: AddressTokens
) -> None:
    """--state, --older-than, --newer-than and --rcpt (token or address) narrow the listing."""

    def ids(*argv: str) -> list[tuple[str, str]]:
        return [(c["queue_id"], c["rcpt"]) for c in listing(*argv)["copies"]]

    assert ids("--state", "deferred") == [("Q1", tokens(CAROL))]
    assert len(ids("--state", "queued", "--state", "failed")) == 3
    assert {q for q, _ in ids("--older-than", "1h")} == {"Q2"}
    assert {q for q, _ in ids("--newer-than", "30m")} == {"Q1"}
    by_token = ids("--rcpt", tokens(BOB))
    assert by_token == ids("--rcpt", BOB) == [("Q2", tokens(BOB)), ("Q1", tokens(BOB))]
    assert ids("--rcpt", BOB, "--state", "failed") == [("Q2", tokens(BOB))]
    assert len(ids("--sender", SENDER)) == 4 and ids("--sender", CAROL) == []
    status, _, err = run("queue", "list", "--older-than", "soon")
    assert status == 2 and "not an age" in err


def test_the_message_id_is_shown_unless_it_names_an_address_of_its_message(
    spool_dir: Path, tokens: AddressTokens
) -> None:
    """Message-ID in clear in list, show and JSON; one shaped like its recipient is a token."""
    by_id = {c["queue_id"]: c["message_id"] for c in listing()["copies"]}
    assert by_id == {"Q1": "<invoice-42.1700000000@app.example.org>", "Q2": f"<{tokens(DAVE)}>"}
    status, out, _ = run("queue", "list")
    assert status == 0 and "<invoice-42.1700000000@app.example.org>" in out
    status, shown, _ = run("queue", "show", "Q1")
    assert status == 0
    assert "message-id <invoice-42.1700000000@app.example.org>\n" in shown
    assert "\nMessage-ID: <invoice-42.1700000000@app.example.org>\n" in shown  # the header too
    assert f"\nTo: {tokens(BOB)}\n" in shown
    status, out, _ = run("queue", "show", "Q2", "--json")
    q2 = json.loads(out)
    assert status == 0 and q2["message_id"] == f"<{tokens(DAVE)}>"
    assert [c["rcpt"] for c in q2["copies"]] == [tokens(DAVE), tokens(BOB)]
    assert f"Message-ID: <{tokens(DAVE)}>" in q2["copies"][0]["headers"]
    assert DAVE not in out and BOB not in out


def test_every_worker_spool_in_one_json_listing_and_stats_total(spool_dir: Path) -> None:
    """Copies of spool.dir and spool.dir/worker-1 in one listing; stats --json sums them."""
    now = time.time()
    worker = NewMessage(
        "W1", SENDER, False, now - 5, now + 60, b"b\r\n", (NewCopy(CAROL, headers(CAROL)),)
    )
    store(spool_dir / "worker-1", worker)
    found = listing()
    assert [c["spool"] for c in found["copies"]][-1] == "worker-1"
    assert found["total"]["spools"] == 2 and found["total"]["copies"] == 5
    status, out, err = run("queue", "stats", "--json")
    assert status == 0, err
    stats = json.loads(out)
    assert [s["spool"] for s in stats["spools"]] == [str(spool_dir), str(spool_dir / "worker-1")]
    assert stats["total"]["copies"] == {
        "queued": 3,
        "delivering": 0,
        "deferred": 1,
        "delivered": 0,
        "failed": 1,
    }


def test_token_prints_the_log_token_of_an_address(spool_dir: Path, tokens: AddressTokens) -> None:
    """solo-relay token ADDRESS: the token the logs and queue list show, under the spool's key."""
    status, out, _ = run("token", "Bob@Example.COM")
    assert status == 0 and out == f"{tokens(BOB)}\n"
    status, out, _ = run("token", BOB, "shop")
    assert out == f"{BOB} {tokens(BOB)}\nshop {tokens('shop')}\n"


def test_token_without_a_key_creates_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No key yet (the relay never started): exit 1 and nothing made; a configured key works."""
    monkeypatch.setenv("RELAY_SPOOL_DIR", str(tmp_path / "never"))
    status, _, err = run("token", BOB)
    assert status == 1 and "no token key yet" in err
    assert not (tmp_path / "never").exists()
    monkeypatch.setenv("RELAY_LOG_HASH_KEY", "k" * 32)
    status, out, _ = run("token", BOB)
    assert status == 0 and out == f"{AddressTokens(b'k' * 32)(BOB)}\n"


# -- the delivered history -------------------------------------------------------------


def test_history_keeps_final_copies_and_prunes_past_the_retention(tmp_path: Path) -> None:
    """spool.history_days: delivered copies leave a row; rows older than the retention go."""
    spool = Spool(tmp_path, fsync=False, history_days=1.0)
    spool.open()
    now = time.time()
    delivered = Outcome(Status.DELIVERED, Stage.DOT, 250, "2.0.0", "ok")

    async def go() -> None:
        ids = await spool.store(
            NewMessage("H1", SENDER, False, now, now + 60, b"b\r\n", (NewCopy(BOB, headers(BOB)),))
        )
        await spool.record_delivered(
            ids[0], now=now - 2 * history.DAY, attempts=1, outcome=delivered
        )
        ids = await spool.store(
            NewMessage(
                "H2", SENDER, False, now, now + 60, b"b\r\n", (NewCopy(CAROL, headers(CAROL)),)
            )
        )
        await spool.record_delivered(ids[0], now=now, attempts=1, outcome=delivered)

    try:
        asyncio.run(go())
    finally:
        spool.close()
    conn = sqlite3.connect(tmp_path / "spool.db")
    try:
        kept = conn.execute("SELECT message, rcpt, message_id, state FROM history").fetchall()
        messages = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    finally:
        conn.close()
    assert kept == [("H2", CAROL, "<invoice-42.1700000000@app.example.org>", "delivered")]
    assert messages == 0  # the spool itself drops the message as before


def test_no_history_without_a_retention(tmp_path: Path) -> None:
    """history_days = 0 (the default): no table, the spool as before; --delivered says so."""
    store(tmp_path / "spool", *sample(time.time()))
    conn = sqlite3.connect(tmp_path / "spool" / "spool.db")
    try:
        assert not history.present(conn)
    finally:
        conn.close()


async def test_queue_list_delivered_shows_what_the_relay_delivered(
    tmp_path: Path, plain_server: UpstreamServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end: mail through the relay with history_days set, then `queue list --delivered`."""
    env = {"RELAY_MODE": "queue", "RELAY_SPOOL_HISTORY_DAYS": "7"}
    data = f"From: <{SENDER}>\r\nTo: <{BOB}>\r\nMessage-ID: <m1@app.example.org>\r\n\r\nhi\r\n"

    def send(port: int) -> None:
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
            client.sendmail(SENDER, [BOB, CAROL], data)

    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        await asyncio.to_thread(send, relay.smtp_port)
        await until(
            lambda: len(plain_server.transactions) == 2 and relay.spool and relay.spool.live == 0,
            "both copies delivered and recorded",
        )
    monkeypatch.setenv("RELAY_SPOOL_DIR", str(tmp_path / "spool"))
    monkeypatch.setenv("RELAY_LOG_HASH_KEY", "k" * 32)  # the harness's key
    found = listing("--delivered")
    tokens = AddressTokens(b"k" * 32)  # the harness's key
    assert sorted(c["rcpt"] for c in found["copies"]) == sorted([tokens(BOB), tokens(CAROL)])
    assert {c["message_id"] for c in found["copies"]} == {"<m1@app.example.org>"}
    assert {c["state"] for c in found["copies"]} == {"delivered"}
    assert all(c["finished_iso"].endswith("Z") for c in found["copies"])
    assert listing("--delivered", "--rcpt", tokens(CAROL))["total"]["copies"] == 1
    assert listing("--delivered", "--state", "failed")["copies"] == []
    status, out, _ = run("queue", "list", "--delivered")
    assert status == 0 and "FINISHED" in out.splitlines()[0] and "<m1@app.example.org>" in out


def test_queue_list_delivered_without_history_says_how_to_keep_one(spool_dir: Path) -> None:
    status, out, _ = run("queue", "list", "--delivered")
    assert status == 0 and "spool.history_days is 0" in out


@pytest.fixture(autouse=True)
def _no_leftover_relay_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("RELAY_SPOOL_HISTORY_DAYS", raising=False)
    yield
