"""
Control-frame floods against real processes (issue 14, defect 2): a peer
that sends frames needing an answer (PING) as fast as it can and never reads
the answers must not grow the other side's memory, and must not disturb
anyone else; honest bulk DATA both ways through one tunnel must never stall.
"""

from __future__ import annotations

import hashlib
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from OpenSSL import SSL
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.protocol import Factory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.trial.unittest import TestCase

from nova.mux.core import MAX_QUEUED_REPLIES
from nova.tls import certificate_fingerprint, server_options
from nova.transport import fastpath
from nova.transport.outbound import TUNNEL_READ
from nova.wire.codec import FrameDecoder
from nova.wire.errors import ProtocolError
from nova.wire.frames import Auth, Hello, Ping, Welcome, encode

from .pki import CA
from .processes import TOKEN, echo_roundtrip, fingerprint, free_port, novac, novas, rss_kib, target, wait_for
from .rawagent import RawAgent
from .test_mux_flood import Bare

# How long each flood runs, and how much the flooded process may grow over
# it.  Before the fix NOVAS grew by about 6 MiB/s under one flooder.
FLOOD_SECONDS = 12.0
RSS_BOUND_KIB = 16 * 1024

# A burst of PINGs, sent in one piece: 1,000 frames of 20 bytes.
PINGS = b"".join(b"".join(encode(Ping(i.to_bytes(8, "big")))) for i in range(1000))


def _pinned(server: object, port: int) -> dict[str, str]:
    return {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server)}  # type: ignore[arg-type]


class Flooder(threading.Thread):
    """Writes PINGs on a TLS connection as fast as it takes them; never reads."""

    def __init__(self, conn: SSL.Connection | ssl.SSLSocket, sock: socket.socket, seconds: float) -> None:
        super().__init__(daemon=True)
        self.conn = conn
        self.sock = sock
        self.seconds = seconds
        self.sent = 0
        self.error: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + self.seconds
        view = memoryview(PINGS)
        try:
            while time.monotonic() < deadline:
                try:
                    n = self.conn.send(view[:16384])
                except (SSL.WantWriteError, ssl.SSLWantWriteError, BlockingIOError):
                    self.wait_writable()
                    continue
                except (SSL.WantReadError, ssl.SSLWantReadError):
                    select.select([self.sock], [], [], 0.1)
                    continue
                self.sent += n
                view = view[n:] or memoryview(PINGS)
        except (OSError, SSL.Error) as e:  # the other side closed: what a flooder may get
            self.error = e
        finally:
            self.done.set()

    def wait_writable(self) -> None:
        """The socket took nothing: wait until it may take more."""
        select.select([], [self.sock], [], 0.1)


@pytest.mark.integration
def test_ping_flood_from_a_registered_agent_leaves_novas_bounded(tmp_path: Path) -> None:
    """
    A registered agent PINGs as fast as it can for FLOOD_SECONDS and never
    reads: NOVAS's RSS grows by less than RSS_BOUND_KIB, and a real agent
    registered beside it keeps serving its route during and after the flood.
    """
    route = free_port()
    with target("echo") as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}@role=good"]) as (server, port):
        with novac(tmp_path, _pinned(server, port) | {"NOVAC_TAGS": "role=good"}, name="good"):
            server.wait_log("agent good registered")
            assert echo_roundtrip(route, b"warm up" * 1000) == b"warm up" * 1000
            flooder_agent = RawAgent(port)
            assert isinstance(flooder_agent.register(TOKEN.encode(), "flooder"), Welcome)
            server.wait_log("agent flooder registered")
            before = rss_kib(server.proc.pid)
            flooder = Flooder(flooder_agent.conn, flooder_agent.sock, FLOOD_SECONDS)
            flooder.start()
            # The route keeps working while the flood runs.
            rounds = 0
            while not flooder.done.is_set() and rounds < 100_000:
                payload = os.urandom(4096)
                assert echo_roundtrip(route, payload, timeout=30) == payload
                rounds += 1
            flooder.join(60)
            grown = rss_kib(server.proc.pid) - before
            print(f"NOVAS RSS grew by {grown} KiB; the flooder wrote {flooder.sent} bytes; {rounds} echo rounds")
            assert grown < RSS_BOUND_KIB, f"NOVAS grew by {grown} KiB under a PING flood"
            assert rounds > 0
            assert echo_roundtrip(route, b"after the flood") == b"after the flood"
            # NOVAS stopped reading from the flooder (logged once), and the
            # pause held on the real TLS path: had reads gone on, the queued
            # PONGs would have reached MAX_QUEUED_REPLIES (a CONTROL_FLOOD).
            server.wait_log("reading from flooder paused")
            text = server.text()
            assert text.count("reading from flooder paused") == 1
            assert "CONTROL_FLOOD" not in text
            flooder_agent.close()


class RogueServer(threading.Thread):
    """
    A NOVAS impostor: TLS with its own certificate; it sends HELLO, takes any
    AUTH, sends WELCOME, then floods PINGs and never reads.  It serves the
    connections that come, one after the other, until stopped.
    """

    def __init__(self, directory: Path, seconds: float) -> None:
        super().__init__(daemon=True)
        cert, key = CA("rogue").issue("127.0.0.1").write(directory, "rogue")
        self.fingerprint = certificate_fingerprint(x509.load_pem_x509_certificate(cert.read_bytes()))
        self.context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.context.minimum_version = ssl.TLSVersion.TLSv1_3
        self.context.load_cert_chain(cert, key)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.seconds = seconds
        self.connections = 0
        self.welcomed = 0
        self.flooders: list[Flooder] = []
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        self.listener.settimeout(0.2)
        try:
            while not self.stop.is_set():
                try:
                    raw, _ = self.listener.accept()
                except TimeoutError:
                    continue
                self.connections += 1
                self._serve(raw)
        except BaseException as e:  # reported by the test
            self.error = e

    def _serve(self, raw: socket.socket) -> None:
        raw.settimeout(10)
        try:
            conn = self.context.wrap_socket(raw, server_side=True)
            conn.sendall(b"".join(encode(Hello(os.urandom(32)))))
            decoder = FrameDecoder()
            frames: list[object] = []
            while not frames:
                data = conn.recv(65536)
                if not data:
                    return
                frames += decoder.feed(data)
            assert isinstance(frames[0], Auth), frames[0]
            conn.sendall(b"".join(encode(Welcome(262_144, 15_000, "rogue"))))
        except (OSError, ProtocolError):
            raw.close()
            return
        self.welcomed += 1
        conn.setblocking(False)
        flooder = Flooder(conn, conn, self.seconds)
        self.flooders.append(flooder)
        flooder.start()


@contextmanager
def rogue_server(directory: Path, seconds: float) -> Iterator[RogueServer]:
    rogue = RogueServer(directory, seconds)
    rogue.start()
    try:
        yield rogue
    finally:
        rogue.stop.set()
        rogue.join(10)
        rogue.listener.close()


@pytest.mark.integration
def test_ping_flood_from_a_rogue_server_leaves_novac_bounded(tmp_path: Path) -> None:
    """
    NOVAC registered with an impostor that floods PINGs and never reads:
    NOVAC's RSS grows by less than RSS_BOUND_KIB, it stops reading, drops
    the tunnel with one clear line, and reconnects.
    """
    with rogue_server(tmp_path, FLOOD_SECONDS) as rogue:
        env = {
            "NOVAC_SERVER": f"127.0.0.1:{rogue.port}",
            "NOVAC_TLS_FINGERPRINT": rogue.fingerprint,
            # Drop a peer we have not heard from for 4 s (reading from the
            # flooder is paused, so nothing is heard), to see the reconnect.
            "NOVAC_KEEPALIVE": "1",
            "NOVAC_DEAD_TIMEOUT": "4",
        }
        with novac(tmp_path, env, name="victim") as agent:
            agent.wait_log("registered with")
            wait_for(lambda: rogue.flooders, 20, "the rogue server to start flooding")
            before = rss_kib(agent.proc.pid)
            first = rogue.flooders[0]
            peak = before
            while not first.done.wait(0.2):
                peak = max(peak, rss_kib(agent.proc.pid))
            peak = max(peak, rss_kib(agent.proc.pid))
            grown = peak - before
            print(f"NOVAC RSS grew by {grown} KiB at most; the rogue wrote {first.sent} bytes")
            assert grown < RSS_BOUND_KIB, f"NOVAC grew by {grown} KiB under a PING flood"
            agent.wait_log("reading from 127.0.0.1")
            agent.wait_log("dropping the tunnel with")
            wait_for(lambda: rogue.welcomed >= 2, 30, "NOVAC to reconnect")
            assert rogue.error is None
            text = agent.text()
            assert "did not read the" in text


class NarrowRelay:
    """
    A TCP relay on loopback with 16 KiB socket buffers and one blocking
    thread per direction: a link slower than either process, which makes the
    tunnel's transports push back on both sides.
    """

    BUFFER = 16 * 1024

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.socket()
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.BUFFER)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.BUFFER)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(8)
        self.port: int = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            server = socket.socket()
            server.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.BUFFER)
            server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.BUFFER)
            try:
                server.connect(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            self._sockets += [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(self.BUFFER):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        for s in self._sockets:
            s.close()


@pytest.mark.integration
def test_bulk_both_ways_through_one_tunnel_never_stalls(tmp_path: Path) -> None:
    """
    32 streams each way at once (2 MiB echoed on each) through real NOVAS
    and NOVAC over a narrow link, with pings every 0.2 s on both sides: both
    transports push back hundreds of times, with WINDOW_UPDATEs and PONGs
    waiting (checked once with a debug log: about 330 push-backs a side).
    Every byte arrives, sha256-identical, and neither side stops reading or
    calls the other a flood.
    """
    route = free_port()
    fast = {"NOVAS_KEEPALIVE": "0.2", "NOVAS_DEAD_TIMEOUT": "30"}
    with target("echo") as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}"], fast) as (server, port):
        # The tunnel crosses a narrow relay (small socket buffers, one
        # thread per direction), so both sides' transports push back, often
        # at the same time.
        relay = NarrowRelay(port)
        env = _pinned(server, port) | {"NOVAC_SERVER": f"127.0.0.1:{relay.port}"}
        with novac(tmp_path, env | {"NOVAC_KEEPALIVE": "0.2", "NOVAC_DEAD_TIMEOUT": "30"}) as agent:
            server.wait_log("agent agent-1 registered")
            # An echo stream moves its bytes both ways at once: client ->
            # NOVAS -> NOVAC -> target, and back, concurrently.
            payloads = [os.urandom(2 * 1024 * 1024 + i) for i in range(32)]
            with ThreadPoolExecutor(len(payloads)) as pool:
                results = list(pool.map(lambda p: echo_roundtrip(route, p, timeout=120), payloads))
            for sent, got in zip(payloads, results, strict=True):
                assert len(got) == len(sent)
                assert hashlib.sha256(got).digest() == hashlib.sha256(sent).digest()
            for proc in (server, agent):
                text = proc.text()
                assert "CONTROL_FLOOD" not in text
                assert "dropping the tunnel" not in text
                assert " paused: " not in text  # neither side ever stopped reading
        relay.close()


class _Stalling(Flooder):
    """A L{Flooder} that also says when its socket stayed full for half a second."""

    def __init__(self, conn: ssl.SSLSocket, seconds: float) -> None:
        super().__init__(conn, conn, seconds)
        self.stalls = 0  # times the socket took nothing for 0.5 s in a row

    def wait_writable(self) -> None:
        if not select.select([], [self.sock], [], 0.5)[1]:
            self.stalls += 1


@pytest.mark.integration
class PauseOnRealTLSTests(TestCase):
    """
    The read pause on a real TLS-over-TCP connection, on both receive paths
    (nova's raw TLS reads and Twisted's own): once the tunnel stops reading,
    no more frames reach it however hard the peer pushes, and it never
    reaches the CONTROL_FLOOD bound.
    """

    timeout = 60

    @inlineCallbacks
    def check(self, raw: bool) -> Generator[Deferred[Any], object, None]:
        from twisted.internet import reactor

        if not raw:
            self.patch(fastpath, "raw_tls_supported", lambda tls: False)
        directory = Path(self.mktemp())
        directory.mkdir()
        cert, key = CA().issue("127.0.0.1").write(directory, "server")
        tunnels: list[Bare] = []

        def build() -> Bare:
            tunnels.append(Bare(reactor))  # type: ignore[arg-type]
            return tunnels[-1]

        factory = TLSMemoryBIOFactory(server_options(cert, key), False, Factory.forProtocol(build))
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[arg-type]
        self.addCleanup(port.stopListening)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        sock = socket.create_connection(("127.0.0.1", port.getHost().port))  # type: ignore[attr-defined]
        conn = context.wrap_socket(sock, do_handshake_on_connect=False)
        conn.setblocking(False)
        flooder = _Stalling(conn, 30.0)
        self.addCleanup(conn.close)

        def start() -> None:
            while True:
                try:
                    conn.do_handshake()
                    break
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    select.select([conn], [conn], [], 0.1)
            flooder.start()

        yield deferToThread(start)

        def until(predicate: Callable[[], bool], what: str) -> Deferred[None]:
            async def wait() -> None:
                for _ in range(400):  # 20 s
                    if predicate():
                        return
                    # Polling with a deadline: the state is another process's.
                    await deferLater(reactor, 0.05)
                raise AssertionError(f"timed out waiting for {what}")

            return Deferred.fromCoroutine(wait())

        yield until(lambda: bool(tunnels) and tunnels[0].reading_paused and flooder.stalls > 0, "the pause")
        tunnel = tunnels[0]
        assert tunnel.mux is not None and tunnel._writer is not None
        self.assertEqual(tunnel._writer.raw_tls, raw)
        self.check_socket(tunnel, raw)
        # The records of the read already in progress when the pause began are
        # still decoded (at most one read's worth, far below the bound): let
        # them land before taking the count.
        first_stalls = flooder.stalls
        yield until(lambda: flooder.stalls >= first_stalls + 2, "two more stalls")
        held, stalls = tunnel.mux.queued_replies, flooder.stalls
        # The peer keeps pushing; the reactor keeps running; nothing more is read.
        yield until(lambda: flooder.stalls >= stalls + 2, "two more stalls")
        self.assertTrue(tunnel.reading_paused)
        self.assertEqual(tunnel.mux.queued_replies, held)
        self.assertFalse(tunnel.closed)
        self.assertLess(held, MAX_QUEUED_REPLIES)
        conn.close()
        yield deferToThread(flooder.join, 40)

    def check_socket(self, tunnel: Bare, raw: bool) -> None:
        """
        The tunnel's socket as the tunnel set it up (on the raw path, the
        one that reaches the socket): a short unsent queue in the kernel,
        and reads of TUNNEL_READ (the bound checked here counts on it).
        """
        if not raw:
            return
        assert tunnel._writer is not None
        bottom = tunnel._writer.tcp
        assert bottom is not None
        self.assertEqual(bottom.bufferSize, TUNNEL_READ)
        lowat = bottom.socket.getsockopt(socket.IPPROTO_TCP, fastpath.TCP_NOTSENT_LOWAT)
        self.assertEqual(lowat, fastpath.NOTSENT_LOWAT)

    def test_raw_tls_receive_path(self) -> Deferred[None]:
        return self.check(raw=True)

    def test_twisted_tls_receive_path(self) -> Deferred[None]:
        return self.check(raw=False)
