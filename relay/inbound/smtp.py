"""The SMTP listener: the session aiosmtpd runs (``RelaySMTP``) and its factory.

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

Where each rule is kept: 1 and 2 in ``relay.inbound.handler`` (aiosmtpd's
handler hooks) and ``RelaySMTP._getaddr``; 3 in ``relay.inbound.reading``; 4 in
``relay.inbound.replies`` and ``RelaySMTP.push``; 5 in ``relay.inbound.session_tls``;
6 in ``relay.inbound.session_auth``; 7 here. Who may hold a session (limits,
overload) is ``relay.inbound.gate``'s decision.

aiosmtpd's public hooks (the handler's ``handle_*`` methods, ``auth_*`` mechanisms,
the documented constructor arguments and attributes) are used where they exist;
where none does the job, ``RelaySMTP`` and its two bases override or read
aiosmtpd internals, each listed in ``AIOSMTPD_INTERNALS`` with why, checked
against the aiosmtpd versions in ``AIOSMTPD_CHECKED`` (pyproject pins
``aiosmtpd>=1.4.6,<1.5``). tests/test_inbound_aiosmtpd.py fails when the
installed aiosmtpd is not one of them, when a listed internal is gone from
``aiosmtpd.smtp.SMTP``, or when a class here overrides one not listed.

Past this package the relay sees ``Submission`` values and ``Reply`` values.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl
from collections.abc import Callable
from typing import Any, AnyStr, cast

from aiosmtpd.smtp import SMTP

from relay.config import AuthMode, Config
from relay.core.dotstream import DataCollector
from relay.core.errors import Reply
from relay.inbound.auth import FailureDelays
from relay.inbound.gate import TOO_MANY_FROM_CLIENT, Gate, overload_at
from relay.inbound.handler import Accept, InboundHandler, Submission
from relay.inbound.reading import CommandReader, DataEnd, read_data
from relay.inbound.replies import (
    DATA_TIMEOUT,
    IDLE_TIMEOUT,
    NULL_SENDER,
    TOO_BIG,
    TOO_LONG_STATUS,
    log_refusal,
    peer_ip,
    with_enhanced_code,
)
from relay.inbound.session_auth import AUTH_TOO_LONG, AuthSession
from relay.inbound.session_tls import TlsSession
from relay.ops.logs import AddressTokens, token
from relay.ops.metrics import AuthFailure, Metrics, Refusal, SessionClosed

__all__ = [
    "AIOSMTPD_CHECKED",
    "AIOSMTPD_INTERNALS",
    "STDLIB_INTERNALS",
    "RelaySMTP",
    "Submission",
    "make_protocol_factory",
    "with_enhanced_code",
]

log = logging.getLogger("relay.inbound")

# RFC 5321 4.5.3.1.4's 512 octets, plus what SIZE= (RFC 1870) and SMTPUTF8 (RFC 6531) add.
MAIL_COMMAND_LIMIT = SMTP.command_size_limit + 26 + 10
BUSY_TIMEOUT = 3600.0  # the idle timer while the relay itself works on a message
CALL_LIMITS = {  # per session; MAIL/RCPT/DATA are bounded by the message and recipient limits
    "NOOP": 100,
    "HELP": 10,
    "VRFY": 10,
    "EXPN": 10,
    "*": 1_000_000,
}

# The aiosmtpd versions the internals below were read against, in aiosmtpd/smtp.py.
AIOSMTPD_CHECKED = frozenset({"1.4.6"})
# Each internal of aiosmtpd.smtp.SMTP (or of the asyncio.StreamReaderProtocol it
# subclasses) that RelaySMTP, TlsSession or AuthSession overrides or reads, and why.
AIOSMTPD_INTERNALS: dict[str, str] = {
    # Overridden methods.
    "connection_made": "the gate admits or refuses each connection (421 at connect);"
    " aiosmtpd calls it again for the TLS transport after STARTTLS",
    "connection_lost": "the gate's slot is released once; a failed handshake calls it itself",
    "eof_received": "aiosmtpd keeps the connection half-open at EOF; a probe that connects"
    " and closes at once held its slot for good on uvloop",
    "_reset_timeout": "Rule 7: no timer once the connection is gone; the overload idle timeout",
    "_timeout_cb": "421 4.4.2 before the idle close; a handshake that times out is a TLS failure",
    "push": "Rule 4: every reply with its enhanced code; a 421 closes the channel; an AUTH"
    " command over the line limit is the AUTH exchange's failure",
    "smtp_EHLO": "the keyword list without enhanced codes; MAIL's line limit put back",
    "smtp_HELO": "the greeting line without an enhanced code",
    "smtp_STARTTLS": "Rule 5: no second TLS layer; a failed handshake is a log line and a count",
    "auth_PLAIN": "Rule 6 and RFC 4616: the authzid must be the user; the line limit; delays",
    "auth_LOGIN": "Rule 6: the line limit, the failure delays and the per-session cap",
    "_getaddr": "Rule 2: the address exactly as sent, not aiosmtpd's parsed and normalised one",
    "smtp_DATA": "Rule 3: DATA in blocks up to CRLF.CRLF; the idle timer while custody works",
    # Attributes and helpers read or replaced (aiosmtpd has no public way to them).
    "_stream_reader": "its class becomes CommandReader: command lines end only at CRLF",
    "_reader": "the session's stream: DATA blocks, AUTH answers, pipelined commands put back",
    "command_size_limits": "a class-wide dict aiosmtpd widens at every EHLO; one per session",
    "_timeout_handle": "the idle timer: shortened under overload, cancelled at eviction",
    "_tls_protocol": "the TLS layer smtp_STARTTLS sets up, as aiosmtpd's own does",
    "_original_transport": "the plain transport under TLS, aborted when a handshake fails",
    "check_helo_needed": "what aiosmtpd's smtp_DATA asks first (503 before HELO)",
    "check_auth_needed": "what aiosmtpd's smtp_DATA asks next (auth_required)",
    "_set_post_data_state": "ends the transaction after DATA, as aiosmtpd's smtp_DATA does",
    "_call_handler_hook": "runs handle_DATA, as aiosmtpd's smtp_DATA does",
}

# The standard library's private names relay.inbound relies on, read in CPython 3.11
# to 3.13; tests/test_inbound_aiosmtpd.py checks each is there in the running Python.
STDLIB_INTERNALS: dict[str, str] = {
    "asyncio.StreamReader._buffer": "reading.py: the AUTH line is looked at before it is"
    " read (no echo in logs), and bytes read past DATA's end are put back",
    "asyncio.sslproto.SSLProtocol": "session_tls.py: STARTTLS layers TLS over the"
    " session's transport as aiosmtpd does (no public API wraps a server transport)",
    "asyncio.sslproto.SSLProtocol._app_transport": "session_tls.py: the TLS transport"
    " the session writes to after STARTTLS (aiosmtpd reads the same attribute)",
    "ssl._ssl": "tls.py: SSL_CTX_set1_groups_list through the OpenSSL _ssl is linked with;"
    " checked by reading the context's options both ways, else one curve (P-256)",
}


class RelaySMTP(AuthSession, TlsSession):
    """aiosmtpd's SMTP with strict address capture, block DATA and a connection gate.

    STARTTLS is ``TlsSession``'s and AUTH ``AuthSession``'s; the aiosmtpd internals
    all three use are ``AIOSMTPD_INTERNALS``. Those two are bases, not parts, because
    that is aiosmtpd's extension point: it finds ``smtp_<VERB>`` and
    ``auth_<MECHANISM>`` methods on the session's class by name (``SMTP.__init__``),
    and they work on the session itself (its reader, ``push``, its state). Each base
    is one RFC (3207, 4954); the state they share is set in ``__init__`` here.
    """

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
            self.client = peer_ip(transport.get_extra_info("peername"))
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
        end = await read_data(
            self._reader,
            collector,
            data_timeout=self._config.smtp.data_timeout,
            idle_timeout=self._config.smtp.idle_timeout,
            on_block=self._reset_timeout,
        )
        if end is DataEnd.TIMEOUT:
            await self.push(str(DATA_TIMEOUT))
            assert self.transport is not None
            self.transport.close()
            return
        if end is DataEnd.CLOSED:
            return
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
