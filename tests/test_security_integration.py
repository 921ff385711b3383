"""
Security with real processes: token rotation, mutual TLS, throttling, and
the bad-input suite: every hostile or careless input gets one clear log line
and a closed connection, disturbs no other tunnel, and leaves memory bounded.
The token set and the throttle in memory are tests/test_security.py.
"""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import sqlite3
import ssl
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from OpenSSL import SSL

from nova.wire.errors import ErrorCode
from nova.wire.frames import (
    Data,
    Fin,
    FrameType,
    Open,
    OpenOk,
    Reject,
    Welcome,
    WindowUpdate,
)
from nova.wire.handshake import make_auth

from .pki import CA
from .processes import ADMIN_TOKEN, TOKEN, Proc, echo_roundtrip, fingerprint, free_port, novac, novas, target, wait_for
from .rawagent import RawAgent
from .strategies import header

pytestmark = pytest.mark.integration


def _pin(server: Proc, port: int) -> dict[str, str]:
    return {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server)}


def test_token_rotation_with_sighup(tmp_path: Path) -> None:
    token_file = tmp_path / "tokens"
    token_file.write_text("# rotation\nold-token-aaaa-1111\nnew-token-bbbb-2222\n")
    env = {"NOVAS_AGENT_TOKEN_FILE": str(token_file), "NOVAS_AGENT_TOKEN": ""}
    with novas(tmp_path, [], env) as (server, port):
        with (
            novac(tmp_path, _pin(server, port) | {"NOVAC_TOKEN": "old-token-aaaa-1111"}, name="old"),
            novac(tmp_path, _pin(server, port) | {"NOVAC_TOKEN": "new-token-bbbb-2222"}, name="new"),
        ):
            server.wait_log("agent old registered")
            server.wait_log("agent new registered")
            token_file.write_text("new-token-bbbb-2222\n")
            server.proc.send_signal(signal.SIGHUP)
            server.wait_log("closing 1 tunnel(s) whose token was removed")
            server.wait_log("agent old disconnected: its token was revoked")
            # An absence: give a wrong close the time to show in the log.
            time.sleep(1)
            assert "agent new disconnected" not in server.text()
    for log in tmp_path.glob("*.log"):
        text = log.read_text()
        assert "old-token-aaaa-1111" not in text and "new-token-bbbb-2222" not in text


def test_mutual_tls_binds_names_to_certificates(tmp_path: Path) -> None:
    ca = CA()
    cert, key = ca.issue("localhost", "127.0.0.1").write(tmp_path, "server")
    clients = CA("agents")
    agent_cert, agent_key = clients.issue("db-agent-0").write(tmp_path, "db-agent-0")
    env = {"NOVAS_TLS_CERT": str(cert), "NOVAS_TLS_KEY": str(key), "NOVAS_TLS_CLIENT_CA": str(clients.write(tmp_path))}
    (tmp_path / "ca").mkdir()
    server_ca = ca.write(tmp_path / "ca")
    with novas(tmp_path, [], env) as (server, port):
        base = {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_CA": str(server_ca)}
        certs = {"NOVAC_TLS_CERT": str(agent_cert), "NOVAC_TLS_KEY": str(agent_key)}
        with novac(tmp_path, base | certs, name="db-agent-0"):
            server.wait_log("agent db-agent-0 registered")
            status_names = server.text()
            assert "db-agent-0" in status_names
        # The certificate does not name this agent.
        with novac(tmp_path, base | certs, name="web-agent") as impostor:
            impostor.wait_log("BAD_NAME")
            server.wait_log("the client certificate does not name this agent")
        # No certificate at all: the TLS handshake fails.
        with novac(tmp_path, base, name="no-cert") as bare:
            bare.wait_log("ended before registration")
        assert "agent no-cert registered" not in server.text()


def test_repeated_failures_are_delayed_then_blocked(tmp_path: Path) -> None:
    # Block after 4 failures; from the first one on, each handshake waits 1, 2, 4 s.
    env = {"NOVAS_AUTH_BLOCK_AFTER": "4", "NOVAS_AUTH_BLOCK_SECONDS": "300"}
    with novas(tmp_path, [], env) as (server, port):
        for i in range(4):
            agent = RawAgent(port)
            answer = agent.register(b"wrong-token-xyz", f"guess-{i}")
            assert isinstance(answer, Reject) and answer.code == ErrorCode.AUTH_FAILED
            agent.close()
        server.wait_log("blocking 127.0.0.1 for 300s after 4 failed handshakes")
        try:
            blocked = RawAgent(port)
        except ConnectionResetError:
            pass  # NOVAS reset it before connect() returned (a loaded machine)
        else:
            assert blocked.closed_by_server(5)
        assert server.text().count("blocking 127.0.0.1") == 1


class Stage:
    """NOVAS (TLS and plaintext), a healthy agent, and a transfer running throughout."""

    def __init__(self, tmp: Path, server: Proc, port: int, plain: Proc, plain_port: int, route: int, socks: int):
        self.tmp, self.server, self.port = tmp, server, port
        self.plain, self.plain_port = plain, plain_port
        self.route, self.socks = route, socks
        self.stop = threading.Event()
        self.sent = hashlib.sha256()
        self.received = hashlib.sha256()
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._transfer, daemon=True)
        self.cleanup: list[socket.socket] = []
        # Each case connects from its own loopback address: NOVAS reports
        # refusals once per source and interval, so a case sharing another's
        # source would be counted in a summary instead of logged.
        self.source = "127.0.0.1"

    def connect(self, port: int) -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(self.source, 0))

    def _transfer(self) -> None:
        try:
            with socket.create_connection(("127.0.0.1", self.route), timeout=60) as s:
                reader = threading.Thread(target=self._read, args=(s,), daemon=True)
                reader.start()
                while not self.stop.is_set():
                    chunk = os.urandom(64 * 1024)
                    self.sent.update(chunk)
                    s.sendall(chunk)
                    time.sleep(0.01)  # pacing: a steady transfer beside the bad input, not a flood
                s.shutdown(socket.SHUT_WR)
                reader.join(60)
        except BaseException as e:
            self.error = e

    def _read(self, s: socket.socket) -> None:
        while data := s.recv(1 << 20):
            self.received.update(data)
        self.done.set()

    def count(self, needle: str) -> int:
        return self.server.text().count(needle)


def expect_logged(proc: Proc, needle: str, before: int, timeout: float = 30) -> None:
    wait_for(lambda: proc.text().count(needle) > before, timeout, f"{needle!r} logged once more")


def tls_bytes(stage: Stage, data: bytes) -> RawAgent:
    agent = RawAgent(stage.port, source=stage.source)
    agent.hello()
    agent.send(data)
    return agent


def registered(stage: Stage, name: str) -> RawAgent:
    agent = RawAgent(stage.port, source=stage.source)
    welcome = agent.register(TOKEN.encode(), name)
    assert isinstance(welcome, Welcome), welcome
    return agent


def opened_stream(stage: Stage, name: str) -> tuple[RawAgent, int, socket.socket]:
    """A hostile agent registered under C{name}, and a user stream NOVAS opened through it."""
    agent = registered(stage, name)
    user = socket.socket()
    user.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a user that reads nothing, quickly full
    user.settimeout(10)
    user.connect(("127.0.0.1", stage.socks))
    user.sendall(b"\x05\x01\x02")
    assert user.recv(2) == b"\x05\x02"
    selector = f"name:{name}".encode()
    user.sendall(b"\x01" + bytes([len(selector)]) + selector + b"\x00")
    assert user.recv(2) == b"\x01\x00"
    user.sendall(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + struct.pack(">H", 9))
    frame = agent.next_frame()
    while not isinstance(frame, Open):
        frame = agent.next_frame()
    agent.send_frame(OpenOk(frame.stream_id))
    return agent, frame.stream_id, user


def case_garbage(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    return tls_bytes(stage, b"\xff" + os.urandom(200)), "UNSUPPORTED_VERSION"


def case_http(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    return tls_bytes(stage, b"GET / HTTP/1.1\r\nHost: novas\r\n\r\n"), "UNSUPPORTED_VERSION"


def case_tls_to_plaintext(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    hello = ssl.create_default_context().wrap_bio(ssl.MemoryBIO(), out := ssl.MemoryBIO())
    try:
        hello.do_handshake()
    except ssl.SSLWantReadError:
        pass
    s = stage.connect(stage.plain_port)
    s.sendall(out.read())
    return s, "plain:UNSUPPORTED_VERSION"


def case_plaintext_to_tls(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    s = stage.connect(stage.port)
    s.sendall(header(0x02, 0, 40) + bytes(40))
    return s, "closed before registering"


def case_slow_handshake(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    agent = RawAgent(stage.port, source=stage.source)
    agent.hello()
    for b in header(0x02, 0, 64)[:3]:
        try:
            agent.send(bytes([b]))
        except (OSError, SSL.Error):
            break  # dropped at the deadline: a reset, not a graceful close
        time.sleep(1)  # the input under test: a handshake one byte a second
    return agent, "did not finish within"


def case_oversized(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    return tls_bytes(stage, header(0x02, 0, 10_000_000)), "FRAME_TOO_LARGE"


def case_unknown_type(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    return tls_bytes(stage, header(0x7E, 0, 0)), "unknown frame type 0x7e"


def case_unknown_type_after_registration(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    agent = registered(stage, "evil-type")
    agent.send(header(0x55, 3, 0))
    return agent, "unknown frame type 0x55"


def case_stream_id_never_opened(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    agent = registered(stage, "evil-id")
    agent.send_frame(OpenOk(999))
    return agent, "OPEN_OK for stream 999, which was never opened"


def case_lone_data_never_opened(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    # One whole DATA frame in one record: the decoder's one-frame path.
    agent = registered(stage, "evil-lone")
    agent.send_frame(Data(999, b"not yours"))
    return agent, "DATA for stream 999, which was never opened"


def case_lone_data_on_stream_zero(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    # A whole DATA frame with no stream id: the one-frame path declines it,
    # the general loop refuses it.
    agent = registered(stage, "evil-zero")
    agent.send(header(int(FrameType.DATA), 0, 4) + b"abcd")
    return agent, "DATA needs a stream id"


def case_agent_opens(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    agent = registered(stage, "evil-open")
    agent.send_frame(Open(1, "10.0.0.1", 22))
    return agent, "only the server may open streams"


def case_data_beyond_window(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    agent, sid, user = opened_stream(stage, "evil-window")
    # Ignore every WINDOW_UPDATE and keep sending: once the user's socket is
    # full, NOVAS stops returning credit and the window runs out.
    try:
        for _ in range(16 * 1024 * 1024 // 65536):
            agent.send_frame(Data(sid, bytes(65536)))
    except (OSError, SSL.Error):
        pass  # NOVAS closed the tunnel mid-send: the FLOW_CONTROL_ERROR the case expects
    stage.cleanup.append(user)
    return agent, "FLOW_CONTROL_ERROR"


def case_window_overflow(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    agent, sid, user = opened_stream(stage, "evil-overflow")
    agent.send_frame(WindowUpdate(sid, 2**31 - 1))
    user.close()
    return agent, "would exceed 2147483647"


def case_data_after_fin(stage: Stage) -> None:
    agent, sid, user = opened_stream(stage, "evil-fin")
    agent.send_frame(Fin(sid))
    agent.send_frame(Data(sid, b"late"))
    # A stream error: the user's connection is closed, the tunnel lives on.
    user.settimeout(10)
    try:
        while user.recv(4096):
            pass
    except ConnectionResetError:
        pass
    user.close()
    # The hostile tunnel itself is still registered.
    time.sleep(0.5)  # an absence: give a wrong disconnect the time to show in the log
    assert "agent evil-fin disconnected" not in stage.server.text()
    agent.close()


def case_replay(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    first = RawAgent(stage.port, source=stage.source)
    nonce = first.hello()
    captured = make_auth(TOKEN.encode(), nonce, first.binding(), "replayed", (), 65536)
    first.send_frame(captured)
    assert isinstance(first.next_frame(), Welcome)
    second = RawAgent(stage.port, source=stage.source)
    second.hello()
    second.send_frame(captured)
    first.close()
    return second, "(claiming to be 'replayed'): AUTH_FAILED"


def case_wrong_token(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    agent = RawAgent(stage.port, source=stage.source)
    answer = agent.register(b"definitely-wrong", "wrong-token")
    assert isinstance(answer, Reject) and answer.code == ErrorCode.AUTH_FAILED
    return agent, "(claiming to be 'wrong-token'): AUTH_FAILED"


def case_name_too_long(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    agent = RawAgent(stage.port, source=stage.source)
    answer = agent.register(TOKEN.encode(), "x" * 64)
    assert isinstance(answer, Reject) and answer.code == ErrorCode.BAD_NAME
    return agent, "agent name must be 1-63 characters"


def case_name_not_utf8(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    agent = RawAgent(stage.port, source=stage.source)
    agent.hello()
    body = struct.pack(">I", 65536) + struct.pack(">H", 3) + b"\xff\xfe\xfd" + struct.pack(">H", 0)
    agent.send(header(0x02, 0, 32 + len(body)) + bytes(32) + body)
    return agent, "carries a string that is not UTF-8"


def case_tag_with_separator(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    agent = RawAgent(stage.port, source=stage.source)
    answer = agent.register(TOKEN.encode(), "tagged", (("env", "prod;team=db"),))
    assert isinstance(answer, Reject) and answer.code == ErrorCode.BAD_NAME
    return agent, "contains ; = , or control characters"


def case_socks_malformed(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    s = socket.create_connection(("127.0.0.1", stage.socks), timeout=10)
    s.sendall(b"\x05\x01\x00\x05\x01\x00\x09\x00\x00")
    return s, "address type 9 not supported"


def case_socks_truncated(stage: Stage) -> tuple[RawAgent | socket.socket, str]:
    s = socket.create_connection(("127.0.0.1", stage.socks), timeout=10)
    s.sendall(b"\x05\x01")
    return s, "no complete request within 2s"


CASES: list[Callable[[Stage], tuple[RawAgent | socket.socket, str]]] = [
    case_garbage,
    case_http,
    case_tls_to_plaintext,
    case_plaintext_to_tls,
    case_slow_handshake,
    case_oversized,
    case_unknown_type,
    case_unknown_type_after_registration,
    case_stream_id_never_opened,
    case_lone_data_never_opened,
    case_lone_data_on_stream_zero,
    case_agent_opens,
    case_data_beyond_window,
    case_window_overflow,
    case_replay,
    case_wrong_token,
    case_name_too_long,
    case_name_not_utf8,
    case_tag_with_separator,
    case_socks_malformed,
    case_socks_truncated,
]


def closed(conn: RawAgent | socket.socket) -> bool:
    if isinstance(conn, RawAgent):
        return conn.closed_by_server(30)
    conn.settimeout(30)
    try:
        while conn.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except TimeoutError:
        return False
    return True


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    """One stage for the whole bad-input suite: starting it per case would cost a minute."""
    tmp = tmp_path_factory.mktemp("bad-input")
    route, socks = free_port(), free_port()
    (tmp / "plain").mkdir()
    fast = {"NOVAS_HANDSHAKE_TIMEOUT": "2", "NOVAS_AUTH_BLOCK_AFTER": "1000"}
    with (
        target("echo") as echo,
        novas(tmp, [f"{route}:127.0.0.1:{echo}@role=good"], fast | {"NOVAS_SOCKS_PORT": str(socks)}) as (
            server,
            port,
        ),
        novas(tmp / "plain", [], fast | {"NOVAS_TLS": "off"}) as (plain, plain_port),
        novac(tmp, _pin(server, port) | {"NOVAC_TAGS": "role=good"}, name="good"),
    ):
        server.wait_log("agent good registered")
        the_stage = Stage(tmp, server, port, plain, plain_port, route, socks)
        the_stage.thread.start()
        yield the_stage
        the_stage.stop.set()


@pytest.mark.parametrize("case", CASES, ids=[c.__name__.removeprefix("case_") for c in CASES])
def test_bad_input(stage: Stage, case: Callable[[Stage], tuple[RawAgent | socket.socket, str]]) -> None:
    """One hostile or careless input: a closed connection, one log line, the healthy tunnel undisturbed."""
    stage.source = f"127.0.1.{10 + CASES.index(case)}"
    before_server, before_plain = stage.server.text(), stage.plain.text()
    conn, needle = case(stage)
    proc = stage.plain if needle.startswith("plain:") else stage.server
    needle = needle.removeprefix("plain:")
    before = (before_plain if proc is stage.plain else before_server).count(needle)
    assert closed(conn), f"{case.__name__}: the connection was not closed"
    expect_logged(proc, needle, before)
    assert echo_roundtrip(stage.route, b"still fine", timeout=10) == b"still fine"


def test_bad_input_data_after_fin_resets_only_the_stream(stage: Stage) -> None:
    case_data_after_fin(stage)


def test_bad_input_left_the_transfer_beside_it_intact(stage: Stage) -> None:
    """The transfer that ran through the healthy tunnel during every case above arrives whole."""
    stage.stop.set()
    assert stage.done.wait(60) and stage.error is None
    assert stage.sent.hexdigest() == stage.received.hexdigest()


def test_bad_input_flood_leaves_memory_bounded(stage: Stage) -> None:
    """10,000 bad connections leave NOVAS where it was."""

    def flood(n: int) -> None:
        for _ in range(n):
            with socket.create_connection(("127.0.0.1", stage.plain_port), timeout=10) as s:
                s.sendall(b"\xffgarbage" * 8)
                try:
                    s.recv(64)
                except OSError:
                    pass

    flood(500)  # warm up: caches, allocator pools, the audit queue
    time.sleep(1)  # no event says the process is done freeing: let it settle before measuring RSS
    start = rss_kib(stage.plain.proc.pid)
    workers = [threading.Thread(target=flood, args=(2500,)) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(300)
    time.sleep(1)  # as above, before the second RSS measurement
    grown = rss_kib(stage.plain.proc.pid) - start
    assert grown < 16 * 1024, f"NOVAS grew by {grown} KiB over 10,000 bad connections"
    assert echo_roundtrip(stage.route, b"after the flood") == b"after the flood"


def test_bad_input_leaks_no_secret(stage: Stage) -> None:
    """No token in anything the suite's servers wrote, and the refusals reached the audit."""
    for path in stage.tmp.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".sqlite3"):
            data = path.read_bytes()
            assert TOKEN.encode() not in data and ADMIN_TOKEN.encode() not in data, path
    db = stage.tmp / "state" / "audit.sqlite3"
    wait_for(lambda: db.exists(), 10, "the audit database")

    def kinds() -> set[str]:
        with sqlite3.connect(db) as conn:
            return {k for (k,) in conn.execute("SELECT DISTINCT kind FROM events")}

    wait_for(lambda: {"auth_failed", "tunnel_registered"} <= kinds(), 10, "refusals and registrations audited")
