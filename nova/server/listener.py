"""
Route listeners: each accepted connection becomes a stream through a
matching agent to the route's target.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionAborted, ConnectionDone
from twisted.internet.interfaces import IProtocol, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from nova.admin.audit import Audit
from nova.errors import open_failure
from nova.rules.routes import Route
from nova.transport.splice import Pipe, splice
from nova.transport.stream import StreamTransport

from .early import EarlyData
from .endpoint import DEFAULT_OPEN_TIMEOUT, TunnelEndpoint
from .registry import Registry


def describe_close(failure: Failure) -> str:
    if failure.check(ConnectionDone):
        return "done"
    if failure.check(ConnectionAborted):
        return "aborted"
    return failure.getErrorMessage()


def failure_reason(failure: Failure) -> str:
    """A short, stable reason for metrics and the audit history (see L{nova.errors.OPEN_FAILURES})."""
    return open_failure(failure).label


class StreamWatch:
    """
    Audits one entry connection: its stream's opening, failure and close.
    C{route} is the configured route it came through (empty for SOCKS): the
    metrics' C{route} label.
    """

    def __init__(
        self, audit: Audit, clock: IReactorTime, entry: str, requester: str, target: str, route: str = ""
    ) -> None:
        self.audit = audit
        self.route = route
        self.clock = clock
        self.entry = entry
        self.requester = requester
        self.target = target
        self.started = clock.seconds()

    def opened(self, other: Pipe) -> str:
        """Record the open; returns the agent's name."""
        stream = other.transport
        assert stream is not None
        agent = str(getattr(stream.getPeer(), "tunnel", "?"))
        opened_at = self.clock.seconds()
        self.audit.stream_opened(agent, self.entry, self.requester, self.target, opened_at - self.started, self.route)

        def closed(stream: StreamTransport, failure: Failure) -> None:
            self.audit.stream_closed(
                agent,
                self.entry,
                self.requester,
                self.target,
                bytes_up=stream.bytes_written,
                bytes_down=stream.bytes_delivered,
                duration=self.clock.seconds() - opened_at,
                reason=describe_close(failure),
                route=self.route,
            )

        if isinstance(stream, StreamTransport):
            stream.on_close.append(closed)
        return agent

    def failed(self, failure: Failure) -> None:
        self.audit.open_failed(
            getattr(failure.value, "agent", ""),
            self.entry,
            self.requester,
            self.target,
            failure_reason(failure),
            failure.getErrorMessage(),
            self.route,
        )


class PipeFactory(Factory):
    """Builds the stream end of a relay."""

    noisy = False

    def buildProtocol(self, addr: Any) -> Pipe:
        return Pipe()


class EntryConnection(Pipe):
    """
    A user's connection at an entry point (a route, SOCKS): it opens a stream
    through a tunnel endpoint, audits it, then splices itself to the stream.
    Subclasses say what to do once the stream is open or has failed.
    """

    log = Logger()

    def __init__(self) -> None:
        super().__init__()
        self._opening: Deferred[IProtocol] | None = None
        self.watch: StreamWatch | None = None
        self._early: EarlyData | None = None

    def unspliced_data(self, data: bytes) -> None:
        # Read before the stream is open: only while an agent takes data after OPEN.
        if self._early is not None:
            self._early.write(data)

    def open_stream(self, endpoint: TunnelEndpoint, watch: StreamWatch, early: bool = False) -> None:
        """
        Pause this connection and open its stream through C{endpoint}.  With
        C{early}, an agent that takes data after OPEN (protocol.md §7.2)
        gets the user's first bytes without waiting for OPEN_OK
        (L{nova.server.early}).
        """
        transport = self.transport
        assert transport is not None
        transport.pauseProducing()  # type: ignore[attr-defined]
        self.watch = watch
        if early:
            self._early = EarlyData(
                transport.pauseProducing,  # type: ignore[attr-defined]
                transport.resumeProducing,  # type: ignore[attr-defined]
                read_now=self._read_now,
            )
        d = endpoint.connect(PipeFactory(), self._early)
        d.addCallbacks(self._opened, self._failed)
        if not d.called:
            self._opening = d

    def _read_now(self) -> None:
        """
        Read what the user's connection holds already (L{EarlyData}'s
        C{read_now}), through the descriptor's own C{doRead}, as the reactor
        would on its next turn.  An end of file found here is left for the
        reactor, which finds it again and half-closes as always; a reset
        aborts the connection, as the reactor would.
        """
        transport = self.transport
        if not isinstance(transport, tcp.Connection) or self.lost or not transport.connected:
            return
        why = transport.doRead()
        if why is not None and not isinstance(why, ConnectionDone) and not self.lost:
            transport.abortConnection()

    def _opened(self, other: IProtocol) -> None:
        self._opening = None
        assert isinstance(other, Pipe) and other.transport is not None and self.watch is not None
        early, self._early = self._early, None
        if self.lost or self.transport is None:
            other.transport.abortConnection()  # type: ignore[attr-defined]
            return
        self.stream_ready(self.watch.opened(other))
        if early is not None:
            taken = early.size if early.attached else 0
            unsent = early.unsent()  # bytes an earlier attempt read, if the stream's agent took none
            if unsent:
                other.transport.write(unsent)
            elif taken and isinstance(other.transport, StreamTransport):
                other.transport.bytes_written += taken  # sent with the OPEN: the audit counts them too
        splice(self, other)
        if self.read_done:
            # The user half-closed while the stream was opening (read as
            # early data): the stream's FIN follows what was sent.
            self.readConnectionLost()

    def _failed(self, failure: Failure) -> None:
        self._opening = None
        self._early = None  # discarded: the user's connection is closed
        if failure.check(CancelledError) and self.lost:
            return
        assert self.watch is not None
        self.watch.failed(failure)
        self.stream_failed(failure)

    def stream_ready(self, agent: str) -> None:
        """The stream is open through C{agent}; the splice follows."""

    def stream_failed(self, failure: Failure) -> None:
        """No stream: tell the user and close."""
        if self.transport is not None and not self.lost:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(CancelledError())) -> None:  # noqa: B008
        super().connectionLost(reason)
        if self._opening is not None:
            self._opening.cancel()


class RouteClient(EntryConnection):
    """A user's connection to a route port."""

    def __init__(self, factory: RouteFactory) -> None:
        super().__init__()
        self.factory = factory

    def connectionMade(self) -> None:
        assert self.transport is not None
        factory = self.factory
        watch = StreamWatch(
            factory.audit,
            factory.clock,
            factory.entry,
            address(self.transport.getPeer()),
            factory.target,
            factory.label,
        )
        self.open_stream(factory.endpoint, watch, early=True)

    def stream_ready(self, agent: str) -> None:
        assert self.watch is not None
        self.log.info(
            "route {route}: {client} connected through {agent}",
            route=self.factory.label,
            client=self.watch.requester,
            agent=agent,
        )

    def stream_failed(self, failure: Failure) -> None:
        assert self.watch is not None
        self.log.warn(
            "route {route}: cannot reach {target} for {client}: {why}; closing the connection",
            route=self.factory.label,
            target=self.watch.target,
            client=self.watch.requester,
            why=failure.getErrorMessage(),
        )
        super().stream_failed(failure)


class RouteFactory(Factory):
    noisy = False

    def __init__(
        self,
        route: Route,
        registry: Registry,
        clock: IReactorTime,
        open_timeout: float = DEFAULT_OPEN_TIMEOUT,
        audit: Audit | None = None,
    ) -> None:
        self.route = route
        # What every connection's audit records and metrics name, made once.
        self.label = str(route)
        self.entry = f"route {route.bind}:{route.port}"
        self.target = f"{route.host}:{route.host_port}"
        self.clock = clock
        self.audit = audit or Audit()
        self.endpoint = TunnelEndpoint(registry, route.selector, route.host, route.host_port, clock, open_timeout)

    def buildProtocol(self, addr: Any) -> RouteClient:
        return RouteClient(self)


def address(addr: Any) -> str:
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    if host is None:
        return str(addr)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
