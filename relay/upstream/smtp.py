"""The upstream: hand one copy to the real provider (or the outbox) and say what happened.

Rule 1: AUTH and mail never cross the network in clear. ``smtps://`` is TLS
from the first byte; ``smtp://`` must complete STARTTLS, and when STARTTLS is
missing or fails the connection is dropped before any AUTH or MAIL (a
transient outcome at ``Stage.TLS``). ``smtp+plain://`` is for a loopback host
(or an explicit ``insecure``), and sends AUTH in clear only to a loopback host.
Rule 2: certificates are verified against the system store plus ``ca_file``,
the host name is checked, and nothing older than TLS 1.2 is spoken (RFC 8314).
Rule 3: every way a send can end is an ``Outcome``, never an exception. A
reply is classified by ``classify_reply``; an aiosmtplib or socket error
becomes an outcome in ``_failure`` only. This module and its wire
(``relay.upstream.wire``) are the ones that import aiosmtplib; nothing of it
leaves them, and they touch only its public names.
Rule 4: no reply after the final dot (disconnect or timeout) is ``ambiguous``:
the copy may have arrived (RFC 5321 4.5.3.2.6 and 6.1).
Rule 5: the bytes sent are exactly ``copy.headers + copy.body``, dot-stuffed.
The body is shared by every copy of a message: it is never changed, and is
scanned (and stuffed, when a line starts with a dot) once per message
(``transaction.prepare_body``).
Rule 6: the password never appears in a repr, an outcome or a check step.
Rule 7: a transaction has one path: what to send, and what the replies say,
is decided in ``relay.upstream.transaction`` (pure); the bytes go out and the
replies come back through ``relay.upstream.wire``'s ``Reader``, which stands in
for aiosmtplib's protocol on the transport for one transaction, since that
protocol drops replies it was not yet waiting for. With an upstream that offers
PIPELINING (RFC 2920), MAIL, RCPT and DATA go out in one write and their replies
are read in order: two round trips a copy instead of four. Connection, TLS,
EHLO, AUTH, RSET and QUIT stay aiosmtplib's.

Classification (SPEC 5): 4xx, connection errors, timeouts, any failure
before MAIL, and ``552`` at RCPT (RFC 5321 4.5.3.1.10) are transient; other
5xx are permanent. Any AUTH refusal is transient; a 5xx one (``535``) also
sets ``auth_failed`` so delivery pauses instead of bouncing mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from aiosmtplib import SMTP, SMTPConnectError, SMTPException, SMTPResponseException

from relay.config import HostPort, UpstreamConfig
from relay.core.errors import ConfigError
from relay.core.model import Copy, Credentials, Outcome, Stage, Status
from relay.core.policy import classify_reply
from relay.files import read_secret
from relay.ops.eventloop import finish_within
from relay.upstream import transaction
from relay.upstream.outbox import CheckStep, OutboxUpstream
from relay.upstream.target import (
    Target,
    configured_credentials,
    parse_upstream_url,
    tls_context,
)
from relay.upstream.transaction import Body, Commands, Reply
from relay.upstream.wire import Reader, send_data

QUIT_GRACE = 1.0  # seconds a closing pool gives the QUITs already sent (a courtesy)


class Upstream(Protocol):
    """Where copies go. Tests replace it to inject faults; ``send`` never raises for a peer."""

    async def send(
        self, mail_from: str, copy: Copy, *, smtputf8: bool, credentials: Credentials | None = None
    ) -> Outcome:
        """Deliver ``copy`` to ``copy.recipient`` from ``mail_from`` ("" is ``<>``)."""
        ...

    async def check(self) -> list[CheckStep]: ...

    async def aclose(self) -> None: ...


def open_upstream(config: UpstreamConfig, *, helo_name: str | None = None) -> Upstream:
    """The upstream ``config.url`` names. Raises ``ConfigError`` naming the bad key.

    The password comes from ``password_file``, else ``password``, else the URL.
    ``helo_name`` is the EHLO name (default: this host's FQDN).
    """
    target = parse_upstream_url(config.url, insecure=config.insecure)
    if target.scheme == "outbox":
        return OutboxUpstream(Path(target.outbox_dir))
    credentials = configured_credentials(config, target)
    tls = None if target.scheme == "smtp+plain" else tls_context(config.ca_file)
    return SmtpUpstream(target, config, credentials, tls, helo_name=helo_name)


def _tls_problem(exc: BaseException) -> str | None:
    seen: BaseException | None = exc
    for _ in range(8):  # the cause chain is short; never loop on a cycle
        if isinstance(seen, ssl.SSLCertVerificationError):
            return str(seen.verify_message or seen)
        if isinstance(seen, ssl.SSLError):
            return str(seen.reason or seen)
        if seen is None:
            return None
        seen = seen.__cause__ or seen.__context__
    return None


def _failure(exc: BaseException, stage: Stage) -> Outcome:
    """The one place where aiosmtplib and socket errors become outcomes (httpcore's
    ``map_exceptions``)."""
    if isinstance(exc, SMTPResponseException) and (exc.code >= 200 or stage is not Stage.DOT):
        return classify_reply(stage, exc.code, exc.message)  # a reply (or garbage before the dot)
    problem = _tls_problem(exc)
    if problem is not None:
        return Outcome(Status.TRANSIENT, Stage.TLS, text=f"TLS failed: {problem}")
    if isinstance(exc, TimeoutError):
        text = "timed out"
    elif isinstance(exc, SMTPConnectError):
        text = str(exc)
    elif isinstance(exc, ConnectionError):
        text = "connection lost"
    else:
        text = str(exc) or type(exc).__name__
    if stage is Stage.DOT:
        return Outcome(
            Status.TRANSIENT, stage, text=f"no reply after the final dot: {text}", ambiguous=True
        )
    return Outcome(Status.TRANSIENT, stage, text=text)


class _Failed(Exception):
    """Internal: carries an outcome out of a connection step."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(outcome.text)
        self.outcome = outcome


@contextlib.contextmanager
def _at(stage: Stage) -> Iterator[None]:
    try:
        yield
    except (SMTPException, OSError) as exc:  # OSError covers ssl.SSLError and TimeoutError
        raise _Failed(_failure(exc, stage)) from exc


# -- the SMTP pool -------------------------------------------------------------


class _Connection:
    """One pooled session, past TLS and AUTH, used by one send at a time."""

    __slots__ = ("credentials", "smtp", "transactions")

    def __init__(self, smtp: SMTP, credentials: Credentials | None) -> None:
        self.smtp = smtp
        self.credentials = credentials
        self.transactions = 0


class SmtpUpstream:
    """A pool of aiosmtplib sessions to one provider, keyed by the credentials they used.

    At most ``pool_size`` are open; each carries up to ``max_messages_per_connection``
    transactions, gets RSET after a refusal, and is dropped after a 421 or an error.
    """

    def __init__(
        self,
        target: Target,
        config: UpstreamConfig,
        credentials: Credentials | None,
        tls: ssl.SSLContext | None,
        *,
        helo_name: str | None = None,
    ) -> None:
        self.target = target
        self._config = config
        self._credentials = credentials
        self._tls = tls
        self._helo_name = helo_name
        self._slots = asyncio.Semaphore(config.pool_size)
        self._idle: list[_Connection] = []
        self._quitting: set[asyncio.Future[None]] = set()  # QUITs after a final outcome
        self._busy = 0
        self._bodies: OrderedDict[int, tuple[memoryview, Body | None]] = OrderedDict()
        self._closed = False
        self.connections_opened = 0

    def __repr__(self) -> str:
        state = f"busy={self._busy} idle={len(self._idle)} opened={self.connections_opened}"
        return f"<SmtpUpstream {self.target.redacted()} {state}>"

    async def send(
        self, mail_from: str, copy: Copy, *, smtputf8: bool, credentials: Credentials | None = None
    ) -> Outcome:
        key = credentials if credentials is not None else self._credentials
        body = self._prepare(copy.body)
        if body is None:
            text = "the copy holds a bare CR, LF or NUL; not sent"
            return Outcome(Status.PERMANENT, Stage.DATA, 554, "5.6.0", text)
        async with self._slots:
            self._busy += 1
            try:
                conn, reused = await self._checkout(key, reuse=True)
                outcome = await self._transaction(conn, mail_from, copy, body, smtputf8)
                if reused and outcome.stage is Stage.MAIL and outcome.code in (0, 421):
                    # A pooled session the server had dropped: nothing was sent, use a fresh one.
                    conn, _ = await self._checkout(key, reuse=False)
                    outcome = await self._transaction(conn, mail_from, copy, body, smtputf8)
                return outcome
            except _Failed as failed:
                return failed.outcome
            finally:
                self._busy -= 1

    async def check(self) -> list[CheckStep]:
        steps: list[CheckStep] = []
        try:
            conn = await self._connect(self._credentials, steps)
        except _Failed as failed:
            done = {step.name for step in steps}
            name = {Stage.TLS: "tls", Stage.AUTH: "auth"}.get(failed.outcome.stage)
            name = name or ("ehlo" if "connect" in done else "connect")
            o = failed.outcome
            steps.append(
                CheckStep(
                    name, False, " ".join(str(p) for p in (o.code or "", o.enhanced, o.text) if p)
                )
            )
            return steps
        await self._quit(conn)
        return steps

    async def aclose(self) -> None:
        """QUIT the idle connections; one still in use closes when its send ends."""
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._quit(conn)
        # Goodbyes under way: a moment for them, then their sockets close.
        await finish_within(set(self._quitting), QUIT_GRACE)

    def _prepare(self, body: memoryview) -> Body | None:
        """Scan and stuff a shared body once per message (keeps the last ``pool_size`` bodies)."""
        hit = self._bodies.get(id(body))
        if hit is not None and hit[0] is body:
            self._bodies.move_to_end(id(body))
            return hit[1]
        prepared = transaction.prepare_body(body)
        self._bodies[id(body)] = (body, prepared)
        while len(self._bodies) > max(2, self._config.pool_size):
            self._bodies.popitem(last=False)
        return prepared

    async def _checkout(self, key: Credentials | None, *, reuse: bool) -> tuple[_Connection, bool]:
        for index in range(len(self._idle) - 1, -1, -1) if reuse else ():
            conn = self._idle[index]
            if conn.credentials == key:
                del self._idle[index]
                if conn.smtp.is_connected:
                    return conn, True
                conn.smtp.close()
        while self._idle and self._busy + len(self._idle) > self._config.pool_size:
            self._idle.pop(0).smtp.close()  # the least recently used, to stay within pool_size
        return await self._connect(key, None), False

    async def _quit(self, conn: _Connection) -> None:
        try:
            with contextlib.suppress(SMTPException, OSError):
                await conn.smtp.quit(timeout=min(self._config.command_timeout, 10.0))
        finally:
            conn.smtp.close()

    async def _transaction(
        self, conn: _Connection, mail_from: str, copy: Copy, body: Body, smtputf8: bool
    ) -> Outcome:
        try:
            outcome = await self._exchange(conn, mail_from, copy, body, smtputf8)
        except _Failed as failed:
            conn.smtp.close()  # the session's state is unknown: never reuse it
            return failed.outcome
        except BaseException:  # cancelled (a direct-mode deadline): the same
            conn.smtp.close()
            raise
        if not conn.smtp.is_connected:
            return outcome
        if self._closed or conn.transactions >= self._config.max_messages_per_connection:
            # The outcome is known: QUIT in the background, so that a deadline or a drain
            # cut during a slow goodbye never takes an accepted copy for one in flight.
            quitting = asyncio.ensure_future(self._quit(conn))
            self._quitting.add(quitting)
            quitting.add_done_callback(self._quitting.discard)
        else:
            self._idle.append(conn)
        return outcome

    async def _exchange(
        self, conn: _Connection, mail_from: str, copy: Copy, body: Body, smtputf8: bool
    ) -> Outcome:
        smtp = conn.smtp
        commands = transaction.commands(
            smtp.esmtp_extensions, mail_from, copy, body, smtputf8=smtputf8
        )
        if isinstance(commands, Outcome):  # the upstream lacks an extension the copy needs
            return commands
        with _at(Stage.MAIL):
            reader = Reader.borrow(smtp)
        try:
            stage, reply = await self._run(reader, commands, copy, body)
        finally:
            reader.give_back()
        if reader.error is not None:  # gone after its last reply: never reused
            smtp.close()
        if stage is not Stage.DOT or reply.code != 250:
            return await self._refused(conn, stage, reply.code, reply.message)
        conn.transactions += 1
        return transaction.delivered(reply)

    async def _run(
        self, reader: Reader, commands: Commands, copy: Copy, body: Body
    ) -> tuple[Stage, Reply]:
        """MAIL, RCPT and DATA (in one write when pipelined), their replies read in order
        (RFC 2920 3.1), then the data: the refusal and its stage, or the final reply."""
        timeout = self._config.command_timeout
        replies: list[Reply] = []
        refused = None
        for stages, data in commands.writes:
            with _at(stages[0]):
                reader.write(data)
            for stage in stages:
                with _at(stage):
                    replies.append(await reader.reply(timeout))
            refused = transaction.refusal(replies)
            if refused is not None:
                break
        if refused is not None:
            if transaction.data_opened(replies):
                # A server that opened DATA with nobody to deliver to: close it empty.
                with _at(Stage.DATA):
                    reader.write(transaction.EMPTY_DATA)
                    await reader.reply(timeout)
            return refused
        with _at(Stage.DATA):
            await send_data(reader, copy.headers, body, self._config.data_timeout)
        with _at(Stage.DOT):  # RFC 5321 4.5.3.2.6: up to 10 minutes for this reply
            return Stage.DOT, await reader.reply(self._config.data_timeout)

    async def _refused(self, conn: _Connection, stage: Stage, code: int, message: str) -> Outcome:
        """Classify a refusal; RSET so the session can carry the next copy (or drop it)."""
        if code == 421 or not conn.smtp.is_connected:  # 421: the server is closing (RFC 5321 3.8)
            conn.smtp.close()
        else:
            try:
                reset = await conn.smtp.execute_command(
                    b"RSET", timeout=self._config.command_timeout
                )
                if reset.code != 250:
                    conn.smtp.close()
            except (SMTPException, OSError):
                conn.smtp.close()
        return classify_reply(stage, code, message)

    async def _connect(
        self, credentials: Credentials | None, steps: list[CheckStep] | None
    ) -> _Connection:
        """Connect, greet, TLS, EHLO, AUTH; raise ``_Failed`` at the first step that fails."""

        def note(name: str, detail: str) -> None:
            if steps is not None:
                steps.append(CheckStep(name, True, detail))

        target, config = self.target, self._config
        implicit = target.scheme == "smtps"
        smtp = SMTP(
            hostname=target.host,
            port=target.port,
            use_tls=implicit,
            start_tls=False,  # STARTTLS is done below, where a failure stops the session
            tls_context=self._tls,
            timeout=config.command_timeout,
            local_hostname=self._helo_name,
        )
        try:
            with _at(Stage.CONNECT):
                greeting = await smtp.connect(timeout=config.connect_timeout)
            self.connections_opened += 1
            note(
                "connect",
                f"{HostPort(target.host, target.port)}: {greeting.code} {greeting.message}",
            )
            if implicit:
                note("tls", _tls_detail(smtp, target.host))
            with _at(Stage.CONNECT):
                await smtp.ehlo()
            if target.scheme == "smtp":
                if not smtp.supports_extension("starttls"):
                    text = "the upstream does not offer STARTTLS; nothing was sent in clear"
                    raise _Failed(Outcome(Status.TRANSIENT, Stage.TLS, text=text))
                with _at(Stage.TLS):
                    await smtp.starttls(server_hostname=target.host, tls_context=self._tls)
                note("tls", _tls_detail(smtp, target.host))
                with _at(Stage.CONNECT):
                    await smtp.ehlo()  # RFC 3207 4.2: forget what was offered in clear
            elif not implicit:
                note("tls", "not used (smtp+plain://)")
            note("ehlo", "offers " + (" ".join(sorted(smtp.esmtp_extensions)).upper() or "nothing"))
            if credentials is None:
                note("auth", "no credentials configured")
            else:
                note("auth", await self._authenticate(smtp, credentials))
        except BaseException:
            smtp.close()
            raise
        return _Connection(smtp, credentials)

    async def _authenticate(self, smtp: SMTP, credentials: Credentials) -> str:
        tls = smtp.get_transport_info("sslcontext") is not None
        if not tls and not self.target.is_loopback:
            text = "refusing to send AUTH in clear to a host that is not loopback"
            raise _Failed(Outcome(Status.TRANSIENT, Stage.AUTH, text=text))
        if not smtp.supports_extension("auth"):
            text = "the upstream offers no AUTH" + (" after TLS" if tls else "")
            raise _Failed(Outcome(Status.TRANSIENT, Stage.AUTH, text=text))
        offered = smtp.server_auth_methods
        user = credentials.username
        if credentials is self._credentials and self._config.oauth_token_file:
            try:
                token = await asyncio.to_thread(
                    read_secret, "upstream.oauth_token_file", self._config.oauth_token_file
                )
            except ConfigError as exc:
                text = str(exc)
                raise _Failed(Outcome(Status.TRANSIENT, Stage.AUTH, text=text)) from None
            if "xoauth2" not in offered:
                text = "the upstream does not offer XOAUTH2"
                raise _Failed(Outcome(Status.TRANSIENT, Stage.AUTH, text=text))
            with _at(Stage.AUTH):
                await smtp.auth_xoauth2(user, token)  # Google's SASL XOAUTH2 string
            return f"XOAUTH2 as {user}"
        with _at(Stage.AUTH):
            if "plain" in offered:
                await smtp.auth_plain(user, credentials.password)
                return f"PLAIN as {user}"
            if "login" in offered:
                await smtp.auth_login(user, credentials.password)
                return f"LOGIN as {user}"
        text = f"no AUTH mechanism in common (offered: {' '.join(offered) or 'none'})"
        raise _Failed(Outcome(Status.TRANSIENT, Stage.AUTH, text=text))


def _tls_detail(smtp: SMTP, host: str) -> str:
    tls: Any = smtp.get_transport_info("ssl_object")
    if tls is None:  # pragma: no cover - only after a TLS handshake
        return "no TLS"
    return f"{tls.version()} {tls.cipher()[0]}, certificate verified for {host}"
