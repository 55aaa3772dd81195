"""Command-line parsing only: build the request, run it, print, exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from relay import __version__, preview
from relay.model import REMOVED_HEADERS, BodyCheck, IsolationOptions

_PREVIEW_HELP = """\
Print the copies the relay would make of MESSAGE, one per unique recipient:
each copy's final header section and every header removed, rebuilt, added or
stripped, with the reason. Nothing is sent or stored. Exit status 0: the
relay would accept the message; 1: it would refuse it (the SMTP reply and the
reason are printed); 2: usage error. Line endings in the file are made CRLF
as an SMTP client would, unless --raw.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="solo-relay",
        description="SMTP relay that delivers one isolated copy per recipient.",
    )
    parser.add_argument("--version", action="version", version=f"solo-relay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "preview", help="show the copies a message would become", description=_PREVIEW_HELP
    )
    p.add_argument("message", type=Path, metavar="MESSAGE.eml", help="the message file")
    p.add_argument(
        "--rcpt",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="an envelope recipient (repeat it); default: the To, Cc and Bcc addresses",
    )
    p.add_argument(
        "--from",
        dest="sender",
        metavar="ADDRESS",
        help="the envelope sender (MAIL FROM); '' for <>; default: the From address",
    )
    p.add_argument(
        "--smtputf8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="as if the client negotiated SMTPUTF8; default: when anything is non-ASCII",
    )
    p.add_argument(
        "--body-check",
        choices=[m.value for m in BodyCheck],
        default=BodyCheck.WARN.value,
        help="other recipients' addresses in the body: ignore, warn or reject (default: warn)",
    )
    p.add_argument(
        "--normalize",
        action="store_true",
        help="turn bare LF into CRLF and stray CR into a space instead of refusing",
    )
    p.add_argument(
        "--remove-header",
        action="append",
        default=[],
        metavar="NAME",
        help="remove this field too (added to the built-in list: "
        + ", ".join(sorted(REMOVED_HEADERS))
        + ")",
    )
    p.add_argument("--raw", action="store_true", help="send the file's bytes exactly as they are")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "preview":
        options = IsolationOptions(
            removed_headers=frozenset(args.remove_header),
            body_check=BodyCheck(args.body_check),
            normalize=args.normalize,
        )
        request = preview.PreviewRequest(
            args.message, tuple(args.rcpt), args.sender, args.smtputf8, args.raw, options
        )
        try:
            status, text = preview.run(request)
        except OSError as exc:
            print(f"solo-relay preview: {exc.strerror}: {args.message}", file=sys.stderr)
            return 2
        (sys.stdout if status == 0 else sys.stderr).write(text)
        return status
    return 2  # pragma: no cover - argparse requires a known command
