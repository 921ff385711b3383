"""
The outbound half of a tunnel: when what the multiplexer has ready is
written, and how much of it per reactor turn.

One L{OutboundScheduler} per tunnel connection.  Streams queue their DATA in
the multiplexer (L{nova.mux.core}, no I/O); the scheduler decides when to
write it (L{flush_soon}: at once on a quiet tunnel, else at the end of the
reactor turn), how much DATA one flush takes (the quantum), and which
streams' producers wait for their queue to drain (the blocked streams).  It
does no framing of its own: L{flush} is one L{Multiplexer.pull} into one
L{FrameWriter.write}.  Time comes from an injected L{IReactorTime}.

The policy, as named constants:

 - the quantum: about the most DATA payload a stream's local connection
   reads, and the tunnel writes, in one reactor turn (what is left goes on
   the next turn, after the reactor has read what arrived meanwhile).  Large
   (L{QUANTUM}) while one stream moves data: fewer, larger reads and writes;
   small (L{SHARED_QUANTUM}) while several moved data in the last
   L{ACTIVE_WINDOW} seconds, so that a bulk stream's turn is short and an
   interactive stream's request does not wait long behind it;
 - the tunnel's read size (L{TUNNEL_READ}): the tunnel reads half a
   stream window's worth at once, so that what waits behind bulk data is
   found within two turns;
 - quiet time: a write to a tunnel that has not flushed for L{QUIET} seconds
   is flushed at once (a lone request should not wait for the end of the
   turn); a busier tunnel flushes at the end of the turn, so that everything
   written meanwhile goes out in one write.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from nova.mux.core import Buffer, Multiplexer
from nova.transport.splice import READ_SIZE

if TYPE_CHECKING:
    from nova.mux.contract import StreamEvents
    from nova.transport.fastpath import FrameWriter

QUANTUM = READ_SIZE
SHARED_QUANTUM = 32 * 1024
ACTIVE_WINDOW = 0.05  # seconds: "moved data recently"

# How often, at most, the set of recently active streams is recounted
# (seconds): often enough to follow a change of load, rarely enough that
# counting costs nothing per write.
RECOUNT_EVERY = 0.01

QUIET = 0.0001

# The most the tunnel's own connection reads at once, whatever the quantum:
# half of what one stream's default window (256 KiB) can put in the receive
# buffer.  A request queued behind a bulk stream's data is found within two
# turns and handed over first (the inbound delivery tells the stream that
# received least first), instead of after one turn of bulk writes per
# 32 KiB shared quantum ahead of it (eight).  Not a whole window: a
# receiver that takes a whole window in one read returns its credit in one
# WINDOW_UPDATE after it, and the sender idles meanwhile (measured: the
# bulk rate beside requests fell by about a fifth with 256 KiB reads).
TUNNEL_READ = READ_SIZE


class OutboundScheduler:
    """
    Writes what the multiplexer has ready: control frames first, then about
    one quantum of DATA round robin over the streams, in one write.

    Invariants (1 to 4 by L{_check_invariants}, which the tests run after
    every step; 5 is checked by tests/test_outbound.py on what is written):

     1. C{quantum} is L{QUANTUM} or L{SHARED_QUANTUM}.
     2. Every blocked stream is a live stream: a stream that ends leaves the
        blocked set (L{unblock}) before it leaves the tunnel.
     3. Outside L{flush}, C{flushing} is false: a flush asked for during a
        flush (by a stream resumed from inside it) runs as one more round of
        the same flush, never as a nested one.
     4. After L{flush}, output the multiplexer holds is either written or
        due: if the transport takes more (not paused) and the tunnel is
        open, a flush is scheduled for the next turn.
     5. While the transport pushes back (C{paused}) nothing is written, not
        even control frames (see L{nova.transport.tunnel}); only
        L{nova.transport.tunnel.TunnelProtocol.close} writes those regardless.
    """

    def __init__(
        self,
        clock: IReactorTime,
        streams: Mapping[int, StreamEvents],
        after_flush: Callable[[], None],
    ) -> None:
        self.clock = clock
        self._streams = streams
        # The tunnel re-checks whether to read from the peer (only while the
        # transport pushes back or reading is held: see reading_held).
        self._after_flush = after_flush
        self.mux: Multiplexer | None = None
        self.writer: FrameWriter | None = None
        self.paused = False  # the transport pushes back
        self.closed = False
        self.bytes_sent = 0  # DATA payload
        # Streams whose producer waits for their queue to drain.
        self.blocked: set[int] = set()
        self.quantum = QUANTUM
        # The streams that moved data lately, and when the set is next
        # recounted (L{note_active}).  Public for the tunnel's per-write
        # and per-read fast path: while a stream is in C{active} and no
        # recount is due, noting it is only C{active[stream_id] = now}.
        self.active: dict[int, float] = {}
        self.recount_at = 0.0
        # The tunnel stopped reading from the peer (nova.transport.tunnel):
        # after a flush it is asked whether to read again, as it is while
        # the transport pushes back; otherwise nothing can have changed.
        self.reading_held = False
        self.flushing = False
        self._flush_again = False
        self.flush_call: IDelayedCall | None = None
        self.flushed_at = 0.0  # when the last flush ended (the quiet-time rule, flush_soon; read inline by the tunnel)

    def note_active(self, stream_id: int, now: float) -> int:
        """
        A stream moved data at C{now}.  Returns the current quantum:
        L{QUANTUM} while at most one stream moved data in the last
        L{ACTIVE_WINDOW} seconds, else L{SHARED_QUANTUM}.  The active
        streams hear of it (L{StreamEvents.quantum_changed}) when it changes,
        and a stream that becomes active hears of it then: idle streams cost
        nothing.
        """
        active = self.active
        fresh = stream_id not in active
        active[stream_id] = now
        if now >= self.recount_at:
            self.recount_at = now + RECOUNT_EVERY
            cutoff = now - ACTIVE_WINDOW
            for sid in [sid for sid, seen in active.items() if seen < cutoff]:
                del active[sid]
            quantum = SHARED_QUANTUM if len(active) > 1 else QUANTUM
            if quantum != self.quantum:
                self.quantum = quantum
                self._tell_quantum(active)
                return quantum
        if fresh:
            self._tell_quantum((stream_id,))
        return self.quantum

    def _tell_quantum(self, stream_ids: Iterable[int]) -> None:
        streams = self._streams
        for sid in stream_ids:
            stream = streams.get(sid)
            if stream is not None:
                stream.quantum_changed(self.quantum)

    def block(self, stream_id: int) -> None:
        """The stream paused its producer: tell it (L{StreamEvents.drained}) when its queue drains."""
        self.blocked.add(stream_id)

    def unblock(self, stream_id: int) -> None:
        """The stream no longer waits for its queue to drain."""
        self.blocked.discard(stream_id)

    def flush_soon(self, now: float | None = None) -> None:
        """
        Flush now if the tunnel has been quiet for L{QUIET} seconds (a lone
        request goes out at once), else at the end of this reactor turn, so
        that everything written meanwhile goes out in one write.  C{now}:
        the clock's time, if the caller has just read it.
        """
        if self.flush_call is not None or self.closed:
            return
        if now is None:
            now = self.clock.seconds()
        if not self.flushing and now - self.flushed_at >= QUIET:
            self.flush()
        else:
            self.flush_call = self.clock.callLater(0, self._flush_now)

    def send(self, stream_id: int, data: bytes, now: float) -> int:
        """
        Queue C{data} on the stream, or, on a quiet tunnel that a flush
        would write to at once anyway, write it now: if the tunnel has been
        quiet for L{QUIET} seconds, no flush is running or due, the
        transport takes more, no stream waits for its queue to drain and
        reading is not held (all of which a flush would look after), and
        nothing else waits in the multiplexer (L{Multiplexer.send_now}),
        its one DATA frame is written at once, unqueued.  Returns the bytes
        queued on the stream: 0 when written (no flush is needed for it).
        """
        mux = self.mux
        writer = self.writer
        assert mux is not None
        if (
            now - self.flushed_at < QUIET
            or self.flush_call is not None
            or self.flushing
            or self.paused
            or self.closed
            or self.blocked
            or self.reading_held
            or writer is None
        ):
            return mux.send(stream_id, data)
        out: list[Buffer] = []
        queued = mux.send_now(stream_id, data, out)
        if not out:
            return queued
        self.flushing = True  # as in flush: a flush asked for meanwhile runs after it
        try:
            writer.write(out)
        finally:
            self.flushing = False
        self.bytes_sent += len(data)
        self.flushed_at = self.clock.seconds()
        if self._flush_again:
            self.flush()
        return 0

    def _flush_now(self) -> None:
        self.flush_call = None
        self.flush()

    def flush(self) -> None:
        """
        Write what the multiplexer has ready, now, in one write: control
        frames, then DATA (about one quantum; the rest on the next turn),
        only while the transport is not pushing back.  Then tell the streams
        whose FIN went out, resume the producers of streams whose queues
        have drained, and let the tunnel decide whether to read.
        """
        if self.flushing:
            self._flush_again = True
            return
        mux = self.mux
        writer = self.writer
        if mux is None or writer is None or self.closed:
            return
        streams = self._streams
        self.flushing = True
        try:
            while True:
                self._flush_again = False
                out: list[Buffer] = []
                allowed = not self.paused
                taken, fins = mux.pull(out, self.quantum, allowed, allowed)
                if out:
                    writer.write(out)
                    self.bytes_sent += taken
                    for stream_id in fins:
                        stream = streams.get(stream_id)
                        if stream is not None:
                            stream.fin_sent()
                blocked = self.blocked
                if (taken or fins or self._flush_again) and blocked:
                    for stream_id in list(blocked):
                        stream = streams.get(stream_id)
                        if stream is None or not stream.drained(mux.outbox_bytes(stream_id)):
                            blocked.discard(stream_id)
                if self.closed or not self._flush_again:
                    break
        finally:
            self.flushing = False
            self.flushed_at = self.clock.seconds()
        if mux.has_output() and not self.paused and not self.closed and self.flush_call is None:
            self.flush_call = self.clock.callLater(0, self._flush_now)
        if self.paused or self.reading_held:
            self._after_flush()

    def stop(self) -> None:
        """The connection is gone: nothing more is written."""
        self.closed = True
        call, self.flush_call = self.flush_call, None
        if call is not None and call.active():
            call.cancel()
        self.blocked.clear()

    def _check_invariants(self) -> None:
        """Raise AssertionError if an invariant in the class docstring does not hold."""
        assert self.quantum in (QUANTUM, SHARED_QUANTUM), self.quantum
        stray = self.blocked - set(self._streams)
        assert not stray, f"blocked streams that are gone: {sorted(stray)}"
        assert not self.flushing, "flushing outside flush()"
        mux = self.mux
        if mux is not None and self.writer is not None and mux.has_output() and not self.paused and not self.closed:
            assert self.flush_call is not None and self.flush_call.active(), "output waits with no flush due"
