"""
The session machine (keepalive, dead peers, drain) and the reconnect loop,
driven by a Clock.
"""

from __future__ import annotations

from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from nova.agent.reconnect import RESTART_RETRIES, Backoff, reconnecting
from nova.agent.tunnel import AgentTunnel
from nova.mux.lifecycle import SessionCore, start_session
from nova.wire.errors import ErrorCode

from .contexts import agent_context


class Hooks:
    def __init__(self) -> None:
        self.pings = 0
        self.goaways: list[ErrorCode] = []
        self.streams = 0
        self.closed = 0
        self.aborted: list[str] = []
        self.timed_out = 0
        self.stalls: list[float] = []
        self.stalls_ended = 0

    def send_ping(self) -> None:
        self.pings += 1

    def send_goaway(self, code: ErrorCode, message: str) -> None:
        self.goaways.append(code)

    def open_streams(self) -> int:
        return self.streams

    def close(self) -> None:
        self.closed += 1

    def abort(self, why: str) -> None:
        self.aborted.append(why)

    def handshake_timed_out(self) -> None:
        self.timed_out += 1

    def stalled(self, silent: float) -> None:
        self.stalls.append(silent)

    def stall_ended(self) -> None:
        self.stalls_ended += 1


class SessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.hooks = Hooks()
        self.core = SessionCore(self.clock, self.hooks, keepalive=15, dead_timeout=45, handshake_timeout=10)
        self.session = start_session(self.core)

    def test_handshake_deadline(self) -> None:
        self.clock.advance(9.9)
        self.assertEqual(self.hooks.timed_out, 0)
        self.clock.advance(0.1)
        self.assertEqual(self.hooks.timed_out, 1)
        # Dropped at once: a graceful close can be held open by a peer that never reads.
        self.assertEqual(self.hooks.aborted, ["the handshake did not finish within 10s"])

    def test_a_deliberate_wait_does_not_eat_the_handshake_deadline(self) -> None:
        self.clock.advance(8)
        self.session.handshake_restarted()
        self.clock.advance(9.9)
        self.assertEqual(self.hooks.timed_out, 0)
        self.clock.advance(0.1)
        self.assertEqual(self.hooks.timed_out, 1)

    def test_registration_cancels_the_handshake_deadline(self) -> None:
        self.session.registered()
        self.clock.advance(10)
        self.assertEqual(self.hooks.timed_out, 0)

    def test_pings_every_keepalive_while_the_peer_talks(self) -> None:
        self.session.registered()
        for _ in range(20):
            self.clock.advance(15)
            self.core.heard()  # the PONG
        self.assertEqual(self.hooks.pings, 20)
        self.assertEqual(self.hooks.aborted, [])

    def test_silent_peer_dropped_at_the_dead_timeout(self) -> None:
        self.session.registered()
        self.clock.advance(44.9)
        self.assertEqual(self.hooks.aborted, [])
        self.clock.advance(0.2)
        self.assertEqual(len(self.hooks.aborted), 1)
        self.assertIn("nothing heard from the peer for 45s", self.hooks.aborted[0])
        self.session.lost()
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_drain_without_streams_closes_at_once(self) -> None:
        self.session.registered()
        done = self.session.drain(30, ErrorCode.SHUTDOWN, "bye")
        self.assertEqual(self.hooks.goaways, [ErrorCode.SHUTDOWN])
        self.assertEqual(self.hooks.closed, 1)
        self.assertNoResult(done)
        self.session.lost()
        self.successResultOf(done)

    def test_drain_waits_for_the_last_stream(self) -> None:
        self.session.registered()
        self.hooks.streams = 2
        done = self.session.drain(30, ErrorCode.SHUTDOWN, "bye")
        self.hooks.streams = 1
        self.session.stream_closed()
        self.assertEqual(self.hooks.closed, 0)
        self.hooks.streams = 0
        self.session.stream_closed()
        self.assertEqual(self.hooks.closed, 1)
        self.session.lost()
        self.successResultOf(done)

    def test_drain_timeout_cuts_remaining_streams(self) -> None:
        self.session.registered()
        self.hooks.streams = 1
        done = self.session.drain(30, ErrorCode.SHUTDOWN, "bye")
        self.clock.advance(29)
        self.assertEqual(self.hooks.aborted, [])
        self.core.heard()
        self.clock.advance(1)
        self.assertEqual(self.hooks.aborted, ["1 stream(s) still open when the drain timeout passed"])
        self.session.lost()
        self.successResultOf(done)
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StallTests(SynchronousTestCase):
    """
    A PING unanswered for the stall timeout is a stall (NOVAC opens a fresh
    tunnel); the tunnel is only dropped at the dead timeout.
    """

    def setUp(self) -> None:
        self.clock = Clock()
        self.hooks = Hooks()
        self.core = SessionCore(
            self.clock, self.hooks, keepalive=15, dead_timeout=45, handshake_timeout=10, stall_timeout=5
        )
        self.session = start_session(self.core)
        self.session.registered()

    def test_answered_pings_never_stall(self) -> None:
        for _ in range(10):
            self.clock.advance(15)  # a PING goes out
            self.clock.advance(0.05)
            self.core.heard()  # its PONG, 50 ms later
        self.clock.advance(4.9)
        self.assertEqual((self.hooks.stalls, self.hooks.aborted), ([], []))

    def test_a_quiet_idle_peer_is_no_stall(self) -> None:
        # Nothing is heard between keepalives: only an unanswered PING counts.
        self.clock.advance(14.9)
        self.assertEqual(self.hooks.stalls, [])

    def test_blackhole_stalls_once_then_dead_timeout_drops(self) -> None:
        self.clock.advance(15)
        self.assertEqual(self.hooks.pings, 1)
        self.clock.advance(4.9)
        self.assertEqual(self.hooks.stalls, [])
        self.clock.advance(0.1)
        self.assertEqual(self.hooks.stalls, [20.0])
        self.clock.advance(24.9)
        self.assertEqual(len(self.hooks.stalls), 1)  # reported once, not at every PING
        self.assertEqual(self.hooks.aborted, [])
        self.clock.advance(0.1)
        self.assertEqual(len(self.hooks.aborted), 1)
        self.assertEqual(self.hooks.stalls_ended, 0)

    def test_a_reprieve_counts_the_dead_timeout_afresh_and_ends_no_stall(self) -> None:
        # A 30 s blackhole: the agent's fresh tunnel replaced this one at 31 s;
        # this connection waits for its backed-off retransmission.
        self.clock.advance(15)
        self.clock.advance(5)
        self.assertEqual(len(self.hooks.stalls), 1)
        self.clock.advance(11)  # t = 31
        self.core.reprieve()
        self.clock.advance(14.1)  # t = 45.1: 45 s after it was last heard
        self.assertEqual(self.hooks.aborted, [])
        self.assertEqual(self.hooks.stalls_ended, 0)  # not heard: the stall stands
        self.clock.advance(30.8)  # t = 75.9
        self.assertEqual(self.hooks.aborted, [])
        self.clock.advance(0.2)  # t = 76.1: a dead timeout after the reprieve, still silent
        self.assertEqual(len(self.hooks.aborted), 1)
        self.assertIn("nothing heard from the peer for 76s", self.hooks.aborted[0])

    def test_a_reprieved_tunnel_heard_again_lives_on(self) -> None:
        self.clock.advance(31)
        self.core.reprieve()
        self.clock.advance(14)  # t = 45: the kernel's clamped retransmission gets through
        self.core.heard()
        for _ in range(4):
            self.clock.advance(15)
            self.core.heard()  # its PONGs
        self.assertEqual(self.hooks.aborted, [])
        self.assertEqual(self.hooks.stalls_ended, 1)

    def test_anything_heard_after_the_ping_answers_it(self) -> None:
        self.clock.advance(16)
        self.core.heard()  # DATA, not the PONG: the link works
        self.clock.advance(10)
        self.assertEqual(self.hooks.stalls, [])

    def test_a_stall_ends_when_the_peer_is_heard_again(self) -> None:
        self.clock.advance(15)
        self.clock.advance(5)
        self.assertEqual(len(self.hooks.stalls), 1)
        self.clock.advance(5)
        self.core.heard()  # the link came back (a flap)
        self.clock.advance(5)  # noticed at the next keepalive check
        self.assertEqual(self.hooks.stalls_ended, 1)
        self.assertEqual(self.hooks.aborted, [])
        self.clock.advance(0.05)
        self.core.heard()  # the PONG of the PING sent at the check
        # A second outage is a second stall.
        self.clock.advance(14.95)
        self.clock.advance(4.9)
        self.assertEqual(len(self.hooks.stalls), 1)
        self.clock.advance(0.1)
        self.assertEqual(len(self.hooks.stalls), 2)

    def test_off_without_a_stall_timeout(self) -> None:
        clock, hooks = Clock(), Hooks()
        core = SessionCore(clock, hooks, keepalive=15, dead_timeout=45, handshake_timeout=10)
        start_session(core).registered()
        for _ in range(44):
            clock.advance(1)
        self.assertEqual((hooks.pings, hooks.stalls, hooks.aborted), (2, [], []))
        clock.advance(1)
        self.assertEqual(len(hooks.aborted), 1)


class BackoffTests(SynchronousTestCase):
    def test_full_jitter_grows_to_the_cap(self) -> None:
        top = Backoff(1.0, 30.0, random=lambda: 0.999999)
        delays = [top(1) for _ in range(8)]
        for got, want in zip(delays, [1, 2, 4, 8, 16, 30, 30, 30], strict=True):
            self.assertAlmostEqual(got, want, places=3)
        self.assertEqual(Backoff(1.0, 30.0, random=lambda: 0.0)(7), 0.0)

    def test_registration_resets(self) -> None:
        top = Backoff(1.0, 30.0, random=lambda: 0.999999)
        for _ in range(6):
            top(1)
        top.reset()
        self.assertAlmostEqual(top(1), 1.0, places=3)

    def test_rejection_waits_near_the_cap(self) -> None:
        b = Backoff(1.0, 30.0, random=lambda: 0.0)
        b.rejected = True
        self.assertEqual(b(1), 15.0)

    def test_a_server_shutdown_keeps_the_next_retries_short(self) -> None:
        top = Backoff(1.0, 30.0, random=lambda: 0.999999)
        top.expect_restart()
        quick = [top(1) for _ in range(RESTART_RETRIES)]
        self.assertTrue(all(0.99 < d <= 1.0 for d in quick), quick)
        # Then the usual backoff, from the bottom.
        for got, want in zip([top(1) for _ in range(4)], [1, 2, 4, 8], strict=True):
            self.assertAlmostEqual(got, want, places=3)

    def test_registration_or_rejection_ends_the_short_retries(self) -> None:
        b = Backoff(1.0, 30.0, random=lambda: 0.999999)
        b.expect_restart()
        b(1)
        b.reset()
        self.assertAlmostEqual(b(1), 1.0, places=3)
        self.assertAlmostEqual(b(1), 2.0, places=3)  # growing again: the short retries are over
        b.expect_restart()
        b.rejected = True
        self.assertGreaterEqual(b(1), 15.0)

    def test_the_agent_expects_a_restart_only_after_a_shutdown(self) -> None:
        for code, short in ((ErrorCode.SHUTDOWN, True), (ErrorCode.REPLACED, False), (ErrorCode.NO_ERROR, False)):
            backoff = Backoff(1.0, 30.0, random=lambda: 0.999999)
            for _ in range(5):
                backoff(1)  # it had grown before the tunnel registered...
            backoff.reset()  # ...and registering reset it
            backoff(1)
            backoff.reset()
            context = agent_context(Clock(), lambda *a: Deferred(), name="a", tags=(), token=b"t", tls=False)
            tunnel = AgentTunnel(context, "s:1", backoff)
            tunnel.goaway_received(code, "bye")
            delays = [backoff(1) for _ in range(3)]
            if short:
                self.assertTrue(all(d <= 1.0 for d in delays), (code, delays))
            else:
                self.assertAlmostEqual(delays[-1], 4.0, places=3, msg=code.name)


# The reconnect loop as a Hypothesis state machine.


class FakeTunnel(Protocol):
    def __init__(self) -> None:
        self.registered = False
        self.lost = False

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = True


class Closing(StringTransport):
    def __init__(self, on_close: Any) -> None:
        super().__init__()
        self._on_close = on_close

    def loseConnection(self) -> None:
        if not self.disconnecting:
            self.disconnecting = True
            self._on_close()


class FakeEndpoint:
    def __init__(self) -> None:
        self.attempts: list[tuple[Deferred[Any], Any]] = []

    def connect(self, factory: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.attempts.append((d, factory))
        return d

    def pending(self) -> list[tuple[Deferred[Any], Any]]:
        return [(d, f) for d, f in self.attempts if not d.called]


INITIAL, CAP = 1.0, 30.0


class RecordingBackoff(Backoff):
    def __init__(self, initial: float, cap: float) -> None:
        super().__init__(initial, cap)
        self.chosen: list[tuple[float, bool, bool]] = []

    def __call__(self, attempt: int) -> float:
        quick = self._quick > 0
        delay = super().__call__(attempt)
        self.chosen.append((delay, self.rejected, quick))
        return delay


class ReconnectMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.endpoint = FakeEndpoint()
        self.backoff = RecordingBackoff(INITIAL, CAP)
        self.service = reconnecting(self.endpoint, _Factory(), self.backoff, self.clock)  # type: ignore[arg-type]
        self.service.startService()
        self.stopped = False
        self.connected: tuple[Any, FakeTunnel] | None = None  # (proxy, tunnel)
        self.just_registered_then_lost = False

    def _lose(self, reason: Exception) -> None:
        assert self.connected is not None
        proxy, _tunnel = self.connected
        self.connected = None
        proxy.connectionLost(Failure(reason))

    @precondition(lambda self: bool(self.endpoint.pending()))
    @rule()
    def connect_succeeds(self) -> None:
        d, factory = self.endpoint.pending()[0]
        proxy = factory.buildProtocol(None)
        tunnel = proxy._protocol
        holder: dict[str, Any] = {}
        proxy.makeConnection(Closing(lambda: self._lose_later(holder)))
        holder["proxy"] = proxy
        self.connected = (proxy, tunnel)
        d.callback(proxy)

    def _lose_later(self, holder: dict[str, Any]) -> None:
        proxy = holder.get("proxy")
        if self.connected is not None and self.connected[0] is proxy:
            self._lose(error.ConnectionDone())

    @precondition(lambda self: bool(self.endpoint.pending()))
    @rule()
    def connect_fails(self) -> None:
        d, _ = self.endpoint.pending()[0]
        d.errback(error.ConnectionRefusedError())

    @precondition(lambda self: self.connected is not None and not self.connected[1].registered)
    @rule()
    def registration_succeeds(self) -> None:
        # What AgentTunnel does on WELCOME.
        assert self.connected is not None
        self.connected[1].registered = True
        self.backoff.reset()

    @precondition(lambda self: self.connected is not None and not self.connected[1].registered)
    @rule()
    def auth_rejected(self) -> None:
        # What AgentTunnel does on REJECT.
        self.backoff.rejected = True
        self._lose(error.ConnectionDone())

    @precondition(lambda self: self.connected is not None and not self.connected[1].registered)
    @rule()
    def lost_during_handshake(self) -> None:
        self._lose(error.ConnectionLost())

    @precondition(lambda self: self.connected is not None and self.connected[1].registered)
    @rule()
    def server_shuts_down(self) -> None:
        # What AgentTunnel does on GOAWAY SHUTDOWN; then the server closes.
        self.backoff.expect_restart()
        self._lose(error.ConnectionDone())
        if not self.stopped:
            self.just_registered_then_lost = True

    @precondition(lambda self: self.connected is not None and self.connected[1].registered)
    @rule(goaway=st.booleans())
    def disconnect(self, goaway: bool) -> None:
        self._lose(error.ConnectionDone() if goaway else error.ConnectionLost())
        if not self.stopped:
            self.just_registered_then_lost = True

    @rule()
    def stop(self) -> None:
        self.service.stopService()
        self.stopped = True

    @rule(seconds=st.floats(min_value=0, max_value=2 * CAP))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.just_registered_then_lost = False

    @invariant()
    def one_attempt_at_a_time(self) -> None:
        in_flight = len(self.endpoint.pending()) + (1 if self.connected is not None else 0)
        assert in_flight <= 1, in_flight

    @invariant()
    def delays_within_bounds(self) -> None:
        now = self.clock.seconds()
        for call in self.clock.getDelayedCalls():
            assert 0 <= call.getTime() - now <= CAP + 1e-9

    @invariant()
    def nothing_left_after_stop(self) -> None:
        if self.stopped and self.connected is None:
            assert self.clock.getDelayedCalls() == []
            assert self.endpoint.pending() == []

    @invariant()
    def every_chosen_delay_within_bounds(self) -> None:
        for delay, rejected, quick in self.backoff.chosen:
            assert 0 <= delay <= CAP
            if rejected:
                assert delay >= CAP / 2
            elif quick:
                assert delay <= INITIAL

    @invariant()
    def success_resets_the_backoff(self) -> None:
        if self.just_registered_then_lost and not self.backoff.rejected:
            for call in self.clock.getDelayedCalls():
                assert call.getTime() - self.clock.seconds() <= INITIAL + 1e-9


class _Factory:
    def buildProtocol(self, addr: Any) -> FakeTunnel:
        return FakeTunnel()

    def doStart(self) -> None:
        pass

    def doStop(self) -> None:
        pass


ReconnectMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestReconnectMachine = ReconnectMachine.TestCase
