"""
NOVAC's Prometheus metrics, in a registry of its own, served on the probe
port's C{/metrics} (L{nova.agent.health}).  Loaded only when NOVAC serves
them; otherwise the agent's events go to L{nova.agent.events.AgentEvents}.

The agent's code calls one method per event, where it already logs that
event; this module alone knows Prometheus.  Label values are bounded: C{server}
is a configured server address, C{reason} comes from fixed sets in the code;
targets are never a label (a server chooses them).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import Counter, Gauge, Histogram
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IProtocol, IProtocolFactory, IStreamClientEndpoint
from twisted.python.failure import Failure
from zope.interface import implementer

from nova.prometheus import OPEN_BUCKETS, MetricsPage, base_registry
from nova.transport.stream import StreamTransport

from .events import RECONNECT_REASONS as RECONNECT_REASONS  # the label values of nova_agent_reconnects
from .events import AgentEvents


class AgentMetrics(AgentEvents):
    """The agent's events counted in a Prometheus registry of its own, served by L{page}."""

    def __init__(self) -> None:
        self.registry = r = base_registry("novac")
        self.tunnel_up = Gauge(
            "nova_agent_tunnel_up", "1 while the tunnel to this server is registered, else 0.", ["server"], registry=r
        )
        self.reconnects = Counter(
            "nova_agent_reconnects",
            "Tunnels or attempts that ended while the agent runs (another attempt follows), by reason.",
            ["server", "reason"],
            registry=r,
        )
        self.streams_opened = Counter(
            "nova_agent_streams_opened", "Streams connected to their target, by server.", ["server"], registry=r
        )
        self.streams_failed = Counter(
            "nova_agent_streams_failed",
            "Streams refused with OPEN_FAIL, by server and reason (denied, refused, timeout, ...).",
            ["server", "reason"],
            registry=r,
        )
        self.bytes = Counter(
            "nova_agent_stream_bytes",
            "Bytes carried by streams, counted when each closes (up: toward the target), by server.",
            ["server", "direction"],
            registry=r,
        )
        self.open_latency = Histogram(
            "nova_agent_stream_open_seconds",
            "Time from a server's OPEN to the target's connection being made.",
            ["server"],
            buckets=OPEN_BUCKETS,
            registry=r,
        )
        self.pool_members = Gauge(
            "nova_agent_pool_members",
            "Cluster members the servers behind this address named (1 for a server without a cluster).",
            ["server"],
            registry=r,
        )
        self.pool_tunnels = Gauge(
            "nova_agent_pool_tunnels",
            "Tunnels held through this address, one per member reached (docs/cluster.md, Discovery).",
            ["server"],
            registry=r,
        )
        self.denials = Counter(
            "nova_agent_policy_denials", "Streams the destination policy refused, by server.", ["server"], registry=r
        )

    def page(self) -> MetricsPage:
        """The probe port's C{/metrics}: no credential asked (reachable inside the cluster only)."""
        return MetricsPage(self.registry, None)

    # Tunnels.

    def server_configured(self, server: str) -> None:
        """C{server} is one to keep a tunnel to: its C{tunnel_up} shows 0 until it registers."""
        self.tunnel_up.labels(server).set(0)

    def registered(self, server: str) -> None:
        self.tunnel_up.labels(server).set(1)

    def tunnel_ended(self, server: str, registered: bool, stopping: bool, ended_by: str | None) -> None:
        """
        The tunnel to C{server} closed: it had C{registered} or not; the
        agent is C{stopping} (no reconnect follows, nothing is counted); the
        tunnel was C{ended_by} a REJECT or GOAWAY (L{RECONNECT_REASONS}).
        """
        self.tunnel_up.labels(server).set(0)
        if not stopping:
            reason = ended_by or ("lost" if registered else "handshake_failed")
            self.reconnects.labels(server, reason).inc()

    def pool(self, server: str, tunnels: int, members: int) -> None:
        """The pool behind C{server} holds C{tunnels} of the C{members} it knows; up while it holds one."""
        self.pool_tunnels.labels(server).set(tunnels)
        self.pool_members.labels(server).set(members)
        self.tunnel_up.labels(server).set(1 if tunnels else 0)

    def connecting(self, endpoint: IStreamClientEndpoint, server: str) -> IStreamClientEndpoint:
        """C{endpoint}, counting each connection it fails to make as a C{connect_failed} reconnect."""
        return _CountingEndpoint(endpoint, lambda: self.reconnects.labels(server, "connect_failed").inc())

    # Streams.

    def stream_opened(self, server: str, stream: StreamTransport, latency: float) -> None:
        self.streams_opened.labels(server).inc()
        self.open_latency.labels(server).observe(latency)
        stream.on_close.append(lambda s, _: self._stream_closed(server, s))

    def _stream_closed(self, server: str, stream: StreamTransport) -> None:
        # The agent's stream writes toward the server what the target sent.
        self.bytes.labels(server, "up").inc(stream.bytes_delivered)
        self.bytes.labels(server, "down").inc(stream.bytes_written)

    def stream_failed(self, server: str, reason: str) -> None:
        self.streams_failed.labels(server, reason.lower()).inc()

    def denied(self, server: str) -> None:
        self.denials.labels(server).inc()
        self.stream_failed(server, "denied")


@implementer(IStreamClientEndpoint)
class _CountingEndpoint:
    def __init__(self, endpoint: IStreamClientEndpoint, on_failure: Callable[[], None]) -> None:
        self._endpoint = endpoint
        self._on_failure = on_failure

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        d: Deferred[IProtocol] = self._endpoint.connect(protocolFactory)

        def failed(failure: Failure) -> Failure:
            if not failure.check(CancelledError):  # cancelled: the agent is stopping
                self._on_failure()
            return failure

        d.addErrback(failed)
        return d
