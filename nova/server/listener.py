"""
Route listeners: each accepted connection becomes a stream through a
matching agent to the route's target.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.python.failure import Failure

from nova.mux.splice import Pipe, splice
from nova.mux.stream import StreamTransport

from .registry import Registry
from .routes import Route
from .tunnel import OpenFailed, ServerTunnel, TunnelGone

DEFAULT_OPEN_TIMEOUT = 30.0


class RouteClient(Pipe):
    """A user's connection to a route port."""

    log = Logger()

    def __init__(self, factory: RouteFactory) -> None:
        super().__init__()
        self.factory = factory
        self._opening: Deferred[StreamTransport] | None = None
        self._agent = ""

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.pauseProducing()  # type: ignore[attr-defined]
        route = self.factory.route
        client = self.transport.getPeer()
        tunnel = self.factory.registry.choose(route.selector)
        if tunnel is None:
            self.log.warn(
                "route {route}: no agent matches {selector}; closing the connection from {client}",
                route=str(route),
                selector=str(route.selector),
                client=_address(client),
            )
            self.transport.loseConnection()
            return
        assert isinstance(tunnel, ServerTunnel)
        self._agent = tunnel.name
        d = maybeDeferred(tunnel.open_stream, route.host, route.host_port)
        d.addTimeout(self.factory.open_timeout, self.factory.clock)
        d.addCallbacks(self._opened, self._failed)
        self._opening = d

    def _opened(self, stream: StreamTransport) -> None:
        self._opening = None
        if self.lost or self.transport is None:
            stream.abortConnection()
            return
        self.log.info(
            "route {route}: {client} connected through {agent} (stream {stream})",
            route=str(self.factory.route),
            client=_address(self.transport.getPeer()),
            agent=self._agent,
            stream=stream.stream_id,
        )
        other = Pipe()
        stream.makeConnection(other)
        splice(self, other)

    def _failed(self, failure: Failure) -> None:
        self._opening = None
        if failure.check(CancelledError) and self.lost:
            return
        if failure.check(OpenFailed, TunnelGone):
            why = failure.getErrorMessage()
        elif failure.check(TimeoutError, CancelledError):
            why = f"the agent did not answer within {self.factory.open_timeout:g}s"
        else:
            why = repr(failure.value)
        route = self.factory.route
        self.log.warn(
            "route {route}: cannot reach {target} through {agent}: {why}",
            route=str(route),
            target=f"{route.host}:{route.host_port}",
            agent=self._agent,
            why=why,
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
        self.registry = registry
        self.clock = clock
        self.open_timeout = open_timeout

    def buildProtocol(self, addr: Any) -> RouteClient:
        return RouteClient(self)


def _address(address: Any) -> str:
    host, port = getattr(address, "host", None), getattr(address, "port", None)
    if host is None:
        return str(address)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
