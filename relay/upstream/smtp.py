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
becomes an outcome in ``_failure`` only. This is the one module that imports
aiosmtplib; nothing of it leaves here.
Rule 4: no reply after the final dot (disconnect or timeout) is ``ambiguous``:
the copy may have arrived (RFC 5321 4.5.3.2.6 and 6.1).
Rule 5: the bytes sent are exactly ``copy.headers + copy.body``, dot-stuffed.
The body is shared by every copy of a message: it is never changed, and is
scanned (and stuffed, when a line starts with a dot) once per message.
Rule 6: the password never appears in a repr, an outcome or a check step.
Rule 7: with an upstream that offers PIPELINING (RFC 2920), MAIL, RCPT and
DATA go out in one write and their replies are read in order (``_Pipelined``,
which stands in for aiosmtplib's protocol on the transport for one transaction,
since that protocol drops replies it was not yet waiting for): two round trips
a copy instead of four. Connection, TLS, EHLO, AUTH, RSET and QUIT stay
aiosmtplib's.

Classification (SPEC 5): 4xx, connection errors, timeouts, any failure
before MAIL, and ``552`` at RCPT (RFC 5321 4.5.3.1.10) are transient; other
5xx are permanent. Any AUTH refusal is transient; a 5xx one (``535``) also
sets ``auth_failed`` so delivery pauses instead of bouncing mail.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import re
import ssl
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

from aiosmtplib import (
    SMTP,
    SMTPConnectError,
    SMTPException,
    SMTPResponse,
    SMTPResponseException,
    SMTPServerDisconnected,
)
from aiosmtplib.protocol import SMTPProtocol

from relay.config import HostPort, UpstreamConfig
from relay.core.errors import ConfigError
from relay.core.model import Copy, Credentials, Outcome, Stage, Status
from relay.core.policy import classify_reply, split_enhanced
from relay.files import read_secret
from relay.ops.eventloop import finish_within
from relay.upstream.outbox import CheckStep, OutboxUpstream
from relay.upstream.target import (
    Target,
    configured_credentials,
    parse_upstream_url,
    tls_context,
)

_LINE_DOT = re.compile(rb"(?m)^\.")  # RFC 5321 4.5.2: transparency
WRITE_SLICE = 256 * 1024  # body bytes handed to the transport at a time
MAX_REPLY_OCTETS = 32 * 1024  # a reply line, or what is buffered of one (aiosmtplib: 8,192)
MAX_REPLY_LINES = 100  # lines of one multi-line reply
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


class _Channel(Protocol):
    """Where a transaction's bytes go and its replies come from."""

    def write(self, data: bytes) -> None: ...
    async def drain(self) -> None: ...
    async def reply(self, timeout: float) -> SMTPResponse: ...


class _Sequential:
    """aiosmtplib's own protocol: one command, then its reply (no PIPELINING upstream)."""

    def __init__(self, protocol: SMTPProtocol) -> None:
        self._protocol = protocol

    def write(self, data: bytes) -> None:
        self._protocol.write(data)

    async def drain(self) -> None:
        await self._protocol._drain_helper()  # the stdlib FlowControlMixin's wait, copied

    async def reply(self, timeout: float) -> SMTPResponse:
        return await self._protocol.read_response(timeout=timeout)


class _Pipelined(asyncio.Protocol):
    """Replies read straight off the transport, in order, for RFC 2920 PIPELINING.

    aiosmtplib's protocol reads one reply per command it wrote and drops what
    arrives before that reply was taken, so it cannot pipeline. For one
    transaction this reader takes its place on the transport (``set_protocol``),
    and hands the transport back after the final reply. It parses what RFC 5321
    4.2 allows and nothing more: lines of three digits, "-" or " ", and text.
    """

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self.transport = transport
        self._buffer = bytearray()
        self._lines: list[bytes] = []
        self._replies: collections.deque[SMTPResponse] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None
        self._drained: asyncio.Future[None] | None = None
        self._paused = False
        self.error: BaseException | None = None  # the connection is gone, or spoke garbage

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        while (end := self._buffer.find(b"\n")) >= 0:
            line = bytes(self._buffer[: end + 1])
            del self._buffer[: end + 1]
            if not line[:3].isdigit() or line[3:4] not in (b"-", b" ", b"\r", b"\n"):
                self._fail(SMTPResponseException(-1, "malformed reply"))
                return
            self._lines.append(line)
            if line[3:4] != b"-":
                text = b"\n".join(part[4:].strip(b" \t\r\n") for part in self._lines)
                self._replies.append(SMTPResponse(int(line[:3]), text.decode("utf-8", "replace")))
                self._lines = []
        if len(self._buffer) > MAX_REPLY_OCTETS or len(self._lines) > MAX_REPLY_LINES:
            self._fail(SMTPResponseException(-1, "reply too long"))
        self._wake()

    def eof_received(self) -> bool:
        self._fail(SMTPServerDisconnected("the upstream closed the connection"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc or SMTPServerDisconnected("connection lost"))

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def write(self, data: bytes) -> None:
        if self.error is not None:
            raise self.error
        self.transport.write(data)

    async def drain(self) -> None:
        while self._paused and self.error is None:
            self._drained = asyncio.get_running_loop().create_future()
            await self._drained
        if self.error is not None:
            raise self.error

    async def reply(self, timeout: float) -> SMTPResponse:
        async with asyncio.timeout(timeout):
            while not self._replies:
                if self.error is not None:
                    raise self.error
                self._waiter = asyncio.get_running_loop().create_future()
                await self._waiter
        return self._replies.popleft()

    def _fail(self, error: BaseException) -> None:
        if self.error is None:
            self.error = error
        self._wake()
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


async def _stream(channel: _Channel, payload: bytes | memoryview) -> None:
    """Write a body in slices, each once the transport has room for it.

    One ``write`` of a 10 MB body would leave most of it copied into the
    transport's buffer, once per connection; slices of the shared body keep
    that to about one slice per connection (SPEC 8: memory flat per copy).
    """
    view = memoryview(payload)
    for start in range(0, len(view), WRITE_SLICE):
        channel.write(view[start : start + WRITE_SLICE])  # type: ignore[arg-type]  # a buffer
        await channel.drain()


@dataclass(frozen=True, slots=True)
class _Body:
    """A message body made ready to send: stuffed if needed, and what it needs upstream."""

    payload: bytes | memoryview  # the shared body itself unless a line starts with "."
    tail: bytes  # the end-of-data marker, after a CRLF when the body lacks one
    eight_bit: bool


def _prepare_body(body: memoryview) -> _Body | None:
    """``None`` when the body holds a bare CR, LF or NUL (never sent: SPEC 4).

    Byte counts and ``find`` run in C at memory speed; the equivalent regular
    expressions (lookarounds, ``^`` in multiline mode) took 28 ms per megabyte.
    """
    data = bytes(body)  # one copy per message: bytes has the fast methods memoryview lacks
    crlf = data.count(b"\r\n")
    if b"\x00" in data or data.count(b"\r") != crlf or data.count(b"\n") != crlf:
        return None
    stuffed = data.startswith(b".") or b"\n." in data
    payload: bytes | memoryview = _LINE_DOT.sub(b"..", data) if stuffed else body
    tail = b".\r\n" if not data or data.endswith(b"\r\n") else b"\r\n.\r\n"
    return _Body(payload, tail, not data.isascii())


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
        self._bodies: OrderedDict[int, tuple[memoryview, _Body | None]] = OrderedDict()
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

    def _prepare(self, body: memoryview) -> _Body | None:
        """Scan and stuff a shared body once per message (keeps the last ``pool_size`` bodies)."""
        hit = self._bodies.get(id(body))
        if hit is not None and hit[0] is body:
            self._bodies.move_to_end(id(body))
            return hit[1]
        prepared = _prepare_body(body)
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
        self, conn: _Connection, mail_from: str, copy: Copy, body: _Body, smtputf8: bool
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
        self, conn: _Connection, mail_from: str, copy: Copy, body: _Body, smtputf8: bool
    ) -> Outcome:
        smtp, timeout = conn.smtp, self._config.command_timeout
        offered = smtp.esmtp_extensions
        rcpt = copy.recipient.text
        non_ascii = not (mail_from.isascii() and rcpt.isascii() and copy.headers.isascii())
        if non_ascii and "smtputf8" not in offered:
            text = "the upstream does not offer SMTPUTF8, which this copy needs"
            return Outcome(Status.PERMANENT, Stage.MAIL, 553, "5.6.7", text)  # RFC 6531 3.7.4.1
        utf8 = (smtputf8 or non_ascii) and "smtputf8" in offered
        eight_bit = body.eight_bit or not copy.headers.isascii()
        if eight_bit and "8bitmime" not in offered and not utf8:
            text = "the upstream does not offer 8BITMIME, which this copy needs"
            return Outcome(Status.PERMANENT, Stage.MAIL, 554, "5.6.3", text)  # RFC 6152 3
        options = [f"SIZE={copy.size}".encode()] if "size" in offered else []
        options += [b"BODY=8BITMIME"] if eight_bit and "8bitmime" in offered else []
        options += [b"SMTPUTF8"] if utf8 else []
        encoding = "utf-8" if utf8 else "ascii"
        if "pipelining" in offered:  # RFC 2920: MAIL, RCPT and DATA in one write
            mail = b" ".join([b"MAIL FROM:<" + mail_from.encode(encoding) + b">", *options])
            to = b"RCPT TO:<" + rcpt.encode(encoding) + b">"
            return await self._pipelined(conn, mail + b"\r\n" + to + b"\r\nDATA\r\n", copy, body)
        with _at(Stage.MAIL):
            sender = b"FROM:<" + mail_from.encode(encoding) + b">"
            reply = await smtp.execute_command(b"MAIL", sender, *options, timeout=timeout)
        if reply.code != 250:
            return await self._refused(conn, Stage.MAIL, reply.code, reply.message)
        with _at(Stage.RCPT):
            to = b"TO:<" + rcpt.encode(encoding) + b">"
            reply = await smtp.execute_command(b"RCPT", to, timeout=timeout)
        if reply.code not in (250, 251):
            return await self._refused(conn, Stage.RCPT, reply.code, reply.message)
        with _at(Stage.DATA):
            reply = await smtp.execute_command(b"DATA", timeout=timeout)
            if reply.code != 354:
                return await self._refused(conn, Stage.DATA, reply.code, reply.message)
            protocol = smtp.protocol
            if protocol is None:
                raise ConnectionResetError("connection lost after DATA")
            channel = _Sequential(protocol)
            await self._data(channel, copy, body)
        with _at(Stage.DOT):  # RFC 5321 4.5.3.2.6: up to 10 minutes for this reply
            reply = await channel.reply(self._config.data_timeout)
        return await self._final(conn, reply)

    async def _data(self, channel: _Channel, copy: Copy, body: _Body) -> None:
        """The copy's header section and the shared body, dot-stuffed, and the final dot."""
        headers = _LINE_DOT.sub(b"..", copy.headers)
        if len(body.payload) <= WRITE_SLICE:  # one write, one system call
            channel.write(b"".join((headers, body.payload, body.tail)))
            return
        channel.write(headers)
        async with asyncio.timeout(self._config.data_timeout):
            await _stream(channel, body.payload)
        channel.write(body.tail)

    async def _final(self, conn: _Connection, reply: SMTPResponse) -> Outcome:
        if reply.code != 250:
            return await self._refused(conn, Stage.DOT, reply.code, reply.message)
        conn.transactions += 1
        enhanced, text = split_enhanced(reply.code, reply.message)
        return Outcome(Status.DELIVERED, Stage.DOT, reply.code, enhanced, text)

    async def _pipelined(
        self, conn: _Connection, commands: bytes, copy: Copy, body: _Body
    ) -> Outcome:
        """MAIL, RCPT and DATA in one write; their replies read in order (RFC 2920 3.1)."""
        smtp, timeout = conn.smtp, self._config.command_timeout
        transport, protocol = smtp.transport, smtp.protocol
        if transport is None or protocol is None or transport.is_closing():
            raise _Failed(Outcome(Status.TRANSIENT, Stage.MAIL, text="connection lost"))
        reader = _Pipelined(cast("asyncio.WriteTransport", transport))  # uvloop's: duck-typed
        transport.set_protocol(reader)
        try:
            with _at(Stage.MAIL):
                reader.write(commands)
                mail = await reader.reply(timeout)
            with _at(Stage.RCPT):
                rcpt = await reader.reply(timeout)
            with _at(Stage.DATA):
                data = await reader.reply(timeout)
            refusal = None
            if mail.code != 250:
                refusal = (Stage.MAIL, mail)
            elif rcpt.code not in (250, 251):
                refusal = (Stage.RCPT, rcpt)
            elif data.code != 354:
                refusal = (Stage.DATA, data)
            if refusal is not None and data.code == 354:
                # A server that opened DATA with nobody to deliver to: close it empty.
                with _at(Stage.DATA):
                    reader.write(b".\r\n")
                    await reader.reply(timeout)
            if refusal is None:
                with _at(Stage.DATA):
                    await self._data(reader, copy, body)
                with _at(Stage.DOT):  # RFC 5321 4.5.3.2.6: up to 10 minutes for this reply
                    final = await reader.reply(self._config.data_timeout)
        finally:
            if not transport.is_closing():
                transport.set_protocol(protocol)  # aiosmtplib's own again (RSET, QUIT, reuse)
        if reader.error is not None:  # gone after its last reply: never reused
            smtp.close()
        if refusal is not None:
            stage, reply = refusal
            return await self._refused(conn, stage, reply.code, reply.message)
        return await self._final(conn, final)

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
