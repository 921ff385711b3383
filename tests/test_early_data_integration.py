"""
Data may follow OPEN (protocol.md §7.2) with real processes: real clients
through a route (redis-cli, psql), refused and denied targets, and the
feature against raw peers both ways: a raw version-1 (or version-2 without the
bit) agent gets nothing before its OPEN_OK from NOVAS; NOVAC against a raw
version-1 server works as before and against a raw version-2 server that
overruns the budget ends the tunnel with PROTOCOL_ERROR.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nova.wire.codec import FrameDecoder
from nova.wire.errors import ErrorCode
from nova.wire.frames import (
    EARLY_DATA_BUDGET,
    FEATURE_EARLY_DATA,
    Auth,
    Data,
    Frame,
    GoAway,
    Hello,
    Open,
    OpenOk,
    Ping,
    Pong,
    Welcome,
    encode,
)
from nova.wire.handshake import make_auth

from .processes import TOKEN, free_port, novac, novas, postgres_server, redis_server, target, wait_for
from .rawagent import RawAgent

pytestmark = pytest.mark.integration

PLAIN_S = {"NOVAS_TLS": "off"}


def plain_agent(port: int, **extra: str) -> dict[str, str]:
    return {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS": "off", **extra}


def user(port: int, payload: bytes) -> bytes:
    """Connect to a route, send C{payload} at once, half-close, read until the far end closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:
            pass
        return out


# Real clients through a route (both sides version 2, the feature in use).


def test_redis_cli_and_psql_through_a_route(tmp_path: Path) -> None:
    assert shutil.which("redis-cli"), ".ci/run installs redis"
    redis_route, pg_route = free_port(), free_port()
    with redis_server() as redis_port, postgres_server() as (pg_port, bindir):
        routes = [f"{redis_route}:127.0.0.1:{redis_port}", f"{pg_route}:127.0.0.1:{pg_port}"]
        with novas(tmp_path, routes, PLAIN_S) as (server, port), novac(tmp_path, plain_agent(port)):
            server.wait_log("agent agent-1 registered")
            for _ in range(3):
                out = subprocess.run(["redis-cli", "-p", str(redis_route), "ping"], capture_output=True, timeout=30)
                assert out.stdout.strip() == b"PONG"
            psql = [str(bindir / "psql"), "-X", "-A", "-t", "-h", "127.0.0.1", "-p", str(pg_route), "-U", "nova"]
            out = subprocess.run([*psql, "-d", "postgres", "-c", "SELECT 40 + 2"], capture_output=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert out.stdout.strip() == b"42"


def test_refused_and_denied_targets_close_the_user_and_leak_nothing(tmp_path: Path) -> None:
    dead, denied_port = free_port(), free_port()
    r_dead, r_denied, r_echo = free_port(), free_port(), free_port()
    with target() as echo:
        routes = [f"{r_dead}:127.0.0.1:{dead}", f"{r_denied}:127.0.0.1:{denied_port}", f"{r_echo}:127.0.0.1:{echo}"]
        allow = f"127.0.0.1/32:{dead},127.0.0.1/32:{echo}"
        with novas(tmp_path, routes, PLAIN_S) as (server, port), novac(tmp_path, plain_agent(port, NOVAC_ALLOW=allow)):
            server.wait_log("agent agent-1 registered")
            assert user(r_dead, b"secret-1" * 100) == b""
            server.wait_log("REFUSED")
            assert user(r_denied, b"secret-2" * 100) == b""
            server.wait_log("DENIED")
            for i in range(3):
                mine = f"only mine {i}".encode() * 50
                assert user(r_echo, mine) == mine
            assert "cannot reach" in server.text()


def test_users_that_send_and_close_or_reset_at_once_disturb_nobody(tmp_path: Path) -> None:
    """
    NOVAS reads a new connection's first bytes as it opens the stream
    (nova.server.listener, EntryConnection._read_now): a user whose bytes,
    end of file or reset are all there by then still gets its bytes through
    and its half-close respected, a reset one is dropped, and the next user
    is served as ever.
    """
    route = free_port()
    with target() as echo:
        with (
            novas(tmp_path, [f"{route}:127.0.0.1:{echo}"], PLAIN_S) as (server, port),
            novac(tmp_path, plain_agent(port)),
        ):
            server.wait_log("agent agent-1 registered")
            for i in range(20):
                mine = f"sent with the connect {i}".encode()
                assert user(route, mine) == mine
                s = socket.create_connection(("127.0.0.1", route), timeout=30)
                s.sendall(b"and reset at once" * 100)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.close()  # RST
            assert user(route, b"still served") == b"still served"
            assert server.popen.poll() is None


# NOVAS against raw agents that do not take data after OPEN.


@pytest.mark.parametrize("version", [1, 2])
def test_an_agent_without_the_feature_gets_nothing_before_its_open_ok(tmp_path: Path, version: int) -> None:
    route = free_port()
    with target() as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}"], PLAIN_S) as (_server, port):
        raw = RawAgent(port, tls=False)
        try:
            nonce = raw.hello()
            # Version 2 without the bit, or version 1 (which parses only version 1).
            raw.send_frame(make_auth(TOKEN.encode(), nonce, b"", "old-agent", (), 65536, version, 0))
            raw.decoder = FrameDecoder(max_version=version)
            welcome = raw.next_frame()
            assert isinstance(welcome, Welcome) and welcome.features == 0
            with socket.create_connection(("127.0.0.1", route), timeout=30) as s:
                s.sendall(b"first bytes")
                opened = raw.next_frame()
                assert isinstance(opened, Open)
                with pytest.raises(TimeoutError):
                    raw.next_frame(timeout=1.0)  # no DATA before OPEN_OK
                raw.send_frame(OpenOk(opened.stream_id))
                assert raw.next_frame() == Data(opened.stream_id, b"first bytes")
        finally:
            raw.close()


def test_novas_sends_at_most_the_budget_before_open_ok(tmp_path: Path) -> None:
    route = free_port()
    with target() as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}"], PLAIN_S) as (_server, port):
        raw = RawAgent(port, tls=False)
        try:
            nonce = raw.hello()
            raw.send_frame(make_auth(TOKEN.encode(), nonce, b"", "new-agent", (), 256 * 1024, 2, FEATURE_EARLY_DATA))
            raw.decoder = FrameDecoder(max_version=2)
            welcome = raw.next_frame()
            assert isinstance(welcome, Welcome) and welcome.features & FEATURE_EARLY_DATA
            payload = bytes(range(256)) * 1024  # 256 KiB, sent at once
            with socket.create_connection(("127.0.0.1", route), timeout=30) as s:
                s.sendall(payload)
                opened = raw.next_frame()
                assert isinstance(opened, Open)
                early = b""
                while len(early) < EARLY_DATA_BUDGET:
                    frame = raw.next_frame()
                    assert isinstance(frame, Data) and frame.stream_id == opened.stream_id, frame
                    early += frame.data
                assert early == payload[:EARLY_DATA_BUDGET]
                with pytest.raises(TimeoutError):
                    raw.next_frame(timeout=1.0)  # the budget is spent: the rest waits for OPEN_OK
                raw.send_frame(OpenOk(opened.stream_id))
                frame = raw.next_frame()
                assert isinstance(frame, Data) and payload[EARLY_DATA_BUDGET:].startswith(frame.data)
        finally:
            raw.close()


# NOVAC against raw servers.


class RawServer:
    """
    A raw NOVAS (plaintext) that registers one agent in C{version} with the
    server features C{features}, then runs C{script(conn, decoder)}; what
    the script returns (or why it failed) goes to C{result}.
    """

    def __init__(
        self, version: int, features: int, script: Callable[[socket.socket, FrameDecoder, list[Frame]], str]
    ) -> None:
        self.version, self.features, self.script = version, features, script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.listener.getsockname()[1]
        self.result: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        self.listener.settimeout(30)
        try:
            conn, _ = self.listener.accept()
        except OSError as e:
            self.result.append(f"error: {e}")
            return
        with conn:
            conn.settimeout(10)
            decoder = FrameDecoder(max_version=self.version)
            hello = Hello(bytes(32), self.version if self.version >= 2 else 0)
            conn.sendall(b"".join(encode(hello)))
            frames: list[Frame] = []
            try:
                auth = next_frame(conn, decoder, frames)
                assert isinstance(auth, Auth), auth
                decoder.max_version = auth.version
                if auth.version >= 2:
                    welcome = Welcome(256 * 1024, 15000, "raw", 2, self.features & auth.features, ("raw",))
                else:
                    welcome = Welcome(256 * 1024, 15000, "raw")
                conn.sendall(b"".join(encode(welcome)))
                self.result.append(self.script(conn, decoder, frames))
            except Exception as e:
                self.result.append(f"error: {e!r}")

    def close(self) -> None:
        self.listener.close()
        self.thread.join(30)


def next_frame(conn: socket.socket, decoder: FrameDecoder, pending: list[Frame]) -> Frame | None:
    """The next frame other than PING (answered), or None once the agent closed."""
    while True:
        while pending:
            frame = pending.pop(0)
            if isinstance(frame, Ping):
                conn.sendall(b"".join(encode(Pong(frame.opaque))))
                continue
            return frame
        data = conn.recv(65536)
        if not data:
            return None
        pending += decoder.feed(data)


@contextmanager
def raw_server(
    version: int, features: int, script: Callable[[socket.socket, FrameDecoder, list[Frame]], str]
) -> Iterator[RawServer]:
    server = RawServer(version, features, script)
    try:
        yield server
    finally:
        server.close()


def _echo_once(echo: int, early: bool) -> Callable[[socket.socket, FrameDecoder, list[Frame]], str]:
    def script(conn: socket.socket, decoder: FrameDecoder, frames: list[Frame]) -> str:
        frames_out: list[Frame] = [Open(1, "127.0.0.1", echo)]
        if early:
            frames_out.append(Data(1, b"ping"))
        conn.sendall(b"".join(p for f in frames_out for p in encode(f)))
        answer = next_frame(conn, decoder, frames)
        if not isinstance(answer, OpenOk):
            return f"expected OPEN_OK, got {answer}"
        if not early:
            conn.sendall(b"".join(encode(Data(1, b"ping"))))
        got = b""
        while len(got) < 4:
            frame = next_frame(conn, decoder, frames)
            if not isinstance(frame, Data):
                return f"expected DATA, got {frame}"
            got += frame.data
        return got.decode()

    return script


@pytest.mark.parametrize(("version", "features"), [(1, 0), (2, 0), (2, FEATURE_EARLY_DATA)])
def test_novac_streams_with_a_raw_server(tmp_path: Path, version: int, features: int) -> None:
    """Version 1 and version 2 without the bit wait for OPEN_OK; with the bit the DATA follows the OPEN."""
    with target() as echo, raw_server(version, features, _echo_once(echo, bool(features))) as server:
        with novac(tmp_path, plain_agent(server.port)):
            wait_for(lambda: bool(server.result), 30, "the raw server's script")
    assert server.result == ["ping"]


@contextmanager
def stalled_target() -> Iterator[int]:
    """
    A loopback port whose connects hang: a listener that never accepts, its
    backlog already full (Linux drops further SYNs, so the dialler waits).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port: int = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    try:
        yield port
    finally:
        for c in fillers:
            c.close()
        listener.close()


def test_novac_ends_the_tunnel_when_a_server_sends_more_than_the_budget(tmp_path: Path) -> None:
    def overrun(port: int) -> Callable[[socket.socket, FrameDecoder, list[Frame]], str]:
        def script(conn: socket.socket, decoder: FrameDecoder, frames: list[Frame]) -> str:
            # The whole budget, then one byte more, while the agent's connect is pending.
            out: list[Frame] = [Open(1, "127.0.0.1", port), Data(1, b"x" * EARLY_DATA_BUDGET), Data(1, b"x")]
            conn.sendall(b"".join(p for f in out for p in encode(f)))
            while (frame := next_frame(conn, decoder, frames)) is not None:
                if isinstance(frame, GoAway):
                    return frame.code.name
            return "closed without GOAWAY"

        return script

    with stalled_target() as port, raw_server(2, FEATURE_EARLY_DATA, overrun(port)) as server:
        with novac(tmp_path, plain_agent(server.port)) as agent:
            wait_for(lambda: bool(server.result), 30, "the raw server's script")
            agent.wait_log("PROTOCOL_ERROR")
    assert server.result == [ErrorCode.PROTOCOL_ERROR.name]
