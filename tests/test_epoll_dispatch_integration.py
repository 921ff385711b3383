"""
The epoll reactor's per-event dispatch (nova.transport.epoll) in real
processes: NOVAS and NOVAC say at start that it is on and carry traffic;
under another reactor (C{twist --reactor=select}) it stays off; and a
protocol that raises in C{dataReceived} under a running EPollReactor with
the dispatch is still logged with its traceback and its connection closed.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nova.transport.epoll import ACTIVE

from .processes import Proc, echo_roundtrip, fingerprint, free_port, novac, novas, target

pytestmark = pytest.mark.integration


def agent_env(server: Proc, port: int) -> dict[str, str]:
    return {"NOVAC_SERVER": f"127.0.0.1:{port}", "NOVAC_TLS_FINGERPRINT": fingerprint(server)}


def uses_epoll(p: Proc) -> bool:
    """Whether the process holds an epoll descriptor (what tells EPollReactor from SelectReactor from outside)."""
    fds = Path(f"/proc/{p.pid}/fd")
    return any("eventpoll" in os.readlink(fd) for fd in fds.iterdir())


def roundtrip_through(tmp_path: Path, twist: tuple[str, ...], epoll: bool) -> tuple[str, str]:
    """Both logs after an echo round trip through a route, both sides run with twist's C{twist} options."""
    route = free_port()
    with target() as echo, novas(tmp_path, [f"{route}:127.0.0.1:{echo}"], twist=twist) as (server, port):
        with novac(tmp_path, agent_env(server, port), twist=twist) as agent:
            server.wait_log("agent agent-1 registered")
            payload = bytes(range(256)) * 4096
            assert echo_roundtrip(route, payload) == payload
            assert uses_epoll(server) is epoll
            assert uses_epoll(agent) is epoll
            return server.text(), agent.text()


def test_novas_and_novac_say_the_dispatch_is_on_and_carry_traffic(tmp_path: Path) -> None:
    server_log, agent_log = roundtrip_through(tmp_path, (), epoll=True)
    assert ACTIVE in server_log
    assert ACTIVE in agent_log


def test_under_another_reactor_twisteds_dispatch_stays(tmp_path: Path) -> None:
    server_log, agent_log = roundtrip_through(tmp_path, ("--reactor=select",), epoll=False)
    assert ACTIVE not in server_log
    assert ACTIVE not in agent_log


# A careless protocol under a running EPollReactor with the dispatch, logging
# as twist does (text lines on stdout).  Prints the port, then stops when the
# connection is lost.
CARELESS = textwrap.dedent(
    """
    import sys
    from twisted.internet import epollreactor
    epollreactor.install()
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol
    from twisted.logger import globalLogBeginner, textFileLogObserver
    from nova.transport import epoll

    globalLogBeginner.beginLoggingTo([textFileLogObserver(sys.stdout)])

    class Careless(Protocol):
        def dataReceived(self, data):
            raise ValueError("cannot parse " + data.decode())

        def connectionLost(self, reason):
            print("connection lost:", reason.getErrorMessage(), flush=True)
            reactor.callLater(0, reactor.stop)

    assert epoll.install(reactor)
    port = reactor.listenTCP(0, Factory.forProtocol(Careless), interface="127.0.0.1")
    print("PORT", port.getHost().port, flush=True)
    reactor.callLater(60, reactor.stop)
    reactor.run()
    """
)


def test_a_protocol_error_is_logged_with_its_traceback_and_the_connection_closed() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", CARELESS], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    ) as p:
        assert p.stdout is not None
        lines = []
        for line in p.stdout:
            lines.append(line)
            if "PORT " in line:  # print() goes through the log: "... [stdout#info] PORT 1234"
                break
        with socket.create_connection(("127.0.0.1", int(lines[-1].split("PORT ")[1])), timeout=30) as c:
            c.sendall(b"junk")
            assert c.recv(10) == b""  # closed by Twisted, as before
        out = "".join(lines) + p.communicate(timeout=60)[0]
    assert ACTIVE in out
    # The line as it reads now: the system is "-", no longer the connection's
    # prefix ("[Careless,0,127.0.0.1] Unhandled Error"); the traceback names the protocol.
    assert "[-] Unhandled Error" in out
    assert "Traceback (most recent call last):" in out
    assert "in dataReceived" in out
    assert "builtins.ValueError: cannot parse junk" in out
    assert "connection lost: cannot parse junk" in out
