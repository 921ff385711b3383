"""
Prometheus metrics (prometheus_client), in a registry of NOVAS's own.

Label values are bounded (docs/metrics.md): C{route} is a configured route
(or C{socks}, never the SOCKS target or selector a user chose); C{agent} is
one of at most C{max_agent_labels} registered agent names at a time (those
beyond share L{OTHER}); C{reason}, C{entry} and C{direction} come from fixed
sets in the code.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nova.prometheus import OPEN_BUCKETS, base_registry

DEFAULT_AGENT_LABELS = 100
"""
Agent names that get a label value of their own at once.  Agents are
usually few, but their names come from the agents (in Kubernetes, pod
names that change with every rollout): without a bound, every name ever
seen would stay a series in NOVAS and in Prometheus.
"""

OTHER = "(other)"
"""The C{agent} label of agents beyond the bound: not a valid agent name, so never mistaken for one."""

NONE = "(none)"
"""The C{agent} label of a stream that found no agent."""


class AgentLabels:
    """
    Which agent names have a label value of their own: at most C{limit}
    at a time, first come first served, among the registered agents.  A name
    keeps its value while any tunnel under it is registered; when the last
    one goes, the value is freed (and its series dropped by L{Metrics}), so
    a name that comes later can take it.  Names beyond the limit share
    L{OTHER}.
    """

    def __init__(self, limit: int = DEFAULT_AGENT_LABELS) -> None:
        self.limit = limit
        self._held: dict[str, int] = {}  # name -> tunnels registered under it

    def acquire(self, name: str) -> None:
        """A tunnel under C{name} registered."""
        if name in self._held:
            self._held[name] += 1
        elif len(self._held) < self.limit:
            self._held[name] = 1

    def release(self, name: str) -> bool:
        """A tunnel under C{name} went away; True if the name's label value is now free."""
        count = self._held.get(name)
        if count is None:
            return False
        if count > 1:
            self._held[name] = count - 1
            return False
        del self._held[name]
        return True

    def __call__(self, name: str) -> str:
        """The C{agent} label value for C{name}."""
        if not name:
            return NONE
        return name if name in self._held else OTHER

    def __len__(self) -> int:
        return len(self._held)


RouteCounts = Callable[[], Iterable[tuple[str, int]]]


class RouteAgents(Collector):
    """C{nova_route_agents{route}}: agents that could carry each route's streams now, read at scrape time."""

    NAME = "nova_route_agents"
    HELP = "Registered agents, not draining, that match each route's selector (0: the route cannot work)."

    def __init__(self, counts: RouteCounts) -> None:
        self._counts = counts

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(self.NAME, self.HELP, labels=["route"])

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(self.NAME, self.HELP, labels=["route"])
        for route, count in self._counts():
            family.add_metric([route], count)
        yield family


class Metrics:
    def __init__(self, max_agent_labels: int = DEFAULT_AGENT_LABELS) -> None:
        self.registry = r = base_registry("novas")
        self.agent_label = AgentLabels(max_agent_labels)
        # Series carrying each agent label value, dropped when the value is freed.
        self._series: dict[str, set[tuple[Counter, tuple[str, ...]]]] = {}
        # Each series' child, looked up once: count() runs three times per
        # stream, and Counter.labels() validates and locks every time.
        self._children: dict[tuple[Counter, tuple[str, ...]], Counter] = {}
        self.tunnels = Gauge("nova_tunnels_connected", "Agent tunnels registered now.", registry=r)
        self.registrations = Counter("nova_registrations", "Successful agent registrations.", registry=r)
        self.auth_failures = Counter(
            "nova_auth_failures", "Rejected agent handshakes, by reason.", ["reason"], registry=r
        )
        self.streams_active = Gauge("nova_streams_active", "Streams open now.", registry=r)
        self.streams_opened = Counter(
            "nova_streams_opened", "Streams opened, by entry, route and agent.", ["entry", "route", "agent"], registry=r
        )
        self.streams_failed = Counter(
            "nova_streams_failed",
            "Streams that could not be opened, by reason, route and agent.",
            ["reason", "route", "agent"],
            registry=r,
        )
        self.bytes = Counter(
            "nova_stream_bytes",
            "Bytes carried by streams, counted when each closes (up: toward the target), by route and agent.",
            ["direction", "route", "agent"],
            registry=r,
        )
        self.open_latency = Histogram(
            "nova_stream_open_seconds",
            "Time from a user's connection to its stream being open.",
            buckets=OPEN_BUCKETS,
            registry=r,
        )
        self.rtt = Gauge("nova_keepalive_rtt_seconds", "Last keepalive round trip, by agent.", ["agent"], registry=r)
        self.audit_dropped = Counter(
            "nova_audit_dropped", "Audit records dropped because the store fell behind or failed.", registry=r
        )

    def watch_routes(self, counts: RouteCounts) -> None:
        """Export C{nova_route_agents} from C{counts()}, called at each scrape."""
        self.registry.register(RouteAgents(counts))

    def agent_registered(self, name: str) -> None:
        self.agent_label.acquire(name)

    def agent_unregistered(self, name: str) -> None:
        if self.agent_label.release(name):
            for counter, labels in self._series.pop(name, ()):
                counter.remove(*labels)
                self._children.pop((counter, labels), None)

    def count(self, counter: Counter, agent: str, *labels: str, amount: float = 1) -> None:
        """Add C{amount} to C{counter}'s series for C{labels} and C{agent}'s label value (the last label)."""
        value = self.agent_label(agent)
        key = (*labels, value)
        series = self._children.get((counter, key))
        if series is None:
            series = self._children[(counter, key)] = counter.labels(*key)
            if value not in (OTHER, NONE):
                self._series.setdefault(value, set()).add((counter, key))
        series.inc(amount)
