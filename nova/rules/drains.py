"""
Cluster-wide drain as a pure core: which of this server's tunnels a set of
drain requests (L{DrainRequest}, read from the store) drains now.

A request is one-shot: each member applies it once, to its tunnel of the
agent if that tunnel was registered by the time of the request; a tunnel
the agent registers afterwards (its reconnection, most likely) is not
drained by an old request.  Times are compared across servers (the request
carries the answering server's clock, a tunnel its holder's), so the
cluster's clocks must agree, as for heartbeats.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Protocol, TypeVar

from nova.rules.records import DrainRequest


class DrainableTunnel(Protocol):
    """What the ledger reads of a tunnel this server holds (L{nova.server.tunnel.ServerTunnel} has it)."""

    @property
    def draining(self) -> bool: ...

    @property
    def registered_at(self) -> float: ...


T = TypeVar("T", bound=DrainableTunnel)


class DrainLedger:
    """
    The requests this server has applied, kept until they expire (so a
    request read again at the next poll is not applied twice).
    """

    def __init__(self) -> None:
        self._applied: dict[str, float] = {}

    def applied(self, request: DrainRequest) -> bool:
        """Mark C{request} as applied here; False if it already was."""
        if request.id in self._applied:
            return False
        self._applied[request.id] = request.expires
        return True

    def due(
        self, requests: Iterable[DrainRequest], held: Callable[[str], T | None], now: float
    ) -> list[tuple[DrainRequest, T]]:
        """
        The tunnels to drain now, each with its request: C{held} gives this
        server's tunnel of an agent (or None).  Every live request given is
        marked applied, whether or not it found a tunnel to drain here.
        """
        for rid, expires in list(self._applied.items()):
            if expires < now:
                del self._applied[rid]
        out: list[tuple[DrainRequest, T]] = []
        for r in requests:
            if r.expires < now or not self.applied(r):
                continue
            tunnel = held(r.agent)
            if tunnel is None or tunnel.draining or tunnel.registered_at > r.requested_at:
                continue
            out.append((r, tunnel))
        return out
