"""
The Twisted side of one tunnel connection: frames on a transport, the
multiplexer behind them, and a L{StreamTransport} per stream.

L{TunnelProtocol} is shared by both ends; the server and the agent subclass
it for their half of the handshake (L{nova.server.tunnel},
L{nova.agent.tunnel}).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from nova.wire.codec import FrameDecoder
from nova.wire.errors import ErrorCode, OpenFailReason, ProtocolError
from nova.wire.frames import Data, Fin, Frame, encode

from .core import (
    DataAvailable,
    Event,
    GoAwayReceived,
    Multiplexer,
    OpenAccepted,
    OpenRefused,
    PongReceived,
    Role,
    StreamEnded,
    StreamRequested,
    StreamReset,
    WindowOpened,
)
from .lifecycle import DEFAULT_DEAD_TIMEOUT, DEFAULT_KEEPALIVE, Session, SessionCore, start_session
from .splice import no_delay
from .stream import StreamTransport

DEFAULT_HANDSHAKE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Timing:
    """A tunnel's timers, in seconds (see README.md, "Timing")."""

    handshake_timeout: float = DEFAULT_HANDSHAKE_TIMEOUT
    keepalive: float = DEFAULT_KEEPALIVE
    dead_timeout: float = DEFAULT_DEAD_TIMEOUT


@implementer(IPushProducer)
class TunnelProtocol(Protocol):
    """
    Frames in, events out.  Until L{start_streams} is called every frame goes
    to L{handshake_frame}; after it, to the multiplexer.
    """

    log = Logger()
    role: Role

    def __init__(self, clock: IReactorTime, local_window: int, timing: Timing) -> None:
        self.clock = clock
        self.local_window = local_window
        self.peer_window = local_window
        self.timing = timing
        self.draining = False
        self.rtt: float | None = None
        self.bytes_sent = 0  # DATA payload
        self.bytes_received = 0
        self.mux: Multiplexer | None = None
        self.streams: dict[int, StreamTransport] = {}
        self.blocked: set[StreamTransport] = set()
        self.closed = False
        self._decoder = FrameDecoder()
        self._paused = False
        self._flushing = False
        self._flush_again = False
        self.core = SessionCore(
            clock,
            self,
            keepalive=timing.keepalive,
            dead_timeout=timing.dead_timeout,
            handshake_timeout=timing.handshake_timeout,
        )
        self.session: Session | None = None

    @property
    def peer_label(self) -> str:
        """How logs name the other end."""
        peer = self.transport.getPeer() if self.transport is not None else None
        host = getattr(peer, "host", None)
        return f"{host}:{getattr(peer, 'port', '')}" if host is not None else str(peer)

    # Protocol.

    def connectionMade(self) -> None:
        assert self.transport is not None
        no_delay(self.transport)
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.session = start_session(self.core)
        self.handshake_started()

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return
        self.core.heard()
        try:
            for frame in self._decoder.feed(data):
                if self.closed:
                    return
                if self.mux is None:
                    self.handshake_frame(frame)
                else:
                    if isinstance(frame, Data):
                        self.bytes_received += len(frame.data)
                    self._dispatch(self.mux.receive(frame))
        except ProtocolError as e:
            self.protocol_error(e)
            return
        self.flush()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.closed = True
        for stream in list(self.streams.values()):
            stream.tunnel_lost(reason)
        self.streams.clear()
        self.blocked.clear()
        self.tunnel_closed(reason)
        if self.session is not None:
            self.session.lost()

    # IPushProducer: the connection's transport pushes back on us.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self.flush()

    def stopProducing(self) -> None:
        self._paused = True

    # Hooks for the two ends.

    def handshake_started(self) -> None:
        """The connection is up; begin the handshake."""

    def handshake_frame(self, frame: Frame) -> None:
        """A frame arrived before the handshake finished."""
        raise ProtocolError(f"unexpected {frame.TYPE.name} during the handshake")

    def handshake_timed_out(self) -> None:
        """The handshake did not finish in time; the connection is closed next."""
        self.log.warn(
            "handshake with {peer} did not finish within {timeout}s; closing",
            peer=self.peer_label,
            timeout=self.timing.handshake_timeout,
        )

    def pending_streams(self) -> int:
        """Streams being opened that have no transport yet."""
        return 0

    def tunnel_closed(self, reason: Failure) -> None:
        """The connection is gone; every stream has been told."""

    def stream_requested(self, stream_id: int, host: str, port: int) -> None:
        raise ProtocolError("this side does not accept streams")

    def stream_opened(self, stream_id: int) -> None:
        pass

    def stream_refused(self, stream_id: int, event: OpenRefused) -> None:
        pass

    def pong_received(self, opaque: bytes) -> None:
        (sent,) = struct.unpack(">d", opaque)
        rtt = self.clock.seconds() - sent
        if 0 <= rtt < 3600:
            self.rtt = rtt

    def goaway_received(self, code: ErrorCode, message: str) -> None:
        self.log.info("{peer} is going away: {code} {message}", peer=self.peer_label, code=code.name, message=message)

    # Helpers for subclasses.

    def send_frame(self, frame: Frame) -> None:
        """Write one frame now (used for handshake frames)."""
        assert self.transport is not None
        self.transport.writeSequence(encode(frame))

    def start_streams(self, peer_window: int, max_streams: int = 1024) -> None:
        """The handshake succeeded: from now on frames go to the multiplexer."""
        self.peer_window = peer_window
        self.mux = Multiplexer(self.role, self.local_window, peer_window, max_streams)
        assert self.session is not None
        self.session.registered()

    def drain(self, timeout: float, code: ErrorCode = ErrorCode.SHUTDOWN, message: str = "draining") -> Deferred[None]:
        """
        Send GOAWAY and take no new streams; close once the open streams end
        or C{timeout} passes.  Fires when the connection is closed.
        """
        if self.session is None:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        return self.session.drain(timeout, code, message)

    # SessionHooks: what the session machine asks of us.

    def send_ping(self) -> None:
        if self.mux is not None:
            self.mux.ping(struct.pack(">d", self.clock.seconds()))
            self.flush()

    def send_goaway(self, code: ErrorCode, message: str) -> None:
        self.draining = True
        if self.mux is not None:
            self.mux.goaway(code, message)
            self.flush()

    def open_streams(self) -> int:
        return len(self.streams) + self.pending_streams()

    def abort(self, why: str, quiet: bool = False) -> None:
        """Drop the connection now; every stream is reset."""
        if self.transport is None or self.closed:
            return
        if not quiet:
            self.log.warn("dropping the tunnel with {peer}: {why}", peer=self.peer_label, why=why)
        self.closed = True
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def protocol_error(self, error: ProtocolError) -> None:
        """The peer broke the protocol: say so and close the connection."""
        self.log.warn("protocol error from {peer}: {error}", peer=self.peer_label, error=str(error))
        if self.mux is not None:
            self.mux.goaway(error.code, error.message)
            self.flush()
        self.close()

    def close(self) -> None:
        """Close the connection after what is already written."""
        if self.transport is not None and not self.closed:
            self.closed = True
            # A TLS transport does not shut down while a producer is registered.
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self.transport.loseConnection()

    def add_stream(self, stream_id: int, host: str, port: int) -> StreamTransport:
        stream = StreamTransport(self, stream_id, host, port)
        self.streams[stream_id] = stream
        return stream

    def stream_gone(self, stream: StreamTransport) -> None:
        self.streams.pop(stream.stream_id, None)
        self.blocked.discard(stream)
        if self.session is not None:
            self.session.stream_closed()

    def flush(self) -> None:
        """
        Write what the multiplexer has ready: control frames always, DATA
        only while the transport is not pushing back.  Then resume the
        producers of streams whose queues have drained.
        """
        if self._flushing:
            self._flush_again = True
            return
        mux = self.mux
        if mux is None or self.transport is None or self.closed:
            return
        self._flushing = True
        try:
            while True:
                self._flush_again = False
                wrote_data = False
                while not self.closed:
                    frame = mux.next_frame(data_allowed=not self._paused)
                    if frame is None:
                        break
                    self.transport.writeSequence(encode(frame))
                    if isinstance(frame, Fin):
                        wrote_data = True
                        stream = self.streams.get(frame.stream_id)
                        if stream is not None:
                            stream.fin_sent()
                    elif isinstance(frame, Data):
                        wrote_data = True
                        self.bytes_sent += len(frame.data)
                if wrote_data or self._flush_again:
                    for stream in list(self.blocked):
                        if not stream.drained():
                            self.blocked.discard(stream)
                if not self._flush_again or self.closed:
                    break
        finally:
            self._flushing = False

    # Internals.

    def _dispatch(self, events: list[Event]) -> None:
        for event in events:
            if isinstance(event, DataAvailable):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.data_available()
            elif isinstance(event, WindowOpened):
                pass  # flush() below sends what the window now allows
            elif isinstance(event, StreamEnded):
                stream = self.streams.get(event.stream_id)
                if stream is not None:
                    stream.remote_ended()
            elif isinstance(event, StreamReset):
                stream = self.streams.pop(event.stream_id, None)
                if stream is not None:
                    stream.reset_by_peer(event.code)
                else:
                    self.stream_refused(
                        event.stream_id, OpenRefused(event.stream_id, OpenFailReason.OTHER, f"reset: {event.code.name}")
                    )
            elif isinstance(event, StreamRequested):
                self.stream_requested(event.stream_id, event.host, event.port)
            elif isinstance(event, OpenAccepted):
                self.stream_opened(event.stream_id)
            elif isinstance(event, OpenRefused):
                self.stream_refused(event.stream_id, event)
            elif isinstance(event, PongReceived):
                self.pong_received(event.opaque)
            elif isinstance(event, GoAwayReceived):
                self.goaway_received(event.code, event.message)
