"""
A stream as a Twisted transport, so that any L{IProtocol} runs over it.

The transport is a consumer (what its protocol writes is queued in the
multiplexer and pushes back on a registered producer when too much waits) and
a push producer (what arrives is handed to the protocol only while nobody has
paused it; credit goes back to the peer only for what was handed over).

The stream and its tunnel meet at two narrow interfaces, as Twisted's
C{H2Stream} and C{H2Connection} do: the stream asks its owner for everything
by stream id (L{StreamOwner}: L{write_data<StreamOwner.write_data>},
L{end_stream<StreamOwner.end_stream>}, ...) and the owner tells the stream
what happened through a few named notifications (L{StreamEvents}).  Neither
touches the other's fields, and this module does not import the tunnel.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import tcp
from twisted.internet._producer_helpers import _PullToPush
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

from nova.mux.contract import StreamEvents as StreamEvents  # re-exported: the stream's side of the contract
from nova.mux.contract import StreamOwner as StreamOwner
from nova.mux.lifecycle import start_halves
from nova.transport.private import fast_tcp
from nova.transport.splice import read_size
from nova.wire.errors import ErrorCode
from nova.wire.frames import DEFAULT_INITIAL_WINDOW

# The most bytes handed to the stream's protocol in one call.
_HANDOVER = DEFAULT_INITIAL_WINDOW


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
    The transport of one multiplexed stream.  Created by the tunnel (its
    L{StreamOwner}); the protocol is attached with L{makeConnection}.

    To the tunnel it is a L{StreamEvents}; to its two half machines
    (L{nova.mux.lifecycle.ReadHalf}, L{nova.mux.lifecycle.WriteHalf}) a
    L{nova.mux.lifecycle.StreamHalvesHooks}.  Everything it does to the
    tunnel is one L{StreamOwner} call.
    """

    def __init__(
        self,
        owner: StreamOwner,
        stream_id: int,
        address: StreamAddress,
        high_water: int,
        quantum: int,
    ) -> None:
        self._owner = owner
        self.stream_id = stream_id
        self._address = address
        # Queued unsent bytes at which a registered producer is paused.
        self._high_water = high_water
        self._quantum = quantum
        self.protocol: IProtocol | None = None
        # Where each half is (nova.mux.lifecycle): the machines decide, the
        # data path reads their core's fields.
        self._halves, self._read, self._write = start_halves(self)
        self.disconnected = False  # gone, either way (ITransport's usual field)
        # Flow control, not state: our protocol paused what we hand it; we
        # paused our producer until our queue drains; a hand-over is running.
        self._reading_paused = False
        self._producer_paused = False
        self._delivering = False
        # A pull producer is driven as a push producer (Twisted's
        # _PullToPush), so every producer here is a push producer.
        self._producer: IPushProducer | None = None
        self._pull: _PullToPush | None = None
        self.bytes_written = 0  # by our protocol, toward the peer
        self.bytes_delivered = 0  # from the peer, to our protocol
        self.on_close: list[Callable[[StreamTransport, Failure], None]] = []
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
        if not self._halves.can_write or not data:
            return
        # Small writes wait for the end of the reactor turn, to go out with
        # everything else written meanwhile; a queue at the high-water mark
        # goes at once (and pauses the producer only if it stays there).
        queued = self._owner.write_data(self.stream_id, data if type(data) is bytes else bytes(data), self._high_water)
        self.bytes_written += len(data)
        producer = self._producer
        if producer is not None and not self._producer_paused and queued >= self._high_water:
            self._producer_paused = True
            self._owner.watch_drain(self.stream_id, True)
            producer.pauseProducing()

    def writeSequence(self, data: Any) -> None:
        self.write(b"".join(data))

    def loseWriteConnection(self) -> None:
        """Half-close: send FIN after everything written so far."""
        self._write.end()

    def loseConnection(self) -> None:
        """
        Send what is queued, then FIN; stop reading.  If the peer has not
        ended its direction by then, the stream is reset (like closing a
        socket with unread data).
        """
        self._read.drop()
        self._write.close()

    def abortConnection(self) -> None:
        if self.disconnected:
            return
        self._owner.reset_stream(self.stream_id, ErrorCode.CANCEL)
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
        if streaming:
            self._producer = producer  # type: ignore[assignment]
        else:
            self._pull = _PullToPush(producer, self)
            self._producer = self._pull
        self._producer_tcp = fast_tcp(producer)
        read_size(self._producer_tcp, self._quantum)
        self._producer_paused = False
        if self._pull is not None:
            self._pull.startStreaming()

    def unregisterProducer(self) -> None:
        pull, self._pull = self._pull, None
        if pull is not None:
            pull.stopStreaming()
        self._producer = None
        self._producer_tcp = None
        self._owner.watch_drain(self.stream_id, False)

    # IPushProducer: the flow of received data into our protocol.

    def pauseProducing(self) -> None:
        self._reading_paused = True

    def resumeProducing(self) -> None:
        self._reading_paused = False
        self._deliver()

    def stopProducing(self) -> None:
        self.loseConnection()

    # StreamEvents: called by the tunnel.

    def remote_ended(self) -> None:
        self._read.peer_ended()
        self._deliver()

    def fin_sent(self) -> None:
        self._write.fin_sent()

    def drained(self, queued: int) -> bool:
        """
        The tunnel sent some of our queued bytes; resume our producer once
        the queue is low.  Returns True while we stay blocked.
        """
        producer = self._producer
        if producer is None or self.disconnected:
            return False
        if queued > self._high_water // 2:
            return True
        self._producer_paused = False
        producer.resumeProducing()
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
        halves = self._halves
        if halves.eof_due and halves.write_over and not self.disconnected:
            self._deliver()
            return
        self._lost(ConnectionLost(f"tunnel lost: {reason.getErrorMessage()}"))

    def quantum_changed(self, quantum: int) -> None:
        self._quantum = quantum
        read_size(self._producer_tcp, quantum)

    # Internals.

    def _deliver(self, batch: bool = False) -> None:
        if self._delivering or self.disconnected or self.protocol is None:
            return
        self._delivering = True
        try:
            sid = self.stream_id
            owner = self._owner
            halves = self._halves
            waiting = -1  # not asked yet
            while not self._reading_paused and not self.disconnected:
                # What arrived in one read, up to a window's worth, in one
                # hand-over (one sendmsg() for a Pipe).
                chunks = owner.read_data(sid, _HANDOVER)
                if not chunks:
                    break
                waiting = -1
                if len(chunks) > 1:
                    self._hand_over(chunks)
                    continue
                chunk = chunks[0]
                if not halves.dropping:
                    self.bytes_delivered += len(chunk)
                    self.protocol.dataReceived(chunk)
                if len(chunk) < _HANDOVER:
                    # Most likely all there was (a request, a reply).  In
                    # the tunnel's read batch it was (the take emptied our
                    # bytes, and what arrives before the batch ends is told
                    # to us again): the batch's end sends the credit.
                    # Otherwise ask what waits instead of asking for more.
                    waiting = 0 if batch else owner.data_consumed(sid)
                    if not waiting:
                        break
            if waiting < 0:
                waiting = owner.data_consumed(sid)
            if halves.eof_due:
                self._end_if_delivered(waiting)
        finally:
            self._delivering = False

    # StreamEvents.data_available is _deliver itself: one call per hand-over fewer.
    data_available = _deliver

    def _end_if_delivered(self, waiting: int) -> None:
        """The peer ended: tell the read half once everything waiting was handed over."""
        if not self.disconnected and (not self._reading_paused or self._halves.dropping) and waiting == 0:
            self._read.all_delivered()

    def _hand_over(self, chunks: list[bytes]) -> None:
        """Several chunks to our protocol, in one call (unless it closed the stream)."""
        assert self.protocol is not None
        if self._halves.dropping:
            return
        self.bytes_delivered += sum(map(len, chunks))
        if self._parts_received is not None:
            self._parts_received(chunks)
        else:
            self.protocol.dataReceived(b"".join(chunks))

    # StreamHalvesHooks: what the half machines decide.

    def send_fin(self) -> None:
        self._owner.end_stream(self.stream_id)

    def read_closed(self) -> None:
        proto = IHalfCloseableProtocol(self.protocol, None)
        if proto is None:
            # A protocol that cannot half-close sees EOF as the end (as TCP).
            self.loseConnection()
        else:
            proto.readConnectionLost()

    def write_closed(self) -> None:
        proto = IHalfCloseableProtocol(self.protocol, None)
        if proto is not None:
            proto.writeConnectionLost()

    def finish(self, cut: bool) -> None:
        if self.disconnected:
            return
        if cut:
            self._owner.reset_stream(self.stream_id, ErrorCode.CANCEL)
        self._lost(ConnectionDone())

    def _lost(self, reason: Exception) -> None:
        if self.disconnected:
            return
        self.disconnected = True
        self._read.gone()
        self._write.gone()
        self._owner.stream_closed(self.stream_id)
        failure = Failure(reason)
        for hook in self.on_close:
            hook(self, failure)
        if self.protocol is not None:
            self.protocol.connectionLost(failure)
        producer, self._producer = self._producer, None
        self._pull = None
        if producer is not None:
            producer.stopProducing()
