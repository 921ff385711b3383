"""
Discovery with real processes (docs/cluster.md, "Discovery"): three NOVAS
that form a real cluster (one PostgreSQL, a short cluster dead timeout)
behind a small round-robin TCP balancer (tests/processes.Relay), one NOVAC
whose only server is the balancer: it reaches every member, closes
duplicates, stops dialling when it holds them all, and follows the
cluster's membership as a member dies and comes back.  And version 1 both
ways: a raw version-1 agent (tests/rawagent.py) against NOVAS, NOVAC
against a raw version-1 server.
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

IDS = ("novas-a", "novas-b", "novas-c")


def held_by(server: Proc, sid: str, name: str = "agent-1") -> list[dict[str, object]]:
    """The tunnels of C{name} that C{server} (member C{sid}) holds itself (the API lists the cluster's)."""
    try:
        return [t for t in tunnels(server) if t["name"] == name and t.get("server", sid) == sid]
    except OSError:
        return []


class Cluster:
    """Members of one cluster on a PostgreSQL, each with a route to C{echo}; a member can die and come back."""

    def __init__(self, stack: ExitStack, tmp: Path, postgres: Postgres, echo: int) -> None:
        self.stack, self.tmp, self.postgres, self.echo = stack, tmp, postgres, echo
        self.servers: dict[str, Proc] = {}
        self.ports: dict[str, int] = {}
        self.routes: dict[str, int] = {}
        self._stops: dict[str, ExitStack] = {}

    def start(self, sid: str) -> None:
        home = self.tmp / sid
        first = self.tmp / IDS[0] / "state" / "tls"
        if sid != IDS[0] and not (home / "state" / "tls").exists():
            shutil.copytree(first, home / "state" / "tls")  # one certificate, as behind a real balancer
        home.mkdir(exist_ok=True)
        self.routes.setdefault(sid, free_port())
        env = {
            "NOVAS_AUDIT_DB": self.postgres.dsn,
            "NOVAS_SERVER_ID": sid,
            "NOVAS_ADVERTISE_ADDRESS": f"{sid}.test:9022",
            "NOVAS_CLUSTER_DEAD_TIMEOUT": "3",
        }
        own = ExitStack()
        self.servers[sid], self.ports[sid] = own.enter_context(
            novas(home, [f"{self.routes[sid]}:127.0.0.1:{self.echo}"], env)
        )
        self._stops[sid] = own
        self.stack.callback(own.close)

    def kill(self, sid: str) -> None:
        self.servers[sid].proc.kill()
        self.servers[sid].proc.wait()
        self._stops.pop(sid).close()


def test_one_agent_reaches_every_member_behind_the_balancer(tmp_path: Path, postgres: Postgres) -> None:
    with ExitStack() as stack:
        cluster = Cluster(stack, tmp_path, postgres, stack.enter_context(target("echo")))
        for sid in IDS:
            cluster.start(sid)
        servers, ports = cluster.servers, cluster.ports
        a, b, c = (ports[sid] for sid in IDS)
        balancer = Relay([a, a, b, b, c])  # every server is met twice in a row: duplicates
        stack.callback(balancer.close)
        env = {
            "NOVAC_SERVER": f"127.0.0.1:{balancer.port}",
            "NOVAC_TLS_FINGERPRINT": fingerprint(servers["novas-a"]),
            "NOVAC_RECONNECT_INITIAL": "0.5",
            "NOVAC_RECONNECT_MAX": "2",
        }
        agent = stack.enter_context(novac(tmp_path, env))

        # Registered on every member, through the one address (the members
        # came from the cluster's view: nothing else names them).
        wait_for(lambda: all(held_by(servers[sid], sid) for sid in IDS), 60, "the agent on every server")
        assert "already holds a tunnel of agent-1" in agent.text()  # the duplicates were closed
        for sid in IDS:
            [t] = held_by(servers[sid], sid)
            assert t["negotiated_version"] == 2
            payload = sid.encode() * 1000
            assert echo_roundtrip(cluster.routes[sid], payload) == payload

        # Satisfied: the agent stops dialling.
        settled = balancer.connections
        time.sleep(5)  # a negative check: that nothing happens for a while
        assert balancer.connections == settled

        # novas-c is killed; the balancer's health check takes it out.
        cluster.kill("novas-c")
        balancer.down.add(c)
        wait_for(
            lambda: any("closed" in line and "(server novas-c)" in line for line in agent.text().splitlines()),
            30,
            "the agent's tunnel to novas-c to close",
        )
        wait_for(lambda: balancer.connections > settled + 1, 30, "the agent dialling for novas-c")
        # Its rows expire (the dead timeout): the survivors stop naming it, and the agent stops dialling.
        agent.wait_log("names 2 member(s)", timeout=60)
        time.sleep(3)  # a dial that was already scheduled may still happen
        stopped = balancer.connections
        time.sleep(6)  # a negative check: no more dials
        assert balancer.connections == stopped
        assert held_by(servers["novas-a"], "novas-a") and held_by(servers["novas-b"], "novas-b")

        # novas-c comes back (a new port, as a replaced pod): once the
        # survivors name it again the agent dials for it, and reaches it.
        cluster.start("novas-c")
        balancer.order = [cluster.ports["novas-c"] if p == c else p for p in balancer.order]
        wait_for(lambda: bool(held_by(servers["novas-c"], "novas-c")), 60, "the agent back on novas-c")
        assert "for member(s) novas-c (newly named)" in agent.text()
        payload = b"back" * 1000
        assert echo_roundtrip(cluster.routes["novas-c"], payload) == payload
        for sid in IDS:
            assert len(held_by(servers[sid], sid)) == 1  # one tunnel per member, no leftover duplicate


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
