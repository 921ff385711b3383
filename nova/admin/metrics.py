"""
Prometheus metrics (prometheus_client), in a registry of NOVAS's own.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.tunnels = Gauge("nova_tunnels_connected", "Agent tunnels registered now.", registry=r)
        self.registrations = Counter("nova_registrations", "Successful agent registrations.", registry=r)
        self.auth_failures = Counter(
            "nova_auth_failures", "Rejected agent handshakes, by reason.", ["reason"], registry=r
        )
        self.streams_active = Gauge("nova_streams_active", "Streams open now.", registry=r)
        self.streams_opened = Counter("nova_streams_opened", "Streams opened, by entry.", ["entry"], registry=r)
        self.streams_failed = Counter(
            "nova_streams_failed", "Streams that could not be opened, by reason.", ["reason"], registry=r
        )
        self.bytes = Counter(
            "nova_stream_bytes", "Bytes carried by streams (up: toward the target).", ["direction"], registry=r
        )
        self.open_latency = Histogram(
            "nova_stream_open_seconds",
            "Time from a user's connection to its stream being open.",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.rtt = Gauge("nova_keepalive_rtt_seconds", "Last keepalive round trip, by agent.", ["agent"], registry=r)
        self.audit_dropped = Counter(
            "nova_audit_dropped", "Audit records dropped because the store fell behind or failed.", registry=r
        )
