"""Configuration: the documented file, the environment names, errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from relay.config import AuthMode, Config, env_names, load
from relay.errors import ConfigError

DOCUMENTED = Path(__file__).resolve().parent.parent / "config" / "solo-relay.toml"


def test_no_configuration_at_all_gives_the_embedded_defaults() -> None:
    """With no file and no RELAY_* variables: 127.0.0.1:2525, outbox:./outbox, metrics on 9925."""
    config = load(environ={})
    assert config == Config()
    assert str(config.listen_address) == "127.0.0.1:2525"
    assert config.upstream.url == "outbox:./outbox"
    assert str(config.metrics_address) == "127.0.0.1:9925"


def test_documented_file_lists_every_key_with_its_default() -> None:
    """config/solo-relay.toml loads to exactly the defaults, and names every key."""
    assert load(environ={}, path=DOCUMENTED) == Config()
    with DOCUMENTED.open("rb") as handle:
        raw = tomllib.load(handle)
    documented = set()
    for key, value in raw.items():
        if isinstance(value, dict):
            documented |= {f"RELAY_{key}_{inner}".upper() for inner in value}
        else:
            documented.add(f"RELAY_{key}".upper())
    assert documented == set(env_names()) - {"RELAY_UPSTREAM"}


def test_spec_environment_names_are_the_interface() -> None:
    """The names SPEC 7 promises set the keys they name."""
    config = load(
        environ={
            "RELAY_LISTEN": "127.0.0.1:2600",
            "RELAY_UPSTREAM": "smtps://app@smtp.example.net:465",
            "RELAY_UPSTREAM_PASSWORD": "s3cret",
            "RELAY_UPSTREAM_PASSWORD_FILE": "/run/secrets/upstream",
            "RELAY_METRICS_LISTEN": "127.0.0.1:9999",
            "RELAY_SPOOL_DIR": "/var/spool/solo-relay",
            "RELAY_MODE": "direct",
            "RELAY_LOG_FORMAT": "json",
        }
    )
    assert config.listen == "127.0.0.1:2600"
    assert config.upstream.url == "smtps://app@smtp.example.net:465"
    assert config.upstream.password == "s3cret"
    assert config.upstream.password_file == "/run/secrets/upstream"
    assert config.metrics.listen == "127.0.0.1:9999"
    assert config.spool.dir == "/var/spool/solo-relay"
    assert config.log.format.value == "json"


def test_environment_wins_over_the_file(tmp_path: Path) -> None:
    """A RELAY_* variable overrides the same key in the TOML file; lists are comma-separated."""
    path = tmp_path / "relay.toml"
    path.write_text('[smtp]\nmax_recipients = 10\nallow_networks = ["10.0.0.0/8"]\n')
    config = load(
        environ={
            "RELAY_CONFIG": str(path),
            "RELAY_SMTP_MAX_RECIPIENTS": "20",
            "RELAY_SMTP_ALLOW_NETWORKS": "10.1.0.0/16, 10.2.0.0/16",
        }
    )
    assert config.smtp.max_recipients == 20
    assert config.smtp.allow_networks == ("10.1.0.0/16", "10.2.0.0/16")


@pytest.mark.parametrize(
    ("environ", "toml", "key"),
    [
        ({"RELAY_SMTP_MAX_RECIPIENTS": "many"}, "", "RELAY_SMTP_MAX_RECIPIENTS"),
        ({"RELAY_NO_SUCH_THING": "1"}, "", "RELAY_NO_SUCH_THING"),
        ({}, "[smtp]\nmax_recipientz = 3\n", "smtp.max_recipientz"),
        ({}, '[isolation]\nbody_check = "sometimes"\n', "isolation.body_check"),
        ({}, "[smtp]\nmax_recipients = 0\n", "smtp.max_recipients"),
        ({}, 'listen = "nowhere"\n', "listen"),
        ({}, 'listen = "0.0.0.0:2525"\n', "smtp.allow_networks"),
        (
            {},
            'listen = "0.0.0.0:2525"\n[smtp]\nallow_networks = ["0.0.0.0/0"]\n',
            "smtp.allow_networks",
        ),
        ({}, '[smtp]\nallow_networks = ["not-a-net"]\n', "smtp.allow_networks"),
        ({}, '[smtp]\nstarttls = "certificate"\n', "smtp.tls_cert_file"),
        ({}, '[smtp]\nauth = "users"\n', "smtp.users_file"),
        ({}, 'mode = "fast"\n', "mode"),
        ({}, "this is not toml", "RELAY_CONFIG"),
    ],
)
def test_bad_configuration_names_the_key(
    tmp_path: Path, environ: dict[str, str], toml: str, key: str
) -> None:
    """Each mistake raises one ConfigError whose message starts with the key's name."""
    path = tmp_path / "relay.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as info:
        load(environ={**environ, "RELAY_CONFIG": str(path)})
    assert info.value.key == key
    assert str(info.value).startswith(f"{key}: ")


def test_non_loopback_listener_with_networks_or_auth_is_allowed() -> None:
    """0.0.0.0 is fine with a client network list, or with AUTH."""
    with_networks = load(
        environ={"RELAY_LISTEN": "0.0.0.0:2525", "RELAY_SMTP_ALLOW_NETWORKS": "10.0.0.0/8"}
    )
    assert not with_networks.listen_address.is_loopback
    with_auth = load(
        environ={
            "RELAY_LISTEN": "0.0.0.0:2525",
            "RELAY_SMTP_AUTH": "passthrough",
            "RELAY_SMTP_STARTTLS": "self-signed",  # off loopback AUTH is offered only in TLS
        }
    )
    assert with_auth.smtp.auth is AuthMode.PASSTHROUGH
