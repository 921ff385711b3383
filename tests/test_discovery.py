"""
Version negotiation and the members a server names, end to end in memory
(docs/protocol.md §4.2, §6.1): a version-2 agent with a version-2 server, a
version-1 agent with a version-2 server, a version-2 agent with a (scripted)
version-1 server, MEMBERS on a change, and the two ways a duplicate tunnel
is closed.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import globalLogPublisher
from twisted.test import iosim
from twisted.trial.unittest import SynchronousTestCase
from zope.interface import implementer

from nova.agent.discovery import AgentPool
from nova.agent.metrics import AgentMetrics
from nova.agent.pool import PoolState
from nova.agent.reconnect import Backoff
from nova.agent.tunnel import AgentContext, AgentTunnel, Duplicate
from nova.server.members import announce_members, cluster_members, current_members, single_server, wire_members
from nova.server.tunnel import ServerContext, ServerTunnel
from nova.wire.codec import FrameDecoder
from nova.wire.errors import ErrorCode
from nova.wire.frames import MAX_MEMBERS, Auth, GoAway, Hello, Welcome, encode

from .contexts import agent_context, server_context

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
        context = server_context(self.clock, token=TOKEN, tls=False, server_id=server_id, members=provider)
        self.servers[server_id] = context
        return context

    def agent_context(self, max_version: int = 2) -> AgentContext:
        return agent_context(
            self.clock, no_targets, name="db-agent", tags=(), token=TOKEN, tls=False, max_version=max_version
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
    def setUp(self) -> None:
        self.logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

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
        # Normal discovery, not a refusal: nothing for the operator to see.
        self.assertEqual([e for e in self.logged if "refused" in str(e.get("log_format", ""))], [])
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
        self.assertEqual(state.duplicates, 1)


class WireMembersTests(SynchronousTestCase):
    def test_own_id_first_and_the_list_fits_a_frame(self) -> None:
        self.assertEqual(wire_members("b", ["c", "a", "b", "a"]), ("b", "a", "c"))
        many = wire_members("me", [f"server-{i:03d}-" + "x" * 50 for i in range(200)])
        self.assertEqual(many[0], "me")
        self.assertLessEqual(len(many), MAX_MEMBERS)
        encode(Welcome(65536, 1, "me" * 100, 2, 0, many))  # fits, or this raises
        self.assertEqual(wire_members("me", ["", "y" * 300]), ("me",))

    def test_a_failing_provider_names_this_server_alone_and_announces_nothing(self) -> None:
        def broken() -> tuple[str, tuple[str, ...]]:
            raise RuntimeError("the view is gone")

        logged = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.assertEqual(current_members(broken, "me"), ("me", ("me",)))
        self.assertEqual(announce_members([object()], broken), 0)
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
        self.assertTrue(logged)
        c = Cluster()
        c.server("novas-a", broken)
        _, agent = c.connect("novas-a", c.agent_context())
        self.successResultOf(agent.when_registered())
        self.assertEqual(agent.members, ("novas-a",))
        self.flushLoggedErrors(RuntimeError)

    def test_ids_the_wire_cannot_carry_are_left_out(self) -> None:
        self.assertEqual(wire_members("me", ["ok", "bad\udc80"]), ("me", "ok"))

    def test_cluster_members_reads_the_view_each_time(self) -> None:
        servers = ["a", "b"]
        provider = cluster_members("a", lambda: servers)
        self.assertEqual(provider(), ("a", ("a", "b")))
        servers.append("c")
        self.assertEqual(provider(), ("a", ("a", "b", "c")))

    def test_single_server(self) -> None:
        self.assertEqual(single_server("s")(), ("s", ("s",)))


@implementer(IStreamClientEndpoint)
class BalancerEndpoint:
    """A round-robin balancer in memory: each connect reaches the next server that is up."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
        self.up: list[str] = list(cluster.servers)
        self.turn = 0
        self.connects = 0

    def connect(self, factory: IProtocolFactory) -> Deferred[IProtocol]:
        self.connects += 1
        if not self.up:
            return fail(ConnectionRefusedError())
        server_id = self.up[self.turn % len(self.up)]
        self.turn += 1
        server = ServerTunnel(self.cluster.servers[server_id])
        agent = factory.buildProtocol(iosim.FakeAddress())
        assert agent is not None
        self.cluster.pumps.append(
            iosim.connect(server, iosim.makeFakeServer(server), agent, iosim.makeFakeClient(agent), greet=False)
        )
        return succeed(agent)


class PoolOverBalancerTests(SynchronousTestCase):
    """NOVAC's pool service (nova.agent.discovery) behind a balancer in front of three servers."""

    def setUp(self) -> None:
        self.c = Cluster()
        self.ids = ("novas-a", "novas-b", "novas-c")
        self.providers = {sid: Members(sid, *(o for o in self.ids if o != sid)) for sid in self.ids}
        for sid in self.ids:
            self.c.server(sid, self.providers[sid])
        self.balancer = BalancerEndpoint(self.c)
        self.context = self.c.agent_context()
        self.backoff = Backoff(1.0, 30.0, random=lambda: 0.5, server="lb:9022")
        self.pool = AgentPool(self.balancer, self.context, "lb:9022", self.backoff, self.c.clock)

    def run_for(self, seconds: float) -> None:
        for _ in range(int(seconds * 10)):
            self.c.clock.advance(0.1)
            self.c.flush()

    def registered_on(self) -> set[str]:
        return {sid for sid, ctx in self.c.servers.items() if ctx.registry.get("db-agent") is not None}

    def test_reaches_every_member_and_closes_duplicates(self) -> None:
        self.pool.startService()
        self.c.flush()
        self.run_for(60)
        self.assertEqual(self.registered_on(), set(self.ids))
        self.assertEqual(set(self.pool.state.held), set(self.ids))
        self.assertEqual(len([t for t in self.context.tunnels if not t.closed]), 3)
        connects = self.balancer.connects
        self.run_for(120)
        self.assertEqual(self.balancer.connects, connects)  # satisfied: no more dials
        metrics = self.context.metrics
        assert isinstance(metrics, AgentMetrics)
        self.assertEqual(metrics.pool_tunnels.labels("lb:9022")._value.get(), 3)
        self.assertEqual(metrics.pool_members.labels("lb:9022")._value.get(), 3)

    def test_a_killed_server_is_not_redialled_once_the_cluster_forgets_it(self) -> None:
        self.pool.startService()
        self.run_for(60)
        self.assertEqual(set(self.pool.state.held), set(self.ids))
        # novas-c dies: its tunnel drops, the balancer stops sending to it.
        self.balancer.up.remove("novas-c")
        [tunnel] = [t for t in self.context.tunnels if t.server_id == "novas-c"]
        tunnel.abort("novas-c was killed")
        self.c.flush()
        self.run_for(30)
        self.assertEqual(set(self.pool.state.held), {"novas-a", "novas-b"})
        self.assertGreater(self.pool.state.duplicates, 0)  # it kept trying, landing on the survivors
        # The survivors' view drops novas-c: they tell the agent, which stops.
        for sid in ("novas-a", "novas-b"):
            self.providers[sid].ids = ("novas-a", "novas-b")
            announce_members(self.c.servers[sid].registry, self.providers[sid])
        self.c.flush()
        connects = self.balancer.connects
        self.run_for(120)
        self.assertEqual(self.balancer.connects, connects)

    def test_a_new_member_is_reached(self) -> None:
        self.pool.startService()
        self.run_for(60)
        self.c.server("novas-d", Members("novas-d", *self.ids))
        self.balancer.up.append("novas-d")
        for sid in self.ids:
            self.providers[sid].ids = (*self.ids, "novas-d")
            announce_members(self.c.servers[sid].registry, self.providers[sid])
        self.run_for(120)
        self.assertEqual(self.registered_on(), {*self.ids, "novas-d"})

    def test_a_stalled_tunnel_with_streams_replaced_by_a_fresh_one_gets_a_fresh_dead_timeout(self) -> None:
        """NOVAC's end of docs/faults.md's long outage (the server's is in test_tunnel.py)."""
        import nova.transport.tunnel as tunnel_module

        user_timeouts: list[float] = []

        def set_user_timeout(tcp: object, seconds: float) -> bool:
            user_timeouts.append(seconds)
            return True

        self.patch(tunnel_module, "set_user_timeout", set_user_timeout)
        self.pool.startService()
        self.run_for(60)
        [old] = [t for t in self.context.tunnels if t.server_id == "novas-a" and not t.closed]
        old.streams[1] = object()  # type: ignore[assignment]  # a user's stream still open on it
        self.run_for(40)
        reprieved = self.c.clock.seconds()
        user_timeouts.clear()  # the duplicates' own, while it ran
        replace = self.pool.state.on_replace
        assert replace is not None
        replace(old)
        self.assertEqual(old.core.reprieved_at, reprieved)
        self.assertEqual(user_timeouts, [2 * self.context.timing.dead_timeout])
        self.assertTrue(old.draining)
        del old.streams[1]

    def test_stop_drains_every_tunnel(self) -> None:
        self.pool.startService()
        self.run_for(60)
        d = self.pool.stopService()
        self.c.flush()
        self.run_for(1)
        self.successResultOf(d)
        self.assertEqual(self.registered_on(), set())
        connects = self.balancer.connects
        self.run_for(120)
        self.assertEqual(self.balancer.connects, connects)


class SeveralAddressesTests(SynchronousTestCase):
    """
    NOVAC_SERVER lists several addresses: each pool is on its own.  A server
    id names a member only within the cluster behind one address: two
    independent servers may share one (the host name, a pod name).
    """

    def test_independent_servers_with_the_same_id_are_each_held(self) -> None:
        c = Cluster()
        first = server_context(c.clock, token=TOKEN, tls=False, server_id="vm")
        second = server_context(c.clock, token=TOKEN, tls=False, server_id="vm")
        c.servers = {"first": first, "second": second}
        context = c.agent_context()
        pools = []
        for name in ("first", "second"):
            endpoint = BalancerEndpoint(c)
            endpoint.up = [name]
            backoff = Backoff(1.0, 30.0, random=lambda: 0.5, server=f"{name}:9022")
            pools.append(AgentPool(endpoint, context, f"{name}:9022", backoff, c.clock))
        for pool in pools:
            pool.startService()
        for _ in range(100):
            c.clock.advance(0.1)
            c.flush()
        self.assertIsNotNone(first.registry.get("db-agent"))
        self.assertIsNotNone(second.registry.get("db-agent"))
        self.assertEqual([set(p.state.held) for p in pools], [{"vm"}, {"vm"}])
