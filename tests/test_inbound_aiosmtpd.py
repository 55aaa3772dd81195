"""The aiosmtpd internals relay.inbound relies on: the version they were read in, and still there.

``relay.inbound.smtp.AIOSMTPD_INTERNALS`` lists each one with why; an aiosmtpd
upgrade fails here first, and is taken by reading each listed internal again in
the new aiosmtpd/smtp.py and adding its version to ``AIOSMTPD_CHECKED``.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import importlib.metadata
import inspect
import re
import ssl
from pathlib import Path

import aiosmtpd
import aiosmtpd.smtp
from aiosmtpd.smtp import SMTP

import relay.inbound
from relay.inbound.smtp import AIOSMTPD_CHECKED, AIOSMTPD_INTERNALS, STDLIB_INTERNALS, RelaySMTP


def test_the_installed_aiosmtpd_is_a_version_checked() -> None:
    installed = importlib.metadata.version("aiosmtpd")
    assert installed in AIOSMTPD_CHECKED, (
        f"aiosmtpd {installed}: read AIOSMTPD_INTERNALS against it, then add it to AIOSMTPD_CHECKED"
    )
    assert aiosmtpd.__version__ == installed


def _assigned_in(source: str, name: str) -> bool:
    return re.search(rf"self\.{re.escape(name)}\s*(:[^=\n]*)?=[^=]", source) is not None


def test_every_listed_internal_is_still_in_aiosmtpd() -> None:
    """A method or class attribute of SMTP, or an attribute its code assigns."""
    source = inspect.getsource(aiosmtpd.smtp) + inspect.getsource(asyncio.streams)
    missing = [
        name
        for name in AIOSMTPD_INTERNALS
        if not hasattr(SMTP, name) and not _assigned_in(source, name)
    ]
    assert not missing, f"gone from aiosmtpd.smtp.SMTP: {missing}"


def test_every_override_of_aiosmtpd_is_listed() -> None:
    """What RelaySMTP or its bases in relay.inbound define over SMTP's own is in the table."""
    ours = [cls for cls in RelaySMTP.__mro__ if cls.__module__.startswith("relay.inbound")]
    assert len(ours) == 3  # RelaySMTP, AuthSession, TlsSession
    unlisted = sorted(
        f"{cls.__name__}.{name}"
        for cls in ours
        for name in vars(cls)
        if not name.startswith("__") and hasattr(SMTP, name) and name not in AIOSMTPD_INTERNALS
    )
    assert not unlisted, f"overrides of aiosmtpd internals not in AIOSMTPD_INTERNALS: {unlisted}"


def test_the_check_itself_sees_a_missing_internal() -> None:
    source = inspect.getsource(aiosmtpd.smtp)
    assert _assigned_in(source, "_timeout_handle")
    assert not hasattr(SMTP, "_timeout_handle")
    assert not _assigned_in(source, "_no_such_internal")


def test_every_listed_internal_is_used_in_relay_inbound() -> None:
    """No stale line in the table: each name appears in relay/inbound outside the table."""
    package = Path(relay.inbound.__file__).parent
    source = "\n".join(path.read_text() for path in sorted(package.glob("*.py")))
    start = source.index("AIOSMTPD_INTERNALS: dict")
    source = source[:start] + source[source.index("\n}\n", start) :]
    unused = [name for name in AIOSMTPD_INTERNALS if not re.search(rf"\b{name}\b", source)]
    assert not unused, f"listed in AIOSMTPD_INTERNALS but not used: {unused}"


def test_every_stdlib_internal_relied_on_is_in_this_python() -> None:
    """STDLIB_INTERNALS: a Python that renamed one fails here, not in a session."""
    present = {
        "asyncio.StreamReader._buffer": "self._buffer ="
        in inspect.getsource(asyncio.StreamReader.__init__),
        "asyncio.sslproto.SSLProtocol": hasattr(asyncio.sslproto, "SSLProtocol"),
        "asyncio.sslproto.SSLProtocol._app_transport": "_app_transport"
        in inspect.getsource(asyncio.sslproto.SSLProtocol.__init__),
        "ssl._ssl": hasattr(ssl, "_ssl"),
    }
    assert set(present) == set(STDLIB_INTERNALS)
    assert all(present.values()), [name for name, there in present.items() if not there]
