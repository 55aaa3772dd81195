"""Configuration: the documented file, the environment names, errors that name the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from relay.config import AuthMode, Config, env_names, env_notices, load, valid_helo_name
from relay.core.errors import ConfigError
from relay.ops.logs import load_key

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
        ({"RELAY_SMTP_HOSTNAME": "relay_1.example.com"}, "", "smtp.hostname"),
        ({"RELAY_SMTP_HOSTNAME": "[not-an-ip]"}, "", "smtp.hostname"),
        ({"RELAY_SMTP_HOSTNAME": "bad..example.com"}, "", "smtp.hostname"),
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


# What Kubernetes sets in a pod for a Service named "relay" (and one named "relay-metrics").
SERVICE_LINKS = {
    "RELAY_SERVICE_HOST": "10.96.0.12",
    "RELAY_SERVICE_PORT": "2525",
    "RELAY_SERVICE_PORT_SMTP": "2525",
    "RELAY_PORT": "tcp://10.96.0.12:2525",
    "RELAY_PORT_2525_TCP": "tcp://10.96.0.12:2525",
    "RELAY_PORT_2525_TCP_PROTO": "tcp",
    "RELAY_PORT_2525_TCP_PORT": "2525",
    "RELAY_PORT_2525_TCP_ADDR": "10.96.0.12",
    "RELAY_METRICS_SERVICE_HOST": "fd00::12",
    "RELAY_METRICS_PORT": "tcp://[fd00::12]:9925",
}


def test_kubernetes_service_links_are_ignored_as_such() -> None:
    """RELAY_PORT=tcp://... and friends load fine, each noticed as a service link only."""
    assert load(environ=SERVICE_LINKS) == Config()
    notices = env_notices(SERVICE_LINKS)
    assert sorted(n.name for n in notices) == sorted(SERVICE_LINKS)
    assert all(n.service_link for n in notices)
    assert "service link" in str(notices[0])


def test_an_unknown_relay_variable_is_a_warning_with_the_closest_name() -> None:
    """A misspelt RELAY_* name does not stop the start: it is named with a suggestion."""
    environ = {
        "RELAY_SMTP_MAX_RECIPIENT": "5",
        "RELAY_NO_SUCH_THING": "1",
        "RELAY_SMTP_PORT": "2525",  # not a service link's value: a mistake
        "RELAY_LISTEN": "127.0.0.1:2600",
    }
    config = load(environ=environ)
    assert config.listen == "127.0.0.1:2600" and config.smtp.max_recipients == 1000
    notices = {n.name: n for n in env_notices(environ)}
    assert set(notices) == {"RELAY_SMTP_MAX_RECIPIENT", "RELAY_NO_SUCH_THING", "RELAY_SMTP_PORT"}
    assert not any(n.service_link for n in notices.values())
    assert notices["RELAY_SMTP_MAX_RECIPIENT"].suggestion == "RELAY_SMTP_MAX_RECIPIENTS"
    assert "did you mean RELAY_SMTP_MAX_RECIPIENTS?" in str(notices["RELAY_SMTP_MAX_RECIPIENT"])
    assert notices["RELAY_NO_SUCH_THING"].suggestion == ""
    assert "RELAY_CONFIG" not in {n.name for n in env_notices({"RELAY_CONFIG": "x.toml"})}


@pytest.mark.parametrize(
    ("name", "valid"),
    [
        ("solo-relay.localhost", True),
        ("app-0", True),  # a pod's name (the manifests use metadata.name)
        ("mail.example.com.", True),
        ("[192.0.2.1]", True),
        ("[IPv6:2001:db8::1]", True),
        ("-bad.example.com", False),
        ("under_score.example.com", False),
        ("spaces are.example.com", False),
        ("ex\u00e4mple.com", False),
        ("", False),
        ("a" * 64 + ".example.com", False),
        ("[2001:db8::1]", False),
    ],
)
def test_helo_hostname_is_validated(name: str, valid: bool) -> None:
    """smtp.hostname must be what EHLO may carry (RFC 5321 4.1.3): LDH labels or a literal."""
    assert valid_helo_name(name) is valid


def test_log_hash_key_file_is_the_token_key(tmp_path: Path) -> None:
    """RELAY_LOG_HASH_KEY_FILE (a mounted Secret) gives the key; it wins over hash_key."""
    key_file = tmp_path / "log-hash-key"
    key_file.write_text("0123456789abcdef0123456789abcdef\n")
    config = load(
        environ={"RELAY_LOG_HASH_KEY_FILE": str(key_file), "RELAY_LOG_HASH_KEY": "x" * 20}
    )
    spool = tmp_path / "spool"
    assert load_key(config.log, spool) == b"0123456789abcdef0123456789abcdef"
    assert not spool.exists(), "no key is made in the spool when one is configured"
    key_file.write_text("short\n")
    with pytest.raises(ConfigError) as info:
        load_key(config.log, spool)
    assert info.value.key == "log.hash_key_file"


# -- several upstreams (issue 17) -------------------------------------------------------

UPSTREAMS_TOML = """
[[upstreams]]
name = "ses"
url = "smtp://user@smtp.example.net:587"
password_file = "/run/secrets/ses"
rate_per_second = 14.0
rate_per_day = 50000
time_zone = "America/Los_Angeles"

[[upstreams]]
name = "backup-1"
role = "failover"
url = "smtps://user@smtp.example.org:465"
pool_size = 2

[fleet]
store = "redis://redis.example.test:6379/0"
expected_replicas = 4
"""


def test_several_upstreams_from_toml_in_their_order(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(UPSTREAMS_TOML)
    config = load(environ={}, path=path)
    ses, backup = config.routes
    assert (ses.name, ses.role.value, ses.rate_per_day, ses.time_zone) == (
        "ses",
        "primary",
        50000,
        "America/Los_Angeles",
    )
    assert (backup.name, backup.role.value, backup.pool_size, backup.url) == (
        "backup-1",
        "failover",
        2,
        "smtps://user@smtp.example.org:465",
    )
    assert config.fleet.store == "redis://redis.example.test:6379/0"
    assert config.fleet.expected_replicas == 4


def test_several_upstreams_from_the_environment_readably() -> None:
    env = {
        "RELAY_UPSTREAMS": "ses,backup-1",
        "RELAY_UPSTREAMS_SES_URL": "smtp://user@smtp.example.net:587",
        "RELAY_UPSTREAMS_SES_RATE_PER_SECOND": "14",
        "RELAY_UPSTREAMS_BACKUP_1_URL": "smtps://user@smtp.example.org:465",
        "RELAY_UPSTREAMS_BACKUP_1_ROLE": "overflow",
        "RELAY_UPSTREAMS_BACKUP_1_SENDER_DOMAINS": "example.org, example.com",
    }
    config = load(environ=env)
    assert [r.name for r in config.routes] == ["ses", "backup-1"]
    assert config.routes[0].rate_per_second == 14.0
    assert config.routes[1].role.value == "overflow"
    assert config.routes[1].sender_domains == ("example.org", "example.com")
    assert env_notices(env) == []  # every name is known


def test_the_environment_overrides_a_toml_upstream_by_name(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(UPSTREAMS_TOML)
    config = load(environ={"RELAY_UPSTREAMS_SES_RATE_PER_DAY": "100"}, path=path)
    assert [r.name for r in config.routes] == ["ses", "backup-1"]
    assert config.routes[0].rate_per_day == 100


def test_one_upstream_alone_is_the_default_primary_with_the_delivery_rates() -> None:
    config = load(environ={"RELAY_DELIVERY_RATE_PER_SECOND": "5", "RELAY_UPSTREAM": "outbox:x"})
    [single] = config.routes
    assert (single.name, single.role.value, single.url, single.rate_per_second) == (
        "default",
        "primary",
        "outbox:x",
        5.0,
    )


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"RELAY_UPSTREAMS": "a,a", "RELAY_UPSTREAMS_A_URL": "outbox:x"}, "upstreams"),
        ({"RELAY_UPSTREAMS": "Bad_Name"}, "RELAY_UPSTREAMS"),
        ({"RELAY_UPSTREAMS": "a"}, "upstreams.a.url"),
        (
            {
                "RELAY_UPSTREAMS": "a",
                "RELAY_UPSTREAMS_A_URL": "outbox:x",
                "RELAY_UPSTREAMS_A_ROLE": "failover",
            },
            "upstreams.a.role",
        ),
        (
            {
                "RELAY_UPSTREAMS": "a",
                "RELAY_UPSTREAMS_A_URL": "outbox:x",
                "RELAY_UPSTREAMS_A_TIME_ZONE": "Mars/Base",
            },
            "upstreams.a.time_zone",
        ),
        (
            {
                "RELAY_UPSTREAMS": "a",
                "RELAY_UPSTREAMS_A_URL": "outbox:x",
                "RELAY_UPSTREAMS_A_DAY_RESETS_AT": "24:00",
            },
            "upstreams.a.day_resets_at",
        ),
        (
            {
                "RELAY_UPSTREAMS": "a",
                "RELAY_UPSTREAMS_A_URL": "outbox:x",
                "RELAY_UPSTREAM": "outbox:y",
            },
            "upstream",
        ),
        (
            {
                "RELAY_UPSTREAMS": "a",
                "RELAY_UPSTREAMS_A_URL": "outbox:x",
                "RELAY_DELIVERY_RATE_PER_DAY": "9",
            },
            "delivery.rate_per_day",
        ),
        ({"RELAY_FLEET_STORE": "http://redis.example.test"}, "fleet.store"),
        ({"RELAY_FLEET_EXPECTED_REPLICAS": "0"}, "fleet.expected_replicas"),
    ],
)
def test_a_bad_upstream_list_names_its_key(env: dict[str, str], key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load(environ=env)
    assert caught.value.key == key


def test_an_unknown_key_of_a_listed_upstream_is_a_warning_with_the_closest_name() -> None:
    env = {
        "RELAY_UPSTREAMS": "ses",
        "RELAY_UPSTREAMS_SES_URL": "outbox:x",
        "RELAY_UPSTREAMS_SES_RATE": "1",
    }
    [notice] = env_notices(env)
    assert notice.name == "RELAY_UPSTREAMS_SES_RATE"
