"""
Deployment: the files in etc/, the Dockerfile, `twistd` daemon mode and
`twist novac --check`.

Every file in etc/ is read by at least one test here (the first test keeps
that list honest), and every NOVAS_/NOVAC_ name those files use must be a
setting the code reads, so the examples cannot drift from the code.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
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
from .processes import TOKEN, Proc, fingerprint, free_port, novac, novas, wait_for
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
    NOVAS_ENV: "test_env_examples_*, test_systemd_*",
    NOVAC_ENV: "test_env_examples_*, test_systemd_*",
    NOVAS_UNIT: "test_systemd_*",
    NOVAC_UNIT: "test_systemd_*",
    SYSUSERS: "test_systemd_sysusers",
    NOVAC_COMPOSE: "test_compose_*",
    NOVAS_COMPOSE: "test_compose_*",
    # etc/kubernetes: the kustomize layout and the two rendered overlays
    # (novac-deployment.yaml, novac-deployment-ha.yaml), in test_kubernetes.py.
    **KUBERNETES_FILES,
    ETC / "prometheus" / "nova-alerts.yml": "test_metrics.py::test_the_alert_rules_pass_promtool, ::test_metrics_on_*",
    ETC / "grafana" / "nova-dashboard.json": "test_metrics.py::test_the_dashboard_*, ::test_metrics_on_*",
    CONSTRAINTS: "test_dockerfile, tests/test_image.py::test_image_user_dependencies_and_no_build_secret",
}

SERVER_ENVS = {s.env: s for s in SERVER_SETTINGS}
AGENT_ENVS = {s.env: s for s in AGENT_SETTINGS}
NAME = re.compile(r"\bNOVA[SC]_[A-Z0-9_]*[A-Z0-9]\b")
PLACEHOLDER_FINGERPRINT = "sha256:paste-the-fingerprint-novas-logs-at-start"
SOME_FINGERPRINT = "sha256:" + "ab" * 32
BIN = Path(sys.executable).parent


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOVAS_", "NOVAC_"))}
    env.update(extra)
    return env


def _tool(name: str) -> str:
    """A console script installed next to this Python (twist, twistd)."""
    path = BIN / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    assert found, f"{name} is not installed"
    return found


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
def test_env_examples_list_every_setting_with_its_default(path: Path, settings: dict[str, Setting]) -> None:
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


def _unit_with_real_twist(path: Path, tmp: Path) -> Path:
    """The unit with ExecStart pointing at the twist installed here."""
    copy = tmp / path.name
    copy.write_text(path.read_text().replace("/opt/nova/bin/twist", _tool("twist")))
    return copy


def _systemd_analyze() -> str:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed (Debian package: systemd)")
    return tool


@pytest.mark.parametrize("path", [NOVAS_UNIT, NOVAC_UNIT])
def test_systemd_analyze_verify(path: Path, tmp_path: Path) -> None:
    """
    `systemd-analyze verify` loads the unit offline (no running systemd is
    needed) and warns about anything it cannot parse; it exits 0 even then,
    so the test requires an empty report.
    """
    tool = _systemd_analyze()
    copy = _unit_with_real_twist(path, tmp_path)
    done = subprocess.run([tool, "verify", str(copy)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr.strip() == "", done.stderr
    # As shipped, the only complaint is that /opt/nova is not installed here.
    done = subprocess.run([tool, "verify", str(path)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in done.stderr.splitlines() if line.strip()]
    assert complaints == [f"{path.name}: Command /opt/nova/bin/twist is not executable: No such file or directory"]
    # And the tool does catch mistakes (so an empty report means something).
    broken = tmp_path / f"broken-{path.name}"
    broken.write_text(copy.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    done = subprocess.run([tool, "verify", str(broken)], capture_output=True, text=True, timeout=60)
    assert "Unknown key" in done.stderr


@pytest.mark.parametrize("path", [NOVAS_UNIT, NOVAC_UNIT])
def test_systemd_security_exposure_is_low(path: Path, tmp_path: Path) -> None:
    tool = _systemd_analyze()
    copy = _unit_with_real_twist(path, tmp_path)
    done = subprocess.run(
        [tool, "security", "--offline=yes", "--no-pager", str(copy)], capture_output=True, text=True, timeout=60
    )
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert m, done.stdout + done.stderr
    assert float(m.group(1)) <= 2.0, done.stdout


def test_systemd_sysusers(tmp_path: Path) -> None:
    """The user novas.service runs as is the one nova.sysusers.conf creates."""
    user = unit_value(read_unit(NOVAS_UNIT), "Service", "User")
    entries = [line.split() for line in SYSUSERS.read_text().splitlines() if line.strip() and line[0] != "#"]
    assert [e[:2] for e in entries] == [["u", user]]
    tool = shutil.which("systemd-sysusers")
    if tool is None:
        pytest.skip("systemd-sysusers is not installed (Debian package: systemd)")
    done = subprocess.run(
        [tool, "--dry-run", f"--root={tmp_path}", str(SYSUSERS)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert f"Creating user '{user}'" in done.stdout + done.stderr


def test_systemd_novas_service_commands_for_real(tmp_path: Path) -> None:
    """
    What systemd would do with novas.service, done by hand here and quickly
    (tests/test_systemd.py boots the units under systemd for real):
    ExecStart= with the environment of the example file,
    ExecReload= re-reads the token file, SIGTERM stops it with status 0.
    """
    unit = read_unit(NOVAS_UNIT)
    env, _ = read_env_file(NOVAS_ENV)
    tokens = tmp_path / "agent-tokens"
    tokens.write_text("first-token-1234-abcd\n")
    env |= {
        "NOVAS_AGENT_PORT": str(free_port()),
        "NOVAS_ADMIN_PORT": str(free_port()),
        "NOVAS_STATE_DIR": str(tmp_path / "state"),
        "NOVAS_ROUTES": f"{free_port()}:db.internal:5432@env=prod",
        "NOVAS_AGENT_TOKEN_FILE": str(tokens),
        # The example's placeholder secrets are refused at start: what an operator replaces.
        "NOVAS_AGENT_TOKEN": TOKEN,
        "NOVAS_ADMIN_TOKEN": TOKEN[::-1],
    }
    argv = unit_value(unit, "Service", "ExecStart").replace("/opt/nova/bin/twist", _tool("twist")).split()
    log = tmp_path / "novas.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=_clean_env(**env), stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: "NOVAS listening" in log.read_text(), 20, "NOVAS to listen")
            tokens.write_text("first-token-1234-abcd\nsecond-token-5678-efgh\n")
            reload = unit_value(unit, "Service", "ExecReload").replace("${MAINPID}", str(proc.pid))
            subprocess.run(shlex.split(reload), check=True, timeout=10)
            wait_for(lambda: "reloaded 3 agent token(s)" in log.read_text(), 10, "the token reload")
            proc.terminate()
            timeout = float(unit_value(unit, "Service", "TimeoutStopSec").rstrip("s"))
            assert proc.wait(timeout) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "Traceback" not in log.read_text()


# --- twistd daemon mode --------------------------------------------------------


def test_twistd_daemon_pidfile_logfile_and_sigterm(tmp_path: Path) -> None:
    pidfile, logfile = tmp_path / "novas.pid", tmp_path / "novas.log"
    admin = free_port()
    env = _clean_env(
        NOVAS_AGENT_TOKEN=TOKEN,
        NOVAS_AGENT_PORT=str(free_port()),
        NOVAS_ADMIN_PORT=str(admin),
        NOVAS_STATE_DIR=str(tmp_path / "state"),
    )
    argv = [_tool("twistd"), "--pidfile", str(pidfile), "--logfile", str(logfile), "novas"]
    # twistd forks, detaches and returns at once; the daemon goes on.
    started = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert started.returncode == 0, started.stderr
    pid = 0
    try:
        wait_for(lambda: pidfile.exists() and pidfile.read_text().strip().isdigit(), 20, "the pid file")
        pid = int(pidfile.read_text())
        assert pid != os.getpid()
        os.kill(pid, 0)  # alive
        wait_for(lambda: logfile.exists() and "NOVAS listening" in logfile.read_text(), 20, "NOVAS in the log file")
        # Answering HTTP means the reactor runs, so NOVAS's SIGTERM handler is
        # in place (twistd starts the services before the reactor).
        wait_for(lambda: _http_ok(f"http://127.0.0.1:{admin}/readyz"), 20, "the daemon's /readyz")
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not _alive(pid), 20, "the daemon to exit")
        wait_for(lambda: not pidfile.exists(), 5, "the pid file to be removed")
    finally:
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)
    text = logfile.read_text()
    assert "SIGTERM received" in text and "Server Shut Down" in text
    assert "Traceback" not in text and TOKEN not in text


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie of ours would still answer; twistd's daemon is not our child.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0]
    except (OSError, IndexError):
        return False
    return state != "Z"


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


def _glob(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern (Go's filepath.Match plus **) as a regex."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or a parent of it wins."""
    parts = path.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = _glob((pattern[1:] if negate else pattern).strip("/"))
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not negate
    return ignored


def test_dockerfile_build_context_installs_a_complete_package(tmp_path: Path) -> None:
    """
    The build stage, without Docker (tests/test_image.py builds the image
    for real; this is the quick check): the files that
    .dockerignore lets into the context and the Dockerfile copies, built
    with setuptools as `pip wheel` would (build_py), must hold every module
    and data file NOVA loads, and importing the commands from there works.
    """
    patterns = [
        line.strip() for line in DOCKERIGNORE.read_text().splitlines() if line.strip() and not line.startswith("#")
    ]
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [*tracked.split(), *[str(p.relative_to(ROOT)) for p in (ROOT / "nova").rglob("*") if p.is_file()]]
    context = {f for f in files if not _ignored(f, patterns)}
    for needed in ("pyproject.toml", "setup.cfg", "README.md", "nova/agent/check.py", "twisted/plugins/nova_novac.py"):
        assert needed in context, f"{needed} is not in the build context"
    for unwanted in (".git/HEAD", "tests/test_deploy.py", "twisted/plugins/dropin.cache", ".venv/bin/python"):
        assert _ignored(unwanted, patterns), f"{unwanted} would be sent to the Docker daemon"
    copies = [args.split() for word, args in dockerfile_instructions(DOCKERFILE.read_text()) if word == "COPY"]
    src = tmp_path / "src"
    src.mkdir()
    for args in copies:
        if args[0].startswith("--from"):
            continue
        *sources, _dest = args
        for source in sources:
            chosen = [f for f in context if f == source or f.startswith(source.rstrip("/") + "/")]
            assert chosen, f"COPY {source}: nothing in the build context"
            for f in chosen:
                target = src / f
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / f, target)
    lib = tmp_path / "lib"
    subprocess.run(
        [sys.executable, "-c", "from setuptools import setup; setup()", "-q", "build_py", "--build-lib", str(lib)],
        cwd=src,
        check=True,
        capture_output=True,
        timeout=120,
    )
    built = {str(p.relative_to(lib)) for p in lib.rglob("*") if p.is_file()}
    shipped = {
        str(p.relative_to(ROOT)) for p in (ROOT / "nova").rglob("*") if p.is_file() and "__pycache__" not in p.parts
    }
    missing = sorted(shipped - built)
    assert not missing, f"the package built in the image would lack {missing} (setup.cfg [options.package_data])"
    assert {"twisted/plugins/nova_novac.py", "twisted/plugins/nova_novas.py"} <= built
    probe = "import nova, nova.server.tap, nova.agent.tap, nova.agent.check; print(nova.__file__)"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=tmp_path,
        env=_clean_env(PYTHONPATH=str(lib)),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(lib))


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


def run_check(env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = _clean_env(NOVAC_TOKEN=TOKEN, NOVAC_NAME="agent-1", NOVAC_CONNECT_TIMEOUT="5") | env
    done = subprocess.run(
        [sys.executable, "-m", "twisted", "novac", "--check"],
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    for stream in (done.stdout, done.stderr):
        assert "Traceback" not in stream and TOKEN not in stream, stream
    return done


def step_lines(stdout: str, server: str) -> dict[str, tuple[str, str]]:
    """{step: (status, detail)} for one server."""
    steps = {}
    for line in stdout.splitlines():
        m = re.fullmatch(rf"{re.escape(server)}\s+(\w+)\s+(ok|FAIL|skip)\s+(.*)", line)
        if m:
            steps[m.group(1)] = (m.group(2), m.group(3))
    return steps


@contextmanager
def ca_server(tmp: Path) -> Iterator[tuple[Proc, int, CA]]:
    """NOVAS with a certificate for novas.test (not for its address) from a test CA."""
    ca = CA()
    cert, key = ca.issue("novas.test").write(tmp, "server")
    with novas(tmp, [], {"NOVAS_TLS_CERT": str(cert), "NOVAS_TLS_KEY": str(key)}) as (server, port):
        yield server, port, ca


def test_check_reports_every_step_and_exit_codes(tmp_path: Path) -> None:
    with ca_server(tmp_path) as (server, port, ca):
        ca_file = str(ca.write(tmp_path))
        good = {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_CA": ca_file, "NOVAC_TLS_SERVER_NAME": "novas.test"}
        label = f"127.0.0.1:{port}"

        # A working server: every step passes, exit 0.
        done = run_check(good)
        assert done.returncode == 0, done.stdout + done.stderr
        steps = step_lines(done.stdout, label)
        assert list(steps) == list(checkmod.STEPS)
        assert all(status == "ok" for status, _ in steps.values()), done.stdout
        assert steps["resolve"][1].startswith("127.0.0.1")
        assert f"connected to 127.0.0.1:{port}" in steps["tcp"][1]
        assert "TLSv1.3" in steps["tls"][1] and "CN=novas.test" in steps["tls"][1]
        assert "name 'novas.test' verified" in steps["tls"][1]
        assert "registered as agent-1-check" in steps["auth"][1]
        assert re.fullmatch(r"\d+\.\d ms", steps["rtt"][1])
        assert "summary: 1 of 1 server(s) passed; exit 0" in done.stdout
        # NOVAS saw a registration that said GOAWAY at once and closed.
        server.wait_log("agent agent-1-check registered")
        server.wait_log("agent agent-1-check is going away")
        server.wait_log("agent-1-check disconnected: Connection was closed cleanly")

        # A wrong token: TLS passes, the registration is refused, exit 4.
        done = run_check(good | {"NOVAC_TOKEN": "not-the-right-token"})
        assert done.returncode == checkmod.EXIT_AUTH, done.stdout
        steps = step_lines(done.stdout, label)
        assert steps["tls"][0] == "ok"
        assert steps["auth"] == (
            "FAIL",
            "the server refused the registration: AUTH_FAILED: the token proof did not verify",
        )
        assert steps["rtt"][0] == steps["close"][0] == "skip"

        # An unverifiable certificate: another CA, exit 3, and what was presented.
        stranger = CA("not the server's CA").write(_dir(tmp_path / "stranger"))
        done = run_check(good | {"NOVAC_TLS_CA": str(stranger)})
        assert done.returncode == checkmod.EXIT_TLS, done.stdout
        status, detail = step_lines(done.stdout, label)["tls"]
        assert status == "FAIL" and "certificate verify failed" in detail
        assert "CN=novas.test" in detail and "sha256:" in detail
        # The right CA but the dial address as the name: also TLS, exit 3.
        done = run_check({k: v for k, v in good.items() if k != "NOVAC_TLS_SERVER_NAME"})
        assert done.returncode == checkmod.EXIT_TLS, done.stdout
        assert step_lines(done.stdout, label)["tls"][0] == "FAIL"

        # A closed port: TCP fails, exit 2. With a working server beside it,
        # both are reported, in order, and the exit status is the failure's.
        closed = free_port()
        done = run_check(good | {"NOVAC_SERVER": f"127.0.0.1:{closed},127.0.0.1:{port}"})
        assert done.returncode == checkmod.EXIT_UNREACHABLE, done.stdout
        closed_steps = step_lines(done.stdout, f"127.0.0.1:{closed}")
        assert closed_steps["tcp"][0] == "FAIL" and "connection refused" in closed_steps["tcp"][1]
        assert all(closed_steps[s][0] == "skip" for s in ("tls", "auth", "rtt", "close"))
        assert all(status == "ok" for status, _ in step_lines(done.stdout, label).values())
        assert "summary: 1 of 2 server(s) passed; exit 2" in done.stdout
        assert done.stdout.index(f"127.0.0.1:{closed} ") < done.stdout.index(f"{label} ")
    assert "Traceback" not in server.text()


def _dir(path: Path) -> Path:
    path.mkdir()
    return path


def test_check_does_not_disturb_a_running_agent(tmp_path: Path) -> None:
    with novas(tmp_path, []) as (server, port):
        env = {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server)}
        with novac(tmp_path, env):
            server.wait_log("agent agent-1 registered")
            done = run_check(env)
            assert done.returncode == 0, done.stdout
            assert "matches the pinned NOVAC_TLS_FINGERPRINT" in done.stdout
            server.wait_log("agent-1-check disconnected")
        text = server.text()
        # The agent's own tunnel was never replaced by the check.
        assert "registered again" not in text
        assert "agent agent-1 disconnected" not in text.split("agent-1-check disconnected")[0]


def test_check_configuration_error_is_one_line_exit_1() -> None:
    done = run_check({"NOVAC_SERVER": "127.0.0.1:9"})  # no way to verify the server
    assert done.returncode == checkmod.EXIT_CONFIG
    assert done.stdout == ""
    assert done.stderr.strip().startswith("novac: error: cannot verify the server")
    assert len(done.stderr.strip().splitlines()) == 1


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


def test_check_is_documented() -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "twisted", "novac", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "--check" in help_text
    doc = PRIVATELINK.read_text()
    assert "twist novac --check" in doc
    # Every exit status is documented, in the guide and in the module.
    assert sorted(checkmod.EXIT_MEANING) == list(range(6))
    for code in checkmod.EXIT_MEANING:
        assert f"**{code}**" in doc
        assert f"    {code}  " in (checkmod.__doc__ or "")
