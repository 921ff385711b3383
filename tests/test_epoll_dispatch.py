"""
The epoll reactor's per-event dispatch without the logging context
(nova.transport.epoll): Twisted's order and skips kept, errors still logged
with their traceback and the connection closed, and installed only on
exactly Twisted's EPollReactor.

In memory: a fake poller where the order is the question, and a real
EPollReactor (never run; one iteration at a time) over a socketpair where
Twisted's own read and disconnect handling is.
"""

from __future__ import annotations

import errno
import re
import socket
from pathlib import Path
from typing import Any

from twisted.internet.epollreactor import EPollReactor
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.selectreactor import SelectReactor
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock
from twisted.logger import globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from nova.transport import epoll, private

IN, OUT = 1, 4  # EPOLLIN, EPOLLOUT


class FakePoller:
    """An epoll that returns what it is given, once, and notes how it was asked."""

    def __init__(self, *batches: list[tuple[int, int]] | OSError) -> None:
        self.batches = list(batches)
        self.asked: list[tuple[float, int]] = []

    def poll(self, timeout: float, maxevents: int) -> list[tuple[int, int]]:
        self.asked.append((timeout, maxevents))
        batch = self.batches.pop(0)
        if isinstance(batch, OSError):
            raise batch
        return batch


class Selectable:
    def __init__(self, name: str) -> None:
        self.name = name

    def logPrefix(self) -> str:
        return self.name


class FakeReactor:
    """The three names the dispatch uses, and a C{_doReadOrWrite} that records (or raises)."""

    def __init__(self, poller: FakePoller, selectables: dict[int, Any]) -> None:
        self._poller = poller
        self._selectables = selectables
        self.handled: list[tuple[str, int, int]] = []
        self.on_event: dict[int, Any] = {}

    def _doReadOrWrite(self, selectable: Selectable, fd: int, event: int) -> None:
        self.handled.append((selectable.name, fd, event))
        action = self.on_event.get(fd)
        if action is not None:
            action()


class DispatchTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def test_every_event_in_the_order_epoll_gave_it(self) -> None:
        poller = FakePoller([(5, IN), (3, OUT), (5, OUT)])
        r = FakeReactor(poller, {3: Selectable("a"), 5: Selectable("b"), 9: Selectable("c")})
        epoll.EventDispatch(r)(0.25)
        self.assertEqual(r.handled, [("b", 5, IN), ("a", 3, OUT), ("b", 5, OUT)])
        # As doPoll: at most as many events as there are selectables.
        self.assertEqual(poller.asked, [(0.25, 3)])

    def test_no_timeout_waits_indefinitely(self) -> None:
        poller = FakePoller([])
        epoll.EventDispatch(FakeReactor(poller, {}))(None)
        self.assertEqual(poller.asked, [(-1, 0)])

    def test_a_descriptor_closed_by_an_earlier_event_is_skipped(self) -> None:
        selectables: dict[int, Any] = {3: Selectable("a"), 5: Selectable("b"), 7: Selectable("c")}
        r = FakeReactor(FakePoller([(3, IN), (5, IN), (7, IN)]), selectables)
        r.on_event[3] = lambda: selectables.pop(5)
        epoll.EventDispatch(r)(0)
        self.assertEqual(r.handled, [("a", 3, IN), ("c", 7, IN)])

    def test_an_interrupted_poll_is_a_turn_without_events(self) -> None:
        r = FakeReactor(FakePoller(OSError(errno.EINTR, "interrupted")), {3: Selectable("a")})
        epoll.EventDispatch(r)(0)
        self.assertEqual(r.handled, [])

    def test_any_other_poll_error_is_raised(self) -> None:
        r = FakeReactor(FakePoller(OSError(errno.EBADF, "bad descriptor")), {})
        self.assertRaises(OSError, epoll.EventDispatch(r), 0)

    def test_an_error_out_of_the_handler_is_logged_and_the_next_event_runs(self) -> None:
        # callWithLogger's own catch: an exception that escapes
        # _doReadOrWrite (from connectionLost, say) is logged with the
        # selectable's prefix, and the poll's other events still run.
        r = FakeReactor(FakePoller([(3, IN), (5, IN)]), {3: Selectable("Tunnel,7,10.0.0.1"), 5: Selectable("b")})
        r.on_event[3] = lambda: 1 / 0
        epoll.EventDispatch(r)(0)
        self.assertEqual(r.handled, [("Tunnel,7,10.0.0.1", 3, IN), ("b", 5, IN)])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        [event] = [e for e in self.logged if e.get("isError")]
        self.assertEqual(event["log_system"], "Tunnel,7,10.0.0.1")

    def test_a_buggy_log_prefix_does_not_hide_the_error(self) -> None:
        class Buggy(Selectable):
            def logPrefix(self) -> str:
                raise RuntimeError("no prefix")

        r = FakeReactor(FakePoller([(3, IN)]), {3: Buggy("x")})
        r.on_event[3] = lambda: 1 / 0
        epoll.EventDispatch(r)(0)
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)
        [event] = [e for e in self.logged if e.get("isError")]
        self.assertEqual(event["log_system"], "(buggy logPrefix method)")

    def test_ctrl_c_in_a_handler_is_not_swallowed(self) -> None:
        r = FakeReactor(FakePoller([(3, IN)]), {3: Selectable("a")})

        def interrupt() -> None:
            raise KeyboardInterrupt

        r.on_event[3] = interrupt
        self.assertRaises(KeyboardInterrupt, epoll.EventDispatch(r), 0)

    def test_what_is_lost_a_legacy_message_has_no_connection_prefix(self) -> None:
        # The documented cost: twisted.python.log messages emitted during an
        # event carry the system "-" instead of the selectable's prefix.
        r = FakeReactor(FakePoller([(3, IN)]), {3: Selectable("Tunnel,7,10.0.0.1")})
        r.on_event[3] = lambda: legacy_log.msg("from inside an event")
        epoll.EventDispatch(r)(0)
        [event] = [e for e in self.logged if e.get("message") == ("from inside an event",)]
        self.assertEqual(event["log_system"], "-")


class Boom(Protocol):
    """A careless protocol: raises on the first bytes it gets."""

    lost: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        raise ValueError(f"cannot parse {data!r}")

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.lost = reason


class Echo(Protocol):
    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


class RealReactorTests(SynchronousTestCase):
    """A real EPollReactor with the dispatch, turned by hand (never run) over a socketpair."""

    def setUp(self) -> None:
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.reactor = EPollReactor()
        self.addCleanup(self._close)
        self.assertTrue(epoll.install(self.reactor))

    def _close(self) -> None:
        for selectable in list(self.reactor._selectables.values()):
            if selectable is not self.reactor.waker:
                selectable.connectionLost(Failure(Exception("test over")))
        self.reactor.removeAll()
        self.reactor.waker.connectionLost(None)
        self.reactor._poller.close()

    def connect(self, protocol: Protocol) -> socket.socket:
        """The peer socket of a connection the reactor serves with C{protocol}."""
        ours, peer = socket.socketpair()
        self.addCleanup(peer.close)
        self.reactor.adoptStreamConnection(ours.fileno(), socket.AF_UNIX, Factory.forProtocol(lambda: protocol))
        ours.close()  # the reactor holds its own duplicate
        peer.settimeout(5)
        return peer

    def turn(self) -> None:
        self.reactor.doIteration(0)
        self.reactor.runUntilCurrent()

    def test_bytes_still_flow(self) -> None:
        peer = self.connect(Echo())
        peer.sendall(b"ping")
        self.turn()  # read, write queued
        self.turn()  # writable: sent
        self.assertEqual(peer.recv(10), b"ping")

    def test_a_protocol_error_is_logged_with_its_traceback_and_the_connection_closed(self) -> None:
        protocol = Boom()
        peer = self.connect(protocol)
        peer.sendall(b"junk")
        self.turn()
        [failure] = self.flushLoggedErrors(ValueError)
        self.assertIn("cannot parse b'junk'", failure.getTraceback())
        self.assertIn("dataReceived", failure.getTraceback())
        # Closed, as Twisted closes it: the peer reads end-of-file and the
        # protocol is told why.
        self.assertEqual(peer.recv(10), b"")
        assert protocol.lost is not None
        self.assertIsInstance(protocol.lost.value, ValueError)
        [event] = [e for e in self.logged if e.get("isError")]
        self.assertEqual(event["log_system"], "-")  # what is lost (docs/datapath.md)

    def test_other_connections_are_not_disturbed_by_one_that_fails(self) -> None:
        good = self.connect(Echo())
        bad = self.connect(Boom())
        bad.sendall(b"junk")
        good.sendall(b"fine")
        self.turn()
        self.turn()
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.assertEqual(good.recv(10), b"fine")
        self.assertEqual(bad.recv(10), b"")

    def test_installed_once(self) -> None:
        dispatch = self.reactor.doIteration
        self.assertTrue(epoll.install(self.reactor))
        self.assertIs(self.reactor.doIteration, dispatch)
        self.assertEqual(sum(1 for e in self.logged if e.get("log_format") == epoll.ACTIVE), 1)


def bare(cls: type[Any]) -> Any:
    """An instance of a reactor class without its constructor (no epoll, no waker opened)."""
    r = object.__new__(cls)
    r._poller = FakePoller()
    r._selectables = {}
    return r


class InstallTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def active_lines(self) -> int:
        return sum(1 for e in self.logged if e.get("log_format") == epoll.ACTIVE)

    def test_on_twisteds_epoll_reactor_with_one_line_at_start(self) -> None:
        r = bare(EPollReactor)
        self.assertTrue(epoll.install(r))
        self.assertIsInstance(r.doIteration, epoll.EventDispatch)
        self.assertEqual(self.active_lines(), 1)

    def test_not_on_a_subclass(self) -> None:
        class Mine(EPollReactor):
            pass

        r = bare(Mine)
        self.assertFalse(epoll.install(r))
        self.assertNotIn("doIteration", vars(r))
        self.assertEqual(self.active_lines(), 0)

    def test_not_on_other_reactors(self) -> None:
        for r in (bare(SelectReactor), MemoryReactorClock()):
            self.assertFalse(epoll.install(r))
            self.assertNotIn("doIteration", vars(r))
        self.assertEqual(self.active_lines(), 0)

    def test_not_when_a_name_is_missing(self) -> None:
        r = bare(EPollReactor)
        del r._selectables
        self.assertFalse(epoll.install(r))
        self.assertNotIn("doIteration", vars(r))

    def test_not_over_someone_elses_hook(self) -> None:
        r = bare(EPollReactor)

        def theirs(timeout: float | None) -> None:
            pass

        r.doIteration = theirs
        self.assertFalse(epoll.install(r))
        self.assertIs(r.doIteration, theirs)


def test_every_private_name_the_dispatch_uses_is_listed() -> None:
    source = Path(str(epoll.__file__)).read_text()
    used = set(re.findall(r"\breactor\.(_\w+)\b", source))
    assert used, "the pattern found nothing: it no longer matches the code"
    missing = used - set(private.EPOLL_NAMES)
    assert not missing, f"private names used but not listed in private.EPOLL_NAMES: {sorted(missing)}"


def test_the_installed_twisted_passes_the_check() -> None:
    # Fails when an upgrade of Twisted renames what the dispatch relies on
    # (NOVA would then keep Twisted's slower dispatch, never break).
    assert private.plain_epoll(bare(EPollReactor))
    assert EPollReactor.doIteration is EPollReactor.doPoll
