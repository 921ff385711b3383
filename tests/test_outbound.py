"""
The outbound scheduler (nova.transport.outbound): flush, flush_soon, the quantum
and the blocked streams, driven by a Clock, with its invariants checked
after every step.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from nova.mux.core import Buffer, Multiplexer, Role
from nova.transport.outbound import (
    ACTIVE_WINDOW,
    QUANTUM,
    QUIET,
    RECOUNT_EVERY,
    SHARED_QUANTUM,
    TUNNEL_READ,
    OutboundScheduler,
)
from nova.wire.errors import ErrorCode
from nova.wire.frames import OpenOk

WINDOW = 1 << 20


class Writer:
    """A FrameWriter stand-in: records each write (one per flush round)."""

    tcp = None

    def __init__(self) -> None:
        self.writes: list[bytes] = []

    def write(self, out: list[Buffer]) -> None:
        self.writes.append(b"".join(bytes(b) for b in out))


class Stream:
    """A stream as the scheduler sees it (StreamEvents), resumed below half its high-water mark."""

    def __init__(self, stream_id: int, high_water: int = 65536) -> None:
        self.stream_id = stream_id
        self.high_water = high_water
        self.fins = 0
        self.resumed = 0
        self.quanta: list[int] = []

    def data_available(self, batch: bool = False) -> None: ...

    def remote_ended(self) -> None: ...

    def fin_sent(self) -> None:
        self.fins += 1

    def drained(self, queued: int) -> bool:
        if queued > self.high_water // 2:
            return True
        self.resumed += 1
        return False

    def reset_by_peer(self, code: ErrorCode) -> None: ...

    def tunnel_lost(self, reason: Failure) -> None: ...

    def quantum_changed(self, quantum: int) -> None:
        self.quanta.append(quantum)


def scheduler(clock: Clock, streams: int = 2) -> tuple[OutboundScheduler, Multiplexer, dict[int, Stream], Writer]:
    """A scheduler over a server-side multiplexer with C{streams} open streams."""
    table: dict[int, Stream] = {}
    out = OutboundScheduler(clock, table, lambda: None)
    mux = Multiplexer(Role.SERVER, WINDOW, WINDOW, 16, WINDOW)
    for _ in range(streams):
        sid = mux.open("db", 5432)
        mux.receive(OpenOk(sid))
        table[sid] = Stream(sid)
    writer = Writer()
    out.mux = mux
    out.writer = writer  # type: ignore[assignment]
    out.flush()  # the OPENs
    writer.writes.clear()
    clock.advance(1)
    return out, mux, table, writer


class ReadSize:
    """The tunnel's TCP connection, as far as its read size goes (as the tunnel set it up)."""

    bufferSize = TUNNEL_READ


class QuantumTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.out, self.mux, self.streams, self.writer = scheduler(self.clock)
        self.a, self.b = sorted(self.streams)

    def test_one_active_stream_gets_the_large_quantum(self) -> None:
        self.assertEqual(self.out.note_active(self.a, self.clock.seconds()), QUANTUM)
        self.clock.advance(RECOUNT_EVERY)
        self.assertEqual(self.out.note_active(self.a, self.clock.seconds()), QUANTUM)
        self.out._check_invariants()

    def test_two_active_streams_share_then_one_gets_it_back(self) -> None:
        self.out.note_active(self.a, self.clock.seconds())
        self.clock.advance(RECOUNT_EVERY)
        self.assertEqual(self.out.note_active(self.b, self.clock.seconds()), SHARED_QUANTUM)
        # b falls silent: once it has been quiet for ACTIVE_WINDOW, a alone is active.
        self.clock.advance(ACTIVE_WINDOW + RECOUNT_EVERY)
        self.assertEqual(self.out.note_active(self.a, self.clock.seconds()), QUANTUM)
        self.out._check_invariants()

    def test_the_tunnel_reads_as_much_while_streams_share_it(self) -> None:
        """
        The tunnel's own read size stays TUNNEL_READ when the quantum
        shrinks, so a request queued behind a bulk stream's data is found
        within two reads rather than one per shared quantum of bulk data.
        """
        tcp = ReadSize()
        self.writer.tcp = tcp  # type: ignore[assignment]
        self.out.note_active(self.a, self.clock.seconds())
        self.clock.advance(RECOUNT_EVERY)
        self.assertEqual(self.out.note_active(self.b, self.clock.seconds()), SHARED_QUANTUM)
        self.assertEqual(tcp.bufferSize, TUNNEL_READ)
        self.out._check_invariants()

    def test_active_streams_are_told_of_each_change_and_idle_ones_when_they_wake(self) -> None:
        a, b = self.streams[self.a], self.streams[self.b]
        self.out.note_active(self.a, self.clock.seconds())
        self.assertEqual(a.quanta, [QUANTUM])  # on becoming active
        self.out.note_active(self.a, self.clock.seconds())
        self.assertEqual(a.quanta, [QUANTUM])  # not on every write
        self.clock.advance(RECOUNT_EVERY)
        self.out.note_active(self.b, self.clock.seconds())
        self.assertEqual((a.quanta, b.quanta), ([QUANTUM, SHARED_QUANTUM], [SHARED_QUANTUM]))
        self.clock.advance(ACTIVE_WINDOW + RECOUNT_EVERY)
        self.out.note_active(self.a, self.clock.seconds())
        self.assertEqual((a.quanta, b.quanta), ([QUANTUM, SHARED_QUANTUM, QUANTUM], [SHARED_QUANTUM]))
        self.out.note_active(self.b, self.clock.seconds())  # b wakes: told the quantum of now
        self.assertEqual(b.quanta, [SHARED_QUANTUM, QUANTUM])

    def test_the_count_is_not_redone_within_the_recount_interval(self) -> None:
        self.out.note_active(self.a, self.clock.seconds())
        self.clock.advance(RECOUNT_EVERY / 2)
        self.assertEqual(self.out.note_active(self.b, self.clock.seconds()), QUANTUM)

    def test_a_flush_takes_about_one_quantum_of_data(self) -> None:
        self.mux.send(self.a, b"x" * (3 * QUANTUM))
        self.out.flush()
        self.assertEqual(self.out.bytes_sent, QUANTUM)
        self.assertEqual(len(self.writer.writes), 1)
        self.out._check_invariants()  # the rest is due on the next turn
        self.clock.advance(0)  # the next turns: a quantum each
        self.assertEqual(self.out.bytes_sent, 3 * QUANTUM)
        self.assertEqual(len(self.writer.writes), 3)


class QuietTimeTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.out, self.mux, self.streams, self.writer = scheduler(self.clock)
        self.a = min(self.streams)

    def test_a_write_to_a_quiet_tunnel_goes_at_once(self) -> None:
        self.mux.send(self.a, b"request")
        self.out.flush_soon()
        self.assertEqual(len(self.writer.writes), 1)
        self.assertIsNone(self.out.flush_call)
        self.out._check_invariants()

    def test_writes_soon_after_a_flush_wait_for_the_end_of_the_turn(self) -> None:
        self.mux.send(self.a, b"one")
        self.out.flush_soon()
        self.clock.advance(QUIET / 2)
        self.mux.send(self.a, b"two")
        self.out.flush_soon()
        self.mux.send(self.a, b"three")
        self.out.flush_soon()
        self.assertEqual(len(self.writer.writes), 1)
        self.out._check_invariants()
        self.clock.advance(0)
        self.assertEqual(len(self.writer.writes), 2)  # two and three in one write
        self.assertIn(b"twothree", self.writer.writes[1])
        self.out._check_invariants()

    def test_a_send_to_a_quiet_tunnel_is_written_at_once_unqueued(self) -> None:
        self.assertEqual(self.out.send(self.a, b"request", self.clock.seconds()), 0)
        self.assertEqual(len(self.writer.writes), 1)
        self.assertIn(b"request", self.writer.writes[0])
        self.assertEqual(self.mux.outbox_bytes(self.a), 0)
        self.assertEqual(self.out.bytes_sent, len(b"request"))
        self.assertFalse(self.mux.has_output())
        self.out._check_invariants()

    def test_a_send_soon_after_a_flush_is_queued_for_the_end_of_the_turn(self) -> None:
        self.out.send(self.a, b"one", self.clock.seconds())
        self.clock.advance(QUIET / 2)
        self.assertEqual(self.out.send(self.a, b"two", self.clock.seconds()), 3)
        self.assertEqual(len(self.writer.writes), 1)
        self.out.flush_soon()
        self.clock.advance(0)
        self.assertEqual(len(self.writer.writes), 2)

    def test_a_send_never_jumps_what_waits(self) -> None:
        # A control frame (a PING) waits: the write queues behind it, and one
        # flush writes both, the PING first.
        b = max(self.streams)
        self.out.paused = True
        self.mux.ping(b"12345678")
        self.mux.send(b, b"queued before")
        self.out.paused = False
        self.assertGreater(self.out.send(self.a, b"later", self.clock.seconds()), 0)
        self.assertEqual(self.writer.writes, [])
        self.out.flush()
        written = self.writer.writes[0]
        self.assertLess(written.index(b"12345678"), written.index(b"later"))
        self.assertLess(written.index(b"queued before"), written.index(b"later"))

    def test_a_send_while_the_transport_pushes_back_is_queued(self) -> None:
        self.out.paused = True
        self.assertEqual(self.out.send(self.a, b"data", self.clock.seconds()), 4)
        self.assertEqual(self.writer.writes, [])
        self.out._check_invariants()

    def test_nothing_is_written_while_the_transport_pushes_back(self) -> None:
        self.out.paused = True
        self.mux.send(self.a, b"data")
        self.mux.ping(b"12345678")
        self.out.flush_soon()
        self.clock.advance(0)
        self.assertEqual(self.writer.writes, [])
        self.out._check_invariants()
        self.out.paused = False
        self.out.flush()
        self.assertEqual(len(self.writer.writes), 1)

    def test_stop_cancels_the_pending_flush(self) -> None:
        self.mux.send(self.a, b"one")
        self.out.flush_soon()  # at once: the tunnel was quiet
        self.mux.send(self.a, b"two")
        self.out.flush_soon()  # at the end of the turn
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.out.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.out.flush_soon()
        self.out.flush()
        self.assertEqual(len(self.writer.writes), 1)


class BlockedStreamTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.out, self.mux, self.streams, self.writer = scheduler(self.clock)
        self.a, self.b = sorted(self.streams)

    def test_a_blocked_stream_resumes_once_its_queue_is_below_half(self) -> None:
        self.mux.send(self.a, b"x" * (2 * QUANTUM))
        self.out.block(self.a)
        self.out.flush()
        self.assertEqual(self.streams[self.a].resumed, 0)  # QUANTUM still queued
        self.assertEqual(self.out.blocked, {self.a})
        self.clock.advance(0)
        self.assertEqual(self.streams[self.a].resumed, 1)
        self.assertEqual(self.out.blocked, set())
        self.out._check_invariants()

    def test_a_stream_that_goes_leaves_the_blocked_set(self) -> None:
        self.out.block(self.b)
        del self.streams[self.b]
        self.assertRaises(AssertionError, self.out._check_invariants)
        self.out.unblock(self.b)
        self.out._check_invariants()

    def test_fin_sent_is_told_to_its_stream(self) -> None:
        self.mux.send(self.a, b"last")
        self.mux.close_send(self.a)
        self.out.flush()
        self.assertEqual(self.streams[self.a].fins, 1)
        self.assertEqual(self.streams[self.b].fins, 0)


class SchedulerMachine(RuleBasedStateMachine):
    """Arbitrary writes, blocks, pauses, flushes and time: the invariants hold after each step."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.out, self.mux, self.streams, self.writer = scheduler(self.clock, streams=3)
        self.sent = 0
        self.fins: set[int] = set()

    @rule(index=st.integers(0, 2), size=st.integers(1, 300_000))
    def write(self, index: int, size: int) -> None:
        sid = sorted(self.streams)[index]
        if sid in self.fins:
            return
        self.mux.send(sid, b"x" * size)
        self.sent += size
        self.out.note_active(sid, self.clock.seconds())
        self.out.flush_soon()

    @rule(index=st.integers(0, 2), size=st.one_of(st.integers(1, 2000), st.integers(1, 300_000)))
    def send(self, index: int, size: int) -> None:
        # The tunnel's write path: queued, or written at once on a quiet tunnel.
        sid = sorted(self.streams)[index]
        if sid in self.fins:
            return
        writes = len(self.writer.writes)
        queued = self.out.send(sid, b"y" * size, self.clock.seconds())
        self.sent += size
        if queued == 0:
            assert len(self.writer.writes) == writes + 1, "reported written, but nothing was written"
        elif self.out.flush_call is None:
            self.out.flush_soon()

    @rule(index=st.integers(0, 2))
    def block(self, index: int) -> None:
        self.out.block(sorted(self.streams)[index])

    @rule(index=st.integers(0, 2))
    def end(self, index: int) -> None:
        sid = sorted(self.streams)[index]
        self.fins.add(sid)
        self.mux.close_send(sid)
        self.out.flush_soon()

    @rule(paused=st.booleans())
    def transport(self, paused: bool) -> None:
        self.out.paused = paused
        if not paused:
            self.out.flush()

    @rule(seconds=st.sampled_from([0, QUIET, RECOUNT_EVERY, ACTIVE_WINDOW]))
    def advance(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def invariants_hold(self) -> None:
        self.out._check_invariants()
        assert self.out.bytes_sent <= self.sent


SchedulerMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
TestSchedulerMachine = SchedulerMachine.TestCase
