"""
Attacks on the two HTTP ports of real processes on loopback (NOVAS's admin
port and NOVAC's probe port), each parametrized over both ports so one
failure never hides another.  The in-memory half is tests/test_attack_http.py.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nova.site import MAX_REQUEST_BODY, SECURITY_HEADERS

from .processes import ADMIN_TOKEN, Proc, free_port, novac, novas, rss_kib, wait_for
from .test_attack_http import MiB

pytestmark = pytest.mark.integration

ATTACK_BODY = 289 * MiB  # the size in the review's report
SNDBUF = 64 * 1024
PORTS = ["admin", "health"]


@dataclass
class Port:
    """One of the two HTTP ports of a running process."""

    kind: str
    proc: Proc
    port: int
    tmpdir: Path
    post_path: str
    extra: dict[str, Any] = field(default_factory=dict)


@contextmanager
def http_port(kind: str, tmp_path: Path, env: dict[str, str] | None = None) -> Iterator[Port]:
    """NOVAS's admin port or NOVAC's probe port (C{env}: more NOVAC settings); the process's TMPDIR its own."""
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    # free_port() is a guess: on a busy machine another program's outgoing
    # connection can take the port before the process binds it.  Try anew
    # (three times at most) rather than report a collision as a failure.
    for attempt in range(3):
        stack = ExitStack()
        try:
            target = stack.enter_context(_start(kind, tmp_path, tmpdir, env or {}))
        except AssertionError as e:
            stack.close()
            if "Address already in use" in str(e) and attempt < 2:
                continue
            raise
        with stack:
            yield target
        return


@contextmanager
def _start(kind: str, tmp_path: Path, tmpdir: Path, more: dict[str, str]) -> Iterator[Port]:
    if kind == "admin":
        with novas(tmp_path, [], {"TMPDIR": str(tmpdir)}) as (server, _):
            yield Port(kind, server, server.admin_port, tmpdir, "/api/v1/tunnels")
    else:
        health = free_port()
        env = {
            "NOVAC_SERVER": f"127.0.0.1:{free_port()}",  # nothing listens: the agent stays unready
            "NOVAC_TLS": "off",
            "NOVAC_HEALTH_PORT": str(health),
            "NOVAC_HEALTH_BIND": "127.0.0.1",
            "NOVAC_RECONNECT_MAX": "2",
            "TMPDIR": str(tmpdir),
            **more,
        }
        with novac(tmp_path, env) as agent:

            def up() -> bool:
                if agent.proc.poll() is not None:
                    raise AssertionError(f"novac exited:\n{agent.text()}")
                return _status(health, "GET", "/healthz") == 200

            wait_for(up, 20, "/healthz")
            yield Port(kind, agent, health, tmpdir, "/healthz")


def _request(
    port: int, method: str, path: str, token: str | None = None, body: bytes | None = None
) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method, data=body)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}


def _status(port: int, method: str, path: str) -> int | None:
    try:
        return _request(port, method, path)[0]
    except OSError:
        return None


def _io(pid: int) -> dict[str, int]:
    """The process's /proc/PID/io counters: rchar and wchar count every byte read and written (sockets, files)."""
    fields = (line.split(": ") for line in Path(f"/proc/{pid}/io").read_text().splitlines())
    return {name: int(value) for name, value in fields}


def _temp_files(pid: int, tmpdir: Path) -> dict[str, int]:
    """Files under C{tmpdir} the process holds open (an unlinked O_TMPFILE too), with their sizes."""
    found: dict[str, int] = {}
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(fd_dir / fd)
            if target.startswith(str(tmpdir)):
                found[target] = os.stat(fd_dir / fd).st_size
        except OSError:
            continue  # closed meanwhile
    return found


@dataclass
class Outcome:
    status: int | None  # None: the connection closed (or reset) with no answer
    stalled: bool  # neither an answer nor a close within the client's timeout
    sent: int  # bytes the client's kernel took after the request's head
    bound: int  # what the server may have read without reading past the limit
    seconds: float  # until the answer or the close
    temp_files: dict[str, int]  # largest size seen of each temporary file the server held


def _socket_slack(s: socket.socket) -> int:
    """
    Bytes that sit in socket buffers rather than in the server: the client's
    send buffer and the most the server's kernel may hold for it (the top of
    net.ipv4.tcp_rmem), plus one read of Twisted's (64 KiB).
    """
    rmem_max = int(Path("/proc/sys/net/ipv4/tcp_rmem").read_text().split()[2])
    return s.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) + rmem_max + 64 * 1024


def flood(target: Port, head: bytes, piece: bytes, count: int, tail: bytes = b"", allowed: int = 0) -> Outcome:
    """
    Send C{head}, then C{piece} up to C{count} times as fast as the server
    reads, then C{tail}, while watching the server's open files; stop at the
    first refusal.  C{allowed}: bytes past C{head} the server may accept.
    """
    pid = target.proc.proc.pid
    s = socket.socket()
    # A small send buffer, so what the client sent is close to what the
    # server read.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
    s.settimeout(120)
    s.connect(("127.0.0.1", target.port))
    bound = allowed + _socket_slack(s)
    sent = 0
    temp: dict[str, int] = {}
    started = time.monotonic()

    def send() -> None:
        nonlocal sent
        try:
            s.sendall(head)
            for i in range(count):  # bounded: at most the whole flood
                s.sendall(piece)
                sent += len(piece)
                if i % 32 == 0:
                    for path, size in _temp_files(pid, target.tmpdir).items():
                        temp[path] = max(size, temp.get(path, 0))
            s.sendall(tail)
        except OSError:
            return  # refused: reset or closed under us

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    status: int | None = None
    stalled = False
    try:
        answer = s.recv(64 * 1024)
        if answer.startswith(b"HTTP/1.1 "):
            status = int(answer.split()[1])
    except TimeoutError:
        stalled = True
    except OSError:
        pass  # reset before any answer reached us: refused all the same
    seconds = time.monotonic() - started
    s.close()
    sender.join(130)
    assert not sender.is_alive(), "the client's sender did not stop"
    return Outcome(status, stalled, sent, bound, seconds, temp)


def post_without_token(target: Port, chunked: bool, total: int = ATTACK_BODY, block: int = 64 * 1024) -> Outcome:
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % total
    head = b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n%s\r\n\r\n" % (
        target.post_path.encode(),
        framing,
    )
    payload = b"a" * block
    if chunked:
        return flood(target, head, b"%x\r\n" % block + payload + b"\r\n", total // block, b"0\r\n\r\n",
                     MAX_REQUEST_BODY)  # fmt: skip
    return flood(target, head, payload, total // block, allowed=MAX_REQUEST_BODY)


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
@pytest.mark.parametrize("kind", PORTS)
def test_a_large_body_without_a_token_is_refused_before_it_is_read(tmp_path: Path, kind: str, framing: str) -> None:
    with http_port(kind, tmp_path) as target:
        pid = target.proc.proc.pid
        rss_before = rss_kib(pid)
        wrote_before = _io(pid)["wchar"]
        lines_before = len(target.proc.text().splitlines())
        outcome = post_without_token(target, chunked=framing == "chunked")
        logged = len(target.proc.text().splitlines()) - lines_before
        written = _io(pid)["wchar"] - wrote_before  # file writes (and log lines), not the socket
        rss_growth = rss_kib(pid) - rss_before
        print(
            f"\nMEASURE port={kind} framing={framing} body={ATTACK_BODY} status={outcome.status} "
            f"seconds={outcome.seconds:.3f} client_sent={outcome.sent} bound={outcome.bound} "
            f"server_wrote_to_files={written} temp_files={outcome.temp_files} rss_growth_kib={rss_growth}"
        )
        assert outcome.status in (413, None) and not outcome.stalled, outcome
        # The server took the limit plus what socket buffers hold, not the
        # body, and wrote no file.
        assert outcome.sent <= outcome.bound, outcome
        assert outcome.temp_files == {}
        assert list(target.tmpdir.iterdir()) == []
        assert written < 1 * MiB, written
        assert logged <= 2, target.proc.text()[-2000:]
        assert rss_growth < 16 * 1024, rss_growth  # 16 MiB, against a 289 MiB body
        # The port keeps serving.
        assert _request(target.port, "GET", "/healthz")[0] == 200


@pytest.mark.parametrize("shape", ["many-lines", "one-line"])
@pytest.mark.parametrize("kind", PORTS)
def test_endless_headers_are_refused_and_the_port_keeps_serving(tmp_path: Path, kind: str, shape: str) -> None:
    with http_port(kind, tmp_path) as target:
        pid = target.proc.proc.pid
        rss_before = rss_kib(pid)
        if shape == "many-lines":
            head, piece = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"X-Filler: %s\r\n" % (b"f" * 1000)
        else:
            head, piece = b"GET /", b"a" * 1024
        # 128 MiB of request head, if the server kept reading it.
        outcome = flood(target, head, piece, 128 * MiB // len(piece), b"\r\n\r\n", 16 * 1024)
        rss_growth = rss_kib(pid) - rss_before
        print(f"\nMEASURE port={kind} headers={shape} status={outcome.status} client_sent={outcome.sent} "
              f"bound={outcome.bound} rss_growth_kib={rss_growth}")  # fmt: skip
        assert outcome.status in (400, None) and not outcome.stalled, outcome
        assert outcome.sent <= outcome.bound, outcome
        assert rss_growth < 16 * 1024, rss_growth
        assert _request(target.port, "GET", "/healthz")[0] == 200


@pytest.mark.parametrize("metrics", ["off", "on"])
def test_novac_probe_port_serves_the_probes_and_nothing_else(tmp_path: Path, metrics: str) -> None:
    """The probes, and with NOVAC_METRICS on (the default) /metrics: read-only, no secret, no target."""
    with http_port("health", tmp_path, {"NOVAC_METRICS": metrics}) as target:
        port = target.port
        elsewhere = ("/", "/api/v1/tunnels", "/api/v1/events", "/page.js", "/nothing", "/metricsx")
        for path in elsewhere + (("/metrics",) if metrics == "off" else ()):
            status, body, _ = _request(port, "GET", path)
            assert status == 404, (path, status)
            assert b"Reverse Tunnels" not in body and b"token" not in body.lower(), path
        if metrics == "on":
            status, body, headers = _request(port, "GET", "/metrics")
            assert status == 200 and headers.get("content-type", "").startswith("text/plain"), (status, headers)
            assert b"nova_agent_tunnel_up{" in body and b"token" not in body.lower()
            for method in ("POST", "PUT", "DELETE"):
                assert _request(port, method, "/metrics", body=b"{}")[0] == 405
        assert _request(port, "GET", "/healthz")[:2] == (200, b"ok\n")
        status, body, _ = _request(port, "GET", "/readyz")
        assert status == 503 and b"not registered" in body  # no server: not ready
        status, body, _ = _request(port, "HEAD", "/healthz")
        assert (status, body) == (200, b"")
        for method in ("POST", "PUT", "DELETE", "OPTIONS"):
            status, _, headers = _request(port, method, "/healthz", body=b"{}" if method != "OPTIONS" else None)
            assert status == 405 and headers.get("allow") == "GET, HEAD", (method, status)


def _csp(value: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for part in value.split(";"):
        words = part.split()
        if words:
            directives[words[0].lower()] = words[1:]
    return directives


def _raw(port: int, request: bytes) -> tuple[int, dict[str, str]]:
    """Send a raw request; the status and headers of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(request)
        except OSError:
            pass
        answer = b""
        try:
            while b"\r\n\r\n" not in answer and (chunk := s.recv(65536)):
                answer += chunk
        except OSError:
            pass
    head = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    assert head[0].startswith("HTTP/1.1 "), answer[:200]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in head[1:])}
    return int(head[0].split()[1]), headers


@pytest.mark.parametrize("kind", PORTS)
def test_every_answer_carries_the_security_headers(tmp_path: Path, kind: str) -> None:
    with http_port(kind, tmp_path) as target:
        port = target.port
        answers: list[tuple[str, int, dict[str, str]]] = []

        def ask(label: str, method: str, path: str, token: str | None = None, body: bytes | None = None) -> None:
            status, _, headers = _request(port, method, path, token, body)
            answers.append((label, status, headers))

        ask("healthz", "GET", "/healthz")
        ask("readyz", "GET", "/readyz")
        ask("404", "GET", "/no/such/thing")
        ask("405", "POST", "/healthz", body=b"{}")
        if kind == "admin":
            ask("page", "GET", "/")
            ask("script", "GET", "/page.js")
            ask("style", "GET", "/page.css")
            ask("401", "GET", "/api/v1/tunnels")
            ask("api", "GET", "/api/v1/tunnels", ADMIN_TOKEN)
            ask("events", "GET", "/api/v1/events", ADMIN_TOKEN)
            ask("400", "GET", "/api/v1/events?limit=abc", ADMIN_TOKEN)
            ask("metrics", "GET", "/metrics", ADMIN_TOKEN)
            ask("metrics-401", "GET", "/metrics")
            ask("api-405", "DELETE", "/api/v1/tunnels", ADMIN_TOKEN)
            ask("page-405", "POST", "/", body=b"{}")
        status, headers = _raw(port, b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % (300 * MiB))
        answers.append(("413", status, headers))
        status, headers = _raw(port, b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        answers.append(("bad request", status, headers))
        expected = {"401": 401, "404": 404, "405": 405, "api-405": 405, "page-405": 405, "413": 413,
                    "400": 400, "bad request": 400, "metrics-401": 401}  # fmt: skip
        problems = []
        for label, status, headers in answers:
            if status != expected.get(label, 200 if label != "readyz" or kind == "admin" else 503):
                problems.append(f"{label}: status {status}")
            for name, value in SECURITY_HEADERS:
                if headers.get(name.decode()) != value.decode():
                    problems.append(f"{label}: {name.decode()} is {headers.get(name.decode())!r}")
            csp = _csp(headers.get("content-security-policy", ""))
            if csp.get("frame-ancestors") != ["'none'"]:
                problems.append(f"{label}: CSP frame-ancestors {csp.get('frame-ancestors')}")
            scripts = csp.get("script-src", csp.get("default-src", ["(none)"]))
            if any(source.lower() in ("'unsafe-inline'", "'unsafe-eval'", "*", "data:") for source in scripts):
                problems.append(f"{label}: CSP script-src {scripts}")
        assert problems == []


def test_the_page_has_no_inline_script_or_style(tmp_path: Path) -> None:
    with http_port("admin", tmp_path) as target:
        status, page, headers = _request(target.port, "GET", "/")
        assert status == 200
        text = page.decode()
        assert '<script src="/page.js"' in text and "<script>" not in text and "<style" not in text
        assert not re.search(r"\son[a-z]+\s*=", text)  # no inline event handlers (onclick=...)
        status, script, headers = _request(target.port, "GET", "/page.js")
        assert status == 200 and headers["content-type"].startswith("text/javascript")
        assert b"textContent" in script and b"innerHTML" not in script
        status, _, headers = _request(target.port, "GET", "/page.css")
        assert status == 200 and headers["content-type"].startswith("text/css")
