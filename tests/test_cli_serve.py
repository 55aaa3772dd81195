"""`solo-relay serve` and `solo-relay check` as processes, the way a user starts them."""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import logging
import os
import signal
import smtplib
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest
import trustme

from relay.cli import main as cli
from relay.ops.logs import setup_logging


@pytest.fixture
def relay_process(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], dict[str, object]]]:
    """The relay with the embedded defaults, but on free ports, in an empty directory."""
    env = {**os.environ, "RELAY_LISTEN": "127.0.0.1:0", "RELAY_METRICS_LISTEN": "127.0.0.1:0"}
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stderr is not None
    line = process.stderr.readline()
    try:
        yield process, json.loads(line)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)


def wait_for_files(directory: Path, count: int, timeout: float = 15.0) -> list[Path]:
    """Queue mode answers before it delivers: wait (bounded) for the copies to land."""
    deadline = time.monotonic() + timeout
    while True:
        found = sorted(directory.glob("*.eml"))
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_serve_with_defaults_writes_copies_to_the_outbox(
    tmp_path: Path, relay_process: tuple[subprocess.Popen[str], dict[str, object]]
) -> None:
    """No configuration: queued, then each recipient's copy appears in ./outbox; SIGTERM stops."""
    process, listening = relay_process
    assert listening["event"] == "listening" and listening["upstream"] == "outbox:./outbox"
    # uvloop is a dependency: the relay runs on it (relay/ops/eventloop.py), else asyncio's loop.
    expected_loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    assert listening["loop"] == expected_loop
    port = int(str(listening["smtp"]).rsplit(":", 1)[1])
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(
            "news@example.org",
            ["alice@example.com", "bob@example.com"],
            b"From: news@example.org\r\nTo: alice@example.com, bob@example.com\r\n"
            b"Subject: first message\r\n\r\nHello\r\n",
        )
    copies = wait_for_files(tmp_path / "outbox", 2)
    to_lines = sorted(
        line
        for path in copies
        for line in path.read_bytes().split(b"\r\n")
        if line.startswith(b"To:")
    )
    assert to_lines == [b"To: alice@example.com", b"To: bob@example.com"]
    assert not any(b"example" in path.name.encode() for path in copies)
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=15) == 0
    assert process.stderr is not None
    events = [json.loads(line)["event"] for line in process.stderr.read().splitlines()]
    # The files can appear before the spool records them delivered: that line may
    # come after "stopping", as the drain lets a delivery in flight finish.
    assert events[-1] == "stopped" and "stopping" in events
    assert events.count("copy delivered") == 2


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
    )


def test_check_reports_the_configuration(tmp_path: Path) -> None:
    """`check` validates and prints what would be used; the password never shows."""
    result = run_cli(
        "check",
        env={
            "RELAY_UPSTREAM": "smtps://app@smtp.example.net:465",
            "RELAY_UPSTREAM_PASSWORD": "hunter2",
        },
    )
    assert result.returncode == 0, result.stderr
    assert "configuration OK" in result.stdout
    assert "smtp.example.net" in result.stdout and "hunter2" not in result.stdout


def test_check_upstream_with_the_outbox(tmp_path: Path) -> None:
    """`check --upstream` on an outbox reports its steps and succeeds."""
    result = run_cli("check", "--upstream", env={"RELAY_UPSTREAM": f"outbox:{tmp_path / 'box'}"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ok" in result.stdout


def test_check_upstream_that_is_down_fails(tmp_path: Path) -> None:
    """`check --upstream` against a closed port says which step failed and exits 1."""
    result = run_cli("check", "--upstream", env={"RELAY_UPSTREAM": "smtp+plain://127.0.0.1:9"})
    assert result.returncode == 1
    assert "FAIL" in result.stdout


def test_bad_configuration_stops_the_start_with_one_line() -> None:
    """A bad key: exit 2 and one line on stderr that names it; no traceback."""
    result = run_cli("serve", env={"RELAY_SMTP_MAX_RECIPIENTS": "lots"})
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "RELAY_SMTP_MAX_RECIPIENTS" in result.stderr and "Traceback" not in result.stderr


# ---- start-up failures: one line, the key named, exit 2 (configuration) or 1 -------------

# Each start-up configuration error: the environment ("{tmp}" is the test's directory),
# the files to make first (None: a directory), the key the line names and a piece of
# text it must hold. Every ConfigError the start-up can raise has a case here.
NOT_A_PEM = "this is not a PEM file\n"
CONFIG_ERRORS: list[tuple[str, dict[str, str], dict[str, str | None], str, str]] = [
    ("number", {"RELAY_SMTP_MAX_RECIPIENTS": "lots"}, {}, "RELAY_SMTP_MAX_RECIPIENTS", "'lots'"),
    ("toml key", {"RELAY_CONFIG": "{tmp}/r.toml"}, {"r.toml": "[smtp]\nmax_rcpt = 3\n"},
     "smtp.max_rcpt", "unknown key"),
    ("no file", {"RELAY_CONFIG": "{tmp}/none.toml"}, {}, "RELAY_CONFIG", "none.toml"),
    ("bad toml", {"RELAY_CONFIG": "{tmp}/r.toml"}, {"r.toml": "= ="}, "RELAY_CONFIG", "TOML"),
    ("listen", {"RELAY_LISTEN": "nowhere"}, {}, "listen", "'nowhere'"),
    ("metrics", {"RELAY_METRICS_LISTEN": "9925"}, {}, "metrics.listen", "'9925'"),
    ("mode", {"RELAY_MODE": "fast"}, {}, "mode", "'fast'"),
    ("workers", {"RELAY_WORKERS": "0"}, {}, "workers", "at least 1"),
    ("open relay", {"RELAY_LISTEN": "0.0.0.0:0"}, {}, "smtp.allow_networks", "0.0.0.0"),
    ("network", {"RELAY_SMTP_ALLOW_NETWORKS": "nope"}, {}, "smtp.allow_networks", "'nope'"),
    ("helo", {"RELAY_SMTP_HOSTNAME": "relay_1.example.com"}, {}, "smtp.hostname",
     "'relay_1.example.com'"),
    ("tls files", {"RELAY_SMTP_STARTTLS": "certificate"}, {}, "smtp.tls_cert_file", "key"),
    ("tls cert missing", {"RELAY_SMTP_STARTTLS": "certificate",
     "RELAY_SMTP_TLS_CERT_FILE": "{tmp}/cert.pem", "RELAY_SMTP_TLS_KEY_FILE": "{tmp}/key.pem"},
     {"key.pem": NOT_A_PEM}, "smtp.tls_cert_file", "{tmp}/cert.pem"),
    ("tls key missing", {"RELAY_SMTP_STARTTLS": "certificate",
     "RELAY_SMTP_TLS_CERT_FILE": "{tmp}/cert.pem", "RELAY_SMTP_TLS_KEY_FILE": "{tmp}/key.pem"},
     {"cert.pem": NOT_A_PEM}, "smtp.tls_key_file", "{tmp}/key.pem"),
    ("tls not pem", {"RELAY_SMTP_STARTTLS": "certificate",
     "RELAY_SMTP_TLS_CERT_FILE": "{tmp}/cert.pem", "RELAY_SMTP_TLS_KEY_FILE": "{tmp}/key.pem"},
     {"cert.pem": NOT_A_PEM, "key.pem": NOT_A_PEM}, "smtp.tls_cert_file", "cannot load"),
    ("users unset", {"RELAY_SMTP_AUTH": "users"}, {}, "smtp.users_file", "needs a users file"),
    ("users missing", {"RELAY_SMTP_AUTH": "users", "RELAY_SMTP_USERS_FILE": "{tmp}/users"}, {},
     "smtp.users_file", "{tmp}/users"),
    ("users line", {"RELAY_SMTP_AUTH": "users", "RELAY_SMTP_USERS_FILE": "{tmp}/users"},
     {"users": "# app users\nshop:s3cret\nnewsletter s3cret\n"}, "smtp.users_file",
     "{tmp}/users line 3: expected user:password"),
    ("users twice", {"RELAY_SMTP_AUTH": "users", "RELAY_SMTP_USERS_FILE": "{tmp}/users"},
     {"users": "shop:a\nshop:b\n"}, "smtp.users_file", "line 2: user 'shop' is listed twice"),
    ("users empty", {"RELAY_SMTP_AUTH": "users", "RELAY_SMTP_USERS_FILE": "{tmp}/users"},
     {"users": "# nobody yet\n"}, "smtp.users_file", "lists no user"),
    ("url", {"RELAY_UPSTREAM": "http://smtp.example.net"}, {}, "upstream.url", "'http'"),
    ("password no user", {"RELAY_UPSTREAM": "smtps://smtp.example.net",
     "RELAY_UPSTREAM_PASSWORD": "x"}, {}, "upstream.url", "names no user"),
    ("user no password", {"RELAY_UPSTREAM": "smtps://app@smtp.example.net"}, {},
     "upstream.password", "no password"),
    ("password file", {"RELAY_UPSTREAM": "smtps://app@smtp.example.net",
     "RELAY_UPSTREAM_PASSWORD_FILE": "{tmp}/pw"}, {}, "upstream.password_file", "{tmp}/pw"),
    ("dsn password file", {"RELAY_UPSTREAM": "smtps://app:x@smtp.example.net",
     "RELAY_DELIVERY_DSN_USER": "bounces", "RELAY_DELIVERY_DSN_PASSWORD_FILE": "{tmp}/dsn"},
     {}, "delivery.dsn_password_file", "cannot read"),
    ("ca file", {"RELAY_UPSTREAM": "smtps://app:x@smtp.example.net",
     "RELAY_UPSTREAM_CA_FILE": "{tmp}/ca.pem"}, {}, "upstream.ca_file", "{tmp}/ca.pem"),
    ("ca not pem", {"RELAY_UPSTREAM": "smtps://app:x@smtp.example.net",
     "RELAY_UPSTREAM_CA_FILE": "{tmp}/ca.pem"}, {"ca.pem": NOT_A_PEM}, "upstream.ca_file",
     "cannot load"),
    ("oauth", {"RELAY_UPSTREAM": "smtps://app@smtp.example.net",
     "RELAY_UPSTREAM_OAUTH_TOKEN_FILE": "{tmp}/token"}, {}, "upstream.oauth_token_file",
     "cannot read"),
    ("outbox", {"RELAY_UPSTREAM": "outbox:{tmp}/file/box"}, {"file": "x"}, "upstream.url",
     "not a directory"),
    ("dkim domain", {"RELAY_DKIM_ACTION": "resign"}, {}, "dkim.domain", "''"),
    ("dkim key", {"RELAY_DKIM_ACTION": "resign", "RELAY_DKIM_DOMAIN": "example.org",
     "RELAY_DKIM_SELECTOR": "s1", "RELAY_DKIM_KEY_FILE": "{tmp}/dkim.pem"}, {},
     "dkim.key_file", "{tmp}/dkim.pem"),
    ("log level", {"RELAY_LOG_LEVEL": "loud"}, {}, "log.level", "'loud'"),
    ("hash key", {"RELAY_LOG_HASH_KEY": "short"}, {}, "log.hash_key", "16 bytes"),
    ("hash key file", {"RELAY_LOG_HASH_KEY_FILE": "{tmp}/hash-key"}, {},
     "log.hash_key_file", "{tmp}/hash-key"),
    ("spool", {"RELAY_SPOOL_DIR": "{tmp}/file/spool"}, {"file": "x"}, "spool.dir",
     "not a directory"),
    ("jitter", {"RELAY_DELIVERY_RETRY_JITTER": "1.5"}, {}, "delivery.retry_jitter", "less than"),
    ("bool", {"RELAY_SPOOL_FSYNC": "maybe"}, {}, "RELAY_SPOOL_FSYNC", "'maybe'"),
    ("table", {"RELAY_CONFIG": "{tmp}/r.toml"}, {"r.toml": "smtp = 3\n"}, "smtp", "table"),
    ("toml bool", {"RELAY_CONFIG": "{tmp}/r.toml"}, {"r.toml": "[spool]\nfsync = 1\n"},
     "spool.fsync", "true or false"),
    ("toml int", {"RELAY_CONFIG": "{tmp}/r.toml"}, {"r.toml": "workers = 1.5\n"}, "workers",
     "whole number"),
    ("toml float", {"RELAY_CONFIG": "{tmp}/r.toml"},
     {"r.toml": '[delivery]\nlifetime = "2d"\n'}, "delivery.lifetime", "'2d'"),
    ("toml list", {"RELAY_CONFIG": "{tmp}/r.toml"},
     {"r.toml": '[smtp]\nallow_networks = "10.0.0.0/8"\n'}, "smtp.allow_networks", "list"),
    ("toml string", {"RELAY_CONFIG": "{tmp}/r.toml"}, {"r.toml": "listen = 2525\n"}, "listen",
     "string"),
    ("workers max", {"RELAY_WORKERS": "65"}, {}, "workers", "at most 64"),
    ("seconds", {"RELAY_SMTP_IDLE_TIMEOUT": "0"}, {}, "smtp.idle_timeout", "more than 0"),
    ("negative", {"RELAY_SPOOL_MAX_BYTES": "-1"}, {}, "spool.max_bytes", "negative"),
    ("every network", {"RELAY_LISTEN": "0.0.0.0:0", "RELAY_SMTP_ALLOW_NETWORKS": "0.0.0.0/0"},
     {}, "smtp.allow_networks", "open relay"),
    ("outbox empty", {"RELAY_UPSTREAM": "outbox:"}, {}, "upstream.url", "needs a directory"),
    ("url space", {"RELAY_UPSTREAM": "smtps://smtp.example .net"}, {}, "upstream.url", "space"),
    ("url path", {"RELAY_UPSTREAM": "smtps://smtp.example.net/x"}, {}, "upstream.url",
     "nothing after the port"),
    ("url port", {"RELAY_UPSTREAM": "smtps://smtp.example.net:99999"}, {}, "upstream.url",
     "1 to 65535"),
    ("url host", {"RELAY_UPSTREAM": "smtps://smtp_1.example.net"}, {}, "upstream.url",
     "DNS name"),
    ("url no host", {"RELAY_UPSTREAM": "smtps://app@:465"}, {}, "upstream.url", "no host"),
    ("plain off loopback", {"RELAY_UPSTREAM": "smtp+plain://smtp.example.net"}, {},
     "upstream.url", "upstream.insecure"),
    ("plain password", {"RELAY_UPSTREAM": "smtp+plain://app:x@smtp.example.net",
     "RELAY_UPSTREAM_INSECURE": "true"}, {}, "upstream.url", "in clear"),
    ("oauth no user", {"RELAY_UPSTREAM": "smtps://smtp.example.net",
     "RELAY_UPSTREAM_OAUTH_TOKEN_FILE": "{tmp}/token"}, {"token": "t"},
     "upstream.oauth_token_file", "needs the user"),
    ("dkim selector", {"RELAY_DKIM_ACTION": "resign", "RELAY_DKIM_DOMAIN": "example.org",
     "RELAY_DKIM_SELECTOR": "a b"}, {}, "dkim.selector", "'a b'"),
    ("dkim no key", {"RELAY_DKIM_SIGN_ALL": "true", "RELAY_DKIM_DOMAIN": "example.org",
     "RELAY_DKIM_SELECTOR": "s1"}, {}, "dkim.key_file", "needed"),
    ("dkim not a key", {"RELAY_DKIM_ACTION": "resign", "RELAY_DKIM_DOMAIN": "example.org",
     "RELAY_DKIM_SELECTOR": "s1", "RELAY_DKIM_KEY_FILE": "{tmp}/dkim.pem"},
     {"dkim.pem": NOT_A_PEM}, "dkim.key_file", "not a usable RSA private key"),
    ("stored key", {"RELAY_SPOOL_DIR": "{tmp}/spool"}, {"spool": None, "spool/log-hash.key": "x"},
     "log.hash_key", "no usable key"),
]  # fmt: skip


@pytest.fixture
def in_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., tuple[int, str, str]]]:
    """``solo-relay ARGS`` in this process, in tmp_path, with only the given RELAY_* set."""
    for name in [n for n in os.environ if n.startswith("RELAY_")]:
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    logged = io.StringIO()
    monkeypatch.setattr(cli, "setup_logging", functools.partial(setup_logging, stream=logged))

    def run(*args: str, env: Mapping[str, str] = {}) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        with monkeypatch.context() as m:
            for name, value in env.items():
                m.setenv(name, value)
            m.setattr(sys, "stdout", out)
            m.setattr(sys, "stderr", err)
            status = cli.main(list(args))
        return status, out.getvalue(), err.getvalue()

    yield run
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.StreamHandler)]:
        if getattr(handler, "stream", None) is logged:
            root.removeHandler(handler)


@pytest.mark.parametrize("case", CONFIG_ERRORS, ids=[case[0] for case in CONFIG_ERRORS])
def test_every_configuration_error_is_one_line_from_check_and_serve_alike(
    tmp_path: Path,
    in_process: Callable[..., tuple[int, str, str]],
    case: tuple[str, dict[str, str], dict[str, str | None], str, str],
) -> None:
    """serve and check refuse the same start with the same line: key, path or value; exit 2."""
    _, env, files, key, text = case
    for name, content in files.items():
        if content is None:
            (tmp_path / name).mkdir()
        else:
            (tmp_path / name).write_text(content)
    env = {name: value.replace("{tmp}", str(tmp_path)) for name, value in env.items()}
    text = text.replace("{tmp}", str(tmp_path))
    lines = {}
    for command in ("check", "serve"):
        status, out, err = in_process(command, env=env)
        assert status == 2, (command, out, err)
        assert "configuration OK" not in out
        assert err.count("\n") == 1 and "Traceback" not in err, err
        assert err.startswith(f"solo-relay: configuration error: {key}: "), err
        assert text in err, err
        lines[command] = err
    assert lines["check"] == lines["serve"]
    if "spool" not in files:
        assert not (tmp_path / "spool").exists(), "a refused start leaves nothing behind"


def test_check_says_ok_exactly_where_serve_starts(
    tmp_path: Path, in_process: Callable[..., tuple[int, str, str]]
) -> None:
    """A users file, a CA file and a password file that exist: check passes, changing nothing."""
    users, ca, password = tmp_path / "users", tmp_path / "ca.pem", tmp_path / "pw"
    users.write_text("shop:s3cret\n")
    password.write_text("s3cret\n")
    ca.write_text(trustme.CA().cert_pem.bytes().decode())
    env = {
        "RELAY_SMTP_AUTH": "users",
        "RELAY_SMTP_USERS_FILE": str(users),
        "RELAY_UPSTREAM": "smtps://app@smtp.example.net",
        "RELAY_UPSTREAM_PASSWORD_FILE": str(password),
        "RELAY_UPSTREAM_CA_FILE": str(ca),
    }
    status, out, err = in_process("check", env=env)
    assert status == 0, err
    assert "configuration OK" in out and "smtps://app@smtp.example.net:465" in out
    assert list(tmp_path.iterdir()) == sorted([users, ca, password]) or set(tmp_path.iterdir()) == {
        users,
        ca,
        password,
    }


def test_bare_command_lists_the_commands_and_v_gives_the_version(
    in_process: Callable[..., tuple[int, str, str]],
) -> None:
    """`solo-relay` alone prints each command on a line (exit 0); -V is --version."""
    status, out, err = in_process()
    assert status == 0 and not err
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == ["preview", "serve", "check", "queue", "token"]
    for flag in ("-V", "--version"):
        with pytest.raises(SystemExit) as info:
            in_process(flag)
        assert info.value.code == 0


def test_check_warns_about_unknown_variables_but_not_service_links(
    in_process: Callable[..., tuple[int, str, str]],
) -> None:
    """A Kubernetes pod's RELAY_PORT=tcp://... passes quietly; a typo is named with a fix."""
    env = {"RELAY_PORT": "tcp://10.96.0.12:2525", "RELAY_SMTP_MAX_RECIPIENT": "5"}
    status, out, err = in_process("check", env=env)
    assert status == 0 and "configuration OK" in out
    assert err == (
        "solo-relay: warning: RELAY_SMTP_MAX_RECIPIENT: unknown setting, ignored;"
        " did you mean RELAY_SMTP_MAX_RECIPIENTS? (see config/solo-relay.toml)\n"
    )


def test_check_upstream_configuration_error_is_one_line_no_traceback() -> None:
    """check --upstream with a password but no user in the URL: exit 2, one line."""
    result = run_cli(
        "check",
        "--upstream",
        env={"RELAY_UPSTREAM": "smtp+plain://127.0.0.1:9", "RELAY_UPSTREAM_PASSWORD": "x"},
    )
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == (
        "solo-relay: configuration error: upstream.url: a password is set but the URL names"
        " no user\n"
    )


def test_users_file_error_as_a_process(tmp_path: Path) -> None:
    """The real process: a bad users-file line is one line naming file, line and key; exit 2."""
    users = tmp_path / "users"
    users.write_text("shop s3cret\n")
    result = run_cli(
        "serve",
        env={
            "RELAY_SMTP_AUTH": "users",
            "RELAY_SMTP_USERS_FILE": str(users),
            "RELAY_SPOOL_DIR": str(tmp_path / "spool"),
        },
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"solo-relay: configuration error: smtp.users_file: {users} line 1:"
        " expected user:password, found no ':'\n"
    )
    assert "s3cret" not in result.stderr


def test_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """A runtime failure at start (the SMTP port taken): exit 1, one line, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "serve",
            env={
                "RELAY_LISTEN": f"127.0.0.1:{port}",
                "RELAY_METRICS_LISTEN": "127.0.0.1:0",
                "RELAY_SPOOL_DIR": str(tmp_path / "spool"),
                "RELAY_UPSTREAM": f"outbox:{tmp_path / 'outbox'}",
            },
        )
    assert result.returncode == 1, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if not x.startswith("{")]
    assert line.startswith("solo-relay: cannot start: ") and "in use" in line, line
    assert "Traceback" not in result.stderr


def test_listening_line_shows_the_upstream_user_and_hides_only_the_password(
    tmp_path: Path,
) -> None:
    """The start-up line: smtp+plain://user%40example.com:***@127.0.0.1:2, not a token."""
    env = {
        **os.environ,
        "RELAY_LISTEN": "127.0.0.1:0",
        "RELAY_METRICS_LISTEN": "127.0.0.1:0",
        "RELAY_UPSTREAM": "smtp+plain://mailer%40example.org:s3cret@127.0.0.1:2",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = json.loads(process.stderr.readline())
    finally:
        process.kill()
        process.wait(timeout=10)
    assert line["event"] == "listening", line
    assert line["upstream"] == "smtp+plain://mailer%40example.org:***@127.0.0.1:2"


def test_serve_flags_set_listen_and_upstream(tmp_path: Path) -> None:
    """serve --listen and --upstream stand for RELAY_LISTEN and RELAY_UPSTREAM."""
    env = {**os.environ, "RELAY_METRICS_LISTEN": "127.0.0.1:0", "RELAY_LISTEN": "nowhere"}
    box = tmp_path / "box"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "relay",
            "serve",
            "--listen=127.0.0.1:0",
            f"--upstream=outbox:{box}",
        ],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stderr is not None
        line = json.loads(process.stderr.readline())
    finally:
        process.kill()
        process.wait(timeout=10)
    assert line["event"] == "listening", line
    assert line["smtp"].startswith("127.0.0.1:") and line["upstream"] == f"outbox:{tmp_path}/box"


def test_serve_starts_beside_kubernetes_service_links(tmp_path: Path) -> None:
    """A pod's RELAY_PORT=tcp://... no longer stops serve: a debug line, a warning for a typo."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("RELAY_")},
        "RELAY_LISTEN": "127.0.0.1:0",
        "RELAY_METRICS_LISTEN": "127.0.0.1:0",
        "RELAY_LOG_LEVEL": "debug",
        "RELAY_PORT": "tcp://10.96.0.12:2525",
        "RELAY_SERVICE_HOST": "10.96.0.12",
        "RELAY_SMTP_MAX_RECIPIENT": "5",
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines = []
    try:
        assert process.stderr is not None
        for raw in process.stderr:
            lines.append(json.loads(raw))
            if lines[-1]["event"] == "listening":
                break
    finally:
        process.kill()
        process.wait(timeout=10)
    assert lines and lines[-1]["event"] == "listening", lines
    noticed = {line["variable"]: line["level"] for line in lines if "variable" in line}
    assert noticed == {
        "RELAY_PORT": "debug",
        "RELAY_SERVICE_HOST": "debug",
        "RELAY_SMTP_MAX_RECIPIENT": "warning",
    }
    (warning,) = [line for line in lines if line.get("variable") == "RELAY_SMTP_MAX_RECIPIENT"]
    assert "did you mean RELAY_SMTP_MAX_RECIPIENTS?" in warning["event"]


def test_a_spool_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    """A second relay on a spool a first one holds: exit 1, one line naming it, no traceback."""
    env = {
        **os.environ,
        "RELAY_LISTEN": "127.0.0.1:0",
        "RELAY_METRICS_LISTEN": "127.0.0.1:0",
        "RELAY_SPOOL_DIR": str(tmp_path / "spool"),
    }
    first = subprocess.Popen(
        [sys.executable, "-m", "relay", "serve"],
        cwd=tmp_path,
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stderr is not None
        assert json.loads(first.stderr.readline())["event"] == "listening"
        second = run_cli("serve", env={k: v for k, v in env.items() if k.startswith("RELAY_")})
    finally:
        first.kill()
        first.wait(timeout=10)
    assert second.returncode == 1, second.stderr
    assert "Traceback" not in second.stderr
    (line,) = [x for x in second.stderr.splitlines() if not x.startswith("{")]
    assert line.startswith(f"solo-relay: cannot start: {tmp_path / 'spool'} is in use"), line
