"""Docker HEALTHCHECK for solo-relay: exit 0 when /healthz answers 200, else 1.

Standard library only, so the image needs no curl. The port comes from
RELAY_METRICS_LISTEN (the image sets 0.0.0.0:9925); a wildcard host is asked
on loopback, from inside the container.
"""

import os
import sys
import urllib.request

WILDCARDS = {"", "0.0.0.0", "::", "*"}


def url() -> str:
    listen = os.environ.get("RELAY_METRICS_LISTEN", "127.0.0.1:9925")
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if host in WILDCARDS:
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def main() -> int:
    try:
        with urllib.request.urlopen(url(), timeout=3) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:  # refused, timed out, or an HTTP error status
        print(f"healthcheck: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
