"""
Agent selection, failover and the SOCKS5 entry, against fake tunnels.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from nova.rules.routes import Selector, parse_selector
from nova.server.endpoint import AgentTimeout, NoAgent, TunnelEndpoint
from nova.server.registry import Registry
from nova.server.socks import Reply
from nova.server.tunnel import OpenFailed, TunnelGone
from nova.wire.errors import OpenFailReason

from .contexts import socks_factory


class FakeStream(StringTransport):
    def __init__(self, agent: str) -> None:
        super().__init__()
        self.agent = agent
        self.protocol: Any = None
        self.aborted = False

    def makeConnection(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self)

    def abortConnection(self) -> None:
        self.aborted = True

    def loseWriteConnection(self) -> None:
        pass


class FakeTunnel:
    def __init__(self, name: str, tags: dict[str, str] | None = None, streams: int = 0) -> None:
        self.name = name
        self.tags = tags or {}
        self.draining = False
        self.streams = streams
        self.opens: list[tuple[str, int, Deferred[Any]]] = []

    def open_streams(self) -> int:
        return self.streams

    def open_stream(self, host: str, port: int, early: Any = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.opens.append((host, port, d))
        return d

    def replaced(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"FakeTunnel({self.name})"


def registry(*tunnels: FakeTunnel) -> Registry:
    r = Registry()
    for t in tunnels:
        r.register(t)
    return r


class SelectionTests(SynchronousTestCase):
    def test_fewest_streams_wins(self) -> None:
        busy, idle = FakeTunnel("a", streams=5), FakeTunnel("b", streams=1)
        self.assertIs(registry(busy, idle).choose(Selector()), idle)

    def test_round_robin_on_ties(self) -> None:
        a, b, c = FakeTunnel("a"), FakeTunnel("b"), FakeTunnel("c")
        r = registry(a, b, c)
        chosen = [r.choose(Selector()) for _ in range(6)]
        self.assertEqual(sorted(t.name for t in chosen[:3]), ["a", "b", "c"])  # type: ignore[union-attr]
        self.assertEqual(chosen[:3], chosen[3:])

    def test_draining_never_chosen(self) -> None:
        a, b = FakeTunnel("a"), FakeTunnel("b", streams=9)
        a.draining = True
        r = registry(a, b)
        self.assertEqual({r.choose(Selector()) for _ in range(5)}, {b})
        b.draining = True
        self.assertIsNone(r.choose(Selector()))

    def test_tags_and_names(self) -> None:
        prod = FakeTunnel("p1", {"env": "prod", "team": "db"})
        dev = FakeTunnel("d1", {"env": "dev"})
        r = registry(prod, dev)
        self.assertIs(r.choose(parse_selector("env=prod")), prod)
        self.assertIs(r.choose(parse_selector("env=prod;team=db")), prod)
        self.assertIsNone(r.choose(parse_selector("env=prod;team=web")))
        self.assertIs(r.choose(parse_selector("name:d1")), dev)

    @settings(max_examples=300, deadline=None)
    @given(
        agents=st.lists(
            st.tuples(
                st.dictionaries(st.sampled_from(["env", "zone", "team"]), st.sampled_from(["a", "b"]), max_size=3),
                st.integers(0, 5),
                st.booleans(),
            ),
            max_size=8,
        ),
        wanted=st.dictionaries(st.sampled_from(["env", "zone", "team"]), st.sampled_from(["a", "b"]), max_size=2),
    )
    def test_choice_always_matches_and_is_least_loaded(
        self, agents: list[tuple[dict[str, str], int, bool]], wanted: dict[str, str]
    ) -> None:
        tunnels = []
        for i, (tags, streams, draining) in enumerate(agents):
            t = FakeTunnel(f"agent-{i}", tags, streams)
            t.draining = draining
            tunnels.append(t)
        r = registry(*tunnels)
        selector = Selector(tags=tuple(sorted(wanted.items())))
        eligible = [t for t in tunnels if not t.draining and all(t.tags.get(k) == v for k, v in wanted.items())]
        chosen = r.choose(selector)
        if not eligible:
            self.assertIsNone(chosen)
            d = TunnelEndpoint(r, selector, "h", 1, Clock()).connect(Factory.forProtocol(Protocol))
            self.assertIsInstance(self.failureResultOf(d, NoAgent).value, NoAgent)
        else:
            self.assertIn(chosen, eligible)
            self.assertEqual(chosen.open_streams(), min(t.streams for t in eligible))  # type: ignore[union-attr]


class FailoverTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.first, self.second = FakeTunnel("first"), FakeTunnel("second", streams=1)
        self.clock = Clock()
        self.endpoint = TunnelEndpoint(registry(self.first, self.second), Selector(), "db", 5432, self.clock, 30)

    def test_agent_gone_before_open_ok_fails_over(self) -> None:
        d = self.endpoint.connect(Factory.forProtocol(Protocol))
        self.first.opens[0][2].errback(TunnelGone("tunnel to first closed"))
        self.assertEqual(len(self.second.opens), 1)
        stream = FakeStream("second")
        self.second.opens[0][2].callback(stream)
        protocol = self.successResultOf(d)
        self.assertIs(stream.protocol, protocol)

    def test_draining_answer_fails_over(self) -> None:
        d = self.endpoint.connect(Factory.forProtocol(Protocol))
        self.first.opens[0][2].errback(OpenFailed(OpenFailReason.DRAINING, "bye"))
        self.second.opens[0][2].callback(FakeStream("second"))
        self.successResultOf(d)

    def test_open_timeout_fails_over(self) -> None:
        d = self.endpoint.connect(Factory.forProtocol(Protocol))
        self.first.opens[0][2].addErrback(lambda f: None)
        self.clock.advance(30)
        self.assertEqual(len(self.second.opens), 1)
        self.clock.advance(30)
        self.failureResultOf(d, AgentTimeout)

    def test_target_errors_are_final(self) -> None:
        d = self.endpoint.connect(Factory.forProtocol(Protocol))
        self.first.opens[0][2].errback(OpenFailed(OpenFailReason.REFUSED, "connection refused"))
        self.assertEqual(self.second.opens, [])
        self.assertEqual(self.failureResultOf(d, OpenFailed).value.reason, OpenFailReason.REFUSED)

    def test_cancel_stops_the_attempt(self) -> None:
        d = self.endpoint.connect(Factory.forProtocol(Protocol))
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertTrue(self.first.opens[0][2].called)
        self.assertEqual(self.second.opens, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class FreshTunnelTests(SynchronousTestCase):
    """
    One agent whose tunnel dies under an open (a blackhole, a flap, a
    stalled tunnel replaced): the open waits for the agent's fresh tunnel,
    within the open timeout, instead of failing the user's connection.
    """

    def setUp(self) -> None:
        self.old = FakeTunnel("agent")
        self.registry = registry(self.old)
        self.clock = Clock()
        self.endpoint = TunnelEndpoint(self.registry, Selector(), "db", 5432, self.clock, 30)

    def lose_old(self) -> None:
        self.registry.unregister(self.old)
        self.old.opens[0][2].errback(TunnelGone("tunnel to agent closed"))

    def test_open_moves_to_the_fresh_tunnel(self) -> None:
        d = self.endpoint.connect(Factory.forProtocol(Protocol))
        self.clock.advance(5)
        self.lose_old()
        self.assertNoResult(d)
        self.clock.advance(20)
        fresh = FakeTunnel("agent")
        self.registry.register(fresh)
        self.assertEqual([(h, p) for h, p, _ in fresh.opens], [("db", 5432)])
        stream = FakeStream("agent")
        fresh.opens[0][2].callback(stream)
        self.assertIs(stream.protocol, self.successResultOf(d))

    def test_replaced_under_the_open_moves_to_the_new_tunnel(self) -> None:
        d = self.endpoint.connect(Factory.forProtocol(Protocol))
        fresh = FakeTunnel("agent")
        self.registry.register(fresh)  # the stalled tunnel is replaced, then closes
        self.old.opens[0][2].errback(TunnelGone("tunnel to agent closed"))
        fresh.opens[0][2].callback(FakeStream("agent"))
        self.successResultOf(d)

    def test_no_fresh_tunnel_fails_when_the_open_timeout_passes(self) -> None:
        d = self.endpoint.connect(Factory.forProtocol(Protocol))
        self.clock.advance(10)
        self.lose_old()
        self.clock.advance(19.9)
        self.assertNoResult(d)
        # Another agent, not matching the route, registering does not end the wait.
        self.endpoint.selector = parse_selector("name:agent")
        self.registry.register(FakeTunnel("other"))
        self.assertNoResult(d)
        self.clock.advance(1)
        self.failureResultOf(d, TunnelGone)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_target_refused_is_still_final(self) -> None:
        d = self.endpoint.connect(Factory.forProtocol(Protocol))
        self.old.opens[0][2].errback(OpenFailed(OpenFailReason.REFUSED, "connection refused"))
        self.failureResultOf(d, OpenFailed)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_no_agent_at_all_is_still_immediate(self) -> None:
        self.registry.unregister(self.old)
        self.failureResultOf(self.endpoint.connect(Factory.forProtocol(Protocol)), NoAgent)

    def test_cancel_while_waiting(self) -> None:
        d = self.endpoint.connect(Factory.forProtocol(Protocol))
        self.lose_old()
        d.cancel()
        self.failureResultOf(d, CancelledError)
        self.assertEqual(self.clock.getDelayedCalls(), [])
        fresh = FakeTunnel("agent")
        self.registry.register(fresh)
        self.assertEqual(fresh.opens, [])

    def test_attempts_are_still_bounded(self) -> None:
        d = self.endpoint.connect(Factory.forProtocol(Protocol))
        self.lose_old()
        for _ in range(2):
            fresh = FakeTunnel("agent")
            self.registry.register(fresh)
            fresh.opens[0][2].errback(TunnelGone("gone again"))
        self.failureResultOf(d, TunnelGone)


class SocksTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.tunnel = FakeTunnel("agent", {"Env": "Production"})
        self.factory = socks_factory(registry(self.tunnel), Clock(), b"s3cret")
        self.transport = StringTransport()
        self.client = self.factory.buildProtocol(None)
        self.client.makeConnection(self.transport)

    def send(self, data: bytes) -> bytes:
        self.transport.clear()
        self.client.dataReceived(data)
        answer: bytes = self.transport.value()
        return answer

    def auth(self, user: bytes, password: bytes) -> bytes:
        self.assertEqual(self.send(b"\x05\x01\x02"), b"\x05\x02")
        return self.send(b"\x01" + bytes([len(user)]) + user + bytes([len(password)]) + password)

    def test_connect_by_domain_through_the_selected_agent(self) -> None:
        self.assertEqual(self.auth(b"Env=Production", b"s3cret"), b"\x01\x00")
        self.send(b"\x05\x01\x00\x03" + bytes([9]) + b"localhost" + struct.pack(">H", 8080))
        [(host, port, d)] = self.tunnel.opens
        self.assertEqual((host, port), ("localhost", 8080))  # resolved by the agent, not here
        d.callback(FakeStream("agent"))
        self.assertEqual(self.transport.value()[:2], b"\x05\x00")

    def test_ipv6_and_ipv4_targets(self) -> None:
        self.auth(b"", b"s3cret")
        self.send(b"\x05\x01\x00\x04" + bytes(15) + b"\x01" + struct.pack(">H", 22))
        self.assertEqual(self.tunnel.opens[0][:2], ("::1", 22))

    def test_wrong_password(self) -> None:
        self.assertEqual(self.auth(b"Env=Production", b"guess"), b"\x01\x01")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.tunnel.opens, [])

    def test_password_required_when_configured(self) -> None:
        self.assertEqual(self.send(b"\x05\x01\x00"), b"\x05\xff")
        self.assertTrue(self.transport.disconnecting)

    def test_no_matching_agent(self) -> None:
        self.auth(b"Env=Staging", b"s3cret")
        reply = self.send(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + struct.pack(">H", 80))
        self.assertEqual(reply[1], Reply.NETWORK_UNREACHABLE)
        self.assertTrue(self.transport.disconnecting)

    def test_target_failures_map_to_reply_codes(self) -> None:
        for reason, code in [
            (OpenFailReason.REFUSED, Reply.CONNECTION_REFUSED),
            (OpenFailReason.DNS_FAILURE, Reply.HOST_UNREACHABLE),
            (OpenFailReason.DENIED, Reply.NOT_ALLOWED),
        ]:
            self.setUp()
            self.auth(b"", b"s3cret")
            self.send(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + struct.pack(">H", 80))
            self.transport.clear()
            self.tunnel.opens[0][2].errback(Failure(OpenFailed(reason, "x")))
            self.assertEqual(self.transport.value()[1], code)

    def test_unsupported_command_and_address_type(self) -> None:
        self.auth(b"", b"s3cret")
        self.assertEqual(self.send(b"\x05\x02\x00\x01\x7f\x00\x00\x01\x00\x50")[1], Reply.COMMAND_NOT_SUPPORTED)
        self.setUp()
        self.auth(b"", b"s3cret")
        self.assertEqual(self.send(b"\x05\x01\x00\x09\x00\x00")[1], Reply.ADDRESS_TYPE_NOT_SUPPORTED)

    def test_malformed_greeting_is_refused(self) -> None:
        self.send(b"\x04\x01\x00\x50")  # SOCKS4
        self.assertTrue(self.transport.disconnecting)

    def test_bad_selector_in_username(self) -> None:
        self.assertEqual(self.auth(b"name:", b"s3cret"), b"\x01\x01")

    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=300))
    def test_garbage_never_raises(self, data: bytes) -> None:
        self.setUp()
        self.client.dataReceived(data)
        if self.tunnel.opens:
            self.assertGreater(len(data), 8)
