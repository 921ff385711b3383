"""
The least-loaded matching agent, ranked by its load on the whole cluster.

Without peering a server can open streams only through the tunnels it holds
itself, but with discovery every member holds a tunnel to the same agent,
so each member's own stream count says little: an agent busy through
another member looks idle here.  An agent's load is therefore its live
streams here plus its streams on the other members as of their last
heartbeat (the cluster view, L{remote_load}).  A stale view (the store
unreachable) still ranks by what it last read.  Pure: matching is the
server's own L{Selector}, the tunnels and the remote load are handed in.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Protocol, TypeVar

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


T = TypeVar("T", bound=LocalTunnel)


def remote_load(me: str, remote: Iterable[TunnelRecord]) -> dict[str, int]:
    """
    Streams per agent on the other members, as of their last heartbeat.
    Our own rows are left out (the registry's live counts are fresher), and
    so are draining tunnels' (their streams end, and no new one goes there).
    """
    load: dict[str, int] = {}
    for r in remote:
        if r.server != me and not r.draining:
            load[r.agent] = load.get(r.agent, 0) + r.streams
    return load


class LeastLoaded:
    """
    Chooses among this server's tunnels: the matching, non-draining one
    whose agent has the fewest streams on the whole cluster; among equals,
    round robin, so equal agents share new streams.
    """

    def __init__(self) -> None:
        self._turn = 0

    def choose(
        self,
        selector: Selector,
        local: Iterable[T],
        load: Mapping[str, int] | None = None,
        exclude: Collection[T] = (),
    ) -> T | None:
        """The chosen tunnel, or None; C{load} is L{remote_load}'s map, C{exclude} the tunnels already tried."""
        best: list[T] = []
        fewest = 0
        for t in local:
            if t.draining or t in exclude or not selector.matches(t.name, t.tags):
                continue
            n = t.open_streams() + (load.get(t.name, 0) if load else 0)
            if not best or n < fewest:
                best, fewest = [t], n
            elif n == fewest:
                best.append(t)
        if not best:
            return None
        self._turn += 1
        return best[self._turn % len(best)]
