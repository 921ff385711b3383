"""
The life cycle of one tunnel session, as an explicit state machine.

    Handshaking --registered--> Open --drain--> Draining
         |                        |                |
         +---------lost-----------+------lost------+--> Closed

Both ends run one.  It owns the session's timers, all on an injected
L{IReactorTime}: the handshake deadline, the keepalive ping, the dead-peer
check (nothing heard for C{dead_timeout} drops the tunnel) and the drain
deadline.  What it decides is carried out through L{SessionHooks}.
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


class SessionHooks(Protocol):
    """What a session machine asks its tunnel to do."""

    def send_ping(self) -> None: ...

    def send_goaway(self, code: ErrorCode, message: str) -> None: ...

    def open_streams(self) -> int: ...

    def close(self) -> None: ...

    def abort(self, why: str) -> None: ...

    def handshake_timed_out(self) -> None: ...


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
    last_heard: float = 0.0
    next_ping: float = 0.0
    timer: IDelayedCall | None = None
    drain_timer: IDelayedCall | None = None
    waiters: list[Deferred[None]] = field(default_factory=list)
    tick: Callable[[], None] | None = None

    def heard(self) -> None:
        """Anything arrived from the peer (called for every read)."""
        self.last_heard = self.clock.seconds()

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
        if now - self.last_heard >= self.dead_timeout:
            self.timer = None
            self.hooks.abort(f"nothing heard from the peer for {now - self.last_heard:.0f}s")
            return
        if now >= self.next_ping:
            self.hooks.send_ping()
            self.next_ping = now + self.keepalive
        due = min(self.next_ping, self.last_heard + self.dead_timeout)
        assert self.tick is not None
        self.timer = self.clock.callLater(max(due - now, 0.001), self.tick)


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
