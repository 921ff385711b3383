"""
C{twist novac}: one agent pool per configured server address: a tunnel to
each member of the cluster behind it (one, for a server without a cluster).
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.web.resource import Resource

from nova.service import StartupError, exit_zero_on_sigterm, versions
from nova.tls import TLSConfigError
from nova.transport import epoll

from .dialer import Dialer, reactor_resolver, tcp_connector
from .discovery import AgentPool
from .events import AgentEvents
from .health import health_service
from .options import AgentConfig, Options
from .reconnect import Backoff
from .wiring import agent_context, server_endpoint, server_label

log = Logger()


class NovacService(MultiService):
    def __init__(self, config: AgentConfig, reactor: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor

        # Names are resolved once and only the addresses the policy allows are
        # dialled (no DNS rebinding between the check and the connection).
        dialer = Dialer(config.policy, reactor_resolver(reactor), tcp_connector(reactor, config.connect_timeout))
        connect_target = dialer.connect

        # Counted for Prometheus only where /metrics is served: otherwise
        # neither prometheus_client nor the counters are loaded.
        events = AgentEvents()
        metrics_page: Resource | None = None
        if config.health_port is not None and config.metrics:
            from .metrics import AgentMetrics

            counted = AgentMetrics()
            events, metrics_page = counted, counted.page()
        self.context = agent_context(config, reactor, connect_target, events)
        # One independent pool per server address: a server that is down
        # delays none of the others.  Each keeps a tunnel to every member of
        # the cluster behind its address (docs/cluster.md, "Discovery").
        self.pools: dict[str, AgentPool] = {}
        for host, port in config.servers:
            label = server_label(host, port)
            backoff = Backoff(config.reconnect_initial, config.reconnect_max, server=label)
            self.context.metrics.server_configured(label)
            endpoint = self.context.metrics.connecting(self._endpoint(host, port), label)
            pool = AgentPool(endpoint, self.context, label, backoff, reactor, config.drain_timeout)
            pool.setServiceParent(self)  # type: ignore[no-untyped-call]
            self.pools[label] = pool
        if config.health_port is not None:
            health = health_service(reactor, config.health_bind, config.health_port, self.ready, metrics_page)
            health.setServiceParent(self)  # type: ignore[no-untyped-call]

    def ready(self) -> bool:
        """Registered with at least one server."""
        return any(t.mux is not None and not t.closed for t in self.context.tunnels)

    def _endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        try:
            return server_endpoint(self.reactor, self.config, host, port)
        except TLSConfigError as e:
            raise StartupError(f"novac: error: {e}") from None

    def startService(self) -> None:
        c = self.config
        log.info("{versions}", versions=versions("novac"))
        epoll.install(self.reactor)  # docs/datapath.md, "The reactor's per-event cost"
        if not c.tls:
            log.warn("TLS is OFF (--no-tls): tunnel traffic is readable on the network")
        log.info(
            "NOVAC {agent} connecting to {servers}",
            agent=c.name,
            servers=", ".join(self.pools),
        )
        log.info("destination policy: {policy}", policy=str(c.policy))
        if c.health_port is not None:
            paths = "/healthz, /readyz, /metrics" if c.metrics else "/healthz, /readyz"
            log.info("health probes on {bind}:{port} ({paths})", bind=c.health_bind, port=c.health_port, paths=paths)
        super().startService()  # type: ignore[no-untyped-call]

        exit_zero_on_sigterm(self.reactor, log)

    def stopService(self) -> Deferred[None]:
        """
        Graceful drain: GOAWAY to every server, so no new streams come; the
        open ones run until they end or the drain timeout passes.  Each
        pool stops dialling at once.
        """
        held = [t for t in self.context.tunnels if t.mux is not None]
        if held:
            log.info("draining {n} tunnel(s) for up to {timeout}s", n=len(held), timeout=self.config.drain_timeout)
        # Every child is stopped here; only this service itself is left.
        stops = [pool.stopService() for pool in self.pools.values()]
        d: Deferred[None] = gatherResults(stops).addCallback(lambda _: Service.stopService(self))
        return d


def makeService(options: Options) -> IService:
    if options.get("check"):
        run_check(options)
    from twisted.internet import reactor

    return NovacService(options.config, reactor)


def run_check(options: Options) -> NoReturn:
    """C{--check}: a one-off run instead of the service; never returns, and logs nothing."""
    from .check import run  # only --check needs it (and what it imports)

    for warning in options.warnings:
        print(f"novac: warning: {warning}", file=sys.stderr)
    run(options.config)
