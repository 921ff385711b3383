"""
NOVAS and NOVAC as real processes over loopback TLS, carrying real TCP.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from . import harness
from .pki import CA
from .processes import TOKEN, echo_roundtrip, fingerprint, free_port, novac, novas, redis_server, target

pytestmark = pytest.mark.integration


def _pinned(server_port: int, server_log: object) -> dict[str, str]:
    return {
        "NOVAC_SERVER": f"127.0.0.1:{server_port}",
        "NOVAC_TLS_FINGERPRINT": fingerprint(server_log),  # type: ignore[arg-type]
    }


def test_64_mib_through_one_stream(tmp_path: Path) -> None:
    route = free_port()
    with target("echo") as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}"]) as (server, port):
        with novac(tmp_path, _pinned(port, server)):
            server.wait_log("agent agent-1 registered")
            payload = os.urandom(1 << 20) * 64
            back = echo_roundtrip(route, payload, timeout=120)
            assert len(back) == len(payload)
            assert hashlib.sha256(back).digest() == hashlib.sha256(payload).digest()


def test_100_concurrent_streams(tmp_path: Path) -> None:
    route = free_port()
    with target("echo") as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}"]) as (server, port):
        with novac(tmp_path, _pinned(port, server)):
            server.wait_log("agent agent-1 registered")
            payloads = [os.urandom(256 * 1024 + i) for i in range(100)]
            with ThreadPoolExecutor(100) as pool:
                results = list(pool.map(lambda p: echo_roundtrip(route, p), payloads))
            for sent, got in zip(payloads, results, strict=True):
                assert hashlib.sha256(got).hexdigest() == hashlib.sha256(sent).hexdigest()


def test_half_close_client_still_gets_the_reply(tmp_path: Path) -> None:
    route = free_port()
    with target("digest") as digest, novas(tmp_path, [f"{route}:127.0.0.1:{digest}"]) as (server, port):
        with novac(tmp_path, _pinned(port, server)):
            server.wait_log("agent agent-1 registered")
            request = os.urandom(3 * 1024 * 1024)
            with socket.create_connection(("127.0.0.1", route), timeout=30) as s:
                s.sendall(request)
                s.shutdown(socket.SHUT_WR)
                reply = b""
                while data := s.recv(4096):
                    reply += data
            assert reply == f"{len(request)} {hashlib.sha256(request).hexdigest()}\n".encode()


def test_wrong_token_rejected_and_never_logged(tmp_path: Path) -> None:
    route = free_port()
    with target("echo") as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}"]) as (server, port):
        env = _pinned(port, server) | {"NOVAC_TOKEN": "wrong-token-abcdef"}
        with novac(tmp_path, env) as agent:
            agent.wait_log("AUTH_FAILED")
            server.wait_log("(claiming to be 'agent-1'): AUTH_FAILED")
            # With no agent registered the route closes the connection at once.
            with socket.create_connection(("127.0.0.1", route), timeout=10) as s:
                assert s.recv(10) == b""
            server.wait_log("no agent matches")
        for log in (server.text(), agent.text()):
            assert TOKEN not in log
            assert "wrong-token-abcdef" not in log


def test_unverifiable_certificate_refused(tmp_path: Path) -> None:
    ca = CA()
    cert, key = ca.issue("localhost", "127.0.0.1").write(tmp_path, "server")
    stranger = CA("not the server's CA").write(tmp_path)
    tls = {"NOVAS_TLS_CERT": str(cert), "NOVAS_TLS_KEY": str(key)}
    with novas(tmp_path, [], tls) as (server, port):
        env = {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_CA": str(stranger)}
        with novac(tmp_path, env) as agent:
            agent.wait_log("ended before registration")
            assert "certificate verify failed" in agent.text()
        assert "registered" not in server.text()
        # The same server, verified with its real CA, is accepted.
        env["NOVAC_TLS_CA"] = str(ca.write(tmp_path))
        with novac(tmp_path, env, name="agent-2"):
            server.wait_log("agent agent-2 registered")


def test_target_refused_closes_user_connection(tmp_path: Path) -> None:
    route, closed = free_port(), free_port()
    with novas(tmp_path, [f"{route}:127.0.0.1:{closed}"]) as (server, port):
        with novac(tmp_path, _pinned(port, server)) as agent:
            server.wait_log("agent agent-1 registered")
            with socket.create_connection(("127.0.0.1", route), timeout=10) as s:
                assert s.recv(10) == b""
            server.wait_log("REFUSED")
            agent.wait_log("cannot connect to 127.0.0.1")


def test_selector_picks_the_agent_with_the_tags(tmp_path: Path) -> None:
    route = free_port()
    with target("echo") as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}@env=prod"]) as (server, port):
        env = _pinned(port, server)
        with novac(tmp_path, env | {"NOVAC_TAGS": "env=dev"}, name="dev-agent"):
            server.wait_log("agent dev-agent registered")
            with socket.create_connection(("127.0.0.1", route), timeout=10) as s:
                assert s.recv(10) == b""  # no prod agent yet
            with novac(tmp_path, env | {"NOVAC_TAGS": "env=prod;team=db"}, name="prod-agent"):
                server.wait_log("agent prod-agent registered")
                assert echo_roundtrip(route, b"hello") == b"hello"
                server.wait_log("through prod-agent")


@pytest.mark.parametrize(
    ("plugin", "env", "message"),
    [
        ("novas", {}, "--agent-token / NOVAS_AGENT_TOKEN (or --agent-token-file) is required"),
        ("novas", {"NOVAS_AGENT_TOKEN": TOKEN, "NOVAS_AGENT_PORT": "99999"}, "between 1 and 65535"),
        ("novas", {"NOVAS_AGENT_TOKEN": "fifteen-chars!!"}, "NOVAS_AGENT_TOKEN: every token must be at least 16"),
        ("novac", {"NOVAC_SERVER": "a:1", "NOVAC_TLS": "off", "NOVAC_TOKEN": "fifteen-chars!!"}, "at least 16"),
        ("novas", {"NOVAS_AGENT_TOKEN": TOKEN, "NOVAS_ROUTES": "5432:db"}, "is not [BIND:]PORT:HOST:HOSTPORT"),
        ("novac", {"NOVAC_TOKEN": TOKEN}, "--server / NOVAC_SERVER is required"),
        ("novac", {"NOVAC_TOKEN": TOKEN, "NOVAC_SERVER": "a:1"}, "cannot verify the server"),
        ("novac", {"NOVAC_SERVER": "a:1", "NOVAC_TLS": "off"}, "--token / NOVAC_TOKEN is required"),
        ("novac", {"NOVAC_SERVER": "a:1", "NOVAC_TLS": "maybe"}, "NOVAC_TLS must be on or off"),
    ],
)
def test_bad_configuration_is_one_clear_line(plugin: str, env: dict[str, str], message: str) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("NOVAS_", "NOVAC_"))}
    result = subprocess.run(
        [sys.executable, "-m", "twisted", plugin],
        env=clean | env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [f"{plugin}: error: " + result.stderr.split(": error: ", 1)[1].strip()]
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert TOKEN not in result.stderr
    assert "fifteen-chars!!" not in result.stderr + result.stdout


def test_redis_cli_ping_through_the_tunnel(tmp_path: Path) -> None:
    assert shutil.which("redis-server") and shutil.which("redis-cli"), ".ci/run installs redis"
    route = free_port()
    with redis_server() as redis_port, novas(tmp_path, [f"{route}:127.0.0.1:{redis_port}"]) as (server, port):
        with novac(tmp_path, _pinned(port, server)):
            server.wait_log("agent agent-1 registered")
            out = subprocess.run(["redis-cli", "-p", str(route), "ping"], capture_output=True, text=True, timeout=30)
            assert out.stdout.strip() == "PONG"
            subprocess.run(["redis-cli", "-p", str(route), "set", "k", "through-nova"], check=True, timeout=30)
            out = subprocess.run(
                ["redis-cli", "-p", str(route), "get", "k"], capture_output=True, text=True, timeout=30
            )
            assert out.stdout.strip() == "through-nova"


def test_iperf3_through_the_tunnel(tmp_path: Path) -> None:
    assert shutil.which("iperf3"), ".ci/run installs iperf3"
    iperf_port, route = free_port(), free_port()
    # --forceflush: its "Server listening" line reaches the log at once.
    argv = ["iperf3", "-s", "-p", str(iperf_port), "-B", "127.0.0.1", "-1", "--forceflush"]
    iperf = harness.Proc("iperf3", argv, tmp_path / "iperf3.log")
    try:
        iperf.wait_log("Server listening on")
        with novas(tmp_path, [f"{route}:127.0.0.1:{iperf_port}"]) as (server, port):
            with novac(tmp_path, _pinned(port, server)):
                server.wait_log("agent agent-1 registered")
                out = subprocess.run(
                    ["iperf3", "-c", "127.0.0.1", "-p", str(route), "-t", "2", "-J"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                )
                assert out.returncode == 0, out.stdout + out.stderr
                assert '"sum_received"' in out.stdout
    finally:
        iperf.stop()
