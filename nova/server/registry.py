"""
The registered tunnels, by agent name, and the choice of one for a stream.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping
from typing import Protocol

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from nova.rules.routes import Selector
from nova.rules.selection import LeastLoaded
from nova.transport.stream import StreamTransport

from .early import EarlyData


class Registered(Protocol):
    name: str
    tags: dict[str, str]
    draining: bool

    def open_streams(self) -> int: ...

    def open_stream(self, host: str, port: int, early: EarlyData | None = None) -> Deferred[StreamTransport]: ...

    def replaced(self) -> None: ...


class Registry:
    log = Logger()

    def __init__(self) -> None:
        self._by_name: dict[str, Registered] = {}
        self._chooser = LeastLoaded()
        # Each agent's streams on the other members of the cluster, as of
        # their last heartbeat (nova.server.cluster keeps it up to date).
        self.remote_load: Mapping[str, int] = {}
        # Opens waiting for a fresh tunnel (see next_registration).
        self._waiters: list[Deferred[None]] = []

    def __iter__(self) -> Iterator[Registered]:
        return iter(list(self._by_name.values()))

    def __len__(self) -> int:
        return len(self._by_name)

    def get(self, name: str) -> Registered | None:
        return self._by_name.get(name)

    def register(self, tunnel: Registered) -> None:
        """
        Add C{tunnel}.  An older tunnel under the same name is replaced at
        once: the newest registration is the agent that is really there.
        """
        old = self._by_name.get(tunnel.name)
        self._by_name[tunnel.name] = tunnel
        if old is not None and old is not tunnel:
            self.log.info("agent {name} registered again; closing its previous tunnel", name=tunnel.name)
            old.replaced()
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(None)

    def next_registration(self) -> Deferred[None]:
        """
        Fires when the next tunnel registers: an open whose tunnel died
        waits for the agent's fresh one (L{nova.server.endpoint}).
        Cancelling it forgets the wait.
        """

        def forget(d: Deferred[None]) -> None:
            if d in self._waiters:
                self._waiters.remove(d)

        d: Deferred[None] = Deferred(forget)
        self._waiters.append(d)
        return d

    def unregister(self, tunnel: Registered) -> None:
        if self._by_name.get(tunnel.name) is tunnel:
            del self._by_name[tunnel.name]

    def matching(self, selector: Selector) -> list[Registered]:
        """Every registered agent the selector matches, draining or not."""
        return [t for t in self._by_name.values() if selector.matches(t.name, t.tags)]

    def choose(self, selector: Selector, exclude: Collection[Registered] = ()) -> Registered | None:
        """
        The matching agent, not draining and not in C{exclude}, with the
        fewest streams on the whole cluster (live here, plus
        L{remote_load}); ties are broken round robin.
        """
        return self._chooser.choose(selector, self._by_name.values(), self.remote_load, exclude)
