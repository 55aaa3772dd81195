"""Command-line parsing only: build the request, run it, print, exit."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from relay import __version__, eventloop, preview, queuectl, workers
from relay.config import Config, load
from relay.dkimsign import DkimAction
from relay.errors import ConfigError
from relay.logs import load_key, setup_logging
from relay.model import REMOVED_HEADERS, BodyCheck, IsolationOptions
from relay.server import Relay
from relay.spool import SpoolError
from relay.target import parse_upstream_url
from relay.upstream import open_upstream
from relay.workers import WorkerArgs

_SERVE_HELP = """\
Run the relay: listen for SMTP (default 127.0.0.1:2525), make one isolated
copy per recipient, and send each copy upstream (default: write .eml files to
./outbox). Metrics and health on 127.0.0.1:9925. Configuration: the TOML file
named by --config or RELAY_CONFIG, then RELAY_* environment variables (see
config/solo-relay.toml). SIGTERM or Ctrl-C stops it gracefully. With
workers = N above 1 (RELAY_WORKERS), this process supervises N worker
processes that share the listener, each with its own spool.
"""

_CHECK_HELP = """\
Validate the configuration and print what the relay would use. With
--upstream, also connect to the upstream, do TLS and AUTH, and report each
step. Exit status 0: all good; 1: an upstream step failed; 2: bad configuration.
"""

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
    p.add_argument(
        "--dkim",
        choices=[a.value for a in DkimAction],
        help="what an application DKIM signature over a changed header becomes"
        " (default: the configuration's dkim.action, strip)",
    )
    p.add_argument(
        "--config",
        metavar="PATH",
        help="take [isolation] and [dkim] (with the relay's signing key) from this file",
    )
    serve = commands.add_parser("serve", help="run the relay", description=_SERVE_HELP)
    serve.add_argument("--config", metavar="PATH", help="TOML file (default: $RELAY_CONFIG)")
    # Given by the supervisor to its workers (relay.workers), never by hand.
    serve.add_argument("--worker", help=argparse.SUPPRESS)
    serve.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--lifeline-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--status-file", help=argparse.SUPPRESS)
    check = commands.add_parser("check", help="validate the configuration", description=_CHECK_HELP)
    check.add_argument("--config", metavar="PATH", help="TOML file (default: $RELAY_CONFIG)")
    check.add_argument(
        "--upstream", action="store_true", help="also connect to the upstream: TLS, AUTH"
    )
    queuectl.add_parser(commands)
    return parser


def _load(path: str | None) -> Config | None:
    try:
        return load(path=path)
    except ConfigError as exc:
        print(f"solo-relay: configuration error: {exc}", file=sys.stderr)
        return None


def _serve(args: argparse.Namespace) -> int:
    path: str | None = args.config
    config = _load(path)
    if config is None:
        return 2
    try:
        # One key for every worker: the one kept in spool.dir itself.
        tokens = setup_logging(config.log, key=load_key(config.log, Path(config.spool.dir)))
        if args.worker:
            index, count = (int(n) for n in args.worker.split("/"))
            worker = WorkerArgs(
                index, count, args.listen_fd, args.lifeline_fd, Path(args.status_file)
            )
            # The first worker also delivers the spools of workers beyond the count.
            orphans = workers.orphaned_spools(config) if index == 0 else []
            relay = Relay(
                workers.share(config, index, count), tokens=tokens, worker=worker, orphans=orphans
            )
            eventloop.run(relay.run())
        elif config.workers > 1:
            eventloop.run(workers.Supervisor(config, path).run())
        else:
            relay = Relay(config, tokens=tokens, orphans=workers.orphaned_spools(config))
            eventloop.run(relay.run())
    except ConfigError as exc:
        print(f"solo-relay: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"solo-relay: cannot start: {exc}", file=sys.stderr)
        return 1
    except SpoolError as exc:  # in use by another relay, full disk, unreadable: one line
        print(f"solo-relay: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def _check(path: str | None, upstream: bool) -> int:
    config = _load(path)
    if config is None:
        return 2
    try:
        target = parse_upstream_url(config.upstream.url, insecure=config.upstream.insecure)
        options = config.isolation_options()
    except ConfigError as exc:
        print(f"solo-relay: configuration error: {exc}", file=sys.stderr)
        return 2
    print("configuration OK")
    print(f"  listen    {config.listen_address}  (mode {config.mode.value})")
    print(f"  upstream  {target.redacted()}")
    print(f"  metrics   {config.metrics_address}")
    signer = options.signer
    signing = f"signs as d={signer.domain} s={signer.selector}" if signer else "no relay key"
    print(f"  dkim      {config.dkim.action.value} ({signing})")
    if not upstream:
        return 0

    async def steps() -> bool:
        client = open_upstream(config.upstream)
        try:
            results = await client.check()
        finally:
            await client.aclose()
        for step in results:
            print(f"  {'ok ' if step.ok else 'FAIL'} {step.name:<8} {step.detail}")
        return all(step.ok for step in results)

    return 0 if eventloop.run(steps()) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "preview":
        options = IsolationOptions(
            removed_headers=frozenset(args.remove_header),
            body_check=BodyCheck(args.body_check),
            normalize=args.normalize,
        )
        if args.config:
            config = _load(args.config)
            if config is None:
                return 2
            try:
                options = config.isolation_options()
            except ConfigError as exc:
                print(f"solo-relay: configuration error: {exc}", file=sys.stderr)
                return 2
            options = replace(
                options,
                removed_headers=options.removed_headers | frozenset(args.remove_header),
                normalize=options.normalize or args.normalize,
            )
        if args.dkim:
            options = replace(options, dkim_action=DkimAction(args.dkim))
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
    if args.command == "serve":
        return _serve(args)
    if args.command == "check":
        return _check(args.config, args.upstream)
    if args.command == "queue":
        return queuectl.run(args)
    return 2  # pragma: no cover - argparse requires a known command
