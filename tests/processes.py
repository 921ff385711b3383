"""
Real NOVAS and NOVAC processes on loopback, and the real servers they carry
traffic to (sshd with SFTP, PostgreSQL, Redis, echo and HTTP servers), for
integration tests.  Every process starts through L{tests.harness}; its
C{free_port}, C{wait_for}, C{clean_env} and C{rss_kib} are re-exported here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import harness
from .harness import clean_env as clean_env
from .harness import free_port as free_port
from .harness import rss_kib as rss_kib
from .harness import wait_for as wait_for

TOKEN = "integration-test-token-5d1c"
ADMIN_TOKEN = "integration-admin-token-91b2"


class Proc(harness.Proc):
    """
    A twist plugin (C{novas}, C{novac}) in a subprocess, logging as text to
    a file, with no NOVAS_/NOVAC_ setting from this environment but C{env};
    C{twist} are twist's own options (C{--reactor=select}, say).
    """

    def __init__(
        self, plugin: str, args: list[str], env: dict[str, str], log: Path, twist: tuple[str, ...] = ()
    ) -> None:
        argv = [sys.executable, "-m", "twisted", "--log-format=text", *twist, plugin, *args]
        super().__init__(plugin, argv, log, env=clean_env(env))
        self.admin_port = 0

    def stop(self, timeout: float = 10.0) -> int | None:
        status = super().stop(timeout)
        # Whatever the test checked, a NOVA process must never log a traceback.
        text = self.text()
        for bad in ("Traceback", "Unhandled error"):
            if bad in text:
                raise AssertionError(f"{self.log_path.name} logged {bad!r}:\n{text[-4000:]}")
        return status


@contextmanager
def novas(
    tmp: Path, routes: list[str], env: dict[str, str] | None = None, twist: tuple[str, ...] = ()
) -> Iterator[tuple[Proc, int]]:
    port = free_port()
    e = {
        "NOVAS_AGENT_TOKEN": TOKEN,
        "NOVAS_AGENT_PORT": str(port),
        "NOVAS_STATE_DIR": str(tmp / "state"),
        "NOVAS_ADMIN_PORT": str(free_port()),
        "NOVAS_ADMIN_TOKEN": ADMIN_TOKEN,
    }
    e.update(env or {})
    args: list[str] = []
    for r in routes:
        args += ["--route", r]
    p = Proc("novas", args, e, tmp / f"novas-{port}.log", twist)
    p.admin_port = int(e["NOVAS_ADMIN_PORT"]) if e["NOVAS_ADMIN_PORT"].isdigit() else 0
    try:
        p.wait_log("NOVAS listening")
        yield p, port
    finally:
        p.stop()


def fingerprint(server: Proc) -> str:
    for word in server.text().split():
        if word.startswith("NOVAC_TLS_FINGERPRINT="):
            return word.split("=", 1)[1]
    raise AssertionError("NOVAS did not log its fingerprint")


@contextmanager
def novac(tmp: Path, env: dict[str, str], name: str = "agent-1", twist: tuple[str, ...] = ()) -> Iterator[Proc]:
    e = {"NOVAC_TOKEN": TOKEN, "NOVAC_NAME": name}
    e.update(env)
    p = Proc("novac", [], e, tmp / f"novac-{name}.log", twist)
    try:
        yield p
    finally:
        p.stop()


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


class _DigestAfterEof(socketserver.BaseRequestHandler):
    """Reads until the client half-closes, then answers with the digest."""

    def handle(self) -> None:
        h, n = hashlib.sha256(), 0
        while data := self.request.recv(65536):
            h.update(data)
            n += len(data)
        self.request.sendall(f"{n} {h.hexdigest()}\n".encode())


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    # socketserver's default backlog of 5 resets connections under a burst.
    request_queue_size = 1024


@contextmanager
def target(kind: str = "echo") -> Iterator[int]:
    handler = {"echo": _Echo, "digest": _DigestAfterEof}[kind]
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def echo_roundtrip(port: int, payload: bytes, timeout: float = 60.0) -> bytes:
    """Send C{payload} while reading the echo; return what came back."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:

        def send() -> None:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        chunks = []
        while data := s.recv(1 << 20):
            chunks.append(data)
        sender.join()
        return b"".join(chunks)


class Relay:
    """
    A TCP relay on loopback standing in for the network between NOVAC and
    NOVAS: it can stall (stop forwarding without closing anything) and cut
    connections that stay idle for C{idle_cut} seconds, as load balancers do.

    Given several upstream ports it is a round-robin balancer over them in
    that order (a port listed twice in a row makes the next dial land on a
    server the agent already holds), as an NLB or HAProxy in front of a
    cluster would; ports in C{down} are skipped, as a health check would.
    """

    def __init__(self, upstream: int | list[int], idle_cut: float | None = None) -> None:
        self.order = [upstream] if isinstance(upstream, int) else list(upstream)
        self.down: set[int] = set()
        self.connections = 0
        self._turn = 0
        self._lock = threading.Lock()
        self.idle_cut = idle_cut
        self.stalled = threading.Event()
        self.cuts = 0
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._pump, args=(client, self._pick()), daemon=True)
            t.start()
            self._threads.append(t)

    def _pick(self) -> int:
        with self._lock:
            for _ in range(len(self.order)):
                port = self.order[self._turn % len(self.order)]
                self._turn += 1
                if port not in self.down:
                    return port
            return 0  # every upstream down: the connection is refused

    def _pump(self, client: socket.socket, port: int) -> None:
        import selectors

        try:
            server = socket.create_connection(("127.0.0.1", port), timeout=5)
        except OSError:
            client.close()
            return
        peers = {client: server, server: client}
        sel = selectors.DefaultSelector()
        for s in peers:
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
        last = time.monotonic()
        try:
            while not self._stop.is_set():
                if self.stalled.is_set():
                    # The stall itself (forward nothing), not synchronisation.
                    self._stop.wait(0.05)
                    continue
                if self.idle_cut is not None and time.monotonic() - last > self.idle_cut:
                    self.cuts += 1
                    return
                for key, _ in sel.select(0.05):
                    src = key.fileobj
                    try:
                        data = src.recv(65536)  # type: ignore[union-attr]
                    except BlockingIOError:
                        continue
                    if not data:
                        return
                    peers[src].setblocking(True)  # type: ignore[index]
                    peers[src].sendall(data)  # type: ignore[index]
                    peers[src].setblocking(False)  # type: ignore[index]
                    last = time.monotonic()
        except OSError:
            return
        finally:
            sel.close()
            client.close()
            server.close()

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for t in self._threads:
            t.join(5)


@contextmanager
def http_server(body: bytes) -> Iterator[int]:
    """A local HTTP server answering every GET with C{body}."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def sshd(tmp: Path) -> Iterator[tuple[int, Path]]:
    """
    A private OpenSSH server on loopback, public keys only, with the SFTP
    subsystem that scp uses by default since OpenSSH 9.0; yields its port
    and a client key (use L{ssh_options}).
    """
    keys = tmp / "sshd"
    keys.mkdir()
    for name in ("host", "user"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(keys / name)], check=True)
    (keys / "authorized_keys").write_bytes((keys / "user.pub").read_bytes())
    port = free_port()
    config = keys / "sshd_config"
    config.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nHostKey {keys / 'host'}\n"
        f"AuthorizedKeysFile {keys / 'authorized_keys'}\nPidFile none\nUsePAM no\nStrictModes no\n"
        "PermitRootLogin prohibit-password\nPasswordAuthentication no\nSubsystem sftp internal-sftp\n"
    )
    if os.geteuid() == 0:
        os.makedirs("/run/sshd", exist_ok=True)
    proc = harness.Proc("sshd", ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], keys / "sshd.log")
    try:
        proc.wait_log(f"Server listening on 127.0.0.1 port {port}")
        yield port, keys / "user"
    finally:
        proc.stop()


# Helpers for the end-to-end suite (tests/test_e2e.py, tests/test_soak.py).

_ECHO_SERVER = """
import asyncio, sys

async def echo(reader, writer):
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except ConnectionError:
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(echo, "127.0.0.1", 0, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


@contextmanager
def echo_process() -> Iterator[int]:
    """An echo server in its own process, so it does not compete with the test for the GIL."""
    with tempfile.TemporaryDirectory(prefix="nova-echo-") as tmp:
        proc = harness.Proc(
            "echo", [sys.executable, "-c", _ECHO_SERVER], Path(tmp) / "echo.log", stdout=subprocess.PIPE
        )
        try:
            assert proc.popen.stdout is not None
            yield int(proc.popen.stdout.readline())
        finally:
            proc.stop()


def ssh_options(key: Path) -> list[str]:
    """Options for ssh/scp against L{sshd}: no config, no host key prompts, no passwords."""
    return ["-F", "/dev/null", "-i", str(key), "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "BatchMode=yes", "-o", "LogLevel=ERROR"]  # fmt: skip


class Postgres:
    """
    A throwaway PostgreSQL on loopback (user C{nova}, trust, durability off:
    nothing here outlives the test) that a test can stop and start again on
    the same port and data, as when the database goes away and comes back.
    """

    def __init__(self) -> None:
        bindir = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), None)
        assert bindir is not None, ".ci/run installs postgresql"
        self.bindir = bindir
        # pytest's tmp_path is private to root; PostgreSQL runs as its own user.
        self.home = Path(tempfile.mkdtemp(prefix="nova-pg-"))
        self.data = self.home / "pgdata"
        self.data.mkdir()
        self.run_as: list[str] = []
        if os.geteuid() == 0:  # initdb refuses to run as root
            shutil.chown(self.home, "postgres")
            shutil.chown(self.data, "postgres")
            self.run_as = ["runuser", "-u", "postgres", "--"]
        subprocess.run([*self.run_as, str(bindir / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "nova"],
                       check=True, capture_output=True)  # fmt: skip
        self.port = free_port()
        self.dsn = f"postgresql://nova@127.0.0.1:{self.port}/postgres"
        self.proc: harness.Proc | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        self.proc = harness.Proc(
            "postgres",
            [*self.run_as, str(self.bindir / "postgres"), "-D", str(self.data), "-p", str(self.port),
             "-h", "127.0.0.1", "-k", str(self.home),
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off"],
            self.home / f"postgres-{self.starts}.log",
        )  # fmt: skip
        ready = [str(self.bindir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        wait_for(lambda: subprocess.run(ready).returncode == 0, 30, "PostgreSQL to start")

    def stop(self) -> None:
        """A fast shutdown (SIGINT): every session is cut, as when the database goes away."""
        if self.proc is not None:
            if self.proc.alive():
                # pg_ctl, as the database's user: a signal to runuser would not reach postgres.
                subprocess.run([*self.run_as, str(self.bindir / "pg_ctl"), "-D", str(self.data), "stop", "-m", "fast"],
                               check=True, capture_output=True, timeout=60)  # fmt: skip
            self.proc.stop(20)
        self.proc = None

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.home, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[tuple[int, Path]]:
    """A throwaway PostgreSQL server on loopback (L{Postgres}); yields its port and bin dir."""
    pg = Postgres()
    try:
        pg.start()
        yield pg.port, pg.bindir
    finally:
        pg.remove()


HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return True
    except OSError:
        return False


@contextmanager
def haproxy(backends: list[int], check_ms: int = 300) -> Iterator[tuple[harness.Proc, int]]:
    """
    Debian's HAProxy on a free loopback port, in TCP mode with round robin
    over C{backends} (loopback ports), each health-checked every
    C{check_ms}: a backend that does not accept connections is skipped until
    it does, so a port with nothing behind it yet is a spare that becomes live
    when a server starts there.  Yields the process and its port.
    """
    assert os.path.exists(HAPROXY), ".ci/run installs haproxy"
    port = free_port()
    home = Path(tempfile.mkdtemp(prefix="nova-haproxy-"))
    servers = "".join(f"    server s{i} 127.0.0.1:{p} check\n" for i, p in enumerate(backends))
    config = home / "haproxy.cfg"
    config.write_text(
        "global\n    maxconn 8000\n"
        "defaults\n    mode tcp\n    timeout connect 5s\n    timeout client 1h\n    timeout server 1h\n"
        "    timeout check 2s\n"
        f"frontend agents\n    bind 127.0.0.1:{port}\n    default_backend novas\n"
        "backend novas\n    balance roundrobin\n"
        f"    default-server inter {check_ms} fall 1 rise 1\n{servers}"
    )
    # -db: in the foreground, so that stopping its process group stops it.
    proc = harness.Proc("haproxy", [HAPROXY, "-db", "-f", str(config)], home / "haproxy.log")
    try:

        def listening() -> bool:
            proc.check_alive()
            return _accepts(port)

        wait_for(listening, 20, "HAProxy to listen")
        yield proc, port
    finally:
        proc.stop()
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def redis_server() -> Iterator[int]:
    """A throwaway Redis server on loopback, persisting nothing."""
    port = free_port()
    argv = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    with tempfile.TemporaryDirectory(prefix="nova-redis-") as tmp:
        proc = harness.Proc("redis", argv, Path(tmp) / "redis.log", cwd=Path(tmp))
        try:
            proc.wait_log("Ready to accept connections")
            yield port
        finally:
            proc.stop()


def admin_call(admin_port: int, method: str, path: str, body: object = None) -> tuple[int, Any]:
    """Call an admin API path of a L{novas} with its token: the status and the decoded JSON (errors too)."""
    import json
    import urllib.error
    import urllib.request

    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{admin_port}{path}", data=data, method=method)
    request.add_header("Authorization", f"Bearer {ADMIN_TOKEN}")
    try:
        with urllib.request.urlopen(request, timeout=15) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def admin_api(admin_port: int, path: str) -> Any:
    """GET an admin API path of a L{novas} with its token; the decoded JSON (a 200 answer)."""
    status, body = admin_call(admin_port, "GET", path)
    assert status == 200, (path, status, body)
    return body


def route_port(admin_port: int, rid: str) -> int | None:
    """The port a L{novas} listens on for route C{rid} (its admin API says), or None if it does not."""
    for r in admin_api(admin_port, "/api/v1/routes")["routes"]:
        if r["id"] == rid and r["listening"]:
            return int(r["port"])
    return None


def refused(port: int) -> bool:
    """Whether a connection to C{port} on loopback is refused (nothing listens)."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
        return False
    except OSError:
        return True


def tunnels(server: Proc) -> list[dict[str, object]]:
    """The tunnels a L{novas} shows on /api/v1/tunnels."""
    body = admin_api(server.admin_port, "/api/v1/tunnels")
    return body["tunnels"]  # type: ignore[no-any-return]


def fd_count(pid: int) -> int:
    """Open file descriptors of a process (Linux)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def metric_total(server: Proc, name: str, **labels: str) -> float:
    """The sum of a L{novas}'s /metrics samples called C{name} that carry C{labels}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    request = urllib.request.Request(f"http://127.0.0.1:{server.admin_port}/metrics")
    request.add_header("Authorization", f"Bearer {ADMIN_TOKEN}")
    with urllib.request.urlopen(request, timeout=10) as r:
        text = r.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )
