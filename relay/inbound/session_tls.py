"""STARTTLS in a session: one TLS layer, and a handshake that fails quietly.

Rule 5 of ``relay.inbound.smtp``: one TLS layer per session (RFC 3207 4.2); a
handshake that fails is one log line and a count, never a traceback, and ends
the session. The server context is ``relay.inbound.tls``'s.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import logging
import math

from aiosmtpd.smtp import SMTP, syntax

from relay.config import Config
from relay.core.errors import Reply
from relay.inbound.gate import Gate
from relay.inbound.replies import peer_ip
from relay.ops.metrics import TlsFailure

log = logging.getLogger("relay.inbound")

TLS_ACTIVE = Reply(554, "5.5.1", "Error: TLS already active")  # RFC 3207 4.2; Postfix's words


class TlsSession(SMTP):
    """aiosmtpd's STARTTLS, refused once TLS is active; ``RelaySMTP`` is the session.

    The aiosmtpd internals used here are in ``relay.inbound.smtp.AIOSMTPD_INTERNALS``.
    """

    _gate: Gate
    _config: Config
    _session_over: bool  # connection_lost has run

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
                    "client": peer_ip(self.session.peer if self.session else None),
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
