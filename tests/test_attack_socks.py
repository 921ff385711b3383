"""
Issue 14, defects 6, 10 and 12, against real processes on loopback.

- 6: 1,100 SOCKS requests for names IDNA rejects each get a SOCKS failure
  reply (none is left for the open timeout), the agent holds no stream
  afterwards, and a good request through the same agent works; an OPEN for
  such a name sent straight to a NOVAC gets OPEN_FAIL.
- 12: a SOCKS domain with a NUL, CR or bidi character is refused (reply 1 or
  4), nothing is dialled, and the log shows the name escaped.
- 10: 200 wrong SOCKS passwords from 127.0.0.2: after the budget they are
  refused unchecked, 127.0.0.3 still gets through with the right password,
  and NOVAS will not start with a 15-character password.

Every packet goes to 127.0.0.0/8.  The open timeout is set far beyond the
test's own deadlines, so an answer the test sees is never the timeout's.
"""

from __future__ import annotations

import os
import selectors
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from nova.wire.codec import FrameDecoder
from nova.wire.errors import OpenFailReason
from nova.wire.frames import Auth, Frame, Hello, Open, OpenFail, OpenOk, Welcome, encode

from .processes import TOKEN, Proc, fd_count, fingerprint, free_port, novac, novas, target, tunnels, wait_for

pytestmark = pytest.mark.integration

OPEN_TIMEOUT = "600"  # NOVAS's; every wait below is far shorter
REPLY_DEADLINE = 60.0  # seconds a batch of requests may take to be answered, all told
PASSWORD = "socks-password-0123456789"
BAD_IDNA = {
    "long-label": b"a" * 64 + b".example",
    "empty-label": b"db..example",
}
BAD_CHARACTERS = {
    "nul": ("127.0.0.1\x00.evil.example", "127.0.0.1\\x00.evil.example"),
    "cr-lf": ("127.0.0.1\r\nFORGED log line", "127.0.0.1\\r\\nFORGED log line"),
    "bidi": ("127.0.0.1\u202elpmaxe.live", "127.0.0.1\\u202elpmaxe.live"),
}


def domain_request(host: bytes, port: int) -> bytes:
    return b"\x05\x01\x00\x03" + bytes([len(host)]) + host + struct.pack(">H", port)


def socks_exchange(
    socks: int, messages: list[bytes], expect: int, source: str = "127.0.0.1", deadline: float = REPLY_DEADLINE
) -> list[bytes]:
    """
    Send each message on its own connection from C{source}, all at once;
    collect what each gets back (up to C{expect} bytes, or until closed) with
    one deadline for the lot.  A connection still waiting then gets b"?".
    """
    selector = selectors.DefaultSelector()
    answers: dict[int, bytearray] = {}
    pending: dict[int, socket.socket] = {}
    try:
        for i, message in enumerate(messages):
            s = socket.socket()
            s.bind((source, 0))
            s.settimeout(10)
            s.connect(("127.0.0.1", socks))
            s.sendall(message)
            s.setblocking(False)
            answers[i] = bytearray()
            pending[i] = s
            selector.register(s, selectors.EVENT_READ, i)
        end = time.monotonic() + deadline
        while pending and time.monotonic() < end:
            for key, _ in selector.select(timeout=0.2):
                i = key.data
                try:
                    data = pending[i].recv(4096)
                except (ConnectionResetError, BlockingIOError):
                    data = b""
                answers[i] += data
                if not data or len(answers[i]) >= expect:
                    selector.unregister(pending[i])
                    pending.pop(i).close()
        return [bytes(answers[i]) if i not in pending else b"?" for i in range(len(messages))]
    finally:
        for s in pending.values():
            s.close()
        selector.close()


def active_streams(server: Proc) -> int:
    return sum(int(t.get("active_streams", 0)) for t in tunnels(server))  # type: ignore[call-overload]


def agent_env(server: Proc, port: int) -> dict[str, str]:
    return {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server)}


def good_request_works(socks: int, echo: int, source: str = "127.0.0.1", password: str | None = None) -> bytes:
    """One SOCKS CONNECT from C{source} to the echo target; what comes back for a payload."""
    with socket.socket() as s:
        s.bind((source, 0))
        s.settimeout(20)
        s.connect(("127.0.0.1", socks))
        if password is None:
            s.sendall(b"\x05\x01\x00")
            assert s.recv(2) == b"\x05\x00"
        else:
            s.sendall(b"\x05\x01\x02\x01\x00" + bytes([len(password)]) + password.encode())
            assert s.recv(4) == b"\x05\x02\x01\x00"
        s.sendall(domain_request(b"localhost", echo))
        reply = s.recv(10)
        assert reply[:2] == b"\x05\x00", reply
        s.sendall(b"still working")
        got = b""
        while len(got) < len(b"still working"):
            chunk = s.recv(64)
            if not chunk:
                break
            got += chunk
        return got


@pytest.mark.parametrize("kind", sorted(BAD_IDNA))
def test_names_idna_rejects_are_answered_and_hold_no_stream(tmp_path: Path, kind: str) -> None:
    """Defect 6: 1,100 bad-name requests, 100 at a time; every one answered, no stream kept."""
    socks = free_port()
    env = {"NOVAS_SOCKS_PORT": str(socks), "NOVAS_OPEN_TIMEOUT": OPEN_TIMEOUT}
    name = BAD_IDNA[kind]
    with target() as echo, novas(tmp_path, [], env) as (server, port), novac(tmp_path, agent_env(server, port)):
        server.wait_log("agent agent-1 registered")
        fds_before = fd_count(server.proc.pid)
        replies: list[bytes] = []
        slowest = 0.0
        for batch in range(11):
            started = time.monotonic()
            replies += socks_exchange(socks, [b"\x05\x01\x00" + domain_request(name, echo)] * 100, expect=12)
            slowest = max(slowest, time.monotonic() - started)
            unanswered = sum(1 for r in replies if r == b"?")
            assert unanswered == 0, (
                f"{unanswered} of batch {batch + 1}'s 100 requests were not answered within {REPLY_DEADLINE:g}s"
            )
        codes = {r[2:4] for r in replies}
        print(f"\n{kind}: 1100 requests all answered, slowest batch of 100 {slowest:.2f}s, replies {codes}")
        assert all(r[:2] == b"\x05\x00" and r[2:4] in (b"\x05\x04", b"\x05\x01") for r in replies), codes
        wait_for(lambda: active_streams(server) == 0, 20, "the agent's streams to drop to 0")
        # Every refused client's socket is closed: NOVAS's descriptors come back to where they were.
        wait_for(lambda: fd_count(server.proc.pid) <= fds_before + 10, 20, "NOVAS's descriptors to come back")
        assert good_request_works(socks, echo) == b"still working"
        log = server.text()
        # One line per refusal, names shown escaped and cut: the log grows by a bounded amount.
        assert log.count("socks: 127.0.0.1") <= 1100 + 5
        assert len(log) < 1100 * 600


class RawServer:
    """Plays NOVAS to one NOVAC over plain TCP, so a test can send it any OPEN."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(1)
        self.listener.settimeout(30)
        self.port: int = self.listener.getsockname()[1]
        self.conn: socket.socket | None = None
        self.decoder = FrameDecoder()
        self.pending: list[Frame] = []

    def accept_agent(self) -> None:
        self.conn, _ = self.listener.accept()
        self.send(Hello(os.urandom(32)))
        frame = self.next_frame(lambda f: isinstance(f, Auth))
        assert isinstance(frame, Auth), frame
        self.send(Welcome(262_144, 0, "raw-server"))

    def send(self, frame: Frame) -> None:
        assert self.conn is not None
        self.conn.sendall(b"".join(encode(frame)))

    def next_frame(self, wanted: object, timeout: float = 30.0) -> Frame | None:
        """The next frame C{wanted(frame)} accepts (others, pings say, are skipped); None on timeout or close."""
        assert self.conn is not None
        deadline = time.monotonic() + timeout
        while True:
            while self.pending:
                frame = self.pending.pop(0)
                if wanted(frame):  # type: ignore[operator]
                    return frame
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.conn.settimeout(left)
            try:
                data = self.conn.recv(65536)
            except TimeoutError:
                return None
            if not data:
                return None
            self.pending += self.decoder.feed(data)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()


@contextmanager
def raw_server() -> Iterator[RawServer]:
    server = RawServer()
    try:
        yield server
    finally:
        server.close()


BAD_OPEN_NAMES = {
    "long-label": ("a" * 64 + ".example", "a" * 64 + ".example"),
    "empty-label": ("db..example", "db..example"),
    "too-long": (".".join(["a" * 63] * 4), "aaaa"),
    **BAD_CHARACTERS,
}


@pytest.mark.parametrize("kind", sorted(BAD_OPEN_NAMES))
def test_novac_answers_an_open_for_a_bad_name(tmp_path: Path, kind: str) -> None:
    """Defect 6 on NOVAC: an OPEN NOVAS would no longer send still gets OPEN_FAIL DNS_FAILURE, never silence."""
    name, shown = BAD_OPEN_NAMES[kind]
    with target() as echo, raw_server() as server:
        env = {"NOVAC_SERVER": f"127.0.0.1:{server.port}", "NOVAC_TLS": "off"}
        with novac(tmp_path, env) as agent:
            server.accept_agent()
            agent.wait_log("registered with")
            server.send(Open(1, name, echo))
            answer = server.next_frame(lambda f: isinstance(f, (OpenFail, OpenOk)) and f.stream_id == 1)
            assert isinstance(answer, OpenFail), f"NOVAC answered {answer!r} to an OPEN for a {kind} name"
            assert answer.reason == OpenFailReason.DNS_FAILURE
            # The same tunnel still opens good streams.
            server.send(Open(2, "127.0.0.1", echo))
            answer = server.next_frame(lambda f: isinstance(f, (OpenFail, OpenOk)) and f.stream_id == 2)
            assert isinstance(answer, OpenOk), answer
            agent.wait_log("DNS_FAILURE")
            log = agent.text()
            assert shown in log
            for raw in ("\x00", "\r", "\u202e"):
                assert raw not in log


@pytest.mark.parametrize("kind", sorted(BAD_CHARACTERS))
def test_socks_domain_with_control_characters_is_refused(tmp_path: Path, kind: str) -> None:
    """Defect 12: refused with reply 1 or 4, nothing dialled, the log shows the escaped name."""
    name, shown = BAD_CHARACTERS[kind]
    socks = free_port()
    env = {"NOVAS_SOCKS_PORT": str(socks), "NOVAS_OPEN_TIMEOUT": OPEN_TIMEOUT}
    bait = socket.socket()
    bait.bind(("127.0.0.1", 0))
    bait.listen(16)
    bait.setblocking(False)
    bait_port = bait.getsockname()[1]
    try:
        with target() as echo, novas(tmp_path, [], env) as (server, port):
            with novac(tmp_path, agent_env(server, port)) as agent:
                server.wait_log("agent agent-1 registered")
                [reply] = socks_exchange(socks, [b"\x05\x01\x00" + domain_request(name.encode(), bait_port)], 12)
                assert reply != b"?", "no SOCKS reply"
                assert reply[:2] == b"\x05\x00" and reply[2:4] in (b"\x05\x04", b"\x05\x01"), reply
                # A good request through the same agent works, and comes after anything the bad one could start.
                assert good_request_works(socks, echo) == b"still working"
                wait_for(lambda: shown in server.text(), 10, "the escaped name in the NOVAS log")
                with pytest.raises(BlockingIOError):
                    bait.accept()  # nothing was dialled
                for raw in ("\x00", "\r", "\u202e"):
                    assert raw not in server.text()
                    assert raw not in agent.text()
                assert f":{bait_port}" not in agent.text()
    finally:
        bait.close()


def test_wrong_socks_passwords_are_throttled_per_source(tmp_path: Path) -> None:
    """Defect 10: 200 wrong passwords from 127.0.0.2; the budget is checked, the rest refused unchecked."""
    socks = free_port()
    env = {"NOVAS_SOCKS_PORT": str(socks), "NOVAS_SOCKS_PASSWORD": PASSWORD, "NOVAS_HANDSHAKE_TIMEOUT": "30"}
    wrong = b"\x05\x01\x02\x01\x00" + bytes([len(PASSWORD)]) + b"x" * len(PASSWORD)
    with target() as echo, novas(tmp_path, [], env) as (server, port), novac(tmp_path, agent_env(server, port)):
        server.wait_log("agent agent-1 registered")
        started = time.monotonic()
        replies = socks_exchange(socks, [wrong] * 200, expect=4, source="127.0.0.2")
        took = time.monotonic() - started
        checked = server.text().count(": wrong SOCKS password")
        print(f"\n200 wrong passwords from 127.0.0.2: {checked} checked in {took:.2f}s, replies {set(replies)}")
        assert b"?" not in replies
        assert all(r in (b"\x05\x02\x01\x01", b"\x05\x02") for r in replies), set(replies)
        assert checked <= 20, f"{checked} wrong passwords were checked; the budget is 20"
        server.wait_log("refused without checking")
        # Blocked: even the right password from 127.0.0.2 is refused unchecked.
        right = b"\x05\x01\x02\x01\x00" + bytes([len(PASSWORD)]) + PASSWORD.encode()
        assert socks_exchange(socks, [right], expect=4, source="127.0.0.2") == [b"\x05\x02\x01\x01"]
        # Another source is not blocked.
        assert good_request_works(socks, echo, "127.0.0.3", PASSWORD) == b"still working"
        log = server.text()
        assert PASSWORD not in log and "x" * len(PASSWORD) not in log
        assert log.count("refused without checking") <= 2  # once per block, not once per attempt


def test_novas_refuses_a_short_socks_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOVAS_", "NOVAC_"))}
    env |= {
        "NOVAS_AGENT_TOKEN": TOKEN,
        "NOVAS_AGENT_PORT": str(free_port()),
        "NOVAS_STATE_DIR": str(tmp_path / "state"),
        "NOVAS_ADMIN_PORT": "off",
        "NOVAS_SOCKS_PORT": str(free_port()),
        "NOVAS_SOCKS_PASSWORD": "fifteen-chars15",
    }
    done = subprocess.run(
        [sys.executable, "-m", "twisted", "--log-format=text", "novas"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "--socks-password / NOVAS_SOCKS_PASSWORD must be at least 16 characters" in output
    assert "fifteen-chars15" not in output
    assert "Traceback" not in output
