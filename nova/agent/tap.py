"""
C{twist novac}: one reconnecting tunnel per configured server.
"""

from __future__ import annotations

from typing import Any

from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.interfaces import IProtocol, IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger

from nova.tls import TLSConfigError, client_creator

from .options import AgentConfig, Options
from .tunnel import AgentContext, AgentTunnel, AgentTunnelFactory

log = Logger()


class NovacService(MultiService):
    def __init__(self, config: AgentConfig, reactor: Any) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.config = config
        self.reactor = reactor

        def connect_target(host: str, port: int, protocol: IProtocol) -> Deferred[IProtocol]:
            endpoint = HostnameEndpoint(reactor, host, port, timeout=config.connect_timeout)
            return endpoint.connect(_OneShot(protocol))

        self.context = AgentContext(
            name=config.name,
            tags=config.tags,
            token=config.token,
            tls=config.tls,
            clock=reactor,
            connect_target=connect_target,
            window=config.window,
            max_streams=config.max_streams,
        )
        self.clients: dict[str, ClientService] = {}
        for host, port in config.servers:
            label = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            client = ClientService(
                self._endpoint(host, port),
                AgentTunnelFactory(self.context, label),
                retryPolicy=backoffPolicy(initialDelay=1.0, maxDelay=30.0),
                clock=reactor,
                prepareConnection=_registered,
            )
            client.setServiceParent(self)
            self.clients[label] = client

    def _endpoint(self, host: str, port: int) -> IStreamClientEndpoint:
        c = self.config
        endpoint: IStreamClientEndpoint = HostnameEndpoint(self.reactor, host, port, timeout=c.connect_timeout)
        if c.tls:
            try:
                creator = client_creator(c.server_name or host, c.ca, c.fingerprint)
            except TLSConfigError as e:
                raise SystemExit(f"novac: error: {e}") from None
            endpoint = wrapClientTLS(creator, endpoint)
        return endpoint

    def startService(self) -> None:
        c = self.config
        if not c.tls:
            log.warn("TLS is OFF (--no-tls): tunnel traffic is readable on the network")
        log.info(
            "NOVAC {agent} connecting to {servers}",
            agent=c.name,
            servers=", ".join(self.clients),
        )
        super().startService()  # type: ignore[no-untyped-call]

    def stopService(self) -> Deferred[None]:
        # Close the tunnels ourselves: ClientService's own loseConnection
        # would wait on the TLS transport's registered producer.
        for tunnel in list(self.context.tunnels):
            tunnel.close()
        d: Deferred[None] = super().stopService()  # type: ignore[no-untyped-call]
        return d


class _OneShot(Factory):
    """Hands out one given protocol (like connectProtocol's, but quiet)."""

    noisy = False

    def __init__(self, protocol: IProtocol) -> None:
        self.protocol_ = protocol

    def buildProtocol(self, addr: Any) -> Any:
        return self.protocol_


def _registered(protocol: IProtocol) -> Deferred[AgentTunnel]:
    """ClientService counts a connection as made only once it registered."""
    registered: Deferred[AgentTunnel] = protocol.registered  # type: ignore[attr-defined]
    return registered


def makeService(options: Options) -> IService:
    from twisted.internet import reactor

    return NovacService(options.config, reactor)
