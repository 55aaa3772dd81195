"""Mass mail as real mailers build it: the corpus of issue 12, made at test time.

Python's ``email`` package and Django build their messages here for real;
nodemailer runs in Node (``tests/node/send.js``). PHPMailer, Go's
``net/smtp`` and JavaMail cannot run on this machine, so their shapes are
rebuilt from the library source they follow, each cited where it is made.
Every builder takes the recipients of ``To`` and ``Cc`` and returns the exact
bytes the library would put after DATA (CRLF line endings, dot-unstuffed).

Addresses are ``example.com``/``.net``/``.org`` only; display names come in
several scripts, so that encoded words (RFC 2047) of many charsets appear.
"""

from __future__ import annotations

import email.policy
import email.utils
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.header import Header
from email.message import EmailMessage, Message
from email.policy import Policy

from django.conf import settings
from django.core.mail import EmailMessage as DjangoMessage

SENDER = "news@example.org"
FROM = "Example News <news@example.org>"
NAMES = (
    "Ann Lee",
    "Zoë Müller",
    "Jürgen Groß",
    "Søren Ødegård",
    "Анна Петрова",
    "李小龍",
    "Ñandú 🎉",
)
DOMAINS = ("example.com", "example.net", "example.org")


@dataclass(frozen=True, slots=True)
class Recipients:
    to: tuple[str, ...]
    cc: tuple[str, ...]

    @property
    def all(self) -> tuple[str, ...]:
        return self.to + self.cc


def recipients(count: int, where: str) -> Recipients:
    """``count`` distinct addresses, in ``To``, in ``Cc``, or split between both."""
    rcpts = tuple(f"customer{i:05d}@{DOMAINS[i % 3]}" for i in range(count))
    if where == "to":
        return Recipients(rcpts, ())
    if where == "cc":
        return Recipients((), rcpts)
    half = max(1, count // 2)
    return Recipients(rcpts[:half], rcpts[half:])


def named(address: str, i: int) -> tuple[str, str]:
    return f"{NAMES[i % len(NAMES)]} {i}", address


def crlf(text: str | bytes) -> bytes:
    """What smtplib.sendmail does to a str or bytes message: every line end CRLF."""
    data = text.encode("utf-8") if isinstance(text, str) else text
    return data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


# --- Python's email package -----------------------------------------------------------

PYTHON_POLICIES: dict[str, Policy] = {
    "compat32": email.policy.compat32,
    "compat32 unfolded": email.policy.compat32.clone(max_line_length=0),
    "SMTP": email.policy.SMTP,
    "default": email.policy.default,
    "default unfolded": email.policy.default.clone(max_line_length=None),
}


def python_email(policy_name: str, output: str, rcpts: Recipients) -> bytes:
    """A campaign built with ``email`` under ``policy_name``, flattened by ``output``.

    ``formataddr`` lists with display names, joined with ", " as applications do;
    ``as_string``/``as_bytes`` then go through ``smtplib.sendmail``'s CRLF fix.
    """
    policy = PYTHON_POLICIES[policy_name]
    legacy = policy_name.startswith("compat32")
    # Built under the policy's family, flattened under the policy itself (set_content
    # needs a line length to choose an encoding; "unfolded" only changes the output).
    msg: Message = (
        Message(policy=email.policy.compat32)
        if legacy
        else EmailMessage(
            policy=email.policy.SMTP if policy_name == "SMTP" else email.policy.default
        )
    )
    to = ", ".join(email.utils.formataddr(named(a, i)) for i, a in enumerate(rcpts.to))
    cc = ", ".join(email.utils.formataddr(named(a, i)) for i, a in enumerate(rcpts.cc))
    msg["From"] = FROM
    if isinstance(msg, EmailMessage):
        if to:
            msg["To"] = to
        if cc:
            msg["Cc"] = cc
        msg["Subject"] = "Your November update ✓"
        msg["Message-ID"] = "<campaign.1@mail.example.org>"
        msg.set_content("Hello,\n.a line that starts with a dot\nBye\n")
    else:
        # compat32: the legacy API, whose non-ASCII names need an explicit Header.
        if to:
            msg["To"] = to if to.isascii() else Header(to, "utf-8")
        if cc:
            msg["Cc"] = cc if cc.isascii() else Header(cc, "utf-8")
        msg["Subject"] = Header("Your November update ✓", "utf-8")
        msg["Message-ID"] = "<campaign.1@mail.example.org>"
        msg["MIME-Version"] = "1.0"
        msg["Content-Type"] = 'text/plain; charset="utf-8"'
        msg.set_payload("Hello,\n.a line that starts with a dot\nBye\n")
    if output == "as_bytes":
        return crlf(msg.as_bytes(policy=policy))
    return crlf(msg.as_string(policy=policy))


# --- Django ---------------------------------------------------------------------------


def django_message(rcpts: Recipients) -> bytes:
    """Django's ``EmailMessage`` with display names, as ``message().as_bytes()`` makes it."""
    configure_django()
    message = DjangoMessage(
        subject="Your November update ✓",
        body="Hello,\n.a line that starts with a dot\n",
        from_email=FROM,
        to=[email.utils.formataddr(named(a, i)) for i, a in enumerate(rcpts.to)],
        cc=[email.utils.formataddr(named(a, i)) for i, a in enumerate(rcpts.cc)],
    )
    return crlf(message.message().as_bytes(linesep="\r\n"))


def configure_django() -> None:
    """Django's mail needs settings; these are the ones a project sending mail has."""
    if not settings.configured:
        settings.configure(
            EMAIL_BACKEND="django.core.mail.backends.smtp.EmailBackend",
            DEFAULT_CHARSET="utf-8",
        )


# --- Shapes of libraries that cannot run here -----------------------------------------


def go_net_smtp(rcpts: Recipients) -> bytes:
    """Go: ``smtp.SendMail(addr, auth, from, to, msg)`` with ``msg`` built as Go's own
    example (net/smtp example_test.go) and most applications build it: ``"To: " +
    strings.Join(to, ",") + "\\r\\n"``, no folding at all, no display names."""
    lines = [f"From: {SENDER}"]
    if rcpts.to:
        lines.append("To: " + ",".join(rcpts.to))
    if rcpts.cc:
        lines.append("Cc: " + ",".join(rcpts.cc))
    lines += ["Subject: Your November update", "MIME-Version: 1.0"]
    lines += ['Content-Type: text/plain; charset="UTF-8"', "", "Hello,", "Bye", ""]
    return "\r\n".join(lines).encode()


def phpmailer(rcpts: Recipients, *, wrapped: bool) -> bytes:
    """PHPMailer 6: ``addrAppend`` joins ``addrFormat`` results with ", " on one line,
    names through ``encodeHeader`` (RFC 2047 B for non-ASCII). ``wrapped``: the long line
    hard-wrapped every 997 octets wherever it falls, inside an address too, as templates
    that pass it through ``wordwrap($h, 997, "\\r\\n ", true)`` do."""

    def fmt(i: int, address: str) -> str:
        name = named(address, i)[0]
        if name.isascii():
            return f'"{name}" <{address}>'
        return f"{Header(name, 'utf-8').encode()} <{address}>"

    lines = ["Date: Mon, 2 Nov 2026 10:00:00 +0000", f"From: {FROM}"]
    for field, addresses in (("To", rcpts.to), ("Cc", rcpts.cc)):
        if addresses:
            line = f"{field}: " + ", ".join(fmt(i, a) for i, a in enumerate(addresses))
            if wrapped:
                line = "\r\n ".join(line[i : i + 997] for i in range(0, len(line), 997))
            lines.append(line)
    lines += [
        "Subject: Your November update",
        "Message-ID: <phpmailer.1@mail.example.org>",
        "X-Mailer: PHPMailer 6.9.1 (https://github.com/PHPMailer/PHPMailer)",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=UTF-8",
        "",
        "Hello,",
        "",
    ]
    return "\r\n".join(lines).encode()


def javamail(rcpts: Recipients) -> bytes:
    """JavaMail (jakarta.mail): ``InternetAddress.toString(addresses, used)`` folds before
    an address with "\\r\\n\\t" once a line would pass 76 characters, and
    ``MimeUtility.encodeWord`` makes non-ASCII names ``=?UTF-8?Q?...?=`` words."""

    def fold(field: str, addresses: Sequence[str]) -> str:
        out = f"{field}: "
        used = len(out)
        for i, address in enumerate(addresses):
            name = named(address, i)[0]
            word = name if name.isascii() else Header(name, "utf-8").encode().replace("?b?", "?B?")
            text = f"{word} <{address}>" + ("," if i < len(addresses) - 1 else "")
            if used + len(text) + 1 > 76 and i:
                out += "\r\n\t"
                used = 8
            elif i:
                out += " "
                used += 1
            out += text
            used += len(text)
        return out

    lines = [f"From: {FROM}"]
    if rcpts.to:
        lines.append(fold("To", rcpts.to))
    if rcpts.cc:
        lines.append(fold("Cc", rcpts.cc))
    lines += [
        "Message-ID: <1234.5678.1@mail.example.org>",
        "Subject: Your November update",
        "MIME-Version: 1.0",
        "Content-Type: text/plain; charset=us-ascii",
        "Content-Transfer-Encoding: 7bit",
        "",
        "Hello,",
        "",
    ]
    return "\r\n".join(lines).encode()


BUILDERS: dict[str, Callable[[Recipients], bytes]] = {
    **{
        f"python {policy} {output}": (
            lambda r, p=policy, o=output: python_email(p, o, r)  # type: ignore[misc]
        )
        for policy in PYTHON_POLICIES
        for output in ("as_string", "as_bytes")
    },
    "django": django_message,
    "go net/smtp": go_net_smtp,
    "phpmailer": lambda r: phpmailer(r, wrapped=False),
    "phpmailer wrapped at 997": lambda r: phpmailer(r, wrapped=True),
    "javamail": javamail,
}
