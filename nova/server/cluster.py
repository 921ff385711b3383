"""
NOVAS's part in the cluster (issue 16): the route listeners (command-line
routes, static and read-only, and the routes of the store), the membership
service that heartbeats this server and its tunnels into the store, and
what the admin API's cluster endpoints ask of them (L{ClusterControl}).

The cluster itself is L{nova.cluster}; this module only wires it to the
server's registry, audit and route factory.  Reaching an agent held by
another member (discovery or peering) is not here: a route matches the
agents this server holds.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

import nova
from nova.admin.audit import Audit
from nova.admin.cluster_api import Conflict, NotFound, Refused, Unavailable
from nova.cluster.heartbeat import ClusterMembership, Runner, WorkerThread
from nova.cluster.listeners import ListenFor, RouteListeners
from nova.cluster.store import ClusterStore, ClusterStoreError, DuplicateRoute, PostgresClusterStore
from nova.rules.drains import DrainLedger
from nova.rules.membership import ClusterView, Membership
from nova.rules.records import DrainRequest, RouteRecord, ServerRecord, TunnelRecord
from nova.rules.routes import Route, Selector
from nova.rules.routetable import (
    STATIC_PREFIX,
    RouteRejected,
    desired,
    listen_key,
    new_route_id,
    validate,
    validate_id,
)
from nova.rules.selection import remote_load
from nova.wire.errors import ErrorCode

from .registry import Registry


@runtime_checkable
class Drainable(Protocol):
    """What a drain asks of a tunnel this server holds (L{ServerTunnel} has it)."""

    registered: bool
    registered_at: float
    draining: bool

    def send_goaway(self, code: ErrorCode, message: str) -> None: ...

    def drain(
        self, timeout: float, code: ErrorCode = ErrorCode.SHUTDOWN, message: str = "draining"
    ) -> Deferred[None]: ...


# Routes given without BIND listen here, on the command line and in the store alike.
DEFAULT_BIND = "127.0.0.1"


class ServerCluster:
    """
    The cluster as this server takes part in it.  C{listeners} and
    C{membership} are services the server starts (listeners first, so a
    command-line route that cannot listen stops it before it joins);
    C{local_tunnels} describes the tunnels this server holds (the admin
    API's description, which the heartbeat also writes).
    """

    log = Logger()

    def __init__(
        self,
        server_id: str,
        address: str,
        static: Sequence[Route],
        store: ClusterStore,
        dead_timeout: float,
        registry: Registry,
        local_tunnels: Callable[[], list[dict[str, Any]]],
        listen_for: ListenFor,
        audit: Audit,
        clock: IReactorTime,
        drain_timeout: float,
        run: Runner | None = None,
    ) -> None:
        self.me = server_id
        self.static = tuple(static)
        self.store = store
        self.store_name = "PostgreSQL" if isinstance(store, PostgresClusterStore) else "SQLite"
        self.registry = registry
        self.local_tunnels = local_tunnels
        self.audit = audit
        self.clock = clock
        self.drain_timeout = drain_timeout
        self.dead_timeout = dead_timeout
        self.drains = DrainLedger()
        self.records: tuple[RouteRecord, ...] = ()
        self.problems: dict[str, str] = {}
        self.listeners = RouteListeners(
            listen_for, initial={f"{STATIC_PREFIX}{i}": r for i, r in enumerate(self.static)}
        )
        me = ServerRecord(server_id, address, clock.seconds(), nova.__version__, 0.0)
        self.membership = ClusterMembership(
            store,
            Membership(me, dead_timeout, clock),
            lambda: [TunnelRecord.described(server_id, t) for t in self.local_tunnels()],
            clock,
            run=run if run is not None else WorkerThread(clock),
            on_routes=self._routes_changed,
            on_drains=self._drains_read,
            on_view=self._view_read,
        )

    # -- following the store

    def static_failures(self) -> dict[Route, str]:
        """The command-line routes that could not listen, with why: each stops the server at start-up."""
        failed = self.listeners.failed
        return {r: failed[f"{STATIC_PREFIX}{i}"] for i, r in enumerate(self.static) if f"{STATIC_PREFIX}{i}" in failed}

    def in_force(self) -> dict[str, Route]:
        """Every route this server should listen for now, by id."""
        return desired(self.static, self.records, DEFAULT_BIND).routes

    def _routes_changed(self, version: int, records: Sequence[RouteRecord]) -> Deferred[None]:
        self.records = tuple(records)
        wanted = desired(self.static, self.records, DEFAULT_BIND)
        for rid, problem in wanted.problems.items():
            if self.problems.get(rid) != problem:
                self.log.warn("route {id} from the store is left out: {problem}", id=rid, problem=problem)
        self.problems = dict(wanted.problems)
        return self.listeners.apply(wanted.routes)

    def _view_read(self, view: ClusterView) -> None:
        """A fresh view: rank this server's tunnels by their agents' load on the whole cluster."""
        self.registry.remote_load = remote_load(self.me, view.tunnels)

    def _drains_read(self, requests: Sequence[DrainRequest]) -> None:
        """
        The live drain requests (every poll): drain our tunnel of each agent
        asked, once per request.  The tunnel is held, taking no new stream,
        for the whole drain timeout, even once its open streams have ended,
        and only then closed: NOVAC takes a GOAWAY SHUTDOWN for a restart and
        registers again about a second after its tunnel closes, and its new
        tunnel is not drained (one-shot).  Closing an idle tunnel at once, as
        a shutdown does, would put the agent back in rotation within a
        second of the request; held, it stays out for the drain timeout.
        """
        for request, tunnel in self.drains.due(requests, self._held, self.clock.seconds()):
            self.log.info(
                "agent {agent} drained by {who} (asked through {server}): GOAWAY sent;"
                " no new streams for {timeout}s, its open streams have as long",
                agent=request.agent,
                who=request.requested_by,
                server=request.server,
                timeout=self.drain_timeout,
            )
            tunnel.send_goaway(ErrorCode.SHUTDOWN, "drained by the administrator")
            self.clock.callLater(self.drain_timeout, self._drain_over, tunnel)

    def _drain_over(self, tunnel: Drainable) -> None:
        """The drain timeout has passed: close the tunnel (cutting streams still open), so the agent registers anew."""
        if tunnel.registered:
            tunnel.drain(0.0, ErrorCode.SHUTDOWN, "the drain is over: register again")

    def _held(self, agent: str) -> Drainable | None:
        tunnel = self.registry.get(agent)
        return tunnel if isinstance(tunnel, Drainable) and tunnel.registered else None

    # -- the views (ClusterControl)

    def tunnels(self, server: str | None = None) -> dict[str, Any]:
        view = self.membership.view()
        rows = [dict(t, server=self.me) for t in self.local_tunnels()]
        rows += [_remote(t) for t in view.tunnels]
        if server is not None:
            rows = [t for t in rows if t["server"] == server]
        return {"server": self.me, "stale_since": view.stale_since, "tunnels": rows}

    def servers(self) -> dict[str, Any]:
        view = self.membership.view()
        held: dict[str, int] = {}
        for t in view.tunnels:
            held[t.server] = held.get(t.server, 0) + 1
        members = []
        for s in view.servers:
            mine = s.id == self.me
            members.append(
                {
                    "id": s.id,
                    "address": s.address,
                    "started": s.started,
                    "version": s.version,
                    "heartbeat": s.heartbeat if s.heartbeat else None,
                    "this": mine,
                    # Another member's state is what the store last said; while
                    # the store is unreachable it is unknown.
                    "state": "up" if mine else ("unknown" if view.stale else "alive"),
                    "tunnels": len(self.local_tunnels()) if mine else held.get(s.id, 0),
                }
            )
        return {
            "server": self.me,
            "store": self.store_name,
            "as_of": view.as_of,
            "stale_since": view.stale_since,
            "error": self.membership.membership.last_error,
            "servers": members,
        }

    def routes(self) -> dict[str, Any]:
        view = self.membership.view()
        ports = self.listeners.ports()
        failed = self.listeners.failed
        dynamic = {r.id: r for r in self.records}
        out: list[dict[str, Any]] = []
        for rid, route in self.in_force().items():
            record = dynamic.get(rid)
            port = ports.get(rid)
            out.append(
                {
                    "id": rid,
                    "route": str(route),
                    "static": record is None,
                    "listening": port is not None,
                    "port": port.getHost().port if port is not None else route.port,  # type: ignore[attr-defined]
                    "error": failed.get(rid),
                    "agents": self._agents(route.selector, view.tunnels),
                    "created_by": record.created_by if record else "command line",
                    "created_at": record.created_at if record else None,
                }
            )
        for rid, problem in self.problems.items():
            record = dynamic.get(rid)
            out.append(
                {
                    "id": rid,
                    "route": record.spec if record else "",
                    "static": False,
                    "listening": False,
                    "port": None,
                    "error": problem,
                    "agents": 0,
                    "created_by": record.created_by if record else "",
                    "created_at": record.created_at if record else None,
                }
            )
        return {"server": self.me, "stale_since": view.stale_since, "routes": out}

    def _agents(self, selector: Selector, remote: Sequence[TunnelRecord]) -> int:
        """Tunnels of the whole cluster that could take this route's streams (matching, not draining)."""
        here = sum(not t.draining for t in self.registry.matching(selector))
        there = sum(not t.draining and selector.matches(t.agent, dict(t.tags)) for t in remote)
        return here + there

    # -- the changes (ClusterControl)

    def add_route(self, spec: object, route_id: object, who: str) -> Deferred[dict[str, Any]]:
        try:
            if not isinstance(spec, str):
                raise Refused('"route" is a string: [BIND:]PORT:HOST:HOSTPORT[@SELECTOR]')
            if route_id is not None and not isinstance(route_id, str):
                raise Refused('"id" is a string')
            rid = validate_id(route_id) if route_id is not None else new_route_id()
            route = validate(spec, DEFAULT_BIND)
            key = listen_key(route)
            for i, static in enumerate(self.static):
                if key is not None and listen_key(static) == key:
                    raise Conflict(f"{key} is already the listening address of command-line route {STATIC_PREFIX}{i}")
        except DuplicateRoute as e:
            return fail(Conflict(str(e)))
        except RouteRejected as e:
            return fail(Refused(str(e)))
        except Refused as e:
            return fail(e)
        record = RouteRecord(rid, spec.strip(), who, self.clock.seconds())
        d = self.membership.change(lambda store: store.add_route(record, DEFAULT_BIND))

        def added(_: int) -> dict[str, Any]:
            self.audit.route_added(rid, str(route), who)
            self.log.info("route {route} ({id}) added by {who}", route=str(route), id=rid, who=who)
            return {"id": rid, "route": str(route), "created_by": who, "created_at": record.created_at}

        return d.addCallbacks(added, self._refusal)

    def remove_route(self, route_id: str, who: str) -> Deferred[dict[str, Any]]:
        if route_id.startswith(STATIC_PREFIX):
            return fail(
                Conflict(
                    f"route {route_id[:64]!r} comes from the command line (--route / NOVAS_ROUTES) and is read-only:"
                    " change it there and restart"
                )
            )

        def remove(store: ClusterStore) -> tuple[int | None, str]:
            # The spec as the store has it (this server may not have polled
            # it yet, if another member added it a moment ago): for the audit.
            spec = next((r.spec for r in store.routes()[1] if r.id == route_id), "")
            return store.remove_route(route_id), spec

        d = self.membership.change(remove)

        def removed(outcome: tuple[int | None, str]) -> dict[str, Any]:
            version, spec = outcome
            if version is None:
                raise NotFound(f"no route {route_id[:64]!r}")
            self.audit.route_removed(route_id, spec, who)
            self.log.info("route {id} removed by {who}", id=route_id, who=who)
            return {"id": route_id, "route": spec, "removed": True}

        return d.addCallbacks(removed, self._refusal)

    def _refusal(self, failure: Failure) -> Failure:
        error = failure.value
        if isinstance(error, DuplicateRoute):
            raise Conflict(str(error))
        if isinstance(error, RouteRejected):
            raise Refused(str(error))
        if isinstance(error, ClusterStoreError):
            raise Unavailable(
                f"the cluster store ({self.store_name}) cannot be reached, so routes cannot change now: {error}"
            )
        return failure

    def drain(self, agent: str, who: str) -> Deferred[dict[str, Any]]:
        """
        Record a drain request in the store for every member (each applies
        it at its next poll, within about 2 s), and apply it here at once.
        404 when no member holds the agent; 503 when the store cannot be
        reached, and then nothing is drained, here either: the answer
        means what it says, and the request can be made again.
        """
        holders = self._holders(agent)
        if not holders:
            return fail(NotFound(f"no agent {agent[:64]!r} in the cluster"))
        now = self.clock.seconds()
        request = DrainRequest(
            f"d-{secrets.token_hex(6)}", agent, who, now, self.me, now + self.drain_timeout + self.dead_timeout
        )
        d = self.membership.change(lambda store: store.add_drain(request))

        def recorded(_: None) -> dict[str, Any]:
            self._drains_read([request])  # here at once (unless the poll after the change was quicker)
            self.audit.tunnel_drained(agent, who)
            return {
                "agent": agent,
                "server": self.me,
                "servers": holders,
                "status": "draining",
                "request": {
                    "id": request.id,
                    "requested_by": who,
                    "requested_at": request.requested_at,
                    "expires": request.expires,
                },
            }

        def refused(failure: Failure) -> Failure:
            if isinstance(failure.value, ClusterStoreError):
                raise Unavailable(
                    f"the cluster store ({self.store_name}) cannot be reached, so the drain cannot be recorded"
                    f" for the other members; nothing was drained: {failure.getErrorMessage()}"
                )
            return failure

        return d.addCallbacks(recorded, refused)

    def _holders(self, agent: str) -> list[str]:
        """The members that hold a tunnel of C{agent}: this one (live) and the others (as of the view)."""
        holders = {t.server for t in self.membership.view().tunnels if t.agent == agent}
        if self._held(agent) is not None:
            holders.add(self.me)
        return sorted(holders)


def _remote(t: TunnelRecord) -> dict[str, Any]:
    """Another member's tunnel in the shape of the admin API's own (fields the store does not keep are absent)."""
    return {
        "name": t.agent,
        "tags": dict(t.tags),
        "connected_since": t.since,
        "status": "draining" if t.draining else "connected",
        "active_streams": t.streams,
        "bytes_to_agent": t.bytes_to_agent,
        "bytes_from_agent": t.bytes_from_agent,
        "token_id": t.token_id,
        "server": t.server,
    }
