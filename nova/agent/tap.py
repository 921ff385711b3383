"""
C{twist novac}: one agent pool per configured server address: a tunnel to
each member of the cluster behind it (one, for a server without a cluster).
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.logger import Logger

from nova.service import StartupError, exit_zero_on_sigterm, versions
from nova.tls import TLSConfigError, client_creator

from .discovery import AgentPool, PoolGroup
from .health import health_service
from .options import AgentConfig, Options
from .policy import Dialer, reactor_resolver, tcp_connector
from .reconnect import Backoff
from .tunnel import AgentContext

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

        self.context = AgentContext(
            name=config.name,
            tags=config.tags,
            token=config.token,
            tls=config.tls,
            clock=reactor,
            connect_target=connect_target,
            window=config.window,
            max_window=config.max_window,
            timing=config.timing(),
            max_streams=config.max_streams,
            max_open_rate=float(config.max_open_rate),
            policy=config.policy,
        )
        # One independent pool per server address: a server that is down
        # delays none of the others.  Each keeps a tunnel to every member of
        # the cluster behind its address (docs/cluster.md, "Discovery").
        self.pools: dict[str, AgentPool] = {}
        group = PoolGroup()
        for host, port in config.servers:
            label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            backoff = Backoff(config.reconnect_initial, config.reconnect_max, server=label)
            self.context.metrics.server_configured(label)
            endpoint = self.context.metrics.connecting(self._endpoint(host, port), label)
            pool = AgentPool(endpoint, self.context, label, backoff, reactor, config.drain_timeout, group)
            pool.setServiceParent(self)  # type: ignore[no-untyped-call]
            self.pools[label] = pool
        if config.health_port is not None:
            metrics = self.context.metrics.registry if config.metrics else None
            health = health_service(reactor, config.health_bind, config.health_port, self.ready, metrics)
            health.setServiceParent(self)  # type: ignore[no-untyped-call]

    def ready(self) -> bool:
        """Registered with at least one server."""
        return any(t.mux is not None and not t.closed for t in self.context.tunnels)

    def _endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        c = self.config
        endpoint: IStreamClientEndpoint = HostnameEndpoint(self.reactor, host, port, timeout=c.connect_timeout)
        if c.tls:
            try:
                creator = client_creator(c.server_name or host, c.ca, c.fingerprint, c.client_cert)
            except TLSConfigError as e:
                raise StartupError(f"novac: error: {e}") from None
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint

    def startService(self) -> None:
        c = self.config
        log.info("{versions}", versions=versions("novac"))
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
    from twisted.internet import reactor

    return NovacService(options.config, reactor)
