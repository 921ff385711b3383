"""
The fence around the private Twisted and pyOpenSSL names the fast paths use
(nova.transport.private): every name the fast path touches is listed there, a class
missing one gets the public path, a pass is remembered per class, one walker
of the wrapper chain; and, on real TCP and TLS connections, the installed
releases take the fast path (this is the test that fails when an upgrade
makes NOVA fall back).
"""

from __future__ import annotations

import re
import socket
import tempfile
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import ssl as tssl
from twisted.internet import tcp
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import (
    SSL4ServerEndpoint,
    TCP4ClientEndpoint,
    TCP4ServerEndpoint,
    connectProtocol,
    wrapClientTLS,
)
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import deferLater
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.trial.unittest import TestCase
from zope.interface import implementer

from nova.tls import server_options
from nova.transport import fastpath, private, splice
from nova.transport.fastpath import FrameWriter

from .pki import CA

# Names --------------------------------------------------------------------------


def _private_names_used(module: Any, receivers: str) -> set[str]:
    source = Path(str(module.__file__)).read_text()
    return set(re.findall(rf"\b(?:{receivers})\.(_\w+)\b", source))


def test_every_private_name_the_fast_path_uses_is_listed() -> None:
    listed = set(private.TCP_NAMES) | set(private.TLS_NAMES) | set(private.CONNECTION_NAMES)
    listed |= set(private.AGGREGATOR_NAMES) | set(private.WRAPPER_NAMES) | {"_aggregator"}
    used = _private_names_used(fastpath, "t|tls|conn|aggregator|self._tls")
    used |= _private_names_used(splice, "t|transport")
    assert used, "the pattern found nothing: it no longer matches the code"
    assert used <= listed, f"private names used but not listed in nova/transport/private.py: {sorted(used - listed)}"


def test_openssl_bindings_are_only_imported_by_the_fence() -> None:
    for module in (fastpath, splice):
        assert "OpenSSL._util" not in Path(str(module.__file__)).read_text()


# The walker ------------------------------------------------------------------------


class Link:
    def __init__(self, below: object = None) -> None:
        self.transport = below


def test_transports_walks_down_the_wrapper_chain() -> None:
    bottom = object()
    middle = Link(bottom)
    top = Link(middle)
    assert list(private.transports(top)) == [top, middle, bottom]
    assert private.innermost(top) is bottom
    assert list(private.transports(None)) == []


def test_transports_stops_at_a_few_levels() -> None:
    chain: object = object()
    for _ in range(10):
        chain = Link(chain)
    assert len(list(private.transports(chain))) == 4


# TCP ----------------------------------------------------------------------------


def _bare_tcp(cls: type[tcp.Connection], **attributes: object) -> tcp.Connection:
    """An instance of C{cls} that skipped its constructor: only C{attributes} (and class attributes) are set."""
    conn: tcp.Connection = cls.__new__(cls)
    for name, value in attributes.items():
        setattr(conn, name, value)
    return conn


def _complete() -> dict[str, object]:
    return {"_tempDataBuffer": [], "socket": object()}


def test_a_tcp_class_missing_a_name_gets_the_public_path() -> None:
    class Renamed(tcp.Connection):
        pass

    conn = _bare_tcp(Renamed, socket=object())  # no _tempDataBuffer
    assert private.fast_tcp(conn) is None
    assert private.tcp_under(Link(conn)) is None
    writer = FrameWriter(conn)
    assert writer.tcp is None and not writer.raw_tls


def test_a_pass_is_remembered_per_class_and_a_failure_is_not() -> None:
    class Checked(tcp.Connection):
        pass

    closed = _bare_tcp(Checked)  # a closed connection has lost its socket
    assert private.fast_tcp(closed) is None
    first = _bare_tcp(Checked, **_complete())
    assert private.fast_tcp(first) is first  # the failure above did not condemn the class
    second = _bare_tcp(Checked)
    assert private.fast_tcp(second) is second  # checked once: the class passed
    assert private.fast_tcp(object()) is None
    assert private.fast_tcp(None) is None


def test_read_size_sets_the_read_size_of_a_checked_connection() -> None:
    class Sized(tcp.Connection):
        pass

    conn = _bare_tcp(Sized, **_complete())
    checked = private.fast_tcp(conn)
    splice.read_size(checked, 12345)
    assert conn.bufferSize == 12345
    splice.read_size(None, 1)  # the public path: nothing to set


# TLS ----------------------------------------------------------------------------


def test_a_tls_class_missing_a_name_gets_the_public_path() -> None:
    class Renamed(TLSMemoryBIOProtocol):
        pass

    tls: Any = Renamed.__new__(Renamed)
    for name in private.TLS_NAMES:
        setattr(tls, name, None)
    tls._tlsConnection = object()  # a pyOpenSSL Connection without _ssl, _from_ssl, ...
    assert not private.fast_tls(tls)
    assert not fastpath.raw_tls_supported(tls)
    assert not private.fast_tls(Link())


# Real connections -------------------------------------------------------------------


@implementer(IHalfCloseableProtocol)
class Recorder(Protocol):
    def __init__(self, made: Deferred[Recorder]) -> None:
        self.made = made
        self.received = b""
        self.eof: Deferred[bytes] = Deferred()
        self.write_closed = False

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.received += data

    def readConnectionLost(self) -> None:
        self.eof.callback(self.received)

    def writeConnectionLost(self) -> None:
        self.write_closed = True


@pytest.mark.integration
class InstalledReleasesTests(TestCase):
    """
    The releases installed (those setup.cfg bounds Twisted and pyOpenSSL
    at) give real TLS-over-TCP and TCP connections the fast path.  If this
    fails after an upgrade, the tunnel still works on the public path, but
    slower: check what the release renamed, adjust nova/transport/private.py and
    the bounds in setup.cfg.
    """

    timeout = 30

    @inlineCallbacks
    def connect(self, tls: bool) -> Generator[Deferred[Any], Any, tuple[Recorder, Recorder]]:
        from twisted.internet import reactor

        server_side: Deferred[Recorder] = Deferred()
        factory = Factory.forProtocol(lambda: Recorder(server_side))
        if tls:
            scratch = tempfile.TemporaryDirectory()
            self.addCleanup(scratch.cleanup)
            directory = Path(scratch.name)
            ca = CA()
            cert, key = ca.issue("127.0.0.1").write(directory, "server")
            server_endpoint: Any = SSL4ServerEndpoint(reactor, 0, server_options(cert, key), interface="127.0.0.1")
        else:
            server_endpoint = TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1")
        port = yield server_endpoint.listen(factory)
        self.addCleanup(port.stopListening)
        client_endpoint: Any = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        if tls:
            creator = tssl.optionsForClientTLS("127.0.0.1", trustRoot=tssl.Certificate.loadPEM(ca.cert_pem))
            client_endpoint = wrapClientTLS(creator, client_endpoint)
        client_side: Deferred[Recorder] = Deferred()
        client = yield connectProtocol(client_endpoint, Recorder(client_side))
        self.addCleanup(client.transport.abortConnection)
        yield client_side
        server = yield server_side
        self.addCleanup(server.transport.abortConnection)
        return client, server

    @inlineCallbacks
    def test_tls_over_tcp_takes_the_raw_tls_path(self) -> Generator[Deferred[Any], Any, None]:
        client, server = yield self.connect(tls=True)
        for end in (client, server):
            transport = end.transport
            assert private.fast_tls(transport), f"{transport!r} fell back to Twisted's TLS path"
            bottom = private.tcp_under(transport)
            assert isinstance(bottom, tcp.Connection), f"{transport!r}: no fast TCP connection under it"
            writer = FrameWriter(transport)
            assert writer.raw_tls
            assert writer.tcp is bottom
            # The option goes on the socket itself (TLS on a listening
            # port makes getHandle() the pyOpenSSL connection, not the socket).
            fastpath.set_notsent_lowat(writer.tcp, 65_536)
            raw = bottom.socket
            assert raw.getsockopt(socket.IPPROTO_TCP, fastpath.TCP_NOTSENT_LOWAT) == 65_536
            # The tunnel's dead timeout reaches the kernel the same way.
            assert fastpath.set_user_timeout(writer.tcp, 45.0)
            assert raw.getsockopt(socket.IPPROTO_TCP, fastpath.TCP_USER_TIMEOUT) == 45_000

    @inlineCallbacks
    def test_tcp_takes_the_direct_send_path(self) -> Generator[Deferred[Any], Any, None]:
        client, server = yield self.connect(tls=False)
        for end in (client, server):
            transport = end.transport
            assert private.fast_tcp(transport) is transport, f"{transport!r} fell back to Twisted's write"
            assert FrameWriter(transport).tcp is transport
            assert isinstance(transport.getHandle(), socket.socket)  # type: ignore[union-attr]
            assert fastpath.set_user_timeout(FrameWriter(transport).tcp, 2.5)
            raw = transport.getHandle()  # type: ignore[union-attr]
            assert raw.getsockopt(socket.IPPROTO_TCP, fastpath.TCP_USER_TIMEOUT) == 2_500

    @inlineCallbacks
    def test_half_close_shuts_the_write_side_as_twisted_would(self) -> Generator[Deferred[Any], Any, None]:
        """
        lose_write_tcp: idle, the write side is shut at once (no reactor
        turn); with bytes queued, or a paused producer, Twisted's own path
        sends them first.  Either way the peer reads everything, then EOF.
        """
        from twisted.internet import reactor

        for queued in (b"", b"x" * 8_000_000):
            client, server = yield self.connect(tls=False)
            transport = private.fast_tcp(client.transport)
            assert transport is not None
            if queued:
                transport.write(queued)  # more than the socket takes at once: some stays queued
            fastpath.lose_write_tcp(transport)
            assert client.write_closed is not bool(queued)
            received = yield server.eof
            assert received == queued
            assert client.write_closed
            server.transport.write(b"still open the other way")
            while not client.received:
                yield deferLater(reactor, 0.01)
            assert client.received == b"still open the other way"
