"""
The three tunnels being compared, and the local targets behind them.

- L{nova_pair}: NOVAS and one NOVAC as real processes (C{python -m twisted
  novas|novac}), TLS on with NOVAS's self-signed certificate pinned by
  fingerprint, one route per target.
- L{ssh_pair}: a private sshd on a free loopback port (generated host key,
  generated user key in authorized_keys) and one C{ssh -N -R} connection
  carrying one remote forward per target.
- L{go_pair}: the Go peer (C{bench/goyamux}, TLS 1.3 + hashicorp/yamux, one
  session, frp's data path), built by L{build_goyamux}.

In all three, the route ports listen on the "server" side and the agent side
(NOVAC, the ssh client, the Go agent) dials the targets, exactly like C{ssh
-R}.  A L{Placement} says where each side runs: both here on loopback
(L{LOCAL}), or in the two network namespaces of a shaped link, the agent and
the targets in one ("the private network"), the server and the clients in
the other, so that the tunnel itself crosses the link.
"""

from __future__ import annotations

import getpass
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from harness import (
    HERE,
    LOOPBACK,
    BenchError,
    Proc,
    Side,
    Unavailable,
    clean_env,
    free_port,
    listening_ports,
    log,
    run_tool,
    wait_until,
)

TOKEN = "nova-bench-token-4f1b9c2e7a"
TWIST = [sys.executable, "-m", "twisted", "--log-format=text"]
SSHD = "/usr/sbin/sshd"
SSH_CIPHER = "aes128-gcm@openssh.com"
REGISTERED = re.compile(r"agent (\S+) registered from")
GOYAMUX_SOURCE = Path(__file__).resolve().parent / "goyamux"


@dataclass(frozen=True)
class Placement:
    """Where each side of a tunnel runs."""

    server: Side  # NOVAS, sshd, the Go server, and the clients (iperf3 -c, redis-benchmark)
    agent: Side  # NOVAC, the ssh client, the Go agent, and the targets
    server_addr: str  # the address the server side listens on for the agent


LOCAL = Placement(HERE, HERE, LOOPBACK)


@dataclass(frozen=True)
class Targets:
    iperf_port: int
    redis_port: int


@contextmanager
def local_targets(work: Path, where: Placement = LOCAL, label: str = "") -> Iterator[Targets]:
    """A redis-server and an C{iperf3 -s} on free loopback ports, on the agent's side."""
    redis_port, iperf_port = free_port(), free_port()
    redis = Proc(
        f"redis-server{label}",
        where.agent.argv([
            "redis-server",
            "--bind", LOOPBACK,
            "--port", str(redis_port),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "no",
            "--daemonize", "no",
            "--dir", str(work),
        ]),
        work / f"redis-server{label}.log",
    )  # fmt: skip
    iperf = Proc(
        f"iperf3-server{label}",
        where.agent.argv(["iperf3", "-s", "-B", LOOPBACK, "-p", str(iperf_port)]),
        work / f"iperf3-server{label}.log",
    )
    try:
        wait_until(lambda: _listening(redis, redis_port), 20, "redis-server to listen")
        wait_until(lambda: _listening(iperf, iperf_port), 20, "iperf3 -s to listen")
        yield Targets(iperf_port=iperf_port, redis_port=redis_port)
    finally:
        iperf.stop()
        redis.stop()


def _listening(proc: Proc, port: int) -> bool:
    proc.check_alive()
    return port in listening_ports(proc.pid)


# NOVA.


class Novas:
    """One NOVAS process (TLS, self-signed certificate in C{state_dir})."""

    def __init__(
        self,
        work: Path,
        agent_port: int,
        state_dir: Path,
        routes: Sequence[str] = (),
        label: str = "novas",
        extra_env: dict[str, str] | None = None,
        side: Side = HERE,
    ) -> None:
        args: list[str] = []
        for route in routes:
            args += ["--route", route]
        env = clean_env(
            {
                "NOVAS_AGENT_TOKEN": TOKEN,
                "NOVAS_AGENT_PORT": str(agent_port),
                "NOVAS_AGENT_BIND": LOOPBACK,
                "NOVAS_STATE_DIR": str(state_dir),
                # No admin port: the default, 9023, may be taken (a demo, a
                # real NOVAS, another run), and nothing here reads it.
                "NOVAS_ADMIN_PORT": "off",
                **(extra_env or {}),
            }
        )
        self.agent_port = agent_port
        self.proc = Proc(label, side.argv([*TWIST, "novas", *args]), work / f"{label}.log", env=env, cwd=work)

    def wait_listening(self, timeout: float = 60.0) -> float:
        return self.proc.wait_log("NOVAS listening", timeout)

    def fingerprint(self) -> str:
        for word in self.proc.text().split():
            if word.startswith("NOVAC_TLS_FINGERPRINT="):
                return word.split("=", 1)[1]
        raise BenchError(f"NOVAS did not log its certificate fingerprint:\n{self.proc.tail()}")

    def registered_names(self) -> set[str]:
        return set(REGISTERED.findall(self.proc.text()))

    def stop(self) -> int | None:
        return self.proc.stop()


def start_novac(
    work: Path,
    agent_port: int,
    fingerprint: str,
    name: str,
    extra_env: dict[str, str] | None = None,
    side: Side = HERE,
    server_host: str = LOOPBACK,
) -> Proc:
    env = clean_env(
        {
            "NOVAC_SERVER": f"{server_host}:{agent_port}",
            "NOVAC_TOKEN": TOKEN,
            "NOVAC_NAME": name,
            "NOVAC_TLS_FINGERPRINT": fingerprint,
            **(extra_env or {}),
        }
    )
    return Proc(f"novac-{name}", side.argv([*TWIST, "novac"]), work / f"novac-{name}.log", env=env, cwd=work)


@dataclass
class Tunnel:
    """A running tunnel: route port for each target port, and the processes (server side, agent side)."""

    kind: str
    routes: dict[int, int]
    server: Proc
    agent: Proc

    def check_alive(self) -> None:
        self.server.check_alive()
        self.agent.check_alive()


@contextmanager
def nova_pair(
    work: Path, target_ports: Sequence[int], agent_name: str = "bench-agent", where: Placement = LOCAL, label: str = ""
) -> Iterator[Tunnel]:
    routes = {target: free_port() for target in target_ports}
    novas = Novas(
        work,
        free_port(),
        work / f"novas-state{label}",
        [f"{route}:{LOOPBACK}:{target}" for target, route in routes.items()],
        label=f"novas-pair{label}",
        extra_env={"NOVAS_AGENT_BIND": where.server_addr},
        side=where.server,
    )
    novac: Proc | None = None
    try:
        novas.wait_listening()
        novac = start_novac(
            work, novas.agent_port, novas.fingerprint(), agent_name, side=where.agent, server_host=where.server_addr
        )
        novas.proc.wait_log(f"agent {agent_name} registered", 60)
        wait_until(lambda: set(routes.values()) <= listening_ports(novas.proc.pid), 20, "NOVA route ports to listen")
        log(f"NOVA tunnel up: NOVAS pid {novas.proc.pid}, NOVAC pid {novac.pid}, routes {routes}")
        yield Tunnel("nova", routes, novas.proc, novac)
    finally:
        if novac is not None:
            novac.stop()
        novas.stop()


# OpenSSH.

SSHD_CONFIG = """\
# Private sshd for the NOVA benchmark: loopback only, public keys only.
Port {port}
ListenAddress {bind}
HostKey {dir}/ssh_host_ed25519_key
PidFile none
AuthorizedKeysFile {dir}/authorized_keys
PermitRootLogin prohibit-password
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
AllowTcpForwarding yes
GatewayPorts no
X11Forwarding no
AllowAgentForwarding no
PermitTTY no
PrintMotd no
UseDNS no
LogLevel INFO
"""


@contextmanager
def ssh_pair(work: Path, target_ports: Sequence[int], where: Placement = LOCAL, label: str = "") -> Iterator[Tunnel]:
    """A private sshd and one C{ssh -N -R} connection with a remote forward per target."""
    d = work / f"ssh{label}"
    d.mkdir(mode=0o700)
    host_key, user_key = d / "ssh_host_ed25519_key", d / "id_ed25519"
    for key in (host_key, user_key):
        run_tool(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "nova-bench", "-f", str(key)], 30, "ssh-keygen")
    (d / "authorized_keys").write_text(user_key.with_suffix(".pub").read_text())
    os.chmod(d / "authorized_keys", 0o600)
    port = free_port()
    config = d / "sshd_config"
    config.write_text(SSHD_CONFIG.format(port=port, bind=where.server_addr, dir=d))
    if os.geteuid() == 0:
        # sshd's privilege separation needs this directory (made at boot by systemd normally).
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    routes = {target: free_port() for target in target_ports}
    sshd = Proc(f"sshd{label}", where.server.argv([SSHD, "-f", str(config), "-D", "-e"]), work / f"sshd{label}.log")
    client: Proc | None = None
    try:
        sshd.wait_log(f"Server listening on {where.server_addr} port {port}", 20)
        forwards: list[str] = []
        for target, route in routes.items():
            forwards += ["-R", f"{route}:{LOOPBACK}:{target}"]
        client = Proc(
            f"ssh-R{label}",
            where.agent.argv([
                "ssh", "-F", "/dev/null",
                "-i", str(user_key),
                "-p", str(port),
                "-o", "StrictHostKeyChecking=no",
                "-o", "UserKnownHostsFile=/dev/null",
                "-o", "BatchMode=yes",
                "-o", "IdentitiesOnly=yes",
                "-o", "ExitOnForwardFailure=yes",
                "-o", "Compression=no",
                "-c", SSH_CIPHER,
                "-N", *forwards,
                f"{getpass.getuser()}@{where.server_addr}",
            ]),
            work / f"ssh-client{label}.log",
        )  # fmt: skip

        def up() -> bool:
            assert client is not None
            client.check_alive()
            sshd.check_alive()
            return set(routes.values()) <= listening_ports(sshd.pid)

        wait_until(up, 30, "ssh -R forwards to listen")
        log(f"ssh -R tunnel up: sshd pid {sshd.pid}, ssh pid {client.pid}, routes {routes}")
        yield Tunnel("ssh", routes, sshd, client)
    finally:
        if client is not None:
            client.stop()
        sshd.stop()


# The Go peer.

# Debian's golang-github-hashicorp-yamux-dev puts the package's source here;
# the build runs in GOPATH mode against it, offline.
DEBIAN_GOPATH = "/usr/share/gocode"


def build_goyamux(work: Path) -> Path:
    """
    Build C{bench/goyamux} into the work directory; L{Unavailable} (with the
    reason) when Go or the yamux package is missing.  C{GOYAMUX_GOPATH}
    overrides where hashicorp/yamux is looked for (C{GOPATH/src/github.com/hashicorp/yamux}).
    """
    go = shutil.which("go")
    if go is None:
        raise Unavailable("go not found (Debian/Ubuntu: apt-get install golang-go golang-github-hashicorp-yamux-dev)")
    gopath = os.environ.get("GOYAMUX_GOPATH", DEBIAN_GOPATH)
    if not (Path(gopath) / "src/github.com/hashicorp/yamux").is_dir():
        raise Unavailable(
            f"hashicorp/yamux not found under {gopath}/src (Debian/Ubuntu: apt-get install"
            " golang-github-hashicorp-yamux-dev, or set GOYAMUX_GOPATH)"
        )
    out = work / "goyamux"
    env = {
        **os.environ,
        "GO111MODULE": "off",
        "GOPATH": gopath,
        "GOFLAGS": "",
        "GOPROXY": "off",
    }
    if not env.get("GOCACHE") and not env.get("HOME") and not env.get("XDG_CACHE_HOME"):
        env["GOCACHE"] = str(work / "go-cache")
    try:
        done = subprocess.run(
            [go, "build", "-o", str(out), "."],
            cwd=GOYAMUX_SOURCE,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
    except subprocess.TimeoutExpired:
        raise BenchError("go build of bench/goyamux timed out after 300s") from None
    if done.returncode != 0:
        raise BenchError(
            f"go build of bench/goyamux failed ({done.returncode}):\n{(done.stderr or done.stdout)[-2000:]}"
        )
    return out


@contextmanager
def go_pair(
    work: Path, binary: Path, target_ports: Sequence[int], where: Placement = LOCAL, label: str = ""
) -> Iterator[Tunnel]:
    """The Go server (route ports, agent port) and the Go agent, one TLS 1.3 connection, one yamux session."""
    routes = {target: free_port() for target in target_ports}
    agent_port = free_port()
    args: list[str] = []
    for target, route in routes.items():
        args += ["-route", f"{LOOPBACK}:{route}={LOOPBACK}:{target}"]
    server = Proc(
        f"go-server{label}",
        where.server.argv([str(binary), "server", "-agent", f"{where.server_addr}:{agent_port}", *args]),
        work / f"go-server{label}.log",
    )
    agent: Proc | None = None
    try:
        server.wait_log("listening for the agent", 20)
        match = re.search(r"fingerprint (sha256:[0-9a-f]+)", server.text())
        if match is None:
            raise BenchError(f"the Go server did not print its fingerprint:\n{server.tail()}")
        agent = Proc(
            f"go-agent{label}",
            where.agent.argv(
                [str(binary), "agent", "-server", f"{where.server_addr}:{agent_port}", "-fingerprint", match[1]]
            ),
            work / f"go-agent{label}.log",
        )
        server.wait_log("agent connected", 30)
        wait_until(lambda: set(routes.values()) <= listening_ports(server.pid), 20, "Go route ports to listen")
        agent.check_alive()
        log(f"Go tunnel up: server pid {server.pid}, agent pid {agent.pid}, routes {routes}")
        yield Tunnel("go", routes, server, agent)
    finally:
        if agent is not None:
            agent.stop()
        server.stop()
