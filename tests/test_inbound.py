"""
The inbound delivery (nova.mux.inbound): frames from the decoder to the
multiplexer and on to the streams, batched per read, with its invariants
checked; and ReadBatches as the declared interface the raw TLS path uses.
"""

from __future__ import annotations

import sys

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from nova.mux.core import Buffer, Multiplexer, OpenRefused, Role
from nova.mux.inbound import InboundDelivery, ReadBatches
from nova.transport.tunnel import TunnelProtocol
from nova.wire.codec import FrameDecoder
from nova.wire.errors import ErrorCode
from nova.wire.frames import Data, OpenOk, encode

from .contexts import AGENT_CONFIG

WINDOW = 1 << 20


class Stream:
    """Records what the delivery tells it (StreamEvents), in order."""

    def __init__(self, stream_id: int, log: list[tuple[int, str]]) -> None:
        self.stream_id = stream_id
        self.log = log
        self.batch_flags: list[bool] = []  # data_available's batch argument, each time

    def data_available(self, batch: bool = False) -> None:
        self.log.append((self.stream_id, "data"))
        self.batch_flags.append(batch)

    def remote_ended(self) -> None:
        self.log.append((self.stream_id, "fin"))

    def fin_sent(self) -> None: ...

    def drained(self, queued: int) -> bool:
        return False

    def reset_by_peer(self, code: ErrorCode) -> None:
        self.log.append((self.stream_id, f"rst {code.name}"))

    def tunnel_lost(self, reason: Failure) -> None: ...

    def quantum_changed(self, quantum: int) -> None: ...


class Hooks:
    """DeliveryHooks: records the tunnel-level events."""

    def __init__(self) -> None:
        self.events: list[object] = []
        self.reads_ended = 0

    def stream_requested(self, stream_id: int, host: str, port: int) -> None:
        self.events.append(("requested", stream_id, host, port))

    def stream_opened(self, stream_id: int) -> None:
        self.events.append(("opened", stream_id))

    def stream_refused(self, stream_id: int, event: OpenRefused) -> None:
        self.events.append(("refused", stream_id))

    def pong_received(self, opaque: bytes) -> None:
        self.events.append(("pong", opaque))

    def goaway_received(self, code: ErrorCode, message: str) -> None:
        self.events.append(("goaway", code))

    def members_received(self, members: tuple[str, ...]) -> None:
        self.events.append(("members", members))

    def read_ended(self) -> None:
        self.reads_ended += 1


def wire(mux: Multiplexer) -> bytes:
    out: list[Buffer] = []
    mux.pull(out, 1 << 30)
    return b"".join(bytes(b) for b in out)


class DeliveryTests(SynchronousTestCase):
    def setUp(self) -> None:
        # A server multiplexer sends to an agent-side delivery.
        self.server = Multiplexer(Role.SERVER, WINDOW, WINDOW, 16, WINDOW)
        self.agent = Multiplexer(Role.AGENT, WINDOW, WINDOW, 16, WINDOW)
        self.log: list[tuple[int, str]] = []
        self.streams: dict[int, Stream] = {}
        self.hooks = Hooks()
        self.inbound = InboundDelivery(self.streams, self.hooks)
        self.inbound.mux = self.agent
        self.decoder = FrameDecoder()
        self.sids = [self.server.open("db", 5432) for _ in range(2)]
        self.feed(wire(self.server))
        for sid in self.sids:
            self.agent.accept(sid)
            self.server.receive(OpenOk(sid))
            self.streams[sid] = Stream(sid, self.log)
        self.hooks.events.clear()

    def feed(self, data: bytes) -> None:
        self.decoder.feed_into(data, self.inbound.data_received, self.inbound.frame_received)

    def test_outside_a_batch_a_stream_is_told_as_its_data_arrives(self) -> None:
        a, b = self.sids
        self.server.send(a, b"x" * 40_000)  # three DATA frames, then b's
        self.server.send(b, b"y")
        frames = wire(self.server)
        self.feed(frames[:100])  # a's first frame is not in yet
        self.assertEqual(self.log, [])
        self.feed(frames[100:])
        self.assertEqual(self.log, [(a, "data"), (b, "data")])  # told once: a's inbox was no longer empty
        # Told outside a batch: the stream itself asks what waits and sends the credit.
        self.assertEqual([f for sid in self.sids for f in self.streams[sid].batch_flags], [False, False])
        self.inbound._check_invariants()

    def test_in_a_batch_each_stream_is_told_once_at_the_end(self) -> None:
        a, b = self.sids
        self.server.send(a, b"x" * 40_000)
        self.server.send(b, b"y" * 40_000)
        self.inbound.begin_read()
        self.feed(wire(self.server))
        self.inbound._check_invariants(in_batch=True)
        self.assertEqual(self.log, [])
        self.inbound.end_read()
        self.assertEqual(sorted(self.log), [(a, "data"), (b, "data")])
        # Told in the batch: its end (read_ended) sends the credit.
        self.assertEqual([f for sid in self.sids for f in self.streams[sid].batch_flags], [True, True])
        self.assertEqual(self.hooks.reads_ended, 1)
        self.assertEqual(self.inbound.bytes_received, 80_000)
        self.inbound._check_invariants()

    def test_in_a_batch_the_stream_that_received_least_is_told_first(self) -> None:
        """
        A request that arrived behind a bulk transfer's data in the same read
        reaches its stream first, so its local connection gets it before the
        bulk data is written out.
        """
        bulk, request = self.sids
        self.server.send(bulk, b"x" * 100_000)
        ahead = wire(self.server)
        self.server.send(request, b"*2\r\n$3\r\nGET\r\n$3\r\nkey\r\n")
        self.inbound.begin_read()
        self.feed(ahead + wire(self.server))
        self.inbound.end_read()
        self.assertEqual(self.log, [(request, "data"), (bulk, "data")])
        self.assertEqual(self.agent.inbox_bytes(bulk), 100_000)  # nothing lost or taken on the way
        self.inbound._check_invariants()

    def test_streams_that_received_as_much_are_told_in_order_of_arrival(self) -> None:
        a, b = self.sids
        self.inbound.begin_read()
        self.feed(b"".join(bytes(x) for x in encode(Data(b, b"y" * 10)) + encode(Data(a, b"x" * 10))))
        self.inbound.end_read()
        self.assertEqual(self.log, [(b, "data"), (a, "data")])

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 20_000)), max_size=20))
    def test_a_batch_tells_each_stream_once_fewest_bytes_first(self, writes: list[tuple[int, int]]) -> None:
        """Invariant 5 of InboundDelivery, on any DATA frames in any order within one read."""
        self.setUp()  # Hypothesis runs the examples in one test case: start each one afresh
        sids = list(self.sids)
        for _ in range(2):
            sid = self.server.open("db", 5432)
            self.feed(wire(self.server))
            self.agent.accept(sid)
            self.server.receive(OpenOk(sid))
            self.streams[sid] = Stream(sid, self.log)
            sids.append(sid)
        self.hooks.events.clear()
        data = b"".join(bytes(x) for i, n in writes for x in encode(Data(sids[i], b"d" * n)))
        received: dict[int, int] = {}
        for i, n in writes:
            received[sids[i]] = received.get(sids[i], 0) + n
        self.inbound.begin_read()
        self.feed(data)
        self.inbound._check_invariants(in_batch=True)
        self.assertEqual(self.log, [])
        self.inbound.end_read()
        expected = sorted(received, key=received.__getitem__)  # stable: ties in order of arrival
        self.assertEqual(self.log, [(sid, "data") for sid in expected])
        self.inbound._check_invariants()

    def test_data_reaches_its_stream_before_the_fin_behind_it(self) -> None:
        a, _ = self.sids
        self.server.send(a, b"last words")
        self.server.close_send(a)
        self.inbound.begin_read()
        self.feed(wire(self.server))
        self.assertEqual(self.log, [(a, "data"), (a, "fin")])
        self.inbound.end_read()
        self.inbound._check_invariants()

    def test_tunnel_events_go_to_the_hooks(self) -> None:
        self.server.ping(b"abcdefgh")
        self.server.reset(self.sids[1], ErrorCode.CANCEL)
        self.feed(wire(self.server))
        self.assertEqual(self.log, [(self.sids[1], "rst CANCEL")])
        self.assertEqual(self.hooks.events, [])  # a PING is answered by the multiplexer, not reported
        self.agent.goaway(ErrorCode.SHUTDOWN, "bye")
        self.server.goaway(ErrorCode.SHUTDOWN, "bye")
        self.feed(wire(self.server))
        self.assertEqual(self.hooks.events, [("goaway", ErrorCode.SHUTDOWN)])

    def test_nothing_is_dispatched_once_closed(self) -> None:
        a, _ = self.sids
        self.inbound.closed = True
        self.server.send(a, b"late")
        self.feed(wire(self.server))
        self.assertEqual(self.log, [])

    def test_a_batch_left_open_breaks_the_invariant(self) -> None:
        self.inbound.begin_read()
        self.assertRaises(AssertionError, self.inbound._check_invariants)


class ReadBatchesTests(SynchronousTestCase):
    def test_the_tunnel_declares_read_batches(self) -> None:
        tunnel = TunnelProtocol(Clock(), WINDOW, AGENT_CONFIG.timing(), WINDOW)
        self.assertIsInstance(tunnel, ReadBatches)
        tunnel.begin_read()
        tunnel.inbound._check_invariants(in_batch=True)
        tunnel.end_read()
        tunnel.inbound._check_invariants()

    def test_a_plain_protocol_does_not(self) -> None:
        from twisted.internet.protocol import Protocol

        self.assertNotIsInstance(Protocol(), ReadBatches)


class RawTLSReadBatchTests(SynchronousTestCase):
    def test_the_raw_tls_path_announces_each_read_to_the_tunnel(self) -> None:
        import os

        from tests.test_tunnel import Harness

        # The tunnel hands fast_tls_receive its inbound delivery's own
        # methods when the connection is made: watch them from the start,
        # and note who called them (fast_tls_receive's data_received, not
        # the tunnel's own dataReceived).
        calls: list[tuple[InboundDelivery, str, str]] = []
        begin, end = InboundDelivery.begin_read, InboundDelivery.end_read

        def begin_read(inbound: InboundDelivery) -> None:
            calls.append((inbound, "begin", sys._getframe(1).f_code.co_name))
            begin(inbound)

        def end_read(inbound: InboundDelivery) -> None:
            end(inbound)
            inbound._check_invariants()
            calls.append((inbound, "end", sys._getframe(1).f_code.co_name))

        self.patch(InboundDelivery, "begin_read", begin_read)
        self.patch(InboundDelivery, "end_read", end_read)
        h = Harness()
        tunnel = h.agent
        stream, _recorder, target_transport, _target = h.open()
        payload = os.urandom(200_000)
        stream.write(payload)
        h.flush()
        self.assertEqual(target_transport.value(), payload)
        mine = [(what, caller) for inbound, what, caller in calls if inbound is tunnel.inbound]
        # Every read is one batch: the records of a read that completed
        # several are announced by fast_tls_receive (begin .. end around
        # them); a read that completed one record goes to the tunnel alone,
        # which opens the batch inline and ends it.
        batches: list[str] = []
        i = 0
        while i < len(mine):
            if mine[i] == ("begin", "_deliver_batch"):
                self.assertEqual(mine[i + 1], ("end", "_deliver_batch"), mine[i : i + 2])
                batches.append("several records")
                i += 2
            else:
                self.assertEqual(mine[i], ("end", "dataReceived"), mine[i])
                batches.append("one record")
                i += 1
        self.assertIn("several records", batches)
        self.assertIn("one record", batches)
