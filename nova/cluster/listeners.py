"""
Route listeners changed at run time: given the routes in force (static
from the command line, dynamic from the store), start the listeners that
are missing and stop the ones no longer wanted, leaving every other
listener, and every open connection, alone.

A route that is removed stops listening; connections it accepted already
are not touched (a listening port's C{stopListening} closes only the
listening socket), so their streams run until their users close them.

How a route listens is handed in (L{ListenFor}): the server's plugin gives
it the endpoint and the C{RouteFactory} it builds today, the tests a plain
echo; this module knows neither.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock, gatherResults, maybeDeferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger

from nova.rules.records import RouteRecord
from nova.rules.routes import Route
from nova.rules.routetable import desired


class ListenFor(Protocol):
    """Where and with what protocol factory one route listens."""

    def __call__(self, route: Route) -> tuple[IStreamServerEndpoint, IProtocolFactory]: ...


@dataclass
class _Listening:
    route: Route
    port: IListeningPort


class RouteListeners(Service):
    """
    The listeners of the routes in force, by route id.  L{apply} moves them
    to a new set; calls are serialised, so a set handed on while the last
    one is still being applied waits its turn rather than racing it.  A
    route that cannot listen (its port is taken) is reported in L{failed}
    and tried again at the next L{apply}; it never stops the others.
    """

    log = Logger()

    def __init__(self, listen_for: ListenFor, initial: Mapping[str, Route] | None = None) -> None:
        self.listen_for = listen_for
        self.initial = dict(initial or {})
        self.failed: dict[str, str] = {}
        self._listening: dict[str, _Listening] = {}
        self._lock = DeferredLock()

    def ports(self) -> dict[str, IListeningPort]:
        """The listening port of each route that is listening."""
        return {rid: entry.port for rid, entry in self._listening.items()}

    def routes(self) -> dict[str, Route]:
        """The routes listening now, by id."""
        return {rid: entry.route for rid, entry in self._listening.items()}

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        self.apply(self.initial)

    def stopService(self) -> Deferred[None]:
        super().stopService()  # type: ignore[no-untyped-call]
        return self.apply({})

    def apply(self, wanted: Mapping[str, Route]) -> Deferred[None]:
        """Listen for exactly C{wanted}: fires once every start and stop it needed is done."""
        wanted = dict(wanted)
        return self._lock.run(self._apply, wanted)

    def _apply(self, wanted: dict[str, Route]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._move_to(wanted))

    async def _move_to(self, wanted: dict[str, Route]) -> None:
        stops = [rid for rid, entry in self._listening.items() if rid not in wanted or wanted[rid] != entry.route]
        for rid in list(self.failed):
            if rid not in wanted:
                del self.failed[rid]
        starts = [rid for rid in wanted if rid in stops or rid not in self._listening]
        try:
            # Stop first: a route that moves to another id (or changes its
            # target but keeps its port) must find its port free.
            await gatherResults([self._stop(rid) for rid in stops], consumeErrors=True)
            await gatherResults([self._start(rid, wanted[rid]) for rid in starts], consumeErrors=True)
        except Exception:
            self.log.failure("route listeners: unexpected error applying routes")

    def _stop(self, rid: str) -> Deferred[None]:
        entry = self._listening.pop(rid)
        self.log.info(
            "route {route} ({id}) stopped listening; its open connections carry on until closed",
            route=str(entry.route),
            id=rid,
        )
        d: Deferred[object] = maybeDeferred(_stop_listening, entry.port)
        d.addErrback(lambda f: self.log.warn("route {id}: stop listening: {why}", id=rid, why=f.getErrorMessage()))
        return d.addCallback(lambda _: None)

    def _start(self, rid: str, route: Route) -> Deferred[None]:
        try:
            endpoint, factory = self.listen_for(route)
        except Exception as e:
            self._cannot(rid, route, str(e))
            return succeed(None)

        def listening(port: IListeningPort) -> None:
            self.failed.pop(rid, None)
            self._listening[rid] = _Listening(route, port)
            self.log.info("route {route} ({id}) listening", route=str(route), id=rid)

        d: Deferred[None] = endpoint.listen(factory).addCallbacks(
            listening, lambda f: self._cannot(rid, route, f.getErrorMessage())
        )
        return d

    def _cannot(self, rid: str, route: Route, why: str) -> None:
        self.failed[rid] = why
        self.log.warn("route {route} ({id}) cannot listen: {why}", route=str(route), id=rid, why=why)


def _stop_listening(port: IListeningPort) -> object:
    return port.stopListening()


def follow_store(listeners: RouteListeners, static: Sequence[Route], default_bind: str = "127.0.0.1") -> _StoreRoutes:
    """The C{on_routes} callback of L{nova.cluster.heartbeat.ClusterMembership} that keeps C{listeners} in step."""
    return _StoreRoutes(listeners, tuple(static), default_bind)


@dataclass
class _StoreRoutes:
    listeners: RouteListeners
    static: tuple[Route, ...]
    default_bind: str

    log = Logger()

    def __call__(self, version: int, records: Sequence[RouteRecord]) -> Deferred[None]:
        wanted = desired(self.static, records, self.default_bind)
        for rid, problem in wanted.problems.items():
            self.log.warn("route {id} from the store is left out: {problem}", id=rid, problem=problem)
        return self.listeners.apply(wanted.routes)
