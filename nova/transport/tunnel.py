"""
The Twisted side of one tunnel connection: frames on a transport, the
multiplexer behind them, and a L{StreamTransport} per stream.

L{TunnelProtocol} is shared by both ends; the server and the agent subclass
it for their half of the handshake (L{nova.server.tunnel},
L{nova.agent.tunnel}).  It is an adapter that wires four parts together:

 - the multiplexer (L{nova.mux.core.Multiplexer}, no I/O): streams,
   windows, frames;
 - the outbound scheduler (L{nova.transport.outbound.OutboundScheduler}): when
   what is ready is written, the quantum, blocked streams;
 - the inbound delivery (L{nova.mux.inbound.InboundDelivery}): received
   frames to the multiplexer and on to the streams, batched per read
   (L{nova.mux.inbound.ReadBatches});
 - the session machine (L{nova.mux.lifecycle}): handshake deadline,
   keepalive, drain.

To its streams the tunnel is a L{nova.transport.stream.StreamOwner} (every call
keyed by stream id), and it tells them what happens through
L{nova.transport.stream.StreamEvents}.  How data moves through it (batched
flushes, the quantum, the raw TLS path) is described in docs/datapath.md.

Back-pressure from the peer (a peer that does not read).  DATA is bounded by
the flow-control windows, so it simply waits while the transport pushes
back.  Control frames could not be bounded that way: a peer that sends PINGs
(or OPENs) and never reads would have us queue a PONG (an OPEN_OK or
OPEN_FAIL) for each, without end.  The rule:

 1. While the transport pushes back (L{pauseProducing}), control frames wait
    in the multiplexer too, in order, instead of piling up in the
    transport's buffer.  Only L{close} (and so a GOAWAY that ends the
    connection) writes them regardless.
 2. While the transport pushes back I{and} at least L{READ_PAUSE_REPLIES}
    replies (control frames that answer one peer frame each: PONG, OPEN_OK,
    OPEN_FAIL) wait, we stop reading from the peer; reading resumes once the
    transport takes more and the replies are written.
 3. A peer frame that would need a reply while
    L{nova.mux.core.MAX_QUEUED_REPLIES} wait is a connection error: GOAWAY
    C{CONTROL_FLOOD}, and the connection is closed (aborted after
    L{CLOSE_TIMEOUT} if the peer does not read even that: so is any
    connection we close).

Invariants: what a peer makes us hold for it is at most
C{MAX_QUEUED_REPLIES} replies plus control frames bounded by our own
activity and by flow control (a WINDOW_UPDATE returns at least half a window
that was consumed; the peer sends no more DATA until it reads it).  We stop
reading only because of replies, never because of DATA, so two honest peers
that both send bulk DATA at once never both stop reading: an honest peer
causes at most one reply per keepalive interval on NOVAS (its PINGs; NOVAC
sends no OPENs), so NOVAS always reads from an honest NOVAC, NOVAC's output
always drains, and a NOVAC that stopped reading (a burst of OPENs while its
output was backed up) starts again.  (This assumes a keepalive long enough
that fewer than 64 of one side's PINGs are in flight at once; our own PINGs
wait with the other control frames while our transport pushes back.)  A peer
that keeps our reading paused is not heard from, so the dead-peer timeout
drops it.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from nova.mux.core import Buffer, Multiplexer, OpenRefused, Role, WindowBudget
from nova.mux.inbound import InboundDelivery
from nova.mux.lifecycle import (
    Session,
    SessionCore,
    start_session,
)
from nova.transport.fastpath import FrameWriter, set_notsent_lowat, set_user_timeout
from nova.transport.outbound import TUNNEL_READ, OutboundScheduler
from nova.transport.splice import no_delay, read_size
from nova.transport.stream import StreamAddress, StreamTransport
from nova.wire.codec import FrameDecoder
from nova.wire.errors import ErrorCode, ProtocolError
from nova.wire.frames import Data, Frame, encode
from nova.wire.text import untrusted

DEFAULT_HANDSHAKE_TIMEOUT = 10.0

# Stop reading from the peer while the transport pushes back and this many
# replies (PONG, OPEN_OK, OPEN_FAIL) wait to be written.  Well above what an
# honest peer causes while our output is backed up (one PING per keepalive
# interval; OPENs at its clients' pace, which pauses only NOVAC, never
# NOVAS), and well below nova.mux.core.MAX_QUEUED_REPLIES, so that a
# flooding peer is paused long before it reaches that bound.
READ_PAUSE_REPLIES = 64

# A connection we close has this long to finish (the peer to read our last
# frames, a GOAWAY say) before it is aborted: a flooding peer that never
# reads would otherwise keep it, and what is queued on it, forever.
CLOSE_TIMEOUT = 10.0

# The window budget of this process (nova.mux.core.PROCESS_WINDOW_BUDGET),
# shared by all its tunnels.
PROCESS_WINDOW_BUDGET = WindowBudget()


@dataclass(frozen=True)
class Timing:
    """A tunnel's timers, in seconds (see README.md, "Timing"), from the settings."""

    handshake_timeout: float
    keepalive: float
    dead_timeout: float
    stall_timeout: float  # 0: off (NOVAS); see nova.mux.lifecycle


@implementer(IPushProducer)
class TunnelProtocol(Protocol):
    """
    Frames in, events out.  Until L{start_streams} is called every frame goes
    to L{handshake_frame}; after it, to the multiplexer.
    """

    log = Logger()
    role: Role

    def __init__(self, clock: IReactorTime, local_window: int, timing: Timing, max_window: int) -> None:
        self.clock = clock
        self._seconds = clock.seconds  # read for every read and write
        self.local_window = local_window
        # Streams' receive windows grow up to this (see nova.mux.core).
        self.max_window = max_window
        self.window_budget = PROCESS_WINDOW_BUDGET
        self._rtt_probe_opaque: bytes | None = None  # a probe's PING is out (see probe_rtt)
        self.rtt_probes = 0
        self.peer_window = local_window
        self.timing = timing
        self.draining = False
        self.rtt: float | None = None
        self.mux: Multiplexer | None = None
        # The open streams, by id; the outbound and inbound halves read this
        # same dict (it is cleared, never replaced).
        self.streams: dict[int, StreamTransport] = {}
        self._closed = False
        self._lost = False
        self._aborted = False
        self._decoder = FrameDecoder()
        self.protocol_version = 1  # until the handshake agrees on more (protocol.md §4.2)
        self._writer: FrameWriter | None = None
        self.outbound = OutboundScheduler(clock, self.streams, self._update_reading)
        self.inbound = InboundDelivery(self.streams, self)
        self.begin_read = self.inbound.begin_read
        self.end_read = self.inbound.end_read
        # The decoder and its two callbacks, bound once: used for every read.
        self._feed = self._decoder.feed_into
        self._on_data = self.inbound.data_received
        self._on_frame = self.inbound.frame_received
        # We asked the transport to stop reading (replies wait; see the
        # module docstring), and whether that was logged for this tunnel.
        self.reading_paused = False
        self._pause_logged = False
        self._close_deadline: IDelayedCall | None = None
        self.core = SessionCore(
            clock,
            self,
            keepalive=timing.keepalive,
            dead_timeout=timing.dead_timeout,
            handshake_timeout=timing.handshake_timeout,
            stall_timeout=timing.stall_timeout,
        )
        self.session: Session | None = None

    @property
    def closed(self) -> bool:
        """No more frames in or out (a close was asked for, or the connection is gone)."""
        return self._closed

    @closed.setter
    def closed(self, closed: bool) -> None:
        self._closed = self.inbound.closed = self.outbound.closed = closed

    @property
    def bytes_sent(self) -> int:
        """DATA payload sent."""
        return self.outbound.bytes_sent

    @property
    def bytes_received(self) -> int:
        """DATA payload received."""
        return self.inbound.bytes_received

    @property
    def quantum(self) -> int:
        """The most DATA a stream reads, and the tunnel writes, per reactor turn (L{nova.transport.outbound})."""
        return self.outbound.quantum

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
        self._writer = self.outbound.writer = FrameWriter(self.transport)
        set_notsent_lowat(self._writer.tcp)
        set_user_timeout(self._writer.tcp, self.timing.dead_timeout)
        read_size(self._writer.tcp, TUNNEL_READ)
        self.transport.registerProducer(self, True)  # type: ignore[attr-defined]
        self.session = start_session(self.core)
        self.handshake_started()

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        # self.core.heard() and inbound.begin_read(), inline: this runs for
        # every read of every tunnel.
        self.core.last_heard = self._seconds()
        if self.mux is None:
            self._handshake_received(data)
            return
        inbound = self.inbound
        if inbound.arrived is not None:  # inside a read batch (fast_tls_receive's): it ends it
            try:
                self._feed(data, self._on_data, self._on_frame)
            except ProtocolError as e:
                self.protocol_error(e)
            return
        inbound.arrived = {}
        try:
            self._feed(data, self._on_data, self._on_frame)
        except ProtocolError as e:
            self.protocol_error(e)
        finally:
            inbound.end_read()

    def _handshake_received(self, data: bytes) -> None:
        """Bytes before registration: handshake frames, then whatever followed in the same read."""
        inbound = self.inbound
        try:
            for frame in self._decoder.feed(data):
                if self.closed:
                    return
                if self.mux is None:
                    self.handshake_frame(frame)
                elif isinstance(frame, Data):  # the rest of the read that finished the handshake
                    inbound.data_received(frame.stream_id, [frame.data], len(frame.data))
                else:
                    inbound.frame_received(frame)
        except ProtocolError as e:
            self.protocol_error(e)
            return
        self.flush()

    # ReadBatches (nova.mux.inbound): fast_tls_receive announces the TLS
    # records of one socket read.

    # begin_read(): several reads' worth of frames follow (see
    # InboundDelivery.begin_read); end_read(): they have all been decoded.
    # The inbound delivery's own methods, bound in __init__: no call of our
    # own in between at every read.
    begin_read: Callable[[], None]
    end_read: Callable[[], None]

    def read_ended(self) -> None:
        """
        A read batch was delivered: send what it made ready (the credit its
        streams freed, with an RTT probe if a stream's window would grow);
        read on or not (module docstring).
        """
        mux = self.mux
        if mux is not None:
            if mux.rtt_wanted:
                self.probe_rtt()
            if mux.has_output():
                self.outbound.flush_soon()
        if self.outbound.paused or self.reading_paused:  # else _update_reading has nothing to change
            self._update_reading()

    def connectionLost(self, reason: Failure = Failure(ConnectionError())) -> None:  # noqa: B008
        self.closed = self._lost = True
        self.outbound.stop()
        if self._close_deadline is not None and self._close_deadline.active():
            self._close_deadline.cancel()
        self._close_deadline = None
        for stream in list(self.streams.values()):
            stream.tunnel_lost(reason)
        self.streams.clear()
        if self.mux is not None:
            self.mux.release()
        self.tunnel_closed(reason)
        if self.session is not None:
            self.session.lost()

    # IPushProducer: the connection's transport pushes back on us.

    def pauseProducing(self) -> None:
        """The transport's buffer is full: DATA and control frames wait (see the module docstring)."""
        self.outbound.paused = True

    def resumeProducing(self) -> None:
        self.outbound.paused = False
        self.outbound.flush()

    def stopProducing(self) -> None:
        self.outbound.paused = True

    # Hooks for the two ends.

    def handshake_started(self) -> None:
        """The connection is up; begin the handshake."""

    def handshake_frame(self, frame: Frame) -> None:
        """A frame arrived before the handshake finished."""
        raise ProtocolError(f"unexpected {frame.TYPE.name} during the handshake")

    def handshake_timed_out(self) -> None:
        """The handshake did not finish in time; the connection is dropped next (L{abort})."""

    def pending_streams(self) -> int:
        """Streams being opened that have no transport yet."""
        return 0

    def stalled(self, silent: float) -> None:
        """A PING went unanswered for the stall timeout (only with one set: NOVAC)."""

    def stall_ended(self) -> None:
        """The peer was heard from again after a stall."""

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
        if opaque == self._rtt_probe_opaque:
            self._rtt_probe_opaque = None
            self.rtt_measured(rtt, keepalive=False)
        else:
            self.rtt_measured(rtt)

    def rtt_measured(self, rtt: float, keepalive: bool = True) -> None:
        """
        A round trip was measured: by a keepalive PING (L{rtt}, reported),
        or by the handshake or a probe (only for window auto-tuning).
        """
        if 0 <= rtt < 3600:
            if keepalive:
                self.rtt = rtt
            if self.mux is not None:
                self.mux.rtt_sample(rtt)

    def probe_rtt(self) -> None:
        """
        Measure the round trip now rather than at the next keepalive (one
        PING at a time): the agent does at registration, while the tunnel is
        idle, and either side does when a stream could grow its window and
        no round trip is known.
        """
        mux = self.mux
        if mux is not None:
            mux.rtt_wanted = False
            if self._rtt_probe_opaque is None and not self.closed:
                self._rtt_probe_opaque = struct.pack(">d", self.clock.seconds())
                self.rtt_probes += 1
                mux.ping(self._rtt_probe_opaque)
                self.flush_soon()

    def members_received(self, members: tuple[str, ...]) -> None:
        """The server's cluster members changed (version 2; the agent overrides this)."""

    def goaway_received(self, code: ErrorCode, message: str) -> None:
        self.log.info("{peer} is going away: {code} {detail}", peer=self.peer_label, code=code.name, detail=message)

    # Helpers for subclasses.

    def accept_version(self, version: int) -> None:
        """
        The peer's frames of up to protocol C{version} are valid from now on
        (the handshake's doing, protocol.md §4.2; L{protocol_version} is what
        it agreed on).
        """
        self._decoder.max_version = version

    def send_frame(self, frame: Frame) -> None:
        """Write one frame now (used for handshake frames)."""
        assert self.transport is not None
        self.transport.writeSequence(encode(frame))

    def start_streams(self, peer_window: int, max_streams: int) -> None:
        """The handshake succeeded: from now on frames go to the multiplexer."""
        self.peer_window = peer_window
        self.mux = self.inbound.mux = self.outbound.mux = Multiplexer(
            self.role,
            self.local_window,
            peer_window,
            max_streams,
            max_window=self.max_window,
            budget=self.window_budget,
        )
        assert self.session is not None
        self.session.registered()

    def drain(
        self,
        timeout: float,
        code: ErrorCode = ErrorCode.SHUTDOWN,
        message: str = "draining",
        idle_grace: float | None = None,
    ) -> Deferred[None]:
        """
        Send GOAWAY and take no new streams; close once the open streams end
        or C{timeout} passes.  Fires when the connection is closed.

        With C{idle_grace}, a tunnel that has no stream open (so closes at
        once) is dropped if its close has not finished after C{idle_grace}
        seconds instead of L{CLOSE_TIMEOUT}: a server shutting down does
        not wait for a slow peer's TLS close_notify when there is nothing
        left to deliver (the GOAWAY went out first).  Tunnels with streams
        keep the whole drain.
        """
        if self.session is None:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        done = self.session.drain(timeout, code, message)
        deadline = self._close_deadline
        if idle_grace is not None and deadline is not None and deadline.active():
            deadline.cancel()
            self._close_deadline = self.clock.callLater(idle_grace, self._idle_close_expired)
        return done

    def outlive_backoff(self) -> None:
        """
        The agent's fresh tunnel replaced this one while it still carries
        streams: the path works again (the fresh tunnel crossed it), and this
        connection may only be waiting for a retransmission that TCP's
        backoff put off, past the dead timeout after a long enough outage.
        Count the dead timeout afresh, and double the kernel's user timeout:
        the retransmission it clamped to the old one then goes out instead of
        ending the connection (docs/faults.md).  A tunnel that is really gone
        is still dropped, a dead timeout later.
        """
        self.core.reprieve()
        set_user_timeout(self._writer.tcp if self._writer is not None else None, 2 * self.timing.dead_timeout)

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
        """
        Drop the connection now; every stream is reset.  Also ends a
        connection whose graceful L{close} is still waiting on a peer that
        does not read.
        """
        if self.transport is None or self._lost or self._aborted:
            return
        if not quiet:
            if self.reading_paused:
                why += (
                    f" (reading from it was paused: it did not read the {self.mux.queued_replies if self.mux else 0}"
                    " answers to its own frames)"
                )
            self.log.warn("dropping the tunnel with {peer}: {reason}", peer=self.peer_label, reason=why)
        self.closed = self._aborted = True
        self.transport.abortConnection()  # type: ignore[attr-defined]

    def protocol_error(self, error: ProtocolError) -> None:
        """The peer broke the protocol: say so and close the connection."""
        self.log.warn("protocol error from {peer}: {error}", peer=self.peer_label, error=str(error))
        if self.mux is not None:
            self.mux.goaway(error.code, error.message)
        self.close()

    def _close_expired(self) -> None:
        self._close_deadline = None
        # Through abort(): the server keeps it quiet for connections that never
        # registered (refused ones are reported once per source, not per drop).
        self.abort(f"it did not read what was sent before closing within {CLOSE_TIMEOUT:g}s")

    def _idle_close_expired(self) -> None:
        # Quiet: at shutdown this is every idle tunnel whose peer was slow to
        # answer, not a fault; NOVAS logs how many it closed this way.
        self._close_deadline = None
        self.abort("dropped without waiting for its TLS close (nothing was left to deliver)", quiet=True)

    def close(self) -> None:
        """
        Close the connection after what is already written, and after the
        control frames that wait (a GOAWAY must go out even while the
        transport pushes back).
        """
        if self.transport is not None and not self.closed:
            if self.mux is not None and self.mux.has_output() and self._writer is not None:
                out: list[Buffer] = []
                self.mux.pull(out, 0, data_allowed=False)
                if out:
                    self._writer.write(out)
            self.closed = True
            if self.session is not None:
                # A peer that does not read would keep the connection, and
                # what is queued on it, forever.
                self._close_deadline = self.clock.callLater(CLOSE_TIMEOUT, self._close_expired)
            # A TLS transport does not shut down while a producer is registered.
            self.transport.unregisterProducer()  # type: ignore[attr-defined]
            self.transport.loseConnection()

    def add_stream(self, stream_id: int, host: str, port: int) -> StreamTransport:
        stream = StreamTransport(
            self,
            stream_id,
            StreamAddress(self.peer_label, stream_id, host, port),
            high_water=max(4096, min(65536, self.peer_window // 2)),
            quantum=self.outbound.quantum,
        )
        self.streams[stream_id] = stream
        return stream

    def flush(self) -> None:
        """Write what is ready now (L{OutboundScheduler.flush})."""
        self.outbound.flush()

    def flush_soon(self) -> None:
        """Write what is ready now or at the end of the turn (L{OutboundScheduler.flush_soon})."""
        self.outbound.flush_soon()

    # StreamOwner: what the streams ask of us, by stream id.

    def write_data(self, stream_id: int, data: bytes, high_water: int) -> int:
        mux = self.mux
        assert mux is not None
        outbound = self.outbound
        now = self._seconds()
        # outbound.note_active(stream_id, now), whose common case is inline
        # here and in read_data: these run for every write and every read.
        if stream_id in outbound.active and now < outbound.recount_at:
            outbound.active[stream_id] = now
        else:
            outbound.note_active(stream_id, now)
        # Queued, or written at once on a quiet tunnel (OutboundScheduler.send).
        queued = outbound.send(stream_id, data, now)
        if queued >= high_water:
            outbound.flush()
            queued = mux.outbox_bytes(stream_id)
        elif queued and outbound.flush_call is None:
            outbound.flush_soon(now)
        return queued

    def end_stream(self, stream_id: int) -> None:
        assert self.mux is not None
        self.mux.close_send(stream_id)
        self.outbound.flush_soon()

    def reset_stream(self, stream_id: int, code: ErrorCode) -> None:
        if self.mux is not None:
            self.mux.reset(stream_id, code)
            self.outbound.flush()

    def read_data(self, stream_id: int, limit: int) -> list[bytes]:
        mux = self.mux
        if mux is None:
            return []
        now = self._seconds()
        chunks = mux.take_upto(stream_id, limit, now)
        if chunks:
            outbound = self.outbound
            if stream_id in outbound.active and now < outbound.recount_at:  # note_active, inline (write_data)
                outbound.active[stream_id] = now
            else:
                outbound.note_active(stream_id, now)
        return chunks

    def data_consumed(self, stream_id: int) -> int:
        mux = self.mux
        if mux is None:
            return 0
        if mux.rtt_wanted:
            self.probe_rtt()
        # Inside a read batch (arrived is set until its end) the batch's end
        # sends what is ready (read_ended); outside one, send it now.
        if self.inbound.arrived is None and mux.has_output():
            self.outbound.flush_soon()
        return mux.inbox_bytes(stream_id)

    def watch_drain(self, stream_id: int, watch: bool) -> None:
        if watch:
            self.outbound.block(stream_id)
        else:
            self.outbound.unblock(stream_id)

    def stream_closed(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)
        self.outbound.unblock(stream_id)
        # The session machine acts on a stream's end only while Draining,
        # which sets draining first (send_goaway): an Automat input costs
        # as much as the rest of a stream's close, so it is not fed before.
        if self.session is not None and self.draining:
            self.session.stream_closed()

    def _update_reading(self) -> None:
        """
        Stop reading from the peer while the transport pushes back and
        L{READ_PAUSE_REPLIES} replies wait; read again once they are written.
        """
        mux = self.mux
        if mux is None or self._closed or self.transport is None:
            return
        hold = self.outbound.paused and mux.queued_replies >= READ_PAUSE_REPLIES
        if hold == self.reading_paused:
            return
        self.reading_paused = self.outbound.reading_held = hold
        if hold:
            self.transport.pauseProducing()  # type: ignore[attr-defined]
            if not self._pause_logged:
                self._pause_logged = True
                self.log.info(
                    "reading from {peer} paused: {replies} answers to its frames wait while it does not read"
                    " (logged once per tunnel)",
                    peer=untrusted(self.peer_label),
                    replies=mux.queued_replies,
                )
        else:
            self.transport.resumeProducing()  # type: ignore[attr-defined]
