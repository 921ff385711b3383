"""
High availability and the SOCKS5 entry with real processes and real
clients: curl, ssh through nc's SOCKS proxy mode, replicas killed mid-load.
"""

from __future__ import annotations

import getpass
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from .pki import CA
from .processes import (
    Proc,
    echo_roundtrip,
    fingerprint,
    free_port,
    http_server,
    novac,
    novas,
    sshd,
    target,
    wait_for,
)

pytestmark = pytest.mark.integration

PASSWORD = "socks-pass-7f3a-2b9c"


def agent_env(server: Proc, port: int, tags: str = "") -> dict[str, str]:
    return {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server), "NOVAC_TAGS": tags}


def test_curl_socks5_hostname_with_selector_and_password(tmp_path: Path) -> None:
    assert shutil.which("curl"), ".ci/run installs curl"
    socks = free_port()
    env = {"NOVAS_SOCKS_PORT": str(socks), "NOVAS_SOCKS_PASSWORD": PASSWORD}
    with http_server(b"private page\n") as web, novas(tmp_path, [], env) as (server, port):
        with novac(tmp_path, agent_env(server, port, "Env=Production"), name="prod-1"):
            server.wait_log("agent prod-1 registered")
            out = subprocess.run(
                [
                    "curl", "-sS", "--max-time", "20",
                    "--socks5-hostname", f"127.0.0.1:{socks}",
                    "-U", f"Env=Production:{PASSWORD}",
                    f"http://localhost:{web}/",
                ],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert out.stdout == "private page\n", out.stderr
            # The name went to the agent unresolved.
            assert f"connected to localhost:{web} through prod-1" in server.text()
            # No agent matches: a clean SOCKS failure, not a hang.
            out = subprocess.run(
                [
                    "curl", "-sS", "--max-time", "20",
                    "--socks5-hostname", f"127.0.0.1:{socks}",
                    "-U", f"Env=Staging:{PASSWORD}",
                    f"http://localhost:{web}/",
                ],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert out.returncode == 97, out  # curl: proxy handshake error
            assert out.stderr.rstrip().endswith("(3)"), out.stderr  # reply 3: network unreachable
            server.wait_log("no agent matches Env=Staging")
            # A wrong password is refused.
            out = subprocess.run(
                ["curl", "-sS", "--max-time", "20", "--socks5-hostname", f"127.0.0.1:{socks}",
                 "-U", "Env=Production:wrong", f"http://localhost:{web}/"],
                capture_output=True, text=True, timeout=30,
            )  # fmt: skip
            assert out.returncode == 97 and out.stdout == ""
            assert PASSWORD not in server.text()


def test_ssh_through_socks_proxycommand(tmp_path: Path) -> None:
    assert shutil.which("nc") and shutil.which("ssh"), ".ci/run installs netcat-openbsd and openssh-client"
    socks = free_port()
    with sshd(tmp_path) as (ssh_port, key), novas(tmp_path, [], {"NOVAS_SOCKS_PORT": str(socks)}) as (server, port):
        with novac(tmp_path, agent_env(server, port, "role=bastion")):
            server.wait_log("agent agent-1 registered")
            out = subprocess.run(
                [
                    "ssh", "-F", "/dev/null", "-i", str(key), "-p", str(ssh_port),
                    "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes",
                    "-o", f"ProxyCommand=nc -X 5 -x 127.0.0.1:{socks} %h %p",
                    f"{getpass.getuser()}@localhost", "echo", "through-nova",
                ],
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert out.stdout.strip() == "through-nova", out.stderr


def test_replica_killed_under_load_only_its_inflight_connections_fail(tmp_path: Path) -> None:
    route = free_port()
    with target("echo") as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}@app=db"]) as (server, port):
        env = agent_env(server, port, "app=db")
        with novac(tmp_path, env, name="replica-a") as a, novac(tmp_path, env, name="replica-b"):
            server.wait_log("agent replica-a registered")
            server.wait_log("agent replica-b registered")
            results: list[tuple[float, bool]] = []
            stop = threading.Event()

            def load() -> None:
                while not stop.is_set():
                    try:
                        ok = echo_roundtrip(route, b"ping" * 256, timeout=10) == b"ping" * 256
                    except OSError:
                        ok = False
                    results.append((time.monotonic(), ok))

            workers = [threading.Thread(target=load) for _ in range(4)]
            for w in workers:
                w.start()
            wait_for(lambda: len(results) >= 20, 30, "the load to flow through both replicas")
            killed_at = time.monotonic()
            a.proc.send_signal(signal.SIGKILL)
            wait_for(lambda: sum(t > killed_at + 0.5 for t, _ in results) >= 20, 30, "connections after the kill")
            stop.set()
            for w in workers:
                w.join(30)
            before = [ok for t, ok in results if t < killed_at]
            after = [ok for t, ok in results if t > killed_at + 0.5]
            assert before and all(before)
            # Connections begun after the kill all succeed through replica-b.
            assert after and all(after), f"{after.count(False)} of {len(after)} failed after the kill"
            # At most the connections in flight on replica-a (4 workers) failed.
            assert sum(1 for _, ok in results if not ok) <= 4
            assert "replica-a disconnected" in server.text()


def test_two_servers_route_independently_through_the_same_agent(tmp_path: Path) -> None:
    ca = CA()
    cert, key = ca.issue("localhost", "127.0.0.1").write(tmp_path, "server")
    tls = {"NOVAS_TLS_CERT": str(cert), "NOVAS_TLS_KEY": str(key)}
    route1, route2 = free_port(), free_port()
    with target("echo") as echo, novas(tmp_path, [f"{route1}:127.0.0.1:{echo}"], tls) as (s1, p1):
        with novas(tmp_path, [f"{route2}:127.0.0.1:{echo}"], tls) as (s2, p2):
            env = {"NOVAC_SERVER": f"127.0.0.1:{p1},127.0.0.1:{p2}", "NOVAC_TLS_CA": str(ca.write(tmp_path))}
            with novac(tmp_path, env):
                s1.wait_log("agent agent-1 registered")
                s2.wait_log("agent agent-1 registered")
                assert echo_roundtrip(route1, b"one") == b"one"
                assert echo_roundtrip(route2, b"two") == b"two"
                s1.stop()
                # The other server keeps routing through the same agent.
                assert echo_roundtrip(route2, b"still two") == b"still two"
