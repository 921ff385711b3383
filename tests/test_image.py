"""
The container image, built from the Dockerfile and run for real: NOVAS and
NOVAC read-only, as the image's unprivileged user, with every capability
dropped, on loopback (the host's network); a stream through a route,
`twist novac --check`, a drain on `docker stop` that exits 0, the state
volume keeping the certificate, the PostgreSQL audit store, and the Compose
files' health checks.

tests/containers.py prepares the stand-in base and the tests' own dockerd
(once per session).
"""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from twisted.logger import eventFromJSON, formatEvent

from .containers import HARDENED, ROOT, Docker, nova_image
from .processes import ADMIN_TOKEN, TOKEN, echo_roundtrip, free_port, postgres_server, target, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.deploy]

FINGERPRINT = re.compile(r"NOVAC_TLS_FINGERPRINT=(sha256:[0-9a-f]{64})")
CONSTRAINTS = ROOT / "etc" / "docker" / "constraints.txt"


@pytest.fixture(scope="session")
def image() -> tuple[Docker, str]:
    return nova_image()


def rendered(raw: str) -> str:
    """`twist` logs JSON when its output is not a terminal: the lines as text."""
    out = []
    for line in raw.splitlines():
        try:
            out.append(formatEvent(eventFromJSON(line)) or "")
        except (ValueError, TypeError, KeyError):
            out.append(line)
    return "\n".join(out)


class Container:
    def __init__(self, docker: Docker, name: str) -> None:
        self.docker, self.name = docker, name

    def text(self) -> str:
        return rendered(self.docker.logs(self.name))

    def wait_log(self, needle: str, timeout: float = 30) -> None:
        def found() -> bool:
            text = self.text()
            if needle in text:
                return True
            if self.docker.inspect(self.name)["State"]["Status"] == "exited":
                raise AssertionError(f"{self.name} exited:\n{text[-4000:]}")
            return False

        wait_for(found, timeout, f"{needle!r} in the logs of {self.name}")

    def fingerprint(self) -> str:
        m = FINGERPRINT.search(self.text())
        assert m, self.text()
        return m.group(1)

    def stop(self, timeout: int = 45) -> int:
        """`docker stop` (SIGTERM, then SIGKILL after C{timeout}); the container's exit code."""
        self.docker("stop", "-t", str(timeout), self.name, timeout=timeout + 30)
        return int(self.docker.inspect(self.name)["State"]["ExitCode"])


@contextmanager
def container(docker: Docker, image: str, command: list[str], env: dict[str, str],
              extra: list[str] | None = None) -> Iterator[Container]:  # fmt: skip
    name = f"nova-test-{command[0]}-{uuid.uuid4().hex[:8]}"
    args = ["run", "-d", "--name", name, *HARDENED, *(extra or [])]
    for key, value in env.items():
        args += ["-e", f"{key}={value}"]
    docker(*args, image, *command)
    c = Container(docker, name)
    try:
        yield c
    finally:
        text = c.text()
        docker("rm", "-f", name, check=False)
        for bad in ("Traceback", "Unhandled error", "error number 30"):
            assert bad not in text, f"{name} logged {bad!r}:\n{text[-4000:]}"


@contextmanager
def volume(docker: Docker) -> Iterator[str]:
    name = f"nova-test-state-{uuid.uuid4().hex[:8]}"
    docker("volume", "create", name)
    try:
        yield name
    finally:
        docker("volume", "rm", "-f", name, check=False)


def server_env(port: int, route: int, echo: int, **extra: str) -> dict[str, str]:
    return {
        "NOVAS_AGENT_TOKEN": TOKEN,
        "NOVAS_AGENT_PORT": str(port),
        "NOVAS_ADMIN_PORT": str(free_port()),
        "NOVAS_ADMIN_TOKEN": ADMIN_TOKEN,
        "NOVAS_ROUTES": f"127.0.0.1:{route}:127.0.0.1:{echo}",
        "NOVAS_DRAIN_TIMEOUT": "30",
    } | extra


def agent_env(port: int, fp: str, name: str = "agent-1") -> dict[str, str]:
    return {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TOKEN": TOKEN, "NOVAC_NAME": name, "NOVAC_TLS_FINGERPRINT": fp}


# --- the image as built ----------------------------------------------------------


def test_image_user_dependencies_and_no_build_secret(image: tuple[Docker, str]) -> None:
    docker, tag = image
    config = docker.inspect(tag)["Config"]
    assert config["User"] == "10001:10001"
    assert config["Entrypoint"] == ["twist"]
    # One container for every probe (with vfs, each container is a full copy of the image).
    script = (
        "import os, subprocess, sys, pathlib, psycopg, twisted.plugins\n"
        "freeze = [sys.executable, '-m', 'pip', 'freeze', '--exclude', 'nova-tunnel']\n"
        "print(subprocess.run(freeze, capture_output=True, text=True, check=True).stdout)\n"
        "print('---')\n"
        "print(psycopg.__version__)\n"
        "print((pathlib.Path(twisted.plugins.__file__).parent / 'dropin.cache').stat().st_size > 0)\n"
        "print(os.path.exists('/run/secrets/ca'), os.getuid())\n"
    )
    out = docker("run", "--rm", *HARDENED, "--entrypoint", "/opt/nova/bin/python", tag, "-c", script).stdout
    frozen, probes = out.split("---")
    # The dependencies are exactly the pinned ones (the lock file is what is installed).
    pinned = [line for line in CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")]
    assert sorted(frozen.split(), key=str.lower) == sorted(pinned, key=str.lower)
    # The PostgreSQL driver is in; the plugin cache is built; the build's CA bundle is not there.
    assert probes.split()[1:] == ["True", "False", "10001"]
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", tag).stdout
    assert "PIP_CERT=/run/secrets/ca" not in history and "PIP_INDEX_URL" not in history


# --- NOVAS and NOVAC from the image --------------------------------------------


def _assert_hardened(docker: Docker, c: Container) -> None:
    host = docker.inspect(c.name)["HostConfig"]
    assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
    status = docker("exec", c.name, "cat", "/proc/1/status").stdout
    fields = dict(line.split(":", 1) for line in status.splitlines())
    assert fields["Uid"].split()[:2] == ["10001", "10001"]
    assert int(fields["CapEff"], 16) == 0 and int(fields["CapBnd"], 16) == 0
    assert fields["NoNewPrivs"].strip() == "1"
    write = docker("exec", c.name, "touch", "/opt/nova/x", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr


def _stop_during_a_stream(c: Container, route: int) -> int:
    """`docker stop` while a user's stream is open: the stream works on during the drain; the exit code."""
    user = socket.create_connection(("127.0.0.1", route), timeout=20)
    codes: list[int] = []
    try:
        user.sendall(b"before")
        assert user.recv(64) == b"before"
        stopping = threading.Thread(target=lambda: codes.append(c.stop(45)))
        stopping.start()
        c.wait_log("SIGTERM received: draining")
        user.sendall(b"during the drain")
        got = b""
        while len(got) < len(b"during the drain"):
            got += user.recv(64)
        assert got == b"during the drain"
    finally:
        user.close()
    stopping.join(90)
    assert len(codes) == 1, c.text()[-3000:]
    return codes[0]


def test_image_novas_and_novac(image: tuple[Docker, str]) -> None:
    """
    One scenario, to start few containers: NOVAS and NOVAC read-only, as
    user 10001, without capabilities; a stream through a route; `twist novac
    --check`; `docker stop` drains and exits 0; a new NOVAS container on the
    same state volume has the same certificate (the running agent, pinned to
    the first one's fingerprint, registers with it again).
    """
    docker, tag = image
    port, route = free_port(), free_port()
    with target("echo") as echo, volume(docker) as state:
        env = server_env(port, route, echo)
        keep = ["-v", f"{state}:/var/lib/nova"]
        with container(docker, tag, ["novas"], env, keep) as first:
            first.wait_log("NOVAS listening")
            fp = first.fingerprint()
            assert "generated self-signed certificate" in first.text()
            with container(docker, tag, ["novac"], agent_env(port, fp)) as agent:
                first.wait_log("agent agent-1 registered")
                payload = bytes(range(256)) * 4096
                assert echo_roundtrip(route, payload) == payload
                for c in (first, agent):
                    _assert_hardened(docker, c)

                args = ["run", "--rm", *HARDENED]
                for key, value in agent_env(port, fp, "agent-check").items():
                    args += ["-e", f"{key}={value}"]
                done = docker(*args, tag, "novac", "--check", check=False)
                assert done.returncode == 0, done.stdout + done.stderr
                wrong = docker(*args, "-e", "NOVAC_TOKEN=not-the-token-at-all", tag, "novac", "--check", check=False)
                assert wrong.returncode == 4, wrong.stdout + wrong.stderr  # registration refused

                assert _stop_during_a_stream(first, route) == 0, first.text()[-3000:]

                with container(docker, tag, ["novas"], env, keep) as second:
                    second.wait_log("NOVAS listening")
                    assert "generated self-signed certificate" not in second.text()
                    assert second.fingerprint() == fp
                    second.wait_log("agent agent-1 registered", timeout=60)
                    assert echo_roundtrip(route, b"same certificate") == b"same certificate"
                    assert _stop_during_a_stream(agent, route) == 0, agent.text()[-3000:]
                    assert second.stop() == 0, second.text()[-3000:]


def test_image_postgresql_audit_store(image: tuple[Docker, str]) -> None:
    docker, tag = image
    port, route = free_port(), free_port()
    with target("echo") as echo, postgres_server() as (pg, bindir):
        dsn = f"postgresql://nova@127.0.0.1:{pg}/postgres"
        # No state volume: the audit history lives in PostgreSQL, the certificate in /tmp.
        env = server_env(port, route, echo, NOVAS_AUDIT_DB=dsn, NOVAS_STATE_DIR="/tmp/state")
        with container(docker, tag, ["novas"], env) as server:
            server.wait_log("NOVAS listening")
            with container(docker, tag, ["novac"], agent_env(port, server.fingerprint(), "pg-agent")):
                server.wait_log("agent pg-agent registered")
                assert echo_roundtrip(route, b"audited") == b"audited"
                psql = [str(bindir / "psql"), "-h", "127.0.0.1", "-p", str(pg), "-U", "nova", "-d", "postgres", "-At"]

                def audited() -> bool:
                    tables = subprocess.run([*psql, "-c", "\\dt"], capture_output=True, text=True).stdout
                    if not tables.strip():
                        return False
                    dump = subprocess.run(
                        [str(bindir / "pg_dump"), "-h", "127.0.0.1", "-p", str(pg), "-U", "nova", "-a", "postgres"],
                        capture_output=True,
                        text=True,
                    ).stdout
                    return "pg-agent" in dump

                wait_for(audited, 30, "the agent's registration in the PostgreSQL audit store")


# --- Compose -----------------------------------------------------------------------


def _compose_tool() -> list[str]:
    tool = shutil.which("docker-compose")
    assert tool, "docker-compose is not installed: test.sh and .ci/run install it (Debian package: docker-compose)"
    return [tool]


def test_compose_health_checks_pass(image: tuple[Docker, str], tmp_path: Path) -> None:
    """
    Both Compose files, under Debian's docker-compose (v1): the containers
    become healthy. What the test changes in a copy of each file, and only
    that: the host's network (the test machines have no bridge) instead of
    published ports, a 2 s health-check interval, and an open-files limit
    below this machine's hard limit (20,000).
    """
    docker, tag = image
    agent_port, route = free_port(), free_port()
    files = {}
    for name in ("novas", "novac"):
        data = yaml.safe_load((ROOT / "etc" / "docker" / f"{name}-compose.yml").read_text())
        service = data["services"][name]
        service["build"]["context"] = str(ROOT)
        service.pop("ports", None)  # meaningless (and refused) on the host's network
        service["network_mode"] = "host"
        service["healthcheck"] |= {"interval": "2s", "start_period": "30s"}
        service["ulimits"] = {"nofile": {"soft": 8192, "hard": 8192}}
        path = tmp_path / f"{name}-compose.yml"
        path.write_text(yaml.safe_dump(data))
        files[name] = path
    project = f"novatest{uuid.uuid4().hex[:6]}"
    with target("echo") as echo:
        env = docker.env | {
            "NOVA_VERSION": tag.split(":")[1],
            "NOVAS_AGENT_PORT": str(agent_port),
            "NOVAS_AGENT_TOKEN": TOKEN,
            "NOVAS_ADMIN_TOKEN": ADMIN_TOKEN,
            "NOVAS_ADMIN_PORT": str(free_port()),
            "NOVAS_ROUTES": f"127.0.0.1:{route}:127.0.0.1:{echo}",
            "NOVAC_HEALTH_PORT": str(free_port()),
            "NOVAC_SERVER": f"127.0.0.1:{agent_port}",
            "NOVAC_TOKEN": TOKEN,
            "NOVAC_NAME": "compose-agent",
        }

        def compose(name: str, *args: str, **kw: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [*_compose_tool(), "-p", f"{project}{name}", "-f", str(files[name]), "--profile", name, *args],
                env=env | kw,
                capture_output=True,
                text=True,
                timeout=180,
            )

        try:
            up = compose("novas", "up", "-d", "--no-build")
            assert up.returncode == 0, up.stdout + up.stderr
            novas = Container(docker, "nova-novas")
            novas.wait_log("NOVAS listening")
            up = compose("novac", "up", "-d", "--no-build", NOVAC_TLS_FINGERPRINT=novas.fingerprint())
            assert up.returncode == 0, up.stdout + up.stderr

            def healthy(name: str) -> bool:
                state = docker.inspect(name)["State"]
                assert state["Status"] == "running", Container(docker, name).text()[-3000:]
                return bool(state.get("Health", {}).get("Status") == "healthy")

            wait_for(lambda: healthy("nova-novas") and healthy("nova-novac"), 90, "both containers to be healthy")
            assert echo_roundtrip(route, b"composed") == b"composed"
            for name in ("nova-novas", "nova-novac"):
                host = docker.inspect(name)["HostConfig"]
                assert host["ReadonlyRootfs"] is True and host["CapDrop"] == ["ALL"]
                assert host["RestartPolicy"]["Name"] == "always"
        finally:
            for name in ("novac", "novas"):
                compose(name, "down", "-v", "-t", "45", NOVAC_TLS_FINGERPRINT="x")


def test_compose_files_name_the_compose_version() -> None:
    for name in ("novas", "novac"):
        text = (ROOT / "etc" / "docker" / f"{name}-compose.yml").read_text()
        assert "docker-compose" in text and "v1" in text and "v2" in text
