"""
The tunnel's life cycle with real processes on loopback: servers that die,
networks that stall or cut idle connections, graceful drain, several servers.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from .processes import TOKEN, Proc, Relay, echo_roundtrip, fingerprint, free_port, novac, novas, target, wait_for

pytestmark = pytest.mark.integration

FAST = {"KEEPALIVE": "1", "DEAD_TIMEOUT": "3"}


def fast(prefix: str) -> dict[str, str]:
    return {f"{prefix}_{k}": v for k, v in FAST.items()}


def count(text: str, needle: str) -> int:
    return text.count(needle)


def test_server_killed_mid_transfer_then_back(tmp_path: Path) -> None:
    route = free_port()
    with target("echo") as echo:
        with novas(tmp_path, [f"{route}:127.0.0.1:{echo}"]) as (server, port):
            pin = fingerprint(server)
            with novac(tmp_path, {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": pin}) as agent:
                server.wait_log("agent agent-1 registered")
                user = socket.create_connection(("127.0.0.1", route), timeout=10)
                user.sendall(b"x" * 100_000)
                got = 0
                while got < 100_000:
                    got += len(user.recv(65536))
                server.proc.send_signal(signal.SIGKILL)
                server.proc.wait(10)
                # The user's connection ends at once instead of hanging.
                user.settimeout(10)
                try:
                    while user.recv(65536):
                        pass
                except ConnectionResetError:
                    pass
                user.close()
                agent.wait_log("tunnel to 127.0.0.1")
                # NOVAS comes back on the same port and state dir (same certificate).
                env = {
                    "NOVAS_AGENT_TOKEN": TOKEN,
                    "NOVAS_AGENT_PORT": str(port),
                    "NOVAS_STATE_DIR": str(tmp_path / "state"),
                    "NOVAS_ROUTES": f"{route}:127.0.0.1:{echo}",
                    "NOVAS_ADMIN_PORT": "off",
                }
                again = Proc("novas", [], env, tmp_path / "novas-again.log")
                try:
                    again.wait_log("agent agent-1 registered", timeout=40)
                    assert echo_roundtrip(route, b"after restart") == b"after restart"
                finally:
                    again.stop()


def test_stalled_network_detected_on_both_sides(tmp_path: Path) -> None:
    with novas(tmp_path, [], fast("NOVAS")) as (server, port):
        relay = Relay(port)
        try:
            env = {"NOVAC_SERVER": f"127.0.0.1:{relay.port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server)}
            with novac(tmp_path, env | fast("NOVAC")) as agent:
                server.wait_log("agent agent-1 registered")
                time.sleep(2.5)  # an absence over time: pings flow, nothing is dropped
                assert "dropping the tunnel" not in server.text() + agent.text()
                stalled_at = time.monotonic()
                relay.stalled.set()
                server.wait_log("nothing heard from the peer", timeout=10)
                agent.wait_log("nothing heard from the peer", timeout=10)
                assert time.monotonic() - stalled_at < 3 + 3  # dead timeout plus scheduling slack
                assert "agent agent-1 disconnected" in server.text()
                relay.stalled.clear()
                wait_for(lambda: count(server.text(), "agent agent-1 registered") == 2, 20, "re-registration")
        finally:
            relay.close()


def test_keepalive_keeps_a_tunnel_through_an_idle_cutting_balancer(tmp_path: Path) -> None:
    route = free_port()
    with target("echo") as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}"], fast("NOVAS")) as (server, port):
        relay = Relay(port, idle_cut=2.5)
        try:
            env = {"NOVAC_SERVER": f"127.0.0.1:{relay.port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server)}
            with novac(tmp_path, env | fast("NOVAC")):
                server.wait_log("agent agent-1 registered")
                time.sleep(8)  # not a wait for an event: idle well past the relay's idle cut
                assert relay.cuts == 0
                assert count(server.text(), "registered") == 1
                assert echo_roundtrip(route, b"still here") == b"still here"
        finally:
            relay.close()


def test_idle_cut_without_keepalive_is_what_we_guard_against(tmp_path: Path) -> None:
    """The control experiment: with a keepalive longer than the cut, it is cut."""
    slow = {"NOVAS_KEEPALIVE": "20", "NOVAS_DEAD_TIMEOUT": "60"}
    with novas(tmp_path, [], slow) as (server, port):
        relay = Relay(port, idle_cut=2)
        try:
            env = {"NOVAC_SERVER": f"127.0.0.1:{relay.port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server)}
            with novac(tmp_path, env | {"NOVAC_KEEPALIVE": "20", "NOVAC_DEAD_TIMEOUT": "60"}):
                server.wait_log("agent agent-1 registered")
                wait_for(lambda: relay.cuts >= 1, 10, "the relay to cut the idle tunnel")
        finally:
            relay.close()


def _slow_upload(port: int, payload: bytes, seconds: float, out: dict[str, bytes]) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        step = len(payload) // 20
        for i in range(0, len(payload), step):
            s.sendall(payload[i : i + step])
            time.sleep(seconds / 20)  # the input under test: a slow upload
        s.shutdown(socket.SHUT_WR)
        reply = b""
        while data := s.recv(4096):
            reply += data
        out["reply"] = reply


def test_sigterm_drains_then_exits_zero(tmp_path: Path) -> None:
    route = free_port()
    with target("digest") as digest, novas(tmp_path, [f"{route}:127.0.0.1:{digest}@team=db"]) as (server, port):
        env = {
            "NOVAC_SERVER": f"127.0.0.1:{port}",
            "NOVAC_TLS_FINGERPRINT": fingerprint(server),
            "NOVAC_TAGS": "team=db",
            "NOVAC_DRAIN_TIMEOUT": "20",
        }
        with novac(tmp_path, env, name="agent-a") as a:
            server.wait_log("agent agent-a registered")
            payload = os.urandom(2 * 1024 * 1024)
            out: dict[str, bytes] = {}
            upload = threading.Thread(target=_slow_upload, args=(route, payload, 4.0, out))
            upload.start()
            server.wait_log("through agent-a")
            with novac(tmp_path, env, name="agent-b"):
                server.wait_log("agent agent-b registered")
                started = time.monotonic()
                a.proc.send_signal(signal.SIGTERM)
                server.wait_log("agent-a is going away")
                # New connections go to the other agent while agent-a drains.
                with socket.create_connection(("127.0.0.1", route), timeout=10) as s:
                    s.sendall(b"new")
                    s.shutdown(socket.SHUT_WR)
                    assert s.recv(4096) == f"3 {hashlib.sha256(b'new').hexdigest()}\n".encode()
                assert server.text().count("through agent-b") == 1
                upload.join(60)
                assert out["reply"] == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()
                assert a.proc.wait(30) == 0
                assert time.monotonic() - started < 20
            # With no agent left, new connections are refused (closed at once).
            wait_for(lambda: "agent agent-b disconnected" in server.text(), 20, "agent-b to leave")
            with socket.create_connection(("127.0.0.1", route), timeout=10) as s:
                assert s.recv(10) == b""


def test_one_server_down_does_not_delay_the_other(tmp_path: Path) -> None:
    route, dead = free_port(), free_port()
    with target("echo") as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}"]) as (server, port):
        env = {
            "NOVAC_SERVER": f"127.0.0.1:{dead},127.0.0.1:{port}",
            "NOVAC_TLS_FINGERPRINT": fingerprint(server),
        }
        started = time.monotonic()
        with novac(tmp_path, env):
            server.wait_log("agent agent-1 registered", timeout=10)
            assert time.monotonic() - started < 8
            assert echo_roundtrip(route, b"ok") == b"ok"


def test_novas_sigterm_exits_zero_and_agents_come_back_promptly(tmp_path: Path) -> None:
    with novas(tmp_path, []) as (server, port):
        pin = fingerprint(server)
        with novac(tmp_path, {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": pin}) as agent:
            server.wait_log("agent agent-1 registered")
            server.proc.send_signal(signal.SIGTERM)
            assert server.proc.wait(20) == 0
            agent.wait_log("is going away")
            env = {
                "NOVAS_AGENT_TOKEN": TOKEN,
                "NOVAS_AGENT_PORT": str(port),
                "NOVAS_STATE_DIR": str(tmp_path / "state"),
                "NOVAS_ADMIN_PORT": "off",
            }
            again = Proc("novas", [], env, tmp_path / "novas-again.log")
            try:
                again.wait_log("NOVAS listening")
                up = time.monotonic()
                again.wait_log("agent agent-1 registered", timeout=40)
                # Backoff after a server's GOAWAY starts from the bottom again.
                assert time.monotonic() - up < 16
            finally:
                again.stop()


def test_novas_shutdown_does_not_wait_for_an_idle_agent_that_never_closes(tmp_path: Path) -> None:
    with novas(tmp_path, []) as (server, port):
        env = {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server)}
        with novac(tmp_path, env) as agent:
            server.wait_log("agent agent-1 registered")
            # A frozen agent answers neither the GOAWAY nor the TLS close.
            agent.proc.send_signal(signal.SIGSTOP)
            try:
                server.proc.send_signal(signal.SIGTERM)
                # NOVAS used to wait its 10 s close timeout for this agent.
                assert server.proc.wait(8) == 0
            finally:
                agent.proc.send_signal(signal.SIGCONT)
            assert "without waiting for its TLS close" in server.text()
            # The GOAWAY was written before the drop: the agent knows to come back soon.
            agent.wait_log("is going away")


def test_novas_shutdown_still_lets_a_stream_in_flight_finish(tmp_path: Path) -> None:
    route = free_port()
    with target("digest") as digest, novas(tmp_path, [f"{route}:127.0.0.1:{digest}@team=db"]) as (server, port):
        env = {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server)}
        with novac(tmp_path, env | {"NOVAC_TAGS": "team=db"}, name="busy"), novac(tmp_path, env, name="frozen") as idle:
            server.wait_log("agent busy registered")
            server.wait_log("agent frozen registered")
            idle.proc.send_signal(signal.SIGSTOP)
            try:
                payload = os.urandom(2 * 1024 * 1024)
                out: dict[str, bytes] = {}
                upload = threading.Thread(target=_slow_upload, args=(route, payload, 4.0, out))
                upload.start()
                server.wait_log("through busy")
                server.proc.send_signal(signal.SIGTERM)
                upload.join(60)
                assert server.proc.wait(30) == 0
            finally:
                idle.proc.send_signal(signal.SIGCONT)
            assert out["reply"] == f"{len(payload)} {hashlib.sha256(payload).hexdigest()}\n".encode()
            assert "agent frozen disconnected: dropped without waiting for its TLS close" in server.text()
