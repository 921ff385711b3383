"""
The cluster's pure cores, driven by a C{Clock}: heartbeat timing, expiry,
staleness, route validation and the desired set, least-loaded selection
by cluster-wide load, drain requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nova.rules.drains import DrainLedger
from nova.rules.membership import Membership
from nova.rules.records import DrainRequest, RouteRecord, ServerRecord, TunnelRecord
from nova.rules.routes import Selector, parse_route, parse_selector
from nova.rules.routetable import RouteRejected, desired, new_route_id, validate, validate_id
from nova.rules.selection import LeastLoaded, remote_load

DEAD = 30.0


def server(id: str, heartbeat: float) -> ServerRecord:
    return ServerRecord(id, f"{id}:9023", 0.0, "0.1.0", heartbeat)


def membership(clock: Clock, id: str = "a") -> Membership:
    return Membership(server(id, 0.0), DEAD, clock)


class MembershipTests(SynchronousTestCase):
    def test_a_beat_is_due_every_third_of_the_dead_timeout(self) -> None:
        self.assertEqual(membership(Clock()).interval, DEAD / 3)

    def test_a_beat_carries_our_row_our_tunnels_and_the_expiry_horizon(self) -> None:
        clock = Clock()
        clock.advance(100)
        m = membership(clock)
        beat = m.beat([TunnelRecord("elsewhere", "db1", {"env": "prod"}, streams=2)])
        self.assertEqual(beat.server.heartbeat, 100)
        self.assertEqual(beat.server.id, "a")
        self.assertEqual([(t.server, t.agent, t.streams) for t in beat.tunnels], [("a", "db1", 2)])
        self.assertEqual(beat.expire_before, 100 - DEAD)

    def test_a_member_that_stops_beating_expires_within_the_dead_timeout(self) -> None:
        clock = Clock()
        m = membership(clock)
        clock.advance(10)
        m.read([server("a", 10), server("b", 10)], [TunnelRecord("b", "db1")])
        self.assertEqual([s.id for s in m.view().servers], ["a", "b"])
        self.assertEqual([t.agent for t in m.view().tunnels], ["db1"])
        clock.advance(DEAD)  # b's heartbeat is now exactly the dead timeout old: still alive
        self.assertEqual([s.id for s in m.view().servers], ["a", "b"])
        clock.advance(0.001)
        view = m.view()
        self.assertEqual([s.id for s in view.servers], ["a"])
        self.assertEqual(view.tunnels, ())

    def test_we_are_always_a_member_and_our_rows_never_come_back_as_remote_tunnels(self) -> None:
        clock = Clock()
        m = membership(clock)
        m.read([], [TunnelRecord("a", "mine")])
        clock.advance(DEAD * 10)
        self.assertEqual([s.id for s in m.view().servers], ["a"])
        self.assertEqual(m.view().tunnels, ())

    def test_the_view_is_stale_from_the_start_until_the_store_answers(self) -> None:
        clock = Clock()
        clock.advance(5)
        m = membership(clock)
        self.assertEqual((m.view().stale, m.view().stale_since, m.view().as_of), (True, 5, None))
        clock.advance(1)
        m.read([server("a", 6)], [])
        self.assertEqual((m.view().stale, m.view().as_of), (False, 6))

    def test_an_outage_makes_the_view_stale_since_its_first_failure(self) -> None:
        clock = Clock()
        m = membership(clock)
        m.read([server("b", 0)], [])
        clock.advance(3)
        self.assertTrue(m.failed("connection refused"))
        clock.advance(10)
        self.assertFalse(m.failed("connection refused"))  # the same outage: logged once
        view = m.view()
        self.assertEqual((view.stale_since, view.as_of, m.last_error), (3, 0, "connection refused"))
        clock.advance(1)
        m.read([server("b", 14)], [])
        self.assertIsNone(m.view().stale_since)
        self.assertIsNone(m.last_error)

    def test_while_stale_expiry_is_judged_at_the_last_read_not_now(self) -> None:
        clock = Clock()
        m = membership(clock)
        m.read([server("b", 0)], [TunnelRecord("b", "db1")])
        m.failed("down")
        clock.advance(DEAD * 5)  # the store is gone: b did not stop beating, we cannot see it
        self.assertEqual([s.id for s in m.view().servers], ["a", "b"])
        self.assertEqual([t.agent for t in m.view().tunnels], ["db1"])

    def test_the_dead_timeout_is_positive(self) -> None:
        with self.assertRaises(ValueError):
            Membership(server("a", 0), 0, Clock())


@dataclass
class Local:
    name: str
    tags: dict[str, str] = field(default_factory=dict)
    draining: bool = False
    streams: int = 0

    def open_streams(self) -> int:
        return self.streams


class SelectionTests(SynchronousTestCase):
    """Least-loaded among this server's tunnels, by each agent's load on the whole cluster."""

    def test_an_agent_busy_on_another_member_loses_to_an_idle_one(self) -> None:
        # Both agents are held here with no stream; db-a carries 4 through server b.
        local = [Local("db-a", {"env": "prod"}), Local("db-b", {"env": "prod"})]
        load = remote_load("a", [TunnelRecord("b", "db-a", {"env": "prod"}, streams=4)])
        chooser = LeastLoaded()
        picks = {chooser.choose(parse_selector("env=prod"), local, load).name for _ in range(6)}  # type: ignore[union-attr]
        self.assertEqual(picks, {"db-b"})
        # Without the remote load the two are equal, and share new streams.
        picks = {chooser.choose(parse_selector("env=prod"), local).name for _ in range(6)}  # type: ignore[union-attr]
        self.assertEqual(picks, {"db-a", "db-b"})

    def test_load_is_live_streams_here_plus_the_others_as_of_their_heartbeat(self) -> None:
        local = [Local("x", streams=3), Local("y", streams=1)]
        remote = [
            TunnelRecord("b", "y", streams=1),
            TunnelRecord("c", "y", streams=2),
            TunnelRecord("b", "x", streams=0),
        ]
        load = remote_load("a", remote)
        self.assertEqual(load, {"y": 3, "x": 0})
        chosen = LeastLoaded().choose(Selector(), local, load)
        self.assertEqual(chosen.name if chosen else None, "x")  # 3 + 0 < 1 + 3

    def test_equal_load_is_shared_round_robin(self) -> None:
        local = [Local("x", streams=1), Local("y"), Local("z")]
        load = {"y": 1, "z": 1}
        chooser = LeastLoaded()
        picks = [chooser.choose(Selector(), local, load).name for _ in range(6)]  # type: ignore[union-attr]
        self.assertEqual(set(picks), {"x", "y", "z"})
        self.assertEqual(picks[:3], picks[3:])

    def test_our_own_rows_and_draining_tunnels_carry_no_remote_load(self) -> None:
        remote = [
            TunnelRecord("a", "x", streams=9),  # our own row, older than the registry's count
            TunnelRecord("b", "y", streams=9, draining=True),  # its streams end; no new one goes there
        ]
        self.assertEqual(remote_load("a", remote), {})

    def test_draining_unmatched_and_tried_tunnels_are_never_chosen(self) -> None:
        busy, idle, drained = Local("busy", {"env": "prod"}, streams=9), Local("idle"), Local("d", draining=True)
        chooser = LeastLoaded()
        self.assertIs(chooser.choose(parse_selector("env=prod"), [busy, idle, drained]), busy)
        self.assertIs(chooser.choose(Selector(), [busy, idle, drained], exclude=[idle]), busy)
        self.assertIsNone(chooser.choose(Selector(), [busy, idle, drained], exclude=[idle, busy]))
        self.assertIsNone(chooser.choose(parse_selector("name:d"), [busy, idle, drained]))
        # An agent known only on other members is no candidate here (no peering).
        self.assertIsNone(chooser.choose(parse_selector("name:elsewhere"), [busy], {"elsewhere": 0}))


class SelectionProperties(SynchronousTestCase):
    @settings(max_examples=200, deadline=None)
    @given(
        st.lists(st.tuples(st.integers(0, 5), st.booleans(), st.integers(0, 5)), min_size=0, max_size=8),
        st.sets(st.integers(0, 7), max_size=4),
    )
    def test_the_choice_is_always_one_of_the_least_loaded_eligible_tunnels(
        self, shape: list[tuple[int, bool, int]], tried: set[int]
    ) -> None:
        local = [Local(f"agent-{i}", draining=d, streams=n) for i, (n, d, _) in enumerate(shape)]
        remote = [TunnelRecord("b", f"agent-{i}", streams=r) for i, (_, _, r) in enumerate(shape)]
        load = remote_load("a", remote)
        exclude = [t for i, t in enumerate(local) if i in tried]
        eligible = [t for t in local if not t.draining and t not in exclude]
        chosen = LeastLoaded().choose(Selector(), local, load, exclude)
        if not eligible:
            self.assertIsNone(chosen)
            return
        assert chosen is not None
        total = {t.name: t.streams + load.get(t.name, 0) for t in eligible}
        self.assertIn(chosen, eligible)
        self.assertEqual(total[chosen.name], min(total.values()))


@dataclass
class Held:
    registered_at: float
    draining: bool = False


def drain_request(rid: str, agent: str, at: float, expires: float) -> DrainRequest:
    return DrainRequest(rid, agent, "admin", at, "novas-a", expires)


class DrainLedgerTests(SynchronousTestCase):
    """Which tunnels of this server a set of drain requests drains."""

    def test_a_request_drains_the_tunnel_registered_before_it_once(self) -> None:
        tunnel = Held(registered_at=10.0)
        ledger = DrainLedger()
        request = drain_request("d-1", "db", 20.0, 100.0)
        self.assertEqual(ledger.due([request], {"db": tunnel}.get, 21.0), [(request, tunnel)])
        # Read again at the next poll (and the tunnel not draining yet): nothing more.
        self.assertEqual(ledger.due([request], {"db": tunnel}.get, 23.0), [])

    def test_a_tunnel_registered_after_the_request_is_not_drained(self) -> None:
        # The agent's reconnection after the drain is not drained by the old request.
        ledger = DrainLedger()
        request = drain_request("d-1", "db", 20.0, 100.0)
        self.assertEqual(ledger.due([request], {"db": Held(registered_at=20.5)}.get, 21.0), [])
        self.assertEqual(ledger.due([request], {"db": Held(registered_at=5.0)}.get, 23.0), [])

    def test_expired_requests_are_ignored_and_forgotten(self) -> None:
        ledger = DrainLedger()
        old = drain_request("d-old", "db", 1.0, 50.0)
        self.assertEqual(ledger.due([old], {"db": Held(0.0)}.get, 51.0), [])
        self.assertTrue(ledger.applied(drain_request("d-2", "db", 60.0, 70.0)))
        ledger.due([], lambda _: None, 71.0)
        self.assertTrue(ledger.applied(drain_request("d-2", "db", 60.0, 70.0)), "forgotten once expired")

    def test_the_answering_server_applies_at_once_and_the_poll_does_not_repeat_it(self) -> None:
        ledger = DrainLedger()
        request = drain_request("d-1", "db", 20.0, 100.0)
        self.assertTrue(ledger.applied(request))
        self.assertFalse(ledger.applied(request))
        self.assertEqual(ledger.due([request], {"db": Held(10.0)}.get, 22.0), [])

    def test_unknown_agents_draining_tunnels_and_repeated_requests(self) -> None:
        ledger = DrainLedger()
        tunnel = Held(10.0)
        first, second = drain_request("d-1", "db", 20.0, 100.0), drain_request("d-2", "db", 21.0, 100.0)
        self.assertEqual(ledger.due([drain_request("d-0", "nobody", 20.0, 100.0)], {"db": tunnel}.get, 22.0), [])
        self.assertEqual(ledger.due([first], {"db": Held(10.0, draining=True)}.get, 22.0), [])
        # A second request for a tunnel that was not yet drained: each applies once.
        self.assertEqual(ledger.due([first, second], {"db": tunnel}.get, 22.0), [(second, tunnel)])


class RouteTableTests(SynchronousTestCase):
    def test_a_valid_spec_means_what_it_means_on_the_command_line(self) -> None:
        for spec in ("15432:db.internal:5432", "0.0.0.0:8080:web:80@env=prod", "[::1]:0:[fd00::1]:22@name:x"):
            self.assertEqual(validate(spec), parse_route(spec))

    def test_invalid_specs_are_refused_naming_the_problem(self) -> None:
        cases = {
            "": "empty",
            "   ": "empty",
            "15432:db": "is not [BIND:]PORT:HOST:HOSTPORT",
            "99999:db:5432": "PORT",
            "15432:db:0": "HOSTPORT",
            "15432:db:5432@name:": "needs an agent name",
            "15432:db:5432@env": "is not Key=Value",
            "1:db\n:5432": "control character",
            "1:" + "h" * 2000 + ":5432": "more than",
        }
        for spec, problem in cases.items():
            with self.assertRaises(RouteRejected) as caught:
                validate(spec)
            self.assertIn(problem, str(caught.exception), spec)

    def test_route_ids(self) -> None:
        rid = new_route_id()
        self.assertEqual(validate_id(rid), rid)
        self.assertNotEqual(new_route_id(), rid)
        for bad, problem in (("", "is not"), ("a b", "is not"), ("x" * 65, "is not"), ("static-1", "command line")):
            with self.assertRaises(RouteRejected) as caught:
                validate_id(bad)
            self.assertIn(problem, str(caught.exception))

    def test_the_desired_set_is_static_then_dynamic_and_bad_rows_are_reported_not_raised(self) -> None:
        static = [parse_route("15432:db:5432")]
        dynamic = [
            RouteRecord("r-2", "16000:web:80", "admin", 2.0),
            RouteRecord("r-1", "16001:cache:6379@role=cache", "admin", 1.0),
            RouteRecord("r-bad", "not a route", "admin", 3.0),
            RouteRecord("r-clash", "127.0.0.1:15432:other:5432", "admin", 4.0),
            RouteRecord("static-0", "17000:x:1", "admin", 5.0),
            RouteRecord("r-any", "0:x:1", "admin", 6.0),
            RouteRecord("r-any2", "0:y:1", "admin", 7.0),
        ]
        d = desired(static, dynamic)
        self.assertEqual(list(d.routes), ["static-0", "r-1", "r-2", "r-any", "r-any2"])
        self.assertEqual(d.routes["r-1"], parse_route("16001:cache:6379@role=cache"))
        self.assertEqual(set(d.problems), {"r-bad", "r-clash", "static-0"})
        self.assertIn("is not [BIND:]PORT", d.problems["r-bad"])
        self.assertIn("127.0.0.1:15432 is already the listening address of route static-0", d.problems["r-clash"])
        self.assertIn("duplicate route id", d.problems["static-0"])

    def test_each_server_reads_a_spec_with_its_own_default_bind(self) -> None:
        d = desired([], [RouteRecord("r-1", "16000:web:80", "admin", 0.0)], default_bind="0.0.0.0")
        self.assertEqual(d.routes["r-1"].bind, "0.0.0.0")


class RecordTests(SynchronousTestCase):
    def test_a_tunnel_row_is_read_from_the_admin_apis_description(self) -> None:
        described = {
            "name": "db1",
            "tags": {"env": "prod"},
            "address": "10.0.0.5:40000",
            "connected_since": 12.5,
            "status": "draining",
            "active_streams": 3,
            "bytes_to_agent": 10,
            "bytes_from_agent": 20,
            "token_id": "ci",
        }
        self.assertEqual(
            TunnelRecord.described("a", described),
            TunnelRecord("a", "db1", {"env": "prod"}, "ci", 12.5, 3, 10, 20, True),
        )
        self.assertFalse(TunnelRecord.described("a", {**described, "status": "connected"}).draining)


class MembershipMachine(RuleBasedStateMachine):
    """
    Membership under any interleaving of time, reads and store failures:
    we are always a member, no tunnel outlives its server, the view is stale
    exactly when the last outcome was a failure (or there was none yet), and
    a member seen alive at the last read stays in the view while stale.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.m = membership(self.clock)
        self.last_ok: float | None = None
        self.first_failure: float | None = 0.0
        self.read_alive: set[str] = set()

    @rule(seconds=st.floats(min_value=0, max_value=2 * DEAD))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @rule(ages=st.dictionaries(st.sampled_from(["a", "b", "c", "d"]), st.floats(0, 2 * DEAD), max_size=4))
    def store_answers(self, ages: dict[str, float]) -> None:
        now = self.clock.seconds()
        servers = [server(id, now - age) for id, age in ages.items()]
        self.m.read(servers, [TunnelRecord(s.id, f"agent-{s.id}") for s in servers])
        self.last_ok, self.first_failure = now, None
        self.read_alive = {id for id, age in ages.items() if age <= DEAD}

    @rule()
    def store_fails(self) -> None:
        self.m.failed("down")
        if self.first_failure is None:
            self.first_failure = self.clock.seconds()

    @invariant()
    def we_are_a_member(self) -> None:
        assert "a" in [s.id for s in self.m.view().servers]

    @invariant()
    def no_tunnel_outlives_its_server(self) -> None:
        view = self.m.view()
        live = {s.id for s in view.servers}
        assert all(t.server in live and t.server != "a" for t in view.tunnels)
        assert all(self.clock.seconds() - s.heartbeat <= DEAD or view.stale for s in view.servers if s.id != "a")

    @invariant()
    def stale_exactly_after_a_failure(self) -> None:
        view = self.m.view()
        assert view.stale_since == self.first_failure
        assert view.as_of == self.last_ok

    @invariant()
    def an_outage_kills_no_member(self) -> None:
        view = self.m.view()
        if view.stale and self.last_ok is not None:
            assert self.read_alive <= {s.id for s in view.servers}


MembershipMachine.TestCase.settings = settings(max_examples=100, stateful_step_count=30, deadline=None)
TestMembershipMachine = MembershipMachine.TestCase


class DesiredProperties(SynchronousTestCase):
    @given(
        st.lists(
            st.tuples(
                st.sampled_from(["r-1", "r-2", "r-3", "static-0", "r-4"]),
                st.sampled_from(["16000:a:1", "16001:b:2", "0:c:3", "bad", "127.0.0.1:16000:d:4", "16002:e:5"]),
                st.floats(0, 10),
            ),
            max_size=8,
        ),
        st.lists(st.sampled_from(["16000:s:1", "16003:t:2", "0:u:3"]), max_size=3, unique=True),
    )
    @settings(max_examples=200, deadline=None)
    def test_the_wanted_set_never_listens_twice_on_one_address_and_keeps_every_static_route(
        self, rows: list[tuple[str, str, float]], static_specs: list[str]
    ) -> None:
        static = [parse_route(s) for s in static_specs]
        records = [RouteRecord(rid, spec, "x", at) for rid, spec, at in rows]
        d = desired(static, records)
        self.assertEqual([d.routes[f"static-{i}"] for i in range(len(static))], static)
        keys = [f"{r.bind}:{r.port}" for r in d.routes.values() if r.port != 0]
        self.assertEqual(len(keys), len(set(keys)))
        for record in records:
            self.assertTrue(record.id in d.routes or record.id in d.problems)
