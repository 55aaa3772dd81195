"""aiosmtpd's handler hooks (its public API): the envelope's and the message's checks.

Rule 1 of ``relay.inbound.smtp`` is applied at MAIL (``handle_MAIL``): a client
outside the allowed networks gets ``550 5.7.1`` unless it authenticated. Rule 2:
the addresses ``RelaySMTP`` captured exactly as sent are judged here, and what
is accepted is what goes upstream, as a ``Submission``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from relay.config import AuthMode, Config
from relay.core.addresses import Address, parse_address, parse_recipient
from relay.core.errors import BadAddress, Rejected, Reply
from relay.core.headers import parse_message
from relay.core.model import Credentials
from relay.inbound.auth import Users
from relay.inbound.gate import Gate
from relay.inbound.replies import (
    AUTH_REQUIRED,
    INTERNAL,
    NOT_ALLOWED,
    NULL_SENDER,
    RECIPIENT_OK,
    SENDER_OK,
    TOO_BIG,
    TOO_MANY_RCPTS,
    log_refusal,
    peer_ip,
)
from relay.ops.logs import token
from relay.ops.metrics import ConnectionResult, MessageResult, Refusal

log = logging.getLogger("relay.inbound")

# What ``admit`` answers at MAIL (relay.server's SPOOL_FULL, QUEUE_FULL, SHUTTING_DOWN).
_CUSTODY_REFUSALS = {
    (452, "4.3.1"): Refusal.SPOOL_FULL,
    (451, "4.3.2"): Refusal.QUEUE_FULL,
    (421, "4.3.2"): Refusal.SHUTTING_DOWN,
}


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
            client_ip=peer_ip(session.peer),
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
        log_refusal(stage, reply, reason, peer_ip(session.peer), detail=detail, addresses=addresses)
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


def _auth_user(session: Session) -> str:
    """The session's AUTH user name, or "" when it did not authenticate."""
    if not session.authenticated:
        return ""
    data = session.auth_data
    if isinstance(data, Credentials):
        return data.username
    return data if isinstance(data, str) else ""


def _protocol(smtputf8: bool, tls: bool, authenticated: bool) -> str:
    """RFC 3848 and RFC 6531 3.7.3 "with" keywords."""
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "") + ("A" if authenticated else "")
