"""
The admin API's cluster endpoints over the real HTTP stack (L{BoundedSite}
on a L{StringTransport}), with the server's own L{ServerCluster} on a
SQLite store, a memory reactor for the route listeners and a C{Clock}:
routes added, refused and removed, what the audit records, the cluster
views (other members' tunnels, staleness), drain, and the 503 when the
store is gone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IListeningPort, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from nova.admin.audit import Audit
from nova.admin.web import admin_resource
from nova.cluster.heartbeat import inline
from nova.cluster.store import SQLiteClusterStore
from nova.rules.membership import Beat
from nova.rules.records import DrainRequest, RouteRecord, ServerRecord, TunnelRecord
from nova.rules.routes import Route, Selector, parse_route
from nova.server.cluster import ServerCluster
from nova.server.registry import Registry
from nova.site import MAX_REQUEST_BODY, BoundedSite
from nova.wire.errors import ErrorCode

TOKEN = "cluster-admin-token-1"


class _Recorded(Audit):
    """An audit that keeps what it was told."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str, dict[str, Any]]] = []

    def _record(self, kind: str, agent: str, **data: Any) -> None:
        self.events.append((kind, agent, data))


class _GoneStore(SQLiteClusterStore):
    """A store that answers until C{gone} is set, then fails every call as a lost database would."""

    gone = False

    def _connect(self) -> Any:
        if self.gone:
            raise OSError("connection refused")
        return super()._connect()

    def _tx(self) -> Any:
        if self.gone:
            self.close()
        return super()._tx()


def _respond(site: BoundedSite, raw: bytes) -> tuple[int, dict[str, Any]]:
    channel = site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 50000))
    transport = StringTransport()
    channel.makeConnection(transport)
    channel.dataReceived(raw)
    head, _, body = transport.value().partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    try:
        return status, json.loads(body) if body else {}
    except ValueError:
        return status, {"raw": body}


class ClusterApiTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_800_000_000)
        self.store = _GoneStore(Path(self.mktemp()) / "cluster.sqlite3")
        self.audit = _Recorded()
        self.registry = Registry()
        self.static = (parse_route("127.0.0.1:7001:db:5432@env=prod"),)

        self.ports: set[int] = set()

        def listen_for(route: Route) -> tuple[_Endpoint, Factory]:
            return _Endpoint(self.ports, route.port), Factory.forProtocol(Protocol)

        self.cluster = ServerCluster(
            "novas-a",
            "novas-a:9022",
            self.static,
            self.store,
            30.0,
            self.registry,
            lambda: [],
            listen_for,
            self.audit,
            self.reactor,
            30.0,
            run=inline,
        )
        self.cluster.listeners.startService()
        self.cluster.membership.startService()
        self.addCleanup(self.cluster.membership.stopService)
        self.site = BoundedSite(
            admin_resource(TOKEN.encode(), lambda: [], "novas-a", None, lambda: True, self.cluster),
            reactor=self.reactor,
        )

    def call(
        self, method: str, path: str, body: object = None, token: str | None = TOKEN, raw: bytes | None = None
    ) -> tuple[int, dict[str, Any]]:
        data = raw if raw is not None else (b"" if body is None else json.dumps(body).encode())
        head = [f"{method} {path} HTTP/1.1", "Host: x", f"Content-Length: {len(data)}", "Connection: close"]
        if token is not None:
            head.append(f"Authorization: Bearer {token}")
        return _respond(self.site, ("\r\n".join(head) + "\r\n\r\n").encode() + data)

    def listening(self) -> set[int]:
        return set(self.ports)

    def add(self, spec: str) -> str:
        status, answer = self.call("POST", "/api/v1/routes", {"route": spec})
        self.assertEqual(status, 201, answer)
        return str(answer["id"])

    # -- routes

    def test_a_route_added_listens_and_is_listed_with_its_id(self) -> None:
        rid = self.add("7002:cache:6379@team=db")
        self.assertTrue(rid.startswith("r-"))
        self.assertIn(7002, self.listening())
        status, listed = self.call("GET", "/api/v1/routes")
        self.assertEqual(status, 200)
        by_id = {r["id"]: r for r in listed["routes"]}
        self.assertEqual(set(by_id), {"static-0", rid})
        self.assertEqual(by_id[rid]["route"], "127.0.0.1:7002:cache:6379@team=db")
        self.assertEqual(
            (by_id[rid]["static"], by_id[rid]["listening"], by_id[rid]["created_by"]), (False, True, "admin")
        )
        self.assertTrue(by_id["static-0"]["static"])
        self.assertEqual(by_id[rid]["agents"], 0)  # the page warns: no agent matches
        self.assertEqual(
            [(k, d["route_id"], d["who"]) for k, _, d in self.audit.events], [("route_added", rid, "admin")]
        )

    def test_a_given_id_is_kept(self) -> None:
        status, answer = self.call("POST", "/api/v1/routes", {"route": "7003:h:1", "id": "pg-main"})
        self.assertEqual((status, answer["id"]), (201, "pg-main"))

    def test_a_route_removed_stops_listening_and_is_audited(self) -> None:
        rid = self.add("7002:cache:6379")
        status, answer = self.call("DELETE", f"/api/v1/routes/{rid}")
        self.assertEqual((status, answer["removed"]), (200, True))
        self.assertNotIn(7002, self.listening())
        self.assertIn(7001, self.listening())  # the others are left alone
        self.assertEqual(
            [(k, d["route_id"], d["route"]) for k, _, d in self.audit.events],
            [("route_added", rid, "127.0.0.1:7002:cache:6379"), ("route_removed", rid, "7002:cache:6379")],
        )
        self.assertEqual(self.call("DELETE", f"/api/v1/routes/{rid}")[0], 404)

    def test_invalid_routes_are_refused_with_the_reason(self) -> None:
        cases: dict[bytes, str] = {
            b'{"route": "nonsense"}': "is not [BIND:]PORT:HOST:HOSTPORT",
            b'{"route": "99999:h:1"}': "99999",
            b'{"route": ""}': "route is empty",
            b'{"route": "7002:h:1\\n"}': "control character",
            b'{"route": 7002}': '"route" is a string',
            b'{"route": "7002:h:1", "id": "static-9"}': "command line's",
            b'{"route": "7002:h:1", "id": "a b"}': "is not 1-64",
            b'{"route": "7002:h:1", "admin": true}': "unknown field",
            b"{}": 'give {"route"',
            b"[1, 2]": "not a JSON object",
            b"not json": "not JSON",
            b"\xff\xfe": "not JSON",
        }
        for raw, reason in cases.items():
            status, answer = self.call("POST", "/api/v1/routes", raw=raw)
            self.assertEqual(status, 400, raw)
            self.assertIn(reason, answer["error"], raw)
        self.assertEqual(self.audit.events, [])
        self.assertEqual(self.listening(), {7001})

    def test_a_duplicate_listening_address_is_a_conflict(self) -> None:
        rid = self.add("7002:cache:6379")
        status, answer = self.call("POST", "/api/v1/routes", {"route": "127.0.0.1:7002:other:1"})
        self.assertEqual(status, 409)
        self.assertIn(rid, answer["error"])
        status, answer = self.call("POST", "/api/v1/routes", {"route": "7001:other:1"})
        self.assertEqual(status, 409)
        self.assertIn("command-line route static-0", answer["error"])
        self.assertEqual(self.call("POST", "/api/v1/routes", {"route": "7004:h:1", "id": rid})[0], 409)

    def test_command_line_routes_are_read_only(self) -> None:
        status, answer = self.call("DELETE", "/api/v1/routes/static-0")
        self.assertEqual(status, 409)
        self.assertIn("command line", answer["error"])
        self.assertIn(7001, self.listening())

    def test_unknown_ids_and_paths(self) -> None:
        self.assertEqual(self.call("DELETE", "/api/v1/routes/r-000000000000")[0], 404)
        self.assertEqual(self.call("DELETE", "/api/v1/routes/a/b")[0], 404)
        self.assertEqual(self.call("GET", "/api/v1/routes/r-1")[0], 405)
        self.assertEqual(self.call("PUT", "/api/v1/routes", {"route": "7002:h:1"})[0], 405)
        self.assertEqual(self.call("POST", "/api/v1/tunnels/x/undrain")[0], 404)

    def test_the_token_is_required_for_every_change(self) -> None:
        rid = self.add("7002:cache:6379")
        for token in (None, "wrong-token-12345", TOKEN + "x"):
            self.assertEqual(self.call("POST", "/api/v1/routes", {"route": "7003:h:1"}, token)[0], 401)
            self.assertEqual(self.call("DELETE", f"/api/v1/routes/{rid}", token=token)[0], 401)
            self.assertEqual(self.call("POST", "/api/v1/tunnels/a/drain", token=token)[0], 401)
            self.assertEqual(self.call("GET", "/api/v1/servers", token=token)[0], 401)
        self.assertEqual(self.listening(), {7001, 7002})

    def test_an_oversized_body_is_refused_before_it_is_read(self) -> None:
        raw = json.dumps({"route": "7002:" + "h" * MAX_REQUEST_BODY + ":1"}).encode()
        status, _ = self.call("POST", "/api/v1/routes", raw=raw)
        self.assertEqual(status, 413)
        self.assertEqual(self.audit.events, [])

    def test_a_long_spec_is_refused(self) -> None:
        status, answer = self.call("POST", "/api/v1/routes", {"route": "7002:" + "h" * 2000 + ":1"})
        self.assertEqual(status, 400)
        self.assertIn("characters long", answer["error"])

    def test_a_route_added_by_another_server_is_followed_at_the_next_poll(self) -> None:
        self.store.add_route(RouteRecord("r-elsewhere", "7005:h:1", "admin", 1.0))
        self.assertNotIn(7005, self.listening())
        self.reactor.advance(2.0)
        self.assertIn(7005, self.listening())
        self.store.remove_route("r-elsewhere")
        self.reactor.advance(2.0)
        self.assertNotIn(7005, self.listening())
        # Removed through this server's API before it polled: audited with its spec all the same.
        self.store.add_route(RouteRecord("r-new", "7006:h:1", "admin", 2.0))
        self.assertEqual(self.call("DELETE", "/api/v1/routes/r-new")[0], 200)
        self.assertEqual(self.audit.events[-1][2]["route"], "7006:h:1")

    # -- drain

    def hold(self, name: str) -> _Tunnel:
        tunnel = _Tunnel(name, registered_at=self.reactor.seconds())
        self.registry.register(tunnel)
        return tunnel

    def test_a_drain_here_is_applied_at_once_recorded_and_audited_once(self) -> None:
        tunnel = self.hold("db-1")
        self.reactor.advance(1.0)
        status, answer = self.call("POST", "/api/v1/tunnels/db-1/drain")
        self.assertEqual(status, 202, answer)
        self.assertEqual((answer["servers"], answer["server"], answer["status"]), (["novas-a"], "novas-a", "draining"))
        request = answer["request"]
        self.assertEqual(request["requested_by"], "admin")
        # Kept in the store for the drain timeout and the dead timeout (30 s each here).
        self.assertEqual(request["expires"], request["requested_at"] + 60.0)
        self.assertEqual(tunnel.goaways, ["SHUTDOWN"])  # at once, before any poll
        self.assertEqual([(k, a, d["who"]) for k, a, d in self.audit.events], [("tunnel_drained", "db-1", "admin")])
        # The poll reads the request back: not applied twice, not audited again.
        self.reactor.advance(2.0)
        self.assertEqual(tunnel.goaways, ["SHUTDOWN"])
        self.assertEqual(len(self.audit.events), 1)
        # Held, taking no stream, for the drain timeout; then closed (what is still open is cut).
        self.assertEqual(tunnel.drained, [])
        self.reactor.advance(28.0)
        self.assertEqual(tunnel.drained, [0.0])

    def test_a_request_made_through_another_member_is_applied_at_the_next_poll(self) -> None:
        tunnel = self.hold("db-1")
        self.reactor.advance(1.0)
        now = self.reactor.seconds()
        self.store.add_drain(DrainRequest("d-elsewhere", "db-1", "admin", now, "novas-b", now + 60))
        self.assertEqual(tunnel.goaways, [])
        self.reactor.advance(2.0)
        self.assertEqual(tunnel.goaways, ["SHUTDOWN"])
        self.assertEqual(self.audit.events, [])  # audited by the server that answered, not here
        # The agent's next tunnel (registered after the request) is not drained by it.
        fresh = self.hold("db-1")
        self.reactor.advance(2.0)
        self.assertEqual(fresh.goaways, [])
        # The request expires from the store (the next heartbeat after its expiry deletes it).
        self.reactor.advance(60.0)
        self.assertEqual(self.store.drains(0.0), [])
        self.assertEqual(tunnel.drained, [])  # replaced by the fresh one meanwhile: nothing left to close

    def test_repeated_drains_are_each_audited_and_never_an_error(self) -> None:
        tunnel = self.hold("db-1")
        self.reactor.advance(1.0)
        for _ in range(3):
            self.assertEqual(self.call("POST", "/api/v1/tunnels/db-1/drain")[0], 202)
        self.assertEqual(tunnel.goaways, ["SHUTDOWN"])  # one GOAWAY: it is draining already
        self.assertEqual([k for k, _, _ in self.audit.events], ["tunnel_drained"] * 3)
        self.assertEqual(len(self.store.drains(self.reactor.seconds())), 3)

    def test_unknown_and_odd_names_are_not_found(self) -> None:
        self.hold("db-1")
        for name in ("nobody", "db-1%20", "db-1%2Fdrain", "%00", "%C3%A9t%C3%A9", "x" * 300, "db-%FF"):
            status, answer = self.call("POST", f"/api/v1/tunnels/{name}/drain")
            self.assertEqual(status, 404, name)
            self.assertLess(len(answer.get("error", "")), 200, name)
        self.assertEqual(self.audit.events, [])
        self.assertEqual(self.store.drains(0.0), [])

    def test_with_the_store_gone_a_drain_is_refused_and_nothing_is_drained(self) -> None:
        tunnel = self.hold("db-1")
        self.store.gone = True
        self.reactor.advance(10.0)
        status, answer = self.call("POST", "/api/v1/tunnels/db-1/drain")
        self.assertEqual(status, 503)
        self.assertIn("cluster store (SQLite)", answer["error"])
        self.assertIn("nothing was drained", answer["error"])
        self.assertEqual((tunnel.goaways, self.audit.events), ([], []))
        self.store.gone = False
        self.assertEqual(self.call("POST", "/api/v1/tunnels/db-1/drain")[0], 202)
        self.assertEqual(tunnel.goaways, ["SHUTDOWN"])

    # -- selection by the cluster's load

    def test_choice_ranks_agents_by_their_streams_on_the_whole_cluster(self) -> None:
        self.hold("db-1")
        self.hold("db-2")
        other = ServerRecord("novas-b", "novas-b:9022", 5.0, "0.1.0", self.reactor.seconds())
        self.store.heartbeat(Beat(other, (TunnelRecord("novas-b", "db-1", streams=5),), 0.0))
        chosen = {self.registry.choose(Selector()).name for _ in range(4)}  # type: ignore[union-attr]
        self.assertEqual(chosen, {"db-1", "db-2"})  # not read yet: equal
        self.reactor.advance(10.0)  # our next heartbeat reads novas-b's row
        chosen = {self.registry.choose(Selector()).name for _ in range(4)}  # type: ignore[union-attr]
        self.assertEqual(chosen, {"db-2"})
        # The store gone: the last view still ranks.
        self.store.gone = True
        self.reactor.advance(10.0)
        self.assertEqual(self.registry.choose(Selector()).name, "db-2")  # type: ignore[union-attr]

    # -- the store gone

    def test_with_the_store_gone_changes_are_refused_and_the_views_say_stale(self) -> None:
        rid = self.add("7002:cache:6379")
        self.store.gone = True
        self.reactor.advance(10.0)  # a heartbeat fails
        status, answer = self.call("POST", "/api/v1/routes", {"route": "7003:h:1"})
        self.assertEqual(status, 503)
        self.assertIn("cluster store (SQLite)", answer["error"])
        self.assertEqual(self.call("DELETE", f"/api/v1/routes/{rid}")[0], 503)
        for path in ("/api/v1/servers", "/api/v1/tunnels", "/api/v1/routes"):
            status, view = self.call("GET", path)
            self.assertEqual(status, 200)
            self.assertEqual(view["stale_since"], 1_800_000_010.0, path)
        self.assertEqual(self.listening(), {7001, 7002})  # the routes in force stay in force
        self.store.gone = False
        self.reactor.advance(10.0)
        self.assertIsNone(self.call("GET", "/api/v1/servers")[1]["stale_since"])
        self.assertEqual(self.call("DELETE", f"/api/v1/routes/{rid}")[0], 200)

    # -- the cluster's view

    def test_other_members_and_their_tunnels_are_shown(self) -> None:
        other = ServerRecord("novas-b", "novas-b:9022", 5.0, "0.1.0", self.reactor.seconds())
        tunnel = TunnelRecord("novas-b", "db-1", {"env": "prod"}, "tok-1", 6.0, 2, 10, 20)
        self.store.heartbeat(Beat(other, (tunnel,), 0.0))
        self.reactor.advance(10.0)
        status, servers = self.call("GET", "/api/v1/servers")
        self.assertEqual(status, 200)
        by_id = {s["id"]: s for s in servers["servers"]}
        self.assertEqual(set(by_id), {"novas-a", "novas-b"})
        self.assertEqual((by_id["novas-b"]["state"], by_id["novas-b"]["tunnels"]), ("alive", 1))
        self.assertTrue(by_id["novas-a"]["this"])
        _, tunnels = self.call("GET", "/api/v1/tunnels")
        [row] = tunnels["tunnels"]
        self.assertEqual((row["name"], row["server"], row["active_streams"]), ("db-1", "novas-b", 2))
        self.assertEqual(self.call("GET", "/api/v1/tunnels?server=novas-a")[1]["tunnels"], [])
        self.assertEqual(len(self.call("GET", "/api/v1/tunnels?server=novas-b")[1]["tunnels"]), 1)
        # The static route matches env=prod: the cluster has an agent for it.
        routes = {r["id"]: r for r in self.call("GET", "/api/v1/routes")[1]["routes"]}
        self.assertEqual(routes["static-0"]["agents"], 1)
        # A tunnel only another server holds: the request goes to the store for it
        # (it used to be 409 "ask that server"; the drain is cluster-wide now).
        status, answer = self.call("POST", "/api/v1/tunnels/db-1/drain")
        self.assertEqual((status, answer["servers"]), (202, ["novas-b"]))
        self.assertEqual([r.agent for r in self.store.drains(self.reactor.seconds())], ["db-1"])
        self.assertEqual(self.call("POST", "/api/v1/tunnels/nobody/drain")[0], 404)
        # Its heartbeats stop: gone from the view within the dead timeout.
        self.reactor.advance(31.0)
        self.assertEqual([s["id"] for s in self.call("GET", "/api/v1/servers")[1]["servers"]], ["novas-a"])
        self.assertEqual(self.call("GET", "/api/v1/tunnels")[1]["tunnels"], [])


class _Tunnel:
    """A registered tunnel that records its drains."""

    def __init__(self, name: str, registered_at: float) -> None:
        self.name = name
        self.tags: dict[str, str] = {}
        self.draining = False
        self.registered = True
        self.registered_at = registered_at
        self.goaways: list[str] = []
        self.drained: list[float] = []

    def open_streams(self) -> int:
        return 0

    def open_stream(self, host: str, port: int, early: object = None) -> Deferred[Any]:
        return Deferred()

    def replaced(self) -> None:
        self.registered = False

    def send_goaway(self, code: ErrorCode, message: str) -> None:
        self.draining = True
        self.goaways.append(code.name)

    def drain(self, timeout: float, code: ErrorCode = ErrorCode.SHUTDOWN, message: str = "draining") -> Deferred[None]:
        self.draining = True
        self.drained.append(timeout)
        return Deferred()


@implementer(IListeningPort)
class _Port:
    def __init__(self, ports: set[int], port: int) -> None:
        self.ports, self.port = ports, port

    def startListening(self) -> None:
        self.ports.add(self.port)

    def stopListening(self) -> None:
        self.ports.discard(self.port)

    def getHost(self) -> IPv4Address:
        return IPv4Address("TCP", "127.0.0.1", self.port)


@implementer(IStreamServerEndpoint)
class _Endpoint:
    """Listens in a set of port numbers: what the route listeners started and stopped."""

    def __init__(self, ports: set[int], port: int) -> None:
        self.ports, self.port = ports, port

    def listen(self, factory: object) -> Deferred[IListeningPort]:
        if self.port in self.ports:
            return fail(CannotListenError("127.0.0.1", self.port, OSError("in use")))
        port = _Port(self.ports, self.port)
        port.startListening()
        return succeed(port)


class ClusterSettingsTests(SynchronousTestCase):
    """The cluster's settings: typed, defaults derived and said so in --help."""

    def config(self, **env: str) -> Any:
        from nova.config import resolve
        from nova.server.options import SETTINGS, build_config

        base = {"NOVAS_AGENT_TOKEN": "x" * 16, "NOVAS_AGENT_PORT": "9100"}
        return build_config(resolve(SETTINGS, {}, base | env))

    def test_defaults_follow_the_host_name_the_agent_port_and_the_dead_timeout(self) -> None:
        import socket

        c = self.config(NOVAS_DEAD_TIMEOUT="20")
        self.assertEqual(c.server_id, socket.gethostname())
        self.assertEqual(c.advertise_address, f"{socket.gethostname()}:9100")
        self.assertEqual(c.cluster_dead_timeout, 20.0)

    def test_given_values(self) -> None:
        c = self.config(
            NOVAS_SERVER_ID="novas-b", NOVAS_ADVERTISE_ADDRESS="10.0.0.2:9022", NOVAS_CLUSTER_DEAD_TIMEOUT="6"
        )
        self.assertEqual((c.server_id, c.advertise_address, c.cluster_dead_timeout), ("novas-b", "10.0.0.2:9022", 6.0))

    def test_bad_values_name_the_setting(self) -> None:
        from nova.config import ConfigError

        for env, label in (
            ({"NOVAS_SERVER_ID": "a b"}, "--server-id / NOVAS_SERVER_ID"),
            ({"NOVAS_SERVER_ID": "x" * 65}, "--server-id / NOVAS_SERVER_ID"),
            ({"NOVAS_CLUSTER_DEAD_TIMEOUT": "0"}, "--cluster-dead-timeout / NOVAS_CLUSTER_DEAD_TIMEOUT"),
        ):
            with self.assertRaises(ConfigError) as e:
                self.config(**env)
            self.assertIn(label, str(e.exception))

    def test_help_says_what_the_defaults_follow(self) -> None:
        from nova.config import by_name
        from nova.server.options import SETTINGS

        self.assertIn("default the host name]", by_name(SETTINGS, "server-id").doc())
        self.assertIn("default --dead-timeout's value", by_name(SETTINGS, "cluster-dead-timeout").doc())
