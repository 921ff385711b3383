"""
The agent pool's decisions (nova/agent/pool.py), with a Clock and no
sockets: when it dials, when it stops, what it does with a duplicate, a
member that appears or goes; and a Hypothesis state machine that drives it
against a simulated round-robin balancer in front of servers that come and
go, checking its invariants after every step.
"""

from __future__ import annotations

from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from nova.agent.pool import MEMBER_ADDED_SPREAD, PoolState, discovery_delay, member_added_delay

DELAY = 2.0
ADDED = 0.5  # the wait before dialling for a member just named, in these tests
LONGEST = 0.999999  # the jitter's longest draw


class Hooks:
    def __init__(self) -> None:
        self.dials = 0
        self.cancelled = 0

    def dial(self) -> None:
        self.dials += 1

    def cancel_dial(self) -> None:
        self.cancelled += 1


class Tunnel:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<Tunnel {self.name}>"


def pool(delay: float = DELAY) -> tuple[Clock, Hooks, PoolState]:
    clock, hooks = Clock(), Hooks()
    return clock, hooks, PoolState(clock, hooks, lambda: delay, lambda: ADDED)


def default_pool(random: Callable[[], float]) -> tuple[Clock, Hooks, PoolState]:
    """A pool with NOVAC's default policy (1 s initial, 30 s cap), as nova.agent.discovery wires it."""
    clock, hooks = Clock(), Hooks()
    state: PoolState

    def delay() -> float:
        if state.held and state.core.missing() and state.duplicates_in_a_row:
            return discovery_delay(1.0, 30.0, state.duplicates_in_a_row, len(state.members), random)
        return 1.0 * random()

    state = PoolState(clock, hooks, delay, lambda: member_added_delay(30.0, random))
    return clock, hooks, state


def next_dial(clock: Clock, hooks: Hooks, limit: float = 3600.0) -> float:
    """Advance the clock to the next dial; the seconds it took."""
    dials, start = hooks.dials, clock.seconds()
    while hooks.dials == dials:
        assert clock.getDelayedCalls(), "nothing scheduled"
        clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
        assert clock.seconds() - start <= limit
    return clock.seconds() - start


def land(state: PoolState, server_id: str, members: tuple[str, ...]) -> Tunnel:
    """The attempt in flight reaches C{server_id}, which names C{members}."""
    tunnel = Tunnel(server_id)
    state.connected(tunnel)
    if not state.welcomed(tunnel, server_id, members):
        state.closed(tunnel)
    return tunnel


class DiscoveryDelayTests(SynchronousTestCase):
    """Landing on members already held is the balancer's luck: the wait grows once per round, not per landing."""

    def test_the_wait_grows_by_a_fifth_once_per_round_of_members(self) -> None:
        # It used to double per round: one agent in a thousand then waited 30 s
        # per dial within two minutes of a member joining (bench/HISTORY.md).
        ceilings = [discovery_delay(1.0, 30.0, n, 3, lambda: 1.0) for n in range(1, 13)]
        expected = [1, 1, 1.2, 1.2, 1.2, 1.44, 1.44, 1.44, 1.728, 1.728, 1.728, 2.074]
        self.assertEqual([round(c, 3) for c in ceilings], expected)

    def test_an_unlucky_agent_reaches_a_new_member_within_a_minute(self) -> None:
        # Three members, two held; the balancer sends the agent to those two
        # 23 times in a row ((2/3)**23: one agent in 11,000), every wait at
        # the jitter's longest, after a wait that had reached the cap.
        clock, hooks, state = default_pool(lambda: LONGEST)
        state.start()
        a, b = land(state, "a", ("a", "b")), None
        next_dial(clock, hooks)
        b = land(state, "b", ("a", "b"))
        self.assertEqual(set(state.held), {"a", "b"})
        state.members_changed(("a", "b"))
        joined = clock.seconds()
        state.members_changed(("a", "b", "c"))  # c joins
        for i in range(23):
            next_dial(clock, hooks)
            land(state, "ab"[i % 2], ("a", "b", "c"))
        next_dial(clock, hooks)
        land(state, "c", ("a", "b", "c"))
        self.assertEqual(set(state.held), {"a", "b", "c"})
        self.assertLess(clock.seconds() - joined, 60.0)
        self.assertIs(state.held["a"], a)
        self.assertIs(state.held["b"], b)

    def test_a_sticky_balancer_is_asked_less_and_less_often(self) -> None:
        # Always the member held: no tight loop; after about six minutes the
        # agent asks at the cap's rate, as before the change.
        clock, hooks, state = default_pool(lambda: 0.0)  # the shortest jitter: the most dials
        state.start()
        land(state, "a", ("a", "b"))
        gaps = []
        while clock.seconds() < 600:
            gaps.append(next_dial(clock, hooks))
            land(state, "a", ("a", "b"))
        self.assertGreaterEqual(min(gaps[1:]), 0.5)  # never closer than half the initial wait
        self.assertEqual(gaps[-1], 15.0)  # the cap, at its shortest jitter
        self.assertLess(hooks.dials, 100)  # in ten minutes

    @given(
        initial=st.floats(0.01, 10),
        cap=st.floats(0.01, 600),
        members=st.integers(0, 50),
        duplicates=st.integers(1, 10_000),
        random=st.floats(0, 1, exclude_max=True),
    )
    def test_bounded_by_the_policy_and_growing(
        self, initial: float, cap: float, members: int, duplicates: int, random: float
    ) -> None:
        wait = discovery_delay(initial, cap, duplicates, members, lambda: random)
        floor = min(initial, cap) / 2
        self.assertGreaterEqual(wait, floor)  # never a tight loop
        self.assertLessEqual(wait, cap)
        self.assertGreaterEqual(discovery_delay(initial, cap, duplicates + 1, members, lambda: random), wait)
        # A run long enough reaches the cap.
        self.assertEqual(discovery_delay(initial, cap, 10**6, members, lambda: random), cap * (0.5 + 0.5 * random))

    def test_a_sticky_balancer_reaches_the_cap(self) -> None:
        # Always the same member: after enough rounds the agent asks at the usual slow rate.
        self.assertEqual(discovery_delay(1.0, 30.0, 1000, 3, lambda: 0.999999), 30.0 * (0.5 + 0.5 * 0.999999))

    def test_jittered_and_never_zero(self) -> None:
        self.assertEqual(discovery_delay(2.0, 30.0, 1, 3, lambda: 0.0), 1.0)
        self.assertGreater(discovery_delay(2.0, 30.0, 1, 0, lambda: 0.0), 0)  # no members named yet: one round is one

    def test_duplicates_in_a_row_are_counted_until_a_missing_member_is_reached(self) -> None:
        clock, _hooks, state = pool()
        state.start()
        land(state, "a", ("a", "b", "c"))
        self.assertEqual(state.duplicates_in_a_row, 0)
        clock.advance(DELAY)
        land(state, "a", ("a", "b", "c"))  # registered again with a: a duplicate
        self.assertEqual(state.duplicates_in_a_row, 1)
        clock.advance(DELAY)
        state.refused_duplicate()  # a's REJECT NAME_IN_USE: a duplicate too
        state.attempt_failed()
        self.assertEqual(state.duplicates_in_a_row, 0)  # the attempt itself ended as a failure
        clock.advance(DELAY)
        land(state, "a", ("a", "b", "c"))
        land_b = land(state, "b", ("a", "b", "c"))
        self.assertEqual(state.duplicates_in_a_row, 0)  # reaching b is progress
        self.assertIn("b", state.held)
        self.assertIs(state.held["b"], land_b)


class MemberAddedTests(SynchronousTestCase):
    def test_a_new_member_drops_a_wait_grown_on_duplicates(self) -> None:
        waits = [30.0]
        clock, hooks = Clock(), Hooks()
        state = PoolState(clock, hooks, lambda: waits[0])
        state.start()
        land(state, "a", ("a", "b"))
        land(state, "a", ("a", "b"))  # not yet: the attempt was a's already; dial for b after the long wait
        clock.advance(1)
        dials = hooks.dials
        waits[0] = 1.0  # what the policy answers once the duplicates are forgotten
        state.members_changed(("a", "b", "c"))  # c joined
        self.assertEqual(state.duplicates_in_a_row, 0)
        clock.advance(1.0)
        self.assertEqual(hooks.dials, dials + 1)  # dialled after the fresh, short wait, not the old 30 s

    def test_the_new_member_is_dialled_for_after_the_short_spread_not_the_cap(self) -> None:
        clock, hooks, state = default_pool(lambda: LONGEST)
        state.start()
        land(state, "a", ("a", "b"))
        for _ in range(200):  # b is away; the balancer keeps sending the agent to a
            next_dial(clock, hooks)
            land(state, "a", ("a", "b"))
        self.assertGreater(next_dial(clock, hooks), 29)  # the wait is at the cap
        land(state, "a", ("a", "b"))
        clock.advance(1)
        state.members_changed(("a", "b", "c"))  # c joins
        self.assertLessEqual(next_dial(clock, hooks), MEMBER_ADDED_SPREAD)

    def test_satisfied_pool_dials_for_a_member_that_joins(self) -> None:
        clock, hooks, state = pool()
        state.start()
        land(state, "a", ("a",))
        self.assertIsNone(state.core.timer)
        state.members_changed(("a", "b"))
        self.assertEqual(next_dial(clock, hooks), ADDED)

    def test_a_member_named_again_while_held_changes_nothing(self) -> None:
        # Careless views: a held member drops out of MEMBERS and comes back.
        clock, hooks, state = pool()
        state.start()
        land(state, "a", ("a", "b"))
        next_dial(clock, hooks)
        land(state, "b", ("a", "b"))
        state.members_changed(("a",))
        state.members_changed(("a", "b"))
        self.assertIsNone(state.core.timer)
        self.assertEqual(hooks.dials, 2)

    @given(cap=st.floats(0.01, 600), random=st.floats(0, 1, exclude_max=True))
    def test_the_spread_is_short_and_uniform(self, cap: float, random: float) -> None:
        wait = member_added_delay(cap, lambda: random)
        self.assertGreaterEqual(wait, 0)
        self.assertLessEqual(wait, min(cap, MEMBER_ADDED_SPREAD))

    def test_a_thousand_agents_spread_their_dials(self) -> None:
        # Every agent hears MEMBERS within the same seconds: their dials
        # for the new member spread over the seconds that follow, not at once.
        draws = iter(i / 1000 for i in range(1000))
        waits = [member_added_delay(30.0, lambda: next(draws)) for _ in range(1000)]
        per_second = [sum(1 for w in waits if s <= w < s + 1) for s in range(int(MEMBER_ADDED_SPREAD))]
        self.assertEqual(per_second, [200] * 5)

    def test_a_member_leaving_keeps_the_wait(self) -> None:
        clock, hooks, state = pool()
        state.start()
        land(state, "a", ("a", "b", "c"))
        state.members_changed(("a", "b"))
        state.members_changed(("a", "b"))
        clock.advance(DELAY)
        self.assertEqual(hooks.dials, 2)


class PoolDecisionTests(SynchronousTestCase):
    def test_single_server_is_one_tunnel(self) -> None:
        clock, hooks, state = pool()
        state.start()
        self.assertEqual(hooks.dials, 1)  # at once, as a reconnecting tunnel does
        tunnel = land(state, "solo", ("solo",))
        clock.advance(3600)
        self.assertEqual(hooks.dials, 1)
        self.assertEqual(state.held, {"solo": tunnel})
        # Lost: redialled after the backoff's delay, not before.
        state.closed(tunnel)
        clock.advance(DELAY - 0.01)
        self.assertEqual(hooks.dials, 1)
        clock.advance(0.01)
        self.assertEqual(hooks.dials, 2)

    def test_a_version_1_server_names_no_members_and_is_a_cluster_of_one(self) -> None:
        clock, hooks, state = pool()
        state.start()
        land(state, "old", ("old",))
        clock.advance(100)
        self.assertEqual(hooks.dials, 1)

    def test_dials_until_every_member_is_held(self) -> None:
        clock, hooks, state = pool()
        state.start()
        members = ("a", "b", "c")
        land(state, "a", members)
        self.assertEqual(state.core.missing(), {"b", "c"})
        clock.advance(DELAY)
        self.assertEqual(hooks.dials, 2)
        land(state, "a", members)  # a duplicate: closed, tried again later
        self.assertEqual(state.duplicates, 1)
        self.assertEqual(set(state.held), {"a"})
        clock.advance(DELAY)
        land(state, "b", members)
        clock.advance(DELAY)
        land(state, "c", members)
        self.assertEqual(set(state.held), {"a", "b", "c"})
        dials = hooks.dials
        clock.advance(3600)
        self.assertEqual(hooks.dials, dials)
        self.assertIsNone(state.core.timer)

    def test_one_attempt_at_a_time(self) -> None:
        clock, hooks, state = pool()
        state.start()
        clock.advance(3600)  # the first attempt has not ended: nothing else is dialled
        self.assertEqual(hooks.dials, 1)
        state.attempt_failed()
        clock.advance(DELAY)
        self.assertEqual(hooks.dials, 2)

    def test_a_new_member_is_dialled_for(self) -> None:
        clock, hooks, state = pool()
        state.start()
        land(state, "a", ("a",))
        state.members_changed(("a", "b"))
        clock.advance(DELAY)
        self.assertEqual(hooks.dials, 2)
        land(state, "b", ("a", "b"))
        self.assertEqual(set(state.held), {"a", "b"})

    def test_a_member_gone_is_no_longer_dialled_for(self) -> None:
        clock, hooks, state = pool()
        state.start()
        land(state, "b", ("a", "b", "c"))
        clock.advance(DELAY)
        land(state, "c", ("a", "b", "c"))
        self.assertIsNotNone(state.core.timer)  # waiting to dial for a
        state.members_changed(("b", "c"))  # a left the cluster (its rows expired)
        self.assertIsNone(state.core.timer)
        clock.advance(3600)
        self.assertEqual(hooks.dials, 2)

    def test_a_killed_server_is_not_redialled_for_ever(self) -> None:
        clock, hooks, state = pool()
        state.start()
        members = ("a", "b", "c")
        tunnels = {}
        tunnels["a"] = land(state, "a", members)
        for sid in ("b", "c"):
            clock.advance(DELAY)
            tunnels[sid] = land(state, sid, members)
        state.closed(tunnels["a"])  # a is killed
        # The balancer sends the next attempts to the survivors: duplicates.
        for sid in ("b", "c", "b"):
            clock.advance(DELAY)
            land(state, sid, members)
        self.assertEqual(state.duplicates, 3)
        # The survivors' view drops a once its heartbeat rows expire: dialling stops.
        state.members_changed(("b", "c"))
        dials = hooks.dials
        clock.advance(3600)
        self.assertEqual(hooks.dials, dials)
        self.assertEqual(set(state.held), {"b", "c"})

    def test_losing_everything_dials_whoever_answers(self) -> None:
        clock, hooks, state = pool()
        state.start()
        t = land(state, "a", ("a", "b"))
        state.closed(t)
        clock.advance(DELAY)
        self.assertEqual(hooks.dials, 2)

    def test_stop_cancels_the_attempt_and_dials_nothing_more(self) -> None:
        clock, hooks, state = pool()
        state.start()
        state.stop()
        self.assertEqual(hooks.cancelled, 1)
        state.attempt_failed()
        clock.advance(3600)
        self.assertEqual(hooks.dials, 1)

    def test_stop_while_waiting_cancels_the_timer(self) -> None:
        clock, hooks, state = pool()
        state.start()
        land(state, "a", ("a", "b"))
        self.assertIsNotNone(state.core.timer)
        state.stop()
        self.assertIsNone(state.core.timer)
        clock.advance(3600)
        self.assertEqual((hooks.dials, hooks.cancelled), (1, 0))


class StallTests(SynchronousTestCase):
    """A stalled tunnel: a fresh one is dialled beside it and replaces it (docs/faults.md)."""

    def setUp(self) -> None:
        self.clock, self.hooks, self.state = pool()
        self.replaced: list[object] = []
        self.state.on_replace = self.replaced.append
        self.state.start()
        self.old = land(self.state, "solo", ("solo",))

    def test_a_stall_dials_a_fresh_tunnel_that_replaces_the_stalled_one(self) -> None:
        self.state.tunnel_stalled(self.old)
        self.assertEqual(self.state.held, {})
        self.assertTrue(self.state.has_tunnel("solo"))  # a NAME_IN_USE meanwhile is a duplicate
        self.clock.advance(DELAY)
        self.assertEqual(self.hooks.dials, 2)
        fresh = land(self.state, "solo", ("solo",))
        self.assertEqual(self.state.held, {"solo": fresh})
        self.assertEqual(self.replaced, [self.old])
        # The stalled one's close afterwards changes nothing.
        self.state.closed(self.old)
        self.clock.advance(3600)
        self.assertEqual((self.hooks.dials, self.state.held), (2, {"solo": fresh}))

    def test_recovered_before_the_fresh_one_registers_is_held_again(self) -> None:
        self.state.tunnel_stalled(self.old)
        self.clock.advance(DELAY)
        self.state.tunnel_recovered(self.old)
        self.assertEqual(self.state.held, {"solo": self.old})
        # The attempt in flight lands on the member held: a duplicate, closed.
        fresh = land(self.state, "solo", ("solo",))
        self.assertEqual(self.state.held, {"solo": self.old})
        self.assertEqual(self.state.duplicates, 1)
        self.assertEqual(self.replaced, [])
        self.assertIsNot(fresh, self.old)
        self.clock.advance(3600)
        self.assertEqual(self.hooks.dials, 2)

    def test_a_stalled_tunnel_that_dies_is_redialled_as_any_loss(self) -> None:
        self.state.tunnel_stalled(self.old)
        self.state.closed(self.old)
        self.assertFalse(self.state.has_tunnel("solo"))
        self.clock.advance(DELAY)
        self.assertEqual(self.hooks.dials, 2)

    def test_recovery_after_being_replaced_changes_nothing(self) -> None:
        self.state.tunnel_stalled(self.old)
        self.clock.advance(DELAY)
        fresh = land(self.state, "solo", ("solo",))
        self.state.tunnel_recovered(self.old)  # careless: a late report from the replaced tunnel
        self.assertEqual(self.state.held, {"solo": fresh})


class Balancer:
    """Round robin over the servers that are up, as an NLB or HAProxy would."""

    def __init__(self) -> None:
        self.up: list[str] = []
        self.turn = 0

    def pick(self) -> str | None:
        if not self.up:
            return None
        self.turn += 1
        return self.up[self.turn % len(self.up)]


class PoolMachine(RuleBasedStateMachine):
    """
    The pool against a balancer and a cluster whose view lags: servers start
    and die; the members view the servers send changes only when a rule
    announces it (a heartbeat noticed), as in a real cluster.
    """

    def __init__(self) -> None:
        super().__init__()
        self.clock, self.hooks, self.state = pool()
        self.balancer = Balancer()
        self.view: tuple[str, ...] = ()
        self.next_id = 0
        self.started = self.stopped = False
        self.dials_seen = 0
        # The members the servers named, kept here as the servers told them
        # (not read back from the pool), for does_not_stall.
        self.named: set[str] = set()

    def in_flight(self) -> bool:
        return self.state.core.dialing

    @rule()
    def server_starts(self) -> None:
        if len(self.balancer.up) < 5:
            self.next_id += 1
            self.balancer.up.append(f"s{self.next_id}")

    @precondition(lambda self: bool(self.balancer.up))
    @rule(i=st.integers(0, 4))
    def server_dies(self, i: int) -> None:
        sid = self.balancer.up.pop(i % len(self.balancer.up))
        for member, tunnel in [*self.state.held.items(), *self.state.stalled.items()]:
            if member == sid:
                self.state.closed(tunnel)

    @precondition(lambda self: bool(self.state.held))
    @rule(i=st.integers(0, 4))
    def tunnel_stalls(self, i: int) -> None:
        tunnels = list(self.state.held.values())
        self.state.tunnel_stalled(tunnels[i % len(tunnels)])

    @precondition(lambda self: bool(self.state.stalled))
    @rule(i=st.integers(0, 4), dies=st.booleans())
    def stalled_tunnel_recovers_or_dies(self, i: int, dies: bool) -> None:
        tunnels = list(self.state.stalled.values())
        tunnel = tunnels[i % len(tunnels)]
        if dies:
            self.state.closed(tunnel)
        else:
            self.state.tunnel_recovered(tunnel)

    @rule()
    def cluster_view_catches_up(self) -> None:
        self.view = tuple(self.balancer.up)
        if self.state.held and self.view:
            new = set(self.view) - self.state.members - self.state.held.keys()
            self.state.members_changed(self.view)
            self.named = set(self.view)
            if new and self.started and not self.stopped and not self.in_flight():
                # A member just named is dialled for after the short spread, whatever the wait was.
                timer = self.state.core.timer
                assert timer is not None and timer.getTime() - self.clock.seconds() <= ADDED

    @precondition(lambda self: not self.started)
    @rule()
    def start(self) -> None:
        self.started = True
        self.state.start()

    @rule()
    def stop(self) -> None:
        self.stopped = True
        self.state.stop()

    @precondition(lambda self: self.in_flight())
    @rule(refused=st.booleans())
    def attempt_finishes(self, refused: bool) -> None:
        sid = self.balancer.pick()
        if sid is None or refused:
            self.state.attempt_failed()
            return
        view = self.view if sid in self.view else (*self.view, sid)
        if sid not in self.state.held:
            self.named = set(view)
        land(self.state, sid, view)

    @rule(seconds=st.floats(0, 3 * DELAY))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def bounded(self) -> None:
        self.state.core.check_invariants()
        # One tunnel per member; members are servers that were up once.
        assert len(self.state.held) <= self.next_id
        assert all(isinstance(t, Tunnel) and t.name == m for m, t in self.state.held.items())
        # A member is held or stalled, never both; no tunnel is both.
        assert not self.state.held.keys() & self.state.stalled.keys()
        assert not set(map(id, self.state.held.values())) & set(map(id, self.state.stalled.values()))

    @invariant()
    def never_dials_after_stop_nor_twice_at_once(self) -> None:
        if self.stopped:
            assert not self.in_flight()
            assert self.state.core.timer is None
        dials = self.hooks.dials
        assert dials - self.dials_seen <= 1  # one dial per step at most
        self.dials_seen = dials

    @invariant()
    def does_not_stall(self) -> None:
        """Something is missing and the pool runs: an attempt is in flight or one is scheduled."""
        held = self.state.held
        missing = not held or bool(self.named - held.keys())
        if self.started and not self.stopped and missing:
            timer = self.state.core.timer
            assert self.in_flight() or (timer is not None and timer.active())

    @invariant()
    def idle_when_satisfied(self) -> None:
        held = self.state.held
        if held and not self.named - held.keys():
            assert self.state.core.timer is None


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
