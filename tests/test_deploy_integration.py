"""
Deployment, run for real: systemd-analyze and systemd-sysusers on the units
in etc/, the novas unit's commands, `twistd` daemon mode, the Dockerfile's
build context installed with pip, and `twist novac --check` against a real
NOVAS.  The unit half (the files' contents) is tests/test_deploy.py.
"""

from __future__ import annotations

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

import pytest

from nova.agent import check as checkmod

from .pki import CA
from .processes import TOKEN, Proc, fingerprint, free_port, novac, novas, wait_for
from .test_deploy import (
    BIN,
    DOCKERFILE,
    DOCKERIGNORE,
    NOVAC_UNIT,
    NOVAS_ENV,
    NOVAS_UNIT,
    PRIVATELINK,
    ROOT,
    SYSUSERS,
    dockerfile_instructions,
    read_env_file,
    read_unit,
    unit_value,
)

pytestmark = pytest.mark.integration


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
            return bool(response.status == 200)
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
