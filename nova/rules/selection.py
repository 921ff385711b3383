"""
The least-loaded matching agent across the cluster: this server's own
tunnels (live counts, from its registry) and the other members' (as of their
last heartbeat, from the cluster view).  Pure; matching is the server's own
L{Selector}, so a route picks the same agents whichever server it runs on.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from nova.rules.records import TunnelRecord
from nova.rules.routes import Selector


class LocalTunnel(Protocol):
    """What selection reads of a tunnel this server holds (L{nova.server.registry.Registered} has it)."""

    @property
    def name(self) -> str: ...

    @property
    def tags(self) -> Mapping[str, str]: ...

    @property
    def draining(self) -> bool: ...

    def open_streams(self) -> int: ...


@dataclass(frozen=True)
class Candidate:
    """A tunnel that could carry a stream: agent C{agent} on server C{server}."""

    server: str
    agent: str
    streams: int
    local: bool


def candidates(
    selector: Selector, me: str, local: Iterable[LocalTunnel], remote: Iterable[TunnelRecord]
) -> list[Candidate]:
    """Every matching, non-draining tunnel; our own rows in C{remote} are ignored (the registry is fresher)."""
    found = [
        Candidate(me, t.name, t.open_streams(), True)
        for t in local
        if not t.draining and selector.matches(t.name, t.tags)
    ]
    found.extend(
        Candidate(r.server, r.agent, r.streams, False)
        for r in remote
        if r.server != me and not r.draining and selector.matches(r.agent, r.tags)
    )
    return found


class LeastLoaded:
    """
    Chooses among candidates: fewest streams first; on a tie a local tunnel
    before a remote one (no hop to a peer); then round robin, so equal agents
    share new streams.
    """

    def __init__(self) -> None:
        self._turn = 0

    def choose(
        self,
        selector: Selector,
        me: str,
        local: Iterable[LocalTunnel],
        remote: Iterable[TunnelRecord],
        exclude: Collection[tuple[str, str]] = (),
    ) -> Candidate | None:
        """The chosen tunnel, or None; C{exclude} holds C{(server, agent)} pairs already tried."""
        best: list[Candidate] = []
        for c in candidates(selector, me, local, remote):
            if (c.server, c.agent) in exclude:
                continue
            if not best or _rank(c) < _rank(best[0]):
                best = [c]
            elif _rank(c) == _rank(best[0]):
                best.append(c)
        if not best:
            return None
        self._turn += 1
        return best[self._turn % len(best)]


def _rank(c: Candidate) -> tuple[int, bool]:
    return (c.streams, not c.local)
