"""
Deployment: the files in etc/, the Dockerfile, `twistd` daemon mode and
`twist novac --check`.

Every file in etc/ is read by at least one test here (the first test keeps
that list honest), and every NOVAS_/NOVAC_ name those files use must be a
setting the code reads, so the examples cannot drift from the code.

The tests that start processes or open real sockets are in
tests/test_deploy_integration.py.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import Clock

from nova.agent import check as checkmod
from nova.agent.options import SETTINGS as AGENT_SETTINGS
from nova.agent.options import build_config as agent_config
from nova.config import ConfigError, Setting, resolve
from nova.server.options import SETTINGS as SERVER_SETTINGS
from nova.server.options import build_config as server_config

from .pki import CA
from .processes import TOKEN
from .test_kubernetes import FILES as KUBERNETES_FILES

ROOT = Path(__file__).parent.parent
ETC = ROOT / "etc"
NOVAS_ENV = ETC / "novas.env.example"
NOVAC_ENV = ETC / "novac.env.example"
NOVAS_UNIT = ETC / "systemd" / "novas.service"
NOVAC_UNIT = ETC / "systemd" / "novac.service"
SYSUSERS = ETC / "systemd" / "nova.sysusers.conf"
NOVAC_COMPOSE = ETC / "docker" / "novac-compose.yml"
NOVAS_COMPOSE = ETC / "docker" / "novas-compose.yml"
CONSTRAINTS = ETC / "docker" / "constraints.txt"
K8S_SINGLE = ETC / "kubernetes" / "novac-deployment.yaml"
K8S_HA = ETC / "kubernetes" / "novac-deployment-ha.yaml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PRIVATELINK = ROOT / "docs" / "aws-privatelink.md"

# Each file in etc/ and the test(s) below that read it.
EXERCISED = {
    NOVAS_ENV: "test_env_examples_*, test_deploy_integration.py::test_systemd_*",
    NOVAC_ENV: "test_env_examples_*, test_deploy_integration.py::test_systemd_*",
    NOVAS_UNIT: "test_systemd_*, test_deploy_integration.py::test_systemd_*",
    NOVAC_UNIT: "test_systemd_*, test_deploy_integration.py::test_systemd_*",
    SYSUSERS: "test_deploy_integration.py::test_systemd_sysusers",
    NOVAC_COMPOSE: "test_compose_*",
    NOVAS_COMPOSE: "test_compose_*",
    # etc/kubernetes: the kustomize layout and the two rendered overlays
    # (novac-deployment.yaml, novac-deployment-ha.yaml), in test_kubernetes.py.
    **KUBERNETES_FILES,
    ETC
    / "prometheus"
    / "nova-alerts.yml": "test_metrics_integration.py::test_the_alert_rules_pass_promtool, ::test_metrics_on_*",
    ETC
    / "grafana"
    / "nova-dashboard.json": "test_metrics.py::test_the_dashboard_*, test_metrics_integration.py::test_metrics_on_*",
    CONSTRAINTS: "test_dockerfile, tests/test_image.py::test_image_user_dependencies_and_no_build_secret",
}

SERVER_ENVS = {s.env: s for s in SERVER_SETTINGS}
AGENT_ENVS = {s.env: s for s in AGENT_SETTINGS}
NAME = re.compile(r"\bNOVA[SC]_[A-Z0-9_]*[A-Z0-9]\b")
PLACEHOLDER_FINGERPRINT = "sha256:paste-the-fingerprint-novas-logs-at-start"
SOME_FINGERPRINT = "sha256:" + "ab" * 32
BIN = Path(sys.executable).parent


# --- The files of etc/ and the names they use -------------------------------


def test_every_file_in_etc_is_exercised() -> None:
    shipped = {p for p in ETC.rglob("*") if p.is_file()}
    assert shipped == set(EXERCISED), "a file in etc/ has no test (or a tested file is gone)"


def test_every_variable_name_used_in_etc_exists_in_the_code() -> None:
    known = set(SERVER_ENVS) | set(AGENT_ENVS)
    for path in [*EXERCISED, DOCKERFILE, PRIVATELINK]:
        used = set(NAME.findall(path.read_text()))
        assert used <= known, f"{path.relative_to(ROOT)} uses names no setting has: {sorted(used - known)}"


def read_env_file(path: Path) -> tuple[dict[str, str], dict[str, str]]:
    """
    An environment file as systemd's EnvironmentFile= and Compose's env_file
    read it (KEY=VALUE, # comments): the assignments, and the commented-out
    ones ("# KEY=VALUE").
    """
    active: dict[str, str] = {}
    commented: dict[str, str] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith(("#", ";")):
            m = re.fullmatch(r"[#;]\s*(NOVA[SC]_[A-Z0-9_]+)=(\S*)", line)
            if m:
                commented[m.group(1)] = m.group(2)
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"{path.name}: not KEY=VALUE: {line!r}"
        assert value == value.strip() and not value.startswith(("'", '"')), f"{path.name}: quote or space: {line!r}"
        active[key] = value
    return active, commented


@pytest.mark.parametrize(("path", "settings"), [(NOVAS_ENV, SERVER_ENVS), (NOVAC_ENV, AGENT_ENVS)])
def test_env_examples_list_every_setting_with_its_default(path: Path, settings: dict[str, Setting[Any]]) -> None:
    active, commented = read_env_file(path)
    missing = set(settings) - set(active) - set(commented)
    assert not missing, f"{path.name} does not mention {sorted(missing)}"
    for env, value in commented.items():
        s = settings[env]
        if s.default:  # a commented setting with a default shows that default
            assert value == s.default, f"{path.name}: # {env}={value}, but the default is {s.default}"


def test_env_examples_are_valid_configurations(tmp_path: Path) -> None:
    active, _ = read_env_file(NOVAS_ENV)
    # The placeholder secrets are refused at start, naming the setting...
    with pytest.raises(ConfigError, match="NOVAS_AGENT_TOKEN is still the example's placeholder"):
        server_config(resolve(SERVER_SETTINGS, {}, active))
    with pytest.raises(ConfigError, match="NOVAS_ADMIN_TOKEN is still the example's placeholder"):
        server_config(resolve(SERVER_SETTINGS, {}, active | {"NOVAS_AGENT_TOKEN": TOKEN}))
    # ... and with real ones the example is a working configuration.
    config = server_config(
        resolve(SERVER_SETTINGS, {}, active | {"NOVAS_AGENT_TOKEN": TOKEN, "NOVAS_ADMIN_TOKEN": TOKEN})
    )
    assert config.agent_port == 9022 and config.routes and config.tls

    active, _ = read_env_file(NOVAC_ENV)
    with pytest.raises(ConfigError, match="NOVAC_TOKEN is still the example's placeholder"):
        agent_config(resolve(AGENT_SETTINGS, {}, active | {"NOVAC_TLS_FINGERPRINT": SOME_FINGERPRINT}))
    active["NOVAC_TOKEN"] = TOKEN
    # The placeholder fingerprint is refused at start, naming the setting...
    assert active["NOVAC_TLS_FINGERPRINT"] == PLACEHOLDER_FINGERPRINT
    with pytest.raises(ConfigError, match="NOVAC_TLS_FINGERPRINT"):
        agent_config(resolve(AGENT_SETTINGS, {}, active))
    # ... and with a real one the example is a working configuration.
    config2 = agent_config(resolve(AGENT_SETTINGS, {}, active | {"NOVAC_TLS_FINGERPRINT": SOME_FINGERPRINT}))
    assert config2.servers == (("novas.example.com", 9022),) and config2.tags


# --- systemd -------------------------------------------------------------------


def read_unit(path: Path) -> dict[str, list[tuple[str, str]]]:
    """A unit file as sections of (key, value) pairs (keys may repeat)."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    logical = ""
    for raw in path.read_text().splitlines():
        if not logical and (not raw.strip() or raw.lstrip().startswith(("#", ";"))):
            continue
        if raw.endswith("\\"):
            logical += raw[:-1] + " "
            continue
        line, logical = (logical + raw).strip(), ""
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), [])
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not Key=Value: {line!r}"
        current.append((key.strip(), value.strip()))
    return sections


def unit_value(unit: dict[str, list[tuple[str, str]]], section: str, key: str) -> str:
    values = [v for k, v in unit.get(section, []) if k == key]
    assert values, f"no {key}= in [{section}]"
    return values[-1]


@pytest.mark.parametrize(("path", "command"), [(NOVAS_UNIT, "novas"), (NOVAC_UNIT, "novac")])
def test_systemd_units_run_twist_in_the_foreground_hardened(path: Path, command: str) -> None:
    unit = read_unit(path)

    def v(key: str) -> str:
        return unit_value(unit, "Service", key)

    exec_start = v("ExecStart").split()
    assert Path(exec_start[0]).name == "twist" and exec_start[-1] == command
    assert "--logfile" not in exec_start and "--pidfile" not in exec_start  # twist: the foreground
    assert v("Type") in ("exec", "simple")
    assert v("EnvironmentFile") == f"/etc/nova/{command}.env"
    # The example is what that file starts from.
    assert (ETC / f"{command}.env.example").exists()
    assert v("Restart") == "on-failure"
    assert v("NoNewPrivileges") == "yes"
    assert v("ProtectSystem") == "strict"
    assert v("ProtectHome") == "yes"
    assert v("PrivateTmp") == "yes"
    assert v("CapabilityBoundingSet") == ""
    assert "DynamicUser" in dict(unit["Service"]) or v("User") not in ("", "root", "0")
    # The stop timeout leaves room for the drain (30 s by default).
    assert float(v("TimeoutStopSec").rstrip("s")) > 30
    assert unit_value(unit, "Install", "WantedBy") == "multi-user.target"
    if command == "novas":
        assert v("StateDirectory") == "nova"
        assert v("ExecReload") == '/bin/sh -c "kill -HUP ${MAINPID}"'
        assert "NOVAS_AGENT_TOKEN_FILE" in path.read_text() and "systemctl reload novas" in path.read_text()
    else:
        assert v("DynamicUser") == "yes"
        assert "twist novac --check" in path.read_text()


# --- twistd daemon mode --------------------------------------------------------


# --- Dockerfile ----------------------------------------------------------------


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments), continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    logical = ""
    for raw in text.splitlines():
        if raw.lstrip().startswith("#") and not logical:
            continue
        if raw.rstrip().endswith("\\"):
            logical += raw.rstrip()[:-1] + " "
            continue
        line, logical = (logical + raw).strip(), ""
        if line:
            word, _, rest = line.partition(" ")
            out.append((word.upper(), " ".join(rest.split())))
    return out


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last:]


def test_dockerfile() -> None:
    instructions = dockerfile_instructions(DOCKERFILE.read_text())
    # The base is a build argument (tests/containers.py builds on a stand-in), python:3.11-slim by default.
    (base_arg,) = [args for word, args in instructions[:1] if word == "ARG"]
    assert base_arg == "BASE=python:3.11-slim"
    bases = [args.split()[0] for word, args in instructions if word == "FROM"]
    assert bases and all(b == "${BASE}" for b in bases)
    # The dependencies are pinned, and the PostgreSQL driver is one of them.
    runs = [args for word, args in instructions if word == "RUN"]
    assert any("pip install --constraint etc/docker/constraints.txt '.[postgresql]'" in r for r in runs)
    pins = [line for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.+]*", p) for p in pins), pins
    assert any(p.startswith("psycopg-binary==") for p in pins)
    final = _final_stage(instructions)
    users = [args for word, args in final if word == "USER"]
    assert users, "the image must not run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "a numeric, non-root USER (runAsNonRoot can check it)"
    # Everything after USER runs unprivileged; the install happens before it.
    runs = [args for word, args in final if word == "RUN"]
    assert ("COPY", "--from=build /opt/nova /opt/nova") in final, "the package is installed"
    assert not any("pip install" in r for r in runs), "nothing is downloaded in the run stage"
    assert any("twist novas --help" in r and "twist novac --help" in r for r in runs), "the install is tried"
    entry = [args for word, args in final if word == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["twist"]
    cmd = [args for word, args in final if word == "CMD"]
    assert cmd and json.loads(cmd[-1])[0] in ("novac", "novas")
    assert "9022" in " ".join(args for word, args in final if word == "EXPOSE").split()
    # The Kubernetes manifests run as that user.
    for manifest in (K8S_SINGLE, K8S_HA):
        pod = _deployment(manifest)["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == int(uid)


# --- Docker Compose ------------------------------------------------------------

_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


class InterpolationError(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's variable substitution: $VAR ${VAR} ${VAR:-default} ${VAR-default} ${VAR:?err} $$."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        set_ = name in env and (env[name] != "" or not (op or "").startswith(":"))
        if op in (":?", "?") and not set_:
            raise InterpolationError(f"{name}: {arg}")
        if op in (":-", "-") and not set_:
            return arg
        return env.get(name, "")

    return _VAR.sub(one, value)


def _compose(path: Path, env: dict[str, str]) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    return interpolate(data, env)  # type: ignore[no-any-return]


def _validate_compose(data: dict[str, Any]) -> None:
    compose_spec = pytest.importorskip("compose_spec", reason="compose-spec (a test extra) is not installed")
    compose_spec.PyCompose.from_yaml(yaml.safe_dump(data)).validate()


NOVAC_COMPOSE_ENV = {
    "NOVAC_SERVER": "novas-1.example.com:9022,novas-2.example.com:9022",
    "NOVAC_TOKEN": TOKEN,
    "NOVAC_NAME": "example_novac1",
    "NOVAC_TAGS": "VPC=dev_infra;Env=Production",
    "NOVAC_TLS_FINGERPRINT": SOME_FINGERPRINT,
}
NOVAS_COMPOSE_ENV = {"NOVAS_AGENT_TOKEN": TOKEN, "NOVAS_ADMIN_TOKEN": "admin-token-1234"}


def _service_env(service: dict[str, Any]) -> dict[str, str]:
    env = service["environment"]
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def test_compose_novac_mirrors_case_1() -> None:
    raw = yaml.safe_load(NOVAC_COMPOSE.read_text())
    service = raw["services"]["novac"]
    assert service["profiles"] == ["novac"]
    assert service["restart"] == "always"
    assert service["command"] == ["novac"]
    for name in ("NOVAC_SERVER", "NOVAC_TOKEN", "NOVAC_NAME", "NOVAC_TAGS"):
        assert name in service["environment"]
    # The secret comes from the environment, never written in the file.
    assert service["environment"]["NOVAC_TOKEN"].startswith("${NOVAC_TOKEN:?")
    assert (NOVAC_COMPOSE.parent / service["build"]["context"] / "Dockerfile").resolve() == DOCKERFILE.resolve()
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"]
    assert _seconds(service["stop_grace_period"]) > float(service["environment"]["NOVAC_DRAIN_TIMEOUT"])
    data = _compose(NOVAC_COMPOSE, NOVAC_COMPOSE_ENV)
    _validate_compose(data)
    env = _service_env(data["services"]["novac"])
    config = agent_config(resolve(AGENT_SETTINGS, {}, env))
    assert len(config.servers) == 2 and config.name == "example_novac1" and config.health_port == 8080
    assert ("VPC", "dev_infra") in config.tags
    # Without the token the file does not even start.
    with pytest.raises(InterpolationError, match="NOVAC_TOKEN"):
        _compose(NOVAC_COMPOSE, {k: v for k, v in NOVAC_COMPOSE_ENV.items() if k != "NOVAC_TOKEN"})


def test_compose_novas_mirrors_the_agent_port_and_token() -> None:
    raw = yaml.safe_load(NOVAS_COMPOSE.read_text())
    service = raw["services"]["novas"]
    assert service["profiles"] == ["novas"] and service["command"] == ["novas"]
    assert service["environment"]["NOVAS_AGENT_PORT"] == "${NOVAS_AGENT_PORT:-9022}"
    assert service["environment"]["NOVAS_AGENT_TOKEN"].startswith("${NOVAS_AGENT_TOKEN:?")
    data = _compose(NOVAS_COMPOSE, NOVAS_COMPOSE_ENV | {"NOVAS_AGENT_PORT": "19022"})
    _validate_compose(data)
    novas_service = data["services"]["novas"]
    assert "19022:19022" in novas_service["ports"]
    assert all(not p.startswith("9023") for p in novas_service["ports"]), "the admin port stays on the host's loopback"
    env = _service_env(novas_service)
    config = server_config(resolve(SERVER_SETTINGS, {}, env))
    assert config.agent_port == 19022 and config.admin_token
    assert any(v.endswith(":" + env["NOVAS_STATE_DIR"]) for v in novas_service["volumes"])
    with pytest.raises(InterpolationError, match="NOVAS_AGENT_TOKEN"):
        _compose(NOVAS_COMPOSE, {"NOVAS_ADMIN_TOKEN": "admin-token-1234"})


def _seconds(text: str) -> float:
    m = re.fullmatch(r"(\d+)s", str(text))
    assert m, text
    return float(m.group(1))


# --- Kubernetes ----------------------------------------------------------------


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _deployment(path: Path) -> dict[str, Any]:
    (deployment,) = [d for d in _documents(path) if d["kind"] == "Deployment"]
    return deployment


# The manifests themselves (the kustomize overlays, and these two files, which
# are two of them rendered) are checked in tests/test_kubernetes.py.


# --- twist novac --check -------------------------------------------------------


class _FakeResolver:
    def __init__(self, answer: list[str] | None) -> None:
        self.answer = answer

    def resolveHostName(self, receiver: Any, host: str, port: int = 0) -> None:
        receiver.resolutionBegan(None)
        if self.answer is None:
            return  # never answers
        for address in self.answer:
            receiver.addressResolved(type("A", (), {"host": address})())
        receiver.resolutionComplete()


class _FakeReactor(Clock):
    def __init__(self, answer: list[str] | None) -> None:
        super().__init__()
        self.nameResolver = _FakeResolver(answer)


def _config(**env: str) -> Any:
    base = {"NOVAC_SERVER": "novas.invalid:9022", "NOVAC_TOKEN": TOKEN, "NOVAC_NAME": "agent-1"}
    return agent_config(resolve(AGENT_SETTINGS, {}, base | {"NOVAC_TLS_FINGERPRINT": SOME_FINGERPRINT} | env))


def test_check_dns_failure_and_timeout_without_network() -> None:
    """The resolve step, with a resolver that fails or never answers (no DNS query leaves the machine)."""
    config = _config(NOVAC_CONNECT_TIMEOUT="3")
    reactor = _FakeReactor([])
    reports: list[checkmod.ServerReport] = []
    d = ensureDeferred(checkmod.Checker(reactor, config).server("novas.invalid", 9022, "agent-1-check"))
    d.addCallback(reports.append)
    (report,) = reports  # the resolver failed at once: no waiting
    assert report.code == checkmod.EXIT_UNREACHABLE
    assert report.lines(0)[0] == "novas.invalid:9022  resolve FAIL  novas.invalid has no address (DNS lookup failed)"
    assert [s.status for s in report.steps] == ["FAIL", "skip", "skip", "skip", "skip", "skip"]

    reactor = _FakeReactor(None)
    d = ensureDeferred(checkmod.Checker(reactor, config).server("novas.invalid", 9022, "agent-1-check"))
    d.addCallback(reports.append)
    reactor.advance(2.9)
    assert len(reports) == 1
    reactor.advance(0.2)
    report = reports[1]
    assert report.steps[0].detail == "DNS: no answer within 3s"


def test_check_names() -> None:
    assert checkmod.check_names(_config()) == (["agent-1-check"], None)
    names, note = checkmod.check_names(_config(NOVAC_SERVER="a:1,b:2"))
    assert names == ["agent-1-check-1", "agent-1-check-2"] and note is None
    long = "a" * 63
    (name,), _ = checkmod.check_names(_config(NOVAC_NAME=long))
    assert len(name) == 63 and name.endswith("-check")


def test_check_names_with_a_client_certificate(tmp_path: Path) -> None:
    ca = CA()
    ca_path = ca.write(tmp_path)
    both = ca.issue("agent-1", "agent-1-check").write(tmp_path, "both")
    only = ca.issue("agent-1").write(tmp_path, "only")
    common = {"NOVAC_TLS_CA": str(ca_path), "NOVAC_TLS_FINGERPRINT": ""}
    names, note = checkmod.check_names(_config(NOVAC_TLS_CERT=str(both[0]), NOVAC_TLS_KEY=str(both[1]), **common))
    assert names == ["agent-1-check"] and note is None
    names, note = checkmod.check_names(_config(NOVAC_TLS_CERT=str(only[0]), NOVAC_TLS_KEY=str(only[1]), **common))
    assert names == ["agent-1"] and note is not None and "replaced for a moment" in note
