"""A recording, scriptable upstream SMTP server for tests, and the fixtures that make one.

aiosmtplib's ``tests/conftest.py`` is the model: aiosmtpd's ``SMTP`` protocol
served by ``loop.create_server`` in the running event loop on 127.0.0.1 port
0 (not the threaded ``Controller``), so a test and its server share one loop
and nothing sleeps.

It records every connection's raw client bytes (marked before or after TLS),
every transaction (envelope, DATA section exactly as it came over the wire
and unstuffed, TLS, AUTH user), and every AUTH. Replies can be scripted per
stage, consumed in order, then back to normal::

    server.script("RCPT", [451, 250])          # first RCPT 451, the next 250
    server.script("DOT", [DISCONNECT])         # close with no reply after the dot
    server.script("DOT", [Delay(2.0, 250)])    # a slow reply
    server.edit_ehlo(remove=["STARTTLS"])      # what EHLO offers

Stages: GREETING, STARTTLS, AUTH, MAIL, RCPT, DATA (the reply to the DATA command), DOT
(the reply after the final dot), RSET. A script entry is a code (sent as
``"<code> <class>.0.0 scripted"``), a full reply line, ``DISCONNECT`` or ``Delay``.

To use it from any test file, ``tests/conftest.py`` holds
``pytest_plugins = ["tests.upstream_server"]``. The plugin also runs ``async
def`` tests (each in a fresh loop, ``asyncio.run``), starting any
``UpstreamServer`` fixture first and stopping it after.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import ssl
import warnings
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, LoginPassword, Session

from relay.inbound.tls import self_signed
from relay.ops import eventloop

USER = "relay@example.com"
PASSWORD = "s3cret-pässword"
TOKEN = "ya29.token-one"
ASYNC_TEST_TIMEOUT = 30.0  # a hung test fails fast instead of waiting for pytest-timeout


@dataclass(frozen=True)
class Delay:
    """Wait ``seconds``, then answer ``then``."""

    seconds: float
    then: int | str = 250


DISCONNECT = "disconnect"  # close the connection with no reply
Scripted = int | str | Delay


@dataclass
class Connection:
    """One client connection: what it sent, in order, marked before or after TLS."""

    index: int
    chunks: list[tuple[bool, bytes]] = field(default_factory=list)
    wire: bytearray = field(default_factory=bytearray)
    # Whether each DATA command opened a data phase (a pipelined DATA after a refused
    # RCPT does not: what follows it are commands again).
    data_opened: list[bool] = field(default_factory=list)

    def sent(self, *, tls: bool) -> bytes:
        """Every byte the client sent in clear (``tls=False``) or inside TLS."""
        return b"".join(data for secure, data in self.chunks if secure is tls)

    def commands(self) -> list[str]:
        """The command verbs the client sent (DATA content excluded)."""
        verbs: list[str] = []
        in_data = False
        opened = iter(self.data_opened)
        for line in bytes(self.wire).split(b"\r\n"):
            if in_data:
                in_data = line != b"."
                continue
            verb = line.split(b" ", 1)[0].decode("ascii", "replace").upper()
            if verb:
                verbs.append(verb)
            in_data = verb == "DATA" and next(opened, True)
        return verbs


@dataclass
class Transaction:
    """One completed DATA: the envelope, and the data as sent and as meant."""

    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    wire: bytes  # the DATA section exactly as received, dot-stuffed, with the final ".\r\n"
    content: bytes  # dot-unstuffed, as aiosmtpd hands it to a handler
    tls: bool
    login: str | None
    connection: int


class _Handler:
    """aiosmtpd hooks; every decision is the owning ``UpstreamServer``'s."""

    def __init__(self, owner: UpstreamServer) -> None:
        self.owner = owner

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        tls = self.owner.implicit_tls or session.ssl is not None
        lines = [r[4:] for r in responses]
        if self.owner.pipelining:  # aiosmtpd reads pipelined commands; it just never says so
            lines[-1:-1] = ["PIPELINING"]
        for remove, add, when in self.owner.ehlo_edits:
            if when is None or when is tls:
                lines = [ln for ln in lines if ln.split(" ", 1)[0].upper() not in remove]
                lines[-1:-1] = list(add)
        return [("250 " if i == len(lines) - 1 else "250-") + ln for i, ln in enumerate(lines)]

    async def handle_AUTH(
        self, server: SMTP, session: Session, envelope: Envelope, args: list[str]
    ) -> Any:
        reply = self.owner.next_reply("AUTH")
        return MISSING if reply is None else await self.owner.act(server, reply)

    async def handle_MAIL(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.owner.next_reply("MAIL")
        if reply is not None:
            return await self.owner.act(server, reply)
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        reply = self.owner.next_reply("RCPT")
        if reply is not None:
            return await self.owner.act(server, reply)
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_RSET(self, server: SMTP, session: Session, envelope: Envelope) -> Any:
        reply = self.owner.next_reply("RSET")
        return MISSING if reply is None else await self.owner.act(server, reply)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(server, _RecordingSMTP)
        end = len(server.record.wire) - len(server._reader._buffer)  # type: ignore[attr-defined]
        auth = session.auth_data
        self.owner.transactions.append(
            Transaction(
                mail_from=envelope.mail_from or "",
                mail_options=list(envelope.mail_options),
                rcpt_tos=list(envelope.rcpt_tos),
                wire=bytes(server.record.wire[server.data_start : end]),
                content=envelope.original_content or b"",
                tls=server.tls_active,
                login=auth if isinstance(auth, str) else None,
                connection=server.record.index,
            )
        )
        reply = self.owner.next_reply("DOT")
        if reply is not None:
            return await self.owner.act(server, reply)
        return f"250 2.0.0 OK queued as {len(self.owner.transactions)}"

    async def auth_XOAUTH2(self, server: SMTP, args: list[str]) -> AuthResult:
        # Google's SASL XOAUTH2: base64("user=" U "\x01auth=Bearer " T "\x01\x01")
        try:
            fields = base64.b64decode(args[1]).decode().split("\x01")
            user, token = fields[0].removeprefix("user="), fields[1].removeprefix("auth=Bearer ")
        except (IndexError, ValueError):
            return AuthResult(success=False, handled=False, message="501 5.5.2 Bad XOAUTH2")
        self.owner.auths.append(("XOAUTH2", user, token))
        ok = self.owner.users.get(user) is not None and token in self.owner.tokens
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)


class _RecordingSMTP(SMTP):
    """aiosmtpd's protocol, recording raw client bytes and honouring GREETING and DATA scripts."""

    # Providers take body lines longer than RFC 5322's 998 (long HTML lines); so does this one.
    line_length_limit = 1 << 20

    def __init__(self, owner: UpstreamServer, record: Connection, **kwargs: Any) -> None:
        super().__init__(_Handler(owner), **kwargs)
        self.owner = owner
        self.record = record
        self.data_start = 0

    @property
    def tls_active(self) -> bool:
        return self.owner.implicit_tls or self._tls_protocol is not None

    def data_received(self, data: bytes) -> None:
        self.record.chunks.append((self.tls_active, bytes(data)))
        self.record.wire += data
        super().data_received(data)

    async def _handle_client(self) -> None:
        reply = self.owner.next_reply("GREETING")
        if reply is None:
            await super()._handle_client()
            return
        with contextlib.suppress(asyncio.CancelledError):
            text = await self.owner.act(self, reply)
            await self.push(text)
        if self.transport is not None:
            self.transport.close()

    async def smtp_QUIT(self, arg: str) -> None:
        reply = self.owner.next_reply("QUIT")
        if reply is not None:  # a provider slow to say goodbye (only a Delay makes sense)
            with contextlib.suppress(asyncio.CancelledError):
                await self.owner.act(self, reply)
        await super().smtp_QUIT(arg)

    async def smtp_STARTTLS(self, arg: str) -> None:
        reply = self.owner.next_reply("STARTTLS")
        if reply is not None:
            await self.push(await self.owner.act(self, reply))
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_DATA(self, arg: str) -> None:
        opened = self.envelope is not None and bool(self.envelope.rcpt_tos)
        if opened:
            reply = self.owner.next_reply("DATA")
            if reply is not None:
                self.record.data_opened.append(False)
                await self.push(await self.owner.act(self, reply))
                return
        self.record.data_opened.append(opened)
        self.data_start = len(self.record.wire) - len(self._reader._buffer)  # type: ignore[attr-defined]
        await super().smtp_DATA(arg)


class UpstreamServer:
    """A scriptable upstream on 127.0.0.1, port 0. Use ``async with`` (or the plugin) to run it."""

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext | None = None,
        implicit_tls: bool = False,
        users: dict[str, str] | None = None,
        tokens: Iterable[str] = (TOKEN,),
        auth_mechanisms: Iterable[str] = ("PLAIN", "LOGIN", "XOAUTH2"),
        auth_require_tls: bool = True,
        smtputf8: bool = True,
        pipelining: bool = True,
        auth_required: bool = False,
    ) -> None:
        self.tls_context = tls_context
        self.auth_required = auth_required  # MAIL before AUTH: 530 5.7.0, as providers answer
        self.pipelining = pipelining  # offered in EHLO, as by the large providers
        self.implicit_tls = implicit_tls
        self.users = {USER: PASSWORD} if users is None else users
        self.tokens = set(tokens)
        self.auth_mechanisms = {m.upper() for m in auth_mechanisms}
        self.auth_require_tls = auth_require_tls
        self.smtputf8 = smtputf8
        self.host = "127.0.0.1"
        self.port = 0
        self.delays_begun = 0  # scripted Delay replies under way or done: a client is waiting
        self.connections: list[Connection] = []
        self.transactions: list[Transaction] = []
        self.auths: list[tuple[str, str, str]] = []  # (mechanism, user, password or token)
        self.ehlo_edits: list[tuple[frozenset[str], tuple[str, ...], bool | None]] = []
        self._scripts: dict[str, deque[Scripted]] = {}
        self._server: asyncio.Server | None = None
        self._protocols: list[_RecordingSMTP] = []
        self._previous_handler: Any = None

    # -- scripting -------------------------------------------------------------

    def script(self, stage: str, replies: Iterable[Scripted]) -> None:
        """Queue replies for ``stage``; once used up, the stage answers normally again."""
        self._scripts.setdefault(stage.upper(), deque()).extend(replies)

    def edit_ehlo(
        self, *, remove: Iterable[str] = (), add: Iterable[str] = (), tls: bool | None = None
    ) -> None:
        """Drop keywords from (and add lines to) EHLO: always, or only in clear / inside TLS."""
        self.ehlo_edits.append((frozenset(k.upper() for k in remove), tuple(add), tls))

    def next_reply(self, stage: str) -> Scripted | None:
        queue = self._scripts.get(stage)
        return queue.popleft() if queue else None

    async def act(self, server: SMTP, reply: Scripted) -> str:
        """Carry out one scripted entry; return the reply line to send."""
        if isinstance(reply, Delay):
            self.delays_begun += 1
            await asyncio.sleep(reply.seconds)
            reply = reply.then
        if reply == DISCONNECT:
            assert server.transport is not None
            server.transport.close()
            raise asyncio.CancelledError  # aiosmtpd ends the session quietly, sending nothing
        if isinstance(reply, int):
            return f"{reply} {reply // 100}.0.0 scripted"
        assert isinstance(reply, str)
        return reply

    # -- what happened -----------------------------------------------------------

    def url(self, scheme: str = "smtp+plain", user: str | None = None) -> str:
        userinfo = f"{user.replace('@', '%40')}@" if user else ""
        return f"{scheme}://{userinfo}{self.host}:{self.port}"

    def open_connections(self) -> int:
        """Client connections still being read: bytes in flight may still become transactions."""
        return sum(
            1
            for p in self._protocols
            if p.transport is not None
            or (p._handler_coroutine is not None and not p._handler_coroutine.done())
        )

    def clear_bytes(self) -> bytes:
        """Everything any client sent outside TLS."""
        return b"".join(c.sent(tls=False) for c in self.connections)

    # -- lifecycle ---------------------------------------------------------------

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        if not isinstance(data, LoginPassword):
            return AuthResult(success=False, handled=False)
        user, password = data.login.decode(), data.password.decode()
        self.auths.append((mechanism, user, password))
        ok = self.users.get(user) == password
        return AuthResult(success=ok, handled=False, auth_data=user if ok else None)

    def _protocol(self) -> _RecordingSMTP:
        record = Connection(len(self.connections))
        self.connections.append(record)
        excluded = {"PLAIN", "LOGIN", "XOAUTH2", "CRAM-MD5"} - self.auth_mechanisms
        with warnings.catch_warnings():  # auth_required in clear: what a test provider may do
            warnings.filterwarnings("ignore", "Requiring AUTH while not requiring TLS")
            protocol = self._new_protocol(record, excluded)
        self._protocols.append(protocol)
        return protocol

    def _new_protocol(self, record: Connection, excluded: set[str]) -> _RecordingSMTP:
        return _RecordingSMTP(
            self,
            record,
            hostname="upstream.example.net",
            enable_SMTPUTF8=self.smtputf8,
            tls_context=None if self.implicit_tls else self.tls_context,
            # Implicit TLS is TLS from the first byte, which aiosmtpd cannot see.
            auth_require_tls=self.auth_require_tls and not self.implicit_tls,
            auth_exclude_mechanism=excluded,
            auth_required=self.auth_required,
            authenticator=self._authenticate,
            loop=asyncio.get_running_loop(),
        )

    async def start(self) -> UpstreamServer:
        if self._server is None:
            loop = asyncio.get_running_loop()
            ssl_context = self.tls_context if self.implicit_tls else None
            self._server = await loop.create_server(self._protocol, self.host, 0, ssl=ssl_context)
            self.port = self._server.sockets[0].getsockname()[1]
            self._previous_handler = loop.get_exception_handler()
            loop.set_exception_handler(_quiet_failed_handshakes)
        return self

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for protocol in self._protocols:
            if protocol.transport is not None:
                protocol.transport.close()
        await asyncio.sleep(0)
        await self._server.wait_closed()
        self._server = None
        asyncio.get_running_loop().set_exception_handler(self._previous_handler)

    async def __aenter__(self) -> UpstreamServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _quiet_failed_handshakes(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """A client refusing our certificate is what the TLS tests want: do not log it as an error."""
    if str(context.get("message", "")).startswith("Error on transport creation"):
        return
    loop.default_exception_handler(context)


# -- certificates ----------------------------------------------------------------


def server_context(cert: trustme.LeafCert) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    return context


def self_signed_context(host: str = "localhost") -> ssl.SSLContext:
    """A server context whose certificate signs itself (no CA vouches for it).

    The relay's own self-signed certificate (``relay.inbound.tls``): it names ``host``,
    localhost and the loopback addresses.
    """
    cert, key = self_signed(host)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    with trustme.Blob(cert + key).tempfile() as path:
        context.load_cert_chain(path)
    return context


# -- fixtures and the async test runner -----------------------------------------


@pytest.fixture
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(tls_ca: trustme.CA, tmp_path: Path) -> str:
    """The test CA as a PEM file: what ``upstream.ca_file`` points at."""
    path = tmp_path / "upstream-ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture
def server_tls(tls_ca: trustme.CA) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 and localhost, from ``tls_ca``."""
    return server_context(tls_ca.issue_cert("127.0.0.1", "localhost"))


@pytest.fixture
def upstream_server(server_tls: ssl.SSLContext) -> UpstreamServer:
    """Offers STARTTLS, AUTH PLAIN LOGIN XOAUTH2 after TLS, SMTPUTF8 and 8BITMIME."""
    return UpstreamServer(tls_context=server_tls)


@pytest.fixture
def implicit_tls_server(server_tls: ssl.SSLContext) -> UpstreamServer:
    """TLS from the first byte (``smtps://``)."""
    return UpstreamServer(tls_context=server_tls, implicit_tls=True)


@pytest.fixture
def plain_server() -> UpstreamServer:
    """No TLS at all; AUTH offered in clear (for ``smtp+plain://`` to loopback)."""
    return UpstreamServer(auth_require_tls=False)


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run ``async def`` tests in a fresh loop, with their ``UpstreamServer`` fixtures started."""
    function = pyfuncitem.obj
    if not inspect.iscoroutinefunction(function):
        return None
    names = inspect.signature(function).parameters
    kwargs = {name: pyfuncitem.funcargs[name] for name in names}

    async def main() -> None:
        async with contextlib.AsyncExitStack() as stack:
            for value in kwargs.values():
                if isinstance(value, UpstreamServer):
                    await stack.enter_async_context(value)
            await function(**kwargs)

    # The relay's own loop (uvloop when installed): the tests run what production runs.
    eventloop.run(asyncio.wait_for(main(), ASYNC_TEST_TIMEOUT))
    return True
