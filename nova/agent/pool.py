"""
NOVAC's agent pool (Teleport's): with one configured server address (a load
balancer in front of a NOVAS cluster) the agent keeps dialling that address
until it holds a tunnel to every member the servers named (docs/cluster.md,
"Discovery").

The dial loop is an explicit machine:

    New --start--> Dialing --attempt_ended--> Idle --want--> Waiting
                      ^                         ^              |
                      +--------dial_due---------+--satisfied---+

    (stop, from any state, --> Stopped)

What it decides rests on two sets the adapter keeps in L{PoolCore}: the
members the servers named (WELCOME and MEMBERS, protocol version 2; a
version-1 server is a cluster of one) and the members held (one registered
tunnel each).  A member is I{missing} when it is named and not held; with
nothing held, the pool wants a tunnel to whichever server answers.  After
each change the adapter tells the machine C{want} (something is missing) or
C{satisfied}.

A held tunnel that stalls (a PING unanswered for the stall timeout, see
L{nova.mux.lifecycle}) stops counting as held: its member is missing, so
the pool dials a fresh tunnel beside it (docs/faults.md).  The server
accepts that registration once the stalled tunnel fails its live-name ping,
and new streams use the fresh tunnel; the stalled one is closed when the
fresh one registers, or ends on its own at the dead timeout.  If it is
heard from again first, it is held again; a NAME_IN_USE from its member
meanwhile (the server found it alive) is a duplicate, not a refusal.

Invariants (L{PoolCore.check_invariants}; a Hypothesis state machine drives
them in tests/test_agent_pool.py): at most one attempt (a connection being
made or registering) at a time; at most one held tunnel per member, so at
most as many tunnels as members plus the one attempt; a timer only while
something is missing; nothing dialled once stopped.  The wait before a dial
is the reconnect policy's (L{nova.agent.reconnect.Backoff}: jittered,
exponential, reset by a registration), so a single server behaves as with
one reconnecting tunnel; after landings on members already held it is
L{discovery_delay}'s, which grows more slowly, so a balancer that keeps
landing the agent there is still asked less and less often.  A member
named for the first time (MEMBERS: it joined, or came back) is dialled for
after L{member_added_delay}, a short uniform spread, whatever the wait had
grown to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from automat import TypeMachineBuilder
from twisted.internet.interfaces import IDelayedCall, IReactorTime


class PoolHooks(Protocol):
    """What the machine asks its adapter to do."""

    def dial(self) -> None:
        "Start one attempt: connect and register; its end comes back as C{attempt_ended}."

    def cancel_dial(self) -> None:
        "Abandon the attempt in progress (the pool is stopping)."


class Pool(Protocol):
    """The inputs of the pool's dial loop."""

    def start(self) -> None:
        "Begin: dial at once, as a single reconnecting tunnel does."

    def want(self) -> None:
        "A member is missing (or nothing is held)."

    def satisfied(self) -> None:
        "Every member named is held."

    def dial_due(self) -> None:
        "The wait before the next dial is over."

    def attempt_ended(self) -> None:
        "The attempt registered, failed, landed on a member already held, or was refused."

    def stop(self) -> None:
        "No more dials."

    def member_added(self) -> None:
        "A member not named before, and not held, was named: dial for it after a short spread."


@dataclass
class PoolCore:
    clock: IReactorTime
    hooks: PoolHooks
    delay: Callable[[], float]  # the wait before the next dial (the reconnect policy)
    added_delay: Callable[[], float]  # the wait before dialling for a member just named (member_added_delay)
    members: frozenset[str] = frozenset()
    held: dict[str, object] = field(default_factory=dict)  # member id -> its tunnel
    timer: IDelayedCall | None = None
    dialing: bool = False
    dial_due: Callable[[], None] | None = None

    def missing(self) -> frozenset[str]:
        return self.members - self.held.keys()

    def wanted(self) -> bool:
        return not self.held or bool(self.missing())

    def schedule(self, delay: Callable[[], float] | None = None) -> None:
        assert self.dial_due is not None
        self.timer = self.clock.callLater((delay or self.delay)(), self.dial_due)

    def cancel_timer(self) -> None:
        if self.timer is not None and self.timer.active():
            self.timer.cancel()
        self.timer = None

    def check_invariants(self) -> None:
        assert not (self.dialing and self.timer is not None and self.timer.active()), "a timer while dialling"
        assert len(set(map(id, self.held.values()))) == len(self.held), "one tunnel held for two members"


_builder = TypeMachineBuilder(Pool, PoolCore)
New = _builder.state("New")
Idle = _builder.state("Idle")
Waiting = _builder.state("Waiting")
Dialing = _builder.state("Dialing")
Stopped = _builder.state("Stopped")


@New.upon(Pool.start).to(Dialing)
@Waiting.upon(Pool.dial_due).to(Dialing)
def _dial(pool: Pool, core: PoolCore) -> None:
    core.timer = None
    core.dialing = True
    core.hooks.dial()


@Idle.upon(Pool.want).to(Waiting)
def _wait(pool: Pool, core: PoolCore) -> None:
    core.schedule()


@Idle.upon(Pool.member_added).to(Waiting)
@Waiting.upon(Pool.member_added).to(Waiting)
def _wait_afresh(pool: Pool, core: PoolCore) -> None:
    # A member joined (or came back): the balancer now has somewhere new to
    # send the agent, so the wait grown on landings elsewhere is dropped for
    # a short spread (every agent hears MEMBERS within the same seconds).
    core.cancel_timer()
    core.schedule(core.added_delay)


@Waiting.upon(Pool.satisfied).to(Idle)
def _satisfied_waiting(pool: Pool, core: PoolCore) -> None:
    core.cancel_timer()


@Dialing.upon(Pool.attempt_ended).to(Idle)
def _attempt_ended(pool: Pool, core: PoolCore) -> None:
    core.dialing = False


@New.upon(Pool.stop).to(Stopped)
@Idle.upon(Pool.stop).to(Stopped)
@Waiting.upon(Pool.stop).to(Stopped)
def _stop(pool: Pool, core: PoolCore) -> None:
    core.cancel_timer()


@Dialing.upon(Pool.stop).to(Stopped)
def _stop_dialing(pool: Pool, core: PoolCore) -> None:
    core.dialing = False
    core.hooks.cancel_dial()


# The attempt in flight decides what follows it; a second start is nothing.
@Dialing.upon(Pool.want).loop()
@Dialing.upon(Pool.satisfied).loop()
@Waiting.upon(Pool.want).loop()
@Idle.upon(Pool.satisfied).loop()
@New.upon(Pool.want).loop()
@New.upon(Pool.satisfied).loop()
@Idle.upon(Pool.start).loop()
@Waiting.upon(Pool.start).loop()
@Dialing.upon(Pool.start).loop()
@Stopped.upon(Pool.start).loop()
@Stopped.upon(Pool.want).loop()
@Stopped.upon(Pool.satisfied).loop()
@Stopped.upon(Pool.dial_due).loop()
@Stopped.upon(Pool.attempt_ended).loop()
@Stopped.upon(Pool.stop).loop()
@New.upon(Pool.member_added).loop()
@Dialing.upon(Pool.member_added).loop()
@Stopped.upon(Pool.member_added).loop()
@New.upon(Pool.dial_due).loop()
@Idle.upon(Pool.dial_due).loop()
@Dialing.upon(Pool.dial_due).loop()
@New.upon(Pool.attempt_ended).loop()
@Idle.upon(Pool.attempt_ended).loop()
@Waiting.upon(Pool.attempt_ended).loop()
def _ignored(pool: Pool, core: PoolCore) -> None:
    pass


_build = _builder.build()


def new_pool(core: PoolCore) -> Pool:
    """A pool in New: L{Pool.start} dials."""
    pool = _build(core)
    core.dial_due = pool.dial_due
    return pool


# How much the wait after landings on members already held grows per round
# of M landings (M members named).  Doubling, as after failures, left one
# agent in a thousand waiting 30 s per dial minutes after a member joined
# (bench/HISTORY.md, "Cluster"); at 1.2 a run of duplicates still reaches
# the cap (a sticky balancer: after about 6 minutes and 57 dials), and
# even at the longest jitter the first minute holds eight rounds of dials
# (with three members, 24: an agent that misses the one it lacks 24 times
# in a row through a round-robin balancer is one in 17,000).
DUPLICATE_GROWTH = 1.2

# The spread of the first dial for a member just named, in seconds: MEMBERS
# reaches every agent within the same few seconds, so the dials for the new
# member are spread uniformly over this long (1,000 agents: 200 dials a
# second) rather than all made at once, and none waits longer.
MEMBER_ADDED_SPREAD = 5.0


def discovery_delay(initial: float, cap: float, duplicates: int, members: int, random: Callable[[], float]) -> float:
    """
    The wait before dialling the balancer again after C{duplicates} attempts
    in a row landed on members already held, out of C{members} named.

    A duplicate is the balancer's luck, not a failure: with round robin (or a
    flow hash) and M members, a missing member is reached within about M
    dials.  So the wait grows by L{DUPLICATE_GROWTH} once per round of M
    duplicates, not twofold per duplicate (which left the last of 1,000
    agents minutes away from a new member: bench/HISTORY.md, "Cluster"), and
    still reaches C{cap}, so a sticky balancer, which never reaches another
    member, is asked at the usual slow rate in the end.  Jittered in
    [1/2, 1] of the ceiling, never zero.
    """
    level = duplicates // max(1, members)
    ceiling = min(cap, initial * DUPLICATE_GROWTH ** min(level, 512))
    return ceiling * (0.5 + 0.5 * random())


def member_added_delay(cap: float, random: Callable[[], float]) -> float:
    """
    The wait before dialling for a member MEMBERS named for the first time
    (it joined, or came back): uniform over L{MEMBER_ADDED_SPREAD} (or
    C{cap}, if shorter), whatever the wait had grown to on duplicates while
    it was away.
    """
    return min(MEMBER_ADDED_SPREAD, cap) * random()


class PoolState:
    """
    The pool's two sets and its machine, driven by what the tunnels report
    (L{nova.agent.tunnel}) and the adapter sees (L{nova.agent.discovery},
    which also carries out the hooks).  No I/O.
    """

    def __init__(
        self,
        clock: IReactorTime,
        hooks: PoolHooks,
        delay: Callable[[], float],
        added_delay: Callable[[], float] | None = None,
    ) -> None:
        self.core = PoolCore(clock, hooks, delay, added_delay or delay)
        self.machine = new_pool(self.core)
        self.attempt: object | None = None  # the tunnel of the attempt in flight, once connected
        self.stalled: dict[str, object] = {}  # member id -> its stalled tunnel (no longer held)
        self.on_replace: Callable[[object], None] | None = None  # closes a stalled tunnel replaced (the adapter)
        self.duplicates = 0
        # Attempts in a row that landed on a member already held (reset by
        # reaching a missing member, or by an attempt that failed otherwise).
        self.duplicates_in_a_row = 0
        self.on_change: Callable[[], None] | None = None  # after every decision (the adapter's metrics)

    @property
    def members(self) -> frozenset[str]:
        return self.core.members

    @property
    def held(self) -> dict[str, object]:
        return self.core.held

    def _decide(self) -> None:
        if self.core.wanted():
            self.machine.want()
        else:
            self.machine.satisfied()
        self.core.check_invariants()
        if self.on_change is not None:
            self.on_change()

    def start(self) -> None:
        self.machine.start()

    def stop(self) -> None:
        self.machine.stop()

    def connected(self, tunnel: object) -> None:
        """The attempt's connection is up: C{tunnel} is registering."""
        self.attempt = tunnel

    def attempt_failed(self) -> None:
        """The attempt's connection could not be made."""
        self.attempt = None
        self.duplicates_in_a_row = 0
        if not self.core.dialing:
            return
        self.machine.attempt_ended()
        self._decide()

    def welcomed(self, tunnel: object, server_id: str, members: Iterable[str]) -> bool:
        """
        C{tunnel} registered with C{server_id}, which named C{members}.
        False: the pool holds that member already; the tunnel must close.
        """
        current = self.core.held.get(server_id)
        if current is not None and current is not tunnel:
            self.duplicates += 1
            self.duplicates_in_a_row += 1
            return False
        self.duplicates_in_a_row = 0
        self.core.held[server_id] = tunnel
        self.core.members = frozenset(members) | {server_id}
        old = self.stalled.pop(server_id, None)
        if old is not None and old is not tunnel and self.on_replace is not None:
            self.on_replace(old)
        if tunnel is self.attempt:
            self.attempt = None
            self.machine.attempt_ended()
        self._decide()
        return True

    def holds(self, server_id: str) -> bool:
        """Whether a working tunnel to C{server_id} is held (a fresh registration with it is a duplicate)."""
        return server_id in self.core.held

    def has_tunnel(self, server_id: str) -> bool:
        """Whether any tunnel to C{server_id} is up, stalled or not (a REJECT NAME_IN_USE from it is a duplicate)."""
        return server_id in self.core.held or server_id in self.stalled

    def tunnel_stalled(self, tunnel: object) -> None:
        """C{tunnel} stalled: its member counts as missing, so a fresh tunnel is dialled."""
        for member, held in list(self.core.held.items()):
            if held is tunnel:
                del self.core.held[member]
                self.stalled[member] = tunnel
        self._decide()

    def tunnel_recovered(self, tunnel: object) -> None:
        """C{tunnel} was heard from again: held again, unless a fresh tunnel took its member meanwhile."""
        for member, stalled in list(self.stalled.items()):
            if stalled is tunnel:
                del self.stalled[member]
                if member not in self.core.held:
                    self.core.held[member] = tunnel
        self._decide()

    def refused_duplicate(self) -> None:
        self.duplicates += 1
        self.duplicates_in_a_row += 1

    def members_changed(self, members: Iterable[str]) -> None:
        """A held tunnel's server sent MEMBERS."""
        named = frozenset(members)
        added = named - self.core.members - self.core.held.keys()
        self.core.members = named
        if added:
            self.duplicates_in_a_row = 0
            self.machine.member_added()
        self._decide()

    def closed(self, tunnel: object) -> None:
        """C{tunnel} closed (held, an attempt, or a duplicate being closed)."""
        for member, held in list(self.core.held.items()):
            if held is tunnel:
                del self.core.held[member]
        for member, stalled in list(self.stalled.items()):
            if stalled is tunnel:
                del self.stalled[member]
        if tunnel is self.attempt:
            self.attempt = None
            self.machine.attempt_ended()
        self._decide()
