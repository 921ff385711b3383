"""
The stream multiplexer's core: streams, windows and scheduling, no I/O.

It follows protocol.md §5 and §6.  The adapter feeds it received frames and
gets back events; it asks it for the next frame to write whenever the
connection can take more.  Received DATA waits in the stream's inbox until the
adapter I{takes} it (hands it to a local transport that is not pushing back);
only then is credit returned to the peer.

Replies.  Some control frames are the peer's doing, not ours: the PONG that
answers its PING, the OPEN_OK or OPEN_FAIL that answers its OPEN.  A peer
that sends those frames and never reads would have us queue answers without
end, so the multiplexer counts the replies it holds (L{queued_replies}) and
treats a frame that would need one more answer while L{MAX_QUEUED_REPLIES}
wait as a connection error (L{ControlFlood}, GOAWAY C{CONTROL_FLOOD}).
Every other control frame is bounded by this side's own activity or by flow
control: a WINDOW_UPDATE is sent for at least half a window that this side
consumed, and the peer cannot send more DATA until it has received it.
The adapter holds control frames while its transport pushes back and stops
reading while replies pile up (L{nova.transport.tunnel.TunnelProtocol}).

Window auto-tuning (docs/datapath.md, "Window auto-tuning").  A fixed
window caps a stream at one window per round trip (256 KiB over 50 ms is
42 Mbit/s), so each stream's receive window grows toward what the link and
the consumer actually sustain, with no wire change: growing is granting
credit beyond what was consumed (a WINDOW_UPDATE whose increment includes
the growth, which every version-1 sender accepts up to 2**31-1, protocol.md
§5.3); shrinking is withholding credit for consumed bytes.  The rule, per
stream, evaluated only when the adapter takes (consumes) bytes, at the time
C{now} it passes in:

 - an I{epoch} ends each time the consumer has taken a full target window
   since the last one ended; if that took less than L{GROW_RTTS} round
   trips (the smallest RTT the tunnel has measured, L{Multiplexer.rtt}),
   the target doubles, up to C{max_window};
 - the growth is granted only within the per-tunnel budget
   (C{tunnel_budget}, bytes above the initial windows) and the per-process
   L{WindowBudget}; what neither has room for is not granted;
 - a stream that took nothing for L{IDLE_SHRINK} seconds goes back to the
   initial target, and credit for consumed bytes is withheld until its
   window is back there (credit already granted cannot be taken back in
   version 1: an idle stream keeps its grant, and its budget, until the peer
   uses it or the stream ends; its inbox is empty, so its memory is what it
   was);
 - on a link shorter than L{MIN_GROW_RTT} nothing grows (the initial
   window is not the limit there);
 - without an RTT measurement nothing grows; L{Multiplexer.rtt_wanted}
   asks the adapter for one (a PING).

Invariants (checked by L{Multiplexer.check_invariants}, and by property
tests under arbitrary schedules): for every stream whose peer has not ended
it, C{recv_window + inbox_bytes + unreturned == window}, so what a
receiver holds never exceeds what it granted; C{local_window <= window <=
max_window}; the windows above the initial ones add up to the tunnel's
budget use, which stays within C{tunnel_budget}, and every byte of it is
reserved in the process budget; WINDOW_UPDATEs are queued only when bytes
are taken.  With C{max_window} equal to the initial window (the default)
none of this runs and the multiplexer behaves exactly as before.

Data may follow OPEN (protocol.md §7.2, version 2 with the feature bit
C{FEATURE_EARLY_DATA}; the adapter sets L{Multiplexer.early_budget} once the
handshake agreed on it).  The rule, per stream:

 - the server sends DATA on a stream it opened before OPEN_OK, up to
   C{early_budget} bytes (and within the stream's send window, which those
   bytes use up like any others), and only once the OPEN itself has been
   taken by L{Multiplexer.pull}, so the OPEN always goes first; FIN waits for
   OPEN_OK;
 - the agent holds such DATA in the stream's inbox (credit is spent as for
   any DATA) and hands it over once the adapter accepts the stream; more than
   C{early_budget} bytes before its OPEN_OK is a connection error
   (L{EarlyDataExceeded}), so an agent never holds more than C{early_budget}
   per stream nor more than C{max_streams} times it per tunnel;
 - OPEN_FAIL, RST or a refusal drops the stream with what it held: nothing
   reaches a later stream (ids are never reused), and DATA that crossed the
   OPEN_FAIL is discarded like any DATA for a closed stream.

With C{early_budget} 0 (version 1, or a peer without the bit) nothing is sent
before OPEN_OK and DATA before it is a protocol error, as in version 1.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from nova.wire.errors import (
    ControlFlood,
    EarlyDataExceeded,
    ErrorCode,
    FlowControlError,
    OpenFailReason,
    ProtocolError,
)
from nova.wire.frames import (
    MAX_DATA_PAYLOAD,
    MAX_STREAM_ID,
    MAX_WINDOW,
    Fin,
    Frame,
    GoAway,
    Members,
    Open,
    OpenFail,
    OpenOk,
    Ping,
    Pong,
    Rst,
    WindowUpdate,
    data_header,
    encode,
    fin_header,
)

# A payload piece: a received or written byte string, or a view of a part of
# one (a long write split into frames).
Buffer = bytes | memoryview

# The most replies (PONG, OPEN_OK, OPEN_FAIL) a multiplexer holds; a peer
# frame that needs one more is a ControlFlood.  Safe for honest peers by a
# wide margin: they send one PING per keepalive interval and open streams no
# faster than their clients connect, and the adapter stops reading from a
# peer once READ_PAUSE_REPLIES (64) replies wait on a transport that pushes
# back, so even a flooding peer gets in at most one more read's worth before
# the pause holds (a read is at most 128 KiB of plaintext plus one 16 KiB TLS
# record: under 7,400 PINGs of 20 bytes).  16,384 held replies cost about
# 2 MiB.
MAX_QUEUED_REPLIES = 16_384
_REPLY_TYPES = frozenset((Pong, OpenOk, OpenFail))

# Window auto-tuning (see the module docstring).
# The default most a stream's receive window grows to: 16 MiB covers
# 1.3 Gbit/s at 100 ms (go-yamux, as libp2p uses it, stops at the same).
DEFAULT_MAX_WINDOW = 16 * 1024 * 1024
# Bytes above the initial windows that one tunnel may grant: four streams at
# the default maximum, so a few bulk streams run at full speed while a
# tunnel's worst case stays bounded (what a peer can make us hold).
TUNNEL_WINDOW_BUDGET = 64 * 1024 * 1024
# Bytes above the initial windows that one process may grant over all its
# tunnels: what the peers of a server with 10,000 agents could make it hold
# beyond the initial windows, whatever they do.
PROCESS_WINDOW_BUDGET = 256 * 1024 * 1024
# Grow when a full window was consumed within this many round trips.  A
# window-limited stream drains one window per round trip, plus about one
# more round trip each time a lost packet stalls TCP's delivery, so three
# lets a lossy link's window grow past those stalls (with two, 1 % loss at
# 50 ms left it stuck at 1 MiB in some runs); a stream limited by the link
# or its consumer settles between three and six times its bandwidth-delay
# product.  go-yamux grows when half a window was consumed within four.
GROW_RTTS = 3.0
# No growth on a link whose round trip is shorter than this: there the
# initial window (256 KiB: over 2 Gbit/s at 1 ms, about what one NOVA
# process moves) is not the limit, and what looks like a window drained
# within a few round trips is a busy process catching up on its socket
# buffer (measured on loopback: a 0.4 ms round trip, windows grown to
# 2 MiB, and a longer queue in front of requests beside a bulk transfer).
MIN_GROW_RTT = 0.001
# A stream that consumed nothing for this long starts again from the
# initial window.
IDLE_SHRINK = 5.0


class WindowBudget:
    """
    Bytes of receive window above the initial windows that may be granted,
    shared by the multiplexers (tunnels) of one process.
    """

    def __init__(self, limit: int = PROCESS_WINDOW_BUDGET) -> None:
        self.limit = limit
        self.used = 0

    def reserve(self, wanted: int) -> int:
        """Reserve up to C{wanted} bytes; returns how many were reserved."""
        got = min(wanted, self.limit - self.used)
        if got <= 0:
            return 0
        self.used += got
        return got

    def release(self, n: int) -> None:
        self.used -= n
        assert self.used >= 0, "released more window budget than was reserved"


class Role(enum.Enum):
    SERVER = "server"  # opens streams
    AGENT = "agent"  # accepts them


# Events returned by Multiplexer.receive() (and receive_data(), for a stream error).


@dataclass(frozen=True)
class StreamRequested:
    stream_id: int
    host: str
    port: int


@dataclass(frozen=True)
class OpenAccepted:
    stream_id: int


@dataclass(frozen=True)
class OpenRefused:
    stream_id: int
    reason: OpenFailReason
    message: str


@dataclass(frozen=True)
class DataAvailable:
    """
    New bytes wait in the stream's inbox: C{receive_data}'s True as an event
    (the tests' reference model returns it for a DATA frame).
    """

    stream_id: int


@dataclass(frozen=True)
class StreamEnded:
    """The peer sent FIN; its direction ends once the inbox is taken."""

    stream_id: int


@dataclass(frozen=True)
class StreamReset:
    stream_id: int
    code: ErrorCode


@dataclass(frozen=True)
class WindowOpened:
    stream_id: int


@dataclass(frozen=True)
class PongReceived:
    opaque: bytes


@dataclass(frozen=True)
class GoAwayReceived:
    code: ErrorCode
    message: str


@dataclass(frozen=True)
class MembersReceived:
    """The server's cluster members changed (MEMBERS, version 2: protocol.md §6.1)."""

    members: tuple[str, ...]


Event = (
    StreamRequested
    | OpenAccepted
    | OpenRefused
    | DataAvailable
    | StreamEnded
    | StreamReset
    | WindowOpened
    | PongReceived
    | GoAwayReceived
    | MembersReceived
)


@dataclass(slots=True)
class _Stream:
    stream_id: int
    send_window: int
    recv_window: int
    opened: bool = False
    outbox: deque[Buffer] = field(default_factory=deque)
    outbox_bytes: int = 0
    fin_wanted: bool = False
    local_closed: bool = False
    inbox: deque[bytes] = field(default_factory=deque)
    inbox_bytes: int = 0
    remote_closed: bool = False
    unreturned: int = 0
    scheduled: bool = False
    # Auto-tuning: the window granted in all (recv_window + inbox_bytes +
    # unreturned, while the peer has not ended the stream), the window aimed
    # at, and the current epoch (see the module docstring).
    window: int = 0
    target: int = 0
    epoch_start: float = 0.0
    epoch_bytes: int = 0
    last_take: float = float("-inf")
    # Data may follow OPEN: what may still be sent (server) or received
    # (agent) before OPEN_OK, and whether the OPEN still waits to be pulled.
    early_left: int = 0
    open_queued: bool = False


class Multiplexer:
    """
    One side of a tunnel's stream layer.

    @param role: which side this is; only L{Role.SERVER} opens streams.
    @param local_window: the initial window this side announced.
    @param peer_window: the initial window the peer announced.
    @param max_streams: the most streams open at once (the agent refuses
        further OPENs with OVERLOADED).
    @param max_window: the most a stream's receive window grows to (see the
        module docstring); None or C{local_window}: it never grows.
    @param tunnel_budget: bytes above the initial windows this multiplexer
        may grant over all its streams.
    @param budget: the process's budget, shared with other multiplexers.
    """

    def __init__(
        self,
        role: Role,
        local_window: int,
        peer_window: int,
        max_streams: int,
        max_window: int,
        tunnel_budget: int = TUNNEL_WINDOW_BUDGET,
        budget: WindowBudget | None = None,
    ) -> None:
        self.role = role
        self.local_window = local_window
        self.peer_window = peer_window
        self.max_streams = max_streams
        self.max_window = max(local_window, max_window)
        self._tuning = self.max_window > local_window
        self.tunnel_budget = tunnel_budget
        self.budget = budget if budget is not None else WindowBudget(tunnel_budget)
        self.budget_used = 0  # bytes of window above the initial ones, granted by this multiplexer
        self._released = False
        # The smallest round trip measured (seconds), set by the adapter:
        # under load a PING waits behind DATA, and a window sized by that
        # wait would only lengthen the wait.
        self.rtt: float | None = None
        self.rtt_wanted = False  # a stream could grow if the RTT were known
        self._streams: dict[int, _Stream] = {}
        self._highest_id = 0
        # Control frames to send, and the streams with DATA or FIN to send:
        # made at first use and dropped once empty, since an idle registered
        # tunnel (most of ten thousand) has neither, and an empty deque costs
        # over 600 bytes.
        self._control: deque[Frame] | None = None
        self._ready: deque[int] | None = None
        self._replies = 0  # how many frames in _control are replies
        # Data may follow OPEN (module docstring): the most DATA a stream
        # carries before OPEN_OK; 0 unless the handshake agreed on it.
        self.early_budget = 0
        self._opens_queued: list[_Stream] = []  # streams whose OPEN waits in _control

    # Introspection.

    def __contains__(self, stream_id: int) -> bool:
        return stream_id in self._streams

    @property
    def stream_ids(self) -> list[int]:
        return list(self._streams)

    def outbox_bytes(self, stream_id: int) -> int:
        """Bytes queued by the local side and not yet sent."""
        s = self._streams.get(stream_id)
        return s.outbox_bytes if s else 0

    def inbox_bytes(self, stream_id: int) -> int:
        """Bytes received and not yet taken."""
        s = self._streams.get(stream_id)
        return s.inbox_bytes if s else 0

    @property
    def queued_replies(self) -> int:
        """Replies (PONG, OPEN_OK, OPEN_FAIL) queued and not yet taken by L{pull}."""
        return self._replies

    def send_window(self, stream_id: int) -> int:
        s = self._streams.get(stream_id)
        return s.send_window if s else 0

    def receive_window(self, stream_id: int) -> int:
        """The credit the peer holds on the stream (what it may still send)."""
        s = self._streams.get(stream_id)
        return s.recv_window if s else 0

    def window(self, stream_id: int) -> int:
        """The stream's receive window: the most it may hold at once."""
        s = self._streams.get(stream_id)
        return s.window if s else 0

    def rtt_sample(self, rtt: float) -> None:
        """
        The adapter measured a round trip of C{rtt} seconds.  Zero is a
        clock that did not move (a test's), not a measurement.
        """
        if rtt > 0 and (self.rtt is None or rtt < self.rtt):
            self.rtt = rtt
            self.rtt_wanted = False

    def release(self) -> None:
        """
        The connection is gone: give back every stream's window above the
        initial one (the peer can send nothing more).  Streams that still
        deliver what they hold keep working; nothing grows any more.
        """
        if not self._released:
            self._released = True
            self.budget.release(self.budget_used)
            self.budget_used = 0
            self._tuning = False

    def check_invariants(self) -> None:
        """Raise AssertionError if the flow-control invariants (module docstring) do not hold."""
        extra = 0
        for s in self._streams.values():
            assert s.recv_window >= 0, f"stream {s.stream_id}: negative credit"
            assert s.unreturned >= 0 and s.inbox_bytes >= 0
            if not s.remote_closed:
                assert s.recv_window + s.inbox_bytes + s.unreturned == s.window, f"stream {s.stream_id}: credit"
            assert s.inbox_bytes <= s.window, f"stream {s.stream_id} holds more than its window"
            assert self.local_window <= s.window <= self.max_window, f"stream {s.stream_id}: window out of range"
            extra += s.window - self.local_window
        if not self._released:
            assert extra == self.budget_used, f"budget {self.budget_used} != windows {extra}"
            assert self.budget_used <= self.tunnel_budget
            assert self.budget.used <= self.budget.limit

    # Local actions.

    def open(self, host: str, port: int) -> int:
        """Open a stream to C{host:port} through the agent (server only)."""
        if self.role is not Role.SERVER:
            raise RuntimeError("only the server opens streams")
        if self._highest_id >= MAX_STREAM_ID:
            raise RuntimeError("stream ids exhausted on this connection")
        self._highest_id += 1
        sid = self._highest_id
        s = self._streams[sid] = self._new_stream(sid)
        self._queue(Open(sid, host, port))
        if s.early_left:
            s.open_queued = True
            self._opens_queued.append(s)
        return sid

    def accept(self, stream_id: int) -> None:
        """Answer an OPEN with OPEN_OK (agent only)."""
        s = self._streams[stream_id]
        s.opened = True
        self._reply(OpenOk(stream_id))
        self._schedule(s)

    def _new_stream(self, sid: int) -> _Stream:
        w = self.local_window
        early = min(self.early_budget, self.peer_window if self.role is Role.SERVER else w)
        return _Stream(sid, self.peer_window, w, window=w, target=w, early_left=early)

    def _drop(self, stream_id: int) -> _Stream | None:
        """Forget a stream, giving back its window above the initial one."""
        s = self._streams.pop(stream_id, None)
        if s is not None and s.window > self.local_window and not self._released:
            extra = s.window - self.local_window
            self.budget_used -= extra
            self.budget.release(extra)
        return s

    def refuse(self, stream_id: int, reason: OpenFailReason, message: str) -> None:
        """Answer an OPEN with OPEN_FAIL (agent only)."""
        if self._drop(stream_id) is not None:
            self._reply(OpenFail(stream_id, reason, message[:1000]))

    def send(self, stream_id: int, data: bytes) -> int:
        """
        Queue C{data} on the stream; it is sent as the window allows.
        Returns the bytes queued on the stream (L{outbox_bytes}).
        """
        s = self._streams.get(stream_id)
        if s is None:
            return 0
        if not data:
            return s.outbox_bytes
        if s.fin_wanted or s.local_closed:
            raise RuntimeError("write after the stream's write side was closed")
        s.outbox.append(data)
        s.outbox_bytes += len(data)
        if not s.scheduled:
            # _schedule(s), whose common case is inline: this runs for every write.
            if s.opened and s.send_window > 0 and not s.local_closed:
                s.scheduled = True
                if self._ready is None:
                    self._ready = deque()
                self._ready.append(stream_id)
            else:
                self._schedule(s)
        return s.outbox_bytes

    def send_now(self, stream_id: int, data: bytes, out: list[Buffer]) -> int:
        """
        L{send}, but when nothing at all waits to be sent (no control frame,
        no stream with DATA or a FIN ready) and the stream may send all of
        C{data} at once (opened, nothing queued before it, within its
        window and one frame), the DATA frame is appended to C{out} instead
        of queued: the frame L{pull} would take next, without the queue (a
        request or a reply on a quiet tunnel).  Otherwise C{data} is queued
        as L{send} queues it and C{out} is left alone.  Returns the bytes
        queued on the stream, as L{send}.
        """
        s = self._streams.get(stream_id)
        n = len(data)
        if (
            s is not None
            and s.opened
            and not s.outbox
            and 0 < n <= s.send_window
            and n <= MAX_DATA_PAYLOAD
            and not s.fin_wanted
            and not s.local_closed
            and not self._ready
            and not self._control
        ):
            out.append(data_header(stream_id, n))
            out.append(data)
            s.send_window -= n
            return 0
        return self.send(stream_id, data)

    def close_send(self, stream_id: int) -> None:
        """Send FIN once everything queued has been sent."""
        s = self._streams.get(stream_id)
        if s is None or s.fin_wanted:
            return
        s.fin_wanted = True
        self._schedule(s)

    def reset(self, stream_id: int, code: ErrorCode) -> None:
        """Abort the stream: send RST and forget it."""
        if self._drop(stream_id) is not None:
            self._queue(Rst(stream_id, code))

    def take_upto(self, stream_id: int, limit: int, now: float | None = None) -> list[bytes]:
        """
        Take chunks from the stream's inbox, oldest first, until at least
        C{limit} bytes are taken or it is empty.  Taking means the bytes were
        consumed, so their credit goes back to the peer (protocol.md §5.3).
        C{now} (the adapter's clock) drives window auto-tuning; without it
        the window stays as it is.
        """
        s = self._streams.get(stream_id)
        if s is None or not s.inbox:
            return []
        inbox = s.inbox
        chunks = [inbox.popleft()]
        n = len(chunks[0])
        while inbox and n < limit:
            chunk = inbox.popleft()
            chunks.append(chunk)
            n += len(chunk)
        s.inbox_bytes -= n
        if not s.remote_closed:
            s.unreturned += n
            if self._tuning and now is not None:
                if now - s.last_take < IDLE_SHRINK and s.epoch_bytes + n < s.target and s.target == s.window:
                    # _tune's common case, inline: mid-epoch, nothing to grow or shrink.
                    s.epoch_bytes += n
                    s.last_take = now
                else:
                    self._tune(s, n, now)
            if s.unreturned >= s.window // 2:
                s.recv_window += s.unreturned
                self._queue(WindowUpdate(stream_id, s.unreturned))
                s.unreturned = 0
        elif s.local_closed and not inbox:
            self._drop(stream_id)  # _forget_if_done(s): both ways ended and all taken
        return chunks

    def _tune(self, s: _Stream, n: int, now: float) -> None:
        """Auto-tuning after C{n} bytes were taken at C{now} (module docstring)."""
        if now - s.last_take >= IDLE_SHRINK:
            # Idle (or the first take): start again from the initial window;
            # these bytes may have waited for a while, so they start the epoch.
            s.target = self.local_window
            s.epoch_start = now
            s.epoch_bytes = 0
        else:
            s.epoch_bytes += n
            if s.epoch_bytes >= s.target:
                rtt = self.rtt
                if rtt is None:
                    self.rtt_wanted = True
                elif rtt >= MIN_GROW_RTT and now - s.epoch_start < GROW_RTTS * rtt:
                    s.target = min(2 * s.target, self.max_window)
                s.epoch_start = now
                s.epoch_bytes = 0
        s.last_take = now
        if s.target > s.window:
            room = min(s.target - s.window, self.tunnel_budget - self.budget_used)
            got = self.budget.reserve(room) if room > 0 else 0
            if got:
                s.window += got
                s.unreturned += got  # granted with the next WINDOW_UPDATE
                self.budget_used += got
            s.target = s.window  # what the budgets did not allow is not aimed at
        elif s.target < s.window:
            withheld = min(s.unreturned, s.window - s.target)
            if withheld:
                s.unreturned -= withheld
                s.window -= withheld
                self.budget_used -= withheld
                self.budget.release(withheld)

    def ping(self, opaque: bytes) -> None:
        self._queue(Ping(opaque))

    def goaway(self, code: ErrorCode, message: str) -> None:
        self._queue(GoAway(code, message[:1000]))

    def _queue(self, frame: Frame) -> None:
        if self._control is None:
            self._control = deque()
        self._control.append(frame)

    def members(self, members: tuple[str, ...]) -> None:
        """Queue MEMBERS (the server, on a version-2 tunnel only)."""
        self._queue(Members(members))

    def _reply(self, frame: Frame) -> None:
        self._replies += 1
        self._queue(frame)

    def _check_reply_room(self, what: str) -> None:
        """A peer frame that needs an answer: refuse it if too many answers wait."""
        if self._replies >= MAX_QUEUED_REPLIES:
            raise ControlFlood(f"{what} while {self._replies} answers to earlier frames wait to be sent")

    # Output.

    def has_output(self) -> bool:
        """
        Whether a control frame, or a stream's DATA or FIN, may be waiting:
        never False when something is; True at most once too often (a
        stream reset since it was scheduled, which L{pull} then drops).
        """
        return bool(self._control or self._ready)

    def pull(
        self, out: list[Buffer], limit: int, data_allowed: bool = True, control_allowed: bool = True
    ) -> tuple[int, list[int]]:
        """
        Encode what is ready into C{out} (headers and payloads as separate
        byte strings): every control frame (unless C{control_allowed} is
        false: then they all wait, in order), then DATA and FIN round robin
        across the streams, at most one frame per stream per round, until
        about C{limit} bytes of DATA payload are taken (one more frame may
        go over it).  (tests/reference_mux.py writes the same frames one at
        a time: the model this is checked against.)

        Returns the DATA payload bytes taken and the ids of the streams whose
        FIN was taken.
        """
        control = self._control
        if control_allowed and control:
            if self._replies:
                replies = _REPLY_TYPES
                while control:
                    frame = control.popleft()
                    if type(frame) in replies:
                        self._replies -= 1
                    out += encode(frame)
            else:
                while control:
                    out += encode(control.popleft())
            self._control = None
            if self._opens_queued:
                self._opens_sent()
        fins: list[int] = []
        if not data_allowed:
            return 0, fins
        ready = self._ready
        streams = self._streams
        taken = 0
        while ready and taken < limit:
            s = streams.get(ready.popleft())
            if s is None:
                continue
            s.scheduled = False
            n = self._stream_frame(s, out)
            if n is None:
                continue
            if n:
                taken += n
                if s.outbox or s.fin_wanted:  # else _schedule would not schedule it
                    self._schedule(s)
            else:
                fins.append(s.stream_id)
        if ready is not None and not ready:
            self._ready = None
        return taken, fins

    def _opens_sent(self) -> None:
        """Every queued OPEN was pulled: their streams' early DATA may follow."""
        opened, self._opens_queued = self._opens_queued, []
        for s in opened:
            s.open_queued = False
            if s.stream_id in self._streams:
                self._schedule(s)

    def _stream_frame(self, s: _Stream, out: list[Buffer]) -> int | None:
        """
        Append the stream's next frame to C{out}, header and payload pieces
        separately: small queued writes merged into one DATA frame, a long
        one split into views of itself, each within the stream's window.
        Returns the DATA payload size, 0 for a FIN, or None when the stream
        has nothing it may send now.
        """
        if s.local_closed:
            return None
        outbox = s.outbox
        sid = s.stream_id
        early = not s.opened
        if early and (s.open_queued or not outbox):
            return None
        if outbox:
            budget = s.send_window if not early else min(s.send_window, s.early_left)
            if budget <= 0:
                return None
            if budget > MAX_DATA_PAYLOAD:
                budget = MAX_DATA_PAYLOAD
            first = outbox[0]
            n = len(first)
            if n <= budget:
                outbox.popleft()
                header_at = len(out)
                out.append(b"")
                out.append(first)
                while outbox and n + len(outbox[0]) <= budget:
                    chunk = outbox.popleft()
                    out.append(chunk)
                    n += len(chunk)
                out[header_at] = data_header(sid, n)
            else:
                n = budget
                view = first if isinstance(first, memoryview) else memoryview(first)
                out.append(data_header(sid, n))
                out.append(view[:n])
                outbox[0] = view[n:]
            s.outbox_bytes -= n
            s.send_window -= n
            if early:
                s.early_left -= n
            return n
        if s.fin_wanted:
            s.local_closed = True
            out.append(fin_header(sid))
            self._forget_if_done(s)
            return 0
        return None

    def _schedule(self, s: _Stream) -> None:
        # Whether the stream may send, inline: this runs for every write and
        # every frame taken.  Opened: DATA in its window, or FIN.  Not yet
        # opened: only early DATA, once the OPEN went, within the early-data
        # budget as well as the window (module docstring).
        if s.scheduled or s.local_closed:
            return
        if s.opened:
            if not (s.send_window > 0 if s.outbox else s.fin_wanted):
                return
        elif not (s.outbox and not s.open_queued and min(s.send_window, s.early_left) > 0):
            return
        s.scheduled = True
        if self._ready is None:
            self._ready = deque()
        self._ready.append(s.stream_id)

    def _forget_if_done(self, s: _Stream) -> None:
        if s.local_closed and s.remote_closed and not s.inbox:
            self._drop(s.stream_id)

    # Input.

    def receive_data(self, stream_id: int, pieces: list[bytes], n: int) -> bool | StreamReset:
        """
        DATA from the peer, as the decoder's pieces: True when the stream
        has new bytes to deliver, False when the frame was discarded, a
        L{StreamReset} for a stream error.  (DATA has this one path;
        L{receive} takes every other frame.)
        """
        s = self._streams.get(stream_id)
        if s is None:
            if stream_id > self._highest_id:
                raise ProtocolError(f"DATA for stream {stream_id}, which was never opened")
            return False
        if not s.opened:
            if not s.early_left:
                raise ProtocolError(f"DATA on stream {stream_id} before it was opened")
            if n > s.early_left:
                raise EarlyDataExceeded(
                    f"{n} bytes of DATA on stream {stream_id} before OPEN_OK with"
                    f" {s.early_left} of the {self.early_budget}-byte early-data budget left"
                )
            s.early_left -= n
        if s.remote_closed:
            return self._after_peer_fin(stream_id)
        if n > s.recv_window:
            raise FlowControlError(f"{n} bytes of DATA on stream {stream_id} with a window of {s.recv_window}")
        s.recv_window -= n
        s.inbox.extend(pieces)
        s.inbox_bytes += n
        return True

    def _after_peer_fin(self, stream_id: int) -> StreamReset:
        """DATA or FIN after the peer's FIN: a stream error (§5.2)."""
        self._drop(stream_id)
        self._queue(Rst(stream_id, ErrorCode.STREAM_CLOSED))
        return StreamReset(stream_id, ErrorCode.STREAM_CLOSED)

    def receive(self, frame: Frame) -> list[Event]:
        """
        Process one frame from the peer, other than DATA (that is
        L{receive_data}).  Raises L{ProtocolError} for a connection error;
        stream errors reset the stream and are reported as L{StreamReset}.
        """
        if isinstance(frame, Ping):
            self._check_reply_room("PING")
            self._reply(Pong(frame.opaque))
            return []
        if isinstance(frame, Pong):
            return [PongReceived(frame.opaque)]
        if isinstance(frame, GoAway):
            return [GoAwayReceived(frame.code, frame.message)]
        if isinstance(frame, Open):
            return self._receive_open(frame)
        if isinstance(frame, Members):
            # The decoder admits MEMBERS only on a version-2 tunnel.
            if self.role is not Role.AGENT:
                raise ProtocolError("MEMBERS sent by the agent")
            return [MembersReceived(frame.members)]
        if isinstance(frame, (WindowUpdate, Fin, Rst, OpenOk, OpenFail)):
            return self._receive_stream_frame(frame)
        raise ProtocolError(f"{frame.TYPE.name} is only valid during the handshake")

    def _receive_open(self, frame: Open) -> list[Event]:
        if self.role is not Role.AGENT:
            raise ProtocolError("only the server may open streams")
        if frame.stream_id <= self._highest_id:
            raise ProtocolError(f"OPEN reuses stream id {frame.stream_id}")
        self._check_reply_room("OPEN")
        self._highest_id = frame.stream_id
        if len(self._streams) >= self.max_streams:
            self._reply(
                OpenFail(frame.stream_id, OpenFailReason.OVERLOADED, f"{self.max_streams} streams already open")
            )
            return []
        self._streams[frame.stream_id] = self._new_stream(frame.stream_id)
        return [StreamRequested(frame.stream_id, frame.host, frame.port)]

    def _receive_stream_frame(self, frame: WindowUpdate | Fin | Rst | OpenOk | OpenFail) -> list[Event]:
        sid = frame.stream_id
        if isinstance(frame, (OpenOk, OpenFail)) and self.role is not Role.SERVER:
            raise ProtocolError(f"{frame.TYPE.name} sent by the server")
        s = self._streams.get(sid)
        if s is None:
            if sid > self._highest_id:
                raise ProtocolError(f"{frame.TYPE.name} for stream {sid}, which was never opened")
            return []  # a closed stream: the frame crossed our RST or FIN
        if isinstance(frame, Rst):
            self._drop(sid)
            return [StreamReset(sid, frame.code)]
        if isinstance(frame, OpenOk):
            if s.opened:
                raise ProtocolError(f"second OPEN_OK for stream {sid}")
            s.opened = True
            self._schedule(s)
            return [OpenAccepted(sid)]
        if isinstance(frame, OpenFail):
            if s.opened:
                raise ProtocolError(f"OPEN_FAIL for stream {sid}, which was already accepted")
            self._drop(sid)
            return [OpenRefused(sid, frame.reason, frame.message)]
        if not s.opened:
            raise ProtocolError(f"{frame.TYPE.name} on stream {sid} before it was opened")
        if isinstance(frame, WindowUpdate):
            if s.send_window + frame.increment > MAX_WINDOW:
                raise FlowControlError(f"window of stream {sid} would exceed {MAX_WINDOW}")
            was_blocked = s.send_window <= 0
            s.send_window += frame.increment
            self._schedule(s)
            return [WindowOpened(sid)] if was_blocked else []
        if s.remote_closed:
            return [self._after_peer_fin(sid)]
        s.remote_closed = True  # a FIN
        self._forget_if_done(s)
        return [StreamEnded(sid)]
