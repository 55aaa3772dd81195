"""AUTH in a session (RFC 4954, 4616): aiosmtpd's PLAIN and LOGIN, with the failure policy.

Rule 6 of ``relay.inbound.smtp``: no AUTH failure is answered at once, and a
session gets a fixed number of them (delays per client in ``relay.inbound.auth``);
a user name is logged only as a keyed token.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
from typing import cast

from aiosmtpd.smtp import SMTP, AuthResult

from relay.config import Config
from relay.core.errors import Reply
from relay.inbound.gate import Gate
from relay.inbound.handler import InboundHandler
from relay.inbound.replies import peer_ip
from relay.ops.metrics import AuthFailure, SessionClosed

log = logging.getLogger("relay.inbound")

# RFC 4954 4 keeps AUTH within RFC 5321's command line; one limit for the AUTH
# command and for each response to a challenge, and one reply for both.
AUTH_LINE_LIMIT = SMTP.command_size_limit
AUTH_TOO_LONG = Reply(500, "5.5.6", "Authentication exchange line is too long")  # RFC 4954 4
AUTH_INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
AUTH_BAD_BASE64 = Reply(501, "5.5.2", "Cannot decode base64")
AUTH_BAD_PLAIN = Reply(501, "5.5.2", "Cannot split the PLAIN response")
AUTH_ABORTED = Reply(501, "5.7.0", "Authentication aborted")  # RFC 4954 4: the client sent "*"
AUTH_LIMIT = Reply(421, "4.7.0", "Too many authentication failures, closing connection")
AUTH_HANDLED = AuthResult(success=False, handled=True)  # the reply was already sent


class AuthSession(SMTP):
    """The AUTH mechanisms (``auth_PLAIN``, ``auth_LOGIN``); ``RelaySMTP`` is the session.

    The aiosmtpd internals used here are in ``relay.inbound.smtp.AIOSMTPD_INTERNALS``.
    """

    _gate: Gate
    _config: Config
    _session_over: bool  # connection_lost has run
    _auth_failures: int  # in this session (smtp.auth_failure_limit)

    async def auth_PLAIN(self, _: SMTP, args: list[str]) -> AuthResult:
        """RFC 4616: ``authzid NUL authcid NUL password``; an authzid must be the authcid."""
        blob = await (self._auth_response(b"") if len(args) == 1 else self._auth_decode(args[1]))
        if blob is None:
            return AUTH_HANDLED
        parts = blob.split(b"\x00")
        if len(parts) != 3:
            return await self._auth_failed(AuthFailure.MALFORMED, None, AUTH_BAD_PLAIN)
        authzid, login, password = parts
        if authzid and authzid != login:
            # Acting for another identity is not something this relay grants anyone.
            return await self._auth_failed(AuthFailure.AUTHZID, login, AUTH_INVALID)
        return await self._auth_check(login, password)

    async def auth_LOGIN(self, _: SMTP, args: list[str]) -> AuthResult:
        """The LOGIN mechanism: user name and password, each answering a challenge."""
        if len(args) == 1:
            login = await self._auth_response(self.AuthLoginUsernameChallenge.encode())
        else:
            login = await self._auth_decode(args[1])
        if login is None:
            return AUTH_HANDLED
        password = await self._auth_response(self.AuthLoginPasswordChallenge.encode())
        if password is None:
            return AUTH_HANDLED
        return await self._auth_check(login, password)

    async def _auth_response(self, challenge: bytes) -> bytes | None:
        """Send a 334 challenge; the decoded answer, or None once a failure was answered."""
        await self.push(b"334 " + base64.b64encode(challenge))
        try:
            line: bytes | None = await self._reader.readuntil(b"\r\n")
        except asyncio.LimitOverrunError as error:
            line = None
            await self._reader.read(error.consumed)
            while True:  # read to the end of the line, as aiosmtpd does for commands
                try:
                    await self._reader.readuntil(b"\r\n")
                    break
                except asyncio.LimitOverrunError as more:
                    await self._reader.read(more.consumed)
        if line is None or len(line) - 2 > AUTH_LINE_LIMIT:
            await self._auth_failed(AuthFailure.TOO_LONG, None, AUTH_TOO_LONG)
            return None
        answer = line.strip()
        if answer == b"*":
            await self._auth_failed(AuthFailure.ABORTED, None, AUTH_ABORTED)
            return None
        return await self._auth_decode(answer.decode("ascii", "replace"))

    async def _auth_decode(self, text: str) -> bytes | None:
        try:
            return base64.b64decode(text.encode("ascii", "replace"), validate=True)
        except (binascii.Error, ValueError):
            await self._auth_failed(AuthFailure.MALFORMED, None, AUTH_BAD_BASE64)
            return None

    async def _auth_check(self, login: bytes, password: bytes) -> AuthResult:
        handler = cast("InboundHandler", self.event_handler)
        result = await handler.check_credentials(login, password)
        if result.success:
            self._gate.auth_failures.succeeded(peer_ip(self.session.peer if self.session else None))
            return result
        return await self._auth_failed(AuthFailure.CREDENTIALS, login, AUTH_INVALID)

    async def _auth_failed(
        self, reason: AuthFailure, login: bytes | None, reply: Reply
    ) -> AuthResult:
        """One failure: a log line (user as a token), a count, the delay owed, the reply, the cap.

        Rule: no AUTH failure answers at once, and a session gets
        ``smtp.auth_failure_limit`` of them (Postfix's ``smtpd_hard_error_limit``).
        """
        self._auth_failures += 1
        client = peer_ip(self.session.peer if self.session else None)
        wait = self._gate.auth_failures.failed(client)
        user = self._gate.tokens(login.decode("utf-8", "replace")) if login else "-"
        log.warning(
            "AUTH failed",
            extra={
                "fields": {
                    "client": client,
                    "user": user,
                    "reason": reason.value,
                    "failures": self._auth_failures,
                    "delay": round(wait, 3),
                }
            },
        )
        metrics = self._gate.metrics
        if metrics is not None:
            metrics.auth_failed(reason)
        await asyncio.sleep(wait)
        if self._session_over:
            return AUTH_HANDLED
        await self.push(str(reply))
        if self._auth_failures >= self._config.smtp.auth_failure_limit:
            await self.push(str(AUTH_LIMIT))
            if metrics is not None:
                metrics.session_closed(SessionClosed.AUTH_LIMIT)
            if self.transport is not None:
                self.transport.close()
        return AUTH_HANDLED
