"""
Route listeners: each accepted connection becomes a stream through a
matching agent to the route's target.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IProtocol, IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from nova.mux.splice import Pipe, splice
from nova.mux.stream import StreamAddress

from .endpoint import DEFAULT_OPEN_TIMEOUT, TunnelEndpoint
from .registry import Registry
from .routes import Route


class PipeFactory(Factory):
    """Builds the stream end of a relay."""

    noisy = False

    def buildProtocol(self, addr: Any) -> Pipe:
        return Pipe()


class RouteClient(Pipe):
    """A user's connection to a route port."""

    log = Logger()

    def __init__(self, factory: RouteFactory) -> None:
        super().__init__()
        self.factory = factory
        self._opening: Deferred[IProtocol] | None = None

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        d = self.factory.endpoint.connect(PipeFactory())
        d.addCallbacks(self._opened, self._failed)
        if not d.called:
            self._opening = d

    def _opened(self, other: IProtocol) -> None:
        self._opening = None
        assert isinstance(other, Pipe) and other.transport is not None
        if self.lost or self.transport is None:
            other.transport.abortConnection()  # type: ignore[attr-defined]
            return
        peer = other.transport.getPeer()
        self.log.info(
            "route {route}: {client} connected through {agent} (stream {stream})",
            route=str(self.factory.route),
            client=address(self.transport.getPeer()),
            agent=peer.tunnel if isinstance(peer, StreamAddress) else "?",
            stream=peer.stream_id if isinstance(peer, StreamAddress) else "?",
        )
        splice(self, other)

    def _failed(self, failure: Failure) -> None:
        self._opening = None
        if failure.check(CancelledError) and self.lost:
            return
        route = self.factory.route
        self.log.warn(
            "route {route}: cannot reach {target} for {client}: {why}; closing the connection",
            route=str(route),
            target=f"{route.host}:{route.host_port}",
            client=address(self.transport.getPeer()) if self.transport is not None else "?",
            why=failure.getErrorMessage(),
        )
        if self.transport is not None and not self.lost:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = Failure(CancelledError())) -> None:  # noqa: B008
        super().connectionLost(reason)
        if self._opening is not None:
            self._opening.cancel()


class RouteFactory(Factory):
    noisy = False

    def __init__(
        self, route: Route, registry: Registry, clock: IReactorTime, open_timeout: float = DEFAULT_OPEN_TIMEOUT
    ) -> None:
        self.route = route
        self.endpoint = TunnelEndpoint(registry, route.selector, route.host, route.host_port, clock, open_timeout)

    def buildProtocol(self, addr: Any) -> RouteClient:
        return RouteClient(self)


def address(addr: Any) -> str:
    host, port = getattr(addr, "host", None), getattr(addr, "port", None)
    if host is None:
        return str(addr)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
