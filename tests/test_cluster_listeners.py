"""
Route listeners changed at run time, on real loopback sockets: a route
added listens, a removed one refuses new connections while its open ones
keep flowing, and the other routes' listeners and connections are never
touched.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Generator
from typing import Any

import pytest
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ServerEndpoint
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.threads import deferToThread
from twisted.trial.unittest import TestCase

from nova.cluster.listeners import RouteListeners, follow_store
from nova.rules.records import RouteRecord
from nova.rules.routes import Route, parse_route

from .processes import free_port


class Echo(Protocol):
    """Says which route it came through (the route's HOST), then echoes."""

    def __init__(self, route: Route) -> None:
        self.route = route

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self.route.host.encode() + b"\n")

    def dataReceived(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


def listen_for(route: Route) -> tuple[IStreamServerEndpoint, IProtocolFactory]:
    from twisted.internet import reactor

    endpoint = TCP4ServerEndpoint(reactor, route.port, interface=route.bind)
    return endpoint, Factory.forProtocol(lambda: Echo(route))


class Client:
    """A user's connection, blocking; every call runs in a thread off the reactor."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.file = self.sock.makefile("rb")

    def banner(self) -> bytes:
        return self.file.readline().strip()

    def echo(self, data: bytes) -> bytes:
        self.sock.sendall(data)
        got = b""
        while len(got) < len(data):
            chunk = self.file.read1(len(data) - len(got))
            if not chunk:
                raise ConnectionError("closed")
            got += chunk
        return got

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def connect(port: int) -> Deferred[tuple[Client, bytes]]:
    def go() -> tuple[Client, bytes]:
        client = Client(port)
        return client, client.banner()

    return deferToThread(go)


def refused(port: int) -> Deferred[bool]:
    def go() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) == errno.ECONNREFUSED

    return deferToThread(go)


@pytest.mark.integration
class RouteListenersTests(TestCase):
    timeout = 30

    def listeners(self, **kw: Any) -> RouteListeners:
        listeners = RouteListeners(listen_for, **kw)
        listeners.startService()
        self.addCleanup(listeners.stopService)
        return listeners

    def port(self, listeners: RouteListeners, rid: str) -> int:
        port: int = listeners.ports()[rid].getHost().port  # type: ignore[attr-defined]
        return port

    @inlineCallbacks
    def test_a_route_added_listens_and_a_removed_one_lets_its_connections_finish(self) -> Generator[Any, Any, None]:
        listeners = self.listeners(initial={"static-0": parse_route("0:static-target:1")})
        yield listeners.apply({"static-0": parse_route("0:static-target:1")})
        static_port = listeners.ports()["static-0"]
        static_client, banner = yield connect(self.port(listeners, "static-0"))
        self.assertEqual(banner, b"static-target")

        wanted = {"static-0": parse_route("0:static-target:1"), "r-1": parse_route("0:dynamic-target:2")}
        yield listeners.apply(wanted)
        dynamic = self.port(listeners, "r-1")
        client, banner = yield connect(dynamic)
        self.assertEqual(banner, b"dynamic-target")
        self.assertEqual((yield deferToThread(client.echo, b"before")), b"before")

        yield listeners.apply({"static-0": parse_route("0:static-target:1")})
        self.assertNotIn("r-1", listeners.ports())
        self.assertTrue((yield refused(dynamic)))  # new connections refused
        # The connection it accepted keeps flowing, both ways, until its user closes it.
        self.assertEqual((yield deferToThread(client.echo, b"after removal" * 1000)), b"after removal" * 1000)
        yield deferToThread(client.close)
        # The other route was not touched: same listening port, its connection still flows.
        self.assertIs(listeners.ports()["static-0"], static_port)
        self.assertEqual((yield deferToThread(static_client.echo, b"still here")), b"still here")
        other, banner = yield connect(self.port(listeners, "static-0"))
        self.assertEqual(banner, b"static-target")
        yield deferToThread(other.close)
        yield deferToThread(static_client.close)

    @inlineCallbacks
    def test_a_route_changed_under_its_id_listens_anew_on_the_same_port(self) -> Generator[Any, Any, None]:
        port = free_port()
        listeners = self.listeners()
        yield listeners.apply({"r-1": parse_route(f"{port}:old-target:1")})
        client, banner = yield connect(port)
        self.assertEqual(banner, b"old-target")
        yield listeners.apply({"r-1": parse_route(f"{port}:new-target:1")})
        self.assertEqual(listeners.failed, {})
        fresh, banner = yield connect(port)
        self.assertEqual(banner, b"new-target")
        self.assertEqual((yield deferToThread(client.echo, b"old one flows")), b"old one flows")
        yield deferToThread(client.close)
        yield deferToThread(fresh.close)

    @inlineCallbacks
    def test_a_route_that_cannot_listen_is_reported_and_retried_and_stops_no_other(self) -> Generator[Any, Any, None]:
        taken = socket.socket()
        taken.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        listeners = self.listeners()
        wanted = {"r-busy": parse_route(f"{busy}:busy-target:1"), "r-ok": parse_route("0:ok-target:1")}
        yield listeners.apply(wanted)
        self.assertEqual(list(listeners.ports()), ["r-ok"])
        self.assertIn("r-busy", listeners.failed)
        self.assertIn(str(busy), listeners.failed["r-busy"])
        client, banner = yield connect(self.port(listeners, "r-ok"))
        self.assertEqual(banner, b"ok-target")
        taken.close()
        yield listeners.apply(wanted)  # the next set (the next poll) tries again
        self.assertEqual(listeners.failed, {})
        busy_client, banner = yield connect(busy)
        self.assertEqual(banner, b"busy-target")
        yield deferToThread(client.close)
        yield deferToThread(busy_client.close)

    @inlineCallbacks
    def test_a_listen_for_that_raises_is_reported_not_raised(self) -> Generator[Any, Any, None]:
        def broken(route: Route) -> tuple[IStreamServerEndpoint, IProtocolFactory]:
            if route.host == "bad":
                raise ValueError("no endpoint for this")
            return listen_for(route)

        listeners = self.listeners()
        listeners.listen_for = broken
        yield listeners.apply({"r-bad": parse_route("0:bad:1"), "r-ok": parse_route("0:ok:1")})
        self.assertEqual(listeners.failed, {"r-bad": "no endpoint for this"})
        self.assertEqual(list(listeners.ports()), ["r-ok"])

    @inlineCallbacks
    def test_sets_handed_on_quickly_are_applied_in_order(self) -> Generator[Any, Any, None]:
        listeners = self.listeners()
        first = listeners.apply({"r-1": parse_route("0:one:1")})
        second = listeners.apply({"r-2": parse_route("0:two:1")})
        third = listeners.apply({"r-2": parse_route("0:two:1"), "r-3": parse_route("0:three:1")})
        yield first
        yield second
        yield third
        self.assertEqual(sorted(listeners.routes()), ["r-2", "r-3"])

    @inlineCallbacks
    def test_the_store_callback_applies_static_plus_dynamic_and_leaves_bad_rows_out(self) -> Generator[Any, Any, None]:
        static_port = free_port()
        listeners = self.listeners()
        follow = follow_store(listeners, [parse_route(f"{static_port}:static:1")])
        yield follow(
            1,
            [
                RouteRecord("r-1", "0:dynamic:2", "alice", 1.0),
                RouteRecord("r-clash", f"{static_port}:clash:3", "bob", 2.0),
                RouteRecord("r-bad", "nonsense", "bob", 3.0),
            ],
        )
        self.assertEqual(sorted(listeners.routes()), ["r-1", "static-0"])
        client, banner = yield connect(static_port)
        self.assertEqual(banner, b"static")
        yield deferToThread(client.close)
        yield follow(2, [])
        self.assertEqual(sorted(listeners.routes()), ["static-0"])

    @inlineCallbacks
    def test_stopping_the_service_stops_every_listener(self) -> Generator[Any, Any, None]:
        listeners = RouteListeners(listen_for, {"static-0": parse_route("0:static:1")})
        listeners.startService()
        yield listeners.apply(listeners.initial)
        port = self.port(listeners, "static-0")
        yield listeners.stopService()
        self.assertEqual(listeners.ports(), {})
        self.assertTrue((yield refused(port)))

    @inlineCallbacks
    def test_the_servers_own_route_factory_is_what_tap_will_hand_in(self) -> Generator[Any, Any, None]:
        from twisted.internet import reactor

        from nova.server.listener import RouteFactory
        from nova.server.registry import Registry

        def route_listener(route: Route) -> tuple[IStreamServerEndpoint, IProtocolFactory]:
            endpoint = TCP4ServerEndpoint(reactor, route.port, interface=route.bind)
            return endpoint, RouteFactory(route, Registry(), reactor, 1.0)

        listeners = RouteListeners(route_listener)
        listeners.startService()
        self.addCleanup(listeners.stopService)
        yield listeners.apply({"r-1": parse_route("0:db.internal:5432@env=prod")})
        port = self.port(listeners, "r-1")

        def no_agent_closes() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                return s.recv(1)

        # Accepted by the route, then closed: no agent matches env=prod.
        self.assertEqual((yield deferToThread(no_agent_closes)), b"")
        yield listeners.apply({})
        self.assertTrue((yield refused(port)))
