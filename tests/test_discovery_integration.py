"""
Discovery with real processes (docs/cluster.md, "Discovery"): three NOVAS
that name each other as members (through the test-only members file, until
the cluster wiring does it) behind a small round-robin TCP balancer written
here, one NOVAC whose only server is the balancer.  And version 1 both ways:
a raw version-1 agent (tests/rawagent.py) against NOVAS, NOVAC against a raw
version-1 server.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest

from nova.wire.codec import FrameDecoder
from nova.wire.frames import Auth, Hello, Ping, Pong, Welcome, encode

from .processes import (
    TOKEN,
    Postgres,
    Proc,
    Relay,
    echo_roundtrip,
    fingerprint,
    free_port,
    novac,
    novas,
    target,
    tunnels,
    wait_for,
)
from .rawagent import RawAgent

pytestmark = pytest.mark.integration


def registered_on(server: Proc, name: str) -> bool:
    try:
        return any(t["name"] == name for t in tunnels(server))
    except OSError:
        return False


def test_one_agent_reaches_every_server_behind_the_balancer(tmp_path: Path) -> None:
    ids = ["novas-a", "novas-b", "novas-c"]
    members = {sid: tmp_path / f"{sid}.members" for sid in ids}
    for sid, path in members.items():
        path.write_text("\n".join([sid, *ids]) + "\n")
    with ExitStack() as stack:
        echo = stack.enter_context(target("echo"))
        servers: dict[str, Proc] = {}
        ports: dict[str, int] = {}
        routes: dict[str, int] = {}
        for sid in ids:
            state = tmp_path / sid
            if servers:  # one certificate for the cluster, as behind a real balancer
                shutil.copytree(tmp_path / ids[0] / "tls", state / "tls")
            routes[sid] = free_port()
            env = {"NOVAS_STATE_DIR": str(state), "NOVA_TEST_MEMBERS_FILE": str(members[sid])}
            servers[sid], ports[sid] = stack.enter_context(novas(tmp_path, [f"{routes[sid]}:127.0.0.1:{echo}"], env))
        a, b, c = (ports[sid] for sid in ids)
        balancer = Relay([a, a, b, b, c])  # every server is met twice in a row: duplicates
        stack.callback(balancer.close)
        env = {
            "NOVAC_SERVER": f"127.0.0.1:{balancer.port}",
            "NOVAC_TLS_FINGERPRINT": fingerprint(servers["novas-a"]),
            "NOVAC_RECONNECT_INITIAL": "0.5",
            "NOVAC_RECONNECT_MAX": "2",
        }
        agent = stack.enter_context(novac(tmp_path, env))

        # Registered on every server, through the one address.
        wait_for(lambda: all(registered_on(s, "agent-1") for s in servers.values()), 60, "the agent on every server")
        assert "already holds a tunnel of agent-1" in agent.text()  # the duplicates were closed
        for sid in ids:
            [t] = [t for t in tunnels(servers[sid]) if t["name"] == "agent-1"]
            assert t["negotiated_version"] == 2
            payload = sid.encode() * 1000
            assert echo_roundtrip(routes[sid], payload) == payload

        # Satisfied: the agent stops dialling.
        settled = balancer.connections
        time.sleep(5)  # a negative check: that nothing happens for a while
        assert balancer.connections == settled

        # novas-c is killed; the balancer's health check takes it out.
        servers["novas-c"].proc.kill()
        servers["novas-c"].proc.wait()
        balancer.down.add(c)
        wait_for(
            lambda: any("closed" in line and "(server novas-c)" in line for line in agent.text().splitlines()),
            30,
            "the agent's tunnel to novas-c to close",
        )
        wait_for(lambda: balancer.connections > settled + 1, 30, "the agent dialling for novas-c")
        # The survivors' cluster view drops it: MEMBERS, and the agent stops.
        for sid in ("novas-a", "novas-b"):
            members[sid].write_text(f"{sid}\nnovas-a\nnovas-b\n")
        agent.wait_log("names 2 member(s)")
        time.sleep(3)  # a dial that was already scheduled may still happen
        stopped = balancer.connections
        time.sleep(6)
        assert balancer.connections == stopped
        assert registered_on(servers["novas-a"], "agent-1") and registered_on(servers["novas-b"], "agent-1")


def test_a_version_1_agent_registers_with_a_version_2_server(tmp_path: Path) -> None:
    with novas(tmp_path, [], {"NOVAS_TLS": "off"}) as (server, port):
        raw = RawAgent(port, tls=False)
        try:
            nonce = raw.hello()
            from nova.wire.handshake import make_auth

            raw.send_frame(make_auth(TOKEN.encode(), nonce, b"", "old-agent", (), 65536))  # version 1
            # A version-1 agent parses only version 1: its decoder refuses anything else.
            raw.decoder = FrameDecoder(max_version=1)
            welcome = raw.next_frame()
            assert isinstance(welcome, Welcome) and welcome.version == 1
            Welcome.parse(0, b"".join(welcome.payload()))  # exactly the version-1 layout
            [t] = tunnels(server)
            assert t["name"] == "old-agent" and t["negotiated_version"] == 1
            raw.send_frame(Ping(b"12345678"))
            assert raw.next_frame() == Pong(b"12345678")
        finally:
            raw.close()


class Version1Server:
    """
    A raw NOVAS of version 1 (plaintext): HELLO without an offer, a decoder
    that knows only version 1, a version-1 WELCOME, then PONG to every PING.
    What it saw (or why it failed) goes to C{seen}.
    """

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.2)
        self.port: int = self.listener.getsockname()[1]
        self.seen: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self.stop.is_set():
            try:
                conn, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                self._converse(conn)
            except Exception as e:  # a version-2 frame, say: the test reports it
                self.seen.append(f"error: {e}")
            finally:
                conn.close()

    def _converse(self, conn: socket.socket) -> None:
        decoder = FrameDecoder(max_version=1)
        conn.sendall(b"".join(encode(Hello(bytes(32)))))
        conn.settimeout(0.2)
        while not self.stop.is_set():
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            if not data:
                return
            for frame in decoder.feed(data):
                if isinstance(frame, Auth):
                    self.seen.append(f"AUTH version {frame.version}")
                    conn.sendall(b"".join(encode(Welcome(65536, 15000, "old-server"))))
                elif isinstance(frame, Ping):
                    conn.sendall(b"".join(encode(Pong(frame.opaque))))

    def close(self) -> None:
        self.stop.set()
        self.listener.close()
        self.thread.join(5)


@contextmanager
def version_1_server() -> Iterator[tuple[int, list[str]]]:
    server = Version1Server()
    try:
        yield server.port, server.seen
    finally:
        server.close()


def test_novac_registers_with_a_version_1_server(tmp_path: Path) -> None:
    with version_1_server() as (port, seen):
        env = {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS": "off", "NOVAC_KEEPALIVE": "1"}
        with novac(tmp_path, env) as agent:
            agent.wait_log("registered with 127.0.0.1:")
            time.sleep(3)  # keepalives go back and forth; a single tunnel, no discovery dials
            assert seen == ["AUTH version 1"], seen
            assert "dialling 127.0.0.1" not in agent.text()  # a cluster of one: no discovery dials


def test_a_postgresql_cluster_names_its_members_to_the_agent(tmp_path: Path, postgres: Postgres) -> None:
    """The real membership view, not the test hook: two NOVAS on one PostgreSQL behind the balancer."""
    with ExitStack() as stack:
        servers: dict[str, Proc] = {}
        ports: dict[str, int] = {}
        for sid in ("novas-a", "novas-b"):
            home = tmp_path / sid
            if servers:
                shutil.copytree(tmp_path / "novas-a" / "state" / "tls", home / "state" / "tls")
            env = {
                "NOVAS_AUDIT_DB": postgres.dsn,
                "NOVAS_SERVER_ID": sid,
                "NOVAS_ADVERTISE_ADDRESS": f"{sid}.test:9022",
                "NOVAS_CLUSTER_DEAD_TIMEOUT": "3",
            }
            home.mkdir(exist_ok=True)
            servers[sid], ports[sid] = stack.enter_context(novas(home, [], env))
        balancer = Relay([ports["novas-a"], ports["novas-b"]])
        stack.callback(balancer.close)
        env = {
            "NOVAC_SERVER": f"127.0.0.1:{balancer.port}",
            "NOVAC_TLS_FINGERPRINT": fingerprint(servers["novas-a"]),
            "NOVAC_RECONNECT_INITIAL": "0.5",
            "NOVAC_RECONNECT_MAX": "2",
        }
        agent = stack.enter_context(novac(tmp_path, env))
        wait_for(lambda: all(registered_on(s, "agent-1") for s in servers.values()), 60, "the agent on both servers")
        # novas-b is killed; once its rows expire, novas-a stops naming it.
        servers["novas-b"].proc.kill()
        servers["novas-b"].proc.wait()
        balancer.down.add(ports["novas-b"])
        agent.wait_log("names 1 member(s): novas-a", timeout=60)
        time.sleep(3)  # a dial that was already scheduled may still happen
        stopped = balancer.connections
        time.sleep(6)  # a negative check: no more dials
        assert balancer.connections == stopped
