"""
A stream transport on its own (nova.transport.stream), against a fake owner: the
StreamOwner/StreamEvents contract, the two half machines
(nova.mux.lifecycle) and pull producers through _PullToPush.
"""

from __future__ import annotations

import ast
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet import error
from twisted.internet._producer_helpers import _PullToPush
from twisted.internet.interfaces import IHalfCloseableProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock, Cooperator
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from nova.mux.lifecycle import start_halves
from nova.transport import stream as stream_module
from nova.transport.stream import StreamAddress, StreamTransport
from nova.wire.errors import ErrorCode

SID = 7
HIGH_WATER = 1000


class Owner:
    """A StreamOwner that records every call and holds the stream's bytes."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []
        self.queued = 0
        self.inbox: list[bytes] = []
        self.consumed = 0  # data_consumed calls

    def write_data(self, stream_id: int, data: bytes, high_water: int) -> int:
        self.calls.append(("write", data))
        self.queued += len(data)
        return self.queued

    def end_stream(self, stream_id: int) -> None:
        self.calls.append(("fin", stream_id))

    def reset_stream(self, stream_id: int, code: ErrorCode) -> None:
        self.calls.append(("rst", code))

    def read_data(self, stream_id: int, limit: int) -> list[bytes]:
        chunks, self.inbox = self.inbox, []
        return chunks

    def data_consumed(self, stream_id: int) -> int:
        self.consumed += 1
        return sum(map(len, self.inbox))

    def watch_drain(self, stream_id: int, watch: bool) -> None:
        self.calls.append(("watch", watch))

    def stream_closed(self, stream_id: int) -> None:
        self.calls.append(("closed", stream_id))


class Plain(Protocol):
    """Records what it is given; cannot half-close."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.events: list[str] = []
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.received.append(data)

    def readConnectionLost(self) -> None:
        self.events.append("eof")

    def writeConnectionLost(self) -> None:
        self.events.append("write closed")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason


@implementer(IHalfCloseableProtocol)
class HalfCloser(Plain):
    """Records what it is given, half-closes included."""


def connected(protocol: Protocol) -> tuple[StreamTransport, Owner]:
    owner = Owner()
    stream = StreamTransport(owner, SID, StreamAddress("peer", SID, "db", 5432), HIGH_WATER, 4096)
    stream.makeConnection(protocol)
    owner.consumed = 0  # what connecting asked (what waits): not the tests' subject
    return stream, owner


class ContractTests(SynchronousTestCase):
    def test_stream_module_does_not_import_the_tunnel(self) -> None:
        tree = ast.parse(Path(stream_module.__file__).read_text())
        imported = {node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)} | {
            alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
        }
        self.assertFalse({name for name in imported if name.endswith("tunnel")})

    def test_writes_go_to_the_owner_by_stream_id(self) -> None:
        stream, owner = connected(HalfCloser())
        stream.write(b"hello")
        stream.writeSequence([b"a", b"b"])
        self.assertEqual(owner.calls, [("write", b"hello"), ("write", b"ab")])
        self.assertEqual(stream.bytes_written, 7)

    def test_received_bytes_are_handed_over_when_the_owner_says_so(self) -> None:
        protocol = HalfCloser()
        stream, owner = connected(protocol)
        owner.inbox = [b"one", b"two"]
        stream.data_available()
        self.assertEqual(protocol.received, [b"onetwo"])
        self.assertEqual(stream.bytes_delivered, 6)

    def test_outside_a_read_batch_the_stream_asks_what_waits_after_a_short_take(self) -> None:
        # The owner sends the credit and says what still waits (data_consumed).
        protocol = HalfCloser()
        stream, owner = connected(protocol)
        owner.inbox = [b"request"]
        stream.data_available()
        self.assertEqual(protocol.received, [b"request"])
        self.assertEqual(owner.consumed, 1)

    def test_in_a_read_batch_a_short_take_needs_no_question(self) -> None:
        # The batch's end sends the credit, and what arrives meanwhile is
        # told again: one call into the owner per hand-over, not two.
        protocol = HalfCloser()
        stream, owner = connected(protocol)
        owner.inbox = [b"request"]
        stream.data_available(True)
        self.assertEqual(protocol.received, [b"request"])
        self.assertEqual(owner.consumed, 0)
        owner.inbox = [b"more"]  # arrived later in the same read: told again
        stream.data_available(True)
        self.assertEqual(protocol.received, [b"request", b"more"])

    def test_in_a_read_batch_the_peer_s_fin_still_reaches_the_protocol(self) -> None:
        protocol = HalfCloser()
        stream, owner = connected(protocol)
        owner.inbox = [b"last"]
        stream.data_available(True)
        stream.remote_ended()
        self.assertEqual(protocol.received, [b"last"])
        self.assertIn("eof", protocol.events)

    def test_paused_reading_holds_received_bytes(self) -> None:
        protocol = HalfCloser()
        stream, owner = connected(protocol)
        stream.pauseProducing()
        owner.inbox = [b"held"]
        stream.data_available()
        self.assertEqual(protocol.received, [])
        stream.resumeProducing()
        self.assertEqual(protocol.received, [b"held"])


class HalfCloseTests(SynchronousTestCase):
    def test_both_halves_end_then_the_stream_ends_cleanly(self) -> None:
        protocol = HalfCloser()
        stream, owner = connected(protocol)
        stream.loseWriteConnection()
        self.assertEqual(owner.calls, [("fin", SID)])
        stream.write(b"too late")
        self.assertEqual(owner.calls, [("fin", SID)])
        stream.fin_sent()
        self.assertEqual(protocol.events, ["write closed"])
        self.assertFalse(stream.disconnected)
        stream.remote_ended()
        self.assertEqual(protocol.events, ["write closed", "eof"])
        self.assertTrue(stream.disconnected)
        assert protocol.reason is not None
        protocol.reason.trap(error.ConnectionDone)
        self.assertEqual(owner.calls[-1], ("closed", SID))

    def test_eof_waits_for_the_bytes_before_it(self) -> None:
        protocol = HalfCloser()
        stream, owner = connected(protocol)
        stream.pauseProducing()
        owner.inbox = [b"before the fin"]
        stream.remote_ended()
        self.assertEqual(protocol.events, [])
        stream.resumeProducing()
        self.assertEqual(protocol.received, [b"before the fin"])
        self.assertEqual(protocol.events, ["eof"])

    def test_a_paused_protocol_hears_of_eof_when_it_resumes(self) -> None:
        protocol = HalfCloser()
        stream, _ = connected(protocol)
        stream.pauseProducing()
        stream.remote_ended()
        self.assertEqual(protocol.events, [])
        stream.resumeProducing()
        self.assertEqual(protocol.events, ["eof"])

    def test_a_protocol_that_cannot_half_close_closes_at_eof(self) -> None:
        protocol = Plain()
        stream, owner = connected(protocol)
        stream.remote_ended()
        self.assertEqual(owner.calls, [("fin", SID)])
        stream.fin_sent()
        self.assertTrue(stream.disconnected)
        self.assertNotIn(("rst", ErrorCode.CANCEL), owner.calls)

    def test_close_with_the_peer_still_sending_resets_after_the_fin(self) -> None:
        protocol = HalfCloser()
        stream, owner = connected(protocol)
        stream.loseConnection()
        owner.inbox = [b"dropped"]
        stream.data_available()
        self.assertEqual(protocol.received, [])
        stream.fin_sent()
        self.assertEqual(owner.calls, [("fin", SID), ("rst", ErrorCode.CANCEL), ("closed", SID)])
        assert protocol.reason is not None
        protocol.reason.trap(error.ConnectionDone)

    def test_abort_resets_at_once(self) -> None:
        protocol = HalfCloser()
        stream, owner = connected(protocol)
        stream.abortConnection()
        self.assertEqual(owner.calls, [("rst", ErrorCode.CANCEL), ("closed", SID)])
        assert protocol.reason is not None
        protocol.reason.trap(error.ConnectionAborted)
        stream.loseConnection()
        stream.fin_sent()
        self.assertEqual(len(owner.calls), 2)

    def test_a_finished_stream_keeps_delivering_after_the_tunnel_goes(self) -> None:
        protocol = HalfCloser()
        stream, owner = connected(protocol)
        stream.loseWriteConnection()
        stream.fin_sent()
        stream.pauseProducing()
        owner.inbox = [b"tail"]
        stream.remote_ended()
        stream.tunnel_lost(Failure(error.ConnectionLost()))
        self.assertFalse(stream.disconnected)
        stream.resumeProducing()
        self.assertEqual(protocol.received, [b"tail"])
        self.assertTrue(stream.disconnected)


class HalvesMachineTests(SynchronousTestCase):
    """The half machines on their own: what they ask, in which order."""

    class Hooks:
        def __init__(self) -> None:
            self.asked: list[str] = []

        def send_fin(self) -> None:
            self.asked.append("send_fin")

        def read_closed(self) -> None:
            self.asked.append("read_closed")

        def write_closed(self) -> None:
            self.asked.append("write_closed")

        def finish(self, cut: bool) -> None:
            self.asked.append(f"finish cut={cut}")

    def test_read_then_write(self) -> None:
        hooks = self.Hooks()
        core, read, write = start_halves(hooks)
        read.peer_ended()
        self.assertTrue(core.eof_due)
        read.all_delivered()
        write.end()
        self.assertFalse(core.can_write)
        write.fin_sent()
        self.assertEqual(hooks.asked, ["read_closed", "send_fin", "write_closed", "finish cut=False"])

    def test_close_before_the_peer_ends_cuts(self) -> None:
        hooks = self.Hooks()
        core, read, write = start_halves(hooks)
        read.drop()
        write.close()
        self.assertTrue(core.dropping)
        write.fin_sent()
        self.assertEqual(hooks.asked, ["send_fin", "finish cut=True"])

    def test_close_after_eof_does_not_cut(self) -> None:
        hooks = self.Hooks()
        _core, read, write = start_halves(hooks)
        read.peer_ended()
        read.drop()
        write.close()
        read.all_delivered()
        write.fin_sent()
        self.assertEqual(hooks.asked, ["send_fin", "finish cut=False"])

    def test_gone_ignores_everything_after(self) -> None:
        hooks = self.Hooks()
        core, read, write = start_halves(hooks)
        read.gone()
        write.gone()
        read.peer_ended()
        read.all_delivered()
        write.end()
        write.close()
        write.fin_sent()
        self.assertEqual(hooks.asked, [])
        self.assertFalse(core.can_write)


class PullProducerTests(SynchronousTestCase):
    def test_a_pull_producer_is_driven_as_a_push_producer(self) -> None:
        clock = Clock()
        cooperator = Cooperator(scheduler=lambda f: clock.callLater(0, f), started=True)
        self.patch(_PullToPush, "startStreaming", _start_with(cooperator))
        stream, owner = connected(HalfCloser())

        class Pull:
            stopped = False

            def resumeProducing(self) -> None:
                stream.write(b"x" * 400)

            def stopProducing(self) -> None:
                self.stopped = True

        pull = Pull()
        stream.registerProducer(pull, False)  # type: ignore[arg-type]  # a duck-typed IPullProducer
        for _ in range(5):
            clock.advance(0)
        # Written until the queue reached the high-water mark, then paused.
        self.assertEqual(owner.queued, 1200)
        self.assertIn(("watch", True), owner.calls)
        owner.queued = 0
        self.assertFalse(stream.drained(0))
        for _ in range(5):
            clock.advance(0)
        self.assertEqual(owner.queued, 1200)
        stream.unregisterProducer()
        self.assertEqual(owner.calls[-1], ("watch", False))
        stream.abortConnection()
        self.assertFalse(pull.stopped)  # unregistered first: not stopped by the stream


def _start_with(cooperator: Cooperator) -> object:
    def startStreaming(self: _PullToPush) -> None:
        self._coopTask = cooperator.cooperate(self._pull())

    return startStreaming


class StreamMachine(RuleBasedStateMachine):
    """
    Arbitrary interleavings of what a protocol and a tunnel do to a stream:
    each end is told of each half-close at most once, in order, and the
    stream ends exactly once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.protocol = HalfCloser()
        self.lost = 0
        self.protocol.connectionLost = self._connection_lost  # type: ignore[method-assign]
        self.protocol.readConnectionLost = self._read_connection_lost  # type: ignore[method-assign]
        self.paused = False
        self.eof_while_paused = False
        self.stream, self.owner = connected(self.protocol)
        self.peer_fin = False
        self.fin_out = False
        self.arrived = 0
        self.written_after_fin = False

    def _connection_lost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost += 1
        self.protocol.reason = reason

    def _read_connection_lost(self) -> None:
        self.eof_while_paused |= self.paused
        self.protocol.events.append("eof")

    def _live(self) -> bool:
        return ("closed", SID) not in self.owner.calls

    @rule(size=st.integers(1, 2000))
    def protocol_writes(self, size: int) -> None:
        fin_asked = ("fin", SID) in self.owner.calls
        before = len(self.owner.calls)
        self.stream.write(b"w" * size)
        if fin_asked and len(self.owner.calls) != before:
            self.written_after_fin = True

    @rule()
    def protocol_half_closes(self) -> None:
        self.stream.loseWriteConnection()

    @rule()
    def protocol_closes(self) -> None:
        self.stream.loseConnection()

    @rule(paused=st.booleans())
    def protocol_pauses(self, paused: bool) -> None:
        self.paused = paused
        if paused:
            self.stream.pauseProducing()
        else:
            self.stream.resumeProducing()

    @precondition(lambda self: self._live() and not self.peer_fin)
    @rule(size=st.integers(1, 100))
    def peer_sends(self, size: int) -> None:
        self.owner.inbox.append(b"r" * size)
        self.arrived += size
        self.stream.data_available()

    @precondition(lambda self: self._live() and not self.peer_fin)
    @rule()
    def peer_ends(self) -> None:
        self.peer_fin = True
        self.stream.remote_ended()

    @precondition(lambda self: self._live() and ("fin", SID) in self.owner.calls and not self.fin_out)
    @rule()
    def our_fin_goes_out(self) -> None:
        self.fin_out = True
        self.stream.fin_sent()

    @precondition(lambda self: self._live())
    @rule(how=st.sampled_from(["abort", "reset", "tunnel lost"]))
    def ends_abruptly(self, how: str) -> None:
        """One rule for the three abrupt ends, so that most runs get far before one."""
        if how == "abort":
            self.stream.abortConnection()
        elif how == "reset":
            self.stream.reset_by_peer(ErrorCode.CANCEL)
        else:
            self.stream.tunnel_lost(Failure(error.ConnectionLost()))

    @invariant()
    def each_end_is_told_once_and_in_order(self) -> None:
        events = self.protocol.events
        assert events.count("eof") <= 1 and events.count("write closed") <= 1, events
        if "eof" in events:
            assert self.peer_fin
            delivered = sum(map(len, self.protocol.received))
            assert delivered == self.arrived, (delivered, self.arrived)
        if "write closed" in events:
            assert self.fin_out
        assert not self.written_after_fin
        assert not self.eof_while_paused  # a paused protocol hears of nothing, EOF included
        assert self.lost <= 1
        assert self.owner.calls.count(("closed", SID)) == self.lost
        assert self.stream.disconnected == (self.lost == 1)
        assert self.owner.calls.count(("rst", ErrorCode.CANCEL)) <= 1
        if self.stream.disconnected:
            assert not self.stream._halves.can_write


StreamMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=25, deadline=None)
TestStreamMachine = StreamMachine.TestCase
