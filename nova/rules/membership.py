"""
Cluster membership as a pure core: when to heartbeat, what a heartbeat
writes, which rows have expired, and the cluster view with its staleness.
No I/O: the adapter (L{nova.cluster.heartbeat}) runs the store and reports
each outcome here; time comes from an injected L{IReactorTime}.

Expiry: a server is alive while its last heartbeat is younger than the dead
timeout; its tunnels live and die with it.  A server beats every third of
the dead timeout, so two lost heartbeats in a row do not yet expire it.

Staleness: while the store cannot be reached, the view keeps what it last
read and says since when it is stale; expiry is then judged at the time of
that last read (the store's last word), not at the present, so that a store
outage does not make every other member look dead.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from twisted.internet.interfaces import IReactorTime

from nova.rules.records import ServerRecord, TunnelRecord

# A heartbeat every third of the dead timeout: a member survives two lost
# heartbeats (a slow store, a short outage) before the others expire it.
BEATS_PER_DEAD_TIMEOUT = 3


@dataclass(frozen=True)
class Beat:
    """What one heartbeat writes: our row, our tunnels (replacing the previous set), and the expiry horizon."""

    server: ServerRecord
    tunnels: tuple[TunnelRecord, ...]
    expire_before: float


@dataclass(frozen=True)
class ClusterView:
    """
    The members and their tunnels as this server last saw them.  C{servers}
    holds the live members (this one always among them); C{tunnels} the
    tunnels of the other live members (ours come from the local registry).
    C{stale_since} is None while the store answers, else the time of the
    first failed attempt after the last success (or this server's start if
    the store never answered).
    """

    me: str
    servers: tuple[ServerRecord, ...]
    tunnels: tuple[TunnelRecord, ...]
    as_of: float | None
    stale_since: float | None

    @property
    def stale(self) -> bool:
        return self.stale_since is not None


class Membership:
    """
    One server's membership: C{me} is its record (its C{heartbeat} field is
    rewritten at each beat).  Call L{beat} when L{interval} has passed, hand
    the result to the store, then report L{read} or L{failed}.
    """

    def __init__(self, me: ServerRecord, dead_timeout: float, clock: IReactorTime) -> None:
        if dead_timeout <= 0:
            raise ValueError("the dead timeout is a positive number of seconds")
        self.me = me
        self.dead_timeout = dead_timeout
        self.clock = clock
        self._servers: tuple[ServerRecord, ...] = ()
        self._tunnels: tuple[TunnelRecord, ...] = ()
        self._as_of: float | None = None
        self._stale_since: float | None = clock.seconds()
        self.last_error: str | None = None

    @property
    def interval(self) -> float:
        """Seconds between heartbeats."""
        return self.dead_timeout / BEATS_PER_DEAD_TIMEOUT

    def beat(self, tunnels: Iterable[TunnelRecord]) -> Beat:
        """The rows to write now; C{tunnels} are this server's (their C{server} is set to ours)."""
        now = self.clock.seconds()
        server = ServerRecord(self.me.id, self.me.address, self.me.started, self.me.version, now)
        mine = tuple(_owned(t, self.me.id) for t in tunnels)
        return Beat(server, mine, now - self.dead_timeout)

    def read(self, servers: Sequence[ServerRecord], tunnels: Sequence[TunnelRecord]) -> None:
        """The store answered with these rows: the view is fresh again."""
        self._servers = tuple(servers)
        self._tunnels = tuple(tunnels)
        self._as_of = self.clock.seconds()
        self._stale_since = None
        self.last_error = None

    def failed(self, error: str) -> bool:
        """
        The store could not be reached.  Returns True when this is the
        first failure since the last success (when to log it).
        """
        self.last_error = error
        if self._stale_since is None:
            self._stale_since = self.clock.seconds()
            return True
        return False

    def alive(self, server: ServerRecord) -> bool:
        return server.id == self.me.id or server.heartbeat >= self._horizon()

    def view(self) -> ClusterView:
        """The live members and their tunnels, expired rows left out."""
        horizon = self._horizon()
        live = {s.id: s for s in self._servers if s.heartbeat >= horizon and s.id != self.me.id}
        me = ServerRecord(self.me.id, self.me.address, self.me.started, self.me.version, self._my_heartbeat())
        tunnels = tuple(t for t in self._tunnels if t.server in live)
        servers = tuple(sorted([me, *live.values()], key=lambda s: s.id))
        return ClusterView(self.me.id, servers, tunnels, self._as_of, self._stale_since)

    def _my_heartbeat(self) -> float:
        for s in self._servers:
            if s.id == self.me.id:
                return s.heartbeat
        return self.me.heartbeat

    def _horizon(self) -> float:
        """Rows whose heartbeat is older than this have expired."""
        now = self.clock.seconds()
        if self._stale_since is not None and self._as_of is not None:
            now = min(now, self._as_of)
        return now - self.dead_timeout


def _owned(tunnel: TunnelRecord, server: str) -> TunnelRecord:
    if tunnel.server == server:
        return tunnel
    return TunnelRecord(
        server,
        tunnel.agent,
        dict(tunnel.tags),
        tunnel.token_id,
        tunnel.since,
        tunnel.streams,
        tunnel.bytes_to_agent,
        tunnel.bytes_from_agent,
        tunnel.draining,
    )
