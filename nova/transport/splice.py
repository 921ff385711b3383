"""
Join two transports (a stream and a TCP connection) into one relay.

Bytes, half-closes, aborts and back-pressure all cross: each side's transport
is registered as the producer of the other, so a slow reader on one end
pauses the writer on the other.
"""

from __future__ import annotations

from twisted.internet import tcp
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IHalfCloseableProtocol, ITransport
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from nova.transport.fastpath import lose_write_tcp, write_tcp, writev_tcp
from nova.transport.private import fast_tcp, transports, unwrap_endpoint

# How much one read of a TCP connection may return (Twisted's default is
# 64 KiB): fewer, larger reads when a lot is waiting.  Twisted also pauses a
# connection's producer once this much waits in its write buffer, so it
# bounds what a slow local reader holds there too; 256 KiB moved no more
# data than 128 KiB (bench/HISTORY.md).
READ_SIZE = 128 * 1024


@implementer(IHalfCloseableProtocol)
class Pipe(Protocol):
    """
    One end of a relay.  Two pipes are joined with L{splice} once both are
    connected; until then a pipe's transport should be paused.
    """

    def __init__(self) -> None:
        self.peer: Pipe | None = None
        self.read_done = False
        self.write_done = False
        self.lost = False
        self._tcp: tcp.Connection | None = None  # our transport, when it is TCP

    def dataReceived(self, data: bytes) -> None:
        # parts_received([data]), without the list and the call: one of these per read.
        peer = self.peer
        if peer is not None:
            if peer._tcp is not None:
                write_tcp(peer._tcp, data)
            elif peer.transport is not None:
                peer.transport.write(data)
        else:
            self.unspliced_data(data)

    def unspliced_data(self, data: bytes) -> None:
        """
        Bytes read before this pipe was spliced (a subclass that reads
        before, a user's connection at an entry point, say, takes them
        here; once spliced, L{dataReceived} relays with no call of a
        subclass in between).  By default they are dropped: a pipe's
        transport is paused until it is spliced.
        """

    def parts_received(self, parts: list[bytes]) -> None:
        """L{dataReceived} for the concatenation of C{parts}."""
        peer = self.peer
        if peer is not None:
            if peer._tcp is not None:
                writev_tcp(peer._tcp, parts)
            elif peer.transport is not None:
                peer.transport.writeSequence(parts)

    def readConnectionLost(self) -> None:
        """Our side sent EOF: half-close the other side's write direction."""
        self.read_done = True
        peer = self.peer
        if peer is not None and not peer.lost and peer.transport is not None:
            peer.write_done = True
            if peer._tcp is not None:
                lose_write_tcp(peer._tcp)
            else:
                peer.transport.loseWriteConnection()  # type: ignore[attr-defined]
            peer._close_if_done()
        self._close_if_done()

    def writeConnectionLost(self) -> None:
        pass

    def _close_if_done(self) -> None:
        if self.read_done and self.write_done and not self.lost and self.transport is not None:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:  # noqa: B008
        self.lost = True
        peer = self.peer
        if peer is None or peer.lost or peer.transport is None:
            return
        if reason.check(ConnectionDone):
            peer.transport.loseConnection()
        else:
            peer.transport.abortConnection()  # type: ignore[attr-defined]


def no_delay(transport: object) -> None:
    """
    Turn off Nagle's algorithm on the TCP socket under C{transport} (through
    any TLS wrapper): NOVA forwards what it has at once, and Nagle plus
    delayed ACKs would add tens of milliseconds to request/response traffic.
    """
    for t in transports(transport):
        setter = getattr(t, "setTcpNoDelay", None)
        if setter is not None:
            try:
                setter(True)
            except OSError:
                pass
            return


def read_size(transport: tcp.Connection | None, size: int = READ_SIZE) -> None:
    """
    Let C{transport} read up to C{size} bytes at a time (its private
    C{bufferSize}): a connection that L{fast_tcp} passed, or None.  Called
    on every stream write, so it does no check of its own.
    """
    if transport is not None:
        transport.bufferSize = size


def splice(a: Pipe, b: Pipe) -> None:
    """
    Join two connected pipes and start the flow: each transport becomes the
    producer of the other, and both are resumed.
    """
    assert a.transport is not None and b.transport is not None
    a.peer, b.peer = b, a
    no_delay(a.transport)
    no_delay(b.transport)
    for pipe in (a, b):
        pipe._tcp = fast_tcp(pipe.transport)
        read_size(pipe._tcp)
        unwrap_endpoint(pipe._tcp, pipe)
    ta: ITransport = a.transport
    tb: ITransport = b.transport
    ta.registerProducer(tb, True)  # type: ignore[attr-defined]
    tb.registerProducer(ta, True)  # type: ignore[attr-defined]
    ta.resumeProducing()  # type: ignore[attr-defined]
    tb.resumeProducing()  # type: ignore[attr-defined]
