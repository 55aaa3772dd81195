"""The SMTP listener: the only module that imports aiosmtpd.

Rule 1: never an open relay: a client outside the allowed networks gets
``550 5.7.1`` at MAIL unless it authenticated.
Rule 2: envelope addresses are judged on the exact text the client sent
(comments, source routes, literals and quoting tricks are refused, not
normalised away by a parser), and what is accepted is what goes upstream.
Rule 3: DATA is read in blocks, ends only at CRLF "." CRLF, and is handed on
only when complete: a client that drops or half-closes mid-DATA leaves
nothing behind.
Rule 4: every reply has an enhanced status code; an internal error is
``451 4.3.0`` with no internal text.
Rule 5: one TLS layer per session (RFC 3207 4.2); a handshake that fails is
one log line and a count, never a traceback, and ends the session.
Rule 6: no AUTH failure is answered at once, and a session gets a fixed
number of them (delays per client in ``relay.inbound.auth``); a user name is logged
only as a keyed token.
Rule 7: once a session's connection is gone, no timer is armed for it.

Who may hold a session (limits, overload) is ``relay.inbound.gate``'s decision.

Past this module the relay sees ``Submission`` values and ``Reply`` values.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import base64
import binascii
import collections
import logging
import math
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session, syntax

from relay.config import AuthMode, Config
from relay.core.addresses import Address, parse_address, parse_recipient
from relay.core.dotstream import DataCollector
from relay.core.errors import BadAddress, Rejected, Reply
from relay.core.headers import parse_message
from relay.core.model import Credentials
from relay.inbound.auth import FailureDelays, Users
from relay.inbound.gate import TOO_MANY_FROM_CLIENT, Gate, overload_at
from relay.ops.logs import AddressTokens, token
from relay.ops.metrics import (
    AuthFailure,
    ConnectionResult,
    MessageResult,
    Metrics,
    Refusal,
    SessionClosed,
    TlsFailure,
)

log = logging.getLogger("relay.inbound")

READ_BLOCK = 65536  # one socket read; lines of any length fit, in as many blocks as they need
# RFC 5321 4.5.3.1.4's 512 octets, plus what SIZE= (RFC 1870) and SMTPUTF8 (RFC 6531) add.
MAIL_COMMAND_LIMIT = SMTP.command_size_limit + 26 + 10
NULL_SENDER = "<>"
DATA_CLOSED = "connection closed during DATA: nothing was taken"
BUSY_TIMEOUT = 3600.0  # the idle timer while the relay itself works on a message
CALL_LIMITS = {  # per session; MAIL/RCPT/DATA are bounded by the message and recipient limits
    "NOOP": 100,
    "HELP": 10,
    "VRFY": 10,
    "EXPN": 10,
    "*": 1_000_000,
}

# RFC 2034 3: the greeting and 354 carry no enhanced code; RFC 3463 gives the rest.
_NO_ENHANCED = frozenset({"220", "354"})
_DEFAULT_ENHANCED = {
    "221": "2.0.0",
    "250": "2.0.0",
    "252": "2.5.0",
    "421": "4.3.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "535": "5.7.8",
    "554": "5.7.0",
    "555": "5.5.4",
}
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}(?: |$)")
# What ``admit`` answers at MAIL (relay.server's SPOOL_FULL, QUEUE_FULL, SHUTTING_DOWN).
_CUSTODY_REFUSALS = {
    (452, "4.3.1"): Refusal.SPOOL_FULL,
    (451, "4.3.2"): Refusal.QUEUE_FULL,
    (421, "4.3.2"): Refusal.SHUTTING_DOWN,
}

IDLE_TIMEOUT = Reply(421, "4.4.2", "Idle timeout, closing connection")
DATA_TIMEOUT = Reply(421, "4.4.2", "Timeout during DATA, closing connection")
TOO_BIG = Reply(552, "5.3.4", "Message size exceeds fixed limit")
TOO_MANY_RCPTS = Reply(452, "4.5.3", "Too many recipients")
NOT_ALLOWED = Reply(550, "5.7.1", "Relaying not allowed from your network")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")
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
TOO_LONG_STATUS = "500 Command line too long"  # what aiosmtpd's command loop says
TLS_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active")  # RFC 3207 4.2; Postfix's words
INTERNAL = Reply(451, "4.3.0", "Internal error, try again later")
SENDER_OK = Reply(250, "2.1.0", "Sender OK")
RECIPIENT_OK = Reply(250, "2.1.5", "Recipient OK")


@dataclass(frozen=True, slots=True)
class Submission:
    """One message as the client gave it, ready for the isolation core."""

    sender: Address | None
    recipients: tuple[Address, ...]
    smtputf8: bool
    data: bytes
    helo: str
    client_ip: str
    protocol: str  # RFC 3848 / RFC 6531 "with" keyword for the Received line
    credentials: Credentials | None
    auth_user: str = ""  # the AUTH user name ("" when the client did not authenticate)


Accept = Callable[[Submission], Awaitable[Reply]]


class CommandReader(asyncio.StreamReader):
    r"""Command lines end only at CRLF, and the end of the stream ends the session.

    aiosmtpd reads commands up to a bare LF, so ``RCPT TO:<x\nRCPT TO:<v@x>``
    would run a second command hidden in the first line; here the bare LF stays
    inside the line, which is then refused as a whole. At end of stream
    aiosmtpd's loop would answer ``IncompleteReadError`` and read again, for
    ever: a cancellation ends the session the way aiosmtpd ends it at EOF.
    """

    auth_line = False  # the line read last (or being read, when too long) is an AUTH command
    _overrun = False  # a line over the limit is being read in pieces

    async def readuntil(self, separator: Any = b"\n") -> bytes:  # typeshed's type is private
        try:
            line = await super().readuntil(b"\r\n" if separator == b"\n" else separator)
        except asyncio.IncompleteReadError as exc:
            raise asyncio.CancelledError from exc
        except asyncio.LimitOverrunError:
            if not self._overrun:
                self.auth_line = _is_auth(bytes(self._buffer[:5]))  # type: ignore[attr-defined]
            self._overrun = True
            raise
        if not self._overrun:
            self.auth_line = _is_auth(line[:5])
        self._overrun = False
        return line


def _is_auth(start: bytes) -> bool:
    return start.upper() in (b"AUTH ", b"AUTH\r")


class RelaySMTP(SMTP):
    """aiosmtpd's SMTP with strict address capture, block DATA and a connection gate."""

    def __init__(self, handler: InboundHandler, gate: Gate, config: Config, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._gate = gate
        self._config = config
        self._plain_replies = False
        self._session_over = False  # connection_lost has run: no timer may be armed again
        self._auth_failures = 0  # in this session (smtp.auth_failure_limit)
        self._last_active = 0.0  # loop time of the last command (relay.inbound.gate's idle order)
        self.client = "unknown"
        # aiosmtpd makes its own StreamReader; give it CRLF-only command lines.
        self._stream_reader.__class__ = CommandReader  # type: ignore[attr-defined]
        # aiosmtpd widens MAIL's limit at every EHLO on a class-wide dict, so
        # each session gets its own, and smtp_EHLO puts it back after each EHLO.
        self.command_size_limits = collections.defaultdict(
            lambda: SMTP.command_size_limit, {"MAIL": MAIL_COMMAND_LIMIT}
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        starting = self.transport is None
        if starting:
            self.client = _peer_ip(transport.get_extra_info("peername"))
        super().connection_made(transport)
        if not starting:
            return  # the TLS transport after STARTTLS: the same session
        refusal = self._gate.admit(self, self.loop.time())
        if refusal is not None:
            writer = cast("asyncio.WriteTransport", transport)  # uvloop's is no asyncio.Transport
            writer.write(f"{refusal}\r\n".encode())
            writer.close()
            reason = (
                Refusal.CLIENT_LIMIT
                if refusal is TOO_MANY_FROM_CLIENT
                else Refusal.CONNECTION_LIMIT
            )
            if self._gate.metrics is not None:
                self._gate.metrics.refused(reason)
            log_refusal("connect", refusal, reason, self.client)

    def connection_lost(self, error: Exception | None) -> None:
        if self._session_over:
            return  # a failed handshake ended the session already (_tls_failed)
        self._session_over = True
        self._gate.release(self)
        super().connection_lost(error)

    # -- what relay.inbound.gate asks of a session (GatedSession) --

    def idle_since(self) -> float | None:
        """The time of the last command, while no transaction (MAIL) is open; else None."""
        if self._session_over or (self.envelope is not None and self.envelope.mail_from):
            return None
        return self._last_active

    def shrink_idle_timer(self, timeout: float) -> None:
        """Overload: the idle timer runs out ``timeout`` after the last command, if idle."""
        since = self.idle_since()
        if since is None or self._timeout_handle is None:
            return
        self._timeout_handle.cancel()
        remaining = max(since + timeout - self.loop.time(), 0.0)
        self._timeout_handle = self.loop.call_later(remaining, self._timeout_cb)

    def evict(self, reply: Reply) -> None:
        """Closed to make room (overload): the reply, then the connection closes."""
        if self._handshaking:
            self._abort_handshake()  # no reply can go through a TLS layer not yet up
            return
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()
        transport = cast("asyncio.WriteTransport | None", self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(f"{reply}\r\n".encode())
            transport.close()

    def eof_received(self) -> bool | None:
        """The client closed its side: the session is over, so close ours too.

        aiosmtpd cancels the session's handler here and keeps the connection
        half-open; if that cancel lands while the greeting is being sent (a client,
        such as a TCP health probe, that connects and closes at once), nothing ever
        closes the transport, and on uvloop the session held its connection slot
        for good. Nothing more can be read, and unsent replies are still flushed.
        """
        super().eof_received()
        return False

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Arm the idle timer, unless the session is over (issue 13 section 7).

        ``smtp_DATA`` re-arms it after custody, which can end after the client
        reset the connection; a timer on that dead session would fire into
        aiosmtpd's ``transport is not None`` assertion.
        """
        if self._session_over:
            if self._timeout_handle is not None:
                self._timeout_handle.cancel()
            return
        self._last_active = self.loop.time()
        if duration is None and self._gate.overloaded and self.idle_since() is not None:
            duration = self._gate.overload_idle_timeout  # Postfix's stress-mode smtpd_timeout
        super()._reset_timeout(duration)

    def _timeout_cb(self) -> None:
        if self._handshaking:
            # Still in the handshake: the app transport cannot carry a 421.
            self._tls_failed(TimeoutError("TLS handshake timed out"))
            return
        if self._gate.metrics is not None:
            self._gate.metrics.session_closed(SessionClosed.IDLE)
        # Duck-typed: uvloop's transports are not subclasses of ``asyncio.Transport``.
        transport = cast("asyncio.WriteTransport | None", self.transport)
        if transport is not None and not transport.is_closing():
            transport.write(f"{IDLE_TIMEOUT}\r\n".encode())
        super()._timeout_cb()  # type: ignore[no-untyped-call]  # aiosmtpd leaves it untyped

    @property
    def starttls_offered(self) -> bool:
        """STARTTLS is listed (EHLO, HELP) and taken only before TLS is active (RFC 3207 4.2)."""
        return self.tls_context is not None and self._tls_protocol is None

    @syntax("STARTTLS", when="starttls_offered")
    async def smtp_STARTTLS(self, arg: str) -> None:
        """aiosmtpd's STARTTLS, refused once TLS is active, and quiet when the handshake fails.

        aiosmtpd answers a second STARTTLS with 220 and stacks another TLS layer,
        and a failed handshake reaches ``handle_exception`` as a traceback (a
        scanner sending garbage fills the log); here a failure is one log line
        and a counter, and the session ends.
        """
        if self._tls_protocol is not None:
            await self.push(str(TLS_ACTIVE))
            return
        if arg:
            await self.push("501 5.5.4 Syntax: STARTTLS")
            return
        if self.tls_context is None:
            await self.push("454 4.7.0 TLS not available")
            return
        await self.push("220 Ready to start TLS")
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        tls = asyncio.sslproto.SSLProtocol(
            loop,
            self,
            self.tls_context,
            waiter,
            server_side=True,
            ssl_handshake_timeout=math.ceil(self._config.smtp.idle_timeout),  # typeshed: int
        )
        self._tls_protocol = tls
        original = self.transport
        assert original is not None
        self._original_transport = original
        original.set_protocol(tls)
        self.transport = tls._app_transport  # aiosmtpd does the same
        tls.connection_made(original)
        try:
            await waiter
        except asyncio.CancelledError:
            raise
        except Exception as error:  # every handshake failure ends the same way
            self._tls_failed(error)
            return
        if self.session is None or self.session.ssl is None:
            # The connection was lost mid-handshake with no error: the waiter just ends.
            self._tls_failed(ConnectionResetError("connection lost during the TLS handshake"))

    def _tls_failed(self, error: BaseException) -> None:
        """One log line and one count for a failed handshake, then the session ends."""
        if self._session_over:
            return  # the idle timer ended the handshake; its waiter fails after
        reason = TlsFailure.of(error)
        detail = getattr(error, "reason", None) or type(error).__name__
        log.info(
            "TLS handshake failed",
            extra={
                "fields": {
                    "client": _peer_ip(self.session.peer if self.session else None),
                    "reason": reason.value,
                    "detail": str(detail)[:80],
                }
            },
        )
        if self._gate.metrics is not None:
            self._gate.metrics.tls_failed(reason)
        self._abort_handshake()

    @property
    def _handshaking(self) -> bool:
        return self._tls_protocol is not None and self.session is not None and not self.session.ssl

    def _abort_handshake(self) -> None:
        """Drop the connection under an unfinished TLS handshake, and end the session."""
        if self._original_transport is not None:
            self._original_transport.abort()  # type: ignore[attr-defined]
        # The TLS layer never made the session its application, so it will not say
        # the connection is lost: this session says so itself, once.
        self.connection_lost(None)

    async def smtp_EHLO(self, hostname: str) -> None:
        self._plain_replies = True  # the EHLO keyword list takes no enhanced codes
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain_replies = False
        self.command_size_limits["MAIL"] = MAIL_COMMAND_LIMIT

    async def smtp_HELO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    async def push(self, status: AnyStr) -> None:
        """Every reply carries an enhanced status code (RFC 2034), aiosmtpd's own too."""
        if status == TOO_LONG_STATUS and cast("CommandReader", self._reader).auth_line:
            # The AUTH command itself was over the limit: the AUTH exchange's reply.
            await self._auth_failed(AuthFailure.TOO_LONG, None, AUTH_TOO_LONG)
            return
        if isinstance(status, str) and not self._plain_replies:
            await super().push(with_enhanced_code(status))
        else:
            await super().push(status)
        closing = (
            status.startswith("421 ") if isinstance(status, str) else status.startswith(b"421 ")
        )
        if closing and self.transport is not None:
            self.transport.close()  # RFC 5321 3.8: a 421 closes the channel (written first)

    # -- AUTH (RFC 4954, 4616): aiosmtpd's PLAIN and LOGIN, with the failure policy --

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
            self._gate.auth_failures.succeeded(
                _peer_ip(self.session.peer if self.session else None)
            )
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
        client = _peer_ip(self.session.peer if self.session else None)
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

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """The address exactly as sent (validated later, with the right reply); "<>" for null."""
        text = arg.strip()
        if text.startswith("<"):
            close = _closing_bracket(text)
            if close < 0:
                return None, None
            address, rest = text[1:close], text[close + 1 :]
        else:
            address, _, rest = text.partition(" ")
        return (address or NULL_SENDER), rest

    async def smtp_DATA(self, arg: str) -> None:
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        collector = DataCollector(
            self._config.smtp.max_message_size,
            normalize=self._config.isolation.normalize_line_endings,
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.smtp.data_timeout
        while not collector.done:
            remaining = min(deadline - loop.time(), self._config.smtp.idle_timeout)
            try:
                # Not wait_for: it drops the cancellation aiosmtpd sends at EOF
                # when the read has just completed (Python 3.11).
                async with asyncio.timeout(max(remaining, 0)):
                    block = await self._reader.read(READ_BLOCK)
            except asyncio.CancelledError:
                # aiosmtpd cancels the session at EOF or reset, before the read returns.
                log.info(DATA_CLOSED)
                raise
            except TimeoutError:
                await self.push(str(DATA_TIMEOUT))
                assert self.transport is not None
                self.transport.close()
                return
            if not block:
                log.info(DATA_CLOSED)
                return
            self._reset_timeout()
            rest = collector.feed(block)
            if rest:
                # Pipelined commands after the end of data go back where the
                # command loop reads them (aiosmtpd itself uses this buffer).
                self._reader._buffer[0:0] = rest  # type: ignore[attr-defined]
        if collector.too_big:
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            await self.push(str(TOO_BIG))
            return
        content = collector.content()
        self.envelope.content = content
        self.envelope.original_content = content
        # Custody (and in direct mode, delivery) can outlast the idle timeout: the
        # session is busy, not idle, so the timer waits for the answer.
        self._reset_timeout(BUSY_TIMEOUT)
        try:
            status = await self._call_handler_hook("DATA")
        finally:
            # The transaction is over even when the hook failed (451 4.3.0); the
            # session is back before MAIL, so under overload its timer is the short one.
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            self._reset_timeout()
        await self.push(status)


class InboundHandler:
    """aiosmtpd hooks: validate the envelope, then hand the message to ``accept``."""

    def __init__(
        self,
        config: Config,
        gate: Gate,
        accept: Accept,
        admit: Callable[[], Reply | None],
        tokens: Callable[[str], str] = token,
    ) -> None:
        self._config = config
        self._tokens = tokens
        self._gate = gate
        self._accept = accept
        self._admit = admit
        self._auth = config.smtp.auth is not AuthMode.OFF
        self._local_domains = frozenset(d.lower() for d in config.smtp.local_domains)
        self._users = Users({})
        if config.smtp.auth is AuthMode.USERS:
            self._users = Users.load(config.smtp.users_file)  # ConfigError at start
            if self._users.plain:
                log.warning(
                    "the users file holds plain-text passwords: use bcrypt hashes",
                    extra={
                        "fields": {"file": config.smtp.users_file, "entries": self._users.plain}
                    },
                )
        self._senders = config.senders.policy()

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        extra = [
            f"250-SIZE {self._config.smtp.max_message_size}",
            "250-PIPELINING",
            "250-ENHANCEDSTATUSCODES",
        ]
        kept = [r for r in responses[1:] if self._auth or not r.startswith("250-AUTH")]
        return [responses[0], *extra, *kept]

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        if not self._gate.allows(session.peer) and not session.authenticated:
            if self._config.smtp.auth is not AuthMode.OFF:
                return self._refuse(session, "mail", AUTH_REQUIRED, Refusal.AUTH_REQUIRED, address)
            if self._gate.metrics is not None:
                self._gate.metrics.connection(ConnectionResult.REFUSED_NETWORK)
            return self._refuse(session, "mail", NOT_ALLOWED, Refusal.NETWORK, address)
        refusal = self._admit()
        if refusal is not None:
            reason = _CUSTODY_REFUSALS.get((refusal.code, refusal.enhanced), Refusal.UNAVAILABLE)
            return self._refuse(session, "mail", refusal, reason, address)
        for option in options:
            name, _, value = option.partition("=")
            if (
                name == "SIZE"
                and value.isdigit()
                and int(value) > self._config.smtp.max_message_size
            ):
                return self._refuse(session, "mail", TOO_BIG, Refusal.TOO_BIG, address)
        try:
            parse_address(
                "" if address == NULL_SENDER else address,
                smtputf8=envelope.smtp_utf8,
                allow_null=True,
                single_label=True,
            )
        except BadAddress as exc:
            return self._refuse(
                session, "mail", exc.reply, Refusal.BAD_SENDER, address, detail=exc.reason
            )
        user = _auth_user(session)
        denied = self._senders.check_sender(user, address)
        if denied is not None:  # SPEC 3: [senders] allow, by_user
            detail = f"AUTH user {user}" if user else "no AUTH"
            return self._refuse(
                session, "mail", denied, Refusal.SENDER_NOT_ALLOWED, address, detail=detail
            )
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return str(SENDER_OK)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        sender = envelope.mail_from or ""
        if options:  # aiosmtpd refuses every RCPT parameter itself, before this hook
            return "555 5.5.4 RCPT TO parameters not supported"
        try:
            parse_recipient(address, smtputf8=envelope.smtp_utf8, local_domains=self._local_domains)
        except BadAddress as exc:
            return self._refuse(
                session,
                "rcpt",
                exc.reply,
                Refusal.BAD_RECIPIENT,
                sender,
                detail=exc.reason,
                rcpt=address,
            )
        if len(envelope.rcpt_tos) >= self._config.smtp.max_recipients:
            return self._refuse(
                session, "rcpt", TOO_MANY_RCPTS, Refusal.TOO_MANY_RECIPIENTS, sender, rcpt=address
            )
        envelope.rcpt_tos.append(address)
        return str(RECIPIENT_OK)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        smtputf8 = envelope.smtp_utf8
        mail_from = envelope.mail_from or NULL_SENDER
        sender = parse_address(
            "" if mail_from == NULL_SENDER else mail_from,
            smtputf8=smtputf8,
            allow_null=True,
            single_label=True,
        )
        recipients = []
        for text in envelope.rcpt_tos:
            rcpt = parse_address(text, smtputf8=smtputf8, single_label=True)
            assert rcpt is not None
            recipients.append(rcpt)
        assert isinstance(envelope.original_content, bytes)
        user = _auth_user(session)
        denied = self._from_denied(user, envelope.original_content, smtputf8)
        if denied is not None:
            if self._gate.metrics is not None:
                self._gate.metrics.message_received(
                    MessageResult.REJECTED_POLICY, len(envelope.original_content), len(recipients)
                )
            detail = f"AUTH user {user}" if user else "no AUTH"
            return self._refuse(
                session, "data", denied, Refusal.FROM_NOT_ALLOWED, mail_from, detail=detail
            )
        submission = Submission(
            sender=sender,
            recipients=tuple(recipients),
            smtputf8=smtputf8,
            data=envelope.original_content,
            helo=session.host_name or "unknown",
            client_ip=_peer_ip(session.peer),
            protocol=_protocol(smtputf8, session.ssl is not None, bool(session.authenticated)),
            credentials=session.auth_data if isinstance(session.auth_data, Credentials) else None,
            auth_user=user,
        )
        return str(await self._accept(submission))

    def _from_denied(self, user: str, data: bytes, smtputf8: bool) -> Reply | None:
        """SPEC 3: every From: mailbox at a domain the session may use (policy on only).

        A header section the isolation core would refuse anyway is left to it (its
        reply names the defect).
        """
        if not self._senders.on:
            return None
        isolation = self._config.isolation
        try:
            message = parse_message(
                data,
                smtputf8=smtputf8,
                normalize=isolation.normalize_line_endings,
                max_header_octets=isolation.max_header_size,
            )
        except Rejected:
            return None
        mailboxes: list[str] = []
        for f in message.fields:
            if f.name == "from":
                found = [address for _, address in f.mailboxes(utf8=smtputf8)]
                if not found:  # a From: that does not parse names no allowed domain
                    return self._senders.check_from(user, [])
                mailboxes += found
        return self._senders.check_from(user, mailboxes)

    def _refuse(
        self,
        session: Session,
        stage: str,
        reply: Reply,
        reason: Refusal,
        sender: str,
        *,
        detail: str = "",
        rcpt: str | None = None,
    ) -> str:
        """Count and log one refusal (addresses as tokens); the reply to send."""
        if self._gate.metrics is not None:
            self._gate.metrics.refused(reason)
        addresses = {"sender": self._tokens(sender if sender != NULL_SENDER else "")}
        if rcpt is not None:
            addresses["rcpt"] = self._tokens(rcpt)
        log_refusal(
            stage, reply, reason, _peer_ip(session.peer), detail=detail, addresses=addresses
        )
        return str(reply)

    async def handle_exception(self, error: Exception) -> str:
        log.error("internal error in SMTP session: %s", type(error).__name__, exc_info=error)
        return str(INTERNAL)

    async def check_credentials(self, login: bytes, password: bytes) -> AuthResult:
        """PLAIN/LOGIN: configured users, or passthrough of the application's own credentials."""
        username = login.decode("utf-8", "replace")
        if self._config.smtp.auth is AuthMode.PASSTHROUGH:
            secret = password.decode("utf-8", "replace")
            return AuthResult(success=True, auth_data=Credentials(username, secret))
        if await self._users.verify(username, password):
            return AuthResult(success=True, auth_data=username)  # for [senders] by_user
        return AuthResult(success=False, handled=False)


def log_refusal(
    stage: str,
    reply: Reply,
    reason: Refusal,
    client: str,
    *,
    detail: str = "",
    addresses: dict[str, str] | None = None,
) -> None:
    """One line per refusal: where, the reply, why; addresses already tokens (issue 14.6)."""
    fields = {"stage": stage, "reply": str(reply), "reason": reason.value, "client": client}
    if detail:
        fields["detail"] = detail
    log.info("refused", extra={"fields": {**fields, **(addresses or {})}})


def with_enhanced_code(status: str) -> str:
    """Add the RFC 3463 code a bare aiosmtpd reply lacks ("503 Error: ..." -> "503 5.5.1 ...")."""
    code, sep, text = status.partition(" ")
    if not sep or not code.isdigit() or _ENHANCED.match(text) or code in _NO_ENHANCED:
        return status
    enhanced = _DEFAULT_ENHANCED.get(code, f"{code[0]}.0.0")
    return f"{code} {enhanced} {text}"


def _closing_bracket(text: str) -> int:
    """Index of the ">" that closes the path opening ``text``, outside quotes; -1 if none."""
    quoted = escaped = False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == ">" and not quoted:
            return index
    return -1


def _auth_user(session: Session) -> str:
    """The session's AUTH user name, or "" when it did not authenticate."""
    if not session.authenticated:
        return ""
    data = session.auth_data
    if isinstance(data, Credentials):
        return data.username
    return data if isinstance(data, str) else ""


def _peer_ip(peer: Any) -> str:
    return str(peer[0]) if isinstance(peer, tuple) and peer else "unknown"


def _protocol(smtputf8: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848 and RFC 6531 3.7.3 "with" keywords."""
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")


def make_protocol_factory(
    config: Config,
    accept: Accept,
    tls_context: ssl.SSLContext | None,
    metrics: Metrics | None = None,
    *,
    admit: Callable[[], Reply | None] = lambda: None,
    tokens: AddressTokens | None = None,
) -> tuple[Callable[[], RelaySMTP], Gate]:
    """The factory ``loop.create_server`` calls for each connection, and the shared gate.

    ``admit`` is asked at each MAIL whether new mail can be taken into custody
    (spool space, queue bound); a reply it returns refuses the transaction.
    """
    smtp = config.smtp
    gate = Gate(
        smtp.max_connections,
        smtp.allow_networks,
        metrics,
        # anvil's per-client limit off loopback; on loopback every client is the application.
        per_client=None if config.listen_address.is_loopback else smtp.max_connections_per_client,
        overload_at=overload_at(smtp.max_connections, smtp.overload_threshold),
        overload_idle_timeout=smtp.overload_idle_timeout,
        auth_failures=FailureDelays(smtp.auth_failure_delay, smtp.auth_failure_delay_max),
        tokens=tokens,
    )
    handler = InboundHandler(config, gate, accept, admit, token if tokens is None else tokens)
    auth_on = config.smtp.auth is not AuthMode.OFF
    loopback = config.listen_address.is_loopback

    def factory() -> RelaySMTP:
        return RelaySMTP(
            handler,
            gate,
            config,
            data_size_limit=None,  # SIZE is advertised and enforced here, with 552 5.3.4
            enable_SMTPUTF8=True,
            decode_data=False,
            hostname=config.smtp.hostname,
            ident="solo-relay ESMTP",
            tls_context=tls_context,
            timeout=config.smtp.idle_timeout,
            auth_required=False,  # Rule 1 is applied at MAIL: networks or AUTH
            auth_require_tls=not loopback,  # 538 5.7.11 for AUTH in clear off loopback
            # AUTH PLAIN and LOGIN are RelaySMTP's own (auth_PLAIN, auth_LOGIN).
            auth_exclude_mechanism=None if auth_on else ["PLAIN", "LOGIN"],
            command_call_limit=CALL_LIMITS,
        )

    return factory, gate
