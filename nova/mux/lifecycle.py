"""
The life cycles of a tunnel session and of a stream, as explicit state
machines (each: its inputs as a Protocol, a core dataclass, a transition
table that reads top to bottom).

The session:

    Handshaking --registered--> Open --drain--> Draining
         |                        |                |
         +---------lost-----------+------lost------+--> Closed

Both ends run one.  It owns the session's timers, all on an injected
L{IReactorTime}: the handshake deadline, the keepalive ping, the dead-peer
check (nothing heard for C{dead_timeout} drops the tunnel), the stall check
and the drain deadline.  What it decides is carried out through
L{SessionHooks}.

A stall (docs/faults.md) is a PING of ours that nothing answered (no PONG,
no byte at all) within C{stall_timeout}, well under the dead timeout: the
tunnel may only be slow to recover (TCP backing off its retransmissions
after a blackhole), so it is not dropped, but NOVAC opens a fresh tunnel
beside it.  C{stalled} is reported once per stall; C{stall_ended} when the
peer is heard from again (noticed at the next keepalive check).

A stream (L{nova.transport.stream.StreamTransport}) has two halves, each a machine
of its own, sharing one L{HalvesCore}:

    read half:   Reading --peer_ended--> PeerEnded --all_delivered--> ReadDone
                    |                       |
                    +--------drop-----------+--> Dropping --all_delivered--> ReadDone

    write half:  Writing --end--> Ending --fin_sent--> WriteDone
                    |               |
                    +-----close-----+--> Closing --fin_sent--> (finish)

and either half goes to Gone on C{gone} (a reset, an abort, the tunnel lost,
or the stream finished).  The stream finishes cleanly once both halves are
done; a stream closed by its protocol (C{close}/C{drop}) finishes when its
FIN is out, with a RST if the peer had not ended its direction yet (like
closing a socket with unread data).  What the machines decide is carried
out through L{StreamHalvesHooks}.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from automat import TypeMachineBuilder
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from nova.wire.errors import ErrorCode

DEFAULT_KEEPALIVE = 15.0
DEFAULT_DEAD_TIMEOUT = 45.0
# Off (0) unless set: NOVAC sets it (nova.agent.options), NOVAS does not.
DEFAULT_STALL_TIMEOUT = 0.0


class SessionHooks(Protocol):
    """What a session machine asks its tunnel to do."""

    def send_ping(self) -> None: ...

    def send_goaway(self, code: ErrorCode, message: str) -> None: ...

    def open_streams(self) -> int: ...

    def close(self) -> None: ...

    def abort(self, why: str) -> None: ...

    def handshake_timed_out(self) -> None: ...

    def stalled(self, silent: float) -> None:
        "A PING of ours went unanswered for the stall timeout; nothing heard for C{silent} seconds."

    def stall_ended(self) -> None:
        "The peer was heard from again after a stall."


class Session(Protocol):
    """The inputs of the session machine."""

    def registered(self) -> None:
        "The handshake succeeded."

    def handshake_expired(self) -> None:
        "The handshake deadline passed."

    def handshake_restarted(self) -> None:
        "This end waited on purpose (a throttle's delay): the handshake deadline counts from now."

    def tick(self) -> None:
        "A keepalive or dead-peer deadline is due."

    def drain(self, timeout: float, code: ErrorCode, message: str) -> Deferred[None]:
        "Take no new streams; close once the open ones end or C{timeout} passes."

    def stream_closed(self) -> None:
        "One of the session's streams ended."

    def drain_expired(self) -> None:
        "The drain deadline passed with streams still open."

    def lost(self) -> None:
        "The connection is gone."


@dataclass
class SessionCore:
    clock: IReactorTime
    hooks: SessionHooks
    keepalive: float = DEFAULT_KEEPALIVE
    dead_timeout: float = DEFAULT_DEAD_TIMEOUT
    handshake_timeout: float = 10.0
    stall_timeout: float = DEFAULT_STALL_TIMEOUT
    last_heard: float = 0.0
    # The dead timeout counts from the later of last_heard and this (see reprieve).
    reprieved_at: float = 0.0
    next_ping: float = 0.0
    ping_out: float | None = None  # when the oldest PING nothing has answered yet went out
    stall_at: float | None = None  # last_heard when a stall was reported; None: no stall
    timer: IDelayedCall | None = None
    drain_timer: IDelayedCall | None = None
    waiters: list[Deferred[None]] = field(default_factory=list)
    tick: Callable[[], None] | None = None

    def heard(self) -> None:
        """Anything arrived from the peer (the tunnel does the same inline, for every read)."""
        self.last_heard = self.clock.seconds()

    def reprieve(self) -> None:
        """
        Count the dead timeout afresh from now, without pretending the peer
        was heard (no stall ends): the peer proved alive another way (its
        fresh tunnel), and this connection may only be waiting for its
        backed-off retransmission (docs/faults.md).
        """
        self.reprieved_at = self.clock.seconds()

    def waiter(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.waiters.append(d)
        return d

    def cancel_timers(self) -> None:
        for call in (self.timer, self.drain_timer):
            if call is not None and call.active():
                call.cancel()
        self.timer = self.drain_timer = None

    def check_liveness(self) -> None:
        """Drop a silent peer, ping when due, and schedule the next check."""
        now = self.clock.seconds()
        silent_since = max(self.last_heard, self.reprieved_at)
        if now - silent_since >= self.dead_timeout:
            self.timer = None
            self.hooks.abort(f"nothing heard from the peer for {now - self.last_heard:.0f}s")
            return
        self._check_stall(now)
        if now >= self.next_ping:
            self.hooks.send_ping()
            self.next_ping = now + self.keepalive
            if self.ping_out is None:
                self.ping_out = now
        due = min(self.next_ping, silent_since + self.dead_timeout)
        if self.stall_timeout > 0 and self.ping_out is not None and self.stall_at is None:
            due = min(due, self.ping_out + self.stall_timeout)
        assert self.tick is not None
        self.timer = self.clock.callLater(max(due - now, 0.001), self.tick)

    def _check_stall(self, now: float) -> None:
        """Report a stall once, and its end (see the module docstring)."""
        if self.ping_out is not None and self.last_heard >= self.ping_out:
            self.ping_out = None  # answered (or anything else arrived since it went out)
        if self.stall_at is not None:
            if self.last_heard > self.stall_at:
                self.stall_at = None
                self.hooks.stall_ended()
            return
        if self.stall_timeout > 0 and self.ping_out is not None and now - self.ping_out >= self.stall_timeout:
            self.stall_at = self.last_heard
            self.hooks.stalled(now - self.last_heard)


_builder = TypeMachineBuilder(Session, SessionCore)
Handshaking = _builder.state("Handshaking")
Open = _builder.state("Open")
Draining = _builder.state("Draining")
Closed = _builder.state("Closed")


@Handshaking.upon(Session.registered).to(Open)
def _registered(session: Session, core: SessionCore) -> None:
    core.cancel_timers()
    core.last_heard = core.clock.seconds()
    core.next_ping = core.last_heard + core.keepalive
    core.ping_out = core.stall_at = None
    core.check_liveness()


@Handshaking.upon(Session.handshake_expired).loop()
def _handshake_expired(session: Session, core: SessionCore) -> None:
    core.timer = None
    core.hooks.handshake_timed_out()
    # Dropped, not closed: a peer that stalls its TLS handshake, or never
    # reads, would hold a graceful close open for ever.
    core.hooks.abort(f"the handshake did not finish within {core.handshake_timeout:g}s")


@Handshaking.upon(Session.handshake_restarted).loop()
def _handshake_restarted(session: Session, core: SessionCore) -> None:
    if core.timer is not None and core.timer.active():
        core.timer.cancel()
    core.timer = core.clock.callLater(core.handshake_timeout, session.handshake_expired)


@Handshaking.upon(Session.drain).loop()
def _drain_handshaking(
    session: Session, core: SessionCore, timeout: float, code: ErrorCode, message: str
) -> Deferred[None]:
    core.hooks.close()
    return core.waiter()


@Open.upon(Session.tick).loop()
@Draining.upon(Session.tick).loop()
def _tick(session: Session, core: SessionCore) -> None:
    core.check_liveness()


@Open.upon(Session.drain).to(Draining)
def _drain(session: Session, core: SessionCore, timeout: float, code: ErrorCode, message: str) -> Deferred[None]:
    d = core.waiter()
    core.hooks.send_goaway(code, message)
    core.drain_timer = core.clock.callLater(timeout, session.drain_expired)
    if core.hooks.open_streams() == 0:
        core.hooks.close()
    return d


@Draining.upon(Session.drain).loop()
def _drain_again(session: Session, core: SessionCore, timeout: float, code: ErrorCode, message: str) -> Deferred[None]:
    return core.waiter()


@Open.upon(Session.stream_closed).loop()
@Handshaking.upon(Session.stream_closed).loop()
@Closed.upon(Session.stream_closed).loop()
def _stream_closed(session: Session, core: SessionCore) -> None:
    pass


@Draining.upon(Session.stream_closed).loop()
def _stream_closed_draining(session: Session, core: SessionCore) -> None:
    if core.hooks.open_streams() == 0:
        core.hooks.close()


@Draining.upon(Session.drain_expired).loop()
def _drain_expired(session: Session, core: SessionCore) -> None:
    core.drain_timer = None
    core.hooks.abort(f"{core.hooks.open_streams()} stream(s) still open when the drain timeout passed")


@Handshaking.upon(Session.lost).to(Closed)
@Open.upon(Session.lost).to(Closed)
@Draining.upon(Session.lost).to(Closed)
def _lost(session: Session, core: SessionCore) -> None:
    core.cancel_timers()
    waiters, core.waiters = core.waiters, []
    for d in waiters:
        d.callback(None)


@Closed.upon(Session.drain).loop()
def _drain_closed(session: Session, core: SessionCore, timeout: float, code: ErrorCode, message: str) -> Deferred[None]:
    return succeed(None)


@Closed.upon(Session.lost).loop()
@Closed.upon(Session.tick).loop()
@Closed.upon(Session.handshake_expired).loop()
@Closed.upon(Session.handshake_restarted).loop()
@Open.upon(Session.handshake_restarted).loop()
@Draining.upon(Session.handshake_restarted).loop()
@Closed.upon(Session.drain_expired).loop()
@Open.upon(Session.drain_expired).loop()
def _ignored(session: Session, core: SessionCore) -> None:
    pass


_build = _builder.build()


def start_session(core: SessionCore) -> Session:
    """A new session in Handshaking, with its handshake deadline running."""
    session = _build(core)
    core.tick = session.tick
    core.last_heard = core.clock.seconds()
    core.timer = core.clock.callLater(core.handshake_timeout, session.handshake_expired)
    return session


class StreamHalvesHooks(Protocol):
    """What a stream's half machines ask their stream to do."""

    def send_fin(self) -> None:
        "Queue our FIN after what is queued."

    def read_closed(self) -> None:
        "Everything before the peer's FIN was handed over: tell the protocol (EOF)."

    def write_closed(self) -> None:
        "Our FIN went out: tell the protocol."

    def finish(self, cut: bool) -> None:
        "End the stream cleanly; first reset it (RST) if C{cut}."


class ReadHalf(Protocol):
    """The inputs of a stream's read half: bytes from the peer to our protocol."""

    def peer_ended(self) -> None:
        "The peer's FIN arrived; bytes before it may still wait."

    def all_delivered(self) -> None:
        "Every byte before the peer's FIN was handed over (or dropped)."

    def drop(self) -> None:
        "Our protocol closed the stream: drop what arrives from now on."

    def gone(self) -> None:
        "The stream is gone."


class WriteHalf(Protocol):
    """The inputs of a stream's write half: bytes from our protocol to the peer."""

    def end(self) -> None:
        "Our protocol writes no more (a half-close): FIN after what is queued."

    def close(self) -> None:
        "Our protocol closed the stream: FIN after what is queued, then the stream ends."

    def fin_sent(self) -> None:
        "Our FIN went out."

    def gone(self) -> None:
        "The stream is gone."


@dataclass
class HalvesCore:
    """
    What a stream's data path needs to see of its two halves, written only
    by the transitions below: the stream checks these plain fields per write
    and per hand-over, never the machines.
    """

    hooks: StreamHalvesHooks
    can_write: bool = True  # the write half is in Writing
    eof_due: bool = False  # the peer's FIN arrived; EOF is handed over once nothing waits
    dropping: bool = False  # the read half is in Dropping: received bytes are discarded
    read_over: bool = False  # the read half is done (EOF handed over)
    write_over: bool = False  # the write half is done (our FIN is out)


# A stream's halves are machines like the session's, written as transition
# tables instead of through Automat: (state, input) -> (next state, output).
# They run for every tunnelled connection, several inputs each, and
# Automat's typed machine spends about 330 bytecodes and five calls per input
# (tuples, a tracer, a postponement list): 17 % of the Python work of a
# connection on NOVAS (bench/cpu.py --opcodes --connections).  The tables
# keep its semantics: the state changes before the output runs, and an input
# fed from inside an output (the read half's EOF making the protocol close
# the stream, say) runs after it (tests/test_lifecycle_halves.py checks them
# against Automat machines built from these same tables).  Every state has a
# row for every input.

HalfOutput = Callable[[object, HalvesCore], None]


def _peer_ended(half: object, core: HalvesCore) -> None:
    core.eof_due = True


def _drop(half: object, core: HalvesCore) -> None:
    core.dropping = True


def _eof(half: object, core: HalvesCore) -> None:
    core.eof_due = False
    core.read_over = True
    core.hooks.read_closed()
    if core.write_over:
        core.hooks.finish(cut=False)


def _dropped_to_eof(half: object, core: HalvesCore) -> None:
    core.eof_due = False
    core.read_over = True
    if core.write_over:
        core.hooks.finish(cut=False)


def _read_gone(half: object, core: HalvesCore) -> None:
    core.eof_due = False


def _half_ignored(half: object, core: HalvesCore) -> None:
    pass


READ_HALF: dict[tuple[str, str], tuple[str, HalfOutput]] = {
    # state        input              next state    output
    ("Reading", "peer_ended"): ("PeerEnded", _peer_ended),
    ("Reading", "drop"): ("Dropping", _drop),
    ("Reading", "all_delivered"): ("Reading", _half_ignored),
    ("Reading", "gone"): ("ReadGone", _read_gone),
    ("PeerEnded", "all_delivered"): ("ReadDone", _eof),
    ("PeerEnded", "drop"): ("Dropping", _drop),
    ("PeerEnded", "peer_ended"): ("PeerEnded", _half_ignored),
    ("PeerEnded", "gone"): ("ReadGone", _read_gone),
    ("Dropping", "peer_ended"): ("Dropping", _peer_ended),
    ("Dropping", "all_delivered"): ("ReadDone", _dropped_to_eof),
    ("Dropping", "drop"): ("Dropping", _half_ignored),
    ("Dropping", "gone"): ("ReadGone", _read_gone),
    ("ReadDone", "peer_ended"): ("ReadDone", _half_ignored),
    ("ReadDone", "drop"): ("ReadDone", _half_ignored),
    ("ReadDone", "all_delivered"): ("ReadDone", _half_ignored),
    ("ReadDone", "gone"): ("ReadGone", _read_gone),
    ("ReadGone", "peer_ended"): ("ReadGone", _half_ignored),
    ("ReadGone", "all_delivered"): ("ReadGone", _half_ignored),
    ("ReadGone", "drop"): ("ReadGone", _half_ignored),
    ("ReadGone", "gone"): ("ReadGone", _half_ignored),
}


def _end(half: object, core: HalvesCore) -> None:
    core.can_write = False
    core.hooks.send_fin()


def _fin_sent(half: object, core: HalvesCore) -> None:
    core.write_over = True
    core.hooks.write_closed()
    if core.read_over:
        core.hooks.finish(cut=False)


def _closed(half: object, core: HalvesCore) -> None:
    core.write_over = True
    core.hooks.finish(cut=not core.read_over)


def _close_done(half: object, core: HalvesCore) -> None:
    core.hooks.finish(cut=not core.read_over)


def _write_gone(half: object, core: HalvesCore) -> None:
    core.can_write = False


WRITE_HALF: dict[tuple[str, str], tuple[str, HalfOutput]] = {
    # state        input              next state    output
    ("Writing", "end"): ("Ending", _end),
    ("Writing", "close"): ("Closing", _end),
    ("Writing", "fin_sent"): ("Writing", _half_ignored),
    ("Writing", "gone"): ("WriteGone", _write_gone),
    ("Ending", "close"): ("Closing", _half_ignored),
    ("Ending", "fin_sent"): ("WriteDone", _fin_sent),
    ("Ending", "end"): ("Ending", _half_ignored),
    ("Ending", "gone"): ("WriteGone", _write_gone),
    ("Closing", "fin_sent"): ("WriteGone", _closed),
    ("Closing", "end"): ("Closing", _half_ignored),
    ("Closing", "close"): ("Closing", _half_ignored),
    ("Closing", "gone"): ("WriteGone", _write_gone),
    ("WriteDone", "close"): ("WriteGone", _close_done),
    ("WriteDone", "end"): ("WriteDone", _half_ignored),
    ("WriteDone", "fin_sent"): ("WriteDone", _half_ignored),
    ("WriteDone", "gone"): ("WriteGone", _write_gone),
    ("WriteGone", "end"): ("WriteGone", _half_ignored),
    ("WriteGone", "close"): ("WriteGone", _half_ignored),
    ("WriteGone", "fin_sent"): ("WriteGone", _half_ignored),
    ("WriteGone", "gone"): ("WriteGone", _half_ignored),
}


class _Half:
    """One half's machine: its state, and the table that moves it."""

    __slots__ = ("_core", "_postponed", "_table", "state")

    def __init__(self, core: HalvesCore, table: dict[tuple[str, str], tuple[str, HalfOutput]], state: str) -> None:
        self._core = core
        self._table = table
        self.state = state
        self._postponed: list[str] | None = None

    def _input(self, name: str) -> None:
        postponed = self._postponed
        if postponed is not None:  # fed from inside an output: after it
            postponed.append(name)
            return
        postponed = self._postponed = []
        try:
            self.state, output = self._table[self.state, name]
            output(self, self._core)
        finally:
            self._postponed = None
        while postponed:
            self._input(postponed.pop(0))


class _ReadHalf(_Half):
    __slots__ = ()

    def peer_ended(self) -> None:
        self._input("peer_ended")

    def all_delivered(self) -> None:
        self._input("all_delivered")

    def drop(self) -> None:
        self._input("drop")

    def gone(self) -> None:
        self._input("gone")


class _WriteHalf(_Half):
    __slots__ = ()

    def end(self) -> None:
        self._input("end")

    def close(self) -> None:
        self._input("close")

    def fin_sent(self) -> None:
        self._input("fin_sent")

    def gone(self) -> None:
        self._input("gone")


def start_halves(hooks: StreamHalvesHooks) -> tuple[HalvesCore, ReadHalf, WriteHalf]:
    """A new stream's two halves, both open."""
    core = HalvesCore(hooks)
    return core, _ReadHalf(core, READ_HALF, "Reading"), _WriteHalf(core, WRITE_HALF, "Writing")
