"""Real mailers' mass mail, 1 to 3,000 recipients in To, Cc or both: accepted and isolated.

The pure core takes the whole matrix (every builder of ``tests/mailer_corpus``,
1, 300 and 3,000 recipients, in To, in Cc, in both); a running relay takes
each library through its own sending path (smtplib, Django's SMTP backend,
nodemailer over SMTP) into a recording upstream, and every copy that arrives
is checked to name its own recipient only.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import smtplib
import subprocess
from pathlib import Path

import pytest
from django.core.mail import EmailMessage as DjangoMessage
from django.core.mail.backends.smtp import EmailBackend

from relay.core.isolation import isolate
from relay.core.model import Envelope, IsolationOptions
from tests import mailer_corpus as corpus
from tests.relay_harness import running_relay
from tests.upstream_server import UpstreamServer

CUSTOMER = re.compile(rb"customer\d{5}@example\.(?:com|net|org)")
NODE_MODULES = Path(__file__).resolve().parents[1] / ".ci" / "node_modules"
WHERE = ("to", "cc", "both")


def assert_isolated(rcpt: str, headers: bytes) -> None:
    """The oracle: every customer address in the copy's header section is its own."""
    section = headers.split(b"\r\n\r\n", 1)[0]
    assert {m.group().decode() for m in CUSTOMER.finditer(section)} <= {rcpt}
    assert re.search(rb"(?im)^(cc|bcc):", section) is None
    to = re.findall(rb"(?im)^to:(.*(?:\r\n[ \t].*)*)", section)
    assert len(to) == 1 and rcpt.encode() in to[0]
    assert max(len(line) for line in section.split(b"\r\n")) <= 998


# 1 and 300 recipients in every placement; 3,000 split over To and Cc (each field
# about 100 KB on one line or folded, as the builder makes it).
MATRIX = [
    *[(b, where, count) for b in corpus.BUILDERS for where in WHERE for count in (1, 300)],
    *[(b, "both", 3000) for b in corpus.BUILDERS],
]


@pytest.mark.parametrize(("builder", "where", "count"), MATRIX)
def test_every_mailer_shape_is_accepted_and_isolated(builder: str, where: str, count: int) -> None:
    """The library's bytes, split by the core: one copy per recipient, none names another."""
    rcpts = corpus.recipients(count, where)
    data = corpus.BUILDERS[builder](rcpts)
    envelope = Envelope.parse(corpus.SENDER, rcpts.all, smtputf8=not data.isascii())
    plan = isolate(envelope, data, IsolationOptions())
    assert [c.recipient.text for c in plan.copies] == list(rcpts.all)
    for copy in plan.copies:
        assert_isolated(copy.recipient.text, copy.headers)
        assert bytes(copy.body) == data[data.index(b"\r\n\r\n") + 4 :]


def delivered(server: UpstreamServer) -> dict[str, bytes]:
    copies: dict[str, bytes] = {}
    for t in server.transactions:
        assert len(t.rcpt_tos) == 1
        assert t.rcpt_tos[0] not in copies, "one copy per recipient"
        copies[t.rcpt_tos[0]] = t.content
    return copies


def check_delivery(server: UpstreamServer, rcpts: corpus.Recipients) -> None:
    copies = delivered(server)
    assert sorted(copies) == sorted(rcpts.all)
    for rcpt, content in copies.items():
        assert_isolated(rcpt, content)
        assert b"\r\n..a line that starts with a dot" not in content  # unstuffed in the copy


RELAY_ENV = {"RELAY_SMTP_MAX_RECIPIENTS": "5000"}
E2E = [
    *[(b, 300) for b in corpus.BUILDERS if not b.startswith("python") or "as_string" in b],
    ("python compat32 unfolded as_string", 3000),  # the incident: one literal To: line
    ("go net/smtp", 3000),
]


@pytest.mark.slow
@pytest.mark.parametrize(("builder", "count"), E2E)
async def test_each_mailer_through_a_running_relay(
    tmp_path: Path, plain_server: UpstreamServer, builder: str, count: int
) -> None:
    """smtplib.sendmail with the library's bytes: every copy arrives isolated upstream."""
    rcpts = corpus.recipients(count, "both")
    data = corpus.BUILDERS[builder](rcpts)

    def send(port: int) -> dict[str, tuple[int, bytes]]:
        with smtplib.SMTP("127.0.0.1", port, timeout=120) as client:
            options = ["SMTPUTF8"] if not data.isascii() else []
            return client.sendmail(
                corpus.SENDER, list(rcpts.all), data, rcpt_options=(), mail_options=options
            )

    async with running_relay(tmp_path, plain_server.url(), RELAY_ENV) as relay:
        refused = await asyncio.to_thread(send, relay.smtp_port)
    assert refused == {}
    check_delivery(plain_server, rcpts)


@pytest.mark.slow
@pytest.mark.parametrize("count", [300, 3000])
async def test_django_smtp_backend_through_a_running_relay(
    tmp_path: Path, plain_server: UpstreamServer, count: int
) -> None:
    """Django's own SMTP backend (send_messages) as the application."""
    corpus.configure_django()
    rcpts = corpus.recipients(count, "both")
    message = DjangoMessage(
        subject="Your November update ✓",
        body="Hello,\n.a line that starts with a dot\n",
        from_email=corpus.FROM,
        to=[f"{corpus.named(a, i)[0]} <{a}>" for i, a in enumerate(rcpts.to)],
        cc=list(rcpts.cc),
    )

    def send(port: int) -> int:
        backend = EmailBackend(host="127.0.0.1", port=port, use_tls=False, timeout=120)
        return backend.send_messages([message])

    async with running_relay(tmp_path, plain_server.url(), RELAY_ENV) as relay:
        sent = await asyncio.to_thread(send, relay.smtp_port)
    assert sent == 1
    check_delivery(plain_server, rcpts)


@pytest.mark.slow
@pytest.mark.skipif(
    not (NODE_MODULES / "nodemailer").is_dir() and not os.environ.get("CI"),
    reason="nodemailer is installed by .ci/run under .ci/node_modules",
)
@pytest.mark.parametrize(("count", "where"), [(1, "to"), (300, "cc"), (3000, "both")])
async def test_nodemailer_through_a_running_relay(
    tmp_path: Path, plain_server: UpstreamServer, count: int, where: str
) -> None:
    """nodemailer's SMTP transport in Node as the application."""
    node = shutil.which("node")
    assert node is not None, "node is installed by .ci/run"
    rcpts = corpus.recipients(count, where)
    script = Path(__file__).parent / "node" / "send.js"
    async with running_relay(tmp_path, plain_server.url(), RELAY_ENV) as relay:
        result = await asyncio.to_thread(
            subprocess.run,
            [node, str(script), str(relay.smtp_port), str(count), where],
            env={**os.environ, "NODE_PATH": str(NODE_MODULES)},
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert result.returncode == 0, result.stderr
    assert f'"accepted":{count}' in result.stdout
    check_delivery(plain_server, rcpts)
