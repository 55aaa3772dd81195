"""Sessions that end at the wrong moment (issue 13, section 7): real relay, real sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from pathlib import Path
from typing import Any

import pytest

from relay.core.errors import Reply
from relay.inbound.smtp import Submission
from relay.intake import Intake
from tests.relay_harness import RawClient, running_relay, until
from tests.test_inbound_hostile import envelope, letter, stuff
from tests.test_inbound_overload import settle
from tests.upstream_server import UpstreamServer

CLOSED_DURING_DATA = "connection closed during DATA: nothing was taken"


def reset(client: RawClient) -> None:
    """Close with a TCP RST (SO_LINGER 0), as a crashing client does."""
    sock = client.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.writer.transport.abort()


async def test_reset_after_final_dot_arms_no_timer_on_the_closed_session(
    plain_server: UpstreamServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reset after the final dot, while custody is taken: no timer fires on the dead session.

    Before, ``smtp_DATA``'s ``finally`` re-armed the idle timer after the session was
    torn down, and the idle timeout later failed aiosmtpd's ``transport is not None``
    assertion in a loop callback (a traceback per such session).
    """
    original = Intake.accept
    entered = asyncio.Event()

    async def slow(self: Intake, submission: Submission) -> Reply:
        entered.set()
        await asyncio.sleep(0.3)  # the spool write the client does not wait for
        return await original(self, submission)

    monkeypatch.setattr(Intake, "accept", slow)
    errors: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    env = {"RELAY_SMTP_IDLE_TIMEOUT": "0.4"}
    async with running_relay(tmp_path, plain_server.url(), env) as relay:
        client = await RawClient.connect(relay.smtp_port)
        assert (await client.command("EHLO client.example.com")).startswith("250")
        await envelope(client)
        assert (await client.command("DATA")).startswith("354")
        await client.send(stuff(letter()))
        await asyncio.wait_for(entered.wait(), 5)
        reset(client)
        # The session ends once custody (0.3 s) and then its idle timeout are past.
        await until(lambda: relay.open_sessions == 0, "the reset session's end", timeout=5)
        await settle(relay)
    assert errors == [], [str(e.get("exception") or e.get("message")) for e in errors]


@pytest.mark.parametrize("how", ["close", "reset", "half-close"])
async def test_close_during_data_is_logged_once(
    plain_server: UpstreamServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    """Each session closed mid-DATA logs "connection closed during DATA: nothing was taken"."""
    caplog.set_level(logging.INFO, logger="relay.inbound")
    async with running_relay(tmp_path, plain_server.url()) as relay:
        for _ in range(2):
            client = await RawClient.connect(relay.smtp_port)
            assert (await client.command("EHLO client.example.com")).startswith("250")
            await envelope(client)
            assert (await client.command("DATA")).startswith("354")
            await client.send(letter()[:30])
            if how == "close":
                await client.close()
            elif how == "reset":
                reset(client)
            else:
                client.writer.write_eof()
                await asyncio.wait_for(client.reader.read(), 5)
                await client.close()
        await until(lambda: relay.open_sessions == 0, "both sessions closed", timeout=5)
        await settle(relay)
    lines = [r for r in caplog.records if r.getMessage() == CLOSED_DURING_DATA]
    assert len(lines) == 2
    assert plain_server.connections == []
