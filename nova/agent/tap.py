"""
C{twist novac}: one reconnecting tunnel per configured server.
"""

from __future__ import annotations

import sys
from typing import Any, NoReturn

from twisted.application.internet import ClientService
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger
from twisted.web.resource import Resource

from nova.service import StartupError, exit_zero_on_sigterm, versions
from nova.tls import TLSConfigError
from nova.wire.errors import ErrorCode

from .dialer import Dialer, reactor_resolver, tcp_connector
from .events import AgentEvents
from .health import health_service
from .options import AgentConfig, Options
from .reconnect import Backoff, reconnecting
from .tunnel import AgentTunnelFactory
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
        # One independent reconnecting tunnel per server: a server that is
        # down delays none of the others.
        self.clients: dict[str, ClientService] = {}
        for host, port in config.servers:
            label = server_label(host, port)
            backoff = Backoff(config.reconnect_initial, config.reconnect_max, server=label)
            self.context.metrics.server_configured(label)
            endpoint = self.context.metrics.connecting(self._endpoint(host, port), label)
            client = reconnecting(endpoint, AgentTunnelFactory(self.context, label, backoff), backoff, reactor)
            client.setServiceParent(self)
            self.clients[label] = client
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
        if not c.tls:
            log.warn("TLS is OFF (--no-tls): tunnel traffic is readable on the network")
        log.info(
            "NOVAC {agent} connecting to {servers}",
            agent=c.name,
            servers=", ".join(self.clients),
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
        server's reconnect loop stops as soon as its tunnel has closed.
        """
        by_server = {t.server: t for t in self.context.tunnels}
        if by_server:
            log.info(
                "draining {n} tunnel(s) for up to {timeout}s",
                n=len(by_server),
                timeout=self.config.drain_timeout,
            )
        stops = []
        for label, client in self.clients.items():
            tunnel = by_server.get(label)
            if tunnel is None or tunnel.mux is None:
                if tunnel is not None:
                    tunnel.close()
                stops.append(client.stopService())
            else:
                drained = tunnel.drain(self.config.drain_timeout, ErrorCode.SHUTDOWN, "agent shutting down")
                stops.append(drained.addCallback(_then_stop, client))
        # Every child is stopped above; only this service itself is left.  (Not
        # MultiService.stopService: it would stop the ClientServices again, from
        # inside their own state machines.)
        d: Deferred[None] = gatherResults(stops).addCallback(lambda _: Service.stopService(self))
        return d


def _then_stop(_: object, client: ClientService) -> Deferred[None]:
    d: Deferred[None] = client.stopService()
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
