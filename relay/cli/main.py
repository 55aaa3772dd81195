"""Command-line parsing only: build the request, run it, print, exit."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from relay import __version__, startup
from relay.cli import preview
from relay.cli import queue as queuectl
from relay.cli import token as tokencmd
from relay.config import Config, env_notices, load
from relay.core.dkim import DkimAction
from relay.core.errors import ConfigError, RelayError
from relay.core.model import REMOVED_HEADERS, BodyCheck, IsolationOptions
from relay.limits.store import check_store
from relay.ops import eventloop, workers
from relay.ops.logs import load_key, setup_logging
from relay.ops.workers import WorkerArgs
from relay.server import Relay
from relay.upstream.outbox import CheckStep
from relay.upstream.router import open_routes

log = logging.getLogger("relay.cli")

EXIT_RUNTIME = 1  # the relay could not start or run: a port taken, a disk failing
EXIT_CONFIG = 2  # the configuration is wrong: one line names the key

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
Validate the configuration exactly as serve does before it listens (files
named by the settings included: certificate, users, DKIM key, password, CA),
creating nothing, and print what the relay would use. With --upstream, also
connect to the upstream, do TLS and AUTH, and report each step. Exit status
0: all good; 1: an upstream step failed; 2: bad configuration (one line names
the key). Unknown RELAY_* variables are named as warnings.
"""

_PREVIEW_HELP = """\
Print the copies the relay would make of MESSAGE, one per unique recipient:
each copy's final header section and every header removed, rebuilt, added or
stripped, with the reason. Nothing is sent or stored. Exit status 0: the
relay would accept the message; 1: it would refuse it (the SMTP reply and the
reason are printed); 2: usage error. Line endings in the file are made CRLF
as an SMTP client would, unless --raw. A recipient the relay would refuse at
RCPT (553) is listed and left out, as in a real session. --summary prints
counts only, for a campaign; --out DIR also writes each copy as a .eml file.
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="solo-relay",
        description="SMTP relay that delivers one isolated copy per recipient.",
    )
    parser.add_argument("-V", "--version", action="version", version=f"solo-relay {__version__}")
    # Not required: a bare `solo-relay` prints the commands (``_commands``), no error.
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_preview_parser(commands)
    _add_serve_parser(commands)
    check = commands.add_parser("check", help="validate the configuration", description=_CHECK_HELP)
    check.add_argument("--config", metavar="PATH", help="TOML file (default: $RELAY_CONFIG)")
    check.add_argument(
        "--upstream", action="store_true", help="also connect to the upstream: TLS, AUTH"
    )
    queuectl.add_parser(commands)
    tokencmd.add_token_parser(commands)
    return parser


def _add_preview_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``solo-relay preview MESSAGE.eml``."""
    p = commands.add_parser(
        "preview", help="show the copies a message would become", description=_PREVIEW_HELP
    )
    p.add_argument("message", type=Path, metavar="MESSAGE.eml", help="the message file")
    envelope = p.add_argument_group("the envelope (default: read from the message)")
    envelope.add_argument(
        "--rcpt",
        action="append",
        default=[],
        metavar="ADDRESS",
        help="an envelope recipient (repeat it); default: the To, Cc and Bcc addresses",
    )
    envelope.add_argument(
        "--from",
        dest="sender",
        metavar="ADDRESS",
        help="the envelope sender (MAIL FROM); '' for <>; default: the From address",
    )
    envelope.add_argument(
        "--smtputf8",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="as if the client negotiated SMTPUTF8; default: when anything is non-ASCII",
    )
    shown = p.add_argument_group("what is shown")
    shown.add_argument(
        "--summary",
        action="store_true",
        help="counts only, no address: copies, recipients refused, header changes, warnings",
    )
    shown.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="also write each copy as DIR/copy-NNNN.eml (header section and body)",
    )
    _add_isolation_options(p.add_argument_group("isolation settings (default: the built-in ones)"))


def _add_isolation_options(group: argparse._ArgumentGroup) -> None:
    """The preview's [isolation] and [dkim] settings, as options or from a configuration file."""
    group.add_argument(
        "--body-check",
        choices=[m.value for m in BodyCheck],
        default=BodyCheck.WARN.value,
        help="other recipients' addresses in the body: ignore, warn or reject (default: warn)",
    )
    group.add_argument(
        "--normalize",
        action="store_true",
        help="turn bare LF into CRLF and stray CR into a space instead of refusing",
    )
    group.add_argument(
        "--remove-header",
        action="append",
        default=[],
        metavar="NAME",
        help="remove this field too (added to the built-in list: "
        + ", ".join(sorted(REMOVED_HEADERS))
        + ")",
    )
    group.add_argument(
        "--raw", action="store_true", help="send the file's bytes exactly as they are"
    )
    group.add_argument(
        "--dkim",
        choices=[a.value for a in DkimAction],
        help="what an application DKIM signature over a changed header becomes"
        " (default: the configuration's dkim.action, strip)",
    )
    group.add_argument(
        "--config",
        metavar="PATH",
        help="take [isolation] and [dkim] (with the relay's signing key) from this file",
    )


def _add_serve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``solo-relay serve``, with the supervisor's hidden options for its workers."""
    serve = commands.add_parser("serve", help="run the relay", description=_SERVE_HELP)
    serve.add_argument("--config", metavar="PATH", help="TOML file (default: $RELAY_CONFIG)")
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="where applications connect; sets RELAY_LISTEN for this run (default 127.0.0.1:2525)",
    )
    serve.add_argument(
        "--upstream",
        metavar="URL",
        help="where copies go (smtps://user@host:465, smtp://user@host:587, outbox:DIR);"
        " sets RELAY_UPSTREAM for this run (no password here: ps shows it; use"
        " RELAY_UPSTREAM_PASSWORD_FILE)",
    )
    # Given by the supervisor to its workers (relay.ops.workers), never by hand.
    serve.add_argument("--worker", help=argparse.SUPPRESS)
    serve.add_argument("--listen-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--lifeline-fd", type=int, help=argparse.SUPPRESS)
    serve.add_argument("--status-file", help=argparse.SUPPRESS)


def _config_error(exc: ConfigError) -> int:
    print(f"solo-relay: configuration error: {exc}", file=sys.stderr)
    return EXIT_CONFIG


def _load(path: str | None) -> Config | None:
    try:
        return load(path=path)
    except ConfigError as exc:
        _config_error(exc)
        return None


def _log_env_notices(environ: Mapping[str, str]) -> None:
    """Unknown RELAY_* variables, once logging is set up (``load`` ignored them)."""
    for notice in env_notices(environ):
        level = logging.DEBUG if notice.service_link else logging.WARNING
        log.log(level, str(notice), extra={"fields": {"variable": notice.name}})


def _serve(args: argparse.Namespace) -> int:
    path: str | None = args.config
    # The flags stand for their variables, for this process and the workers it starts.
    for flag, name in ((args.listen, "RELAY_LISTEN"), (args.upstream, "RELAY_UPSTREAM")):
        if flag is not None:
            os.environ[name] = flag
    config = _load(path)
    if config is None:
        return EXIT_CONFIG
    running: Relay | workers.Supervisor | None = None
    try:
        startup.prepare(config)  # what `check` runs: one line and exit 2 on any failure
        # One key for every worker: the one kept in spool.dir itself.
        tokens = setup_logging(config.log, key=load_key(config.log, Path(config.spool.dir)))
        if not args.worker:  # the supervisor has said it already
            _log_env_notices(os.environ)
        if args.worker:
            index, count = (int(n) for n in args.worker.split("/"))
            worker = WorkerArgs(
                index, count, args.listen_fd, args.lifeline_fd, Path(args.status_file)
            )
            # The first worker also delivers the spools of workers beyond the count.
            orphans = workers.orphaned_spools(config) if index == 0 else []
            running = Relay(
                workers.share(config, index, count), tokens=tokens, worker=worker, orphans=orphans
            )
            eventloop.run(running.run())
        elif config.workers > 1:
            running = workers.Supervisor(config, path)
            eventloop.run(running.run())
        else:
            running = Relay(config, tokens=tokens, orphans=workers.orphaned_spools(config))
            eventloop.run(running.run())
    except ConfigError as exc:
        return _config_error(exc)
    except Exception as exc:
        started = running is not None and running.smtp_port != 0
        return _runtime_error("failed" if started else "cannot start", exc)
    return 0


def _runtime_error(what: str, exc: BaseException) -> int:
    """One line for a failure that is not the configuration's (exit 1), no traceback.

    The traceback goes to the log at debug level (``RELAY_LOG_LEVEL=debug``).
    """
    log.debug("start-up failure", exc_info=exc)
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        text = f"{exc.strerror}{where}"
    elif isinstance(exc, RelayError):
        text = str(exc)
    else:
        text = f"{type(exc).__name__}: {exc}"
    print(f"solo-relay: {what}: {text}", file=sys.stderr)
    return EXIT_RUNTIME


def _check(path: str | None, upstream: bool) -> int:
    config = _load(path)
    if config is None:
        return EXIT_CONFIG
    for notice in env_notices(os.environ):
        if not notice.service_link:
            print(f"solo-relay: warning: {notice}", file=sys.stderr)
    try:
        prepared = startup.prepare(config)  # exactly what `serve` checks before it listens
    except ConfigError as exc:
        return _config_error(exc)
    print("configuration OK")
    print(f"  listen    {config.listen_address}  (mode {config.mode.value})")
    for name, target in prepared.targets:
        label = f"upstream {name}" if config.upstreams else "upstream"
        print(f"  {label:<9} {target.redacted()}")
    if config.fleet.store:
        print(f"  fleet     {config.fleet.name} (shared limits on the store)")
    print(f"  metrics   {config.metrics_address}")
    signer = prepared.options.signer
    signing = f"signs as d={signer.domain} s={signer.selector}" if signer else "no relay key"
    print(f"  dkim      {config.dkim.action.value} ({signing})")
    if not upstream:
        return 0

    async def steps() -> bool:
        client = open_routes(config)
        try:
            results = await client.check()
        finally:
            await client.aclose()
        if config.fleet.store:
            ok, detail = await check_store(config.fleet)
            results.append(CheckStep("store", ok, detail))
        for step in results:
            print(f"  {'ok ' if step.ok else 'FAIL'} {step.name:<8} {step.detail}")
        return all(step.ok for step in results)

    try:
        return 0 if eventloop.run(steps()) else EXIT_RUNTIME
    except ConfigError as exc:
        return _config_error(exc)
    except Exception as exc:
        return _runtime_error("upstream check failed", exc)


def _preview(args: argparse.Namespace) -> int:
    options = IsolationOptions(
        removed_headers=frozenset(args.remove_header),
        body_check=BodyCheck(args.body_check),
        normalize=args.normalize,
    )
    local_domains: frozenset[str] = frozenset()
    if args.config:
        config = _load(args.config)
        if config is None:
            return EXIT_CONFIG
        local_domains = frozenset(d.lower() for d in config.smtp.local_domains)
        try:
            options = config.isolation_options()
        except ConfigError as exc:
            return _config_error(exc)
        options = replace(
            options,
            removed_headers=options.removed_headers | frozenset(args.remove_header),
            normalize=options.normalize or args.normalize,
        )
    if args.dkim:
        options = replace(options, dkim_action=DkimAction(args.dkim))
    if (options.dkim_action is DkimAction.RESIGN or options.sign_all) and options.signer is None:
        # Without the key, resign would only strip: the preview would show copies unsigned.
        print(
            "solo-relay preview: --dkim resign needs the relay's signing key: pass --config"
            " with [dkim] domain, selector and key_file",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    request = preview.PreviewRequest(
        args.message,
        tuple(args.rcpt),
        args.sender,
        args.smtputf8,
        args.raw,
        options,
        summary=args.summary,
        out_dir=args.out,
        local_domains=local_domains,
    )
    try:
        status, text = preview.run(request)
    except OSError as exc:
        print(
            f"solo-relay preview: {exc.strerror}: {exc.filename or args.message}", file=sys.stderr
        )
        return EXIT_CONFIG
    (sys.stdout if status == 0 else sys.stderr).write(text)
    return status


def _commands(parser: argparse.ArgumentParser) -> str:
    """What a bare ``solo-relay`` prints: each command and its one-line help."""
    lines = [f"usage: {parser.prog} COMMAND [options]   (--help after a command for more)", ""]
    for action in parser._subparsers._group_actions if parser._subparsers else ():
        for choice in getattr(action, "_choices_actions", ()):
            lines.append(f"  {choice.dest:<9} {choice.help}")
    lines.append("")
    lines.append(f"{parser.prog} -V prints the version.")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        sys.stdout.write(_commands(parser))
        return 0
    if args.command == "preview":
        return _preview(args)
    if args.command == "serve":
        return _serve(args)
    if args.command == "check":
        return _check(args.config, args.upstream)
    if args.command == "queue":
        return queuectl.run(args)
    if args.command == "token":
        config = _load(args.config)
        if config is None:
            return EXIT_CONFIG
        return tokencmd.run_token(config, args.addresses, sys.stdout, sys.stderr)
    return 2  # pragma: no cover - argparse requires a known command
