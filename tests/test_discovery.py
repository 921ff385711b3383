"""
Version negotiation and the members a server names, end to end in memory
(docs/protocol.md §4.2, §6.1): a version-2 agent with a version-2 server, a
version-1 agent with a version-2 server, a version-2 agent with a (scripted)
version-1 server, MEMBERS on a change, and the two ways a duplicate tunnel
is closed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase

from nova.agent.pool import PoolState
from nova.agent.tunnel import AgentContext, AgentTunnel, Duplicate
from nova.server.members import announce_members, single_server, wire_members
from nova.server.tunnel import ServerContext, ServerTunnel
from nova.wire.codec import FrameDecoder
from nova.wire.errors import ErrorCode
from nova.wire.frames import MAX_MEMBERS, Auth, GoAway, Hello, Welcome, encode

TOKEN = b"correct horse battery staple"


def no_targets(host: str, port: int, protocol: IProtocol) -> Deferred[IProtocol]:
    return fail(ConnectionRefusedError())


class Hooks:
    def __init__(self) -> None:
        self.dials = 0

    def dial(self) -> None:
        self.dials += 1

    def cancel_dial(self) -> None:
        pass


class Members:
    """A membership provider a test changes."""

    def __init__(self, own: str, *others: str) -> None:
        self.own = own
        self.ids = (own, *others)

    def __call__(self) -> tuple[str, tuple[str, ...]]:
        return self.own, self.ids


class Cluster:
    """Servers sharing a clock; agents connect to the one a test names."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.servers: dict[str, ServerContext] = {}
        self.pumps: list[iosim.IOPump] = []

    def server(self, server_id: str, provider: Any = None) -> ServerContext:
        context = ServerContext(token=TOKEN, tls=False, clock=self.clock, server_id=server_id, members=provider)
        self.servers[server_id] = context
        return context

    def agent_context(self, max_version: int = 2) -> AgentContext:
        return AgentContext(
            name="db-agent",
            tags=(),
            token=TOKEN,
            tls=False,
            clock=self.clock,
            connect_target=no_targets,
            max_version=max_version,
        )

    def connect(
        self, server_id: str, context: AgentContext, pool: PoolState | None = None
    ) -> tuple[ServerTunnel, AgentTunnel]:
        server = ServerTunnel(self.servers[server_id])
        agent = AgentTunnel(context, "lb:9022", pool=pool)
        if pool is not None:
            pool.connected(agent)
        pump = iosim.connect(server, iosim.makeFakeServer(server), agent, iosim.makeFakeClient(agent), greet=False)
        self.pumps.append(pump)
        self.flush()
        return server, agent

    def flush(self) -> None:
        for _ in range(1000):
            self.clock.advance(0)
            if not any([p.pump() for p in self.pumps]):
                self.clock.advance(0)
                if not any([p.pump() for p in self.pumps]):
                    return
        raise AssertionError("never quiet")


class NegotiationTests(SynchronousTestCase):
    def test_version_2_agent_and_server_agree_on_2_and_the_agent_learns_the_members(self) -> None:
        c = Cluster()
        c.server("novas-a", Members("novas-a", "novas-b", "novas-c"))
        server, agent = c.connect("novas-a", c.agent_context())
        self.assertEqual(self.successResultOf(agent.when_registered()), agent)
        self.assertEqual((server.protocol_version, agent.protocol_version), (2, 2))
        self.assertEqual(agent.server_id, "novas-a")
        self.assertEqual(agent.members, ("novas-a", "novas-b", "novas-c"))
        self.assertEqual(server.describe()["negotiated_version"], 2)
        self.assertEqual(server.describe()["protocol_version"], 1)

    def test_version_1_agent_with_a_version_2_server(self) -> None:
        c = Cluster()
        context = c.server("novas-a", Members("novas-a", "novas-b"))
        server, agent = c.connect("novas-a", c.agent_context(max_version=1))
        self.successResultOf(agent.when_registered())
        self.assertEqual((server.protocol_version, agent.protocol_version), (1, 1))
        self.assertEqual(agent.members, ("novas-a",))  # a version-1 WELCOME names only its server
        # No MEMBERS to a version-1 agent: it would be a PROTOCOL_ERROR there.
        self.assertEqual(announce_members(context.registry, Members("novas-a", "novas-b", "novas-x")), 1)
        c.flush()
        self.assertFalse(agent.closed)
        self.assertEqual(agent.members, ("novas-a",))

    def test_version_2_agent_with_a_version_1_server(self) -> None:
        """A scripted version-1 server: HELLO without an offer, and a decoder that knows only version 1."""
        c = Cluster()
        agent = AgentTunnel(c.agent_context(), "old:9022")
        transport = StringTransport()
        agent.makeConnection(transport)
        agent.dataReceived(b"".join(encode(Hello(bytes(32)))))
        [auth] = FrameDecoder(max_version=1).feed(transport.value())  # version 1 only, or this raises
        assert isinstance(auth, Auth)
        self.assertEqual(auth.version, 1)
        Auth.parse(0, b"".join(auth.payload()))  # exactly the version-1 layout
        agent.dataReceived(b"".join(encode(Welcome(65536, 15000, "old-server"))))
        self.successResultOf(agent.when_registered())
        self.assertEqual(agent.protocol_version, 1)
        self.assertEqual(agent.members, ("old-server",))

    def test_members_follow_the_cluster(self) -> None:
        c = Cluster()
        provider = Members("novas-a", "novas-b")
        context = c.server("novas-a", provider)
        state = PoolState(c.clock, Hooks(), lambda: 1.0)
        _, agent = c.connect("novas-a", c.agent_context(), pool=state)
        self.assertEqual(state.members, {"novas-a", "novas-b"})
        provider.ids = ("novas-a", "novas-b", "novas-c")
        announce_members(context.registry, provider)
        c.flush()
        self.assertEqual(agent.members, ("novas-a", "novas-b", "novas-c"))
        self.assertEqual(state.members, {"novas-a", "novas-b", "novas-c"})
        # Unchanged: nothing is sent.
        server = context.registry.get("db-agent")
        assert isinstance(server, ServerTunnel)
        before = server.members_sent
        announce_members(context.registry, provider)
        self.assertIs(server.members_sent, before)

    def test_default_provider_is_this_server_alone(self) -> None:
        c = Cluster()
        c.server("solo")
        _, agent = c.connect("solo", c.agent_context())
        self.assertEqual(agent.members, ("solo",))


class DuplicateTests(SynchronousTestCase):
    def test_a_second_tunnel_to_a_held_member_is_refused_and_not_counted_as_a_rejection(self) -> None:
        c = Cluster()
        c.server("novas-a", Members("novas-a", "novas-b"))
        context = c.agent_context()
        hooks = Hooks()
        state = PoolState(c.clock, hooks, lambda: 1.0)
        state.start()
        _, first = c.connect("novas-a", context, pool=state)
        self.assertEqual(set(state.held), {"novas-a"})
        # The balancer sends the next dial to novas-a again: its live-name
        # rule pings the first tunnel, which answers, so NAME_IN_USE, and the
        # version-2 REJECT says who refused.
        state.machine.dial_due()
        _, second = c.connect("novas-a", context, pool=state)
        c.clock.advance(0.1)
        c.flush()
        self.failureResultOf(second.when_registered(), Duplicate)
        self.assertTrue(second.closed)
        self.assertFalse(first.closed)
        self.assertEqual(state.duplicates, 1)
        self.assertEqual(set(state.held), {"novas-a"})

    def test_a_welcome_from_a_held_member_closes_the_new_tunnel_with_goaway(self) -> None:
        c = Cluster()
        state = PoolState(c.clock, Hooks(), lambda: 1.0)
        held = object()
        state.welcomed(held, "novas-a", ("novas-a", "novas-b"))
        agent = AgentTunnel(c.agent_context(), "lb:9022", pool=state)
        transport = StringTransport()
        agent.makeConnection(transport)
        agent.dataReceived(b"".join(encode(Hello(bytes(32), 2))))
        transport.clear()
        agent.dataReceived(b"".join(encode(Welcome(65536, 15000, "novas-a", 2, 0, ("novas-a", "novas-b")))))
        self.failureResultOf(agent.when_registered(), Duplicate)
        self.assertEqual(
            FrameDecoder().feed(transport.value()), [GoAway(ErrorCode.NO_ERROR, "already connected to this server")]
        )
        self.assertTrue(transport.disconnecting)
        self.assertIs(state.held["novas-a"], held)


class WireMembersTests(SynchronousTestCase):
    def test_own_id_first_and_the_list_fits_a_frame(self) -> None:
        self.assertEqual(wire_members("b", ["c", "a", "b", "a"]), ("b", "a", "c"))
        many = wire_members("me", [f"server-{i:03d}-" + "x" * 50 for i in range(200)])
        self.assertEqual(many[0], "me")
        self.assertLessEqual(len(many), MAX_MEMBERS)
        encode(Welcome(65536, 1, "me" * 100, 2, 0, many))  # fits, or this raises
        self.assertEqual(wire_members("me", ["", "y" * 300]), ("me",))

    def test_single_server(self) -> None:
        self.assertEqual(single_server("s")(), ("s", ("s",)))
