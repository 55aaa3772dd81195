"""``solo-relay token ADDRESS``: the log token of an address, under the deployment's key.

So an operator can find a customer's mail in the logs (and in ``queue list
--rcpt``) without the logs holding the address. The key is the one the relay
uses (``log.hash_key_file``, ``log.hash_key``, or the one kept in
``spool.dir``); this command never creates one.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from relay.cli.queuefmt import EXIT_CONFIG, EXIT_NOT_FOUND, EXIT_OK
from relay.config import Config
from relay.core.errors import ConfigError
from relay.ops.logs import KEY_FILE, AddressTokens, configured_key, load_key


def add_token_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``solo-relay token ADDRESS...``."""
    p = commands.add_parser(
        "token",
        help="print the log token of an address",
        description="Print the token the logs and `queue list` show for each ADDRESS (or AUTH"
        " user name), under the deployment's key (log.hash_key_file, log.hash_key, or the"
        " one kept in spool.dir), so a customer's mail can be found in the logs without"
        " the logs holding the address. Exit status 1: no key yet (serve makes one at"
        " its first start); 2: bad configuration.",
    )
    p.add_argument("addresses", nargs="+", metavar="ADDRESS", help="an address or a user name")
    p.add_argument("--config", metavar="PATH", help="TOML file (default: $RELAY_CONFIG)")


def run_token(config: Config, addresses: Sequence[str], out: TextIO, err: TextIO) -> int:
    """Print ``ADDRESS TOKEN`` per address; never creates the key."""
    spool_dir = Path(config.spool.dir)
    try:
        if configured_key(config.log) is None and not (spool_dir / KEY_FILE).is_file():
            print(
                f"solo-relay token: no token key yet: serve makes {spool_dir / KEY_FILE} at its"
                " first start (or set log.hash_key_file)",
                file=err,
            )
            return EXIT_NOT_FOUND
        tokens = AddressTokens(load_key(config.log, spool_dir))
    except ConfigError as exc:
        print(f"solo-relay: configuration error: {exc}", file=err)
        return EXIT_CONFIG
    for address in addresses:
        out.write(
            f"{tokens(address)}\n" if len(addresses) == 1 else f"{address} {tokens(address)}\n"
        )
    return EXIT_OK
