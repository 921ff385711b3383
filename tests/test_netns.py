"""
The deployment's topology, for real, in two network namespaces this test
makes (and removes): a "security" host and a "workloads" host joined by a
veth pair, 10.99.0.1/24 and 10.99.0.2/24. These are test hosts of the test's
own; no other non-loopback address is ever dialled.

The workloads host refuses every inbound connection (nftables in its
namespace drops new inbound connections) but may dial out, as a workloads
VPC behind PrivateLink. NOVAC there registers with NOVAS on the security
host; a client on the security host reaches a server on the workloads host
through a route, and only that way: a direct connection fails.

Needs root (network namespaces, nftables); skipped otherwise, saying why.
Every step has a timeout, so the test is bounded (about 10 s here).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from .harness import Proc, clean_env, in_netns
from .pki import CA
from .processes import ADMIN_TOKEN, TOKEN

pytestmark = pytest.mark.integration

SECURITY_ADDR = "10.99.0.1"
WORKLOADS_ADDR = "10.99.0.2"
AGENT_PORT = 9022
ADMIN_PORT = 9023
ROUTE_PORT = 15432
TARGET_PORT = 8080
SERVER_NAME = "novas.security.test"

# Workloads: new connections from outside are dropped; replies to its own
# connections and loopback pass.
FIREWALL = """
table inet nova_test {
  chain input {
    type filter hook input priority 0; policy accept;
    iifname "lo" accept
    ct state established,related accept
    ct state new drop
  }
}
"""

ECHO_SERVER = """
import socket, sys, threading
server = socket.create_server(("0.0.0.0", int(sys.argv[1])))
print("listening", flush=True)
def echo(conn):
    with conn:
        while data := conn.recv(65536):
            conn.sendall(data)
while True:
    conn, _ = server.accept()
    threading.Thread(target=echo, args=(conn,), daemon=True).start()
"""

CLIENT = """
import socket, sys
host, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(b"through the tunnel")
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    print("reply", data.decode())
except OSError as e:
    print("failed", type(e).__name__, e)
"""

ADMIN = """
import json, sys, urllib.request
req = urllib.request.Request(sys.argv[1], headers={"Authorization": "Bearer " + sys.argv[2]})
print(urllib.request.urlopen(req, timeout=5).read().decode())
"""


def _require() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces (ip netns add) and nftables rules are root-only")
    for tool, package in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package {package})")


def _run(*argv: str, timeout: float = 15, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): {done.stderr.strip()}")
    return done


def _in(ns: str, *argv: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return _run("ip", "netns", "exec", ns, *argv, timeout=timeout, check=False)


@contextmanager
def namespaces() -> Iterator[tuple[str, str]]:
    """Two namespaces joined by a veth pair; removed (with the pair) on the way out."""
    tag = f"{os.getpid() % 100000}"
    security, workloads = f"nova-sec-{tag}", f"nova-wl-{tag}"
    made: list[str] = []
    try:
        for ns in (security, workloads):
            done = _run("ip", "netns", "add", ns, check=False)
            if done.returncode != 0:
                pytest.skip(f"cannot make a network namespace here: {done.stderr.strip()}")
            made.append(ns)
        # The pair is made directly inside the namespaces: nothing appears
        # in this machine's own namespace.
        sec_if, wl_if = f"nvs{tag}", f"nvw{tag}"
        _run("ip", "link", "add", sec_if, "netns", security, "type", "veth", "peer", "name", wl_if, "netns", workloads)
        for ns, dev, addr in ((security, sec_if, SECURITY_ADDR), (workloads, wl_if, WORKLOADS_ADDR)):
            _run("ip", "-n", ns, "addr", "add", f"{addr}/24", "dev", dev)
            _run("ip", "-n", ns, "link", "set", dev, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
        yield security, workloads
    finally:
        for ns in reversed(made):
            _run("ip", "netns", "del", ns, check=False)


def ns_proc(ns: str, argv: list[str], env: dict[str, str], log: Path) -> Proc:
    """A process inside namespace C{ns}, its output in C{log}."""
    return Proc(log.stem, in_netns(ns, argv), log, env=clean_env(env))


def _twist(*args: str) -> list[str]:
    return [sys.executable, "-m", "twisted", "--log-format=text", *args]


def _connect(ns: str, host: str, port: int, timeout: float) -> str:
    done = _in(ns, sys.executable, "-c", CLIENT, host, str(port), str(timeout), timeout=timeout + 10)
    return done.stdout.strip() or done.stderr.strip()


def test_workloads_dial_out_only_and_users_reach_them_through_a_route(tmp_path: Path) -> None:
    _require()
    started = time.monotonic()
    ca = CA()
    cert, key = ca.issue(SERVER_NAME).write(tmp_path, "novas")
    ca_file = ca.write(tmp_path)
    procs: list[Proc] = []
    try:
        with namespaces() as (security, workloads):
            target = ns_proc(
                workloads, [sys.executable, "-c", ECHO_SERVER, str(TARGET_PORT)], {}, tmp_path / "target.log"
            )
            procs.append(target)
            target.wait_log("listening")

            # Before the firewall, the security host can reach the workloads
            # server directly: the path exists, only the rule will close it.
            assert _connect(security, WORKLOADS_ADDR, TARGET_PORT, 3) == "reply through the tunnel"
            done = subprocess.run(
                ["ip", "netns", "exec", workloads, "nft", "-f", "-"],
                input=FIREWALL,
                capture_output=True,
                text=True,
                timeout=10,
            )
            if done.returncode != 0:
                pytest.skip(f"nftables cannot filter inside a namespace here: {done.stderr.strip()}")
            direct = _connect(security, WORKLOADS_ADDR, TARGET_PORT, 1.5)
            assert direct.startswith("failed") and "timed out" in direct, direct

            server = ns_proc(
                security,
                _twist("novas"),
                {
                    "NOVAS_AGENT_TOKEN": TOKEN,
                    "NOVAS_AGENT_BIND": SECURITY_ADDR,
                    "NOVAS_AGENT_PORT": str(AGENT_PORT),
                    "NOVAS_TLS_CERT": str(cert),
                    "NOVAS_TLS_KEY": str(key),
                    "NOVAS_ADMIN_PORT": str(ADMIN_PORT),
                    "NOVAS_ADMIN_TOKEN": ADMIN_TOKEN,
                    "NOVAS_STATE_DIR": str(tmp_path / "state"),
                    "NOVAS_ROUTES": f"{ROUTE_PORT}:{WORKLOADS_ADDR}:{TARGET_PORT}@zone=workloads",
                },
                tmp_path / "novas.log",
            )
            procs.append(server)
            server.wait_log("NOVAS listening")

            agent_env = {
                "NOVAC_SERVER": f"{SECURITY_ADDR}:{AGENT_PORT}",
                "NOVAC_TOKEN": TOKEN,
                "NOVAC_TLS_CA": str(ca_file),
                # The dial address is not the certificate's name (as with a
                # PrivateLink endpoint's DNS name).
                "NOVAC_TLS_SERVER_NAME": SERVER_NAME,
                "NOVAC_NAME": "workloads-agent",
                "NOVAC_TAGS": "zone=workloads",
                "NOVAC_ALLOW": f"{WORKLOADS_ADDR}/32:{TARGET_PORT}",
                "NOVAC_CONNECT_TIMEOUT": "5",
            }
            # The connectivity check, from the workloads host.
            full = clean_env(agent_env)
            check = subprocess.run(
                ["ip", "netns", "exec", workloads, sys.executable, "-m", "twisted", "novac", "--check"],
                env=full,
                capture_output=True,
                text=True,
                timeout=40,
            )
            assert check.returncode == 0, check.stdout + check.stderr
            assert f"connected to {SECURITY_ADDR}:{AGENT_PORT}" in check.stdout
            assert f"name '{SERVER_NAME}' verified" in check.stdout

            agent = ns_proc(workloads, _twist("novac"), agent_env, tmp_path / "novac.log")
            procs.append(agent)
            server.wait_log("agent workloads-agent registered")

            # The registration, as the admin API shows it on the security host.
            listing = _in(
                security,
                sys.executable,
                "-c",
                ADMIN,
                f"http://127.0.0.1:{ADMIN_PORT}/api/v1/tunnels",
                ADMIN_TOKEN,
                timeout=15,
            )
            tunnels = json.loads(listing.stdout)
            tunnels = tunnels["tunnels"] if isinstance(tunnels, dict) else tunnels
            (entry,) = [t for t in tunnels if t["name"] == "workloads-agent"]
            assert WORKLOADS_ADDR in json.dumps(entry)

            # A user on the security host reaches the workloads server
            # through the route ...
            assert _connect(security, "127.0.0.1", ROUTE_PORT, 10) == "reply through the tunnel"
            server.wait_log("through workloads-agent")
            # ... and still not directly.
            direct = _connect(security, WORKLOADS_ADDR, TARGET_PORT, 1.5)
            assert direct.startswith("failed") and "timed out" in direct, direct

            for p in reversed(procs):
                p.stop()
            for name in ("novas.log", "novac.log"):
                text = (tmp_path / name).read_text()
                assert "Traceback" not in text and TOKEN not in text, text[-3000:]
    finally:
        for p in procs:
            p.stop()
    assert time.monotonic() - started < 60
