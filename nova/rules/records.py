"""
The cluster's rows, as the store holds them: one per server, one per tunnel
a server holds, one per route added at run time.  Pure data.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ServerRecord:
    """
    One NOVAS of the cluster.  C{heartbeat} is the server's own clock at its
    last heartbeat (clocks of the cluster are assumed NTP-synchronised, well
    within the dead timeout).
    """

    id: str
    address: str
    started: float
    version: str
    heartbeat: float


@dataclass(frozen=True)
class TunnelRecord:
    """
    One agent tunnel held by server C{server}.  The same agent name may be
    held by several servers at once (an agent that dials every member), so a
    tunnel is keyed by C{(server, agent)}.
    """

    server: str
    agent: str
    tags: Mapping[str, str] = field(default_factory=dict)
    token_id: str = ""
    since: float = 0.0
    streams: int = 0
    bytes_to_agent: int = 0
    bytes_from_agent: int = 0
    draining: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.server, self.agent)

    @classmethod
    def described(cls, server: str, d: Mapping[str, Any]) -> TunnelRecord:
        """
        The row for a tunnel as the admin API describes it
        (C{ServerTunnel.describe()}): that description is already the
        tunnel's public contract, so the cluster reads the same fields.
        """
        tags = d.get("tags") or {}
        return cls(
            server=server,
            agent=str(d["name"]),
            tags={str(k): str(v) for k, v in dict(tags).items()},
            token_id=str(d.get("token_id") or ""),
            since=float(d.get("connected_since") or 0.0),
            streams=int(d.get("active_streams") or 0),
            bytes_to_agent=int(d.get("bytes_to_agent") or 0),
            bytes_from_agent=int(d.get("bytes_from_agent") or 0),
            draining=d.get("status") == "draining",
        )


@dataclass(frozen=True)
class RouteRecord:
    """
    A route added at run time: C{spec} in C{--route} syntax, as it was
    given (each server reads it with its own default bind address).
    """

    id: str
    spec: str
    created_by: str
    created_at: float


@dataclass(frozen=True)
class DrainRequest:
    """
    An administrator's request to drain agent C{agent} on every member
    (C{POST /api/v1/tunnels/{name}/drain}), made through server C{server} at
    C{requested_at} (that server's clock).  One-shot: it drains the tunnels
    of the agent that were registered by then, never one registered after;
    the store forgets it at C{expires}.
    """

    id: str
    agent: str
    requested_by: str
    requested_at: float
    server: str
    expires: float
