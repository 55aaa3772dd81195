"""One copy's attempt: its shared body, its recipient, its login, and the upstream's send."""

from __future__ import annotations

from relay.core.addresses import parse_address
from relay.core.errors import BadAddress
from relay.core.model import Copy, Credentials, Outcome, Stage, Status
from relay.custody.spool import Job
from relay.delivery.bodies import SharedBodies
from relay.upstream.smtp import Upstream


class Attempts:
    """Sends one job's copy through the upstream; every way it ends is an ``Outcome``."""

    def __init__(
        self,
        upstream: Upstream,
        bodies: SharedBodies,
        credentials: dict[str, Credentials],
        dsn_credentials: Credentials | None,
    ) -> None:
        self._upstream = upstream
        self._bodies = bodies
        # Passthrough: the application's credentials, by user, as last seen at AUTH (memory only).
        self._credentials = credentials
        # ``delivery.dsn_user``: the login for notifications, instead of their message's.
        self._dsn_credentials = dsn_credentials

    def __repr__(self) -> str:
        return f"<Attempts {self._upstream!r}>"

    async def attempt(self, job: Job) -> Outcome:
        body = await self._bodies.body(job.message_id)
        if body is None:
            return Outcome(Status.PERMANENT, Stage.WRITE, 0, "", "message body lost (quarantined)")
        try:
            rcpt = job.address or parse_address(job.rcpt, smtputf8=True, single_label=True)
        except BadAddress:
            rcpt = None
        if rcpt is None:
            return Outcome(Status.PERMANENT, Stage.RCPT, 553, "5.1.3", "stored recipient invalid")
        credentials = None
        if job.is_dsn and self._dsn_credentials is not None:
            credentials = self._dsn_credentials
        elif job.auth_user:
            credentials = self._credentials.get(job.auth_user)
            if credentials is None:
                return Outcome(
                    Status.TRANSIENT,
                    Stage.AUTH,
                    0,
                    "",
                    "waiting for the application to log in again",
                )
        copy = Copy(rcpt, job.headers, body, ())
        return await self._upstream.send(
            job.sender, copy, smtputf8=job.smtputf8, credentials=credentials
        )
