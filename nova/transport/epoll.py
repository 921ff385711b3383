"""
Twisted's epoll reactor with each socket event dispatched without the
legacy logging context.

C{EPollReactor.doPoll} hands every event to C{log.callWithLogger}, which
asks the selectable for its C{logPrefix()}, copies the thread's logging
context, pushes it and pops it again (about 19 Python calls per event), only
so that a C{twisted.python.log} message emitted during the event carries the
selectable's prefix as its C{system}.  L{install} replaces the running
reactor's C{doIteration} with L{EventDispatch}, which does what C{doPoll}
does in the same order (poll, look each descriptor up, skip one closed since,
C{_doReadOrWrite}, which itself logs and disconnects a selectable whose
C{doRead}/C{doWrite} raised) without that context.  What is lost: such a
legacy message (Twisted's "Unhandled Error" with its traceback, when a
protocol raises in C{dataReceived}) is logged with the system C{-} instead of
the connection's prefix; NOVA's own events (C{twisted.logger}) never used it.

Only on exactly Twisted's C{EPollReactor} with every private name it uses
(L{nova.transport.private.EPOLL_NAMES}); any other reactor, a subclass
included, keeps Twisted's code.
"""

from __future__ import annotations

import errno
from typing import Any

from twisted.logger import Logger
from twisted.python import log as legacy_log

from nova.transport import private

log = Logger()

# What the start-up log line says, and what a test looks for.
ACTIVE = "reactor: epoll, per-event logging context off"


class EventDispatch:
    """
    A replacement for C{EPollReactor.doPoll} on one reactor: one poll, then
    each event to the reactor's C{_doReadOrWrite}, as Twisted does, minus the
    logging context around each.

    An exception out of C{_doReadOrWrite} (it catches what C{doRead} and
    C{doWrite} raise, so only one from the disconnection that follows, a
    protocol's C{connectionLost} say) is logged with the selectable's prefix
    and the next event is handled, as C{callWithLogger} does.
    """

    def __init__(self, reactor: Any) -> None:
        self.reactor = reactor

    def __call__(self, timeout: float | None) -> None:
        reactor = self.reactor
        selectables: dict[int, Any] = reactor._selectables
        try:
            events = reactor._poller.poll(-1 if timeout is None else timeout, len(selectables))
        except OSError as e:
            if e.errno == errno.EINTR:
                return
            raise
        handle = reactor._doReadOrWrite
        for fd, event in events:
            try:
                selectable = selectables[fd]
            except KeyError:  # closed by an earlier event of the same poll
                continue
            try:
                handle(selectable, fd, event)
            except KeyboardInterrupt:
                raise
            except BaseException:
                legacy_log.err(system=_prefix(selectable))


def _prefix(selectable: Any) -> str:
    """The selectable's log prefix, as C{callWithLogger} would have used it."""
    try:
        return str(selectable.logPrefix())
    except KeyboardInterrupt:
        raise
    except BaseException:
        return "(buggy logPrefix method)"


def install(reactor: Any) -> bool:
    """
    Dispatch C{reactor}'s events with L{EventDispatch} if it is exactly
    Twisted's C{EPollReactor} with every name the dispatch uses; True if it
    is (now or already) installed.  Logs L{ACTIVE} once when it installs.
    """
    if isinstance(vars(reactor).get("doIteration"), EventDispatch):
        return True
    if not private.plain_epoll(reactor):
        return False
    reactor.doIteration = EventDispatch(reactor)
    log.info(ACTIVE)
    return True
