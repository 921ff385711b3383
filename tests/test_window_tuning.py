"""
Receive-window auto-tuning (issue 18, item 1): a stream's window grows
toward what its link and consumer sustain, within a maximum and two budgets,
and goes back to the initial window when idle.  No wire change: a version-1
sender takes the extra credit as ordinary WINDOW_UPDATEs.

The pure rule is tested on the multiplexer core with an explicit clock; the
tunnel in memory (iosim, Clock) shows a bulk stream's sender really gets a
window above the initial one; property tests check the flow-control
invariants under arbitrary schedules.

The tests that start processes or open real sockets are in
tests/test_window_tuning_integration.py.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from nova.agent import options as agent_options
from nova.config import ConfigError, resolve
from nova.mux.core import (
    DEFAULT_MAX_WINDOW,
    GROW_RTTS,
    IDLE_SHRINK,
    MIN_GROW_RTT,
    Role,
    WindowBudget,
)
from nova.server import options as server_options
from nova.wire.codec import FrameDecoder
from nova.wire.errors import ErrorCode
from nova.wire.frames import Data, Frame, Open, OpenOk, Ping, Pong, WindowUpdate, encode

from .reference_mux import ReferenceMultiplexer as Multiplexer  # the core plus its one-at-a-time model
from .test_tunnel import Harness, Producer

INITIAL = 65_536
MAX = 1_048_576
RTT = 0.05


def _frames(mux: Multiplexer) -> list[Frame]:
    """Everything the multiplexer has to send, control frames first."""
    frames: list[Frame] = []
    while (frame := mux.next_frame()) is not None:
        frames.append(frame)
    return frames


def _updates(frames: list[Frame]) -> list[int]:
    return [f.increment for f in frames if isinstance(f, WindowUpdate)]


class Receiver:
    """An agent multiplexer with one open stream, fed DATA by a sender that honours its credit."""

    def __init__(
        self,
        max_window: int | None = MAX,
        tunnel_budget: int = 64 * MAX,
        budget: WindowBudget | None = None,
        streams: int = 1,
    ) -> None:
        self.mux = Multiplexer(
            Role.AGENT, INITIAL, INITIAL, max_window=max_window, tunnel_budget=tunnel_budget, budget=budget
        )
        self.credit: dict[int, int] = {}
        for sid in range(1, streams + 1):
            self.mux.receive(Open(sid, "db", 5432))
            self.mux.accept(sid)
            self.credit[sid] = INITIAL
        _frames(self.mux)  # the OPEN_OKs

    def send(self, sid: int, n: int) -> int:
        """The peer sends up to C{n} bytes, as its credit allows; returns how many."""
        n = min(n, self.credit[sid])
        if n:
            assert self.mux.receive_data(sid, [b"x" * n], n) is True
            self.credit[sid] -= n
        return n

    def take(self, sid: int, now: float) -> int:
        """The consumer takes everything waiting; the credit it frees reaches the peer."""
        taken = sum(map(len, self.mux.take_upto(sid, 1 << 40, now)))
        for f in _frames(self.mux):
            if isinstance(f, WindowUpdate):
                self.credit[f.stream_id] += f.increment
        return taken

    def window_round(self, sid: int, now: float) -> None:
        """One round trip: the peer sends all its credit, the consumer takes it at once."""
        self.send(sid, self.credit[sid])
        self.take(sid, now)


class GrowthTests(SynchronousTestCase):
    def test_off_by_default(self) -> None:
        """Without a maximum above the initial window, nothing changes: credit in halves of the window."""
        r = Receiver(max_window=None)
        r.mux.rtt_sample(RTT)
        updates: list[int] = []
        for i in range(20):
            r.send(1, INITIAL // 2)
            r.mux.take_upto(1, 1 << 40, i * 0.001)
            updates += _updates(_frames(r.mux))
        self.assertEqual(set(updates), {INITIAL // 2})
        self.assertEqual(r.mux.window(1), INITIAL)

    def test_grows_when_a_full_window_is_drained_within_two_rtts(self) -> None:
        r = Receiver()
        r.mux.rtt_sample(RTT)
        t = 0.0
        r.window_round(1, t)  # the first take starts the epoch
        grants = []
        for _ in range(10):
            t += RTT  # the peer is window-limited: one window per round trip
            r.window_round(1, t)
            grants.append(r.mux.window(1))
            r.mux.check_invariants()
        self.assertEqual(grants[:4], [2 * INITIAL, 4 * INITIAL, 8 * INITIAL, 16 * INITIAL])
        self.assertEqual(r.mux.window(1), MAX)
        # The peer holds the grown window as credit: a version-1 sender sends that much.
        self.assertEqual(r.credit[1], MAX)
        self.assertEqual(r.mux.budget_used, MAX - INITIAL)

    def test_no_growth_when_the_consumer_is_slow(self) -> None:
        """A window that takes more than two round trips to drain is big enough."""
        r = Receiver()
        r.mux.rtt_sample(RTT)
        t = 0.0
        for _ in range(20):
            t += GROW_RTTS * RTT * 1.01
            r.window_round(1, t)
        self.assertEqual(r.mux.window(1), INITIAL)
        self.assertEqual(r.mux.budget_used, 0)

    def test_no_growth_for_a_reader_that_does_not_read(self) -> None:
        """The slow-reader rule: bytes not taken return no credit and grow nothing."""
        r = Receiver()
        r.mux.rtt_sample(RTT)
        self.assertEqual(r.send(1, 10 * INITIAL), INITIAL)
        self.assertEqual(r.send(1, 1), 0)
        self.assertEqual(_frames(r.mux), [])
        self.assertEqual(r.mux.window(1), INITIAL)
        self.assertEqual(r.mux.inbox_bytes(1), INITIAL)

    def test_no_growth_on_a_sub_millisecond_link(self) -> None:
        """Loopback or a LAN: the initial window is not the limit, however fast windows drain."""
        r = Receiver()
        r.mux.rtt_sample(MIN_GROW_RTT * 0.9)
        for i in range(20):
            r.window_round(1, i * 0.00001)
        self.assertEqual(r.mux.window(1), INITIAL)
        r.mux.rtt_sample(MIN_GROW_RTT * 0.5)  # and the smallest sample counts
        r.mux.rtt_sample(MIN_GROW_RTT * 2)
        r.window_round(1, 1.0)
        self.assertEqual(r.mux.window(1), INITIAL)

    def test_without_an_rtt_it_asks_for_one(self) -> None:
        r = Receiver()
        for i in range(5):
            r.window_round(1, i * 0.001)
        self.assertTrue(r.mux.rtt_wanted)
        self.assertEqual(r.mux.window(1), INITIAL)
        r.mux.rtt_sample(RTT)
        self.assertFalse(r.mux.rtt_wanted)
        r.window_round(1, 0.005)
        self.assertEqual(r.mux.window(1), 2 * INITIAL)

    def test_the_smallest_rtt_counts(self) -> None:
        """A PING that waited behind bulk DATA measures the queue, not the link."""
        mux = Multiplexer(Role.AGENT, INITIAL, INITIAL, max_window=MAX)
        mux.rtt_sample(0.05)
        mux.rtt_sample(0.5)
        self.assertEqual(mux.rtt, 0.05)
        mux.rtt_sample(0.02)
        self.assertEqual(mux.rtt, 0.02)

    def test_the_growth_is_granted_with_the_consumed_credit(self) -> None:
        r = Receiver()
        r.mux.rtt_sample(RTT)
        r.window_round(1, 0.0)
        r.send(1, INITIAL)
        r.mux.take_upto(1, 1 << 40, 0.01)
        # The window just consumed plus the growth (one more window), in one update.
        self.assertEqual(_updates(_frames(r.mux)), [INITIAL + INITIAL])


class BudgetTests(SynchronousTestCase):
    def test_tunnel_budget_bounds_all_streams(self) -> None:
        r = Receiver(tunnel_budget=3 * INITIAL, streams=3)
        r.mux.rtt_sample(RTT)
        for i in range(8):
            for sid in (1, 2, 3):
                r.window_round(sid, i * 0.01)
            r.mux.check_invariants()
        self.assertEqual(r.mux.budget_used, 3 * INITIAL)
        self.assertEqual(sum(r.mux.window(s) - INITIAL for s in (1, 2, 3)), 3 * INITIAL)
        # A stream that ends gives its share back; another may then grow.
        grown = next(s for s in (1, 2, 3) if r.mux.window(s) > INITIAL)
        r.mux.reset(grown, ErrorCode.CANCEL)
        self.assertLess(r.mux.budget_used, 3 * INITIAL)
        r.mux.check_invariants()

    def test_process_budget_is_shared_by_tunnels(self) -> None:
        budget = WindowBudget(4 * INITIAL)
        a, b = Receiver(budget=budget), Receiver(budget=budget)
        for r in (a, b):
            r.mux.rtt_sample(RTT)
        for i in range(8):
            a.window_round(1, i * 0.01)
            b.window_round(1, i * 0.01)
        self.assertEqual(budget.used, 4 * INITIAL)
        self.assertEqual(a.mux.budget_used + b.mux.budget_used, 4 * INITIAL)
        a.mux.release()  # a's tunnel is gone
        self.assertEqual(budget.used, b.mux.budget_used)
        b.mux.reset(1, ErrorCode.CANCEL)
        self.assertEqual(budget.used, 0)

    def test_release_is_idempotent(self) -> None:
        budget = WindowBudget(4 * INITIAL)
        r = Receiver(budget=budget)
        r.mux.rtt_sample(RTT)
        for i in range(4):
            r.window_round(1, i * 0.01)
        self.assertGreater(budget.used, 0)
        r.mux.release()
        r.mux.release()
        r.mux.reset(1, ErrorCode.CANCEL)
        self.assertEqual(budget.used, 0)


class IdleTests(SynchronousTestCase):
    def test_idle_stream_goes_back_to_the_initial_window(self) -> None:
        budget = WindowBudget()
        r = Receiver(budget=budget)
        r.mux.rtt_sample(RTT)
        t = 0.0
        for _ in range(6):
            r.window_round(1, t)
            t += 0.01
        grown = r.mux.window(1)
        self.assertGreater(grown, INITIAL)
        # Idle: nothing is taken for IDLE_SHRINK seconds.  The peer's credit
        # cannot be taken back, but what it sends is not credited again until
        # the window is back to the initial one.
        t += IDLE_SHRINK
        r.send(1, INITIAL // 4)
        r.take(1, t)
        while r.mux.window(1) > INITIAL:
            before = r.mux.window(1)
            t += 1.0  # slow again: no growth
            r.send(1, r.credit[1])
            r.take(1, t)
            self.assertLess(r.mux.window(1), before)
            r.mux.check_invariants()
        self.assertEqual(r.mux.window(1), INITIAL)
        self.assertEqual(budget.used, 0)
        self.assertEqual(r.credit[1] + r.mux.inbox_bytes(1) + r.mux._streams[1].unreturned, INITIAL)


class TunnelTests(SynchronousTestCase):
    """The tunnel in memory: NOVAS sends bulk, NOVAC's consumer keeps up."""

    def test_bulk_stream_gets_more_than_the_initial_window(self) -> None:
        """
        On a link with a round trip, a fast consumer's stream window grows,
        so the sender has more than the initial window in flight (before:
        never more than the initial window, whatever the link).
        """
        window = 65536
        h = Harness(window=window)
        stream, _user, target_transport, _ = h.open()
        assert h.server.mux is not None and h.agent.mux is not None
        # A 50 ms round trip, as a keepalive PING from NOVAC measures it.
        h.agent.send_ping()
        h.clock.advance(0.05)
        h.flush()
        self.assertEqual(h.agent.rtt, 0.05)
        payload = bytes(range(256)) * 4096  # 1 MiB
        most_in_flight = 0
        for i in range(0, len(payload), 16384):
            stream.write(payload[i : i + 16384])
            most_in_flight = max(most_in_flight, h.server.mux.send_window(stream.stream_id))
            h.flush()
            h.clock.advance(0.001)
        h.flush()
        self.assertEqual(target_transport.value(), payload)
        self.assertGreater(most_in_flight, window)
        self.assertLessEqual(h.agent.mux.window(stream.stream_id), h.agent.max_window)

    def test_rtt_is_measured_at_registration_and_on_demand(self) -> None:
        """
        NOVAS measures HELLO to AUTH; NOVAC pings once registered, while the
        tunnel is idle.  Without a measurement, the first full window drained
        sends a PING.
        """
        h = Harness(window=65536)
        self.assertEqual(h.agent.rtt_probes, 1)
        self.assertEqual(h.server.rtt_probes, 0)
        # In memory the clock does not move: a zero round trip is no
        # measurement, so the multiplexers still want one.
        assert h.agent.mux is not None and h.server.mux is not None
        self.assertIsNone(h.agent.mux.rtt)
        self.assertIsNone(h.agent.rtt)  # the reported RTT is the keepalive's
        stream, _user, target_transport, _ = h.open()
        for _ in range(8):
            stream.write(b"y" * 65536)
            h.clock.advance(0.01)
            h.flush()
        self.assertEqual(len(target_transport.value()), 8 * 65536)
        self.assertGreater(h.agent.rtt_probes, 1)
        self.assertEqual(h.server.rtt_probes, 0)  # it sent nothing, it needs no window

    def test_handshake_and_probe_samples_feed_only_the_multiplexer(self) -> None:
        h = Harness(window=65536)
        assert h.server.mux is not None
        # HELLO went out at 0; pretend AUTH took 30 ms.
        h.server._hello_sent_at = -0.03
        self.assertIsNone(h.server.rtt)
        h.server.rtt_measured(h.clock.seconds() - h.server._hello_sent_at, keepalive=False)
        self.assertEqual(h.server.mux.rtt, 0.03)
        self.assertIsNone(h.server.rtt)

    def test_slow_target_never_holds_more_than_the_initial_window(self) -> None:
        window = 65536
        h = Harness(window=window)
        stream, _user, target_transport, _ = h.open()
        h.agent.send_ping()
        h.clock.advance(0.05)
        h.flush()
        producer = Producer()
        stream.registerProducer(producer, True)
        agent_stream = h.agent.streams[stream.stream_id]
        agent_stream.pauseProducing()
        for _ in range(64):
            stream.write(b"z" * 16384)
            h.flush()
        assert h.agent.mux is not None
        self.assertTrue(producer.paused)
        self.assertEqual(target_transport.value(), b"")
        self.assertEqual(h.agent.mux.inbox_bytes(stream.stream_id), window)
        self.assertEqual(h.agent.mux.window(stream.stream_id), window)

    def test_connection_loss_gives_the_budget_back(self) -> None:
        h = Harness(window=65536)
        budget = WindowBudget()
        h.agent.window_budget = budget
        h.server.window_budget = budget
        # The harness registered before the budget was swapped: reconnect-free check on a new mux.
        assert h.agent.mux is not None
        h.agent.mux.budget = budget
        stream, _user, _target, _ = h.open()
        h.agent.send_ping()
        h.clock.advance(0.05)
        h.flush()
        for _ in range(16):
            stream.write(b"w" * 65536)
            h.flush()
            h.clock.advance(0.001)
        self.assertGreater(budget.used, 0)
        h.server_tls.transport.loseConnection()  # type: ignore[union-attr]
        h.flush()
        self.assertEqual(budget.used, 0)


# Property tests: any schedule of DATA, consumption, clock and RTT samples.

_op = st.one_of(
    st.tuples(st.just("send"), st.integers(1, 3), st.integers(1, 3 * INITIAL)),
    st.tuples(st.just("take"), st.integers(1, 3), st.integers(1, 4 * INITIAL)),
    st.tuples(st.just("wait"), st.integers(0, 3), st.floats(0, 2 * IDLE_SHRINK)),
    st.tuples(st.just("rtt"), st.integers(0, 3), st.floats(0.0001, 0.2)),
    st.tuples(st.just("rtt"), st.integers(0, 3), st.floats(MIN_GROW_RTT, 0.2)),
    st.tuples(st.just("reset"), st.integers(1, 3), st.integers(0, 0)),
)


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.lists(_op, max_size=80), st.integers(1, 8), st.integers(0, 12))
    def test_invariants_under_any_schedule(self, ops: list[tuple[str, int, float]], maxmul: int, budg: int) -> None:
        process = WindowBudget(budg * INITIAL)
        r = Receiver(max_window=INITIAL * maxmul, tunnel_budget=(budg + 1) * INITIAL // 2, budget=process, streams=3)
        granted = {sid: INITIAL for sid in r.credit}  # initial window + every increment sent
        received = {sid: 0 for sid in r.credit}
        consumed = {sid: 0 for sid in r.credit}
        now = 0.0
        for op, sid, arg in ops:
            if op == "send" and sid in r.mux:
                received[sid] += r.send(sid, int(arg))
                # Receiving never queues credit.
                self.assertEqual(_updates(_frames(r.mux)), [])
            elif op == "take" and sid in r.mux:
                chunks = r.mux.take_upto(sid, int(arg), now)
                consumed[sid] += sum(map(len, chunks))
                for f in _frames(r.mux):
                    if isinstance(f, WindowUpdate):
                        self.assertIn(f.stream_id, r.credit)
                        r.credit[f.stream_id] += f.increment
                        granted[f.stream_id] += f.increment
                        self.assertLessEqual(r.credit[f.stream_id], 2**31 - 1)
            elif op == "wait":
                now += arg
            elif op == "rtt":
                r.mux.rtt_sample(arg)
            elif op == "reset" and sid in r.mux:
                r.mux.reset(sid, ErrorCode.CANCEL)
                _frames(r.mux)
            r.mux.check_invariants()
            for s in r.mux.stream_ids:
                # The receiver holds no more than it granted, and the peer's
                # credit is exactly what was granted minus what it sent.
                self.assertEqual(r.credit[s], granted[s] - received[s])
                self.assertLessEqual(r.mux.inbox_bytes(s), r.mux.window(s))
                self.assertGreaterEqual(r.mux.window(s), INITIAL)
                self.assertLessEqual(r.mux.window(s), INITIAL * max(1, maxmul))
                # Credit beyond the initial window comes only from consumption or growth.
                self.assertLessEqual(granted[s] - INITIAL, consumed[s] + r.mux.window(s) - INITIAL)
            self.assertLessEqual(r.mux.budget_used, r.mux.tunnel_budget)
            self.assertLessEqual(process.used, process.limit)
            self.assertEqual(process.used, r.mux.budget_used)
        r.mux.release()
        self.assertEqual(process.used, 0)


class WireTests(SynchronousTestCase):
    """Version 1 on the wire: the grown window is ordinary credit to an unchanged sender."""

    def test_version1_sender_uses_the_grown_window(self) -> None:
        server = Multiplexer(Role.SERVER, INITIAL, INITIAL)  # no tuning: today's sender
        agent = Multiplexer(Role.AGENT, INITIAL, INITIAL, max_window=MAX)
        agent.rtt_sample(RTT)

        def deliver(src: Multiplexer, dst: Multiplexer) -> list[Frame]:
            frames = []
            while (sent := src.next_frame()) is not None:
                (f,) = FrameDecoder().feed(b"".join(bytes(p) for p in encode(sent)))
                frames.append(f)
                if isinstance(f, Data):
                    dst.receive_data(f.stream_id, [f.data], len(f.data))
                else:
                    dst.receive(f)
            return frames

        sid = server.open("db", 5432)
        deliver(server, agent)
        agent.accept(sid)
        deliver(agent, server)
        server.send(sid, b"d" * (8 * MAX))
        t = 0.0
        for _ in range(40):
            deliver(server, agent)
            agent.take_upto(sid, 1 << 40, t)
            deliver(agent, server)
            t += 0.01
        self.assertEqual(server.send_window(sid) + agent.inbox_bytes(sid), agent.window(sid))
        self.assertEqual(agent.window(sid), MAX)
        self.assertEqual(server.outbox_bytes(sid), 0)

    def test_ping_pong_unchanged(self) -> None:
        mux = Multiplexer(Role.AGENT, INITIAL, INITIAL, max_window=MAX)
        mux.receive(Ping(b"12345678"))
        self.assertEqual(_frames(mux), [Pong(b"12345678")])
        self.assertNotIn(OpenOk, map(type, _frames(mux)))


class SettingTests(SynchronousTestCase):
    """--max-window on each side: default 16 MiB, never below --window, refused in one line naming it."""

    def _server(self, **env: str) -> Any:
        base = {"NOVAS_AGENT_TOKEN": "agent-token-1234"}
        return server_options.build_config(resolve(server_options.SETTINGS, {}, base | env))

    def _agent(self, **env: str) -> Any:
        base = {"NOVAC_SERVER": "novas.test:9022", "NOVAC_TOKEN": "a-long-enough-token", "NOVAC_TLS": "off"}
        return agent_options.build_config(resolve(agent_options.SETTINGS, {}, base | env))

    def test_defaults(self) -> None:
        self.assertEqual(self._server().max_window, DEFAULT_MAX_WINDOW)
        self.assertEqual(self._agent().max_window, DEFAULT_MAX_WINDOW)
        self.assertEqual(DEFAULT_MAX_WINDOW, 16 << 20)
        self.assertEqual(self._server(NOVAS_MAX_WINDOW="262144").max_window, 262144)
        self.assertEqual(self._agent(NOVAC_MAX_WINDOW="4194304").max_window, 4194304)

    def test_below_the_window_is_refused(self) -> None:
        for build, side in ((self._server, "NOVAS"), (self._agent, "NOVAC")):
            with self.assertRaises(ConfigError) as raised:
                build(**{f"{side}_WINDOW": "1048576", f"{side}_MAX_WINDOW": "524288"})
            message = str(raised.exception)
            self.assertIn(
                f"--max-window / {side}_MAX_WINDOW (524288) must be at least --window / {side}_WINDOW", message
            )
            self.assertEqual(len(message.splitlines()), 1)
            with self.assertRaises(ConfigError) as raised:
                build(**{f"{side}_MAX_WINDOW": str(2**31)})
            self.assertIn(f"--max-window / {side}_MAX_WINDOW must be between", str(raised.exception))

    def test_contexts_carry_it_to_the_tunnels(self) -> None:
        h = Harness(window=65536)
        self.assertEqual(h.agent.max_window, DEFAULT_MAX_WINDOW)
        self.assertEqual(h.server.max_window, DEFAULT_MAX_WINDOW)
        assert h.agent.mux is not None and h.server.mux is not None
        self.assertEqual(h.agent.mux.max_window, DEFAULT_MAX_WINDOW)
        self.assertEqual(h.server.mux.max_window, DEFAULT_MAX_WINDOW)


# Real processes on loopback.
