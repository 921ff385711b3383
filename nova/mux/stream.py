"""
A stream as a Twisted transport, so that any L{IProtocol} runs over it.

The transport is a consumer (what its protocol writes is queued in the
multiplexer and pushes back on a registered producer when too much waits) and
a push producer (what arrives is handed to the protocol only while nobody has
paused it; credit goes back to the peer only for what was handed over).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from twisted.internet import tcp
from twisted.internet.error import ConnectionAborted, ConnectionDone, ConnectionLost
from twisted.internet.interfaces import (
    IAddress,
    IConsumer,
    IHalfCloseableProtocol,
    IProducer,
    IProtocol,
    IPushProducer,
    ITransport,
)
from twisted.python.failure import Failure
from zope.interface import implementer

from nova.wire.errors import ErrorCode
from nova.wire.frames import DEFAULT_INITIAL_WINDOW

from .private import fast_tcp
from .splice import read_size

# The most bytes handed to the stream's protocol in one call.
_HANDOVER = DEFAULT_INITIAL_WINDOW

if TYPE_CHECKING:
    from .tunnel import TunnelProtocol


@implementer(IAddress)
@dataclass(frozen=True)
class StreamAddress:
    """One end of a stream: the tunnel's peer, plus the stream id and target."""

    tunnel: str
    stream_id: int
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.tunnel}#{self.stream_id}->{self.host}:{self.port}"


@implementer(ITransport, IConsumer, IPushProducer)
class StreamTransport:
    """
    The transport of one multiplexed stream.  Created by the tunnel; the
    protocol is attached with L{makeConnection}.
    """

    def __init__(self, tunnel: TunnelProtocol, stream_id: int, host: str, port: int) -> None:
        self._tunnel = tunnel
        self.stream_id = stream_id
        self._address = StreamAddress(tunnel.peer_label, stream_id, host, port)
        self.protocol: IProtocol | None = None
        self.disconnected = False
        self._reading_paused = False
        self._delivering = False
        self._producer: IProducer | None = None
        self._streaming = False
        self._producer_paused = False
        self._write_closed = False
        self._fin_sent = False
        self._remote_ended = False
        self._read_closed = False
        self._closing = False
        self.bytes_written = 0  # by our protocol, toward the peer
        self.bytes_delivered = 0  # from the peer, to our protocol
        self.on_close: list[Callable[[StreamTransport, Failure], None]] = []
        self._high_water = max(4096, min(65536, tunnel.peer_window // 2))
        # A protocol that takes a received chunk as pieces (a Pipe: one
        # sendmsg() instead of a join or several writes).
        self._parts_received: Callable[[list[bytes]], None] | None = None
        self._producer_tcp: tcp.Connection | None = None

    def __repr__(self) -> str:
        return f"<StreamTransport {self._address}>"

    # Connection.

    def makeConnection(self, protocol: IProtocol) -> None:
        self.protocol = protocol
        self._parts_received = getattr(protocol, "parts_received", None)
        protocol.makeConnection(self)
        self._deliver()

    # ITransport.

    def write(self, data: bytes) -> None:
        if self._write_closed or self.disconnected or not data:
            return
        tunnel = self._tunnel
        mux = tunnel.mux
        assert mux is not None
        mux.send(self.stream_id, data if type(data) is bytes else bytes(data))
        self.bytes_written += len(data)
        quantum = tunnel.note_active(self.stream_id)
        read_size(self._producer_tcp, quantum)
        # Small writes wait for the end of the reactor turn, to go out with
        # everything else written meanwhile; a queue at the high-water mark
        # goes at once (and pauses the producer only if it stays there).
        queued = mux.outbox_bytes(self.stream_id)
        if queued >= self._high_water:
            tunnel.flush()
            queued = mux.outbox_bytes(self.stream_id)
        else:
            tunnel.flush_soon()
        if (
            self._producer is not None
            and not self._producer_paused
            and (not self._streaming or queued >= self._high_water)
        ):
            self._producer_paused = True
            self._tunnel.blocked.add(self)
            if self._streaming:
                self._producer.pauseProducing()  # type: ignore[attr-defined]

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """Half-close: send FIN after everything written so far."""
        if self._write_closed or self.disconnected:
            return
        self._write_closed = True
        assert self._tunnel.mux is not None
        self._tunnel.mux.close_send(self.stream_id)
        self._tunnel.flush_soon()

    def loseConnection(self) -> None:
        """
        Send what is queued, then FIN; stop reading.  If the peer has not
        ended its direction by then, the stream is reset (like closing a
        socket with unread data).
        """
        if self.disconnected or self._closing:
            return
        self._closing = True
        self.loseWriteConnection()
        if self._fin_sent:
            self._finish_close()

    def abortConnection(self) -> None:
        if self.disconnected:
            return
        if self._tunnel.mux is not None:
            self._tunnel.mux.reset(self.stream_id, ErrorCode.CANCEL)
            self._tunnel.flush()
        self._lost(ConnectionAborted())

    def getPeer(self) -> StreamAddress:
        return self._address

    def getHost(self) -> StreamAddress:
        return self._address

    # IConsumer.

    def registerProducer(self, producer: IProducer, streaming: bool) -> None:
        if self._producer is not None:
            raise RuntimeError(f"{self!r} already has a producer")
        if self.disconnected:
            producer.stopProducing()
            return
        self._producer = producer
        self._producer_tcp = fast_tcp(producer)
        self._streaming = streaming
        self._producer_paused = False
        if not streaming:
            producer.resumeProducing()  # type: ignore[attr-defined]

    def unregisterProducer(self) -> None:
        self._producer = None
        self._producer_tcp = None
        self._tunnel.blocked.discard(self)

    # IPushProducer: the flow of received data into our protocol.

    def pauseProducing(self) -> None:
        self._reading_paused = True

    def resumeProducing(self) -> None:
        self._reading_paused = False
        self._deliver()

    def stopProducing(self) -> None:
        self.loseConnection()

    # Called by the tunnel.

    def data_available(self) -> None:
        self._deliver()

    def remote_ended(self) -> None:
        self._remote_ended = True
        self._deliver()

    def fin_sent(self) -> None:
        self._fin_sent = True
        if self._closing:
            self._finish_close()
            return
        proto = IHalfCloseableProtocol(self.protocol, None)
        if proto is not None:
            proto.writeConnectionLost()
        if self._read_closed:
            self._lost(ConnectionDone())

    def drained(self) -> bool:
        """
        The tunnel sent some of our queued bytes; resume our producer once
        the queue is low.  Returns True while we stay blocked.
        """
        mux = self._tunnel.mux
        if self._producer is None or mux is None or self.disconnected:
            return False
        if mux.outbox_bytes(self.stream_id) > self._high_water // 2:
            return True
        self._producer_paused = False
        self._producer.resumeProducing()  # type: ignore[attr-defined]
        return False

    def reset_by_peer(self, code: ErrorCode) -> None:
        self._lost(ConnectionLost(f"stream reset by the peer ({code.name})"))

    def tunnel_lost(self, reason: Failure) -> None:
        """
        The tunnel is gone.  A stream that had already ended both ways (both
        FINs) but still holds received bytes for a slow local reader keeps
        delivering them, then closes cleanly: the peer may close the tunnel as
        soon as its side of every stream is done (a draining agent does).
        Any other stream is cut.
        """
        if self._remote_ended and self._fin_sent and not self.disconnected:
            self._deliver()
            return
        self._lost(ConnectionLost(f"tunnel lost: {reason.getErrorMessage()}"))

    # Internals.

    def _deliver(self) -> None:
        mux = self._tunnel.mux
        if self._delivering or self.disconnected or self.protocol is None or mux is None:
            return
        self._delivering = True
        try:
            sid = self.stream_id
            now = self._tunnel.clock.seconds() if mux.max_window > mux.local_window else None
            while not self._reading_paused and not self.disconnected:
                # What arrived in one read, up to a window's worth, in one
                # hand-over (one sendmsg() for a Pipe).
                chunks = mux.take_upto(sid, _HANDOVER, now)
                if not chunks:
                    break
                if not self._closing:
                    self._tunnel.note_active(sid)
                    if len(chunks) == 1:
                        self.bytes_delivered += len(chunks[0])
                        self.protocol.dataReceived(chunks[0])
                    else:
                        self.bytes_delivered += sum(map(len, chunks))
                        if self._parts_received is not None:
                            self._parts_received(chunks)
                        else:
                            self.protocol.dataReceived(b"".join(chunks))
            if mux.rtt_wanted:
                self._tunnel.probe_rtt()
            if mux.has_output():
                self._tunnel.flush_soon()
            if (
                self._remote_ended
                and not self._read_closed
                and not self.disconnected
                and (not self._reading_paused or self._closing)
                and mux.inbox_bytes(self.stream_id) == 0
            ):
                self._read_eof()
        finally:
            self._delivering = False

    def _read_eof(self) -> None:
        self._read_closed = True
        if self._closing:
            if self._fin_sent:
                self._lost(ConnectionDone())
            return
        proto = IHalfCloseableProtocol(self.protocol, None)
        if proto is None:
            # A protocol that cannot half-close sees EOF as the end (as TCP).
            self.loseConnection()
            return
        proto.readConnectionLost()
        if self._fin_sent and not self.disconnected:
            self._lost(ConnectionDone())

    def _finish_close(self) -> None:
        if not self._read_closed and self._tunnel.mux is not None:
            self._tunnel.mux.reset(self.stream_id, ErrorCode.CANCEL)
            self._tunnel.flush()
        self._lost(ConnectionDone())

    def _lost(self, reason: Exception) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        self._tunnel.stream_gone(self)
        failure = Failure(reason)
        for hook in self.on_close:
            hook(self, failure)
        if self.protocol is not None:
            self.protocol.connectionLost(failure)
        producer, self._producer = self._producer, None
        if producer is not None:
            producer.stopProducing()
