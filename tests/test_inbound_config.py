"""The open-relay guard and the AUTH/TLS start-up checks (issue 13, section 6)."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.config import AuthMode, load
from relay.core.errors import ConfigError

OFF_LOOPBACK = {"RELAY_LISTEN": "0.0.0.0:2525"}
WITH_AUTH = {**OFF_LOOPBACK, "RELAY_SMTP_AUTH": "passthrough", "RELAY_SMTP_STARTTLS": "self-signed"}
ROOT = Path(__file__).resolve().parent.parent

ALL_OF_A_FAMILY = [
    "0.0.0.0/0",
    "0.0.0.0/1,128.0.0.0/1",
    ",".join(f"{i}.0.0.0/8" for i in range(256)),
    "0.0.0.0/2,64.0.0.0/2,128.0.0.0/2,192.0.0.0/3,224.0.0.0/3",
    "::/0",
    "::/1,8000::/1",
    "10.0.0.0/8,::/1,8000::/2,c000::/2",
]


@pytest.mark.parametrize("networks", ALL_OF_A_FAMILY, ids=lambda n: n[:30])
@pytest.mark.parametrize("auth", [False, True], ids=["no-auth", "auth"])
def test_networks_covering_a_whole_family_are_refused(networks: str, auth: bool) -> None:
    """A list whose union is all of IPv4 or IPv6 (in any pieces) is an open relay: refused.

    Before, only a literal 0.0.0.0/0 or ::/0 was refused, and only without AUTH
    (the allowed networks send without AUTH, so AUTH does not close it).
    """
    env = {**(WITH_AUTH if auth else OFF_LOOPBACK), "RELAY_SMTP_ALLOW_NETWORKS": networks}
    with pytest.raises(ConfigError) as info:
        load(environ=env)
    assert info.value.key == "smtp.allow_networks"
    assert "open relay" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "networks",
    ["203.0.113.0/24", "10.0.0.0/8,198.51.100.7/32", "10.0.0.0/7", "2001:db8::/32", "172.0.0.0/8"],
)
def test_public_networks_without_auth_are_refused(networks: str) -> None:
    """Without AUTH, a network holding any public address is refused at start-up."""
    with pytest.raises(ConfigError) as info:
        load(environ={**OFF_LOOPBACK, "RELAY_SMTP_ALLOW_NETWORKS": networks})
    assert info.value.key == "smtp.allow_networks"
    assert "public" in str(info.value)


@pytest.mark.parametrize(
    "networks",
    [
        "10.0.0.0/8",
        "172.16.0.0/12,192.168.1.0/24",
        "100.64.0.0/10",
        "fd00::/8,fe80::/10",
        "127.0.0.0/8,10.244.0.0/16",
    ],
)
def test_private_networks_without_auth_are_allowed(networks: str) -> None:
    """Private, shared (RFC 6598), unique-local and link-local networks may send without AUTH."""
    config = load(environ={**OFF_LOOPBACK, "RELAY_SMTP_ALLOW_NETWORKS": networks})
    assert config.smtp.auth is AuthMode.OFF


def test_public_networks_with_auth_are_allowed() -> None:
    """With AUTH on, a public range may still be named (short of a whole family)."""
    config = load(environ={**WITH_AUTH, "RELAY_SMTP_ALLOW_NETWORKS": "198.51.100.0/24"})
    assert config.smtp.allow_networks == ("198.51.100.0/24",)


@pytest.mark.parametrize("auth", ["users", "passthrough"])
def test_auth_off_loopback_without_tls_is_refused(tmp_path: Path, auth: str) -> None:
    """AUTH off loopback with STARTTLS off could never be offered: refused at start, one line."""
    users = tmp_path / "users"
    users.write_text("app:s3cret\n")
    env = {**OFF_LOOPBACK, "RELAY_SMTP_AUTH": auth, "RELAY_SMTP_USERS_FILE": str(users)}
    with pytest.raises(ConfigError) as info:
        load(environ=env)
    assert info.value.key == "smtp.starttls"
    assert "\n" not in str(info.value)
    # On loopback, AUTH in clear is fine (aiosmtpd offers it there).
    assert load(environ={**env, "RELAY_LISTEN": "127.0.0.1:2525"}).smtp.auth is AuthMode(auth)


def test_serve_refuses_auth_without_tls_in_one_line(tmp_path: Path) -> None:
    """`solo-relay serve` stops with one line naming smtp.starttls, exit 2, no traceback."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
        "RELAY_LISTEN": "0.0.0.0:0",
        "RELAY_SMTP_AUTH": "passthrough",
        "RELAY_SPOOL_DIR": str(tmp_path / "spool"),
        "RELAY_METRICS_LISTEN": "127.0.0.1:0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "smtp.starttls" in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


@given(
    st.sampled_from([4, 6]),
    st.integers(1, 24),
    st.integers(0, 2**32 - 1),
    st.integers(0, 5),
)
def test_any_partition_of_a_family_is_refused(
    version: int, prefix: int, seed: int, drop: int
) -> None:
    """Every address family cut into pieces (address_exclude around a random network) is refused,
    and the same pieces less one are not refused for coverage."""
    everything = ipaddress.ip_network("0.0.0.0/0" if version == 4 else "::/0")
    bits = everything.max_prefixlen
    family = ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network
    hole = family((seed << (bits - 32), prefix), strict=False)
    pieces = [hole, *everything.address_exclude(hole)]
    env = {**WITH_AUTH, "RELAY_SMTP_ALLOW_NETWORKS": ",".join(map(str, pieces))}
    with pytest.raises(ConfigError) as info:
        load(environ=env)
    assert "open relay" in str(info.value)
    del pieces[drop % len(pieces)]
    load(environ={**WITH_AUTH, "RELAY_SMTP_ALLOW_NETWORKS": ",".join(map(str, pieces))})


def test_serve_with_a_missing_users_file_stops_in_one_line(tmp_path: Path) -> None:
    """A users file that cannot be read stops `serve` with one line naming smtp.users_file."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
        "RELAY_SMTP_AUTH": "users",
        "RELAY_SMTP_USERS_FILE": str(tmp_path / "missing"),
        "RELAY_SPOOL_DIR": str(tmp_path / "spool"),
        "RELAY_LISTEN": "127.0.0.1:0",
        "RELAY_METRICS_LISTEN": "127.0.0.1:0",
    }
    result = subprocess.run(
        [sys.executable, "-m", "relay", "serve"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if "smtp.users_file" in line]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
