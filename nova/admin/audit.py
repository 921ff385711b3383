"""
The one place where NOVAS's notable events go: each becomes a structured
log event, an audit record and a metric update.  The rest of the server
calls these methods and knows nothing of stores or Prometheus.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from nova.wire.text import untrusted

from .metrics import Metrics
from .store import AuditStore, Record


class Audit:
    def __init__(
        self,
        store: AuditStore | None = None,
        metrics: Metrics | None = None,
        server: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.metrics = metrics or Metrics()
        self.server = server
        self.clock = clock

    def _record(self, kind: str, agent: str, **data: Any) -> None:
        if self.store is not None:
            # Text in a record may have come from a peer: escaped here, once.
            safe = {k: _escaped(v) for k, v in data.items()}
            self.store.record(Record(kind, self.clock(), untrusted(agent, 64), self.server, safe))

    # Tunnels.

    def registered(self, agent: str, **data: Any) -> None:
        self.metrics.registrations.inc()
        self.metrics.tunnels.inc()
        self.metrics.agent_registered(agent)
        self._record("tunnel_registered", agent, **data)

    def unregistered(self, agent: str, reason: str, duration: float) -> None:
        self.metrics.tunnels.dec()
        try:
            self.metrics.rtt.remove(agent)
        except KeyError:
            pass
        self.metrics.agent_unregistered(agent)
        self._record("tunnel_unregistered", agent, reason=reason, duration=round(duration, 3))

    def refusal_counted(self, code: str) -> None:
        """A connection that did not register was refused (every one is counted)."""
        self.metrics.auth_failures.labels(code).inc()

    def auth_failed(
        self, source: str, claimed_name: str, code: str, reason: str, count: int = 1, token_id: str = ""
    ) -> None:
        """
        One audit record for C{count} refusals from C{source}.  The name a
        client claimed is kept apart from the C{agent} field: nobody proved it.
        """
        data: dict[str, Any] = {"source": source, "code": code, "reason": reason, "count": count}
        if claimed_name:
            data["claimed_name"] = claimed_name
        if token_id:
            data["token_id"] = token_id
        self._record("auth_failed", "", **data)

    def rtt(self, agent: str, seconds: float) -> None:
        label = self.metrics.agent_label(agent)
        if label == agent:  # an agent beyond the label bound has no RTT series (one would be meaningless)
            self.metrics.rtt.labels(agent).set(seconds)

    # Streams.

    def stream_opened(
        self, agent: str, entry: str, requester: str, target: str, latency: float, route: str = ""
    ) -> None:
        """C{route}: the configured route the stream came through; empty for SOCKS (L{route_label})."""
        self.metrics.streams_active.inc()
        self.metrics.count(self.metrics.streams_opened, agent, _kind(entry), route_label(entry, route))
        self.metrics.open_latency.observe(latency)
        # (The entry point logs the open at info level.)
        self._record("stream_opened", agent, entry=entry, requester=requester, target=target)

    def stream_closed(
        self,
        agent: str,
        entry: str,
        requester: str,
        target: str,
        bytes_up: int,
        bytes_down: int,
        duration: float,
        reason: str,
        route: str = "",
    ) -> None:
        self.metrics.streams_active.dec()
        label = route_label(entry, route)
        self.metrics.count(self.metrics.bytes, agent, "up", label, amount=bytes_up)
        self.metrics.count(self.metrics.bytes, agent, "down", label, amount=bytes_down)
        self._record(
            "stream_closed",
            agent,
            entry=entry,
            requester=requester,
            target=target,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            duration=round(duration, 3),
            reason=reason,
        )

    def open_failed(
        self, agent: str, entry: str, requester: str, target: str, reason: str, message: str, route: str = ""
    ) -> None:
        self.metrics.count(self.metrics.streams_failed, agent, reason, route_label(entry, route))
        self._record(
            "open_failed", agent, entry=entry, requester=requester, target=target, reason=reason, message=message
        )

    # Changes an operator made (the admin API).

    def route_added(self, route_id: str, spec: str, who: str) -> None:
        self._record("route_added", "", route_id=route_id, route=spec, who=who)

    def route_removed(self, route_id: str, spec: str, who: str) -> None:
        self._record("route_removed", "", route_id=route_id, route=spec, who=who)

    def tunnel_drained(self, agent: str, who: str) -> None:
        self._record("tunnel_drained", agent, who=who)


def _kind(entry: str) -> str:
    """The kind of entry point (C{route}, C{socks}) without what follows it."""
    return entry.split(" ", 1)[0]


def route_label(entry: str, route: str) -> str:
    """
    The C{route} label: the configured route, else the kind of entry
    (C{socks}).  Never the SOCKS selector or target: users choose those.
    """
    return route or _kind(entry)


def _escaped(value: Any) -> Any:
    if isinstance(value, str):
        return untrusted(value, 1024)
    if isinstance(value, dict):
        return {untrusted(str(k), 64): _escaped(v) for k, v in value.items()}
    return value
