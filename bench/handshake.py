"""
What one TLS handshake of a registration costs each side, in memory:
NOVAS's self-signed P-256 certificate with NOVAS's own server options,
NOVAC's pinned-fingerprint client, full handshakes against TLS 1.3
resumptions (a session ticket offered again).  No sockets: memory BIOs, so
the figures are the handshake's CPU alone, not the reactor's.

    python bench/handshake.py [--count 400] [--mode full] [--mode resumed]
    python bench/handshake.py --registrations 300

With C{--registrations}, whole registrations instead: NOVAC's
C{AgentTunnel} (pinned fingerprint) against NOVAS's C{ServerTunnel}, TLS and
the HMAC handshake, each side's CPU inside its TLS protocol's calls.

CPU time moves with the machine's load; for figures that do not, run it
under callgrind and read the inclusive instruction counts of
C{ossl_statem_accept} (NOVAS's side) and C{ossl_statem_connect} (NOVAC's):

    valgrind --tool=callgrind --callgrind-out-file=cg.out \\
        python bench/handshake.py --count 200 --mode full
    callgrind_annotate --inclusive=yes cg.out | grep ossl_statem_

This is the measurement behind "TLS session resumption" in bench/HISTORY.md
(the 10,000-agent section): resumption is not built.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from OpenSSL import SSL, crypto
from OpenSSL._util import lib as _lib  # SSL_session_reused: pyOpenSSL has no public call for it
from twisted.internet import ssl

from nova.tls import client_creator, ensure_server_certificate, parse_fingerprint

T = TypeVar("T")
lib: Any = _lib


class Sides:
    """CPU seconds spent on each side's calls."""

    def __init__(self) -> None:
        self.cpu = {"novas": 0.0, "novac": 0.0}

    def run(self, side: str, f: Callable[..., T], *args: Any) -> T | None:
        started = time.process_time()
        try:
            return f(*args)
        except SSL.WantReadError:
            return None
        finally:
            self.cpu[side] += time.process_time() - started


def _move(sides: Sides, src: SSL.Connection, dst: SSL.Connection, dst_side: str) -> None:
    try:
        data = src.bio_read(65536)
    except SSL.WantReadError:
        return
    sides.run(dst_side, dst.bio_write, data)


def handshake(
    sides: Sides, server: SSL.Context, creator: Any, session: SSL.Session | None
) -> tuple[SSL.Connection, SSL.Connection]:
    """One handshake, then one record from NOVAS so that NOVAC reads its session tickets."""
    s = sides.run("novas", SSL.Connection, server, None)
    assert s is not None
    s.set_accept_state()
    c: SSL.Connection | None = sides.run("novac", creator.clientConnectionForTLS, None)
    assert c is not None
    if session is not None:
        c.set_session(session)
    for _ in range(6):
        sides.run("novac", c.do_handshake)
        _move(sides, c, s, "novas")
        sides.run("novas", s.do_handshake)
        _move(sides, s, c, "novac")
    sides.run("novas", s.send, b"x")
    _move(sides, s, c, "novac")
    if sides.run("novac", c.recv, 1) != b"x":
        raise SystemExit("handshake: the connection did not carry data")
    return c, s


def _closed_cleanly(*conns: SSL.Connection) -> None:
    # OpenSSL makes a session unresumable when its connection is freed
    # without close_notify both ways; these stand for cleanly closed ones.
    for conn in conns:
        conn.set_shutdown(SSL.SENT_SHUTDOWN | SSL.RECEIVED_SHUTDOWN)


def registrations(count: int) -> None:
    """Each side's CPU for C{count} whole registrations, in memory (iosim)."""
    import harness  # noqa: F401  # puts the repository on sys.path for tests.contexts
    from twisted.internet.defer import fail
    from twisted.internet.task import Clock
    from twisted.protocols.tls import TLSMemoryBIOFactory
    from twisted.test import iosim

    from nova.agent.tunnel import AgentTunnelFactory
    from nova.server.tunnel import ServerTunnelFactory
    from nova.tls import server_options
    from tests.contexts import agent_context, server_context

    token = b"bench registration token"
    clock = Clock()
    made = ensure_server_certificate(Path(tempfile.mkdtemp()))
    novas = server_context(clock, token=token, tls=True)
    server_factory = TLSMemoryBIOFactory(
        server_options(made.cert_path, made.key_path), False, ServerTunnelFactory(novas), clock
    )
    creator = client_creator("localhost", fingerprint=parse_fingerprint(made.fingerprint))
    sides = Sides()

    def timed(side: str, f: Callable[..., Any]) -> Callable[..., Any]:
        return lambda *args: sides.run(side, f, *args)

    def one(name: str) -> None:
        agent = agent_context(
            clock, lambda host, port, protocol: fail(ConnectionRefusedError()), name=name, token=token, tls=True
        )
        client_factory = TLSMemoryBIOFactory(creator, True, AgentTunnelFactory(agent, "localhost:9022"), clock)
        address = iosim.FakeAddress()
        s, c = server_factory.buildProtocol(address), client_factory.buildProtocol(address)
        for protocol, side in ((s, "novas"), (c, "novac")):
            protocol.dataReceived = timed(side, protocol.dataReceived)  # type: ignore[method-assign]
            protocol.makeConnection = timed(side, protocol.makeConnection)  # type: ignore[method-assign]
        pump = iosim.connect(s, iosim.makeFakeServer(s), c, iosim.makeFakeClient(c), greet=False)
        for _ in range(100):
            clock.advance(0)
            if not pump.pump():
                break
        if novas.registry.get(name) is None:
            raise SystemExit(f"handshake: {name} did not register")
        clock.calls.clear()  # the tunnels' keepalive timers: a Clock sorts them all on every call

    for i in range(5):
        one(f"warm-{i}")
    sides.cpu = {"novas": 0.0, "novac": 0.0}
    for i in range(count):
        one(f"agent-{i}")
    per = {k: v / count * 1000 for k, v in sides.cpu.items()}
    print(f"registration NOVAS {per['novas']:.3f} ms, NOVAC {per['novac']:.3f} ms CPU ({count})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--mode", action="append", choices=("full", "resumed"))
    parser.add_argument("--registrations", type=int, default=0, help="measure this many whole registrations instead")
    args = parser.parse_args(argv)
    if args.registrations:
        registrations(args.registrations)
        return 0

    made = ensure_server_certificate(Path(tempfile.mkdtemp()))
    # NOVAS's server options (nova.tls.server_options) with session tickets
    # allowed, which Twisted turns off unless asked: what resumption needs.
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, made.key_path.read_bytes())
    cert = crypto.load_certificate(crypto.FILETYPE_PEM, made.cert_path.read_bytes())
    options = ssl.CertificateOptions(
        privateKey=key, certificate=cert, raiseMinimumTo=ssl.TLSVersion.TLSv1_3, enableSessionTickets=True
    )
    server: SSL.Context = options.getContext()
    creator = client_creator("localhost", fingerprint=parse_fingerprint(made.fingerprint))
    first_c, first_s = handshake(Sides(), server, creator, None)
    session = first_c.get_session()
    _closed_cleanly(first_c, first_s)
    for mode in args.mode or ["full", "resumed"]:
        sides = Sides()
        reused = 0
        for _ in range(args.count):
            c, s = handshake(sides, server, creator, session if mode == "resumed" else None)
            reused += lib.SSL_session_reused(c._ssl)
            _closed_cleanly(c, s)
        per = {k: v / args.count * 1000 for k, v in sides.cpu.items()}
        print(
            f"{mode:8s} NOVAS {per['novas']:.3f} ms, NOVAC {per['novac']:.3f} ms CPU per handshake"
            f" ({args.count}, {reused} resumed)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
