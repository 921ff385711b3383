"""
Control replies are bounded (issue 14, defect 2), in memory: the
multiplexer counts the replies it holds and refuses a flood; the tunnel
holds control frames while its transport pushes back, stops reading once
replies pile up, sends GOAWAY CONTROL_FLOOD past the bound, and carries an
honest peer's keepalive and window updates again once the push-back ends.
"""

from __future__ import annotations

from dataclasses import replace

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase

from nova.mux.core import MAX_QUEUED_REPLIES, Buffer, Role
from nova.mux.defaults import DEFAULT_MAX_STREAMS
from nova.transport.tunnel import CLOSE_TIMEOUT, READ_PAUSE_REPLIES, TunnelProtocol
from nova.wire.codec import FrameDecoder
from nova.wire.errors import ControlFlood, ErrorCode, OpenFailReason
from nova.wire.frames import Data, Frame, GoAway, Open, OpenFail, OpenOk, Ping, Pong, WindowUpdate

from .contexts import AGENT_CONFIG
from .reference_mux import ReferenceMultiplexer as Multiplexer  # the core plus its one-at-a-time model
from .strategies import wire
from .test_tunnel import Recorder

WINDOW = 65536
KEEPALIVE = 15.0


def pings(n: int, start: int = 0) -> bytes:
    return wire(*(Ping(i.to_bytes(8, "big")) for i in range(start, start + n)))


def decode(data: bytes) -> list[Frame]:
    return FrameDecoder().feed(data)


def pulled(mux: Multiplexer, data_allowed: bool = True, control_allowed: bool = True) -> list[Frame]:
    out: list[Buffer] = []
    mux.pull(out, 10**9, data_allowed, control_allowed)
    return decode(b"".join(bytes(p) for p in out))


# The multiplexer ----------------------------------------------------------------


class ReplyCountTests(SynchronousTestCase):
    def test_pongs_are_counted_until_pulled(self) -> None:
        mux = Multiplexer(Role.SERVER, WINDOW, WINDOW)
        for i in range(10):
            mux.receive(Ping(i.to_bytes(8, "big")))
        mux.ping(b"ourping!")  # our own PING is not a reply
        self.assertEqual(mux.queued_replies, 10)
        self.assertEqual(mux.queued_control, 11)
        self.assertEqual(pulled(mux, control_allowed=False), [])
        self.assertEqual(mux.queued_replies, 10)
        frames = pulled(mux)
        self.assertEqual(len(frames), 11)
        self.assertEqual(mux.queued_replies, 0)

    def test_open_answers_are_replies(self) -> None:
        mux = Multiplexer(Role.AGENT, WINDOW, WINDOW, max_streams=2)
        for sid in (1, 2, 3):  # the third is over the limit: OPEN_FAIL OVERLOADED at once
            mux.receive(Open(sid, "target", 80))
        self.assertEqual(mux.queued_replies, 1)
        mux.accept(1)
        mux.refuse(2, OpenFailReason.DENIED, "no")
        self.assertEqual(mux.queued_replies, 3)
        self.assertIsInstance(mux.next_frame(), OpenFail)
        self.assertEqual(mux.queued_replies, 2)
        self.assertEqual([type(f) for f in pulled(mux)], [OpenOk, OpenFail])
        self.assertEqual(mux.queued_replies, 0)

    def test_a_ping_past_the_bound_is_a_control_flood(self) -> None:
        mux = Multiplexer(Role.SERVER, WINDOW, WINDOW)
        for i in range(MAX_QUEUED_REPLIES):
            mux.receive(Ping(i.to_bytes(8, "big")))
        with self.assertRaises(ControlFlood) as caught:
            mux.receive(Ping(b"one more"))
        self.assertEqual(caught.exception.code, ErrorCode.CONTROL_FLOOD)
        self.assertEqual(mux.queued_replies, MAX_QUEUED_REPLIES)  # checked before anything was queued
        pulled(mux)
        mux.receive(Ping(b"room now"))  # once written, the peer may ping again
        self.assertEqual(mux.queued_replies, 1)

    def test_an_open_past_the_bound_is_a_control_flood(self) -> None:
        mux = Multiplexer(Role.AGENT, WINDOW, WINDOW)
        for i in range(MAX_QUEUED_REPLIES):
            mux.receive(Ping(i.to_bytes(8, "big")))
        with self.assertRaises(ControlFlood):
            mux.receive(Open(1, "target", 80))
        self.assertEqual(mux.stream_ids, [])


@given(
    st.lists(
        st.sampled_from(["ping", "open", "accept", "refuse", "local_ping", "pull", "pull_held", "next"]),
        max_size=60,
    )
)
def test_queued_replies_is_the_number_of_replies_waiting(ops: list[str]) -> None:
    """Whatever the order of frames and pulls, the count matches what is queued."""
    mux = Multiplexer(Role.AGENT, WINDOW, WINDOW, max_streams=4)
    next_id = 1
    waiting: list[int] = []  # streams requested, not yet answered
    for op in ops:
        if op == "ping":
            mux.receive(Ping(b"12345678"))
        elif op == "open":
            if mux.receive(Open(next_id, "t", 1)):
                waiting.append(next_id)
            next_id += 1
        elif op == "accept" and waiting:
            mux.accept(waiting.pop(0))
        elif op == "refuse" and waiting:
            mux.refuse(waiting.pop(0), OpenFailReason.REFUSED, "no")
        elif op == "local_ping":
            mux.ping(b"87654321")
        elif op in ("pull", "pull_held"):
            frames = pulled(mux, control_allowed=op == "pull")
            assert op == "pull" or frames == []
        elif op == "next":
            mux.next_frame()
        queued = [f for f in mux._control or () if isinstance(f, (Pong, OpenOk, OpenFail))]
        assert mux.queued_replies == len(queued)
    pulled(mux)
    assert mux.queued_replies == 0


# The tunnel ---------------------------------------------------------------------


class Bare(TunnelProtocol):
    """A tunnel past its handshake at once (the handshake is not what is tested)."""

    role = Role.AGENT

    def __init__(self, clock: Clock) -> None:
        timing = replace(AGENT_CONFIG.timing(), keepalive=KEEPALIVE, dead_timeout=3 * KEEPALIVE)
        super().__init__(clock, WINDOW, timing, WINDOW)
        self.recorders: dict[int, Recorder] = {}

    def handshake_started(self) -> None:
        self.start_streams(WINDOW, DEFAULT_MAX_STREAMS)

    def stream_requested(self, stream_id: int, host: str, port: int) -> None:
        assert self.mux is not None
        self.mux.accept(stream_id)
        self.recorders[stream_id] = Recorder()
        self.add_stream(stream_id, host, port).makeConnection(self.recorders[stream_id])


class TunnelFloodTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.clock = Clock()
        self.transport = StringTransport()
        self.tunnel = Bare(self.clock)
        self.tunnel.makeConnection(self.transport)
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def written(self) -> list[Frame]:
        frames = decode(self.transport.value())
        self.transport.clear()
        return frames

    def log_text(self) -> str:
        return "\n".join(formatEvent(e) for e in self.logged)

    def test_no_push_back_every_ping_is_answered_and_reading_goes_on(self) -> None:
        self.tunnel.dataReceived(pings(1000))
        self.clock.advance(0)
        self.assertEqual(len(self.written()), 1000)
        self.assertEqual(self.transport.producerState, "producing")

    def test_flood_while_pushed_back_pauses_reading_then_goaway_past_the_bound(self) -> None:
        tunnel, transport = self.tunnel, self.transport
        tunnel.pauseProducing()  # the peer does not read: the transport's buffer is full
        tunnel.dataReceived(pings(READ_PAUSE_REPLIES - 1))
        self.clock.advance(0)
        self.assertEqual(transport.value(), b"")  # the PONGs wait in the multiplexer
        self.assertEqual(transport.producerState, "producing")
        tunnel.dataReceived(pings(1, READ_PAUSE_REPLIES))
        self.assertEqual(transport.producerState, "paused")  # we stopped reading from the peer
        self.assertTrue(tunnel.reading_paused)
        self.assertEqual(transport.value(), b"")
        # A transport that delivers anyway (the rest of a read; or one that
        # ignores the pause): the queued answers stay bounded.
        sent = READ_PAUSE_REPLIES
        while not transport.disconnecting and sent < 2 * MAX_QUEUED_REPLIES:
            tunnel.dataReceived(pings(1000, sent))
            sent += 1000
        self.assertTrue(transport.disconnecting)
        assert tunnel.mux is not None
        self.assertLessEqual(tunnel.mux.queued_replies, MAX_QUEUED_REPLIES)
        frames = self.written()
        self.assertEqual(len(frames), MAX_QUEUED_REPLIES + 1)  # held PONGs first, GOAWAY last
        last = frames[-1]
        assert isinstance(last, GoAway)
        self.assertEqual(last.code, ErrorCode.CONTROL_FLOOD)
        self.assertTrue(all(isinstance(f, Pong) for f in frames[:-1]))
        text = self.log_text()
        self.assertEqual(text.count("paused"), 1)
        self.assertEqual(text.count("protocol error"), 1)
        self.assertIn("CONTROL_FLOOD", text)
        # More frames after the GOAWAY are ignored, not answered.
        tunnel.dataReceived(pings(100))
        self.assertEqual(transport.value(), b"")
        # The flooder does not read even the GOAWAY: the connection is aborted.
        self.assertFalse(transport.disconnected)
        self.clock.advance(CLOSE_TIMEOUT)
        self.assertTrue(transport.disconnected)
        self.assertIn("it did not read what was sent before closing", self.log_text())

    def test_honest_keepalive_and_window_updates_flow_after_the_push_back_ends(self) -> None:
        tunnel, transport = self.tunnel, self.transport
        tunnel.dataReceived(wire(Open(1, "target", 80)))
        self.clock.advance(0)
        self.assertEqual(self.written(), [OpenOk(1)])
        tunnel.pauseProducing()
        payload = b"x" * (WINDOW // 2 + 1)
        tunnel.dataReceived(wire(Data(1, payload)))
        self.assertEqual(tunnel.recorders[1].received, payload)  # consumed: its credit is due
        tunnel.dataReceived(pings(100))
        self.clock.advance(0)
        self.assertEqual(transport.value(), b"")  # everything waits, in order
        self.assertEqual(transport.producerState, "paused")
        tunnel.resumeProducing()  # the peer read; the transport takes more
        self.assertEqual(transport.producerState, "producing")
        self.assertFalse(tunnel.reading_paused)
        frames = self.written()
        self.assertEqual(frames[0], WindowUpdate(1, len(payload)))
        self.assertEqual(frames[1:], [Pong(i.to_bytes(8, "big")) for i in range(100)])
        # Keepalive: our PING goes out when due, and the peer's is answered at once.
        self.clock.advance(KEEPALIVE)
        self.assertEqual([type(f) for f in self.written()], [Ping])
        tunnel.dataReceived(pings(1, 500))
        self.clock.advance(0)
        self.assertEqual(self.written(), [Pong((500).to_bytes(8, "big"))])
        # And more DATA is carried and credited as before.
        tunnel.dataReceived(wire(Data(1, payload)))
        self.clock.advance(0)
        self.assertEqual(self.written(), [WindowUpdate(1, len(payload))])
        self.assertNotIn("protocol error", self.log_text())

    def test_goaway_of_a_drain_goes_out_even_while_pushed_back(self) -> None:
        self.tunnel.pauseProducing()
        self.tunnel.drain(30.0, ErrorCode.SHUTDOWN, "bye")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.written(), [GoAway(ErrorCode.SHUTDOWN, "bye")])

    def test_a_flooder_kept_paused_is_dropped_by_the_dead_peer_check(self) -> None:
        self.tunnel.pauseProducing()
        self.tunnel.dataReceived(pings(READ_PAUSE_REPLIES))
        self.assertTrue(self.tunnel.reading_paused)
        self.clock.advance(3 * KEEPALIVE)  # nothing heard: we do not read
        self.assertTrue(self.transport.disconnected)
        self.assertIn("did not read the 64 answers to its own frames", self.log_text())
