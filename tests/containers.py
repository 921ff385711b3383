"""
What the deployment tests run on: a stand-in for the image's base (Debian
bookworm with python3, made by debootstrap, cached on this machine per day),
a Docker daemon of the tests' own (its own data root and socket, no bridge,
no iptables: containers use the host's network, i.e. loopback; overlay2
storage, or vfs where overlay2 cannot start), and the
image built from the repository's Dockerfile, its steps unchanged.

No container registry is reachable from the test machines, so python:3.11-slim
cannot be pulled: the stand-in tree is imported under that name into the
tests' daemon, and the same tree, copied, is what systemd-nspawn boots.

Everything slow happens once per test session (each helper below memoises
its result) and the tree and the daemon's data root are kept under
C{CACHE} so that the next session on the same machine reuses them.
"""

from __future__ import annotations

import atexit
import datetime
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest

from .processes import wait_for

ROOT = Path(__file__).parent.parent
CACHE = Path(os.environ.get("NOVA_TEST_CACHE", "/var/tmp/nova-test-base"))
SUITE = "bookworm"
# python3-venv: the Dockerfile makes a venv; systemd, dbus: the nspawn boot.
PACKAGES = ("python3", "python3-venv", "ca-certificates", "systemd", "systemd-sysv", "dbus")
# What the Dockerfile builds FROM by default (a build argument).
BASE_IMAGE = "python:3.11-slim"
IMAGE = "nova:test"
# This machine's hard limit on open files is 20,000: every container gets
# an explicit one below it.
NOFILE = "nofile=8192:8192"
# How the containers run in every test: as the image's user, read-only,
# with no capability and on the host's network (loopback only is used).
HARDENED = [
    "--network", "host", "--read-only", "--tmpfs", "/tmp", "--cap-drop", "ALL",
    "--security-opt", "no-new-privileges", "--ulimit", NOFILE,
]  # fmt: skip

_memo: dict[str, Any] = {}


def skip_loudly(why: str) -> None:
    """A skipped deployment check is a defect: say so where nobody can miss it."""
    message = f"DEPLOYMENT TESTS SKIPPED: {why}"
    print(f"\n{'!' * 78}\n{message}\n{'!' * 78}", file=sys.stderr)
    warnings.warn(message, stacklevel=2)
    pytest.skip(message)


def _mirror() -> str:
    """The Debian mirror this machine's apt uses (debootstrap needs the same)."""
    sources = Path("/etc/apt/sources.list.d")
    texts = [p.read_text() for p in sorted(sources.glob("*.sources"))] if sources.is_dir() else []
    for text in texts:
        for stanza in text.split("\n\n"):
            fields = dict(
                line.split(":", 1) for line in stanza.splitlines() if ":" in line and not line.startswith("#")
            )
            suites = fields.get("Suites", "").split()
            if SUITE in suites and "security" not in fields.get("URIs", ""):
                return fields["URIs"].split()[0].strip()
    listing = Path("/etc/apt/sources.list")
    if listing.exists():
        for line in listing.read_text().splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "deb" and words[-2:-1] != ["security"] and SUITE == words[2]:
                return words[1]
    return "http://deb.debian.org/debian"


class _Lock:
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a+")

    def __enter__(self) -> _Lock:
        fcntl.flock(self.file, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def tree_key() -> str:
    digest = hashlib.sha256(" ".join((SUITE, *PACKAGES)).encode()).hexdigest()[:10]
    return f"{datetime.date.today().isoformat()}-{digest}"


def stand_in_tree() -> Path:
    """The debootstrap'd bookworm tree, made at most once a day on this machine."""
    if "tree" in _memo:
        return _memo["tree"]  # type: ignore[no-any-return]
    if os.geteuid() != 0:
        skip_loudly("debootstrap, dockerd and systemd-nspawn need root")
    tool = shutil.which("debootstrap")
    assert tool, "debootstrap is not installed: test.sh and .ci/run install it (Debian package: debootstrap)"
    key = tree_key()
    home = CACHE / key
    tree = home / "rootfs"
    with _Lock(CACHE / "tree.lock"):
        if not (home / "done").exists():
            for old in CACHE.glob("20*-*"):
                if old != home:
                    shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(home, ignore_errors=True)
            home.mkdir(parents=True)
            partial = home / "partial"
            started = time.monotonic()
            done = subprocess.run(
                [tool, "--variant=minbase", f"--include={','.join(PACKAGES)}", SUITE, str(partial), _mirror()],
                capture_output=True,
                text=True,
                timeout=900,
            )
            assert done.returncode == 0, f"debootstrap failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            (partial / "var/cache/apt/archives").mkdir(parents=True, exist_ok=True)
            for deb in (partial / "var/cache/apt/archives").glob("*.deb"):
                deb.unlink()
            partial.rename(tree)
            (home / "done").write_text(f"{time.monotonic() - started:.0f} s\n")
    _memo["tree"] = tree
    return tree


def ca_bundle() -> Path:
    """The CA bundle this machine's pip trusts (PyPI may sit behind a TLS-inspecting proxy)."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return Path("/etc/ssl/certs/ca-certificates.crt")


# --- Docker ----------------------------------------------------------------------


class Docker:
    """The docker client bound to the tests' own daemon."""

    def __init__(self, socket: Path, client: str) -> None:
        self.socket = socket
        self.client = client
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER_")}
        self.env |= {"DOCKER_HOST": f"unix://{socket}", "DOCKER_BUILDKIT": "1"}

    def __call__(
        self, *args: str, check: bool = True, timeout: float = 120, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(
            [self.client, *args], env=self.env, capture_output=True, text=True, timeout=timeout, input=input
        )
        if check and done.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
        return done

    def logs(self, name: str) -> str:
        done = self("logs", name, check=False)
        return done.stdout + done.stderr

    def wait_log(self, name: str, needle: str, timeout: float = 30) -> None:
        def found() -> bool:
            if needle in self.logs(name):
                return True
            if self.inspect(name)["State"]["Status"] == "exited":
                raise AssertionError(f"{name} exited:\n{self.logs(name)[-4000:]}")
            return False

        wait_for(found, timeout, f"{needle!r} in the logs of {name}")

    def inspect(self, name: str) -> dict[str, Any]:
        return json.loads(self("inspect", name).stdout)[0]  # type: ignore[no-any-return]


def _client() -> str | None:
    # Debian's docker.io client builds with BuildKit itself; newer clients
    # need the buildx plugin for that, which Debian 12 does not ship.
    if Path("/usr/bin/docker").exists():
        return "/usr/bin/docker"
    return shutil.which("docker")


def docker_engine() -> Docker:
    """A dockerd of the tests' own, started once per session and stopped at exit."""
    if "docker" in _memo:
        return _memo["docker"]  # type: ignore[no-any-return]
    if os.geteuid() != 0:
        skip_loudly("dockerd needs root")
    dockerd, client = shutil.which("dockerd"), _client()
    assert dockerd and client, "dockerd is not installed: test.sh and .ci/run install it (Debian package: docker.io)"
    CACHE.mkdir(parents=True, exist_ok=True)
    # One daemon per slot; a second test session on the machine takes the next one.
    for slot in range(4):
        lock = open(CACHE / f"docker-{slot}.lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            continue
        break
    else:
        raise AssertionError(f"four test sessions already run a dockerd from {CACHE}")
    # Short paths: a unix socket's path must fit in 108 bytes.
    run = Path(f"/run/nova-test-docker-{hashlib.sha256(str(CACHE).encode()).hexdigest()[:6]}-{slot}")
    run.mkdir(parents=True, exist_ok=True)
    socket = run / "docker.sock"
    socket.unlink(missing_ok=True)
    docker = Docker(socket, client)
    logs = []
    # overlay2 where the kernel (or gVisor) offers it: a container then starts
    # in a second; vfs works everywhere but copies the whole image per container.
    forced = os.environ.get("NOVA_TEST_DOCKER_STORAGE")
    drivers = [forced] if forced else ["overlay2", "vfs"]
    for driver in drivers:
        log_path = CACHE / f"docker-{slot}-{driver}.log"
        log = open(log_path, "w")
        proc = subprocess.Popen(
            [dockerd, "--iptables=false", "--ip6tables=false", "--bridge=none", f"--storage-driver={driver}",
             f"--data-root={CACHE / f'docker-{slot}'}", f"--exec-root={run / 'exec'}", f"--pidfile={run / 'pid'}",
             f"--host=unix://{socket}", "--log-level=warn"],
            stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip

        def up(proc: subprocess.Popen[bytes] = proc) -> bool:
            return proc.poll() is not None or docker("version", check=False, timeout=10).returncode == 0

        wait_for(up, 60, "dockerd to start")
        log.close()
        if proc.poll() is None:
            break
        logs.append(f"--storage-driver={driver}: {log_path.read_text()[-1500:]}")
    else:
        lock.close()
        skip_loudly("dockerd could not start here:\n" + "\n".join(logs))

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        lock.close()

    atexit.register(stop)
    _memo["docker"] = docker
    return docker


def base_image(docker: Docker) -> str:
    """The stand-in tree imported as the Dockerfile's default base."""
    key = tree_key()
    done = docker("image", "inspect", "--format", '{{index .Config.Labels "nova.stand-in"}}', BASE_IMAGE, check=False)
    if done.returncode != 0 or done.stdout.strip() != key:
        tree = stand_in_tree()
        tar = subprocess.Popen(
            ["tar", "-C", str(tree), "--exclude=./usr/share/doc", "--exclude=./usr/share/man",
             "--exclude=./usr/share/locale", "--exclude=./var/lib/apt/lists/*", "-c", "."],
            stdout=subprocess.PIPE,
        )  # fmt: skip
        imported = subprocess.run(
            [docker.client, "import", "--change", f"LABEL nova.stand-in={key}", "-", BASE_IMAGE],
            stdin=tar.stdout,
            env=docker.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert tar.stdout is not None
        tar.stdout.close()
        assert tar.wait() == 0 and imported.returncode == 0, imported.stderr
    return BASE_IMAGE


def build_args() -> list[str]:
    """This machine's way to PyPI, handed to the build stage only (never stored in the image)."""
    args = ["--secret", f"id=ca,src={ca_bundle()}"]
    if os.environ.get("PIP_INDEX_URL"):
        args += ["--build-arg", f"PIP_INDEX_URL={os.environ['PIP_INDEX_URL']}"]
    return args


def nova_image() -> tuple[Docker, str]:
    """The image built from the Dockerfile, once per session."""
    if "image" in _memo:
        return _memo["image"]  # type: ignore[no-any-return]
    docker = docker_engine()
    base_image(docker)
    docker("build", "--progress=plain", "--network=host", *build_args(), "-t", IMAGE, str(ROOT), timeout=900)
    # The cache is kept from one session to the next: drop what this build replaced.
    docker("image", "prune", "--force", check=False)
    docker("builder", "prune", "--force", "--filter", "until=24h", check=False)
    _memo["image"] = (docker, IMAGE)
    return docker, IMAGE
